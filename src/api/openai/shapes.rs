//! The pieces of OpenAI's response objects that both routes share: ids, usage, finish reasons, and
//! the two logprobs shapes (legacy completions and chat).

use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde_json::{json, Map, Value};

use crate::engine::{Finish, FinishReason, StopReason, TokenLogprob, Usage};

/// `system_fingerprint`: the build that answered.
pub(crate) const SYSTEM_FINGERPRINT: &str = concat!("worker-candle-", env!("CARGO_PKG_VERSION"));

/// `prefix-` and 32 random hex digits, like vLLM's ids.
pub(crate) fn new_id(prefix: &str) -> String {
    let n: u128 = rand::rng().random();
    format!("{prefix}-{n:032x}")
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `usage`, with vLLM's `prompt_tokens_details.cached_tokens` (the prompt tokens served from the
/// prefix cache); `cached` is `None` when prefix caching is off, and the details are then null.
pub(crate) fn usage(u: &Usage, cached: Option<usize>) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens(),
        "prompt_tokens_details": cached.map(|c| json!({"cached_tokens": c})),
    })
}

/// vLLM's `return_tokens_as_token_ids`: every token of the logprobs spelled `token:<id>`.
pub(crate) fn spell_as_ids(lps: &mut [TokenLogprob]) {
    for lp in lps {
        lp.token = format!("token:{}", lp.token_id);
        for (id, text, _) in &mut lp.top {
            *text = format!("token:{id}");
        }
    }
}

pub(crate) fn finish_reason(finish: Option<&Finish>) -> Value {
    match finish.map(|f| f.reason) {
        None => Value::Null,
        Some(FinishReason::Stop) => json!("stop"),
        Some(FinishReason::Length) => json!("length"),
        Some(FinishReason::Abort) => json!("abort"),
    }
}

/// vLLM's `stop_reason`: the stop string or token id that ended the choice (null for EOS).
pub(crate) fn stop_reason(finish: Option<&Finish>) -> Value {
    match finish.and_then(|f| f.stop_reason.as_ref()) {
        None => Value::Null,
        Some(StopReason::Text(s)) => json!(s),
        Some(StopReason::TokenId(id)) => json!(id),
    }
}

/// A finite logprob for JSON (`-inf` has no JSON spelling; OpenAI clients expect a number).
fn finite(lp: f32) -> f64 {
    if lp.is_finite() {
        f64::from(lp)
    } else {
        -9999.0
    }
}

/// The legacy completions shape, built token by token so streamed chunks continue the offsets.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct LegacyLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Value>,
    pub top_logprobs: Vec<Value>,
    pub text_offset: Vec<usize>,
}

impl LegacyLogprobs {
    /// Adds one token; `None` logprob (the first prompt token) shows as nulls. `offset` is the
    /// token's character offset in the choice's text and is advanced past it.
    pub(crate) fn push(&mut self, token: &str, logprob: Option<&TokenLogprob>, offset: &mut usize) {
        self.tokens.push(token.to_string());
        self.text_offset.push(*offset);
        *offset += token.chars().count();
        match logprob {
            None => {
                self.token_logprobs.push(Value::Null);
                self.top_logprobs.push(Value::Null);
            }
            Some(lp) => {
                self.token_logprobs.push(json!(finite(lp.logprob)));
                let mut top = Map::new();
                for (_, text, alt) in &lp.top {
                    top.entry(text.clone()).or_insert(json!(finite(*alt)));
                }
                // vLLM lists the chosen token among the alternatives too.
                top.entry(lp.token.clone())
                    .or_insert(json!(finite(lp.logprob)));
                self.top_logprobs.push(Value::Object(top));
            }
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

/// The chat shape of one token: `{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`.
pub(crate) fn chat_logprob(lp: &TokenLogprob, top_n: usize) -> Value {
    let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": finite(logprob), "bytes": token.as_bytes()});
    let mut value = entry(&lp.token, lp.logprob);
    let top: Vec<Value> = lp
        .top
        .iter()
        .take(top_n)
        .map(|(_, text, alt)| entry(text, *alt))
        .collect();
    value["top_logprobs"] = Value::Array(top);
    value
}

pub(crate) fn chat_logprobs(lps: &[TokenLogprob], top_n: usize) -> Value {
    json!({ "content": lps.iter().map(|lp| chat_logprob(lp, top_n)).collect::<Vec<_>>() })
}

/// vLLM's `prompt_logprobs`: per prompt token `null` (the first) or `{token_id: {logprob, rank,
/// decoded_token}}` for the token and its alternatives (rank: 1 = most likely, the true rank even
/// outside the alternatives, as vLLM gives it).
pub(crate) fn prompt_logprobs(ids: &[u32], logprobs: &[Option<TokenLogprob>]) -> Value {
    let entries = ids.iter().enumerate().map(|(i, id)| {
        let Some(Some(lp)) = logprobs.get(i) else {
            return Value::Null;
        };
        let mut map = Map::new();
        for (rank, (alt, text, alt_lp)) in lp.top.iter().enumerate() {
            map.insert(
                alt.to_string(),
                json!({"logprob": finite(*alt_lp), "rank": rank + 1, "decoded_token": text}),
            );
        }
        map.insert(
            id.to_string(),
            json!({"logprob": finite(lp.logprob), "rank": lp.rank, "decoded_token": lp.token}),
        );
        Value::Object(map)
    });
    Value::Array(entries.collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(token: &str, logprob: f32, top: &[(&str, f32)]) -> TokenLogprob {
        TokenLogprob {
            token_id: 1,
            rank: 7,
            token: token.into(),
            logprob,
            top: top.iter().map(|(t, l)| (2, t.to_string(), *l)).collect(),
        }
    }

    #[test]
    fn legacy_logprobs_track_offsets_and_nulls() {
        let mut l = LegacyLogprobs::default();
        let mut offset = 0;
        l.push("Hé", None, &mut offset);
        l.push(
            " you",
            Some(&lp(" you", -0.5, &[(" me", -0.25)])),
            &mut offset,
        );
        assert_eq!(offset, 6);
        assert_eq!(
            l.to_json(),
            json!({
                "tokens": ["Hé", " you"],
                "token_logprobs": [null, -0.5],
                "top_logprobs": [null, {" me": -0.25, " you": -0.5}],
                "text_offset": [0, 2],
            })
        );
    }

    #[test]
    fn chat_logprobs_carry_bytes_and_the_top_alternatives() {
        let v = chat_logprobs(&[lp("é", -1.0, &[("a", -0.5), ("b", -2.0)])], 1);
        assert_eq!(
            v,
            json!({"content": [{"token": "é", "logprob": -1.0, "bytes": [195, 169],
                "top_logprobs": [{"token": "a", "logprob": -0.5, "bytes": [97]}]}]})
        );
    }

    #[test]
    fn prompt_logprobs_are_keyed_by_token_id() {
        let v = prompt_logprobs(&[5, 1], &[None, Some(lp("x", -0.5, &[]))]);
        assert_eq!(
            v,
            json!([null, {"1": {"logprob": -0.5, "rank": 7, "decoded_token": "x"}}])
        );
    }

    #[test]
    fn ids_are_prefixed_and_distinct() {
        let (a, b) = (new_id("cmpl"), new_id("cmpl"));
        assert!(a.starts_with("cmpl-") && a.len() == 37);
        assert_ne!(a, b);
    }
}
