//! Every causal fixture computes what transformers computed for it (`reference.json`): last-position
//! logits, greedy continuations and top-5 log-probabilities, through the paged KV cache. Plus the
//! batching invariants the scheduler relies on (packed = alone, chunked = whole, both attention paths
//! agree) and the loader's layouts (sharded weights, both RoPE config layouts, unsupported architecture).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::common::fixtures::{fixture, floats, ids, reference, CAUSAL};
use serde_json::Value;
use worker_candle::engine::batch::{ForwardBatch, LogitsWanted, SeqInput};
use worker_candle::engine::kv_cache::KvCache;
use worker_candle::engine::layers::AttentionImpl;
use worker_candle::engine::loader::{load_causal, LoadedModel};
use worker_candle::engine::models::CausalLM;
use worker_candle::engine::EngineSettings;

const TOL: f32 = 1e-4;
const BLOCK: usize = 4;

fn load(dir: &Path) -> LoadedModel {
    load_causal(&EngineSettings::for_model(dir))
        .unwrap_or_else(|e| panic!("loading {}: {e:#}", dir.display()))
}

/// One sequence's state in these tests: its tokens so far and its blocks.
struct Seq {
    tokens: Vec<u32>,
    cached: usize,
    blocks: Vec<u32>,
}

impl Seq {
    /// `blocks` is taken as the block table; scattered tables exercise the gather path.
    fn new(tokens: Vec<u32>, blocks: Vec<u32>) -> Self {
        Self {
            tokens,
            cached: 0,
            blocks,
        }
    }

    /// The next `n` uncached tokens as a batch entry.
    fn input(&self, n: usize, logits: LogitsWanted) -> (Vec<u32>, SeqInput) {
        let new = self.tokens[self.cached..self.cached + n].to_vec();
        let input = SeqInput {
            context_len: self.cached,
            num_new: n,
            block_table: self.blocks.clone(),
            logits,
        };
        (new, input)
    }
}

fn forward(
    model: &dyn CausalLM,
    cache: &mut KvCache,
    parts: Vec<(Vec<u32>, SeqInput)>,
) -> Vec<Vec<f32>> {
    let mut batch = ForwardBatch {
        adapters: Vec::new(),
        tokens: Vec::new(),
        seqs: Vec::new(),
    };
    for (t, s) in parts {
        batch.tokens.extend(t);
        batch.seqs.push(s);
    }
    let logits = model.forward(&batch, cache).expect("forward");
    logits.to_vec2::<f32>().expect("logits to vec")
}

