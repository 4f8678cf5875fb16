#!/usr/bin/env bash
# Compile-checks the `cuda` feature on a machine without a GPU or a system CUDA toolkit, so a GPU
# build cannot rot unseen. nvcc, the CUDA headers and CCCL come from PyPI wheels into a venv; the
# build scripts (candle-kernels compiles its kernels with nvcc even under `cargo check`) use them.
# CUDA 13's wheels are used because they ship nvcc itself (the -cu12 nvcc wheel only has ptxas), and
# they install as one toolkit-shaped tree (nvidia/cu13/{bin,include,lib}).
#
#   bash scripts/check-cuda.sh                       # cargo check --features cuda --all-targets
#   CUDA_CHECK_CMD=build bash scripts/check-cuda.sh  # a full build (links libcudart from the wheel)
#   bash scripts/check-cuda.sh --env-only            # only the toolkit: writes target/cuda-venv/env.sh
#
# Environment: CUDA_COMPUTE_CAP (default 80: Ampere; no nvidia-smi here to detect one),
# CUDA_WHEEL_VERSION (pip version specifier for the wheels, default "==13.0.*").
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir="${CARGO_TARGET_DIR:-target}"
venv="$target_dir/cuda-venv"
spec="${CUDA_WHEEL_VERSION:-==13.0.*}"
wheels=(nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-crt nvidia-cuda-runtime nvidia-cuda-cccl)

start=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
stamp="$venv/.wheels"
want="${wheels[*]/%/$spec}"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  for attempt in 1 2 3; do
    if "$venv/bin/pip" install --quiet --disable-pip-version-check --retries 5 --timeout 60 \
        "${wheels[@]/%/$spec}"; then
      break
    fi
    [ "$attempt" = 3 ] && { echo "check-cuda: pip install failed" >&2; exit 1; }
    sleep $((attempt * 10))
  done
  echo "$want" > "$stamp"
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
root="$site/nvidia/cu13"
lib="$root/lib"
# The runtime wheel ships only libcudart.so.13; the linker looks for libcudart.so.
if [ ! -e "$lib/libcudart.so" ]; then
  ln -sf "$(basename "$(ls "$lib"/libcudart.so.1* | head -1)")" "$lib/libcudart.so"
fi
echo "check-cuda: toolkit from wheels ready in $((SECONDS - start)) s: $("$root/bin/nvcc" --version | tail -1)"

export CUDA_ROOT="$root" CUDA_HOME="$root" CUDA_PATH="$root"
export PATH="$root/bin:$PATH"
export LIBRARY_PATH="$lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
cat > "$venv/env.sh" <<ENV
export CUDA_ROOT="$root" CUDA_HOME="$root" CUDA_PATH="$root" CUDA_COMPUTE_CAP="$CUDA_COMPUTE_CAP"
export PATH="$PATH" LIBRARY_PATH="$LIBRARY_PATH" LD_LIBRARY_PATH="$LD_LIBRARY_PATH"
ENV
if [ "${1:-}" = "--env-only" ]; then
  exit 0
fi

start=$SECONDS
cargo "${CUDA_CHECK_CMD:-check}" --features cuda --all-targets
echo "check-cuda: cargo ${CUDA_CHECK_CMD:-check} --features cuda passed in $((SECONDS - start)) s"
