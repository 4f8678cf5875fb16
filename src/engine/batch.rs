//! What one forward pass is made of, shared by the scheduler's runner, the models, the layers and the
//! KV cache: the packed batch (`ForwardBatch` of `SeqInput`s, each saying which logits it wants) and
//! the shape facts of the model it runs on (`ModelSpec`). A leaf: it imports nothing of the engine.

use candle_core::{DType, Device};

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
    /// Per sequence, the LoRA adapter it runs with (0: the base model); empty: every sequence runs
    /// the base model.
    pub adapters: Vec<u32>,
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
