//! Attention read straight out of the paged cache on CPU, in float32: one fused op for the whole packed
//! batch instead of a gather, two matmuls, a softmax and their reshapes per sequence. It serves decode
//! steps and short chunks, where per-op overhead dominates; long prefills go to the matmul paths.
//! The same loop reads an 8-bit cache through [`KvRows`] (`layers/kv8.rs`), dequantizing inside the
//! dot products.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::attention::AttentionParams;
use super::simd;

/// One sequence: its rows in the batch and the cache slot of each of its positions.
#[derive(Debug, Clone)]
pub(crate) struct SeqSlots {
    pub token_start: usize,
    pub num_new: usize,
    pub context_len: usize,
    /// `slots[p]` holds position `p`, for `p < context_len + num_new`.
    pub slots: Vec<u32>,
}

pub(crate) struct PagedAttention<'a> {
    pub seqs: &'a [SeqSlots],
    pub params: AttentionParams,
}

impl PagedAttention<'_> {
    /// `q` `[tokens, heads, head_dim]`; `k_cache`/`v_cache` `[kv_heads, slots, head_dim]` already holding
    /// this step's keys and values. Returns `[tokens, heads * head_dim]`.
    pub fn forward(&self, q: &Tensor, k_cache: &Tensor, v_cache: &Tensor) -> Result<Tensor> {
        q.contiguous()?.apply_op3_no_bwd(k_cache, v_cache, self)
    }

    /// The same over any store of key/value rows (an 8-bit cache layer: `layers/kv8.rs`); computed
    /// in float32, returned in `q`'s dtype.
    pub(crate) fn forward_rows<R: KvRows>(&self, q: &Tensor, kv: &R) -> Result<Tensor> {
        let (t, h, d) = q.dims3()?;
        let qs = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let out = self.attend(&qs, t, h, d, kv)?;
        Tensor::from_vec(out, (t, h * d), q.device())?.to_dtype(q.dtype())
    }

    /// The work: one item per (token, kv head), the output rows of its query heads.
    fn attend<R: KvRows>(
        &self,
        q: &[f32],
        t: usize,
        h: usize,
        d: usize,
        kv: &R,
    ) -> Result<Vec<f32>> {
        let p = &self.params;
        let kvh = p.num_kv_heads;
        if h != p.num_heads || d != p.head_dim || kvh == 0 || !kv.rows().is_multiple_of(kvh) {
            bail!(
                "paged attention: q [{t}, {h}, {d}] / cache of {} rows do not match the layer",
                kv.rows()
            )
        }
        let num_slots = kv.rows() / kvh;
        let group = h / kvh;
        let mut out = vec![0f32; t * h * d];
        let mut items: Vec<(usize, usize, &SeqSlots)> = Vec::with_capacity(t);
        for s in self.seqs {
            if s.slots.iter().any(|x| *x as usize >= num_slots) {
                bail!("paged attention: slot outside the cache")
            }
            for i in 0..s.num_new {
                items.push((s.token_start + i, s.context_len + i, s));
            }
        }
        if items.len() != t {
            bail!(
                "paged attention: the sequences cover {} of {t} tokens",
                items.len()
            )
        }
        // the engine's kernel pool, as the products: rayon's threads would share the cores with
        // its workers, which spin briefly between products
        // one item per (token, kv head): its `group` query heads read each key and value row once
        let out_at = out.as_mut_ptr() as usize;
        super::pool::pool().run(t * kvh, |range| {
            let (mut scores, mut sums) = (Vec::new(), vec![0f32; group]);
            for item in range {
                let (tok, kv_head) = (item / kvh, item % kvh);
                let (token, pos, s) = items[tok];
                debug_assert_eq!(token, tok);
                let lo = p.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let first = (tok * h + kv_head * group) * d;
                let qs = &q[first..][..group * d];
                let base = kv_head * num_slots;
                let slots = &s.slots[lo..=pos];
                // SAFETY: `item < t * kvh`, so these `group * d` values (the item's heads, adjacent)
                // lie inside `out`, which outlives `run`; each item belongs to one chunk.
                let o = unsafe {
                    std::slice::from_raw_parts_mut((out_at as *mut f32).add(first), group * d)
                };
                scores.clear();
                kv.dots_heads(base, slots, qs, d, &mut scores);
                for (row, sum) in scores.chunks_exact_mut(slots.len()).zip(&mut sums) {
                    let max = match p.softcap {
                        None => simd::scale_max(row, p.scale as f32),
                        Some(cap) => {
                            let mut max = f32::NEG_INFINITY;
                            for x in row.iter_mut() {
                                *x *= p.scale as f32;
                                *x = (*x / cap as f32).tanh() * cap as f32;
                                max = max.max(*x);
                            }
                            max
                        }
                    };
                    *sum = simd::exp_shifted(row, max);
                }
                o.fill(0.0);
                kv.weighted_heads(base, slots, &scores, &sums, o);
            }
        });
        Ok(out)
    }
}

