"""vLLM's embedding extensions through the official `openai` client, against `serve` on the bert-embed
fixture (`tests/it/openai_client.rs` starts it and sets WORKER_EMBED_BASE_URL; without it these skip)."""

import json
import math
import os
from pathlib import Path

import openai
import pytest
from openai import OpenAI
from openai.types import CreateEmbeddingResponse

TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module", params=["/openai/v1", "/v1"])
def embed(request):
    base = os.environ.get("WORKER_EMBED_BASE_URL")
    if not base:
        pytest.skip("WORKER_EMBED_BASE_URL is not set: run through `cargo test --test it openai_client`")
    return OpenAI(base_url=base.rstrip("/") + request.param, api_key="not-used", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def case():
    fixture = Path(os.environ.get("WORKER_EMBED_FIXTURE", "."))
    return json.loads((fixture / "reference.json").read_text())["cases"][0]


def _norm(v):
    return math.sqrt(sum(x * x for x in v))


def _close(a, b):
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_normalize_false_returns_the_raw_pooled_vector(embed, case):
    model = embed.models.list().data[0].id
    raw = embed.embeddings.create(model=model, input=case["input"], extra_body={"normalize": False}).data[0].embedding
    assert abs(_norm(raw) - 1.0) > 1e-3
    _close([x / _norm(raw) for x in raw], case["embedding"])
    unit = embed.embeddings.create(model=model, input=case["input"]).data[0].embedding
    _close(unit, case["embedding"])


def test_chat_style_embeddings_as_vllm_documents_them(embed, case):
    model = embed.models.list().data[0].id
    # vLLM's own example posts `messages` with the client's `post` (embeddings.create requires `input`).
    r = embed.post(
        "/embeddings",
        cast_to=CreateEmbeddingResponse,
        body={"model": model, "messages": [{"role": "user", "content": case["input"]}], "chat_template": TEMPLATE,
              "add_special_tokens": True, "encoding_format": "float"},
    )
    _close(r.data[0].embedding, case["embedding"])
    assert r.usage.prompt_tokens == len(case["input_ids"])


def test_dimensions_on_a_matryoshka_model_and_unknown_fields(embed, case):
    model = embed.models.list().data[0].id
    short = embed.embeddings.create(model=model, input=case["input"], dimensions=8).data[0].embedding
    assert len(short) == 8 and abs(_norm(short) - 1.0) < 1e-4
    with pytest.raises(openai.BadRequestError) as e:
        embed.embeddings.create(model=model, input=case["input"], extra_body={"normalise": False})
    assert e.value.body["param"] == "normalise"
