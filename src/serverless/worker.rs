//! The queue worker's job loop: take as many jobs as there are free slots (`MAX_CONCURRENCY`), run
//! each to exactly one result, send the heartbeat, honour the job-stop channel, and shut down
//! gracefully.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::job::{run_job, Job, JobHandler, JobResult, Outcome, ResultSink, StopReason};
use super::protocol::{QueueClient, TakeOutcome};

/// Jobs running now, with the sender that stops each.
type Running = Arc<Mutex<HashMap<String, watch::Sender<Option<StopReason>>>>>;

pub struct Worker {
    client: Arc<QueueClient>,
    handler: Arc<dyn JobHandler>,
    max_concurrency: usize,
    shutdown_timeout: Duration,
    running: Running,
}

/// Posts a job's pieces to job-stream and its result to job-done (`isStream=true`: worker-vllm's
/// handler is a generator, so the SDK always reports it as a stream).
struct QueueSink {
    client: Arc<QueueClient>,
}

impl ResultSink for QueueSink {
    async fn piece(&self, job_id: &str, piece: &Value) {
        if let Err(e) = self
            .client
            .post_stream(job_id, &json!({ "output": piece }))
            .await
        {
            // The aggregate in job-done still carries this piece.
            tracing::error!(job_id, "streamed piece not delivered: {e}");
        }
    }

    async fn done(&self, job_id: &str, result: &JobResult) {
        if let Err(e) = self.client.post_done(job_id, &result.to_body(), true).await {
            tracing::error!(job_id, "job result not delivered: {e}");
        }
    }
}

impl Worker {
    pub fn new(
        client: QueueClient,
        handler: Arc<dyn JobHandler>,
        max_concurrency: usize,
        shutdown_timeout: Duration,
    ) -> Self {
        Self {
            client: Arc::new(client),
            handler,
            max_concurrency: max_concurrency.max(1),
            shutdown_timeout,
            running: Arc::default(),
        }
    }

