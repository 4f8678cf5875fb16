//! GPT-2: learned absolute positions, LayerNorm, `Conv1D` weights stored `[in, out]`, fused `c_attn`,
//! GeLU MLP, head tied to the token embeddings.

use crate::engine::layers::Weights;
use candle_core::{bail, DType, Result, Tensor};
use serde::Deserialize;
use serde_json::Value;

use super::CausalLM;
use crate::engine::batch::{ForwardBatch, ModelSpec};
use crate::engine::kv_cache::KvCache;
use crate::engine::layers::{
    Activation, AttentionImpl, AttentionParams, BatchPlan, Embedding, Linear, Mlp, Norm,
};

#[derive(Debug, Clone, Deserialize)]
struct Gpt2Config {
    n_embd: usize,
    n_head: usize,
    n_layer: usize,
    n_positions: usize,
    vocab_size: usize,
    n_inner: Option<usize>,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "default_act")]
    activation_function: String,
    #[serde(default = "yes")]
    scale_attn_weights: bool,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
}

fn default_eps() -> f64 {
    1e-5
}

fn default_act() -> String {
    "gelu_new".into()
}

fn yes() -> bool {
    true
}

struct Block {
    ln_1: Norm,
    c_attn: Linear,
    c_proj: Linear,
    ln_2: Norm,
    mlp: Mlp,
    attn: AttentionParams,
}

pub(crate) struct Gpt2 {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
    lm_head: Linear,
    spec: ModelSpec,
    attention_impl: AttentionImpl,
}

pub(crate) fn load(vb: Weights, config: &Value, max_positions: usize) -> Result<Gpt2> {
    let cfg: Gpt2Config = serde_json::from_value(config.clone())
        .map_err(|e| candle_core::Error::Msg(format!("config.json: {e}")))?;
    if cfg.n_head == 0 || !cfg.n_embd.is_multiple_of(cfg.n_head) {
        bail!(
            "n_embd {} is not a multiple of n_head {}",
            cfg.n_embd,
            cfg.n_head
        )
    }
    // some checkpoints (the original `gpt2`) have no `transformer.` prefix
    let t = if vb.contains_tensor("transformer.wte.weight") {
        vb.pp("transformer")
    } else {
        vb.clone()
    };
    let (e, hd) = (cfg.n_embd, cfg.n_embd / cfg.n_head);
    let inner = cfg.n_inner.unwrap_or(4 * e);
    let act = Activation::from_name(&cfg.activation_function)?;
    let blocks = (0..cfg.n_layer)
        .map(|i| {
            let b = t.pp(format!("h.{i}"));
            let mut scale = if cfg.scale_attn_weights {
                1.0 / (hd as f64).sqrt()
            } else {
                1.0
            };
            if cfg.scale_attn_by_inverse_layer_idx {
                scale /= (i + 1) as f64;
            }
            Ok(Block {
                ln_1: Norm::layer(&b.pp("ln_1"), e, cfg.layer_norm_epsilon)?,
                c_attn: b.pp("attn.c_attn").conv1d(e, 3 * e)?,
                c_proj: b.pp("attn.c_proj").conv1d(e, e)?,
                ln_2: Norm::layer(&b.pp("ln_2"), e, cfg.layer_norm_epsilon)?,
                mlp: Mlp::new(
                    b.pp("mlp.c_fc").conv1d(e, inner)?,
                    b.pp("mlp.c_proj").conv1d(inner, e)?,
                    act,
                ),
                attn: AttentionParams {
                    num_heads: cfg.n_head,
                    num_kv_heads: cfg.n_head,
                    head_dim: hd,
                    scale,
                    softcap: None,
                    sliding_window: None,
                },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let wte = t.pp("wte").get((cfg.vocab_size, e), "weight")?;
    let spec = ModelSpec {
        architecture: "GPT2LMHeadModel".into(),
        num_layers: cfg.n_layer,
        num_kv_heads: cfg.n_head,
        head_dim: hd,
        hidden_size: e,
        vocab_size: cfg.vocab_size,
        max_position_embeddings: cfg.n_positions.min(max_positions),
        dtype: vb.dtype(),
        device: vb.device().clone(),
    };
    Ok(Gpt2 {
        wpe: t.pp("wpe").get((cfg.n_positions, e), "weight")?,
        lm_head: t.tied_lm_head(&Embedding::Dense(wte.clone()))?,
        wte,
        blocks,
        ln_f: Norm::layer(&t.pp("ln_f"), e, cfg.layer_norm_epsilon)?,
        spec,
        attention_impl: AttentionImpl::Auto,
    })
}

impl Gpt2 {
    fn run(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Tensor> {
        let dev = &self.spec.device;
        let max_pos = self.spec.max_position_embeddings;
        let mut plan = BatchPlan::new(batch, cache, None, max_pos, dev, self.spec.dtype)?
            .with_impl(self.attention_impl);
        let ids = super::token_tensor(&batch.tokens, self.spec.vocab_size, dev)?;
        let mut x = self
            .wte
            .index_select(&ids, 0)?
            .add(&self.wpe.index_select(&plan.positions, 0)?)?;
        let tokens = x.dim(0)?;
        for (i, b) in self.blocks.iter().enumerate() {
            let (h, d) = (b.attn.num_heads, b.attn.head_dim);
            let qkv = b.c_attn.forward(&b.ln_1.forward(&x)?)?;
            let q = qkv.narrow(1, 0, h * d)?.reshape((tokens, h, d))?;
            let k = qkv.narrow(1, h * d, h * d)?.reshape((tokens, h, d))?;
            let v = qkv.narrow(1, 2 * h * d, h * d)?.reshape((tokens, h, d))?;
            let a = plan.attend(i, &q, &k, &v, cache, &b.attn)?;
            x = (x + b.c_proj.forward(&a)?)?;
            x = (&x + b.mlp.forward(&b.ln_2.forward(&x)?)?)?;
        }
        if plan.num_rows == 0 {
            return Tensor::zeros((0, self.spec.hidden_size), self.spec.dtype, dev);
        }
        self.ln_f.forward(&plan.select_rows(&x)?)
    }
}

impl CausalLM for Gpt2 {
    fn forward(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.run(batch, cache)?;
        if h.dim(0)? == 0 {
            return Tensor::zeros((0, self.spec.vocab_size), DType::F32, &self.spec.device);
        }
        self.lm_head.forward(&h)?.to_dtype(DType::F32)
    }

    fn hidden_states(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Tensor> {
        self.run(batch, cache)
    }

    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn set_attention_impl(&mut self, imp: AttentionImpl) {
        self.attention_impl = imp;
    }
}
