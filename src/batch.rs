//! `run-batch`: OpenAI batch files (JSON lines) through the engine. Each line goes through the OpenAI
//! front door (`api::openai::handle`), all lines at once so the engine batches them; results are
//! written in input order, a bad line getting its own error line. Input and output are local paths
//! (`-`: stdin / stdout) or http(s) URLs (GET to read, PUT to write: presigned S3 URLs work).

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use axum::http::Method;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::api::error::ApiError;
use crate::api::openai::{handle, shapes, OpenAiResponse, OpenAiSettings};
use crate::engine::Engine;

/// The routes a batch line may name.
pub(crate) const BATCH_URLS: &[&str] =
    &["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];

/// Lines in flight at once: enough to keep the scheduler's batch full, bounded so a huge file does
/// not queue everything at once.
pub(crate) const DEFAULT_CONCURRENCY: usize = 512;

/// `worker-candle run-batch` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct BatchArgs {
    /// Input file of requests (JSON lines): a path, `-` for stdin, or an http(s) URL (GET).
    #[arg(short = 'i', long = "input")]
    pub input: String,
    /// Output file of results (JSON lines): a path, `-` for stdout, or an http(s) URL (PUT).
    #[arg(short = 'o', long = "output")]
    pub output: String,
    /// The model (overrides MODEL_NAME).
    #[arg(long)]
    pub model: Option<String>,
}

/// A batch line that parsed: where it goes and what it carries.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BatchRequest {
    pub custom_id: Value,
    pub url: String,
    pub body: Value,
}

/// Why a line never reached the front door, with the `custom_id` when it could be read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LineError {
    pub custom_id: Value,
    pub message: String,
}

/// Reads one request object of the batch format.
pub(crate) fn parse_request(v: Value) -> Result<BatchRequest, LineError> {
    let custom_id = v.get("custom_id").cloned().unwrap_or(Value::Null);
    let fail = |message: String| LineError {
        custom_id: custom_id.clone(),
        message,
    };
    let Value::Object(mut obj) = v else {
        return Err(fail("a batch line must be a JSON object".into()));
    };
    if !custom_id.is_string() {
        return Err(fail("`custom_id` must be a string".into()));
    }
    match obj.get("method").and_then(Value::as_str) {
        Some(m) if m.eq_ignore_ascii_case("POST") => {}
        other => {
            return Err(fail(format!(
                "`method` must be \"POST\", got {}",
                other.map_or("nothing".into(), |m| format!("\"{m}\""))
            )))
        }
    }
    let url = obj
        .get("url")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if !BATCH_URLS.contains(&url.as_str()) {
        return Err(fail(format!(
            "unsupported url \"{url}\"; a batch line may POST to {}",
            BATCH_URLS.join(", ")
        )));
    }
    let body = obj.remove("body").unwrap_or(Value::Null);
    if !body.is_object() {
        return Err(fail("`body` must be a JSON object".into()));
    }
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(fail("`stream` is not supported in a batch".into()));
    }
    Ok(BatchRequest {
        custom_id,
        url,
        body,
    })
}

/// Reads one line of the batch file.
pub(crate) fn parse_line(line: &str) -> Result<BatchRequest, LineError> {
    let v: Value = serde_json::from_str(line).map_err(|e| LineError {
        custom_id: Value::Null,
        message: format!("the line is not valid JSON: {e}"),
    })?;
    parse_request(v)
}

/// The output line for a line that failed before reaching the front door.
pub(crate) fn error_line(e: &LineError) -> Value {
    json!({
        "id": shapes::new_id("batch_req"),
        "custom_id": e.custom_id,
        "response": {
            "status_code": 400,
            "request_id": shapes::new_id("batch"),
            "body": null,
        },
        "error": {"code": "invalid_request", "message": e.message},
    })
}

/// The output line for the front door's answer: its status and body; a failure also fills `error`
/// with the error's type and message.
pub(crate) fn response_line(custom_id: &Value, answer: Result<Value, &ApiError>) -> Value {
    let (status, body, error) = match answer {
        Ok(body) => (200, body, Value::Null),
        Err(e) => (
            e.status(),
            e.openai_body(),
            json!({"code": e.kind().type_name(), "message": e.message()}),
        ),
    };
    json!({
        "id": shapes::new_id("batch_req"),
        "custom_id": custom_id,
        "response": {
            "status_code": status,
            "request_id": shapes::new_id("batch"),
            "body": body,
        },
        "error": error,
    })
}

