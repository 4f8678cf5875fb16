"""REASONING_PARSER through the official `openai` client: `tests/it/openai_client.rs` starts a server
with `REASONING_PARSER=qwen3` and runs this file with WORKER_REASONING_BASE_URL set. The random fixture
model is made to open and close a think block by a regex constraint (a Qwen3-style reply), or starts in
one through a chat template that opens it (DeepSeek-R1's): the text inside goes to `reasoning_content`."""

import re

import pytest

# A template whose generation prompt opens the think block, as DeepSeek-R1's does.
THINK_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: <think>\n{% endif %}")
MESSAGES = [{"role": "user", "content": "Think, then answer."}]


@pytest.fixture(scope="module")
def rclient(client_at):
    return client_at("WORKER_REASONING_BASE_URL")


def _reasoning(message):
    return getattr(message, "reasoning_content", None) or (message.model_extra or {}).get("reasoning_content")


def test_think_blocks_go_to_reasoning_content_streamed_or_not(rclient):
    for seed in range(3):
        kwargs = dict(model="m", messages=MESSAGES, temperature=1.0, seed=seed, max_tokens=60,
                      extra_body={"guided_regex": r"<think>[a-z ]{1,16}</think>\n[0-9]{2,4}"})
        r = rclient.chat.completions.create(**kwargs)
        message = r.choices[0].message
        reasoning = _reasoning(message)
        assert reasoning and re.fullmatch(r"[a-z ]{1,16}", reasoning), message
        assert re.fullmatch(r"\n[0-9]{2,4}", message.content), message
        streamed_reasoning, streamed_content = "", ""
        for chunk in rclient.chat.completions.create(stream=True, **kwargs):
            if chunk.choices:
                delta = chunk.choices[0].delta
                streamed_reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
                streamed_content += delta.content or ""
        assert (streamed_reasoning, streamed_content) == (reasoning, message.content)


def test_a_template_that_opens_the_block_puts_the_reply_in_reasoning(rclient):
    r = rclient.chat.completions.create(model="m", messages=MESSAGES, temperature=1.0, seed=3, max_tokens=12,
                                        extra_body={"chat_template": THINK_TEMPLATE})
    message = r.choices[0].message
    assert _reasoning(message) and message.content is None
