//! The token embedding table: float, or kept in ggml blocks (a GGUF's `token_embd`) and dequantized a
//! row at a time, so a quantized model never holds a float copy of its largest matrix.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{bail, DType, Result, Tensor};

#[derive(Debug, Clone)]
pub enum Embedding {
    /// `[vocab, hidden]`.
    Dense(Tensor),
    /// `[vocab, hidden]` in ggml blocks; rows come out in `dtype`.
    Quantized { table: Arc<QTensor>, dtype: DType },
}

impl Embedding {
    /// A table in ggml blocks, checked against the shape the model expects. Float-typed tables
    /// (an F32/F16 GGUF) are made dense.
    pub fn quantized(table: Arc<QTensor>, dims: (usize, usize), dtype: DType) -> Result<Self> {
        let got = table.shape().dims2()?;
        if got != dims {
            bail!("embedding table is {got:?}, expected {dims:?}")
        }
        if table.dtype().block_size() == 1 {
            return Ok(Self::Dense(
                table.dequantize(&table.device())?.to_dtype(dtype)?,
            ));
        }
        Ok(Self::Quantized { table, dtype })
    }

    /// The rows of `ids` (u32), `[n, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(t) => t.index_select(ids, 0),
            Self::Quantized { table, dtype } => table.embedding(ids)?.to_dtype(*dtype),
        }
    }
}