fn new_cache(model: &dyn CausalLM, blocks: usize) -> KvCache {
    KvCache::new(model.spec(), blocks, BLOCK).expect("cache")
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn log_softmax(v: &[f32]) -> Vec<f32> {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = v.iter().map(|x| ((x - m) as f64).exp()).sum::<f64>().ln() as f32 + m;
    v.iter().map(|x| x - lse).collect()
}

fn check_reference(name: &str) {
    let loaded = load(&fixture(name));
    let model = loaded.model.as_ref();
    let r = reference(name);
    for (ci, case) in r["cases"].as_array().expect("cases").iter().enumerate() {
        let prompt = ids(&case["input_ids"]);
        let want_ids = ids(&case["greedy_ids"]);
        let total = prompt.len() + want_ids.len();
        let nblocks = total.div_ceil(BLOCK) + 1;
        let mut cache = new_cache(model, nblocks + 2);
        // scattered, descending blocks: the gather path, not the contiguous fast path
        let blocks: Vec<u32> = (0..nblocks as u32).rev().collect();
        let mut seq = Seq::new(prompt.clone(), blocks);
        let mut logits = forward(
            model,
            &mut cache,
            vec![seq.input(prompt.len(), LogitsWanted::Last)],
        )
        .remove(0);
        seq.cached = prompt.len();
        let d = max_diff(&logits, &floats(&case["last_logits"]));
        assert!(d < TOL, "{name} case {ci}: last logits differ by {d}");
        let top5 = case["top5_logprobs_first_steps"].as_array().expect("top5");
        let mut got_ids = Vec::new();
        for step in 0..want_ids.len() {
            if let Some(want) = top5.get(step) {
                let lp = log_softmax(&logits);
                let mut order: Vec<usize> = (0..lp.len()).collect();
                order.sort_by(|a, b| lp[*b].total_cmp(&lp[*a]));
                for (k, pair) in want.as_array().expect("pairs").iter().enumerate() {
                    let id = pair[0].as_u64().expect("id") as usize;
                    let want_lp = pair[1].as_f64().expect("lp") as f32;
                    assert_eq!(order[k], id, "{name} case {ci} step {step}: top-{k} token");
                    assert!(
                        (lp[id] - want_lp).abs() < TOL,
                        "{name} case {ci} step {step}: logprob of {id}"
                    );
                }
            }
            let next = argmax(&logits);
            got_ids.push(next);
            if step + 1 == want_ids.len() {
                break;
            }
            seq.tokens.push(next);
            logits = forward(model, &mut cache, vec![seq.input(1, LogitsWanted::Last)]).remove(0);
            seq.cached += 1;
        }
        assert_eq!(got_ids, want_ids, "{name} case {ci}: greedy ids");
    }
}

#[test]
fn llama_matches_reference() {
    check_reference("llama");
}

#[test]
fn qwen2_matches_reference() {
    check_reference("qwen2");
}

#[test]
fn mistral_matches_reference() {
    check_reference("mistral");
}

#[test]
fn phi3_matches_reference() {
    check_reference("phi3");
}

#[test]
fn gemma2_matches_reference() {
    check_reference("gemma2");
}

#[test]
fn gpt2_matches_reference() {
    check_reference("gpt2");
}

/// Made by `tests/fixtures/gen_extra.py`: q/k norms.
#[test]
fn qwen3_matches_reference() {
    check_reference("qwen3");
}

/// Made by `tests/fixtures/gen_extra.py`: `llama3` RoPE scaling (original context 32, so the prompts
/// reach the scaled band) and tied embeddings.
#[test]
fn llama31_matches_reference() {
    check_reference("llama31");
}

/// Made by `tests/fixtures/gen_extra.py`: a sliding window of 5, shorter than every prompt.
#[test]
fn mistral_sliding_window_matches_reference() {
    check_reference("mistral_sw");
}

/// Made by `tests/fixtures/gen_extra.py`: sliding window 4 on two layers of three, each layer kind with
/// its own RoPE base (linear scaling on the global ones), q/k norms, random `(1 + w)` norms.
#[test]
fn gemma3_matches_reference() {
    check_reference("gemma3");
}

/// Made by `tests/fixtures/gen_extra.py`: a mixture of 4 experts, top 2 renormalised, q/k norms.
#[test]
fn qwen3_moe_matches_reference() {
    check_reference("qwen3_moe");
}

/// Made by `tests/fixtures/gen_extra.py`: `block_sparse_moe` with experts `w1`/`w3`/`w2`, a softmax over
/// the top 2 of 4 router logits.
#[test]
fn mixtral_matches_reference() {
    check_reference("mixtral");
}

/// Made by `tests/fixtures/gen_extra.py`: top 2 of 4 experts not renormalised, plus a shared expert
/// under a sigmoid gate, a dense MLP on layer 1 (`mlp_only_layers`); q/k/v biases.
#[test]
fn qwen2_moe_matches_reference() {
    check_reference("qwen2_moe");
}

/// Made by `tests/fixtures/gen_extra.py`: no RoPE on layer 3 (`no_rope_layers`).
#[test]
fn smollm3_matches_reference() {
    check_reference("smollm3");
}

/// Made by `tests/fixtures/gen_extra.py`: norms after attention and MLP only (random weights), q/k
/// norms over the whole projections.
#[test]
fn olmo2_matches_reference() {
    check_reference("olmo2");
}

/// Made by `tests/fixtures/gen_extra.py`: embedding, attention and residual multipliers and
/// `logits_scaling`, all away from 1.
#[test]
fn granite_matches_reference() {
    check_reference("granite");
}

/// Made by `tests/fixtures/gen_extra.py`: Phi-4-mini's Phi-3 (partial rotary 3/4, `longrope`) with an
/// original context of 4, so every prompt runs on the long factors and the attention factor.
#[test]
fn phi4_longrope_matches_reference() {
    check_reference("phi4");
}

/// The gemma3 fixture as the language model of a `Gemma3ForConditionalGeneration` checkpoint, in both
/// weight layouts transformers has written (`language_model.model.*` before 4.52, `model.language_model.*`
/// since) next to a vision tower that is not read, and with the older config keys (`rope_theta`,
/// `rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern` instead of `layer_types`): the same
/// logits as the text model.
#[test]
fn gemma3_multimodal_checkpoints_run_their_language_model() {
    let bytes = std::fs::read(fixture("gemma3").join("model.safetensors")).expect("weights");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let text: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("gemma3").join("config.json")).expect("config"),
    )
    .expect("json");
    let mut old = text.clone();
    let obj = old.as_object_mut().expect("object");
    for k in ["rope_parameters", "layer_types", "_sliding_window_pattern"] {
        obj.remove(k);
    }
    old["rope_theta"] = serde_json::json!(1000000.0);
    old["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 8.0});
    old["rope_local_base_freq"] = serde_json::json!(10000.0);
    old["sliding_window_pattern"] = serde_json::json!(3);
    let p = prompts("gemma3")
        .into_iter()
        .max_by_key(Vec::len)
        .expect("prompt");
    let want = last_logits_of(&fixture("gemma3"), &p);
    let vision = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).expect("tensor");
    for (layout, text_config) in [
        ("model.language_model", &text),
        ("language_model.model", &old),
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        copy_fixture("gemma3", tmp.path(), true);
        let mut tensors: HashMap<String, Tensor> = st
            .names()
            .into_iter()
            .map(|n| {
                let t = Tensor::from_raw_buffer(
                    st.tensor(n).expect("tensor").data(),
                    DType::F32,
                    st.tensor(n).expect("tensor").shape(),
                    &Device::Cpu,
                )
                .expect("tensor");
                (n.replacen("model", layout, 1), t)
            })
            .collect();
        tensors.insert(
            "vision_tower.vision_model.patch.weight".into(),
            vision.clone(),
        );
        candle_core::safetensors::save(&tensors, tmp.path().join("model.safetensors"))
            .expect("save");
        let config = serde_json::json!({
            "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "text_config": text_config, "vision_config": {"model_type": "siglip_vision_model"},
            "eos_token_id": [1, 106],
        });
        std::fs::write(tmp.path().join("config.json"), config.to_string()).expect("config");
        let d = max_diff(&last_logits_of(tmp.path(), &p), &want);
        assert!(d < TOL, "{layout}: logits differ by {d}");
    }
}

