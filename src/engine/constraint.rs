//! Constrained decoding (structured output, enforced tool calls): a request's grammar (a JSON schema,
//! a regex, a choice list or a Lark/EBNF grammar) is compiled once with llguidance, each sequence
//! gets its own matcher over it, and at every step the matcher gives the tokens that may come next
//! (EOS only where the grammar may end). The vocabulary llguidance works on (its token trie) is built
//! from the engine's own tokenizer, once per engine, on the first constrained request.

use std::sync::{Arc, Mutex, OnceLock};

use llguidance::api::{GrammarWithLexer, TopLevelGrammar};
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use super::tokenizer::Tokenizer;

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Structure {
    /// A JSON schema (`response_format: json_schema`, `guided_json`, `structured_outputs.json`).
    Json(Value),
    /// Any JSON object (`response_format: json_object`).
    JsonObject,
    /// A regular expression the whole output matches.
    Regex(String),
    /// One of these strings exactly.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect).
    Grammar(String),
}

/// A request's output constraint.
#[derive(Debug, Clone, PartialEq)]
pub struct StructuredOutput {
    pub structure: Structure,
    /// vLLM's `guided_whitespace_pattern`: the whitespace JSON may have between tokens (default: none
    /// but single spaces after `:` and `,`, as compact JSON writes it).
    pub whitespace_pattern: Option<String>,
    /// The constraint starts after this text appears in the output (the end of a reasoning block,
    /// `</think>`); `None` = from the first token.
    pub starts_after: Option<String>,
    /// The output may open with a reasoning block the model opens itself (`<think>`, free text,
    /// `</think>`, as text or as the vocabulary's own tokens) before the constrained answer.
    pub reasoning_prefix: bool,
    /// The request field the constraint came from (named by errors).
    pub param: String,
}

impl StructuredOutput {
    pub fn new(structure: Structure) -> Self {
        Self {
            structure,
            whitespace_pattern: None,
            starts_after: None,
            reasoning_prefix: false,
            param: "structured_outputs".into(),
        }
    }

    /// The llguidance grammar; with `prefix`, the answer's grammar after an optional reasoning
    /// block (`think_tokens`: `<think>` and `</think>` are tokens of the vocabulary).
    fn grammar(&self, prefix: bool, think_tokens: bool) -> TopLevelGrammar {
        let mut answer = self.answer_grammar();
        if !prefix || answer.grammars.len() != 1 {
            return answer;
        }
        answer.grammars[0].name = Some("answer".into());
        // The block as text (lazy: it ends at the first `</think>`), or between the tokens.
        let mut lines = vec![
            "start: think WS? @answer | @answer",
            r"think_text[lazy]: /<think>(.|\n)*<\/think>/",
            r"WS: /[ \t\r\n]+/",
        ];
        if think_tokens {
            lines.push("think: think_text | <think> THINK_BODY? </think>");
            lines.push(r"THINK_BODY: /(.|\n)+/");
        } else {
            lines.push("think: think_text");
        }
        let wrapper = lines.join("\n");
        answer
            .grammars
            .insert(0, GrammarWithLexer::from_lark(wrapper));
        answer
    }

    /// The grammar of the answer itself.
    fn answer_grammar(&self) -> TopLevelGrammar {
        let json = |mut schema: Value| {
            if let Value::Object(map) = &mut schema {
                let opts = match &self.whitespace_pattern {
                    Some(p) => json!({"whitespace_pattern": p}),
                    None => json!({"whitespace_flexible": false}),
                };
                map.entry("x-guidance").or_insert(opts);
            }
            TopLevelGrammar::from_json_schema(schema)
        };
        match &self.structure {
            Structure::Json(schema) => json(schema.clone()),
            Structure::JsonObject => json(json!({"type": "object"})),
            Structure::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Structure::Choice(choices) => {
                let alts: Vec<String> = choices
                    .iter()
                    .map(|c| Value::String(c.clone()).to_string())
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
            Structure::Grammar(g) => TopLevelGrammar::from_lark(g.clone()),
        }
    }
}

/// The engine's grammar compiler: llguidance's `ParserFactory` over the engine's vocabulary, built
/// on first use (a model that never sees a constrained request never pays for the token trie).
pub struct Grammars {
    tokenizer: Tokenizer,
    vocab_size: usize,
    eos: Vec<u32>,
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab_size", &self.vocab_size)
            .finish()
    }
}

