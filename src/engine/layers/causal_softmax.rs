//! The attention weights of one sequence on CPU, in place over its float32 scores: scale, soft cap,
//! the causal (and sliding-window) mask computed from positions instead of read from a mask tensor,
//! and the softmax, in one pass over each row with the vector exponential (`simd::softmax`).

use candle_core::{bail, CpuStorage, InplaceOp1, Layout, Result};
use rayon::prelude::*;

use super::simd;

/// Scores `[.., rows, l]` of `n` new tokens after `ctx` cached ones (`l = ctx + n`): row `r` is query
/// `i = r % n` at position `ctx + i`, which sees keys `j <= ctx + i` (and, with a window `w`,
/// `j > ctx + i - w`); every other entry becomes 0.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CausalSoftmax {
    pub ctx: usize,
    pub n: usize,
    pub window: Option<usize>,
    pub scale: f32,
    pub softcap: Option<f32>,
}

impl CausalSoftmax {
    /// The keys query `i` sees.
    fn visible(&self, i: usize) -> std::ops::Range<usize> {
        let last = self.ctx + i;
        let lo = self.window.map_or(0, |w| (last + 1).saturating_sub(w));
        lo..last + 1
    }

    fn row(&self, i: usize, row: &mut [f32]) {
        let seen = self.visible(i);
        row[..seen.start].fill(0.0);
        row[seen.end..].fill(0.0);
        let row = &mut row[seen];
        for x in row.iter_mut() {
            *x *= self.scale;
            if let Some(cap) = self.softcap {
                *x = (*x / cap).tanh() * cap;
            }
        }
        simd::softmax(row);
    }
}

impl InplaceOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let l = layout.dims().last().copied().unwrap_or(0);
        let Some((a, b)) = layout.contiguous_offsets() else {
            bail!("causal softmax: scores are not contiguous")
        };
        if l != self.ctx + self.n || self.n == 0 {
            bail!(
                "causal softmax: rows of {l} for {} cached + {} new tokens",
                self.ctx,
                self.n
            )
        }
        let CpuStorage::F32(data) = storage else {
            bail!("causal softmax: scores are not float32")
        };
        data[a..b]
            .par_chunks_mut(l)
            .enumerate()
            .for_each(|(r, row)| self.row(r % self.n, row));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn it_is_the_masked_softmax_of_the_scaled_scores() -> Result<()> {
        let dev = Device::Cpu;
        for (ctx, n, window, softcap) in [
            (0, 5, None, None),
            (3, 4, None, Some(2.0)),
            (6, 3, Some(4), None),
        ] {
            let l = ctx + n;
            let scores = Tensor::randn(0f32, 3.0, (2, 2 * n, l), &dev)?;
            let op = CausalSoftmax {
                ctx,
                n,
                window,
                scale: 0.5,
                softcap,
            };
            let want = {
                let mut s = (&scores * 0.5)?;
                if let Some(cap) = softcap {
                    s = ((s / cap as f64)?.tanh()? * cap as f64)?;
                }
                let mut mask = vec![0f32; n * l];
                for i in 0..n {
                    for j in 0..l {
                        if !op.visible(i).contains(&j) {
                            mask[i * l + j] = f32::NEG_INFINITY;
                        }
                    }
                }
                let mask = Tensor::from_vec(mask, (1, n, l), &dev)?;
                let s = s.reshape((4, n, l))?.broadcast_add(&mask)?;
                candle_nn::ops::softmax_last_dim(&s)?.reshape((2, 2 * n, l))?
            };
            let got = scores.copy()?;
            got.inplace_op1(&op)?;
            let err = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(err < 1e-6, "ctx {ctx} n {n} window {window:?}: {err}");
        }
        Ok(())
    }
}
