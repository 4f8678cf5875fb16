//! `serve`'s bounds through the real binary on the llama fixture: oversized bodies and prompts are
//! refused before they cost memory, a burst of large responses leaves no memory behind, streamed
//! bad requests get their 4xx before the first byte, and errors keep their route's shape.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::process::{fixture, Running};

struct Serve {
    worker: Running,
    base: String,
    http: reqwest::Client,
}

fn serve(extra: &[(&str, &str)]) -> Serve {
    let mut envs = vec![(
        "MODEL_NAME".to_string(),
        fixture("llama").display().to_string(),
    )];
    envs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut worker = Running::start(&envs, &["serve", "--port", "0"]);
    let base = worker.wait_listening(Duration::from_secs(120));
    Serve {
        worker,
        base,
        http: reqwest::Client::new(),
    }
}

/// A line of `/proc/<pid>/status` in bytes (`VmRSS`: now, `VmHWM`: the peak).
fn memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field}"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("a number of kB");
    kib * 1024
}

const MIB: u64 = 1 << 20;

impl Serve {
    fn pid(&self) -> u32 {
        self.worker.child.id()
    }

    async fn send(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{path} answered {status} with non-JSON: {text:.300}"));
        (status, value)
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(path, body.to_string()).await
    }

    /// Status, content type and body text.
    async fn post_raw(&self, path: &str, body: &Value) -> (u16, String, String) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let kind = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        (status, kind, r.text().await.unwrap())
    }
}

/// An OpenAI error body: `{"error": {message, type, param, code}}` with `param` and `code` each a
/// string or null.
fn assert_openai_error(body: &Value) {
    let error = &body["error"];
    let object = error.as_object().unwrap_or_else(|| panic!("{body}"));
    for key in ["message", "type", "param", "code"] {
        assert!(object.contains_key(key), "no {key}: {body}");
    }
    assert!(
        error["message"].is_string() && error["type"].is_string(),
        "{body}"
    );
    assert!(
        error["param"].is_string() || error["param"].is_null(),
        "{body}"
    );
    assert!(
        error["code"].is_string() || error["code"].is_null(),
        "{body}"
    );
}

#[tokio::test]
async fn oversized_bodies_and_prompts_are_refused_within_a_memory_bound() {
    let s = serve(&[]);
    let baseline = memory(s.pid(), "VmRSS:");
    // 50 MB of prompt in a chat body: 413 in each route's shape, before it is read whole.
    let huge = format!(
        r#"{{"messages": [{{"role": "user", "content": "{}"}}]}}"#,
        "hello world ".repeat(50_000_000 / 12)
    );
    for path in ["/v1/chat/completions", "/openai/v1/chat/completions"] {
        let (status, body) = s.send(path, huge.clone()).await;
        assert_eq!(status, 413, "{path}: {body}");
        assert_openai_error(&body);
        assert_eq!(body["error"]["code"], "request_too_large");
    }
    let huge_run = format!(r#"{{"input": {{"prompt": "{}"}}}}"#, "a".repeat(50_000_000));
    for path in ["/run", "/runsync"] {
        let (status, body) = s.send(path, huge_run.clone()).await;
        assert_eq!(status, 413, "{path}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("MAX_REQUEST_BODY_BYTES"),
            "{body}"
        );
    }
    // 8 MB of prompt within the body limit: refused as too long without tokenizing it whole.
    let long = "The future of AI is bright. ".repeat(8_000_000 / 28);
    let (status, body) = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": long}], "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    let (status, body) = s
        .post("/v1/completions", &json!({"prompt": long, "max_tokens": 2}))
        .await;
    assert_eq!(status, 400, "{body}");
    // The bound: the body limit's worth of buffers over the baseline, never the GBs of a whole
    // tokenization (11.6 GB for a 50 MB body before).
    let peak = memory(s.pid(), "VmHWM:");
    eprintln!(
        "RSS baseline {} MiB, peak {} MiB",
        baseline / MIB,
        peak / MIB
    );
    assert!(
        peak < baseline + 400 * MIB,
        "peak RSS {} MiB over a baseline of {} MiB",
        peak / MIB,
        baseline / MIB
    );
    // Still serving.
    let (status, body) = s
        .post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 2}))
        .await;
    assert_eq!(status, 200, "{body}");
}

