//! Sampling where the logits are: greedy picks, plain-temperature draws and the logprobs users asked
//! for, computed with tensor ops on the logits' own device, so a GPU step copies back a few numbers per
//! row (the token, its logprob and rank, the top `n`) instead of whole vocabulary rows.
//!
//! A row qualifies when its sampler has no logits processors (bias, penalties, `min_tokens`) and no
//! truncation (top-k, top-p, min-p): then the host's choice is the argmax (greedy) or the first token
//! whose cumulative weight `exp((l - max) / T)` passes `u × total`, in vocabulary order, with `u` the
//! sampler's next uniform draw, and the device computes the same (in f32 sums where the host sums in
//! f64, so a draw that lands within rounding of a boundary may pick the neighbour; the distribution is
//! the same). Every other row takes the host path. The ops are candle's, so the CPU tests run them.

use candle_core::{DType, Device, Result, Tensor, D};
use rand::Rng;

use super::{Sampled, Sampler, GREEDY_EPS};

/// How one row is to be chosen on the device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum RowChoice {
    /// The argmax.
    Greedy,
    /// The inverse-CDF draw at `u` ∈ [0, 1) of `exp((l − max) × inv_temperature)`.
    Draw { inv_temperature: f32, u: f64 },
}

/// One row's request to the device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RowPlan {
    pub choice: RowChoice,
    /// The chosen token's raw logprob and rank.
    pub logprob: bool,
    /// How many of the most likely tokens to report (0: none).
    pub top: usize,
}

impl Sampler {
    /// The device plan for this sampler's next token, drawing its uniform from the sampler's random
    /// stream as `sample` would; `None` when the row needs the host path (processors or truncation).
    pub(crate) fn device_plan(&mut self) -> Option<RowPlan> {
        if self.has_processors() {
            return None;
        }
        let greedy = self.temperature < GREEDY_EPS || self.top_k == 1;
        let truncated =
            (self.top_k != 0 && self.top_k != 1) || self.top_p < 1.0 || self.min_p > 0.0;
        if !greedy && truncated {
            return None;
        }
        let choice = if greedy {
            RowChoice::Greedy
        } else {
            RowChoice::Draw {
                inv_temperature: 1.0 / self.temperature,
                u: self.rng.random(),
            }
        };
        Some(RowPlan {
            choice,
            logprob: self.want_logprob,
            top: if self.want_logprob {
                self.num_logprobs.unwrap_or(0)
            } else {
                0
            },
        })
    }

    /// Records a token the device chose for this sampler (as `sample` records its own).
    pub(crate) fn accept_device(&mut self, sampled: &Sampled) {
        self.record(sampled.token_id);
    }
}

/// Chooses one token per row of `logits` (`[rows, vocab]`, any float dtype, on any device) as
/// `plans` say, and computes the logprobs they ask for. Only `rows × (3 + 2·top)` numbers leave
/// the device.
pub(crate) fn sample_rows(logits: &Tensor, plans: &[RowPlan]) -> Result<Vec<Sampled>> {
    let (rows, vocab) = logits.dims2()?;
    if rows != plans.len() {
        candle_core::bail!("{} plans for {rows} logits rows", plans.len());
    }
    if rows == 0 {
        return Ok(Vec::new());
    }
    let device = logits.device();
    let logits = logits.to_dtype(DType::F32)?;
    let greedy = logits.argmax_keepdim(D::Minus1)?;
    let draws: Vec<(f32, f32)> = plans
        .iter()
        .map(|p| match p.choice {
            RowChoice::Greedy => (1.0, -1.0),
            RowChoice::Draw { inv_temperature, u } => (inv_temperature, u as f32),
        })
        .collect();
    let tokens = if draws.iter().any(|(_, u)| *u >= 0.0) {
        let drawn = draw_rows(&logits, &draws, device)?;
        let is_draw: Vec<u8> = draws.iter().map(|(_, u)| u8::from(*u >= 0.0)).collect();
        Tensor::new(is_draw, device)?
            .reshape((rows, 1))?
            .where_cond(&drawn, &greedy)?
    } else {
        greedy
    };
    let token_ids: Vec<u32> = tokens.flatten_all()?.to_vec1()?;
    let top_n = plans.iter().map(|p| p.top).max().unwrap_or(0).min(vocab);
    let want_logprobs = plans.iter().any(|p| p.logprob || p.top > 0);
    let mut out: Vec<Sampled> = token_ids
        .iter()
        .map(|&token_id| Sampled {
            token_id,
            logprob: None,
            top: Vec::new(),
            rank: 0,
        })
        .collect();
    if !want_logprobs {
        return Ok(out);
    }
    let logprobs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let chosen = logprobs.gather(&tokens, 1)?;
    // Rank: 1 + how many tokens the raw distribution puts strictly above the chosen one.
    let above = logprobs
        .broadcast_gt(&chosen)?
        .to_dtype(DType::F32)?
        .sum_keepdim(D::Minus1)?;
    let chosen: Vec<f32> = chosen.flatten_all()?.to_vec1()?;
    let above: Vec<f32> = above.flatten_all()?.to_vec1()?;
    let (top_ids, top_values) = top_of_rows(&logprobs, top_n)?;
    for (i, (s, plan)) in out.iter_mut().zip(plans).enumerate() {
        if plan.logprob || plan.top > 0 {
            s.logprob = Some(chosen[i]);
            s.rank = above[i] as usize + 1;
        }
        let n = plan.top.min(top_n);
        s.top = (0..n)
            .map(|j| (top_ids[i * top_n + j], top_values[i * top_n + j]))
            .collect();
    }
    Ok(out)
}

