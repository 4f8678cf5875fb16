//! Llama 2 / 3 / 3.1 / 3.2: pre-norm RMSNorm blocks, grouped-query attention with RoPE (incl. `llama3`
//! scaling), SwiGLU, optionally tied embeddings. Mistral, Qwen 2 and Qwen 3 are this model with a few
//! switches, set in their own files.

use super::build;
use super::config::HfConfig;
use super::weights::Weights;
use crate::engine::layers::attention::{AttentionKernel, QkvProj};
use crate::engine::layers::{
    Attention, AttentionConfig, DecoderLayer, DecoderModel, Mlp, Positions,
};

/// What distinguishes the members of the Llama family.
pub struct Variant {
    pub name: &'static str,
    /// Bias on the q/k/v projections (Qwen 2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Per-head RMSNorm on queries and keys (Qwen 3).
    pub qk_norm: bool,
    /// The sliding window of each layer, if any.
    pub sliding_window: Vec<Option<usize>>,
}

impl Variant {
    pub fn llama(cfg: &HfConfig) -> anyhow::Result<Self> {
        Ok(Self {
            name: "LlamaForCausalLM",
            qkv_bias: cfg.bool("attention_bias", false),
            o_bias: cfg.bool("attention_bias", false),
            qk_norm: false,
            sliding_window: vec![None; cfg.num_layers()?],
        })
    }
}

pub fn load(cfg: &HfConfig, w: &Weights) -> anyhow::Result<DecoderModel> {
    build_variant(cfg, w, Variant::llama(cfg)?)
}

pub fn build_variant(
    cfg: &HfConfig,
    w: &Weights,
    variant: Variant,
) -> anyhow::Result<DecoderModel> {
    let eps = cfg.eps();
    let head_dim = cfg.head_dim()?;
    let act = cfg.activation("silu")?;
    let mlp_bias = cfg.bool("mlp_bias", false);
    let mut layers = Vec::new();
    for i in 0..cfg.num_layers()? {
        let p = format!("model.layers.{i}");
        let a = format!("{p}.self_attn");
        let attn = Attention {
            qkv: QkvProj::Separate {
                q: build::linear(w, &format!("{a}.q_proj"), variant.qkv_bias)?,
                k: build::linear(w, &format!("{a}.k_proj"), variant.qkv_bias)?,
                v: build::linear(w, &format!("{a}.v_proj"), variant.qkv_bias)?,
            },
            o: build::linear(w, &format!("{a}.o_proj"), variant.o_bias)?,
            q_norm: variant
                .qk_norm
                .then(|| build::rms_norm(w, &format!("{a}.q_norm"), eps))
                .transpose()?,
            k_norm: variant
                .qk_norm
                .then(|| build::rms_norm(w, &format!("{a}.k_norm"), eps))
                .transpose()?,
            cfg: AttentionConfig {
                num_heads: cfg.num_heads()?,
                num_kv_heads: cfg.num_kv_heads()?,
                head_dim,
                scale: 1.0 / (head_dim as f64).sqrt(),
                softcap: None,
                sliding_window: variant.sliding_window.get(i).copied().flatten(),
            },
        };
        let m = format!("{p}.mlp");
        layers.push(DecoderLayer {
            input_norm: build::rms_norm(w, &format!("{p}.input_layernorm"), eps)?,
            attn,
            post_attn_norm: None,
            pre_mlp_norm: build::rms_norm(w, &format!("{p}.post_attention_layernorm"), eps)?,
            post_mlp_norm: None,
            mlp: Mlp::Gated {
                gate: build::linear(w, &format!("{m}.gate_proj"), mlp_bias)?,
                up: build::linear(w, &format!("{m}.up_proj"), mlp_bias)?,
                down: build::linear(w, &format!("{m}.down_proj"), mlp_bias)?,
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
        spec: build::spec(cfg, w, variant.name)?,
        kernel: AttentionKernel::Auto,
    })
}
