//! Prometheus text exposition of the worker's counters (`GET /metrics` of `serve`): requests by route
//! and outcome, tokens in and out, queue depth, time-to-first-token and latency histograms.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Seconds; the same buckets serve both histograms (a first token to a long answer).
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.counts[i] += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (i, bound) in BUCKETS.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug, Default)]
struct State {
    requests: BTreeMap<(String, String), u64>,
    prompt_tokens: u64,
    generation_tokens: u64,
    queue_depth: u64,
    running: u64,
    ttft: Histogram,
    latency: Histogram,
}

#[derive(Debug, Default)]
pub struct Metrics {
    state: Mutex<State>,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// One finished request (`route` such as `/runsync` or `/v1/chat/completions`).
    pub fn record_request(&self, route: &str, outcome: &str, latency: Duration) {
        self.with(|s| {
            *s.requests
                .entry((route.to_string(), outcome.to_string()))
                .or_default() += 1;
            s.latency.observe(latency.as_secs_f64());
        });
    }

    /// Tokens of one finished generation and its time to first token.
    pub fn record_generation(&self, prompt: usize, generated: usize, ttft: Option<Duration>) {
        self.with(|s| {
            s.prompt_tokens += prompt as u64;
            s.generation_tokens += generated as u64;
            if let Some(t) = ttft.filter(|_| generated > 0) {
                s.ttft.observe(t.as_secs_f64());
            }
        });
    }

    /// Jobs waiting for a slot and jobs running.
    pub fn set_load(&self, queued: usize, running: usize) {
        self.with(|s| {
            s.queue_depth = queued as u64;
            s.running = running as u64;
        });
    }

    pub fn render(&self) -> String {
        self.with(|s| {
            let mut out = String::new();
            out.push_str(
                "# HELP worker_candle_requests_total Finished requests by route and outcome.\n",
            );
            out.push_str("# TYPE worker_candle_requests_total counter\n");
            for ((route, outcome), n) in &s.requests {
                let _ = writeln!(
                    out,
                    "worker_candle_requests_total{{route=\"{}\",outcome=\"{}\"}} {n}",
                    escape(route),
                    escape(outcome)
                );
            }
            for (name, help, kind, value) in [
                (
                    "worker_candle_prompt_tokens_total",
                    "Prompt tokens processed.",
                    "counter",
                    s.prompt_tokens,
                ),
                (
                    "worker_candle_generation_tokens_total",
                    "Tokens generated.",
                    "counter",
                    s.generation_tokens,
                ),
                (
                    "worker_candle_queue_depth",
                    "Jobs waiting for a free slot.",
                    "gauge",
                    s.queue_depth,
                ),
                (
                    "worker_candle_requests_running",
                    "Jobs running now.",
                    "gauge",
                    s.running,
                ),
            ] {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
                );
            }
            s.ttft.render(
                &mut out,
                "worker_candle_time_to_first_token_seconds",
                "Time from submission to the first generated token.",
            );
            s.latency.render(
                &mut out,
                "worker_candle_request_duration_seconds",
                "Time from submission to the end of a request.",
            );
            out
        })
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
        assert!(text
            .contains("worker_candle_requests_total{route=\"/runsync\",outcome=\"completed\"} 2"));
        assert!(text
            .contains("worker_candle_requests_total{route=\"/v1/models\",outcome=\"failed\"} 1"));
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
        assert_eq!(escape("a\"b\\c"), "a\\\"b\\\\c");
    }
}
