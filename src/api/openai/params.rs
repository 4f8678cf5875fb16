//! Reading an OpenAI request body: typed fields with errors that name the parameter, and the sampling
//! parameters both routes share (OpenAI's and vLLM's extra ones) translated into `SamplingParams`.

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::api::error::ApiError;
use crate::engine::{EarlyStopping, SamplingParams};

/// A request body (a JSON object) read field by field.
pub(crate) struct Body<'a>(pub &'a Map<String, Value>);

impl<'a> Body<'a> {
    pub(crate) fn from_value(value: Option<&'a Value>) -> Result<Self, ApiError> {
        match value {
            Some(Value::Object(map)) => Ok(Body(map)),
            Some(_) => Err(ApiError::bad_request(
                "the request body must be a JSON object",
            )),
            None => Err(ApiError::bad_request("the request has no body")),
        }
    }

    /// The field, `None` when absent or null; a type mismatch is a 400 naming the field.
    pub(crate) fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ApiError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| ApiError::invalid(key, format!("invalid `{key}`: {e}"))),
        }
    }

    /// The whole body as a typed struct; the first field of the wrong type is a 400 naming it
    /// (`serde_path_to_error` gives the path, its first segment is the parameter).
    pub(crate) fn typed<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        let body = Value::Object(self.0.clone());
        serde_path_to_error::deserialize(&body).map_err(|e| {
            let path = e.path().to_string();
            let param = path
                .split(['.', '['])
                .next()
                .unwrap_or_default()
                .to_string();
            ApiError::invalid(&param, format!("invalid `{path}`: {}", e.into_inner()))
        })
    }

    pub(crate) fn raw(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn flag(&self, key: &str, default: bool) -> Result<bool, ApiError> {
        Ok(self.get(key)?.unwrap_or(default))
    }
}

/// The sampling fields both routes accept, as OpenAI and vLLM name them; absent or null = default.
/// Read in one go ([`Body::typed`]); a field of the wrong type is a 400 naming it.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SamplingFields {
    n: Option<usize>,
    best_of: Option<usize>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    /// Any signed 64-bit seed, as vLLM takes (a negative one is kept as its two's complement).
    seed: Option<i64>,
    stop: Option<OneOrMany>,
    stop_token_ids: Option<Vec<u32>>,
    include_stop_str_in_output: Option<bool>,
    ignore_eos: Option<bool>,
    max_tokens: Option<usize>,
    min_tokens: Option<usize>,
    skip_special_tokens: Option<bool>,
    spaces_between_special_tokens: Option<bool>,
    prompt_logprobs: Option<usize>,
    /// Token ids (as JSON object keys) to biases in [-100, 100].
    logit_bias: Option<HashMap<String, f32>>,
    use_beam_search: Option<bool>,
    length_penalty: Option<f32>,
    early_stopping: Option<EarlyStoppingField>,
    /// Accepted (its type checked) as OpenAI and vLLM do, but not acted on.
    #[allow(dead_code)]
    user: Option<String>,
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// `early_stopping`: true, false or "never".
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum EarlyStoppingField {
    Flag(bool),
    Word(String),
}

fn logit_bias(raw: HashMap<String, f32>) -> Result<HashMap<u32, f32>, ApiError> {
    raw.into_iter()
        .map(|(token, bias)| {
            let id = token.trim().parse::<u32>().map_err(|_| {
                ApiError::invalid("logit_bias", format!("`{token}` is not a token id"))
            })?;
            if !(-100.0..=100.0).contains(&bias) {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!("the bias of token {id} must be in [-100, 100], got {bias}"),
                ));
            }
            Ok((id, bias))
        })
        .collect()
}

fn early_stopping(field: Option<EarlyStoppingField>) -> Result<EarlyStopping, ApiError> {
    match field {
        None | Some(EarlyStoppingField::Flag(false)) => Ok(EarlyStopping::False),
        Some(EarlyStoppingField::Flag(true)) => Ok(EarlyStopping::True),
        Some(EarlyStoppingField::Word(s)) if s == "never" => Ok(EarlyStopping::Never),
        Some(EarlyStoppingField::Word(s)) => Err(ApiError::invalid(
            "early_stopping",
            format!("`early_stopping` must be true, false or \"never\", got \"{s}\""),
        )),
    }
}

