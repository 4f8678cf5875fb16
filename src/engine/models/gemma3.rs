//! Gemma 3 (text): Gemma 2's layout (four `(1 + w)` norms per layer, GeLU-tanh, scaled embeddings,
//! `query_pre_attn_scalar`) with `(1 + w)` q/k norms, no soft-capping, and sliding-window layers
//! interleaved with global ones, each kind with its own RoPE base. `Gemma3ForConditionalGeneration`
//! checkpoints run their language model (config under `text_config`, weights under
//! `language_model.model.*` or `model.language_model.*`); the vision tower is not read.

use candle_core::Result;
use serde_json::{json, Value};

use super::decoder::{BaseConfig, DecoderModel};
use crate::engine::layers::{Activation, RopeConfig, Weights};

/// A multimodal checkpoint's config.json with its `text_config` lifted to the top (the text model's
/// fields win; `architectures` and the rest stay); other configs as they are.
pub(crate) fn text_config(config: Value) -> Value {
    let Some(Value::Object(text)) = config.get("text_config").cloned() else {
        return config;
    };
    let mut merged = config;
    for (k, v) in text {
        merged[k] = v;
    }
    merged
}

pub(crate) fn load(vb: Weights, config: &Value, max_positions: usize) -> Result<DecoderModel> {
    let base = BaseConfig::parse(config)?;
    let mut cfg = base.decoder("Gemma3ForCausalLM", config)?;
    let get_f = |k: &str| config.get(k).and_then(Value::as_f64);
    cfg.norm_plus_one = true;
    cfg.sandwich_norms = true;
    cfg.qk_norm = true;
    cfg.tie_word_embeddings =
        config.get("tie_word_embeddings").and_then(Value::as_bool) != Some(false);
    let act = config.get("hidden_activation").and_then(Value::as_str);
    cfg.activation = Activation::from_name(act.unwrap_or("gelu_pytorch_tanh"))?;
    cfg.embed_scale = Some((cfg.hidden_size as f64).sqrt());
    cfg.attn_softcap = get_f("attn_logit_softcapping");
    cfg.final_softcap = get_f("final_logit_softcapping");
    cfg.attn_scale = 1.0
        / get_f("query_pre_attn_scalar")
            .unwrap_or(cfg.head_dim as f64)
            .sqrt();
    let pattern = ["sliding_window_pattern", "_sliding_window_pattern"]
        .iter()
        .find_map(|k| config.get(*k).and_then(Value::as_u64))
        .unwrap_or(6) as usize;
    cfg.layer_windows = match (&base.layer_types, base.sliding_window) {
        (None, Some(w)) => (0..cfg.num_layers)
            .map(|i| (!(i + 1).is_multiple_of(pattern.max(1))).then_some(w))
            .collect(),
        _ => base.layer_windows(false),
    };
    let per_kind = config
        .get("rope_parameters")
        .filter(|p| p.get("full_attention").is_some());
    let (global, local) = match per_kind {
        Some(p) => (
            RopeConfig::from_config(&json!({"rope_parameters": p["full_attention"]}), 1e6)?,
            RopeConfig::from_config(&json!({"rope_parameters": p["sliding_attention"]}), 1e4)?,
        ),
        None => {
            let theta = get_f("rope_local_base_freq").unwrap_or(1e4);
            (
                RopeConfig::from_config(config, 1e6)?,
                RopeConfig::from_config(&json!({ "rope_theta": theta }), theta)?,
            )
        }
    };
    cfg.rope = global;
    cfg.rope_local = Some(local);
    for (prefix, head) in [
        ("model.language_model", "lm_head"),
        ("language_model.model", "language_model.lm_head"),
    ] {
        if vb.contains_tensor(&format!("{prefix}.embed_tokens.weight")) {
            cfg.prefix = prefix.into();
            cfg.lm_head_prefix = head.into();
        }
    }
    DecoderModel::load(vb, cfg, max_positions)
}
