//! The OpenAI-compatible API: `/v1/models`, `/v1/completions`, `/v1/chat/completions`,
//! `/v1/embeddings`, `/v1/responses`.
//!
//! Transport-neutral: [`handle`] takes a route, a method and a JSON body and answers with a JSON
//! object, an error or a stream of chunk events, so the local HTTP server and the queue worker
//! (`openai_route` + `openai_input` jobs) share one implementation.

pub(crate) mod chat;
pub(crate) mod completions;
pub mod embeddings;
pub(crate) mod lora_adapters;
pub(crate) mod outcome;
pub(crate) mod params;
pub(crate) mod reasoning;
pub(crate) mod response_store;
pub(crate) mod responses;
pub(crate) mod shapes;
pub(crate) mod sse;
pub(crate) mod tools;

use axum::http::Method;
use futures::stream::BoxStream;
use serde_json::{json, Value};

use crate::api::error::ApiError;
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

/// One event of a streamed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// A chunk object (`chat.completion.chunk` or `text_completion`).
    Data(Value),
    /// A failure after the stream started, sent as `data: {"error": {...}}`.
    Error(ApiError),
    /// The end marker, `data: [DONE]`.
    Done,
}

impl StreamEvent {
    /// The event's `data:` payload (see [`sse`] for the framing).
    pub(crate) fn payload(&self) -> String {
        match self {
            Self::Data(v) => v.to_string(),
            Self::Error(e) => e.openai_body().to_string(),
            Self::Done => sse::DONE.to_string(),
        }
    }
}

/// The answer to one OpenAI request.
pub enum OpenAiResponse {
    /// The response object (status 200).
    Json(Value),
    /// A failure before anything was sent.
    Error(ApiError),
    Stream(BoxStream<'static, StreamEvent>),
}

impl std::fmt::Debug for OpenAiResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Json(body) => write!(f, "Json({body})"),
            Self::Error(e) => write!(f, "Error({e})"),
            Self::Stream(_) => write!(f, "Stream(..)"),
        }
    }
}

/// The one route normaliser, shared by the HTTP router and the queue's `openai_route`:
/// `/openai/v1/x`, `/v1/x`, `v1/x`, `x` and `/v1/x/` (query ignored) all name route `/v1/x`.
pub(crate) fn normalize_route(route: &str) -> String {
    let route = route
        .trim()
        .split('?')
        .next()
        .unwrap_or("")
        .trim_end_matches('/');
    let tail = route
        .strip_prefix("/openai")
        .unwrap_or(route)
        .trim_start_matches('/');
    let tail = match tail.strip_prefix("v1") {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest.trim_start_matches('/'),
        _ => tail,
    };
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
        Err(e) => OpenAiResponse::Error(e),
    }
}

async fn dispatch(
    engine: &Engine,
    settings: &OpenAiSettings,
    route: &str,
    method: Method,
    body: Option<&Value>,
) -> Result<OpenAiResponse, ApiError> {
    let post = |route: &str| {
        if method == Method::POST {
            Ok(())
        } else {
            Err(ApiError::method_not_allowed(format!("{route} takes POST")))
        }
    };
    match route {
        "/v1/models" => {
            if method != Method::GET {
                return Err(ApiError::method_not_allowed("/v1/models takes GET"));
            }
            Ok(OpenAiResponse::Json(models(engine, settings)))
        }
        "/v1/completions" => {
            post(route)?;
            let body = Body::from_value(body)?;
            let (engine, settings) = &for_model(&body, settings, engine)?;
            completions::handle(engine, settings, &body).await
        }
        "/v1/chat/completions" => {
            post(route)?;
            let body = Body::from_value(body)?;
            let (engine, settings) = &for_model(&body, settings, engine)?;
            chat::handle(engine, settings, &body).await
        }
        "/v1/embeddings" => {
            post(route)?;
            let body = Body::from_value(body)?;
            let (engine, settings) = &for_model(&body, settings, engine)?;
            embeddings::handle(engine, settings, &body).await
        }
        "/v1/load_lora_adapter" | "/v1/unload_lora_adapter" => {
            post(route)?;
            let body = Body::from_value(body)?;
            if route == "/v1/load_lora_adapter" {
                lora_adapters::load(engine, &body).await
            } else {
                lora_adapters::unload(engine, &body).await
            }
        }
        "/v1/responses" => {
            post(route)?;
            let body = Body::from_value(body)?;
            let (engine, settings) = &for_model(&body, settings, engine)?;
            responses::handle(engine, settings, &body).await
        }
        _ if route.starts_with("/v1/responses/") => {
            let id = &route["/v1/responses/".len()..];
            match method {
                Method::GET => responses::retrieve(id).map(OpenAiResponse::Json),
                Method::DELETE => responses::delete(id).map(OpenAiResponse::Json),
                _ => Err(ApiError::method_not_allowed(
                    "/v1/responses/{response_id} takes GET or DELETE",
                )),
            }
        }
        _ if route.starts_with("/v1/models/") => {
            if method != Method::GET {
                return Err(ApiError::method_not_allowed("/v1/models/{model} takes GET"));
            }
            model(engine, settings, &route["/v1/models/".len()..]).map(OpenAiResponse::Json)
        }
        _ => Err(ApiError::not_found(format!("no OpenAI route {route} (served: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/responses, /v1/messages)"),
        )),
    }
}

