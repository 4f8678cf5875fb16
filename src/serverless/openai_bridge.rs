//! OpenAI jobs: hands the route and body to the OpenAI front door and shapes its answer as the job's
//! pieces: the response object once, or the streamed chunks grouped by the dynamic batch policy, as
//! SSE text when `RAW_OPENAI_OUTPUT=1` and as lists of chunk objects otherwise.

use futures::{Stream, StreamExt};
use serde_json::Value;

use super::handler::EngineHandler;
use super::job::PieceStream;
use super::metrics::Metrics;
use super::routing::Method;
use crate::api::openai::{sse, OpenAiResponse, OpenAiSettings, StreamEvent};
use crate::api::stream_batch::BatchPolicy;
use crate::engine::template::RenderOptions;
use crate::engine::{Engine, EngineError};

pub(crate) fn pieces(
    handler: &EngineHandler,
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
        Method::Delete => axum::http::Method::DELETE,
    };
    let route = route.to_string();
    let metrics = handler.metrics().clone();
    async_stream::stream! {
        match crate::api::handle(&engine, &settings, &route, method, body).await {
            OpenAiResponse::Json(body) => {
                record_usage(&metrics, &body);
                yield Ok(body)
            }
            OpenAiResponse::Error(e) => yield Err(e),
            OpenAiResponse::Stream(events) => {
                let metrics = metrics.clone();
                let events = events.inspect(move |event| {
                    if let StreamEvent::Data(v) = event {
                        record_usage(&metrics, v);
                    }
                });
                let mut posts = batch_chunks(events, raw, policy);
                while let Some(post) = posts.next().await {
                    yield post;
                }
            }
        }
    }
    .boxed()
}

/// Counts the tokens of a response (or of the usage chunk of a stream) in the metrics: OpenAI's
/// `usage`, or the `input_tokens` / `output_tokens` of the Responses and Anthropic Messages routes
/// (a streamed Responses reply has it in its last event's `response`).
fn record_usage(metrics: &Metrics, body: &Value) {
    let usage = match &body["usage"] {
        Value::Null => &body["response"]["usage"],
        usage => usage,
    };
    let count = |openai: &str, other: &str| usage[openai].as_u64().or(usage[other].as_u64());
    if let (Some(prompt), Some(completion)) = (
        count("prompt_tokens", "input_tokens"),
        count("completion_tokens", "output_tokens"),
    ) {
        metrics.record_generation(prompt as usize, completion as usize, None);
    }
}

pub(crate) fn render_chat(engine: &Engine, messages: &[Value]) -> Result<String, EngineError> {
    let template = engine.chat_template().ok_or(EngineError::NoChatTemplate)?;
    let options = RenderOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    template.render(messages, &options)
}

/// Groups chunks into posts of 1, 3, 9, ... chunks (worker-vllm counts each SSE event, `[DONE]`
/// included in raw mode). Raw: each post is one string of SSE events; otherwise a list of chunk
/// objects without the end marker. An error event ends the stream as the job's error.
pub(crate) fn batch_chunks(
    events: impl Stream<Item = StreamEvent> + Send + 'static,
    raw: bool,
    policy: BatchPolicy,
) -> PieceStream {
    async_stream::stream! {
        let mut sizer = policy.sizer();
        let mut pending: Vec<StreamEvent> = Vec::new();
        futures::pin_mut!(events);
        while let Some(event) = events.next().await {
            match event {
                StreamEvent::Error(e) => {
                    yield Err(e);
                    return;
                }
                StreamEvent::Done if !raw => continue,
                event => pending.push(event),
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

fn post(events: Vec<StreamEvent>, raw: bool) -> Value {
    if raw {
        Value::String(events.iter().map(|e| sse::frame(&e.payload())).collect())
    } else {
        Value::Array(
            events
                .into_iter()
                .filter_map(|e| match e {
                    StreamEvent::Data(v) => Some(v),
                    _ => None,
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::error::ApiError;
    use serde_json::json;

    fn chunks(n: usize) -> Vec<StreamEvent> {
        let mut v: Vec<_> = (0..n).map(|i| StreamEvent::Data(json!({"i": i}))).collect();
        v.push(StreamEvent::Done);
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
            StreamEvent::Data(json!(1)),
            StreamEvent::Error(ApiError::internal("x")),
            StreamEvent::Data(json!(2)),
        ];
        let posts: Vec<_> =
            batch_chunks(futures::stream::iter(items), false, BatchPolicy::default())
                .collect()
                .await;
        assert_eq!(posts.len(), 2);
        assert!(posts[1].is_err());
    }
}