/// Keys and values as the fused kernel reads them: row `kv_head * slots + slot` of each.
pub(crate) trait KvRows: Sync {
    /// How many rows (kv heads × slots).
    fn rows(&self) -> usize;
    /// `q · key[row]`.
    fn dot(&self, row: usize, q: &[f32]) -> f32;
    /// `out += w · value[row]`.
    fn axpy(&self, row: usize, w: f32, out: &mut [f32]);
    /// Appends `q · key[base + slot]` for each of `slots` to `scores`.
    fn dots(&self, base: usize, slots: &[u32], q: &[f32], scores: &mut Vec<f32>) {
        scores.extend(slots.iter().map(|s| self.dot(base + *s as usize, q)));
    }
    /// `out += (w[i] / sum) · value[base + slots[i]]` over `i`, in order.
    fn weighted(&self, base: usize, slots: &[u32], w: &[f32], sum: f32, out: &mut [f32]) {
        for (s, w) in slots.iter().zip(w) {
            self.axpy(base + *s as usize, *w / sum, out);
        }
    }
    /// `dots` for each query head of `qs` (`d` values each) in turn: appends one row of scores per
    /// head. Kernels may read each key once for all the heads; the bits are `dots`'.
    fn dots_heads(&self, base: usize, slots: &[u32], qs: &[f32], d: usize, scores: &mut Vec<f32>) {
        for q in qs.chunks_exact(d) {
            self.dots(base, slots, q, scores);
        }
    }
    /// `weighted` for each head: row `j` of `w` (`slots.len()` values each) with `sums[j]` into
    /// row `j` of `out`. Kernels may read each value once for all the heads; the bits are
    /// `weighted`'s.
    fn weighted_heads(&self, base: usize, slots: &[u32], w: &[f32], sums: &[f32], out: &mut [f32]) {
        let (n, d) = (slots.len(), out.len() / sums.len().max(1));
        for (j, o) in out.chunks_exact_mut(d).enumerate() {
            self.weighted(base, slots, &w[j * n..][..n], sums[j], o);
        }
    }
}

/// A float32 cache layer, `[kv_heads, slots, head_dim]` each.
struct F32Rows<'a> {
    k: &'a [f32],
    v: &'a [f32],
    d: usize,
}

