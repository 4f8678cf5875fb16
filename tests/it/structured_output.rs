//! Structured output, enforced tool choice and reasoning over real HTTP (the one router, in process,
//! on the llama fixture): a random fixture model almost never writes valid JSON, a date or a
//! grammar's sentence by itself, so every check here fails without constrained decoding.

use serde_json::{json, Value};
use worker_candle::engine::settings::OutputSyntax;
use worker_candle::engine::speculative::SpeculativeConfig;
use worker_candle::engine::EngineSettings;

struct Server {
    base: String,
    http: reqwest::Client,
}

async fn start(configure: impl FnOnce(&mut EngineSettings)) -> Server {
    Server {
        base: crate::common::router::serve("llama", "assistant", configure).await,
        http: reqwest::Client::new(),
    }
}

impl Server {
    async fn post_text(&self, route: &str, body: Value) -> (u16, String) {
        let r = self
            .http
            .post(format!("{}{route}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn post(&self, route: &str, body: Value) -> (u16, Value) {
        let (status, text) = self.post_text(route, body).await;
        (status, serde_json::from_str(&text).unwrap())
    }

    /// The texts and finish reasons of a completions request's choices.
    async fn completions(&self, body: Value) -> Vec<(String, String)> {
        let (status, r) = self.post("/v1/completions", body).await;
        assert_eq!(status, 200, "{r}");
        r["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["text"].as_str().unwrap().to_string(),
                    c["finish_reason"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

/// A schema with nested objects, arrays, enums and required fields, every path of it finite.
fn pet_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "kind": {"enum": ["cat", "dog", "fish"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 30},
            "owner": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}, "vip": {"type": "boolean"}},
                "required": ["id", "vip"],
                "additionalProperties": false
            },
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}
        },
        "required": ["name", "kind", "age", "owner", "tags"],
        "additionalProperties": false
    })
}

fn assert_pet(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    let o = v.as_object().unwrap();
    assert_eq!(o.len(), 5, "{text}");
    assert!(v["name"].as_str().unwrap().chars().count() <= 6, "{text}");
    assert!(
        ["cat", "dog", "fish"].contains(&v["kind"].as_str().unwrap()),
        "{text}"
    );
    assert!((0..=30).contains(&v["age"].as_i64().unwrap()), "{text}");
    assert!(
        (1..=999).contains(&v["owner"]["id"].as_i64().unwrap()),
        "{text}"
    );
    assert!(v["owner"]["vip"].is_boolean() && v["owner"].as_object().unwrap().len() == 2);
    let tags = v["tags"].as_array().unwrap();
    assert!(
        tags.len() <= 3
            && tags
                .iter()
                .all(|t| ["a", "b", "c"].contains(&t.as_str().unwrap()))
    );
}

