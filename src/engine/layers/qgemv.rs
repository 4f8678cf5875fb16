//! `x · Wᵀ` on CPU for weights in ggml's 32-wide blocks (q8_0, q5_0, q4_0), with the arithmetic of
//! ggml's `vec_dot_q*_q8_0`: each row of `x` is quantized to 8 bits per block with an f16 scale, integer
//! block sums are scaled by both block scales and summed in f32. candle takes integer dot-product (VNNI)
//! instructions for q8_0 only when rows are a multiple of 256, so 576- or 960-wide models (SmolLM2,
//! Qwen2.5-0.5B) fell to a 16-bit path, and its q5_0 product (what q4k falls back to on such rows) is
//! scalar. This takes VNNI (else AVX2) at any multiple of 32.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, DType, Result, Tensor};
use half::f16;

const QK: usize = 32;
/// Bytes of one q8_0 block: an f16 scale and 32 signed bytes.
const BLOCK_BYTES: usize = 34;
/// q4_0: an f16 scale, 16 bytes of nibbles (value − 8).
const Q4_0_BYTES: usize = 18;
/// q5_0: an f16 scale, 32 fifth bits, 16 bytes of nibbles (value − 16).
const Q5_0_BYTES: usize = 22;
/// Weight rows per unit of work handed to a thread.
const ROW_BLOCK: usize = 16;

/// Whether [`matmul`] serves `x · qᵀ`.
pub fn applies(x: &Tensor, q: &QTensor) -> bool {
    x.device().is_cpu()
        && q.device().is_cpu()
        && x.dtype() == DType::F32
        && x.rank() == 2
        // every height, rows a multiple of 256 included: candle's repacked kernel would quantize
        // the activations with one scale per 256 values (llama.cpp: one per 32), so a prompt's pass
        // would not compute what decoding computes
        && matches!(
            q.dtype(),
            GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q5_0
        )
        && x.dim(0).is_ok_and(|m| m >= 1)
}

/// `x` `[m, k]` times `q` `[n, k]` (q8_0, q5_0 or q4_0) transposed: `[m, n]`.
pub fn matmul(x: &Tensor, q: &QTensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (n, k2) = q.shape().dims2()?;
    if k != k2 || k % QK != 0 {
        bail!("quantized matmul: x is [{m}, {k}] but the weight is [{n}, {k2}]")
    }
    let Some(format) = Format::of(q.dtype()) else {
        bail!("no 32-block kernel for {:?}", q.dtype())
    };
    let (block_bytes, offset) = (format.block_bytes(), format.offset());
    let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let data = q.data()?;
    let kb = k / QK;
    let (xq, xd) = quantize_rows(&xs, m, k);
    // what the unsigned weight values' offset contributes per block: offset · Σx · dx
    let xcorr: Vec<f32> = if offset == 0 {
        vec![0.0; xd.len()]
    } else {
        xq.chunks_exact(QK)
            .zip(&xd)
            .map(|(b, d)| (offset * b.iter().map(|v| *v as i32).sum::<i32>()) as f32 * d)
            .collect()
    };
    let row_bytes = kb * block_bytes;
    let dot = Dot::detect();
    let act = Activations {
        q: &xq,
        d: &xd,
        corr: &xcorr,
        k,
    };
    // the engine's kernel pool, not rayon: the caller works alongside briefly spinning workers
    // and never waits for one that has not started (a decode step runs ~100 of these)
    let y = super::pool::by_weight_rows(m, n, ROW_BLOCK, |rows, buf| {
        for (jj, j) in rows.enumerate() {
            let wr = &data[j * row_bytes..(j + 1) * row_bytes];
            let y = &mut buf[jj * m..(jj + 1) * m];
            if format == Format::Q8_0 && m <= 2 {
                // two accumulator chains per row: the fastest shape for a single decode row
                for (i, v) in y.iter_mut().enumerate() {
                    *v = dot.run(wr, &xq[i * k..(i + 1) * k], &xd[i * kb..(i + 1) * kb]);
                }
            } else {
                dot.run_blocks(format, wr, &act, y);
            }
        }
    });
    Tensor::from_vec(y, (m, n), x.device())
}

