//! Choosing the next token of one sequence from its logits row (on the CPU), and the log-probability
//! helpers the engine shares (prompt logprobs, beam search).
//!
//! Logits processors run in vLLM's order: `logit_bias`, `min_tokens` (EOS and stop ids masked),
//! repetition penalty (prompt and output tokens), frequency and presence penalties (output tokens),
//! then temperature (0 = greedy), top-k, top-p and min-p. Reported logprobs come from the raw model
//! distribution (log-softmax of the logits before any processing), as vLLM reports them by default.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::types::SamplingParams;

pub(crate) mod device;
mod kernels;

/// Temperatures below this are greedy (vLLM's `_SAMPLING_EPS`).
pub(crate) const GREEDY_EPS: f32 = 1e-5;

/// One sampling step's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token_id: u32,
    /// Raw-distribution log-probability of the chosen token; computed when logprobs were asked for or
    /// `best_of > n` needs cumulative logprobs (else `None`, which keeps greedy decoding cheap).
    pub logprob: Option<f32>,
    /// The `logprobs` most likely tokens of the raw distribution, most likely first.
    pub top: Vec<(u32, f32)>,
    /// The chosen token's rank in the raw distribution (1 = most likely), with its logprob (else 0).
    pub rank: usize,
}

/// The per-sequence sampler: its parameters, its random stream and the token counts its penalties need.
/// Clone it to fork a sequence (the clone continues the same random stream).
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    presence_penalty: f32,
    frequency_penalty: f32,
    repetition_penalty: f32,
    logit_bias: Vec<(u32, f32)>,
    min_tokens: usize,
    suppress_until_min: Vec<u32>,
    num_logprobs: Option<usize>,
    want_logprob: bool,
    rng: StdRng,
    /// Prompt and output tokens (repetition penalty); empty when that penalty is off.
    seen: HashSet<u32>,
    output_counts: HashMap<u32, u32>,
    num_output: usize,
    scratch: Vec<f32>,
}