/// Every attention path masks the same keys out of the window, and the window changes the result.
#[test]
fn sliding_window_masks_the_same_keys_on_every_path() {
    let dir = fixture("mistral_sw");
    let p = prompts("mistral_sw")
        .into_iter()
        .max_by_key(Vec::len)
        .expect("prompt");
    let run = |imp: AttentionImpl| {
        let mut model = load(&dir).model;
        model.set_attention_impl(imp);
        let mut cache = new_cache(model.as_ref(), 40);
        let mut s = Seq::new(p.clone(), (0..40).rev().collect());
        let mut out = forward(
            model.as_ref(),
            &mut cache,
            vec![s.input(p.len() - 1, LogitsWanted::All)],
        );
        s.cached = p.len() - 1;
        out.extend(forward(
            model.as_ref(),
            &mut cache,
            vec![s.input(1, LogitsWanted::Last)],
        ));
        out
    };
    let base = run(AttentionImpl::Loop);
    for imp in [
        AttentionImpl::Varlen,
        AttentionImpl::Fused,
        AttentionImpl::Auto,
    ] {
        for (i, (a, b)) in base.iter().zip(&run(imp)).enumerate() {
            let d = max_diff(a, b);
            assert!(d < TOL, "{imp:?}: row {i} differs by {d}");
        }
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_fixture("mistral_sw", tmp.path(), false);
    let path = tmp.path().join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("config")).expect("json");
    cfg["sliding_window"] = Value::Null;
    std::fs::write(&path, cfg.to_string()).expect("write");
    let unwindowed = last_logits_of(tmp.path(), &p);
    assert!(
        max_diff(&unwindowed, base.last().expect("row")) > 1e-3,
        "the window changed nothing"
    );
}

