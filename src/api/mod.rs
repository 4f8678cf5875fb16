//! Front doors: translate OpenAI and native inputs into `engine::GenerateRequest` and the engine's
//! events back into their wire formats, with the serving side's one error type ([`error::ApiError`])
//! and the streamed-output batching policy. No HTTP server here: handlers are plain async functions
//! that the one router (`serverless::local`) and the queue worker both call.

pub mod error;
pub(crate) mod native;
pub mod openai;
pub mod stream_batch;
