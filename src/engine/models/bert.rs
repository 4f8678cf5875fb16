//! BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa: all-MiniLM, bge, e5 and the like) for embeddings.
//! Bidirectional attention over a padded batch, no KV cache: an embedding request is one forward
//! pass. The output is the last hidden state of every position; pooling is `embedding.rs`'s.

use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::engine::layers::{Linear, Norm};

/// The `config.json` fields an encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl BertConfig {
    /// RoBERTa-style models number positions from `pad_token_id + 1` (their embedding table has that
    /// many unused rows in front), BERT from 0.
    pub(crate) fn position_offset(&self) -> usize {
        match self.model_type.as_deref() {
            Some("roberta" | "xlm-roberta" | "camembert") => {
                self.pad_token_id.unwrap_or(1) as usize + 1
            }
            _ => 0,
        }
    }

    /// The longest input the position table allows.
    pub(crate) fn max_input_len(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.position_offset())
    }
}

/// The encoder architectures this build runs as embedders, as `config.json` names them.
pub(crate) const ENCODER_ARCHITECTURES: &[&str] = &[
    "BertModel",
    "BertForMaskedLM",
    "RobertaModel",
    "RobertaForMaskedLM",
    "XLMRobertaModel",
    "XLMRobertaForMaskedLM",
];

#[derive(Debug, Clone, Copy)]
enum Act {
    GeluErf,
    GeluTanh,
    Relu,
    Silu,
}

impl Act {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => bail!("unsupported hidden_act `{other}` for an encoder"),
        })
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeluErf => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
            Self::Silu => candle_nn::ops::silu(x),
        }
    }
}

fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    Linear::new(weight, Some(bias))
}

fn layer_norm(vb: VarBuilder, size: usize, eps: f64) -> Result<Norm> {
    Ok(Norm::Layer {
        weight: vb.get(size, "weight")?,
        bias: vb.get(size, "bias")?,
        eps: eps as f32,
    })
}

/// `[b, l, h]` through a linear layer (which takes rows).
fn linear3(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    let (b, l, h) = x.dims3()?;
    let y = layer.forward(&x.reshape((b * l, h))?)?;
    let out = y.dim(1)?;
    y.reshape((b, l, out))
}

struct EncoderLayer {
    qkv: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    up: Linear,
    down: Linear,
    out_norm: Norm,
    heads: usize,
    head_dim: usize,
    act: Act,
}

impl EncoderLayer {
    fn load(vb: VarBuilder, cfg: &BertConfig, act: Act) -> Result<Self> {
        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let att = vb.pp("attention");
        if !h.is_multiple_of(cfg.num_attention_heads) {
            bail!(
                "hidden_size {h} is not a multiple of num_attention_heads {}",
                cfg.num_attention_heads
            )
        }
        Ok(Self {
            qkv: fused_qkv(att.pp("self"), h)?,
            attn_out: linear(att.pp("output").pp("dense"), h, h)?,
            attn_norm: layer_norm(att.pp("output").pp("LayerNorm"), h, eps)?,
            up: linear(vb.pp("intermediate").pp("dense"), h, cfg.intermediate_size)?,
            down: linear(vb.pp("output").pp("dense"), cfg.intermediate_size, h)?,
            out_norm: layer_norm(vb.pp("output").pp("LayerNorm"), h, eps)?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            act,
        })
    }

    /// `x`: `[b, l, h]`; `mask`: additive `[b, 1, 1, l]` (0 for tokens, -inf-ish for padding).
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l, h) = x.dims3()?;
        let qkv = linear3(&self.qkv, x)?;
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * h, h)?
                .reshape((b, l, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, l, h))?;
        let attn = self
            .attn_norm
            .forward(&(linear3(&self.attn_out, &ctx)? + x)?)?;
        let up = self.act.apply(&linear3(&self.up, &attn)?)?;
        self.out_norm.forward(&(linear3(&self.down, &up)? + attn)?)
    }
}

