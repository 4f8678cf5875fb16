//! Qwen2 / Qwen2.5: the Llama decoder with biases on the q/k/v projections (not on o).

use crate::engine::layers::Weights;
use candle_core::Result;
use serde_json::Value;

use super::decoder::{BaseConfig, DecoderModel};

pub(crate) fn load(vb: Weights, config: &Value, max_positions: usize) -> Result<DecoderModel> {
    let base = BaseConfig::parse(config)?;
    let mut cfg = base.decoder("Qwen2ForCausalLM", config)?;
    cfg.qkv_bias = true;
    cfg.o_bias = false;
    // only layers `layer_types` marks as sliding use the window (none unless `use_sliding_window`)
    let sliding = config
        .get("use_sliding_window")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if !sliding {
        cfg.layer_windows = vec![None; cfg.num_layers];
    }
    DecoderModel::load(vb, cfg, max_positions)
}