fn prompts(name: &str) -> Vec<Vec<u32>> {
    reference(name)["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| ids(&c["input_ids"]))
        .collect()
}

/// Several different prompts in one forward give each the logits it gets alone, and so does a mixed
/// step of decodes and a prefill.
#[test]
fn packed_batch_equals_each_alone() {
    for name in CAUSAL {
        let model = load(&fixture(name)).model;
        let ps: Vec<Vec<u32>> = prompts(name).into_iter().take(3).collect();
        let per = 16;
        let alone: Vec<Vec<f32>> = ps
            .iter()
            .map(|p| {
                let mut cache = new_cache(model.as_ref(), per);
                let s = Seq::new(p.clone(), (0..per as u32).collect());
                forward(
                    model.as_ref(),
                    &mut cache,
                    vec![s.input(p.len(), LogitsWanted::Last)],
                )
                .remove(0)
            })
            .collect();
        let mut cache = new_cache(model.as_ref(), per * ps.len());
        let seqs: Vec<Seq> = ps
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Seq::new(
                    p.clone(),
                    (0..per as u32)
                        .map(|b| b * ps.len() as u32 + i as u32)
                        .collect(),
                )
            })
            .collect();
        let parts = seqs
            .iter()
            .map(|s| s.input(s.tokens.len(), LogitsWanted::Last))
            .collect();
        let packed = forward(model.as_ref(), &mut cache, parts);
        assert_eq!(packed.len(), ps.len());
        for (i, (a, b)) in alone.iter().zip(&packed).enumerate() {
            let d = max_diff(a, b);
            assert!(d < TOL, "{name}: prompt {i} packed differs by {d}");
        }
    }
}

/// A mixture of experts routes each token alone: a decode step shared with other sequences' prefill
/// chunks (whose tokens send other rows to every expert, so each expert's gathered batch differs)
/// gives each row what it gets alone.
#[test]
fn moe_rows_route_alone_whatever_shares_the_step() {
    for name in ["qwen3_moe", "mixtral", "qwen2_moe"] {
        let model = load(&fixture(name)).model;
        let ps: Vec<Vec<u32>> = prompts(name).into_iter().take(4).collect();
        let per = 40;
        let blocks = |i: usize| {
            (0..per as u32)
                .map(|b| b * 4 + i as u32)
                .collect::<Vec<_>>()
        };
        // alone: each prompt but its last token, then that token as a decode step
        let alone: Vec<Vec<f32>> = ps
            .iter()
            .map(|p| {
                let mut cache = new_cache(model.as_ref(), per * 4);
                let mut s = Seq::new(p.clone(), blocks(0));
                forward(
                    model.as_ref(),
                    &mut cache,
                    vec![s.input(p.len() - 1, LogitsWanted::None)],
                );
                s.cached = p.len() - 1;
                forward(
                    model.as_ref(),
                    &mut cache,
                    vec![s.input(1, LogitsWanted::Last)],
                )
                .remove(0)
            })
            .collect();
        // together: prompt 0 decodes its last token in the same step as prompts 1.. prefill whole
        let mut cache = new_cache(model.as_ref(), per * 4);
        let mut first = Seq::new(ps[0].clone(), blocks(0));
        forward(
            model.as_ref(),
            &mut cache,
            vec![first.input(ps[0].len() - 1, LogitsWanted::None)],
        );
        first.cached = ps[0].len() - 1;
        let others: Vec<Seq> = ps[1..]
            .iter()
            .enumerate()
            .map(|(i, p)| Seq::new(p.clone(), blocks(i + 1)))
            .collect();
        let mut parts = vec![first.input(1, LogitsWanted::Last)];
        parts.extend(
            others
                .iter()
                .map(|s| s.input(s.tokens.len(), LogitsWanted::Last)),
        );
        let together = forward(model.as_ref(), &mut cache, parts);
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            let d = max_diff(a, b);
            assert!(
                d < TOL,
                "{name}: prompt {i} differs by {d} in a shared step"
            );
        }
    }
}