/// The 32-wide block formats the kernel reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Q8_0,
    Q4_0,
    Q5_0,
}

impl Format {
    fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            _ => None,
        }
    }

    fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => BLOCK_BYTES,
            Self::Q4_0 => Q4_0_BYTES,
            Self::Q5_0 => Q5_0_BYTES,
        }
    }

    /// What ggml subtracts from the stored unsigned values (q8_0 stores signed ones).
    fn offset(self) -> i32 {
        match self {
            Self::Q8_0 => 0,
            Self::Q4_0 => 8,
            Self::Q5_0 => 16,
        }
    }
}

/// The rows of `x` quantized: values, per-block scales, and the offset correction per block.
struct Activations<'a> {
    q: &'a [i8],
    d: &'a [f32],
    corr: &'a [f32],
    k: usize,
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

    /// One weight row against every row of `act`, into `y` (one value per row), each weight block
    /// read once for several rows.
    fn run_blocks(self, format: Format, w: &[u8], act: &Activations, y: &mut [f32]) {
        match self {
            // SAFETY: the features were detected at run time; `w` holds `k / 32` blocks and `act`
            // `y.len()` rows of `k`.
            #[cfg(target_arch = "x86_64")]
            Self::Vnni => unsafe { x86::blocks_vnni(format, w, act, y) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { x86::blocks_avx2(format, w, act, y) },
            Self::Portable => blocks_portable(format, w, act, y),
        }
    }
}

/// The values of one block as stored: q8_0's signed bytes, q4_0 / q5_0's unsigned 0..16 / 0..32
/// (ggml subtracts 8 / 16: `Activations::corr`).
fn unpack_portable(format: Format, blk: &[u8]) -> [i32; QK] {
    if format == Format::Q8_0 {
        return std::array::from_fn(|j| blk[2 + j] as i8 as i32);
    }
    let (qh, qs) = if format == Format::Q5_0 {
        (
            u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]),
            &blk[6..22],
        )
    } else {
        (0, &blk[2..18])
    };
    let mut v = [0i32; QK];
    for j in 0..16 {
        v[j] = ((qs[j] & 0x0F) as u32 | (((qh >> j) & 1) << 4)) as i32;
        v[j + 16] = ((qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4)) as i32;
    }
    v
}

