//! Where a model's tensors come from and what its linear layers become: float safetensors as stored,
//! float safetensors quantized as they load (`QUANTIZATION=q8_0`, `q4k`, ...), or a GGUF file's blocks
//! as stored. Model files ask for tensors by their Hugging Face names and never see the difference.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use super::{Embedding, Linear};
use crate::engine::gguf::{GgufBackend, GgufFile};
use crate::engine::quant::checkpoint::{self, CheckpointQuant, Loaded, Method};
use crate::engine::quant::{self, GgmlDType};

#[derive(Clone)]
enum Source {
    /// Linear layers keep the checkpoint's float weights.
    Float,
    /// Linear layers are quantized to this type as they load (the embedding table to 8 bits).
    InSitu(GgmlDType),
    /// Linear layers and the embedding table keep the GGUF file's blocks.
    Gguf(Arc<GgufFile>),
    /// A checkpoint published quantized (AWQ, GPTQ, FP8): its quantized linear layers are repacked
    /// into ggml blocks as they load, one at a time; the rest is float.
    Checkpoint(Arc<CheckpointQuant>),
}

/// A `VarBuilder` (prefix, dtype, device, float tensors by name) that also knows how linear layers and
/// embedding tables are stored.
#[derive(Clone)]
pub(crate) struct Weights<'a> {
    vb: VarBuilder<'a>,
    source: Source,
}

impl<'a> Weights<'a> {
    /// Float weights, used as they are.
    pub fn float(vb: VarBuilder<'a>) -> Self {
        Self {
            vb,
            source: Source::Float,
        }
    }

    /// Float weights whose linear layers are quantized to `dtype` at load.
    pub fn in_situ(vb: VarBuilder<'a>, dtype: GgmlDType) -> Self {
        Self {
            vb,
            source: Source::InSitu(dtype),
        }
    }

    /// A quantized checkpoint (`quantization_config`): its AWQ / GPTQ / FP8 layers become ggml blocks.
    pub fn checkpoint(vb: VarBuilder<'a>, quant: CheckpointQuant) -> Self {
        Self {
            vb,
            source: Source::Checkpoint(Arc::new(quant)),
        }
    }

    /// A GGUF file's tensors under their Hugging Face names, computing in `dtype` on `device`.
    pub fn gguf(file: Arc<GgufFile>, dtype: DType, device: &Device) -> Self {
        let vb =
            VarBuilder::from_backend(Box::new(GgufBackend(file.clone())), dtype, device.clone());
        Self {
            vb,
            source: Source::Gguf(file),
        }
    }

    pub(crate) fn pp(&self, s: impl ToString) -> Self {
        Self {
            vb: self.vb.pp(s),
            source: self.source.clone(),
        }
    }

    /// A float tensor `{prefix}.{name}` of shape `s`.
    pub fn get<S: Into<Shape>>(&self, s: S, name: &str) -> Result<Tensor> {
        self.vb.get(s, name)
    }

