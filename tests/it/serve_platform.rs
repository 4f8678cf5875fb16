//! RunPod's load-balancing endpoints through the real binary: `PORT` / `PORT_HEALTH`, `GET /ping`
//! answering 204 while the model loads and 200 once it is ready, the other routes 503 meanwhile, and
//! requests in flight finishing on SIGTERM.
//!
//! The model comes from a hub emulator that holds every request until the test lets it answer, so
//! the loading window is the test's to observe (no timing involved).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::common::process::{fixture, Running};

const REPO: &str = "org/tiny-llama";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const LIMIT: Duration = Duration::from_secs(120);

#[derive(Clone)]
struct Hub {
    files: std::sync::Arc<BTreeMap<String, Vec<u8>>>,
    open: watch::Receiver<bool>,
}

async fn hub(State(hub): State<Hub>, request: Request) -> Response {
    let mut open = hub.open.clone();
    let _ = open.wait_for(|o| *o).await;
    let path = request.uri().path();
    if path == format!("/api/models/{REPO}/revision/main") {
        let siblings: Vec<Value> = hub
            .files
            .iter()
            .map(|(name, bytes)| json!({"rfilename": name, "size": bytes.len()}))
            .collect();
        return axum::Json(json!({"id": REPO, "sha": COMMIT, "siblings": siblings}))
            .into_response();
    }
    let Some(file) = path.strip_prefix(&format!("/{REPO}/resolve/{COMMIT}/")) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match hub.files.get(file) {
        Some(bytes) => bytes.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A hub serving the llama fixture once `open` is set.
async fn start_hub() -> (String, watch::Sender<bool>) {
    let dir: PathBuf = fixture("llama");
    let files = [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    .iter()
    .map(|f| (f.to_string(), std::fs::read(dir.join(f)).expect("fixture")))
    .collect();
    let (open, open_rx) = watch::channel(false);
    let state = Hub {
        files: std::sync::Arc::new(files),
        open: open_rx,
    };
    let app = Router::new().fallback(hub).with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, app).await.ok();
    });
    (url, open)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The worker's stdout lines, as they come.
fn lines(worker: &mut Running) -> mpsc::Receiver<String> {
    let stdout = worker.child.stdout.take().expect("stdout piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

fn wait_line(worker: &Running, rx: &mpsc::Receiver<String>, prefix: &str) -> String {
    loop {
        match rx.recv_timeout(LIMIT) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix(prefix) {
                    return rest.trim().to_string();
                }
            }
            Err(_) => panic!("no `{prefix}` line; stderr:\n{}", worker.stderr()),
        }
    }
}

async fn get(http: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = http.get(url).send().await.expect("request");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_answers_204_while_loading_then_200_on_port_health() {
    let (hub_url, open) = start_hub().await;
    let base = tempfile::tempdir().unwrap();
    let (port, health_port) = (free_port(), free_port());
    let vars: Vec<(String, String)> = [
        ("MODEL_NAME", REPO.to_string()),
        ("HF_ENDPOINT", hub_url),
        ("BASE_PATH", base.path().display().to_string()),
        ("HOME", base.path().display().to_string()),
        ("KV_CACHE_MEMORY", "64MiB".into()),
        ("PORT", port.to_string()),
        ("PORT_HEALTH", health_port.to_string()),
        ("DOWNLOAD_DIR", base.path().join("dl").display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    // No subcommand: PORT makes the image's entry point a load-balancing server.
    let mut worker = Running::start(&vars, &[]);
    let rx = lines(&mut worker);
    let ping = wait_line(&worker, &rx, "ping on ");
    assert!(ping.ends_with(&format!(":{health_port}/ping")), "{ping}");
    let ping = format!("http://127.0.0.1:{health_port}/ping");
    let main = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();

    // The hub holds the model back: the worker is loading.
    assert_eq!(get(&http, &ping).await.0, 204);
    let (status, body) = get(&http, &format!("{main}/v1/models")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["type"], "ServiceUnavailableError", "{body}");
    let r = http
        .post(format!("{main}/runsync"))
        .json(&json!({"input": {"prompt": "Hi"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("loading"),
        "{body}"
    );
    // The health port serves /ping only.
    assert_eq!(
        get(&http, &format!("http://127.0.0.1:{health_port}/v1/models"))
            .await
            .0,
        404
    );
    assert_eq!(get(&http, &ping).await.0, 204, "still loading");

    open.send(true).unwrap();
    let listening = wait_line(&worker, &rx, "listening on ");
    // PORT binds every interface (the platform reaches the container from outside).
    assert!(
        listening.contains(&format!("0.0.0.0:{port}")),
        "{listening}"
    );
    assert_eq!(get(&http, &ping).await.0, 200);
    assert_eq!(get(&http, &format!("{main}/ping")).await.0, 200);
    let (status, body) = get(&http, &format!("{main}/v1/models")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"][0]["id"], REPO);
    // DOWNLOAD_DIR is the hub cache the model went into (not the one under BASE_PATH).
    assert!(base
        .path()
        .join("dl/models--org--tiny-llama/snapshots")
        .is_dir());
    assert!(!base.path().join("huggingface-cache").exists());

    worker.terminate();
    assert!(worker.wait(LIMIT).success(), "{}", worker.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_finishes_on_sigterm() {
    let port = free_port();
    let vars: Vec<(String, String)> = [
        ("MODEL_NAME", fixture("llama").display().to_string()),
        ("KV_CACHE_MEMORY", "64MiB".into()),
        ("PORT", port.to_string()),
        ("GRACEFUL_SHUTDOWN_TIMEOUT", "60".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut worker = Running::start(&vars, &["serve"]);
    let rx = lines(&mut worker);
    wait_line(&worker, &rx, "listening on ");
    let main = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    // PORT_HEALTH unset: /ping answers on PORT.
    assert_eq!(get(&http, &format!("{main}/ping")).await.0, 200);
    let mut response = http
        .post(format!("{main}/v1/completions"))
        .json(&json!({"model": fixture("llama").display().to_string(), "prompt": "Hello", "max_tokens": 64,
            "ignore_eos": true, "stream": true, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut text = String::from_utf8_lossy(&response.chunk().await.unwrap().unwrap()).to_string();
    worker.terminate();
    while let Some(chunk) = response.chunk().await.expect("the stream is not cut") {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains("data: [DONE]"), "{text}");
    assert!(worker.wait(LIMIT).success(), "{}", worker.stderr());
}
