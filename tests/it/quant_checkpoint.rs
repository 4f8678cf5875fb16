//! Checkpoints published quantized (`tests/fixtures/{awq,gptq,gptq_act,fp8}`, written in AutoAWQ's,
//! AutoGPTQ's and DeepSeek's on-disk formats by `tests/fixtures/gen_quant.py`): they generate what
//! transformers generates on the same weights dequantized to float32, `QUANTIZATION=awq|gptq` is
//! checked against the checkpoint, and variants this build cannot run stop it naming the variant.

use std::path::Path;

use crate::common::fixtures::{
    cases, collect, common_prefix, fixture, greedy, start, start_at, TokenPath,
};
use worker_candle::engine::loader::load_causal;
use worker_candle::engine::settings::Quantization;
use worker_candle::engine::{Engine, EngineSettings};

/// The fixture's reference paths fed to the model loaded from `model` (teacher forcing): positions
/// where its top token is transformers', positions, worst last-prompt-logit error relative to the
/// largest |logit|.
fn teacher_forced(model: &str) -> (usize, usize, f32) {
    let paths: Vec<_> = cases(model)
        .into_iter()
        .map(|c| TokenPath {
            prompt: c.input_ids,
            next: c.greedy_ids,
            last_logits: c.last_logits,
        })
        .collect();
    let loaded = load_causal(&EngineSettings::for_model(fixture(model))).unwrap();
    crate::common::fixtures::teacher_forced(loaded.model.as_ref(), &paths)
}

