//! Incremental detokenization: turns generated tokens into text deltas that are always valid UTF-8.
//!
//! Decoding one token at a time is wrong for most tokenizers (byte-level BPE splits characters across
//! tokens; SentencePiece drops a leading space at the start of a decode), so each step decodes a short
//! window twice: the tokens already emitted but kept as context (`prefix_offset..read_offset`) and the
//! same window plus the new tokens. The delta is the difference. While the new text ends in U+FFFD (an
//! incomplete character) nothing is emitted and the window grows until the character completes.

use super::error::EngineError;
use super::tokenizer::Tokenizer;
use super::types::SamplingParams;

/// Prompt tokens kept as decoding context for the first generated tokens (as vLLM does).
const PROMPT_CONTEXT: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    pub skip_special_tokens: bool,
    pub spaces_between_special_tokens: bool,
}

impl DecodeOptions {
    pub(crate) fn from_params(params: &SamplingParams) -> Self {
        Self {
            skip_special_tokens: params.skip_special_tokens,
            spaces_between_special_tokens: params.spaces_between_special_tokens,
        }
    }
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            skip_special_tokens: true,
            spaces_between_special_tokens: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Detokenizer {
    tokenizer: Tokenizer,
    opts: DecodeOptions,
    /// Context tokens (from the prompt) followed by the generated ones.
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix_offset: usize,
    /// End of what has been emitted as text.
    read_offset: usize,
}

impl Detokenizer {
    /// A detokenizer with no context: the concatenation of its deltas is exactly
    /// `tokenizer.decode_with(generated ids, opts)`.
    pub fn new(tokenizer: Tokenizer, opts: DecodeOptions) -> Self {
        Self::with_context(tokenizer, opts, &[])
    }

    /// A detokenizer that decodes the first generated tokens after the prompt's last few tokens, so a
    /// continuation's leading space or a character split across the prompt boundary comes out as it
    /// does in the whole text (vLLM's behaviour).
    pub fn with_context(tokenizer: Tokenizer, opts: DecodeOptions, prompt_ids: &[u32]) -> Self {
        let mut context = &prompt_ids[prompt_ids.len().saturating_sub(PROMPT_CONTEXT)..];
        if !opts.skip_special_tokens && opts.spaces_between_special_tokens {
            // A special token in the context would put a space before the first generated token.
            if let Some(last) = context.iter().rposition(|id| tokenizer.is_special(*id)) {
                context = &context[last + 1..];
            }
        }
        Self {
            tokenizer,
            opts,
            ids: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
        }
    }

    /// Adds one generated token; returns the new text (possibly empty while a character is incomplete).
    pub fn push(&mut self, token_id: u32) -> Result<String, EngineError> {
        self.ids.push(token_id);
        let prefix = self.decode(self.prefix_offset, self.read_offset)?;
        let full = self.decode(self.prefix_offset, self.ids.len())?;
        if full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        if full.len() > prefix.len() {
            let delta = text_after(&full, prefix.len()).to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(delta);
        }
        if full == prefix {
            // A token that adds no text (a skipped special token) is read without emitting anything.
            self.read_offset = self.ids.len();
        }
        Ok(String::new())
    }

    /// Emits whatever is held back (an incomplete character shows as U+FFFD, as in a full decode).
    pub fn finish(&mut self) -> Result<String, EngineError> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = self.decode(self.prefix_offset, self.read_offset)?;
        let full = self.decode(self.prefix_offset, self.ids.len())?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(text_after(&full, prefix.len()).to_owned())
    }

    pub fn options(&self) -> DecodeOptions {
        self.opts
    }

    fn decode(&self, start: usize, end: usize) -> Result<String, EngineError> {
        self.tokenizer.decode_with(
            &self.ids[start..end],
            self.opts.skip_special_tokens,
            self.opts.spaces_between_special_tokens,
        )
    }
}

