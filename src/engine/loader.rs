//! A model folder → a runnable model and the facts around it: dtype and device choice, EOS/BOS ids
//! (`generation_config.json` and `config.json`), the chat template (`tokenizer_config.json` or
//! `chat_template.jinja`), the context length.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use serde_json::Value;

use super::layers::DecoderModel;
use super::models::config::HfConfig;
use super::models::weights::{safetensors_files, Weights};
use super::models::{architecture_of, load_decoder};
use super::settings::{DTypeChoice, DeviceChoice, EngineSettings};

/// What the engine needs to know about a checkpoint besides its weights.
#[derive(Debug, Clone)]
pub struct ModelMeta {
    pub model_dir: PathBuf,
    pub architecture: String,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub max_position_embeddings: usize,
    pub chat_template: Option<String>,
}

pub struct LoadedModel {
    pub model: DecoderModel,
    pub meta: ModelMeta,
}

pub fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

fn read_json_opt(path: &Path) -> anyhow::Result<Option<Value>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

pub fn read_config(dir: &Path) -> anyhow::Result<HfConfig> {
    let path = dir.join("config.json");
    if !path.exists() {
        bail!(
            "{} has no config.json: is MODEL_NAME a Hugging Face model folder?",
            dir.display()
        );
    }
    Ok(HfConfig::new(read_json(&path)?))
}

pub fn select_device(choice: DeviceChoice) -> anyhow::Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => cuda_device(),
        DeviceChoice::Auto => Ok(cuda_device().unwrap_or(Device::Cpu)),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device() -> anyhow::Result<Device> {
    Device::new_cuda(0).context("DEVICE=cuda but no CUDA device could be opened")
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> anyhow::Result<Device> {
    bail!(
        "DEVICE=cuda needs a build with the `cuda` feature (cargo build --release --features cuda)"
    )
}

/// `auto` = float32 on CPU (candle has no fast bf16 CPU matmul), the checkpoint's own dtype on GPU.
pub fn select_dtype(choice: DTypeChoice, device: &Device, cfg: &HfConfig) -> DType {
    match choice {
        DTypeChoice::F32 => DType::F32,
        DTypeChoice::BF16 => DType::BF16,
        DTypeChoice::F16 => DType::F16,
        DTypeChoice::Auto if device.is_cpu() => DType::F32,
        DTypeChoice::Auto => match cfg.str(&["torch_dtype", "dtype"]) {
            Some("float16") => DType::F16,
            Some("float32") => DType::F32,
            _ => DType::BF16,
        },
    }
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// The chat template: `chat_template.jinja` (new layout) or `tokenizer_config.json`'s `chat_template`,
/// a string or a list of named templates of which "default" is taken.
pub fn chat_template(dir: &Path) -> anyhow::Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return Ok(Some(std::fs::read_to_string(jinja)?));
    }
    let Some(tc) = read_json_opt(&dir.join("tokenizer_config.json"))? else {
        return Ok(None);
    };
    Ok(match tc.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    })
}

pub fn read_meta(dir: &Path, cfg: &HfConfig) -> anyhow::Result<ModelMeta> {
    let gen = read_json_opt(&dir.join("generation_config.json"))?;
    let mut eos = token_ids(gen.as_ref().and_then(|g| g.get("eos_token_id")));
    for id in token_ids(cfg.raw().get("eos_token_id")) {
        if !eos.contains(&id) {
            eos.push(id);
        }
    }
    let bos = token_ids(gen.as_ref().and_then(|g| g.get("bos_token_id")))
        .first()
        .copied()
        .or_else(|| token_ids(cfg.raw().get("bos_token_id")).first().copied());
    Ok(ModelMeta {
        model_dir: dir.to_path_buf(),
        architecture: architecture_of(cfg).unwrap_or_default(),
        eos_token_ids: eos,
        bos_token_id: bos,
        max_position_embeddings: cfg.max_position_embeddings()?,
        chat_template: chat_template(dir)?,
    })
}

/// Loads a causal LM from the settings' model folder.
pub fn load_causal(settings: &EngineSettings) -> anyhow::Result<LoadedModel> {
    let dir = &settings.model_path;
    let cfg = read_config(dir)?;
    let device = select_device(settings.device)?;
    let dtype = select_dtype(settings.dtype, &device, &cfg);
    let weights = Weights::open(&safetensors_files(dir)?, dtype, &device)?;
    let model = load_decoder(&cfg, &weights)?;
    Ok(LoadedModel {
        model,
        meta: read_meta(dir, &cfg)?,
    })
}
