//! The tokenizer wrapper: encode, decode, special tokens, EOS ids.

#[derive(Clone)]
pub struct Tokenizer {}