impl KvRows for F32Rows<'_> {
    fn rows(&self) -> usize {
        self.k.len() / self.d
    }

    #[inline]
    fn dot(&self, row: usize, q: &[f32]) -> f32 {
        simd::dot(q, &self.k[row * self.d..][..self.d])
    }

    #[inline]
    fn axpy(&self, row: usize, w: f32, out: &mut [f32]) {
        simd::axpy(w, &self.v[row * self.d..][..self.d], out)
    }

    fn dots(&self, base: usize, slots: &[u32], q: &[f32], scores: &mut Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        if simd::avx2_fma() && q.len() == self.d {
            // SAFETY: AVX2 and FMA are available; `q` holds `d` values and every row is checked
            // inside the cache.
            unsafe { x86::dots(self, base, slots, q, scores) };
            return;
        }
        scores.extend(slots.iter().map(|s| self.dot(base + *s as usize, q)));
    }

    fn dots_heads(&self, base: usize, slots: &[u32], qs: &[f32], d: usize, scores: &mut Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        if d == self.d && qs.len().is_multiple_of(d) && x86::heads_fit(d) {
            let n = slots.len();
            let at = scores.len();
            scores.resize(at + qs.len() / d * n, 0.0);
            // SAFETY: `heads_fit` checked AVX-512 and the head size; `qs` holds whole heads of `d`
            // and `scores` one row of `n` per head after `at`.
            unsafe { x86::dots_heads(self, base, slots, qs, &mut scores[at..]) };
            return;
        }
        for q in qs.chunks_exact(d) {
            self.dots(base, slots, q, scores);
        }
    }

    fn weighted_heads(&self, base: usize, slots: &[u32], w: &[f32], sums: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if out.len() == sums.len() * self.d
            && w.len() == sums.len() * slots.len()
            && x86::heads_fit(self.d)
        {
            // SAFETY: as in `dots_heads`; `w` holds one row of weights per head, `out` one row of
            // `d` per head.
            unsafe { x86::weighted_heads(self, base, slots, w, sums, out) };
            return;
        }
        let (n, d) = (slots.len(), self.d);
        for (j, o) in out.chunks_exact_mut(d).enumerate() {
            self.weighted(base, slots, &w[j * n..][..n], sums[j], o);
        }
    }

    fn weighted(&self, base: usize, slots: &[u32], w: &[f32], sum: f32, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if simd::avx2_fma() && out.len() == self.d {
            // SAFETY: as in `dots`; `out` holds `d` values.
            unsafe { x86::weighted(self, base, slots, w, sum, out) };
            return;
        }
        for (s, w) in slots.iter().zip(w) {
            self.axpy(base + *s as usize, *w / sum, out);
        }
    }
}

