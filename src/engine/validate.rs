//! `SamplingParams` from a client's JSON (worker-vllm's native `sampling_params`, vLLM names and types)
//! and its range checks. Every error names the parameter as the client spelled it.

use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use super::error::EngineError;
use super::types::{EarlyStopping, SamplingParams};

/// vLLM's default cap on `logprobs` and `prompt_logprobs`.
pub(crate) const MAX_LOGPROBS: usize = 20;

/// Most sequences one request may ask for (`n`, `best_of`): OpenAI's cap on `n`. Each one costs a
/// sampler and KV blocks, so an unbounded value would let one request exhaust the engine.
pub(crate) const MAX_SEQUENCES: usize = 128;

/// `logit_bias` values are clamped by OpenAI to this range; vLLM rejects values outside it.
const MAX_LOGIT_BIAS: f32 = 100.0;

/// What the served model allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidationLimits {
    /// Token ids (`logit_bias`, `stop_token_ids`) must be below this: the model's vocabulary size.
    pub vocab_size: usize,
    pub max_logprobs: usize,
    /// Cap on `n` and `best_of`.
    pub max_sequences: usize,
}

impl ValidationLimits {
    pub fn new(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            max_logprobs: MAX_LOGPROBS,
            max_sequences: MAX_SEQUENCES,
        }
    }
}

fn invalid(param: &str, message: impl Into<String>) -> EngineError {
    EngineError::invalid(param, message)
}

impl SamplingParams {
    /// Rejects out-of-range values, vLLM's rules (`top_k` 0 is accepted and means "all tokens", as
    /// in recent vLLM).
    pub fn validate(&self, limits: &ValidationLimits) -> Result<(), EngineError> {
        self.validate_counts(limits.max_sequences)?;
        self.validate_floats()?;
        self.validate_token_ids(limits.vocab_size)?;
        for (param, value) in [
            ("logprobs", self.logprobs),
            ("prompt_logprobs", self.prompt_logprobs),
        ] {
            if let Some(v) = value.filter(|v| *v > limits.max_logprobs) {
                return Err(invalid(
                    param,
                    format!("{param} must be at most {}, got {v}", limits.max_logprobs),
                ));
            }
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(invalid("stop", "stop cannot contain an empty string"));
        }
        if self.use_beam_search {
            self.validate_beam_search()
        } else {
            self.validate_not_beam_search()
        }
    }

