//! The local endpoint's HTTP surface (`/run`, `/runsync`, `/stream`, `/status`, `/cancel`, `/health`,
//! `/metrics`, `API_KEY`) over real HTTP, with a scripted job handler standing in for the model.

use std::sync::Arc;
use std::time::Duration;

use crate::common::scripted::{Handler, Scripted};
use serde_json::{json, Value};
use worker_candle::config::Config;
use worker_candle::serverless::local::LocalEndpoint;
use worker_candle::serverless::metrics::Metrics;

struct Server {
    base: String,
    http: reqwest::Client,
    _task: tokio::task::JoinHandle<()>,
}

async fn start(vars: &[(&str, &str)]) -> Server {
    let config = Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .expect("config");
    let endpoint = LocalEndpoint::new(
        Arc::new(Handler(Arc::new(Scripted::default()))),
        config.max_concurrency,
        Arc::new(Metrics::default()),
        config.api_key.clone(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = endpoint.router();
    let task = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    Server {
        base,
        http: reqwest::Client::new(),
        _task: task,
    }
}

impl Server {
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn wait_status(&self, id: &str, status: &str) -> Value {
        for _ in 0..500 {
            let (_, body) = self.get(&format!("/status/{id}")).await;
            if body["status"] == status {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("job {id} never reached {status}");
    }
}

#[tokio::test]
async fn runsync_returns_the_aggregate_or_the_error() {
    let s = start(&[]).await;
    let (code, body) = s.post("/runsync", json!({"input": {"pieces": 3}})).await;
    assert_eq!(code, 200);
    assert_eq!(body["status"], "COMPLETED");
    assert_eq!(body["output"], json!(["p0", "p1", "p2"]));
    assert!(body["id"].as_str().unwrap().starts_with("local-"));

    let (_, failed) = s
        .post("/runsync", json!({"input": {"pieces": 0, "fail": "nope"}}))
        .await;
    assert_eq!(failed["status"], "FAILED");
    let error: Value = serde_json::from_str(failed["error"].as_str().unwrap()).unwrap();
    assert_eq!(error["message"], "nope");
}

#[tokio::test]
async fn run_then_stream_and_status() {
    let s = start(&[]).await;
    let (code, run) = s
        .post("/run", json!({"input": {"pieces": 4, "delay_ms": 80}}))
        .await;
    assert_eq!(code, 200);
    assert_eq!(run["status"], "IN_PROGRESS");
    let id = run["id"].as_str().unwrap().to_string();

    let mut pieces = Vec::new();
    let mut polls = 0;
    loop {
        let (_, body) = s.get(&format!("/stream/{id}")).await;
        for item in body["stream"].as_array().unwrap() {
            pieces.push(item["output"].clone());
        }
        polls += 1;
        if body["status"] == "COMPLETED" {
            break;
        }
        assert!(polls < 100);
    }
    assert_eq!(
        pieces,
        vec![json!("p0"), json!("p1"), json!("p2"), json!("p3")]
    );
    assert!(polls > 1, "the stream was delivered in several polls");
    let status = s.wait_status(&id, "COMPLETED").await;
    assert_eq!(status["output"], json!(["p0", "p1", "p2", "p3"]));
}

#[tokio::test]
async fn cancel_stops_a_running_job() {
    let s = start(&[]).await;
    let (_, run) = s
        .post("/run", json!({"input": {"pieces": 1, "forever": true}}))
        .await;
    let id = run["id"].as_str().unwrap().to_string();
    let (_, first) = s.get(&format!("/stream/{id}")).await;
    assert_eq!(first["stream"], json!([{"output": "p0"}]));
    let (code, cancelled) = s.post(&format!("/cancel/{id}"), json!({})).await;
    assert_eq!(code, 200);
    assert_eq!(cancelled["status"], "CANCELLED");
    assert_eq!(
        s.get(&format!("/status/{id}")).await.1["status"],
        "CANCELLED"
    );
}

#[tokio::test]
async fn jobs_beyond_max_concurrency_wait_in_queue() {
    let s = start(&[("MAX_CONCURRENCY", "1")]).await;
    let (_, first) = s
        .post("/run", json!({"input": {"pieces": 2, "delay_ms": 150}}))
        .await;
    let (_, second) = s.post("/run", json!({"input": {"pieces": 1}})).await;
    assert_eq!(first["status"], "IN_PROGRESS");
    assert_eq!(second["status"], "IN_QUEUE");
    let (_, health) = s.get("/health").await;
    assert_eq!(health["jobs"]["inQueue"], 1);
    assert_eq!(health["jobs"]["inProgress"], 1);
    assert_eq!(health["workers"]["running"], 1);
    let id = second["id"].as_str().unwrap();
    assert_eq!(
        s.wait_status(id, "COMPLETED").await["output"],
        json!(["p0"])
    );
    let (_, health) = s.get("/health").await;
    assert_eq!(health["jobs"]["completed"], 2);
}

#[tokio::test]
async fn bad_requests_and_unknown_jobs() {
    let s = start(&[]).await;
    let (code, body) = s
        .post("/runsync", json!({"prompt": "no input wrapper"}))
        .await;
    assert_eq!(code, 400);
    assert!(body["error"].as_str().unwrap().contains("input"));
    let r = s
        .http
        .post(format!("{}/run", s.base))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(s.get("/status/nope").await.0, 404);
    assert_eq!(s.get("/stream/nope").await.0, 404);
    assert_eq!(s.post("/cancel/nope", json!({})).await.0, 404);
    assert_eq!(s.get("/no/such/route").await.0, 404);
}

#[tokio::test]
async fn api_key_is_required_when_set() {
    let s = start(&[("API_KEY", "sekrit")]).await;
    let (code, body) = s.post("/runsync", json!({"input": {"pieces": 1}})).await;
    assert_eq!(code, 401);
    assert_eq!(body["error"]["type"], "AuthenticationError");
    let wrong = s
        .http
        .post(format!("{}/runsync", s.base))
        .bearer_auth("guess")
        .json(&json!({"input": {"pieces": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let right = s
        .http
        .post(format!("{}/runsync", s.base))
        .bearer_auth("sekrit")
        .json(&json!({"input": {"pieces": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(right.status().as_u16(), 200);
    assert_eq!(s.get("/metrics").await.0, 401);
    assert_eq!(
        s.get("/health").await.0,
        200,
        "health stays open for probes"
    );
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_outcome() {
    let s = start(&[]).await;
    s.post("/runsync", json!({"input": {"pieces": 1}})).await;
    s.post("/runsync", json!({"input": {"pieces": 1}})).await;
    s.post("/runsync", json!({"input": {"fail": "x", "pieces": 0}}))
        .await;
    let text = s
        .http
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("worker_candle_requests_total{route=\"/runsync\",outcome=\"completed\"} 2"),
        "{text}"
    );
    assert!(text.contains("worker_candle_requests_total{route=\"/runsync\",outcome=\"failed\"} 1"));
    assert!(text.contains("worker_candle_request_duration_seconds_count 3"));
    assert!(text.contains("worker_candle_queue_depth 0"));
}

#[tokio::test]
async fn execution_timeout_policy_and_runsync_wait() {
    let s = start(&[]).await;
    let (_, timed_out) = s
        .post(
            "/runsync",
            json!({"input": {"pieces": 1, "forever": true}, "policy": {"executionTimeout": 100}}),
        )
        .await;
    assert_eq!(timed_out["status"], "TIMED_OUT", "{timed_out}");

    let (_, pending) = s
        .post(
            "/runsync?wait=50",
            json!({"input": {"pieces": 3, "delay_ms": 100}}),
        )
        .await;
    assert_eq!(pending["status"], "IN_PROGRESS");
    let id = pending["id"].as_str().unwrap();
    let done = s.wait_status(id, "COMPLETED").await;
    assert!(done["executionTime"].as_u64().unwrap() >= 250, "{done}");
    assert!(done["delayTime"].as_u64().is_some());
}

#[tokio::test]
async fn a_webhook_receives_the_finished_job() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let hook = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(body);
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hook).await.unwrap() });

    let s = start(&[]).await;
    let (_, run) = s
        .post("/run", json!({"input": {"pieces": 2}, "webhook": url}))
        .await;
    let received = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(received["id"], run["id"]);
    assert_eq!(received["status"], "COMPLETED");
    assert_eq!(received["output"], json!(["p0", "p1"]));
}

#[tokio::test]
async fn openai_routes_run_as_jobs_and_a_hang_up_cancels() {
    let s = start(&[]).await;
    let (code, object) = s
        .post("/openai/v1/chat/completions", json!({"pieces": 1}))
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        object,
        json!("p0"),
        "the job's single piece is the response object"
    );

    let (code, error) = s
        .post(
            "/v1/completions",
            json!({"pieces": 0, "fail": "bad temperature"}),
        )
        .await;
    assert_eq!(code, 400);
    assert_eq!(error["error"]["message"], "bad temperature");

    let mut response = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&json!({"stream": true, "pieces": 1, "forever": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    // A piece is relayed as it is posted, as SSE events (a string piece is SSE text already).
    let first = response.chunk().await.unwrap().unwrap();
    assert_eq!(&first[..], b"data: p0\n\n");
    drop(response);
    // OpenAI requests keep no record once answered: the cancellation shows in the metrics.
    for _ in 0..500 {
        let metrics = s
            .http
            .get(format!("{}/metrics", s.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let (_, health) = s.get("/health").await;
        if metrics.contains("outcome=\"cancelled\"") && health["jobs"]["inProgress"] == 0 {
            assert_eq!(health["jobs"]["failed"], 0, "no record of OpenAI requests");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the abandoned stream was not cancelled");
}
