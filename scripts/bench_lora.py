"""LoRA serving cost: aggregate decode tokens/s of STREAMS concurrent greedy streams spread over
ADAPTERS rank-R adapters on every projection (q/k/v/o, gate/up/down), against the same streams on the
base model alone, in one engine (examples/lora_bench.rs; rounds alternate the two).

usage: python scripts/bench_lora.py MODEL_DIR [ADAPTERS=4] [RANK=16] [STREAMS=16] [NEW=64] [ROUNDS=3]

MODEL_DIR: a float32 Llama-family folder (shared/bench/bench_model.py writes SmolLM2-135M's shape).
Writes the adapters (PEFT layout, random weights) beside it, MODEL_DIR-lora-r{RANK}-{i}; needs torch and
safetensors, and builds `cargo build --release --example lora_bench`.
"""
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import save_file

model_dir = sys.argv[1]
n_adapters = int(sys.argv[2]) if len(sys.argv) > 2 else 4
rank = int(sys.argv[3]) if len(sys.argv) > 3 else 16
streams = sys.argv[4] if len(sys.argv) > 4 else "16"
new = sys.argv[5] if len(sys.argv) > 5 else "64"
rounds = sys.argv[6] if len(sys.argv) > 6 else "3"
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

cfg = json.load(open(os.path.join(model_dir, "config.json")))
h, inter = cfg["hidden_size"], cfg["intermediate_size"]
hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
q, kv = cfg["num_attention_heads"] * hd, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd
shapes = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
          "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
          "mlp.down_proj": (inter, h)}
dirs = []
for a in range(n_adapters):
    out = f"{model_dir.rstrip('/')}-lora-r{rank}-{a}"
    dirs.append(out)
    if os.path.isfile(os.path.join(out, "adapter_model.safetensors")):
        continue
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(a)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for name, (i, o) in shapes.items():
            p = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{p}.lora_A.weight"] = torch.randn(rank, i, generator=g) * 0.02
            tensors[f"{p}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.02
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
    json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
               "target_modules": [n.split(".")[1] for n in shapes], "base_model_name_or_path": model_dir},
              open(os.path.join(out, "adapter_config.json"), "w"), indent=2)

if not os.environ.get("NO_BUILD"):  # NO_BUILD=1: run the example as last built
    subprocess.run(["cargo", "build", "--release", "--example", "lora_bench"], cwd=root, check=True)
print("load average before:", open("/proc/loadavg").read().split()[:3])
subprocess.run([os.path.join(root, "target", "release", "examples", "lora_bench"), model_dir, *dirs,
                "--streams", streams, "--new-tokens", new, "--rounds", rounds],
               env=dict(os.environ, RAYON_NUM_THREADS="2"), check=True)
print("load average after:", open("/proc/loadavg").read().split()[:3])