    fn validate_counts(&self, max_sequences: usize) -> Result<(), EngineError> {
        if self.n < 1 {
            return Err(invalid(
                "n",
                format!("n must be at least 1, got {}", self.n),
            ));
        }
        for (param, value) in [("n", Some(self.n)), ("best_of", self.best_of)] {
            if let Some(v) = value.filter(|v| *v > max_sequences) {
                return Err(invalid(
                    param,
                    format!("{param} must be at most {max_sequences}, got {v}"),
                ));
            }
        }
        if let Some(best_of) = self.best_of {
            if best_of < self.n {
                return Err(invalid(
                    "best_of",
                    format!(
                        "best_of must be greater than or equal to n, got n={} and best_of={best_of}",
                        self.n
                    ),
                ));
            }
        }
        if self.top_k < -1 {
            return Err(invalid(
                "top_k",
                format!(
                    "top_k must be -1 (disable), or at least 1, got {}",
                    self.top_k
                ),
            ));
        }
        if let Some(max_tokens) = self.max_tokens {
            if max_tokens < 1 {
                return Err(invalid(
                    "max_tokens",
                    format!("max_tokens must be at least 1, got {max_tokens}"),
                ));
            }
            if self.min_tokens > max_tokens {
                return Err(invalid(
                    "min_tokens",
                    format!(
                        "min_tokens must be less than or equal to max_tokens={max_tokens}, got {}",
                        self.min_tokens
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_floats(&self) -> Result<(), EngineError> {
        let checks: [(&str, f32, bool, &str); 7] = [
            (
                "presence_penalty",
                self.presence_penalty,
                (-2.0..=2.0).contains(&self.presence_penalty),
                "must be in [-2, 2]",
            ),
            (
                "frequency_penalty",
                self.frequency_penalty,
                (-2.0..=2.0).contains(&self.frequency_penalty),
                "must be in [-2, 2]",
            ),
            (
                "repetition_penalty",
                self.repetition_penalty,
                self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite(),
                "must be greater than zero",
            ),
            (
                "temperature",
                self.temperature,
                self.temperature >= 0.0 && self.temperature.is_finite(),
                "must be non-negative",
            ),
            (
                "top_p",
                self.top_p,
                self.top_p > 0.0 && self.top_p <= 1.0,
                "must be in (0, 1]",
            ),
            (
                "min_p",
                self.min_p,
                (0.0..=1.0).contains(&self.min_p),
                "must be in [0, 1]",
            ),
            (
                "length_penalty",
                self.length_penalty,
                self.length_penalty.is_finite(),
                "must be a finite number",
            ),
        ];
        match checks.iter().find(|(_, _, ok, _)| !ok) {
            Some((param, value, _, rule)) => {
                Err(invalid(param, format!("{param} {rule}, got {value}")))
            }
            None => Ok(()),
        }
    }

    fn validate_token_ids(&self, vocab_size: usize) -> Result<(), EngineError> {
        for (id, bias) in &self.logit_bias {
            if *id as usize >= vocab_size {
                return Err(invalid(
                    "logit_bias",
                    format!("token id {id} in logit_bias is out of vocabulary (size {vocab_size})"),
                ));
            }
            if !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(bias) {
                return Err(invalid(
                    "logit_bias",
                    format!("logit_bias values must be in [-100, 100], got {bias} for token {id}"),
                ));
            }
        }
        if let Some(id) = self
            .stop_token_ids
            .iter()
            .find(|id| **id as usize >= vocab_size)
        {
            return Err(invalid(
                "stop_token_ids",
                format!("stop token id {id} is out of vocabulary (size {vocab_size})"),
            ));
        }
        Ok(())
    }

    fn validate_beam_search(&self) -> Result<(), EngineError> {
        let width = self.best_of.unwrap_or(self.n);
        if width < 2 {
            return Err(invalid(
                "best_of",
                format!("best_of must be greater than 1 when using beam search, got {width}"),
            ));
        }
        if self.temperature > crate::engine::sampling::GREEDY_EPS {
            return Err(invalid(
                "temperature",
                "temperature must be 0 when using beam search",
            ));
        }
        if self.top_p < 1.0 {
            return Err(invalid("top_p", "top_p must be 1 when using beam search"));
        }
        if self.top_k > 0 {
            return Err(invalid("top_k", "top_k must be -1 when using beam search"));
        }
        if self.min_p > 0.0 {
            return Err(invalid("min_p", "min_p must be 0 when using beam search"));
        }
        Ok(())
    }

    fn validate_not_beam_search(&self) -> Result<(), EngineError> {
        if self.early_stopping != EarlyStopping::False {
            return Err(invalid(
                "early_stopping",
                "early_stopping is not effective and must be False when not using beam search",
            ));
        }
        if self.length_penalty != 1.0 {
            return Err(invalid(
                "length_penalty",
                "length_penalty is not effective and must be the default value of 1.0 when not using beam search",
            ));
        }
        Ok(())
    }

    /// Reads worker-vllm's `sampling_params` object. Unknown fields and wrong types are errors naming
    /// the field; `null` is the same as leaving a field out. Ranges are checked by `validate`.
    pub(crate) fn from_json(value: &Value) -> Result<Self, EngineError> {
        let Value::Object(fields) = value else {
            return Err(invalid(
                "sampling_params",
                format!("sampling_params must be an object, got {}", kind(value)),
            ));
        };
        let mut p = SamplingParams::default();
        for (key, v) in fields.iter().filter(|(_, v)| !v.is_null()) {
            p.set_field(key, v)?;
        }
        Ok(p)
    }

    fn set_field(&mut self, key: &str, v: &Value) -> Result<(), EngineError> {
        match key {
            "n" => self.n = uint(key, v)?,
            "best_of" => self.best_of = Some(uint(key, v)?),
            "presence_penalty" => self.presence_penalty = float(key, v)?,
            "frequency_penalty" => self.frequency_penalty = float(key, v)?,
            "repetition_penalty" => self.repetition_penalty = float(key, v)?,
            "temperature" => self.temperature = float(key, v)?,
            "top_p" => self.top_p = float(key, v)?,
            "top_k" => self.top_k = int(key, v)?,
            "min_p" => self.min_p = float(key, v)?,
            // Python's `random.seed` takes any int: a negative seed is kept as its two's complement.
            "seed" => self.seed = Some(int(key, v)? as u64),
            "stop" => self.stop = strings(key, v)?,
            "stop_token_ids" => self.stop_token_ids = token_ids(key, v)?,
            "include_stop_str_in_output" => self.include_stop_str_in_output = boolean(key, v)?,
            "ignore_eos" => self.ignore_eos = boolean(key, v)?,
            "max_tokens" => self.max_tokens = Some(uint(key, v)?),
            "min_tokens" => self.min_tokens = uint(key, v)?,
            "skip_special_tokens" => self.skip_special_tokens = boolean(key, v)?,
            "spaces_between_special_tokens" => {
                self.spaces_between_special_tokens = boolean(key, v)?
            }
            "logprobs" => self.logprobs = Some(uint(key, v)?),
            "prompt_logprobs" => self.prompt_logprobs = Some(uint(key, v)?),
            "logit_bias" => self.logit_bias = logit_bias(key, v)?,
            "use_beam_search" => self.use_beam_search = boolean(key, v)?,
            "length_penalty" => self.length_penalty = float(key, v)?,
            "early_stopping" => self.early_stopping = early_stopping(key, v)?,
            other => {
                return Err(invalid(
                    other,
                    format!("unknown sampling parameter `{other}`"),
                ))
            }
        }
        Ok(())
    }
}

/// Strict deserialization through `from_json`, so serde users get the same rules and messages.
impl<'de> Deserialize<'de> for SamplingParams {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        SamplingParams::from_json(&value).map_err(serde::de::Error::custom)
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(key: &str, expected: &str, v: &Value) -> EngineError {
    invalid(key, format!("{key} must be {expected}, got {}", kind(v)))
}

fn int(key: &str, v: &Value) -> Result<i64, EngineError> {
    if let Some(i) = v.as_i64() {
        return Ok(i);
    }
    // 2.0 from a JavaScript client is an integer; 2.5 is not.
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
        Some(f) => Err(invalid(key, format!("{key} must be an integer, got {f}"))),
        None if v.as_u64().is_some() => Err(invalid(key, format!("{key} is too large"))),
        None => Err(wrong_type(key, "an integer", v)),
    }
}

fn uint(key: &str, v: &Value) -> Result<usize, EngineError> {
    let i = int(key, v)?;
    usize::try_from(i).map_err(|_| invalid(key, format!("{key} must be non-negative, got {i}")))
}

fn float(key: &str, v: &Value) -> Result<f32, EngineError> {
    v.as_f64()
        .map(|f| f as f32)
        .ok_or_else(|| wrong_type(key, "a number", v))
}

fn boolean(key: &str, v: &Value) -> Result<bool, EngineError> {
    v.as_bool().ok_or_else(|| wrong_type(key, "a boolean", v))
}

fn strings(key: &str, v: &Value) -> Result<Vec<String>, EngineError> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| wrong_type(key, "a string or a list of strings", item))
            })
            .collect(),
        other => Err(wrong_type(key, "a string or a list of strings", other)),
    }
}

fn token_id(key: &str, v: &Value) -> Result<u32, EngineError> {
    let i = int(key, v)?;
    u32::try_from(i).map_err(|_| invalid(key, format!("{key} must hold token ids, got {i}")))
}

fn token_ids(key: &str, v: &Value) -> Result<Vec<u32>, EngineError> {
    match v {
        Value::Array(items) => items.iter().map(|item| token_id(key, item)).collect(),
        other => Err(wrong_type(key, "a list of token ids", other)),
    }
}

fn logit_bias(key: &str, v: &Value) -> Result<std::collections::HashMap<u32, f32>, EngineError> {
    let Value::Object(map) = v else {
        return Err(wrong_type(key, "an object of token id to bias", v));
    };
    map_entries(key, map)
}

fn map_entries(
    key: &str,
    map: &Map<String, Value>,
) -> Result<std::collections::HashMap<u32, f32>, EngineError> {
    map.iter()
        .map(|(id, bias)| {
            let id: u32 = id
                .trim()
                .parse()
                .map_err(|_| invalid(key, format!("{key} keys must be token ids, got \"{id}\"")))?;
            Ok((id, float(key, bias)?))
        })
        .collect()
}

fn early_stopping(key: &str, v: &Value) -> Result<EarlyStopping, EngineError> {
    match v {
        Value::Bool(true) => Ok(EarlyStopping::True),
        Value::Bool(false) => Ok(EarlyStopping::False),
        Value::String(s) if s == "never" => Ok(EarlyStopping::Never),
        other => Err(invalid(
            key,
            format!("{key} must be true, false or \"never\", got {other}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<SamplingParams, EngineError> {
        SamplingParams::from_json(&v)
    }

    fn param_of(e: EngineError) -> String {
        e.param().unwrap_or_default().to_owned()
    }

    #[test]
    fn reads_every_vllm_field() {
        let p = parse(json!({
            "n": 2, "best_of": 3, "presence_penalty": 0.5, "frequency_penalty": -0.5,
            "repetition_penalty": 1.2, "temperature": 0, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
            "seed": 42, "stop": "###", "stop_token_ids": [5, 6], "include_stop_str_in_output": true,
            "ignore_eos": true, "max_tokens": 100, "min_tokens": 3, "skip_special_tokens": false,
            "spaces_between_special_tokens": false, "logprobs": 5, "prompt_logprobs": 1,
            "logit_bias": {"7": 10, "8": -2.5}, "use_beam_search": false, "length_penalty": 1.0,
            "early_stopping": false
        }))
        .unwrap();
        assert_eq!(
            (p.n, p.best_of, p.top_k, p.seed),
            (2, Some(3), 40, Some(42))
        );
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.stop, vec!["###".to_string()]);
        assert_eq!(p.stop_token_ids, vec![5, 6]);
        assert_eq!(p.max_tokens, Some(100));
        assert_eq!(p.logit_bias.get(&8), Some(&-2.5));
        assert!(p.include_stop_str_in_output && p.ignore_eos && !p.skip_special_tokens);
        p.validate(&ValidationLimits::new(1024)).unwrap();
    }

    #[test]
    fn null_means_default_and_variants_parse() {
        let p = parse(
            json!({"max_tokens": null, "stop": ["a", "b"], "early_stopping": "never",
                              "use_beam_search": true, "n": 2.0, "seed": -1}),
        )
        .unwrap();
        assert_eq!(p.max_tokens, SamplingParams::default().max_tokens);
        assert_eq!(p.stop.len(), 2);
        assert_eq!(p.early_stopping, EarlyStopping::Never);
        assert_eq!(p.n, 2);
        assert_eq!(p.seed, Some(u64::MAX));
        let via_serde: SamplingParams = serde_json::from_value(json!({"top_k": 5})).unwrap();
        assert_eq!(via_serde.top_k, 5);
        assert!(serde_json::from_value::<SamplingParams>(json!({"top_kk": 5})).is_err());
    }

    #[test]
    fn wrong_types_and_unknown_fields_name_the_field() {
        for (input, param) in [
            (json!({"temprature": 0}), "temprature"),
            (json!({"max_tokens": "ten"}), "max_tokens"),
            (json!({"n": 1.5}), "n"),
            (json!({"n": -1}), "n"),
            (json!({"stop": 3}), "stop"),
            (json!({"stop": ["a", 1]}), "stop"),
            (json!({"stop_token_ids": "1"}), "stop_token_ids"),
            (json!({"stop_token_ids": [-1]}), "stop_token_ids"),
            (json!({"logit_bias": {"x": 1}}), "logit_bias"),
            (json!({"logit_bias": {"1": "up"}}), "logit_bias"),
            (json!({"early_stopping": "sometimes"}), "early_stopping"),
            (json!({"ignore_eos": "yes"}), "ignore_eos"),
            (json!({"top_p": "1"}), "top_p"),
        ] {
            let err = parse(input.clone()).expect_err(&input.to_string());
            assert_eq!(param_of(err), param, "{input}");
        }
        assert_eq!(param_of(parse(json!([1])).unwrap_err()), "sampling_params");
    }

    #[test]
    fn every_range_rejection_names_its_parameter() {
        let limits = ValidationLimits::new(100);
        let cases: Vec<(Value, &str)> = vec![
            (json!({"n": 0}), "n"),
            (json!({"n": 3, "best_of": 2}), "best_of"),
            (json!({"n": 129}), "n"),
            (json!({"n": 2, "best_of": 1000}), "best_of"),
            (json!({"presence_penalty": 2.5}), "presence_penalty"),
            (json!({"frequency_penalty": -3}), "frequency_penalty"),
            (json!({"repetition_penalty": 0}), "repetition_penalty"),
            (json!({"temperature": -0.1}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_p": 1.1}), "top_p"),
            (json!({"top_k": -2}), "top_k"),
            (json!({"min_p": 1.5}), "min_p"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_tokens": 4, "min_tokens": 5}), "min_tokens"),
            (json!({"logprobs": 21}), "logprobs"),
            (json!({"prompt_logprobs": 21}), "prompt_logprobs"),
            (json!({"logit_bias": {"100": 1}}), "logit_bias"),
            (json!({"logit_bias": {"1": 101}}), "logit_bias"),
            (json!({"stop_token_ids": [100]}), "stop_token_ids"),
            (json!({"stop": ["ok", ""]}), "stop"),
            (json!({"use_beam_search": true, "n": 1}), "best_of"),
            (
                json!({"use_beam_search": true, "n": 2, "temperature": 1}),
                "temperature",
            ),
            (
                json!({"use_beam_search": true, "n": 2, "temperature": 0, "top_p": 0.5}),
                "top_p",
            ),
            (
                json!({"use_beam_search": true, "n": 2, "temperature": 0, "top_k": 3}),
                "top_k",
            ),
            (
                json!({"use_beam_search": true, "n": 2, "temperature": 0, "min_p": 0.1}),
                "min_p",
            ),
            (json!({"early_stopping": true}), "early_stopping"),
            (json!({"length_penalty": 2.0}), "length_penalty"),
        ];
        for (input, param) in cases {
            let p = parse(input.clone()).unwrap();
            let err = p.validate(&limits).expect_err(&input.to_string());
            assert_eq!(param_of(err.clone()), param, "{input}");
            assert!(err.is_client_error());
        }
    }

    #[test]
    fn accepted_edges() {
        let limits = ValidationLimits::new(100);
        for input in [
            json!({"top_k": 0}),
            json!({"top_k": -1}),
            json!({"top_p": 1}),
            json!({"min_p": 1}),
            json!({"temperature": 0, "n": 3}),
            json!({"max_tokens": 5, "min_tokens": 5}),
            json!({"logprobs": 20, "prompt_logprobs": 0}),
            json!({"logit_bias": {"99": -100}}),
            json!({"use_beam_search": true, "best_of": 4, "temperature": 0,
                   "length_penalty": 0.5, "early_stopping": "never"}),
        ] {
            let p = parse(input.clone()).unwrap();
            p.validate(&limits)
                .unwrap_or_else(|e| panic!("{input}: {e}"));
        }
    }
}