fn is_iso_date(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

#[tokio::test]
async fn twenty_sampled_replies_each_match_their_schema_regex_choice_and_grammar() {
    let s = start(|_| {}).await;
    let base = json!({"model": "m", "prompt": "Answer:", "n": 20, "temperature": 1.0, "seed": 7, "max_tokens": 120});
    let with = |extra: Value| {
        let mut b = base.clone();
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    for (text, finish) in s
        .completions(with(json!({"guided_json": pet_schema()})))
        .await
    {
        assert_eq!(finish, "stop", "{text}");
        assert_pet(&text);
    }
    for (text, finish) in s
        .completions(with(
            json!({"structured_outputs": {"regex": "[0-9]{4}-[0-9]{2}-[0-9]{2}"}}),
        ))
        .await
    {
        assert_eq!(finish, "stop");
        assert!(is_iso_date(&text), "{text:?}");
    }
    let choices = ["red", "green", "blue sky"];
    for (text, finish) in s.completions(with(json!({"guided_choice": choices}))).await {
        assert_eq!(finish, "stop");
        assert!(choices.contains(&text.as_str()), "{text:?}");
    }
    // A small Lark grammar: a call with one to three small numbers.
    let grammar =
        "start: NAME \"(\" NUM (\",\" NUM)~0..2 \")\"\nNAME: /[a-z]{1,4}/\nNUM: /[0-9]{1,2}/";
    for (text, finish) in s
        .completions(with(json!({"structured_outputs": {"grammar": grammar}})))
        .await
    {
        assert_eq!(finish, "stop");
        let (name, rest) = text.split_once('(').unwrap_or_else(|| panic!("{text:?}"));
        assert!((1..=4).contains(&name.len()) && name.bytes().all(|c| c.is_ascii_lowercase()));
        let nums = rest.strip_suffix(')').unwrap_or_else(|| panic!("{text:?}"));
        let nums: Vec<&str> = nums.split(',').collect();
        assert!((1..=3).contains(&nums.len()), "{text:?}");
        assert!(nums
            .iter()
            .all(|n| (1..=2).contains(&n.len()) && n.bytes().all(|c| c.is_ascii_digit())));
    }
}

#[tokio::test]
async fn chat_response_format_streams_and_best_of_keep_the_schema() {
    let s = start(|_| {}).await;
    let format = json!({"type": "json_schema", "json_schema": {"name": "pet", "schema": pet_schema(), "strict": true}});
    let (status, r) = s
        .post(
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "A pet?"}], "n": 3, "best_of": 5,
                   "temperature": 1.0, "seed": 3, "response_format": format}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    for c in r["choices"].as_array().unwrap() {
        assert_eq!(c["finish_reason"], json!("stop"));
        assert_pet(c["message"]["content"].as_str().unwrap());
    }
    let (status, body) = s
        .post_text(
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "A pet?"}], "n": 2,
                   "temperature": 1.0, "seed": 4, "response_format": format, "stream": true}),
        )
        .await;
    assert_eq!(status, 200);
    let mut texts = [String::new(), String::new()];
    for e in body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
        if e == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(e).unwrap();
        for c in chunk["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            texts[i].push_str(c["delta"]["content"].as_str().unwrap_or(""));
        }
    }
    for t in &texts {
        assert_pet(t);
    }
    // json_object: any JSON object
    let (_, r) = s
        .post(
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0,
                   "max_tokens": 60, "response_format": {"type": "json_object"}}),
        )
        .await;
    let text = r["choices"][0]["message"]["content"].as_str().unwrap();
    if r["choices"][0]["finish_reason"] == json!("stop") {
        assert!(serde_json::from_str::<Value>(text).unwrap().is_object());
    } else {
        assert!(text.starts_with('{'), "{text:?}");
    }
}

#[tokio::test]
async fn native_sampling_params_take_the_same_keys_and_speculation_never_breaks_them() {
    let s = start(|settings| {
        settings.speculative = Some(
            SpeculativeConfig::parse(
                r#"{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}"#,
            )
            .unwrap(),
        );
    })
    .await;
    let (status, r) = s
        .post(
            "/runsync",
            json!({"input": {"prompt": "2024-01-01 2024-01-01 2024-01-01", "sampling_params": {
                "n": 4, "temperature": 1.0, "seed": 9, "max_tokens": 30,
                "structured_outputs": {"regex": "[0-9]{4}-[0-9]{2}-[0-9]{2}"}}}}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let out = r["output"].to_string();
    let choices = &r["output"][0]["choices"];
    assert_eq!(choices.as_array().map(Vec::len), Some(4), "{out}");
    for c in choices.as_array().unwrap() {
        let text: String = c["tokens"]
            .as_array()
            .unwrap_or_else(|| panic!("{out}"))
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert!(is_iso_date(&text), "{text:?}");
    }
    // and on completions, with the speculating engine
    for (text, finish) in s
        .completions(
            json!({"model": "m", "prompt": "2024-01-01 2024-01-01", "n": 4, "temperature": 0,
                            "max_tokens": 30, "guided_regex": "[0-9]{4}-[0-9]{2}-[0-9]{2}"}),
        )
        .await
    {
        assert_eq!(finish, "stop");
        assert!(is_iso_date(&text), "{text:?}");
    }
}

#[tokio::test]
async fn a_constraint_that_cannot_finish_in_max_tokens_ends_with_length() {
    let s = start(|_| {}).await;
    for (text, finish) in s
        .completions(
            json!({"model": "m", "prompt": "x", "n": 3, "temperature": 1.0, "seed": 1,
                            "max_tokens": 4, "guided_json": pet_schema()}),
        )
        .await
    {
        assert_eq!(finish, "length", "{text}");
    }
}

#[tokio::test]
async fn bad_constraints_are_400s_in_openais_shape() {
    let s = start(|_| {}).await;
    let chat = |extra: Value| {
        let mut b =
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    let tools =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let cases = [
        (
            chat(
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "bogus"}}}}}}),
            ),
            "response_format",
            "bogus",
        ),
        (
            chat(json!({"guided_json": {"type": "object", "not": {"type": "string"}}})),
            "guided_json",
            "not",
        ),
        (
            chat(json!({"guided_regex": "(unclosed"})),
            "guided_regex",
            "",
        ),
        (
            chat(json!({"guided_grammar": "start: missing_rule"})),
            "guided_grammar",
            "",
        ),
        (
            chat(json!({"guided_json": {}, "guided_regex": "a"})),
            "guided_regex",
            "only one",
        ),
        (
            chat(
                json!({"response_format": {"type": "json_object"}, "structured_outputs": {"choice": ["a"]}}),
            ),
            "structured_outputs",
            "only one",
        ),
        (
            chat(
                json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            ),
            "tool_choice",
            "g",
        ),
        (
            chat(
                json!({"tools": tools, "tool_choice": "required", "response_format": {"type": "json_object"}}),
            ),
            "tool_choice",
            "response_format",
        ),
        (
            chat(
                json!({"use_beam_search": true, "n": 2, "temperature": 0, "guided_choice": ["a", "b"]}),
            ),
            "guided_choice",
            "beam",
        ),
    ];
    for (body, param, needle) in cases {
        let (status, r) = s.post("/v1/chat/completions", body.clone()).await;
        assert_eq!(status, 400, "{body}: {r}");
        assert_eq!(r["error"]["param"], json!(param), "{r}");
        assert_eq!(r["error"]["type"], json!("BadRequestError"), "{r}");
        let message = r["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message}");
    }
}

