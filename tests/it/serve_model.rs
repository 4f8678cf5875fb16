//! The real binary on a fixture model: `serve` over HTTP (RunPod-style routes, OpenAI routes,
//! metrics) and `--test-input` / `test_input.json`.

use std::time::Duration;

use crate::common::process::{fixture, run, Running};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(120);

/// The value of an unlabelled counter in a Prometheus exposition.
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no counter {name} in {metrics}"))
}

fn model_vars(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut vars = vec![
        (
            "MODEL_NAME".to_string(),
            fixture("llama").display().to_string(),
        ),
        ("KV_CACHE_MEMORY".to_string(), "64MiB".to_string()),
    ];
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    vars
}

#[test]
fn test_input_runs_one_job_and_prints_its_result() {
    let input = r#"{"input": {"prompt": "Hello, my name is", "sampling_params": {"max_tokens": 5, "temperature": 0, "ignore_eos": true}}}"#;
    let out = run(&model_vars(&[]), &["--test-input", input], LIMIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: Value = serde_json::from_str(stdout.trim()).expect("one JSON result on stdout");
    assert_eq!(
        result["output"][0]["usage"],
        json!({"input": 10, "output": 5})
    );

    let bad = run(
        &model_vars(&[]),
        &["--test-input", r#"{"input": {"prompt": 1}}"#],
        LIMIT,
    );
    assert!(!bad.status.success());
    let printed: Value = serde_json::from_slice(&bad.stdout).expect("the error result");
    assert!(printed["error"].as_str().unwrap().contains("prompt"));
}

#[test]
fn test_input_json_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("test_input.json"),
        r#"{"input": {"prompt": "Hi", "sampling_params": {"max_tokens": 3, "ignore_eos": true}}}"#,
    )
    .unwrap();
    let out = crate::common::process::command(&model_vars(&[]), &[])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["output"][0]["usage"]["output"], 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_answers_runpod_and_openai_routes() {
    let mut server = Running::start(
        &model_vars(&[("API_KEY", "k")]),
        &["serve", "--host", "127.0.0.1", "--port", "0"],
    );
    let base = tokio::task::block_in_place(|| server.wait_listening(LIMIT));
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        http.post(format!("{base}{path}"))
            .bearer_auth("k")
            .json(&body)
            .send()
    };

    let sync: Value = post(
        "/runsync",
        json!({"input": {"prompt": "Hello, my name is", "sampling_params": {"max_tokens": 4, "temperature": 0, "ignore_eos": true}}}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(sync["status"], "COMPLETED", "{sync}");
    assert_eq!(
        sync["output"][0]["usage"],
        json!({"input": 10, "output": 4})
    );

    let chat: Value = post(
        "/openai/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(chat["object"], "chat.completion", "{chat}");

    let sse = post(
        "/v1/completions",
        json!({"prompt": "Hello", "max_tokens": 4, "stream": true, "ignore_eos": true}),
    )
    .await
    .unwrap();
    assert_eq!(
        sse.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let text = sse.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text.matches("data: ").count() >= 3, "{text}");

    let unauthorized = http
        .post(format!("{base}/v1/completions"))
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status().as_u16(), 401);

    let metrics = http
        .get(format!("{base}/metrics"))
        .bearer_auth("k")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let generated = counter(&metrics, "worker_candle_generation_tokens_total");
    // 4 tokens of /runsync, at least 1 of the chat completion (OpenAI usage counts too).
    assert!(generated >= 5, "{metrics}");
    assert!(
        metrics.contains("route=\"/runsync\",outcome=\"completed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("route=\"/v1/chat/completions\",outcome=\"completed\"} 1"),
        "{metrics}"
    );
    server.terminate();
    let status = tokio::task::block_in_place(|| server.wait(Duration::from_secs(30)));
    assert!(status.success());
}

#[test]
fn native_batch_job_returns_every_line_in_order() {
    let input = json!({"input": {"batch": [
        {"custom_id": "a", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "Hello, my name is", "max_tokens": 3, "temperature": 0, "ignore_eos": true}},
        {"custom_id": "b", "method": "POST", "url": "/v1/nowhere", "body": {}},
        {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}}
    ]}});
    let out = run(
        &model_vars(&[]),
        &["--test-input", &input.to_string()],
        LIMIT,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    let lines = result["output"][0].as_array().expect("the result lines");
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b", "c"]);
    assert_eq!(lines[0]["response"]["status_code"], 200, "{}", lines[0]);
    assert_eq!(
        lines[0]["response"]["body"]["usage"]["completion_tokens"],
        3
    );
    assert!(!lines[1]["error"].is_null(), "{}", lines[1]);
    assert_eq!(lines[2]["response"]["body"]["object"], "chat.completion");

    let bad = run(
        &model_vars(&[]),
        &["--test-input", r#"{"input": {"batch": 3}}"#],
        LIMIT,
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stdout).contains("`batch` must be a list"));
}

#[test]
fn native_embedding_job_answers_like_the_embeddings_route() {
    let vars = vec![(
        "MODEL_NAME".to_string(),
        fixture("bert-embed").display().to_string(),
    )];
    let input =
        r#"{"input": {"embedding_input": ["first sentence", "second one"], "dimensions": 8}}"#;
    let out = run(&vars, &["--test-input", input], LIMIT);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    let data = result["output"][0]["data"].as_array().expect("embeddings");
    assert_eq!(data.len(), 2);
    let v: Vec<f64> = data[0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(v.len(), 8);
    let norm: f64 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!(
        (norm - 1.0).abs() < 1e-4,
        "renormalised after truncation: {norm}"
    );
}

/// `SPECULATIVE_CONFIG` through the real binary: the same greedy output as without it, the engine's
/// speculation counters on `/metrics`; a malformed config stops the worker, naming the variable.
#[tokio::test(flavor = "multi_thread")]
async fn speculative_decoding_end_to_end() {
    let input = r#"{"input": {"prompt": "one two three one two three one two", "sampling_params": {"max_tokens": 16, "temperature": 0, "ignore_eos": true}}}"#;
    let spec = r#"{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}"#;
    let plain = run(&model_vars(&[]), &["--test-input", input], LIMIT);
    let fast = run(
        &model_vars(&[("SPECULATIVE_CONFIG", spec)]),
        &["--test-input", input],
        LIMIT,
    );
    assert!(
        fast.status.success(),
        "{}",
        String::from_utf8_lossy(&fast.stderr)
    );
    let tokens = |out: &std::process::Output| -> Value {
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["output"][0]["choices"][0]["tokens"].clone()
    };
    assert_eq!(tokens(&plain), tokens(&fast));

    let bad = run(
        &model_vars(&[("SPECULATIVE_CONFIG", r#"{"method": "eagle"}"#)]),
        &["--test-input", input],
        LIMIT,
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("SPECULATIVE_CONFIG"));

    let mut server = Running::start(
        &model_vars(&[("SPECULATIVE_CONFIG", spec)]),
        &["serve", "--host", "127.0.0.1", "--port", "0"],
    );
    let base = tokio::task::block_in_place(|| server.wait_listening(LIMIT));
    let http = reqwest::Client::new();
    let done: Value = http
        .post(format!("{base}/v1/completions"))
        .json(&json!({"prompt": "a b c d a b c d a b c", "max_tokens": 24, "temperature": 0, "ignore_eos": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(done["usage"]["completion_tokens"], 24, "{done}");
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let drafted = counter(&metrics, "worker_candle_spec_decode_draft_tokens_total");
    assert!(drafted > 0, "{metrics}");
    assert!(metrics.contains("worker_candle_spec_decode_accepted_tokens_total"));
    server.terminate();
    let status = tokio::task::block_in_place(|| server.wait(Duration::from_secs(30)));
    assert!(status.success());
}
