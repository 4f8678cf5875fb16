//! The one internal request type behind every front door (OpenAI, native, run-batch) and the events the
//! engine streams back. Front doors translate into `GenerateRequest` and out of `GenerationEvent`; no
//! sampling or stop logic lives anywhere but the engine.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::constraint::StructuredOutput;
use super::error::EngineError;

/// What to generate from: text (tokenized by the engine) or token ids given by the client.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// A validated generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Correlates logs and metrics (job id, OpenAI request id).
    pub request_id: String,
    pub prompt: Prompt,
    /// Whether the tokenizer adds BOS & co. to a text prompt. False for prompts rendered by a chat
    /// template (the template already wrote them), true for raw completions.
    pub add_special_tokens: bool,
    pub params: SamplingParams,
}

/// `early_stopping` of beam search: `true`, `false` or `"never"` (vLLM semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    True,
    #[default]
    False,
    Never,
}

/// The sampling parameters of one request: vLLM's `SamplingParams` (`vllm/sampling_params.py`),
/// field for field with vLLM's names, meanings and defaults, so a worker-vllm request means the same
/// here. Parsing (`SamplingParams::from_json`, in `validate.rs`) rejects unknown fields, so a typo is
/// an error, not a silent default.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub n: usize,
    /// Candidates generated; the best `n` by cumulative logprob are returned. `None` = `n`.
    pub best_of: Option<usize>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
    pub temperature: f32,
    pub top_p: f32,
    /// -1 (or 0) = all tokens.
    pub top_k: i64,
    pub min_p: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub include_stop_str_in_output: bool,
    pub ignore_eos: bool,
    /// `None` = until the context is full.
    pub max_tokens: Option<usize>,
    pub min_tokens: usize,
    pub skip_special_tokens: bool,
    pub spaces_between_special_tokens: bool,
    /// Number of top alternatives to report with each generated token (the chosen one is always
    /// reported when this is `Some`).
    pub logprobs: Option<usize>,
    pub prompt_logprobs: Option<usize>,
    pub logit_bias: HashMap<u32, f32>,
    pub use_beam_search: bool,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    /// Structured output: the grammar every choice's output must match (vLLM's
    /// `structured_outputs` / `guided_*`, OpenAI's `response_format`, enforced tool calls).
    pub structured: Option<StructuredOutput>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            n: 1,
            best_of: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            temperature: 1.0,
            top_p: 1.0,
            top_k: -1,
            min_p: 0.0,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            include_stop_str_in_output: false,
            ignore_eos: false,
            max_tokens: Some(16),
            min_tokens: 0,
            skip_special_tokens: true,
            spaces_between_special_tokens: true,
            logprobs: None,
            prompt_logprobs: None,
            logit_bias: HashMap::new(),
            use_beam_search: false,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::False,
            structured: None,
        }
    }
}

/// One token's log-probability and, when asked for, the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub token_id: u32,
    /// The token's own text (special tokens included), as OpenAI's `token` field shows it.
    pub token: String,
    pub logprob: f32,
    /// Best alternatives, most likely first: (id, text, logprob).
    pub top: Vec<(u32, String, f32)>,
    /// The token's rank in the distribution (1 = most likely), inside the alternatives or not.
    pub rank: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS, a stop string or a stop token id.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    /// Cancelled or failed inside the engine.
    Abort,
}

/// What stopped a choice with `FinishReason::Stop` (vLLM's `stop_reason`): `None` = EOS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum StopReason {
    Text(String),
    TokenId(u32),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub reason: FinishReason,
    pub stop_reason: Option<StopReason>,
}

/// New output of one choice. `text` is always valid UTF-8 (it may be empty while a multi-byte character
/// is incomplete); the concatenation of a choice's `text`s is its whole output.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceDelta {
    pub index: usize,
    pub text: String,
    pub token_ids: Vec<u32>,
    /// One entry per token in `token_ids` when logprobs were asked for, else empty.
    pub logprobs: Vec<TokenLogprob>,
    /// Set on the choice's last delta.
    pub finish: Option<Finish>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl Usage {
    pub fn total_tokens(&self) -> usize {
        self.prompt_tokens + self.completion_tokens
    }
}

/// Timings of one request, logged at its end and exported as metrics.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RequestMetrics {
    /// From submission to the first step that worked on it.
    pub queue_time: Duration,
    /// From submission to the first generated token.
    pub time_to_first_token: Duration,
    /// From submission to the end.
    pub total_time: Duration,
    /// Generated tokens per second of decode (after the first token).
    pub decode_tokens_per_s: f64,
    /// Prompt tokens served from the prefix cache.
    pub cached_prompt_tokens: usize,
}

/// The engine's answer to a request, in order: one `Prompt`, then `Delta`s (interleaved across choices
/// for n > 1; all at the end for beam search and best_of > n), then `Done` or `Error`.
#[derive(Debug, Clone)]
pub enum GenerationEvent {
    Prompt {
        prompt_token_ids: Vec<u32>,
        /// One entry per prompt token (the first is `None`: nothing predicts it).
        prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    },
    Delta(ChoiceDelta),
    Done {
        usage: Usage,
        metrics: RequestMetrics,
    },
    Error(EngineError),
}

/// Embedding request: already tokenized inputs (front doors tokenize so they can count and truncate).
#[derive(Debug, Clone)]
pub struct EmbedRequest {
    pub request_id: String,
    pub inputs: Vec<Vec<u32>>,
    /// Matryoshka truncation (then re-normalised).
    pub dimensions: Option<usize>,
    /// vLLM's `normalize`: `None` = as the model's modules say, else L2-normalise or not.
    pub normalize: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmbedOutput {
    pub embeddings: Vec<Vec<f32>>,
    pub prompt_tokens: usize,
}
