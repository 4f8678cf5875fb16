//! The tokenizer wrapper: encode, decode, special tokens, BOS/EOS. Cheap to clone (an `Arc`), so every
//! sequence's detokenizer can hold one.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::Context as _;
use serde_json::Value;

use super::error::EngineError;

#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    tok: tokenizers::Tokenizer,
    /// Ids of added tokens flagged `special` (skipped by `skip_special_tokens`).
    special: HashSet<u32>,
    bos: Option<String>,
    eos: Option<String>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    /// `add_bos_token: true` in `tokenizer_config.json`: prepend BOS when the tokenizer's own
    /// post-processor does not (transformers does the same for Llama-family tokenizers).
    add_bos: bool,
    vocab_size: usize,
    config: Value,
    /// The most prompt tokens the engine takes (its context length), once set: longer texts are
    /// counted in bounded pieces and refused before the whole text is tokenized.
    prompt_limit: OnceLock<usize>,
}

/// Texts longer than this are counted in pieces of this size before they are tokenized whole.
const COUNT_PIECE_BYTES: usize = 64 << 10;

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.inner.vocab_size)
            .field("bos", &self.inner.bos)
            .field("eos", &self.inner.eos)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from a model folder.
    pub fn from_dir(dir: impl AsRef<Path>) -> anyhow::Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", config_path.display()))?
        } else {
            Value::Null
        };
        Self::from_file(dir.join("tokenizer.json"), config)
    }

    /// Loads a `tokenizer.json` with an already parsed `tokenizer_config.json` (`Value::Null` if none).
    pub fn from_file(tokenizer_json: impl AsRef<Path>, config: Value) -> anyhow::Result<Self> {
        let path = tokenizer_json.as_ref();
        let tok = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", path.display()))?;
        Ok(Self::new(tok, config))
    }

    pub fn new(mut tok: tokenizers::Tokenizer, config: Value) -> Self {
        // Some tokenizer.json files (all-MiniLM) preset padding/truncation to 128; the engine counts,
        // rejects or truncates tokens itself, so both are off.
        tok.with_padding(None);
        let _ = tok.with_truncation(None);
        let added = tok.get_added_tokens_decoder();
        let special = added
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        let max_added = added.keys().max().map_or(0, |id| id + 1) as usize;
        let vocab_size = tok.get_vocab_size(false).max(max_added);
        let bos = config_token(&config, "bos_token");
        let eos = config_token(&config, "eos_token");
        let bos_id = bos.as_deref().and_then(|t| tok.token_to_id(t));
        let eos_id = eos.as_deref().and_then(|t| tok.token_to_id(t));
        let add_bos = config.get("add_bos_token").and_then(Value::as_bool) == Some(true);
        Self {
            inner: Arc::new(Inner {
                tok,
                special,
                bos,
                eos,
                bos_id,
                eos_id,
                add_bos,
                vocab_size,
                config,
                prompt_limit: OnceLock::new(),
            }),
        }
    }

    /// Sets the most tokens a prompt may have (the context length): from then on [`Self::encode`]
    /// refuses a longer text with [`EngineError::PromptTooLong`] after tokenizing at most about that
    /// many tokens of it, so megabytes of prompt cost no more than a full context does. The first
    /// call counts; every clone shares it.
    pub fn limit_prompt_tokens(&self, max_tokens: usize) {
        let _ = self.inner.prompt_limit.set(max_tokens);
    }

    /// Token ids of `text`. With `add_special_tokens` the tokenizer's post-processor runs (and BOS is
    /// prepended when `add_bos_token` asks for it). A text over the prompt limit (see
    /// [`Self::limit_prompt_tokens`]) is refused without being tokenized whole.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, EngineError> {
        if let Some(&limit) = self.inner.prompt_limit.get() {
            if let Some(at_least) = self.count_past(text, limit)? {
                return Err(EngineError::PromptTooLong {
                    prompt_tokens: at_least,
                    max_model_len: limit,
                });
            }
        }
        let enc = self
            .inner
            .tok
            .encode(text, add_special_tokens)
            .map_err(|e| EngineError::Internal(format!("tokenizing: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens && self.inner.add_bos {
            if let Some(bos) = self.inner.bos_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// For a text longer than one piece: tokenizes it piece by piece (cut at whitespace) and returns
    /// `Some(n)` once the text has certainly at least `n >= limit` tokens, `None` when it may fit.
    /// Cutting a text can change its token count only at the cut (a token split in two, a prefix
    /// space or BOS added), so each cut discounts two tokens: a text refused here has at least as many
    /// tokens as said, and a text that fits is always tokenized whole afterwards, exactly.
    fn count_past(&self, text: &str, limit: usize) -> Result<Option<usize>, EngineError> {
        if text.len() <= COUNT_PIECE_BYTES {
            return Ok(None);
        }
        let mut counted = 0usize;
        let mut cuts = 0usize;
        let mut rest = text;
        while !rest.is_empty() {
            let piece = &rest[..piece_end(rest, COUNT_PIECE_BYTES)];
            rest = &rest[piece.len()..];
            let enc = self
                .inner
                .tok
                .encode(piece, false)
                .map_err(|e| EngineError::Internal(format!("tokenizing: {e}")))?;
            counted += enc.len();
            let at_least = counted.saturating_sub(2 * cuts);
            if at_least >= limit {
                return Ok(Some(at_least));
            }
            cuts += 1;
        }
        Ok(None)
    }

    /// Text of `ids`, as the `tokenizers` library decodes it (no extra spaces around special tokens).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, EngineError> {
        self.inner
            .tok
            .decode(ids, skip_special_tokens)
            .map_err(|e| EngineError::Internal(format!("detokenizing: {e}")))
    }

    /// Text of `ids` with vLLM's options: when special tokens are kept and
    /// `spaces_between_special_tokens` is set, each special token and each run of ordinary tokens are
    /// decoded apart and joined with a space (the `transformers` slow-tokenizer semantics).
    pub fn decode_with(
        &self,
        ids: &[u32],
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool,
    ) -> Result<String, EngineError> {
        if skip_special_tokens
            || !spaces_between_special_tokens
            || !ids.iter().any(|id| self.is_special(*id))
        {
            return self.decode(ids, skip_special_tokens);
        }
        let mut parts: Vec<String> = Vec::new();
        let mut run_start = 0;
        for (i, id) in ids.iter().enumerate() {
            if self.is_special(*id) {
                if run_start < i {
                    parts.push(self.decode(&ids[run_start..i], false)?);
                }
                parts.push(self.decode(&ids[i..=i], false)?);
                run_start = i + 1;
            }
        }
        if run_start < ids.len() {
            parts.push(self.decode(&ids[run_start..], false)?);
        }
        Ok(parts.join(" "))
    }

    /// A token's own text, special tokens included, as OpenAI/vLLM show it in logprobs: byte-level
    /// tokens decoded to text (an incomplete UTF-8 sequence shows as U+FFFD).
    pub(crate) fn token_text(&self, id: u32) -> String {
        match self.inner.tok.decode(&[id], false) {
            Ok(text) if !text.is_empty() => text,
            _ => self.inner.tok.id_to_token(id).unwrap_or_default(),
        }
    }

    /// The underlying Hugging Face tokenizer (the vocabulary for constrained decoding).
    pub(crate) fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner.tok
    }

    pub(crate) fn is_special(&self, id: u32) -> bool {
        self.inner.special.contains(&id)
    }

    /// One past the largest token id (base vocabulary and added tokens). The model's logits may be
    /// wider (padded embeddings).
    pub fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.inner.bos.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.inner.eos.as_deref()
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.inner.bos_id
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.inner.eos_id
    }

    /// `tokenizer_config.json` as read (`Value::Null` when absent), for the chat template & co.
    pub fn config(&self) -> &Value {
        &self.inner.config
    }
}

