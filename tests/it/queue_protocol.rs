//! The job loop and the queue protocol against the emulator over real HTTP, with a scripted job
//! handler standing in for the model (the handler's input says how many pieces to yield and how
//! slowly), so these tests pin the protocol itself: URLs, headers, batch take, streaming posts,
//! exactly-once results under faults, concurrency, job-stop, heartbeat and shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::common::emulator::{Emulator, Endpoint, Fault};
use crate::common::scripted::{Handler, Scripted};
use serde_json::{json, Value};
use worker_candle::config::Config;
use worker_candle::serverless::protocol::{QueueClient, QueueUrls, Timings};
use worker_candle::serverless::worker::Worker;

struct Setup {
    emulator: Emulator,
    scripted: Arc<Scripted>,
    shutdown: tokio::sync::oneshot::Sender<()>,
    worker: tokio::task::JoinHandle<()>,
}

async fn setup(extra: &[(&str, &str)], shutdown_timeout: Duration) -> Setup {
    let emulator = Emulator::start().await;
    let mut vars = emulator.env();
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let config = Config::from_vars(vars).expect("config");
    let urls = QueueUrls::from_config(&config.runpod, "pod-1").expect("urls");
    let mut timings = Timings::new(config.runpod.ping_interval);
    timings.retry_base = Duration::from_millis(50);
    timings.post = Duration::from_secs(2);
    timings.too_many_requests = Duration::from_millis(400);
    timings.error_backoff = Duration::from_millis(100);
    let client = QueueClient::new(urls, config.runpod.api_key.as_ref(), timings).expect("client");
    let scripted = Arc::new(Scripted::default());
    let worker = Worker::new(
        client,
        Arc::new(Handler(scripted.clone())),
        config.max_concurrency,
        shutdown_timeout,
    );
    let (shutdown, rx) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(worker.run(async move {
        let _ = rx.await;
    }));
    Setup {
        emulator,
        scripted,
        shutdown,
        worker,
    }
}

const LONG: Duration = Duration::from_secs(20);

#[tokio::test]
async fn single_job_urls_headers_and_result() {
    let s = setup(&[("MAX_CONCURRENCY", "1")], LONG).await;
    s.emulator.push_job("job-a", json!({"pieces": 2}));
    s.emulator.wait_answered(1, LONG).await;

    let takes = s.emulator.calls_to(Endpoint::Take);
    let first = &takes[0];
    assert!(
        first.uri.starts_with("/v2/job-take/pod-1?gpu=TEST"),
        "{}",
        first.uri
    );
    assert_eq!(first.query("job_in_progress").as_deref(), Some("0"));
    assert_eq!(first.authorization.as_deref(), Some("test-key"));

    let streams = s.emulator.calls_to(Endpoint::Stream);
    assert_eq!(streams.len(), 2);
    for call in &streams {
        assert!(
            call.uri.starts_with("/v2/job-stream/pod-1/job-a?gpu=TEST"),
            "{}",
            call.uri
        );
        assert_eq!(call.query("isStream").as_deref(), Some("false"));
        assert_eq!(call.request_id.as_deref(), Some("job-a"));
        assert_eq!(call.authorization.as_deref(), Some("test-key"));
    }
    assert_eq!(
        s.emulator.streamed("job-a"),
        vec![json!({"output": "p0"}), json!({"output": "p1"})]
    );

    let done = s.emulator.calls_to(Endpoint::Done);
    assert_eq!(done.len(), 1);
    assert!(done[0].uri.starts_with("/v2/job-done/pod-1/job-a?gpu=TEST"));
    assert_eq!(done[0].request_id.as_deref(), Some("job-a"));
    let results = s.emulator.results("job-a");
    assert_eq!(
        results,
        vec![(json!({"output": ["p0", "p1"]}), "true".to_string())]
    );
    s.shutdown.send(()).unwrap();
    s.worker.await.unwrap();
}

