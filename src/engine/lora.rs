//! LoRA adapters in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`): the config
//! checked against what this engine runs (plain LoRA on the decoder's projections; `modules_to_save`,
//! DoRA and trained biases refused), and the low-rank pairs of each projection with their scaling
//! folded in (`B · alpha/r`, or `alpha/√r` with rsLoRA). Pure: files in, tensors out; where the
//! pairs are added to a projection is `layers::lora`'s business.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

/// A LoRA adapter as the engine names it: its served name and where its files are.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub name: String,
    /// A local folder (a hub repository is downloaded into one before the engine sees it).
    pub path: PathBuf,
}

/// An adapter's identity once loaded: `id` is what the batch carries (0 is the base model; ids are
/// never reused, so prefix-cache entries of an unloaded adapter never match a new one).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    pub id: u32,
    pub name: String,
    pub path: PathBuf,
    pub rank: usize,
}

/// One targeted projection of one layer: `module` as PEFT names it (`q_proj`, `qkv_proj`,
/// `gate_proj`, ...), `a` `[r, in]` and `b` `[out, r]` already multiplied by the scaling.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub layer: usize,
    pub module: String,
    pub a: Tensor,
    pub b: Tensor,
}

/// A loaded adapter's weights.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    pub rank: usize,
    pub pairs: Vec<LoraPair>,
}

/// The adapter_config.json fields that change what the adapter computes.
#[derive(Debug, Clone, serde::Deserialize)]
struct AdapterConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    alpha_pattern: HashMap<String, f64>,
}

impl AdapterConfig {
    /// The scaling of `module` (a dotted path such as `model.layers.0.self_attn.q_proj`) at rank `r`.
    fn scaling(&self, module: &str, r: usize) -> f64 {
        let alpha = pattern(&self.alpha_pattern, module).unwrap_or(self.lora_alpha);
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

/// PEFT's pattern match: a key matches a module whose dotted path ends with it.
fn pattern<T: Copy>(patterns: &HashMap<String, T>, module: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
        .map(|(_, v)| *v)
}

fn err(path: &Path, msg: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("LoRA adapter {}: {msg}", path.display())
}

/// Loads the adapter in `dir` in `dtype` on `device`, refusing what this engine does not compute
/// and a rank above `max_rank` (`MAX_LORA_RANK`).
pub fn load_adapter(
    dir: &Path,
    max_rank: usize,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<LoraWeights> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .map_err(|e| err(dir, format!("cannot read adapter_config.json: {e}")))?;
    let cfg: AdapterConfig =
        serde_json::from_str(&text).map_err(|e| err(dir, format!("adapter_config.json: {e}")))?;
    check_config(dir, &cfg)?;
    let weights = ["adapter_model.safetensors", "adapter_model.bin"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| err(dir, "no adapter_model.safetensors"))?;
    if weights.extension().is_some_and(|e| e == "bin") {
        return Err(err(
            dir,
            "adapter_model.bin (a pickle) is not read; save the adapter with safetensors",
        ));
    }
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)
        .map_err(|e| err(dir, format!("adapter_model.safetensors: {e}")))?;
    let mut halves: HashMap<(usize, String), (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    for (name, t) in tensors {
        let Some((layer, module, which)) = parse_name(&name) else {
            return Err(err(
                dir,
                format!(
                    "tensor `{name}` is not a LoRA pair of a decoder layer's projection \
                     (embedding, lm_head and other targets are not supported)"
                ),
            ));
        };
        let slot = halves.entry((layer, module)).or_default();
        match which {
            'A' => slot.0 = Some(t),
            _ => slot.1 = Some(t),
        }
    }
    let mut pairs = Vec::new();
    let mut rank = 0;
    for ((layer, module), (a, b)) in halves {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(err(
                dir,
                format!("layers.{layer}.{module} has lora_A or lora_B only"),
            ));
        };
        let (r, _) = a.dims2()?;
        let (_, rb) = b.dims2()?;
        if r != rb {
            return Err(err(
                dir,
                format!("layers.{layer}.{module}: lora_A has rank {r}, lora_B {rb}"),
            ));
        }
        if r > max_rank {
            return Err(err(
                dir,
                format!(
                    "rank {r} (layers.{layer}.{module}) is above MAX_LORA_RANK={max_rank}; \
                     raise MAX_LORA_RANK"
                ),
            ));
        }
        rank = rank.max(r);
        let full = format!("model.layers.{layer}.{module}");
        let scale = cfg.scaling(&full, r);
        let a = a.to_dtype(DType::F32)?;
        let b = (b.to_dtype(DType::F32)? * scale)?;
        pairs.push(LoraPair {
            layer,
            module: module.rsplit('.').next().unwrap_or(&module).to_string(),
            a: a.to_dtype(dtype)?.to_device(device)?.contiguous()?,
            b: b.to_dtype(dtype)?.to_device(device)?.contiguous()?,
        });
    }
    if pairs.is_empty() {
        return Err(err(dir, "adapter_model.safetensors holds no LoRA weights"));
    }
    pairs.sort_by(|x, y| (x.layer, &x.module).cmp(&(y.layer, &y.module)));
    Ok(LoraWeights { rank, pairs })
}

fn check_config(dir: &Path, cfg: &AdapterConfig) -> anyhow::Result<()> {
    if let Some(t) = &cfg.peft_type {
        if !t.eq_ignore_ascii_case("lora") {
            return Err(err(dir, format!("peft_type {t} is not LoRA")));
        }
    }
    if cfg.use_dora {
        return Err(err(dir, "DoRA (use_dora) is not supported"));
    }
    if let Some(m) = cfg.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
        return Err(err(
            dir,
            format!(
                "modules_to_save ({}) replaces whole layers of the base model, which a LoRA \
                 adapter served beside others cannot do; merge it into a model instead",
                m.join(", ")
            ),
        ));
    }
    if let Some(b) = cfg.bias.as_deref().filter(|b| *b != "none") {
        return Err(err(
            dir,
            format!("bias `{b}` (trained biases) is not supported"),
        ));
    }
    if cfg.fan_in_fan_out {
        return Err(err(
            dir,
            "fan_in_fan_out (Conv1D bases such as GPT-2) is not supported",
        ));
    }
    if cfg.r == 0 {
        return Err(err(dir, "r is 0"));
    }
    Ok(())
}

