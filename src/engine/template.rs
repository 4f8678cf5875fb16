//! Chat templates rendered with minijinja, compatibly with Hugging Face transformers.

#[derive(Clone)]
pub struct ChatTemplate {}
