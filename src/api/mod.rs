//! Front doors: translate OpenAI and native inputs into `engine::GenerateRequest` and the engine's
//! events back into their wire formats, with the serving side's one error type ([`error::ApiError`])
//! and the streamed-output batching policy. No HTTP server here: handlers are plain async functions
//! that the one router (`serverless::local`) and the queue worker both call.

pub(crate) mod anthropic;
pub mod error;
pub(crate) mod native;
pub mod openai;
pub mod stream_batch;
pub(crate) mod structured;

/// Answers one request of the OpenAI-style routes: `/v1/messages` goes to the Anthropic front door,
/// every other route to the OpenAI one.
pub(crate) async fn handle(
    engine: &crate::engine::Engine,
    settings: &openai::OpenAiSettings,
    route: &str,
    method: axum::http::Method,
    body: Option<serde_json::Value>,
) -> openai::OpenAiResponse {
    if openai::normalize_route(route) == anthropic::MESSAGES_ROUTE {
        return anthropic::handle(engine, settings, method, body).await;
    }
    openai::handle(engine, settings, route, method, body).await
}
