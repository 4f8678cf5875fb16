"""Fixtures for the end-to-end suite. `tests/it/openai_client.rs` starts `worker-candle serve` on a fixture
model and runs pytest with:

- WORKER_BASE_URL: the server's root URL (e.g. http://127.0.0.1:40123)
- WORKER_MODEL: the served model name
- WORKER_FIXTURE: the fixture model folder (its reference.json holds the expected outputs)
"""

import json
import os
from pathlib import Path

import pytest
from openai import OpenAI


def _env(name):
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"{name} is not set: run this suite through `cargo test --test it openai_client`")
    return value


@pytest.fixture(scope="session")
def base_url():
    return _env("WORKER_BASE_URL").rstrip("/")


@pytest.fixture(scope="session")
def model():
    return _env("WORKER_MODEL")


@pytest.fixture(scope="session", params=["/openai/v1", "/v1"])
def client(request, base_url):
    """The official client, as users point it at the endpoint (both prefixes serve the API)."""
    return OpenAI(base_url=base_url + request.param, api_key="not-used", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def client_at():
    """The official client for a second server the Rust side started with other settings, whose URL is
    in the environment variable named (the test skips when it is not set)."""
    return lambda var: OpenAI(base_url=_env(var).rstrip("/") + "/v1", api_key="not-used", max_retries=0,
                              timeout=120)


@pytest.fixture(scope="session")
def tool_calls():
    """`tool_calls(client, stream, **kwargs)`: a chat reply's tool calls as `{"name", "arguments"}`, the
    streamed deltas joined per index; a whole reply must end with `finish_reason: "tool_calls"`."""

    def collect(client, stream, **kwargs):
        if stream:
            calls = {}
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                    entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                    entry["name"] += d.function.name or ""
                    entry["arguments"] += d.function.arguments or ""
            return list(calls.values())
        r = client.chat.completions.create(**kwargs)
        assert r.choices[0].finish_reason == "tool_calls", r
        return [{"name": c.function.name, "arguments": c.function.arguments} for c in r.choices[0].message.tool_calls]

    return collect


@pytest.fixture(scope="session")
def reference():
    return json.loads((Path(_env("WORKER_FIXTURE")) / "reference.json").read_text())


@pytest.fixture(scope="session")
def text_cases(reference):
    return [c for c in reference["cases"] if not c.get("messages")]


@pytest.fixture(scope="session")
def chat_cases(reference):
    return [c for c in reference["cases"] if c.get("messages")]
