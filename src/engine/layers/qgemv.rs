//! `x · Wᵀ` on CPU for weights in ggml's 32-wide blocks (q8_0, q5_0, q4_0, q4_1), with the arithmetic of
//! ggml's `vec_dot_q*_q8_0`: each row of `x` is quantized to 8 bits with one f16-rounded scale per 32
//! values (as llama.cpp does; candle's repacked kernel takes one per 256), a block's integer dot
//! product is scaled by both block scales and summed in f32.
//!
//! Register-tiled: each task packs a tile of 8 weight rows into the kernel's layout (per block: the 8
//! rows' scales, then 8 vectors of which vector `c` holds bytes `4c..4c+4` of every row), so that one
//! broadcast 4-byte group of a token feeds an integer dot product (`vpdpbusd`) for 8 rows at once,
//! one 32-bit lane per row: no horizontal sums, the scales applied as one vector product per token
//! and block, several tokens and (with AVX-512) two tiles per pass to reuse each load. Packing is per
//! task, in a buffer that stays in cache, so the weights keep ggml's layout (one copy in memory).
//! Decode-sized batches skip the packing: 1 to 4 tokens go to the direct kernel (`x86::direct`: 8
//! rows as stored, each block's values loaded once for every token, each row's sum reduced across
//! lanes), 5 to 16 on AVX-512 VNNI to `few` (lanes are tokens). q8_0's signed weights are stored `+128`
//! (unsigned), `128 · Σx` coming off each block through the integer accumulator's starting value; q4_0
//! and q5_0 stay unsigned likewise (offset 8 / 16); q4_1's values (`d·q + m`) are unsigned as
//! stored, its min coming off per block in f32 as q4_K's does (`m · dx · Σxq`). Without VNNI (AVX2), 16-bit pair sums
//! (`vpmaddubsw`, `vpmaddwd`) do the same (q8_0 keeps its sign there: `|w| · (x · sign w)`), with the
//! same integer sums and the same float operations, so both give the same bits; elsewhere a scalar
//! loop. A row's result does not depend on the rows or tokens beside it (batched and speculative
//! decoding equal plain decoding). Tasks are tiles of weight rows (× chunks of tokens) on the engine's
//! pool, so a thread held up by another process does not stall the product.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, DType, Result, Tensor};
use half::f16;

#[cfg(target_arch = "x86_64")]
use super::simd;

mod few;

const QK: usize = 32;
/// Weight rows of one packed tile: one 32-bit lane each in a 256-bit vector.
const TILE: usize = 8;
/// Bytes of the values of one 32-value block of a packed tile: 8 rows × 32.
const VALUES: usize = TILE * QK;
/// Bytes of one vector of per-row f32 factors (scales, mins) of a packed block.
const HEAD: usize = 4 * TILE;
/// Tiles per task handed to a thread.
const TASK_TILES: usize = 2;
/// Tokens per task: a long prompt is split along tokens too, so that its activations stay in cache.
const TOKEN_CHUNK: usize = 256;

/// The most tokens the direct kernel (`x86::direct`, weights read in ggml's layout) takes: each
/// block's values are loaded once for all of them, and each (token, row) sum reduced across lanes.
/// Measured against the 32-block formats from memory (Zen 5, 1536 × 576 q8_0): 2 tokens 1.5×, 3
/// tokens 2×, 4 tokens 2.6× the time of one, where packing tiles costs 3.3–4× (AVX2: 1.8×, 2.3×,
/// 2.7× against 3.2×, 3.6×, 3.9×) and `few`'s 16 lanes 2.6× at any height.
const DIRECT_TOKENS: usize = 4;

/// Whether [`matmul`] serves `x · qᵀ`.
pub fn applies(x: &Tensor, q: &QTensor) -> bool {
    x.device().is_cpu()
        && q.device().is_cpu()
        && x.dtype() == DType::F32
        && x.rank() == 2
        // every height, rows a multiple of 256 included: candle's repacked kernel would quantize
        // the activations with one scale per 256 values (llama.cpp: one per 32), so a prompt's pass
        // would not compute what decoding computes
        && Format::of(q.dtype()).is_some_and(|f| {
            // k-quants: decode-sized batches go to `kgemv` (candle's block dot products), faster
            // than packing a tile for a row or a few
            !f.k_quant() || x.dim(0).is_ok_and(|m| m > super::kgemv::MAX_ROWS)
        })
        && x.dim(0).is_ok_and(|m| m >= 1)
        && x.dim(1).is_ok_and(|k| k % q.dtype().block_size() == 0)
}

/// `x` `[m, k]` times `q` `[n, k]` (q8_0, q5_0, q4_0, q4_1, or q4_K / q6_K) transposed: `[m, n]`.
pub fn matmul(x: &Tensor, q: &QTensor) -> Result<Tensor> {
    matmul_with(Path::detect(), x, q)
}

/// [`matmul`] through a given instruction set (tests force each one).
fn matmul_with(path: Path, x: &Tensor, q: &QTensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (n, k2) = q.shape().dims2()?;
    if k != k2 || k % q.dtype().block_size() != 0 {
        bail!("quantized matmul: x is [{m}, {k}] but the weight is [{n}, {k2}]")
    }
    let Some(format) = Format::of(q.dtype()) else {
        bail!("no 32-block kernel for {:?}", q.dtype())
    };
    let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let data = q.data()?;
    let blocks = k / q.dtype().block_size();
    if data.len() != n * blocks * format.block_bytes() {
        bail!("quantized weight storage is not {n}x{blocks} blocks")
    }
    let y = product(path, format, &data, n, &xs, m, k);
    Tensor::from_vec(y, (m, n), x.device())
}

/// The block formats the kernel reads: ggml's 32-wide ones, and the k-quants llama.cpp's q4_k_m
/// uses, read as 32-value units (q4_K: a scale and a min per 32; q6_K: a scale per 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Q8_0,
    Q4_0,
    /// `d·q + m`: a scale and a min per 32 (an asymmetric AWQ / GPTQ group, repacked).
    Q4_1,
    Q5_0,
    Q4K,
    Q6K,
}

impl Format {
    fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q6K => Some(Self::Q6K),
            _ => None,
        }
    }

    /// Bytes of one stored block.
    fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q4K => 144,
            Self::Q6K => 210,
        }
    }

    fn k_quant(self) -> bool {
        matches!(self, Self::Q4K | Self::Q6K)
    }

    /// 32-value units per stored block.
    fn units(self) -> usize {
        if self.k_quant() {
            8
        } else {
            1
        }
    }

    /// Whether a per-32 min comes off (q4_K, q4_1): `min · dx · Σxq` per block, in f32.
    fn mins(self) -> bool {
        matches!(self, Self::Q4K | Self::Q4_1)
    }

    /// Per-row f32 vectors before a packed block's values: the scale; q4_K's and q4_1's min
    /// (negated for q4_1: both subtract it), q6_K's second half's scale.
    fn heads(self) -> usize {
        if self.k_quant() || self == Self::Q4_1 {
            2
        } else {
            1
        }
    }

    /// Integer sums per 32-value unit: q6_K's two halves have scales of their own.
    fn halves(self) -> usize {
        if self == Self::Q6K {
            2
        } else {
            1
        }
    }

    /// Bytes of one packed 32-value block of a tile.
    fn packed(self) -> usize {
        self.heads() * HEAD + VALUES
    }
}

