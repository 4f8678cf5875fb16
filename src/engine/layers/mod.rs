//! Layers shared by every architecture: written once, so a model file holds only what differs.

pub mod attention;
pub(crate) mod causal_softmax;
pub mod cpu_attention;
pub mod embedding;
pub mod gemv;
pub mod kgemv;
pub(crate) mod kv8;
pub mod linear;
pub(crate) mod lora;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod pool;
pub mod qgemv;
pub mod rope;
pub mod sgemm;
pub mod simd;
pub mod weights;

pub use attention::AttentionImpl;
pub(crate) use attention::{AttentionParams, BatchPlan};
pub(crate) use embedding::Embedding;
pub(crate) use linear::Linear;
pub(crate) use mlp::{Activation, GatedMlp, Mlp};
pub(crate) use moe::{FeedForward, MoeConfig, SparseMoe};
pub(crate) use norm::Norm;
pub(crate) use rope::Rope;
pub use rope::RopeConfig;
pub(crate) use weights::Weights;
