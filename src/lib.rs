//! worker-candle: a serverless LLM worker on candle.
//!
//! Data flows one way: queue → job (`serverless`) → request (`api`) → `engine` → deltas → stream
//! batches → queue (or HTTP).

pub mod api;
pub mod batch;
pub mod config;
pub mod engine;
pub mod hub;
pub mod serverless;
