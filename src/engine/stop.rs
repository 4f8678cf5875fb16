//! When a choice stops: stop strings matched across token boundaries (`StopStrings`) and the per-token
//! decision on EOS, stop token ids, `min_tokens` and `max_tokens` (`StopConditions`). Pure: text and ids
//! in, decisions out; no tokenizer.

use super::types::{Finish, FinishReason, SamplingParams, StopReason};

/// Matches stop strings in a stream of text deltas. Text that could be the start of a stop string is
/// held back until the next delta settles it, so a stop string is never emitted (unless
/// `include_stop_str_in_output`), even when it spans several tokens.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    include_in_output: bool,
    held: String,
    matched: Option<String>,
}

/// The result of feeding one delta.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopPush {
    /// Text safe to emit now.
    pub text: String,
    /// The stop string that matched; the choice is finished and later pushes return nothing.
    pub stopped: Option<String>,
}

impl StopStrings {
    pub fn new(stops: &[String], include_in_output: bool) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            include_in_output,
            held: String::new(),
            matched: None,
        }
    }

    pub(crate) fn from_params(params: &SamplingParams) -> Self {
        Self::new(&params.stop, params.include_stop_str_in_output)
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Feeds a text delta. With `active` false (still under `min_tokens`) stop strings do not end the
    /// choice, but a possible start of one is still held back so it can complete once active.
    pub fn push(&mut self, delta: &str, active: bool) -> StopPush {
        if self.matched.is_some() {
            return StopPush::default();
        }
        if self.stops.is_empty() {
            return StopPush {
                text: delta.to_owned(),
                stopped: None,
            };
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.push_str(delta);
        if active {
            if let Some((at, stop)) = self.earliest_match(&buf) {
                let end = if self.include_in_output {
                    at + stop.len()
                } else {
                    at
                };
                buf.truncate(end);
                self.matched = Some(stop.clone());
                return StopPush {
                    text: buf,
                    stopped: Some(stop),
                };
            }
        }
        let keep = self.partial_suffix_len(&buf);
        self.held = buf.split_off(buf.len() - keep);
        StopPush {
            text: buf,
            stopped: None,
        }
    }

    /// Releases held-back text at the end of a choice that stopped for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The earliest occurrence of any stop string (the longest one on a tie).
    fn earliest_match(&self, buf: &str) -> Option<(usize, String)> {
        self.stops
            .iter()
            .filter_map(|s| buf.find(s.as_str()).map(|at| (at, s)))
            .min_by(|(a, s1), (b, s2)| a.cmp(b).then(s2.len().cmp(&s1.len())))
            .map(|(at, s)| (at, s.clone()))
    }

    /// Length of the longest suffix of `buf` that is a proper prefix of some stop string.
    fn partial_suffix_len(&self, buf: &str) -> usize {
        self.stops
            .iter()
            .filter_map(|stop| {
                (1..stop.len().min(buf.len() + 1))
                    .rev()
                    .filter(|k| stop.is_char_boundary(*k))
                    .find(|k| buf.ends_with(&stop[..*k]))
            })
            .max()
            .unwrap_or(0)
    }
}

/// The token-level stop rules of one choice, in vLLM's order: nothing stops before `min_tokens`; then
/// EOS (unless `ignore_eos`), a stop token id, and finally the length limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StopConditions {
    pub eos_token_ids: Vec<u32>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub min_tokens: usize,
    /// Generated-token budget: `max_tokens` capped by the room left in the context.
    pub max_tokens: usize,
}

impl StopConditions {
    /// `eos_token_ids`: the tokenizer's EOS and `generation_config.json`'s; `prompt_len` and
    /// `max_model_len` cap the budget so the sequence never outgrows the context.
    pub fn new(
        params: &SamplingParams,
        eos_token_ids: &[u32],
        prompt_len: usize,
        max_model_len: usize,
    ) -> Self {
        let room = max_model_len.saturating_sub(prompt_len);
        Self {
            eos_token_ids: eos_token_ids.to_vec(),
            stop_token_ids: params.stop_token_ids.clone(),
            ignore_eos: params.ignore_eos,
            min_tokens: params.min_tokens,
            max_tokens: params.max_tokens.map_or(room, |m| m.min(room)),
        }
    }

    /// Whether stop strings may end the choice once `num_generated` tokens exist.
    pub(crate) fn stop_strings_active(&self, num_generated: usize) -> bool {
        num_generated >= self.min_tokens
    }

    /// The decision after `token` was generated as the `num_generated`-th token (1-based).
    pub(crate) fn check(&self, token: u32, num_generated: usize) -> Option<Finish> {
        if num_generated >= self.min_tokens {
            if !self.ignore_eos && self.eos_token_ids.contains(&token) {
                return Some(Finish {
                    reason: FinishReason::Stop,
                    stop_reason: None,
                });
            }
            if self.stop_token_ids.contains(&token) {
                return Some(Finish {
                    reason: FinishReason::Stop,
                    stop_reason: Some(StopReason::TokenId(token)),
                });
            }
        }
        (num_generated >= self.max_tokens).then_some(Finish {
            reason: FinishReason::Length,
            stop_reason: None,
        })
    }

