//! `worker-candle run-batch` through the real binary: mixed chat / completion / embedding lines with
//! invalid ones among them, output order and ids, greedy results equal to the same requests sent one
//! by one, and input / output over HTTP (GET and PUT, with a retried failure).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::process::{fixture, run};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde_json::{json, Value};
use worker_candle::api::openai::{handle, OpenAiResponse, OpenAiSettings};
use worker_candle::engine::settings::DeviceChoice;
use worker_candle::engine::{Engine, EngineSettings};

const MODEL: &str = "m";

fn envs(model: &str) -> Vec<(String, String)> {
    vec![
        ("MODEL_NAME".into(), fixture(model).display().to_string()),
        ("OPENAI_SERVED_MODEL_NAME_OVERRIDE".into(), MODEL.into()),
        ("KV_CACHE_MEMORY".into(), "64MB".into()),
    ]
}

fn run_batch(model: &str, input: &str, output: &str) -> std::process::Output {
    let out = run(
        &envs(model),
        &["run-batch", "-i", input, "-o", output],
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "run-batch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn line(id: &str, url: &str, body: Value) -> String {
    json!({"custom_id": id, "method": "POST", "url": url, "body": body}).to_string()
}

fn chat(i: usize) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": format!("Hello number {i}")}],
           "temperature": 0, "max_completion_tokens": 6 + i})
}

fn completion(i: usize) -> Value {
    json!({"model": MODEL, "prompt": format!("Once upon a time {i}"), "temperature": 0, "max_tokens": 5 + i})
}

/// The answers' generated text, for comparing runs (ids and timestamps differ).
fn texts(body: &Value) -> Vec<String> {
    body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c["message"]["content"]
                .as_str()
                .or(c["text"].as_str())
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn mixed_batch_keeps_order_reports_bad_lines_and_matches_single_requests() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = Vec::new();
    let mut expect = Vec::new(); // (custom_id or null, status, kind)
    for i in 0..4 {
        lines.push(line(&format!("chat-{i}"), "/v1/chat/completions", chat(i)));
        expect.push((json!(format!("chat-{i}")), 200));
        lines.push(line(&format!("cmpl-{i}"), "/v1/completions", completion(i)));
        expect.push((json!(format!("cmpl-{i}")), 200));
    }
    lines.insert(3, "{this is not json".into());
    expect.insert(3, (Value::Null, 400));
    lines.insert(5, line("bad-url", "/v1/images/generations", json!({})));
    expect.insert(5, (json!("bad-url"), 400));
    lines.push(line(
        "bad-params",
        "/v1/completions",
        json!({"prompt": "x", "temperature": -1}),
    ));
    expect.push((json!("bad-params"), 400));
    // A generator does not serve embeddings: its own error line.
    lines.push(line("embed", "/v1/embeddings", json!({"input": "x"})));
    expect.push((json!("embed"), 400));
    lines.push(line(
        "other-model",
        "/v1/completions",
        json!({"model": "nope", "prompt": "x"}),
    ));
    expect.push((json!("other-model"), 404));
    lines.push(String::new()); // blank lines are skipped
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    std::fs::write(&input, lines.join("\n")).unwrap();
    let (i, o) = (input.display().to_string(), output.display().to_string());
    tokio::task::spawn_blocking(move || run_batch("llama", &i, &o))
        .await
        .unwrap();

    let results: Vec<Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), expect.len());
    let mut ids = std::collections::HashSet::new();
    for (r, (custom_id, status)) in results.iter().zip(&expect) {
        assert_eq!(&r["custom_id"], custom_id, "{r}");
        assert_eq!(r["response"]["status_code"], *status, "{r}");
        assert!(ids.insert(r["id"].as_str().unwrap().to_string()));
        assert!(r["response"]["request_id"].is_string());
        if *status == 200 {
            assert!(r["error"].is_null(), "{r}");
        } else {
            assert!(r["error"]["message"].is_string(), "{r}");
        }
    }

    // The same requests one by one, through the same front door, give the same greedy text.
    let mut settings = EngineSettings::for_model(fixture("llama"));
    settings.device = DeviceChoice::Cpu;
    settings.kv_cache_memory = Some(64 << 20);
    let engine = Engine::start(settings).unwrap();
    let openai = OpenAiSettings {
        served_model_name: MODEL.into(),
        response_role: "assistant".into(),
    };
    let mut checked = 0;
    for r in &results {
        let id = r["custom_id"].as_str().unwrap_or_default();
        let (url, body) = if let Some(i) = id.strip_prefix("chat-") {
            ("/v1/chat/completions", chat(i.parse().unwrap()))
        } else if let Some(i) = id.strip_prefix("cmpl-") {
            ("/v1/completions", completion(i.parse().unwrap()))
        } else {
            continue;
        };
        let single = match handle(&engine, &openai, url, axum::http::Method::POST, Some(body)).await
        {
            OpenAiResponse::Json(body) => body,
            other => panic!("{id}: {other:?}"),
        };
        let batched = &r["response"]["body"];
        assert_eq!(texts(batched), texts(&single), "{id}");
        assert_eq!(batched["usage"], single["usage"], "{id}");
        checked += 1;
    }
    assert_eq!(checked, 8);
}

