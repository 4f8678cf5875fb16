//! worker-vllm's native input and output (its README's "Non-OpenAI Usage").
//!
//! Input: `prompt` or `messages` (which wins), `apply_chat_template`, `sampling_params`, `stream`,
//! `lora` (a LoRA adapter's name) and the batch-size knobs. Output pieces: `{"choices": [{"tokens": [..]}, ..], "usage": {"input",
//! "output"}}`, batched by the dynamic policy when streaming, one piece with the whole text otherwise.

use serde_json::{json, Map, Value};

use crate::api::error::ApiError;
use crate::api::stream_batch::{BatchPolicy, BatchSizer};
use crate::engine::{Engine, EngineError, GenerationEvent, Prompt, SamplingParams};

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum NativePrompt {
    /// A raw prompt; `chat` = render it through the chat template as one user message.
    Text { prompt: String, chat: bool },
    /// Chat messages, rendered through the chat template.
    Messages(Vec<Value>),
}

#[derive(Debug, Clone)]
pub(crate) struct NativeInput {
    pub prompt: NativePrompt,
    pub sampling_params: SamplingParams,
    /// vLLM's `sampling_params.truncate_prompt_tokens`: keep the last N prompt tokens (`None` inside:
    /// `-1`, up to the model's maximum length).
    pub truncate_prompt_tokens: Option<Option<usize>>,
    pub stream: bool,
    pub batch: BatchPolicy,
}

/// The engine a native job runs on: the base model's, or with `{"lora": "<adapter name>"}` that
/// LoRA adapter's (an unknown name is a 404, a name that is not a string a 400).
pub(crate) fn engine_for(engine: &Engine, input: &Map<String, Value>) -> Result<Engine, ApiError> {
    match input.get("lora") {
        None | Some(Value::Null) => Ok(engine.clone()),
        Some(Value::String(name)) => engine.with_adapter(name).ok_or_else(|| {
            let adapters = engine.adapters();
            let known: Vec<&str> = adapters.iter().map(|a| a.name.as_str()).collect();
            ApiError::not_found(format!(
                "The LoRA adapter `{name}` does not exist. This worker serves {}.",
                if known.is_empty() {
                    "no adapters (set ENABLE_LORA and LORA_MODULES)".to_string()
                } else {
                    format!("`{}`", known.join("`, `"))
                }
            ))
            .with_param("lora")
        }),
        Some(other) => Err(EngineError::invalid(
            "lora",
            format!(
                "`lora` must be an adapter's name (a string), got {}",
                type_name(other)
            ),
        )
        .into()),
    }
}

/// Parses a native job input; `defaults` are the `DEFAULT_*BATCH_SIZE*` settings.
pub(crate) fn parse_input(
    input: &Map<String, Value>,
    defaults: BatchPolicy,
) -> Result<NativeInput, EngineError> {
    let prompt = match (input.get("messages"), input.get("prompt")) {
        (Some(Value::Array(messages)), _) => {
            if messages.is_empty() {
                return Err(EngineError::invalid(
                    "messages",
                    "`messages` must not be empty",
                ));
            }
            if let Some(bad) = messages.iter().position(|m| !m.is_object()) {
                return Err(EngineError::invalid(
                    "messages",
                    format!("`messages[{bad}]` must be an object with `role` and `content`"),
                ));
            }
            NativePrompt::Messages(messages.clone())
        }
        (Some(Value::Null) | None, Some(Value::String(prompt))) => NativePrompt::Text {
            prompt: prompt.clone(),
            chat: bool_field(input, "apply_chat_template", false)?,
        },
        (Some(Value::Null) | None, Some(Value::Null) | None) => {
            return Err(EngineError::invalid(
                "prompt",
                "the input needs a `prompt` (string) or `messages` (list of chat messages)",
            ))
        }
        (Some(Value::Null) | None, Some(other)) => {
            return Err(EngineError::invalid(
                "prompt",
                format!("`prompt` must be a string, got {}", type_name(other)),
            ))
        }
        (Some(other), _) => {
            return Err(EngineError::invalid(
                "messages",
                format!(
                    "`messages` must be a list of chat messages, got {}",
                    type_name(other)
                ),
            ))
        }
    };
    let mut truncate_prompt_tokens = None;
    let sampling_params = match input.get("sampling_params") {
        None | Some(Value::Null) => SamplingParams::default(),
        Some(Value::Object(fields)) if fields.contains_key("truncate_prompt_tokens") => {
            let mut fields = fields.clone();
            truncate_prompt_tokens = match fields.remove("truncate_prompt_tokens") {
                None | Some(Value::Null) => None,
                Some(v) => match v.as_i64() {
                    Some(-1) => Some(None),
                    Some(k) if k >= 1 => Some(Some(k as usize)),
                    _ => {
                        return Err(EngineError::invalid(
                            "truncate_prompt_tokens",
                            format!("`truncate_prompt_tokens` must be at least 1 (or -1 for the model's maximum length), got {v}"),
                        ))
                    }
                },
            };
            parse_sampling_params(&Value::Object(fields))?
        }
        Some(v) => parse_sampling_params(v)?,
    };
    let batch = BatchPolicy {
        max_batch_size: count_field(input, "max_batch_size", defaults.max_batch_size)?,
        min_batch_size: count_field(input, "min_batch_size", defaults.min_batch_size)?,
        growth_factor: match input.get("batch_size_growth_factor") {
            None | Some(Value::Null) => defaults.growth_factor,
            Some(v) => v
                .as_f64()
                .filter(|g| g.is_finite() && *g >= 1.0)
                .ok_or_else(|| {
                    EngineError::invalid(
                        "batch_size_growth_factor",
                        format!("`batch_size_growth_factor` must be a number >= 1, got {v}"),
                    )
                })?,
        },
    };
    Ok(NativeInput {
        prompt,
        sampling_params,
        truncate_prompt_tokens,
        stream: bool_field(input, "stream", false)?,
        batch,
    })
}

