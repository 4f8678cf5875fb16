//! Speculative decoding, the pure part: what `SPECULATIVE_CONFIG` says, and the prompt-lookup (n-gram)
//! proposer. A proposer guesses the next few tokens of a sequence; the engine verifies all of them in
//! one forward pass (one logits row per guessed position) and keeps the longest prefix the model
//! agrees with, plus the token the model itself picks after it. The verification (exact for greedy
//! and for sampling) is the sampler's `sample_draft`; the KV bookkeeping is the scheduler's
//! `set_draft` / `accept_draft`.

use serde::Deserialize;

/// `SPECULATIVE_CONFIG`, as worker-vllm passes it to vLLM.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeculativeConfig {
    pub method: SpeculativeMethod,
    /// Tokens proposed per step (`num_speculative_tokens`).
    pub num_speculative_tokens: usize,
    /// Speculation is skipped for a step with more decoding sequences than this: a large batch
    /// already fills the arithmetic units, and extra positions only cost (`disable_by_batch_size`).
    pub disable_by_batch_size: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SpeculativeMethod {
    /// Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's last
    /// `n` tokens (`prompt_lookup_max` down to `prompt_lookup_min`).
    Ngram {
        prompt_lookup_min: usize,
        prompt_lookup_max: usize,
    },
    /// A smaller model sharing the tokenizer proposes greedily: a folder, a `.gguf` file or (resolved
    /// to a folder before the engine starts) a hub id; quantized in situ as it loads when asked.
    Draft {
        model: String,
        quantization: Option<String>,
    },
}

/// Proposals of more tokens than this are refused: each costs a logits row and a KV slot per step.
pub const MAX_SPECULATIVE_TOKENS: usize = 16;

/// Above this many decoding sequences a step runs without speculation unless the config says otherwise.
pub const DEFAULT_DISABLE_BY_BATCH_SIZE: usize = 4;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    method: Option<String>,
    model: Option<String>,
    num_speculative_tokens: Option<usize>,
    prompt_lookup_max: Option<usize>,
    prompt_lookup_min: Option<usize>,
    disable_by_batch_size: Option<usize>,
    /// Accepted for compatibility with vLLM configs; the draft runs on the main model's device.
    #[allow(dead_code)]
    draft_tensor_parallel_size: Option<usize>,
    /// The draft's in-situ quantization (`q8_0`, ...).
    quantization: Option<String>,
}

impl SpeculativeConfig {
    /// Parses the JSON of `SPECULATIVE_CONFIG`. The error names what is wrong.
    pub fn parse(json: &str) -> Result<Self, String> {
        let raw: Raw = serde_json::from_str(json)
            .map_err(|e| format!("SPECULATIVE_CONFIG is not a valid speculative config: {e}"))?;
        let k = raw.num_speculative_tokens.ok_or(
            "SPECULATIVE_CONFIG needs `num_speculative_tokens` (the tokens proposed per step)",
        )?;
        if k == 0 || k > MAX_SPECULATIVE_TOKENS {
            return Err(format!(
                "SPECULATIVE_CONFIG: num_speculative_tokens must be 1..={MAX_SPECULATIVE_TOKENS}, got {k}"
            ));
        }
        let method = match (raw.method.as_deref(), raw.model.as_deref()) {
            (Some("ngram"), _) | (None, Some("ngram" | "[ngram]")) => {
                let min = raw.prompt_lookup_min.unwrap_or(1);
                let max = raw.prompt_lookup_max.unwrap_or(min.max(5));
                if min == 0 || max < min {
                    return Err(format!(
                        "SPECULATIVE_CONFIG: need 1 <= prompt_lookup_min <= prompt_lookup_max, got {min} and {max}"
                    ));
                }
                SpeculativeMethod::Ngram {
                    prompt_lookup_min: min,
                    prompt_lookup_max: max,
                }
            }
            (None | Some("draft_model"), Some(model)) => SpeculativeMethod::Draft {
                model: model.to_string(),
                quantization: raw.quantization.clone(),
            },
            (Some(other), _) => {
                return Err(format!(
                    "SPECULATIVE_CONFIG: method {other:?} is not supported (supported: \"ngram\", or \"model\": a draft model)"
                ));
            }
            (None, None) => {
                return Err(
                    "SPECULATIVE_CONFIG needs `method: \"ngram\"` or `model` (a draft model)"
                        .into(),
                );
            }
        };
        if let Some(q) = &raw.quantization {
            if !matches!(method, SpeculativeMethod::Draft { .. }) {
                return Err(
                    "SPECULATIVE_CONFIG: `quantization` applies to a draft `model` only".into(),
                );
            }
            if super::quant::in_situ_dtype(q).is_none() {
                let names: Vec<&str> = super::quant::IN_SITU.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "SPECULATIVE_CONFIG: the draft's quantization {q:?} is not one of {}",
                    names.join(", ")
                ));
            }
        }
        Ok(Self {
            method,
            num_speculative_tokens: k,
            disable_by_batch_size: raw
                .disable_by_batch_size
                .unwrap_or(DEFAULT_DISABLE_BY_BATCH_SIZE),
        })
    }
}

