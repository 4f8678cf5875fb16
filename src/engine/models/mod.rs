//! Model architectures, one file each, over the shared layers in `super::layers`. A model is a pure
//! function of (tokens, positions, KV cache): it owns no cache and no sequence state, so the scheduler can
//! pack any mix of prefill chunks and decodes into one forward pass.

pub mod build;
pub mod config;
pub mod gemma2;
pub mod gpt2;
pub mod llama;
pub mod mistral;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
pub mod weights;

use candle_core::{DType, Device, Result, Tensor};

use super::kv_cache::KvCache;
use super::layers::DecoderModel;
use config::HfConfig;
use weights::Weights;

/// The causal architectures this engine runs, as `config.json` names them.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "Gemma2ForCausalLM",
    "GPT2LMHeadModel",
];

/// The architecture named by `architectures[0]`, else by `model_type`.
pub fn architecture_of(cfg: &HfConfig) -> Option<String> {
    let from_list = cfg
        .raw()
        .get("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(|a| a.as_str());
    let from_type = cfg.str(&["model_type"]).map(|t| match t {
        "llama" => "LlamaForCausalLM",
        "mistral" => "MistralForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        "phi3" => "Phi3ForCausalLM",
        "gemma2" => "Gemma2ForCausalLM",
        "gpt2" => "GPT2LMHeadModel",
        other => other,
    });
    from_list.or(from_type).map(str::to_string)
}

/// Builds the model `config.json` describes from its weights.
pub fn load_decoder(cfg: &HfConfig, weights: &Weights) -> anyhow::Result<DecoderModel> {
    let arch = architecture_of(cfg).unwrap_or_default();
    match arch.as_str() {
        "LlamaForCausalLM" => llama::load(cfg, weights),
        "MistralForCausalLM" => mistral::load(cfg, weights),
        "Qwen2ForCausalLM" => qwen2::load(cfg, weights),
        "Qwen3ForCausalLM" => qwen3::load(cfg, weights),
        "Phi3ForCausalLM" => phi3::load(cfg, weights),
        "Gemma2ForCausalLM" => gemma2::load(cfg, weights),
        "GPT2LMHeadModel" => gpt2::load(cfg, weights),
        other => anyhow::bail!(
            "unsupported architecture '{other}'; supported: {}",
            SUPPORTED_ARCHITECTURES.join(", ")
        ),
    }
}

/// Which logits a sequence in the batch wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None (a prompt chunk that is not the prompt's last).
    None,
    /// The last new position only (decode, or the last prompt chunk).
    Last,
    /// Every new position (prompt logprobs).
    All,
}

/// One sequence's share of a forward pass.
#[derive(Debug, Clone)]
pub struct SeqInput {
    /// Tokens of this sequence already in the cache (its positions are `context_len..context_len+num_new`).
    pub context_len: usize,
    /// New tokens of this sequence in `ForwardBatch::tokens`.
    pub num_new: usize,
    /// The sequence's KV blocks, in order; covers at least `context_len + num_new` tokens.
    pub block_table: Vec<u32>,
    pub logits: LogitsWanted,
}

/// A packed batch: the new tokens of every sequence, back to back, in `seqs` order.
#[derive(Debug, Clone)]
pub struct ForwardBatch {
    pub tokens: Vec<u32>,
    pub seqs: Vec<SeqInput>,
}

/// The shape facts the engine needs about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub architecture: String,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub dtype: DType,
    pub device: Device,
}

pub trait CausalLM: Send {
    /// Runs the batch, writing its keys and values into `cache`, and returns float32 logits
    /// `[rows, vocab]`: the rows each sequence asked for, in batch order.
    fn forward(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Tensor>;

    /// The final (normed) hidden states of the rows asked for, `[rows, hidden]`, for decoder models used
    /// as embedders (last-token pooling).
    fn hidden_states(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Tensor>;

    fn spec(&self) -> &ModelSpec;
}
