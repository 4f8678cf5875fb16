//! Feed-forward blocks: gated (SwiGLU / GeGLU, with gate and up fused into one matmul) and plain
//! two-layer (GPT-2).

use super::weights::Weights;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

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

    /// From its three layers (an expert of a mixture, whatever its weights are called).
    pub(crate) fn from_parts(
        gate: Linear,
        up: Linear,
        down: Linear,
        intermediate: usize,
        act: Activation,
    ) -> Result<Self> {
        Ok(Self {
            gate_up: Linear::fuse(&[gate, up])?,
            down,
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
        self.forward_with(x, |_, _, y| Ok(y))
    }

    /// `forward` with `adjust(projection, input, output)` applied to each projection's output
    /// (0: gate/up, 1: down), where LoRA adds its products.
    pub(crate) fn forward_with(
        &self,
        x: &Tensor,
        adjust: impl Fn(usize, &Tensor, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let gu = adjust(0, x, self.gate_up.forward(x)?)?;
        if self.act == Activation::Silu && gu.device().is_cpu() && gu.dtype() == DType::F32 {
            let h = gu.apply_op1_no_bwd(&SiluMul {
                intermediate: self.intermediate,
            })?;
            return adjust(1, &h, self.down.forward(&h)?);
        }
        let gate = gu.narrow(1, 0, self.intermediate)?;
        let up = gu.narrow(1, self.intermediate, self.intermediate)?;
        let h = (self.act.apply(&gate)? * up)?;
        adjust(1, &h, self.down.forward(&h)?)
    }
}

/// `silu(gate) * up` of `[rows, 2·intermediate]` (gate columns first) into `[rows, intermediate]` on
/// CPU in float32: one pass with the vector exponential instead of a strided copy, candle's scalar
/// `silu` and a product.
struct SiluMul {
    intermediate: usize,
}

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let i = self.intermediate;
        let (rows, cols) = layout.shape().dims2()?;
        let Some((a, b)) = layout.contiguous_offsets() else {
            bail!("silu-mul: input is not contiguous")
        };
        if cols != 2 * i {
            bail!("silu-mul: {cols} columns for an intermediate size of {i}")
        }
        let gu = &storage.as_slice::<f32>()?[a..b];
        let mut out = vec![0f32; rows * i];
        // a few rows per task: one row of a decode step is not worth a thread (the engine's pool
        // runs a single task on the caller; rayon would hand it to one of its threads and back)
        let per_task = (16_384 / i.max(1)).max(1);
        let dst = out.as_mut_ptr() as usize;
        super::pool::pool().run(rows.div_ceil(per_task), |tasks| {
            for r in tasks.start * per_task..(tasks.end * per_task).min(rows) {
                // SAFETY: row `r < rows` of `out`, which outlives `run`; each row belongs to one task.
                let o = unsafe { std::slice::from_raw_parts_mut((dst as *mut f32).add(r * i), i) };
                let g = &gu[r * 2 * i..(r + 1) * 2 * i];
                super::simd::silu_mul(&g[..i], &g[i..], o);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((rows, i))))
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_fused_silu_product_is_silu_of_gate_times_up() -> Result<()> {
        for (rows, i) in [(1, 24), (37, 40), (300, 64)] {
            let gu = Tensor::randn(0f32, 4.0, (rows, 2 * i), &Device::Cpu)?;
            let got = gu.apply_op1_no_bwd(&SiluMul { intermediate: i })?;
            let want = (gu.narrow(1, 0, i)?.silu()? * gu.narrow(1, i, i)?)?;
            // relative to the magnitude (the vector exponential is within 2 ulp, not exact)
            let err = ((got - &want)?.abs()? / (want.abs()? + 1.0)?)?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(err < 1e-5, "{rows}x{i}: {err}");
        }
        Ok(())
    }
}