    /// Serves jobs until `shutdown` resolves, then lets jobs in flight finish within the deadline and
    /// reports the rest as errors.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let slots = Arc::new(Semaphore::new(self.max_concurrency));
        let mut jobs = JoinSet::new();
        let mut background = JoinSet::new();
        if self.client.has_heartbeat() {
            background.spawn(heartbeat(self.client.clone(), self.running.clone()));
        }
        if self.client.has_stop_channel() {
            background.spawn(stop_listener(self.client.clone(), self.running.clone()));
        }
        tokio::pin!(shutdown);
        let timings = self.client.timings().clone();
        let mut error_backoff = timings.error_backoff;
        let mut pause: Option<Duration> = None;
        loop {
            // Reap finished jobs so the set does not grow without bound.
            while jobs.try_join_next().is_some() {}
            let first = tokio::select! {
                _ = &mut shutdown => break,
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let mut permits = vec![first];
            while let Ok(p) = slots.clone().try_acquire_owned() {
                permits.push(p);
            }
            let in_progress = !self
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty();
            let taken = tokio::select! {
                _ = &mut shutdown => break,
                taken = self.client.take(permits.len(), in_progress) => taken,
            };
            match taken {
                Ok(TakeOutcome::Jobs(taken_jobs)) => {
                    error_backoff = timings.error_backoff;
                    if taken_jobs.len() > permits.len() {
                        tracing::warn!(
                            "the queue handed out {} jobs for {} free slots; running them all",
                            taken_jobs.len(),
                            permits.len()
                        );
                    }
                    for job in taken_jobs {
                        let permit = permits.pop();
                        let (stop_tx, stop_rx) = watch::channel(None);
                        self.running
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(job.id.clone(), stop_tx);
                        let handler = self.handler.clone();
                        let sink = QueueSink {
                            client: self.client.clone(),
                        };
                        let running = self.running.clone();
                        jobs.spawn(async move {
                            run_one(&*handler, &job, &sink, stop_rx).await;
                            running
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(&job.id);
                            drop(permit);
                        });
                    }
                }
                Ok(TakeOutcome::NoJob) => {
                    drop(permits);
                    // The platform long-polls; this pause only spares a server that does not.
                    pause = Some(Duration::from_millis(100));
                }
                Ok(TakeOutcome::TooManyRequests) => {
                    drop(permits);
                    tracing::warn!(
                        "job-take answered 429; backing off {:?}",
                        timings.too_many_requests
                    );
                    pause = Some(timings.too_many_requests);
                }
                Err(e) => {
                    drop(permits);
                    tracing::error!("{e}; retrying in {error_backoff:?}");
                    pause = Some(error_backoff);
                    error_backoff = (error_backoff * 2).min(timings.error_backoff_max);
                }
            }
            // Every back-off gives way to a shutdown.
            if let Some(wait) = pause.take() {
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        self.drain(jobs).await;
        background.abort_all();
    }

    /// The shutdown: every wait from here ends by `GRACEFUL_SHUTDOWN_TIMEOUT`. Jobs in flight may
    /// finish until a reserve before that deadline (a quarter of it, at most 2 s); the rest are
    /// stopped then and report their error in the reserve. Queue calls are cut to the deadline, and
    /// whatever has not ended by it is dropped (its result could not be delivered in time).
    async fn drain(&self, mut jobs: JoinSet<()>) {
        let hard = tokio::time::Instant::now() + self.shutdown_timeout;
        self.client.set_deadline(hard);
        let reserve = (self.shutdown_timeout / 4).min(Duration::from_secs(2));
        let in_flight = jobs.len();
        if in_flight == 0 {
            return;
        }
        tracing::info!(
            in_flight,
            "shutting down: waiting up to {:?} for jobs in flight",
            self.shutdown_timeout - reserve
        );
        if finish_by(&mut jobs, hard - reserve).await {
            return;
        }
        let stopped: Vec<String> = {
            let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            for stop in running.values() {
                let _ = stop.send(Some(StopReason::ShuttingDown));
            }
            running.keys().cloned().collect()
        };
        tracing::warn!(
            ?stopped,
            "shutdown deadline near; reporting unfinished jobs as errors"
        );
        if finish_by(&mut jobs, hard).await {
            return;
        }
        tracing::error!(
            unreported = ?running_ids(&self.running),
            "shutdown deadline passed before the queue took these jobs' results"
        );
        jobs.shutdown().await;
    }
}

/// Waits for every job until `at`; whether all ended.
async fn finish_by(jobs: &mut JoinSet<()>, at: tokio::time::Instant) -> bool {
    loop {
        tokio::select! {
            next = jobs.join_next() => if next.is_none() { return true },
            _ = tokio::time::sleep_until(at) => return false,
        }
    }
}

async fn run_one(
    handler: &dyn JobHandler,
    job: &Job,
    sink: &QueueSink,
    stop: super::job::StopSignal,
) {
    let started = std::time::Instant::now();
    tracing::info!(job_id = %job.id, "job started");
    let outcome = run_job(handler, job, sink, stop).await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match outcome {
        Outcome::Completed => tracing::info!(job_id = %job.id, elapsed_ms, "job completed"),
        other => tracing::warn!(job_id = %job.id, elapsed_ms, "job {}", other.as_str()),
    }
}

fn running_ids(running: &Running) -> Vec<String> {
    let mut ids: Vec<String> = running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect();
    ids.sort();
    ids
}

async fn heartbeat(client: Arc<QueueClient>, running: Running) {
    let interval = client.timings().ping_interval;
    loop {
        if let Err(e) = client.ping(&running_ids(&running)).await {
            tracing::warn!("heartbeat: {e}");
        }
        tokio::time::sleep(interval).await;
    }
}

fn cancel(running: &Running, ids: &[String]) {
    let running = running.lock().unwrap_or_else(|e| e.into_inner());
    for id in ids {
        if let Some(stop) = running.get(id) {
            tracing::info!(job_id = %id, "job-stop: cancelling");
            let _ = stop.send(Some(StopReason::Cancelled));
        }
    }
}

async fn stop_listener(client: Arc<QueueClient>, running: Running) {
    let mut backoff = Duration::from_secs(1);
    loop {
        match client.poll_stop().await {
            Ok(ids) => {
                backoff = Duration::from_secs(1);
                cancel(&running, &ids);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                tracing::debug!("{e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}
