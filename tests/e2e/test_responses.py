"""The Responses API (`/v1/responses`), judged by the official `openai` client's `client.responses`:
a translation onto chat, so its replies are checked against the chat route's on the same greedy
request (random weights: the text is compared, not read)."""

import json

import openai
import pytest

GREEDY = {"temperature": 0, "max_output_tokens": 8}


def _chat(client, model, messages, max_tokens=8):
    return client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)


def test_a_response_is_the_chat_reply_in_the_responses_shape(client, model):
    r = client.responses.create(model=model, input="Hello there", instructions="Be brief.", **GREEDY)
    chat = _chat(client, model, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    assert r.object == "response" and r.id.startswith("resp_") and r.model == model
    assert r.output_text == chat.choices[0].message.content
    [message] = r.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text"
    # Stopped by max_output_tokens: incomplete, as OpenAI reports it.
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == 8
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "Be brief." and r.max_output_tokens == 8 and r.store is True


def test_input_items_are_the_chat_conversation(client, model):
    items = [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}, {"type": "input_text", "text": "there"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
        {"role": "user", "content": "How are you?"},
    ]
    r = client.responses.create(model=model, input=items, **GREEDY)
    chat = _chat(client, model, [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi\nthere"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ])
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def test_the_stream_helper_reads_the_responses_events(client, model):
    plain = client.responses.create(model=model, input="Tell me a story", **GREEDY)
    with client.responses.stream(model=model, input="Tell me a story", **GREEDY) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:5] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
    ]
    assert kinds[-5:] == [
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == plain.output_text
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == text
    last = events[-1].response
    assert last.status == "incomplete" and last.usage.output_tokens == 8
    assert last.output[0].content[0].text == text
    assert last.id == events[0].response.id
    # The helper's running snapshot of the text ends as the whole text.
    assert [e for e in events if e.type == "response.output_text.delta"][-1].snapshot == text


def test_raw_streamed_events_carry_sse_event_names(base_url, model):
    import json
    import urllib.request

    body = json.dumps({"model": model, "input": "Hi", "stream": True, **GREEDY}).encode()
    request = urllib.request.Request(base_url + "/v1/responses", data=body, headers={"Content-Type": "application/json"})
    text = urllib.request.urlopen(request, timeout=120).read().decode()
    blocks = [b for b in text.split("\n\n") if b.strip()]
    assert blocks[0].startswith("event: response.created\ndata: {")
    for block in blocks:
        name, data = block.split("\n", 1)
        assert json.loads(data.removeprefix("data: "))["type"] == name.removeprefix("event: ")


def test_previous_response_id_continues_a_stored_conversation(client, model):
    first = client.responses.create(model=model, input="My name is Ann.", **GREEDY)
    second = client.responses.create(model=model, input="What is my name?", previous_response_id=first.id, **GREEDY)
    assert second.previous_response_id == first.id
    chat = _chat(client, model, [
        {"role": "user", "content": "My name is Ann."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ])
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    # Chains go on; a response that was not stored cannot be continued.
    third = client.responses.create(model=model, input="Again?", previous_response_id=second.id, **GREEDY)
    assert third.usage.input_tokens > second.usage.input_tokens
    unstored = client.responses.create(model=model, input="Hi", store=False, **GREEDY)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=model, input="Hi", previous_response_id=unstored.id, **GREEDY)
    assert e.value.body["param"] == "previous_response_id"


def test_stored_responses_are_retrieved_and_deleted(client, model):
    created = client.responses.create(model=model, input="Hello there", **GREEDY)
    got = client.responses.retrieve(created.id)
    assert got.id == created.id and got.object == "response"
    assert got.output_text == created.output_text and got.usage.output_tokens == created.usage.output_tokens
    assert got.status == created.status
    # A streamed response is stored as its final object.
    with client.responses.stream(model=model, input="Tell me a story", **GREEDY) as stream:
        final = list(stream)[-1].response
    stored = client.responses.retrieve(final.id)
    assert stored.output_text == final.output_text and stored.status == final.status
    deleted = client.with_raw_response.responses.delete(created.id)
    assert deleted.http_request.method == "DELETE"
    assert json.loads(deleted.text) == {"id": created.id, "object": "response", "deleted": True}
    for call in (lambda: client.responses.retrieve(created.id), lambda: client.responses.delete(created.id)):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.status_code == 404 and "not found" in e.value.body["message"]
    # A deleted response can no longer be continued; one never stored cannot be retrieved.
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=model, input="Again", previous_response_id=created.id, **GREEDY)
    unstored = client.responses.create(model=model, input="Hi", store=False, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_unknown")


def test_function_tools_are_accepted(client, model):
    tools = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    r = client.responses.create(model=model, input="Weather in Paris?", tools=tools, tool_choice="auto", **GREEDY)
    # Random weights call no tool: a message, as without tools.
    assert r.output[0].type == "message" and r.tools[0].name == "get_weather"


def test_unsupported_requests_are_refused_clearly(client, model):
    cases = [
        ({"text": {"format": {"type": "xml"}}}, "text"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input"),
        ({"input": "hello " * 20000}, "input"),
    ]
    for extra, param in cases:
        args = {"model": model, "input": "Hi", **GREEDY, **extra}
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(**args)
        assert e.value.body["param"] == param, e.value.body
        assert e.value.body["message"]
    r = client.responses.create(model=model, input="Hi", text={"format": {"type": "text"}}, **GREEDY)
    assert r.text.format.type == "text"
    # structured output is enforced: a JSON object that validates
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.responses.create(model=model, input="Hi", temperature=0, max_output_tokens=20,
                                text={"format": {"type": "json_schema", "name": "s", "schema": schema, "strict": True}})
    assert r.text.format.type == "json_schema"
    assert isinstance(json.loads(r.output_text)["ok"], bool)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="Hi", **GREEDY)
