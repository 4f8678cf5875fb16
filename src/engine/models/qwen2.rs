//! Qwen 2 / 2.5: Llama with biases on the q/k/v projections; a sliding window only when
//! `use_sliding_window` is set, on the layers from `max_window_layers` on.

use super::config::HfConfig;
use super::llama::{self, Variant};
use super::weights::Weights;
use crate::engine::layers::DecoderModel;

pub fn load(cfg: &HfConfig, w: &Weights) -> anyhow::Result<DecoderModel> {
    let layers = cfg.num_layers()?;
    let window = cfg
        .sliding_window()
        .filter(|_| cfg.bool("use_sliding_window", false));
    let first_windowed = cfg.opt_usize(&["max_window_layers"]).unwrap_or(layers);
    let variant = Variant {
        name: "Qwen2ForCausalLM",
        qkv_bias: true,
        o_bias: false,
        qk_norm: false,
        sliding_window: (0..layers)
            .map(|i| window.filter(|_| i >= first_windowed))
            .collect(),
    };
    llama::build_variant(cfg, w, variant)
}
