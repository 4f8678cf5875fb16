//! Phi-3: the Llama block with fused weights — one `qkv_proj` and one `gate_up_proj` per layer.

use super::build;
use super::config::HfConfig;
use super::weights::Weights;
use crate::engine::layers::attention::{AttentionKernel, QkvProj};
use crate::engine::layers::{
    Attention, AttentionConfig, DecoderLayer, DecoderModel, Mlp, Positions,
};

pub fn load(cfg: &HfConfig, w: &Weights) -> anyhow::Result<DecoderModel> {
    let eps = cfg.eps();
    let head_dim = cfg.head_dim()?;
    let act = cfg.activation("silu")?;
    let mut layers = Vec::new();
    for i in 0..cfg.num_layers()? {
        let p = format!("model.layers.{i}");
        layers.push(DecoderLayer {
            input_norm: build::rms_norm(w, &format!("{p}.input_layernorm"), eps)?,
            attn: Attention {
                qkv: QkvProj::Fused(build::linear(w, &format!("{p}.self_attn.qkv_proj"), false)?),
                o: build::linear(w, &format!("{p}.self_attn.o_proj"), false)?,
                q_norm: None,
                k_norm: None,
                cfg: AttentionConfig {
                    num_heads: cfg.num_heads()?,
                    num_kv_heads: cfg.num_kv_heads()?,
                    head_dim,
                    scale: 1.0 / (head_dim as f64).sqrt(),
                    softcap: None,
                    sliding_window: cfg.sliding_window(),
                },
            },
            post_attn_norm: None,
            pre_mlp_norm: build::rms_norm(w, &format!("{p}.post_attention_layernorm"), eps)?,
            post_mlp_norm: None,
            mlp: Mlp::FusedGated {
                gate_up: build::linear(w, &format!("{p}.mlp.gate_up_proj"), false)?,
                down: build::linear(w, &format!("{p}.mlp.down_proj"), false)?,
                act,
            },
        });
    }
    let embed = w.get("model.embed_tokens.weight")?;
    Ok(DecoderModel {
        lm_head: build::lm_head(cfg, w, &embed, "lm_head", false)?,
        embed,
        embed_scale: None,
        positions: Positions::Rope(build::rope(cfg, w)?),
        layers,
        final_norm: build::rms_norm(w, "model.norm", eps)?,
        final_softcap: None,
        spec: build::spec(cfg, w, "Phi3ForCausalLM")?,
        kernel: AttentionKernel::Auto,
    })
}
