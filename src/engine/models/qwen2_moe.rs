//! Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 (q/k/v biases) whose feed-forward is a mixture of
//! experts plus a shared expert under a sigmoid gate, top-k of a softmax, renormalised when
//! `norm_topk_prob`.

use crate::engine::layers::{MoeConfig, Weights};
use candle_core::Result;
use serde_json::Value;

use super::decoder::{BaseConfig, DecoderModel};

pub(crate) fn load(vb: Weights, config: &Value, max_positions: usize) -> Result<DecoderModel> {
    let base = BaseConfig::parse(config)?;
    let mut cfg = base.decoder("Qwen2MoeForCausalLM", config)?;
    cfg.qkv_bias = config
        .get("qkv_bias")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    cfg.o_bias = false;
    if config.get("use_sliding_window").and_then(Value::as_bool) != Some(true) {
        cfg.layer_windows = vec![None; cfg.num_layers];
    }
    cfg.moe = Some(MoeConfig::from_config(config, cfg.num_layers, false)?);
    DecoderModel::load(vb, cfg, max_positions)
}
