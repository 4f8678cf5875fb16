//! Mistral: the Llama decoder with a sliding attention window on every layer.

use candle_core::Result;
use candle_nn::VarBuilder;
use serde_json::Value;

use super::decoder::{BaseConfig, DecoderModel};

pub fn load(vb: VarBuilder, config: &Value, max_positions: usize) -> Result<DecoderModel> {
    let base = BaseConfig::parse(config)?;
    let mut cfg = base.decoder("MistralForCausalLM", config)?;
    cfg.layer_windows = base.layer_windows(true);
    DecoderModel::load(vb, cfg, max_positions)
}
