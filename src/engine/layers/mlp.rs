//! Feed-forward blocks: gated (SwiGLU / GeGLU, with gate and up fused into one matmul) and plain
//! two-layer (GPT-2).

use super::weights::Weights;
use candle_core::{bail, Result, Tensor};

use super::linear::Linear;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    Silu,
    /// GeLU, tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// GeLU, exact.
    Gelu,
    Relu,
}

impl Activation {
    pub(crate) fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Self::Silu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" | "gelu_tanh" => Self::GeluTanh,
            "gelu" => Self::Gelu,
            "relu" => Self::Relu,
            other => bail!("unsupported activation function `{other}`"),
        })
    }

    pub(crate) fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::GeluTanh => x.gelu(),
            Self::Gelu => x.gelu_erf(),
            Self::Relu => x.relu(),
        }
    }
}

/// `down(act(gate(x)) * up(x))`, gate and up computed by one fused matmul.
#[derive(Debug, Clone)]
pub(crate) struct GatedMlp {
    gate_up: Linear,
    down: Linear,
    intermediate: usize,
    act: Activation,
}

impl GatedMlp {
    /// Separate `gate_proj` and `up_proj` weights (Llama, Qwen, Mistral, Gemma).
    pub fn load(
        w: &Weights,
        hidden: usize,
        intermediate: usize,
        bias: bool,
        act: Activation,
    ) -> Result<Self> {
        let gate = w.pp("gate_proj").linear(hidden, intermediate, bias)?;
        let up = w.pp("up_proj").linear(hidden, intermediate, bias)?;
        Ok(Self {
            gate_up: Linear::fuse(&[gate, up])?,
            down: w.pp("down_proj").linear(intermediate, hidden, bias)?,
            intermediate,
            act,
        })
    }

    /// One `gate_up_proj` weight, gate rows first (Phi-3).
    pub(crate) fn load_fused(
        w: &Weights,
        hidden: usize,
        intermediate: usize,
        act: Activation,
    ) -> Result<Self> {
        Ok(Self {
            gate_up: w
                .pp("gate_up_proj")
                .linear(hidden, 2 * intermediate, false)?,
            down: w.pp("down_proj").linear(intermediate, hidden, false)?,
            intermediate,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up.forward(x)?;
        let gate = gu.narrow(1, 0, self.intermediate)?;
        let up = gu.narrow(1, self.intermediate, self.intermediate)?;
        let h = (self.act.apply(&gate)? * up)?;
        self.down.forward(&h)
    }
}

/// `proj(act(fc(x)))` (GPT-2).
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    fc: Linear,
    proj: Linear,
    act: Activation,
}

impl Mlp {
    pub fn new(fc: Linear, proj: Linear, act: Activation) -> Self {
        Self { fc, proj, act }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.act.apply(&self.fc.forward(x)?)?;
        self.proj.forward(&h)
    }
}
