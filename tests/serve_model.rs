//! The real binary on a fixture model: `serve` over HTTP (RunPod-style routes, OpenAI routes,
//! metrics) and `--test-input` / `test_input.json`.

mod common;

use std::time::Duration;

use common::process::{fixture, run, Running};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(120);

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
    let out = common::process::command(&model_vars(&[]), &[])
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
    let generated: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("worker_candle_generation_tokens_total "))
        .and_then(|n| n.trim().parse().ok())
        .expect("a generated-token counter");
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
