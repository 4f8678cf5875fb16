//! `serve`: a local HTTP endpoint that behaves like a RunPod endpoint from the client's side
//! (`/run`, `/runsync`, `/stream/{id}`, `/status/{id}`, `/cancel/{id}`, `/health`), plus the
//! OpenAI routes under `/openai/v1` and `/v1` (run as OpenAI jobs, as the platform does) and
//! Prometheus `/metrics`.
//!
//! What one client can make it hold is bounded before work is done ([`ServeLimits`]): the body it
//! reads (413), the output a request may ask for (400), the time a connection may take to send its
//! head and body, and the finished `/run` records it keeps (by count, total size and age; OpenAI
//! requests leave no record).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use super::job::{run_job, Job, JobHandler, JobResult, Outcome, ResultSink, StopReason};
use super::metrics::Metrics;
use super::routing;
use crate::api::anthropic::MESSAGES_ROUTE;
use crate::api::error::{ApiError, ErrorKind};
use crate::api::openai::{normalize_route, sse};
use crate::config::{Secret, ServeLimits};

/// Finished jobs kept for `/status` and `/stream` before the oldest are forgotten (also bounded by
/// `FINISHED_JOBS_MAX_BYTES` and `FINISHED_JOBS_MAX_AGE`).
const KEPT_FINISHED: usize = 10_000;
/// How long `/stream/{id}` waits for new output before answering with none.
const STREAM_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    InQueue,
    InProgress,
    Completed,
    Failed,
    Cancelled,
    TimedOut,
}

impl Status {
    fn as_str(&self) -> &'static str {
        match self {
            Self::InQueue => "IN_QUEUE",
            Self::InProgress => "IN_PROGRESS",
            Self::Completed => "COMPLETED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
            Self::TimedOut => "TIMED_OUT",
        }
    }

    fn is_final(&self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Cancelled | Self::TimedOut
        )
    }
}

#[derive(Debug)]
struct JobState {
    status: Status,
    /// Every streamed piece; `/stream` hands out those after `stream_cursor`.
    stream: Vec<Value>,
    stream_cursor: usize,
    result: Option<JobResult>,
    submitted: Instant,
    started: Option<Instant>,
    finished: Option<Instant>,
}

struct LocalJob {
    id: String,
    state: Mutex<JobState>,
    changed: Notify,
    stop: watch::Sender<Option<StopReason>>,
}

impl JobState {
    /// Every piece so far: while running, those streamed; once completed, the result's (the same
    /// pieces, moved there rather than kept twice).
    fn pieces(&self) -> &[Value] {
        match &self.result {
            Some(JobResult::Output(pieces)) => pieces,
            _ => &self.stream,
        }
    }
}

impl LocalJob {
    fn lock(&self) -> std::sync::MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Collects one job's pieces and result in its record.
struct LocalSink(Arc<LocalJob>);

impl ResultSink for LocalSink {
    async fn piece(&self, _job_id: &str, piece: &Value) {
        self.0.lock().stream.push(piece.clone());
        self.0.changed.notify_waiters();
    }