#[tokio::test]
async fn batch_take_asks_for_free_slots_and_never_exceeds_concurrency() {
    let s = setup(&[("MAX_CONCURRENCY", "3")], LONG).await;
    for i in 0..9 {
        s.emulator.push_job(
            &format!("j{i}"),
            json!({"pieces": 3, "delay_ms": 30 * (i % 3 + 1)}),
        );
    }
    s.emulator.wait_answered(9, LONG).await;
    for i in 0..9 {
        assert_eq!(
            s.emulator.result(&format!("j{i}")),
            json!({"output": ["p0", "p1", "p2"]})
        );
    }
    assert_eq!(s.scripted.peak.load(Ordering::SeqCst), 3);
    let takes = s.emulator.calls_to(Endpoint::Take);
    let first = &takes[0];
    assert!(
        first.uri.starts_with("/v2/job-take-batch/pod-1?gpu=TEST"),
        "{}",
        first.uri
    );
    assert_eq!(first.query("batch_size").as_deref(), Some("3"));
    for call in &takes {
        let asked: usize = call
            .query("batch_size")
            .map(|n| n.parse().unwrap())
            .unwrap_or(1);
        assert!(asked <= 3);
    }
    assert!(
        takes
            .iter()
            .any(|c| c.query("job_in_progress").as_deref() == Some("1")),
        "a take while jobs run says job_in_progress=1"
    );
    s.shutdown.send(()).unwrap();
    s.worker.await.unwrap();
}

#[tokio::test]
async fn faults_still_answer_every_job_exactly_once() {
    let s = setup(&[("MAX_CONCURRENCY", "2")], LONG).await;
    s.emulator.fault(Endpoint::Take, Fault::Status(500));
    s.emulator.fault(Endpoint::Take, Fault::Drop);
    s.emulator
        .fault(Endpoint::Take, Fault::Delay(Duration::from_millis(300)));
    s.emulator.fault(Endpoint::Done, Fault::Status(500));
    s.emulator.fault(Endpoint::Done, Fault::Drop);
    s.emulator.fault(Endpoint::Done, Fault::Status(503));
    s.emulator.fault(Endpoint::Stream, Fault::Drop);
    s.emulator
        .fault(Endpoint::Stream, Fault::Delay(Duration::from_millis(200)));
    for i in 0..4 {
        s.emulator.push_job(&format!("f{i}"), json!({"pieces": 2}));
    }
    s.emulator.wait_answered(4, Duration::from_secs(30)).await;
    for i in 0..4 {
        let id = format!("f{i}");
        assert_eq!(s.emulator.result(&id), json!({"output": ["p0", "p1"]}));
        // The dropped stream post was retried: every piece arrived once.
        assert_eq!(
            s.emulator.streamed(&id),
            vec![json!({"output": "p0"}), json!({"output": "p1"})]
        );
    }
    let faulted_done = s
        .emulator
        .calls_to(Endpoint::Done)
        .iter()
        .filter(|c| c.fault.is_some())
        .count();
    assert_eq!(
        faulted_done, 3,
        "each injected job-done fault was hit and retried"
    );
    s.shutdown.send(()).unwrap();
    s.worker.await.unwrap();
}

#[tokio::test]
async fn a_failing_job_reports_its_error_and_the_worker_keeps_serving() {
    let s = setup(&[("MAX_CONCURRENCY", "1")], LONG).await;
    s.emulator
        .push_job("bad", json!({"pieces": 1, "fail": "no good"}));
    s.emulator.push_job("good", json!({"pieces": 1}));
    s.emulator.wait_answered(2, LONG).await;
    let bad = s.emulator.result("bad");
    let error: Value = serde_json::from_str(bad["error"].as_str().unwrap()).unwrap();
    assert_eq!(
        error,
        json!({"message": "no good", "type": "BadRequestError", "code": 400})
    );
    assert_eq!(s.emulator.result("good"), json!({"output": ["p0"]}));
    s.shutdown.send(()).unwrap();
    s.worker.await.unwrap();
}

#[tokio::test]
async fn job_stop_cancels_a_running_job() {
    let s = setup(&[("MAX_CONCURRENCY", "2")], LONG).await;
    s.emulator
        .push_job("endless", json!({"pieces": 1, "forever": true}));
    // Wait until it has started streaming, then stop it.
    let deadline = tokio::time::Instant::now() + LONG;
    while s.emulator.streamed("endless").is_empty() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.emulator.stop_job("endless");
    s.emulator.wait_answered(1, LONG).await;
    let result = s.emulator.result("endless");
    let error: Value = serde_json::from_str(result["error"].as_str().unwrap()).unwrap();
    assert_eq!(error["type"], "CancelledError");
    assert!(s
        .emulator
        .calls_to(Endpoint::Stop)
        .iter()
        .all(|c| c.uri.starts_with("/v2/job-stop/pod-1?gpu=TEST")));
    assert_eq!(
        s.scripted.running.load(Ordering::SeqCst),
        0,
        "the handler's work was dropped"
    );
    s.shutdown.send(()).unwrap();
    s.worker.await.unwrap();
}

