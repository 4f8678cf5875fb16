//! Normalisations: RMSNorm (Gemma's `1 + w` variant folded in at load) and LayerNorm.

use candle_core::{Result, Tensor};

pub enum Norm {
    Rms {
        weight: Tensor,
        eps: f32,
    },
    Layer {
        weight: Tensor,
        bias: Tensor,
        eps: f32,
    },
}

impl Norm {
    pub fn rms(weight: Tensor, eps: f64) -> Self {
        Self::Rms {
            weight,
            eps: eps as f32,
        }
    }

    /// Gemma stores `w` and scales by `1 + w`.
    pub fn rms_plus_one(weight: Tensor, eps: f64) -> Result<Self> {
        Ok(Self::rms((weight + 1.0)?, eps))
    }

    pub fn layer(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self::Layer {
            weight,
            bias,
            eps: eps as f32,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Rms { weight, eps } => candle_nn::ops::rms_norm(&x.contiguous()?, weight, *eps),
            Self::Layer { weight, bias, eps } => {
                candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, *eps)
            }
        }
    }
}