impl Grammars {
    /// `vocab_size`: the model's logits row (it may exceed the tokenizer's); `eos`: the ids that end
    /// a sequence.
    pub fn new(tokenizer: Tokenizer, vocab_size: usize, eos: Vec<u32>) -> Self {
        Self {
            tokenizer,
            vocab_size,
            eos,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&Arc<ParserFactory>, String> {
        self.factory
            .get_or_init(|| {
                let env = tok_env(&self.tokenizer, self.vocab_size, &self.eos)?;
                let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                factory.quiet();
                Ok(Arc::new(factory))
            })
            .as_ref()
            .map_err(|e| format!("structured output is not available for this tokenizer: {e}"))
    }

    /// Whether `<think>` and `</think>` are tokens of the vocabulary (added tokens, which the
    /// grammar names as tokens, not text).
    fn think_tokens(&self) -> bool {
        let added = self.tokenizer.hf().get_added_vocabulary();
        ["<think>", "</think>"].iter().all(|t| {
            added
                .token_to_id(t, self.tokenizer.hf().get_model())
                .is_some()
        })
    }

    /// Compiles a request's constraint; the error is llguidance's message (a 400 for the client).
    pub fn compile(&self, spec: &StructuredOutput) -> Result<Compiled, String> {
        if let Structure::Choice(c) = &spec.structure
            && c.is_empty()
        {
            return Err("the choice list is empty".into());
        }
        let factory = self.factory()?;
        let mut prefix = spec.reasoning_prefix;
        if prefix {
            // A constraint that itself spells the reasoning block (it may start with `<think>`)
            // places it where it says.
            let answer = factory
                .create_parser(spec.answer_grammar())
                .map_err(|e| e.to_string())?;
            let think = factory.tok_env().tokenize_bytes(b"<think>");
            prefix = Matcher::new(Ok(answer))
                .validate_tokens(&think)
                .map_or(true, |n| n < think.len());
        }
        let parser = factory
            .create_parser(spec.grammar(prefix, self.think_tokens()))
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Compiled {
            matcher: Mutex::new(matcher),
            env: factory.tok_env().clone(),
            eos: self.eos.clone().into(),
            starts_after: spec.starts_after.clone().map(String::into_bytes),
        })
    }
}

/// A compiled constraint: the prototype every sequence of the request clones its matcher from.
pub struct Compiled {
    matcher: Mutex<Matcher>,
    env: TokEnv,
    eos: Arc<[u32]>,
    starts_after: Option<Vec<u8>>,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled").finish_non_exhaustive()
    }
}

impl Compiled {
    /// A fresh matcher for one sequence.
    pub fn start(&self) -> SeqConstraint {
        let matcher = self
            .matcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .deep_clone();
        SeqConstraint {
            matcher,
            env: self.env.clone(),
            eos: self.eos.clone(),
            waiting: self.starts_after.clone().map(|m| (m, Vec::new())),
            mask: None,
        }
    }
}

/// One sequence's matcher. `prepare` computes the next mask (it may run on another thread while the
/// model computes the logits); `apply` masks a logits row; `advance` feeds the chosen token.
pub struct SeqConstraint {
    matcher: Matcher,
    env: TokEnv,
    eos: Arc<[u32]>,
    /// The marker that starts the constraint and the output bytes seen so far (its tail).
    waiting: Option<(Vec<u8>, Vec<u8>)>,
    mask: Option<Result<SimpleVob, String>>,
}

impl Clone for SeqConstraint {
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            env: self.env.clone(),
            eos: self.eos.clone(),
            waiting: self.waiting.clone(),
            mask: self.mask.clone(),
        }
    }
}

impl std::fmt::Debug for SeqConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqConstraint")
            .field("active", &self.is_active())
            .finish_non_exhaustive()
    }
}

impl SeqConstraint {
    /// Whether the constraint applies to the next token (false while the reasoning runs).
    pub fn is_active(&self) -> bool {
        self.waiting.is_none()
    }

    /// Computes the next step's mask now, if not done yet.
    pub fn prepare(&mut self) {
        if self.is_active() && self.mask.is_none() {
            self.mask = Some(
                self.matcher
                    .compute_mask_or_eos()
                    .map_err(|e| e.to_string()),
            );
        }
    }

