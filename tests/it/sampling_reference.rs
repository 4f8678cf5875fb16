//! The sampler's logprob helpers and greedy path against transformers' numbers for the fixtures'
//! last-position logits (`reference.json`).

use std::path::Path;

use worker_candle::engine::sampling::{log_softmax, top_n, Sampler};
use worker_candle::engine::SamplingParams;

#[test]
fn greedy_choice_and_top5_logprobs_match_transformers() {
    for name in ["llama", "qwen2", "mistral", "phi3", "gemma2", "gpt2"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
            .join("reference.json");
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for case in reference["cases"].as_array().unwrap() {
            let logits: Vec<f32> = case["last_logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let params = SamplingParams {
                temperature: 0.0,
                logprobs: Some(5),
                ..Default::default()
            };
            let mut sampler = Sampler::new(&params, &[], &[], 0);
            let out = sampler.sample(&logits);
            assert_eq!(out.token_id as u64, case["greedy_ids"][0].as_u64().unwrap());

            let expected = case["top5_logprobs_first_steps"][0].as_array().unwrap();
            assert_eq!(out.top.len(), 5);
            for ((id, lp), want) in out.top.iter().zip(expected) {
                assert_eq!(*id as u64, want[0].as_u64().unwrap(), "{name}");
                assert!(
                    (*lp as f64 - want[1].as_f64().unwrap()).abs() < 1e-4,
                    "{name}"
                );
            }
            assert!((out.logprob.unwrap() - out.top[0].1).abs() < 1e-6);

            let all = log_softmax(&logits);
            assert_eq!(top_n(&all, 5)[0].0, out.token_id);
        }
    }
}
