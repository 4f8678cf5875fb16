//! A linear layer over a dense or quantized weight. Construction happens here only, so quantization
//! (GGUF, in-situ) plugs in by producing `LinearWeight::Quantized`.

use candle_core::quantized::QMatMul;
use candle_core::{bail, Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// `[out, in]`, as checkpoints store it.
    Dense(Tensor),
    Quantized(QMatMul),
}

#[derive(Debug, Clone)]
pub struct Linear {
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

    pub fn quantized(
        weight: QMatMul,
        in_dim: usize,
        out_dim: usize,
        bias: Option<Tensor>,
    ) -> Result<Self> {
        Self::check_bias(bias.as_ref(), out_dim)?;
        Ok(Self {
            weight: LinearWeight::Quantized(weight),
            bias,
            in_dim,
            out_dim,
        })
    }

    /// `{prefix}.weight` `[out, in]` and, if `bias`, `{prefix}.bias`.
    pub fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Self::new(weight, bias)
    }

    /// GPT-2's `Conv1D`: the weight is stored `[in, out]`.
    pub fn load_conv1d(vb: &VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let weight = vb.get((in_dim, out_dim), "weight")?.t()?.contiguous()?;
        let bias = vb.get(out_dim, "bias")?;
        Self::new(weight, Some(bias))
    }

    /// One layer computing all of `parts` side by side (outputs concatenated), so that q/k/v or
    /// gate/up cost one matmul instead of several.
    pub fn fuse(parts: &[Linear]) -> Result<Self> {
        let mut weights = Vec::with_capacity(parts.len());
        let mut biases = Vec::with_capacity(parts.len());
        for p in parts {
            match &p.weight {
                LinearWeight::Dense(w) => weights.push(w.clone()),
                LinearWeight::Quantized(_) => bail!("cannot fuse quantized linear layers"),
            }
            if let Some(b) = &p.bias {
                biases.push(b.clone());
            }
        }
        let bias = match biases.len() {
            0 => None,
            n if n == parts.len() => Some(Tensor::cat(&biases, 0)?),
            _ => {
                let zeros = parts
                    .iter()
                    .map(|p| match &p.bias {
                        Some(b) => Ok(b.clone()),
                        None => Tensor::zeros(p.out_dim, weights[0].dtype(), weights[0].device()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(Tensor::cat(&zeros, 0)?)
            }
        };
        Self::new(Tensor::cat(&weights, 0)?, bias)
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    /// `x`: `[rows, in]` → `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Dense(w) => x.matmul(&w.t()?)?,
            LinearWeight::Quantized(q) => q.forward(x)?,
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