/// The prompt to generate from: the text, or its last `truncate_prompt_tokens` tokens (vLLM keeps the
/// end of a truncated prompt); more than the model's maximum length is an error.
pub(crate) fn prompt(
    engine: &Engine,
    text: String,
    add_special_tokens: bool,
    truncate: Option<Option<usize>>,
) -> Result<Prompt, EngineError> {
    let Some(keep) = truncate else {
        return Ok(Prompt::Text(text));
    };
    let max_len = engine.info().max_model_len;
    let keep = match keep {
        None => max_len,
        Some(k) if k > max_len => {
            return Err(EngineError::invalid(
                "truncate_prompt_tokens",
                format!("`truncate_prompt_tokens` is {k}, more than the model's maximum context length of {max_len} tokens"),
            ))
        }
        Some(k) => k,
    };
    let mut ids = engine.tokenizer().encode(&text, add_special_tokens)?;
    if ids.len() > keep {
        ids.drain(..ids.len() - keep);
    }
    Ok(Prompt::Tokens(ids))
}

/// `sampling_params` in vLLM's names, strictly (unknown or mistyped fields are errors).
/// The structured-output keys (`structured_outputs`, `guided_json`, ...) are read as on the OpenAI
/// routes (`api/structured.rs`).
pub(crate) fn parse_sampling_params(value: &Value) -> Result<SamplingParams, EngineError> {
    let Value::Object(fields) = value else {
        return SamplingParams::from_json(value);
    };
    let mut rest = fields.clone();
    rest.retain(|k, _| !crate::api::structured::FIELDS.contains(&k.as_str()));
    let mut params = SamplingParams::from_json(&Value::Object(rest))?;
    params.structured = crate::api::structured::read(fields)
        .map_err(|e| EngineError::invalid(e.param().unwrap_or("sampling_params"), e.message()))?;
    Ok(params)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn bool_field(input: &Map<String, Value>, name: &str, default: bool) -> Result<bool, EngineError> {
    match input.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(EngineError::invalid(
            name,
            format!("`{name}` must be a boolean, got {}", type_name(other)),
        )),
    }
}

fn count_field(
    input: &Map<String, Value>,
    name: &str,
    default: usize,
) -> Result<usize, EngineError> {
    match input.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .filter(|n| *n >= 1)
            .map(|n| n as usize)
            .ok_or_else(|| {
                EngineError::invalid(
                    name,
                    format!("`{name}` must be a positive integer, got {v}"),
                )
            }),
    }
}

/// Turns the engine's events into native output pieces.
#[derive(Debug)]
pub(crate) struct NativeOutput {
    stream: bool,
    sizer: BatchSizer,
    input_tokens: usize,
    output_tokens: usize,
    /// Streaming: pieces not yet posted, per choice. Not streaming: the whole text, per choice.
    pending: Vec<Vec<String>>,
    pending_count: usize,
    finished: bool,
}