/// The calls of a chat reply, streamed or not, as (name, arguments).
async fn tool_calls(s: &Server, body: Value) -> Vec<(String, Value)> {
    let stream = body["stream"] == json!(true);
    let (status, text) = s.post_text("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{text}");
    let mut calls = Vec::new();
    let mut pick = |call: &Value| {
        let name = call["function"]["name"].as_str().unwrap().to_string();
        let args = call["function"]["arguments"].as_str().unwrap();
        calls.push((
            name,
            serde_json::from_str(args).unwrap_or_else(|e| panic!("{e}: {args}")),
        ));
    };
    if stream {
        for e in text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
            if e == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(e).unwrap();
            if let Some(list) = chunk["choices"][0]["delta"]["tool_calls"].as_array() {
                list.iter().for_each(&mut pick);
            }
        }
    } else {
        let r: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(r["choices"][0]["finish_reason"], json!("tool_calls"), "{r}");
        r["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap_or_else(|| panic!("{r}"))
            .iter()
            .for_each(pick);
    }
    calls
}

#[tokio::test]
async fn required_and_named_tool_choices_give_calls_that_match_the_tools() {
    forced_tool_calls_match_the_tools(&start(|_| {}).await).await;
}

/// `TOOL_CALL_PARSER=qwen3_coder`: forced calls are written in Qwen3-Coder's XML syntax, parsed back
/// (whole and streamed) into calls whose arguments, typed by the tools' schemas, validate.
#[tokio::test]
async fn qwen3_coder_tool_choices_are_forced_in_its_xml_syntax() {
    let s = start(|settings| settings.output_syntax.tool_call_parser = Some("qwen3_coder".into()))
        .await;
    forced_tool_calls_match_the_tools(&s).await;
    // the tokens written (their logprobs' texts) are XML, not Hermes JSON
    let tools = json!([{"type": "function", "function": {"name": "add", "parameters": {"type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]}}}]);
    let (status, r) = s
        .post(
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "Add"}], "tools": tools,
                "tool_choice": "required", "max_tokens": 60, "temperature": 0, "logprobs": true}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let written: String = r["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert!(
        written.starts_with("<tool_call>\n<function=add>\n<parameter=a>\n"),
        "{written:?}"
    );
    let args = &r["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"];
    let args: Value = serde_json::from_str(args.as_str().unwrap()).unwrap();
    assert!(args["a"].is_i64(), "{args}");
}

async fn forced_tool_calls_match_the_tools(s: &Server) {
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "add", "parameters": {"type": "object",
            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["a", "b"], "additionalProperties": false}}}
    ]);
    let valid = |name: &str, args: &Value| match name {
        "get_weather" => {
            args["city"]
                .as_str()
                .is_some_and(|c| c.chars().count() <= 8)
                && ["c", "f"].contains(&args["unit"].as_str().unwrap_or(""))
                && args.as_object().unwrap().len() == 2
        }
        "add" => {
            ["a", "b"]
                .iter()
                .all(|k| args[k].as_i64().is_some_and(|v| (0..=99).contains(&v)))
                && args.as_object().unwrap().len() == 2
        }
        _ => false,
    };
    for seed in 0..4 {
        for stream in [false, true] {
            let body = json!({"model": "m", "messages": [{"role": "user", "content": "Weather?"}],
                "tools": tools, "tool_choice": "required", "parallel_tool_calls": false,
                "temperature": 1.0, "seed": seed, "max_tokens": 150, "stream": stream});
            let calls = tool_calls(s, body).await;
            assert_eq!(calls.len(), 1, "{calls:?}");
            assert!(calls.iter().all(|(n, a)| valid(n, a)), "{calls:?}");
            let body = json!({"model": "m", "messages": [{"role": "user", "content": "Add"}],
                "tools": tools, "tool_choice": {"type": "function", "function": {"name": "add"}},
                "temperature": 1.0, "seed": seed, "max_tokens": 150, "stream": stream});
            let calls = tool_calls(s, body).await;
            assert_eq!(calls.len(), 1, "{calls:?}");
            assert_eq!(calls[0].0, "add");
            assert!(valid("add", &calls[0].1), "{calls:?}");
        }
    }
}

