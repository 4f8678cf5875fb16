//! One request's failure fails that request only, through the real binary: `serve` on the GPT-2
//! fixture (512 learned positions) with `MAX_MODEL_LENGTH=4096` allowed by
//! `VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`, so a prompt past position 512 passes validation and fails in
//! the model's forward pass, in a step it shares with seven others. And the start-up checks that
//! refuse such settings unless asked: the context past the model's positions, a KV budget past the
//! host's memory or short of one full-length sequence.

use std::time::Duration;

use crate::common::process::{command, fixture, run, Running};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(120);

fn gpt2_vars(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut vars = vec![
        (
            "MODEL_NAME".to_string(),
            fixture("gpt2").display().to_string(),
        ),
        ("KV_CACHE_MEMORY".to_string(), "64MiB".to_string()),
    ];
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    vars
}

async fn complete(http: &reqwest::Client, base: &str, body: Value) -> (u16, Value) {
    let r = http
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poisoned_request_in_a_batch_of_8_fails_alone() {
    let mut server = Running::start(
        &gpt2_vars(&[
            ("MAX_MODEL_LENGTH", "4096"),
            ("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1"),
            ("RUST_BACKTRACE", "1"),
        ]),
        &["serve", "--host", "127.0.0.1", "--port", "0"],
    );
    let base = tokio::task::block_in_place(|| server.wait_listening(LIMIT));
    let http = reqwest::Client::new();
    let body = |i: usize| {
        json!({"prompt": format!("Request number {i} says"), "max_tokens": 300,
               "temperature": 0, "ignore_eos": true})
    };
    // Each of the seven alone first: the text they must get in the poisoned batch too.
    let mut alone = Vec::new();
    for i in 0..7 {
        let (status, v) = complete(&http, &base, body(i)).await;
        assert_eq!(status, 200, "{v}");
        alone.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    let batch: Vec<_> = (0..7)
        .map(|i| {
            let (http, base) = (http.clone(), base.clone());
            tokio::spawn(async move { complete(&http, &base, body(i)).await })
        })
        .collect();
    // Once all seven decode, the poison's prompt (past the 512 positions) joins their step.
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        server.assert_alive();
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            server.stderr()
        );
        let metrics = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if gauge(&metrics, "worker_candle_engine_sequences_running") >= 7.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let poison = json!({"prompt": "hello ".repeat(700), "max_tokens": 4});
    let (status, error) = complete(&http, &base, poison).await;
    assert_eq!(status, 500, "{error}");
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("could not run this request"), "{error}");
    assert!(
        !message.contains('\n') && !message.contains("backtrace"),
        "no backtrace to clients: {message}"
    );
    for (i, task) in batch.into_iter().enumerate() {
        let (status, v) = task.await.unwrap();
        assert_eq!(status, 200, "request {i} failed with the poisoned one: {v}");
        assert_eq!(v["choices"][0]["text"], alone[i], "request {i}");
        assert_eq!(v["usage"]["completion_tokens"], 300);
    }
    // And the engine goes on serving.
    let (status, v) = complete(&http, &base, body(0)).await;
    assert_eq!(
        (status, v["choices"][0]["text"].clone()),
        (200, json!(alone[0]))
    );
}

/// Start-up refuses a context past the model's positions, with one line naming the setting.
#[test]
fn max_model_length_past_the_models_positions_is_refused_at_start() {
    let out = run(
        &gpt2_vars(&[("MAX_MODEL_LENGTH", "4096"), ("RUST_LOG", "warn")]),
        &["--test-input", r#"{"prompt": "Hi"}"#],
        LIMIT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].contains("MAX_MODEL_LENGTH=4096") && lines[0].contains("512"),
        "{stderr}"
    );
}

/// A KV budget past the memory the host has left exits non-zero with one clear line, before
/// allocating anything.
#[test]
fn a_kv_budget_past_the_hosts_memory_is_one_line_and_a_failed_start() {
    let out = run(
        &gpt2_vars(&[("KV_CACHE_MEMORY", "100TiB"), ("RUST_LOG", "warn")]),
        &["--test-input", r#"{"prompt": "Hi"}"#],
        LIMIT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].contains("KV_CACHE_MEMORY=100.0 TiB") && lines[0].contains("memory"),
        "{stderr}"
    );
}

/// A KV budget too small for one sequence of the context length is a start-up error naming both
/// settings (vLLM's rule), not a 16-token context.
#[test]
fn a_kv_budget_short_of_one_full_length_sequence_is_a_failed_start() {
    let mut cmd = command(
        &gpt2_vars(&[("KV_CACHE_MEMORY", "1"), ("RUST_LOG", "warn")]),
        &["--test-input", r#"{"prompt": "Hi"}"#],
    );
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("KV_CACHE_MEMORY") && stderr.contains("MAX_MODEL_LENGTH"),
        "{stderr}"
    );
}
