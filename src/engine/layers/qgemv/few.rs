//! Batched decode of 5 to 16 tokens against q8_0 / q4_0 / q5_0 weights read straight from ggml's
//! layout, row after row as stored: no per-task packing of the weights. Here the lanes of a 512-bit
//! vector are the tokens, not the weight rows: the activations (small) are transposed once per
//! product, so that lane `t` of vector `(b, c)` holds bytes `4c..4c+4` of token `t`'s block `b`;
//! one broadcast 4-byte group of a weight row then feeds `vpdpbusd` for every token at once. Each
//! lane computes exactly the tiled kernel's arithmetic (the same integer sum from the same starting
//! value, one f32 product of the two scales and one fused multiply-add per block), so every bit
//! equals the other paths' and a row's result does not depend on the tokens beside it.
//!
//! Its cost hardly depends on the height (one `vpdpbusd` per weight group for up to 16 tokens).
//! Measured first on Zen 4 (CPU samples of the products over the same decode, q8_0 SmolLM2-135M
//! shape): 11% less than packing and tiling at 16 tokens, even at 8, 7% more at 4. Since its weight
//! prefetching and broadcasts (Zen 5, 1536 × 576 q8_0 from memory): 25–30% less than packing at 2
//! to 8 tokens, but from 1 to 4 tokens the direct kernel (`x86::direct`: each block's values once
//! for every token) costs less still. So it takes 5 to 16 tokens with AVX-512 VNNI only, and
//! everything else goes to the tiled, direct or scalar kernels.

use super::{Activations, Format, Path, QK};
#[cfg(target_arch = "x86_64")]
use {super::Out, std::ops::Range};

/// The fewest tokens this kernel takes.
pub(super) const MIN_TOKENS: usize = super::DIRECT_TOKENS + 1;
/// The most tokens this kernel takes: one per lane.
pub(super) const MAX_TOKENS: usize = 16;
/// Groups of 4 bytes per 32-value block.
const GROUPS: usize = QK / 4;

/// The activations transposed for one product: per block (and group), one value per lane.
pub(super) struct Few {
    /// Lanes per vector; lanes past the batch's tokens hold zeros.
    lanes: usize,
    m: usize,
    /// `[block][group][lane]`: token `lane`'s 4 bytes of that group.
    x: Vec<i32>,
    /// `[block][lane]`: the token's block scale.
    d: Vec<f32>,
    /// `[block][lane]`: the accumulator's starting value (`Activations::c`).
    c: Vec<i32>,
}

/// The transposed activations when this kernel serves `format` at `act`'s height `m` on `path`.
pub(super) fn prepare(path: Path, format: Format, act: &Activations, m: usize) -> Option<Few> {
    #[cfg(target_arch = "x86_64")]
    let vnni = path == Path::Vnni;
    #[cfg(not(target_arch = "x86_64"))]
    let vnni = path != Path::Portable;
    if !vnni
        || !(MIN_TOKENS..=MAX_TOKENS).contains(&m)
        || !matches!(format, Format::Q8_0 | Format::Q4_0 | Format::Q5_0)
    {
        return None;
    }
    let lanes = MAX_TOKENS;
    let (k, kb) = (act.k, act.k / QK);
    let mut x = vec![0i32; kb * GROUPS * lanes];
    let mut d = vec![0f32; kb * lanes];
    let mut c = vec![0i32; kb * lanes];
    for t in 0..m {
        let q = &act.q[t * k..(t + 1) * k];
        for b in 0..kb {
            for g in 0..GROUPS {
                let v = &q[b * QK + 4 * g..b * QK + 4 * g + 4];
                x[(b * GROUPS + g) * lanes + t] =
                    i32::from_le_bytes([v[0] as u8, v[1] as u8, v[2] as u8, v[3] as u8]);
            }
            d[b * lanes + t] = act.d[t * kb + b];
            c[b * lanes + t] = act.c[t * kb + b];
        }
    }
    Some(Few { lanes, m, x, d, c })
}

/// Weight rows `rows` times every token of `few` into `out`.
///
/// # Safety
/// `few` was prepared for `format` on VNNI, whose features are available (`Path::available`);
/// `w` holds `n` rows of `k / 32` blocks, `rows.end <= n`, and `out` is `[m, n]` with these
/// rows' columns written by this call alone.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn product(
    few: &Few,
    format: Format,
    w: &[u8],
    n: usize,
    rows: Range<usize>,
    out: Out,
) {
    debug_assert!(rows.end <= n);
    let row_bytes = few.d.len() / few.lanes * format.block_bytes();
    let a = (few, &w[..n * row_bytes], row_bytes, rows, out);
    // SAFETY: as the caller promises.
    unsafe {
        match format {
            Format::Q8_0 => x86::vnni::<0>(a),
            Format::Q5_0 => x86::vnni::<5>(a),
            _ => x86::vnni::<4>(a),
        }
    }
}

