//! q4_K and q6_K rows against several tokens at once, with candle's AVX2 arithmetic (`avx.rs`'s
//! `vec_dot_q4k_q8k` / `vec_dot_q6k_q8k`, ggml's): per 256-value block, the weight side (scales
//! unpacked, nibbles and high bits split) is done once, then each token's integer sums, its
//! float multiply-adds and its final sums run exactly as candle runs them for that token alone.
//! So every token's result has the bits candle's one-token dot product gives, at any batch height,
//! while a batch unpacks each block once per pass of up to 4 tokens (AVX2) or 4 pairs of tokens
//! (AVX-512BW: the two 256-bit halves of each vector are two tokens, lane for lane what the AVX2
//! kernel computes, since the byte and word products never cross a 256-bit half).
//!
//! The blocks are read through candle's `#[repr(C)]` layouts (their sizes are asserted below):
//! q4_K `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`; q6_K `ql: [u8; 128], qh: [u8; 64],
//! scales: [i8; 16], d: f16`; q8_K `d: f32, qs: [i8; 256], bsums: [i16; 16]`.

use std::arch::x86_64::*;

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K, BlockQ8K};
use half::f16;

/// The most tokens one call takes.
pub(super) const MAX_TOKENS: usize = super::MAX_ROWS;

const Q4K_BYTES: usize = 144;
const Q6K_BYTES: usize = 210;
const Q8K_BYTES: usize = 292;
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == Q4K_BYTES);
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == Q6K_BYTES);
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == Q8K_BYTES);

/// Whether this CPU runs these kernels (candle's dot products need the same).
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// candle's `hsum_float_8`: the 8 lanes summed in its order.
#[inline(always)]
unsafe fn hsum_float_8(x: __m256) -> f32 {
    let res = _mm256_extractf128_ps(x, 1);
    let res = _mm_add_ps(res, _mm256_castps256_ps128(x));
    let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    let res = _mm_add_ss(res, _mm_movehdup_ps(res));
    _mm_cvtss_f32(res)
}

#[inline(always)]
unsafe fn half_at(p: *const u8) -> f32 {
    f16::from_bits((p as *const u16).read_unaligned()).to_f32()
}

/// Row `i`: the 16-bit lane pair `2i, 2i + 1` into every 32-bit lane (candle's
/// `get_scale_shuffle_k4(i)`).
static SHUFFLE_K4: [[u8; 32]; 8] = {
    let mut t = [[0u8; 32]; 8];
    let mut i = 0;
    while i < 8 {
        let mut l = 0;
        while l < 32 {
            t[i][l] = (2 * i + l % 2) as u8;
            l += 1;
        }
        i += 1;
    }
    t
};

/// Row `i`: byte `2i` eight times, then byte `2i + 1` eight times (candle's `get_scale_shuffle(i)`).
static SHUFFLE_Q6: [[u8; 16]; 8] = {
    let mut t = [[0u8; 16]; 8];
    let mut i = 0;
    while i < 8 {
        let mut l = 0;
        while l < 16 {
            t[i][l] = (2 * i + l / 8) as u8;
            l += 1;
        }
        i += 1;
    }
    t
};

#[inline(always)]
unsafe fn shuffle_k4(i: usize) -> __m256i {
    _mm256_loadu_si256(SHUFFLE_K4[i].as_ptr() as *const __m256i)
}

#[inline(always)]
unsafe fn shuffle_q6(i: usize) -> __m128i {
    _mm_loadu_si128(SHUFFLE_Q6[i].as_ptr() as *const __m128i)
}

/// `out[t]` = row `w` (`kb` q4_K blocks) · token `t` (`xq`: `m` tokens × `kb` q8_K blocks).
///
/// # Safety
/// AVX2 and FMA are available; `w` holds `kb` q4_K blocks and `xq` `m * kb` q8_K blocks;
/// `m == out.len() <= MAX_TOKENS`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn q4k(w: *const u8, xq: *const u8, kb: usize, out: &mut [f32]) {
    q4k_on(wide(), w, xq, kb, out)
}