    /// Ids the sampler must never pick while fewer than `min_tokens` exist (EOS is allowed through
    /// when `ignore_eos`, since it does not stop then).
    pub(crate) fn min_tokens_suppressed(&self) -> Vec<u32> {
        let eos = self.eos_token_ids.iter().filter(|_| !self.ignore_eos);
        let mut ids: Vec<u32> = eos.chain(&self.stop_token_ids).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stops: &[&str], include: bool, deltas: &[&str]) -> (String, Option<String>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopStrings::new(&stops, include);
        let mut out = String::new();
        for d in deltas {
            let p = m.push(d, true);
            out.push_str(&p.text);
            if p.stopped.is_some() {
                return (out, p.stopped);
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    #[test]
    fn stop_string_across_tokens_is_cut() {
        let (out, stop) = feed(&["###"], false, &["Hello #", "#", "# world"]);
        assert_eq!(out, "Hello ");
        assert_eq!(stop.as_deref(), Some("###"));
    }

    #[test]
    fn stop_string_included_when_asked() {
        let (out, stop) = feed(&["END"], true, &["a E", "NDb"]);
        assert_eq!(out, "a END");
        assert_eq!(stop.as_deref(), Some("END"));
    }

    #[test]
    fn partial_match_is_released_when_it_breaks() {
        let stops = vec!["###".to_string()];
        let mut m = StopStrings::new(&stops, false);
        assert_eq!(m.push("a ##", true).text, "a ");
        assert_eq!(m.push("x", true).text, "##x");
        assert_eq!(m.push("#", true).text, "");
        assert_eq!(m.flush(), "#");
    }

    #[test]
    fn earliest_stop_wins() {
        let (out, stop) = feed(&["world", "lo w"], false, &["hello world"]);
        assert_eq!(out, "hel");
        assert_eq!(stop.as_deref(), Some("lo w"));
    }

    #[test]
    fn multibyte_stop_strings() {
        let (out, stop) = feed(&["世界"], false, &["你好", "世", "界!"]);
        assert_eq!(out, "你好");
        assert_eq!(stop.as_deref(), Some("世界"));
    }

    #[test]
    fn inactive_matcher_does_not_stop_but_completes_later() {
        let stops = vec!["ab".to_string()];
        let mut m = StopStrings::new(&stops, false);
        assert_eq!(m.push("ab a", false).text, "ab ");
        let p = m.push("b", true);
        assert_eq!(p.stopped.as_deref(), Some("ab"));
        assert_eq!(p.text, "");
    }

    #[test]
    fn no_stops_passes_text_through() {
        let (out, stop) = feed(&[], false, &["a", "b"]);
        assert_eq!((out.as_str(), stop), ("ab", None));
    }

    fn conditions(
        min_tokens: usize,
        max_tokens: Option<usize>,
        ignore_eos: bool,
    ) -> StopConditions {
        let params = SamplingParams {
            min_tokens,
            max_tokens,
            ignore_eos,
            stop_token_ids: vec![7],
            ..Default::default()
        };
        StopConditions::new(&params, &[2], 10, 100)
    }

    #[test]
    fn eos_and_stop_ids() {
        let c = conditions(0, Some(16), false);
        assert_eq!(c.check(5, 1), None);
        let eos = c.check(2, 1).unwrap();
        assert_eq!((eos.reason, eos.stop_reason), (FinishReason::Stop, None));
        let id = c.check(7, 3).unwrap();
        assert_eq!(id.stop_reason, Some(StopReason::TokenId(7)));
    }

    #[test]
    fn ignore_eos_and_min_tokens() {
        let c = conditions(0, Some(16), true);
        assert_eq!(c.check(2, 1), None);
        assert_eq!(c.min_tokens_suppressed(), vec![7]);
        let c = conditions(3, Some(16), false);
        assert_eq!(c.check(2, 2), None);
        assert_eq!(c.check(7, 2), None);
        assert!(c.check(2, 3).is_some());
        assert_eq!(c.min_tokens_suppressed(), vec![2, 7]);
        assert!(!c.stop_strings_active(2));
    }

    #[test]
    fn length_limits() {
        let c = conditions(0, Some(4), false);
        assert_eq!(c.check(5, 3), None);
        assert_eq!(c.check(5, 4).unwrap().reason, FinishReason::Length);
        // No max_tokens: the context (100) minus the prompt (10).
        let c = conditions(0, None, false);
        assert_eq!(c.max_tokens, 90);
        assert_eq!(c.check(5, 90).unwrap().reason, FinishReason::Length);
    }
}