    async fn done(&self, _job_id: &str, result: &JobResult) {
        {
            let mut state = self.0.lock();
            state.status = match result.outcome() {
                Outcome::Completed => Status::Completed,
                Outcome::Cancelled => Status::Cancelled,
                Outcome::TimedOut => Status::TimedOut,
                Outcome::Failed => Status::Failed,
            };
            state.result = Some(match result {
                // The pieces are those streamed: keep them once.
                JobResult::Output(pieces) if pieces.len() == state.stream.len() => {
                    JobResult::Output(std::mem::take(&mut state.stream))
                }
                other => other.clone(),
            });
            state.finished = Some(Instant::now());
        }
        self.0.changed.notify_waiters();
    }
}

/// A finished record kept for `/status` and `/stream`: its id, its size and when it finished.
struct Retired {
    id: String,
    bytes: usize,
    at: Instant,
}

/// The finished records, oldest first, and their total size.
#[derive(Default)]
struct Finished {
    records: VecDeque<Retired>,
    bytes: usize,
}

pub struct LocalEndpoint {
    handler: Arc<dyn JobHandler>,
    jobs: Mutex<HashMap<String, Arc<LocalJob>>>,
    finished: Mutex<Finished>,
    limits: ServeLimits,
    /// The model's context length: a request without `max_tokens` may produce up to this many.
    max_model_len: Option<usize>,
    /// Wakes the task that hands freed memory back to the system (see [`housekeeping`]).
    trim: Arc<Notify>,
    slots: Arc<Semaphore>,
    max_concurrency: usize,
    metrics: Arc<Metrics>,
    api_key: Option<Secret>,
    /// Posts finished jobs to their `webhook`.
    http: reqwest::Client,
}

impl LocalEndpoint {
    pub fn new(
        handler: Arc<dyn JobHandler>,
        max_concurrency: usize,
        metrics: Arc<Metrics>,
        api_key: Option<Secret>,
    ) -> Arc<Self> {
        Self::with_limits(
            handler,
            max_concurrency,
            metrics,
            api_key,
            ServeLimits::default(),
            None,
        )
    }

