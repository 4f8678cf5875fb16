"""Single-stream decode and prefill tokens/s and resident memory of worker-candle beside llama.cpp on the
same weights: float32, q8_0 and 4-bit (our in-situ q4k and llama.cpp's q4_k_m file, and the GGUF files
through our loader). Each configuration runs in its own process; rounds alternate the systems so that
machine noise hits both alike; prints medians over rounds and the per-round ratio to llama.cpp.

usage: python scripts/bench_quant.py MODEL_DIR GGUF_PREFIX [PROMPT=128] [NEW=128] [ROUNDS=3] [AWQ_DIR]

With AWQ_DIR (the same weights as an AWQ 4-bit checkpoint: scripts/to_awq.py MODEL_DIR AWQ_DIR 64) it also
runs that checkpoint beside llama.cpp's q4_0 file (PREFIX-q4_0.gguf), and this engine on that file; ONLY=awq
runs just those three rows;
ONLY=q8_0,q4 (any comma-separated parts of the labels) just the rows that name one of them.

MODEL_DIR: a float32 Hugging Face folder (shared/bench/bench_model.py); GGUF_PREFIX: the same weights as
GGUF (shared/bench/to_gguf.py writes PREFIX-f32.gguf, -q8_0.gguf, -q4_k_m.gguf). Needs
`cargo build --release --example forward_bench` and a Python with llama-cpp-python. 2 threads each.
"""
import json
import os
import re
import statistics
import subprocess
import sys

model_dir, prefix = sys.argv[1], sys.argv[2]
P = int(sys.argv[3]) if len(sys.argv) > 3 else 128
N = int(sys.argv[4]) if len(sys.argv) > 4 else 128
ROUNDS = int(sys.argv[5]) if len(sys.argv) > 5 else 3
awq_dir = sys.argv[6] if len(sys.argv) > 6 else None
# THREADS=1: both systems on one thread (on a machine too busy for two threads each to be fair)
THREADS = os.environ.get("THREADS", "2")
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ours_bin = os.path.join(root, "target", "release", "examples", "forward_bench")

LLAMA = r"""
import json, sys, time, numpy as np, llama_cpp
path, P, N = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = [int(x) for x in np.random.default_rng(0).integers(100, 40000, P)]
T = int(sys.argv[4])
llm = llama_cpp.Llama(model_path=path, n_threads=T, n_threads_batch=T, n_ctx=P + N + 16, n_batch=512,
                      verbose=False, logits_all=False)
pre, dec = [], []
llm.eval(ids[:8]); llm.reset()
for _ in range(3):
    llm.reset()
    t = time.perf_counter(); llm.eval(ids); pre.append(P / (time.perf_counter() - t))
    t = time.perf_counter()
    for j in range(N):
        # any token costs the same; llama-cpp-python keeps only n_batch rows of scores
        llm.eval([ids[j % P]])
    dec.append(N / (time.perf_counter() - t))
rss = next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]
print(json.dumps({"prefill": sorted(pre)[1], "decode": sorted(dec)[1], "rss": int(rss) / 1024}))
"""


def ours(path, quant):
    env = dict(os.environ, RAYON_NUM_THREADS=THREADS, QUANTIZATION=quant or "none")
    out = subprocess.run([ours_bin, path, str(P), str(N), "3"], env=env, capture_output=True,
                         text=True, check=True).stdout
    m = re.search(r"prefill ([\d.]+) tok/s, decode ([\d.]+) tok/s, rss (\d+) MiB", out)
    return {"prefill": float(m[1]), "decode": float(m[2]), "rss": float(m[3])}


def llama(kind):
    out = subprocess.run([sys.executable, "-c", LLAMA, f"{prefix}-{kind}.gguf", str(P), str(N), THREADS],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# (label, runner, the llama.cpp row it is compared with)
CONFIGS = [
    ("llama.cpp f32", lambda: llama("f32"), None),
    ("worker-candle f32", lambda: ours(model_dir, None), "llama.cpp f32"),
    ("llama.cpp q8_0", lambda: llama("q8_0"), None),
    ("worker-candle q8_0 (in situ)", lambda: ours(model_dir, "q8_0"), "llama.cpp q8_0"),
    ("worker-candle q8_0 (GGUF)", lambda: ours(f"{prefix}-q8_0.gguf", None), "llama.cpp q8_0"),
    ("llama.cpp q4_k_m", lambda: llama("q4_k_m"), None),
    ("worker-candle q4k (in situ)", lambda: ours(model_dir, "q4k"), "llama.cpp q4_k_m"),
    ("worker-candle q4_k_m (GGUF)", lambda: ours(f"{prefix}-q4_k_m.gguf", None), "llama.cpp q4_k_m"),
]
if awq_dir:
    AWQ = [
        ("llama.cpp q4_0", lambda: llama("q4_0"), None),
        ("worker-candle AWQ 4-bit checkpoint", lambda: ours(awq_dir, None), "llama.cpp q4_0"),
        ("worker-candle q4_0 (llama.cpp's GGUF)", lambda: ours(f"{prefix}-q4_0.gguf", None), "llama.cpp q4_0"),
    ]
    CONFIGS = AWQ if os.environ.get("ONLY") == "awq" else CONFIGS + AWQ
if os.environ.get("ONLY", "awq") != "awq":
    # ONLY=q8_0,q4: just the rows whose label names one of these (each with its llama.cpp row)
    want = os.environ["ONLY"].split(",")
    CONFIGS = [c for c in CONFIGS if any(w in c[0] for w in want)]

results = {label: [] for label, _, _ in CONFIGS}
for r in range(ROUNDS):
    for label, run, _ in CONFIGS:
        results[label].append(run())
        print(f"round {r + 1} {label}: {results[label][-1]}", file=sys.stderr, flush=True)

print(f"prompt {P} tokens, {N} new tokens, {THREADS} threads, {ROUNDS} rounds; medians; ratio = median of the "
      f"per-round ratios to llama.cpp")
print(f"| system | decode tok/s | decode ratio | prefill tok/s | prefill ratio | RSS MiB |")
print(f"| --- | ---: | ---: | ---: | ---: | ---: |")
for label, _, peer in CONFIGS:
    rows = results[label]
    med = lambda k: statistics.median(x[k] for x in rows)
    ratio = lambda k: (statistics.median(a[k] / b[k] for a, b in zip(rows, results[peer]))
                       if peer else 1.0)
    print(f"| {label} | {med('decode'):.1f} | {ratio('decode'):.2f}x | {med('prefill'):.1f} | "
          f"{ratio('prefill'):.2f}x | {med('rss'):.0f} |")