/// A template whose generation prompt opens a think block (as DeepSeek-R1's does).
const THINK_TEMPLATE: &str = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: <think>\n{% endif %}";

/// The reasoning and the content of a chat reply, streamed or not.
async fn reasoning_and_content(s: &Server, body: Value) -> (Value, Option<String>, Option<String>) {
    let stream = body["stream"] == json!(true);
    let (status, text) = s.post_text("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{text}");
    if !stream {
        let r: Value = serde_json::from_str(&text).unwrap();
        let m = &r["choices"][0]["message"];
        let get = |k: &str| m[k].as_str().map(str::to_string);
        return (
            r["choices"][0]["finish_reason"].clone(),
            get("reasoning_content"),
            get("content"),
        );
    }
    let (mut reasoning, mut content, mut finish) = (None::<String>, None::<String>, Value::Null);
    for e in text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
        if e == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(e).unwrap();
        let c = &chunk["choices"][0];
        if let Some(r) = c["delta"]["reasoning_content"].as_str() {
            reasoning.get_or_insert_default().push_str(r);
        }
        if let Some(t) = c["delta"]["content"].as_str().filter(|t| !t.is_empty()) {
            content.get_or_insert_default().push_str(t);
        }
        if !c["finish_reason"].is_null() {
            finish = c["finish_reason"].clone();
        }
    }
    (finish, reasoning, content)
}

#[tokio::test]
async fn the_reasoning_parser_splits_think_output_streamed_or_not() {
    let s = start(|settings| {
        settings.output_syntax = OutputSyntax {
            reasoning_parser: Some("qwen3".into()),
            ..OutputSyntax::default()
        };
    })
    .await;
    // The generation prompt opens no block: the model opens it itself (here, made to by a regex).
    for seed in 0..3 {
        let mut replies = Vec::new();
        for stream in [false, true] {
            let body = json!({"model": "m", "messages": [{"role": "user", "content": "Think."}],
                "temperature": 1.0, "seed": seed, "max_tokens": 60, "stream": stream,
                "guided_regex": "<think>[a-z]{1,12}</think>\\n[0-9]{3}"});
            let (finish, reasoning, content) = reasoning_and_content(&s, body).await;
            assert_eq!(finish, json!("stop"));
            let reasoning = reasoning.unwrap_or_else(|| panic!("no reasoning (stream {stream})"));
            assert!((1..=12).contains(&reasoning.len()), "{reasoning:?}");
            assert!(
                reasoning.bytes().all(|c| c.is_ascii_lowercase()),
                "{reasoning:?}"
            );
            let content = content.unwrap();
            assert!(
                content.len() == 4 && content.starts_with('\n'),
                "{content:?}"
            );
            replies.push((reasoning, content));
        }
        assert_eq!(
            replies[0], replies[1],
            "streamed and whole replies split alike"
        );
    }
    // Without a think block the whole reply is content.
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
        "temperature": 1.0, "seed": 1, "max_tokens": 10, "guided_regex": "[0-9]{3}"});
    let (_, reasoning, content) = reasoning_and_content(&s, body).await;
    assert_eq!(reasoning, None);
    assert_eq!(content.map(|c| c.len()), Some(3));
}

