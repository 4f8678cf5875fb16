"""The Anthropic Messages API (`/v1/messages`), judged by the official `anthropic` client: a
translation onto chat, so replies are checked against the chat route's on the same greedy request
(random weights: the text is compared, not read)."""

import json
import urllib.error
import urllib.request

import pytest

anthropic = pytest.importorskip("anthropic")

# Newer clients take sampling fields (`temperature`, `top_p`, `top_k`) only through `extra_body`.
GREEDY = {"max_tokens": 8, "extra_body": {"temperature": 0}}


@pytest.fixture(scope="session", params=["/openai", ""])
def claude(request, base_url):
    """The official client; it appends `/v1/messages` to its base URL."""
    return anthropic.Anthropic(base_url=base_url + request.param, api_key="not-used", max_retries=0, timeout=120)


def _chat(client, model, messages, **extra):
    args = {"temperature": 0, "max_tokens": 8, **extra}
    return client.chat.completions.create(model=model, messages=messages, **args)


def test_a_message_is_the_chat_reply_in_anthropics_shape(claude, client, model):
    r = claude.messages.create(model=model, system="Be brief.", messages=[{"role": "user", "content": "Hello there"}], **GREEDY)
    chat = _chat(client, model, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_") and r.model == model
    [block] = r.content
    assert block.type == "text" and block.text == chat.choices[0].message.content
    assert r.stop_reason == "max_tokens" and r.stop_sequence is None
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == 8


def test_text_blocks_and_system_blocks_join(claude, client, model):
    r = claude.messages.create(
        model=model,
        system=[{"type": "text", "text": "Be brief."}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?"},
        ],
        **GREEDY,
    )
    chat = _chat(client, model, [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi\nthere"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ])
    assert r.content[0].text == chat.choices[0].message.content


def test_the_stream_helper_gets_the_final_message(claude, model):
    messages = [{"role": "user", "content": "Tell me a story"}]
    plain = claude.messages.create(model=model, messages=messages, **GREEDY)
    with claude.messages.stream(model=model, messages=messages, **GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == plain.content[0].text == final.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8
    assert final.usage.input_tokens == plain.usage.input_tokens
    events = [e.type for e in claude.messages.create(model=model, messages=messages, stream=True, **GREEDY)]
    # (The client drops `ping` events.)
    assert events[:2] == ["message_start", "content_block_start"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(events[2:-3]) == {"content_block_delta"}


def test_streams_are_named_sse_events(base_url, model):
    body = json.dumps({"model": model, "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "Hi"}]})
    request = urllib.request.Request(
        base_url + "/v1/messages", data=body.encode(),
        headers={"Content-Type": "application/json", "anthropic-version": "2023-06-01"},
    )
    text = urllib.request.urlopen(request, timeout=120).read().decode()
    names = []
    for block in (b for b in text.split("\n\n") if b.strip()):
        name, data = block.split("\n", 1)
        names.append(name.removeprefix("event: "))
        assert json.loads(data.removeprefix("data: "))["type"] == names[-1]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert "[DONE]" not in text


def _stop_in(text):
    for start in range(4, len(text) - 3):
        stop = text[start:start + 3]
        if stop.strip() and "\ufffd" not in stop and text.find(stop) == start:
            return stop, start
    pytest.skip("no usable stop sequence in the reply")


def test_stop_sequences_end_the_reply(claude, model):
    messages = [{"role": "user", "content": "Tell me a story"}]
    full = claude.messages.create(model=model, messages=messages, max_tokens=24, extra_body={"temperature": 0}).content[0].text
    stop, at = _stop_in(full)
    r = claude.messages.create(model=model, messages=messages, max_tokens=24, stop_sequences=[stop], extra_body={"temperature": 0})
    assert r.content[0].text == full[:at]
    assert (r.stop_reason, r.stop_sequence) == ("stop_sequence", stop)
    with claude.messages.stream(model=model, messages=messages, max_tokens=24, stop_sequences=[stop], extra_body={"temperature": 0}) as s:
        final = s.get_final_message()
    assert (final.stop_reason, final.stop_sequence, final.content[0].text) == ("stop_sequence", stop, full[:at])


def test_tools_and_sampling_fields_are_accepted(claude, model):
    tools = [{"name": "get_weather", "description": "Weather in a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    r = claude.messages.create(
        model=model, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
        tool_choice={"type": "auto"}, metadata={"user_id": "u1"}, max_tokens=8,
        extra_body={"temperature": 0, "top_p": 0.9, "top_k": 5},
    )
    # Random weights call no tool: a text reply.
    assert r.content[0].type == "text" and r.stop_reason in ("max_tokens", "end_turn")


def _post(base_url, body, headers=None):
    request = urllib.request.Request(
        base_url + "/v1/messages", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "anthropic-version": "2023-06-01", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_errors_come_in_anthropics_shape(claude, base_url, model):
    status, body = _post(base_url, {"model": model, "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 400
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, extra_body={"frobnicate": 1})
    assert e.value.body["error"]["type"] == "invalid_request_error" and "frobnicate" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}], **GREEDY)
    assert e.value.body == {"type": "error", "error": {"type": "not_found_error", "message": e.value.body["error"]["message"]}}
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=model, messages=[{"role": "user", "content": [{"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}], **GREEDY)
