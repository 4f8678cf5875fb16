//! `x · Wᵀ` for a few rows of `x` against a q8_0 weight on CPU: the decode-time product of a q8_0
//! model. candle's generic q8_0 path only takes integer dot-product (VNNI) instructions when the row
//! length is a multiple of 256, so models 576 or 960 wide (SmolLM2, Qwen2.5-0.5B) fall to a slower
//! 16-bit path; this kernel takes VNNI at any multiple of 32. Same arithmetic as ggml's q8_0 × q8_0:
//! each row of `x` is quantized to 8 bits per 32-block with an f16 scale, integer block sums are
//! scaled by both block scales and summed in f32.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, DType, Result, Tensor};
use half::f16;

/// Rows of `x` this kernel serves; more go to candle's tiled kernels, which reuse weights across rows.
pub const MAX_ROWS: usize = 8;

const QK: usize = 32;
/// Bytes of one q8_0 block: an f16 scale and 32 signed bytes.
const BLOCK_BYTES: usize = 34;
/// Weight rows per unit of work handed to a thread.
const ROW_BLOCK: usize = 16;

/// Whether [`q8_0_matmul`] serves `x · qᵀ`.
pub fn applies(x: &Tensor, q: &QTensor) -> bool {
    x.device().is_cpu()
        && q.device().is_cpu()
        && q.dtype() == GgmlDType::Q8_0
        && x.dtype() == DType::F32
        && x.rank() == 2
        && x.dim(0).is_ok_and(|m| (1..=MAX_ROWS).contains(&m))
}

/// `x` `[m, k]` times q8_0 `q` `[n, k]` transposed: `[m, n]`.
pub fn q8_0_matmul(x: &Tensor, q: &QTensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (n, k2) = q.shape().dims2()?;
    if k != k2 || k % QK != 0 {
        bail!("q8_0 matmul: x is [{m}, {k}] but the weight is [{n}, {k2}]")
    }
    let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let data = q.data()?;
    let kb = k / QK;
    let (xq, xd) = quantize_rows(&xs, m, k);
    let row_bytes = kb * BLOCK_BYTES;
    let mut yt = vec![0f32; n * m];
    let dot = Dot::detect();
    let tasks = n.div_ceil(ROW_BLOCK);
    let out = yt.as_mut_ptr() as usize;
    // candle's barrier pool, not rayon: the calling thread works alongside spinning workers instead
    // of sleeping on a futex while they run, which is most of the cost of ~120 small products per token
    candle_core::utils::barrier_pool().execute_chunked(tasks, |range| {
        for task in range {
            let rows = task * ROW_BLOCK..((task + 1) * ROW_BLOCK).min(n);
            for j in rows {
                let wr = &data[j * row_bytes..(j + 1) * row_bytes];
                for i in 0..m {
                    let v = dot.run(wr, &xq[i * k..(i + 1) * k], &xd[i * kb..(i + 1) * kb]);
                    // SAFETY: element (j, i) belongs to task j / ROW_BLOCK alone, and `yt` outlives
                    // the call, which returns only when every task has finished.
                    unsafe { *(out as *mut f32).add(j * m + i) = v };
                }
            }
        }
    });
    let y = if m == 1 {
        yt
    } else {
        let mut y = vec![0f32; m * n];
        for (j, row) in yt.chunks_exact(m).enumerate() {
            for (i, v) in row.iter().enumerate() {
                y[i * n + j] = *v;
            }
        }
        y
    };
    Tensor::from_vec(y, (m, n), x.device())
}

/// Each row of `x` as q8_0: 8-bit values and one scale per 32 (rounded to f16, as ggml stores it).
fn quantize_rows(xs: &[f32], m: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    let kb = k / QK;
    let mut q = vec![0i8; m * k];
    let mut d = vec![0f32; m * kb];
    for ((block, qb), db) in xs.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).zip(&mut d) {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        for (o, v) in qb.iter_mut().zip(block) {
            *o = (v * inv).round() as i8;
        }
        *db = f16::from_f32(scale).to_f32();
    }
    (q, d)
}