#[tokio::test]
async fn a_constraint_waits_for_the_end_of_the_reasoning() {
    let s = start(|settings| {
        settings.output_syntax = OutputSyntax {
            reasoning_parser: Some("deepseek_r1".into()),
            ..OutputSyntax::default()
        };
    })
    .await;
    // The template opens the block: the reasoning is free text (never JSON-constrained), and the
    // reply cannot end before the reasoning does and an answer matches the schema: the random model
    // never closes its reasoning, so the reply runs out of room instead of ending as `stop`.
    for stream in [false, true] {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "Think."}],
            "chat_template": THINK_TEMPLATE, "temperature": 1.0, "seed": 5, "max_tokens": 40,
            "stream": stream, "guided_json": pet_schema()});
        let (finish, reasoning, content) = reasoning_and_content(&s, body).await;
        assert_eq!(finish, json!("length"));
        let reasoning = reasoning.unwrap();
        assert!(!reasoning.trim_start().starts_with('{'), "{reasoning:?}");
        assert_eq!(content, None);
    }
}

#[tokio::test]
async fn responses_text_format_json_schema_is_enforced() {
    let s = start(|_| {}).await;
    let (status, r) = s
        .post(
            "/v1/responses",
            json!({"model": "m", "input": "A pet?", "temperature": 1.0, "max_output_tokens": 200, "store": false,
                   "text": {"format": {"type": "json_schema", "name": "pet", "schema": pet_schema(), "strict": true}}}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["text"]["format"]["type"], json!("json_schema"));
    let text = r["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"));
    assert_pet(text);
}

/// `/v1/responses` with a reasoning parser: the reasoning is a `reasoning` item before the message,
/// whole or streamed (`response.reasoning_text.delta`), and holds what chat reports as
/// `reasoning_content` for the same prompt. (The template opens the block and the random model
/// never closes it: every token is reasoning.)
#[tokio::test]
async fn responses_carry_the_reasoning_as_an_item_before_the_message() {
    let s = start(|settings| {
        settings.custom_chat_template = Some(THINK_TEMPLATE.into());
        settings.output_syntax = OutputSyntax {
            reasoning_parser: Some("qwen3".into()),
            ..OutputSyntax::default()
        };
    })
    .await;
    let (_, chat_reasoning, _) = reasoning_and_content(
        &s,
        json!({"model": "m", "messages": [{"role": "user", "content": "Think."}],
            "temperature": 0.0, "max_tokens": 16}),
    )
    .await;
    let chat_reasoning = chat_reasoning.expect("chat splits the reasoning");
    let body =
        json!({"model": "m", "input": "Think.", "temperature": 0.0, "max_output_tokens": 16});
    let (status, r) = s.post("/v1/responses", body.clone()).await;
    assert_eq!(status, 200, "{r}");
    let output = r["output"].as_array().unwrap();
    assert_eq!(output[0]["type"], json!("reasoning"), "{r}");
    assert_eq!(output[0]["content"][0]["type"], json!("reasoning_text"));
    assert_eq!(output[0]["content"][0]["text"], json!(chat_reasoning));
    assert_eq!(output[1]["type"], json!("message"));

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (status, text) = s.post_text("/v1/responses", streamed).await;
    assert_eq!(status, 200, "{text}");
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == json!("response.reasoning_text.delta"))
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, chat_reasoning);
    let last = events.last().unwrap();
    assert_eq!(last["response"]["output"][0]["type"], json!("reasoning"));
    assert_eq!(
        last["response"]["output"][0]["content"][0]["text"],
        json!(chat_reasoning)
    );
}

