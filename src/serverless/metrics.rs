//! The worker's metrics on the `metrics` crate, exported two ways: Prometheus text
//! (`metrics-exporter-prometheus`, as TGI does) for `GET /metrics` of `serve`, and a periodic stats log
//! line like vLLM's (`Avg prompt throughput: ... Running: N reqs ...`) in every mode, silenced by
//! `DISABLE_LOG_STATS`. Requests by route and outcome, tokens in and out, queue depth, the engine's
//! sequences and KV cache, time-to-first-token and latency histograms.
//!
//! Each `Metrics` owns its recorder (no global one), so endpoints in one process do not share counts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metrics::{Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

use crate::engine::Engine;

/// Seconds; the same buckets serve both histograms (a first token to a long answer).
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

const REQUESTS: &str = "worker_candle_requests_total";
const PROMPT_TOKENS: &str = "worker_candle_prompt_tokens_total";
const GENERATION_TOKENS: &str = "worker_candle_generation_tokens_total";
const QUEUE_DEPTH: &str = "worker_candle_queue_depth";
const RUNNING: &str = "worker_candle_requests_running";
const TTFT: &str = "worker_candle_time_to_first_token_seconds";
const LATENCY: &str = "worker_candle_request_duration_seconds";
const ENGINE_RUNNING: &str = "worker_candle_engine_sequences_running";
const ENGINE_WAITING: &str = "worker_candle_engine_sequences_waiting";
const KV_USAGE: &str = "worker_candle_kv_cache_usage_ratio";
const PREEMPTIONS: &str = "worker_candle_preemptions_total";
const SPEC_DRAFT: &str = "worker_candle_spec_decode_draft_tokens_total";
const SPEC_ACCEPTED: &str = "worker_candle_spec_decode_accepted_tokens_total";
const SPEC_STEPS: &str = "worker_candle_spec_decode_verify_steps_total";
const FORCED_DRAFT: &str = "worker_candle_structured_forced_draft_tokens_total";
const FORCED: &str = "worker_candle_structured_forced_tokens_total";

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

pub struct Metrics {
    recorder: PrometheusRecorder,
    /// Token totals for the stats line's throughput (the recorder's counters are write-only).
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    /// The engine whose sequences and KV cache are reported.
    engine: OnceLock<Engine>,
}