/// The sampling parameters both routes accept. `default_max_tokens` differs: 16 for completions,
/// none (the rest of the context) for chat. Ranges are checked by the engine; this only checks types
/// and what OpenAI itself restricts.
pub(crate) fn sampling_params(
    body: &Body<'_>,
    default_max_tokens: Option<usize>,
) -> Result<SamplingParams, ApiError> {
    let f: SamplingFields = body.typed()?;
    let n = f.n.unwrap_or(1);
    if n == 0 {
        return Err(ApiError::invalid("n", "`n` must be at least 1"));
    }
    Ok(SamplingParams {
        n,
        best_of: f.best_of,
        presence_penalty: f.presence_penalty.unwrap_or(0.0),
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
        repetition_penalty: f.repetition_penalty.unwrap_or(1.0),
        temperature: f.temperature.unwrap_or(1.0),
        top_p: f.top_p.unwrap_or(1.0),
        top_k: f.top_k.unwrap_or(-1),
        min_p: f.min_p.unwrap_or(0.0),
        seed: f.seed.map(|s| s as u64),
        stop: match f.stop {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s],
            Some(OneOrMany::Many(v)) => v,
        },
        stop_token_ids: f.stop_token_ids.unwrap_or_default(),
        include_stop_str_in_output: f.include_stop_str_in_output.unwrap_or(false),
        ignore_eos: f.ignore_eos.unwrap_or(false),
        max_tokens: f.max_tokens.or(default_max_tokens),
        min_tokens: f.min_tokens.unwrap_or(0),
        skip_special_tokens: f.skip_special_tokens.unwrap_or(true),
        spaces_between_special_tokens: f.spaces_between_special_tokens.unwrap_or(true),
        logprobs: None,
        prompt_logprobs: f.prompt_logprobs,
        logit_bias: logit_bias(f.logit_bias.unwrap_or_default())?,
        use_beam_search: f.use_beam_search.unwrap_or(false),
        length_penalty: f.length_penalty.unwrap_or(1.0),
        early_stopping: early_stopping(f.early_stopping)?,
        structured: crate::api::structured::read(body.0)?,
    })
}

/// `stream` and its `stream_options`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StreamOptions {
    pub stream: bool,
    /// A last chunk with the request's usage.
    pub include_usage: bool,
    /// vLLM's `continuous_usage_stats`: the usage so far in every chunk too (with `include_usage`).
    pub continuous_usage: bool,
}

/// `stream` and `stream_options` (`include_usage`, vLLM's `continuous_usage_stats`). As vLLM,
/// `stream_options` without `stream: true` is a 400.
pub(crate) fn stream_options(body: &Body<'_>) -> Result<StreamOptions, ApiError> {
    let stream = body.flag("stream", false)?;
    let flag = |o: &Map<String, Value>, key: &str| match o.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::invalid(
            "stream_options",
            format!("`stream_options.{key}` must be a boolean"),
        )),
    };
    let Some(options) = body.raw("stream_options") else {
        return Ok(StreamOptions {
            stream,
            ..Default::default()
        });
    };
    let Value::Object(o) = options else {
        return Err(ApiError::invalid(
            "stream_options",
            "`stream_options` must be an object",
        ));
    };
    if let Some(key) = o
        .keys()
        .find(|k| !["include_usage", "continuous_usage_stats"].contains(&k.as_str()))
    {
        return Err(ApiError::invalid(
            "stream_options",
            format!("unknown field `stream_options.{key}` (known: include_usage, continuous_usage_stats)"),
        ));
    }
    let include_usage = flag(o, "include_usage")?;
    let continuous_usage = include_usage && flag(o, "continuous_usage_stats")?;
    if !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "`stream_options` is only allowed when `stream` is true",
        ));
    }
    Ok(StreamOptions {
        stream,
        include_usage,
        continuous_usage,
    })
}

/// vLLM's extensions that shape a generation's prompt and response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Extensions {
    /// `return_token_ids`: `prompt_token_ids` and each choice's `token_ids` in the response.
    pub return_token_ids: bool,
    /// `return_tokens_as_token_ids`: logprob tokens spelled `token:<id>`.
    pub tokens_as_ids: bool,
    /// `truncate_prompt_tokens` (-1 = the model's maximum length) with `truncation_side`.
    pub truncate: Option<Truncation>,
}

/// Keep `keep` prompt tokens (`None`: the model's maximum length), from the end (`left`, vLLM's
/// default: the start is cut) or from the start (`right`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Truncation {
    pub keep: Option<usize>,
    pub left: bool,
}