impl Sampler {
    /// `min_tokens_suppressed`: ids masked while fewer than `min_tokens` tokens exist (see
    /// `StopConditions::min_tokens_suppressed`). `choice_index` separates the random streams of the
    /// `n`/`best_of` siblings of one request: with a `seed`, each sibling gets its own derived seed, so
    /// they differ from each other yet repeat across identical requests.
    pub fn new(
        params: &SamplingParams,
        prompt_ids: &[u32],
        min_tokens_suppressed: &[u32],
        choice_index: usize,
    ) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(choice_seed(seed, choice_index)),
            None => StdRng::from_os_rng(),
        };
        let penalise_repeats = params.repetition_penalty != 1.0;
        let mut logit_bias: Vec<(u32, f32)> =
            params.logit_bias.iter().map(|(k, v)| (*k, *v)).collect();
        logit_bias.sort_unstable_by_key(|(id, _)| *id);
        Self {
            temperature: params.temperature,
            top_k: usize::try_from(params.top_k).unwrap_or(0),
            top_p: params.top_p,
            min_p: params.min_p,
            presence_penalty: params.presence_penalty,
            frequency_penalty: params.frequency_penalty,
            repetition_penalty: params.repetition_penalty,
            logit_bias,
            min_tokens: params.min_tokens,
            suppress_until_min: min_tokens_suppressed.to_vec(),
            num_logprobs: params.logprobs,
            want_logprob: params.logprobs.is_some() || params.best_of.is_some_and(|b| b > params.n),
            rng,
            seen: if penalise_repeats {
                prompt_ids.iter().copied().collect()
            } else {
                HashSet::new()
            },
            output_counts: HashMap::new(),
            num_output: 0,
            scratch: Vec::new(),
        }
    }

    pub(crate) fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_EPS || self.top_k == 1
    }

    /// Picks the next token from one logits row and records it as generated.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let token_id = self.choose(logits);
        let (logprob, top) = self.raw_logprobs(logits, token_id);
        let rank = if logprob.is_some() {
            rank_of(logits, token_id)
        } else {
            0
        };
        self.record(token_id);
        Sampled {
            token_id,
            logprob,
            top,
            rank,
        }
    }

    /// The token `sample` would pick from a row already masked by a constraint (disallowed tokens
    /// at -inf), not yet recorded (`take` records it, with the raw distribution's logprobs).
    pub(crate) fn choose_masked(&mut self, masked: &[f32]) -> u32 {
        self.choose(masked)
    }

    /// The token `sample_draft` would pick against `draft` from a row already masked by a
    /// constraint, not yet recorded (`take` records it).
    pub(crate) fn choose_masked_against(&mut self, masked: &[f32], draft: u32) -> u32 {
        self.pick(masked, Some(draft))
    }

    /// Records `token_id` as chosen, with its raw-distribution (`logits`) logprobs.
    pub(crate) fn take(&mut self, logits: &[f32], token_id: u32) -> Sampled {
        let (logprob, top) = self.raw_logprobs(logits, token_id);
        let rank = if logprob.is_some() {
            rank_of(logits, token_id)
        } else {
            0
        };
        self.record(token_id);
        Sampled {
            token_id,
            logprob,
            top,
            rank,
        }
    }

    /// Verifies a guessed next token (speculative decoding) against one logits row and records the
    /// token chosen. A guess is a point mass, so rejection sampling accepts it with the probability
    /// `p(draft)` the processed distribution gives it, and otherwise draws from that distribution
    /// without it: the chosen token follows exactly the distribution `sample` draws from. Greedy
    /// sampling picks the argmax, whatever the guess.
    pub(crate) fn sample_draft(&mut self, logits: &[f32], draft: u32) -> Sampled {
        let token_id = self.choose_against(logits, draft);
        let (logprob, top) = self.raw_logprobs(logits, token_id);
        let rank = if logprob.is_some() {
            rank_of(logits, token_id)
        } else {
            0
        };
        self.record(token_id);
        Sampled {
            token_id,
            logprob,
            top,
            rank,
        }
    }

    fn choose_against(&mut self, logits: &[f32], draft: u32) -> u32 {
        self.pick(logits, Some(draft))
    }

    fn choose(&mut self, logits: &[f32]) -> u32 {
        self.pick(logits, None)
    }

    /// The processed distribution's argmax (greedy), else a draw from it, or (with a `draft`) the
    /// draft verified against it.
    fn pick(&mut self, logits: &[f32], draft: Option<u32>) -> u32 {
        if !self.has_processors() && self.is_greedy() {
            return argmax(logits);
        }
        let mut work = std::mem::take(&mut self.scratch);
        work.clear();
        work.extend_from_slice(logits);
        self.apply_processors(&mut work);
        let token = if self.is_greedy() || work.iter().all(|v| *v == f32::NEG_INFINITY) {
            argmax(&work)
        } else {
            let (candidates, total) = self.filter(&mut work);
            match draft {
                None => {
                    let u: f64 = self.rng.random();
                    match candidates {
                        Some(c) => draw(c.iter().copied(), total, u),
                        None => kernels::position_of_mass(&work, u * total).unwrap_or(0) as u32,
                    }
                }
                Some(d) => self.verify(&work, candidates.as_deref(), total, d),
            }
        };
        self.scratch = work;
        token
    }

    /// Rejection sampling against a point-mass guess: `draft` with probability `p(draft)`, else a
    /// draw from the distribution without it. `candidates` (else the whole row of `weights`) sum to
    /// `total`.
    fn verify(
        &mut self,
        weights: &[f32],
        candidates: Option<&[(u32, f32)]>,
        total: f64,
        draft: u32,
    ) -> u32 {
        let w_draft = match candidates {
            Some(c) => c.iter().find(|(t, _)| *t == draft).map_or(0.0, |(_, w)| *w),
            None => weights.get(draft as usize).copied().unwrap_or(0.0),
        } as f64;
        let u: f64 = self.rng.random();
        if u * total < w_draft {
            return draft;
        }
        let rest = (total - w_draft).max(0.0);
        let u: f64 = self.rng.random();
        let without = |(t, w): (u32, f32)| (t, if t == draft { 0.0 } else { w });
        match candidates {
            Some(c) => draw(c.iter().copied().map(without), rest, u),
            None => draw(enumerate(weights).map(without), rest, u),
        }
    }

    fn has_processors(&self) -> bool {
        !self.logit_bias.is_empty()
            || self.num_output < self.min_tokens
            || self.repetition_penalty != 1.0
            || (!self.output_counts.is_empty()
                && (self.presence_penalty != 0.0 || self.frequency_penalty != 0.0))
    }

    fn apply_processors(&self, logits: &mut [f32]) {
        for (id, bias) in &self.logit_bias {
            if let Some(l) = logits.get_mut(*id as usize) {
                *l += bias;
            }
        }
        if self.num_output < self.min_tokens {
            for id in &self.suppress_until_min {
                if let Some(l) = logits.get_mut(*id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        if self.repetition_penalty != 1.0 {
            let p = self.repetition_penalty;
            for id in &self.seen {
                if let Some(l) = logits.get_mut(*id as usize) {
                    *l = if *l > 0.0 { *l / p } else { *l * p };
                }
            }
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            for (id, count) in &self.output_counts {
                if let Some(l) = logits.get_mut(*id as usize) {
                    *l -= self.frequency_penalty * *count as f32 + self.presence_penalty;
                }
            }
        }
    }

    /// The distribution to draw from, after temperature, top-k, top-p and min-p: the listed candidates
    /// with their weights, or (`None`) the whole row of weights; and the weights' sum. The row is turned
    /// into unnormalised probabilities once (`exp((l - max) / T)`, so the best token weighs 1); every
    /// filter works on those weights, whose order is the logits' order.
    fn filter(&self, row: &mut [f32]) -> (Option<Vec<(u32, f32)>>, f64) {
        let total = to_weights(row, 1.0 / self.temperature);
        let vocab = row.len();
        let k = if self.top_k == 0 {
            vocab
        } else {
            self.top_k.min(vocab)
        };
        let mut candidates: Option<Vec<(u32, f32)>> = (k < vocab).then(|| top_n(row, k));
        if self.top_p < 1.0 {
            candidates = Some(match candidates {
                Some(c) => {
                    let total = c.iter().map(|(_, w)| *w as f64).sum();
                    nucleus_prefix(c, total, self.top_p)
                }
                None => nucleus(row, total, self.top_p),
            });
        }
        if self.min_p > 0.0 {
            // Weights are relative to the best token already: min_p is the floor itself.
            let floor = self.min_p;
            candidates = Some(match candidates {
                Some(c) => c.into_iter().filter(|(_, w)| *w >= floor).collect(),
                None => enumerate(row).filter(|(_, w)| *w >= floor).collect(),
            });
        }
        match candidates {
            Some(c) => {
                let total = c.iter().map(|(_, w)| *w as f64).sum();
                (Some(c), total)
            }
            None => (None, total),
        }
    }

    fn raw_logprobs(&self, logits: &[f32], token: u32) -> (Option<f32>, Vec<(u32, f32)>) {
        if !self.want_logprob {
            return (None, Vec::new());
        }
        let lse = logsumexp(logits);
        let chosen = logits.get(token as usize).map(|l| l - lse);
        let top = match self.num_logprobs {
            Some(n) if n > 0 => top_n(logits, n)
                .into_iter()
                .map(|(id, l)| (id, l - lse))
                .collect(),
            _ => Vec::new(),
        };
        (chosen, top)
    }

    fn record(&mut self, token: u32) {
        self.num_output += 1;
        *self.output_counts.entry(token).or_insert(0) += 1;
        if self.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
    }
}

/// The seed of sibling `index`: the request's seed itself for the first, decorrelated ones after.
pub(crate) fn choice_seed(seed: u64, index: usize) -> u64 {
    if index == 0 {
        seed
    } else {
        splitmix64(seed ^ splitmix64(index as u64))
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn enumerate(values: &[f32]) -> impl Iterator<Item = (u32, f32)> + Clone + '_ {
    values.iter().enumerate().map(|(i, v)| (i as u32, *v))
}

/// Index of the largest value (the first on a tie; NaN never wins; 0 for a row of `-inf`).
pub fn argmax(values: &[f32]) -> u32 {
    let max = kernels::max(values);
    kernels::position_of_max(values, max).unwrap_or(0) as u32
}

fn max_value(values: &[f32]) -> f32 {
    kernels::max(values)
}

/// `log(sum(exp(values)))`, stable for large values.
/// The rank of `token` among `values` (1 = the largest): one more than the values above it, as vLLM
/// ranks logprob tokens, inside the top-k or not.
pub(crate) fn rank_of(values: &[f32], token: u32) -> usize {
    let Some(&v) = values.get(token as usize) else {
        return 0;
    };
    1 + values.iter().filter(|&&x| x > v).count()
}

pub(crate) fn logsumexp(values: &[f32]) -> f32 {
    let max = max_value(values);
    if max == f32::NEG_INFINITY {
        return max;
    }
    max + kernels::sum_exp(values, max).ln() as f32
}

/// Log-probabilities of a logits row.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let lse = logsumexp(logits);
    logits.iter().map(|l| l - lse).collect()
}

/// The `n` largest values with their indices, largest first (ties: lower id first). Small `n` keeps
/// a bounded heap (one comparison for most entries); large `n` selects, then sorts only the `n`.
pub fn top_n(values: &[f32], n: usize) -> Vec<(u32, f32)> {
    let n = n.min(values.len());
    if n == 0 {
        return Vec::new();
    }
    let mut top = if n <= SMALL_TOP_N {
        top_n_heap(values, n)
    } else {
        let mut all: Vec<(u32, f32)> = enumerate(values).collect();
        if n < all.len() {
            all.select_nth_unstable_by(n - 1, descending);
            all.truncate(n);
        }
        all
    };
    top.sort_unstable_by(descending);
    top
}

const SMALL_TOP_N: usize = 256;

fn descending(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Heap entry ordered so that the heap's top is the weakest kept candidate.
struct Weakest(u32, f32);

impl PartialEq for Weakest {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for Weakest {}
impl PartialOrd for Weakest {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Weakest {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        descending(&(self.0, self.1), &(other.0, other.1))
    }
}

fn top_n_heap(values: &[f32], n: usize) -> Vec<(u32, f32)> {
    const BLOCK: usize = 64;
    let mut heap = std::collections::BinaryHeap::with_capacity(n + 1);
    for (i, v) in enumerate(&values[..n]) {
        heap.push(Weakest(i, v));
    }
    // The weakest kept value: later entries must beat it strictly (a tie keeps the lower id). Whole
    // blocks below it are skipped with the vectorised max, which is most of a vocabulary.
    let mut floor = heap.peek().map_or(f32::NEG_INFINITY, |w: &Weakest| w.1);
    for (b, block) in values[n..].chunks(BLOCK).enumerate() {
        if kernels::max(block) <= floor {
            continue;
        }
        for (j, v) in block.iter().enumerate() {
            if *v > floor {
                heap.pop();
                heap.push(Weakest((n + b * BLOCK + j) as u32, *v));
                floor = heap.peek().map_or(f32::NEG_INFINITY, |w| w.1);
            }
        }
    }
    heap.into_iter().map(|Weakest(i, v)| (i, v)).collect()
}

/// Replaces logits by `exp((l - max) * inv_t)` in place; returns their sum.
fn to_weights(row: &mut [f32], inv_t: f32) -> f64 {
    let max = max_value(row);
    kernels::exp_in_place(row, max, inv_t)
}

/// The smallest set of heaviest tokens whose weight reaches `top_p` of `total` (at least one token),
/// in no particular order. Sorting the vocabulary is what makes top-p slow, so the weights are first
/// binned by their float bits (monotonic for non-negative floats; 8 bins per octave): the bins above
/// the one where the mass crosses `top_p` are kept whole, and only that one bin is sorted.
fn nucleus(weights: &[f32], total: f64, top_p: f32) -> Vec<(u32, f32)> {
    const BINS: usize = 1 << 11;
    let bin = |w: f32| (w.to_bits() >> 20) as usize & (BINS - 1);
    let mut mass = vec![0f64; BINS];
    for w in weights {
        mass[bin(*w)] += *w as f64;
    }
    let target = top_p as f64 * total;
    let mut above = 0.0;
    let mut cut = None;
    for b in (0..BINS).rev() {
        if above + mass[b] >= target {
            cut = Some(b);
            break;
        }
        above += mass[b];
    }
    // Rounding kept the bins' sum below the target: everything is in the nucleus.
    let Some(cut) = cut else {
        return enumerate(weights).filter(|(_, w)| *w > 0.0).collect();
    };
    let mut kept = Vec::new();
    let mut edge = Vec::new();
    for (i, w) in enumerate(weights) {
        match bin(w).cmp(&cut) {
            std::cmp::Ordering::Greater => kept.push((i, w)),
            std::cmp::Ordering::Equal => edge.push((i, w)),
            std::cmp::Ordering::Less => {}
        }
    }
    edge.sort_unstable_by(descending);
    let need = cut_at_mass(&edge, target - above).unwrap_or(edge.len());
    kept.extend_from_slice(&edge[..need.max(1)]);
    kept
}

/// `nucleus` over already sorted candidates (top-k's), renormalised to their own `total`.
fn nucleus_prefix(sorted: Vec<(u32, f32)>, total: f64, top_p: f32) -> Vec<(u32, f32)> {
    let len = cut_at_mass(&sorted, top_p as f64 * total).unwrap_or(sorted.len());
    truncated(sorted, len)
}

fn truncated(mut v: Vec<(u32, f32)>, len: usize) -> Vec<(u32, f32)> {
    v.truncate(len.max(1));
    v
}

/// How many of the `sorted` weights it takes to reach `target`, if they do.
fn cut_at_mass(sorted: &[(u32, f32)], target: f64) -> Option<usize> {
    let mut cum = 0.0f64;
    for (i, (_, w)) in sorted.iter().enumerate() {
        cum += *w as f64;
        if cum >= target {
            return Some(i + 1);
        }
    }
    None
}

/// Draws from `candidates` in proportion to their weights (`total` their sum), `u` uniform in [0, 1).
fn draw(candidates: impl Iterator<Item = (u32, f32)>, total: f64, u: f64) -> u32 {
    let mut threshold = u * total;
    let mut last = None;
    for (id, w) in candidates {
        if w > 0.0 {
            last = Some(id);
            if threshold < w as f64 {
                return id;
            }
            threshold -= w as f64;
        }
    }
    // Rounding left a sliver past the last token.
    last.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            seed: Some(7),
            ..Default::default()
        };
        f(&mut p);
        p
    }

    fn counts(p: &SamplingParams, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut s = Sampler::new(p, &[], &[], 0);
        let mut c = vec![0; logits.len()];
        for _ in 0..draws {
            // A fresh row each time, penalties off: the distribution stays the same.
            c[s.choose(logits) as usize] += 1;
        }
        c
    }

    const LOGITS: [f32; 5] = [1.0, 3.0, 2.5, 0.5, -1.0];

    #[test]
    fn greedy_picks_argmax() {
        let p = params(|p| p.temperature = 0.0);
        let mut s = Sampler::new(&p, &[], &[], 0);
        assert_eq!(s.sample(&LOGITS).token_id, 1);
        assert_eq!(s.sample(&LOGITS).logprob, None);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let p = params(|p| p.top_k = 1);
        assert_eq!(counts(&p, &LOGITS, 200)[1], 200);
    }

    #[test]
    fn top_k_limits_candidates() {
        let c = counts(&params(|p| p.top_k = 2), &LOGITS, 2000);
        assert_eq!(c[0] + c[3] + c[4], 0);
        assert!(c[1] > c[2] && c[2] > 0);
    }

    #[test]
    fn top_p_prunes_the_tail() {
        // Probabilities ~ [0.07, 0.54, 0.33, 0.05, 0.01]: 0.8 needs the top two tokens, 0.5 one.
        let c = counts(&params(|p| p.top_p = 0.8), &LOGITS, 2000);
        assert_eq!(c[0] + c[3] + c[4], 0);
        assert!(c[1] > 0 && c[2] > 0);
        let c = counts(&params(|p| p.top_p = 0.5), &LOGITS, 500);
        assert_eq!(c[1], 500);
    }

    #[test]
    fn min_p_prunes_relative_to_the_best() {
        // p/p_max: [0.14, 1, 0.61, 0.08, 0.02]; min_p 0.1 drops tokens 3 and 4.
        let c = counts(&params(|p| p.min_p = 0.1), &LOGITS, 3000);
        assert_eq!(c[3] + c[4], 0);
        assert!(c[0] > 0 && c[1] > 0 && c[2] > 0);
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let cold = counts(&params(|p| p.temperature = 0.1), &LOGITS, 2000);
        let hot = counts(&params(|p| p.temperature = 5.0), &LOGITS, 2000);
        assert!(cold[1] > 1950, "{cold:?}");
        assert!(hot[4] > 100, "{hot:?}");
    }

    #[test]
    fn default_sampling_follows_softmax() {
        let c = counts(&params(|_| {}), &LOGITS, 20000);
        let probs: Vec<f32> = log_softmax(&LOGITS).iter().map(|l| l.exp()).collect();
        for (n, p) in c.iter().zip(&probs) {
            let freq = *n as f32 / 20000.0;
            assert!((freq - p).abs() < 0.02, "{c:?} vs {probs:?}");
        }
    }

    /// Pearson's chi-square of observed counts against expected probabilities (zero-probability
    /// entries must stay at zero counts).
    fn chi_square(counts: &[usize], probs: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        let mut chi = 0.0;
        for (c, p) in counts.iter().zip(probs) {
            if *p == 0.0 {
                assert_eq!(*c, 0, "a token outside the distribution was drawn");
                continue;
            }
            let e = p * n as f64;
            chi += (*c as f64 - e).powi(2) / e;
        }
        chi
    }

    /// The target distribution of `p` over `LOGITS` (temperature, top-k, top-p as the sampler does).
    fn target(p: &SamplingParams) -> Vec<f64> {
        let t = p.temperature as f64;
        let w: Vec<f64> = LOGITS.iter().map(|l| (*l as f64 / t).exp()).collect();
        let mut order: Vec<usize> = (0..w.len()).collect();
        order.sort_by(|a, b| w[*b].total_cmp(&w[*a]));
        let k = if p.top_k > 0 {
            p.top_k as usize
        } else {
            w.len()
        };
        let total: f64 = order[..k].iter().map(|i| w[*i]).sum();
        let mut kept = vec![0.0; w.len()];
        let mut cum = 0.0;
        for &i in &order[..k] {
            kept[i] = w[i];
            cum += w[i];
            if cum >= p.top_p as f64 * total {
                break;
            }
        }
        let sum: f64 = kept.iter().sum();
        kept.iter().map(|x| x / sum).collect()
    }

    #[test]
    fn verifying_a_draft_samples_the_exact_distribution() {
        // Rejection sampling against a guessed token must leave the distribution unchanged, whatever
        // the guess (likely, unlikely, filtered out). Chi-square, 4 degrees of freedom at most:
        // 18.47 is the 0.1% critical value.
        const DRAWS: usize = 40_000;
        for (name, p) in [
            ("plain", params(|_| {})),
            ("temperature", params(|p| p.temperature = 0.7)),
            ("top-k", params(|p| p.top_k = 3)),
            ("top-p", params(|p| p.top_p = 0.8)),
        ] {
            let want = target(&p);
            for draft in [1u32, 3, 4] {
                let mut s = Sampler::new(&p, &[], &[], 0);
                let mut c = vec![0; LOGITS.len()];
                for _ in 0..DRAWS {
                    c[s.choose_against(&LOGITS, draft) as usize] += 1;
                }
                let chi = chi_square(&c, &want);
                assert!(
                    chi < 18.47,
                    "{name}, draft {draft}: chi2 {chi}, {c:?} vs {want:?}"
                );
            }
            // and the plain sampler passes the same test (the check itself is sound)
            let plain = counts(&p, &LOGITS, DRAWS);
            assert!(chi_square(&plain, &want) < 18.47, "{name}: plain sampling");
        }
        // a biased check must fail: the draft always accepted is not the distribution
        let p = params(|_| {});
        let mut skewed = counts(&p, &LOGITS, DRAWS);
        skewed[3] += DRAWS / 10;
        assert!(chi_square(&skewed, &target(&p)) > 18.47);
    }

    #[test]
    fn greedy_verification_is_the_argmax() {
        let p = params(|p| p.temperature = 0.0);
        let mut s = Sampler::new(&p, &[], &[], 0);
        assert_eq!(s.sample_draft(&LOGITS, 1).token_id, 1);
        assert_eq!(s.sample_draft(&LOGITS, 2).token_id, 1);
        // with a processor (logit bias) the argmax of the processed row
        let p = params(|p| {
            p.temperature = 0.0;
            p.logit_bias = [(4u32, 10.0f32)].into_iter().collect();
        });
        let mut s = Sampler::new(&p, &[], &[], 0);
        assert_eq!(s.sample_draft(&LOGITS, 1).token_id, 4);
    }

    #[test]
    fn logit_bias_forces_a_token() {
        let p = params(|p| {
            p.temperature = 0.0;
            p.logit_bias.insert(4, 100.0);
        });
        let mut s = Sampler::new(&p, &[], &[], 0);
        let out = s.sample(&LOGITS);
        assert_eq!(out.token_id, 4);
        let p = params(|p| {
            p.logit_bias.insert(1, -100.0);
            p.logit_bias.insert(2, -100.0);
            p.temperature = 0.0;
        });
        assert_eq!(Sampler::new(&p, &[], &[], 0).sample(&LOGITS).token_id, 0);
    }

    #[test]
    fn min_tokens_masks_eos_until_reached() {
        let p = params(|p| {
            p.temperature = 0.0;
            p.min_tokens = 2;
        });
        let mut s = Sampler::new(&p, &[], &[1], 0);
        assert_eq!(s.sample(&LOGITS).token_id, 2);
        assert_eq!(s.sample(&LOGITS).token_id, 2);
        assert_eq!(s.sample(&LOGITS).token_id, 1);
    }

    #[test]
    fn repetition_penalty_covers_prompt_and_output() {
        let p = params(|p| {
            p.temperature = 0.0;
            p.repetition_penalty = 2.0;
        });
        // Token 1 in the prompt: 3.0 / 2 = 1.5 < 2.5.
        let mut s = Sampler::new(&p, &[1], &[], 0);
        assert_eq!(s.sample(&LOGITS).token_id, 2);
        // Then token 2 too (2.5 / 2 = 1.25): token 1 at 1.5 wins again.
        assert_eq!(s.sample(&LOGITS).token_id, 1);
        // Negative logits are multiplied: more negative.
        let neg = [-1.0f32, -1.5];
        let mut s = Sampler::new(&p, &[0], &[], 0);
        assert_eq!(s.sample(&neg).token_id, 1);
    }

    #[test]
    fn frequency_and_presence_penalise_output_only() {
        let freq = params(|p| {
            p.temperature = 0.0;
            p.frequency_penalty = 0.3;
        });
        let mut s = Sampler::new(&freq, &[1, 1, 1], &[], 0);
        let ids: Vec<u32> = (0..4).map(|_| s.sample(&LOGITS).token_id).collect();
        // 3.0 -> 2.7 after one use (still best), 2.4 after two: then 2.5 wins.
        assert_eq!(ids, vec![1, 1, 2, 1]);
        let presence = params(|p| {
            p.temperature = 0.0;
            p.presence_penalty = 1.0;
        });
        let mut s = Sampler::new(&presence, &[], &[], 0);
        let ids: Vec<u32> = (0..3).map(|_| s.sample(&LOGITS).token_id).collect();
        // 3.0 -> 2.0 once used: 2 (2.5) wins, then drops to 1.5 and 1 (2.0) is back.
        assert_eq!(ids, vec![1, 2, 1]);
    }

    #[test]
    fn seed_repeats_and_siblings_differ() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 50.0).collect();
        let p = params(|p| p.seed = Some(1234));
        let run = |index| {
            let mut s = Sampler::new(&p, &[], &[], index);
            (0..32)
                .map(|_| s.sample(&logits).token_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(0), run(0));
        assert_eq!(run(1), run(1));
        assert_ne!(run(0), run(1));
        let other = params(|p| p.seed = Some(1235));
        let mut s = Sampler::new(&other, &[], &[], 0);
        let o: Vec<u32> = (0..32).map(|_| s.sample(&logits).token_id).collect();
        assert_ne!(o, run(0));
    }

    #[test]
    fn logprobs_come_from_the_raw_distribution() {
        let p = params(|p| {
            p.temperature = 0.0;
            p.logprobs = Some(2);
            p.logit_bias.insert(4, 100.0);
        });
        let mut s = Sampler::new(&p, &[], &[], 0);
        let out = s.sample(&LOGITS);
        let raw = log_softmax(&LOGITS);
        assert_eq!(out.token_id, 4);
        assert!((out.logprob.unwrap() - raw[4]).abs() < 1e-6);
        assert_eq!(out.top.len(), 2);
        assert_eq!((out.top[0].0, out.top[1].0), (1, 2));
        assert!((out.top[0].1 - raw[1]).abs() < 1e-6);
    }

    #[test]
    fn helpers() {
        let ls = log_softmax(&LOGITS);
        let total: f32 = ls.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert_eq!(top_n(&LOGITS, 3), vec![(1, 3.0), (2, 2.5), (0, 1.0)]);
        assert_eq!(top_n(&LOGITS, 10).len(), 5);
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0]), 2);
        assert_eq!(logsumexp(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
    }

    #[test]
    fn nucleus_is_the_smallest_top_set_reaching_top_p() {
        // A flat vocabulary: half the mass is half the tokens.
        let weights = vec![1.0f32; 100_000];
        assert_eq!(nucleus(&weights, 100_000.0, 0.5).len(), 50_000);
        // Against a full sort on an irregular row.
        let row: Vec<f32> = (0..50_000u64)
            .map(|i| ((i * 2_654_435_761) % 10_007) as f32 / 10_007.0)
            .map(|x| (12.0 * x * x * x).exp() / 12.0f32.exp())
            .collect();
        let total: f64 = row.iter().map(|w| *w as f64).sum();
        for top_p in [0.01, 0.3, 0.9, 0.999] {
            let mut got: Vec<u32> = nucleus(&row, total, top_p).iter().map(|c| c.0).collect();
            got.sort_unstable();
            let sorted = top_n(&row, row.len());
            let len = cut_at_mass(&sorted, top_p as f64 * total).unwrap();
            let mut want: Vec<u32> = sorted[..len].iter().map(|c| c.0).collect();
            want.sort_unstable();
            assert_eq!(got, want, "top_p {top_p}");
        }
    }

    #[test]
    fn ranks_count_the_better_tokens() {
        let values = [0.5, 3.0, -1.0, 2.0];
        assert_eq!(rank_of(&values, 1), 1);
        assert_eq!(rank_of(&values, 0), 3);
        assert_eq!(rank_of(&values, 2), 4);
        assert_eq!(rank_of(&values, 9), 0);
    }

    #[test]
    fn top_n_paths_agree() {
        let values: Vec<f32> = (0..5000).map(|i| ((i * 7919) % 1000) as f32).collect();
        let small = top_n(&values, 40);
        let large = top_n(&values, 400);
        assert_eq!(&large[..40], &small[..]);
        assert!(large.windows(2).all(|w| w[0].1 >= w[1].1));
        assert_eq!(
            small[0],
            (
                values.iter().position(|v| *v == 999.0).unwrap() as u32,
                999.0
            )
        );
    }
}
