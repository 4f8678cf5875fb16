//! Layers shared by every architecture, written once, so a model file holds only what differs.

pub mod attention;
pub mod batch;
pub mod decoder;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod rope;

pub use attention::{Attention, AttentionConfig};
pub use batch::BatchLayout;
pub use decoder::{DecoderLayer, DecoderModel, Positions};
pub use linear::Linear;
pub use mlp::{Activation, Mlp};
pub use norm::Norm;
pub use rope::{Rope, RopeScaling};
