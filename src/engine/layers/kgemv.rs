//! `x · Wᵀ` on CPU for the block types the 32-block kernel (`qgemv`) does not read: the k-quants
//! (q2_K … q6_K, q8_K, 256-wide blocks) and q5_1 (q4_1 is `qgemv`'s). The arithmetic is ggml's, through candle's
//! block dot products (`GgmlType::vec_dot`, SIMD where candle has it): each row of `x` is quantized to
//! the weight type's activation blocks (q8_K, or q8_1), one dot product per (row, weight row). The work
//! is split by weight rows over the engine's kernel pool (decode-sized batches), so a thread another process holds up does not
//! stall the product (candle's own quantized matmul waits at a barrier for every worker), and each
//! row's result is the same at every batch height. q4_K and q6_K (the bulk of a q4_k_m file) take
//! 2 to 16 tokens through `x86`'s kernels: candle's AVX2 arithmetic with each block unpacked once
//! for all the tokens, two tokens per 512-bit vector where AVX-512BW allows (the same bits; 16
//! tokens × [576, 1536] q4_K: 164–174 µs against candle's dot products' 263–284, Zen 5).

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ5_1, BlockQ6K, BlockQ8K, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, DType, Result, Tensor};

#[cfg(target_arch = "x86_64")]
mod x86;

/// Weight rows per unit of work handed to a thread.
const ROW_BLOCK: usize = 16;

/// Rows of `x` served here: decode, batched decode and speculative verification. Longer prompt
/// chunks go to candle's quantized matmul, faster there (measured: prefill 508-547 tok/s through
/// candle, 421-432 here, on the SmolLM2 shape at q4k).
pub const MAX_ROWS: usize = 16;

/// Whether [`matmul`] serves `x · qᵀ`.
pub fn applies(x: &Tensor, q: &QTensor) -> bool {
    let block = q.dtype().block_size();
    x.device().is_cpu()
        && q.device().is_cpu()
        && x.dtype() == DType::F32
        && x.rank() == 2
        && x.dim(0).is_ok_and(|m| (1..=MAX_ROWS).contains(&m))
        && x.dim(1).is_ok_and(|k| k % block == 0)
        && matches!(
            q.dtype(),
            GgmlDType::Q2K
                | GgmlDType::Q3K
                | GgmlDType::Q4K
                | GgmlDType::Q5K
                | GgmlDType::Q6K
                | GgmlDType::Q8K
                | GgmlDType::Q5_1
        )
}

/// `x` `[m, k]` times `q` `[n, k]` transposed: `[m, n]`.
pub fn matmul(x: &Tensor, q: &QTensor) -> Result<Tensor> {
    match q.dtype() {
        GgmlDType::Q2K => run::<BlockQ2K>(x, q),
        GgmlDType::Q3K => run::<BlockQ3K>(x, q),
        GgmlDType::Q4K => run::<BlockQ4K>(x, q),
        GgmlDType::Q5K => run::<BlockQ5K>(x, q),
        GgmlDType::Q6K => run::<BlockQ6K>(x, q),
        GgmlDType::Q8K => run::<BlockQ8K>(x, q),
        GgmlDType::Q5_1 => run::<BlockQ5_1>(x, q),
        other => bail!("no k-quant kernel for {other:?}"),
    }
}

/// `out[t]` = a row of `kb` weight blocks · token `t` of `m` tokens' q8_K blocks.
type Batched = unsafe fn(*const u8, *const u8, usize, &mut [f32]);

/// The kernel for `m` tokens of `dtype` that unpacks each block once for all of them, where this
/// CPU has one.
fn batched_kernel(dtype: GgmlDType, m: usize) -> Option<Batched> {
    #[cfg(target_arch = "x86_64")]
    if (2..=x86::MAX_TOKENS).contains(&m) && x86::available() {
        return match dtype {
            GgmlDType::Q4K => Some(x86::q4k),
            GgmlDType::Q6K => Some(x86::q6k),
            _ => None,
        };
    }
    let _ = (dtype, m);
    None
}