/// The instruction set the product runs on, chosen at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    #[cfg(target_arch = "x86_64")]
    Vnni,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Path {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if Self::Vnni.available() {
                return Self::Vnni;
            }
            if Self::Avx2.available() {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// Whether this CPU runs this path.
    fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Vnni => {
                is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512bw")
                    && Self::Avx2.available()
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            Self::Portable => true,
        }
    }

    /// What is subtracted from the packed (unsigned) values to give the weights: q8_0 is stored
    /// `+128` for `vpdpbusd`, signed for the AVX2 sign trick and the scalar loop. (q4_K's values
    /// are unsigned: its mins come off in f32.)
    fn offset(self, format: Format) -> i32 {
        match (self, format) {
            #[cfg(target_arch = "x86_64")]
            (Self::Vnni, Format::Q8_0) => 128,
            (_, Format::Q8_0) => 0,
            (_, Format::Q4_0) => 8,
            (_, Format::Q5_0) => 16,
            (_, Format::Q4K | Format::Q4_1) => 0,
            (_, Format::Q6K) => 32,
        }
    }
}

/// The rows of `x` quantized: values, per-block scales, per block (and half, for q6_K) the integer
/// the offset of the weights' packed values contributes (`-offset · Σx`, the accumulator's starting
/// value), and per block `d · Σx` (what q4_K's mins multiply).
struct Activations {
    q: Vec<i8>,
    d: Vec<f32>,
    c: Vec<i32>,
    s: Vec<f32>,
    k: usize,
}

/// Each row of `x` as q8_0: 8-bit values and one scale per 32 (rounded to f16, as ggml stores it).
fn quantize_rows(xs: &[f32], m: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    let kb = k / QK;
    let mut q = vec![0i8; m * k];
    let mut d = vec![0f32; m * kb];
    for ((block, qb), db) in xs.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).zip(&mut d) {
        let block: &[f32; QK] = block.try_into().expect("QK values");
        let qb: &mut [i8; QK] = qb.try_into().expect("QK values");
        #[cfg(target_arch = "x86_64")]
        let scale = if simd::avx2_fma() {
            // SAFETY: AVX2 is available (checked above).
            unsafe { x86::quantize_block(block, qb) }
        } else {
            quantize_block(block, qb)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let scale = quantize_block(block, qb);
        *db = f16::from_f32(scale).to_f32();
    }
    (q, d)
}

/// One block of 32 activations to 8 bits: returns the scale (`max |x| / 127`) before f16 rounding.
fn quantize_block(block: &[f32; QK], q: &mut [i8; QK]) -> f32 {
    let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    for (o, v) in q.iter_mut().zip(block) {
        *o = round_away(v * inv) as i8;
    }
    scale
}

/// `x.round() as i32` (halves away from zero) for `|x| < 2³¹`, without the libm call that kept the
/// loop above scalar (it took 5% of a batched decode): truncate, then step away from zero where
/// the dropped part (exact) is at least a half.
#[inline(always)]
fn round_away(x: f32) -> i32 {
    let t = x as i32;
    let up = ((x - t as f32).abs() >= 0.5) as i32;
    t + if x < 0.0 { -up } else { up }
}

/// `y` `[m, n]` = `x` `[m, k]` · `w`ᵀ, `w` being `n` rows of `format` blocks.
fn product(
    path: Path,
    format: Format,
    w: &[u8],
    n: usize,
    xs: &[f32],
    m: usize,
    k: usize,
) -> Vec<f32> {
    let (q, d) = quantize_rows(xs, m, k);
    let offset = path.offset(format);
    let c = q
        .chunks_exact(QK / format.halves())
        .map(|b| -offset * b.iter().map(|v| *v as i32).sum::<i32>())
        .collect();
    let s = if format.mins() {
        q.chunks_exact(QK)
            .zip(&d)
            .map(|(b, d)| b.iter().map(|v| *v as i32).sum::<i32>() as f32 * d)
            .collect()
    } else {
        Vec::new()
    };
    let act = Activations { q, d, c, s, k };
    let few = few::prepare(path, format, &act, m);
    let mut y = vec![0f32; m * n];
    let out = y.as_mut_ptr() as usize;
    let task_rows = TILE * TASK_TILES;
    let row_tasks = n.div_ceil(task_rows);
    let token_tasks = m.div_ceil(TOKEN_CHUNK);
    // the engine's kernel pool, not rayon: the caller works alongside briefly spinning workers
    // and never waits for one that has not started (a decode step runs ~100 of these)
    super::pool::pool().run(row_tasks * token_tasks, |tasks| {
        let mut buf = Vec::new();
        let mut packed = usize::MAX;
        for task in tasks {
            let (rt, tt) = (task / token_tasks, task % token_tasks);
            let rows = rt * task_rows..((rt + 1) * task_rows).min(n);
            let tokens = tt * TOKEN_CHUNK..((tt + 1) * TOKEN_CHUNK).min(m);
            let out = Out {
                ptr: out as *mut f32,
                n,
            };
            match path {
                #[cfg(target_arch = "x86_64")]
                Path::Vnni | Path::Avx2 if m <= DIRECT_TOKENS && !format.k_quant() => {
                    // a token or a few: straight from ggml's layout, the same sums without the
                    // transposes; SAFETY: as below.
                    unsafe { x86::direct(path, format, w, n, rows, &act, out) };
                }
                #[cfg(target_arch = "x86_64")]
                Path::Vnni | Path::Avx2 if let Some(few) = &few => {
                    // 5 to 16 tokens: straight from ggml's layout too; SAFETY: as below.
                    unsafe { few::product(few, format, w, n, rows, out) };
                }
                #[cfg(target_arch = "x86_64")]
                Path::Vnni | Path::Avx2 => {
                    if packed != rt {
                        buf.resize(rows.len().div_ceil(TILE) * (k / QK) * format.packed(), 0);
                        // SAFETY: the path's features were detected (`Path::available`); `w` holds
                        // `n` rows of `k / 32` blocks (checked by the caller), `buf` the tiles.
                        unsafe { x86::pack(path, format, w, n, k, rows.clone(), &mut buf) };
                        packed = rt;
                    }
                    // SAFETY: as above; `out` is `[m, n]`, these rows' columns belong to this task.
                    unsafe { x86::tiles(path, format, &buf, rows, tokens, &act, out) };
                }
                Path::Portable => portable(format, w, rows, tokens, &act, out),
            }
        }
    });
    y
}

