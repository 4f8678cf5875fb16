//! GPT-2: learned absolute positions, LayerNorm, fused `c_attn`, GeLU MLP, tied head. Its `Conv1D`
//! weights are stored `[in, out]`; they are transposed once at load to the `[out, in]` of a Linear.

use super::build;
use super::config::HfConfig;
use super::weights::Weights;
use crate::engine::layers::attention::{AttentionKernel, QkvProj};
use crate::engine::layers::{
    Attention, AttentionConfig, DecoderLayer, DecoderModel, Linear, Mlp, Positions,
};

fn conv1d(w: &Weights, name: &str) -> anyhow::Result<Linear> {
    let weight = w.get(&format!("{name}.weight"))?.t()?.contiguous()?;
    Ok(Linear::new(weight, w.opt(&format!("{name}.bias"))?)?)
}

pub fn load(cfg: &HfConfig, w: &Weights) -> anyhow::Result<DecoderModel> {
    // The original checkpoints name tensors `h.0...`, transformers' own saves `transformer.h.0...`.
    let root = if w.contains("transformer.wte.weight") {
        "transformer."
    } else {
        ""
    };
    let eps = cfg.eps();
    let hidden = cfg.hidden_size()?;
    let heads = cfg.num_heads()?;
    let head_dim = hidden / heads;
    let act = cfg.activation("gelu_new")?;
    let mut layers = Vec::new();
    for i in 0..cfg.num_layers()? {
        let p = format!("{root}h.{i}");
        layers.push(DecoderLayer {
            input_norm: build::layer_norm(w, &format!("{p}.ln_1"), eps)?,
            attn: Attention {
                qkv: QkvProj::Fused(conv1d(w, &format!("{p}.attn.c_attn"))?),
                o: conv1d(w, &format!("{p}.attn.c_proj"))?,
                q_norm: None,
                k_norm: None,
                cfg: AttentionConfig {
                    num_heads: heads,
                    num_kv_heads: heads,
                    head_dim,
                    scale: 1.0 / (head_dim as f64).sqrt(),
                    softcap: None,
                    sliding_window: None,
                },
            },
            post_attn_norm: None,
            pre_mlp_norm: build::layer_norm(w, &format!("{p}.ln_2"), eps)?,
            post_mlp_norm: None,
            mlp: Mlp::Plain {
                fc: conv1d(w, &format!("{p}.mlp.c_fc"))?,
                proj: conv1d(w, &format!("{p}.mlp.c_proj"))?,
                act,
            },
        });
    }
    let embed = w.get(&format!("{root}wte.weight"))?;
    Ok(DecoderModel {
        lm_head: build::lm_head(cfg, w, &embed, "lm_head", true)?,
        embed,
        embed_scale: None,
        positions: Positions::Learned(w.get(&format!("{root}wpe.weight"))?),
        layers,
        final_norm: build::layer_norm(w, &format!("{root}ln_f"), eps)?,
        final_softcap: None,
        spec: build::spec(cfg, w, "GPT2LMHeadModel")?,
        kernel: AttentionKernel::Auto,
    })
}
