#!/usr/bin/env bash
# The GPU checks of one session with a GPU machine, as one prepared script (#20).
#
#   bash scripts/gpu-check.sh build   # here, on the CPU machine: release binaries with --features cuda
#                                     # (toolkit from PyPI wheels, as scripts/check-cuda.sh), stripped and
#                                     # xz-compressed into .gpu/ (under 64 MiB, to carry to the GPU machine)
#   bash scripts/gpu-check.sh run     # there: the GPU tests, then the decode benchmark on a model of
#                                     # Llama-3.1-8B's shape with random bf16 weights; logs to $OUT
#
# `run` needs no Rust toolchain and no network: the test binary finds its fixtures where it was built
# (CARGO_MANIFEST_DIR is baked in at compile time), so the checkout is linked there first.
# Environment: CUDA_COMPUTE_CAP (default 90: Hopper; PTX also runs on newer), BENCH_SHAPE (default
# llama-3.1-8b), BENCH_CONCURRENCY (default 1,16,64,256), BANDWIDTH_GBPS (default 4800: an H200).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
mode="${1:-}"

case "$mode" in
build)
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  # The toolkit from wheels and its environment, as check-cuda.sh sets them up; its build command is
  # ours (release test and example binaries).
  bash scripts/check-cuda.sh --env-only
  # shellcheck disable=SC1091
  source target/cuda-venv/env.sh
  cargo build --release --features cuda --bin worker-candle --example random_model \
    --example batch_decode_bench
  tests="$(cargo test --release --features cuda --test it --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\/it-[^"]*\)".*/\1/p' | tail -1)"
  [ -n "$tests" ] || { echo "gpu-check: no test binary" >&2; exit 1; }
  rm -rf .gpu && mkdir -p .gpu
  grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  for f in target/release/worker-candle target/release/examples/random_model \
      target/release/examples/batch_decode_bench "$tests"; do
    name="$(basename "$f" | sed 's/^it-.*/it/')"
    strip -o ".gpu/$name" "$f"
    xz -T0 -6 ".gpu/$name"
  done
  echo "$root" > .gpu/manifest_dir
  du -ch .gpu/* | tail -1
  echo "gpu-check: carry .gpu, then run: bash scripts/gpu-check.sh run"
  ;;
run)
  out="${OUT:-/tmp/gpu-check-out}"
  mkdir -p "$out" /tmp/gpu-bin
  for f in .gpu/*.xz; do xz -dc "$f" > "/tmp/gpu-bin/$(basename "$f" .xz)"; done
  chmod +x /tmp/gpu-bin/*
  built_at="$(cat .gpu/manifest_dir)"
  if [ "$built_at" != "$root" ]; then
    mkdir -p "$(dirname "$built_at")"
    ln -sfn "$root" "$built_at"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  set +e
  # The GPU's own tests, then the reference and batching suites on the GPU (DEVICE stays auto there).
  (cd "$built_at" && timeout 240 /tmp/gpu-bin/it --test-threads 1 gpu:: models_reference:: \
    engine_fixtures:: 2>&1) | tee "$out/tests.log" | tail -40
  echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$out/tests.log"
  shape="${BENCH_SHAPE:-llama-3.1-8b}"
  DEVICE=cuda /tmp/gpu-bin/random_model "$shape" /tmp/bench-model bf16 2>&1 | tee "$out/bench.log"
  DEVICE=cuda DTYPE=bf16 timeout 240 /tmp/gpu-bin/batch_decode_bench /tmp/bench-model \
    "${BENCH_CONCURRENCY:-1,16,64,256}" 32 64 2>&1 | tee -a "$out/bench.log"
  echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$out/bench.log"
  ;;
*)
  echo "usage: bash scripts/gpu-check.sh build|run" >&2
  exit 2
  ;;
esac
