//! Row kernels over a whole vocabulary (150k entries): written as fixed-width lanes without branches
//! so the compiler vectorises them, since `f32::exp` and `f32::max` calls do not vectorise.

const LANES: usize = 8;
/// Entries exponentiated per stack buffer in `sum_exp`.
const CHUNK: usize = 1024;

/// Largest value (`-inf` for an empty row; NaN entries are ignored).
pub fn max(values: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for v in acc.iter().chain(rest) {
        if *v > m {
            m = *v;
        }
    }
    m
}

/// Index of the first entry equal to `target`, scanning blocks with the vectorised `max` first
/// (an early-exit scalar loop does not vectorise).
pub(crate) fn position_of_max(values: &[f32], target: f32) -> Option<usize> {
    const BLOCK: usize = 256;
    values.chunks(BLOCK).enumerate().find_map(|(b, chunk)| {
        if max(chunk) == target {
            chunk
                .iter()
                .position(|v| *v == target)
                .map(|i| b * BLOCK + i)
        } else {
            None
        }
    })
}

/// Index where the running sum of non-negative `weights` first exceeds `threshold` (block sums first,
/// then a walk inside one block); the last positive weight when rounding runs past the end.
pub(crate) fn position_of_mass(weights: &[f32], mut threshold: f64) -> Option<usize> {
    const BLOCK: usize = 256;
    for (b, chunk) in weights.chunks(BLOCK).enumerate() {
        let block_sum = sum(chunk);
        if threshold >= block_sum {
            threshold -= block_sum;
            continue;
        }
        for (i, w) in chunk.iter().enumerate() {
            if *w > 0.0 {
                if threshold < *w as f64 {
                    return Some(b * BLOCK + i);
                }
                threshold -= *w as f64;
            }
        }
    }
    weights.iter().rposition(|w| *w > 0.0)
}

/// `exp(x)` to about one ulp (Cephes' polynomial), exactly 0 below -87 (masked tokens stay out).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a rounding instruction.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.0, 88.0);
    let shifted = clamped * LOG2E + ROUND;
    // The integer k sits in the low mantissa bits of `shifted`: reading it from there (instead of a
    // float-to-int cast, which must saturate) keeps the loop vectorisable.
    let k_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let k = shifted - ROUND;
    let r = clamped - k * LN2_HI - k * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(k_bits.wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        y * scale
    }
}

/// Replaces each `x` by `exp((x - max) * scale)`; returns the sum.
pub(crate) fn exp_in_place(row: &mut [f32], max: f32, scale: f32) -> f64 {
    for x in row.iter_mut() {
        *x = exp((*x - max) * scale);
    }
    sum(row)
}

/// `sum(exp(x - max))` without touching `values`.
pub(crate) fn sum_exp(values: &[f32], max: f32) -> f64 {
    let mut buf = [0f32; CHUNK];
    let mut total = 0.0;
    for chunk in values.chunks(CHUNK) {
        let buf = &mut buf[..chunk.len()];
        buf.copy_from_slice(chunk);
        total += exp_in_place(buf, max, 1.0);
    }
    total
}

/// Sum in lanes of f64 (vectorised, and precise enough for 150k small terms).
pub fn sum(values: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] += c[j] as f64;
        }
    }
    acc.iter().sum::<f64>() + rest.iter().map(|v| *v as f64).sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            assert!(
                ((got - want) / want).abs() < 3e-7,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn max_and_sums() {
        let values: Vec<f32> = (0..1001).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        assert_eq!(max(&values), 50.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(max(&[f32::NAN, 1.0]), 1.0);
        let want: f64 = values.iter().map(|v| ((v - 50.0) as f64).exp()).sum();
        assert!((sum_exp(&values, 50.0) - want).abs() < 1e-6 * want);
        assert_eq!(sum(&[1.0; 13]), 13.0);
        assert_eq!(
            position_of_max(&values, 50.0),
            values.iter().position(|v| *v == 50.0)
        );
        assert_eq!(position_of_max(&values, 51.0), None);
    }

    #[test]
    fn mass_positions() {
        let weights: Vec<f32> = (0..1000)
            .map(|i| if i % 3 == 0 { 1.0 } else { 0.0 })
            .collect();
        assert_eq!(position_of_mass(&weights, 0.0), Some(0));
        assert_eq!(position_of_mass(&weights, 0.5), Some(0));
        assert_eq!(position_of_mass(&weights, 1.0), Some(3));
        assert_eq!(position_of_mass(&weights, 300.5), Some(900));
        // Past the total (a rounding sliver): the last token with weight.
        assert_eq!(position_of_mass(&weights, 5000.0), Some(999));
        assert_eq!(position_of_mass(&[0.0; 4], 0.0), None);
    }
}
