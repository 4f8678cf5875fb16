//! Qwen3-MoE: Qwen3 (q/k norms) whose feed-forward is a mixture of experts on every
//! `decoder_sparse_step`-th layer not in `mlp_only_layers` (a dense MLP there), top-k of a softmax,
//! renormalised when `norm_topk_prob`.

use crate::engine::layers::{MoeConfig, Weights};
use candle_core::Result;
use serde_json::Value;

use super::decoder::{BaseConfig, DecoderModel};

pub(crate) fn load(vb: Weights, config: &Value, max_positions: usize) -> Result<DecoderModel> {
    let base = BaseConfig::parse(config)?;
    let mut cfg = base.decoder("Qwen3MoeForCausalLM", config)?;
    cfg.qk_norm = true;
    if config.get("use_sliding_window").and_then(Value::as_bool) != Some(true) {
        cfg.layer_windows = vec![None; cfg.num_layers];
    }
    cfg.moe = Some(MoeConfig::from_config(config, cfg.num_layers, false)?);
    DecoderModel::load(vb, cfg, max_positions)
}
