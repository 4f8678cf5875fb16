"""The OpenAI-compatible API, judged by the official `openai` Python client against the real server
on a fixture model with random weights (so outputs are checked against transformers' reference, not
for sense)."""

import json
import urllib.error
import urllib.request

import openai
import pytest

GREEDY = {"temperature": 0, "max_tokens": 24}


def test_models_list_the_served_model(client, model):
    assert [m.id for m in client.models.list()] == [model]


def test_greedy_completions_match_the_reference(client, model, text_cases):
    for case in text_cases:
        r = client.completions.create(model=model, prompt=case["prompt"], **GREEDY)
        choice = r.choices[0]
        assert choice.text == case["greedy_text"], case["prompt"]
        assert choice.finish_reason == ("stop" if case["finished_by_eos"] else "length")
        assert r.usage.prompt_tokens == len(case["input_ids"])
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.object == "text_completion" and r.model == model and r.id.startswith("cmpl-")
        assert r.system_fingerprint


def test_greedy_chat_matches_the_reference(client, model, chat_cases):
    assert chat_cases
    for case in chat_cases:
        r = client.chat.completions.create(model=model, messages=case["messages"], **GREEDY)
        message = r.choices[0].message
        assert message.role == "assistant"
        assert message.content == case["greedy_text"]
        assert r.usage.prompt_tokens == len(case["input_ids"])
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_token_id_prompts_generate_like_text(client, model, text_cases):
    case = text_cases[0]
    r = client.completions.create(model=model, prompt=case["input_ids"], **GREEDY)
    assert r.choices[0].text == case["greedy_text"]
    batch = client.completions.create(model=model, prompt=[case["input_ids"], text_cases[1]["input_ids"]], **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[1].text == text_cases[1]["greedy_text"]


def test_a_list_of_prompts_with_n_numbers_choices_by_prompt(client, model, text_cases):
    prompts = [text_cases[0]["prompt"], text_cases[1]["prompt"]]
    r = client.completions.create(model=model, prompt=prompts, n=2, **GREEDY)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in r.choices}
    assert by_index[0] == by_index[1] == text_cases[0]["greedy_text"]
    assert by_index[2] == by_index[3] == text_cases[1]["greedy_text"]


def test_streamed_chat_is_the_non_streamed_reply_in_chunks(client, model, chat_cases):
    case = chat_cases[-1]
    stream = client.chat.completions.create(
        model=model, messages=case["messages"], stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == case["greedy_text"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.prompt_tokens == len(case["input_ids"])
    assert usage_chunk.usage.completion_tokens == 24


def test_streamed_completions_end_with_done(base_url, client, model, text_cases):
    case = text_cases[0]
    chunks = list(client.completions.create(model=model, prompt=case["prompt"], stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == case["greedy_text"]
    assert chunks[-1].choices[0].finish_reason is not None
    assert all(c.usage is None for c in chunks)
    # The raw wire format: SSE events and the end marker.
    body = json.dumps({"model": model, "prompt": case["prompt"], "stream": True, "max_tokens": 3}).encode()
    request = urllib.request.Request(
        base_url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        text = response.read().decode()
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_n_with_a_seed_is_reproducible(client, model, text_cases):
    kwargs = dict(model=model, prompt=text_cases[0]["prompt"], n=3, temperature=1.0, max_tokens=8, seed=1234)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.usage.completion_tokens <= 24
    chat = dict(model=model, messages=[{"role": "user", "content": "Hi"}], n=2, temperature=1.0, max_tokens=8, seed=7)
    a = client.chat.completions.create(**chat)
    b = client.chat.completions.create(**chat)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]


def _stop_in(text):
    """A stop string from the middle of `text` and where it first starts."""
    for start in range(4, len(text) - 3):
        stop = text[start:start + 3]
        if stop.strip() and "\ufffd" not in stop and text.find(stop) == start:
            return stop, start
    pytest.skip("no usable stop string in the reference text")


def test_stop_strings_end_the_text(client, model, text_cases):
    case = max(text_cases, key=lambda c: len(c["greedy_text"]))
    stop, at = _stop_in(case["greedy_text"])
    r = client.completions.create(model=model, prompt=case["prompt"], stop=[stop], **GREEDY)
    assert r.choices[0].text == case["greedy_text"][:at]
    assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(
        model=model, prompt=case["prompt"], stop=stop, extra_body={"include_stop_str_in_output": True}, **GREEDY
    )
    assert r.choices[0].text == case["greedy_text"][:at + len(stop)]


def test_completion_logprobs_have_the_legacy_shape(client, model, text_cases):
    case = text_cases[0]
    r = client.completions.create(model=model, prompt=case["prompt"], logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 4
        # Greedy picks the most likely token.
        assert chosen == pytest.approx(max(top.values()), abs=1e-4)
        assert chosen <= 0


def test_echo_returns_the_prompt_and_its_logprobs(client, model, text_cases):
    case = text_cases[0]
    r = client.completions.create(model=model, prompt=case["prompt"], echo=True, logprobs=1, max_tokens=4, temperature=0)
    choice = r.choices[0]
    assert choice.text.startswith(case["prompt"])
    assert choice.text[len(case["prompt"]):] == case["greedy_text"][: len(choice.text) - len(case["prompt"])]
    lp = choice.logprobs
    assert len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None
    assert all(x is not None for x in lp.token_logprobs[1:])


def test_chat_logprobs_have_the_chat_shape(client, model, chat_cases):
    r = client.chat.completions.create(
        model=model, messages=chat_cases[0]["messages"], logprobs=True, top_logprobs=2, **GREEDY
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-4)
        assert bytes(item.bytes).decode("utf-8", errors="replace") == item.token or "\ufffd" in item.token


def test_the_template_receives_the_tools(client, model):
    """A request template that reports what it received (through raise_exception → 400)."""
    template = "{{ raise_exception('tools: ' + (tools | map(attribute='function') | map(attribute='name') | join(',') if tools else 'none')) }}"
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
    ]
    messages = [{"role": "user", "content": "Weather?"}]
    cases = [
        ({}, "tools: get_weather,get_time"),
        ({"tool_choice": "none"}, "tools: none"),
        ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tools: get_time"),
    ]
    for extra, expected in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model=model, messages=messages, tools=tools, extra_body={"chat_template": template}, **extra
            )
        assert expected in str(e.value)


def test_tools_are_accepted_with_the_models_template(client, model):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Weather?"}], tools=tools,
        tool_choice="auto", parallel_tool_calls=False, max_tokens=4,
    )
    # Random weights emit no tool call: plain content, an ordinary finish.
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_content_parts_json_mode_and_vllm_parameters(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}],
        response_format={"type": "json_object"},
        max_completion_tokens=3,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True, "min_tokens": 3,
                    "skip_special_tokens": True, "spaces_between_special_tokens": True, "chat_template_kwargs": {"x": 1}},
    )
    assert r.usage.completion_tokens == 3
    r = client.completions.create(
        model=model, prompt="Hello", max_tokens=5, logit_bias={"5": 100}, user="someone",
        extra_body={"ignore_eos": True, "stop_token_ids": [999], "best_of": 2, "use_beam_search": False},
    )
    assert r.usage.completion_tokens <= 5


