"""TOOL_CALL_PARSER=qwen3_coder and ENABLE_AUTO_TOOL_CHOICE=false through the official `openai` client:
`tests/it/openai_client.rs` starts a server with both and runs this file with WORKER_TOOLS_BASE_URL set.
Forced tool calls are written in Qwen3-Coder's XML syntax and come back as calls whose arguments, typed
by the tools' schemas, validate (streamed and not); `tool_choice` auto is refused as vLLM refuses it
without `--enable-auto-tool-choice`."""

import json

import openai
import pytest

TOOLS = [
    {"type": "function", "function": {"name": "write_file", "parameters": {"type": "object", "properties": {
        "path": {"type": "string", "maxLength": 10}, "mode": {"enum": ["append", "overwrite"]},
        "lines": {"type": "integer", "minimum": 1, "maximum": 50}, "dry_run": {"type": "boolean"}},
        "required": ["path", "mode", "lines"], "additionalProperties": False}}},
]
MESSAGES = [{"role": "user", "content": "Write the file."}]


@pytest.fixture(scope="module")
def tclient(client_at):
    return client_at("WORKER_TOOLS_BASE_URL")


def _valid(arguments):
    args = json.loads(arguments)
    return (len(args["path"]) <= 10 and args["mode"] in ("append", "overwrite")
            and isinstance(args["lines"], int) and 1 <= args["lines"] <= 50
            and isinstance(args.get("dry_run", False), bool) and set(args) <= {"path", "mode", "lines", "dry_run"})


@pytest.mark.parametrize("stream", [False, True])
def test_forced_calls_in_qwen3_coder_xml_validate(tclient, tool_calls, stream):
    for seed in range(3):
        for choice in ["required", {"type": "function", "function": {"name": "write_file"}}]:
            calls = tool_calls(tclient, stream, model="m", messages=MESSAGES, tools=TOOLS, tool_choice=choice,
                               temperature=1.0, seed=seed, max_tokens=200, parallel_tool_calls=False)
            assert [c["name"] for c in calls] == ["write_file"], calls
            assert _valid(calls[0]["arguments"]), calls


def test_auto_tool_choice_is_refused_without_the_flag(tclient):
    for choice in [None, "auto"]:
        kwargs = dict(model="m", messages=MESSAGES, tools=TOOLS, max_tokens=8)
        if choice:
            kwargs["tool_choice"] = choice
        with pytest.raises(openai.BadRequestError) as e:
            tclient.chat.completions.create(**kwargs)
        assert '"auto" tool choice requires --enable-auto-tool-choice' in str(e.value)
    r = tclient.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                        max_tokens=8)
    assert r.choices[0].message.tool_calls is None
