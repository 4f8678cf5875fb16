//! Beam search policy (vLLM's `use_beam_search` semantics): each step extends every live beam by its
//! `2 × width` most likely tokens, keeps the `width` best candidates by cumulative log-probability,
//! and sets aside finished hypotheses (EOS or a stop id among the top `width`, or the length limit).
//! Hypotheses are ranked by `cum_logprob / len^length_penalty` (len = prompt + output, less a final EOS).

use crate::engine::sampling::top_n;
use crate::engine::types::{EarlyStopping, Finish, FinishReason};

#[derive(Debug, Clone)]
pub(crate) struct BeamConfig {
    pub width: usize,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    pub prompt_len: usize,
    /// The output budget (max_tokens capped by the context).
    pub max_tokens: usize,
}

/// A live beam: its output so far and cumulative log-probability.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Live {
    pub tokens: Vec<u32>,
    pub cum: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Hypothesis {
    pub tokens: Vec<u32>,
    pub cum: f64,
    pub score: f64,
    pub finish: Finish,
}

/// The beams to continue with: (index of the parent live beam, token, new cumulative logprob).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StepOutcome {
    pub next: Vec<(usize, u32, f64)>,
    pub done: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct BeamSearch {
    cfg: BeamConfig,
    finished: Vec<Hypothesis>,
}

impl BeamSearch {
    pub fn new(cfg: BeamConfig) -> Self {
        Self {
            cfg,
            finished: Vec::new(),
        }
    }

    fn score(&self, cum: f64, output_len: usize, ends_with_eos: bool) -> f64 {
        let len = self.cfg.prompt_len + output_len - ends_with_eos as usize;
        cum / (len.max(1) as f64).powf(self.cfg.length_penalty as f64)
    }

    /// One step. `logprobs[i]` is beam `i`'s log-softmax row; `check(token, output_len)` is the
    /// request's token-level stop rule (EOS, stop ids, min/max tokens).
    pub fn step(
        &mut self,
        beams: &[Live],
        logprobs: &[Vec<f32>],
        check: impl Fn(u32, usize) -> Option<Finish>,
    ) -> StepOutcome {
        let width = self.cfg.width;
        let mut cands: Vec<(usize, u32, f64)> = Vec::new();
        for (b, row) in logprobs.iter().enumerate() {
            for (tok, lp) in top_n(row, 2 * width) {
                cands.push((b, tok, beams[b].cum + lp as f64));
            }
        }
        cands.sort_by(|x, y| y.2.total_cmp(&x.2).then((x.0, x.1).cmp(&(y.0, y.1))));
        let mut next = Vec::new();
        for (rank, &(b, tok, cum)) in cands.iter().enumerate() {
            if next.len() == width {
                break;
            }
            let mut tokens = beams[b].tokens.clone();
            tokens.push(tok);
            match check(tok, tokens.len()) {
                Some(finish) if finish.reason == FinishReason::Length => {
                    let score = self.score(cum, tokens.len(), false);
                    self.finished.push(Hypothesis {
                        tokens,
                        cum,
                        score,
                        finish,
                    });
                    // Every beam is as long: it still takes a slot so at most `width` end this way.
                    next.push((b, tok, f64::NAN));
                }
                Some(finish) => {
                    // A stop among candidates that would not have made the beam does not count.
                    if rank < width {
                        let eos = finish.stop_reason.is_none();
                        let score = self.score(cum, tokens.len(), eos);
                        self.finished.push(Hypothesis {
                            tokens,
                            cum,
                            score,
                            finish,
                        });
                    }
                }
                None => next.push((b, tok, cum)),
            }
        }
        next.retain(|c| !c.2.is_nan());
        let done = next.is_empty() || self.can_stop(&next, beams);
        StepOutcome { next, done }
    }

    fn sorted_finished(&mut self) {
        self.finished.sort_by(|a, b| b.score.total_cmp(&a.score));
    }