impl Default for Metrics {
    fn default() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .expect("the buckets are not empty")
            .build_recorder();
        for (name, unit, help) in [
            (REQUESTS, None, "Finished requests by route and outcome."),
            (PROMPT_TOKENS, None, "Prompt tokens processed."),
            (GENERATION_TOKENS, None, "Tokens generated."),
            (QUEUE_DEPTH, None, "Jobs waiting for a free slot."),
            (RUNNING, None, "Jobs running now."),
            (
                TTFT,
                Some(Unit::Seconds),
                "Time from submission to the first generated token.",
            ),
            (
                LATENCY,
                Some(Unit::Seconds),
                "Time from submission to the end of a request.",
            ),
            (ENGINE_RUNNING, None, "Sequences the engine is generating."),
            (ENGINE_WAITING, None, "Sequences waiting for KV cache room."),
            (KV_USAGE, None, "Fraction of the KV cache blocks in use."),
            (PREEMPTIONS, None, "Sequences preempted for KV cache room."),
            (
                SPEC_DRAFT,
                None,
                "Speculative decoding: guessed tokens verified.",
            ),
            (
                SPEC_ACCEPTED,
                None,
                "Speculative decoding: guessed tokens the model agreed with.",
            ),
            (
                SPEC_STEPS,
                None,
                "Speculative decoding: decode steps that verified a guess.",
            ),
            (
                FORCED_DRAFT,
                None,
                "Structured output: tokens a grammar forced, verified ahead (fast-forward).",
            ),
            (
                FORCED,
                None,
                "Structured output: forced tokens accepted beside a step's own (steps saved).",
            ),
        ] {
            // The kind of each is fixed by its first registration; describing is kind-neutral.
            recorder.describe_counter(name.into(), unit, help.into());
        }
        Self {
            recorder,
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            engine: OnceLock::new(),
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn key(name: &'static str) -> Key {
    Key::from_static_name(name)
}

impl Metrics {
    /// Reports this engine's sequences and KV cache too (the first engine given wins).
    pub(crate) fn watch_engine(&self, engine: &Engine) {
        let _ = self.engine.set(engine.clone());
    }

    /// One finished request (`route` such as `/runsync` or `/v1/chat/completions`).
    pub(crate) fn record_request(&self, route: &str, outcome: &str, latency: Duration) {
        let labels = vec![
            Label::new("route", route.to_string()),
            Label::new("outcome", outcome.to_string()),
        ];
        self.recorder
            .register_counter(&Key::from_parts(REQUESTS, labels), &METADATA)
            .increment(1);
        self.recorder
            .register_histogram(&key(LATENCY), &METADATA)
            .record(latency.as_secs_f64());
    }

    /// Tokens of one finished generation and its time to first token.
    pub(crate) fn record_generation(
        &self,
        prompt: usize,
        generated: usize,
        ttft: Option<Duration>,
    ) {
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.generation_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);
        self.recorder
            .register_counter(&key(PROMPT_TOKENS), &METADATA)
            .increment(prompt as u64);
        self.recorder
            .register_counter(&key(GENERATION_TOKENS), &METADATA)
            .increment(generated as u64);
        if let Some(t) = ttft.filter(|_| generated > 0) {
            self.recorder
                .register_histogram(&key(TTFT), &METADATA)
                .record(t.as_secs_f64());
        }
    }

    /// Jobs waiting for a slot and jobs running.
    pub(crate) fn set_load(&self, queued: usize, running: usize) {
        self.recorder
            .register_gauge(&key(QUEUE_DEPTH), &METADATA)
            .set(queued as f64);
        self.recorder
            .register_gauge(&key(RUNNING), &METADATA)
            .set(running as f64);
    }

    /// The engine's gauges now: (running, waiting, KV cache usage).
    fn sample_engine(&self) -> Option<(usize, usize, f64)> {
        let stats = self.engine.get()?.stats();
        let total = stats.total_blocks.load(Ordering::Relaxed);
        let free = stats.free_blocks.load(Ordering::Relaxed);
        // The engine stores the free count at each step; before its first there is none.
        let usage = if total == 0 || stats.steps.load(Ordering::Relaxed) == 0 {
            0.0
        } else {
            total.saturating_sub(free) as f64 / total as f64
        };
        let running = stats.running.load(Ordering::Relaxed);
        let waiting = stats.waiting.load(Ordering::Relaxed);
        let gauge = |name, value: f64| {
            self.recorder
                .register_gauge(&key(name), &METADATA)
                .set(value)
        };
        gauge(ENGINE_RUNNING, running as f64);
        gauge(ENGINE_WAITING, waiting as f64);
        gauge(KV_USAGE, usage);
        let counter = |name, value: &std::sync::atomic::AtomicUsize| {
            self.recorder
                .register_counter(&key(name), &METADATA)
                .absolute(value.load(Ordering::Relaxed) as u64)
        };
        counter(PREEMPTIONS, &stats.preemptions);
        counter(SPEC_DRAFT, &stats.spec_draft_tokens);
        counter(SPEC_ACCEPTED, &stats.spec_accepted_tokens);
        counter(SPEC_STEPS, &stats.spec_verify_steps);
        counter(FORCED_DRAFT, &stats.forced_draft_tokens);
        counter(FORCED, &stats.forced_tokens);
        Some((running, waiting, usage))
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        self.sample_engine();
        self.recorder.handle().render()
    }

    /// Logs a stats line every `interval`, like vLLM's, until the task is dropped.
    pub async fn log_stats(self: std::sync::Arc<Self>, interval: Duration) {
        let mut last = (Instant::now(), self.tokens());
        loop {
            tokio::time::sleep(interval).await;
            let now = (Instant::now(), self.tokens());
            tracing::info!("{}", self.stats_line(last, now));
            last = now;
        }
    }

    fn tokens(&self) -> (u64, u64) {
        (
            self.prompt_tokens.load(Ordering::Relaxed),
            self.generation_tokens.load(Ordering::Relaxed),
        )
    }

    fn stats_line(
        &self,
        (t0, (p0, g0)): (Instant, (u64, u64)),
        (t1, (p1, g1)): (Instant, (u64, u64)),
    ) -> String {
        let seconds = t1.duration_since(t0).as_secs_f64().max(1e-9);
        let (running, waiting, usage) = self.sample_engine().unwrap_or_default();
        let mut line = format!(
            "Avg prompt throughput: {:.1} tokens/s, Avg generation throughput: {:.1} tokens/s, Running: {running} reqs, Waiting: {waiting} reqs, KV cache usage: {:.1}%",
            p1.saturating_sub(p0) as f64 / seconds,
            g1.saturating_sub(g0) as f64 / seconds,
            usage * 100.0,
        );
        if let Some(stats) = self.engine.get().map(|e| e.stats()) {
            let drafted = stats.spec_draft_tokens.load(Ordering::Relaxed);
            let accepted = stats.spec_accepted_tokens.load(Ordering::Relaxed);
            let steps = stats.spec_verify_steps.load(Ordering::Relaxed);
            if drafted > 0 {
                line.push_str(&format!(
                    ", Speculative acceptance: {:.1}%, {:.2} tokens per verifying step",
                    100.0 * accepted as f64 / drafted as f64,
                    (accepted + steps) as f64 / steps.max(1) as f64
                ));
            }
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.record_request("/runsync", "completed", Duration::from_millis(30));
        m.record_request("/runsync", "completed", Duration::from_secs(3));
        m.record_request("/v1/models", "failed", Duration::from_millis(1));
        m.record_generation(5, 7, Some(Duration::from_millis(20)));
        m.set_load(2, 3);
        let text = m.render();
        assert!(
            text.contains(
                "worker_candle_requests_total{route=\"/runsync\",outcome=\"completed\"} 2"
            ),
            "{text}"
        );
        assert!(text
            .contains("worker_candle_requests_total{route=\"/v1/models\",outcome=\"failed\"} 1"));
        assert!(text.contains("# TYPE worker_candle_requests_total counter"));
        assert!(text.contains("# HELP worker_candle_prompt_tokens_total Prompt tokens processed."));
        assert!(text.contains("worker_candle_prompt_tokens_total 5"));
        assert!(text.contains("worker_candle_generation_tokens_total 7"));
        assert!(text.contains("worker_candle_queue_depth 2"));
        assert!(text.contains("worker_candle_requests_running 3"));
        assert!(text.contains("worker_candle_request_duration_seconds_bucket{le=\"0.05\"} 2"));
        assert!(text.contains("worker_candle_request_duration_seconds_bucket{le=\"5\"} 3"));
        assert!(text.contains("worker_candle_request_duration_seconds_count 3"));
        assert!(text.contains("worker_candle_time_to_first_token_seconds_bucket{le=\"0.025\"} 1"));
    }

    #[test]
    fn labels_are_escaped() {
        let m = Metrics::default();
        m.record_request("a\"b\\c", "completed", Duration::from_millis(1));
        assert!(
            m.render().contains("route=\"a\\\"b\\\\c\""),
            "{}",
            m.render()
        );
    }

    #[test]
    fn the_stats_line_reads_like_vllms() {
        let m = Metrics::default();
        let t0 = Instant::now();
        m.record_generation(100, 50, None);
        let line = m.stats_line((t0, (0, 0)), (t0 + Duration::from_secs(10), m.tokens()));
        assert_eq!(
            line,
            "Avg prompt throughput: 10.0 tokens/s, Avg generation throughput: 5.0 tokens/s, Running: 0 reqs, Waiting: 0 reqs, KV cache usage: 0.0%"
        );
    }
}