/// Where results go: `y` `[m, n]`, row-major.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    n: usize,
}

/// Unit `u` (32 values) of a stored block as the kernel reads it: the values (unsigned, minus
/// `Path::offset`, except q8_0's signed ones, stored as bytes) and the per-row factors (the scale;
/// q4_K's min or q6_K's second scale).
fn unit(format: Format, blk: &[u8], u: usize, values: &mut [u8]) -> [f32; 2] {
    let half = |i: usize| f16::from_bits(u16::from_le_bytes([blk[i], blk[i + 1]])).to_f32();
    match format {
        Format::Q8_0 => {
            values.copy_from_slice(&blk[2..34]);
            [half(0), 0.0]
        }
        Format::Q4_0 | Format::Q5_0 => {
            let (qh, qs) = if format == Format::Q5_0 {
                (
                    u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]),
                    &blk[6..22],
                )
            } else {
                (0, &blk[2..18])
            };
            for j in 0..16 {
                values[j] = ((qs[j] & 0x0F) as u32 | (((qh >> j) & 1) << 4)) as u8;
                values[j + 16] = ((qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4)) as u8;
            }
            [half(0), 0.0]
        }
        Format::Q4_1 => {
            for j in 0..16 {
                values[j] = blk[4 + j] & 0x0F;
                values[j + 16] = blk[4 + j] >> 4;
            }
            // the min is subtracted, as q4_K's is: stored negated (exactly)
            [half(0), -half(2)]
        }
        Format::Q4K => {
            let qs = &blk[16 + 32 * (u / 2)..16 + 32 * (u / 2) + 32];
            for (v, q) in values.iter_mut().zip(qs) {
                *v = if u.is_multiple_of(2) {
                    q & 0x0F
                } else {
                    q >> 4
                };
            }
            let (sc, m) = scale_min_k4(u, &blk[4..16]);
            [half(0) * sc as f32, half(2) * m as f32]
        }
        Format::Q6K => {
            let (n, r) = (u / 4, u % 4);
            let ql = &blk[64 * n + 32 * (r % 2)..];
            let qh = &blk[128 + 32 * n..];
            for l in 0..32 {
                let lo = if r < 2 { ql[l] & 0x0F } else { ql[l] >> 4 };
                values[l] = lo | (((qh[l] >> (2 * r)) & 3) << 4);
            }
            let d = half(208);
            let sc = &blk[192 + 8 * n + 2 * r..];
            [d * sc[0] as i8 as f32, d * sc[1] as i8 as f32]
        }
    }
}

/// q4_K's 6-bit scale and min of sub-block `j` (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The scalar product, for CPUs without AVX2.
#[allow(clippy::needless_range_loop)]
fn portable(
    format: Format,
    w: &[u8],
    rows: std::ops::Range<usize>,
    tokens: std::ops::Range<usize>,
    act: &Activations,
    out: Out,
) {
    let (k, kb) = (act.k, act.k / QK);
    let (units, bb, halves) = (format.units(), format.block_bytes(), format.halves());
    let row_bytes = kb / units * bb;
    let mut values = vec![0u8; k];
    let mut heads = vec![[0f32; 2]; kb];
    let hw = QK / halves;
    for j in rows {
        let row = &w[j * row_bytes..(j + 1) * row_bytes];
        for (b, h) in heads.iter_mut().enumerate() {
            let blk = &row[b / units * bb..];
            *h = unit(format, blk, b % units, &mut values[b * QK..(b + 1) * QK]);
        }
        for i in tokens.clone() {
            let xq = &act.q[i * k..(i + 1) * k];
            let mut acc = 0f32;
            for (b, head) in heads.iter().enumerate() {
                let dx = act.d[i * kb + b];
                for h in 0..halves {
                    let lanes = b * QK + h * hw..b * QK + (h + 1) * hw;
                    let dot: i32 = values[lanes.clone()]
                        .iter()
                        .zip(&xq[lanes])
                        .map(|(a, c)| {
                            let a = if format == Format::Q8_0 {
                                *a as i8 as i32
                            } else {
                                *a as i32
                            };
                            a * *c as i32
                        })
                        .sum();
                    let isum = dot + act.c[(i * kb + b) * halves + h];
                    acc += isum as f32 * (head[h] * dx);
                }
                if format.mins() {
                    acc -= head[1] * act.s[i * kb + b];
                }
            }
            // SAFETY: `i < m`, `j < n`; column `j` belongs to this task alone.
            unsafe { *out.ptr.add(i * out.n + j) = acc };
        }
    }
}

#[cfg(target_arch = "x86_64")]
// tiles of registers are indexed by row, token and tile
#[allow(clippy::needless_range_loop)]
mod x86 {
    use super::{Activations, Format, Out, Path, HEAD, QK, TILE};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Integer products: `vpdpbusd`, or AVX2 pair sums of signed q8_0 (`|w| · (x · sign w)`) or of
    /// unsigned values (≤ 63, so the 16-bit pair sums cannot saturate).
    const VNNI: u8 = 0;
    const SIGNED: u8 = 1;
    const UNSIGNED: u8 = 2;

