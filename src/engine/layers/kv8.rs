//! The dot products of attention over an 8-bit KV cache (`KV_CACHE_DTYPE` `int8`, `fp8_e4m3`,
//! `fp8_e5m2`), with the dequantization fused in: a key row's codes are widened to float32 in
//! registers, eight at a time, and multiplied with the query (`dot`), a value row's are scaled into
//! the output (`axpy`); each group's scale is applied once, outside. Nothing is dequantized to memory.
//!
//! fp8 codes become float32 by bit arithmetic: the sign moves to bit 31, exponent and mantissa
//! shift into float32's and the exponent is rebiased by an integer add; code 0 is zero (the cache
//! writes no subnormals, see `kv_cache::Kv8Format`).

use super::cpu_attention::KvRows;
use crate::engine::kv_cache::{Kv8Format, Kv8Layer};

/// `Σ q[i]·decode(x[i])` over `q.len()` values (`x` at least as long).
pub(crate) fn dot(format: Kv8Format, q: &[f32], x: &[u8]) -> f32 {
    let x = &x[..q.len()];
    #[cfg(target_arch = "x86_64")]
    {
        if super::simd::avx2_fma() {
            // SAFETY: AVX2 and FMA are available (checked above); `x` holds `q.len()` codes.
            return unsafe {
                match format {
                    Kv8Format::Int8 => x86::dot::<0>(q, x),
                    Kv8Format::E4m3 => x86::dot::<1>(q, x),
                    Kv8Format::E5m2 => x86::dot::<2>(q, x),
                }
            };
        }
    }
    q.iter().zip(x).map(|(a, b)| a * format.decode(*b)).sum()
}

/// `y[i] += alpha·decode(x[i])` over `y.len()` values (`x` at least as long).
pub(crate) fn axpy(format: Kv8Format, alpha: f32, x: &[u8], y: &mut [f32]) {
    let x = &x[..y.len()];
    #[cfg(target_arch = "x86_64")]
    {
        if super::simd::avx2_fma() {
            // SAFETY: AVX2 and FMA are available (checked above); `x` holds `y.len()` codes.
            unsafe {
                match format {
                    Kv8Format::Int8 => x86::axpy::<0>(alpha, x, y),
                    Kv8Format::E4m3 => x86::axpy::<1>(alpha, x, y),
                    Kv8Format::E5m2 => x86::axpy::<2>(alpha, x, y),
                }
            }
            return;
        }
    }
    for (o, b) in y.iter_mut().zip(x) {
        *o += alpha * format.decode(*b);
    }
}

/// An 8-bit cache layer as the fused attention kernel reads it: row `r` = `kv_head * slots + slot`.
pub(crate) struct Kv8Rows<'a> {
    pub format: Kv8Format,
    pub layer: &'a Kv8Layer,
    pub head_dim: usize,
}

