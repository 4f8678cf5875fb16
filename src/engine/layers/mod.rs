//! Layers shared by every architecture: written once, so a model file holds only what differs.

pub mod attention;
pub mod cpu_attention;
pub mod embedding;
pub mod gemv;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod pool;
pub mod qgemv;
pub mod rope;
pub mod simd;
pub mod weights;

pub use attention::{AttentionImpl, AttentionParams, BatchPlan};
pub use embedding::Embedding;
pub use linear::Linear;
pub use mlp::{Activation, GatedMlp, Mlp};
pub use norm::Norm;
pub use rope::{Rope, RopeConfig};
pub use weights::Weights;
