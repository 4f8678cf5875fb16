//! Front doors: translate OpenAI and native inputs into `engine::GenerateRequest` and the engine's
//! events back into their wire formats. No HTTP server here: handlers are plain async functions that the
//! local server and the queue worker both call.

pub mod native;
pub mod openai;