/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` → (3, `self_attn.q_proj`, 'A').
fn parse_name(name: &str) -> Option<(usize, String, char)> {
    let rest = name.strip_suffix(".weight")?;
    let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A") {
        (m, 'A')
    } else {
        (rest.strip_suffix(".lora_B")?, 'B')
    };
    let at = module.find("layers.")?;
    let tail = &module[at + "layers.".len()..];
    let (layer, proj) = tail.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    Some((layer, proj.to_string(), which))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/lora")
            .join(name)
    }

    #[test]
    fn names_of_peft_tensors_parse() {
        assert_eq!(
            parse_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, "self_attn.q_proj".into(), 'A'))
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.0.mlp.gate_up_proj.lora_B.weight"),
            Some((0, "mlp.gate_up_proj".into(), 'B'))
        );
        assert_eq!(parse_name("base_model.model.lm_head.lora_A.weight"), None);
    }

    #[test]
    fn scaling_is_alpha_over_r_or_over_its_root_with_rslora() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let plain = load_adapter(&fixture("llama-r8-attn"), 64, DType::F32, &dev)?;
        assert_eq!(plain.rank, 8);
        assert_eq!(plain.pairs.len(), 8);
        let raw = candle_core::safetensors::load(
            fixture("llama-r8-attn").join("adapter_model.safetensors"),
            &dev,
        )?;
        let b = &raw["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"];
        let ours = plain
            .pairs
            .iter()
            .find(|p| p.layer == 0 && p.module == "q_proj")
            .unwrap();
        let want = (b * 2.0)?; // alpha 16 / r 8
        let diff = (&ours.b - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6);
        let rs = load_adapter(&fixture("llama-r4-all"), 64, DType::F32, &dev)?;
        assert_eq!(rs.pairs.len(), 14);
        assert!((rs.pairs[0].b.abs()?.sum_all()?.to_scalar::<f32>()?) > 0.0);
        Ok(())
    }

    #[test]
    fn a_rank_above_the_maximum_and_modules_to_save_are_refused() {
        let dev = Device::Cpu;
        let e = load_adapter(&fixture("llama-r16-mlp"), 8, DType::F32, &dev)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rank 16") && e.contains("MAX_LORA_RANK=8"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = "adapter_model.safetensors";
        std::fs::copy(fixture("llama-r8-attn").join(f), dir.path().join(f)).unwrap();
        std::fs::write(
            dir.path().join("adapter_config.json"),
            r#"{"r": 8, "lora_alpha": 16, "modules_to_save": ["lm_head"]}"#,
        )
        .unwrap();
        let e = load_adapter(dir.path(), 64, DType::F32, &dev)
            .unwrap_err()
            .to_string();
        assert!(e.contains("modules_to_save (lm_head)"), "{e}");
    }
}
