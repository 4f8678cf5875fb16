//! `x · Wᵀ` on CPU in float32 at every height, one decode token to a long prompt: a register-tiled
//! kernel in the manner of llamafile's tinyBLAS (which llama.cpp runs for float32). `x` `[m, k]` and
//! `W` `[n, k]` are both read in place, rows along `k`: a tile of a few tokens × a few weight rows
//! keeps one vector accumulator per (token, row) pair, loads each weight vector once for every token
//! of the tile and each token vector once for every row, and sums each accumulator's lanes at the end
//! of the row. No packing: a thin product (a 128-token prompt against a 576-wide layer) spends what
//! a general gemm spends on packing its operands on arithmetic instead; one decode token (a tile one
//! token high) streams six weight rows at a time with 512-bit loads.
//!
//! Each output is computed alike whatever the tile around it (the same vector accumulation along `k`,
//! the same final sum), so a token's row does not depend on its neighbours: batched and speculative
//! decoding give the bits one sequence alone gives, however a prompt is chunked. Tasks are blocks of weight rows × chunks of tokens on the engine's
//! pool: a block's rows stay in L1 while the chunk's tokens stream from L2. AVX-512 and AVX2+FMA paths
//! chosen at run time; elsewhere `gemv`'s portable loop (decode) and candle's gemm (prompts) run.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Tasks of this many tiles' worth of weight rows.
const TASK_TILES: usize = 4;
/// Floats of `x` a token chunk may hold (its tokens × `k`): about half of a 1 MiB L2.
const CHUNK_FLOATS: usize = 128 * 1024;

/// The instruction set a product runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Path {
    fn detect() -> Option<Self> {
        use std::sync::OnceLock;
        static PATH: OnceLock<Option<Path>> = OnceLock::new();
        *PATH.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if Self::Avx512.available() {
                    return Some(Self::Avx512);
                }
                if Self::Avx2.available() {
                    return Some(Self::Avx2);
                }
            }
            None
        })
    }

    fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        }
    }

    /// Tokens × weight rows of a full tile.
    fn tile(self) -> (usize, usize) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => (x86::RM_512, x86::RN_512),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => (x86::RM_256, x86::RN_256),
        }
    }
}

/// Whether [`matmul`] serves `x · wᵀ`: float32 on CPU, both contiguous, on a CPU with AVX2 or
/// AVX-512 (elsewhere [`super::gemv`] takes decode-sized products and candle's gemm the rest). Every
/// height, tall prompts too: single-threaded on the 135M model this kernel costs 6% less CPU per
/// prompt token than candle's gemm at 128 tokens, about the same at 256, 11% more at 512, but a row's
/// bits then never depend on how its prompt was chunked or batched.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && w.dtype() == candle_core::DType::F32
        && x.rank() == 2
        && w.rank() == 2
        && x.is_contiguous()
        && w.is_contiguous()
        && Path::detect().is_some()
}

/// `x` `[m, k]` times `w` `[n, k]` transposed: `[m, n]`.
pub fn matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let Some(path) = Path::detect() else {
        bail!("sgemm: this CPU has neither AVX2 nor AVX-512")
    };
    x.apply_op2_no_bwd(w, &Sgemm(path))
}

struct Sgemm(Path);

