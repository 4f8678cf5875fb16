//! Loading helpers every architecture file shares: named linears, norms, RoPE, the LM head, the spec.

use candle_core::Tensor;

use super::config::HfConfig;
use super::weights::Weights;
use super::ModelSpec;
use crate::engine::layers::{Linear, Norm, Rope};

pub fn linear(w: &Weights, name: &str, bias: bool) -> anyhow::Result<Linear> {
    let weight = w.get(&format!("{name}.weight"))?;
    let bias = if bias {
        Some(w.get(&format!("{name}.bias"))?)
    } else {
        w.opt(&format!("{name}.bias"))?
    };
    Ok(Linear::new(weight, bias)?)
}

pub fn rms_norm(w: &Weights, name: &str, eps: f64) -> anyhow::Result<Norm> {
    Ok(Norm::rms(w.get(&format!("{name}.weight"))?, eps))
}

pub fn layer_norm(w: &Weights, name: &str, eps: f64) -> anyhow::Result<Norm> {
    Ok(Norm::layer(
        w.get(&format!("{name}.weight"))?,
        w.get(&format!("{name}.bias"))?,
        eps,
    ))
}

pub fn rope(cfg: &HfConfig, w: &Weights) -> anyhow::Result<Rope> {
    let head_dim = cfg.head_dim()?;
    let rot_dim = (head_dim as f64 * cfg.partial_rotary_factor()) as usize;
    Ok(Rope::new(
        cfg.rope_theta(),
        rot_dim,
        cfg.max_position_embeddings()?,
        &cfg.rope_scaling()?,
        w.dtype(),
        w.device(),
    )?)
}

/// The output projection: its own weight, or the embeddings when tied (or when the checkpoint omits it).
pub fn lm_head(
    cfg: &HfConfig,
    w: &Weights,
    embed: &Tensor,
    name: &str,
    tie_default: bool,
) -> anyhow::Result<Linear> {
    let key = format!("{name}.weight");
    if !cfg.tie_word_embeddings(tie_default) && w.contains(&key) {
        return linear(w, name, false);
    }
    Ok(Linear::new(embed.clone(), None)?)
}

pub fn spec(cfg: &HfConfig, w: &Weights, architecture: &str) -> anyhow::Result<ModelSpec> {
    Ok(ModelSpec {
        architecture: architecture.to_string(),
        num_layers: cfg.num_layers()?,
        num_kv_heads: cfg.num_kv_heads()?,
        head_dim: cfg.head_dim()?,
        hidden_size: cfg.hidden_size()?,
        vocab_size: cfg.vocab_size()?,
        max_position_embeddings: cfg.max_position_embeddings()?,
        dtype: w.dtype(),
        device: w.device().clone(),
    })
}
