//! SmolLM3: the Llama decoder with RoPE left out of some layers (`no_rope_layers`: 1 where a layer
//! uses RoPE, else every `no_rope_layer_interval`-th layer without).

use crate::engine::layers::Weights;
use candle_core::Result;
use serde_json::Value;

use super::decoder::{BaseConfig, DecoderModel};

pub(crate) fn load(vb: Weights, config: &Value, max_positions: usize) -> Result<DecoderModel> {
    let base = BaseConfig::parse(config)?;
    let mut cfg = base.decoder("SmolLM3ForCausalLM", config)?;
    cfg.no_rope_layers = match config.get("no_rope_layers").and_then(Value::as_array) {
        Some(uses) => uses.iter().map(|u| u.as_u64() == Some(0)).collect(),
        None => {
            let every = config
                .get("no_rope_layer_interval")
                .and_then(Value::as_u64)
                .unwrap_or(4)
                .max(1) as usize;
            (0..cfg.num_layers)
                .map(|i| (i + 1).is_multiple_of(every))
                .collect()
        }
    };
    if config.get("use_sliding_window").and_then(Value::as_bool) != Some(true) {
        cfg.layer_windows = vec![None; cfg.num_layers];
    }
    DecoderModel::load(vb, cfg, max_positions)
}
