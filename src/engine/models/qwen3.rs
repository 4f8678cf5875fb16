//! Qwen3: the Llama decoder with an RMSNorm over each head of q and k before RoPE, and an explicit
//! `head_dim`.

use crate::engine::layers::Weights;
use candle_core::Result;
use serde_json::Value;

use super::decoder::{BaseConfig, DecoderModel};

pub(crate) fn load(vb: Weights, config: &Value, max_positions: usize) -> Result<DecoderModel> {
    let base = BaseConfig::parse(config)?;
    let mut cfg = base.decoder("Qwen3ForCausalLM", config)?;
    cfg.qk_norm = true;
    let sliding = config
        .get("use_sliding_window")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if !sliding {
        cfg.layer_windows = vec![None; cfg.num_layers];
    }
    DecoderModel::load(vb, cfg, max_positions)
}
