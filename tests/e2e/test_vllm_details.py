"""OpenAI details where vLLM is the reference, and vLLM's extension parameters (sent with `extra_body`),
judged by the official `openai` client against the real server (both `/v1` and `/openai/v1`)."""

import openai
import pytest

GREEDY = {"temperature": 0, "max_tokens": 6}
HI = [{"role": "user", "content": "Hi"}]


def _error(call):
    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value


def test_a_model_card_and_openais_404_for_another_id(client, model):
    card = client.models.retrieve(model)
    assert card.id == model and card.object == "model"
    e = _error(lambda: client.models.retrieve("no-such-model"))
    assert isinstance(e, openai.NotFoundError)
    assert e.body["message"] and e.body["type"] == "NotFoundError"


def test_tool_choice_needs_tools_as_in_vllm(client, model):
    for choice in ["auto", "none", "required"]:
        e = _error(lambda: client.chat.completions.create(model=model, messages=HI, tool_choice=choice, **GREEDY))
        assert e.status_code == 400 and e.body["param"] == "tool_choice", choice


def test_stream_options_need_stream(client, model):
    for call in [
        lambda: client.chat.completions.create(model=model, messages=HI, stream_options={"include_usage": True}, **GREEDY),
        lambda: client.completions.create(model=model, prompt="Hi", stream=False, stream_options={"include_usage": False}, **GREEDY),
    ]:
        e = _error(call)
        assert e.status_code == 400 and e.body["param"] == "stream_options"


def test_prompt_logprobs_is_null_unless_asked_for(client, model):
    chat = client.chat.completions.create(model=model, messages=HI, **GREEDY)
    assert "prompt_logprobs" in chat.model_extra and chat.prompt_logprobs is None
    text = client.completions.create(model=model, prompt="Hi", **GREEDY)
    assert "prompt_logprobs" in text.choices[0].model_extra and text.choices[0].prompt_logprobs is None


def test_cached_prompt_tokens_are_reported(client, model):
    prompt = "The quick brown fox jumps over the lazy dog. " * 8
    first = client.completions.create(model=model, prompt=prompt, **GREEDY)
    second = client.completions.create(model=model, prompt=prompt, **GREEDY)
    assert first.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    messages = [{"role": "user", "content": prompt}]
    client.chat.completions.create(model=model, messages=messages, **GREEDY)
    chat = client.chat.completions.create(model=model, messages=messages, **GREEDY)
    assert chat.usage.prompt_tokens_details.cached_tokens > 0
    chunks = list(client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY
    ))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_any_signed_64_bit_seed(client, model):
    for seed in [-1, -(2**63), 2**63 - 1]:
        kwargs = dict(model=model, prompt="Once upon a time", temperature=1.0, max_tokens=6, seed=seed)
        a = client.completions.create(**kwargs)
        b = client.completions.create(**kwargs)
        assert a.choices[0].text == b.choices[0].text, seed


def test_unknown_fields_are_refused_and_known_ones_accepted(client, model):
    e = _error(lambda: client.chat.completions.create(model=model, messages=HI, extra_body={"tempurature": 0.5}, **GREEDY))
    assert e.status_code == 400 and e.body["param"] == "tempurature"
    e = _error(lambda: client.completions.create(model=model, prompt="Hi", extra_body={"bad_words": ["x"]}, **GREEDY))
    assert e.status_code == 400 and e.body["param"] == "bad_words"
    r = client.chat.completions.create(
        model=model, messages=HI, user="u", metadata={"a": "b"}, store=False, service_tier="auto",
        extra_body={"request_id": "r1", "priority": 0, "add_special_tokens": False, "truncation_side": "left"}, **GREEDY
    )
    assert r.choices[0].message.content is not None


def test_prompt_logprob_ranks_are_true_ranks(client, model):
    r = client.completions.create(model=model, prompt="A robot may not injure a human being", max_tokens=1,
                                  extra_body={"prompt_logprobs": 1, "return_token_ids": True})
    choice = r.choices[0]
    entries = choice.prompt_logprobs
    assert entries[0] is None and len(entries) == len(choice.prompt_token_ids)
    outside = 0
    for token_id, entry in zip(choice.prompt_token_ids[1:], entries[1:]):
        mine = entry[str(token_id)]
        assert isinstance(mine["rank"], int) and mine["rank"] >= 1
        best = max(v["logprob"] for v in entry.values())
        assert (mine["rank"] == 1) == (mine["logprob"] >= best - 1e-6)
        outside += mine["rank"] > 1
    # Random weights: prompt tokens are mostly not the model's first choice, and still ranked.
    assert outside > 0


