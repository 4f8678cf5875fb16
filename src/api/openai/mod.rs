//! The OpenAI-compatible API: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.
//!
//! Transport-neutral: [`handle`] takes a route, a method and a JSON body and answers with a JSON
//! object or a stream of chunk events, so the local HTTP server ([`router`]) and the queue worker
//! (`openai_route` + `openai_input` jobs) share one implementation.

pub mod chat;
pub mod completions;
pub mod embeddings;
pub mod error;
pub mod http;
pub mod outcome;
pub mod params;
pub mod shapes;
pub mod tools;

use axum::http::Method;
use futures::stream::BoxStream;
use serde_json::{json, Value};

pub use error::OpenAiError;
pub use http::router;

use crate::engine::Engine;
use params::Body;

/// What the OpenAI front door needs from the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiSettings {
    /// The name the model answers to (`OPENAI_SERVED_MODEL_NAME_OVERRIDE`, else `MODEL_NAME`).
    pub served_model_name: String,
    /// The role of generated chat messages (`OPENAI_RESPONSE_ROLE`, default `assistant`).
    pub response_role: String,
}

impl OpenAiSettings {
    /// The engine's served name and the `assistant` role.
    pub fn for_engine(engine: &Engine) -> Self {
        Self {
            served_model_name: engine.info().served_model_name.clone(),
            response_role: "assistant".into(),
        }
    }
}

/// One event of a streamed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// A chunk object (`chat.completion.chunk` or `text_completion`).
    Data(Value),
    /// A failure after the stream started, sent as `data: {"error": {...}}`.
    Error(OpenAiError),
    /// The end marker, `data: [DONE]`.
    Done,
}

impl StreamEvent {
    /// The event as Server-Sent Events text.
    pub fn sse(&self) -> String {
        match self {
            Self::Data(v) => format!("data: {v}\n\n"),
            Self::Error(e) => format!("data: {}\n\n", e.body()),
            Self::Done => "data: [DONE]\n\n".to_string(),
        }
    }
}

/// The answer to one OpenAI request.
pub enum OpenAiResponse {
    Json { status: u16, body: Value },
    Stream(BoxStream<'static, StreamEvent>),
}

impl OpenAiResponse {
    pub fn error(e: &OpenAiError) -> Self {
        Self::Json {
            status: e.status,
            body: e.body(),
        }
    }
}

impl std::fmt::Debug for OpenAiResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Json { status, body } => write!(f, "Json({status}, {body})"),
            Self::Stream(_) => write!(f, "Stream(..)"),
        }
    }
}

/// `/openai/v1/x`, `/v1/x` and `x` all name route `/v1/x`.
fn normalize_route(route: &str) -> String {
    let route = route.split('?').next().unwrap_or("").trim_end_matches('/');
    let tail = route
        .strip_prefix("/openai")
        .unwrap_or(route)
        .trim_start_matches('/');
    let tail = tail
        .strip_prefix("v1")
        .unwrap_or(tail)
        .trim_start_matches('/');
    format!("/v1/{tail}")
}

/// Answers one OpenAI request. Errors come back as `Json` with OpenAI's error body and status.
pub async fn handle(
    engine: &Engine,
    settings: &OpenAiSettings,
    route: &str,
    method: Method,
    body: Option<Value>,
) -> OpenAiResponse {
    match dispatch(
        engine,
        settings,
        &normalize_route(route),
        method,
        body.as_ref(),
    )
    .await
    {
        Ok(response) => response,
        Err(e) => OpenAiResponse::error(&e),
    }
}

async fn dispatch(
    engine: &Engine,
    settings: &OpenAiSettings,
    route: &str,
    method: Method,
    body: Option<&Value>,
) -> Result<OpenAiResponse, OpenAiError> {
    let post = |route: &str| {
        if method == Method::POST {
            Ok(())
        } else {
            Err(OpenAiError::method_not_allowed(format!(
                "{route} takes POST"
            )))
        }
    };
    match route {
        "/v1/models" => {
            if method != Method::GET {
                return Err(OpenAiError::method_not_allowed("/v1/models takes GET"));
            }
            Ok(OpenAiResponse::Json {
                status: 200,
                body: models(engine, settings),
            })
        }
        "/v1/completions" => {
            post(route)?;
            let body = Body::from_value(body)?;
            check_model(&body, settings)?;
            completions::handle(engine, settings, &body).await
        }
        "/v1/chat/completions" => {
            post(route)?;
            let body = Body::from_value(body)?;
            check_model(&body, settings)?;
            chat::handle(engine, settings, &body).await
        }
        "/v1/embeddings" => {
            post(route)?;
            let body = Body::from_value(body)?;
            check_model(&body, settings)?;
            embeddings::handle(engine, settings, &body).await
        }
        _ => Err(OpenAiError::not_found(
            None,
            format!("no OpenAI route {route} (served: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings)"),
        )),
    }
}

/// A `model` other than the served name is a 404, as OpenAI and vLLM answer.
fn check_model(body: &Body<'_>, settings: &OpenAiSettings) -> Result<(), OpenAiError> {
    match body.get::<String>("model")? {
        Some(model) if model != settings.served_model_name => Err(OpenAiError::not_found(
            Some("model"),
            format!(
                "The model `{model}` does not exist. This worker serves `{}`.",
                settings.served_model_name
            ),
        )),
        _ => Ok(()),
    }
}

fn models(engine: &Engine, settings: &OpenAiSettings) -> Value {
    let info = engine.info();
    json!({
        "object": "list",
        "data": [{
            "id": settings.served_model_name,
            "object": "model",
            "created": info.created,
            "owned_by": "worker-candle",
            "root": settings.served_model_name,
            "parent": null,
            "max_model_len": info.max_model_len,
            "permission": [],
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_normalize() {
        for r in [
            "/openai/v1/chat/completions",
            "/v1/chat/completions",
            "chat/completions",
            "/v1/chat/completions/",
        ] {
            assert_eq!(normalize_route(r), "/v1/chat/completions", "{r}");
        }
        assert_eq!(normalize_route("/v1/models?x=1"), "/v1/models");
    }

    #[test]
    fn stream_events_are_sse() {
        assert_eq!(
            StreamEvent::Data(json!({"a": 1})).sse(),
            "data: {\"a\":1}\n\n"
        );
        assert_eq!(StreamEvent::Done.sse(), "data: [DONE]\n\n");
        let e = StreamEvent::Error(OpenAiError::internal("x")).sse();
        assert!(e.starts_with("data: {\"error\":"));
    }

    #[test]
    fn an_unknown_model_is_404() {
        let settings = OpenAiSettings {
            served_model_name: "m".into(),
            response_role: "assistant".into(),
        };
        let body = json!({"model": "other"});
        let e = check_model(&Body(body.as_object().unwrap()), &settings).unwrap_err();
        assert_eq!((e.status, e.param.as_deref()), (404, Some("model")));
        let body = json!({"model": "m"});
        assert!(check_model(&Body(body.as_object().unwrap()), &settings).is_ok());
        assert!(check_model(&Body(&serde_json::Map::new()), &settings).is_ok());
    }
}
