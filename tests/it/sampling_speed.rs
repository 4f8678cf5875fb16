//! Sampling cost per token over a 151,936-entry vocabulary (Qwen2's), for each kind of request.
//! Ignored by default; run: `cargo test --release --test it sampling_speed -- --ignored --nocapture`.

use std::time::{Duration, Instant};

use worker_candle::engine::sampling::Sampler;
use worker_candle::engine::SamplingParams;

const VOCAB: usize = 151_936;

/// A language-model-like row: a handful of strong tokens and a long tail.
fn peaked_row() -> Vec<f32> {
    (0..VOCAB)
        .map(|i| {
            let x = ((i as u64 * 2_654_435_761) % 100_000) as f32 / 100_000.0;
            20.0 * x.powi(40) - 5.0 * (1.0 - x)
        })
        .collect()
}

fn per_token(params: &SamplingParams, row: &[f32]) -> Duration {
    let prompt: Vec<u32> = (0..500).collect();
    let mut sampler = Sampler::new(params, &prompt, &[0], 0);
    let steps = 100;
    let start = Instant::now();
    for _ in 0..steps {
        std::hint::black_box(sampler.sample(row));
    }
    start.elapsed() / steps
}

#[test]
#[ignore]
fn sampling_cost_per_token() {
    let row = peaked_row();
    let base = SamplingParams {
        seed: Some(1),
        ..Default::default()
    };
    let cases = [
        (
            "greedy",
            SamplingParams {
                temperature: 0.0,
                ..base.clone()
            },
        ),
        (
            "greedy + logprobs 5",
            SamplingParams {
                temperature: 0.0,
                logprobs: Some(5),
                ..base.clone()
            },
        ),
        ("temperature 1", base.clone()),
        (
            "temperature 0.7, top_p 0.9",
            SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                ..base.clone()
            },
        ),
        (
            "top_k 50, top_p 0.9",
            SamplingParams {
                top_k: 50,
                top_p: 0.9,
                ..base.clone()
            },
        ),
        (
            "min_p 0.1, penalties",
            SamplingParams {
                min_p: 0.1,
                repetition_penalty: 1.1,
                presence_penalty: 0.5,
                frequency_penalty: 0.5,
                ..base.clone()
            },
        ),
    ];
    for (name, params) in cases {
        let t = per_token(&params, &row);
        println!("{name:32} {t:>10.1?} per token");
        if !cfg!(debug_assertions) {
            assert!(t < Duration::from_millis(20), "{name}: {t:?}");
        }
    }
}
