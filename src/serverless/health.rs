//! Load-balancing endpoints: RunPod routes plain HTTP to the worker and asks `GET /ping` whether it
//! may (204 while the model loads, 200 once it is ready). The server listens before the model has
//! loaded; until then every other route answers 503 in its own error shape.

use std::sync::{Arc, OnceLock};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tower::ServiceExt;

use crate::api::error::{ApiError, ErrorKind};
use crate::api::openai::normalize_route;

/// The route RunPod's load balancer polls.
pub const PING_ROUTE: &str = "/ping";

const MESSAGES_ROUTE: &str = "/v1/messages";
const LOADING: &str = "the model is still loading; retry when GET /ping answers 200";

/// Whether the model is ready: empty while it loads, then the endpoint's router.
#[derive(Default)]
pub struct Readiness {
    ready: OnceLock<Router>,
}

impl Readiness {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// The model has loaded: requests go to `router` from now on (the first call wins).
    pub fn open(&self, router: Router) {
        let _ = self.ready.set(router);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.get().is_some()
    }

    /// The server's router: `/ping`, and every other route through to the endpoint once it is ready.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route(PING_ROUTE, get(ping))
            .fallback(forward)
            .with_state(self.clone())
    }

    /// The health port's router (`PORT_HEALTH` apart from `PORT`): `/ping` only.
    pub fn health_router(self: &Arc<Self>) -> Router {
        Router::new()
            .route(PING_ROUTE, get(ping))
            .with_state(self.clone())
    }
}

/// 204 while the model loads, 200 once it is ready (RunPod's protocol).
async fn ping(State(readiness): State<Arc<Readiness>>) -> Response {
    if readiness.is_ready() {
        (StatusCode::OK, Json(json!({"status": "healthy"}))).into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    }
}

async fn forward(State(readiness): State<Arc<Readiness>>, request: Request) -> Response {
    match readiness.ready.get() {
        Some(router) => match router.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        },
        None => loading(request.uri().path()),
    }
}

/// 503 in the route's shape: OpenAI's (Anthropic's on `/v1/messages`) under `/v1` and
/// `/openai/v1`, RunPod's `{"error": "..."}` elsewhere; `Retry-After` either way.
fn loading(path: &str) -> Response {
    let openai = path == "/v1"
        || path.starts_with("/v1/")
        || path == "/openai/v1"
        || path.starts_with("/openai/v1/");
    let body = if openai {
        let e = ApiError::new(ErrorKind::Unavailable, LOADING);
        let e = if normalize_route(path) == MESSAGES_ROUTE {
            e.in_anthropic_shape()
        } else {
            e
        };
        e.body()
    } else {
        json!({ "error": LOADING })
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(axum::http::header::RETRY_AFTER, "5")],
        Json(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    async fn call(router: &Router, path: &str) -> (u16, serde_json::Value) {
        let request = Request::builder().uri(path).body(Body::empty()).unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    #[tokio::test]
    async fn ping_answers_204_while_loading_then_200_and_routes_open() {
        let readiness = Readiness::new();
        let router = readiness.router();
        let health = readiness.health_router();
        assert_eq!(call(&router, "/ping").await.0, 204);
        assert_eq!(call(&health, "/ping").await.0, 204);
        let (status, body) = call(&router, "/v1/models").await;
        assert_eq!(status, 503);
        assert_eq!(body["error"]["type"], "ServiceUnavailableError", "{body}");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("loading"));
        let (status, body) = call(&router, "/openai/v1/chat/completions").await;
        assert_eq!(
            (status, body["error"]["type"].as_str()),
            (503, Some("ServiceUnavailableError"))
        );
        let (status, body) = call(&router, "/v1/messages").await;
        assert_eq!(
            (status, body["type"].as_str()),
            (503, Some("error")),
            "{body}"
        );
        let (status, body) = call(&router, "/runsync").await;
        assert_eq!(status, 503);
        assert!(body["error"].as_str().unwrap().contains("loading"));

        readiness.open(Router::new().route("/v1/models", get(|| async { "models" })));
        assert_eq!(call(&router, "/ping").await.0, 200);
        assert_eq!(call(&health, "/ping").await.0, 200);
        let request = Request::builder()
            .uri("/v1/models")
            .body(Body::empty())
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), 200);
        // The health port serves /ping only.
        assert_eq!(call(&health, "/v1/models").await.0, 404);
    }
}
