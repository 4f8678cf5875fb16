//! The inference engine: a library with a small surface (`generate`, `embed`, `tokenizer`,
//! `render_chat`, `info`). The scheduler thread owns the model and the KV cache; this handle only
//! sends it requests and hands back streams of events.

// Edition 2024 let-chains: the engine's nested `if let`s stay as they are until next edited.
#![allow(clippy::collapsible_if)]

pub mod batch;
pub(crate) mod block_allocator;
pub mod constraint;
pub mod detokenize;
pub(crate) mod device_memory;
pub mod embedding;
pub(crate) mod error;
pub(crate) mod gguf;
pub mod kv_cache;
pub mod layers;
pub mod loader;
pub mod lora;
pub mod models;
pub mod parts;
pub(crate) mod prefix_cache;
pub(crate) mod quant;
pub(crate) mod runner;
pub mod sampling;
pub(crate) mod scheduler;
pub mod settings;
pub mod speculative;
pub mod stop;
pub mod template;
pub mod tokenizer;
pub(crate) mod types;
pub(crate) mod validate;

pub use error::EngineError;
pub use parts::ModelInfo;
pub use runner::{Engine, EngineStats, GenerationStream};
pub use settings::EngineSettings;
pub use types::*;
