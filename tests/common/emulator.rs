//! A RunPod queue emulator speaking the protocol over real HTTP: job-take and
//! job-take-batch, job-stream, job-done, ping and job-stop. It records every call and can inject
//! faults (an error status, a slow answer, a dropped connection, a call never answered) into the
//! next calls of an endpoint.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Take,
    Stream,
    Done,
    Ping,
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status without processing the call.
    Status(u16),
    /// Wait, then process the call normally.
    Delay(Duration),
    /// Close the connection without an answer and without processing the call.
    Drop,
    /// Never answer and never process the call (a hung queue): the connection stays open.
    Stall,
}

/// One call as the emulator saw it.
#[derive(Debug, Clone)]
pub struct Call {
    pub endpoint: Endpoint,
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub authorization: Option<String>,
    pub request_id: Option<String>,
    pub content_type: Option<String>,
    pub body: String,
    pub fault: Option<Fault>,
    /// When the call arrived.
    pub at: std::time::Instant,
}

impl Call {
    pub fn query(&self, key: &str) -> Option<String> {
        let query = self.uri.split_once('?')?.1;
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == key).then(|| v.replace("%2C", ","))
        })
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Default)]
struct State {
    queue: VecDeque<Value>,
    calls: Vec<Call>,
    /// Accepted job-stream bodies by job id.
    streams: HashMap<String, Vec<Value>>,
    /// Accepted job-done bodies by job id, with `isStream`.
    done: HashMap<String, Vec<(Value, String)>>,
    stops: Vec<String>,
    faults: HashMap<Endpoint, VecDeque<Fault>>,
}

pub struct Emulator {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Emulator {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state: Arc<Mutex<State>> = Arc::default();
        let changed = Arc::new(Notify::new());
        let (s, c) = (state.clone(), changed.clone());
        let server = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (s, c) = (s.clone(), c.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (s, c) = (s.clone(), c.clone());
                        async move { handle(req, s, c).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            state,
            changed,
            server,
        }
    }

    /// The platform's variables pointing at this emulator.
    pub fn env(&self) -> Vec<(String, String)> {
        let base = format!("http://{}/v2", self.addr);
        vec![
            (
                "RUNPOD_WEBHOOK_GET_JOB".into(),
                format!("{base}/job-take/$ID?gpu=TEST"),
            ),
            (
                "RUNPOD_WEBHOOK_POST_OUTPUT".into(),
                format!("{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=TEST"),
            ),
            (
                "RUNPOD_WEBHOOK_POST_STREAM".into(),
                format!("{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=TEST"),
            ),
            (
                "RUNPOD_WEBHOOK_PING".into(),
                format!("{base}/ping/$RUNPOD_POD_ID?gpu=TEST"),
            ),
            ("RUNPOD_AI_API_KEY".into(), "test-key".into()),
            ("RUNPOD_POD_ID".into(), "pod-1".into()),
        ]
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    pub fn push_job(&self, id: &str, input: Value) {
        self.lock()
            .queue
            .push_back(json!({"id": id, "input": input}));
        self.changed.notify_waiters();
    }

    pub fn push_raw_job(&self, job: Value) {
        self.lock().queue.push_back(job);
        self.changed.notify_waiters();
    }

    pub fn stop_job(&self, id: &str) {
        self.lock().stops.push(id.to_string());
        self.changed.notify_waiters();
    }

    pub fn fault(&self, endpoint: Endpoint, fault: Fault) {
        self.lock()
            .faults
            .entry(endpoint)
            .or_default()
            .push_back(fault);
    }

    /// The same fault for the next `n` calls of an endpoint.
    pub fn faults(&self, endpoint: Endpoint, fault: Fault, n: usize) {
        for _ in 0..n {
            self.fault(endpoint, fault);
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    pub fn calls_to(&self, endpoint: Endpoint) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.endpoint == endpoint)
            .collect()
    }

    /// Accepted job-stream bodies of a job, in order.
    pub fn streamed(&self, id: &str) -> Vec<Value> {
        self.lock().streams.get(id).cloned().unwrap_or_default()
    }

    /// Accepted job-done bodies of a job (exactly one for a job answered once).
    pub fn results(&self, id: &str) -> Vec<(Value, String)> {
        self.lock().done.get(id).cloned().unwrap_or_default()
    }

    pub fn answered(&self) -> usize {
        self.lock().done.len()
    }

    /// Waits until `n` jobs have a result, or panics after `timeout`.
    pub async fn wait_answered(&self, n: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            if self.answered() >= n {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!(
                    "only {} of {n} jobs answered within {timeout:?}; calls: {:#?}",
                    self.answered(),
                    self.calls()
                );
            }
        }
    }