/// A prompt prefilled in chunks (odd sizes, across block boundaries) ends with the same logits as in
/// one go, and `LogitsWanted::All` rows equal the last-row logits of each prefix.
#[test]
fn chunked_prefill_equals_one_go() {
    for name in CAUSAL {
        let model = load(&fixture(name)).model;
        let p = prompts(name)
            .into_iter()
            .max_by_key(Vec::len)
            .expect("prompt");
        let nb = p.len().div_ceil(BLOCK) + 1;
        let mut cache = new_cache(model.as_ref(), nb);
        let mut whole = Seq::new(p.clone(), (0..nb as u32).collect());
        let all = forward(
            model.as_ref(),
            &mut cache,
            vec![whole.input(p.len(), LogitsWanted::All)],
        );
        whole.cached = p.len();
        assert_eq!(all.len(), p.len());
        let mut cache = new_cache(model.as_ref(), nb);
        let mut chunked = Seq::new(p.clone(), (0..nb as u32).rev().collect());
        let mut last = Vec::new();
        for size in [3, 1, 5, 2].iter().cycle() {
            let n = (*size).min(p.len() - chunked.cached);
            let wanted = if chunked.cached + n == p.len() {
                LogitsWanted::Last
            } else {
                LogitsWanted::None
            };
            let out = forward(model.as_ref(), &mut cache, vec![chunked.input(n, wanted)]);
            if wanted == LogitsWanted::None {
                assert!(
                    out.is_empty(),
                    "{name}: logits for a chunk that asked for none"
                );
            }
            chunked.cached += n;
            if chunked.cached == p.len() {
                last = out.into_iter().next().expect("last logits");
                break;
            }
        }
        let d = max_diff(&last, &all[p.len() - 1]);
        assert!(d < TOL, "{name}: chunked prefill differs by {d}");
    }
}

/// Every attention path (the portable loop, candle's packed CPU flash attention, the fused paged CPU
/// kernel, the automatic choice) computes the same, on chunks with cached context and on decodes.
#[test]
fn attention_paths_agree() {
    for name in CAUSAL {
        for imp in [
            AttentionImpl::Varlen,
            AttentionImpl::Fused,
            AttentionImpl::Auto,
        ] {
            attention_paths_agree_on(name, imp);
        }
    }
}

fn attention_paths_agree_on(name: &str, imp: AttentionImpl) {
    {
        let mut fast = load(&fixture(name)).model;
        fast.set_attention_impl(imp);
        let mut slow = load(&fixture(name)).model;
        slow.set_attention_impl(AttentionImpl::Loop);
        let ps: Vec<Vec<u32>> = prompts(name).into_iter().take(3).collect();
        let per = 16;
        let run = |m: &dyn CausalLM| {
            let mut cache = new_cache(m, per * ps.len());
            let mut seqs: Vec<Seq> = ps
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    Seq::new(
                        p.clone(),
                        (0..per as u32).map(|b| b * 3 + i as u32).collect(),
                    )
                })
                .collect();
            // first half of each prompt, then the rest with all rows' logits
            let parts = seqs
                .iter()
                .map(|s| s.input(s.tokens.len() / 2, LogitsWanted::None))
                .collect();
            forward(m, &mut cache, parts);
            for s in &mut seqs {
                s.cached = s.tokens.len() / 2;
            }
            let parts = seqs
                .iter()
                .map(|s| s.input(s.tokens.len() - s.cached, LogitsWanted::All))
                .collect();
            forward(m, &mut cache, parts)
        };
        let (a, b) = (run(fast.as_ref()), run(slow.as_ref()));
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            let d = max_diff(x, y);
            assert!(
                d < TOL,
                "{name}: row {i} differs by {d} between attention paths"
            );
        }
    }
}

fn copy_fixture(name: &str, to: &Path, skip_weights: bool) {
    for e in std::fs::read_dir(fixture(name)).expect("fixture dir") {
        let p = e.expect("entry").path();
        if p.is_file() && !(skip_weights && p.extension().is_some_and(|x| x == "safetensors")) {
            std::fs::copy(&p, to.join(p.file_name().expect("name"))).expect("copy");
        }
    }
}