    /// `quantize_block` with vectors, the same bits: the maximum is exact in any order, each
    /// product is the same single rounding, and rounding halves away from zero is `round_away`'s
    /// truncate-and-step.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_block(block: &[f32; QK], q: &mut [i8; QK]) -> f32 {
        let p = block.as_ptr();
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)));
        let sign = _mm256_set1_ps(-0.0);
        let m = v.iter().fold(_mm256_setzero_ps(), |a, x| {
            _mm256_max_ps(a, _mm256_andnot_ps(sign, *x))
        });
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
        let half = _mm256_set1_ps(0.5);
        let ints: [__m256i; 4] = std::array::from_fn(|i| {
            let x = _mm256_mul_ps(v[i], inv);
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(x);
            let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(x, t));
            let up = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, half);
            // ±1 with x's sign where the dropped part is at least a half
            let step = _mm256_and_ps(
                up,
                _mm256_or_ps(_mm256_set1_ps(1.0), _mm256_and_ps(sign, x)),
            );
            _mm256_cvttps_epi32(_mm256_add_ps(t, step))
        });
        let w01 = _mm256_packs_epi32(ints[0], ints[1]);
        let w23 = _mm256_packs_epi32(ints[2], ints[3]);
        let b = _mm256_packs_epi16(w01, w23);
        let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, b);
        scale
    }

    /// Packs weight rows `rows` (tiles of 8; rows past `n` repeat the last) into `buf`.
    pub unsafe fn pack(
        path: Path,
        format: Format,
        w: &[u8],
        n: usize,
        k: usize,
        rows: Range<usize>,
        buf: &mut [u8],
    ) {
        match path {
            Path::Vnni => pack_vnni(format, w, n, k, rows, buf),
            _ => pack_avx2(format, w, n, k, rows, buf),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    unsafe fn pack_vnni(
        format: Format,
        w: &[u8],
        n: usize,
        k: usize,
        rows: Range<usize>,
        buf: &mut [u8],
    ) {
        pack_with::<true>(format, w, n, k, rows, buf)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pack_avx2(
        format: Format,
        w: &[u8],
        n: usize,
        k: usize,
        rows: Range<usize>,
        buf: &mut [u8],
    ) {
        pack_with::<false>(format, w, n, k, rows, buf)
    }

    #[inline(always)]
    unsafe fn pack_with<const UNSIGNED_Q8: bool>(
        format: Format,
        w: &[u8],
        n: usize,
        k: usize,
        rows: Range<usize>,
        buf: &mut [u8],
    ) {
        let kb = k / QK;
        let (bb, units, packed) = (format.block_bytes(), format.units(), format.packed());
        let row_bytes = kb / units * bb;
        let wp = w.as_ptr();
        let bp = buf.as_mut_ptr();
        let flip = _mm256_set1_epi8(-128);
        let mut heads = [[0f32; TILE]; 2];
        let mut heads_of = [[[0f32; 2]; 8]; TILE];
        for (t, r0) in rows.step_by(TILE).enumerate() {
            let row: [*const u8; TILE] =
                std::array::from_fn(|r| wp.add((r0 + r).min(n - 1) * row_bytes));
            for b in 0..kb {
                let dst = bp.add((t * kb + b) * packed);
                let u = b % units;
                if u == 0 {
                    // the next tile's rows, in step (see `direct_with`)
                    let next = wp.wrapping_add((r0 + TILE) * row_bytes + b / units * TILE * bb);
                    for l in (0..TILE * bb).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(l) as *const i8);
                    }
                }
                let mut bits = [0u16; TILE];
                let mut v = [_mm256_setzero_si256(); TILE];
                for r in 0..TILE {
                    let blk = row[r].add(b / units * bb);
                    bits[r] = (blk as *const u16).read_unaligned();
                    v[r] = match format {
                        Format::Q8_0 => {
                            let raw = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                            if UNSIGNED_Q8 {
                                _mm256_xor_si256(raw, flip)
                            } else {
                                raw
                            }
                        }
                        Format::Q4_0 | Format::Q4_1 | Format::Q5_0 => unpack(format, blk),
                        Format::Q4K => {
                            let q =
                                _mm256_loadu_si256(blk.add(16 + 32 * (u / 2)) as *const __m256i);
                            let q = if u % 2 == 0 {
                                q
                            } else {
                                _mm256_srli_epi16(q, 4)
                            };
                            _mm256_and_si256(q, _mm256_set1_epi8(0x0F))
                        }
                        Format::Q6K => {
                            let (h, r) = (u / 4, u % 4);
                            let ql = _mm256_loadu_si256(
                                blk.add(64 * h + 32 * (r % 2)) as *const __m256i
                            );
                            let ql = if r < 2 { ql } else { _mm256_srli_epi16(ql, 4) };
                            let lo = _mm256_and_si256(ql, _mm256_set1_epi8(0x0F));
                            let qh = _mm256_loadu_si256(blk.add(128 + 32 * h) as *const __m256i);
                            let hb = _mm256_and_si256(
                                _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * r as i32)),
                                _mm256_set1_epi8(3),
                            );
                            _mm256_or_si256(lo, _mm256_slli_epi16(hb, 4))
                        }
                    };
                    if format.k_quant() && u == 0 {
                        // the factors of this block's 8 units, once per block
                        let mut scratch = [0u8; QK];
                        for uu in 0..units {
                            let f = super::unit(
                                format,
                                std::slice::from_raw_parts(blk, bb),
                                uu,
                                &mut scratch,
                            );
                            heads_of[r][uu] = f;
                        }
                    }
                }
                if format.k_quant() {
                    for r in 0..TILE {
                        heads[0][r] = heads_of[r][u][0];
                        heads[1][r] = heads_of[r][u][1];
                    }
                    _mm256_storeu_ps(dst as *mut f32, _mm256_loadu_ps(heads[0].as_ptr()));
                    _mm256_storeu_ps(
                        dst.add(HEAD) as *mut f32,
                        _mm256_loadu_ps(heads[1].as_ptr()),
                    );
                } else {
                    let scales = _mm256_cvtph_ps(_mm_loadu_si128(bits.as_ptr() as *const __m128i));
                    _mm256_storeu_ps(dst as *mut f32, scales);
                    if format == Format::Q4_1 {
                        let mins: [u16; TILE] = std::array::from_fn(|r| {
                            (row[r].add(b * bb + 2) as *const u16).read_unaligned()
                        });
                        let mins =
                            _mm256_cvtph_ps(_mm_loadu_si128(mins.as_ptr() as *const __m128i));
                        // negated, exactly: the kernels subtract mins
                        let mins = _mm256_xor_ps(mins, _mm256_set1_ps(-0.0));
                        _mm256_storeu_ps(dst.add(HEAD) as *mut f32, mins);
                    }
                }
                // an 8×8 transpose of 32-bit groups: vector c = group c of every row
                let t0 = _mm256_unpacklo_epi32(v[0], v[1]);
                let t1 = _mm256_unpackhi_epi32(v[0], v[1]);
                let t2 = _mm256_unpacklo_epi32(v[2], v[3]);
                let t3 = _mm256_unpackhi_epi32(v[2], v[3]);
                let t4 = _mm256_unpacklo_epi32(v[4], v[5]);
                let t5 = _mm256_unpackhi_epi32(v[4], v[5]);
                let t6 = _mm256_unpacklo_epi32(v[6], v[7]);
                let t7 = _mm256_unpackhi_epi32(v[6], v[7]);
                let u0 = _mm256_unpacklo_epi64(t0, t2);
                let u1 = _mm256_unpackhi_epi64(t0, t2);
                let u2 = _mm256_unpacklo_epi64(t1, t3);
                let u3 = _mm256_unpackhi_epi64(t1, t3);
                let u4 = _mm256_unpacklo_epi64(t4, t6);
                let u5 = _mm256_unpackhi_epi64(t4, t6);
                let u6 = _mm256_unpacklo_epi64(t5, t7);
                let u7 = _mm256_unpackhi_epi64(t5, t7);
                let q = dst.add(format.heads() * HEAD) as *mut __m256i;
                _mm256_storeu_si256(q, _mm256_permute2x128_si256(u0, u4, 0x20));
                _mm256_storeu_si256(q.add(1), _mm256_permute2x128_si256(u1, u5, 0x20));
                _mm256_storeu_si256(q.add(2), _mm256_permute2x128_si256(u2, u6, 0x20));
                _mm256_storeu_si256(q.add(3), _mm256_permute2x128_si256(u3, u7, 0x20));
                _mm256_storeu_si256(q.add(4), _mm256_permute2x128_si256(u0, u4, 0x31));
                _mm256_storeu_si256(q.add(5), _mm256_permute2x128_si256(u1, u5, 0x31));
                _mm256_storeu_si256(q.add(6), _mm256_permute2x128_si256(u2, u6, 0x31));
                _mm256_storeu_si256(q.add(7), _mm256_permute2x128_si256(u3, u7, 0x31));
            }
        }
    }

    /// The few tokens of `act` (at most [`super::DIRECT_TOKENS`]) against weight rows `rows` read in
    /// ggml's layout, 8 at a time: per block, each row's values are loaded once for every token,
    /// and each (token, row) integer sum is reduced across lanes (exact), so every bit equals the
    /// tiled kernel's.
    pub unsafe fn direct(
        path: Path,
        format: Format,
        w: &[u8],
        n: usize,
        rows: Range<usize>,
        act: &Activations,
        out: Out,
    ) {
        let m = act.q.len() / act.k;
        macro_rules! tokens {
            ($p:ident, $($f:tt)*) => {
                match m {
                    1 => $p::<$($f)*, 1>((w, n, rows, act, out)),
                    2 => $p::<$($f)*, 2>((w, n, rows, act, out)),
                    3 => $p::<$($f)*, 3>((w, n, rows, act, out)),
                    _ => $p::<$($f)*, 4>((w, n, rows, act, out)),
                }
            };
        }
        debug_assert!((1..=super::DIRECT_TOKENS).contains(&m));
        match (path, format) {
            (Path::Vnni, Format::Q8_0) => tokens!(direct_vnni, { F_Q8_0 }),
            (Path::Vnni, Format::Q4_1) => tokens!(direct_vnni, { F_Q4_1 }),
            (Path::Vnni, Format::Q5_0) => tokens!(direct_vnni, { F_Q5_0 }),
            (Path::Vnni, _) => tokens!(direct_vnni, { F_Q4_0 }),
            (_, Format::Q8_0) => tokens!(direct_avx2, SIGNED, { F_Q8_0 }),
            (_, Format::Q4_1) => tokens!(direct_avx2, UNSIGNED, { F_Q4_1 }),
            (_, Format::Q5_0) => tokens!(direct_avx2, UNSIGNED, { F_Q5_0 }),
            _ => tokens!(direct_avx2, UNSIGNED, { F_Q4_0 }),
        }
    }

    /// The 32-block formats of the direct path, as constants (one compiled loop each).
    const F_Q8_0: u8 = 0;
    const F_Q4_0: u8 = 1;
    const F_Q4_1: u8 = 2;
    const F_Q5_0: u8 = 3;

    const fn format_of(f: u8) -> Format {
        match f {
            F_Q8_0 => Format::Q8_0,
            F_Q4_0 => Format::Q4_0,
            F_Q4_1 => Format::Q4_1,
            _ => Format::Q5_0,
        }
    }

    type DirectArgs<'a> = (&'a [u8], usize, Range<usize>, &'a Activations, Out);

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    unsafe fn direct_vnni<const F: u8, const T: usize>(a: DirectArgs) {
        direct_with::<VNNI, F, T>(a)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn direct_avx2<const P: u8, const F: u8, const T: usize>(a: DirectArgs) {
        direct_with::<P, F, T>(a)
    }

    /// A block's 32 values as the dot product takes them (q8_0's flipped to unsigned for VNNI).
    #[inline(always)]
    unsafe fn block_values<const P: u8, const F: u8>(blk: *const u8) -> __m256i {
        let format = format_of(F);
        match format {
            Format::Q8_0 if P == VNNI => _mm256_xor_si256(
                _mm256_loadu_si256(blk.add(2) as *const __m256i),
                _mm256_set1_epi8(-128),
            ),
            Format::Q8_0 => _mm256_loadu_si256(blk.add(2) as *const __m256i),
            _ => unpack(format, blk),
        }
    }

    /// One block's 8 lanes of a row's integer sum (each lane starting at `c`, the offset's share).
    #[inline(always)]
    unsafe fn block_dot<const P: u8, const F: u8>(v: __m256i, xv: __m256i, c: __m256i) -> __m256i {
        match P {
            VNNI => _mm256_dpbusd_epi32(c, v, xv),
            SIGNED => _mm256_madd_epi16(
                _mm256_maddubs_epi16(_mm256_abs_epi8(v), _mm256_sign_epi8(xv, v)),
                _mm256_set1_epi16(1),
            ),
            _ => _mm256_add_epi32(
                c,
                _mm256_madd_epi16(_mm256_maddubs_epi16(v, xv), _mm256_set1_epi16(1)),
            ),
        }
    }

    /// The 8 rows' lane sums reduced to one vector, row `r` in lane `r` (exact integer sums).
    #[inline(always)]
    unsafe fn reduce_rows(p: &[__m256i; TILE]) -> __m256i {
        let h01 = _mm256_hadd_epi32(p[0], p[1]);
        let h23 = _mm256_hadd_epi32(p[2], p[3]);
        let h45 = _mm256_hadd_epi32(p[4], p[5]);
        let h67 = _mm256_hadd_epi32(p[6], p[7]);
        let q0 = _mm256_hadd_epi32(h01, h23);
        let q1 = _mm256_hadd_epi32(h45, h67);
        _mm256_add_epi32(
            _mm256_permute2x128_si256(q0, q1, 0x20),
            _mm256_permute2x128_si256(q0, q1, 0x31),
        )
    }

    #[inline(always)]
    unsafe fn direct_with<const P: u8, const F: u8, const T: usize>(
        (w, n, rows, act, out): DirectArgs,
    ) {
        debug_assert!(rows.end <= n);
        let format = format_of(F);
        let k = act.k;
        let kb = k / QK;
        let bb = format.block_bytes();
        let row_bytes = kb * bb;
        let (wp, xp) = (w.as_ptr(), act.q.as_ptr());
        // 8 rows at a time: their 8 integer sums reduced together into one vector, then the tiles'
        // lane arithmetic on it (the same bits as the tiles, a fraction of the reductions)
        // Eight interleaved streams of a few cache lines each (a row of 576 q4_0 values is 5) train
        // no hardware prefetcher: the 8 rows two groups ahead (contiguous) are fetched in step, a
        // block's share of their bytes per block. (Prefetches past the weights do not fault.)
        let ahead = 2 * TILE * row_bytes;
        let mut j = rows.start;
        while j + TILE <= rows.end {
            let row: [*const u8; TILE] = std::array::from_fn(|r| wp.add((j + r) * row_bytes));
            let mut acc = [_mm256_setzero_ps(); T];
            for b in 0..kb {
                let next = row[0].wrapping_add(ahead + b * TILE * bb);
                for l in (0..TILE * bb).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(l) as *const i8);
                }
                let mut v = [_mm256_setzero_si256(); TILE];
                let mut bits = [0u16; TILE];
                for r in 0..TILE {
                    let blk = row[r].add(b * bb);
                    v[r] = block_values::<P, F>(blk);
                    bits[r] = (blk as *const u16).read_unaligned();
                }
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(bits.as_ptr() as *const __m128i));
                let mins = if format == Format::Q4_1 {
                    let mins: [u16; TILE] = std::array::from_fn(|r| {
                        (row[r].add(b * bb + 2) as *const u16).read_unaligned()
                    });
                    _mm256_cvtph_ps(_mm_loadu_si128(mins.as_ptr() as *const __m128i))
                } else {
                    _mm256_setzero_ps()
                };
                for (t, acc) in acc.iter_mut().enumerate() {
                    let tb = t * kb + b;
                    let xv = _mm256_loadu_si256(xp.add(t * k + b * QK) as *const __m256i);
                    let c = _mm256_set1_epi32(*act.c.get_unchecked(tb) / 8);
                    let p: [__m256i; TILE] =
                        std::array::from_fn(|r| block_dot::<P, F>(v[r], xv, c));
                    let sums = reduce_rows(&p);
                    let f = _mm256_mul_ps(dw, _mm256_set1_ps(*act.d.get_unchecked(tb)));
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), f, *acc);
                    if format == Format::Q4_1 {
                        let s = _mm256_set1_ps(*act.s.get_unchecked(tb));
                        *acc = _mm256_fmadd_ps(mins, s, *acc);
                    }
                }
            }
            for (t, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.ptr.add(t * out.n + j), *acc);
            }
            j += TILE;
        }
        for j in j..rows.end {
            let row = wp.add(j * row_bytes);
            for t in 0..T {
                let mut acc = _mm_setzero_ps();
                for b in 0..kb {
                    let tb = t * kb + b;
                    let blk = row.add(b * bb);
                    let xv = _mm256_loadu_si256(xp.add(t * k + b * QK) as *const __m256i);
                    // the offset's share of each of the 8 lanes the row's sum is reduced from
                    let c = _mm256_set1_epi32(*act.c.get_unchecked(tb) / 8);
                    let p = block_dot::<P, F>(block_values::<P, F>(blk), xv, c);
                    // the exact integer sum, then the tiles' lane arithmetic in a scalar lane: the
                    // same bits
                    let s =
                        _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
                    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
                    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
                    let bits = (blk as *const u16).read_unaligned();
                    let dw = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
                    let f = _mm_mul_ss(dw, _mm_set_ss(*act.d.get_unchecked(tb)));
                    acc = _mm_fmadd_ss(_mm_cvtepi32_ps(s), f, acc);
                    if format == Format::Q4_1 {
                        // `acc − (−m)·s` as the tiles compute it: one rounding, the same bits
                        let bits = (blk.add(2) as *const u16).read_unaligned();
                        let m = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
                        acc = _mm_fmadd_ss(m, _mm_set_ss(*act.s.get_unchecked(tb)), acc);
                    }
                }
                *out.ptr.add(t * out.n + j) = _mm_cvtss_f32(acc);
            }
        }
    }

    /// A q4_0 / q4_1 / q5_0 block's 32 unsigned values: low nibbles are elements 0..16, high
    /// nibbles 16..32, q5_0's fifth bits add 16 where set.
    #[inline(always)]
    pub unsafe fn unpack(format: Format, blk: *const u8) -> __m256i {
        let q5 = format == Format::Q5_0;
        let at = match format {
            Format::Q5_0 => 6,
            Format::Q4_1 => 4,
            _ => 2,
        };
        let qs = _mm_loadu_si128(blk.add(at) as *const __m128i);
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

    /// Per-row factors of the packed block: the scale, then q4_K's min.
    const PLAIN: u8 = 0;
    /// q4_K: a scale and a min per 32.
    const MINS: u8 = 1;
    /// q6_K: a scale per 16.
    const HALVES: u8 = 2;

    /// The packed tiles in `buf` (weight rows `rows`) times tokens `tokens`, into `out`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tiles(
        path: Path,
        format: Format,
        buf: &[u8],
        rows: Range<usize>,
        tokens: Range<usize>,
        act: &Activations,
        out: Out,
    ) {
        let a = (buf, rows, tokens, act, out);
        match (path, format) {
            (Path::Vnni, Format::Q4K | Format::Q4_1) => tiles_vnni::<MINS>(a),
            (Path::Vnni, Format::Q6K) => tiles_vnni::<HALVES>(a),
            (Path::Vnni, _) => tiles_vnni::<PLAIN>(a),
            (_, Format::Q8_0) => tiles_avx2::<SIGNED, PLAIN>(a),
            (_, Format::Q4K | Format::Q4_1) => tiles_avx2::<UNSIGNED, MINS>(a),
            (_, Format::Q6K) => tiles_avx2::<UNSIGNED, HALVES>(a),
            _ => tiles_avx2::<UNSIGNED, PLAIN>(a),
        }
    }

    type Args<'a> = (&'a [u8], Range<usize>, Range<usize>, &'a Activations, Out);

    /// Bytes of one packed block for a kind.
    const fn packed(kind: u8) -> usize {
        if kind == PLAIN {
            HEAD + super::VALUES
        } else {
            2 * HEAD + super::VALUES
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    unsafe fn tiles_vnni<const KIND: u8>((buf, rows, tokens, act, out): Args) {
        let kb = act.k / QK;
        let (bp, tile_bytes) = (buf.as_ptr(), kb * packed(KIND));
        let mut j = rows.start;
        let mut t = 0;
        while j < rows.end {
            let left = rows.end - j;
            let tiles = bp.add(t * tile_bytes);
            if left > TILE {
                by_tokens::<VNNI, KIND, 2>(tiles, j, left, tokens.clone(), act, out);
                j += 2 * TILE;
                t += 2;
            } else {
                by_tokens::<VNNI, KIND, 1>(tiles, j, left, tokens.clone(), act, out);
                j += TILE;
                t += 1;
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tiles_avx2<const P: u8, const KIND: u8>((buf, rows, tokens, act, out): Args) {
        let kb = act.k / QK;
        let (bp, tile_bytes) = (buf.as_ptr(), kb * packed(KIND));
        for (t, j) in rows.clone().step_by(TILE).enumerate() {
            let tiles = bp.add(t * tile_bytes);
            by_tokens::<P, KIND, 1>(tiles, j, rows.end - j, tokens.clone(), act, out);
        }
    }

    /// `G` tiles from weight row `j` (`valid` rows of them exist) against every token.
    #[inline(always)]
    unsafe fn by_tokens<const P: u8, const KIND: u8, const G: usize>(
        tiles: *const u8,
        j: usize,
        valid: usize,
        tokens: Range<usize>,
        act: &Activations,
        out: Out,
    ) {
        let mut i = tokens.start;
        while i < tokens.end {
            i += match tokens.end - i {
                4.. => kernel::<P, KIND, G, 4>(tiles, j, valid, i, act, out),
                3 => kernel::<P, KIND, G, 3>(tiles, j, valid, i, act, out),
                2 => kernel::<P, KIND, G, 2>(tiles, j, valid, i, act, out),
                _ => kernel::<P, KIND, G, 1>(tiles, j, valid, i, act, out),
            };
        }
    }

    /// `G` tiles × tokens `i0..i0 + T`; returns `T`. Each token's arithmetic is the same whatever
    /// `G`, `T` and the instruction set: exact integer sums, then per sum one f32 product of the
    /// scales and one fused multiply-add (and for q4_K one more for the min).
    #[inline(always)]
    unsafe fn kernel<const P: u8, const KIND: u8, const G: usize, const T: usize>(
        tiles: *const u8,
        j: usize,
        valid: usize,
        i0: usize,
        act: &Activations,
        out: Out,
    ) -> usize {
        let (k, kb) = (act.k, act.k / QK);
        let pk = packed(KIND);
        let halves = if KIND == HALVES { 2 } else { 1 };
        let values = if KIND == PLAIN { HEAD } else { 2 * HEAD };
        let tile_bytes = kb * pk;
        let ones = _mm256_set1_epi16(1);
        let xq = act.q.as_ptr().add(i0 * k);
        let mut acc = [[_mm256_setzero_ps(); T]; G];
        for b in 0..kb {
            let mut dx = [_mm256_setzero_ps(); T];
            for t in 0..T {
                dx[t] = _mm256_set1_ps(*act.d.get_unchecked((i0 + t) * kb + b));
            }
            for h in 0..halves {
                let mut p = [[_mm256_setzero_si256(); T]; G];
                for t in 0..T {
                    let c = *act.c.get_unchecked(((i0 + t) * kb + b) * halves + h);
                    let c = _mm256_set1_epi32(c);
                    for g in 0..G {
                        p[g][t] = c;
                    }
                }
                for c in h * TILE / halves..(h + 1) * TILE / halves {
                    let mut wv = [_mm256_setzero_si256(); G];
                    let mut aw = [_mm256_setzero_si256(); G];
                    for g in 0..G {
                        let src = tiles.add(g * tile_bytes + b * pk + values + 32 * c);
                        wv[g] = _mm256_loadu_si256(src as *const __m256i);
                        if P == SIGNED {
                            aw[g] = _mm256_abs_epi8(wv[g]);
                        }
                    }
                    for t in 0..T {
                        let x4 = (xq.add(t * k + b * QK + 4 * c) as *const i32).read_unaligned();
                        let bx = _mm256_set1_epi32(x4);
                        for g in 0..G {
                            p[g][t] = match P {
                                VNNI => _mm256_dpbusd_epi32(p[g][t], wv[g], bx),
                                SIGNED => _mm256_add_epi32(
                                    p[g][t],
                                    _mm256_madd_epi16(
                                        _mm256_maddubs_epi16(aw[g], _mm256_sign_epi8(bx, wv[g])),
                                        ones,
                                    ),
                                ),
                                _ => _mm256_add_epi32(
                                    p[g][t],
                                    _mm256_madd_epi16(_mm256_maddubs_epi16(wv[g], bx), ones),
                                ),
                            };
                        }
                    }
                }
                for g in 0..G {
                    let head = tiles.add(g * tile_bytes + b * pk + h * HEAD) as *const f32;
                    let dw = _mm256_loadu_ps(head);
                    for t in 0..T {
                        let f = _mm256_mul_ps(dw, dx[t]);
                        acc[g][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[g][t]), f, acc[g][t]);
                    }
                }
            }
            if KIND == MINS {
                for g in 0..G {
                    let head = tiles.add(g * tile_bytes + b * pk + HEAD) as *const f32;
                    let min = _mm256_loadu_ps(head);
                    for t in 0..T {
                        let s = _mm256_set1_ps(*act.s.get_unchecked((i0 + t) * kb + b));
                        acc[g][t] = _mm256_fnmadd_ps(min, s, acc[g][t]);
                    }
                }
            }
        }
        for g in 0..G {
            let jg = j + g * TILE;
            let rows = valid.saturating_sub(g * TILE).min(TILE);
            for t in 0..T {
                let dst = out.ptr.add((i0 + t) * out.n + jg);
                if rows == TILE {
                    _mm256_storeu_ps(dst, acc[g][t]);
                } else {
                    let mut lanes = [0f32; TILE];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), acc[g][t]);
                    std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, rows);
                }
            }
        }
        T
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module};

    const DTYPES: [GgmlDType; 4] = [
        GgmlDType::Q8_0,
        GgmlDType::Q5_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
    ];
    const ALL: [GgmlDType; 6] = [
        GgmlDType::Q8_0,
        GgmlDType::Q5_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ];

    /// Row lengths to test: multiples of the block, not of 256 where the block allows.
    fn widths(dtype: GgmlDType) -> Vec<usize> {
        if dtype.block_size() == 256 {
            vec![256, 768]
        } else {
            vec![32, 96, 160, 64, 96, 320]
        }
    }

    /// Every path this CPU can run (an AVX-512 machine runs the AVX2 and scalar ones too).
    fn paths() -> Vec<Path> {
        let mut all = vec![Path::Portable];
        #[cfg(target_arch = "x86_64")]
        all.extend(
            [Path::Vnni, Path::Avx2]
                .into_iter()
                .filter(|p| p.available()),
        );
        all
    }

    /// The product in f64 from the dequantized weight and the activations as the kernel quantizes
    /// them (one scale per 32): what every path must give up to f32 rounding.
    fn reference(x: &Tensor, q: &QTensor) -> Result<(Vec<f64>, Vec<f64>)> {
        let (m, k) = x.dims2()?;
        let (n, _) = q.shape().dims2()?;
        let w = q
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (xq, xd) = quantize_rows(&x.flatten_all()?.to_vec1::<f32>()?, m, k);
        let xv: Vec<f64> = (0..m * k)
            .map(|i| xq[i] as f64 * xd[i / QK] as f64)
            .collect();
        let mut y = vec![0f64; m * n];
        let mut size = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for l in 0..k {
                    y[i * n + j] += xv[i * k + l] * w[j * k + l] as f64;
                    size[i * n + j] += (xv[i * k + l] * w[j * k + l] as f64).abs();
                }
            }
        }
        Ok((y, size))
    }

    #[test]
    fn every_path_equals_the_reference_on_odd_shapes() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in ALL {
            // rows not a multiple of the tile (nor of two tiles), tokens 1..=17, k a multiple of 32
            // but not of 256 (k-quants: of 256, not of 512)
            let ks = widths(dtype);
            for (e, n) in [1, 7, 8, 9, 17, 33].into_iter().enumerate() {
                let k = ks[e % ks.len()];
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
                let q = QTensor::quantize(&w, dtype)?;
                for m in [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17] {
                    let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                    let (want, size) = reference(&x, &q)?;
                    for path in paths() {
                        let got = matmul_with(path, &x, &q)?.flatten_all()?.to_vec1::<f32>()?;
                        for (e, ((g, w), s)) in got.iter().zip(&want).zip(&size).enumerate() {
                            assert!(
                                (*g as f64 - w).abs() <= s * 1e-5 + 1e-6,
                                "{dtype:?} {path:?} [{m}, {k}] x [{n}, {k}] at {e}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// VNNI and AVX2 compute the same integer sums and the same float operations: the same bits.
    #[test]
    fn simd_paths_give_the_same_bits() -> Result<()> {
        let dev = Device::Cpu;
        let simd: Vec<Path> = paths()
            .into_iter()
            .filter(|p| *p != Path::Portable)
            .collect();
        for dtype in ALL {
            let k = if dtype.block_size() == 256 { 768 } else { 576 };
            let w = Tensor::randn(0f32, 1.0, (37, k), &dev)?;
            let q = QTensor::quantize(&w, dtype)?;
            let x = Tensor::randn(0f32, 1.0, (11, k), &dev)?;
            let all: Vec<Vec<f32>> = simd
                .iter()
                .map(|p| matmul_with(*p, &x, &q)?.flatten_all()?.to_vec1::<f32>())
                .collect::<Result<_>>()?;
            for (p, y) in simd.iter().zip(&all) {
                assert_eq!(y, &all[0], "{dtype:?} {p:?}");
            }
        }
        Ok(())
    }

    /// A row's result does not depend on the rows beside it, bit for bit, for every block type,
    /// height and path (heights past the token chunk included).
    #[test]
    fn rows_are_computed_alike_at_every_height() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in ALL {
            let ks = if dtype.block_size() == 256 {
                vec![256, 768]
            } else {
                vec![576, 96, 160]
            };
            for k in ks {
                let w = Tensor::randn(0f32, 1.0, (24, k), &dev)?;
                let q = QTensor::quantize(&w, dtype)?;
                let x = Tensor::randn(0f32, 1.0, (11, k), &dev)?;
                for path in paths() {
                    let all = matmul_with(path, &x, &q)?.to_vec2::<f32>()?;
                    for i in [0, 3, 10] {
                        for h in [1, 2, 3, 4, 5, 9] {
                            let from = i.min(11 - h);
                            let part = matmul_with(path, &x.narrow(0, from, h)?, &q)?;
                            let part = part.to_vec2::<f32>()?;
                            assert_eq!(
                                part[i - from],
                                all[i],
                                "{dtype:?} {path:?} k {k} row {i} height {h}"
                            );
                        }
                    }
                }
            }
        }
        let w = Tensor::randn(0f32, 1.0, (9, 64), &dev)?;
        let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        let x = Tensor::randn(0f32, 1.0, (TOKEN_CHUNK + 3, 64), &dev)?;
        let all = matmul(&x, &q)?.to_vec2::<f32>()?;
        let last = matmul(&x.narrow(0, TOKEN_CHUNK + 2, 1)?, &q)?.to_vec2::<f32>()?;
        assert_eq!(last[0], all[TOKEN_CHUNK + 2]);
        Ok(())
    }

    #[test]
    fn activations_round_halves_away_from_zero_as_round_does() {
        let mut x = 0x2545_f491u32;
        let edges = [
            0.5f32,
            -0.5,
            1.5,
            -2.5,
            0.49999997,
            -0.49999997,
            126.5,
            -127.0,
            0.0,
            -0.0,
        ];
        let noise = std::iter::repeat_with(|| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32 - 0.5) * 255.0
        });
        for v in edges.into_iter().chain(noise.take(100_000)) {
            for v in [v, v.trunc() + 0.5, f32::from_bits(v.to_bits() + 1)] {
                assert_eq!(round_away(v), v.round() as i32, "{v}");
            }
        }
    }

    /// The vector quantization of a block gives the scalar one's bits: scale and every value, on
    /// blocks whose products land on halves, on zeros, and on noise.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_activation_blocks_equal_the_scalar_ones() {
        if !simd::avx2_fma() {
            return;
        }
        let mut x = 0x9e37_79b9u32;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as f32 / u32::MAX as f32 - 0.5
        };
        let mut blocks: Vec<[f32; QK]> = vec![[0.0; QK]];
        // amax 127: every product is the value itself, halves included
        blocks.push(std::array::from_fn(|i| {
            if i == 0 {
                127.0
            } else {
                i as f32 - 15.5
            }
        }));
        blocks.push(std::array::from_fn(|i| {
            if i == 3 {
                -254.0
            } else {
                2.0 * i as f32 + 1.0
            }
        }));
        for _ in 0..2000 {
            let spread = next().abs() * 100.0 + 1e-3;
            blocks.push(std::array::from_fn(|_| next() * spread));
        }
        for block in blocks {
            let (mut want, mut got) = ([0i8; QK], [0i8; QK]);
            let scale = quantize_block(&block, &mut want);
            // SAFETY: AVX2 is available (checked above).
            let vscale = unsafe { x86::quantize_block(&block, &mut got) };
            assert_eq!(scale.to_bits(), vscale.to_bits(), "{block:?}");
            assert_eq!(want, got, "{block:?}");
        }
    }

    #[test]
    fn matches_candles_products_at_any_multiple_of_32() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in DTYPES {
            for (m, k, n) in [(1, 576, 100), (3, 64, 67), (8, 1536, 40), (13, 96, 33)] {
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                let q = std::sync::Arc::new(QTensor::quantize(&w, dtype)?);
                assert!(applies(&x, &q), "{dtype:?} ({m},{k},{n})");
                let ours = matmul(&x, &q)?;
                if (k / QK) % 2 == 1 && dtype != GgmlDType::Q8_0 {
                    // candle's q4_0/q5_0 products need an even block count (it panics); the
                    // reference test covers these shapes
                    continue;
                }
                let candle = QMatMul::from_arc(q.clone())?.forward(&x)?;
                let diff = (&ours - &candle)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let size = candle.abs()?.max_all()?.to_scalar::<f32>()?;
                // candle multiplies q4_1 against q8_1 activations, whose block sum `d·Σx` it
                // rounds to f16 (ours stays f32, as q4_K's does): the min term differs by that
                let tolerance = if dtype == GgmlDType::Q4_1 { 1e-3 } else { 1e-5 };
                assert!(
                    diff <= size * tolerance,
                    "{dtype:?} ({m},{k},{n}): {diff} of {size}"
                );
            }
        }
        Ok(())
    }
}