/// Inverse-CDF draws, two levels deep so no `vocab × vocab` product is ever built: the weights are cut
/// into chunks, the chunk holding `u × total` is found from the chunks' running sums, then the token
/// inside it from the chunk's own running sums (each running sum a product with a triangular matrix
/// of the chunk count or chunk width, about √vocab). `draws`: per row, `(inv_temperature, u)`; rows
/// with `u < 0` get a value the caller ignores. `[rows, 1]` u32.
fn draw_rows(logits: &Tensor, draws: &[(f32, f32)], device: &Device) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    let width = (vocab as f64).sqrt().ceil() as usize;
    let chunks = vocab.div_ceil(width);
    let inv_t =
        Tensor::new(draws.iter().map(|d| d.0).collect::<Vec<_>>(), device)?.reshape((rows, 1))?;
    let u = Tensor::new(
        draws.iter().map(|d| d.1.max(0.0)).collect::<Vec<_>>(),
        device,
    )?
    .reshape((rows, 1))?;
    let max = logits.max_keepdim(D::Minus1)?;
    let weights = logits.broadcast_sub(&max)?.broadcast_mul(&inv_t)?.exp()?;
    // Pad to whole chunks with zero weight.
    let weights = if chunks * width > vocab {
        let pad = Tensor::zeros((rows, chunks * width - vocab), DType::F32, device)?;
        Tensor::cat(&[&weights, &pad], 1)?
    } else {
        weights
    };
    let weights = weights.reshape((rows, chunks, width))?;
    let chunk_sums = weights.sum(D::Minus1)?; // [rows, chunks]
    let chunk_cum = chunk_sums.matmul(&upper_ones(chunks, device)?)?; // inclusive running sums
    let total = chunk_cum.narrow(1, chunks - 1, 1)?; // [rows, 1]
    let threshold = u.broadcast_mul(&total)?;
    // The chunk: how many chunks end at or below the threshold (clamped to the last).
    let chunk = count_at_most(&chunk_cum, &threshold)?.clamp(0u32, (chunks - 1) as u32)?;
    let before = chunk_cum
        .broadcast_sub(&chunk_sums)? // exclusive running sums
        .gather(&chunk, 1)?; // [rows, 1]
    let inside = weights
        .gather(
            &chunk
                .unsqueeze(2)?
                .broadcast_as((rows, 1, width))?
                .contiguous()?,
            1,
        )?
        .squeeze(1)?; // [rows, width]
    let inside_cum = inside.matmul(&upper_ones(width, device)?)?;
    let rest = threshold.broadcast_sub(&before)?;
    let offset = count_at_most(&inside_cum, &rest)?.clamp(0u32, (width - 1) as u32)?;
    let token = chunk
        .affine(width as f64, 0.0)?
        .add(&offset)?
        .clamp(0u32, (vocab - 1) as u32)?;
    Ok(token)
}