fn last_logits_of(dir: &Path, prompt: &[u32]) -> Vec<f32> {
    let model = load(dir).model;
    let nb = prompt.len().div_ceil(BLOCK);
    let mut cache = new_cache(model.as_ref(), nb);
    let s = Seq::new(prompt.to_vec(), (0..nb as u32).collect());
    forward(
        model.as_ref(),
        &mut cache,
        vec![s.input(prompt.len(), LogitsWanted::Last)],
    )
    .remove(0)
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_fixture("llama", tmp.path(), true);
    let bytes = std::fs::read(fixture("llama").join("model.safetensors")).expect("weights");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = chunk
            .iter()
            .map(|n| (n.clone(), st.tensor(n).expect("tensor")))
            .collect();
        safetensors::serialize_to_file(views, None, &tmp.path().join(&file)).expect("write shard");
        for n in chunk {
            weight_map.insert(n.clone(), Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .expect("index");
    let p = &prompts("llama")[0];
    let d = max_diff(
        &last_logits_of(tmp.path(), p),
        &last_logits_of(&fixture("llama"), p),
    );
    assert_eq!(d, 0.0, "sharded weights give other logits");
    // a shard the index names but the folder lacks is a clear error
    std::fs::remove_file(tmp.path().join("model-00002-of-00002.safetensors")).expect("rm");
    let err = load_causal(&EngineSettings::for_model(tmp.path()))
        .err()
        .expect("must fail");
    assert!(format!("{err:#}").contains("missing"), "{err:#}");
}

/// The mistral fixture uses `rope_parameters`; the same model described with top-level `rope_theta`
/// computes the same function, and a different theta a different one.
#[test]
fn rope_parameters_and_top_level_layouts_agree() {
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_fixture("mistral", tmp.path(), false);
    let mut cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("mistral").join("config.json")).expect("config"),
    )
    .expect("json");
    let theta = cfg["rope_parameters"]["rope_theta"].clone();
    let obj = cfg.as_object_mut().expect("object");
    obj.remove("rope_parameters");
    obj.insert("rope_theta".into(), theta);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).expect("write");
    let p = &prompts("mistral")[1];
    let d = max_diff(
        &last_logits_of(tmp.path(), p),
        &last_logits_of(&fixture("mistral"), p),
    );
    assert!(d < 1e-6, "layouts differ by {d}");
    cfg["rope_theta"] = serde_json::json!(500.0);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).expect("write");
    let d = max_diff(
        &last_logits_of(tmp.path(), p),
        &last_logits_of(&fixture("mistral"), p),
    );
    assert!(d > 1e-3, "rope_theta had no effect");
}

#[test]
fn unsupported_architecture_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_fixture("llama", tmp.path(), false);
    let cfg = r#"{"architectures": ["MambaForCausalLM"], "model_type": "mamba"}"#;
    std::fs::write(tmp.path().join("config.json"), cfg).expect("write");
    let err = format!(
        "{:#}",
        load_causal(&EngineSettings::for_model(tmp.path()))
            .err()
            .expect("must fail")
    );
    assert!(err.contains("MambaForCausalLM"), "{err}");
    assert!(
        err.contains("LlamaForCausalLM") && err.contains("GPT2LMHeadModel"),
        "{err}"
    );
}

#[test]
fn loader_reports_ids_and_limits() {
    let llama = load(&fixture("llama")).meta;
    assert_eq!(llama.architecture, "LlamaForCausalLM");
    assert_eq!(llama.eos_token_ids, vec![6]);
    assert_eq!(llama.bos_token_id, Some(3));
    assert_eq!(llama.max_position_embeddings, 512);
    let gpt2 = load(&fixture("gpt2")).meta;
    assert_eq!(gpt2.max_position_embeddings, 512);
}

/// Bad batches are errors, not panics.
#[test]
fn malformed_batches_are_errors() {
    let model = load(&fixture("llama")).model;
    let mut cache = new_cache(model.as_ref(), 4);
    let seq = |tokens: Vec<u32>, blocks: Vec<u32>| ForwardBatch {
        adapters: Vec::new(),
        seqs: vec![SeqInput {
            context_len: 0,
            num_new: tokens.len(),
            block_table: blocks,
            logits: LogitsWanted::Last,
        }],
        tokens,
    };
    assert!(model.forward(&seq(vec![1, 2], vec![0]), &mut cache).is_ok());
    assert!(
        model
            .forward(&seq(vec![1, 5000], vec![0]), &mut cache)
            .is_err(),
        "token outside vocab"
    );
    assert!(
        model
            .forward(&seq(vec![1; 9], vec![0, 1]), &mut cache)
            .is_err(),
        "too few blocks"
    );
    assert!(
        model
            .forward(&seq(vec![1, 2], vec![7]), &mut cache)
            .is_err(),
        "block outside cache"
    );
    let mut b = seq(vec![1, 2], vec![0]);
    b.tokens.push(3);
    assert!(
        model.forward(&b, &mut cache).is_err(),
        "token count mismatch"
    );
}