#[tokio::test]
async fn heartbeat_carries_the_jobs_in_progress() {
    let s = setup(
        &[("MAX_CONCURRENCY", "2"), ("RUNPOD_PING_INTERVAL", "50")],
        LONG,
    )
    .await;
    s.emulator
        .push_job("slow", json!({"pieces": 4, "delay_ms": 100}));
    s.emulator.wait_answered(1, LONG).await;
    let pings = s.emulator.calls_to(Endpoint::Ping);
    assert!(pings.len() >= 3, "{pings:?}");
    for ping in &pings {
        assert!(
            ping.uri.starts_with("/v2/ping/pod-1?gpu=TEST"),
            "{}",
            ping.uri
        );
        assert_eq!(ping.authorization.as_deref(), Some("test-key"));
        assert!(ping.query("runpod_version").is_some());
    }
    assert!(pings
        .iter()
        .any(|p| p.query("job_id").as_deref() == Some("slow")));
    s.shutdown.send(()).unwrap();
    s.worker.await.unwrap();
}

#[tokio::test]
async fn shutdown_finishes_quick_jobs_and_reports_the_rest() {
    let s = setup(&[("MAX_CONCURRENCY", "2")], Duration::from_millis(600)).await;
    s.emulator
        .push_job("quick", json!({"pieces": 2, "delay_ms": 100}));
    s.emulator
        .push_job("endless", json!({"pieces": 1, "forever": true}));
    let deadline = tokio::time::Instant::now() + LONG;
    while s.scripted.running.load(Ordering::SeqCst) < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.shutdown.send(()).unwrap();
    tokio::time::timeout(LONG, s.worker).await.unwrap().unwrap();
    assert_eq!(s.emulator.result("quick"), json!({"output": ["p0", "p1"]}));
    let endless = s.emulator.result("endless");
    let error: Value = serde_json::from_str(endless["error"].as_str().unwrap()).unwrap();
    assert_eq!(error["code"], 503);
    let takes_after = s.emulator.calls_to(Endpoint::Take).len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.emulator.calls_to(Endpoint::Take).len(),
        takes_after,
        "no takes after shutdown"
    );
}

#[tokio::test]
async fn a_job_without_an_id_is_skipped_and_the_rest_are_served() {
    let s = setup(&[("MAX_CONCURRENCY", "1")], LONG).await;
    s.emulator.push_raw_job(json!({"input": {"pieces": 1}}));
    s.emulator.push_job("ok", json!({"pieces": 1}));
    s.emulator.wait_answered(1, LONG).await;
    assert_eq!(s.emulator.result("ok"), json!({"output": ["p0"]}));
    s.shutdown.send(()).unwrap();
    s.worker.await.unwrap();
}

#[tokio::test]
async fn take_answers_429_back_off_and_400_means_no_job() {
    let s = setup(&[("MAX_CONCURRENCY", "1")], LONG).await;
    s.emulator.fault(Endpoint::Take, Fault::Status(429));
    s.emulator.fault(Endpoint::Take, Fault::Status(400));
    s.emulator.push_job("after", json!({"pieces": 1}));
    s.emulator.wait_answered(1, LONG).await;
    assert_eq!(s.emulator.result("after"), json!({"output": ["p0"]}));
    let takes = s.emulator.calls_to(Endpoint::Take);
    assert_eq!(takes[0].fault, Some(Fault::Status(429)));
    assert_eq!(takes[1].fault, Some(Fault::Status(400)));
    let gap = takes[1].at.duration_since(takes[0].at);
    assert!(gap >= Duration::from_millis(400), "429 backs off: {gap:?}");
    let quick = takes[2].at.duration_since(takes[1].at);
    assert!(
        quick < Duration::from_millis(400),
        "400 is just 'no job': {quick:?}"
    );
    s.shutdown.send(()).unwrap();
    s.worker.await.unwrap();
}
