//! Llama 2, 3, 3.1, 3.2 (incl. `llama3` RoPE scaling and tied embeddings): the plain decoder.

use crate::engine::layers::Weights;
use candle_core::Result;
use serde_json::Value;

use super::decoder::{BaseConfig, DecoderModel};

pub(crate) fn load(vb: Weights, config: &Value, max_positions: usize) -> Result<DecoderModel> {
    let base = BaseConfig::parse(config)?;
    let cfg = base.decoder("LlamaForCausalLM", config)?;
    DecoderModel::load(vb, cfg, max_positions)
}