/// A special token in `tokenizer_config.json`: a plain string or an `AddedToken` object.
fn config_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// Where the first piece of `text` of at most `max` bytes ends: before the last whitespace in its
/// second half, else at a character boundary.
fn piece_end(text: &str, max: usize) -> usize {
    if text.len() <= max {
        return text.len();
    }
    let boundary_at_or_before = |mut i: usize| {
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let end = boundary_at_or_before(max);
    let half = boundary_at_or_before(max / 2);
    match text[half..end].rfind(char::is_whitespace) {
        Some(i) if half + i > 0 => half + i,
        _ if end > 0 => end,
        // `max` is shorter than the first character.
        _ => text.chars().next().map_or(text.len(), char::len_utf8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Tokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
        Tokenizer::from_dir(dir).unwrap()
    }

    #[test]
    fn a_prompt_past_the_limit_is_refused_and_one_within_is_exact() {
        let tok = fixture();
        let text = "The future of AI is bright. ".repeat(20_000);
        let whole = tok.encode(&text, true).unwrap().len();
        let limited = fixture();
        limited.limit_prompt_tokens(whole + 1);
        // At the limit: tokenized whole, the same ids.
        assert_eq!(limited.encode(&text, true).unwrap().len(), whole);
        limited.limit_prompt_tokens(10); // the first limit stays
        let short = fixture();
        short.limit_prompt_tokens(512);
        match short.encode(&text, true) {
            Err(EngineError::PromptTooLong {
                prompt_tokens,
                max_model_len,
            }) => {
                assert_eq!(max_model_len, 512);
                assert!(
                    prompt_tokens >= 512 && prompt_tokens <= whole,
                    "{prompt_tokens}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Whitespace that makes few tokens is not refused for its bytes.
        let spaces = format!("a{}b", " ".repeat(200_000));
        let n = tok.encode(&spaces, false).unwrap().len();
        if n < 512 {
            assert_eq!(short.encode(&spaces, false).unwrap().len(), n);
        }
    }

    #[test]
    fn pieces_end_at_whitespace_or_a_char_boundary() {
        assert_eq!(piece_end("abc", 10), 3);
        assert_eq!(piece_end("aaaa bbbb", 8), 4);
        assert_eq!(piece_end("ééééé", 5), 4);
    }

    #[test]
    fn reads_special_tokens_from_config() {
        let tok = fixture();
        assert_eq!(tok.bos_token(), Some("<|begin_of_text|>"));
        assert_eq!(tok.eos_token(), Some("<|eot_id|>"));
        assert_eq!(tok.bos_token_id(), Some(3));
        assert_eq!(tok.eos_token_id(), Some(6));
        assert!(tok.is_special(1));
        assert!(!tok.is_special(416));
        assert_eq!(tok.vocab_size(), 1024);
    }

    #[test]
    fn encode_matches_reference_ids() {
        let tok = fixture();
        // transformers' ids for this prompt (tests/fixtures/llama/reference.json).
        let ids = tok.encode("The future of AI is", true).unwrap();
        assert_eq!(ids, vec![639, 314, 341, 444, 349, 227, 360, 416]);
        let chat = tok
            .encode("<|begin_of_text|><|start_header_id|>user", false)
            .unwrap();
        assert_eq!(&chat[..3], &[3, 4, 531]);
    }

    #[test]
    fn spaces_between_special_tokens_only_when_kept() {
        let tok = fixture();
        let ids = tok.encode("<|im_start|>user<|im_end|>", false).unwrap();
        assert_eq!(
            tok.decode_with(&ids, false, false).unwrap(),
            "<|im_start|>user<|im_end|>"
        );
        assert_eq!(
            tok.decode_with(&ids, false, true).unwrap(),
            "<|im_start|> user <|im_end|>"
        );
        assert_eq!(tok.decode_with(&ids, true, true).unwrap(), "user");
    }

    #[test]
    fn token_text_is_decoded_text() {
        let tok = fixture();
        let ids = tok.encode(" is", false).unwrap();
        assert_eq!(ids.len(), 1);
        assert_eq!(tok.token_text(ids[0]), " is");
        assert_eq!(tok.inner.tok.id_to_token(ids[0]).as_deref(), Some("Ġis"));
        assert_eq!(tok.token_text(2), "<|im_end|>");
    }

    #[test]
    fn add_bos_token_prepends_bos() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
        let config = serde_json::json!({"bos_token": "<|begin_of_text|>", "add_bos_token": true});
        let tok = Tokenizer::from_file(dir.join("tokenizer.json"), config).unwrap();
        assert_eq!(tok.encode("is", true).unwrap()[0], 3);
        assert_ne!(tok.encode("is", false).unwrap()[0], 3);
    }
}