/// Query, key and value as one layer (one matmul instead of three).
fn fused_qkv(vb: VarBuilder, h: usize) -> Result<Linear> {
    let names = ["query", "key", "value"];
    let weights = names
        .iter()
        .map(|n| vb.pp(*n).get((h, h), "weight"))
        .collect::<Result<Vec<_>>>()?;
    let biases = names
        .iter()
        .map(|n| vb.pp(*n).get(h, "bias"))
        .collect::<Result<Vec<_>>>()?;
    Linear::new(Tensor::cat(&weights, 0)?, Some(Tensor::cat(&biases, 0)?))
}

/// A BERT-style encoder: embeddings (word + position + token type, LayerNorm) and a stack of
/// post-norm layers.
pub struct BertModel {
    word: Tensor,
    position: Tensor,
    token_type0: Tensor,
    emb_norm: Norm,
    layers: Vec<EncoderLayer>,
    cfg: BertConfig,
    device: Device,
    dtype: DType,
}

impl BertModel {
    /// Loads from `vb`, at the root or under `bert.` / `roberta.` (checkpoints saved from a task head).
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let vb = ["bert", "roberta", "model"]
            .iter()
            .map(|p| vb.pp(*p))
            .find(|v| v.contains_tensor("embeddings.word_embeddings.weight"))
            .unwrap_or(vb);
        if let Some(kind) = cfg.position_embedding_type.as_deref() {
            if kind != "absolute" {
                bail!("unsupported position_embedding_type `{kind}` (only absolute)")
            }
        }
        let act = Act::parse(&cfg.hidden_act)?;
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let token_types = emb.get(
            (cfg.type_vocab_size.max(1), h),
            "token_type_embeddings.weight",
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::load(vb.pp("encoder").pp("layer").pp(i), cfg, act))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word: emb.get((cfg.vocab_size, h), "word_embeddings.weight")?,
            position: emb.get(
                (cfg.max_position_embeddings, h),
                "position_embeddings.weight",
            )?,
            token_type0: token_types.get(0)?,
            emb_norm: layer_norm(emb.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            layers,
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Last hidden states `[b, l, hidden]` of `inputs` right-padded to the longest (padding positions
    /// hold garbage; pool with the lengths). Each input must be non-empty and at most
    /// `max_input_len()` long, every id inside the vocabulary.
    pub fn forward(&self, inputs: &[&[u32]]) -> Result<Tensor> {
        let b = inputs.len();
        let l = inputs.iter().map(|s| s.len()).max().unwrap_or(0);
        if b == 0 || l == 0 {
            bail!("an encoder batch needs at least one non-empty input")
        }
        if l > self.cfg.max_input_len() {
            bail!(
                "input of {l} tokens is longer than the {} positions of the model",
                self.cfg.max_input_len()
            )
        }
        let pad = self.cfg.pad_token_id.unwrap_or(0);
        let mut ids = Vec::with_capacity(b * l);
        let mut mask = Vec::with_capacity(b * l);
        for s in inputs {
            if let Some(bad) = s.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
                bail!(
                    "token id {bad} outside the vocabulary of {}",
                    self.cfg.vocab_size
                )
            }
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(pad, l - s.len()));
            mask.extend(std::iter::repeat_n(0f32, s.len()));
            mask.extend(std::iter::repeat_n(f32::MIN / 2.0, l - s.len()));
        }
        let ids = Tensor::from_vec(ids, b * l, &self.device)?;
        let word = self.word.index_select(&ids, 0)?.reshape((b, l, ()))?;
        let pos = self
            .position
            .narrow(0, self.cfg.position_offset(), l)?
            .unsqueeze(0)?;
        let x = word.broadcast_add(&pos)?.broadcast_add(&self.token_type0)?;
        let mut x = self.emb_norm.forward(&x)?;
        let mask = Tensor::from_vec(mask, (b, 1, 1, l), &self.device)?.to_dtype(self.dtype)?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
        }
        Ok(x)
    }
}