/// The block dot product the CPU supports best, chosen once per call.
#[derive(Clone, Copy)]
enum Dot {
    #[cfg(target_arch = "x86_64")]
    Vnni,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Dot {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("f16c")
                && is_x86_feature_detected!("fma")
            {
                return Self::Vnni;
            }
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// One q8_0 weight row (`kb` blocks of bytes) dotted with a quantized `x` row.
    fn run(self, w: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
        debug_assert_eq!(w.len(), xd.len() * BLOCK_BYTES);
        debug_assert_eq!(xq.len(), xd.len() * QK);
        match self {
            // SAFETY: the features were detected at run time; the slices hold `xd.len()` blocks.
            #[cfg(target_arch = "x86_64")]
            Self::Vnni => unsafe { x86::dot_vnni(w, xq, xd) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { x86::dot_avx2(w, xq, xd) },
            Self::Portable => dot_portable(w, xq, xd),
        }
    }
}

fn dot_portable(w: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
    let mut sum = 0f32;
    for ((blk, xb), dx) in w.chunks_exact(BLOCK_BYTES).zip(xq.chunks_exact(QK)).zip(xd) {
        let dw = f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32();
        let isum: i32 = blk[2..]
            .iter()
            .zip(xb)
            .map(|(a, b)| (*a as i8) as i32 * *b as i32)
            .sum();
        sum += isum as f32 * dw * dx;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BLOCK_BYTES, QK};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn scale(blk: *const u8) -> f32 {
        let bits = (blk as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// `|w| · (x · sign w)` with unsigned × signed byte dot products (`vpdpbusd`): exact, since the
    /// quantized `x` stays within ±127.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub unsafe fn dot_vnni(w: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let (wp, xp) = (w.as_ptr(), xq.as_ptr());
        let kb = xd.len();
        let mut b = 0;
        while b + 1 < kb {
            let (blk0, blk1) = (wp.add(b * BLOCK_BYTES), wp.add((b + 1) * BLOCK_BYTES));
            let w0 = _mm256_loadu_si256(blk0.add(2) as *const __m256i);
            let w1 = _mm256_loadu_si256(blk1.add(2) as *const __m256i);
            let x0 = _mm256_loadu_si256(xp.add(b * QK) as *const __m256i);
            let x1 = _mm256_loadu_si256(xp.add((b + 1) * QK) as *const __m256i);
            let p0 = _mm256_dpbusd_epi32(
                _mm256_setzero_si256(),
                _mm256_abs_epi8(w0),
                _mm256_sign_epi8(x0, w0),
            );
            let p1 = _mm256_dpbusd_epi32(
                _mm256_setzero_si256(),
                _mm256_abs_epi8(w1),
                _mm256_sign_epi8(x1, w1),
            );
            let d0 = _mm256_set1_ps(scale(blk0) * *xd.get_unchecked(b));
            let d1 = _mm256_set1_ps(scale(blk1) * *xd.get_unchecked(b + 1));
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), d0, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), d1, acc1);
            b += 2;
        }
        if b < kb {
            let blk = wp.add(b * BLOCK_BYTES);
            let w0 = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            let x0 = _mm256_loadu_si256(xp.add(b * QK) as *const __m256i);
            let p = _mm256_dpbusd_epi32(
                _mm256_setzero_si256(),
                _mm256_abs_epi8(w0),
                _mm256_sign_epi8(x0, w0),
            );
            let d = _mm256_set1_ps(scale(blk) * *xd.get_unchecked(b));
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, acc0);
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }

    /// The same with 16-bit pair sums (`vpmaddubsw` then `vpmaddwd`) where VNNI is missing.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_avx2(w: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let ones = _mm256_set1_epi16(1);
        let (wp, xp) = (w.as_ptr(), xq.as_ptr());
        for b in 0..xd.len() {
            let blk = wp.add(b * BLOCK_BYTES);
            let w0 = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            let x0 = _mm256_loadu_si256(xp.add(b * QK) as *const __m256i);
            let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w0), _mm256_sign_epi8(x0, w0));
            let p = _mm256_madd_epi16(pairs, ones);
            let d = _mm256_set1_ps(scale(blk) * *xd.get_unchecked(b));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, acc);
        }
        hsum(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module};

    #[test]
    fn matches_candles_q8_0_product_at_any_multiple_of_32() -> Result<()> {
        let dev = Device::Cpu;
        for (m, k, n) in [(1, 576, 100), (3, 64, 67), (8, 1536, 40)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let q = std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?);
            assert!(applies(&x, &q));
            let ours = q8_0_matmul(&x, &q)?;
            let candle = QMatMul::from_arc(q.clone())?.forward(&x)?;
            let diff = (&ours - &candle)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let size = candle.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= size * 1e-5, "({m},{k},{n}): {diff} of {size}");
            // and every dot-product flavour agrees with the portable one
            let kb = k / QK;
            let (xq, xd) = quantize_rows(&x.flatten_all()?.to_vec1::<f32>()?, m, k);
            let data = q.data()?;
            let row = &data[..kb * BLOCK_BYTES];
            let want = dot_portable(row, &xq[..k], &xd[..kb]);
            let got = Dot::detect().run(row, &xq[..k], &xd[..kb]);
            assert!((want - got).abs() <= want.abs() * 1e-5 + 1e-4);
        }
        Ok(())
    }
}