impl KvRows for Kv8Rows<'_> {
    fn rows(&self) -> usize {
        self.layer.k.len() / self.head_dim.max(1)
    }

    #[inline]
    fn dot(&self, row: usize, q: &[f32]) -> f32 {
        let (d, g) = (self.head_dim, self.layer.group);
        let codes = &self.layer.k[row * d..][..d];
        let scales = &self.layer.k_scale[row * d / g..][..d / g];
        #[cfg(target_arch = "x86_64")]
        {
            if g.is_multiple_of(8) && q.len() == d && super::simd::avx2_fma() {
                // SAFETY: AVX2 and FMA are available; `q` and `codes` hold `d` values, `scales` one
                // per `g` of them, `g` a multiple of 8.
                return unsafe {
                    match self.format {
                        Kv8Format::Int8 => x86::dot_groups::<0>(q, codes, scales, g),
                        Kv8Format::E4m3 => x86::dot_groups::<1>(q, codes, scales, g),
                        Kv8Format::E5m2 => x86::dot_groups::<2>(q, codes, scales, g),
                    }
                };
            }
        }
        q.chunks_exact(g)
            .zip(codes.chunks_exact(g))
            .zip(scales)
            .map(|((q, c), s)| dot(self.format, q, c) * s)
            .sum()
    }

    #[inline]
    fn axpy(&self, row: usize, w: f32, out: &mut [f32]) {
        let (d, g) = (self.head_dim, self.layer.group);
        let codes = &self.layer.v[row * d..][..d];
        let scales = &self.layer.v_scale[row * d / g..][..d / g];
        #[cfg(target_arch = "x86_64")]
        {
            if g.is_multiple_of(8) && out.len() == d && super::simd::avx2_fma() {
                // SAFETY: as in `dot`.
                unsafe {
                    match self.format {
                        Kv8Format::Int8 => x86::axpy_groups::<0>(w, codes, scales, g, out),
                        Kv8Format::E4m3 => x86::axpy_groups::<1>(w, codes, scales, g, out),
                        Kv8Format::E5m2 => x86::axpy_groups::<2>(w, codes, scales, g, out),
                    }
                }
                return;
            }
        }
        for ((o, c), s) in out
            .chunks_exact_mut(g)
            .zip(codes.chunks_exact(g))
            .zip(scales)
        {
            axpy(self.format, w * s, c, o)
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Eight codes at `p` as float32: `F` 0 int8, 1 e4m3, 2 e5m2.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8<const F: u8>(p: *const u8) -> __m256 {
        let b = _mm_loadl_epi64(p as *const __m128i);
        if F == 0 {
            return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        }
        let w = _mm256_cvtepu8_epi32(b);
        let mag = _mm256_and_si256(w, _mm256_set1_epi32(0x7f));
        let sign = _mm256_slli_epi32::<24>(_mm256_and_si256(w, _mm256_set1_epi32(0x80)));
        let bits = if F == 1 {
            _mm256_add_epi32(_mm256_slli_epi32::<20>(mag), _mm256_set1_epi32(120 << 23))
        } else {
            _mm256_add_epi32(_mm256_slli_epi32::<21>(mag), _mm256_set1_epi32(112 << 23))
        };
        let zero = _mm256_cmpeq_epi32(mag, _mm256_setzero_si256());
        _mm256_castsi256_ps(_mm256_or_si256(_mm256_andnot_si256(zero, bits), sign))
    }

    #[inline]
    fn decode<const F: u8>(b: u8) -> f32 {
        use crate::engine::kv_cache::Kv8Format;
        match F {
            0 => Kv8Format::Int8.decode(b),
            1 => Kv8Format::E4m3.decode(b),
            _ => Kv8Format::E5m2.decode(b),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot<const F: u8>(q: &[f32], x: &[u8]) -> f32 {
        let n = q.len();
        let (pq, px) = (q.as_ptr(), x.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(i)), load8::<F>(px.add(i)), s0);
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pq.add(i + 8)),
                load8::<F>(px.add(i + 8)),
                s1,
            );
            i += 16;
        }
        while i + 8 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(i)), load8::<F>(px.add(i)), s0);
            i += 8;
        }
        let mut s = crate::engine::layers::simd::x86::hsum(_mm256_add_ps(s0, s1));
        while i < n {
            s += *pq.add(i) * decode::<F>(*px.add(i));
            i += 1;
        }
        s
    }

    /// `Σ_j scales[j] · Σ_{i in group j} q[i]·decode(x[i])`, groups of `g` (a multiple of 8).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_groups<const F: u8>(
        q: &[f32],
        x: &[u8],
        scales: &[f32],
        g: usize,
    ) -> f32 {
        let (pq, px) = (q.as_ptr(), x.as_ptr());
        let mut total = _mm256_setzero_ps();
        for (j, s) in scales.iter().enumerate() {
            let mut acc = _mm256_setzero_ps();
            let mut i = j * g;
            let end = i + g;
            while i < end {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(i)), load8::<F>(px.add(i)), acc);
                i += 8;
            }
            total = _mm256_fmadd_ps(acc, _mm256_set1_ps(*s), total);
        }
        crate::engine::layers::simd::x86::hsum(total)
    }

    /// `y[i] += alpha · scales[i / g] · decode(x[i])`, groups of `g` (a multiple of 8).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy_groups<const F: u8>(
        alpha: f32,
        x: &[u8],
        scales: &[f32],
        g: usize,
        y: &mut [f32],
    ) {
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        for (j, s) in scales.iter().enumerate() {
            let a = _mm256_set1_ps(alpha * s);
            let mut i = j * g;
            let end = i + g;
            while i < end {
                _mm256_storeu_ps(
                    py.add(i),
                    _mm256_fmadd_ps(a, load8::<F>(px.add(i)), _mm256_loadu_ps(py.add(i))),
                );
                i += 8;
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy<const F: u8>(alpha: f32, x: &[u8], y: &mut [f32]) {
        let n = y.len();
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let a = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(
                py.add(i),
                _mm256_fmadd_ps(a, load8::<F>(px.add(i)), _mm256_loadu_ps(py.add(i))),
            );
            i += 8;
        }
        while i < n {
            *py.add(i) += alpha * decode::<F>(*px.add(i));
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMATS: [Kv8Format; 3] = [Kv8Format::Int8, Kv8Format::E4m3, Kv8Format::E5m2];

    fn noise(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 - 0.5) * 4.0
            })
            .collect()
    }

    #[test]
    fn fused_dot_and_axpy_equal_dequantize_then_multiply_on_odd_lengths() {
        for format in FORMATS {
            for n in [1, 3, 7, 8, 9, 15, 16, 17, 31, 64, 80, 97, 128, 130] {
                let x = noise(n, n as u32 + 7);
                let q = noise(n, n as u32 + 99);
                let mut codes = vec![0u8; n];
                let scale = format.quantize_row(&x, &mut codes);
                // every code the format has, too
                let all: Vec<u8> = (0..n).map(|i| (i * 37 % 256) as u8).collect();
                for c in [&codes, &all] {
                    let deq: Vec<f32> = c.iter().map(|b| format.decode(*b)).collect();
                    if deq.iter().any(|v| !v.is_finite()) {
                        continue; // NaN / inf codes are never written
                    }
                    let want: f64 = q.iter().zip(&deq).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let size: f64 = q
                        .iter()
                        .zip(&deq)
                        .map(|(a, b)| (*a as f64 * *b as f64).abs())
                        .sum();
                    let got = dot(format, &q, c) as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * size.max(1e-30),
                        "{format:?} n {n}: dot {got} vs {want}"
                    );
                    let mut y = q.clone();
                    axpy(format, 0.75, c, &mut y);
                    for i in 0..n {
                        let want = q[i] + 0.75 * deq[i];
                        assert!(
                            (y[i] - want).abs() <= 1e-5 * want.abs().max(1.0),
                            "{format:?} n {n} [{i}]: {} vs {want}",
                            y[i]
                        );
                    }
                }
                assert!(scale > 0.0);
            }
        }
    }
}