    /// The single result of a job: its body (asserting it was posted exactly once).
    pub fn result(&self, id: &str) -> Value {
        let results = self.results(id);
        assert_eq!(
            results.len(),
            1,
            "job {id} must be answered exactly once: {results:?}"
        );
        results[0].0.clone()
    }
}

fn endpoint_of(path: &str) -> Option<Endpoint> {
    let segment = path.trim_start_matches("/v2/").split('/').next()?;
    Some(match segment {
        "job-take" | "job-take-batch" => Endpoint::Take,
        "job-stream" => Endpoint::Stream,
        "job-done" => Endpoint::Done,
        "ping" => Endpoint::Ping,
        "job-stop" => Endpoint::Stop,
        _ => return None,
    })
}

fn respond(status: u16, body: Option<Value>) -> Response<Full<Bytes>> {
    let mut builder = Response::builder().status(status);
    let bytes = match body {
        Some(b) => {
            builder = builder.header("content-type", "application/json");
            Bytes::from(b.to_string())
        }
        None => Bytes::new(),
    };
    builder.body(Full::new(bytes)).unwrap()
}

/// Errors close the connection without an answer (hyper drops it): the `Drop` fault.
#[derive(Debug)]
struct Dropped;
impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dropped by fault injection")
    }
}
impl std::error::Error for Dropped {}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
) -> Result<Response<Full<Bytes>>, Dropped> {
    let uri = req.uri().to_string();
    let path = req.uri().path().to_string();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (authorization, request_id, content_type) = (
        header("authorization"),
        header("x-request-id"),
        header("content-type"),
    );
    let method = req.method().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    let Some(endpoint) = endpoint_of(&path) else {
        return Ok(respond(404, None));
    };
    let fault = state
        .lock()
        .unwrap()
        .faults
        .get_mut(&endpoint)
        .and_then(VecDeque::pop_front);
    state.lock().unwrap().calls.push(Call {
        endpoint,
        method,
        uri: uri.clone(),
        authorization,
        request_id,
        content_type,
        body: body.clone(),
        fault,
        at: std::time::Instant::now(),
    });
    changed.notify_waiters();
    match fault {
        Some(Fault::Status(code)) => return Ok(respond(code, None)),
        Some(Fault::Drop) => return Err(Dropped),
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::Stall) => std::future::pending::<()>().await,
        None => {}
    }
    let segments: Vec<&str> = path.trim_start_matches("/v2/").split('/').collect();
    let query = |key: &str| {
        uri.split_once('?').and_then(|(_, q)| {
            q.split('&').find_map(|p| {
                let (k, v) = p.split_once('=')?;
                (k == key).then(|| v.to_string())
            })
        })
    };
    let response = match endpoint {
        Endpoint::Take => {
            let batch = segments.first() == Some(&"job-take-batch");
            let wanted: usize = if batch {
                query("batch_size")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(1)
            } else {
                1
            };
            let jobs = take_jobs(&state, &changed, wanted).await;
            match (jobs.is_empty(), batch) {
                (true, _) => respond(204, None),
                (false, true) => respond(200, Some(Value::Array(jobs))),
                (false, false) => respond(200, jobs.into_iter().next()),
            }
        }
        Endpoint::Stream | Endpoint::Done => {
            let job_id = segments.get(2).copied().unwrap_or_default().to_string();
            let value: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let mut s = state.lock().unwrap();
            if endpoint == Endpoint::Stream {
                s.streams.entry(job_id).or_default().push(value);
            } else {
                let is_stream = query("isStream").unwrap_or_default();
                s.done.entry(job_id).or_default().push((value, is_stream));
            }
            drop(s);
            changed.notify_waiters();
            respond(200, None)
        }
        Endpoint::Ping => respond(200, None),
        Endpoint::Stop => {
            let ids = wait_stops(&state, &changed).await;
            if ids.is_empty() {
                respond(204, None)
            } else {
                respond(200, Some(json!({ "jobsToStop": ids })))
            }
        }
    };
    Ok(response)
}

/// A short long-poll: up to 200 ms for a job.
async fn take_jobs(state: &Mutex<State>, changed: &Notify, wanted: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
    loop {
        let notified = changed.notified();
        {
            let mut s = state.lock().unwrap();
            if !s.queue.is_empty() {
                let n = wanted.min(s.queue.len());
                return s.queue.drain(..n).collect();
            }
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Vec::new();
        }
    }
}

async fn wait_stops(state: &Mutex<State>, changed: &Notify) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
    loop {
        let notified = changed.notified();
        {
            let mut s = state.lock().unwrap();
            if !s.stops.is_empty() {
                return std::mem::take(&mut s.stops);
            }
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Vec::new();
        }
    }
}
