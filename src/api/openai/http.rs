//! The OpenAI routes as an axum `Router` (`/models`, `/completions`, `/chat/completions`, to be
//! nested under `/v1` and `/openai/v1`), answering through [`super::handle`].

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::Value;

use super::{handle, OpenAiError, OpenAiResponse, OpenAiSettings};
use crate::engine::Engine;

/// What the routes share.
#[derive(Clone)]
pub struct OpenAiState {
    pub engine: Engine,
    pub settings: Arc<OpenAiSettings>,
}

/// `/models`, `/completions` and `/chat/completions`; nest it under `/v1` (and `/openai/v1`).
pub fn router(state: OpenAiState) -> Router {
    Router::new()
        .route("/models", get(serve))
        .route("/completions", post(serve))
        .route("/chat/completions", post(serve))
        .route("/embeddings", post(serve))
        .fallback(not_found)
        .with_state(state)
}

async fn not_found(request: Request) -> Response {
    let e = OpenAiError::not_found(None, format!("no route {}", request.uri().path()));
    into_response(OpenAiResponse::error(&e))
}

async fn serve(State(state): State<OpenAiState>, request: Request) -> Response {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    let body = if method == Method::POST {
        match read_json(request).await {
            Ok(body) => Some(body),
            Err(e) => return into_response(OpenAiResponse::error(&e)),
        }
    } else {
        None
    };
    // Nesting strips the prefix; the last path segments name the route.
    let route = if path.ends_with("/chat/completions") {
        "/v1/chat/completions"
    } else if path.ends_with("/completions") {
        "/v1/completions"
    } else if path.ends_with("/embeddings") {
        "/v1/embeddings"
    } else {
        "/v1/models"
    };
    into_response(handle(&state.engine, &state.settings, route, method, body).await)
}

async fn read_json(request: Request) -> Result<Value, OpenAiError> {
    let bytes = axum::body::to_bytes(request.into_body(), 64 << 20)
        .await
        .map_err(|e| OpenAiError::bad_request(None, format!("cannot read the body: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| OpenAiError::bad_request(None, format!("the body is not valid JSON: {e}")))
}

/// JSON with its status, or `text/event-stream` with one SSE event per chunk.
pub fn into_response(response: OpenAiResponse) -> Response {
    match response {
        OpenAiResponse::Json { status, body } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (status, Json(body)).into_response()
        }
        OpenAiResponse::Stream(events) => {
            let body = events.map(|e| Ok::<_, std::convert::Infallible>(Bytes::from(e.sse())));
            Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .header(header::CACHE_CONTROL, "no-cache")
                .body(Body::from_stream(body))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
    }
}