/// The float32 cache's loops over a sequence's positions with the vector kernels inlined: the same
/// arithmetic as `simd::dot` and repeated `simd::axpy` (the same bits), without a call per
/// position, the output row held in registers across positions.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::simd::x86 as simd;
    use super::F32Rows;
    use std::arch::x86_64::*;

    /// Row `index` of `data` (`d` values each), bounds-checked.
    fn row(data: &[f32], d: usize, index: usize) -> &[f32] {
        &data[index * d..][..d]
    }

    /// Positions ahead whose rows are asked of the cache: a sequence's rows lie in blocks scattered
    /// over the cache, which the hardware prefetcher relearns block by block (the loads of the
    /// rows held most of these loops' samples at 16 streams).
    const AHEAD: usize = 8;

    /// Asks the cache for the row of the position `AHEAD` after `i`, if there is one.
    #[inline(always)]
    fn prefetch(data: &[f32], d: usize, base: usize, slots: &[u32], i: usize) {
        if let Some(s) = slots.get(i + AHEAD) {
            let p = data.as_ptr().wrapping_add((base + *s as usize) * d) as *const i8;
            for l in (0..d * 4).step_by(64) {
                // SAFETY: a prefetch does not fault, and the address is only computed.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(l)) };
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots(
        kv: &F32Rows,
        base: usize,
        slots: &[u32],
        q: &[f32],
        scores: &mut Vec<f32>,
    ) {
        for (i, s) in slots.iter().enumerate() {
            prefetch(kv.k, kv.d, base, slots, i);
            let k = row(kv.k, kv.d, base + *s as usize);
            // SAFETY: AVX2 and FMA are enabled here; `q` and `k` hold `d` values.
            scores.push(unsafe { simd::dot(q, k) });
        }
    }

    /// Floats of the output held in registers per pass.
    const CHUNK: usize = 64;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted(
        kv: &F32Rows,
        base: usize,
        slots: &[u32],
        w: &[f32],
        sum: f32,
        out: &mut [f32],
    ) {
        let d = kv.d;
        let mut c = 0;
        while c + CHUNK <= d {
            let po = out.as_mut_ptr();
            // SAFETY: `c + 64 <= d = out.len()`, and each value row holds `d` values.
            unsafe {
                let mut acc: [__m256; 8] =
                    std::array::from_fn(|j| _mm256_loadu_ps(po.add(c + 8 * j)));
                for (i, (s, w)) in slots.iter().zip(w).enumerate() {
                    if c == 0 {
                        prefetch(kv.v, d, base, slots, i);
                    }
                    let v = row(kv.v, d, base + *s as usize).as_ptr().add(c);
                    let a = _mm256_set1_ps(*w / sum);
                    for (j, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(a, _mm256_loadu_ps(v.add(8 * j)), *acc);
                    }
                }
                for (j, acc) in acc.iter().enumerate() {
                    _mm256_storeu_ps(po.add(c + 8 * j), *acc);
                }
            }
            c += CHUNK;
        }
        if c < d {
            for (s, w) in slots.iter().zip(w) {
                let v = &row(kv.v, d, base + *s as usize)[c..];
                // SAFETY: AVX2 and FMA are enabled here; both hold `d - c` values.
                unsafe { simd::axpy(*w / sum, v, &mut out[c..]) };
            }
        }
    }

    /// Whether the head-group kernels serve heads of `d`: AVX-512, and `d` 64 or 128 (a head's
    /// query or output in 4 or 8 registers, up to 4 or 2 heads at once).
    pub(super) fn heads_fit(d: usize) -> bool {
        (d == 64 || d == 128) && super::simd::avx512()
    }

    /// Calls the pass kernel `f` monomorphised for head size `d` (in 16-float vectors) and `g`
    /// heads, the shapes `heads_fit` and `heads_at_once` admit.
    macro_rules! by_shape {
        ($f:ident, $d:expr, $g:expr, $args:tt) => {
            match ($d, $g) {
                (64, 1) => $f::<4, 1> $args,
                (64, 2) => $f::<4, 2> $args,
                (64, 3) => $f::<4, 3> $args,
                (64, 4) => $f::<4, 4> $args,
                (128, 1) => $f::<8, 1> $args,
                (128, 2) => $f::<8, 2> $args,
                _ => unreachable!("heads_fit admits 64 and 128"),
            }
        };
    }

    /// Heads at once for head size `d`: their queries (or outputs) take 16 registers.
    fn heads_at_once(d: usize) -> usize {
        256 / d
    }

    /// `F32Rows::dots` for every head of `qs`, each key row read once per pass of up to
    /// `heads_at_once` heads. The same bits as `simd::dot` (AVX2): lanes 0–7 of one 512-bit sum
    /// are its first accumulator (floats `16c..16c+8`), lanes 8–15 its second, summed as it sums
    /// them.
    ///
    /// # Safety
    /// `heads_fit(kv.d)`; `qs` holds whole heads of `kv.d`, `scores` `slots.len()` per head.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) unsafe fn dots_heads(
        kv: &F32Rows,
        base: usize,
        slots: &[u32],
        qs: &[f32],
        scores: &mut [f32],
    ) {
        let (d, n) = (kv.d, slots.len());
        let at_once = heads_at_once(d);
        for (pass, q) in qs.chunks(at_once * d).enumerate() {
            let out = &mut scores[pass * at_once * n..][..q.len() / d * n];
            // SAFETY: as the caller promises, per pass.
            unsafe { by_shape!(dots_pass, d, q.len() / d, (kv, base, slots, q, out)) }
        }
    }

    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    unsafe fn dots_pass<const V: usize, const G: usize>(
        kv: &F32Rows,
        base: usize,
        slots: &[u32],
        q: &[f32],
        scores: &mut [f32],
    ) {
        let (d, n) = (kv.d, slots.len());
        debug_assert!(d == 16 * V && q.len() == G * d && scores.len() == G * n);
        // SAFETY: `q` holds `G` heads of `16 V` floats.
        let qv: [[__m512; V]; G] = std::array::from_fn(|j| {
            std::array::from_fn(|c| unsafe { _mm512_loadu_ps(q.as_ptr().add(j * d + 16 * c)) })
        });
        for (i, s) in slots.iter().enumerate() {
            prefetch(kv.k, d, base, slots, i);
            let k = row(kv.k, d, base + *s as usize).as_ptr();
            // SAFETY: the row holds `16 V` floats.
            let kr: [__m512; V] =
                std::array::from_fn(|c| unsafe { _mm512_loadu_ps(k.add(16 * c)) });
            for j in 0..G {
                let mut acc = _mm512_setzero_ps();
                for c in 0..V {
                    acc = _mm512_fmadd_ps(qv[j][c], kr[c], acc);
                }
                let lo = _mm512_castps512_ps256(acc);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
                // SAFETY: AVX2 is enabled here.
                scores[j * n + i] = unsafe { simd::hsum(_mm256_add_ps(lo, hi)) };
            }
        }
    }

    /// `F32Rows::weighted` for every head, each value row read once per pass of up to
    /// `heads_at_once` heads: per lane the same fused multiply-adds in the same order (the bits of
    /// the AVX2 loop).
    ///
    /// # Safety
    /// `heads_fit(kv.d)`; `w` holds `slots.len()` weights per head of `sums`, `out` `kv.d` floats
    /// per head.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) unsafe fn weighted_heads(
        kv: &F32Rows,
        base: usize,
        slots: &[u32],
        w: &[f32],
        sums: &[f32],
        out: &mut [f32],
    ) {
        let (d, n) = (kv.d, slots.len());
        let at_once = heads_at_once(d);
        for (pass, o) in out.chunks_mut(at_once * d).enumerate() {
            let heads = pass * at_once..pass * at_once + o.len() / d;
            let (w, sums) = (&w[heads.start * n..heads.end * n], &sums[heads]);
            // SAFETY: as the caller promises, per pass.
            unsafe { by_shape!(weighted_pass, d, sums.len(), (kv, base, slots, w, sums, o)) }
        }
    }

    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    unsafe fn weighted_pass<const V: usize, const G: usize>(
        kv: &F32Rows,
        base: usize,
        slots: &[u32],
        w: &[f32],
        sums: &[f32],
        out: &mut [f32],
    ) {
        let (d, n) = (kv.d, slots.len());
        debug_assert!(d == 16 * V && w.len() == G * n && sums.len() == G && out.len() == G * d);
        let po = out.as_mut_ptr();
        // SAFETY: `out` holds `G` rows of `16 V` floats.
        let mut acc: [[__m512; V]; G] = std::array::from_fn(|j| {
            std::array::from_fn(|c| unsafe { _mm512_loadu_ps(po.add(j * d + 16 * c)) })
        });
        for (i, s) in slots.iter().enumerate() {
            prefetch(kv.v, d, base, slots, i);
            let v = row(kv.v, d, base + *s as usize).as_ptr();
            // SAFETY: the row holds `16 V` floats.
            let vr: [__m512; V] =
                std::array::from_fn(|c| unsafe { _mm512_loadu_ps(v.add(16 * c)) });
            for j in 0..G {
                let a = _mm512_set1_ps(w[j * n + i] / sums[j]);
                for c in 0..V {
                    acc[j][c] = _mm512_fmadd_ps(a, vr[c], acc[j][c]);
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            for (c, a) in acc.iter().enumerate() {
                // SAFETY: as above.
                unsafe { _mm512_storeu_ps(po.add(j * d + 16 * c), *a) };
            }
        }
    }
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("paged attention: {what} is not contiguous")
    };
    Ok(&s.as_slice::<f32>()?[a..b])
}

impl CustomOp3 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "paged-attention-cpu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = &self.params;
        let (t, h, d) = l1.shape().dims3()?;
        let (kvh, _, d2) = l2.shape().dims3()?;
        if h != p.num_heads
            || kvh != p.num_kv_heads
            || d != p.head_dim
            || d2 != d
            || l3.shape() != l2.shape()
        {
            bail!(
                "paged attention: q {:?} / cache {:?} do not match the layer",
                l1.shape(),
                l2.shape()
            )
        }
        let (q, kc, vc) = (
            slice(s1, l1, "q")?,
            slice(s2, l2, "k")?,
            slice(s3, l3, "v")?,
        );
        let out = self.attend(q, t, h, d, &F32Rows { k: kc, v: vc, d })?;
        Ok((CpuStorage::F32(out), Shape::from((t, h * d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32)
            .map(|v| v / (1u32 << 24) as f32 - 0.5)
            .collect()
    }

    /// The float32 cache's loops over positions give, bit for bit, what one `dot` / `axpy` per
    /// position gives, for head sizes with and without a whole number of 64-float chunks.
    #[test]
    fn position_loops_equal_the_per_row_kernels_bit_for_bit() {
        for d in [64, 128, 80, 96, 36, 7] {
            let rows = 40;
            let (k, v) = (noise(rows * d, 1), noise(rows * d, 2));
            let kv = F32Rows { k: &k, v: &v, d };
            let q = noise(d, 3);
            let slots: Vec<u32> = [3, 17, 0, 19, 5, 11, 2].to_vec();
            let base = 20;
            let mut got = Vec::new();
            kv.dots(base, &slots, &q, &mut got);
            let want: Vec<f32> = slots
                .iter()
                .map(|s| kv.dot(base + *s as usize, &q))
                .collect();
            assert_eq!(got, want, "dots, d {d}");
            let w = noise(slots.len(), 4);
            let sum = 1.7;
            let mut got = noise(d, 5);
            let mut want = got.clone();
            kv.weighted(base, &slots, &w, sum, &mut got);
            for (s, w) in slots.iter().zip(&w) {
                kv.axpy(base + *s as usize, *w / sum, &mut want);
            }
            assert_eq!(got, want, "weighted, d {d}");
        }
    }

    /// The head-group kernels give, bit for bit, `dots` and `weighted` per head, for groups
    /// larger and smaller than one pass and head sizes they do and do not serve.
    #[test]
    fn head_groups_equal_one_head_at_a_time_bit_for_bit() {
        for d in [64, 128, 80, 7] {
            let rows = 40;
            let (k, v) = (noise(rows * d, 6), noise(rows * d, 7));
            let kv = F32Rows { k: &k, v: &v, d };
            let slots: Vec<u32> = [3, 17, 0, 19, 5, 11, 2, 8, 13, 1, 4].to_vec();
            let (base, n) = (20, slots.len());
            for g in 1..=7 {
                let qs = noise(g * d, 8 + g as u32);
                let mut got = vec![9.0];
                kv.dots_heads(base, &slots, &qs, d, &mut got);
                let mut want = vec![9.0];
                for q in qs.chunks_exact(d) {
                    kv.dots(base, &slots, q, &mut want);
                }
                assert_eq!(got, want, "dots, d {d}, {g} heads");
                let w = noise(g * n, 20 + g as u32);
                let sums: Vec<f32> = (0..g).map(|j| 1.3 + j as f32).collect();
                let mut got = noise(g * d, 30);
                let mut want = got.clone();
                kv.weighted_heads(base, &slots, &w, &sums, &mut got);
                for (j, o) in want.chunks_exact_mut(d).enumerate() {
                    kv.weighted(base, &slots, &w[j * n..][..n], sums[j], o);
                }
                assert_eq!(got, want, "weighted, d {d}, {g} heads");
            }
        }
    }
}