/// [`q4k`], with (`wide`) or without the AVX-512 kernels.
///
/// # Safety
/// As [`q4k`]; `wide` only where [`wide`] holds.
#[target_feature(enable = "avx2,fma")]
unsafe fn q4k_on(wide: bool, w: *const u8, xq: *const u8, kb: usize, out: &mut [f32]) {
    by_chunks(
        wide,
        w,
        xq,
        kb,
        out,
        &Kernels {
            narrow: [
                q4k_tokens::<1>,
                q4k_tokens::<2>,
                q4k_tokens::<3>,
                q4k_tokens::<4>,
            ],
            wide: [
                q4k_pairs::<1>,
                q4k_pairs::<2>,
                q4k_pairs::<3>,
                q4k_pairs::<4>,
            ],
        },
    )
}

type Kernel = unsafe fn(*const u8, *const u8, usize, &mut [f32]);

/// One format's kernels: `narrow[i]` takes `i + 1` tokens (AVX2), `wide[i]` `2 (i + 1)`.
struct Kernels {
    narrow: [Kernel; NARROW],
    wide: [Kernel; WIDE_PAIRS],
}

/// Tokens per pass over a row (their accumulators in registers): 4 with AVX2, 4 pairs with
/// AVX-512 (and an odd token left to the AVX2 kernel).
const NARROW: usize = 4;
const WIDE_PAIRS: usize = 4;

/// Runs `out`'s tokens through `k` in passes over the row.
#[inline(always)]
unsafe fn by_chunks(
    wide: bool,
    w: *const u8,
    xq: *const u8,
    kb: usize,
    out: &mut [f32],
    k: &Kernels,
) {
    let chunk = if wide { 2 * WIDE_PAIRS } else { NARROW };
    for (c, out) in out.chunks_mut(chunk).enumerate() {
        let xq = xq.add(c * chunk * kb * Q8K_BYTES);
        let pairs = if wide { out.len() / 2 } else { 0 };
        let (two, rest) = out.split_at_mut(2 * pairs);
        if pairs > 0 {
            (k.wide[pairs - 1])(w, xq, kb, two);
        }
        if !rest.is_empty() {
            (k.narrow[rest.len() - 1])(w, xq.add(2 * pairs * kb * Q8K_BYTES), kb, rest);
        }
    }
}

/// A q4_K block's 8 mins (16-bit, for the mins term) and 8 scales (16-bit, in both halves), as
/// candle's `vec_dot_q4k_q8k` unpacks its 12 packed bytes.
#[inline(always)]
unsafe fn q4k_mins_scales(x: *const u8) -> (__m128i, __m256i) {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let p = x.add(4) as *const u32;
    let mut utmp = [
        p.read_unaligned(),
        p.add(1).read_unaligned(),
        p.add(2).read_unaligned(),
        0,
    ];
    utmp[3] = ((utmp[2] >> 4) & KMASK2) | (((utmp[1] >> 6) & KMASK3) << 4);
    let uaux = utmp[1] & KMASK1;
    utmp[1] = (utmp[2] & KMASK2) | (((utmp[0] >> 6) & KMASK3) << 4);
    utmp[2] = uaux;
    utmp[0] &= KMASK1;
    let mins_and_scales = _mm256_cvtepu8_epi16(_mm_set_epi32(
        utmp[3] as i32,
        utmp[2] as i32,
        utmp[1] as i32,
        utmp[0] as i32,
    ));
    let sc128 = _mm256_extracti128_si256(mins_and_scales, 0);
    (
        _mm256_extracti128_si256(mins_and_scales, 1),
        _mm256_insertf128_si256(_mm256_castsi128_si256(sc128), sc128, 1),
    )
}

/// A token's (`y`, its q8_K block) mins term for one q4_K block, added into `acc_m` as candle
/// adds it.
#[inline(always)]
unsafe fn q4k_mins_term(mins: __m128i, y: *const u8, xdmin: f32, acc_m: __m128) -> __m128 {
    let dmin = -(y as *const f32).read_unaligned() * xdmin;
    let q8sums = _mm256_loadu_si256(y.add(4 + 256) as *const __m256i);
    let q8s = _mm_hadd_epi16(
        _mm256_extracti128_si256(q8sums, 0),
        _mm256_extracti128_si256(q8sums, 1),
    );
    let prod = _mm_madd_epi16(mins, q8s);
    _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m)
}