def _error(call):
    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value


def test_errors_have_openai_statuses(client, model):
    bad_requests = [
        lambda: client.completions.create(model=model, prompt="a", suffix="b"),
        lambda: client.completions.create(model=model, prompt="a", temperature="hot"),
        lambda: client.completions.create(model=model, prompt="a", n=0),
        lambda: client.completions.create(model=model, prompt="hello " * 20000, max_tokens=2),
        lambda: client.chat.completions.create(model=model, messages=[{"role": "user", "content": "a"}], top_logprobs=2),
        lambda: client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]
        ),
        lambda: client.chat.completions.create(model=model, messages=[]),
    ]
    for call in bad_requests:
        e = _error(call)
        assert e.status_code == 400, e
        assert isinstance(e.body, dict) and e.body.get("message"), e.body
    e = _error(lambda: client.completions.create(model="no-such-model", prompt="a"))
    assert e.status_code == 404
    e = _error(lambda: client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "a"}]))
    assert e.status_code == 404


def test_unknown_routes_are_404(base_url):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base_url + "/v1/no/such/route", timeout=30)
    assert e.value.code == 404


def test_streamed_prompt_lists_interleave_choices(client, model, text_cases):
    prompts = [text_cases[0]["prompt"], text_cases[1]["prompt"]]
    chunks = list(client.completions.create(model=model, prompt=prompts, n=2, stream=True, **GREEDY))
    texts, finishes = {}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert sorted(texts) == [0, 1, 2, 3] and sorted(finishes) == [0, 1, 2, 3]
    assert texts[1] == text_cases[0]["greedy_text"] and texts[2] == text_cases[1]["greedy_text"]


def test_streamed_chat_with_tools_still_streams_plain_text(client, model, chat_cases):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    case = chat_cases[0]
    chunks = list(client.chat.completions.create(model=model, messages=case["messages"], tools=tools, stream=True, **GREEDY))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = client.chat.completions.create(model=model, messages=case["messages"], tools=tools, **GREEDY)
    assert content == (plain.choices[0].message.content or "")
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_streamed_bad_requests_get_their_status_before_the_stream(client, model):
    chat = [{"role": "user", "content": "a"}]
    cases = [
        (lambda: client.completions.create(model=model, prompt="a", n=1000, stream=True), 400),
        (lambda: client.completions.create(model=model, prompt="a", max_tokens=-1, stream=True), 400),
        (lambda: client.completions.create(model=model, prompt="hello " * 20000, max_tokens=2, stream=True), 400),
        (lambda: client.completions.create(model="no-such-model", prompt="a", stream=True), 404),
        (lambda: client.chat.completions.create(model=model, messages=chat, n=1000, stream=True), 400),
        (lambda: client.chat.completions.create(model="no-such-model", messages=chat, stream=True), 404),
    ]
    for call, status in cases:
        e = _error(lambda: list(call()))
        assert e.status_code == status, e
        assert e.body.get("message") and "param" in e.body and "code" in e.body, e.body
    e = _error(lambda: list(client.completions.create(model="no-such-model", prompt="a", stream=True)))
    assert e.code == "model_not_found"
