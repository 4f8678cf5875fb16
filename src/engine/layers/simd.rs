//! Small float32 vector kernels for the CPU paths, with AVX2+FMA (and, for the exponentials, AVX-512)
//! versions chosen at run time (the crate is built for baseline x86-64, so the compiler alone would
//! only use SSE2).

#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// `Σ a[i]·b[i]` over the shorter of the two.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    #[cfg(target_arch = "x86_64")]
    {
        if avx2_fma() {
            // SAFETY: AVX2 and FMA are available (checked above); both slices hold `n` floats.
            return unsafe { x86::dot(a, b) };
        }
    }
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += alpha·x` over the shorter of the two.
pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &mut y[..n]);
    #[cfg(target_arch = "x86_64")]
    {
        if avx2_fma() {
            // SAFETY: AVX2 and FMA are available (checked above); both slices hold `n` floats.
            unsafe { x86::axpy(alpha, x, y) };
            return;
        }
    }
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512f"))
}

/// `x[i] = exp(x[i] - max(x)) / Σ exp(x[j] - max(x))`, in place; `-inf` entries (masked) become 0.
/// The exponential is a polynomial good to 2 ulp (glibc's `expf` is scalar and took 8% of a prefill).
pub(crate) fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        // nothing may be attended to: leave the row uniform rather than NaN
        let n = x.len() as f32;
        x.fill(1.0 / n);
        return;
    }
    let sum = exp_shifted(x, max);
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `x[i] *= scale` in place; returns the largest `x[i]` after (`-inf` for none).
pub(crate) fn scale_max(x: &mut [f32], scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2_fma() {
            // SAFETY: AVX2 is available (checked above).
            return unsafe { x86::scale_max(x, scale) };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for v in x.iter_mut() {
        *v *= scale;
        max = max.max(*v);
    }
    max
}

/// `x[i] = exp(x[i] - shift)` in place; returns `Σ x[i]` after.
pub(crate) fn exp_shifted(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512() {
            // SAFETY: AVX-512F is available (checked above).
            return unsafe { exp_x86::exp_shifted_512(x, shift) };
        }
        if avx2_fma() {
            // SAFETY: AVX2 and FMA are available (checked above).
            return unsafe { exp_x86::exp_shifted_256(x, shift) };
        }
    }
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - shift).exp();
        sum += *v;
    }
    sum
}

/// `out[i] = silu(gate[i]) · up[i]` (`silu(g) = g / (1 + exp(-g))`), over the shortest of the three.
pub(crate) fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = gate.len().min(up.len()).min(out.len());
    let (gate, up, out) = (&gate[..n], &up[..n], &mut out[..n]);
    #[cfg(target_arch = "x86_64")]
    {
        if avx512() {
            // SAFETY: AVX-512F is available (checked above); all three hold `n` floats.
            unsafe { exp_x86::silu_mul_512(gate, up, out) };
            return;
        }
        if avx2_fma() {
            // SAFETY: AVX2 and FMA are available (checked above); all three hold `n` floats.
            unsafe { exp_x86::silu_mul_256(gate, up, out) };
            return;
        }
    }
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// The vector exponential: `exp(x) = 2^n · p(r)`, `n = round(x·log2 e)`, `r = x − n·ln 2` (in two
/// parts), `p` Cephes' degree-6 polynomial; `x` is clamped to [−88.38, 88.38] first, so `−inf` gives 0
/// (2^−127 with a zero exponent field) and large `x` a large finite value.
#[cfg(target_arch = "x86_64")]
mod exp_x86 {
    use std::arch::x86_64::*;

    const HI: f32 = 88.376_26;
    const LO: f32 = -88.376_26;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_2e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp512(x: __m512) -> __m512 {
        let x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(HI)), _mm512_set1_ps(LO));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(P[0]);
        for c in &P[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
        let p = _mm512_add_ps(p, _mm512_set1_ps(1.0));
        let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        _mm512_mul_ps(p, _mm512_castsi512_ps(e))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp256(x: __m256) -> __m256 {
        let x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(HI)), _mm256_set1_ps(LO));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P[0]);
        for c in &P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
        let p = _mm256_add_ps(p, _mm256_set1_ps(1.0));
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(p, _mm256_castsi256_ps(e))
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_shifted_512(x: &mut [f32], shift: f32) -> f32 {
        let n = x.len();
        let p = x.as_mut_ptr();
        let s = _mm512_set1_ps(shift);
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), s));
            _mm512_storeu_ps(p.add(i), e);
            acc = _mm512_add_ps(acc, e);
            i += 16;
        }
        if i < n {
            let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
            let v = _mm512_maskz_loadu_ps(m, p.add(i));
            let e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(v, s)));
            _mm512_mask_storeu_ps(p.add(i), m, e);
            acc = _mm512_add_ps(acc, e);
        }
        _mm512_reduce_add_ps(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shifted_256(x: &mut [f32], shift: f32) -> f32 {
        let n = x.len();
        let p = x.as_mut_ptr();
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), s));
            _mm256_storeu_ps(p.add(i), e);
            acc = _mm256_add_ps(acc, e);
            i += 8;
        }
        let mut sum = super::x86::hsum(acc);
        while i < n {
            let e = (*p.add(i) - shift).exp();
            *p.add(i) = e;
            sum += e;
            i += 1;
        }
        sum
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn silu_mul_512(g: &[f32], u: &[f32], o: &mut [f32]) {
        let n = g.len();
        let (pg, pu, po) = (g.as_ptr(), u.as_ptr(), o.as_mut_ptr());
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let m: __mmask16 = if i + 16 <= n {
                0xffff
            } else {
                (1u32 << (n - i)) as u16 - 1
            };
            let gv = _mm512_maskz_loadu_ps(m, pg.add(i));
            let uv = _mm512_maskz_loadu_ps(m, pu.add(i));
            let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            let y = _mm512_div_ps(_mm512_mul_ps(gv, uv), _mm512_add_ps(one, e));
            _mm512_mask_storeu_ps(po.add(i), m, y);
            i += 16;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul_256(g: &[f32], u: &[f32], o: &mut [f32]) {
        let n = g.len();
        let (pg, pu, po) = (g.as_ptr(), u.as_ptr(), o.as_mut_ptr());
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i + 8 <= n {
            let gv = _mm256_loadu_ps(pg.add(i));
            let uv = _mm256_loadu_ps(pu.add(i));
            let e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            let y = _mm256_div_ps(_mm256_mul_ps(gv, uv), _mm256_add_ps(one, e));
            _mm256_storeu_ps(po.add(i), y);
            i += 8;
        }
        while i < n {
            let gi = *pg.add(i);
            *po.add(i) = gi / (1.0 + (-gi).exp()) * *pu.add(i);
            i += 1;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// Sum of the eight lanes.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                s1,
            );
            i += 16;
        }
        while i + 8 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(s0, s1));
        while i < n {
            s += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        s
    }

    /// `super::scale_max` 8 lanes at a time: the same products, and a maximum is exact in any
    /// order.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn scale_max(x: &mut [f32], scale: f32) -> f32 {
        let (n, p) = (x.len(), x.as_mut_ptr());
        let s = _mm256_set1_ps(scale);
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), s);
            _mm256_storeu_ps(p.add(i), v);
            m = _mm256_max_ps(m, v);
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        while i < n {
            *p.add(i) *= scale;
            max = max.max(*p.add(i));
            i += 1;
        }
        max
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let a = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(
                py.add(i),
                _mm256_fmadd_ps(a, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i))),
            );
            i += 8;
        }
        while i < n {
            *py.add(i) += alpha * *px.add(i);
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_and_axpy_match_scalar_on_odd_lengths() {
        for n in [1, 7, 8, 17, 64, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).cos()).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - want).abs() < 1e-4, "dot n={n}");
            let mut y = b.clone();
            axpy(0.5, &a, &mut y);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6, "axpy n={n}");
            }
        }
    }
    /// Scaling in place and taking the maximum gives the scalar loop's values and maximum, on
    /// lengths with and without a vector tail, negative rows included.
    #[test]
    fn scale_max_equals_the_scalar_loop() {
        for n in [0, 1, 7, 8, 13, 64, 100] {
            for shift in [0.0f32, -50.0] {
                let x: Vec<f32> = (0..n)
                    .map(|i| (i as f32 * 0.37).sin() * 9.0 + shift)
                    .collect();
                let (mut got, mut want) = (x.clone(), x.clone());
                let mut max = f32::NEG_INFINITY;
                for v in want.iter_mut() {
                    *v *= 0.125;
                    max = max.max(*v);
                }
                assert_eq!(scale_max(&mut got, 0.125), max, "n {n}");
                assert_eq!(got, want, "n {n}");
            }
        }
    }

    fn softmax_ref(x: &[f32]) -> Vec<f32> {
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = x.iter().map(|v| ((*v - max) as f64).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| (v / s) as f32).collect()
    }

    #[test]
    fn the_vector_exponential_is_within_2_ulp_of_f64() {
        // every path the CPU has, and the scalar tail on lengths that are not a vector multiple
        let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.0441).collect();
        for n in [xs.len(), 13, 1] {
            let mut y = xs[..n].to_vec();
            exp_shifted(&mut y, 0.0);
            for (x, y) in xs[..n].iter().zip(&y) {
                let want = (*x as f64).exp();
                let ulp = (want as f32).abs() * f32::EPSILON;
                assert!(
                    ((*y as f64) - want).abs() <= 2.0 * ulp as f64 + 1e-38,
                    "exp({x}) = {y}, want {want}"
                );
            }
        }
        let mut edge = vec![f32::NEG_INFINITY, -100.0, 0.0, 100.0];
        exp_shifted(&mut edge, 0.0);
        assert_eq!(&edge[..3], &[0.0, 0.0, 1.0]);
        assert!(edge[3].is_finite() && edge[3] > 1e38);
    }

    #[test]
    fn softmax_and_silu_mul_match_the_reference() {
        for n in [1, 5, 16, 17, 100, 515] {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
            let mut masked = x.clone();
            masked[n - 1] = f32::NEG_INFINITY;
            let rows = if n > 1 {
                vec![x.clone(), masked]
            } else {
                vec![x.clone()]
            };
            for row in rows {
                let mut got = row.clone();
                softmax(&mut got);
                for (g, w) in got.iter().zip(softmax_ref(&row)) {
                    assert!(
                        (g - w).abs() <= 1e-6 * w.max(1e-3),
                        "softmax n={n}: {g} vs {w}"
                    );
                }
            }
            let u: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let mut out = vec![0f32; n];
            silu_mul(&x, &u, &mut out);
            for i in 0..n {
                let g = x[i] as f64;
                let want = g / (1.0 + (-g).exp()) * u[i] as f64;
                assert!(
                    ((out[i] as f64) - want).abs() <= 1e-6 * want.abs().max(1e-3),
                    "silu n={n}"
                );
            }
        }
        let mut none = vec![f32::NEG_INFINITY; 4];
        softmax(&mut none);
        assert_eq!(none, vec![0.25; 4]);
    }
    /// The AVX2 versions, which an AVX-512 machine would not reach through the dispatch.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_exponentials_match_the_dispatched_ones() {
        if !avx2_fma() {
            return;
        }
        let x: Vec<f32> = (-700..=600).map(|i| i as f32 * 0.13).collect();
        let u: Vec<f32> = (0..x.len()).map(|i| (i as f32 * 0.11).cos()).collect();
        for n in [x.len(), 7] {
            let (mut a, mut b) = (x[..n].to_vec(), x[..n].to_vec());
            // SAFETY: AVX2 and FMA are available (checked above).
            let sa = unsafe { exp_x86::exp_shifted_256(&mut a, 1.5) };
            let sb: f32 = b
                .iter_mut()
                .map(|v| {
                    *v = ((*v - 1.5) as f64).exp() as f32;
                    *v
                })
                .sum();
            assert!((sa - sb).abs() <= 1e-5 * sb);
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() <= 2.0 * f32::EPSILON * q.abs() + 1e-38);
            }
            let (mut o1, mut o2) = (vec![0f32; n], vec![0f32; n]);
            // SAFETY: as above; all three slices hold `n` floats.
            unsafe { exp_x86::silu_mul_256(&x[..n], &u[..n], &mut o1) };
            silu_mul(&x[..n], &u[..n], &mut o2);
            for (p, q) in o1.iter().zip(&o2) {
                assert!((p - q).abs() <= 1e-6 * q.abs().max(1e-3));
            }
        }
    }
}
