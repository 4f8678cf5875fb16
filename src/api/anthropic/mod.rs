//! The Anthropic-compatible API: `POST /v1/messages` (the Messages API), translated onto the OpenAI
//! front door's chat machinery; its errors come in Anthropic's shape
//! (`{"type": "error", "error": {"type", "message"}}`).

pub(crate) mod messages;

use axum::http::Method;
use serde_json::Value;

use crate::api::error::ApiError;
use crate::api::openai::params::Body;
use crate::api::openai::{for_model, OpenAiResponse, OpenAiSettings};
use crate::engine::Engine;

/// The route this front door serves (after `normalize_route`).
pub(crate) const MESSAGES_ROUTE: &str = "/v1/messages";

/// Answers one Messages request; every error is in Anthropic's shape.
pub(crate) async fn handle(
    engine: &Engine,
    settings: &OpenAiSettings,
    method: Method,
    body: Option<Value>,
) -> OpenAiResponse {
    let answer = async {
        if method != Method::POST {
            return Err(ApiError::method_not_allowed("/v1/messages takes POST"));
        }
        let body = Body::from_value(body.as_ref())?;
        let (engine, settings) = &for_model(&body, settings, engine)?;
        messages::handle(engine, settings, &body).await
    };
    match answer.await {
        Ok(OpenAiResponse::Error(e)) | Err(e) => OpenAiResponse::Error(e.in_anthropic_shape()),
        Ok(answer) => answer,
    }
}
