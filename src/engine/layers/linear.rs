//! A linear layer whose weight is dense or quantized: quantization plugs in here and nowhere else.

use candle_core::quantized::QMatMul;
use candle_core::{Module, Result, Tensor};

pub enum Weight {
    /// `[out, in]`, as checkpoints store it.
    Dense(Tensor),
    /// A GGML-quantized weight (GGUF or in-situ quantization).
    Quantized(QMatMul),
}

pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    out_features: usize,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let out_features = weight.dim(0)?;
        Ok(Self {
            weight: Weight::Dense(weight),
            bias,
            out_features,
        })
    }

    pub fn quantized(weight: QMatMul, out_features: usize, bias: Option<Tensor>) -> Self {
        Self {
            weight: Weight::Quantized(weight),
            bias,
            out_features,
        }
    }

    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    /// Replaces the weight (in-situ quantization at load).
    pub fn map_weight(&mut self, f: impl FnOnce(&Tensor) -> Result<Option<QMatMul>>) -> Result<()> {
        if let Weight::Dense(w) = &self.weight {
            if let Some(q) = f(w)? {
                self.weight = Weight::Quantized(q);
            }
        }
        Ok(())
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// `x`: `[n, in]` → `[n, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Dense(w) => x.matmul(&w.t()?)?,
            Weight::Quantized(q) => q.forward(x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
