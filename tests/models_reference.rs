//! Every causal fixture computes what transformers computes: last-position logits within 1e-4, identical
//! greedy ids, top-5 logprobs within 1e-4; packed batches, chunked prefill and both attention kernels
//! agree with one sequence at a time.

use std::path::PathBuf;

use candle_core::Tensor;
use serde_json::Value;
use worker_candle::engine::kv_cache::KvCache;
use worker_candle::engine::layers::attention::AttentionKernel;
use worker_candle::engine::layers::DecoderModel;
use worker_candle::engine::loader::load_causal;
use worker_candle::engine::models::{CausalLM, ForwardBatch, LogitsWanted, SeqInput};
use worker_candle::engine::EngineSettings;

const CAUSAL: &[&str] = &["llama", "qwen2", "mistral", "phi3", "gemma2", "gpt2"];
const BLOCK: usize = 16;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn load(name: &str) -> DecoderModel {
    load_causal(&EngineSettings::for_model(fixture(name)))
        .unwrap_or_else(|e| panic!("{name}: {e:#}"))
        .model
}

fn reference(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// One sequence's blocks, far apart so neighbours' slots never overlap.
fn blocks(seq: usize, n: usize) -> Vec<u32> {
    (0..n as u32).map(|b| seq as u32 * 64 + b).collect()
}

fn cache(model: &DecoderModel) -> KvCache {
    KvCache::new(model.spec(), 64 * 12, BLOCK).unwrap()
}

fn step(
    model: &DecoderModel,
    cache: &mut KvCache,
    seqs: Vec<(Vec<u32>, usize, usize, LogitsWanted)>,
) -> Tensor {
    let mut tokens = Vec::new();
    let mut inputs = Vec::new();
    for (new, context_len, seq, logits) in seqs {
        let total = context_len + new.len();
        inputs.push(SeqInput {
            context_len,
            num_new: new.len(),
            block_table: blocks(seq, total.div_ceil(BLOCK)),
            logits,
        });
        tokens.extend(new);
    }
    model
        .forward(
            &ForwardBatch {
                tokens,
                seqs: inputs,
            },
            cache,
        )
        .unwrap()
}

fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = row
        .iter()
        .map(|x| ((x - max) as f64).exp())
        .sum::<f64>()
        .ln() as f32
        + max;
    row.iter().map(|x| x - lse).collect()
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn every_fixture_matches_transformers() {
    for name in CAUSAL {
        let model = load(name);
        for (ci, case) in reference(name).iter().enumerate() {
            let prompt = ids(&case["input_ids"]);
            let mut cache = cache(&model);
            let logits = step(
                &model,
                &mut cache,
                vec![(prompt.clone(), 0, 0, LogitsWanted::Last)],
            );
            let row: Vec<f32> = logits.squeeze(0).unwrap().to_vec1().unwrap();
            let want: Vec<f32> = case["last_logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            let diff = max_diff(&row, &want);
            assert!(diff < 1e-4, "{name} case {ci}: logits differ by {diff}");

            let greedy = ids(&case["greedy_ids"]);
            let top5 = case["top5_logprobs_first_steps"].as_array().unwrap();
            let mut row = row;
            let mut got = Vec::new();
            let mut len = prompt.len();
            for (i, want_id) in greedy.iter().enumerate() {
                let lp = log_softmax(&row);
                if let Some(expected) = top5.get(i) {
                    for pair in expected.as_array().unwrap() {
                        let (id, want_lp) = (
                            pair[0].as_u64().unwrap() as usize,
                            pair[1].as_f64().unwrap() as f32,
                        );
                        assert!(
                            (lp[id] - want_lp).abs() < 1e-4,
                            "{name} case {ci} step {i}: logprob of {id}"
                        );
                    }
                }
                let next = argmax(&row);
                got.push(next);
                assert_eq!(next, *want_id, "{name} case {ci}: greedy step {i}");
                let logits = step(
                    &model,
                    &mut cache,
                    vec![(vec![next], len, 0, LogitsWanted::Last)],
                );
                len += 1;
                row = logits.squeeze(0).unwrap().to_vec1().unwrap();
            }
            assert_eq!(got, greedy, "{name} case {ci}");
        }
    }
}

/// All cases of a fixture in one packed forward give each case's own logits; so do chunked prefill
/// and the per-sequence attention kernel.
#[test]
fn packed_chunked_and_loop_kernel_agree() {
    for name in CAUSAL {
        let mut model = load(name);
        let prompts: Vec<Vec<u32>> = reference(name)
            .iter()
            .map(|c| ids(&c["input_ids"]))
            .collect();
        let alone: Vec<Vec<f32>> = prompts
            .iter()
            .map(|p| {
                let mut c = cache(&model);
                step(&model, &mut c, vec![(p.clone(), 0, 0, LogitsWanted::Last)])
                    .squeeze(0)
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();

        for kernel in [AttentionKernel::Auto, AttentionKernel::Loop] {
            model.kernel = kernel;
            let mut c = cache(&model);
            let seqs = prompts
                .iter()
                .enumerate()
                .map(|(i, p)| (p.clone(), 0, i, LogitsWanted::Last))
                .collect();
            let packed: Vec<Vec<f32>> = step(&model, &mut c, seqs).to_vec2().unwrap();
            for (i, (a, b)) in alone.iter().zip(&packed).enumerate() {
                assert!(max_diff(a, b) < 1e-4, "{name} {kernel:?}: packed case {i}");
            }

            // Chunked: first half of every prompt, then the rest, in two packed steps.
            let mut c = cache(&model);
            let first: Vec<_> = prompts
                .iter()
                .enumerate()
                .map(|(i, p)| (p[..p.len() / 2].to_vec(), 0, i, LogitsWanted::None))
                .collect();
            let none = step(&model, &mut c, first);
            assert_eq!(none.dim(0).unwrap(), 0);
            let rest: Vec<_> = prompts
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    (
                        p[p.len() / 2..].to_vec(),
                        p.len() / 2,
                        i,
                        LogitsWanted::Last,
                    )
                })
                .collect();
            let chunked: Vec<Vec<f32>> = step(&model, &mut c, rest).to_vec2().unwrap();
            for (i, (a, b)) in alone.iter().zip(&chunked).enumerate() {
                assert!(max_diff(a, b) < 1e-4, "{name} {kernel:?}: chunked case {i}");
            }
        }
    }
}

#[test]
fn unsupported_architecture_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("llama").join(f), dir.path().join(f)).unwrap();
    }
    let mut cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("llama").join("config.json")).unwrap(),
    )
    .unwrap();
    cfg["architectures"] = serde_json::json!(["FalconForCausalLM"]);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = load_causal(&EngineSettings::for_model(dir.path()))
        .err()
        .unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("FalconForCausalLM") && msg.contains("LlamaForCausalLM"),
        "{msg}"
    );
}
