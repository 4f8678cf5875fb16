"""Reference for the decoder-as-embedder path (Qwen3-Embedding style: last-token pooling, L2 norm).

Runs the `llama` fixture with Hugging Face transformers (float32, CPU) on the input ids of its own
reference cases and writes, for each, the normalised final hidden state of the last token.

    python tests/data/embeddings/decoder_reference.py > tests/data/embeddings/decoder_reference.json
"""
import json
import pathlib

import torch
from transformers import AutoModel

root = pathlib.Path(__file__).resolve().parents[3]
fixture = root / "tests/fixtures/llama"
cases = json.loads((fixture / "reference.json").read_text())["cases"]
model = AutoModel.from_pretrained(fixture, dtype=torch.float32).eval()
out = []
with torch.no_grad():
    for c in cases[:5]:
        ids = torch.tensor([c["input_ids"]])
        h = model(input_ids=ids).last_hidden_state[0, -1]
        h = torch.nn.functional.normalize(h, dim=-1)
        out.append({"input_ids": c["input_ids"], "embedding": [round(float(x), 7) for x in h]})
print(json.dumps({"model": "llama", "pooling": "lasttoken", "normalize": True, "cases": out}))