/// `/v1/messages` with a reasoning parser: the reasoning is a `thinking` block before the text, whole
/// or streamed (`thinking_delta`), holding what chat reports as `reasoning_content`.
#[tokio::test]
async fn anthropic_messages_carry_the_reasoning_as_a_thinking_block() {
    let s = start(|settings| {
        settings.custom_chat_template = Some(THINK_TEMPLATE.into());
        settings.output_syntax = OutputSyntax {
            reasoning_parser: Some("deepseek_r1".into()),
            ..OutputSyntax::default()
        };
    })
    .await;
    let (_, chat_reasoning, _) = reasoning_and_content(
        &s,
        json!({"model": "m", "messages": [{"role": "user", "content": "Think."}],
            "temperature": 0.0, "max_tokens": 16}),
    )
    .await;
    let chat_reasoning = chat_reasoning.expect("chat splits the reasoning");
    let body = json!({"model": "m", "max_tokens": 16, "temperature": 0.0,
        "messages": [{"role": "user", "content": "Think."}]});
    let (status, r) = s.post("/v1/messages", body.clone()).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["content"][0]["type"], json!("thinking"), "{r}");
    assert_eq!(r["content"][0]["thinking"], json!(chat_reasoning));
    assert_eq!(r["content"][1]["type"], json!("text"));

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (status, text) = s.post_text("/v1/messages", streamed).await;
    assert_eq!(status, 200, "{text}");
    let thinking: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter(|e| e["delta"]["type"] == json!("thinking_delta"))
        .map(|e| e["delta"]["thinking"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(thinking, chat_reasoning);
}

/// `serve` on the llama fixture with `vars`; the running worker and its base URL.
fn serve_with(vars: &[(&str, &str)]) -> (crate::common::process::Running, String) {
    use crate::common::process::{fixture, Running};
    let mut env = vec![
        (
            "MODEL_NAME".to_string(),
            fixture("llama").display().to_string(),
        ),
        ("KV_CACHE_MEMORY".to_string(), "64MiB".to_string()),
        (
            "OPENAI_SERVED_MODEL_NAME_OVERRIDE".to_string(),
            "m".to_string(),
        ),
    ];
    env.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut server = Running::start(&env, &["serve", "--host", "127.0.0.1", "--port", "0"]);
    let base =
        tokio::task::block_in_place(|| server.wait_listening(std::time::Duration::from_secs(120)));
    (server, base)
}

/// `ENABLE_AUTO_TOOL_CHOICE=false` is vLLM without `--enable-auto-tool-choice`: tools with
/// `tool_choice` auto (given or implied) are a 400 with vLLM's message, while `none`, `required`
/// and a named function still work; unset, auto tool choice works as before.
#[tokio::test(flavor = "multi_thread")]
async fn auto_tool_choice_is_refused_only_when_the_flag_is_false() {
    let tools = json!([{"type": "function", "function": {"name": "add", "parameters": {"type": "object",
        "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]);
    let body = |choice: Option<Value>| {
        let mut b = json!({"model": "m", "messages": [{"role": "user", "content": "Add"}],
            "tools": tools, "max_tokens": 40, "temperature": 0});
        if let Some(c) = choice {
            b["tool_choice"] = c;
        }
        b
    };
    let named = json!({"type": "function", "function": {"name": "add"}});
    let http = reqwest::Client::new();
    for flag in [Some("false"), None, Some("true")] {
        let vars: Vec<(&str, &str)> = flag
            .map(|f| ("ENABLE_AUTO_TOOL_CHOICE", f))
            .into_iter()
            .collect();
        let (server, base) = serve_with(&vars);
        for (choice, auto) in [
            (None, true),
            (Some(json!("auto")), true),
            (Some(json!("none")), false),
            (Some(json!("required")), false),
            (Some(named.clone()), false),
        ] {
            let r = http
                .post(format!("{base}/v1/chat/completions"))
                .json(&body(choice.clone()))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap();
            if auto && flag == Some("false") {
                assert_eq!(status, 400, "{choice:?}: {v}");
                assert_eq!(v["error"]["param"], json!("tool_choice"), "{v}");
                let m = v["error"]["message"].as_str().unwrap();
                assert!(
                    m.contains("\"auto\" tool choice requires --enable-auto-tool-choice"),
                    "{m}"
                );
            } else {
                assert_eq!(status, 200, "flag {flag:?}, {choice:?}: {v}");
            }
        }
        server.terminate();
    }
}

/// Fast-forward through the real binary: a schema with long fixed keys takes fewer forward passes
/// than it has tokens (the request's log line says how many), `/metrics` counts the forced tokens,
/// and the greedy reply is the one plain masked decoding gives (the in-process engine with
/// fast-forward off).
#[tokio::test(flavor = "multi_thread")]
async fn forced_keys_are_fast_forwarded_with_the_reply_of_plain_masked_decoding() {
    let schema = json!({"type": "object", "properties": {
            "identifier_of_the_record": {"type": "integer", "minimum": 0, "maximum": 999},
            "the_record_is_still_active": {"type": "boolean"},
            "category_of_the_record": {"enum": ["first_category", "second_category"]}},
        "required": ["identifier_of_the_record", "the_record_is_still_active", "category_of_the_record"],
        "additionalProperties": false});
    let body = json!({"model": "m", "prompt": "A record:", "max_tokens": 120, "temperature": 0,
        "logprobs": 1, "structured_outputs": {"json": schema}});
    let reply = |v: &Value| {
        let c = &v["choices"][0];
        (c["text"].clone(), c["logprobs"]["token_logprobs"].clone())
    };
    let plain = start(|s| s.fast_forward = false).await;
    let (status, want) = plain.post("/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{want}");
    let (mut server, base) = serve_with(&[]);
    let http = reqwest::Client::new();
    let got: Value = http
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (text, logprobs) = reply(&got);
    assert_eq!(text, reply(&want).0, "{got}");
    let tokens = got["usage"]["completion_tokens"].as_u64().unwrap();
    serde_json::from_str::<Value>(text.as_str().unwrap()).expect("valid JSON");
    for (a, b) in logprobs
        .as_array()
        .unwrap()
        .iter()
        .zip(reply(&want).1.as_array().unwrap())
    {
        assert!(
            (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-4,
            "{a} {b}"
        );
    }
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let forced: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("worker_candle_structured_forced_tokens_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(forced > 0, "{metrics}");
    server.terminate();
    tokio::task::block_in_place(|| server.wait(std::time::Duration::from_secs(30)));
    let log = server.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("request finished"))
        .unwrap_or_else(|| panic!("{log}"));
    // the log's colour codes out: ESC [ ... m
    let mut plain_line = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            plain_line.push(c);
        }
    }
    let steps: u64 = plain_line
        .split("forward_steps=")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{plain_line}"));
    assert!(
        steps > 0 && steps < tokens,
        "{steps} passes for {tokens} tokens: {plain_line}"
    );
}

/// `REASONING_PARSER` with a template that opens no think block: the model may open one itself
/// (here made likely by a bias on `<`), its free text goes to `reasoning_content`, and the
/// constraint holds for the answer after it; replies without a block are the constrained answer.
#[tokio::test]
async fn a_model_opened_reasoning_block_comes_before_the_constrained_answer() {
    let s = start(|settings| {
        settings.output_syntax = OutputSyntax {
            reasoning_parser: Some("qwen3".into()),
            ..OutputSyntax::default()
        };
    })
    .await;
    let (mut thought, mut answered) = (0, 0);
    for seed in 0..12 {
        for stream in [false, true] {
            let body = json!({"model": "m", "messages": [{"role": "user", "content": "Think."}],
                "temperature": 1.0, "seed": seed, "max_tokens": 24, "stream": stream,
                "logit_bias": {"34": 6, "727": 6}, "guided_regex": "[0-9]{3}"});
            let (finish, reasoning, content) = reasoning_and_content(&s, body).await;
            if reasoning.is_some() {
                thought += 1;
            }
            match content {
                Some(c) => {
                    assert!(
                        c.trim_start().len() == 3 && c.trim().bytes().all(|b| b.is_ascii_digit()),
                        "{c:?}"
                    );
                    assert_eq!(finish, json!("stop"));
                    answered += 1;
                }
                None => assert_eq!(finish, json!("length"), "{reasoning:?}"),
            }
        }
    }
    assert!(thought > 0 && answered > 0, "{thought} {answered}");
}