/// A `model` other than the served name is a 404, as OpenAI and vLLM answer.
#[cfg(test)]
pub(crate) fn check_model(body: &Body<'_>, settings: &OpenAiSettings) -> Result<(), ApiError> {
    match body.get::<String>("model")? {
        Some(model) if model != settings.served_model_name => Err(unknown_model(&model, settings)),
        _ => Ok(()),
    }
}

/// The engine and settings a request's `model` names: the base model's, or a LoRA adapter's (its
/// requests run with the adapter, and answers carry its name as `model`, as vLLM's do); any other
/// name is OpenAI's 404 (`model_not_found`).
pub(crate) fn for_model(
    body: &Body<'_>,
    settings: &OpenAiSettings,
    engine: &Engine,
) -> Result<(Engine, OpenAiSettings), ApiError> {
    let Some(model) = body.get::<String>("model")? else {
        return Ok((engine.clone(), settings.clone()));
    };
    if model == settings.served_model_name {
        return Ok((engine.clone(), settings.clone()));
    }
    match engine.with_adapter(&model) {
        Some(adapted) => Ok((
            adapted,
            OpenAiSettings {
                served_model_name: model,
                ..settings.clone()
            },
        )),
        None => Err(unknown_model(&model, settings)),
    }
}

fn unknown_model(model: &str, settings: &OpenAiSettings) -> ApiError {
    ApiError::not_found(format!(
        "The model `{model}` does not exist. This worker serves `{}`.",
        settings.served_model_name
    ))
    .with_param("model")
}

fn models(engine: &Engine, settings: &OpenAiSettings) -> Value {
    let mut data = vec![model_card(engine, settings)];
    data.extend(
        engine
            .adapters()
            .iter()
            .map(|a| adapter_card(engine, settings, a)),
    );
    json!({"object": "list", "data": data})
}

/// A LoRA adapter's card: vLLM's, `root` its path and `parent` the base model.
fn adapter_card(
    engine: &Engine,
    settings: &OpenAiSettings,
    a: &crate::engine::lora::AdapterInfo,
) -> Value {
    let info = engine.info();
    json!({
        "id": a.name,
        "object": "model",
        "created": info.created,
        "owned_by": "worker-candle",
        "root": a.path.display().to_string(),
        "parent": settings.served_model_name,
        "max_model_len": info.max_model_len,
        "permission": [],
    })
}

fn model_card(engine: &Engine, settings: &OpenAiSettings) -> Value {
    let info = engine.info();
    json!({
        "id": settings.served_model_name,
        "object": "model",
        "created": info.created,
        "owned_by": "worker-candle",
        "root": settings.served_model_name,
        "parent": null,
        "max_model_len": info.max_model_len,
        "permission": [],
    })
}

/// `GET /v1/models/{model}`: the served model's card; any other id is OpenAI's 404.
fn model(engine: &Engine, settings: &OpenAiSettings, id: &str) -> Result<Value, ApiError> {
    if id == settings.served_model_name {
        return Ok(model_card(engine, settings));
    }
    match engine.adapters().iter().find(|a| a.name == id) {
        Some(a) => Ok(adapter_card(engine, settings, a)),
        None => Err(unknown_model(id, settings)),
    }
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
        assert_eq!(normalize_route(" v1/models/ "), "/v1/models");
        assert_eq!(normalize_route("/openai/v1/models/"), "/v1/models");
        assert_eq!(normalize_route("/v1beta/models"), "/v1/v1beta/models");
    }

    #[test]
    fn stream_events_are_sse() {
        let sse = |e: StreamEvent| sse::frame(&e.payload());
        assert_eq!(
            sse(StreamEvent::Data(json!({"a": 1}))),
            "data: {\"a\":1}\n\n"
        );
        assert_eq!(sse(StreamEvent::Done), "data: [DONE]\n\n");
        let e = sse(StreamEvent::Error(ApiError::internal("x")));
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
        assert_eq!((e.status(), e.param()), (404, Some("model")));
        let body = json!({"model": "m"});
        assert!(check_model(&Body(body.as_object().unwrap()), &settings).is_ok());
        assert!(check_model(&Body(&serde_json::Map::new()), &settings).is_ok());
    }
}