fn run<T: GgmlType>(x: &Tensor, q: &QTensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (n, k2) = q.shape().dims2()?;
    let bs = T::BLCK_SIZE;
    if k != k2 || k % bs != 0 || T::VecDotType::BLCK_SIZE != bs {
        bail!("quantized matmul: x is [{m}, {k}] but the weight is [{n}, {k2}]")
    }
    let kb = k / bs;
    let data = q.data()?;
    let size = std::mem::size_of::<T>();
    if data.len() != n * kb * size || data.as_ptr().align_offset(std::mem::align_of::<T>()) != 0 {
        bail!(
            "quantized weight storage is not {n}x{kb} aligned {:?} blocks",
            T::DTYPE
        )
    }
    // SAFETY: the bytes are `n * kb` blocks of `T` (checked length and alignment), as candle stores
    // them; `T` is a plain-old-data block type.
    let w: &[T] = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const T, n * kb) };
    let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let mut xq = vec![T::VecDotType::zeros(); m * kb];
    for (row, blocks) in xs.chunks_exact(k).zip(xq.chunks_exact_mut(kb)) {
        T::VecDotType::from_float(row, blocks);
    }
    // 2 to 16 q4_K / q6_K tokens: each block unpacked once for all of them (candle's bits); one
    // token, and the other types: candle's own dot product per token
    let batched = batched_kernel(T::DTYPE, m);
    let y = super::pool::by_weight_rows(m, n, ROW_BLOCK, |rows, buf| {
        for (jj, j) in rows.enumerate() {
            let out = &mut buf[jj * m..(jj + 1) * m];
            match batched {
                // SAFETY: `batched_kernel` checked the CPU's features and `m`; row `j < n` holds
                // `kb` blocks of `T`, the kernel's type, and `xq` `m * kb` q8_K blocks
                // (`T::VecDotType`).
                Some(kernel) => unsafe {
                    let row = w[j * kb..].as_ptr() as *const u8;
                    kernel(row, xq.as_ptr() as *const u8, kb, out)
                },
                None => {
                    let wr = &w[j * kb..(j + 1) * kb];
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = T::vec_dot(k, wr, &xq[i * kb..(i + 1) * kb]);
                    }
                }
            }
        }
    });
    Tensor::from_vec(y, (m, n), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module};

    /// Each token of a batch gets, bit for bit, candle's one-token dot product (`GgmlType::vec_dot`)
    /// of its row: q4_K and q6_K at every height the batched kernels take, rows not a multiple of
    /// the work unit, one and several blocks per row, activations of mixed magnitudes.
    #[test]
    fn batched_k_quant_rows_equal_candles_dot_products_bit_for_bit() -> Result<()> {
        fn check<T: GgmlType>(dtype: GgmlDType) -> Result<()> {
            let dev = Device::Cpu;
            for (n, k) in [(19, 256), (33, 768)] {
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
                let q = QTensor::quantize(&w, dtype)?;
                let data = q.data()?;
                // SAFETY: `data` is `n * k / 256` blocks of `T`, as candle stores them.
                let blocks: &[T] = unsafe {
                    std::slice::from_raw_parts(data.as_ptr() as *const T, n * k / T::BLCK_SIZE)
                };
                let kb = k / T::BLCK_SIZE;
                let x = Tensor::randn(0f32, 1.0, (MAX_ROWS, k), &dev)?.broadcast_mul(
                    &Tensor::arange(1f32, MAX_ROWS as f32 + 1.0, &dev)?
                        .powf(3.0)?
                        .reshape((MAX_ROWS, 1))?,
                )?;
                let rows = x.to_vec2::<f32>()?;
                let want: Vec<Vec<f32>> = rows
                    .iter()
                    .map(|row| {
                        let mut xq = vec![T::VecDotType::zeros(); kb];
                        T::VecDotType::from_float(row, &mut xq);
                        (0..n)
                            .map(|j| T::vec_dot(k, &blocks[j * kb..(j + 1) * kb], &xq))
                            .collect()
                    })
                    .collect();
                for m in 1..=MAX_ROWS {
                    for from in [0, MAX_ROWS - m] {
                        let got = matmul(&x.narrow(0, from, m)?, &q)?.to_vec2::<f32>()?;
                        for (i, row) in got.iter().enumerate() {
                            assert_eq!(
                                row,
                                &want[from + i],
                                "{dtype:?} [{n}, {k}] height {m} row {}",
                                from + i
                            );
                        }
                    }
                }
            }
            Ok(())
        }
        check::<BlockQ4K>(GgmlDType::Q4K)?;
        check::<BlockQ6K>(GgmlDType::Q6K)
    }

    #[test]
    fn matches_candles_products_on_every_block_type() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q8K,
            GgmlDType::Q5_1,
        ] {
            for (m, n) in [(1, 37), (3, 16), (13, 70)] {
                let k = 512;
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                let q = std::sync::Arc::new(QTensor::quantize(&w, dtype)?);
                assert!(applies(&x, &q), "{dtype:?}");
                let ours = matmul(&x, &q)?;
                let candle = QMatMul::from_arc(q.clone())?.forward(&x)?;
                let diff = (&ours - &candle)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let size = candle.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff <= size * 1e-5,
                    "{dtype:?} ({m},{k},{n}): {diff} of {size}"
                );
                // and a row alone is the same bits
                let one = matmul(&x.narrow(0, m - 1, 1)?, &q)?.to_vec2::<f32>()?;
                assert_eq!(one[0], ours.to_vec2::<f32>()?[m - 1], "{dtype:?} height");
            }
        }
        Ok(())
    }
}
