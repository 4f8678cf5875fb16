//! One job from start to result, the same for the queue, the local endpoint and `--test-input`: a
//! handler turns the job's input into a stream of output pieces; [`run_job`] posts each piece to a
//! [`ResultSink`] and ends with exactly one final result (the aggregate of the pieces, or an error).

use std::future::Future;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::watch;

use crate::api::error::{ApiError, ErrorKind};

/// A job as the queue hands it out. Other top-level fields (`webhook`, `policy`, ...) are kept.
#[derive(Debug, Clone, Deserialize)]
pub struct Job {
    pub id: String,
    pub input: Value,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A job's output pieces, in order; an `Err` ends the job. Dropping the stream cancels the work.
pub type PieceStream = BoxStream<'static, Result<Value, ApiError>>;

/// Turns a job into its output pieces.
pub trait JobHandler: Send + Sync + 'static {
    fn handle(&self, job: &Job) -> PieceStream;
}

/// How a job ended, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Failed,
    Cancelled,
    TimedOut,
}

impl Outcome {
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
        }
    }
}

/// The final result: `{"output": [pieces]}` or `{"error": "<text>"}` (RunPod's job-done body).
#[derive(Debug, Clone, PartialEq)]
pub enum JobResult {
    Output(Vec<Value>),
    Error(ApiError),
}

impl JobResult {
    pub(crate) fn outcome(&self) -> Outcome {
        match self {
            Self::Output(_) => Outcome::Completed,
            Self::Error(e) => match e.kind() {
                ErrorKind::Cancelled => Outcome::Cancelled,
                ErrorKind::TimedOut => Outcome::TimedOut,
                _ => Outcome::Failed,
            },
        }
    }

    pub fn to_body(&self) -> Value {
        match self {
            Self::Output(pieces) => json!({ "output": pieces }),
            Self::Error(e) => json!({ "error": e.runpod_text() }),
        }
    }
}

/// Where a job's pieces and result go.
pub trait ResultSink: Send + Sync {
    fn piece(&self, job_id: &str, piece: &Value) -> impl Future<Output = ()> + Send;
    fn done(&self, job_id: &str, result: &JobResult) -> impl Future<Output = ()> + Send;
}

/// Why a running job must stop early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Cancelled,
    ShuttingDown,
}

/// A receiver that says when a job must stop; `None` while it may run.
pub(crate) type StopSignal = watch::Receiver<Option<StopReason>>;

/// Runs one job to its end and posts its single result: the aggregate of its pieces, or the error
/// that ended it.
pub async fn run_job<S: ResultSink>(
    handler: &dyn JobHandler,
    job: &Job,
    sink: &S,
    mut stop: StopSignal,
) -> Outcome {
    let mut pieces = handler.handle(job);
    let mut aggregate = Vec::new();
    let limit = execution_timeout(job);
    let deadline = tokio::time::sleep(limit.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);
    let result = loop {
        let next = tokio::select! {
            biased;
            _ = &mut deadline, if limit.is_some() => {
                break JobResult::Error(ApiError::timed_out(limit.unwrap_or_default()));
            }
            reason = wait_for_stop(&mut stop) => break stopped_result(reason),
            next = pieces.next() => next,
        };
        match next {
            None => break JobResult::Output(aggregate),
            Some(Err(e)) => break JobResult::Error(e),
            Some(Ok(piece)) => {
                // A slow post must not hold a stop: the job's result says how it ended.
                let stopped = tokio::select! {
                    biased;
                    reason = wait_for_stop(&mut stop) => Some(reason),
                    _ = sink.piece(&job.id, &piece) => None,
                };
                if let Some(reason) = stopped {
                    break stopped_result(reason);
                }
                aggregate.push(piece);
            }
        }
    };
    // Cancel the engine's work before the (possibly slow) final post.
    drop(pieces);
    let outcome = result.outcome();
    sink.done(&job.id, &result).await;
    outcome
}

fn stopped_result(reason: StopReason) -> JobResult {
    match reason {
        StopReason::Cancelled => JobResult::Error(ApiError::cancelled()),
        StopReason::ShuttingDown => JobResult::Error(ApiError::shutting_down()),
    }
}

/// The job's `policy.executionTimeout` (milliseconds), as RunPod's request policy spells it.
pub(crate) fn execution_timeout(job: &Job) -> Option<Duration> {
    let ms = job.extra.get("policy")?.get("executionTimeout")?.as_u64()?;
    (ms > 0).then(|| Duration::from_millis(ms))
}

