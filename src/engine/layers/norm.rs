//! Normalisations: RMSNorm (Gemma's `(1 + w)` variant folds the 1 into the weight at load) and
//! LayerNorm.

use super::weights::Weights;
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub(crate) enum Norm {
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
    pub(crate) fn rms(vb: &Weights, size: usize, eps: f64) -> Result<Self> {
        Ok(Self::Rms {
            weight: vb.get(size, "weight")?,
            eps: eps as f32,
        })
    }

    /// Gemma's RMSNorm, which scales by `1 + weight`.
    pub(crate) fn rms_plus_one(vb: &Weights, size: usize, eps: f64) -> Result<Self> {
        Ok(Self::Rms {
            weight: (vb.get(size, "weight")? + 1.0)?,
            eps: eps as f32,
        })
    }

    pub fn layer(vb: &Weights, size: usize, eps: f64) -> Result<Self> {
        Ok(Self::Layer {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps: eps as f32,
        })
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        match self {
            Self::Rms { weight, eps } => candle_nn::ops::rms_norm(&x, weight, *eps),
            Self::Layer { weight, bias, eps } => candle_nn::ops::layer_norm(&x, weight, bias, *eps),
        }
    }
}
