//! A linear layer over a dense or quantized weight. Where the weight comes from (safetensors, GGUF,
//! quantized at load) is `engine::weights`' business; this runs it.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{bail, DType, Module, Result, Tensor};

use crate::engine::quant;

#[derive(Debug, Clone)]
pub(crate) enum LinearWeight {
    /// `[out, in]`, as checkpoints store it.
    Dense(Tensor),
    /// `[out, in]` in ggml blocks along `in`.
    Quantized(Arc<QTensor>),
    /// Layers of different storage side by side, outputs concatenated: q/k/v or gate/up that a GGUF
    /// stores at different precisions and so cannot be stacked into one matrix.
    Parts(Vec<Linear>),
    /// `inner` over the input's columns taken in `order` (`x[:, order]`): a GPTQ act-order layer
    /// whose weight columns were sorted by group at load (`quant::checkpoint`).
    Gathered { order: Tensor, inner: Box<Linear> },
}

#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    in_dim: usize,
    out_dim: usize,
}

impl Linear {
    /// A dense layer from a `[out, in]` weight.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        Self::check_bias(bias.as_ref(), out_dim)?;
        Ok(Self {
            weight: LinearWeight::Dense(weight.contiguous()?),
            bias,
            in_dim,
            out_dim,
        })
    }

    /// A layer over a quantized `[out, in]` matrix; float-typed GGUF tensors (and block types candle
    /// cannot multiply at this width) become dense.
    pub fn quantized(weight: Arc<QTensor>, bias: Option<Tensor>, dtype: DType) -> Result<Self> {
        let (out_dim, in_dim) = weight.shape().dims2()?;
        // a block layout the kernels cannot multiply at this width (a GGUF's q4_1 with an odd block
        // count) runs dense rather than trip an assertion mid-request
        if weight.dtype().block_size() == 1 || !quant::fits(weight.dtype(), in_dim) {
            let dense = weight.dequantize(&weight.device())?.to_dtype(dtype)?;
            return Self::new(dense, bias);
        }
        Self::check_bias(bias.as_ref(), out_dim)?;
        Ok(Self {
            weight: LinearWeight::Quantized(weight),
            bias,
            in_dim,
            out_dim,
        })
    }

    /// This layer with its dense weight quantized to `wanted` (or the block type rows of this width
    /// fall back to); unchanged when no block type fits or the weight is already quantized.
    pub fn quantize(self, wanted: quant::GgmlDType) -> Result<Self> {
        let LinearWeight::Dense(w) = &self.weight else {
            return Ok(self);
        };
        match quant::quantize_matrix(w, wanted)? {
            Some(q) => Ok(Self {
                weight: LinearWeight::Quantized(Arc::new(q)),
                ..self
            }),
            None => Ok(self),
        }
    }

    /// `inner` applied to `x[:, order]`.
    pub(crate) fn gathered(order: Vec<u32>, inner: Linear) -> Result<Self> {
        let order = Tensor::from_vec(order, inner.in_dim, &inner.device())?;
        Ok(Self::gathered_by(order, inner))
    }

    fn gathered_by(order: Tensor, inner: Linear) -> Self {
        Self {
            in_dim: inner.in_dim,
            out_dim: inner.out_dim,
            bias: None,
            weight: LinearWeight::Gathered {
                order,
                inner: Box::new(inner),
            },
        }
    }

    fn device(&self) -> candle_core::Device {
        match &self.weight {
            LinearWeight::Dense(w) => w.device().clone(),
            LinearWeight::Quantized(q) => q.device(),
            LinearWeight::Parts(p) => p[0].device(),
            LinearWeight::Gathered { order, .. } => order.device().clone(),
        }
    }

    /// One layer computing all of `parts` side by side (outputs concatenated), so that q/k/v or
    /// gate/up cost one matmul instead of several.
    pub(crate) fn fuse(parts: &[Linear]) -> Result<Self> {
        let Some(first) = parts.first() else {
            bail!("nothing to fuse")
        };
        if let Some((order, inners)) = Self::same_gather(parts)? {
            return Ok(Self::gathered_by(order, Self::fuse(&inners)?));
        }
        let dense: Vec<&Tensor> = parts
            .iter()
            .filter_map(|p| match &p.weight {
                LinearWeight::Dense(w) => Some(w),
                _ => None,
            })
            .collect();
        let quantized: Vec<&QTensor> = parts
            .iter()
            .filter_map(|p| match &p.weight {
                LinearWeight::Quantized(q) => Some(q.as_ref()),
                _ => None,
            })
            .collect();
        let bias = Self::fused_bias(parts)?;
        if dense.len() == parts.len() {
            return Self::new(Tensor::cat(&dense, 0)?, bias);
        }
        let one_type = quantized.iter().all(|q| q.dtype() == quantized[0].dtype());
        if quantized.len() == parts.len() && one_type {
            let stacked = quant::stack_rows(&quantized)?;
            let dtype = bias.as_ref().map_or(DType::F32, |b| b.dtype());
            return Self::quantized(Arc::new(stacked), bias, dtype);
        }
        let unbiased = parts
            .iter()
            .map(|p| Self {
                bias: None,
                ..p.clone()
            })
            .collect();
        Self::check_bias(bias.as_ref(), parts.iter().map(|p| p.out_dim).sum())?;
        Ok(Self {
            weight: LinearWeight::Parts(unbiased),
            bias,
            in_dim: first.in_dim,
            out_dim: parts.iter().map(|p| p.out_dim).sum(),
        })
    }

    /// When every part gathers its input in the same order (GPTQ act-order q/k/v share one): that
    /// order and the parts without it, so that they fuse.
    fn same_gather(parts: &[Linear]) -> Result<Option<(Tensor, Vec<Linear>)>> {
        let mut first: Option<(&Tensor, Vec<u32>)> = None;
        let mut inners = Vec::new();
        for p in parts {
            let LinearWeight::Gathered { order, inner } = &p.weight else {
                return Ok(None);
            };
            let ids = order.to_vec1::<u32>()?;
            match &first {
                Some((_, want)) if *want != ids => return Ok(None),
                Some(_) => {}
                None => first = Some((order, ids)),
            }
            if p.bias.is_some() {
                return Ok(None);
            }
            inners.push((**inner).clone());
        }
        Ok(first.map(|(order, _)| (order.clone(), inners)))
    }

    /// The parts' biases end to end (zeros for a part without one), or `None` if none has one.
    fn fused_bias(parts: &[Linear]) -> Result<Option<Tensor>> {
        let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
        let Some(like) = biases.first() else {
            return Ok(None);
        };
        let (dtype, device) = (like.dtype(), like.device().clone());
        let all = parts
            .iter()
            .map(|p| match &p.bias {
                Some(b) => Ok(b.clone()),
                None => Tensor::zeros(p.out_dim, dtype, &device),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&all, 0)?))
    }

    /// `x`: `[rows, in]` → `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Dense(w) if super::sgemm::applies(x, w) => super::sgemm::matmul(x, w)?,
            LinearWeight::Dense(w) if super::gemv::applies(x, w) => {
                super::gemv::small_matmul(x, w)?
            }
            LinearWeight::Dense(w) => x.matmul(&w.t()?)?,
            LinearWeight::Quantized(q) => quantized_matmul(x, q)?,
            LinearWeight::Parts(parts) => {
                let outs = parts
                    .iter()
                    .map(|p| p.forward(x))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&outs, 1)?
            }
            LinearWeight::Gathered { order, inner } => inner.forward(&x.index_select(order, 1)?)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    fn check_bias(bias: Option<&Tensor>, out_dim: usize) -> Result<()> {
        if let Some(b) = bias {
            if b.dims1()? != out_dim {
                bail!("bias of {:?} for {out_dim} outputs", b.shape())
            }
        }
        Ok(())
    }
}

