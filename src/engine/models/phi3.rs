//! Phi-3: the Llama decoder with fused `qkv_proj` and `gate_up_proj` weights and a sliding window.

use crate::engine::layers::Weights;
use candle_core::Result;
use serde_json::Value;

use super::decoder::{BaseConfig, DecoderModel};

pub(crate) fn load(vb: Weights, config: &Value, max_positions: usize) -> Result<DecoderModel> {
    let base = BaseConfig::parse(config)?;
    let mut cfg = base.decoder("Phi3ForCausalLM", config)?;
    cfg.fused_weights = true;
    cfg.layer_windows = base.layer_windows(true);
    DecoderModel::load(vb, cfg, max_positions)
}
