"""Tool round trips on `/v1/responses` and `/v1/messages` with the official clients, against a server
whose chat template supports tools (tests/e2e/tool_template.jinja, a Hermes-style template as
Qwen2.5's) and that requires an API key. `tests/it/tool_round_trips.rs` starts that server; the
template reports what it was given when a tool result starts with REPORT, so the test reads how the
tool calls and their results reached the prompt. Random weights call no tools themselves: the
parsing of calls out of model output is unit-tested (src/api/openai/responses.rs,
src/api/anthropic/messages.rs)."""

import os

import openai
import pytest

if not os.environ.get("WORKER_API_KEY"):
    pytest.skip("run through `cargo test --test it tool_round_trips`", allow_module_level=True)

anthropic = pytest.importorskip("anthropic")

KEY = os.environ.get("WORKER_API_KEY", "")
GREEDY = {"temperature": 0, "max_output_tokens": 4}
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture(scope="module")
def oai(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(base_url):
    return anthropic.Anthropic(base_url=base_url, api_key=KEY, max_retries=0, timeout=120)


def _call_items(output):
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_abc", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_abc", "output": output},
    ]


def test_function_call_output_items_reach_the_prompt(oai, model):
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model=model, input=_call_items("REPORT sunny"), tools=tools, **GREEDY)
    seen = e.value.body["message"]
    assert "user Weather in Paris?; assistant call call_abc get_weather" in seen, seen
    assert '"city"' in seen and "Paris" in seen
    assert "tool call_abc=REPORT sunny; tools: get_weather" in seen, seen
    # Rendered for real, the round trip answers, and the call and its result count in the prompt.
    r = oai.responses.create(model=model, input=_call_items("sunny, 21 C"), tools=tools, **GREEDY)
    bare = oai.responses.create(model=model, input="Weather in Paris?", tools=tools, **GREEDY)
    assert r.output[0].type == "message"
    assert r.usage.input_tokens > bare.usage.input_tokens + 10


def test_a_tool_result_continues_a_stored_response(oai, model):
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
    first = oai.responses.create(model=model, input="Weather in Paris?", tools=tools, **GREEDY)
    follow_up = [
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "REPORT cloudy"},
    ]
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model=model, previous_response_id=first.id, input=follow_up, tools=tools, **GREEDY)
    seen = e.value.body["message"]
    assert f"seen: user Weather in Paris?; assistant {first.output_text}; assistant call call_1 get_weather" in seen, seen
    assert "tool call_1=REPORT cloudy;" in seen


def _tool_use_messages(result):
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
        ]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": result}]},
    ]


def test_tool_results_reach_the_prompt(claude, model):
    tools = [{"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER}]
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=model, max_tokens=4, messages=_tool_use_messages("REPORT sunny"), tools=tools)
    assert e.value.body["type"] == "error"
    seen = e.value.body["error"]["message"]
    assert "user Weather in Paris?; assistant call toolu_01 get_weather" in seen, seen
    assert "Let me check.; tool toolu_01=REPORT sunny; tools: get_weather" in seen, seen
    r = claude.messages.create(model=model, max_tokens=4, messages=_tool_use_messages("sunny, 21 C"), tools=tools)
    bare = claude.messages.create(model=model, max_tokens=4, messages=_tool_use_messages("x")[:1], tools=tools)
    assert r.content[0].type == "text"
    assert r.usage.input_tokens > bare.usage.input_tokens + 10
    with claude.messages.stream(model=model, max_tokens=4, messages=_tool_use_messages("sunny"), tools=tools) as s:
        assert s.get_final_message().usage.output_tokens == 4


def test_the_key_is_taken_from_x_api_key_or_bearer(base_url, model):
    messages = [{"role": "user", "content": "Hi"}]
    wrong = anthropic.Anthropic(base_url=base_url, api_key="wrong", max_retries=0, timeout=120)
    with pytest.raises(anthropic.AuthenticationError) as e:
        wrong.messages.create(model=model, max_tokens=2, messages=messages)
    assert e.value.body["error"]["type"] == "authentication_error"
    bearer = anthropic.Anthropic(base_url=base_url, auth_token=KEY, max_retries=0, timeout=120)
    assert bearer.messages.create(model=model, max_tokens=2, messages=messages).usage.output_tokens == 2