    pub(crate) fn contains_tensor(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    /// `{prefix}.weight` `[out, in]` and, with `bias`, `{prefix}.bias`.
    pub fn linear(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        self.linear_as(in_dim, out_dim, bias, |q| q)
    }

    /// The output projection to the vocabulary: like `linear`, but quantized in situ to at least 8 bits.
    pub fn lm_head(&self, in_dim: usize, out_dim: usize) -> Result<Linear> {
        let head = self.linear_as(in_dim, out_dim, false, quant::lm_head_dtype)?;
        match self.source {
            // a quantized checkpoint's float head (AWQ/GPTQ keep it in f16) at 8 bits, as in situ
            Source::Checkpoint(_) => head.quantize(GgmlDType::Q8_0),
            _ => Ok(head),
        }
    }

    /// GPT-2's `Conv1D`: the weight is stored `[in, out]`.
    pub(crate) fn conv1d(&self, in_dim: usize, out_dim: usize) -> Result<Linear> {
        let weight = self.get((in_dim, out_dim), "weight")?.t()?.contiguous()?;
        let bias = self.get(out_dim, "bias")?;
        self.finish(Linear::new(weight, Some(bias))?, |q| q)
    }

    /// The embedding table `{prefix}.weight` `[vocab, hidden]`. Quantized in situ, or in a quantized
    /// checkpoint (which keeps it in f16), it is kept at 8 bits (as llama.cpp keeps `token_embd`):
    /// often the largest matrix, and a tied LM head shares it.
    pub fn embedding(&self, vocab: usize, hidden: usize) -> Result<Embedding> {
        match &self.source {
            Source::Gguf(file) => {
                let name = self.full_name("weight");
                if let Some(q) = file.qtensor(&name, self.device())? {
                    return Embedding::quantized(Arc::new(q), (vocab, hidden), self.dtype());
                }
            }
            Source::InSitu(_) | Source::Checkpoint(_) => {
                let wanted = match &self.source {
                    Source::InSitu(wanted) => quant::lm_head_dtype(*wanted),
                    _ => GgmlDType::Q8_0,
                };
                let table = self.get((vocab, hidden), "weight")?;
                if let Some(q) = quant::quantize_matrix(&table, wanted)? {
                    return Embedding::quantized(Arc::new(q), (vocab, hidden), self.dtype());
                }
                return Ok(Embedding::Dense(table));
            }
            Source::Float => {}
        }
        Ok(Embedding::Dense(self.get((vocab, hidden), "weight")?))
    }

    /// An LM head that shares the embedding table's weights (`tie_word_embeddings`).
    pub(crate) fn tied_lm_head(&self, embedding: &Embedding) -> Result<Linear> {
        match embedding {
            Embedding::Dense(table) => {
                self.finish(Linear::new(table.clone(), None)?, quant::lm_head_dtype)
            }
            Embedding::Quantized { table, .. } => {
                Linear::quantized(table.clone(), None, self.dtype())
            }
        }
    }

    fn linear_as(
        &self,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        head: fn(GgmlDType) -> GgmlDType,
    ) -> Result<Linear> {
        let bias = if bias {
            Some(self.get(out_dim, "bias")?)
        } else {
            None
        };
        if let Source::Gguf(file) = &self.source {
            let name = self.full_name("weight");
            if let Some(q) = file.qtensor(&name, self.device())? {
                let dims = q.shape().dims2()?;
                if dims != (out_dim, in_dim) {
                    candle_core::bail!(
                        "{name}: GGUF holds {dims:?}, expected ({out_dim}, {in_dim})"
                    )
                }
                return Linear::quantized(Arc::new(q), bias, self.dtype());
            }
        }
        if let Source::Checkpoint(q) = &self.source {
            if let Some(linear) = self.checkpoint_linear(q, in_dim, out_dim, bias.clone())? {
                return Ok(linear);
            }
        }
        let weight = self.get((out_dim, in_dim), "weight")?;
        self.finish(Linear::new(weight, bias)?, head)
    }

    /// A quantized checkpoint's layer in ggml blocks; `None` for a layer the checkpoint keeps in
    /// float (`modules_to_not_convert`, the LM head).
    fn checkpoint_linear(
        &self,
        q: &CheckpointQuant,
        in_dim: usize,
        out_dim: usize,
        bias: Option<Tensor>,
    ) -> Result<Option<Linear>> {
        let raw = |name: &str, dtype: DType| self.vb.get_unchecked_dtype(name, dtype);
        let name = self.full_name("weight");
        let loaded = match q.method {
            Method::Awq | Method::Gptq { .. } => {
                if !self.contains_tensor("qweight") {
                    return Ok(None);
                }
                let g_idx = if self.contains_tensor("g_idx") {
                    Some(raw("g_idx", DType::I32)?)
                } else {
                    None
                };
                let int4 = checkpoint::unpack_int4(
                    q,
                    &raw("qweight", DType::I32)?,
                    &raw("qzeros", DType::I32)?,
                    &raw("scales", DType::F32)?,
                    g_idx.as_ref(),
                    (out_dim, in_dim),
                )
                .map_err(|e| e.context(format!("{name} ({})", q.name())))?;
                int4.repack(self.device())?
            }
            Method::Fp8 => {
                let scale = ["weight_scale_inv", "weight_scale"]
                    .into_iter()
                    .find(|s| self.contains_tensor(s));
                let Some(scale) = scale else {
                    return Ok(None);
                };
                let w = raw("weight", DType::F8E4M3)?;
                if w.dims2()? != (out_dim, in_dim) {
                    candle_core::bail!("{name}: {:?}, expected ({out_dim}, {in_dim})", w.shape())
                }
                let dense = checkpoint::dequantize_fp8(&w, &raw(scale, DType::F32)?, q.block)?;
                drop(w);
                match quant::quantize_matrix(&dense, GgmlDType::Q8_0)? {
                    Some(blocks) => Loaded::Blocks(blocks),
                    None => Loaded::Dense(dense.to_dtype(self.dtype())?),
                }
            }
        };
        let linear = match loaded {
            Loaded::Blocks(blocks) => Linear::quantized(Arc::new(blocks), bias, self.dtype())?,
            Loaded::Gathered(blocks, order) => Linear::gathered(
                order,
                Linear::quantized(Arc::new(blocks), bias, self.dtype())?,
            )?,
            Loaded::Dense(w) => Linear::new(w.to_dtype(self.dtype())?, bias)?,
        };
        Ok(Some(linear))
    }

    /// Quantizes a freshly loaded float layer when loading in situ.
    fn finish(&self, linear: Linear, head: fn(GgmlDType) -> GgmlDType) -> Result<Linear> {
        match self.source {
            Source::InSitu(dtype) => linear.quantize(head(dtype)),
            _ => Ok(linear),
        }
    }

    fn full_name(&self, name: &str) -> String {
        let prefix = self.vb.prefix();
        if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        }
    }
}
