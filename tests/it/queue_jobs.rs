//! The real `worker-candle` binary on a fixture model, taking jobs of every kind from the queue
//! emulator over HTTP: native prompt and messages (streamed and not), OpenAI chat and completions
//! (streamed and not, raw SSE and objects), `/v1/models`, bad jobs, concurrency, faults and SIGTERM.

use std::time::Duration;

use crate::common::emulator::{Emulator, Endpoint, Fault};
use crate::common::process::{fixture, Running};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(120);

fn start_worker(emulator: &Emulator, extra: &[(&str, &str)]) -> Running {
    let mut vars = emulator.env();
    vars.push(("MODEL_NAME".into(), fixture("llama").display().to_string()));
    vars.push(("KV_CACHE_MEMORY".into(), "64MiB".into()));
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Running::start(&vars, &[])
}

async fn answer(emulator: &Emulator, worker: &mut Running, id: &str, input: Value) -> Value {
    let before = emulator.answered();
    emulator.push_job(id, input);
    let deadline = tokio::time::Instant::now() + LIMIT;
    while emulator.results(id).is_empty() {
        worker.assert_alive();
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} not answered ({before} before); worker stderr:\n{}",
            worker.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    emulator.result(id)
}

fn error_of(result: &Value) -> Value {
    let text = result["error"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error result, got {result}"));
    serde_json::from_str(text).expect("the error is a JSON object")
}

fn native_text(output: &[Value]) -> String {
    output
        .iter()
        .flat_map(|piece| {
            piece["choices"][0]["tokens"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn native_prompt_streamed_batches_grow_and_match_the_unstreamed_text() {
    let emulator = Emulator::start().await;
    let mut worker = start_worker(&emulator, &[]);
    let params = json!({"max_tokens": 40, "ignore_eos": true, "temperature": 0});

    let streamed = answer(
        &emulator,
        &mut worker,
        "stream",
        json!({"prompt": "Hello, my name is", "stream": true, "sampling_params": params}),
    )
    .await;
    let pieces = streamed["output"].as_array().unwrap().clone();
    let sizes: Vec<usize> = pieces
        .iter()
        .map(|p| p["choices"][0]["tokens"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, vec![1, 3, 9, 27], "the dynamic batch sizes");
    // Each post to job-stream carried exactly one of these pieces, in order.
    let posted: Vec<Value> = emulator
        .streamed("stream")
        .into_iter()
        .map(|b| b["output"].clone())
        .collect();
    assert_eq!(posted, pieces);
    let last = pieces.last().unwrap();
    assert_eq!(last["usage"], json!({"input": 10, "output": 40}));
    assert_eq!(pieces[0]["usage"]["output"], 1);

    let whole = answer(
        &emulator,
        &mut worker,
        "whole",
        json!({"prompt": "Hello, my name is", "sampling_params": params}),
    )
    .await;
    let output = whole["output"].as_array().unwrap();
    assert_eq!(output.len(), 1, "one piece when not streaming");
    assert_eq!(
        output[0]["choices"][0]["tokens"].as_array().unwrap().len(),
        1
    );
    assert_eq!(native_text(output), native_text(&pieces));
    assert_eq!(output[0]["usage"], json!({"input": 10, "output": 40}));
}

#[tokio::test(flavor = "multi_thread")]
async fn per_request_batch_knobs_override_the_defaults() {
    let emulator = Emulator::start().await;
    let mut worker = start_worker(&emulator, &[("DEFAULT_BATCH_SIZE", "10")]);
    let result = answer(
        &emulator,
        &mut worker,
        "knobs",
        json!({
            "prompt": "Once upon a time", "stream": true,
            "sampling_params": {"max_tokens": 20, "ignore_eos": true, "temperature": 0},
            "min_batch_size": 2, "batch_size_growth_factor": 2,
        }),
    )
    .await;
    let sizes: Vec<usize> = result["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["choices"][0]["tokens"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, vec![2, 4, 8, 6]);
}

#[tokio::test(flavor = "multi_thread")]
async fn native_messages_use_the_chat_template() {
    let emulator = Emulator::start().await;
    let mut worker = start_worker(&emulator, &[]);
    let messages = json!([{"role": "user", "content": "What is the capital of France?"}]);
    let result = answer(
        &emulator,
        &mut worker,
        "chat",
        json!({"messages": messages, "sampling_params": {"max_tokens": 8, "temperature": 0, "ignore_eos": true}}),
    )
    .await;
    let output = result["output"].as_array().unwrap();
    // The fixture's rendered chat prompt is 27 tokens long.
    assert_eq!(output[0]["usage"], json!({"input": 27, "output": 8}));
    let via_prompt = answer(
        &emulator,
        &mut worker,
        "chat-prompt",
        json!({"prompt": "What is the capital of France?", "apply_chat_template": true,
               "sampling_params": {"max_tokens": 8, "temperature": 0, "ignore_eos": true}}),
    )
    .await;
    assert_eq!(
        native_text(via_prompt["output"].as_array().unwrap()),
        native_text(output),
        "apply_chat_template renders the prompt as one user message"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_jobs_streamed_and_not() {
    let emulator = Emulator::start().await;
    let mut worker = start_worker(&emulator, &[]);
    let served = fixture("llama").display().to_string();

    let models = answer(
        &emulator,
        &mut worker,
        "models",
        json!({"openai_route": "/v1/models"}),
    )
    .await;
    let list = &models["output"][0];
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], served);

    let chat_body = json!({
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 8, "temperature": 0,
    });
    let chat = answer(
        &emulator,
        &mut worker,
        "chat",
        json!({"openai_route": "/v1/chat/completions", "openai_input": chat_body}),
    )
    .await;
    let object = &chat["output"][0];
    assert_eq!(object["object"], "chat.completion");
    assert_eq!(
        object["model"], served,
        "a body without `model` gets the served name"
    );
    let content = object["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(object["choices"][0]["message"]["role"], "assistant");

    let mut streamed_body = chat_body.clone();
    streamed_body["stream"] = json!(true);
    let stream = answer(
        &emulator,
        &mut worker,
        "chat-stream",
        json!({"route": "/v1/chat/completions", "body": streamed_body, "method": "POST"}),
    )
    .await;
    let posts = stream["output"].as_array().unwrap();
    let mut text = String::new();
    let mut saw_done = false;
    for post in posts {
        let sse = post.as_str().expect("raw SSE text per post");
        for event in sse.split("\n\n").filter(|e| !e.is_empty()) {
            let data = event.strip_prefix("data: ").expect("an SSE data line");
            if data == "[DONE]" {
                saw_done = true;
                continue;
            }
            let chunk: Value = serde_json::from_str(data).unwrap();
            assert_eq!(chunk["object"], "chat.completion.chunk");
            if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
                text.push_str(piece);
            }
        }
    }
    assert!(saw_done);
    assert_eq!(text, content, "the streamed chat equals the unstreamed one");
    assert_eq!(posts[0].as_str().unwrap().matches("data: ").count(), 1);

    let completion = answer(
        &emulator,
        &mut worker,
        "completion",
        json!({"openai_route": "/v1/completions",
               "openai_input": {"prompt": "Hello, my name is", "max_tokens": 8, "temperature": 0}}),
    )
    .await;
    let object = &completion["output"][0];
    assert_eq!(object["object"], "text_completion");
    assert_eq!(object["usage"]["prompt_tokens"], 10);
    assert_eq!(object["usage"]["completion_tokens"], 8);
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_stream_as_chunk_objects_when_raw_output_is_off() {
    let emulator = Emulator::start().await;
    let mut worker = start_worker(&emulator, &[("RAW_OPENAI_OUTPUT", "0")]);
    let result = answer(
        &emulator,
        &mut worker,
        "objects",
        json!({"openai_route": "/v1/completions",
               "openai_input": {"prompt": "Hello, my name is", "max_tokens": 12, "temperature": 0,
                                "stream": true, "ignore_eos": true}}),
    )
    .await;
    let posts = result["output"].as_array().unwrap();
    assert!(posts.len() >= 2);
    for post in posts {
        for chunk in post.as_array().expect("a list of chunk objects per post") {
            assert_eq!(chunk["object"], "text_completion");
        }
    }
    assert_eq!(
        posts[0].as_array().unwrap().len(),
        1,
        "the first post carries one chunk"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_jobs_get_clear_errors_and_the_worker_keeps_serving() {
    let emulator = Emulator::start().await;
    let mut worker = start_worker(&emulator, &[]);
    emulator.push_raw_job(json!({"id": "no-input"}));
    let cases = [
        ("no-prompt", json!({"sampling_params": {}}), "prompt"),
        ("prompt-type", json!({"prompt": 42}), "string"),
        (
            "params-type",
            json!({"prompt": "x", "sampling_params": {"max_tokens": "ten"}}),
            "max_tokens",
        ),
        (
            "unknown-param",
            json!({"prompt": "x", "sampling_params": {"temprature": 0}}),
            "temprature",
        ),
        (
            "route",
            json!({"openai_route": "/v1/images/generations", "openai_input": {}}),
            "unknown route",
        ),
        (
            "stream-type",
            json!({"prompt": "x", "stream": "yes"}),
            "stream",
        ),
    ];
    for (id, input, needle) in cases {
        let result = answer(&emulator, &mut worker, id, input).await;
        let error = error_of(&result);
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(needle), "{id}: {message}");
        assert!(error["code"].as_u64().unwrap() >= 400);
    }
    let missing = error_of(&emulator.result("no-input"));
    assert!(missing["message"].as_str().unwrap().contains("input"));
    let ok = answer(
        &emulator,
        &mut worker,
        "after",
        json!({"prompt": "Hello", "sampling_params": {"max_tokens": 2}}),
    )
    .await;
    assert!(ok.get("output").is_some(), "{ok}");
}

#[tokio::test(flavor = "multi_thread")]
async fn queue_jobs_are_held_to_the_per_request_output_cap() {
    let emulator = Emulator::start().await;
    let mut worker = start_worker(&emulator, &[("MAX_REQUEST_OUTPUT_TOKENS", "100")]);
    // n × max_tokens × (1 + logprobs) = 3 × 10 × 6 = 180 > 100, in every job form.
    let completion = json!({"prompt": "hi", "n": 3, "max_tokens": 10, "logprobs": 5});
    let chat = json!({
        "messages": [{"role": "user", "content": "hi"}],
        "n": 3, "max_tokens": 10, "logprobs": true, "top_logprobs": 4,
    });
    let mut streamed_chat = chat.clone();
    streamed_chat["stream"] = json!(true);
    let cases = [
        (
            "native",
            json!({"prompt": "hi", "sampling_params": {"n": 3, "max_tokens": 10, "logprobs": 5}}),
        ),
        (
            "native-stream",
            json!({"prompt": "hi", "stream": true, "sampling_params": {"n": 3, "max_tokens": 10, "logprobs": 5}}),
        ),
        (
            "completions",
            json!({"openai_route": "/v1/completions", "openai_input": completion}),
        ),
        (
            "chat",
            json!({"openai_route": "/v1/chat/completions", "openai_input": chat}),
        ),
        (
            "chat-stream",
            json!({"openai_route": "/v1/chat/completions", "openai_input": streamed_chat}),
        ),
        (
            "generic-route",
            json!({"route": "/v1/completions", "method": "POST", "body": completion}),
        ),
    ];
    for (id, input) in cases {
        let result = answer(&emulator, &mut worker, id, input).await;
        assert!(result.get("output").is_none(), "{id}: {result}");
        let error = error_of(&result);
        assert_eq!(error["code"], 400, "{id}: {error}");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains("MAX_REQUEST_OUTPUT_TOKENS"),
            "{id}: {message}"
        );
    }
    // Under the cap, the same forms are served.
    let ok = answer(
        &emulator,
        &mut worker,
        "under",
        json!({"openai_route": "/v1/completions", "openai_input": {"prompt": "hi", "n": 2, "max_tokens": 5, "logprobs": 2}}),
    )
    .await;
    assert!(ok.get("output").is_some(), "{ok}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_jobs_under_queue_faults_are_each_answered_once() {
    let emulator = Emulator::start().await;
    emulator.fault(Endpoint::Take, Fault::Status(500));
    emulator.fault(Endpoint::Done, Fault::Drop);
    emulator.fault(Endpoint::Done, Fault::Status(502));
    emulator.fault(Endpoint::Stream, Fault::Delay(Duration::from_millis(300)));
    let mut worker = start_worker(&emulator, &[("MAX_CONCURRENCY", "3")]);
    for i in 0..8 {
        emulator.push_job(
            &format!("c{i}"),
            json!({"prompt": "Once upon a time", "stream": i % 2 == 0,
                   "sampling_params": {"max_tokens": 6, "temperature": 0, "ignore_eos": true}}),
        );
    }
    let deadline = tokio::time::Instant::now() + LIMIT;
    while emulator.answered() < 8 {
        worker.assert_alive();
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            worker.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let texts: Vec<String> = (0..8)
        .map(|i| {
            native_text(
                emulator.result(&format!("c{i}"))["output"]
                    .as_array()
                    .unwrap(),
            )
        })
        .collect();
    assert!(
        texts.iter().all(|t| t == &texts[0]),
        "same prompt, same greedy text: {texts:?}"
    );
    for call in emulator.calls_to(Endpoint::Take) {
        let asked: usize = call
            .query("batch_size")
            .map(|n| n.parse().unwrap())
            .unwrap_or(1);
        assert!(asked <= 3, "{}", call.uri);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_reports_the_unfinished_job_and_exits_cleanly() {
    let emulator = Emulator::start().await;
    // Slow job-stream answers keep the job running past the shutdown deadline.
    for _ in 0..4 {
        emulator.fault(Endpoint::Stream, Fault::Delay(Duration::from_secs(2)));
    }
    let mut worker = start_worker(&emulator, &[("GRACEFUL_SHUTDOWN_TIMEOUT", "1")]);
    emulator.push_job(
        "long",
        json!({"prompt": "Hello", "stream": true,
               "sampling_params": {"max_tokens": 100000, "ignore_eos": true}}),
    );
    let deadline = tokio::time::Instant::now() + LIMIT;
    while emulator.calls_to(Endpoint::Stream).is_empty() {
        worker.assert_alive();
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            worker.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.terminate();
    let status = tokio::task::spawn_blocking(move || {
        let status = worker.wait(Duration::from_secs(30));
        (status, worker)
    })
    .await
    .unwrap();
    assert!(
        status.0.success(),
        "exit 0 after SIGTERM: {:?}\n{}",
        status.0,
        status.1.stderr()
    );
    let error = error_of(&emulator.result("long"));
    assert_eq!(error["code"], 503);
}

/// The events of raw SSE posts, as (event name, data).
fn sse_events(posts: &[Value]) -> Vec<(String, Value)> {
    posts
        .iter()
        .flat_map(|post| {
            let text = post.as_str().expect("raw SSE text per post").to_string();
            text.split("\n\n")
                .filter(|e| !e.is_empty())
                .map(|event| {
                    let (name, data) = event.split_once('\n').expect("an event and a data line");
                    let name = name.strip_prefix("event: ").expect("a named event");
                    let data = data.strip_prefix("data: ").expect("an SSE data line");
                    (name.to_string(), serde_json::from_str(data).unwrap())
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn stored_responses_are_retrieved_and_deleted_through_jobs_within_their_bounds() {
    let emulator = Emulator::start().await;
    let mut worker = start_worker(&emulator, &[("RESPONSES_STORE_MAX_COUNT", "1")]);
    let create = |input: &str| {
        json!({"openai_route": "/v1/responses", "openai_input": {
            "input": input, "max_output_tokens": 4, "temperature": 0}})
    };
    let first = answer(&emulator, &mut worker, "first", create("Hello")).await;
    let first = first["output"][0].clone();
    let id = first["id"].as_str().unwrap().to_string();
    let route = format!("/openai/v1/responses/{id}");
    // Retrieved as the platform forwards a GET: no body, or `method`.
    let got = answer(
        &emulator,
        &mut worker,
        "get",
        json!({"openai_route": route}),
    )
    .await;
    assert_eq!(got["output"][0], first, "{got}");
    let got = answer(
        &emulator,
        &mut worker,
        "get-method",
        json!({"route": route, "method": "GET"}),
    )
    .await;
    assert_eq!(got["output"][0]["id"], json!(id), "{got}");
    let deleted = answer(
        &emulator,
        &mut worker,
        "delete",
        json!({"openai_route": route, "method": "DELETE"}),
    )
    .await;
    assert_eq!(
        deleted["output"][0],
        json!({"id": id, "object": "response", "deleted": true})
    );
    for (job, input) in [
        ("gone", json!({"openai_route": route})),
        (
            "gone-delete",
            json!({"openai_route": route, "method": "DELETE"}),
        ),
    ] {
        let error = error_of(&answer(&emulator, &mut worker, job, input).await);
        assert_eq!(error["code"], 404, "{job}: {error}");
    }
    // RESPONSES_STORE_MAX_COUNT=1: a second stored response pushes the first out.
    let a = answer(&emulator, &mut worker, "a", create("One")).await;
    let b = answer(&emulator, &mut worker, "b", create("Two")).await;
    let get = |r: &Value| json!({"openai_route": format!("/v1/responses/{}", r["output"][0]["id"].as_str().unwrap())});
    let error = error_of(&answer(&emulator, &mut worker, "a-gone", get(&a)).await);
    assert_eq!(error["code"], 404, "{error}");
    let kept = answer(&emulator, &mut worker, "b-kept", get(&b)).await;
    assert_eq!(kept["output"][0]["id"], b["output"][0]["id"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_and_messages_jobs_streamed_and_not() {
    let emulator = Emulator::start().await;
    let mut worker = start_worker(&emulator, &[]);
    let question = "What is the capital of France?";
    let chat = answer(
        &emulator,
        &mut worker,
        "chat",
        json!({"openai_route": "/v1/chat/completions", "openai_input": {
            "messages": [{"role": "user", "content": question}], "max_tokens": 8, "temperature": 0}}),
    )
    .await;
    let text = chat["output"][0]["choices"][0]["message"]["content"].clone();

    // /v1/responses as worker-vllm forwards it, whole and streamed.
    let body = json!({"input": question, "max_output_tokens": 8, "temperature": 0});
    let response = answer(
        &emulator,
        &mut worker,
        "responses",
        json!({"openai_route": "/openai/v1/responses", "openai_input": body}),
    )
    .await;
    let object = &response["output"][0];
    assert_eq!(object["object"], "response");
    assert_eq!(object["output"][0]["content"][0]["text"], text);
    assert_eq!(object["usage"]["output_tokens"], 8);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let stream = answer(
        &emulator,
        &mut worker,
        "responses-stream",
        json!({"openai_route": "/v1/responses", "openai_input": streamed}),
    )
    .await;
    let events = sse_events(stream["output"].as_array().unwrap());
    for (name, data) in &events {
        assert_eq!(
            data["type"],
            json!(name),
            "the event is named after its type"
        );
    }
    assert_eq!(events[0].0, "response.created");
    assert_eq!(events.last().unwrap().0, "response.incomplete");
    let deltas: String = events
        .iter()
        .filter(|(name, _)| name == "response.output_text.delta")
        .map(|(_, data)| data["delta"].as_str().unwrap())
        .collect();
    assert_eq!(json!(deltas), text);

    // /v1/messages, whole, streamed, and without its required max_tokens.
    let body = json!({"messages": [{"role": "user", "content": question}], "max_tokens": 8,
        "temperature": 0});
    let message = answer(
        &emulator,
        &mut worker,
        "messages",
        json!({"openai_route": "/v1/messages", "openai_input": body}),
    )
    .await;
    let object = &message["output"][0];
    assert_eq!(object["type"], "message");
    assert_eq!(object["content"][0]["text"], text);
    assert_eq!(object["stop_reason"], "max_tokens");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let stream = answer(
        &emulator,
        &mut worker,
        "messages-stream",
        json!({"openai_route": "/v1/messages", "openai_input": streamed}),
    )
    .await;
    let events = sse_events(stream["output"].as_array().unwrap());
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names[..3], ["message_start", "ping", "content_block_start"]);
    assert_eq!(
        names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    let deltas: String = events
        .iter()
        .filter(|(name, _)| name == "content_block_delta")
        .map(|(_, data)| data["delta"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(json!(deltas), text);
    let missing = answer(
        &emulator,
        &mut worker,
        "messages-no-max",
        json!({"openai_route": "/v1/messages", "openai_input": {
            "messages": [{"role": "user", "content": question}]}}),
    )
    .await;
    let error = error_of(&missing);
    assert_eq!(error["code"], 400);
    assert!(error["message"].as_str().unwrap().contains("max_tokens"));
}

#[tokio::test(flavor = "multi_thread")]
async fn model_jobs_in_worker_vllms_forms() {
    let emulator = Emulator::start().await;
    let mut worker = start_worker(&emulator, &[]);
    let served = fixture("llama").display().to_string();
    // The platform's /openai/v1/models reaches the worker as a POST-style job with an empty body.
    for (id, input) in [
        (
            "posted",
            json!({"openai_route": "/v1/models", "openai_input": {}}),
        ),
        (
            "prefixed",
            json!({"openai_route": "/openai/v1/models", "openai_input": {}}),
        ),
        ("route", json!({"route": "/v1/models", "method": "GET"})),
    ] {
        let result = answer(&emulator, &mut worker, id, input).await;
        let list = &result["output"][0];
        assert_eq!(list["object"], "list", "{id}: {result}");
        assert_eq!(list["data"][0]["id"], served, "{id}");
    }
    let card = answer(
        &emulator,
        &mut worker,
        "card",
        json!({"openai_route": format!("/v1/models/{served}"), "openai_input": {}}),
    )
    .await;
    assert_eq!(card["output"][0]["id"], served, "{card}");
    let other = answer(
        &emulator,
        &mut worker,
        "other",
        json!({"openai_route": "/v1/models/no-such-model"}),
    )
    .await;
    let error = error_of(&other);
    assert_eq!(
        (&error["type"], &error["code"]),
        (&json!("NotFoundError"), &json!(404))
    );
}

/// vLLM's extensions reach the OpenAI routes through `openai_route` jobs too, streamed and not.
#[tokio::test(flavor = "multi_thread")]
async fn vllm_extensions_through_openai_jobs() {
    let emulator = Emulator::start().await;
    let mut worker = start_worker(&emulator, &[]);
    let body = json!({
        "prompt": "A robot may not injure a human being", "max_tokens": 4, "temperature": 0,
        "return_token_ids": true, "truncate_prompt_tokens": 3, "seed": -1,
    });
    let whole = answer(
        &emulator,
        &mut worker,
        "whole",
        json!({"openai_route": "/v1/completions", "openai_input": body}),
    )
    .await;
    let object = &whole["output"][0];
    let choice = &object["choices"][0];
    let prompt_ids = choice["prompt_token_ids"].as_array().unwrap();
    assert_eq!(prompt_ids.len(), 3, "{whole}");
    assert_eq!(choice["token_ids"].as_array().unwrap().len(), 4);
    assert_eq!(choice["prompt_logprobs"], Value::Null);
    assert_eq!(object["usage"]["prompt_tokens"], 3);
    assert!(object["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true, "continuous_usage_stats": true});
    let stream = answer(
        &emulator,
        &mut worker,
        "stream",
        json!({"openai_route": "/v1/completions", "openai_input": streamed}),
    )
    .await;
    let mut ids = Vec::new();
    let mut chunks = 0;
    for post in stream["output"].as_array().unwrap() {
        for event in post
            .as_str()
            .unwrap()
            .split("\n\n")
            .filter(|e| !e.is_empty())
        {
            let data = event.strip_prefix("data: ").unwrap();
            if data == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(data).unwrap();
            assert!(chunk["usage"]["completion_tokens"].is_u64(), "{chunk}");
            chunks += 1;
            if let Some(t) = chunk["choices"][0]["token_ids"].as_array() {
                ids.extend(t.iter().cloned());
            }
        }
    }
    assert!(chunks >= 4);
    assert_eq!(Value::Array(ids), choice["token_ids"]);

    let bad = answer(
        &emulator,
        &mut worker,
        "bad",
        json!({"openai_route": "/v1/chat/completions", "openai_input": {
            "messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"}}),
    )
    .await;
    assert_eq!(error_of(&bad)["code"], 400);
}

/// A native job takes vLLM's `truncate_prompt_tokens` and any signed seed in `sampling_params`.
#[tokio::test(flavor = "multi_thread")]
async fn native_jobs_truncate_prompts_and_take_signed_seeds() {
    let emulator = Emulator::start().await;
    let mut worker = start_worker(&emulator, &[]);
    let result = answer(
        &emulator,
        &mut worker,
        "cut",
        json!({"prompt": "A robot may not injure a human being",
               "sampling_params": {"max_tokens": 2, "truncate_prompt_tokens": 3, "seed": -1}}),
    )
    .await;
    let output = result["output"]
        .as_array()
        .unwrap_or_else(|| panic!("{result}"));
    assert_eq!(output.last().unwrap()["usage"]["input"], 3, "{result}");
    let bad = answer(
        &emulator,
        &mut worker,
        "bad",
        json!({"prompt": "x", "sampling_params": {"truncate_prompt_tokens": 100000}}),
    )
    .await;
    assert_eq!(error_of(&bad)["code"], 400);
}
