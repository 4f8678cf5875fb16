//! Reading an OpenAI request body: typed fields with errors that name the parameter, and the sampling
//! parameters both routes share (OpenAI's and vLLM's extra ones) translated into `SamplingParams`.

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::api::error::ApiError;
use crate::engine::{EarlyStopping, SamplingParams};

/// Most alternatives per token OpenAI allows (`top_logprobs`, legacy `logprobs`).
pub(crate) const MAX_LOGPROBS: usize = 20;

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

    pub(crate) fn raw(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn flag(&self, key: &str, default: bool) -> Result<bool, ApiError> {
        Ok(self.get(key)?.unwrap_or(default))
    }
}

/// `stop`: a string or a list of strings.
fn stop_strings(body: &Body<'_>) -> Result<Vec<String>, ApiError> {
    match body.raw("stop") {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(_) => body
            .get::<Vec<String>>("stop")
            .map(Option::unwrap_or_default),
    }
}

/// `logit_bias`: token ids (as JSON object keys) to biases in [-100, 100].
fn logit_bias(body: &Body<'_>) -> Result<HashMap<u32, f32>, ApiError> {
    let Some(raw) = body.get::<HashMap<String, f32>>("logit_bias")? else {
        return Ok(HashMap::new());
    };
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

fn early_stopping(body: &Body<'_>) -> Result<EarlyStopping, ApiError> {
    match body.raw("early_stopping") {
        None | Some(Value::Bool(false)) => Ok(EarlyStopping::False),
        Some(Value::Bool(true)) => Ok(EarlyStopping::True),
        Some(Value::String(s)) if s == "never" => Ok(EarlyStopping::Never),
        Some(other) => Err(ApiError::invalid(
            "early_stopping",
            format!("`early_stopping` must be true, false or \"never\", got {other}"),
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
    let n: usize = body.get("n")?.unwrap_or(1);
    if n == 0 {
        return Err(ApiError::invalid("n", "`n` must be at least 1"));
    }
    // Accepted as OpenAI and vLLM do, but not acted on.
    let _user: Option<String> = body.get("user")?;
    Ok(SamplingParams {
        n,
        best_of: body.get("best_of")?,
        presence_penalty: body.get("presence_penalty")?.unwrap_or(0.0),
        frequency_penalty: body.get("frequency_penalty")?.unwrap_or(0.0),
        repetition_penalty: body.get("repetition_penalty")?.unwrap_or(1.0),
        temperature: body.get("temperature")?.unwrap_or(1.0),
        top_p: body.get("top_p")?.unwrap_or(1.0),
        top_k: body.get("top_k")?.unwrap_or(-1),
        min_p: body.get("min_p")?.unwrap_or(0.0),
        seed: body.get("seed")?,
        stop: stop_strings(body)?,
        stop_token_ids: body.get("stop_token_ids")?.unwrap_or_default(),
        include_stop_str_in_output: body.flag("include_stop_str_in_output", false)?,
        ignore_eos: body.flag("ignore_eos", false)?,
        max_tokens: body.get("max_tokens")?.or(default_max_tokens),
        min_tokens: body.get("min_tokens")?.unwrap_or(0),
        skip_special_tokens: body.flag("skip_special_tokens", true)?,
        spaces_between_special_tokens: body.flag("spaces_between_special_tokens", true)?,
        logprobs: None,
        prompt_logprobs: body.get("prompt_logprobs")?,
        logit_bias: logit_bias(body)?,
        use_beam_search: body.flag("use_beam_search", false)?,
        length_penalty: body.get("length_penalty")?.unwrap_or(1.0),
        early_stopping: early_stopping(body)?,
    })
}

/// `stream` and `stream_options.include_usage`.
pub(crate) fn stream_options(body: &Body<'_>) -> Result<(bool, bool), ApiError> {
    let stream = body.flag("stream", false)?;
    let include_usage = match body.raw("stream_options") {
        None => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::invalid(
                    "stream_options",
                    "`stream_options.include_usage` must be a boolean",
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::invalid(
                "stream_options",
                "`stream_options` must be an object",
            ))
        }
    };
    if include_usage && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "`stream_options` is only allowed when `stream` is true",
        ));
    }
    Ok((stream, include_usage))
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
            (json!({"seed": -1}), "seed"),
            (json!({"early_stopping": 3}), "early_stopping"),
            (json!({"max_tokens": 1.5}), "max_tokens"),
        ] {
            let e = params(body).unwrap_err();
            assert_eq!((e.status(), e.param()), (400, Some(param)));
        }
    }

    #[test]
    fn stream_options_need_stream() {
        let map = json!({"stream_options": {"include_usage": true}});
        let e = stream_options(&Body(map.as_object().unwrap())).unwrap_err();
        assert_eq!(e.param(), Some("stream_options"));
        let map = json!({"stream": true, "stream_options": {"include_usage": true}});
        assert_eq!(
            stream_options(&Body(map.as_object().unwrap())).unwrap(),
            (true, true)
        );
    }
}
