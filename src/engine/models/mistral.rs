//! Mistral: the Llama decoder with a sliding attention window on every layer.

use crate::engine::layers::Weights;
use candle_core::Result;
use serde_json::Value;

use super::decoder::{BaseConfig, DecoderModel};

pub(crate) fn load(vb: Weights, config: &Value, max_positions: usize) -> Result<DecoderModel> {
    let base = BaseConfig::parse(config)?;
    let mut cfg = base.decoder("MistralForCausalLM", config)?;
    cfg.layer_windows = base.layer_windows(true);
    DecoderModel::load(vb, cfg, max_positions)
}