fn blocks_portable(format: Format, w: &[u8], act: &Activations, y: &mut [f32]) {
    let block_bytes = format.block_bytes();
    let kb = act.k / QK;
    y.fill(0.0);
    for (b, blk) in w.chunks_exact(block_bytes).enumerate() {
        let dw = f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32();
        let v = unpack_portable(format, blk);
        for (i, out) in y.iter_mut().enumerate() {
            let xb = &act.q[i * act.k + b * QK..i * act.k + (b + 1) * QK];
            let isum: i32 = v.iter().zip(xb).map(|(a, c)| *a * *c as i32).sum();
            *out += dw * (isum as f32 * act.d[i * kb + b] - act.corr[i * kb + b]);
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
    use super::{Activations, Format, BLOCK_BYTES, QK};
    use std::arch::x86_64::*;

    /// A q4_0 / q5_0 block's 32 unsigned values: low nibbles are elements 0..16, high nibbles 16..32,
    /// q5_0's fifth bits add 16 where set.
    #[inline(always)]
    unsafe fn unpack(q5: bool, blk: *const u8) -> __m256i {
        let qs = _mm_loadu_si128(blk.add(if q5 { 6 } else { 2 }) as *const __m128i);
        let m4 = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(qs, m4);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), m4);
        let v = _mm256_set_m128i(hi, lo);
        if !q5 {
            return v;
        }
        let qh = (blk.add(2) as *const u32).read_unaligned();
        // byte j of `bits` is 0xFF where bit j of qh is set
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(qh as i32),
            _mm256_set_epi64x(
                0x0303030303030303,
                0x0202020202020202,
                0x0101010101010101,
                0,
            ),
        );
        let bits = _mm256_cmpeq_epi8(
            _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)),
            _mm256_set1_epi64x(-1),
        );
        _mm256_or_si256(v, _mm256_and_si256(bits, _mm256_set1_epi8(0x10)))
    }

    /// Unsigned × signed byte sums in 32-bit lanes: `vpdpbusd`, or its two-step AVX2 equivalent (exact
    /// here: unsigned values ≤ 128 times signed ≤ 127 fit the 16-bit pair sums).
    #[inline(always)]
    unsafe fn dpbusd<const VNNI: bool>(u: __m256i, s: __m256i) -> __m256i {
        if VNNI {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }
    }

    /// Several rows of `x` per weight block. q8_0's signed weights go through `|w| · (x · sign w)`;
    /// q4_0 / q5_0's unsigned values multiply `x` directly and the offset comes off at the end.
    #[inline(always)]
    unsafe fn blocks<const VNNI: bool>(format: Format, w: &[u8], act: &Activations, y: &mut [f32]) {
        let m = y.len();
        let mut i0 = 0;
        // tiles of a fixed height, so the accumulators stay in registers
        while i0 < m {
            i0 += match m - i0 {
                8.. => tile::<VNNI, 8>(format, w, act, y, i0),
                4..=7 => tile::<VNNI, 4>(format, w, act, y, i0),
                2..=3 => tile::<VNNI, 2>(format, w, act, y, i0),
                _ => tile::<VNNI, 1>(format, w, act, y, i0),
            };
        }
    }

    /// Rows `i0..i0 + R` of `x` against one weight row; returns `R`.
    #[inline(always)]
    unsafe fn tile<const VNNI: bool, const R: usize>(
        format: Format,
        w: &[u8],
        act: &Activations,
        y: &mut [f32],
        i0: usize,
    ) -> usize {
        let block_bytes = format.block_bytes();
        let signed = format == Format::Q8_0;
        let (k, kb) = (act.k, act.k / QK);
        let (wp, xp) = (w.as_ptr(), act.q.as_ptr());
        // with VNNI, even and odd blocks in two chains, as `dot_vnni` sums a single row: a row's result
        // is the same bits at every batch height (speculative and batched decoding equal plain decoding)
        let mut acc = [_mm256_setzero_ps(); R];
        let mut odd = [_mm256_setzero_ps(); R];
        let mut corr = [0f32; R];
        for b in 0..kb {
            let blk = wp.add(b * block_bytes);
            let dw = scale(blk);
            let dwv = _mm256_set1_ps(dw);
            let (raw, v) = if signed {
                let raw = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                (raw, _mm256_abs_epi8(raw))
            } else {
                let v = unpack(format == Format::Q5_0, blk);
                (v, v)
            };
            for r in 0..R {
                let i = i0 + r;
                let mut xv = _mm256_loadu_si256(xp.add(i * k + b * QK) as *const __m256i);
                if signed {
                    xv = _mm256_sign_epi8(xv, raw);
                }
                let p = dpbusd::<VNNI>(v, xv);
                // the x scale broadcast straight from memory (a load-port op), times the weight's
                let d = _mm256_mul_ps(dwv, _mm256_broadcast_ss(act.d.get_unchecked(i * kb + b)));
                if VNNI && b % 2 == 1 {
                    odd[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, odd[r]);
                } else {
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, acc[r]);
                }
                if !signed {
                    corr[r] += dw * *act.corr.get_unchecked(i * kb + b);
                }
            }
        }
        for r in 0..R {
            let sum = if VNNI {
                _mm256_add_ps(acc[r], odd[r])
            } else {
                acc[r]
            };
            *y.get_unchecked_mut(i0 + r) = hsum(sum) - corr[r];
        }
        R
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub unsafe fn blocks_vnni(format: Format, w: &[u8], act: &Activations, y: &mut [f32]) {
        blocks::<true>(format, w, act, y)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn blocks_avx2(format: Format, w: &[u8], act: &Activations, y: &mut [f32]) {
        blocks::<false>(format, w, act, y)
    }

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

    /// A row's result does not depend on the rows beside it, bit for bit, for every block type and
    /// height (one row takes the single-row dot product, more take the tiles).
    #[test]
    fn rows_are_computed_alike_at_every_height() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q4_0] {
            for k in [576, 96, 160] {
                let w = Tensor::randn(0f32, 1.0, (24, k), &dev)?;
                let q = QTensor::quantize(&w, dtype)?;
                let x = Tensor::randn(0f32, 1.0, (11, k), &dev)?;
                let all = matmul(&x, &q)?.to_vec2::<f32>()?;
                for i in [0, 3, 10] {
                    for h in [1, 2, 3, 9] {
                        let from = i.min(11 - h);
                        let part = matmul(&x.narrow(0, from, h)?, &q)?.to_vec2::<f32>()?;
                        assert_eq!(part[i - from], all[i], "{dtype:?} k {k} row {i} height {h}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn matches_candles_products_at_any_multiple_of_32() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q4_0] {
            for (m, k, n) in [(1, 576, 100), (3, 64, 67), (8, 1536, 40), (13, 96, 33)] {
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                let q = std::sync::Arc::new(QTensor::quantize(&w, dtype)?);
                assert!(applies(&x, &q), "{dtype:?} ({m},{k},{n})");
                let ours = matmul(&x, &q)?;
                if (k / QK) % 2 == 1 && dtype != GgmlDType::Q8_0 {
                    // candle's q4_0/q5_0 products need an even block count (it panics); compare with
                    // the dequantized weight, which differs by the activations' 8-bit rounding
                    let want = x.matmul(&q.dequantize(&dev)?.t()?)?;
                    let err = ((&ours - &want)?.sqr()?.sum_all()?.to_scalar::<f32>()?
                        / want.sqr()?.sum_all()?.to_scalar::<f32>()?)
                    .sqrt();
                    assert!(err < 0.02, "{dtype:?} ({m},{k},{n}): {err}");
                    continue;
                }
                let candle = QMatMul::from_arc(q.clone())?.forward(&x)?;
                let diff = (&ours - &candle)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let size = candle.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff <= size * 1e-5,
                    "{dtype:?} ({m},{k},{n}): {diff} of {size}"
                );
            }
        }
        Ok(())
    }

    /// Every flavour this CPU can run (VNNI machines run the AVX2 one too).
    fn available() -> Vec<Dot> {
        let mut all = vec![Dot::detect()];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            all.push(Dot::Avx2);
        }
        all
    }

    #[test]
    fn every_instruction_set_gives_the_portable_result() -> Result<()> {
        let dev = Device::Cpu;
        let (m, k) = (5, 320);
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let (xq, xd) = quantize_rows(&x.flatten_all()?.to_vec1::<f32>()?, m, k);
        let kb = k / QK;
        for format in [Format::Q8_0, Format::Q5_0, Format::Q4_0] {
            let dtype = match format {
                Format::Q8_0 => GgmlDType::Q8_0,
                Format::Q5_0 => GgmlDType::Q5_0,
                Format::Q4_0 => GgmlDType::Q4_0,
            };
            let w = Tensor::randn(0f32, 1.0, (1, k), &dev)?;
            let q = QTensor::quantize(&w, dtype)?;
            let data = q.data()?;
            let corr: Vec<f32> = xq
                .chunks_exact(QK)
                .zip(&xd)
                .map(|(b, d)| {
                    (format.offset() * b.iter().map(|v| *v as i32).sum::<i32>()) as f32 * d
                })
                .collect();
            let act = Activations {
                q: &xq,
                d: &xd,
                corr: &corr,
                k,
            };
            let mut want = vec![0f32; m];
            blocks_portable(format, &data, &act, &mut want);
            for dot in available() {
                let mut got = vec![0f32; m];
                dot.run_blocks(format, &data, &act, &mut got);
                for (a, b) in want.iter().zip(&got) {
                    assert!(
                        (a - b).abs() <= a.abs() * 1e-5 + 1e-4,
                        "{format:?}: {a} vs {b}"
                    );
                }
            }
        }
        let w = Tensor::randn(0f32, 1.0, (1, k), &dev)?;
        let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        let data = q.data()?;
        let want = dot_portable(&data, &xq[..k], &xd[..kb]);
        for dot in available() {
            let got = dot.run(&data, &xq[..k], &xd[..kb]);
            assert!((want - got).abs() <= want.abs() * 1e-5 + 1e-4);
        }
        Ok(())
    }
}