/// RSS, once it has settled at most `margin` above `target` (the allocator trims a second after the
/// last request), else the last sample after a generous wait.
async fn settled_rss(pid: u32, target: u64, margin: u64) -> u64 {
    // The trim comes a second after the last request.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rss = memory(pid, "VmRSS:");
        if rss <= target + margin || Instant::now() > deadline {
            return rss;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn a_burst_of_large_responses_returns_rss_to_its_baseline() {
    let s = serve(&[("MAX_CONCURRENCY", "8")]);
    // About 600 KB of JSON each: 8 choices of 400 tokens with 5 logprobs.
    let large = json!({"prompt": "The future of AI is", "n": 8, "max_tokens": 400,
        "logprobs": 5, "temperature": 1.0, "ignore_eos": true});
    let round = |count: usize| {
        let s = &s;
        let large = &large;
        async move {
            let requests = (0..count).map(|_| s.post("/v1/completions", large));
            for (status, body) in futures::future::join_all(requests).await {
                assert_eq!(status, 200, "{body}");
                assert_eq!(body["choices"].as_array().unwrap().len(), 8);
            }
        }
    };
    // Warm-up (allocator arenas, the engine's buffers), then the baseline.
    round(8).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline = memory(s.pid(), "VmRSS:");
    for _ in 0..3 {
        round(8).await;
    }
    let peak = memory(s.pid(), "VmHWM:");
    let after = settled_rss(s.pid(), baseline, 64 * MIB).await;
    eprintln!(
        "RSS baseline {} MiB, peak {} MiB, after the burst {} MiB",
        baseline / MIB,
        peak / MIB,
        after / MIB
    );
    assert!(
        after <= baseline + 64 * MIB,
        "RSS {} MiB after 24 large responses, baseline {} MiB",
        after / MIB,
        baseline / MIB
    );
    // OpenAI requests leave no record.
    let r = s
        .http
        .get(format!("{}/health", s.base))
        .send()
        .await
        .unwrap();
    let health: Value = r.json().await.unwrap();
    assert_eq!(health["jobs"]["completed"], 0, "{health}");
}

#[tokio::test]
async fn streamed_bad_requests_get_the_status_and_body_of_unstreamed_ones() {
    let s = serve(&[("MAX_REQUEST_OUTPUT_TOKENS", "10000")]);
    let long = "The future of AI is bright. ".repeat(200);
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        ("/chat/completions", body)
    };
    let completion = |extra: Value| {
        let mut body = json!({"prompt": "hi", "max_tokens": 3});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        ("/completions", body)
    };
    let cases = [
        completion(json!({"n": 1000})),
        completion(json!({"max_tokens": -1})),
        completion(json!({"prompt": long})),
        completion(json!({"model": "no-such-model"})),
        completion(json!({"n": 64, "max_tokens": 500, "logprobs": 5})),
        chat(json!({"n": 1000})),
        chat(json!({"max_tokens": -1})),
        chat(json!({"messages": [{"role": "user", "content": long}]})),
        chat(json!({"model": "no-such-model"})),
    ];
    for prefix in ["/v1", "/openai/v1"] {
        for (route, body) in &cases {
            let path = format!("{prefix}{route}");
            let (status, plain) = s.post(&path, body).await;
            let shown = plain.to_string();
            assert!(
                (400..500).contains(&status),
                "{path} {body}: {status} {shown:.300}"
            );
            assert_openai_error(&plain);
            let mut streamed_body = body.clone();
            streamed_body["stream"] = json!(true);
            let (streamed_status, kind, text) = s.post_raw(&path, &streamed_body).await;
            assert_eq!(
                streamed_status, status,
                "{path} {streamed_body}: {text:.300}"
            );
            assert!(kind.starts_with("application/json"), "{kind}: {text:.300}");
            let streamed: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(streamed, plain, "{path} {body}");
        }
    }
    // A good stream still streams.
    let (status, kind, text) = s
        .post_raw(
            "/v1/completions",
            &json!({"prompt": "hi", "max_tokens": 3, "stream": true}),
        )
        .await;
    assert_eq!(status, 200);
    assert!(kind.starts_with("text/event-stream"), "{kind}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
}

#[tokio::test]
async fn errors_keep_their_routes_shape_and_auth_takes_any_scheme_case() {
    let s = serve(&[
        ("API_KEY", "sesame"),
        ("MAX_REQUEST_BODY_BYTES", "64KiB"),
        ("MAX_REQUEST_OUTPUT_TOKENS", "1000"),
    ]);
    let post = |path: &str, auth: &str, body: String| {
        s.http
            .post(format!("{}{path}", s.base))
            .header("authorization", auth.to_string())
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let small = json!({"prompt": "hi", "max_tokens": 2}).to_string();
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let r = post(
            "/v1/completions",
            &format!("{scheme} sesame"),
            small.clone(),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }
    let r = post("/v1/completions", "Bearer wrong", small.clone())
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_openai_error(&body);
    assert_eq!(body["error"]["code"], "invalid_api_key");
    // A configured body limit, in each route's shape.
    let big = json!({"prompt": "a".repeat(100_000)}).to_string();
    let r = post("/v1/completions", "Bearer sesame", big.clone())
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_openai_error(&r.json().await.unwrap());
    let big_run = json!({"input": {"prompt": "a".repeat(100_000)}}).to_string();
    let r = post("/run", "bearer sesame", big_run).await.unwrap();
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");
    // The output one request may pin: n × max_tokens × (1 + logprobs).
    let pinned = json!({"prompt": "hi", "n": 4, "max_tokens": 100, "logprobs": 5}).to_string();
    let r = post("/v1/completions", "Bearer sesame", pinned)
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_openai_error(&body);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MAX_REQUEST_OUTPUT_TOKENS"),
        "{body}"
    );
    let pinned_run =
        json!({"input": {"prompt": "hi", "sampling_params": {"n": 4, "max_tokens": 500}}})
            .to_string();
    let r = post("/runsync", "Bearer sesame", pinned_run).await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    // A bad query answers JSON.
    let r = post(
        "/runsync?wait=abc",
        "Bearer sesame",
        json!({"input": {"prompt": "hi"}}).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("wait"), "{body}");
    // `param` is there (null) where no parameter is at fault.
    let r = post("/v1/completions", "Bearer sesame", "{not json".into())
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_openai_error(&body);
    assert_eq!(body["error"]["param"], Value::Null);
}

#[tokio::test]
async fn finished_records_are_bounded_by_size_and_age() {
    let s = serve(&[("FINISHED_JOBS_MAX_BYTES", "1")]);
    let (status, body) = s
        .post(
            "/runsync",
            &json!({"input": {"prompt": "hi", "sampling_params": {"max_tokens": 2}}}),
        )
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("COMPLETED")),
        "{body}"
    );
    let id = body["id"].as_str().unwrap();
    let r = s
        .http
        .get(format!("{}/status/{id}", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        404,
        "a record over FINISHED_JOBS_MAX_BYTES is not kept"
    );

    let s = serve(&[("FINISHED_JOBS_MAX_AGE", "1")]);
    let (_, body) = s
        .post(
            "/runsync",
            &json!({"input": {"prompt": "hi", "sampling_params": {"max_tokens": 2}}}),
        )
        .await;
    let id = body["id"].as_str().unwrap().to_string();
    let url = format!("{}/status/{id}", s.base);
    assert_eq!(s.http.get(&url).send().await.unwrap().status(), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = s.http.get(&url).send().await.unwrap().status();
        if status == 404 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the record outlived FINISHED_JOBS_MAX_AGE"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads what the server sends until it closes the connection (or `limit` passes: then `None`).
fn read_until_closed(stream: &mut std::net::TcpStream, limit: Duration) -> Option<String> {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&received).into_owned()),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(String::from_utf8_lossy(&received).into_owned());
            }
            Err(_) => return None,
        }
    }
}

