//! Shutdown on time: the real binary on a fixture model against a queue emulator that stalls each
//! kind of call (job-take, job-stream, job-done, ping). After SIGTERM the worker exits within
//! `GRACEFUL_SHUTDOWN_TIMEOUT` + 1 s, and still reports every job in flight exactly once where the
//! queue answers in time.

use std::time::{Duration, Instant};

use crate::common::emulator::{Emulator, Endpoint, Fault};
use crate::common::process::{fixture, Running};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(120);
/// `GRACEFUL_SHUTDOWN_TIMEOUT` of these tests, and the most the exit may take after SIGTERM.
const GRACE_S: u64 = 2;
const EXIT_WITHIN: Duration = Duration::from_secs(GRACE_S + 1);

fn start_worker(emulator: &Emulator, extra: &[(&str, &str)]) -> Running {
    let mut vars = emulator.env();
    vars.push(("MODEL_NAME".into(), fixture("llama").display().to_string()));
    vars.push(("KV_CACHE_MEMORY".into(), "64MiB".into()));
    vars.push(("GRACEFUL_SHUTDOWN_TIMEOUT".into(), GRACE_S.to_string()));
    vars.push(("RUNPOD_PING_INTERVAL".into(), "200".into()));
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Running::start(&vars, &[])
}

/// A streamed job that runs far longer than the tests.
fn long_job() -> Value {
    json!({"prompt": "Hello", "stream": true,
           "sampling_params": {"max_tokens": 100000, "ignore_eos": true}})
}

/// Waits until the emulator has seen `n` calls to `endpoint`.
async fn wait_calls(emulator: &Emulator, worker: &mut Running, endpoint: Endpoint, n: usize) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while emulator.calls_to(endpoint).len() < n {
        worker.assert_alive();
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} calls to {endpoint:?} expected; stderr:\n{}",
            worker.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGTERM, then the time to a successful exit (asserted within `EXIT_WITHIN`).
async fn terminate_in_time(worker: Running) -> Running {
    worker.terminate();
    let sent = Instant::now();
    let (status, took, worker) = tokio::task::spawn_blocking(move || {
        let mut worker = worker;
        let status = worker.wait(LIMIT);
        (status, sent.elapsed(), worker)
    })
    .await
    .unwrap();
    assert!(
        status.success(),
        "exit 0 after SIGTERM: {status:?}\n{}",
        worker.stderr()
    );
    assert!(
        took <= EXIT_WITHIN,
        "exited {took:?} after SIGTERM, more than GRACEFUL_SHUTDOWN_TIMEOUT + 1 s; stderr:\n{}",
        worker.stderr()
    );
    worker
}

fn shutting_down_error(result: &Value) -> Value {
    let text = result["error"]
        .as_str()
        .unwrap_or_else(|| panic!("an error result expected: {result}"));
    let error: Value = serde_json::from_str(text).expect("the error is a JSON object");
    assert_eq!(error["code"], 503, "{error}");
    error
}

/// The back-off after failed job-takes (1, 2, 4, 8 s ...) gives way to SIGTERM at once.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_the_take_back_off_exits_in_time() {
    let emulator = Emulator::start().await;
    emulator.faults(Endpoint::Take, Fault::Status(500), 20);
    let mut worker = start_worker(&emulator, &[]);
    // The fourth failure starts an 8 s pause.
    wait_calls(&emulator, &mut worker, Endpoint::Take, 4).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    terminate_in_time(worker).await;
}

/// Job-stream posts that never answer (and pings that never answer) hold neither the jobs nor the
/// exit: every job in flight is stopped before the deadline and reported once on job-done.
#[tokio::test(flavor = "multi_thread")]
async fn stalled_stream_posts_and_pings_still_report_every_job_once() {
    let emulator = Emulator::start().await;
    emulator.faults(Endpoint::Stream, Fault::Stall, 1000);
    emulator.faults(Endpoint::Ping, Fault::Stall, 1000);
    let mut worker = start_worker(&emulator, &[("MAX_CONCURRENCY", "3")]);
    let ids = ["a", "b", "c"];
    for id in ids {
        emulator.push_job(id, long_job());
    }
    wait_calls(&emulator, &mut worker, Endpoint::Stream, 3).await;
    wait_calls(&emulator, &mut worker, Endpoint::Ping, 1).await;
    terminate_in_time(worker).await;
    for id in ids {
        shutting_down_error(&emulator.result(id));
    }
}

/// A job-done post that never answers cannot hold the exit past the deadline; the job that could
/// report (its post answered) is reported exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_job_done_post_does_not_hold_the_exit() {
    let emulator = Emulator::start().await;
    // The first job-done post hangs; the next one is answered.
    emulator.fault(Endpoint::Done, Fault::Stall);
    let mut worker = start_worker(&emulator, &[("MAX_CONCURRENCY", "2")]);
    emulator.push_job(
        "quick",
        json!({"prompt": "Hello", "sampling_params": {"max_tokens": 2}}),
    );
    wait_calls(&emulator, &mut worker, Endpoint::Done, 1).await;
    // The second job's pieces hang too, so it is still running at SIGTERM.
    let streamed = emulator.calls_to(Endpoint::Stream).len();
    emulator.faults(Endpoint::Stream, Fault::Stall, 1000);
    emulator.push_job("long", long_job());
    wait_calls(&emulator, &mut worker, Endpoint::Stream, streamed + 1).await;
    terminate_in_time(worker).await;
    assert!(emulator.results("quick").is_empty(), "its post hung");
    shutting_down_error(&emulator.result("long"));
}

/// A job-take long-poll that never answers: SIGTERM does not wait for it, and the job in flight
/// is reported once.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_job_take_does_not_hold_the_exit() {
    let emulator = Emulator::start().await;
    emulator.faults(Endpoint::Stream, Fault::Stall, 1000);
    let mut worker = start_worker(&emulator, &[("MAX_CONCURRENCY", "2")]);
    emulator.push_job("long", long_job());
    wait_calls(&emulator, &mut worker, Endpoint::Stream, 1).await;
    // Every take from now on hangs.
    emulator.faults(Endpoint::Take, Fault::Stall, 1000);
    let takes = emulator.calls_to(Endpoint::Take).len();
    wait_calls(&emulator, &mut worker, Endpoint::Take, takes + 1).await;
    terminate_in_time(worker).await;
    shutting_down_error(&emulator.result("long"));
}