/// candle's final sum of a q4_K dot product: the 8 lanes, then the mins term's 4.
#[inline(always)]
unsafe fn q4k_total(acc: __m256, acc_m: __m128) -> f32 {
    let a = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    let a = _mm_add_ss(a, _mm_movehdup_ps(a));
    hsum_float_8(acc) + _mm_cvtss_f32(a)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q4k_tokens<const T: usize>(w: *const u8, xq: *const u8, kb: usize, out: &mut [f32]) {
    let m4 = _mm256_set1_epi8(0xF);
    let mut acc = [_mm256_setzero_ps(); T];
    let mut acc_m = [_mm_setzero_ps(); T];
    for b in 0..kb {
        let x = w.add(b * Q4K_BYTES);
        let (xd, xdmin) = (half_at(x), half_at(x.add(2)));
        let (mins, scales) = q4k_mins_scales(x);
        // per 64 values: the low nibbles' scale and values, the high nibbles' scale and values
        let mut wv = [[_mm256_setzero_si256(); 4]; 4];
        for (j, v) in wv.iter_mut().enumerate() {
            let q4bits = _mm256_loadu_si256(x.add(16 + 32 * j) as *const __m256i);
            *v = [
                _mm256_shuffle_epi8(scales, shuffle_k4(2 * j)),
                _mm256_and_si256(q4bits, m4),
                _mm256_shuffle_epi8(scales, shuffle_k4(2 * j + 1)),
                _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4),
            ];
        }
        for t in 0..T {
            let y = xq.add((t * kb + b) * Q8K_BYTES);
            let d = (y as *const f32).read_unaligned() * xd;
            acc_m[t] = q4k_mins_term(mins, y, xdmin, acc_m[t]);
            let mut sumi = _mm256_setzero_si256();
            for (j, [scale_l, q4l, scale_h, q4h]) in wv.iter().enumerate() {
                let q8 = y.add(4 + 64 * j);
                let q8l = _mm256_loadu_si256(q8 as *const __m256i);
                let p16l = _mm256_madd_epi16(*scale_l, _mm256_maddubs_epi16(*q4l, q8l));
                sumi = _mm256_add_epi32(sumi, p16l);
                let q8h = _mm256_loadu_si256(q8.add(32) as *const __m256i);
                let p16h = _mm256_madd_epi16(*scale_h, _mm256_maddubs_epi16(*q4h, q8h));
                sumi = _mm256_add_epi32(sumi, p16h);
            }
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc[t]);
        }
    }
    for (t, o) in out.iter_mut().enumerate() {
        *o = q4k_total(acc[t], acc_m[t]);
    }
}

/// Whether the paired kernels run: AVX-512BW, two tokens per 512-bit vector, each half computing
/// exactly what the AVX2 kernel computes for its token.
fn wide() -> bool {
    static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WIDE.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
    })
}

/// 32 bytes at `off` of each of two tokens' blocks in one vector, token 0 in the low half.
#[inline(always)]
unsafe fn pair(y: [*const u8; 2], off: usize) -> __m512i {
    _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_loadu_si256(y[0].add(off) as *const __m256i)),
        _mm256_loadu_si256(y[1].add(off) as *const __m256i),
    )
}

