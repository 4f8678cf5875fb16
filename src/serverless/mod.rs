//! The RunPod serverless runtime: the queue protocol, the job loop, the dynamic stream batching and the
//! local endpoint.

pub mod job;
pub mod stream_batch;
pub mod protocol;
pub mod worker;