    /// An endpoint with the given bounds; `max_model_len` is the model's context length (what a
    /// request without `max_tokens` may produce). Call within the async runtime.
    pub fn with_limits(
        handler: Arc<dyn JobHandler>,
        max_concurrency: usize,
        metrics: Arc<Metrics>,
        api_key: Option<Secret>,
        limits: ServeLimits,
        max_model_len: Option<usize>,
    ) -> Arc<Self> {
        let max_concurrency = max_concurrency.max(1);
        let trim = Arc::new(Notify::new());
        let endpoint = Arc::new(Self {
            handler,
            jobs: Mutex::default(),
            finished: Mutex::default(),
            limits,
            max_model_len,
            trim,
            slots: Arc::new(Semaphore::new(max_concurrency)),
            max_concurrency,
            metrics,
            api_key,
            http: reqwest::Client::new(),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(housekeeping(Arc::downgrade(&endpoint)));
        }
        endpoint
    }

    pub fn router(self: &Arc<Self>) -> Router {
        let openai = Router::new()
            .route("/models", get(openai))
            .route("/models/{*model}", get(openai))
            .route("/chat/completions", post(openai))
            .route("/completions", post(openai))
            .route("/embeddings", post(openai))
            .route("/responses", post(openai))
            .route("/responses/{id}", get(openai).delete(openai))
            .route("/messages", post(openai))
            .route("/load_lora_adapter", post(openai))
            .route("/unload_lora_adapter", post(openai))
            .fallback(openai_no_route)
            .method_not_allowed_fallback(openai_wrong_method);
        Router::new()
            .route("/run", post(run))
            .route("/runsync", post(runsync))
            .route("/stream/{id}", get(stream))
            .route("/status/{id}", get(status).post(status))
            .route("/cancel/{id}", post(cancel))
            .route("/metrics", get(metrics))
            .nest("/openai/v1", openai.clone())
            .nest("/v1", openai)
            .layer(middleware::from_fn_with_state(self.clone(), authorize))
            .route("/health", get(health))
            .fallback(not_found)
            .with_state(self.clone())
            .layer(cors())
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LocalJob>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn find(&self, id: &str) -> Option<Arc<LocalJob>> {
        self.forget_expired();
        self.jobs().get(id).cloned()
    }

    fn update_load(&self) {
        let (queued, running) =
            self.jobs()
                .values()
                .fold((0, 0), |(q, r), j| match j.lock().status {
                    Status::InQueue => (q + 1, r),
                    Status::InProgress => (q, r + 1),
                    _ => (q, r),
                });
        self.metrics.set_load(queued, running);
    }

    /// Registers a job and starts it (as soon as a slot is free). A `kept` job's record stays for
    /// `/status` and `/stream` once finished; another's (an OpenAI request's, which no one can fetch)
    /// goes when it ends.
    fn submit(
        self: &Arc<Self>,
        input: Value,
        extra: Map<String, Value>,
        route: &str,
        kept: bool,
    ) -> Arc<LocalJob> {
        let id = new_job_id();
        let permit = self.slots.clone().try_acquire_owned().ok();
        let (stop, stop_rx) = watch::channel(None);
        let job = Arc::new(LocalJob {
            id: id.clone(),
            state: Mutex::new(JobState {
                status: if permit.is_some() {
                    Status::InProgress
                } else {
                    Status::InQueue
                },
                stream: Vec::new(),
                stream_cursor: 0,
                result: None,
                submitted: Instant::now(),
                started: permit.is_some().then(Instant::now),
                finished: None,
            }),
            changed: Notify::new(),
            stop,
        });
        self.jobs().insert(id.clone(), job.clone());
        self.update_load();
        let endpoint = self.clone();
        let record = job.clone();
        let route = route.to_string();
        tokio::spawn(async move {
            endpoint
                .execute(
                    record,
                    Job { id, input, extra },
                    permit,
                    stop_rx,
                    &route,
                    kept,
                )
                .await;
        });
        job
    }

    async fn execute(
        self: Arc<Self>,
        record: Arc<LocalJob>,
        job: Job,
        permit: Option<OwnedSemaphorePermit>,
        mut stop_rx: watch::Receiver<Option<StopReason>>,
        route: &str,
        kept: bool,
    ) {
        let started = Instant::now();
        let sink = LocalSink(record.clone());
        let permit = match permit {
            Some(p) => Some(p),
            None => tokio::select! {
                p = self.slots.clone().acquire_owned() => p.ok(),
                _ = stop_rx.wait_for(|s| s.is_some()) => None,
            },
        };
        let outcome = if permit.is_none() {
            // Cancelled while waiting for a slot.
            sink.done(&job.id, &JobResult::Error(ApiError::cancelled()))
                .await;
            Outcome::Cancelled
        } else {
            {
                let mut state = record.lock();
                state.status = Status::InProgress;
                state.started.get_or_insert_with(Instant::now);
            }
            self.update_load();
            run_job(&*self.handler, &job, &sink, stop_rx).await
        };
        drop(permit);
        self.metrics
            .record_request(route, outcome.as_str(), started.elapsed());
        if let Some(url) = job.extra.get("webhook").and_then(Value::as_str) {
            tokio::spawn(notify_webhook(
                self.http.clone(),
                url.to_string(),
                describe(&record, true),
            ));
        }
        if kept {
            self.retire(&record);
        } else {
            self.jobs().remove(&record.id);
        }
        self.update_load();
        // What the job held is freed once its HTTP answer is sent: hand it back to the system.
        self.trim.notify_one();
    }

    /// Keeps a finished record, forgetting the oldest past the count, size and age bounds.
    fn retire(&self, record: &LocalJob) {
        let bytes = record_bytes(&record.lock());
        let mut finished = self.finished();
        finished.bytes += bytes;
        finished.records.push_back(Retired {
            id: record.id.clone(),
            bytes,
            at: Instant::now(),
        });
        drop(finished);
        self.forget_expired();
    }

    /// Forgets finished records past `KEPT_FINISHED`, `FINISHED_JOBS_MAX_BYTES` (oldest first) or
    /// `FINISHED_JOBS_MAX_AGE`.
    fn forget_expired(&self) {
        let mut finished = self.finished();
        let mut forgotten = Vec::new();
        while let Some(oldest) = finished.records.front() {
            let over = finished.records.len() > KEPT_FINISHED
                || finished.bytes > self.limits.finished_max_bytes
                || oldest.at.elapsed() > self.limits.finished_max_age;
            if !over {
                break;
            }
            if let Some(old) = finished.records.pop_front() {
                finished.bytes -= old.bytes;
                forgotten.push(old.id);
            }
        }
        drop(finished);
        if !forgotten.is_empty() {
            let mut jobs = self.jobs();
            for id in &forgotten {
                jobs.remove(id);
            }
            drop(jobs);
            self.trim.notify_one();
        }
    }

    fn finished(&self) -> std::sync::MutexGuard<'_, Finished> {
        self.finished.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The body of `request`, read up to `MAX_REQUEST_BODY_BYTES` within `HTTP_BODY_READ_TIMEOUT`.
    /// A larger body is read to its end and dropped (so the client, still sending, gets the 413).
    async fn read_body(&self, body: Body) -> Result<Bytes, ApiError> {
        let limit = self.limits.max_body_bytes;
        let read = async {
            let mut chunks = body.into_data_stream();
            let mut data = Vec::new();
            let mut too_large = false;
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk
                    .map_err(|e| ApiError::bad_request(format!("cannot read the body: {e}")))?;
                if too_large || data.len() + chunk.len() > limit {
                    too_large = true;
                    data = Vec::new();
                    continue;
                }
                data.extend_from_slice(&chunk);
            }
            if too_large {
                return Err(ApiError::payload_too_large(limit));
            }
            Ok(Bytes::from(data))
        };
        let timeout = self.limits.body_read_timeout;
        tokio::time::timeout(timeout, read)
            .await
            .unwrap_or_else(|_| {
                Err(ApiError::new(
                    ErrorKind::TimedOut,
                    format!(
                        "the request body was not received within {} s (HTTP_BODY_READ_TIMEOUT)",
                        timeout.as_secs()
                    ),
                ))
            })
    }

    /// A 400 when a request may produce more than `MAX_REQUEST_OUTPUT_TOKENS` (see
    /// [`routing::check_output_size`], which queue jobs pass too).
    fn check_output_size(&self, request: &Value) -> Result<(), ApiError> {
        routing::check_output_size(request, self.limits.max_output_tokens, self.max_model_len)
    }

    fn counts(&self) -> Value {
        self.forget_expired();
        let mut counts: HashMap<&'static str, usize> = HashMap::new();
        for job in self.jobs().values() {
            *counts.entry(job.lock().status.as_str()).or_default() += 1;
        }
        let running = counts.get("IN_PROGRESS").copied().unwrap_or(0);
        json!({
            "jobs": {
                "completed": counts.get("COMPLETED").copied().unwrap_or(0),
                "failed": counts.get("FAILED").copied().unwrap_or(0) + counts.get("CANCELLED").copied().unwrap_or(0),
                "inProgress": running,
                "inQueue": counts.get("IN_QUEUE").copied().unwrap_or(0),
                "retried": 0,
            },
            "workers": {
                "idle": self.max_concurrency.saturating_sub(running),
                "running": running,
            }
        })
    }
}

/// RunPod's webhook: the finished job's status object, POSTed once (retried on failure).
async fn notify_webhook(http: reqwest::Client, url: String, body: Value) {
    for attempt in 1..=3u32 {
        match http
            .post(&url)
            .timeout(Duration::from_secs(10))
            .json(&body)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => tracing::warn!(url, attempt, "webhook answered {}", r.status()),
            Err(e) => tracing::warn!(url, attempt, "webhook failed: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
    }
}

/// The approximate size of a finished record: its pieces' and result's JSON.
fn record_bytes(state: &JobState) -> usize {
    let json_len = |v: &Value| serde_json::to_vec(v).map_or(0, |b| b.len());
    let pieces: usize = state.pieces().iter().map(json_len).sum();
    let error = match &state.result {
        Some(JobResult::Error(e)) => e.message().len(),
        _ => 0,
    };
    pieces + error + 256
}

/// While the endpoint lives: forgets finished records past their age even when no request comes,
/// and hands memory that freed responses leave in the allocator back to the system a second after
/// the last wake-up (so a burst trims once): glibc keeps freed heap below its trim threshold (256 MiB,
/// see `engine::loader`) and in every thread's arena, so RSS would otherwise stay at a burst's peak.
async fn housekeeping(endpoint: std::sync::Weak<LocalEndpoint>) {
    loop {
        let Some(strong) = endpoint.upgrade() else {
            return;
        };
        let wake = strong.trim.clone();
        let sweep = (strong.limits.finished_max_age / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        drop(strong);
        if tokio::time::timeout(sweep, wake.notified()).await.is_err() {
            if let Some(strong) = endpoint.upgrade() {
                strong.forget_expired();
            }
            continue;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free memory of the allocator's arenas to the system.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

fn new_job_id() -> String {
    format!("local-{:032x}", rand::random::<u128>())
}

/// The RunPod body `{"input": {...}, "policy": {...}, "webhook": "..."}`: the input and the rest.
fn job_input(body: &Bytes) -> Result<(Value, Map<String, Value>), String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not valid JSON: {e}"))?;
    let Value::Object(mut fields) = value else {
        return Err("the body must be {\"input\": {...}}".to_string());
    };
    match fields.remove("input") {
        Some(input) if !input.is_null() => Ok((input, fields)),
        _ => Err("the body must be {\"input\": {...}}".to_string()),
    }
}

fn error_response(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn describe(job: &LocalJob, with_output: bool) -> Value {
    let state = job.lock();
    let mut body = json!({"id": job.id, "status": state.status.as_str()});
    if let Some(started) = state.started {
        body["delayTime"] = json!(started.duration_since(state.submitted).as_millis() as u64);
        if let Some(finished) = state.finished {
            body["executionTime"] = json!(finished.duration_since(started).as_millis() as u64);
        }
    }
    match &state.result {
        Some(JobResult::Output(pieces)) if with_output => body["output"] = json!(pieces),
        Some(JobResult::Error(e)) => body["error"] = json!(e.runpod_text()),
        _ => {}
    }
    body
}

async fn authorize(
    State(endpoint): State<Arc<LocalEndpoint>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &endpoint.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            // Anthropic's clients send the key as `x-api-key`.
            .or_else(|| {
                let x_api_key = request.headers().get("x-api-key");
                x_api_key.and_then(|v| v.to_str().ok())
            });
        if given != Some(key.expose()) {
            let e = ApiError::unauthorized(
                "missing or wrong API key: send `Authorization: Bearer <API_KEY>` (or `x-api-key`)",
            );
            // Anthropic's route answers in its own shape.
            let messages = normalize_route(request.uri().path()) == MESSAGES_ROUTE;
            return openai_error(&if messages { e.in_anthropic_shape() } else { e });
        }
    }
    next.run(request).await
}

/// The token of an `Authorization: Bearer <token>` header; the scheme in any case (RFC 9110).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

/// A RunPod route's error: `{"error": "<message>"}` with the error's status.
fn runpod_error(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    error_response(status, e.message())
}

/// A RunPod route's job from its body: read within the limits, parsed, its output size checked.
async fn runpod_job_input(
    endpoint: &LocalEndpoint,
    request: Request,
) -> Result<(Value, Map<String, Value>), Response> {
    let body = endpoint
        .read_body(request.into_body())
        .await
        .map_err(|e| runpod_error(&e))?;
    let (input, extra) =
        job_input(&body).map_err(|message| error_response(StatusCode::BAD_REQUEST, &message))?;
    drop(body);
    endpoint
        .check_output_size(&input)
        .map_err(|e| runpod_error(&e))?;
    Ok((input, extra))
}

async fn run(State(endpoint): State<Arc<LocalEndpoint>>, request: Request) -> Response {
    let (input, extra) = match runpod_job_input(&endpoint, request).await {
        Ok(i) => i,
        Err(response) => return response,
    };
    let job = endpoint.submit(input, extra, "/run", true);
    Json(describe(&job, false)).into_response()
}

#[derive(Debug, serde::Deserialize)]
struct WaitQuery {
    /// Milliseconds `/runsync` waits before answering with the job's current status.
    wait: Option<u64>,
}

/// RunPod's `/runsync` waits up to 90 s by default before handing back an id to poll.
const RUNSYNC_WAIT: Duration = Duration::from_secs(90);

async fn runsync(
    State(endpoint): State<Arc<LocalEndpoint>>,
    query: Result<Query<WaitQuery>, QueryRejection>,
    request: Request,
) -> Response {
    let query = match query {
        Ok(Query(q)) => q,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("bad query: {} (`wait` is milliseconds)", e.body_text()),
            );
        }
    };
    let (input, extra) = match runpod_job_input(&endpoint, request).await {
        Ok(i) => i,
        Err(response) => return response,
    };
    let job = endpoint.submit(input, extra, "/runsync", true);
    let wait = query
        .wait
        .map(Duration::from_millis)
        .unwrap_or(RUNSYNC_WAIT);
    let _ = tokio::time::timeout(wait, wait_final(&job)).await;
    Json(describe(&job, true)).into_response()
}

async fn wait_final(job: &LocalJob) {
    loop {
        let changed = job.changed.notified();
        if job.lock().status.is_final() {
            return;
        }
        changed.await;
    }
}

async fn stream(State(endpoint): State<Arc<LocalEndpoint>>, Path(id): Path<String>) -> Response {
    let Some(job) = endpoint.find(&id) else {
        return error_response(StatusCode::NOT_FOUND, &format!("no job `{id}`"));
    };
    let deadline = tokio::time::Instant::now() + STREAM_WAIT;
    loop {
        let changed = job.changed.notified();
        {
            let mut state = job.lock();
            let available = state.pieces().len();
            if available > state.stream_cursor || state.status.is_final() {
                let new: Vec<Value> = state.pieces()[state.stream_cursor..]
                    .iter()
                    .map(|piece| json!({ "output": piece }))
                    .collect();
                state.stream_cursor = available;
                let mut body = json!({"id": id, "status": state.status.as_str(), "stream": new});
                if let Some(JobResult::Error(e)) = &state.result {
                    body["error"] = json!(e.runpod_text());
                }
                return Json(body).into_response();
            }
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            let status = job.lock().status.as_str();
            return Json(json!({"id": id, "status": status, "stream": []})).into_response();
        }
    }
}

async fn status(State(endpoint): State<Arc<LocalEndpoint>>, Path(id): Path<String>) -> Response {
    match endpoint.find(&id) {
        Some(job) => Json(describe(&job, true)).into_response(),
        None => error_response(StatusCode::NOT_FOUND, &format!("no job `{id}`")),
    }
}

async fn cancel(State(endpoint): State<Arc<LocalEndpoint>>, Path(id): Path<String>) -> Response {
    let Some(job) = endpoint.find(&id) else {
        return error_response(StatusCode::NOT_FOUND, &format!("no job `{id}`"));
    };
    if !job.lock().status.is_final() {
        let _ = job.stop.send(Some(StopReason::Cancelled));
        wait_final(&job).await;
    }
    Json(describe(&job, false)).into_response()
}

async fn health(State(endpoint): State<Arc<LocalEndpoint>>) -> Response {
    Json(endpoint.counts()).into_response()
}

async fn metrics(State(endpoint): State<Arc<LocalEndpoint>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        endpoint.metrics.render(),
    )
        .into_response()
}

async fn not_found(request: Request) -> Response {
    let path = request.uri().path();
    if path.starts_with("/v1") || path.starts_with("/openai") {
        return openai_no_route(request).await;
    }
    error_response(StatusCode::NOT_FOUND, "no such route")
}

/// CORS as vLLM's default: any origin and method, and the headers a preflight asks for (mirrored,
/// since a `*` does not cover `Authorization` in browsers), so a web page can call the endpoint.
fn cors() -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowHeaders, Any, CorsLayer};
    CorsLayer::new()
        .allow_origin(Any)
        .allow_methods(Any)
        .allow_headers(AllowHeaders::mirror_request())
}

/// An unknown route under `/v1` or `/openai/v1`: OpenAI's 404 error object.
async fn openai_no_route(request: Request) -> Response {
    // A nested router sees the path without its prefix; the original one names the route asked for.
    let path = match request.extensions().get::<axum::extract::OriginalUri>() {
        Some(original) => original.path().to_string(),
        None => request.uri().path().to_string(),
    };
    openai_error(&ApiError::not_found(format!(
        "no OpenAI route {} {path} (served: GET /v1/models, GET /v1/models/{{model}}, POST /v1/completions, POST /v1/chat/completions, POST /v1/embeddings, POST /v1/responses, POST /v1/messages)",
        request.method(),
    )))
}

/// A known OpenAI route called with another method: OpenAI's error object with 405.
async fn openai_wrong_method(request: Request) -> Response {
    let route = normalize_route(request.uri().path());
    let allowed = if route.starts_with("/v1/models") {
        "GET"
    } else if route.starts_with("/v1/responses/") {
        "GET or DELETE"
    } else {
        "POST"
    };
    openai_error(&ApiError::method_not_allowed(format!(
        "{route} takes {allowed}, not {}",
        request.method()
    )))
}

/// A POST body that declares a media type other than JSON: 415, as vLLM answers. (A body without a
/// `Content-Type` is read as JSON.)
fn refuse_non_json(request: &Request) -> Option<ApiError> {
    let value = request.headers().get(header::CONTENT_TYPE)?;
    let media = value.to_str().unwrap_or("").split(';').next().unwrap_or("");
    let media = media.trim().to_ascii_lowercase();
    if media == "application/json" || media.ends_with("+json") {
        return None;
    }
    Some(ApiError::unsupported_media_type(format!(
        "Unsupported Media Type: only 'application/json' is allowed, got '{media}'"
    )))
}

/// Every OpenAI route: the request as an OpenAI job (see [`openai_job`]).
async fn openai(State(endpoint): State<Arc<LocalEndpoint>>, request: Request) -> Response {
    let route = normalize_route(request.uri().path());
    if request.method() == axum::http::Method::GET {
        return openai_job(&endpoint, &route, None).await;
    }
    if request.method() == axum::http::Method::DELETE {
        let input = json!({ "openai_route": route, "method": "DELETE" });
        return openai_job_input(&endpoint, &route, input, false).await;
    }
    // What is refused before the job answers in the route's shape (Anthropic's on `/v1/messages`).
    let refuse = |e: ApiError| {
        openai_error(&if route == MESSAGES_ROUTE {
            e.in_anthropic_shape()
        } else {
            e
        })
    };
    if let Some(refused) = refuse_non_json(&request) {
        return refuse(refused);
    }
    let body = match endpoint.read_body(request.into_body()).await {
        Ok(b) => b,
        Err(e) => return refuse(e),
    };
    let body: Value = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(e) => {
            return refuse(ApiError::bad_request(format!(
                "the body is not valid JSON: {e}"
            )));
        }
    };
    if let Err(e) = endpoint.check_output_size(&body) {
        return refuse(e);
    }
    openai_job(&endpoint, &route, Some(body)).await
}