impl Truncation {
    /// Cuts `ids` to the kept tokens; more than `max_len` kept is a 400, as vLLM answers.
    pub(crate) fn apply(&self, ids: &mut Vec<u32>, max_len: usize) -> Result<(), ApiError> {
        let keep = match self.keep {
            None => max_len,
            Some(k) if k > max_len => {
                return Err(ApiError::invalid(
                    "truncate_prompt_tokens",
                    format!(
                        "`truncate_prompt_tokens` is {k}, more than the model's maximum context length of {max_len} tokens"
                    ),
                ))
            }
            Some(k) => k,
        };
        if ids.len() > keep {
            if self.left {
                ids.drain(..ids.len() - keep);
            } else {
                ids.truncate(keep);
            }
        }
        Ok(())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ExtensionFields {
    return_token_ids: Option<bool>,
    return_tokens_as_token_ids: Option<bool>,
    truncate_prompt_tokens: Option<i64>,
    truncation_side: Option<String>,
}

pub(crate) fn extensions(body: &Body<'_>) -> Result<Extensions, ApiError> {
    let f: ExtensionFields = body.typed()?;
    Ok(Extensions {
        return_token_ids: f.return_token_ids.unwrap_or(false),
        tokens_as_ids: f.return_tokens_as_token_ids.unwrap_or(false),
        truncate: truncation(f.truncate_prompt_tokens, f.truncation_side.as_deref())?,
    })
}

/// `truncate_prompt_tokens` (≥ 1, or -1 for the model's maximum) and `truncation_side`.
pub(crate) fn truncation(
    keep: Option<i64>,
    side: Option<&str>,
) -> Result<Option<Truncation>, ApiError> {
    let left = match side {
        None | Some("left") => true,
        Some("right") => false,
        Some(other) => {
            return Err(ApiError::invalid(
                "truncation_side",
                format!("`truncation_side` must be \"left\" or \"right\", got \"{other}\""),
            ))
        }
    };
    match keep {
        None => Ok(None),
        Some(-1) => Ok(Some(Truncation { keep: None, left })),
        Some(k) if k >= 1 => Ok(Some(Truncation {
            keep: Some(k as usize),
            left,
        })),
        Some(_) => Err(ApiError::invalid(
            "truncate_prompt_tokens",
            "`truncate_prompt_tokens` must be at least 1 (or -1 for the model's maximum length)",
        )),
    }
}

/// Request fields every generation route reads: the sampling ones, `stream`/`stream_options`,
/// vLLM's extensions, and fields accepted as OpenAI and vLLM accept them without acting on them here
/// (`user`, `metadata`, `store`, `service_tier`, `request_id`, `priority`, `cache_salt`,
/// `prompt_cache_key`, `safety_identifier`).
pub(crate) const COMMON_FIELDS: &[&str] = &[
    "model",
    "n",
    "best_of",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "max_tokens",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "prompt_logprobs",
    "logit_bias",
    "use_beam_search",
    "length_penalty",
    "early_stopping",
    "user",
    "stream",
    "stream_options",
    "return_token_ids",
    "return_tokens_as_token_ids",
    "truncate_prompt_tokens",
    "truncation_side",
    "metadata",
    "store",
    "service_tier",
    "request_id",
    "priority",
    "cache_salt",
    "prompt_cache_key",
    "safety_identifier",
    // structured output (`api/structured.rs`)
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_whitespace_pattern",
    "guided_decoding_backend",
];

/// OpenAI and vLLM fields this worker does not act on and that would change the output: refused
/// with a message that says so, rather than ignored.
const UNSUPPORTED_FIELDS: &[&str] = &[
    "functions",
    "function_call",
    "modalities",
    "audio",
    "prediction",
    "web_search_options",
    "bad_words",
    "allowed_token_ids",
    "logits_processors",
    "vllm_xargs",
    "kv_transfer_params",
    "mm_processor_kwargs",
    "prompt_embeds",
];

/// Refuses a field no list names, as the README promises (a typo is an error, not a silent default).
pub(crate) fn check_fields(body: &Body<'_>, lists: &[&[&str]]) -> Result<(), ApiError> {
    match body
        .0
        .keys()
        .find(|k| !lists.iter().any(|l| l.contains(&k.as_str())))
    {
        None => Ok(()),
        Some(key) if UNSUPPORTED_FIELDS.contains(&key.as_str()) => Err(ApiError::invalid(
            key,
            format!("`{key}` is not supported by this worker"),
        )),
        Some(key) => Err(ApiError::invalid(key, format!("unknown field `{key}`"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: Value) -> Result<SamplingParams, ApiError> {
        let map = v.as_object().cloned().unwrap();
        sampling_params(&Body(&map), Some(16))
    }

    #[test]
    fn openai_and_vllm_fields_reach_the_sampling_params() {
        let p = params(json!({
            "n": 2, "best_of": 3, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1,
            "seed": 7, "stop": "x", "stop_token_ids": [4], "include_stop_str_in_output": true,
            "ignore_eos": true, "max_tokens": 9, "min_tokens": 2, "skip_special_tokens": false,
            "spaces_between_special_tokens": false, "logit_bias": {"12": -100, " 3": 5.5},
            "use_beam_search": true, "length_penalty": 0.5, "repetition_penalty": 1.2,
            "presence_penalty": 0.1, "frequency_penalty": 0.2, "early_stopping": "never", "user": "u"
        }))
        .unwrap();
        assert_eq!((p.n, p.best_of, p.top_k, p.seed), (2, Some(3), 5, Some(7)));
        assert_eq!(p.stop, vec!["x".to_string()]);
        assert_eq!(p.stop_token_ids, vec![4]);
        assert!(p.include_stop_str_in_output && p.ignore_eos && p.use_beam_search);
        assert!(!p.skip_special_tokens && !p.spaces_between_special_tokens);
        assert_eq!((p.max_tokens, p.min_tokens), (Some(9), 2));
        assert_eq!(p.logit_bias.get(&12), Some(&-100.0));
        assert_eq!(p.logit_bias.get(&3), Some(&5.5));
        assert_eq!(p.early_stopping, EarlyStopping::Never);
        assert_eq!((p.temperature, p.top_p, p.min_p), (0.5, 0.9, 0.1));
        assert_eq!((p.repetition_penalty, p.length_penalty), (1.2, 0.5));
    }

    #[test]
    fn defaults_follow_openai() {
        let p = params(json!({})).unwrap();
        assert_eq!((p.n, p.temperature, p.max_tokens), (1, 1.0, Some(16)));
        assert!(p.stop.is_empty() && p.skip_special_tokens);
        let p = params(json!({"stop": ["a", "b"], "max_tokens": null})).unwrap();
        assert_eq!(p.stop.len(), 2);
        assert_eq!(p.max_tokens, Some(16));
    }

    #[test]
    fn wrong_types_name_the_parameter() {
        for (body, param) in [
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"n": 0}), "n"),
            (json!({"stop": 3}), "stop"),
            (json!({"logit_bias": {"abc": 1}}), "logit_bias"),
            (json!({"logit_bias": {"1": 101}}), "logit_bias"),
            (json!({"seed": 1.5}), "seed"),
            (json!({"early_stopping": 3}), "early_stopping"),
            (json!({"max_tokens": 1.5}), "max_tokens"),
            (json!({"logit_bias": {"1": "x"}}), "logit_bias"),
            (json!({"user": 3}), "user"),
        ] {
            let e = params(body).unwrap_err();
            assert_eq!((e.status(), e.param()), (400, Some(param)));
        }
    }

    #[test]
    fn stream_options_need_stream() {
        for map in [
            json!({"stream_options": {"include_usage": true}}),
            json!({"stream": false, "stream_options": {"include_usage": false}}),
            json!({"stream": true, "stream_options": {"typo": true}}),
        ] {
            let e = stream_options(&Body(map.as_object().unwrap())).unwrap_err();
            assert_eq!(e.param(), Some("stream_options"));
        }
        let map = json!({"stream": true, "stream_options": {"include_usage": true, "continuous_usage_stats": true}});
        let o = stream_options(&Body(map.as_object().unwrap())).unwrap();
        assert!(o.stream && o.include_usage && o.continuous_usage);
    }

    #[test]
    fn any_signed_seed_and_truncation() {
        assert_eq!(params(json!({"seed": -1})).unwrap().seed, Some(u64::MAX));
        let t = truncation(Some(2), None).unwrap().unwrap();
        let mut ids = vec![1, 2, 3];
        t.apply(&mut ids, 10).unwrap();
        assert_eq!(ids, vec![2, 3]);
        let t = truncation(Some(2), Some("right")).unwrap().unwrap();
        let mut ids = vec![1, 2, 3];
        t.apply(&mut ids, 10).unwrap();
        assert_eq!(ids, vec![1, 2]);
        assert!(t.apply(&mut ids, 1).is_err());
        let t = truncation(Some(-1), None).unwrap().unwrap();
        let mut ids = vec![1, 2, 3];
        t.apply(&mut ids, 2).unwrap();
        assert_eq!(ids, vec![2, 3]);
        assert!(truncation(Some(0), None).is_err());
        assert!(truncation(Some(1), Some("middle")).is_err());
    }

    #[test]
    fn unknown_fields_are_named() {
        let map = json!({"temperature": 1, "tempurature": 1});
        let e = check_fields(&Body(map.as_object().unwrap()), &[COMMON_FIELDS]).unwrap_err();
        assert_eq!((e.status(), e.param()), (400, Some("tempurature")));
    }
}