/// [`q4k_tokens`] for `2 * P` tokens, two per 512-bit vector.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
unsafe fn q4k_pairs<const P: usize>(w: *const u8, xq: *const u8, kb: usize, out: &mut [f32]) {
    debug_assert_eq!(out.len(), 2 * P);
    let m4 = _mm256_set1_epi8(0xF);
    let mut acc = [[_mm256_setzero_ps(); 2]; P];
    let mut acc_m = [[_mm_setzero_ps(); 2]; P];
    for b in 0..kb {
        let x = w.add(b * Q4K_BYTES);
        let (xd, xdmin) = (half_at(x), half_at(x.add(2)));
        let (mins, scales) = q4k_mins_scales(x);
        let mut wv = [[_mm512_setzero_si512(); 4]; 4];
        for (j, v) in wv.iter_mut().enumerate() {
            let q4bits = _mm256_loadu_si256(x.add(16 + 32 * j) as *const __m256i);
            *v = [
                _mm512_broadcast_i64x4(_mm256_shuffle_epi8(scales, shuffle_k4(2 * j))),
                _mm512_broadcast_i64x4(_mm256_and_si256(q4bits, m4)),
                _mm512_broadcast_i64x4(_mm256_shuffle_epi8(scales, shuffle_k4(2 * j + 1))),
                _mm512_broadcast_i64x4(_mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4)),
            ];
        }
        for p in 0..P {
            let y: [*const u8; 2] =
                std::array::from_fn(|h| xq.add(((2 * p + h) * kb + b) * Q8K_BYTES));
            for h in 0..2 {
                acc_m[p][h] = q4k_mins_term(mins, y[h], xdmin, acc_m[p][h]);
            }
            let mut sumi = _mm512_setzero_si512();
            for (j, [scale_l, q4l, scale_h, q4h]) in wv.iter().enumerate() {
                let q8l = pair(y, 4 + 64 * j);
                let p16l = _mm512_madd_epi16(*scale_l, _mm512_maddubs_epi16(*q4l, q8l));
                sumi = _mm512_add_epi32(sumi, p16l);
                let q8h = pair(y, 4 + 64 * j + 32);
                let p16h = _mm512_madd_epi16(*scale_h, _mm512_maddubs_epi16(*q4h, q8h));
                sumi = _mm512_add_epi32(sumi, p16h);
            }
            let halves = [
                _mm512_castsi512_si256(sumi),
                _mm512_extracti64x4_epi64::<1>(sumi),
            ];
            for h in 0..2 {
                let d = (y[h] as *const f32).read_unaligned() * xd;
                acc[p][h] =
                    _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(halves[h]), acc[p][h]);
            }
        }
    }
    for (t, o) in out.iter_mut().enumerate() {
        *o = q4k_total(acc[t / 2][t % 2], acc_m[t / 2][t % 2]);
    }
}

/// `out[t]` = row `w` (`kb` q6_K blocks) · token `t` (`xq`: `m` tokens × `kb` q8_K blocks).
///
/// # Safety
/// As [`q4k`], for q6_K blocks.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn q6k(w: *const u8, xq: *const u8, kb: usize, out: &mut [f32]) {
    q6k_on(wide(), w, xq, kb, out)
}

/// [`q6k`], with (`wide`) or without the AVX-512 kernels.
///
/// # Safety
/// As [`q6k`]; `wide` only where [`wide`] holds.
#[target_feature(enable = "avx2,fma")]
unsafe fn q6k_on(wide: bool, w: *const u8, xq: *const u8, kb: usize, out: &mut [f32]) {
    by_chunks(
        wide,
        w,
        xq,
        kb,
        out,
        &Kernels {
            narrow: [
                q6k_tokens::<1>,
                q6k_tokens::<2>,
                q6k_tokens::<3>,
                q6k_tokens::<4>,
            ],
            wide: [
                q6k_pairs::<1>,
                q6k_pairs::<2>,
                q6k_pairs::<3>,
                q6k_pairs::<4>,
            ],
        },
    )
}