impl CustomOp2 for Sgemm {
    fn name(&self) -> &'static str {
        "sgemm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Operands { x, w, m, n, k } = operands(self.name(), s1, l1, s2, l2)?;
        let y = product(self.0, x, w, m, n, k);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

/// The two operands of an f32 `x · wᵀ` custom op (this one and `gemv`'s portable one): `x` `[m, k]`
/// and `w` `[n, k]`, contiguous, as slices.
pub(super) struct Operands<'a> {
    pub x: &'a [f32],
    pub w: &'a [f32],
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

pub(super) fn operands<'a>(
    op: &str,
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> Result<Operands<'a>> {
    let (m, k) = l1.shape().dims2()?;
    let (n, k2) = l2.shape().dims2()?;
    if k != k2 {
        bail!("{op}: x is [{m}, {k}] but w is [{n}, {k2}]")
    }
    let (Some((x0, x1)), Some((w0, w1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
    else {
        bail!("{op} needs contiguous operands")
    };
    Ok(Operands {
        x: &s1.as_slice::<f32>()?[x0..x1],
        w: &s2.as_slice::<f32>()?[w0..w1],
        m,
        n,
        k,
    })
}

/// `y` `[m, n]` = `x` `[m, k]` · `w`ᵀ (`w` `[n, k]`).
fn product(path: Path, x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return y;
    }
    let (rm, rn) = path.tile();
    let task_rows = rn * TASK_TILES;
    // the fewest chunks that fit, of equal heights (in whole tiles)
    let token_tasks = m.div_ceil((CHUNK_FLOATS / k.max(1)).max(rm));
    let chunk = m.div_ceil(token_tasks).next_multiple_of(rm);
    let token_tasks = m.div_ceil(chunk);
    let row_tasks = n.div_ceil(task_rows);
    let out = y.as_mut_ptr() as usize;
    super::pool::pool().run(row_tasks * token_tasks, |tasks| {
        for task in tasks {
            let (rt, tt) = (task / token_tasks, task % token_tasks);
            let rows = rt * task_rows..((rt + 1) * task_rows).min(n);
            let tokens = tt * chunk..((tt + 1) * chunk).min(m);
            let mut j = rows.start;
            while j < rows.end {
                let nr = rn.min(rows.end - j);
                let mut i = tokens.start;
                while i < tokens.end {
                    let nt = rm.min(tokens.end - i);
                    // SAFETY: the path's features were detected; tokens `i..i + nt` and rows
                    // `j..j + nr` lie inside `x` and `w`; `y` outlives `run`, and these rows'
                    // columns of it belong to this task alone.
                    unsafe {
                        tile(
                            path,
                            x.as_ptr().add(i * k),
                            w.as_ptr().add(j * k),
                            k,
                            (out as *mut f32).add(i * n + j),
                            n,
                            (nt, nr),
                            ((i - tokens.start) / rm, tokens.len().div_ceil(rm)),
                        )
                    };
                    i += nt;
                }
                j += nr;
            }
        }
    });
    y
}

/// One tile: `nt` tokens from `x` × `nr` weight rows from `w` (row stride `k`), into `y` (row stride
/// `n`). `ahead` (`phase`, `phases`): this is tile `phase` of the `phases` token tiles that read
/// these rows in this task, and it asks the cache for its share of the next tile's rows (the rows
/// after these): the first tile brings them from memory, the later ones read them from L1, and the
/// prefetches spread over all of them keep memory busy throughout. (16 decode tokens streamed the
/// weights at 24 GB/s where one token streams 60 when only the first tile prefetched; 37 with the
/// weights in cache.)
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    path: Path,
    x: *const f32,
    w: *const f32,
    k: usize,
    y: *mut f32,
    n: usize,
    (nt, nr): (usize, usize),
    ahead: (usize, usize),
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as the caller promises.
        Path::Avx512 => unsafe { x86::tile_512(x, w, k, y, n, (nt, nr), ahead) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as the caller promises.
        Path::Avx2 => unsafe { x86::tile_256(x, w, k, y, n, (nt, nr), ahead) },
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// AVX-512: 4 tokens × 6 rows, 24 accumulators + 4 token vectors + 1 weight vector of 32 (the
    /// 256-bit sums at the end need AVX-512VL to reach registers 16–31, or the accumulators spill).
    pub const RM_512: usize = 4;
    pub const RN_512: usize = 6;
    /// AVX2: 4 tokens × 3 rows, 12 accumulators + 3 weight vectors + 1 token vector of 16.
    pub const RM_256: usize = 4;
    pub const RN_256: usize = 3;

    /// Dispatches a tile of `nt × nr` to its monomorphised kernel.
    macro_rules! dispatch {
        ($f:ident, $nt:expr, $nr:expr, $args:tt, [$($t:literal),*], [$($r:literal),*]) => {
            dispatch!(@t $f, $nt, $nr, $args, [$($t),*], [$($r),*])
        };
        (@t $f:ident, $nt:expr, $nr:expr, $args:tt, [$($t:literal),*], $rs:tt) => {
            match $nt {
                $($t => dispatch!(@r $f, $t, $nr, $args, $rs),)*
                _ => unreachable!("tile height"),
            }
        };
        (@r $f:ident, $t:literal, $nr:expr, $args:tt, [$($r:literal),*]) => {
            match $nr {
                $($r => $f::<$t, $r> $args,)*
                _ => unreachable!("tile width"),
            }
        };
    }

    /// # Safety
    /// AVX-512F is available; see `super::tile`.
    #[target_feature(enable = "avx512f,avx512vl")]
    pub unsafe fn tile_512(
        x: *const f32,
        w: *const f32,
        k: usize,
        y: *mut f32,
        n: usize,
        (nt, nr): (usize, usize),
        ahead: (usize, usize),
    ) {
        // SAFETY: as the caller promises.
        unsafe {
            dispatch!(
                kernel_512,
                nt,
                nr,
                (x, w, k, y, n, ahead),
                [1, 2, 3, 4],
                [1, 2, 3, 4, 5, 6]
            )
        }
    }

    /// # Safety
    /// AVX2 and FMA are available; see `super::tile`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_256(
        x: *const f32,
        w: *const f32,
        k: usize,
        y: *mut f32,
        n: usize,
        (nt, nr): (usize, usize),
        ahead: (usize, usize),
    ) {
        // SAFETY: as the caller promises.
        unsafe {
            dispatch!(
                kernel_256,
                nt,
                nr,
                (x, w, k, y, n, ahead),
                [1, 2, 3, 4],
                [1, 2, 3]
            )
        }
    }

    /// Asks the cache for the line at `p`. (Into L2 rather than L1 when several token tiles
    /// read the rows measured no better at 16 tokens.)
    #[inline(always)]
    fn prefetch(p: *const f32) {
        // SAFETY: a prefetch does not fault, and the address is only computed.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
    }

    /// The sum of a vector's 16 lanes, in a fixed order.
    #[target_feature(enable = "avx512f,avx512vl")]
    pub fn hsum_512(v: __m512) -> f32 {
        let h = _mm256_add_ps(
            _mm512_castps512_ps256(v),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
        );
        let q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
        let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let s = _mm_add_ss(d, _mm_movehdup_ps(d));
        _mm_cvtss_f32(s)
    }

    /// The sum of a vector's 8 lanes, in a fixed order.
    #[target_feature(enable = "avx2,fma")]
    pub fn hsum_256(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let s = _mm_add_ss(d, _mm_movehdup_ps(d));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx512f,avx512vl")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn kernel_512<const T: usize, const R: usize>(
        x: *const f32,
        w: *const f32,
        k: usize,
        y: *mut f32,
        n: usize,
        (phase, phases): (usize, usize),
    ) {
        let mut acc = [[_mm512_setzero_ps(); R]; T];
        let kv = k / 16 * 16;
        let mut c = 0;
        // cache lines (steps of 16) until this tile's next prefetching step: every `phases`-th
        // from `phase` (no division in the loop)
        let mut wait = phase;
        // SAFETY (all loads): rows of `k` floats, `c + 16 <= k` or the tail mask covering `k - c`.
        unsafe {
            while c < kv {
                let mut xv = [_mm512_setzero_ps(); T];
                for (t, v) in xv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(x.add(t * k + c));
                }
                let fetch = T == 1 || wait == 0;
                wait = if wait == 0 { phases - 1 } else { wait - 1 };
                for r in 0..R {
                    let wv = _mm512_loadu_ps(w.add(r * k + c));
                    if fetch {
                        // this tile's share of the next tile's rows, a cache line at a time
                        prefetch(w.wrapping_add((R + r) * k + c));
                    }
                    for t in 0..T {
                        acc[t][r] = _mm512_fmadd_ps(xv[t], wv, acc[t][r]);
                    }
                }
                c += 16;
            }
            if c < k {
                let mask: __mmask16 = (1u16 << (k - c)) - 1;
                let mut xv = [_mm512_setzero_ps(); T];
                for (t, v) in xv.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(mask, x.add(t * k + c));
                }
                for r in 0..R {
                    let wv = _mm512_maskz_loadu_ps(mask, w.add(r * k + c));
                    for t in 0..T {
                        acc[t][r] = _mm512_fmadd_ps(xv[t], wv, acc[t][r]);
                    }
                }
            }
            for (t, a) in acc.iter().enumerate() {
                for (r, v) in a.iter().enumerate() {
                    *y.add(t * n + r) = hsum_512(*v);
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel_256<const T: usize, const R: usize>(
        x: *const f32,
        w: *const f32,
        k: usize,
        y: *mut f32,
        n: usize,
        (phase, phases): (usize, usize),
    ) {
        let mut acc = [[_mm256_setzero_ps(); R]; T];
        let kv = k / 8 * 8;
        let mut c = 0;
        // as in `kernel_512`, counted in cache lines (two steps of 8)
        let mut wait = phase;
        // SAFETY (all loads): rows of `k` floats, `c + 8 <= k`; the tail is read one float at a time.
        unsafe {
            while c < kv {
                let fetch = c % 16 == 0 && (T == 1 || wait == 0);
                if c % 16 == 0 {
                    wait = if fetch { phases - 1 } else { wait - 1 };
                }
                let mut wv = [_mm256_setzero_ps(); R];
                for (r, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(w.add(r * k + c));
                    if fetch {
                        // as in `kernel_512`
                        prefetch(w.wrapping_add((R + r) * k + c));
                    }
                }
                for (t, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.add(t * k + c));
                    for (ar, wr) in a.iter_mut().zip(&wv) {
                        *ar = _mm256_fmadd_ps(xv, *wr, *ar);
                    }
                }
                c += 8;
            }
            for (t, a) in acc.iter().enumerate() {
                for (r, v) in a.iter().enumerate() {
                    let mut s = hsum_256(*v);
                    for cc in kv..k {
                        s += *x.add(t * k + cc) * *w.add(r * k + cc);
                    }
                    *y.add(t * n + r) = s;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn paths() -> Vec<Path> {
        let all = [
            #[cfg(target_arch = "x86_64")]
            Path::Avx512,
            #[cfg(target_arch = "x86_64")]
            Path::Avx2,
        ];
        all.into_iter().filter(|p| p.available()).collect()
    }

    /// `x · wᵀ` in f64 from the same inputs.
    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                    .sum();
            }
        }
        y
    }

    fn inputs(m: usize, n: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
        let x = (0..m * k)
            .map(|i| ((i * 7 + 3) as f32 * 0.37).sin())
            .collect();
        let w = (0..n * k)
            .map(|i| ((i * 5 + 1) as f32 * 0.11).cos())
            .collect();
        (x, w)
    }

    #[test]
    fn every_path_equals_the_reference_product_on_odd_shapes() {
        for path in paths() {
            for (m, n, k) in [
                (17, 960, 576),
                (128, 37, 64),
                (21, 13, 19),
                (33, 7, 1536),
                (1, 1, 1),
                (5, 6, 16),
                (300, 50, 577),
            ] {
                let (x, w) = inputs(m, n, k);
                let got = product(path, &x, &w, m, n, k);
                let want = reference(&x, &w, m, n, k);
                for (idx, (g, r)) in got.iter().zip(&want).enumerate() {
                    // relative to the magnitudes summed: float32 accumulation over `k` terms
                    let scale: f64 = (0..k)
                        .map(|c| (x[idx / n * k + c] as f64 * w[idx % n * k + c] as f64).abs())
                        .sum();
                    assert!(
                        (*g as f64 - r).abs() <= 1e-6 * scale.max(1.0) * (k as f64).sqrt(),
                        "{path:?} m={m} n={n} k={k} at {idx}: {g} vs {r}"
                    );
                }
            }
        }
    }

    /// A token's row does not depend on the tokens or rows tiled with it: the same bits alone as in a
    /// prompt, whichever remainder tile it lands in.
    #[test]
    fn rows_are_computed_alike_at_every_height() {
        for path in paths() {
            let (m, n, k) = (23, 29, 203);
            let (x, w) = inputs(m, n, k);
            let all = product(path, &x, &w, m, n, k);
            for i in 0..m {
                for lo in [0, i.saturating_sub(2)] {
                    let sub = &x[lo * k..(i + 1) * k];
                    let rows = i + 1 - lo;
                    let part = product(path, sub, &w, rows, n, k);
                    assert_eq!(
                        &part[(rows - 1) * n..],
                        &all[i * n..(i + 1) * n],
                        "{path:?} token {i} from {lo}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_op_matches_candles_matmul() -> Result<()> {
        if Path::detect().is_none() {
            return Ok(());
        }
        for m in [1, 3, 40, 300] {
            let x = Tensor::randn(0f32, 1., (m, 576), &Device::Cpu)?;
            let w = Tensor::randn(0f32, 1., (100, 576), &Device::Cpu)?;
            assert!(applies(&x, &w));
            let want = x.matmul(&w.t()?)?;
            let d = (matmul(&x, &w)? - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(d < 1e-3, "m={m}: differs by {d}");
        }
        Ok(())
    }
}
