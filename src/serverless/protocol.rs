//! The queue's HTTP protocol: job-take (single and batch), job-stream, job-done, the
//! heartbeat and the job-stop channel. Knows nothing of models; the job loop (`worker.rs`) drives it.

use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use serde_json::Value;

use super::job::Job;
use crate::config::{RunpodConfig, Secret};

/// The SDK version whose protocol this worker speaks (sent with each heartbeat).
pub(crate) const SDK_COMPAT_VERSION: &str = "1.12.0";

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolError(pub String);

/// What a job-take call brought.
#[derive(Debug)]
pub(crate) enum TakeOutcome {
    Jobs(Vec<Job>),
    /// 204, 400 (FlashBoot warming up) or an empty answer.
    NoJob,
    /// 429: back off before asking again.
    TooManyRequests,
}

/// Timeouts and back-off of the calls.
#[derive(Debug, Clone)]
pub struct Timings {
    /// A job-take and a job-stop call are long-polls of up to this long.
    pub long_poll: Duration,
    /// A result post (job-stream, job-done).
    pub post: Duration,
    /// Heartbeat period (`RUNPOD_PING_INTERVAL`); a ping may take twice this.
    pub ping_interval: Duration,
    /// The first retry's delay; the next ones follow the Fibonacci sequence.
    pub retry_base: Duration,
    /// Retries after the first attempt.
    pub retries: usize,
    /// The pause after a job-take answered 429.
    pub too_many_requests: Duration,
    /// The first pause after a failed job-take; it doubles up to `error_backoff_max`.
    pub error_backoff: Duration,
    pub error_backoff_max: Duration,
}

impl Timings {
    pub fn new(ping_interval: Duration) -> Self {
        Self {
            long_poll: Duration::from_secs(90),
            post: Duration::from_secs(30),
            ping_interval,
            retry_base: Duration::from_millis(500),
            retries: 3,
            too_many_requests: Duration::from_secs(5),
            error_backoff: Duration::from_secs(1),
            error_backoff_max: Duration::from_secs(10),
        }
    }
}

/// The platform's URLs with the worker id already substituted.
#[derive(Debug, Clone)]
pub struct QueueUrls {
    pub take: String,
    pub done: String,
    pub stream: Option<String>,
    pub ping: Option<String>,
    pub stop: Option<String>,
}

impl QueueUrls {
    pub fn from_config(cfg: &RunpodConfig, worker_id: &str) -> Result<Self, ProtocolError> {
        let take = cfg
            .webhook_get_job
            .as_ref()
            .ok_or_else(|| ProtocolError("RUNPOD_WEBHOOK_GET_JOB is not set".into()))?;
        let done = cfg.webhook_post_output.as_ref().ok_or_else(|| {
            ProtocolError("RUNPOD_WEBHOOK_POST_OUTPUT is not set (needed to return results)".into())
        })?;
        let take = take.replace("$ID", worker_id);
        let stop = take
            .contains("/job-take/")
            .then(|| take.replace("/job-take/", "/job-stop/"));
        Ok(Self {
            done: done.replace("$RUNPOD_POD_ID", worker_id),
            stream: cfg
                .webhook_post_stream
                .as_ref()
                .map(|u| u.replace("$RUNPOD_POD_ID", worker_id)),
            ping: cfg
                .webhook_ping
                .as_ref()
                .map(|u| u.replace("$RUNPOD_POD_ID", worker_id)),
            stop,
            take,
        })
    }
}

/// Appends `key=value` to a URL that may or may not have a query string already.
fn with_param(url: &str, key: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{key}={value}")
}

pub struct QueueClient {
    http: reqwest::Client,
    urls: QueueUrls,
    timings: Timings,
    /// Whether a heartbeat is sent: only on the platform (with an API key), as the SDK does.
    heartbeat: bool,
    /// Once shutting down: the instant past which no call waits (each attempt's timeout and each
    /// retry's pause are cut to it, and no attempt starts after it).
    deadline: OnceLock<Instant>,
}