/// `full` from byte `at` on, moved back to a character boundary (the window's prefix decodes to a
/// prefix of the whole window for every tokenizer we know; this only guards against a panic).
fn text_after(full: &str, at: usize) -> &str {
    let mut cut = at.min(full.len());
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    &full[cut..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fixture() -> Tokenizer {
        Tokenizer::from_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama"))
            .unwrap()
    }

    fn run(tok: &Tokenizer, ids: &[u32], opts: DecodeOptions) -> (Vec<String>, String) {
        let mut d = Detokenizer::new(tok.clone(), opts);
        let mut deltas: Vec<String> = ids.iter().map(|id| d.push(*id).unwrap()).collect();
        deltas.push(d.finish().unwrap());
        let whole = deltas.concat();
        (deltas, whole)
    }

    #[test]
    fn multibyte_characters_are_held_until_complete() {
        let tok = fixture();
        let text = "héllo 世界 🎉!";
        let ids = tok.encode(text, false).unwrap();
        assert!(ids.len() > text.chars().count(), "expect byte-split tokens");
        let (deltas, whole) = run(&tok, &ids, DecodeOptions::default());
        assert_eq!(whole, text);
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')));
        // The emoji is 4 bytes over several tokens: some steps must emit nothing.
        assert!(deltas.iter().any(String::is_empty));
    }

    #[test]
    fn special_tokens_skipped_or_spaced() {
        let tok = fixture();
        let ids = tok.encode("<|im_start|>user hi<|im_end|>", false).unwrap();
        let (_, skipped) = run(&tok, &ids, DecodeOptions::default());
        assert_eq!(skipped, "user hi");
        let kept = DecodeOptions {
            skip_special_tokens: false,
            spaces_between_special_tokens: true,
        };
        let (_, spaced) = run(&tok, &ids, kept);
        assert_eq!(spaced, "<|im_start|> user hi <|im_end|>");
        let (_, raw) = run(
            &tok,
            &ids,
            DecodeOptions {
                spaces_between_special_tokens: false,
                ..kept
            },
        );
        assert_eq!(raw, "<|im_start|>user hi<|im_end|>");
    }

    #[test]
    fn finish_flushes_an_incomplete_character() {
        let tok = fixture();
        let ids = tok.encode("🎉", false).unwrap();
        let mut d = Detokenizer::new(tok.clone(), DecodeOptions::default());
        let first = d.push(ids[0]).unwrap();
        assert_eq!(first, "");
        assert_eq!(d.finish().unwrap(), tok.decode(&ids[..1], true).unwrap());
    }

    #[test]
    fn prompt_context_keeps_continuation_text() {
        let tok = fixture();
        let prompt = tok.encode("The future of AI", false).unwrap();
        let out = tok.encode(" is 世界", false).unwrap();
        let mut d = Detokenizer::with_context(tok.clone(), DecodeOptions::default(), &prompt);
        let mut text = String::new();
        for id in &out {
            text.push_str(&d.push(*id).unwrap());
        }
        text.push_str(&d.finish().unwrap());
        assert_eq!(text, " is 世界");
        assert_eq!(&d.ids[d.ids.len() - out.len()..], &out[..]);
    }

    #[test]
    fn special_prompt_end_adds_no_space_to_the_output() {
        let tok = fixture();
        let prompt = tok
            .encode("<|im_start|>assistant<|im_end|>", false)
            .unwrap();
        let out = tok.encode("Hi<|im_end|>", false).unwrap();
        let opts = DecodeOptions {
            skip_special_tokens: false,
            spaces_between_special_tokens: true,
        };
        let mut d = Detokenizer::with_context(tok.clone(), opts, &prompt);
        let mut text = String::new();
        for id in &out {
            text.push_str(&d.push(*id).unwrap());
        }
        text.push_str(&d.finish().unwrap());
        assert_eq!(text, "Hi <|im_end|>");
    }
}
