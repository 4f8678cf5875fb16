//! Qwen 3: Llama with per-head RMSNorm on queries and keys, and an explicit `head_dim`.

use super::config::HfConfig;
use super::llama::{self, Variant};
use super::weights::Weights;
use crate::engine::layers::DecoderModel;

pub fn load(cfg: &HfConfig, w: &Weights) -> anyhow::Result<DecoderModel> {
    let variant = Variant {
        name: "Qwen3ForCausalLM",
        qkv_bias: cfg.bool("attention_bias", false),
        o_bias: cfg.bool("attention_bias", false),
        qk_norm: true,
        sliding_window: vec![None; cfg.num_layers()?],
    };
    llama::build_variant(cfg, w, variant)
}