#[test]
fn half_open_connections_are_dropped() {
    let s = serve(&[
        ("HTTP_HEADER_READ_TIMEOUT", "1"),
        ("HTTP_BODY_READ_TIMEOUT", "1"),
    ]);
    let address = s.base.trim_start_matches("http://").to_string();
    // Half a request head, then nothing: the connection is closed.
    let mut head = std::net::TcpStream::connect(&address).unwrap();
    head.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    assert!(
        read_until_closed(&mut head, Duration::from_secs(60)).is_some(),
        "a connection without a complete head stays open"
    );
    // A head announcing 1000 bytes, then 10: a 408 in the route's shape, and the connection closes.
    let mut body = std::net::TcpStream::connect(&address).unwrap();
    body.write_all(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"prompt\":",
    )
    .unwrap();
    let answer = read_until_closed(&mut body, Duration::from_secs(60))
        .expect("a connection with a stalled body stays open");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("HTTP_BODY_READ_TIMEOUT"), "{answer}");
}

#[test]
fn a_model_load_error_is_printed_once() {
    let envs = vec![("MODEL_NAME".to_string(), "/no/such/model-dir".to_string())];
    let out =
        crate::common::process::run(&envs, &["serve", "--port", "0"], Duration::from_secs(60));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines = stderr
        .lines()
        .filter(|l| l.contains("/no/such/model-dir") && l.contains("does not exist"))
        .count();
    assert_eq!(lines, 1, "{stderr}");
}

