//! Quantized weight formats: which ggml block type a `QUANTIZATION` name means, the fallback when a
//! matrix's rows don't split into that type's blocks (as llama.cpp's quantizer does), and (in
//! `checkpoint`) checkpoints published quantized: AWQ / GPTQ repacked into ggml blocks, FP8.

use std::borrow::Cow;

pub(crate) mod checkpoint;

pub use candle_core::quantized::GgmlDType;
use candle_core::quantized::{QStorage, QTensor};
use candle_core::{bail, Result, Tensor};

/// The in-situ `QUANTIZATION` names and the ggml block types they stand for.
pub(crate) const IN_SITU: &[(&str, GgmlDType)] = &[
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q8_0", GgmlDType::Q8_0),
    ("q2k", GgmlDType::Q2K),
    ("q3k", GgmlDType::Q3K),
    ("q4k", GgmlDType::Q4K),
    ("q5k", GgmlDType::Q5K),
    ("q6k", GgmlDType::Q6K),
    ("q8k", GgmlDType::Q8K),
];

/// The block type an in-situ name stands for.
pub(crate) fn in_situ_dtype(name: &str) -> Option<GgmlDType> {
    let name = name.to_ascii_lowercase();
    IN_SITU.iter().find(|(n, _)| *n == name).map(|(_, d)| *d)
}

/// The type a `[rows, cols]` matrix is stored in when `wanted` is asked for: `wanted` when `cols`
/// splits into its blocks; else the 32-wide type llama.cpp falls back to for k-quants (so a
/// 576-wide SmolLM2 projection asked as q4k becomes q5_0); `None` (keep it dense) when not even 32 divides.
pub(crate) fn storage_dtype(wanted: GgmlDType, cols: usize) -> Option<GgmlDType> {
    if fits(wanted, cols) {
        return Some(wanted);
    }
    let fallback = match wanted {
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K if fits(GgmlDType::Q5_1, cols) => GgmlDType::Q5_1,
        _ => GgmlDType::Q8_0,
    };
    fits(fallback, cols).then_some(fallback)
}

/// Whether rows of `cols` split into `dtype`'s blocks so that the CPU kernels can multiply them
/// (candle's q4_1/q5_1 products also take the blocks in pairs, and assert it).
pub fn fits(dtype: GgmlDType, cols: usize) -> bool {
    let block = dtype.block_size();
    match dtype {
        GgmlDType::Q4_1 | GgmlDType::Q5_1 => cols.is_multiple_of(2 * block),
        _ => cols.is_multiple_of(block),
    }
}

/// The LM head keeps at least 8 bits (its error lands straight on the logits), as llama.cpp keeps
/// `output.weight` at q6_k or better.
pub(crate) fn lm_head_dtype(wanted: GgmlDType) -> GgmlDType {
    match wanted {
        GgmlDType::Q8K => GgmlDType::Q8K,
        _ => GgmlDType::Q8_0,
    }
}

/// Quantizes a `[out, in]` weight to `wanted` (or its fallback). `None` when the rows fit no block
/// size, so the caller keeps the weight dense.
pub(crate) fn quantize_matrix(weight: &Tensor, wanted: GgmlDType) -> Result<Option<QTensor>> {
    let (_, cols) = weight.dims2()?;
    let Some(dtype) = storage_dtype(wanted, cols) else {
        return Ok(None);
    };
    let w = weight.to_dtype(candle_core::DType::F32)?.contiguous()?;
    Ok(Some(QTensor::quantize(&w, dtype)?))
}

/// Rows of f32 read at a time by [`quantize_in_chunks`]: 4 MiB of them.
const CHUNK_BYTES: usize = 4 << 20;

/// A `[rows, cols]` float matrix quantized to `dtype` (whose blocks `cols` must fit) a chunk of rows
/// at a time: `read(r)` gives rows `r` (f32, `[r.len(), cols]`), never more than 4 MiB of them, so
/// the whole matrix is never held in float. Blocks run along rows, so the result equals quantizing
/// the whole matrix at once.
pub(crate) fn quantize_in_chunks(
    (rows, cols): (usize, usize),
    dtype: GgmlDType,
    device: &candle_core::Device,
    mut read: impl FnMut(std::ops::Range<usize>) -> Result<Tensor>,
) -> Result<QTensor> {
    if !fits(dtype, cols) {
        bail!("rows of {cols} do not fill {dtype:?} blocks")
    }
    let chunk = (CHUNK_BYTES / (4 * cols.max(1))).max(1);
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let mut bytes = Vec::with_capacity(rows * row_bytes);
    for start in (0..rows).step_by(chunk) {
        let r = start..(start + chunk).min(rows);
        let part = read(r.clone())?;
        if part.dims2()? != (r.len(), cols) {
            bail!(
                "rows {r:?} of a [{rows}, {cols}] matrix read as {:?}",
                part.shape()
            )
        }
        // a buffer of its own: candle's quantizer reads a tensor's whole storage, ignoring a
        // view's offset
        let values = part
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let part = Tensor::from_vec(values, (r.len(), cols), &candle_core::Device::Cpu)?;
        let q = QTensor::quantize(&part, dtype)?;
        bytes.extend_from_slice(&q.data()?);
    }
    let storage = QStorage::from_data(Cow::Owned(bytes), device, dtype)?;
    QTensor::new(storage, (rows, cols))
}