impl NativeOutput {
    pub(crate) fn new(n: usize, stream: bool, policy: BatchPolicy) -> Self {
        Self {
            stream,
            sizer: policy.sizer(),
            input_tokens: 0,
            output_tokens: 0,
            pending: vec![Vec::new(); n.max(1)],
            pending_count: 0,
            finished: false,
        }
    }

    /// Whether `Done` (or an error) was seen.
    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// Feeds one event; returns the pieces it completes (at most one).
    pub(crate) fn on_event(
        &mut self,
        event: GenerationEvent,
    ) -> Result<Option<Value>, EngineError> {
        match event {
            GenerationEvent::Prompt {
                prompt_token_ids, ..
            } => {
                self.input_tokens = prompt_token_ids.len();
                Ok(None)
            }
            GenerationEvent::Delta(delta) => {
                if delta.token_ids.is_empty() && delta.text.is_empty() {
                    return Ok(None);
                }
                self.output_tokens += delta.token_ids.len();
                if delta.index >= self.pending.len() {
                    self.pending.resize(delta.index + 1, Vec::new());
                }
                self.pending[delta.index].push(delta.text);
                self.pending_count += 1;
                if self.stream && self.sizer.is_full(self.pending_count) {
                    self.sizer.advance();
                    return Ok(Some(self.take_piece()));
                }
                Ok(None)
            }
            GenerationEvent::Done { usage, .. } => {
                self.finished = true;
                self.input_tokens = usage.prompt_tokens;
                self.output_tokens = usage.completion_tokens;
                if !self.stream {
                    for texts in &mut self.pending {
                        let whole = texts.concat();
                        *texts = vec![whole];
                    }
                    return Ok(Some(self.take_piece()));
                }
                Ok((self.pending_count > 0).then(|| self.take_piece()))
            }
            GenerationEvent::Error(e) => {
                self.finished = true;
                Err(e)
            }
        }
    }