/// `[n, n]` with ones on and above the diagonal: `x · U` is `x`'s inclusive running sum.
fn upper_ones(n: usize, device: &Device) -> Result<Tensor> {
    let i = Tensor::arange(0u32, n as u32, device)?;
    i.reshape((n, 1))?
        .broadcast_le(&i.reshape((1, n))?)?
        .to_dtype(DType::F32)
}

/// Per row, how many running sums are at or below the row's threshold (`[rows, 1]` u32).
fn count_at_most(cum: &Tensor, threshold: &Tensor) -> Result<Tensor> {
    cum.broadcast_le(threshold)?
        .to_dtype(DType::F32)?
        .sum_keepdim(D::Minus1)?
        .to_dtype(DType::U32)
}

/// The `n` largest values of each row with their ids, most likely first (ties to the lower id), by
/// `n` rounds of argmax-and-mask: `n` is small (at most `MAX_LOGPROBS`), the vocabulary is not, and a
/// full sort would be the slow way round. Flat `[rows × n]` ids and values.
fn top_of_rows(values: &Tensor, n: usize) -> Result<(Vec<u32>, Vec<f32>)> {
    let (rows, vocab) = values.dims2()?;
    if n == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let device = values.device();
    let ids = Tensor::arange(0u32, vocab as u32, device)?.reshape((1, vocab))?;
    let masked = Tensor::full(f32::NEG_INFINITY, (rows, vocab), device)?;
    let mut work = values.clone();
    let mut picked_ids = Vec::with_capacity(n);
    let mut picked_values = Vec::with_capacity(n);
    for _ in 0..n {
        let best = work.argmax_keepdim(D::Minus1)?;
        picked_values.push(work.gather(&best, 1)?);
        let hit = ids.broadcast_eq(&best)?;
        work = hit.where_cond(&masked, &work)?;
        picked_ids.push(best);
    }
    let ids: Vec<u32> = Tensor::cat(&picked_ids, 1)?.flatten_all()?.to_vec1()?;
    let values: Vec<f32> = Tensor::cat(&picked_values, 1)?.flatten_all()?.to_vec1()?;
    Ok((ids, values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::types::SamplingParams;

    fn sampler(f: impl FnOnce(&mut SamplingParams)) -> Sampler {
        let mut p = SamplingParams::default();
        f(&mut p);
        Sampler::new(&p, &[], &[], 0)
    }

    /// Rows of made-up logits over an odd vocabulary (not a whole number of chunks).
    fn logits(rows: usize, vocab: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut x = seed;
        (0..rows)
            .map(|_| {
                (0..vocab)
                    .map(|_| {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ((x >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
                    })
                    .collect()
            })
            .collect()
    }

    fn tensor(rows: &[Vec<f32>]) -> Tensor {
        let vocab = rows[0].len();
        Tensor::new(rows.concat(), &Device::Cpu)
            .unwrap()
            .reshape((rows.len(), vocab))
            .unwrap()
    }

    #[test]
    fn greedy_rows_and_their_logprobs_equal_the_host_sampler() {
        let rows = logits(5, 1001, 7);
        let mut hosts: Vec<Sampler> = (0..5)
            .map(|_| {
                sampler(|p| {
                    p.temperature = 0.0;
                    p.logprobs = Some(5);
                })
            })
            .collect();
        let mut devices = hosts.clone();
        let plans: Vec<RowPlan> = devices
            .iter_mut()
            .map(|s| s.device_plan().unwrap())
            .collect();
        assert!(plans
            .iter()
            .all(|p| p.choice == RowChoice::Greedy && p.top == 5));
        let got = sample_rows(&tensor(&rows), &plans).unwrap();
        for ((row, host), got) in rows.iter().zip(&mut hosts).zip(&got) {
            let want = host.sample(row);
            assert_eq!(got.token_id, want.token_id);
            assert_eq!(got.rank, want.rank);
            assert!((got.logprob.unwrap() - want.logprob.unwrap()).abs() < 1e-4);
            assert_eq!(got.top.len(), 5);
            for (g, w) in got.top.iter().zip(&want.top) {
                assert_eq!(g.0, w.0);
                assert!((g.1 - w.1).abs() < 1e-4, "{g:?} {w:?}");
            }
        }
    }

    #[test]
    fn draws_pick_the_host_samplers_token_for_the_same_seed() {
        // 400 draws at two temperatures: the device's f32 running sums and the host's f64 ones
        // agree except where a draw lands within rounding of a boundary.
        let vocab = 997;
        let rows = logits(8, vocab, 11);
        let mut same = 0;
        let mut total = 0;
        for temperature in [0.7f32, 1.3] {
            let mut hosts: Vec<Sampler> = (0..8)
                .map(|i| {
                    sampler(|p| {
                        p.temperature = temperature;
                        p.seed = Some(100 + i);
                    })
                })
                .collect();
            let mut devices = hosts.clone();
            for _ in 0..25 {
                let plans: Vec<RowPlan> = devices
                    .iter_mut()
                    .map(|s| s.device_plan().unwrap())
                    .collect();
                let got = sample_rows(&tensor(&rows), &plans).unwrap();
                for ((row, host), (dev, g)) in rows
                    .iter()
                    .zip(&mut hosts)
                    .zip(devices.iter_mut().zip(&got))
                {
                    let want = host.sample(row);
                    dev.accept_device(g);
                    assert!(g.logprob.is_none() && g.top.is_empty());
                    same += usize::from(g.token_id == want.token_id);
                    total += 1;
                }
            }
        }
        assert!(same * 100 >= total * 99, "{same} of {total}");
    }

    #[test]
    fn draws_follow_the_softmax_distribution() {
        // A small vocabulary, many rows of the same logits: a chi-square test of the counts.
        let row = vec![1.0f32, 0.0, 2.0, -1.0, 0.5, 1.5, -3.0];
        let rows = vec![row.clone(); 4000];
        let mut s = sampler(|p| {
            p.temperature = 1.0;
            p.seed = Some(3);
        });
        let plans: Vec<RowPlan> = (0..rows.len()).map(|_| s.device_plan().unwrap()).collect();
        let got = sample_rows(&tensor(&rows), &plans).unwrap();
        let mut counts = vec![0usize; row.len()];
        for g in &got {
            counts[g.token_id as usize] += 1;
        }
        let z: f64 = row.iter().map(|l| (*l as f64).exp()).sum();
        let chi: f64 = row
            .iter()
            .zip(&counts)
            .map(|(l, c)| {
                let e = (*l as f64).exp() / z * rows.len() as f64;
                (*c as f64 - e).powi(2) / e
            })
            .sum();
        // 6 degrees of freedom: p = 0.001 at 22.46.
        assert!(chi < 22.46, "chi-square {chi}, counts {counts:?}");
    }

    #[test]
    fn rows_with_processors_or_truncation_take_the_host_path() {
        assert!(sampler(|p| p.top_p = 0.9).device_plan().is_none());
        assert!(sampler(|p| p.top_k = 40).device_plan().is_none());
        assert!(sampler(|p| p.min_p = 0.1).device_plan().is_none());
        assert!(sampler(|p| p.repetition_penalty = 1.2)
            .device_plan()
            .is_none());
        assert!(sampler(|p| p.logit_bias = [(3, 5.0)].into_iter().collect())
            .device_plan()
            .is_none());
        // Greedy ignores truncation, as the host does.
        let plan = sampler(|p| {
            p.temperature = 0.0;
            p.top_p = 0.5;
        })
        .device_plan()
        .unwrap();
        assert_eq!(plan.choice, RowChoice::Greedy);
    }

    #[test]
    fn a_mixed_batch_gives_each_row_its_own_choice() {
        let rows = logits(3, 300, 5);
        let mut greedy = sampler(|p| p.temperature = 0.0);
        let mut drawn = sampler(|p| {
            p.temperature = 1.0;
            p.seed = Some(9);
        });
        let mut host_drawn = drawn.clone();
        let plans = vec![
            greedy.device_plan().unwrap(),
            drawn.device_plan().unwrap(),
            greedy.device_plan().unwrap(),
        ];
        let got = sample_rows(&tensor(&rows), &plans).unwrap();
        assert_eq!(got[0].token_id, crate::engine::sampling::argmax(&rows[0]));
        assert_eq!(got[2].token_id, crate::engine::sampling::argmax(&rows[2]));
        assert_eq!(got[1].token_id, host_drawn.sample(&rows[1]).token_id);
        assert!(sample_rows(&tensor(&rows), &plans[..2]).is_err());
    }
}
