//! Mixtral: the Mistral decoder whose feed-forward (`block_sparse_moe`, experts `w1`/`w3`/`w2`) is a
//! mixture of experts on every layer, weighted by a softmax over the top-k router logits.

use crate::engine::layers::{MoeConfig, Weights};
use candle_core::Result;
use serde_json::Value;

use super::decoder::{BaseConfig, DecoderModel};

pub(crate) fn load(vb: Weights, config: &Value, max_positions: usize) -> Result<DecoderModel> {
    let base = BaseConfig::parse(config)?;
    let mut cfg = base.decoder("MixtralForCausalLM", config)?;
    cfg.layer_windows = base.layer_windows(true);
    let mut moe = MoeConfig::from_config(config, cfg.num_layers, true)?;
    // softmax over the k best logits = the k best probabilities renormalised
    moe.renormalize = true;
    moe.sparse_layers = vec![true; cfg.num_layers];
    let layer0 = format!("{}.layers.0", cfg.prefix);
    if vb.contains_tensor(&format!("{layer0}.block_sparse_moe.gate.weight")) {
        moe.module = "block_sparse_moe".into();
    }
    cfg.moe = Some(moe);
    DecoderModel::load(vb, cfg, max_positions)
}
