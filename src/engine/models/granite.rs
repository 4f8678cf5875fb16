//! Granite (3.x): the Llama decoder with four multipliers: embeddings times `embedding_multiplier`,
//! `attention_multiplier` as the attention scale, attention and MLP outputs times
//! `residual_multiplier` before the residual add, logits divided by `logits_scaling`.

use crate::engine::layers::Weights;
use candle_core::Result;
use serde_json::Value;

use super::decoder::{BaseConfig, DecoderModel};

pub(crate) fn load(vb: Weights, config: &Value, max_positions: usize) -> Result<DecoderModel> {
    let base = BaseConfig::parse(config)?;
    let mut cfg = base.decoder("GraniteForCausalLM", config)?;
    let get_f = |k: &str| config.get(k).and_then(Value::as_f64);
    cfg.embed_scale = get_f("embedding_multiplier").filter(|m| *m != 1.0);
    if let Some(m) = get_f("attention_multiplier") {
        cfg.attn_scale = m;
    }
    cfg.residual_scale = get_f("residual_multiplier").filter(|m| *m != 1.0);
    cfg.logits_divisor = get_f("logits_scaling").filter(|m| *m != 1.0);
    DecoderModel::load(vb, cfg, max_positions)
}
