//! The RunPod serverless runtime: the queue protocol, the job loop, the dynamic stream batching and the
//! local endpoint.

pub mod handler;
pub mod health;
pub mod job;
pub mod local;
pub mod metrics;
pub(crate) mod openai_bridge;
pub mod protocol;
pub(crate) mod routing;
pub mod worker;
