//! Feed-forward blocks: gated (SwiGLU / GeGLU, separate or fused gate+up) and plain two-layer MLPs.

use candle_core::{Result, Tensor};

use super::linear::Linear;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    GeluTanh,
    Gelu,
}

impl Activation {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Some(Self::GeluTanh),
            "gelu" => Some(Self::Gelu),
            _ => None,
        }
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => candle_nn::ops::silu(x),
            Self::GeluTanh => x.gelu(),
            Self::Gelu => x.gelu_erf(),
        }
    }
}

pub enum Mlp {
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
        act: Activation,
    },
    /// Gate and up projections in one weight, gate first (Phi-3).
    FusedGated {
        gate_up: Linear,
        down: Linear,
        act: Activation,
    },
    Plain {
        fc: Linear,
        proj: Linear,
        act: Activation,
    },
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gated {
                gate,
                up,
                down,
                act,
            } => {
                let h = (act.apply(&gate.forward(x)?)? * up.forward(x)?)?;
                down.forward(&h)
            }
            Self::FusedGated { gate_up, down, act } => {
                let gu = gate_up.forward(x)?;
                let half = gu.dim(1)? / 2;
                let h = (act.apply(&gu.narrow(1, 0, half)?)? * gu.narrow(1, half, half)?)?;
                down.forward(&h)
            }
            Self::Plain { fc, proj, act } => proj.forward(&act.apply(&fc.forward(x)?)?),
        }
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Self::Gated { gate, up, down, .. } => vec![gate, up, down],
            Self::FusedGated { gate_up, down, .. } => vec![gate_up, down],
            Self::Plain { fc, proj, .. } => vec![fc, proj],
        }
    }
}
