//! Mistral: Llama with a sliding attention window on every layer.

use super::config::HfConfig;
use super::llama::{self, Variant};
use super::weights::Weights;
use crate::engine::layers::DecoderModel;

pub fn load(cfg: &HfConfig, w: &Weights) -> anyhow::Result<DecoderModel> {
    let variant = Variant {
        name: "MistralForCausalLM",
        qkv_bias: false,
        o_bias: false,
        qk_norm: false,
        sliding_window: vec![cfg.sliding_window(); cfg.num_layers()?],
    };
    llama::build_variant(cfg, w, variant)
}