/// Runs an OpenAI request (a POST with its body, or a GET without) as a job, the way the platform
/// turns `/openai/v1/...` into one, and answers with the response object or, for streams, the SSE
/// events as they come. A stream is answered only once its first piece is there: a request refused
/// before it produces anything gets its error status and body, as unstreamed.
async fn openai_job(endpoint: &Arc<LocalEndpoint>, route: &str, body: Option<Value>) -> Response {
    let streamed = body
        .as_ref()
        .and_then(|b| b.get("stream"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut input = json!({ "openai_route": route });
    match body {
        Some(body) => input["openai_input"] = body,
        None => input["method"] = json!("GET"),
    }
    openai_job_input(endpoint, route, input, streamed).await
}

/// Runs an OpenAI job's `input` (see [`openai_job`]).
async fn openai_job_input(
    endpoint: &Arc<LocalEndpoint>,
    route: &str,
    input: Value,
    streamed: bool,
) -> Response {
    // One metrics label for every model card, whatever id was asked for.
    let label = if route.starts_with("/v1/models/") {
        "/v1/models/{model}"
    } else if route.starts_with("/v1/responses/") {
        "/v1/responses/{id}"
    } else {
        route
    };
    let job = endpoint.submit(input, Map::new(), label, false);
    // A client that hangs up cancels its request, so it stops using the engine.
    let guard = CancelOnDrop(job.clone());
    if !streamed {
        wait_final(&job).await;
        drop(guard);
        let state = job.lock();
        return match &state.result {
            Some(JobResult::Output(pieces)) => match pieces.first() {
                Some(object) => Json(object.clone()).into_response(),
                None => openai_error(&ApiError::internal("the request produced no output")),
            },
            Some(JobResult::Error(e)) => openai_error(e),
            None => openai_error(&ApiError::internal("the request ended without a result")),
        };
    }
    // Streamed: wait for the first piece or the end, whichever comes first.
    loop {
        let changed = job.changed.notified();
        {
            let state = job.lock();
            if !state.pieces().is_empty() {
                break;
            }
            if state.status.is_final() {
                if let Some(JobResult::Error(e)) = &state.result {
                    return openai_error(e);
                }
                break;
            }
        }
        changed.await;
    }
    // Relay the pieces' events as they are posted.
    let payloads = async_stream::stream! {
        let _guard = guard;
        let mut sent = 0;
        loop {
            let changed = job.changed.notified();
            let (new, done, error) = {
                let state = job.lock();
                let new: Vec<Value> = state.pieces()[sent..].to_vec();
                let error = match &state.result {
                    Some(JobResult::Error(e)) => Some(e.clone()),
                    _ => None,
                };
                (new, state.status.is_final(), error)
            };
            sent += new.len();
            for piece in &new {
                for payload in piece_payloads(piece) {
                    yield payload;
                }
            }
            if done {
                if let Some(e) = error {
                    yield e.body().to_string();
                }
                return;
            }
            changed.await;
        }
    };
    sse::response(payloads)
}

/// Cancels a job that is still running when the HTTP request holding this is dropped.
struct CancelOnDrop(Arc<LocalJob>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.0.lock().status.is_final() {
            let _ = self.0.stop.send(Some(StopReason::Cancelled));
        }
    }
}

/// The SSE payloads of a streamed OpenAI piece: a raw piece is SSE text already; an object list
/// holds one chunk per event.
fn piece_payloads(piece: &Value) -> Vec<String> {
    match piece {
        Value::String(text) => sse::payloads(text).map(str::to_string).collect(),
        Value::Array(chunks) => chunks.iter().map(Value::to_string).collect(),
        other => vec![other.to_string()],
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets the open connections finish
/// (axum's `serve`, with a header read timeout: a connection that sends no complete request head
/// within `header_read_timeout`, a half-open or idle one, is closed).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    header_read_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;
    use hyper_util::service::TowerToHyperService;

    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection holds a receiver; `closed` says when the last one has ended.
    let (open_tx, open_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(connection) => connection,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop_rx.clone();
        let open = open_rx.clone();
        tokio::spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let stopping = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stopping => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.as_mut().await;
                }
            }
            drop(open);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_rx);
    open_tx.closed().await;
}

/// An error in its route's shape (OpenAI's, or Anthropic's on `/v1/messages`) with its status. A
/// cancelled request (whose client has usually gone) answers 400, as an HTTP status must be a
/// standard one.
fn openai_error(e: &ApiError) -> Response {
    let status = match e.kind() {
        ErrorKind::Cancelled => StatusCode::BAD_REQUEST,
        _ => StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    };
    (status, Json(e.body())).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_paths_map_to_v1_routes() {
        assert_eq!(
            normalize_route("/openai/v1/chat/completions"),
            "/v1/chat/completions"
        );
        assert_eq!(normalize_route("/v1/models"), "/v1/models");
        // A nested router sees the path without its prefix.
        assert_eq!(normalize_route("/completions"), "/v1/completions");
    }

    #[test]
    fn sse_payloads_of_each_piece_shape() {
        assert_eq!(
            piece_payloads(&json!("data: x\n\ndata: [DONE]\n\n")),
            ["x", "[DONE]"]
        );
        assert_eq!(
            piece_payloads(&json!([{"a": 1}, {"b": 2}])),
            ["{\"a\":1}", "{\"b\":2}"]
        );
    }
}
