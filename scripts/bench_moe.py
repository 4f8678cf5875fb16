"""Single-stream decode and prefill tokens/s of a mixture of experts in worker-candle beside llama.cpp on
the same weights: random float32 weights in a small real Qwen3-MoE shape (8 experts, top 2), written as
a Hugging Face folder and, by `tests/fixtures/gguf/make_moe.py`'s converter, as GGUF, quantized to q8_0 by
llama.cpp itself. Rows: llama.cpp on the q8_0 file, this engine on the same file, and this engine
quantizing the float32 folder to q8_0 at load. Rounds alternate the systems; medians and the median of
the per-round ratios to llama.cpp.

usage: python scripts/bench_moe.py OUT_DIR [PROMPT=128] [NEW=128] [ROUNDS=3]
Needs `cargo build --release --example forward_bench` and a Python with torch, transformers, gguf,
llama-cpp-python. THREADS (default 2) threads each.
"""
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

out_dir = sys.argv[1]
P = int(sys.argv[2]) if len(sys.argv) > 2 else 128
N = int(sys.argv[3]) if len(sys.argv) > 3 else 128
ROUNDS = int(sys.argv[4]) if len(sys.argv) > 4 else 3
THREADS = os.environ.get("THREADS", "2")
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ours_bin = os.path.join(root, "target", "release", "examples", "forward_bench")
model_dir = os.path.join(out_dir, "qwen3-moe")
f32, q8 = os.path.join(out_dir, "qwen3-moe-f32.gguf"), os.path.join(out_dir, "qwen3-moe-q8_0.gguf")

if not os.path.exists(q8):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "qwen3_moe", hidden_size=768, intermediate_size=2048, moe_intermediate_size=768, num_hidden_layers=8,
        num_attention_heads=12, num_key_value_heads=4, head_dim=64, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, vocab_size=40960, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=3, eos_token_id=6, pad_token_id=None, rope_theta=1000000.0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(model_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(root, "tests", "fixtures", "llama", f), model_dir)
    spec = importlib.util.spec_from_file_location(
        "make_moe", os.path.join(root, "tests", "fixtures", "gguf", "make_moe.py"))
    make_moe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_moe)
    make_moe.write(model_dir, f32, "qwen3moe")
    make_moe.quantize(f32, q8)

if ROUNDS == 0:
    sys.exit(0)

LLAMA = r"""
import json, sys, time, numpy as np, llama_cpp
path, P, N, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ids = [int(x) for x in np.random.default_rng(0).integers(100, 40000, P)]
llm = llama_cpp.Llama(model_path=path, n_threads=T, n_threads_batch=T, n_ctx=P + N + 16, n_batch=512,
                      verbose=False, logits_all=False)
pre, dec = [], []
llm.eval(ids[:8]); llm.reset()
for _ in range(3):
    llm.reset()
    t = time.perf_counter(); llm.eval(ids); pre.append(P / (time.perf_counter() - t))
    t = time.perf_counter()
    for j in range(N):
        llm.eval([ids[j % P]])
    dec.append(N / (time.perf_counter() - t))
print(json.dumps({"prefill": sorted(pre)[1], "decode": sorted(dec)[1]}))
"""


def ours(path, quant):
    env = dict(os.environ, RAYON_NUM_THREADS=THREADS, QUANTIZATION=quant or "none")
    out = subprocess.run([ours_bin, path, str(P), str(N), "3"], env=env, capture_output=True,
                         text=True, check=True).stdout
    m = re.search(r"prefill ([\d.]+) tok/s, decode ([\d.]+) tok/s", out)
    return {"prefill": float(m[1]), "decode": float(m[2])}


def llama(path):
    out = subprocess.run([sys.executable, "-c", LLAMA, path, str(P), str(N), THREADS],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


CONFIGS = [
    ("llama.cpp q8_0", lambda: llama(q8), None),
    ("worker-candle q8_0 (the GGUF)", lambda: ours(q8, None), "llama.cpp q8_0"),
    ("worker-candle q8_0 (in situ)", lambda: ours(model_dir, "q8_0"), "llama.cpp q8_0"),
]
results = {label: [] for label, _, _ in CONFIGS}
for r in range(ROUNDS):
    for label, run, _ in CONFIGS:
        results[label].append(run())
        print(f"round {r + 1} {label}: {results[label][-1]}", file=sys.stderr, flush=True)

print(f"Qwen3-MoE shape: hidden 768, 8 layers, 8 experts of 768 (top 2), vocabulary 40960; prompt {P}, "
      f"{N} new tokens, {THREADS} threads, {ROUNDS} rounds; medians; ratio = median of per-round ratios")
print("| system | decode tok/s | decode ratio | prefill tok/s | prefill ratio |")
print("| --- | ---: | ---: | ---: | ---: |")
for label, _, peer in CONFIGS:
    rows = results[label]
    med = lambda k: statistics.median(x[k] for x in rows)
    ratio = lambda k: (statistics.median(a[k] / b[k] for a, b in zip(rows, results[peer])) if peer else 1.0)
    print(f"| {label} | {med('decode'):.1f} | {ratio('decode'):.2f}x | {med('prefill'):.1f} | "
          f"{ratio('prefill'):.2f}x |")
