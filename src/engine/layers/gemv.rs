//! `x · Wᵀ` for a few rows of `x` on CPU in float32, where the CPU has neither AVX2 nor AVX-512 (there
//! [`super::sgemm`] serves every height): the decode-time matmul. General gemm kernels pack their
//! operands for large products; with one to a few rows that packing costs more than the product, and
//! decode is bound by streaming the weights from memory once. This kernel streams each weight row
//! once, dots it with every row of `x` (held in L1), and splits the weight rows across threads.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Up to this many rows of `x` use the kernel; more go to gemm, which wins once there is reuse.
pub const MAX_ROWS: usize = 16;

/// Weight rows per unit of work handed to a thread.
const TASK_ROWS: usize = 16;

struct SmallMatmul;

/// `x` `[m, k]` times `w` `[n, k]` transposed, `[m, n]`; both f32, contiguous, on CPU, `m <= MAX_ROWS`.
pub fn small_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(w, &SmallMatmul)
}

/// Whether [`small_matmul`] serves this product.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && w.dtype() == candle_core::DType::F32
        && x.rank() == 2
        && x.dim(0).is_ok_and(|m| m <= MAX_ROWS)
        && x.is_contiguous()
        && w.is_contiguous()
}

impl CustomOp2 for SmallMatmul {
    fn name(&self) -> &'static str {
        "small-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let super::sgemm::Operands { x, w, m, n, k } =
            super::sgemm::operands(self.name(), s1, l1, s2, l2)?;
        // the engine's kernel pool, not rayon: the caller works alongside briefly spinning workers
        // and never waits for one that has not started (a decode step runs ~100 of these)
        let y = super::pool::by_weight_rows(m, n, TASK_ROWS, |rows, buf| {
            kernel(x, &w[rows.start * k..rows.end * k], buf, m, k)
        });
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

/// `yt[j*m + i] = dot(w[j], x[i])` for the weight rows in `w`.
fn kernel(x: &[f32], w: &[f32], yt: &mut [f32], m: usize, k: usize) {
    portable(x, w, yt, m, k);
}

fn portable(x: &[f32], w: &[f32], yt: &mut [f32], m: usize, k: usize) {
    for (wr, y) in w.chunks_exact(k).zip(yt.chunks_exact_mut(m)) {
        for (i, yi) in y.iter_mut().enumerate() {
            let xr = &x[i * k..(i + 1) * k];
            // eight partial sums so the compiler can vectorise without reassociating
            let mut acc = [0f32; 8];
            let mut xc = xr.chunks_exact(8);
            let mut wc = wr.chunks_exact(8);
            for (a, b) in (&mut xc).zip(&mut wc) {
                for l in 0..8 {
                    acc[l] += a[l] * b[l];
                }
            }
            let tail: f32 = xc
                .remainder()
                .iter()
                .zip(wc.remainder())
                .map(|(a, b)| a * b)
                .sum();
            *yi = acc.iter().sum::<f32>() + tail;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn check(m: usize, k: usize, n: usize) -> Result<()> {
        let x = Tensor::randn(0f32, 1., (m, k), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1., (n, k), &Device::Cpu)?;
        let want = x.matmul(&w.t()?)?;
        let got = small_matmul(&x, &w)?;
        let d = (want - got)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d < 1e-3, "m={m} k={k} n={n}: differs by {d}");
        Ok(())
    }

    #[test]
    fn matches_matmul_on_odd_shapes() -> Result<()> {
        for (m, k, n) in [
            (1, 64, 128),
            (1, 13, 7),
            (3, 576, 1030),
            (8, 40, 9),
            (2, 7, 1),
            (5, 70, 13),
            (16, 576, 37),
        ] {
            check(m, k, n)?;
        }
        Ok(())
    }

    /// A row's result does not depend on the rows beside it (paired or alone), bit for bit: batched
    /// and speculative decoding give what one sequence alone gives.
    #[test]
    fn rows_are_computed_alike_at_every_height() -> Result<()> {
        let (k, n) = (200, 21);
        let x = Tensor::randn(0f32, 1., (7, k), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1., (n, k), &Device::Cpu)?;
        let all = small_matmul(&x, &w)?.to_vec2::<f32>()?;
        for (i, row) in all.iter().enumerate() {
            let one = small_matmul(&x.narrow(0, i, 1)?.contiguous()?, &w)?.to_vec2::<f32>()?;
            assert_eq!(&one[0], row, "row {i}");
        }
        Ok(())
    }

    #[test]
    fn portable_path_matches_too() {
        let (m, k, n) = (2, 19, 5);
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut yt = vec![0f32; n * m];
        portable(&x, &w, &mut yt, m, k);
        for j in 0..n {
            for i in 0..m {
                let want: f32 = (0..k).map(|c| x[i * k + c] * w[j * k + c]).sum();
                assert!((yt[j * m + i] - want).abs() < 1e-4);
            }
        }
    }
}