/// `x @ q.T` for a ggml-quantized `q`: our q8_0 kernel for a few rows on CPU, else candle's kernels
/// (which quantize `x` per row and take integer dot products; they need a contiguous `x`).
fn quantized_matmul(x: &Tensor, q: &Arc<QTensor>) -> Result<Tensor> {
    if super::qgemv::applies(x, q) {
        return super::qgemv::matmul(x, q);
    }
    if super::kgemv::applies(x, q) {
        return super::kgemv::matmul(x, q);
    }
    let dtype = x.dtype();
    if !x.device().is_cpu() && dtype == DType::F16 {
        // candle's GPU GGUF kernels take f32 or bf16 activations
        let y = QMatMul::QTensor(q.clone()).forward(&x.to_dtype(DType::F32)?.contiguous()?)?;
        return y.to_dtype(dtype);
    }
    QMatMul::QTensor(q.clone()).forward(&x.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// The bytes a layer's weights take in memory.
    fn weight_bytes(l: &Linear) -> usize {
        match &l.weight {
            LinearWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            LinearWeight::Quantized(q) => q.storage_size_in_bytes(),
            LinearWeight::Parts(parts) => parts.iter().map(weight_bytes).sum(),
            LinearWeight::Gathered { inner, .. } => weight_bytes(inner),
        }
    }

    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let num = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
        let den = b.sqr().unwrap().sum_all().unwrap();
        (num.to_scalar::<f32>().unwrap() / den.to_scalar::<f32>().unwrap()).sqrt()
    }

    #[test]
    fn a_quantized_layer_computes_x_times_its_dequantized_weight() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (96, 256), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (5, 256), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 96, &dev)?;
        let float = Linear::new(w.clone(), Some(b.clone()))?;
        for (dtype, tol) in [
            (quant::GgmlDType::Q8_0, 0.01),
            (quant::GgmlDType::Q4_0, 0.12),
            (quant::GgmlDType::Q4K, 0.12),
            (quant::GgmlDType::Q6K, 0.03),
        ] {
            let q = float.clone().quantize(dtype)?;
            let LinearWeight::Quantized(qt) = &q.weight else {
                panic!("{dtype:?} not quantized")
            };
            assert_eq!(qt.dtype(), dtype);
            let y = q.forward(&x)?;
            // against the dequantized weight: only the activations' own 8-bit rounding differs
            let dq = Linear::new(qt.dequantize(&dev)?, Some(b.clone()))?.forward(&x)?;
            assert!(
                rel_err(&y, &dq) < 0.01,
                "{dtype:?} vs its dequantized weight"
            );
            // against float32: the weight rounding
            let e = rel_err(&y, &float.forward(&x)?);
            assert!(e < tol, "{dtype:?}: relative error {e}");
            assert!(weight_bytes(&q) < weight_bytes(&float) / 3);
        }
        Ok(())
    }

    #[test]
    fn block_pairs_candle_cannot_multiply_run_dense() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (8, 96), &dev)?;
        let q = Arc::new(QTensor::quantize(&w, quant::GgmlDType::Q5_1)?);
        let l = Linear::quantized(q.clone(), None, DType::F32)?;
        assert!(matches!(l.weight, LinearWeight::Dense(_)));
        let x = Tensor::randn(0f32, 1.0, (2, 96), &dev)?;
        let want = x.matmul(&q.dequantize(&dev)?.t()?)?;
        assert!(rel_err(&l.forward(&x)?, &want) < 1e-6);
        Ok(())
    }

    #[test]
    fn fusing_quantized_layers_stacks_or_keeps_parts() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 64), &dev)?;
        let part = |rows: usize, dtype| -> Result<Linear> {
            let w = Tensor::randn(0f32, 1.0, (rows, 64), &dev)?;
            Linear::new(w, Some(Tensor::ones(rows, DType::F32, &dev)?))?.quantize(dtype)
        };
        let (a, b) = (
            part(32, quant::GgmlDType::Q8_0)?,
            part(16, quant::GgmlDType::Q8_0)?,
        );
        let c = part(16, quant::GgmlDType::Q4_0)?;
        let want = |ps: &[&Linear]| -> Result<Tensor> {
            let outs = ps
                .iter()
                .map(|p| p.forward(&x))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&outs, D::Minus1)
        };
        let same = Linear::fuse(&[a.clone(), b.clone()])?;
        assert!(matches!(same.weight, LinearWeight::Quantized(_)));
        assert!(rel_err(&same.forward(&x)?, &want(&[&a, &b])?) < 1e-6);
        let mixed = Linear::fuse(&[a.clone(), c.clone()])?;
        assert!(matches!(mixed.weight, LinearWeight::Parts(_)));
        assert_eq!(mixed.out_dim, 48);
        assert!(rel_err(&mixed.forward(&x)?, &want(&[&a, &c])?) < 1e-6);
        Ok(())
    }
}
