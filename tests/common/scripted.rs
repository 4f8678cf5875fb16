//! A scripted job handler standing in for the model in tests of the job plumbing: the job's input
//! says what to yield.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use worker_candle::api::error::ApiError;
use worker_candle::serverless::job::{Job, JobHandler, PieceStream};

/// Yields `pieces` strings `"p0"`, `"p1"`, ... with `delay_ms` between them; `forever` never ends;
/// `fail` ends with that error. Counts how many jobs run at once.
#[derive(Default)]
pub struct Scripted {
    pub running: AtomicUsize,
    pub peak: AtomicUsize,
}

struct Guard(Arc<Scripted>);
impl Drop for Guard {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Handler(pub Arc<Scripted>);

impl JobHandler for Handler {
    fn handle(&self, job: &Job) -> PieceStream {
        // OpenAI-shaped jobs carry the script in their body.
        let input = match job.input.get("openai_input") {
            Some(body) => body.clone(),
            None => job.input.clone(),
        };
        let counters = self.0.clone();
        async_stream::stream! {
            let now = counters.running.fetch_add(1, Ordering::SeqCst) + 1;
            counters.peak.fetch_max(now, Ordering::SeqCst);
            let _guard = Guard(counters.clone());
            let pieces = input["pieces"].as_u64().unwrap_or(1);
            let delay = Duration::from_millis(input["delay_ms"].as_u64().unwrap_or(0));
            for i in 0..pieces {
                tokio::time::sleep(delay).await;
                yield Ok(json!(format!("p{i}")));
            }
            if input["forever"] == json!(true) {
                futures::future::pending::<()>().await;
            }
            if let Some(message) = input["fail"].as_str() {
                yield Err(ApiError::bad_request(message));
            }
        }
        .boxed()
    }
}
