//! OpenAI jobs: hands the route and body to the OpenAI front door and shapes its answer as the job's
//! pieces (spec §7): the response object once, or the streamed chunks grouped by the dynamic batch
//! policy, as SSE text when `RAW_OPENAI_OUTPUT=1` and as lists of chunk objects otherwise.

use futures::{Stream, StreamExt};
use serde_json::Value;

use super::handler::EngineHandler;
use super::job::{JobError, PieceStream};
use super::metrics::Metrics;
use super::routing::Method;
use super::stream_batch::BatchPolicy;
use crate::api::openai::{self, OpenAiResponse, OpenAiSettings, StreamEvent};
use crate::engine::template::RenderOptions;
use crate::engine::{Engine, EngineError};

/// One streamed chunk of the OpenAI front door: an object, or the end marker.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    Data(Value),
    Done,
}

impl Chunk {
    fn sse(&self) -> String {
        match self {
            Self::Data(v) => format!("data: {v}\n\n"),
            Self::Done => "data: [DONE]\n\n".to_string(),
        }
    }
}

pub fn pieces(
    handler: &EngineHandler,
    _job_id: &str,
    route: &str,
    method: Method,
    body: Option<Value>,
) -> PieceStream {
    let engine = handler.engine().clone();
    let settings = OpenAiSettings {
        served_model_name: engine.info().served_model_name.clone(),
        response_role: handler.settings().response_role.clone(),
    };
    let raw = handler.settings().raw_openai_output;
    let policy = handler.settings().batch_defaults;
    let method = match method {
        Method::Get => axum::http::Method::GET,
        Method::Post => axum::http::Method::POST,
    };
    let route = route.to_string();
    let metrics = handler.metrics().clone();
    async_stream::stream! {
        match openai::handle(&engine, &settings, &route, method, body).await {
            OpenAiResponse::Json { status, body } if status < 400 => {
                record_usage(&metrics, &body);
                yield Ok(body)
            }
            OpenAiResponse::Json { status, body } => yield Err(job_error(status, &body)),
            OpenAiResponse::Stream(events) => {
                let metrics = metrics.clone();
                let chunks = events.map(move |event| match event {
                    StreamEvent::Data(v) => {
                        record_usage(&metrics, &v);
                        Ok(Chunk::Data(v))
                    }
                    StreamEvent::Done => Ok(Chunk::Done),
                    StreamEvent::Error(e) => Err(job_error(e.status, &e.body())),
                });
                let mut posts = batch_chunks(chunks, raw, policy);
                while let Some(post) = posts.next().await {
                    yield post;
                }
            }
        }
    }
    .boxed()
}

/// Counts the tokens of a response (or of the usage chunk of a stream) in the metrics.
fn record_usage(metrics: &Metrics, body: &Value) {
    let usage = &body["usage"];
    if let (Some(prompt), Some(completion)) = (
        usage["prompt_tokens"].as_u64(),
        usage["completion_tokens"].as_u64(),
    ) {
        metrics.record_generation(prompt as usize, completion as usize, None);
    }
}

/// An OpenAI error body (`{"error": {message, type, code}}`) as the job's error.
fn job_error(status: u16, body: &Value) -> JobError {
    let error = &body["error"];
    JobError {
        message: error["message"]
            .as_str()
            .unwrap_or("request failed")
            .to_string(),
        kind: error["type"]
            .as_str()
            .unwrap_or("InternalServerError")
            .to_string(),
        code: status,
    }
}

pub fn render_chat(engine: &Engine, messages: &[Value]) -> Result<String, EngineError> {
    let template = engine.chat_template().ok_or(EngineError::NoChatTemplate)?;
    let options = RenderOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    template.render(messages, &options)
}

/// Groups chunks into posts of 1, 3, 9, ... chunks (worker-vllm counts each SSE event, `[DONE]`
/// included in raw mode). Raw: each post is one string of SSE events; otherwise a list of chunk
/// objects without the end marker.
pub fn batch_chunks(
    chunks: impl Stream<Item = Result<Chunk, JobError>> + Send + 'static,
    raw: bool,
    policy: BatchPolicy,
) -> PieceStream {
    async_stream::stream! {
        let mut sizer = policy.sizer();
        let mut pending: Vec<Chunk> = Vec::new();
        futures::pin_mut!(chunks);
        while let Some(chunk) = chunks.next().await {
            match chunk {
                Err(e) => {
                    yield Err(e);
                    return;
                }
                Ok(Chunk::Done) if !raw => continue,
                Ok(chunk) => pending.push(chunk),
            }
            if sizer.is_full(pending.len()) {
                sizer.advance();
                yield Ok(post(std::mem::take(&mut pending), raw));
            }
        }
        if !pending.is_empty() {
            yield Ok(post(pending, raw));
        }
    }
    .boxed()
}

fn post(chunks: Vec<Chunk>, raw: bool) -> Value {
    if raw {
        Value::String(chunks.iter().map(Chunk::sse).collect())
    } else {
        Value::Array(
            chunks
                .into_iter()
                .filter_map(|c| match c {
                    Chunk::Data(v) => Some(v),
                    Chunk::Done => None,
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chunks(n: usize) -> Vec<Result<Chunk, JobError>> {
        let mut v: Vec<_> = (0..n).map(|i| Ok(Chunk::Data(json!({"i": i})))).collect();
        v.push(Ok(Chunk::Done));
        v
    }

    #[tokio::test]
    async fn raw_posts_are_sse_text_grouped_by_the_policy() {
        let posts: Vec<Value> = batch_chunks(
            futures::stream::iter(chunks(5)),
            true,
            BatchPolicy::default(),
        )
        .map(|p| p.unwrap())
        .collect()
        .await;
        assert_eq!(posts.len(), 3);
        assert_eq!(posts[0], json!("data: {\"i\":0}\n\n"));
        assert_eq!(
            posts[1],
            json!("data: {\"i\":1}\n\ndata: {\"i\":2}\n\ndata: {\"i\":3}\n\n")
        );
        assert_eq!(posts[2], json!("data: {\"i\":4}\n\ndata: [DONE]\n\n"));
    }

    #[tokio::test]
    async fn object_posts_are_lists_without_the_end_marker() {
        let posts: Vec<Value> = batch_chunks(
            futures::stream::iter(chunks(4)),
            false,
            BatchPolicy::default(),
        )
        .map(|p| p.unwrap())
        .collect()
        .await;
        assert_eq!(
            posts,
            vec![json!([{"i": 0}]), json!([{"i": 1}, {"i": 2}, {"i": 3}])]
        );
    }

    #[tokio::test]
    async fn an_error_ends_the_stream() {
        let items = vec![
            Ok(Chunk::Data(json!(1))),
            Err(JobError::internal("x")),
            Ok(Chunk::Data(json!(2))),
        ];
        let posts: Vec<_> =
            batch_chunks(futures::stream::iter(items), false, BatchPolicy::default())
                .collect()
                .await;
        assert_eq!(posts.len(), 2);
        assert!(posts[1].is_err());
    }
}
