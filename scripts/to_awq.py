"""A float Hugging Face checkpoint as an AWQ 4-bit checkpoint in AutoAWQ's GEMM format (round-to-nearest,
asymmetric, no activation-aware scaling search: the on-disk format is what matters for loading and speed),
for the benchmark in the README. Linear layers of the decoder become `qweight` int32 [in, out/8] (nibble
order [0,2,4,6,1,3,5,7]), `qzeros` int32 [in/g, out/8], `scales` f16 [in/g, out]; the rest is stored in
float16, as AutoAWQ stores it.

usage: python scripts/to_awq.py MODEL_DIR OUT_DIR [GROUP=128]   (needs torch + safetensors)
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

src, out = sys.argv[1], sys.argv[2]
group_size = int(sys.argv[3]) if len(sys.argv) > 3 else 128
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack(int_cols):
    rows, cols = int_cols.shape
    packed = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for i in range(8):
        packed |= int_cols[:, AWQ_ORDER[i]::8].long() << (4 * i)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def quantize(w, group):
    out_f, in_f = w.shape
    g = w.float().view(out_f, in_f // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    s = ((hi - lo) / 15).clamp(min=1e-5).half()
    z = torch.round(-lo / s.float()).clamp(0, 15).to(torch.int32)
    q = torch.clamp(torch.round(g / s.float()[..., None]) + z[..., None], 0, 15).to(torch.int32)
    q = q.view(out_f, in_f)
    return pack(q.T.contiguous()), pack(z.T.contiguous()), s.T.contiguous()


os.makedirs(out, exist_ok=True)
tensors = {}
for f in sorted(os.listdir(src)):
    if not f.endswith(".safetensors"):
        continue
    for name, t in load_file(os.path.join(src, f)).items():
        prefix, _, leaf = name.rpartition(".")
        if leaf == "weight" and prefix.rsplit(".", 1)[-1] in LINEARS and t.shape[1] % group_size == 0:
            qweight, qzeros, scales = quantize(t, group_size)
            tensors[f"{prefix}.qweight"] = qweight
            tensors[f"{prefix}.qzeros"] = qzeros
            tensors[f"{prefix}.scales"] = scales
        else:
            tensors[name] = t.half().contiguous()
save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
cfg = json.load(open(os.path.join(src, "config.json")))
cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                              "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
cfg["torch_dtype"] = "float16"
json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
for f in os.listdir(src):
    if f.endswith(".json") and f != "config.json" or f.endswith(".jinja"):
        shutil.copy(os.path.join(src, f), out)
print("wrote", out)