impl QueueClient {
    pub fn new(
        urls: QueueUrls,
        api_key: Option<&Secret>,
        timings: Timings,
    ) -> Result<Self, ProtocolError> {
        let mut headers = HeaderMap::new();
        if let Some(key) = api_key {
            let mut value = HeaderValue::from_str(key.expose()).map_err(|_| {
                ProtocolError("RUNPOD_AI_API_KEY is not a valid header value".into())
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!("worker-candle/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProtocolError(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            urls,
            timings,
            heartbeat: api_key.is_some(),
            deadline: OnceLock::new(),
        })
    }

    /// From now on every call ends by `at` (the shutdown deadline); the first call wins.
    pub(crate) fn set_deadline(&self, at: Instant) {
        let _ = self.deadline.set(at);
    }

    /// `wait` cut to the shutdown deadline; an error once it has passed.
    fn bounded(&self, wait: Duration, what: &str) -> Result<Duration, ProtocolError> {
        let Some(at) = self.deadline.get() else {
            return Ok(wait);
        };
        let left = at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ProtocolError(format!(
                "{what}: the shutdown deadline has passed"
            )));
        }
        Ok(wait.min(left))
    }

    pub(crate) fn timings(&self) -> &Timings {
        &self.timings
    }

    pub(crate) fn has_heartbeat(&self) -> bool {
        self.heartbeat && self.urls.ping.is_some()
    }

    pub(crate) fn has_stop_channel(&self) -> bool {
        self.urls.stop.is_some()
    }