    fn take_piece(&mut self) -> Value {
        let choices: Vec<Value> = self
            .pending
            .iter_mut()
            .map(|tokens| json!({ "tokens": std::mem::take(tokens) }))
            .collect();
        self.pending_count = 0;
        json!({
            "choices": choices,
            "usage": {"input": self.input_tokens, "output": self.output_tokens},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ChoiceDelta, Finish, FinishReason, RequestMetrics, Usage};

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn delta(index: usize, text: &str, id: u32) -> GenerationEvent {
        GenerationEvent::Delta(ChoiceDelta {
            index,
            text: text.into(),
            token_ids: vec![id],
            logprobs: Vec::new(),
            finish: None,
        })
    }

    fn done(prompt: usize, completion: usize) -> GenerationEvent {
        GenerationEvent::Done {
            usage: Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
            },
            metrics: RequestMetrics::default(),
        }
    }

    #[test]
    fn truncate_prompt_tokens_and_any_signed_seed() {
        let parse = |p: Value| {
            parse_input(
                &obj(json!({"prompt": "p", "sampling_params": p})),
                BatchPolicy::default(),
            )
        };
        let input = parse(json!({"truncate_prompt_tokens": 4, "seed": -1})).unwrap();
        assert_eq!(input.truncate_prompt_tokens, Some(Some(4)));
        assert_eq!(input.sampling_params.seed, Some(u64::MAX));
        assert_eq!(
            parse(json!({"truncate_prompt_tokens": -1}))
                .unwrap()
                .truncate_prompt_tokens,
            Some(None)
        );
        assert_eq!(parse(json!({})).unwrap().truncate_prompt_tokens, None);
        for bad in [json!(0), json!(-2), json!("4")] {
            let e = parse(json!({"truncate_prompt_tokens": bad})).unwrap_err();
            assert!(e.to_string().contains("truncate_prompt_tokens"), "{e}");
        }
    }

    #[test]
    fn messages_win_over_prompt() {
        let input = parse_input(
            &obj(json!({"prompt": "p", "messages": [{"role": "user", "content": "hi"}]})),
            BatchPolicy::default(),
        )
        .unwrap();
        assert!(matches!(input.prompt, NativePrompt::Messages(ref m) if m.len() == 1));
        let text = parse_input(
            &obj(json!({"prompt": "p", "apply_chat_template": true, "stream": true, "max_batch_size": 5})),
            BatchPolicy::default(),
        )
        .unwrap();
        assert_eq!(
            text.prompt,
            NativePrompt::Text {
                prompt: "p".into(),
                chat: true
            }
        );
        assert!(text.stream);
        assert_eq!(text.batch.max_batch_size, 5);
        assert_eq!(text.batch.min_batch_size, 1);
    }

    #[test]
    fn bad_inputs_are_named() {
        let cases = [
            (json!({}), "prompt"),
            (json!({"prompt": 3}), "prompt"),
            (json!({"messages": "hi"}), "messages"),
            (json!({"messages": []}), "messages"),
            (json!({"messages": ["hi"]}), "messages"),
            (json!({"prompt": "p", "stream": "yes"}), "stream"),
            (
                json!({"prompt": "p", "max_batch_size": 0}),
                "max_batch_size",
            ),
            (
                json!({"prompt": "p", "batch_size_growth_factor": "x"}),
                "batch_size_growth_factor",
            ),
            (
                json!({"prompt": "p", "sampling_params": []}),
                "sampling_params",
            ),
            (
                json!({"prompt": "p", "sampling_params": {"max_tokens": "ten"}}),
                "max_tokens",
            ),
            (
                json!({"prompt": "p", "sampling_params": {"temprature": 0}}),
                "temprature",
            ),
        ];
        for (input, param) in cases {
            let err = parse_input(&obj(input.clone()), BatchPolicy::default()).unwrap_err();
            assert_eq!(err.param(), Some(param), "{input}: {err}");
            assert!(err.is_client_error());
        }
    }

    #[test]
    fn streamed_pieces_follow_the_batch_policy_and_flush_the_rest() {
        let mut out = NativeOutput::new(1, true, BatchPolicy::default());
        let mut pieces = Vec::new();
        let prompt = GenerationEvent::Prompt {
            prompt_token_ids: vec![1, 2, 3],
            prompt_logprobs: None,
        };
        assert!(out.on_event(prompt).unwrap().is_none());
        for i in 0..20u32 {
            if let Some(p) = out.on_event(delta(0, &format!("t{i} "), i)).unwrap() {
                pieces.push(p);
            }
        }
        pieces.extend(out.on_event(done(3, 20)).unwrap());
        let sizes: Vec<usize> = pieces
            .iter()
            .map(|p| p["choices"][0]["tokens"].as_array().unwrap().len())
            .collect();
        assert_eq!(sizes, vec![1, 3, 9, 7]);
        assert_eq!(pieces[0]["usage"], json!({"input": 3, "output": 1}));
        assert_eq!(pieces[3]["usage"], json!({"input": 3, "output": 20}));
        let text: String = pieces
            .iter()
            .flat_map(|p| p["choices"][0]["tokens"].as_array().unwrap().clone())
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        assert_eq!(text, (0..20).map(|i| format!("t{i} ")).collect::<String>());
    }

    #[test]
    fn unstreamed_output_is_one_piece_per_choice_with_the_whole_text() {
        let mut out = NativeOutput::new(2, false, BatchPolicy::default());
        for (i, e) in [
            delta(0, "a", 1),
            delta(1, "x", 2),
            delta(0, "b", 3),
            delta(1, "y", 4),
        ]
        .into_iter()
        .enumerate()
        {
            assert!(out.on_event(e).unwrap().is_none(), "event {i}");
        }
        let last = GenerationEvent::Delta(ChoiceDelta {
            index: 1,
            text: "z".into(),
            token_ids: vec![5],
            logprobs: Vec::new(),
            finish: Some(Finish {
                reason: FinishReason::Stop,
                stop_reason: None,
            }),
        });
        assert!(out.on_event(last).unwrap().is_none());
        let piece = out.on_event(done(4, 5)).unwrap().unwrap();
        assert_eq!(
            piece,
            json!({"choices": [{"tokens": ["ab"]}, {"tokens": ["xyz"]}], "usage": {"input": 4, "output": 5}})
        );
        assert!(out.is_finished());
    }

    #[test]
    fn engine_errors_pass_through() {
        let mut out = NativeOutput::new(1, true, BatchPolicy::default());
        let err = out
            .on_event(GenerationEvent::Error(EngineError::Internal("boom".into())))
            .unwrap_err();
        assert_eq!(err, EngineError::Internal("boom".into()));
    }
}
