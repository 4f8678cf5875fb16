//! Rotary position embeddings (the non-interleaved "rotate half" form every HF checkpoint here uses),
//! with cos/sin tables computed once at load and looked up per token.

use candle_core::{bail, DType, Device, Result, Tensor};
use serde_json::Value;

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
    /// Each frequency divided by its own factor: the `rope_freqs` tensor llama.cpp's converter writes
    /// into GGUF files for Llama 3.1+ (`rope_type` `gguf_freq_factors` in our config).
    Factors(Vec<f64>),
    /// Phi-3.5 / Phi-4 `longrope`: each frequency divided by its own factor, `short` for a context up
    /// to `original_max` and `long` beyond, cos and sin scaled by `attention_factor`.
    LongRope {
        short: Vec<f64>,
        long: Vec<f64>,
        original_max: usize,
        attention_factor: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
    /// Fraction of each head's dimensions rotated (1.0 for all but a few models).
    pub partial_rotary_factor: f64,
}

impl RopeConfig {
    /// Reads both layouts found in the wild: `rope_theta` + `rope_scaling` at the top of config.json,
    /// or a `rope_parameters` object (transformers 5) holding `rope_theta`, `rope_type` and its factors.
    pub fn from_config(config: &Value, default_theta: f64) -> Result<Self> {
        let params = config.get("rope_parameters").filter(|v| v.is_object());
        let theta = params
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| config.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(default_theta);
        let scaling_obj = params.or_else(|| config.get("rope_scaling").filter(|v| v.is_object()));
        let scaling = match scaling_obj {
            Some(s) => Self::parse_scaling(s, config)?,
            None => RopeScaling::None,
        };
        let partial_rotary_factor = params
            .and_then(|p| p.get("partial_rotary_factor"))
            .or_else(|| config.get("partial_rotary_factor"))
            .and_then(Value::as_f64)
            .unwrap_or(1.0);
        Ok(Self {
            theta,
            scaling,
            partial_rotary_factor,
        })
    }

    fn parse_scaling(s: &Value, config: &Value) -> Result<RopeScaling> {
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |key: &str| -> Result<f64> {
            match s.get(key).and_then(Value::as_f64) {
                Some(v) => Ok(v),
                None => bail!("rope scaling `{kind}` lacks `{key}`"),
            }
        };
        Ok(match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: num("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: s
                    .get("original_max_position_embeddings")
                    .or_else(|| config.get("original_max_position_embeddings"))
                    .and_then(Value::as_f64)
                    .unwrap_or(8192.0),
            },
            "gguf_freq_factors" => RopeScaling::Factors(
                s.get("factors")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_f64).collect())
                    .unwrap_or_default(),
            ),
            "longrope" | "su" => {
                let factors = |key: &str| -> Result<Vec<f64>> {
                    match s.get(key).and_then(Value::as_array) {
                        Some(a) => Ok(a.iter().filter_map(Value::as_f64).collect()),
                        None => bail!("rope scaling `{kind}` lacks `{key}`"),
                    }
                };
                let Some(original_max) = s
                    .get("original_max_position_embeddings")
                    .or_else(|| config.get("original_max_position_embeddings"))
                    .and_then(Value::as_f64)
                else {
                    bail!("rope scaling `{kind}` lacks `original_max_position_embeddings`")
                };
                // transformers' defaults: the context's growth as the factor, the paper's scale
                let factor = s.get("factor").and_then(Value::as_f64).unwrap_or_else(|| {
                    config
                        .get("max_position_embeddings")
                        .and_then(Value::as_f64)
                        .unwrap_or(original_max)
                        / original_max
                });
                let attention_factor = match s.get("attention_factor").and_then(Value::as_f64) {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / original_max.ln()).sqrt(),
                };
                RopeScaling::LongRope {
                    short: factors("short_factor")?,
                    long: factors("long_factor")?,
                    original_max: original_max as usize,
                    attention_factor,
                }
            }
            other => {
                bail!(
                    "unsupported rope scaling `{other}` (supported: default, linear, llama3, longrope)"
                )
            }
        })
    }

    /// Inverse frequencies for a rotary dimension of `dim` when sequences run up to `max_positions`
    /// (`longrope` takes its long factors beyond the original context, for every position alike, as
    /// vLLM does when the served context exceeds it), and the scale of cos and sin.
    pub fn inv_freq_for(&self, dim: usize, max_positions: usize) -> (Vec<f64>, f64) {
        match &self.scaling {
            RopeScaling::LongRope {
                short,
                long,
                original_max,
                attention_factor,
            } => {
                let factors = if max_positions > *original_max {
                    long
                } else {
                    short
                };
                let scaled = Self {
                    scaling: RopeScaling::Factors(factors.clone()),
                    ..self.clone()
                };
                (scaled.inv_freq(dim), *attention_factor)
            }
            _ => (self.inv_freq(dim), 1.0),
        }
    }

    /// Inverse frequencies for a rotary dimension of `dim` (`longrope`: its short factors).
    pub fn inv_freq(&self, dim: usize) -> Vec<f64> {
        let base: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / self.theta.powf((2 * i) as f64 / dim as f64))
            .collect();
        match &self.scaling {
            RopeScaling::None => base,
            RopeScaling::LongRope { short, .. } => base
                .iter()
                .zip(short.iter().chain(std::iter::repeat(&1.0)))
                .map(|(f, d)| f / d)
                .collect(),
            RopeScaling::Factors(factors) => base
                .iter()
                .zip(factors.iter().chain(std::iter::repeat(&1.0)))
                .map(|(f, d)| f / d)
                .collect(),
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
    rotary_dim: usize,
    max_positions: usize,
}

