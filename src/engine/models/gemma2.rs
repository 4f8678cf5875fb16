//! Gemma 2: `(1 + w)` RMSNorms before and after both attention and MLP, GeLU-tanh MLP, embeddings
//! scaled by `sqrt(hidden)`, soft-capped attention and final logits, `query_pre_attn_scalar` as the
//! attention scale, and sliding-window attention on alternate layers.

use crate::engine::layers::Weights;
use candle_core::Result;
use serde_json::Value;

use super::decoder::{BaseConfig, DecoderModel};
use crate::engine::layers::Activation;

pub(crate) fn load(vb: Weights, config: &Value, max_positions: usize) -> Result<DecoderModel> {
    let base = BaseConfig::parse(config)?;
    let mut cfg = base.decoder("Gemma2ForCausalLM", config)?;
    let get_f = |k: &str| config.get(k).and_then(Value::as_f64);
    cfg.norm_plus_one = true;
    cfg.sandwich_norms = true;
    cfg.tie_word_embeddings = config
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    if let Some(act) = config.get("hidden_activation").and_then(Value::as_str) {
        cfg.activation = Activation::from_name(act)?;
    } else if config.get("hidden_act").is_none() {
        cfg.activation = Activation::GeluTanh;
    }
    cfg.embed_scale = Some((cfg.hidden_size as f64).sqrt());
    cfg.attn_softcap = get_f("attn_logit_softcapping");
    cfg.final_softcap = get_f("final_logit_softcapping");
    let scalar = get_f("query_pre_attn_scalar").unwrap_or(cfg.head_dim as f64);
    cfg.attn_scale = 1.0 / scalar.sqrt();
    cfg.layer_windows = match (&base.layer_types, base.sliding_window) {
        (None, Some(w)) => (0..cfg.num_layers)
            .map(|i| (i % 2 == 0).then_some(w))
            .collect(),
        _ => base.layer_windows(false),
    };
    DecoderModel::load(vb, cfg, max_positions)
}