#[tokio::test]
async fn the_openai_routes_honour_the_configured_logprobs_cap() {
    let chat = |k: u64| {
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "logprobs": true, "top_logprobs": k})
    };
    let completion = |k: u64| json!({"prompt": "hi", "max_tokens": 2, "logprobs": k});
    let refused = |body: &Value, param: &str| {
        assert_openai_error(body);
        assert_eq!(body["error"]["param"], param, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(param), "{message}");
    };
    // MAX_LOGPROBS=30: 25 alternatives are served on both routes, 31 are refused.
    let s = serve(&[("MAX_LOGPROBS", "30")]);
    let (status, body) = s.post("/v1/chat/completions", &chat(25)).await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert!(!content.is_empty());
    for item in content {
        assert_eq!(item["top_logprobs"].as_array().unwrap().len(), 25, "{item}");
    }
    let (status, body) = s.post("/v1/completions", &completion(25)).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["choices"][0]["logprobs"]["top_logprobs"].is_array(),
        "{body}"
    );
    let (status, body) = s.post("/v1/chat/completions", &chat(31)).await;
    assert_eq!(status, 400, "{body}");
    refused(&body, "top_logprobs");
    let (status, body) = s.post("/openai/v1/completions", &completion(31)).await;
    assert_eq!(status, 400, "{body}");
    refused(&body, "logprobs");
    drop(s);
    // The default is vLLM's: 20.
    let s = serve(&[]);
    let (status, body) = s.post("/v1/chat/completions", &chat(20)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = s.post("/v1/chat/completions", &chat(21)).await;
    assert_eq!(status, 400, "{body}");
    refused(&body, "top_logprobs");
    let (status, body) = s.post("/v1/completions", &completion(21)).await;
    assert_eq!(status, 400, "{body}");
    refused(&body, "logprobs");
}

#[tokio::test]
async fn refusals_before_the_job_answer_in_anthropics_shape_on_messages() {
    let s = serve(&[("MAX_REQUEST_BODY_BYTES", "64KiB")]);
    let send = |path: &str, media: &str, body: String| {
        s.http
            .post(format!("{}{path}", s.base))
            .header("content-type", media.to_string())
            .body(body)
            .send()
    };
    let message = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let big =
        json!({"messages": [{"role": "user", "content": "a".repeat(100_000)}], "max_tokens": 2});
    let cases = [
        (
            "text/plain",
            message.to_string(),
            415,
            "invalid_request_error",
        ),
        (
            "application/x-www-form-urlencoded",
            message.to_string(),
            415,
            "invalid_request_error",
        ),
        (
            "application/json",
            "{not json".to_string(),
            400,
            "invalid_request_error",
        ),
        (
            "application/json",
            big.to_string(),
            413,
            "request_too_large",
        ),
    ];
    for prefix in ["/v1", "/openai/v1"] {
        for (media, body, status, kind) in &cases {
            let path = format!("{prefix}/messages");
            let r = send(&path, media, body.clone()).await.unwrap();
            assert_eq!(r.status(), *status, "{path} {media}");
            let answer: Value = r.json().await.unwrap();
            assert_eq!(answer["type"], "error", "{path} {media}: {answer}");
            assert_eq!(answer["error"]["type"], *kind, "{path} {media}: {answer}");
            assert!(answer["error"]["message"].is_string(), "{answer}");
        }
    }
    // The OpenAI routes keep OpenAI's shape.
    let r = send("/v1/chat/completions", "text/plain", message.to_string())
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert_openai_error(&r.json().await.unwrap());
}