    /// Masks `logits` (one row) to the tokens the grammar allows next. `false` when the grammar
    /// allows nothing more (it failed, or cannot go on): the sequence must end.
    pub fn apply(&mut self, logits: &mut [f32]) -> bool {
        if !self.is_active() {
            // Free text until the marker, but no end before the constrained part.
            for &e in self.eos.iter() {
                if let Some(l) = logits.get_mut(e as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
            return true;
        }
        self.prepare();
        let Some(Ok(mask)) = &self.mask else {
            return false;
        };
        let eos_ok = self.eos.iter().any(|&e| mask.is_allowed(e));
        // Every EOS id ends the sequence: one allowed allows them all.
        let saved: Vec<(usize, f32)> = if eos_ok {
            self.eos
                .iter()
                .filter_map(|&e| logits.get(e as usize).map(|&l| (e as usize, l)))
                .collect()
        } else {
            Vec::new()
        };
        let n = mask.len().min(logits.len());
        mask.iter_unset_entries(|i| {
            if i < n {
                logits[i] = f32::NEG_INFINITY;
            }
        });
        for l in &mut logits[n..] {
            *l = f32::NEG_INFINITY;
        }
        for (i, l) in saved {
            logits[i] = l;
        }
        eos_ok || !mask.is_zero()
    }

    /// Whether `token` is allowed next (speculative drafts, tests).
    pub fn allows(&mut self, token: u32) -> bool {
        if !self.is_active() {
            return !self.eos.contains(&token);
        }
        self.prepare();
        match &self.mask {
            Some(Ok(mask)) => {
                mask.is_allowed(token)
                    || (self.eos.contains(&token) && self.eos.iter().any(|&e| mask.is_allowed(e)))
            }
            _ => false,
        }
    }

    /// Feeds the chosen token. EOS ends the sequence and is not fed. `Err` when the grammar refuses
    /// it (it cannot be satisfied any more).
    pub fn advance(&mut self, token: u32) -> Result<(), String> {
        self.mask = None;
        if let Some((marker, seen)) = &mut self.waiting {
            let trie = self.env.tok_trie();
            seen.extend_from_slice(&trie.decode_ext(&[token], true));
            if seen.windows(marker.len()).any(|w| w == marker.as_slice()) {
                self.waiting = None;
            } else {
                let keep = seen.len().saturating_sub(marker.len());
                seen.drain(..keep);
            }
            return Ok(());
        }
        if self.eos.contains(&token) {
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// Whether the output so far is a complete match.
    pub fn is_accepting(&mut self) -> bool {
        !self.is_active() || self.matcher.is_accepting().unwrap_or(false)
    }

    /// Tokens the grammar forces next (fast-forward), not yet fed.
    pub fn forced_tokens(&mut self) -> Vec<u32> {
        if !self.is_active() {
            return Vec::new();
        }
        self.matcher.compute_ff_tokens()
    }
}

/// llguidance's view of the vocabulary: every token's bytes, read from the engine's tokenizer
/// (byte-level BPE: GPT-2's byte-to-character map; byte-fallback SentencePiece: `<0xNN>` tokens and
/// `▁` for spaces). Added tokens written `<...>` and special tokens are special (the grammar's text
/// never spells them); ids past the tokenizer, up to the model's vocabulary, are unnamed specials.
fn tok_env(tokenizer: &Tokenizer, vocab_size: usize, eos: &[u32]) -> Result<TokEnv, String> {
    let hf = tokenizer.hf();
    let json: Value = serde_json::from_str(&hf.to_string(false).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let decoder = &json["decoder"];
    let decoders: Vec<&Value> = match decoder["type"].as_str() {
        Some("Sequence") => decoder["decoders"]
            .as_array()
            .map(|d| d.iter().collect())
            .unwrap_or_default(),
        _ => vec![decoder],
    };
    let byte_level = decoders.iter().any(|d| d["type"] == "ByteLevel");
    let byte_fallback = decoders.iter().any(|d| d["type"] == "ByteFallback");
    if !byte_level && !byte_fallback {
        return Err("its decoder is neither byte-level nor byte-fallback".into());
    }
    let char_map = byte_char_map();
    let added = hf.get_added_tokens_decoder();
    let n = vocab_size.max(tokenizer.vocab_size());
    let mut words: Vec<Vec<u8>> = Vec::with_capacity(n);
    for id in 0..n as u32 {
        let special_name = |name: &str| {
            let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
            b.extend_from_slice(name.as_bytes());
            b
        };
        let word = if let Some(t) = added.get(&id) {
            if t.special || (t.content.starts_with('<') && t.content.ends_with('>')) {
                special_name(&t.content)
            } else {
                t.content.clone().into_bytes()
            }
        } else if let Some(name) = hf.id_to_token(id) {
            if byte_level {
                name.chars()
                    .map(|c| char_map.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| special_name(&name))
            } else if name.len() == 6 && name.starts_with("<0x") && name.ends_with('>') {
                u8::from_str_radix(&name[3..5], 16)
                    .map(|b| vec![b])
                    .unwrap_or_else(|_| special_name(&name))
            } else {
                name.replace('\u{2581}', " ").into_bytes()
            }
        } else {
            special_name(&format!("<[{id}]>"))
        };
        words.push(word);
    }
    let eos0 = eos.first().copied().unwrap_or(0);
    let info = TokRxInfo::new(n as u32, eos0);
    let eos_all = if eos.is_empty() {
        vec![eos0]
    } else {
        eos.to_vec()
    };
    let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos_all);
    Ok(Arc::new(TrieEnv { trie }))
}

/// GPT-2's byte-level alphabet: the character each byte is written as.
fn byte_char_map() -> std::collections::HashMap<char, u8> {
    let mut map = std::collections::HashMap::new();
    let mut next = 0x100u32;
    for byte in 0..=255u8 {
        let c = byte as char;
        if matches!(c, '!'..='~' | '\u{A1}'..='\u{AC}' | '\u{AE}'..='\u{FF}') {
            map.insert(c, byte);
        } else if let Some(c) = char::from_u32(next) {
            map.insert(c, byte);
            next += 1;
        }
    }
    map
}

/// The token trie as llguidance's tokenizer environment. Tokenizing (only used for text the grammar
/// forces) is greedy over the trie: always a valid spelling, if not always the tokenizer's own.
struct TrieEnv {
    trie: TokTrie,
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }
}

#[cfg(test)]
mod tests;