    /// Takes up to `n` jobs: the single job-take for one, the batch take for more.
    pub(crate) async fn take(
        &self,
        n: usize,
        in_progress: bool,
    ) -> Result<TakeOutcome, ProtocolError> {
        let mut url = self.urls.take.clone();
        if n > 1 {
            url = url.replace("/job-take/", "/job-take-batch/");
            url = with_param(&url, "batch_size", &n.to_string());
        }
        url = with_param(&url, "job_in_progress", if in_progress { "1" } else { "0" });
        let response = self
            .http
            .get(&url)
            .timeout(self.bounded(self.timings.long_poll, "job-take")?)
            .send()
            .await
            .map_err(|e| ProtocolError(format!("job-take failed: {e}")))?;
        match response.status() {
            StatusCode::NO_CONTENT | StatusCode::BAD_REQUEST => return Ok(TakeOutcome::NoJob),
            StatusCode::TOO_MANY_REQUESTS => return Ok(TakeOutcome::TooManyRequests),
            s if !s.is_success() => {
                return Err(ProtocolError(format!("job-take answered {s}")));
            }
            _ => {}
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| ProtocolError(format!("job-take body: {e}")))?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(TakeOutcome::NoJob);
        }
        let value: Value = serde_json::from_slice(&body)
            .map_err(|e| ProtocolError(format!("job-take answered invalid JSON: {e}")))?;
        let jobs = parse_jobs(value);
        Ok(if jobs.is_empty() {
            TakeOutcome::NoJob
        } else {
            TakeOutcome::Jobs(jobs)
        })
    }

    /// Posts one streamed piece body (`{"output": piece}`) to job-stream.
    pub(crate) async fn post_stream(
        &self,
        job_id: &str,
        body: &Value,
    ) -> Result<(), ProtocolError> {
        let Some(url) = &self.urls.stream else {
            return Ok(());
        };
        let url = with_param(&url.replace("$ID", job_id), "isStream", "false");
        self.post_with_retries(&url, job_id, body, "job-stream")
            .await
    }

    /// Posts the final result to job-done.
    pub(crate) async fn post_done(
        &self,
        job_id: &str,
        body: &Value,
        is_stream: bool,
    ) -> Result<(), ProtocolError> {
        let url = self.urls.done.replace("$ID", job_id);
        let url = with_param(&url, "isStream", if is_stream { "true" } else { "false" });
        self.post_with_retries(&url, job_id, body, "job-done").await
    }

    async fn post_with_retries(
        &self,
        url: &str,
        job_id: &str,
        body: &Value,
        what: &str,
    ) -> Result<(), ProtocolError> {
        let text = body.to_string();
        let mut delays = fibonacci(self.timings.retry_base);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let timeout = self.bounded(self.timings.post, &format!("{what} for job {job_id}"))?;
            let result = self
                .http
                .post(url)
                .timeout(timeout)
                .header(
                    CONTENT_TYPE,
                    "application/x-www-form-urlencoded; charset=utf-8",
                )
                .header("X-Request-ID", job_id)
                .body(text.clone())
                .send()
                .await;
            let error = match result {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) if !is_transient(r.status()) => {
                    return Err(ProtocolError(format!(
                        "{what} for job {job_id} answered {}",
                        r.status()
                    )));
                }
                Ok(r) => format!("{what} for job {job_id} answered {}", r.status()),
                Err(e) => format!("{what} for job {job_id} failed: {e}"),
            };
            if attempt > self.timings.retries {
                return Err(ProtocolError(format!(
                    "{error} (gave up after {attempt} attempts)"
                )));
            }
            tracing::warn!(job_id, attempt, "{error}; retrying");
            let pause = delays.next().unwrap_or(self.timings.retry_base);
            tokio::time::sleep(self.bounded(pause, &error)?).await;
        }
    }

    /// The heartbeat, with the ids of the jobs in progress.
    pub(crate) async fn ping(&self, job_ids: &[String]) -> Result<(), ProtocolError> {
        let Some(url) = &self.urls.ping else {
            return Ok(());
        };
        let mut url = reqwest::Url::parse(url)
            .map_err(|e| ProtocolError(format!("RUNPOD_WEBHOOK_PING is not a URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("job_id", &job_ids.join(","))
            .append_pair("runpod_version", SDK_COMPAT_VERSION);
        let mut delays = fibonacci(self.timings.retry_base);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self
                .http
                .get(url.clone())
                .timeout(self.bounded(self.timings.ping_interval * 2, "ping")?)
                .send()
                .await;
            let error = match result {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) if !is_transient(r.status()) => {
                    return Err(ProtocolError(format!("ping answered {}", r.status())))
                }
                Ok(r) => format!("ping answered {}", r.status()),
                Err(e) => format!("ping failed: {e}"),
            };
            if attempt > self.timings.retries {
                return Err(ProtocolError(error));
            }
            let pause = delays.next().unwrap_or(self.timings.retry_base);
            tokio::time::sleep(self.bounded(pause, &error)?).await;
        }
    }

    /// Long-polls the job-stop channel; the ids of jobs to cancel.
    pub(crate) async fn poll_stop(&self) -> Result<Vec<String>, ProtocolError> {
        let Some(url) = &self.urls.stop else {
            return Ok(Vec::new());
        };
        let response = self
            .http
            .get(url)
            .timeout(self.bounded(self.timings.long_poll, "job-stop")?)
            .send()
            .await
            .map_err(|e| ProtocolError(format!("job-stop failed: {e}")))?;
        match response.status() {
            StatusCode::OK => {}
            s if s.is_success() => return Ok(Vec::new()),
            s => return Err(ProtocolError(format!("job-stop answered {s}"))),
        }
        let value: Value = response
            .json()
            .await
            .map_err(|e| ProtocolError(format!("job-stop answered invalid JSON: {e}")))?;
        Ok(value
            .get("jobsToStop")
            .and_then(Value::as_array)
            .map(|ids| {
                ids.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default())
    }
}

fn is_transient(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

/// base, base, 2·base, 3·base, 5·base, ...
fn fibonacci(base: Duration) -> impl Iterator<Item = Duration> {
    let mut pair = (1u32, 1u32);
    std::iter::from_fn(move || {
        let factor = pair.0;
        pair = (pair.1, pair.0.saturating_add(pair.1));
        Some(base * factor)
    })
}

/// A legacy take answers one job object, a batch take a list. A job with an `id` but no `input` is
/// still returned (with a null input) so that it gets an error answer rather than being lost; one
/// without an `id` cannot be answered and is dropped with a log line.
pub(crate) fn parse_jobs(value: Value) -> Vec<Job> {
    let items = match value {
        Value::Array(items) => items,
        Value::Null => Vec::new(),
        other => vec![other],
    };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Object(mut fields) = item else {
                tracing::error!("job-take answered a non-object job: {item}");
                return None;
            };
            let id = match fields.remove("id") {
                Some(Value::String(id)) if !id.is_empty() => id,
                Some(Value::Number(n)) => n.to_string(),
                _ => {
                    tracing::error!("job-take answered a job without an id; it cannot be answered");
                    return None;
                }
            };
            let input = fields.remove("input").unwrap_or(Value::Null);
            Some(Job {
                id,
                input,
                extra: fields,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn url_substitutions() {
        let cfg = RunpodConfig {
            webhook_get_job: Some("http://q/v2/job-take/$ID?gpu=A100".into()),
            webhook_post_output: Some("http://q/v2/job-done/$RUNPOD_POD_ID/$ID?gpu=A100".into()),
            webhook_post_stream: Some("http://q/v2/job-stream/$RUNPOD_POD_ID/$ID?gpu=A100".into()),
            webhook_ping: Some("http://q/v2/ping/$RUNPOD_POD_ID?gpu=A100".into()),
            ping_interval: Duration::from_secs(10),
            api_key: None,
            pod_id: None,
            endpoint_id: None,
            pod_hostname: None,
        };
        let urls = QueueUrls::from_config(&cfg, "w1").unwrap();
        assert_eq!(urls.take, "http://q/v2/job-take/w1?gpu=A100");
        assert_eq!(
            urls.stop.as_deref(),
            Some("http://q/v2/job-stop/w1?gpu=A100")
        );
        assert_eq!(urls.done, "http://q/v2/job-done/w1/$ID?gpu=A100");
        assert_eq!(urls.ping.as_deref(), Some("http://q/v2/ping/w1?gpu=A100"));
        assert_eq!(with_param("http://a/b", "x", "1"), "http://a/b?x=1");
        assert_eq!(with_param("http://a/b?y=2", "x", "1"), "http://a/b?y=2&x=1");
    }

    #[tokio::test]
    async fn after_the_shutdown_deadline_no_call_waits() {
        let urls = QueueUrls {
            take: "http://127.0.0.1:9/v2/job-take/w".into(),
            done: "http://127.0.0.1:9/v2/job-done/w/$ID".into(),
            stream: None,
            ping: None,
            stop: None,
        };
        let client = QueueClient::new(urls, None, Timings::new(Duration::from_secs(10))).unwrap();
        // Before: a wait is its own; after: cut to the deadline, then refused.
        assert_eq!(
            client.bounded(Duration::from_secs(30), "x").unwrap(),
            Duration::from_secs(30)
        );
        client.set_deadline(Instant::now() + Duration::from_secs(1));
        assert!(client.bounded(Duration::from_secs(30), "x").unwrap() <= Duration::from_secs(1));
        client.set_deadline(Instant::now());
        assert!(client.bounded(Duration::from_secs(30), "x").unwrap() <= Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let err = client.post_done("j", &json!({}), true).await.unwrap_err();
        assert!(err.0.contains("shutdown deadline"), "{err}");
    }

    #[test]
    fn fibonacci_back_off() {
        let d: Vec<_> = fibonacci(Duration::from_millis(100)).take(5).collect();
        let ms: Vec<_> = d.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, vec![100, 100, 200, 300, 500]);
    }

    #[test]
    fn jobs_from_legacy_and_batch_answers() {
        let one = parse_jobs(json!({"id": "a", "input": {"prompt": "x"}, "webhook": "w"}));
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].id, "a");
        assert_eq!(one[0].extra["webhook"], "w");
        let many = parse_jobs(json!([
            {"id": "a", "input": {}},
            {"input": {}},
            "junk",
            {"id": "c"}
        ]));
        let ids: Vec<_> = many.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, vec!["a", "c"]);
        assert_eq!(many[1].input, Value::Null);
    }
}