#[cfg(target_arch = "x86_64")]
// registers are indexed by row
#[allow(clippy::needless_range_loop)]
mod x86 {
    use super::super::x86::unpack;
    use super::{Few, Format, Out, GROUPS};
    use std::arch::x86_64::*;
    use std::ops::Range;

    pub(super) type Args<'a> = (&'a Few, &'a [u8], usize, Range<usize>, Out);

    /// Weight rows per pass: independent accumulator chains.
    const ROWS: usize = 8;

    /// A q4_0 (`BITS` 4) or q5_0 (5) block's 8 groups of 4 bytes, unpacked to unsigned values for
    /// `vpdpbusd`, and its scale's f16 bits. (q8_0's groups are broadcast straight from the
    /// block: `flipped`.)
    #[inline(always)]
    unsafe fn groups<const BITS: u8>(blk: *const u8) -> ([i32; GROUPS], u16) {
        let v = match BITS {
            5 => unpack(Format::Q5_0, blk),
            _ => unpack(Format::Q4_0, blk),
        };
        let mut g = [0i32; GROUPS];
        _mm256_storeu_si256(g.as_mut_ptr() as *mut __m256i, v);
        (g, (blk as *const u16).read_unaligned())
    }

    /// Passes ahead whose rows (contiguous) are fetched in step with the current one, a block's
    /// share of their bytes per block: a pass's interleaved row streams of a few cache lines each
    /// train no hardware prefetcher, and fetching within the rows being read came too late (the loads
    /// of the weights held 60% of this kernel's samples). Prefetches past the weights do not
    /// fault.
    const AHEAD_PASSES: usize = 2;

