//! Model architectures, one file each, over the shared layers in `super::layers`. A model is a pure
//! function of (tokens, positions, KV cache): it owns no cache and no sequence state, so the scheduler can
//! pack any mix of prefill chunks and decodes into one forward pass.

use candle_core::{DType, Device, Result, Tensor};

use super::kv_cache::KvCache;

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