/// [`q6k`] for `T` tokens.
#[target_feature(enable = "avx2,fma")]
unsafe fn q6k_tokens<const T: usize>(w: *const u8, xq: *const u8, kb: usize, out: &mut [f32]) {
    debug_assert_eq!(out.len(), T);
    let m4 = _mm256_set1_epi8(0xF);
    let m2 = _mm256_set1_epi8(3);
    let m32s = _mm256_set1_epi8(32);
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..kb {
        let x = w.add(b * Q6K_BYTES);
        let xd = half_at(x.add(208));
        let scales = _mm_loadu_si128(x.add(192) as *const __m128i);
        // per 128 values: four 32-value groups' 6-bit values and 16-bit scales
        let mut wv = [[[_mm256_setzero_si256(); 2]; 4]; 2];
        for (j, v) in wv.iter_mut().enumerate() {
            let q4 = x.add(64 * j);
            let q4bits1 = _mm256_loadu_si256(q4 as *const __m256i);
            let q4bits2 = _mm256_loadu_si256(q4.add(32) as *const __m256i);
            let q4bits_h = _mm256_loadu_si256(x.add(128 + 32 * j) as *const __m256i);
            let q4h_0 = _mm256_slli_epi16(_mm256_and_si256(q4bits_h, m2), 4);
            let q4h_1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bits_h, 2), m2), 4);
            let q4h_2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bits_h, 4), m2), 4);
            let q4h_3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bits_h, 6), m2), 4);
            let q4 = [
                _mm256_or_si256(_mm256_and_si256(q4bits1, m4), q4h_0),
                _mm256_or_si256(_mm256_and_si256(q4bits2, m4), q4h_1),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits1, 4), m4), q4h_2),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits2, 4), m4), q4h_3),
            ];
            for (g, v) in v.iter_mut().enumerate() {
                let scale = _mm_shuffle_epi8(scales, shuffle_q6(4 * j + g));
                *v = [q4[g], _mm256_cvtepi8_epi16(scale)];
            }
        }
        for (t, acc) in acc.iter_mut().enumerate() {
            let y = xq.add((t * kb + b) * Q8K_BYTES);
            let d = (y as *const f32).read_unaligned() * xd;
            let mut sumi = _mm256_setzero_si256();
            for (j, groups) in wv.iter().enumerate() {
                let q8 = y.add(4 + 128 * j);
                let p: [__m256i; 4] = std::array::from_fn(|g| {
                    let q8g = _mm256_loadu_si256(q8.add(32 * g) as *const __m256i);
                    let q8s = _mm256_maddubs_epi16(m32s, q8g);
                    let p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(groups[g][0], q8g), q8s);
                    _mm256_madd_epi16(groups[g][1], p16)
                });
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p[0], p[1]));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p[2], p[3]));
            }
            *acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), *acc);
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = hsum_float_8(a);
    }
}

