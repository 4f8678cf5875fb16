//! OLMo 2: the Llama decoder with its norms after attention and after the MLP instead of before
//! (`post_attention_layernorm`, `post_feedforward_layernorm`) and q/k RMSNorms over the whole
//! projections rather than each head.

use crate::engine::layers::Weights;
use candle_core::Result;
use serde_json::Value;

use super::decoder::{BaseConfig, DecoderModel};

pub(crate) fn load(vb: Weights, config: &Value, max_positions: usize) -> Result<DecoderModel> {
    let base = BaseConfig::parse(config)?;
    let mut cfg = base.decoder("Olmo2ForCausalLM", config)?;
    cfg.post_norms_only = true;
    cfg.qk_norm = true;
    cfg.qk_norm_whole = true;
    DecoderModel::load(vb, cfg, max_positions)
}