/// One request through `serve` (the front door) to its output line.
async fn process<S, F>(request: Result<BatchRequest, LineError>, serve: &S) -> Value
where
    S: Fn(String, Value) -> F,
    F: Future<Output = OpenAiResponse>,
{
    let request = match request {
        Ok(r) => r,
        Err(e) => return error_line(&e),
    };
    match serve(request.url.clone(), request.body).await {
        OpenAiResponse::Json(body) => response_line(&request.custom_id, Ok(body)),
        OpenAiResponse::Error(e) => response_line(&request.custom_id, Err(&e)),
        // Refused at parse time; kept so the front door's answer is handled whole.
        OpenAiResponse::Stream(_) => error_line(&LineError {
            custom_id: request.custom_id,
            message: "`stream` is not supported in a batch".into(),
        }),
    }
}

/// Runs every request through `serve`, up to `concurrency` at once, and returns the output lines in
/// input order. `on_done` is called as each finishes (progress).
pub(crate) async fn run_requests<S, F>(
    requests: Vec<Result<BatchRequest, LineError>>,
    serve: S,
    concurrency: usize,
    on_done: impl Fn() + Sync,
) -> Vec<Value>
where
    S: Fn(String, Value) -> F,
    F: Future<Output = OpenAiResponse>,
{
    let serve = &serve;
    let on_done = &on_done;
    futures::stream::iter(requests)
        .map(|r| async move {
            let line = process(r, serve).await;
            on_done();
            line
        })
        .buffered(concurrency.max(1))
        .collect()
        .await
}

/// The lines of a batch file (blank lines skipped).
pub(crate) fn parse_file(text: &str) -> Vec<Result<BatchRequest, LineError>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_line)
        .collect()
}

/// Runs batch requests given as JSON values through the engine: the core of a native batch job.
pub(crate) async fn run_values(
    engine: &Engine,
    settings: &OpenAiSettings,
    requests: Vec<Value>,
) -> Vec<Value> {
    let parsed = requests.into_iter().map(parse_request).collect();
    run_requests(
        parsed,
        engine_server(engine, settings),
        DEFAULT_CONCURRENCY,
        || {},
    )
    .await
}

fn engine_server<'a>(
    engine: &'a Engine,
    settings: &'a OpenAiSettings,
) -> impl Fn(String, Value) -> std::pin::Pin<Box<dyn Future<Output = OpenAiResponse> + Send + 'a>> + 'a
{
    move |url, body| {
        Box::pin(async move { handle(engine, settings, &url, Method::POST, Some(body)).await })
    }
}

fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

const ATTEMPTS: u32 = 4;

/// Retries `op` with exponential back-off (0.5 s, 1 s, 2 s) on any failure.
async fn with_retries<T, F, Fut>(what: &str, mut op: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut delay = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < ATTEMPTS => {
                tracing::warn!("{what} failed (attempt {attempt}/{ATTEMPTS}): {e:#}; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            Err(e) => return Err(e.context(format!("{what} failed after {ATTEMPTS} attempts"))),
        }
    }
}

/// The batch file at `input`: a URL (GET), `-` (stdin) or a path.
pub(crate) async fn read_input(input: &str) -> anyhow::Result<String> {
    if is_url(input) {
        let client = reqwest::Client::new();
        return with_retries(&format!("GET {input}"), || async {
            let response = client.get(input).send().await?.error_for_status()?;
            Ok(response.text().await?)
        })
        .await;
    }
    if input == "-" {
        return tokio::task::spawn_blocking(|| {
            std::io::read_to_string(std::io::stdin()).context("reading stdin")
        })
        .await?;
    }
    tokio::fs::read_to_string(input)
        .await
        .with_context(|| format!("reading {input}"))
}

/// Writes the results to `output`: a URL (PUT), `-` (stdout) or a path.
pub(crate) async fn write_output(output: &str, text: String) -> anyhow::Result<()> {
    if is_url(output) {
        let client = reqwest::Client::new();
        return with_retries(&format!("PUT {output}"), || async {
            client
                .put(output)
                .header("content-type", "application/jsonl")
                .body(text.clone())
                .send()
                .await?
                .error_for_status()?;
            Ok(())
        })
        .await;
    }
    if output == "-" {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        return Ok(out.flush()?);
    }
    tokio::fs::write(output, text)
        .await
        .with_context(|| format!("writing {output}"))
}

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSummary {
    pub lines: usize,
    /// Lines whose response status is not 200.
    pub failed: usize,
}

