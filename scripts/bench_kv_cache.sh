#!/usr/bin/env bash
# The 8-bit KV cache (KV_CACHE_DTYPE int8 / fp8_e4m3 / fp8_e5m2) beside the float cache on one model:
# KV bytes per token and tokens per GiB, quality teacher-forced over a text against the float cache
# (top-1 agreement, mean |Δ log p|), and decode tokens/s after a long context, the kinds alternating
# within each round, medians over the rounds. Prints the machine's load before and after.
#
# usage: scripts/bench_kv_cache.sh MODEL_DIR [CONTEXT=2048] [NEW=64] [ROUNDS=3] [TEXT_FILE=README.md]
# env:   RAYON_NUM_THREADS (default 2), KINDS (default auto,int8,fp8_e4m3), QUANTIZATION (weights, e.g. q8_0)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --example kv_cache_bench
grep -m1 "model name" /proc/cpuinfo || true
echo "load before: $(uptime)"
RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}" target/release/examples/kv_cache_bench "$@"
echo "load after: $(uptime)"