    /// The 4 bytes at `p` in every lane, each `^ flip` (q8_0's `+128`): one instruction, the load
    /// broadcasting as it feeds the logic unit. Written out because the compiler, given a
    /// broadcast load and a xor, loads the whole block and extracts each group with shuffles
    /// instead, and the shuffle port then bounds the kernel.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn flipped(p: *const u8, flip: __m512i) -> __m512i {
        let out: __m512i;
        // SAFETY: the caller's `p` points at 4 readable bytes; AVX-512F is enabled where this
        // is inlined.
        unsafe {
            std::arch::asm!(
                "vpxord {out}, {flip}, dword ptr [{p}]{{1to16}}",
                out = lateout(zmm_reg) out,
                flip = in(zmm_reg) flip,
                p = in(reg) p,
                options(pure, readonly, nostack, preserves_flags),
            );
        }
        out
    }

    /// A block scale's f16 bits as f32, exactly as the other paths convert them.
    #[inline(always)]
    unsafe fn scale(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// Stores lane `t < m` of `lanes` as `y[t, j]`.
    #[inline(always)]
    unsafe fn store(lanes: &[f32], m: usize, j: usize, out: Out) {
        for (t, v) in lanes[..m].iter().enumerate() {
            *out.ptr.add(t * out.n + j) = *v;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub(super) unsafe fn vnni<const BITS: u8>((few, w, row_bytes, rows, out): Args) {
        let kb = few.d.len() / few.lanes;
        let (bb, wp) = (row_bytes / kb, w.as_ptr());
        let (xp, dp, cp) = (few.x.as_ptr(), few.d.as_ptr(), few.c.as_ptr());
        let mut r0 = rows.start;
        while r0 < rows.end {
            let valid = (rows.end - r0).min(ROWS);
            let row: [*const u8; ROWS] =
                std::array::from_fn(|r| wp.add((r0 + r.min(valid - 1)) * row_bytes));
            let mut acc = [_mm512_setzero_ps(); ROWS];
            let ahead = wp.wrapping_add((r0 + AHEAD_PASSES * ROWS) * row_bytes);
            for b in 0..kb {
                let next = ahead.wrapping_add(b * ROWS * bb);
                for l in (0..ROWS * bb).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(l) as *const i8);
                }
                let c = _mm512_loadu_si512(cp.add(b * 16) as *const __m512i);
                let mut p = [c; ROWS];
                let mut dw = [0f32; ROWS];
                if BITS == 0 {
                    // q8_0: each group broadcast straight from the block and made unsigned as it
                    // loads (extracting it from a loaded block took two shuffles per group)
                    for r in 0..ROWS {
                        dw[r] = scale((row[r].add(b * bb) as *const u16).read_unaligned());
                    }
                    let flip = _mm512_set1_epi8(-128);
                    for gi in 0..GROUPS {
                        let xv =
                            _mm512_loadu_si512(xp.add((b * GROUPS + gi) * 16) as *const __m512i);
                        for r in 0..ROWS {
                            let at = row[r].add(b * bb + 2 + 4 * gi);
                            p[r] = _mm512_dpbusd_epi32(p[r], flipped(at, flip), xv);
                        }
                    }
                } else {
                    let mut g = [[0i32; GROUPS]; ROWS];
                    for r in 0..ROWS {
                        let (gr, bits) = groups::<BITS>(row[r].add(b * bb));
                        g[r] = gr;
                        dw[r] = scale(bits);
                    }
                    for gi in 0..GROUPS {
                        let xv =
                            _mm512_loadu_si512(xp.add((b * GROUPS + gi) * 16) as *const __m512i);
                        for r in 0..ROWS {
                            p[r] = _mm512_dpbusd_epi32(p[r], _mm512_set1_epi32(g[r][gi]), xv);
                        }
                    }
                }
                let dx = _mm512_loadu_ps(dp.add(b * 16));
                for r in 0..ROWS {
                    let f = _mm512_mul_ps(_mm512_set1_ps(dw[r]), dx);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p[r]), f, acc[r]);
                }
            }
            let mut lanes = [0f32; 16];
            for r in 0..valid {
                _mm512_storeu_ps(lanes.as_mut_ptr(), acc[r]);
                store(&lanes, few.m, r0 + r, out);
            }
            r0 += ROWS;
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::super::{matmul_with, Path};
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Result, Tensor};

    const DTYPES: [GgmlDType; 3] = [GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q4_0];

    fn simd_paths() -> Vec<Path> {
        [Path::Vnni, Path::Avx2]
            .into_iter()
            .filter(|p| p.available())
            .collect()
    }

    /// Every height this kernel serves gives, row for row, the bits of one token alone (the
    /// direct path) and of a tall batch (the tiled kernel), on odd shapes: weight rows not a
    /// multiple of the kernel's 4 nor of the tiles' 8, blocks per row odd and even.
    #[test]
    fn few_tokens_give_the_bits_of_one_token_and_of_the_tiled_kernel() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in DTYPES {
            for (n, k) in [(1, 32), (7, 96), (9, 160), (18, 64), (33, 320), (41, 576)] {
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
                let q = QTensor::quantize(&w, dtype)?;
                let x = Tensor::randn(0f32, 1.0, (MAX_TOKENS + 3, k), &dev)?;
                for path in simd_paths() {
                    let tall = matmul_with(path, &x, &q)?.to_vec2::<f32>()?;
                    for (i, want) in tall.iter().enumerate() {
                        let one = matmul_with(path, &x.narrow(0, i, 1)?, &q)?.to_vec2::<f32>()?;
                        assert_eq!(&one[0], want, "{dtype:?} {path:?} [{n}, {k}] row {i} alone");
                    }
                    for m in 2..=MAX_TOKENS {
                        for from in [0, x.dim(0)? - m] {
                            let got = matmul_with(path, &x.narrow(0, from, m)?, &q)?;
                            for (i, row) in got.to_vec2::<f32>()?.iter().enumerate() {
                                assert_eq!(
                                    row,
                                    &tall[from + i],
                                    "{dtype:?} {path:?} [{n}, {k}] height {m} row {}",
                                    from + i
                                );
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// It takes 5 to 16 tokens on VNNI, the 32-blocks only; the rest goes to the other kernels.
    #[test]
    fn serves_a_few_tokens_of_the_32_blocks_only() {
        let k = 64;
        let act = |m: usize| Activations {
            q: vec![1; m * k],
            d: vec![0.5; m * k / QK],
            c: vec![0; m * k / QK],
            s: Vec::new(),
            k,
        };
        for f in [Format::Q8_0, Format::Q4_0, Format::Q5_0] {
            for path in [Path::Vnni, Path::Avx2, Path::Portable] {
                for m in 1..=MAX_TOKENS + 1 {
                    let served = prepare(path, f, &act(m), m).is_some();
                    let want = path == Path::Vnni && (MIN_TOKENS..=MAX_TOKENS).contains(&m);
                    assert_eq!(served, want, "{f:?} {path:?} {m}");
                }
            }
        }
        assert!(prepare(Path::Vnni, Format::Q4K, &act(4), 4).is_none());
    }
}