    fn can_stop(&mut self, next: &[(usize, u32, f64)], beams: &[Live]) -> bool {
        if self.finished.len() < self.cfg.width {
            return false;
        }
        if self.cfg.early_stopping == EarlyStopping::True {
            return true;
        }
        self.sorted_finished();
        let worst_kept = self.finished[self.cfg.width - 1].score;
        let (b, _, cum) = next[0];
        let len_now = beams[b].tokens.len() + 1;
        let len = match self.cfg.early_stopping {
            EarlyStopping::Never if self.cfg.length_penalty > 0.0 => self.cfg.max_tokens,
            _ => len_now,
        };
        worst_kept >= self.score(cum, len, false)
    }

    /// The `n` best hypotheses; live beams compete too (the search ended before they finished).
    pub fn best(mut self, n: usize, live: &[Live]) -> Vec<Hypothesis> {
        for l in live {
            let score = self.score(l.cum, l.tokens.len(), false);
            self.finished.push(Hypothesis {
                tokens: l.tokens.clone(),
                cum: l.cum,
                score,
                finish: Finish {
                    reason: FinishReason::Length,
                    stop_reason: None,
                },
            });
        }
        self.sorted_finished();
        self.finished.truncate(n);
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: u32 = 0;

    fn check(max: usize) -> impl Fn(u32, usize) -> Option<Finish> {
        move |tok, len| {
            if tok == EOS {
                Some(Finish {
                    reason: FinishReason::Stop,
                    stop_reason: None,
                })
            } else {
                (len >= max).then_some(Finish {
                    reason: FinishReason::Length,
                    stop_reason: None,
                })
            }
        }
    }

    fn row(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    fn cfg(width: usize, max_tokens: usize, early: EarlyStopping) -> BeamConfig {
        BeamConfig {
            width,
            length_penalty: 1.0,
            early_stopping: early,
            prompt_len: 1,
            max_tokens,
        }
    }

    #[test]
    fn keeps_the_best_width_candidates_across_beams() {
        let mut s = BeamSearch::new(cfg(2, 10, EarlyStopping::False));
        let beams = vec![
            Live {
                tokens: vec![1],
                cum: -0.1,
            },
            Live {
                tokens: vec![2],
                cum: -3.0,
            },
        ];
        let out = s.step(
            &beams,
            &[row(&[0.01, 0.6, 0.39]), row(&[0.01, 0.98, 0.01])],
            check(10),
        );
        assert!(!out.done);
        let picked: Vec<(usize, u32)> = out.next.iter().map(|c| (c.0, c.1)).collect();
        assert_eq!(picked, vec![(0, 1), (0, 2)], "both from the stronger beam");
    }

    #[test]
    fn greedy_path_is_not_always_the_best_beam() {
        // Token 1 is locally best but leads to a flat distribution; token 2 leads to a sure thing.
        let mut s = BeamSearch::new(cfg(2, 2, EarlyStopping::False));
        let start = vec![Live {
            tokens: vec![],
            cum: 0.0,
        }];
        let out = s.step(&start, &[row(&[0.0001, 0.5, 0.4999])], check(2));
        let beams: Vec<Live> = out
            .next
            .iter()
            .map(|&(_, t, cum)| Live {
                tokens: vec![t],
                cum,
            })
            .collect();
        let out = s.step(
            &beams,
            &[
                row(&[0.0001, 0.3333, 0.6666]),
                row(&[0.0001, 0.0001, 0.9998]),
            ],
            check(2),
        );
        assert!(out.done, "length limit reached");
        let best = s.best(1, &[]);
        assert_eq!(best[0].tokens, vec![2, 2]);
        assert_eq!(best[0].finish.reason, FinishReason::Length);
    }

    #[test]
    fn eos_hypotheses_finish_and_early_stopping_ends_the_search() {
        let mut s = BeamSearch::new(cfg(1, 10, EarlyStopping::True));
        let start = vec![Live {
            tokens: vec![5],
            cum: 0.0,
        }];
        let out = s.step(&start, &[row(&[0.9, 0.05, 0.05])], check(10));
        assert!(out.done);
        let best = s.best(1, &[]);
        assert_eq!(best[0].tokens, vec![5, EOS]);
        assert_eq!(best[0].finish.reason, FinishReason::Stop);
    }
}