#[derive(Clone, Default)]
struct Store {
    input: Arc<Mutex<String>>,
    output: Arc<Mutex<Option<String>>>,
    gets: Arc<AtomicUsize>,
}

async fn serve_input(State(s): State<Store>) -> (StatusCode, String) {
    // The first GET fails: the runner must retry.
    if s.gets.fetch_add(1, Ordering::SeqCst) == 0 {
        return (StatusCode::SERVICE_UNAVAILABLE, "try again".into());
    }
    (StatusCode::OK, s.input.lock().unwrap().clone())
}

async fn take_output(State(s): State<Store>, body: String) -> StatusCode {
    *s.output.lock().unwrap() = Some(body);
    StatusCode::OK
}

#[tokio::test]
async fn embeddings_batch_over_http_get_and_put() {
    let text = std::fs::read_to_string(fixture("bert-embed").join("reference.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    let lines: Vec<String> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            line(
                &format!("request-{i}"),
                "/v1/embeddings",
                json!({"model": MODEL, "input": c["input"]}),
            )
        })
        .chain([line("gen", "/v1/chat/completions", chat(0))])
        .collect();
    let store = Store::default();
    *store.input.lock().unwrap() = lines.join("\n");
    let app = axum::Router::new()
        .route("/in.jsonl", get(serve_input))
        .route("/out.jsonl", axum::routing::put(take_output))
        .with_state(store.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let (i, o) = (
        format!("{base}/in.jsonl?sig=abc"),
        format!("{base}/out.jsonl?sig=def"),
    );
    tokio::task::spawn_blocking(move || run_batch("bert-embed", &i, &o))
        .await
        .unwrap();

    assert_eq!(
        store.gets.load(Ordering::SeqCst),
        2,
        "one failed GET, one retry"
    );
    let written = store
        .output
        .lock()
        .unwrap()
        .clone()
        .expect("the output was PUT");
    let results: Vec<Value> = written
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), cases.len() + 1);
    for (i, (r, c)) in results.iter().zip(cases).enumerate() {
        assert_eq!(r["custom_id"], format!("request-{i}"));
        assert_eq!(r["response"]["status_code"], 200, "{r}");
        let body = &r["response"]["body"];
        assert_eq!(body["object"], "list");
        assert_eq!(
            body["usage"]["prompt_tokens"],
            c["input_ids"].as_array().unwrap().len()
        );
        let got: Vec<f32> = serde_json::from_value(body["data"][0]["embedding"].clone()).unwrap();
        let want: Vec<f32> = serde_json::from_value(c["embedding"].clone()).unwrap();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-5, "request-{i}: {worst}");
    }
    // An embedding model cannot chat: that line fails alone.
    let last = results.last().unwrap();
    assert_eq!(last["custom_id"], "gen");
    assert_eq!(last["response"]["status_code"], 400, "{last}");
}

#[test]
fn an_unreadable_input_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.jsonl").display().to_string();
    let out = dir.path().join("out.jsonl").display().to_string();
    let o = run(
        &envs("bert-embed"),
        &["run-batch", "-i", &missing, "-o", &out],
        Duration::from_secs(60),
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.jsonl"));
}