impl Rope {
    pub fn new(
        cfg: &RopeConfig,
        head_dim: usize,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let rotary_dim = ((head_dim as f64 * cfg.partial_rotary_factor).round() as usize) & !1;
        if rotary_dim == 0 || rotary_dim > head_dim {
            bail!("invalid rotary dimension {rotary_dim} for head_dim {head_dim}")
        }
        let (inv_freq, mscale) = cfg.inv_freq_for(rotary_dim, max_positions);
        let inv_freq: Vec<f32> = inv_freq.iter().map(|f| *f as f32).collect();
        let mscale = mscale as f32;
        let half = inv_freq.len();
        // float32 like the reference, so positions far out round the same way
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos() * mscale);
                sin.push(angle.sin() * mscale);
            }
        }
        let cos = Tensor::from_vec(cos, (max_positions, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_positions, half), device)?.to_dtype(dtype)?;
        Ok(Self {
            cos,
            sin,
            rotary_dim,
            max_positions,
        })
    }

    pub(crate) fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The cos and sin rows of `positions` (u32 `[tokens]`), computed once per forward.
    pub fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }

    /// Rotates `x` `[tokens, heads, head_dim]` with the rows from [`Rope::tables`].
    pub(crate) fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (t, h, d) = x.dims3()?;
        if self.rotary_dim == d {
            let x = x.contiguous()?.reshape((1, t, h, d))?;
            return candle_nn::rotary_emb::rope_thd(&x, cos, sin)?.reshape((t, h, d));
        }
        let rot =
            x.narrow(2, 0, self.rotary_dim)?
                .contiguous()?
                .reshape((1, t, h, self.rotary_dim))?;
        let rot =
            candle_nn::rotary_emb::rope_thd(&rot, cos, sin)?.reshape((t, h, self.rotary_dim))?;
        let pass = x.narrow(2, self.rotary_dim, d - self.rotary_dim)?;
        Tensor::cat(&[rot, pass], 2)?.contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_top_level_and_rope_parameters_layouts_alike() -> Result<()> {
        let old = json!({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}});
        let new = json!({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}});
        let a = RopeConfig::from_config(&old, 10000.0)?;
        assert_eq!(a, RopeConfig::from_config(&new, 10000.0)?);
        assert_eq!(a.theta, 500000.0);
        assert!(matches!(a.scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));
        let plain = RopeConfig::from_config(
            &json!({"rope_parameters": {"rope_theta": 7.0, "rope_type": "default"}}),
            1.0,
        )?;
        assert_eq!(plain.theta, 7.0);
        assert_eq!(plain.scaling, RopeScaling::None);
        Ok(())
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() -> Result<()> {
        let cfg = RopeConfig::from_config(
            &json!({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
            1.0,
        )?;
        let plain = RopeConfig {
            scaling: RopeScaling::None,
            ..cfg.clone()
        };
        let (s, p) = (cfg.inv_freq(128), plain.inv_freq(128));
        assert_eq!(s[0], p[0]);
        assert!((s[63] - p[63] / 8.0).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn unknown_scaling_is_an_error_naming_it() {
        let err = RopeConfig::from_config(
            &json!({"rope_scaling": {"type": "yarn", "factor": 4.0}}),
            1.0,
        )
        .unwrap_err();
        assert!(err.to_string().contains("yarn"));
    }

    #[test]
    fn longrope_takes_its_long_factors_beyond_the_original_context() -> Result<()> {
        let cfg = RopeConfig::from_config(
            &json!({"max_position_embeddings": 4096, "original_max_position_embeddings": 256,
                "rope_scaling": {"type": "longrope", "short_factor": [1.0, 2.0], "long_factor": [3.0, 4.0]}}),
            10000.0,
        )?;
        let (short, s_scale) = cfg.inv_freq_for(4, 256);
        let (long, l_scale) = cfg.inv_freq_for(4, 257);
        assert_eq!(short, vec![1.0, 0.01 / 2.0]);
        assert_eq!(long, vec![1.0 / 3.0, 0.01 / 4.0]);
        // sqrt(1 + ln(4096 / 256) / ln(256)) = sqrt(1.5)
        assert!((s_scale - 1.5f64.sqrt()).abs() < 1e-12 && s_scale == l_scale);
        let rope = Rope::new(&cfg, 4, 300, DType::F32, &Device::Cpu)?;
        let (c, _) = rope.tables(&Tensor::new(&[0u32], &Device::Cpu)?)?;
        assert!((c.to_vec2::<f32>()?[0][0] - 1.5f32.sqrt()).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn position_zero_is_identity() -> Result<()> {
        let cfg = RopeConfig::from_config(&json!({}), 10000.0)?;
        let rope = Rope::new(&cfg, 4, 8, DType::F32, &Device::Cpu)?;
        let x = Tensor::arange(1f32, 9., &Device::Cpu)?.reshape((1, 2, 4))?;
        let (c, s) = rope.tables(&Tensor::new(&[0u32], &Device::Cpu)?)?;
        assert_eq!(
            rope.apply(&x, &c, &s)?.to_vec3::<f32>()?,
            x.to_vec3::<f32>()?
        );
        Ok(())
    }
}
