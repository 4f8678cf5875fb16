//! Rotary position embeddings (the "rotate half" layout of Hugging Face checkpoints), with the scaling
//! schemes of the supported checkpoints. Tables are computed once at load, indexed per token.

use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

impl RopeScaling {
    /// Reads `rope_scaling` / `rope_parameters` (both layouts); `None` or `default` = no scaling.
    pub fn from_config(params: Option<&serde_json::Value>) -> std::result::Result<Self, String> {
        let Some(p) = params.filter(|p| p.is_object()) else {
            return Ok(Self::None);
        };
        let kind = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let num = |key: &str, default: f64| p.get(key).and_then(|v| v.as_f64()).unwrap_or(default);
        match kind {
            "default" => Ok(Self::None),
            "linear" => Ok(Self::Linear {
                factor: num("factor", 1.0),
            }),
            "llama3" => Ok(Self::Llama3 {
                factor: num("factor", 8.0),
                low_freq_factor: num("low_freq_factor", 1.0),
                high_freq_factor: num("high_freq_factor", 4.0),
                original_max_position_embeddings: num("original_max_position_embeddings", 8192.0),
            }),
            other => Err(format!(
                "rope scaling type '{other}' is not supported (supported: default, linear, llama3)"
            )),
        }
    }

    fn inv_freq(&self, base: f64, rot_dim: usize) -> Vec<f64> {
        let raw = (0..rot_dim / 2).map(|i| 1.0 / base.powf(2.0 * i as f64 / rot_dim as f64));
        match *self {
            Self::None => raw.collect(),
            Self::Linear { factor } => raw.map(|f| f / factor).collect(),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_ctx,
            } => {
                let low_wavelen = old_ctx / low_freq_factor;
                let high_wavelen = old_ctx / high_freq_factor;
                raw.map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_ctx / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
            }
        }
    }
}

pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    rot_dim: usize,
}

impl Rope {
    pub fn new(
        base: f64,
        rot_dim: usize,
        max_positions: usize,
        scaling: &RopeScaling,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let inv_freq = scaling.inv_freq(base, rot_dim);
        let half = inv_freq.len();
        let mut angles = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            angles.extend(inv_freq.iter().map(|f| (pos as f64 * f) as f32));
        }
        let angles = Tensor::from_vec(angles, (max_positions, half), device)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
            rot_dim,
        })
    }

    /// The tables at each token's position (`positions`: u32 `[n]`), computed once per forward.
    pub fn at(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }

    /// `x`: `[n, heads, head_dim]`; `cos`/`sin` from `at`.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let head_dim = x.dim(2)?;
        if self.rot_dim == head_dim {
            return candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?.contiguous()?, cos, sin)?
                .squeeze(0);
        }
        let rot = x.narrow(2, 0, self.rot_dim)?.unsqueeze(0)?.contiguous()?;
        let rot = candle_nn::rotary_emb::rope_thd(&rot, cos, sin)?.squeeze(0)?;
        let pass = x.narrow(2, self.rot_dim, head_dim - self.rot_dim)?;
        Tensor::cat(&[&rot, &pass], 2)
    }
}