def test_return_token_ids(client, model):
    chat = client.chat.completions.create(model=model, messages=HI, extra_body={"return_token_ids": True}, **GREEDY)
    assert len(chat.prompt_token_ids) == chat.usage.prompt_tokens
    assert len(chat.choices[0].token_ids) == chat.usage.completion_tokens
    chunks = list(client.chat.completions.create(
        model=model, messages=HI, stream=True, extra_body={"return_token_ids": True}, **GREEDY
    ))
    assert chunks[0].prompt_token_ids == chat.prompt_token_ids
    streamed = [t for c in chunks for ch in c.choices for t in (getattr(ch, "token_ids", None) or [])]
    assert streamed == chat.choices[0].token_ids
    text = client.completions.create(model=model, prompt="Hello", extra_body={"return_token_ids": True}, **GREEDY)
    assert len(text.choices[0].prompt_token_ids) == text.usage.prompt_tokens
    assert len(text.choices[0].token_ids) == text.usage.completion_tokens
    chunks = list(client.completions.create(model=model, prompt="Hello", stream=True, extra_body={"return_token_ids": True}, **GREEDY))
    assert chunks[0].choices[0].prompt_token_ids == text.choices[0].prompt_token_ids
    assert [t for c in chunks for t in (c.choices[0].token_ids or [])] == text.choices[0].token_ids


def test_return_tokens_as_token_ids(client, model):
    extra = {"return_tokens_as_token_ids": True, "return_token_ids": True}
    text = client.completions.create(model=model, prompt="Hello", logprobs=2, extra_body=extra, **GREEDY)
    lp = text.choices[0].logprobs
    assert lp.tokens == [f"token:{t}" for t in text.choices[0].token_ids]
    assert all(k.startswith("token:") for top in lp.top_logprobs for k in top)
    chat = client.chat.completions.create(model=model, messages=HI, logprobs=True, top_logprobs=2, extra_body=extra, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == [f"token:{t}" for t in chat.choices[0].token_ids]
    assert all(t.token.startswith("token:") for c in content for t in c.top_logprobs)


def test_truncate_prompt_tokens_keeps_the_end_or_the_start(client, model):
    prompt = "A robot may not injure a human being"
    full = client.completions.create(model=model, prompt=prompt, extra_body={"return_token_ids": True}, **GREEDY)
    ids = full.choices[0].prompt_token_ids
    assert len(ids) > 4
    left = client.completions.create(model=model, prompt=prompt, extra_body={"return_token_ids": True, "truncate_prompt_tokens": 4}, **GREEDY)
    assert left.usage.prompt_tokens == 4 and left.choices[0].prompt_token_ids == ids[-4:]
    right = client.completions.create(
        model=model, prompt=prompt, extra_body={"return_token_ids": True, "truncate_prompt_tokens": 4, "truncation_side": "right"}, **GREEDY
    )
    assert right.choices[0].prompt_token_ids == ids[:4]
    whole = client.completions.create(model=model, prompt=prompt, extra_body={"truncate_prompt_tokens": -1}, **GREEDY)
    assert whole.usage.prompt_tokens == len(ids)
    chat = client.chat.completions.create(model=model, messages=HI, extra_body={"truncate_prompt_tokens": 3}, **GREEDY)
    assert chat.usage.prompt_tokens == 3
    for bad in [0, -2, 100000]:
        e = _error(lambda: client.completions.create(model=model, prompt=prompt, extra_body={"truncate_prompt_tokens": bad}, **GREEDY))
        assert e.status_code == 400 and e.body["param"] == "truncate_prompt_tokens", bad


def test_continuous_usage_stats(client, model):
    for create, kwargs in [
        (client.chat.completions.create, {"messages": HI}),
        (client.completions.create, {"prompt": "Hello"}),
    ]:
        chunks = list(create(
            model=model, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
            **kwargs, **GREEDY,
        ))
        assert all(c.usage is not None for c in chunks)
        counts = [c.usage.completion_tokens for c in chunks]
        assert counts == sorted(counts) and counts[-1] == 6
        assert len({c.usage.prompt_tokens for c in chunks}) == 1
        # Without it only the last chunk has the usage.
        chunks = list(create(model=model, stream=True, stream_options={"include_usage": True}, **kwargs, **GREEDY))
        assert [c.usage is not None for c in chunks].count(True) == 1
