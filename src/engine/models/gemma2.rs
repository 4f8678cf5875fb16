//! Gemma 2: `(1 + w)` RMSNorms before and after both attention and MLP, GeLU-tanh MLP, embeddings
//! scaled by sqrt(hidden), attention and final logit soft-capping, sliding-window attention on
//! alternate layers, and a query scale from `query_pre_attn_scalar`.

use anyhow::Context;

use super::build;
use super::config::HfConfig;
use super::weights::Weights;
use crate::engine::layers::attention::{AttentionKernel, QkvProj};
use crate::engine::layers::{
    Attention, AttentionConfig, DecoderLayer, DecoderModel, Mlp, Norm, Positions,
};

fn norm(w: &Weights, name: &str, eps: f64) -> anyhow::Result<Norm> {
    Ok(Norm::rms_plus_one(w.get(&format!("{name}.weight"))?, eps)?)
}

/// `layer_types` when the config lists them, else Gemma 2's pattern: even layers slide.
fn sliding(cfg: &HfConfig, layer: usize) -> bool {
    match cfg.raw().get("layer_types").and_then(|v| v.as_array()) {
        Some(types) => types.get(layer).and_then(|t| t.as_str()) == Some("sliding_attention"),
        None => layer % 2 == 0,
    }
}

pub fn load(cfg: &HfConfig, w: &Weights) -> anyhow::Result<DecoderModel> {
    let eps = cfg.eps();
    let head_dim = cfg.head_dim()?;
    let hidden = cfg.hidden_size()?;
    let act = cfg.activation("gelu_pytorch_tanh")?;
    let query_scalar = cfg
        .opt_f64(&["query_pre_attn_scalar"])
        .context("config.json lacks query_pre_attn_scalar")?;
    let bias = cfg.bool("attention_bias", false);
    let mut layers = Vec::new();
    for i in 0..cfg.num_layers()? {
        let p = format!("model.layers.{i}");
        let a = format!("{p}.self_attn");
        let m = format!("{p}.mlp");
        layers.push(DecoderLayer {
            input_norm: norm(w, &format!("{p}.input_layernorm"), eps)?,
            attn: Attention {
                qkv: QkvProj::Separate {
                    q: build::linear(w, &format!("{a}.q_proj"), bias)?,
                    k: build::linear(w, &format!("{a}.k_proj"), bias)?,
                    v: build::linear(w, &format!("{a}.v_proj"), bias)?,
                },
                o: build::linear(w, &format!("{a}.o_proj"), bias)?,
                q_norm: None,
                k_norm: None,
                cfg: AttentionConfig {
                    num_heads: cfg.num_heads()?,
                    num_kv_heads: cfg.num_kv_heads()?,
                    head_dim,
                    scale: 1.0 / query_scalar.sqrt(),
                    softcap: cfg.opt_f64(&["attn_logit_softcapping"]),
                    sliding_window: cfg.sliding_window().filter(|_| sliding(cfg, i)),
                },
            },
            post_attn_norm: Some(norm(w, &format!("{p}.post_attention_layernorm"), eps)?),
            pre_mlp_norm: norm(w, &format!("{p}.pre_feedforward_layernorm"), eps)?,
            post_mlp_norm: Some(norm(w, &format!("{p}.post_feedforward_layernorm"), eps)?),
            mlp: Mlp::Gated {
                gate: build::linear(w, &format!("{m}.gate_proj"), false)?,
                up: build::linear(w, &format!("{m}.up_proj"), false)?,
                down: build::linear(w, &format!("{m}.down_proj"), false)?,
                act,
            },
        });
    }
    let embed = w.get("model.embed_tokens.weight")?;
    Ok(DecoderModel {
        lm_head: build::lm_head(cfg, w, &embed, "lm_head", true)?,
        embed,
        embed_scale: Some((hidden as f64).sqrt()),
        positions: Positions::Rope(build::rope(cfg, w)?),
        layers,
        final_norm: norm(w, "model.norm", eps)?,
        final_softcap: cfg.opt_f64(&["final_logit_softcapping"]),
        spec: build::spec(cfg, w, "Gemma2ForCausalLM")?,
        kernel: AttentionKernel::Auto,
    })
}
