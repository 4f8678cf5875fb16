"""Structured output and enforced tool choice through the official `openai` client: `parse()` with a
Pydantic model, 20 seeded temperature-1 samples per constraint kind (all valid), `tool_choice`
required and named (streamed and not), and the 400s. The fixture model is random: without
constrained decoding it practically never writes valid JSON, a date or a grammar's sentence."""

import json
import re
from typing import List, Literal

import openai
import pytest
from pydantic import BaseModel, Field

HI = [{"role": "user", "content": "Describe a pet."}]


class Owner(BaseModel):
    id: int = Field(ge=1, le=999)
    vip: bool


class Pet(BaseModel):
    name: str = Field(max_length=6)
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    owner: Owner
    tags: List[Literal["a", "b", "c"]] = Field(max_length=3)


def _error(call):
    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value


def test_parse_with_a_pydantic_model_returns_a_valid_object(client, model):
    r = client.chat.completions.parse(model=model, messages=HI, response_format=Pet, temperature=1.0, seed=2,
                                      max_tokens=200)
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet)
    assert r.choices[0].finish_reason == "stop"


def _closed(schema):
    """The schema with `additionalProperties: false` on every object (as OpenAI's strict mode sends it):
    with extra properties allowed a random model writes keys until it runs out of tokens."""
    if isinstance(schema, dict):
        if schema.get("type") == "object":
            schema["additionalProperties"] = False
        for v in schema.values():
            _closed(v)
    elif isinstance(schema, list):
        for v in schema:
            _closed(v)
    return schema


def _twenty(client, model, **extra):
    r = client.completions.create(model=model, prompt="Answer:", n=20, temperature=1.0, seed=21, max_tokens=150,
                                  extra_body=extra)
    assert len(r.choices) == 20
    for c in r.choices:
        assert c.finish_reason == "stop", c.text
    return [c.text for c in r.choices]


def test_twenty_samples_of_a_nested_schema_all_validate(client, model):
    for text in _twenty(client, model, guided_json=_closed(Pet.model_json_schema())):
        Pet.model_validate_json(text)
    # the same through chat's response_format json_schema
    r = client.chat.completions.create(
        model=model, messages=HI, n=20, temperature=1.0, seed=5, max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": _closed(Pet.model_json_schema()),
                                                                 "strict": True}})
    for c in r.choices:
        assert c.finish_reason == "stop"
        Pet.model_validate_json(c.message.content)


def test_twenty_samples_of_a_regex_a_choice_and_a_lark_grammar_all_match(client, model):
    date = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    for text in _twenty(client, model, structured_outputs={"regex": date}):
        assert re.fullmatch(date, text), text
    choices = ["positive", "negative", "neutral"]
    for text in _twenty(client, model, guided_choice=choices):
        assert text in choices
    grammar = """
start: expr
expr: term (("+" | "-") term)~0..2
term: NUMBER | "(" expr ")"
NUMBER: /[1-9][0-9]?/
"""
    for text in _twenty(client, model, guided_grammar=grammar):
        assert re.fullmatch(r"[0-9+\-()]+", text), text
        assert text.count("(") == text.count(")"), text
        eval(text, {"__builtins__": {}})  # a well-formed arithmetic expression


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 8},
                                          "unit": {"enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}},
]


def _valid_call(name, arguments):
    args = json.loads(arguments)
    if name == "get_weather":
        return set(args) == {"city", "unit"} and len(args["city"]) <= 8 and args["unit"] in ("celsius", "fahrenheit")
    return name == "add" and set(args) == {"a", "b"} and all(0 <= args[k] <= 99 for k in "ab")


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_choices_give_valid_calls(client, model, tool_calls, stream):
    for seed in range(3):
        for choice in ["required", {"type": "function", "function": {"name": "add"}}]:
            calls = tool_calls(client, stream, model=model, messages=[{"role": "user", "content": "Weather in Paris?"}],
                               tools=TOOLS, tool_choice=choice, temperature=1.0, seed=seed, max_tokens=150,
                               # one call: a random model would go on adding calls until it runs out of room
                               parallel_tool_calls=False)
            assert calls, choice
            for c in calls:
                assert _valid_call(c["name"], c["arguments"]), c
            if isinstance(choice, dict):
                assert [c["name"] for c in calls] == ["add"]


def test_bad_constraints_are_400s_before_generation(client, model):
    create = client.chat.completions.create
    cases = [
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"type": "nonsense"}}}}}), "response_format"),
        (dict(extra_body={"guided_json": {"type": "object", "if": {"type": "object"}, "then": {}}}), "guided_json"),
        (dict(extra_body={"structured_outputs": {"grammar": "start: nowhere"}}), "structured_outputs"),
        (dict(extra_body={"guided_regex": "[0-9]", "guided_choice": ["a"]}), "guided_choice"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(temperature=0, extra_body={"use_beam_search": True, "n": 2, "guided_choice": ["a", "b"]}),
         "guided_choice"),
    ]
    for kwargs, param in cases:
        e = _error(lambda: create(model=model, messages=HI, max_tokens=5, **kwargs))
        assert e.status_code == 400 and e.body["param"] == param, (kwargs, e.body)
        assert e.body["type"] == "BadRequestError" and e.body["message"]