/// Stacks `[out_i, in]` matrices of one block type into `[sum out_i, in]`. Blocks run along rows, so
/// a row's bytes are self-contained and stacking is concatenating bytes: quantizing q, k and v apart
/// and stacking them equals quantizing the stacked float matrix.
pub(crate) fn stack_rows(parts: &[&QTensor]) -> Result<QTensor> {
    let Some(first) = parts.first() else {
        bail!("nothing to stack")
    };
    let (dtype, device) = (first.dtype(), first.device());
    let (_, cols) = first.shape().dims2()?;
    let mut rows = 0;
    let mut bytes = Vec::new();
    for p in parts {
        let (r, c) = p.shape().dims2()?;
        if p.dtype() != dtype || c != cols {
            bail!(
                "cannot stack a {:?} [{r}, {c}] matrix onto {:?} [_, {cols}]",
                p.dtype(),
                dtype
            )
        }
        rows += r;
        bytes.extend_from_slice(&p.data()?);
    }
    let storage = QStorage::from_data(Cow::Owned(bytes), &device, dtype)?;
    QTensor::new(storage, (rows, cols))
}

/// Reorders the rows of a quantized `[rows, cols]` matrix: row `i` of the result is row `order[i]`.
pub(crate) fn permute_rows(q: &QTensor, order: &[usize]) -> Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    if order.len() != rows {
        bail!("row order of {} for {rows} rows", order.len())
    }
    let row_bytes = cols / q.dtype().block_size() * q.dtype().type_size();
    let data = q.data()?;
    let mut out = Vec::with_capacity(data.len());
    for &r in order {
        out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(Cow::Owned(out), &q.device(), q.dtype())?;
    QTensor::new(storage, (rows, cols))
}

/// What the worker says when a checkpoint or a `QUANTIZATION` value needs kernels this build lacks.
pub(crate) fn unsupported_message(what: &str) -> String {
    format!(
        "{what} is not supported by this worker: it runs float checkpoints (QUANTIZATION unset or `none`), \
         llama.cpp GGUF files (QUANTIZATION=gguf, or MODEL_NAME naming a .gguf file), AWQ / GPTQ 4-bit \
         and FP8 checkpoints (read from config.json's quantization_config; QUANTIZATION=awq|gptq \
         optional) and in-situ quantization of float checkpoints at load (QUANTIZATION={})",
        IN_SITU
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn k_quants_fall_back_like_llama_cpp_on_narrow_rows() {
        assert_eq!(storage_dtype(GgmlDType::Q4K, 1536), Some(GgmlDType::Q4K));
        assert_eq!(storage_dtype(GgmlDType::Q4K, 576), Some(GgmlDType::Q5_0));
        assert_eq!(storage_dtype(GgmlDType::Q6K, 576), Some(GgmlDType::Q8_0));
        assert_eq!(storage_dtype(GgmlDType::Q8_0, 64), Some(GgmlDType::Q8_0));
        assert_eq!(storage_dtype(GgmlDType::Q8_0, 48), None);
        assert_eq!(storage_dtype(GgmlDType::Q5_1, 96), Some(GgmlDType::Q8_0));
        assert_eq!(storage_dtype(GgmlDType::Q5K, 576), Some(GgmlDType::Q5_1));
        assert_eq!(storage_dtype(GgmlDType::Q5K, 608), Some(GgmlDType::Q8_0));
        assert_eq!(in_situ_dtype("Q4K"), Some(GgmlDType::Q4K));
        assert_eq!(in_situ_dtype("awq"), None);
    }

    /// A large table is quantized a few rows at a time, never read whole (the loader keeps no
    /// float copy of it), and gives the bytes quantizing it whole gives.
    #[test]
    fn chunked_quantization_never_reads_the_whole_matrix() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, cols) = (3000, 576);
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &dev)?;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
            let mut widest = 0;
            let mut covered = 0;
            let q = quantize_in_chunks((rows, cols), dtype, &dev, |r| {
                assert_eq!(r.start, covered, "rows in order, each once");
                covered = r.end;
                widest = widest.max(r.len());
                w.narrow(0, r.start, r.len())
            })?;
            assert_eq!(covered, rows);
            assert!(
                widest * cols * 4 <= CHUNK_BYTES && widest < rows,
                "{widest} rows at once"
            );
            assert_eq!(
                q.data()?,
                QTensor::quantize(&w, dtype)?.data()?,
                "{dtype:?}"
            );
            assert_eq!(q.shape().dims2()?, (rows, cols));
        }
        Ok(())
    }

    #[test]
    fn stacking_quantized_rows_equals_quantizing_the_stack() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (3, 64), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (5, 64), &dev)?;
        let qa = QTensor::quantize(&a, GgmlDType::Q8_0)?;
        let qb = QTensor::quantize(&b, GgmlDType::Q8_0)?;
        let stacked = stack_rows(&[&qa, &qb])?;
        let whole = QTensor::quantize(&Tensor::cat(&[&a, &b], 0)?, GgmlDType::Q8_0)?;
        assert_eq!(stacked.shape().dims2()?, (8, 64));
        assert_eq!(stacked.data()?, whole.data()?);
        let q4 = QTensor::quantize(&b, GgmlDType::Q4_0)?;
        assert!(stack_rows(&[&qa, &q4]).is_err());
        Ok(())
    }

    #[test]
    fn permuting_quantized_rows_moves_whole_rows() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (4, 32), &dev)?;
        let q = QTensor::quantize(&a, GgmlDType::Q8_0)?;
        let p = permute_rows(&q, &[2, 0, 3, 1])?.dequantize(&dev)?;
        let d = q.dequantize(&dev)?;
        for (i, r) in [2usize, 0, 3, 1].iter().enumerate() {
            let diff = (p.get(i)? - d.get(*r)?)?
                .abs()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0);
        }
        Ok(())
    }

    #[test]
    fn unsupported_values_list_what_runs() {
        let msg = unsupported_message("QUANTIZATION=awq");
        assert!(msg.contains("q8_0") && msg.contains("gguf"), "{msg}");
    }
}