/// Reads `args.input`, runs every line through the engine, writes `args.output`.
pub async fn run(
    engine: &Engine,
    settings: &OpenAiSettings,
    args: &BatchArgs,
) -> anyhow::Result<BatchSummary> {
    let text = read_input(&args.input).await?;
    let requests = parse_file(&text);
    let bar = ProgressBar::new(requests.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} requests [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let lines = run_requests(
        requests,
        engine_server(engine, settings),
        DEFAULT_CONCURRENCY,
        || bar.inc(1),
    )
    .await;
    bar.finish();
    let failed = lines
        .iter()
        .filter(|l| l.pointer("/response/status_code") != Some(&json!(200)))
        .count();
    let mut out = String::new();
    for line in &lines {
        out.push_str(&line.to_string());
        out.push('\n');
    }
    write_output(&args.output, out).await?;
    Ok(BatchSummary {
        lines: lines.len(),
        failed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_or_name_their_fault() {
        let ok = parse_line(
            r#"{"custom_id": "r1", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}"#,
        )
        .unwrap();
        assert_eq!(ok.custom_id, json!("r1"));
        assert_eq!(ok.url, "/v1/embeddings");
        assert_eq!(ok.body, json!({"input": "x"}));
        let bad = |line: &str| parse_line(line).unwrap_err();
        assert_eq!(bad("{not json").custom_id, Value::Null);
        let e = bad(r#"{"custom_id": "r2", "method": "POST", "url": "/v1/images", "body": {}}"#);
        assert_eq!(e.custom_id, json!("r2"));
        assert!(e.message.contains("/v1/images"), "{}", e.message);
        assert!(bad(
            r#"{"custom_id": "r3", "method": "GET", "url": "/v1/completions", "body": {}}"#
        )
        .message
        .contains("POST"));
        assert!(
            bad(r#"{"custom_id": "r4", "method": "POST", "url": "/v1/completions"}"#)
                .message
                .contains("body")
        );
        assert!(
            bad(r#"{"method": "POST", "url": "/v1/completions", "body": {}}"#)
                .message
                .contains("custom_id")
        );
        assert!(bad(
            r#"{"custom_id": "r5", "method": "POST", "url": "/v1/completions", "body": {"stream": true}}"#
        )
        .message
        .contains("stream"));
        assert!(bad("[1]").message.contains("object"));
    }

    #[test]
    fn output_lines_have_the_batch_shape() {
        let ok = response_line(&json!("a"), Ok(json!({"object": "list"})));
        assert_eq!(ok["custom_id"], "a");
        assert_eq!(ok["response"]["status_code"], 200);
        assert_eq!(ok["response"]["body"]["object"], "list");
        assert!(ok["error"].is_null());
        assert!(ok["id"].as_str().unwrap().starts_with("batch_req-"));
        let failed = response_line(&json!("b"), Err(&ApiError::invalid("n", "bad n")));
        assert_eq!(failed["error"]["message"], "bad n");
        assert_eq!(failed["response"]["status_code"], 400);
        let e = error_line(&LineError {
            custom_id: json!("c"),
            message: "no".into(),
        });
        assert_eq!(e["error"]["message"], "no");
        assert!(e["response"]["body"].is_null());
    }

    #[tokio::test]
    async fn results_keep_input_order_whatever_finishes_first() {
        let text = (0..20)
            .map(|i| {
                if i == 7 {
                    "garbage".to_string()
                } else {
                    json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/v1/completions",
                           "body": {"delay": 20 - i}})
                    .to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let done = std::sync::atomic::AtomicUsize::new(0);
        // Later lines answer sooner, so completion order is the reverse of input order.
        let serve = |_url: String, body: Value| async move {
            let ms = body["delay"].as_u64().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms * 5)).await;
            OpenAiResponse::Json(json!({"echo": ms}))
        };
        let lines = run_requests(parse_file(&text), serve, 64, || {
            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
        .await;
        assert_eq!(done.into_inner(), 20);
        for (i, line) in lines.iter().enumerate() {
            if i == 7 {
                assert!(line["custom_id"].is_null());
                assert!(line["error"]["message"].as_str().unwrap().contains("JSON"));
            } else {
                assert_eq!(line["custom_id"], format!("r{i}"));
                assert_eq!(line["response"]["body"]["echo"], 20 - i);
            }
        }
    }
}