/// [`q6k_tokens`] for `2 * P` tokens, two per 512-bit vector.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
unsafe fn q6k_pairs<const P: usize>(w: *const u8, xq: *const u8, kb: usize, out: &mut [f32]) {
    debug_assert_eq!(out.len(), 2 * P);
    let m4 = _mm256_set1_epi8(0xF);
    let m2 = _mm256_set1_epi8(3);
    let m32s = _mm512_set1_epi8(32);
    let mut acc = [[_mm256_setzero_ps(); 2]; P];
    for b in 0..kb {
        let x = w.add(b * Q6K_BYTES);
        let xd = half_at(x.add(208));
        let scales = _mm_loadu_si128(x.add(192) as *const __m128i);
        let mut wv = [[[_mm512_setzero_si512(); 2]; 4]; 2];
        for (j, v) in wv.iter_mut().enumerate() {
            let q4 = x.add(64 * j);
            let q4bits1 = _mm256_loadu_si256(q4 as *const __m256i);
            let q4bits2 = _mm256_loadu_si256(q4.add(32) as *const __m256i);
            let q4bits_h = _mm256_loadu_si256(x.add(128 + 32 * j) as *const __m256i);
            let q4h_0 = _mm256_slli_epi16(_mm256_and_si256(q4bits_h, m2), 4);
            let q4h_1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bits_h, 2), m2), 4);
            let q4h_2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bits_h, 4), m2), 4);
            let q4h_3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(q4bits_h, 6), m2), 4);
            let q4 = [
                _mm256_or_si256(_mm256_and_si256(q4bits1, m4), q4h_0),
                _mm256_or_si256(_mm256_and_si256(q4bits2, m4), q4h_1),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits1, 4), m4), q4h_2),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits2, 4), m4), q4h_3),
            ];
            for (g, v) in v.iter_mut().enumerate() {
                let scale = _mm_shuffle_epi8(scales, shuffle_q6(4 * j + g));
                *v = [
                    _mm512_broadcast_i64x4(q4[g]),
                    _mm512_broadcast_i64x4(_mm256_cvtepi8_epi16(scale)),
                ];
            }
        }
        for (p, acc) in acc.iter_mut().enumerate() {
            let y: [*const u8; 2] =
                std::array::from_fn(|h| xq.add(((2 * p + h) * kb + b) * Q8K_BYTES));
            let mut sumi = _mm512_setzero_si512();
            for (j, groups) in wv.iter().enumerate() {
                let p: [__m512i; 4] = std::array::from_fn(|g| {
                    let off = 4 + 128 * j + 32 * g;
                    let q8g = pair(y, off);
                    let q8s = _mm512_maddubs_epi16(m32s, q8g);
                    let p16 = _mm512_sub_epi16(_mm512_maddubs_epi16(groups[g][0], q8g), q8s);
                    _mm512_madd_epi16(groups[g][1], p16)
                });
                sumi = _mm512_add_epi32(sumi, _mm512_add_epi32(p[0], p[1]));
                sumi = _mm512_add_epi32(sumi, _mm512_add_epi32(p[2], p[3]));
            }
            let halves = [
                _mm512_castsi512_si256(sumi),
                _mm512_extracti64x4_epi64::<1>(sumi),
            ];
            for h in 0..2 {
                let d = (y[h] as *const f32).read_unaligned() * xd;
                acc[h] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(halves[h]), acc[h]);
            }
        }
    }
    for (t, o) in out.iter_mut().enumerate() {
        *o = hsum_float_8(acc[t / 2][t % 2]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::k_quants::GgmlType;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Result, Tensor};

    type On = unsafe fn(bool, *const u8, *const u8, usize, &mut [f32]);

    /// Both instruction sets (AVX2 always, AVX-512 where this CPU has it) give every token of every
    /// height candle's one-token dot product, bit for bit.
    fn check<T: GgmlType>(dtype: GgmlDType, on: On) -> Result<()> {
        if !available() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let (n, k) = (5, 768);
        let kb = k / T::BLCK_SIZE;
        let q = QTensor::quantize(&Tensor::randn(0f32, 1.0, (n, k), &dev)?, dtype)?;
        let data = q.data()?;
        let x = Tensor::randn(0f32, 1.0, (MAX_TOKENS, k), &dev)?.to_vec2::<f32>()?;
        let mut xq = vec![T::VecDotType::zeros(); MAX_TOKENS * kb];
        for (row, blocks) in x.iter().zip(xq.chunks_exact_mut(kb)) {
            T::VecDotType::from_float(row, blocks);
        }
        // SAFETY: `data` is `n * kb` blocks of `T`, as candle stores them.
        let blocks: &[T] = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const T, n * kb) };
        for j in 0..n {
            let row = &blocks[j * kb..(j + 1) * kb];
            let want: Vec<f32> = (0..MAX_TOKENS)
                .map(|t| T::vec_dot(k, row, &xq[t * kb..(t + 1) * kb]))
                .collect();
            for wide in [false, wide()]
                .into_iter()
                .collect::<std::collections::BTreeSet<_>>()
            {
                for m in 1..=MAX_TOKENS {
                    let mut got = vec![0f32; m];
                    // SAFETY: the features are checked above; `row` holds `kb` blocks, `xq`
                    // `MAX_TOKENS * kb` q8_K blocks.
                    unsafe {
                        on(
                            wide,
                            row.as_ptr() as *const u8,
                            xq.as_ptr() as *const u8,
                            kb,
                            &mut got,
                        )
                    };
                    assert_eq!(got, want[..m], "{dtype:?} wide {wide} height {m} row {j}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn both_widths_give_candles_bits_at_every_height() -> Result<()> {
        check::<BlockQ4K>(GgmlDType::Q4K, q4k_on)?;
        check::<BlockQ6K>(GgmlDType::Q6K, q6k_on)
    }
}