async fn wait_for_stop(stop: &mut StopSignal) -> StopReason {
    loop {
        if let Some(reason) = *stop.borrow_and_update() {
            return reason;
        }
        if stop.changed().await.is_err() {
            // The sender is gone: nobody can stop this job any more.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Pieces(Vec<Result<Value, ApiError>>);
    impl JobHandler for Pieces {
        fn handle(&self, _job: &Job) -> PieceStream {
            futures::stream::iter(self.0.clone()).boxed()
        }
    }

    #[derive(Default)]
    struct Recorder {
        pieces: Mutex<Vec<Value>>,
        results: Mutex<Vec<JobResult>>,
    }
    impl ResultSink for Recorder {
        async fn piece(&self, _job_id: &str, piece: &Value) {
            self.pieces.lock().unwrap().push(piece.clone());
        }
        async fn done(&self, _job_id: &str, result: &JobResult) {
            self.results.lock().unwrap().push(result.clone());
        }
    }

    fn job() -> Job {
        serde_json::from_value(json!({"id": "j1", "input": {}, "webhook": "x"})).unwrap()
    }

    #[tokio::test]
    async fn pieces_are_posted_and_aggregated_once() {
        let handler = Pieces(vec![Ok(json!("a")), Ok(json!({"b": 1}))]);
        let sink = Recorder::default();
        let (_tx, rx) = watch::channel(None);
        let outcome = run_job(&handler, &job(), &sink, rx).await;
        assert_eq!(outcome, Outcome::Completed);
        assert_eq!(
            *sink.pieces.lock().unwrap(),
            vec![json!("a"), json!({"b": 1})]
        );
        let results = sink.results.lock().unwrap();
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].to_body(), json!({"output": ["a", {"b": 1}]}));
    }

    #[tokio::test]
    async fn an_error_ends_the_job_with_that_error() {
        let handler = Pieces(vec![
            Ok(json!("a")),
            Err(ApiError::bad_request("bad")),
            Ok(json!("never")),
        ]);
        let sink = Recorder::default();
        let (_tx, rx) = watch::channel(None);
        assert_eq!(run_job(&handler, &job(), &sink, rx).await, Outcome::Failed);
        assert_eq!(sink.pieces.lock().unwrap().len(), 1);
        let results = sink.results.lock().unwrap();
        assert_eq!(
            *results,
            vec![JobResult::Error(ApiError::bad_request("bad"))]
        );
        let body = results[0].to_body();
        let text = body["error"].as_str().unwrap();
        let parsed: Value = serde_json::from_str(text).unwrap();
        assert_eq!(parsed["message"], "bad");
    }

    #[tokio::test]
    async fn a_stop_signal_ends_a_job_that_never_finishes() {
        struct Forever;
        impl JobHandler for Forever {
            fn handle(&self, _job: &Job) -> PieceStream {
                futures::stream::pending().boxed()
            }
        }
        let sink = Recorder::default();
        let (tx, rx) = watch::channel(None);
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            tx.send(Some(StopReason::Cancelled)).unwrap();
            tx
        });
        assert_eq!(
            run_job(&Forever, &job(), &sink, rx).await,
            Outcome::Cancelled
        );
        drop(stopper.await.unwrap());
        assert_eq!(
            *sink.results.lock().unwrap(),
            vec![JobResult::Error(ApiError::cancelled())]
        );
    }

    #[tokio::test]
    async fn the_execution_timeout_of_the_policy_ends_a_job() {
        struct Forever;
        impl JobHandler for Forever {
            fn handle(&self, _job: &Job) -> PieceStream {
                futures::stream::pending().boxed()
            }
        }
        let sink = Recorder::default();
        let (_tx, rx) = watch::channel(None);
        let job: Job = serde_json::from_value(
            json!({"id": "t", "input": {}, "policy": {"executionTimeout": 30}}),
        )
        .unwrap();
        assert_eq!(run_job(&Forever, &job, &sink, rx).await, Outcome::TimedOut);
        let results = sink.results.lock().unwrap();
        assert!(matches!(&results[0], JobResult::Error(e) if e.status() == 408));
    }

    #[tokio::test]
    async fn a_stop_is_not_held_by_a_piece_post_that_never_answers() {
        struct Hung(Recorder);
        impl ResultSink for Hung {
            async fn piece(&self, _job_id: &str, _piece: &Value) {
                std::future::pending::<()>().await;
            }
            async fn done(&self, job_id: &str, result: &JobResult) {
                self.0.done(job_id, result).await;
            }
        }
        let handler = Pieces(vec![Ok(json!("a")), Ok(json!("b"))]);
        let sink = Hung(Recorder::default());
        let (tx, rx) = watch::channel(None);
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            tx.send(Some(StopReason::ShuttingDown)).unwrap();
            tx
        });
        assert_eq!(run_job(&handler, &job(), &sink, rx).await, Outcome::Failed);
        drop(stopper.await.unwrap());
        assert_eq!(
            *sink.0.results.lock().unwrap(),
            vec![JobResult::Error(ApiError::shutting_down())]
        );
    }

    #[test]
    fn jobs_keep_unknown_fields() {
        let j = job();
        assert_eq!(j.extra.get("webhook"), Some(&json!("x")));
    }
}