/// Prompt lookup: finds the sequence's last `n` tokens earlier in the sequence (prompt and output),
/// longest `n` first, and proposes what followed the latest such occurrence.
#[derive(Debug, Clone, Copy)]
pub struct NgramProposer {
    pub min: usize,
    pub max: usize,
}

impl NgramProposer {
    /// Up to `k` tokens to try after `tokens`; empty when no n-gram recurs.
    pub fn propose(&self, tokens: &[u32], k: usize) -> Vec<u32> {
        let len = tokens.len();
        if k == 0 || len < 2 {
            return Vec::new();
        }
        for n in (self.min..=self.max.min(len - 1)).rev() {
            let suffix = &tokens[len - n..];
            // latest occurrence that ends before the suffix itself starts to overlap its own end
            let found = (0..len - n)
                .rev()
                .find(|&start| &tokens[start..start + n] == suffix);
            if let Some(start) = found {
                let from = start + n;
                let to = (from + k).min(len);
                return tokens[from..to].to_vec();
            }
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_worker_vllm_forms() {
        let c = SpeculativeConfig::parse(
            r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 2}"#,
        )
        .unwrap();
        assert_eq!(c.num_speculative_tokens, 4);
        assert_eq!(
            c.method,
            SpeculativeMethod::Ngram {
                prompt_lookup_min: 2,
                prompt_lookup_max: 3
            }
        );
        let c = SpeculativeConfig::parse(
            r#"{"model": "/models/draft", "num_speculative_tokens": 3, "quantization": "q8_0"}"#,
        )
        .unwrap();
        assert_eq!(
            c.method,
            SpeculativeMethod::Draft {
                model: "/models/draft".into(),
                quantization: Some("q8_0".into()),
            }
        );
        // vLLM's older spelling: the model field says "[ngram]"
        let c = SpeculativeConfig::parse(
            r#"{"model": "[ngram]", "num_speculative_tokens": 2, "prompt_lookup_max": 4}"#,
        )
        .unwrap();
        assert!(matches!(
            c.method,
            SpeculativeMethod::Ngram {
                prompt_lookup_max: 4,
                ..
            }
        ));
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        for (json, needle) in [
            ("{", "not a valid"),
            (r#"{"method": "ngram"}"#, "num_speculative_tokens"),
            (
                r#"{"method": "ngram", "num_speculative_tokens": 0}"#,
                "1..=",
            ),
            (
                r#"{"method": "eagle", "num_speculative_tokens": 2}"#,
                "eagle",
            ),
            (r#"{"num_speculative_tokens": 2}"#, "method"),
            (
                r#"{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}"#,
                "prompt_lookup_min",
            ),
            (
                r#"{"method": "ngram", "num_speculative_tokens": 2, "typo": 1}"#,
                "typo",
            ),
        ] {
            let e = SpeculativeConfig::parse(json).unwrap_err();
            assert!(e.contains(needle), "{json}: {e}");
        }
    }

    #[test]
    fn proposes_what_followed_the_latest_longest_match() {
        let p = NgramProposer { min: 1, max: 3 };
        // "1 2 3 9 ... 1 2 3" -> after the earlier "1 2 3" came 9 8
        assert_eq!(p.propose(&[1, 2, 3, 9, 8, 7, 1, 2, 3], 2), vec![9, 8]);
        // the longest n wins over a later shorter match
        assert_eq!(p.propose(&[5, 6, 1, 6, 2, 5, 6], 1), vec![1]);
        // latest occurrence of the same n-gram wins
        assert_eq!(p.propose(&[4, 1, 4, 2, 4], 1), vec![2]);
        // proposals stop at the end of the sequence
        assert_eq!(p.propose(&[7, 8, 7], 5), vec![8, 7]);
        // nothing recurs
        assert!(p.propose(&[1, 2, 3, 4], 3).is_empty());
        assert!(p.propose(&[1], 3).is_empty());
        // min above what recurs
        let strict = NgramProposer { min: 2, max: 2 };
        assert!(strict.propose(&[1, 2, 3, 2], 3).is_empty());
        assert_eq!(strict.propose(&[1, 2, 3, 1, 2], 3), vec![3, 1, 2]);
    }
}