/// AWQ (asymmetric, group 128), GPTQ (symmetric, group 32) and GPTQ act-order (asymmetric, group 64,
/// a shuffled `g_idx`). The repacked q4_0 (symmetric) blocks hold exactly the checkpoint's
/// dequantized weights, the q4_1 (asymmetric) ones up to the f16 rounding of their mins (unit test
/// `repacked_fixture_layers_equal_the_dequantized_checkpoint`); what remains is the kernels' 8-bit
/// quantization of activations (as llama.cpp's), which on these random weights (greedy margins down
/// to 0.005) flips some near-ties, and the f16 embedding table / LM head kept at q8_0 (as in situ).
/// Measured with transformers' path fed in: the same next token at 163/168 (awq), 158/168 (gptq),
/// 163/168 (gptq_act) positions, last-prompt logits within 5% of the largest |logit| (the same 4-bit
/// weights multiplied dense with a float head: 168/168 and 0.0000).
#[test]
fn four_bit_checkpoints_compute_what_transformers_computes() {
    for model in ["awq", "gptq", "gptq_act"] {
        let (hit, n, worst) = teacher_forced(model);
        eprintln!("{model}: top-1 {hit}/{n}, worst last-logit error {worst:.4} of max |logit|");
        assert!(hit * 100 >= n * 93, "{model}: {hit}/{n}");
        assert!(worst < 0.06, "{model}: logit error {worst}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_bit_checkpoints_generate_transformers_first_tokens() {
    for model in ["awq", "gptq", "gptq_act"] {
        let engine = start(model, |_| {});
        let (mut first, mut same, mut total) = (0, 0, 0);
        let cases = cases(model);
        for case in &cases {
            let mut req = greedy(case.input_ids.clone(), case.greedy_ids.len(), None);
            req.params.ignore_eos = true;
            let out = collect(&engine, req).await;
            let kept = common_prefix(&out.choice.token_ids, &case.greedy_ids);
            first += usize::from(kept > 0);
            same += kept;
            total += case.greedy_ids.len();
        }
        eprintln!(
            "{model}: first token {first}/{}, {same}/{total} before the first difference",
            cases.len()
        );
        assert_eq!(first, cases.len(), "{model}");
    }
}

/// FP8 block-wise weights become q8_0 blocks (8 bits over 32 columns instead of FP8's per-value
/// exponent), the head q8_0 too. Measured with transformers' path fed in: 156/168 positions,
/// last-prompt logits within 4.0% of the largest |logit|.
#[test]
fn fp8_checkpoints_follow_transformers() {
    let (hit, n, worst) = teacher_forced("fp8");
    eprintln!("fp8: top-1 {hit}/{n}, worst last-logit error {worst:.4} of max |logit|");
    assert!(hit * 100 >= n * 90, "fp8: {hit}/{n}");
    assert!(worst < 0.08, "fp8: logit error {worst}");
}

fn start_err(path: &Path, q: Quantization) -> String {
    let mut s = EngineSettings::for_model(path);
    s.quantization = q;
    format!("{:#}", Engine::start(s).err().expect("refused"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quantization_is_checked_against_the_checkpoint() {
    // the right name, or none, loads
    for (model, q) in [
        ("awq", Quantization::Awq),
        ("gptq_act", Quantization::Gptq),
        ("fp8", Quantization::Fp8),
    ] {
        let engine = start_at(&fixture(model), |s| s.quantization = q);
        let case = &cases(model)[0];
        let out = collect(&engine, greedy(case.input_ids.clone(), 2, None)).await;
        assert_eq!(out.choice.token_ids, case.greedy_ids[..2]);
    }
    let err = start_err(&fixture("awq"), Quantization::Gptq);
    assert!(
        err.contains("QUANTIZATION=gptq") && err.contains("`awq`"),
        "{err}"
    );
    let err = start_err(&fixture("gptq"), Quantization::Awq);
    assert!(
        err.contains("QUANTIZATION=awq") && err.contains("`gptq`"),
        "{err}"
    );
    let err = start_err(&fixture("gptq"), Quantization::InSitu("q8_0".into()));
    assert!(err.contains("already quantized"), "{err}");
    let err = start_err(&fixture("llama"), Quantization::Awq);
    assert!(err.contains("not quantized with awq"), "{err}");
    let err = start_err(&fixture("llama"), Quantization::Gptq);
    assert!(err.contains("not quantized with gptq"), "{err}");
    let err = start_err(&fixture("awq"), Quantization::Fp8);
    assert!(
        err.contains("QUANTIZATION=fp8") && err.contains("`awq`"),
        "{err}"
    );
    // vLLM's `fp8` on a float checkpoint quantizes it at load: here to q8_0
    let engine = start("llama", |s| s.quantization = Quantization::Fp8);
    let case = &cases("llama")[0];
    let out = collect(&engine, greedy(case.input_ids.clone(), 1, None)).await;
    assert_eq!(out.choice.token_ids, case.greedy_ids[..1]);
}

/// A copy of `model` with `edit` applied to its `quantization_config`.
fn variant(model: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(fixture(model)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg["quantization_config"]);
    std::fs::write(&path, cfg.to_string()).unwrap();
    dir
}

#[test]
fn unsupported_variants_stop_the_worker_naming_them() {
    use serde_json::json;
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("gptq", json!({"bits": 3}), "3-bit gptq"),
        ("gptq", json!({"bits": 8}), "8-bit gptq"),
        (
            "gptq",
            json!({"checkpoint_format": "marlin"}),
            "checkpoint_format marlin",
        ),
        ("awq", json!({"version": "gemv"}), "AWQ version gemv"),
        ("awq", json!({"version": "marlin"}), "AWQ version marlin"),
        (
            "awq",
            json!({"quant_method": "bitsandbytes"}),
            "quant_method bitsandbytes",
        ),
    ];
    for (model, edit, named) in cases {
        let dir = variant(model, |qc| {
            for (k, v) in edit.as_object().unwrap() {
                qc[k] = v.clone();
            }
        });
        let err = format!(
            "{:#}",
            Engine::start(EngineSettings::for_model(dir.path()))
                .err()
                .expect("refused")
        );
        assert!(
            err.contains(named) && err.contains("supported: AWQ 4-bit"),
            "{named}: {err}"
        );
    }
}

/// Continuous batching: an act-order GPTQ model (gathered inputs, fused q/k/v) and an AWQ model give
/// each sequence, batched with the others, what it gets alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_batched_together_get_what_they_get_alone() {
    for model in ["gptq_act", "awq"] {
        let engine = start(model, |_| {});
        let cases = cases(model);
        let mut alone = Vec::new();
        for c in &cases {
            alone.push(collect(&engine, greedy(c.input_ids.clone(), 12, None)).await);
        }
        let together = futures::future::join_all(
            cases
                .iter()
                .map(|c| collect(&engine, greedy(c.input_ids.clone(), 12, None))),
        )
        .await;
        for (a, t) in alone.iter().zip(&together) {
            assert_eq!(a.choice.token_ids, t.choice.token_ids, "{model}");
        }
    }
}

/// The FP8 fixture as llm-compressor writes it (`compressed-tensors`, `float-quantized`, block-wise
/// `weight_scale`) loads and computes what the `fp8` layout of the same weights computes.
#[test]
fn compressed_tensors_fp8_loads_like_fp8() {
    let dir = variant("fp8", |qc| {
        *qc = serde_json::json!({"quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"type": "float",
            "num_bits": 8, "strategy": "block", "block_structure": [128, 128]}}},
            "ignore": ["lm_head"]});
    });
    let bytes = std::fs::read(fixture("fp8").join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> = st
        .names()
        .into_iter()
        .map(|n| {
            let renamed = n.replace(".weight_scale_inv", ".weight_scale");
            (renamed, st.tensor(n).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    let paths: Vec<_> = cases("fp8")
        .into_iter()
        .map(|c| TokenPath {
            prompt: c.input_ids,
            next: c.greedy_ids,
            last_logits: c.last_logits,
        })
        .collect();
    let ours = load_causal(&EngineSettings::for_model(dir.path())).unwrap();
    let theirs = load_causal(&EngineSettings::for_model(fixture("fp8"))).unwrap();
    let a = crate::common::fixtures::teacher_forced(ours.model.as_ref(), &paths);
    let b = crate::common::fixtures::teacher_forced(theirs.model.as_ref(), &paths);
    assert_eq!(a, b);
}
