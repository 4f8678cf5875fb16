//! Loads a causal LM from a local Hugging Face folder: config.json, generation_config.json, the chat
//! template and (single or sharded) safetensors, memory-mapped. Tokenizer files are the tokenizer
//! module's; this reports the ids and paths the engine needs around the model.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde_json::Value;

use super::gguf;
use super::layers::weights::{FilesBackend, SafetensorsFiles};
use super::layers::Weights;
use super::models::{causal_architecture, load_causal_model, text_config, CausalLM};
use super::quant::checkpoint::{self, CheckpointQuant};
use super::quant::{self, GgmlDType};
use super::settings::{DTypeChoice, DeviceChoice, EngineSettings, Quantization};

/// What the engine needs to know about a loaded model besides the model itself.
#[derive(Debug, Clone)]
pub struct ModelMeta {
    /// The config.json architecture, e.g. `LlamaForCausalLM`.
    pub architecture: String,
    pub model_type: Option<String>,
    /// Every id that ends generation: generation_config.json's and config.json's, deduplicated.
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// The model's own limit (`max_position_embeddings`, `n_positions` for GPT-2).
    pub max_position_embeddings: usize,
    /// The context the engine may use: `MAX_MODEL_LENGTH` when set, else the model's limit.
    pub max_model_len: usize,
    pub model_dir: PathBuf,
    pub dtype: DType,
    pub device: Device,
}

pub struct LoadedModel {
    pub model: Box<dyn CausalLM>,
    pub meta: ModelMeta,
    /// The GGUF file the model came from (its metadata also holds the tokenizer).
    pub gguf: Option<Arc<gguf::GgufFile>>,
}

/// Reads a folder's config.json.
pub(crate) fn read_config(model_dir: &Path) -> Result<Value> {
    let path = model_dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// The device `DEVICE` asks for. `cuda` in a build without the `cuda` feature is an error.
pub(crate) fn resolve_device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => cuda_device(),
        DeviceChoice::Auto => Ok(cuda_device().unwrap_or(Device::Cpu)),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<Device> {
    Device::new_cuda(0).context("DEVICE=cuda but no CUDA device could be opened")
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<Device> {
    bail!("DEVICE=cuda but this build has no CUDA support (build with `--features cuda`)")
}

/// The compute dtype: `auto` is float32 on CPU (bf16 matmuls are emulated there) and the checkpoint's
/// own dtype on GPU.
pub(crate) fn resolve_dtype(choice: DTypeChoice, device: &Device, config: &Value) -> Result<DType> {
    Ok(match choice {
        DTypeChoice::F32 => DType::F32,
        DTypeChoice::BF16 => DType::BF16,
        DTypeChoice::F16 => DType::F16,
        DTypeChoice::Auto if device.is_cpu() => DType::F32,
        DTypeChoice::Auto => {
            let name = config
                .get("torch_dtype")
                .or_else(|| config.get("dtype"))
                .and_then(Value::as_str)
                .unwrap_or("float32");
            match name {
                "bfloat16" => DType::BF16,
                "float16" | "half" => DType::F16,
                _ => DType::F32,
            }
        }
    })
}

/// The safetensors files of a folder: the shards `model.safetensors.index.json` lists, else
/// `model.safetensors`, else every `*.safetensors` there.
pub(crate) fn safetensors_files(model_dir: &Path) -> Result<Vec<PathBuf>> {
    let index = model_dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let Some(map) = v.get("weight_map").and_then(Value::as_object) else {
            bail!("{} has no weight_map", index.display())
        };
        let shards: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        let files: Vec<PathBuf> = shards.iter().map(|s| model_dir.join(s)).collect();
        if let Some(missing) = files.iter().find(|f| !f.exists()) {
            bail!("shard {} listed in the index is missing", missing.display())
        }
        return Ok(files);
    }
    let single = model_dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(model_dir)
        .with_context(|| format!("cannot list {}", model_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no .safetensors weights in {}", model_dir.display())
    }
    Ok(files)
}

/// Token ids that may be a single integer or a list.
fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| {
        format!("{} is not valid JSON", path.display())
    })?))
}

/// EOS ids from generation_config.json then config.json (union, first-seen order), and the BOS id.
pub(crate) fn special_ids(model_dir: &Path, config: &Value) -> Result<(Vec<u32>, Option<u32>)> {
    let r#gen = read_json_opt(&model_dir.join("generation_config.json"))?;
    let mut eos = Vec::new();
    for id in ids(r#gen.as_ref().and_then(|g| g.get("eos_token_id")))
        .into_iter()
        .chain(ids(config.get("eos_token_id")))
    {
        if !eos.contains(&id) {
            eos.push(id);
        }
    }
    let bos = ids(r#gen.as_ref().and_then(|g| g.get("bos_token_id")))
        .first()
        .or(ids(config.get("bos_token_id")).first())
        .copied();
    Ok((eos, bos))
}

/// How many times candle's elementwise pool threads spin for the next operation before they park
/// (candle's default: 25,000, about half a millisecond). A spinning pool thread holds a core that the
/// matrix products' threads need: on a 2-core machine half a prefill went to it. About 50 µs here, as
/// this engine's own pool (`layers::pool`) spins.
pub const CANDLE_POOL_SPIN_LIMIT: u32 = 2_000;

/// Passes the thread settings on to candle, which reads them from the environment when its CPU pools
/// start (it has no API for them): `RAYON_NUM_THREADS` when `threads` is set, and
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` ([`CANDLE_POOL_SPIN_LIMIT`]) unless the user set it.
///
/// # Safety
/// Writes the process environment: call it before any other thread exists.
pub unsafe fn prepare_candle_env(threads: Option<usize>) {
    // SAFETY: the caller guarantees no other thread reads or writes the environment.
    unsafe {
        if let Some(n) = threads.filter(|n| *n > 0) {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
        if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
            std::env::set_var(
                "CANDLE_BARRIER_POOL_SPIN_LIMIT",
                CANDLE_POOL_SPIN_LIMIT.to_string(),
            );
        }
    }
}

/// Sets the process up for compute, once, before the first kernel runs: the allocator keeps large
/// buffers (`keep_large_buffers`), and rayon's global pool gets `threads` workers, else rayon's
/// default (`RAYON_NUM_THREADS`, else what the process may use). `main` calls this before the async
/// runtime starts; a later call (the loader's) finds the pool built and changes nothing. Returns the
/// pool's size.
pub fn configure_threads(threads: Option<usize>) -> usize {
    keep_large_buffers();
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(n) = threads.filter(|n| *n > 0) {
        builder = builder.num_threads(n);
    }
    let _ = builder.build_global();
    rayon::current_num_threads()
}

/// A long prompt's forward pass allocates and frees buffers of tens of MiB per layer (attention scores:
/// heads × tokens² floats). glibc serves anything above its mmap threshold (at most 32 MiB by default)
/// with a fresh mapping each time, so every page of every such buffer faulted in again: 15% of a
/// 1024-token prefill. Up to 256 MiB now comes from the heap and is reused; at most 256 MiB of free heap
/// is kept before it is returned to the system.
fn keep_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            const LIMIT: libc::c_int = 256 << 20;
            // SAFETY: mallopt only changes allocator parameters; it is called once, before the
            // compute threads start.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, LIMIT);
                libc::mallopt(libc::M_TRIM_THRESHOLD, LIMIT);
            }
        });
    }
}

fn max_position_embeddings(config: &Value) -> usize {
    ["max_position_embeddings", "n_positions", "n_ctx"]
        .iter()
        .find_map(|k| config.get(*k).and_then(Value::as_u64))
        .map(|n| n as usize)
        .unwrap_or(2048)
}

/// The longest context the model's positions allow, as vLLM derives it: `max_position_embeddings`
/// (or `n_positions`, `n_ctx`), times the `factor` of a RoPE scaling that stretches positions
/// (`linear`, `dynamic`, `yarn`); `llama3` and longrope configs already state their full length.
fn derived_max_model_len(config: &Value) -> usize {
    let base = max_position_embeddings(config);
    let scaling = config
        .get("rope_parameters")
        .or_else(|| config.get("rope_scaling"))
        .filter(|v| v.is_object());
    let factor = scaling.and_then(|s| {
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Value::as_str)?;
        matches!(kind, "linear" | "dynamic" | "yarn")
            .then(|| s.get("factor").and_then(Value::as_f64))
            .flatten()
    });
    match factor {
        Some(f) if f > 1.0 => (base as f64 * f) as usize,
        _ => base,
    }
}

/// `MAX_MODEL_LENGTH` past what the model's positions allow is refused at start (vLLM's rule):
/// requests would otherwise fail, or silently degrade, once they pass the model's table.
fn check_max_model_len(max_model_len: usize, derived: usize, allow_long: bool) -> Result<()> {
    if max_model_len <= derived {
        return Ok(());
    }
    if allow_long {
        tracing::warn!(
            max_model_len,
            derived,
            "MAX_MODEL_LENGTH is past the model's positions (VLLM_ALLOW_LONG_MAX_MODEL_LEN=1); \
             outputs past them may be wrong and requests past them may fail"
        );
        return Ok(());
    }
    bail!(
        "MAX_MODEL_LENGTH={max_model_len} is greater than the model's maximum of {derived} positions \
         (max_position_embeddings in config.json, times a RoPE scaling factor); lower it, or set \
         VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 to allow it anyway"
    )
}

/// Loads the causal LM in `settings.model_path` (a float checkpoint folder, or a GGUF file) with the
/// dtype, device and quantization the settings ask for.
pub fn load_causal(settings: &EngineSettings) -> Result<LoadedModel> {
    if let Some(file) = gguf::locate(settings)? {
        return load_gguf(settings, &file);
    }
    let dir = settings.model_path.as_path();
    if !dir.is_dir() {
        bail!("model path {} is not a folder", dir.display())
    }
    let config = text_config(read_config(dir)?);
    let load_as = load_as(settings, &config)?;
    let Placement {
        architecture,
        device,
        dtype,
        model_max,
        max_model_len,
    } = placement(settings, &config)?;
    // read a tensor at a time (not memory-mapped: see `SafetensorsFiles`), so that loading never
    // holds two copies of the weights
    let files = Arc::new(SafetensorsFiles::open(&safetensors_files(dir)?)?);
    let vb = VarBuilder::from_backend(Box::new(FilesBackend(files.clone())), dtype, device.clone());
    let (weights, note) = match load_as {
        LoadAs::InSitu(q) => (
            Weights::in_situ(vb, q),
            Some(format!("linear layers quantized at load to {q:?}")),
        ),
        LoadAs::Checkpoint(cq) => {
            let note = format!(
                "{} checkpoint: 4-bit layers repacked into q4_1 (asymmetric; q5_0 for rows of an odd number of blocks) or q4_0 (symmetric) blocks, FP8 layers into q8_0",
                cq.name()
            );
            (Weights::checkpoint(vb, cq), Some(note))
        }
        LoadAs::Float => (Weights::float(vb), None),
    };
    let weights = weights.with_files(files);
    let model = load_causal_model(&config, weights, max_model_len)
        .with_context(|| format!("cannot load the {architecture} model in {}", dir.display()))?;
    if let Some(note) = note {
        tracing::info!("{note}");
    }
    let (eos_token_ids, bos_token_id) = special_ids(dir, &config)?;
    let meta = ModelMeta {
        architecture,
        model_type: config
            .get("model_type")
            .and_then(Value::as_str)
            .map(str::to_string),
        eos_token_ids,
        bos_token_id,
        pad_token_id: ids(config.get("pad_token_id")).first().copied(),
        max_position_embeddings: model_max,
        max_model_len,
        model_dir: dir.to_path_buf(),
        dtype,
        device,
    };
    Ok(LoadedModel {
        model,
        meta,
        gguf: None,
    })
}

/// How a float-checkpoint folder's linear layers load.
enum LoadAs {
    Float,
    /// Quantized to this block type at load (`QUANTIZATION=q8_0`, ...).
    InSitu(GgmlDType),
    /// Published quantized (`quantization_config`): repacked into ggml blocks at load.
    Checkpoint(CheckpointQuant),
}

/// What `QUANTIZATION` and the checkpoint's `quantization_config` ask for together; a clear error
/// for values and checkpoints this build cannot run, and for a `QUANTIZATION` that contradicts the
/// checkpoint.
fn load_as(settings: &EngineSettings, config: &Value) -> Result<LoadAs> {
    if let Some(cq) = checkpoint::from_config(config)? {
        let method = cq.name();
        return match &settings.quantization {
            Quantization::None => Ok(LoadAs::Checkpoint(cq)),
            Quantization::Awq if method == "awq" => Ok(LoadAs::Checkpoint(cq)),
            Quantization::Gptq if method == "gptq" => Ok(LoadAs::Checkpoint(cq)),
            Quantization::Fp8 if method == "fp8" => Ok(LoadAs::Checkpoint(cq)),
            Quantization::Awq | Quantization::Gptq | Quantization::Fp8 => bail!(
                "QUANTIZATION={} but this checkpoint is quantized with `{method}` (config.json \
                 quantization_config): set QUANTIZATION={method} or leave it unset",
                checkpoint_name(&settings.quantization)
            ),
            Quantization::InSitu(name) => bail!(
                "QUANTIZATION={name} quantizes float checkpoints; this one is already quantized with \
                 `{method}` (config.json quantization_config): leave QUANTIZATION unset{}",
                if method == "fp8" { "" } else { " or set it to the checkpoint's method" }
            ),
            Quantization::Gguf => bail!(
                "QUANTIZATION=gguf but {} holds no .gguf file (it is a `{method}` checkpoint)",
                settings.model_path.display()
            ),
        };
    }
    match &settings.quantization {
        Quantization::None => Ok(LoadAs::Float),
        Quantization::InSitu(name) => match quant::in_situ_dtype(name) {
            Some(d) => Ok(LoadAs::InSitu(d)),
            None => bail!(quant::unsupported_message(&format!("QUANTIZATION={name}"))),
        },
        Quantization::Gguf => bail!(
            "QUANTIZATION=gguf but {} holds no .gguf file",
            settings.model_path.display()
        ),
        Quantization::Fp8 => {
            tracing::info!(
                "QUANTIZATION=fp8 on a float checkpoint: linear layers quantized to q8_0 at load"
            );
            Ok(LoadAs::InSitu(GgmlDType::Q8_0))
        }
        Quantization::Awq | Quantization::Gptq => {
            let name = checkpoint_name(&settings.quantization);
            bail!(
                "QUANTIZATION={name} but {} is not quantized with {name} (its config.json has no \
                 quantization_config): leave QUANTIZATION unset for a float checkpoint",
                settings.model_path.display(),
            )
        }
    }
}

fn checkpoint_name(q: &Quantization) -> &'static str {
    match q {
        Quantization::Awq => "awq",
        Quantization::Gptq => "gptq",
        _ => "fp8",
    }
}

/// What the settings and a model's config decide before any weight is read.
struct Placement {
    architecture: String,
    device: Device,
    dtype: DType,
    /// The model's own context limit.
    model_max: usize,
    /// The one the engine uses (`MAX_MODEL_LENGTH` when set).
    max_model_len: usize,
}

fn placement(settings: &EngineSettings, config: &Value) -> Result<Placement> {
    let architecture = causal_architecture(config)?.to_string();
    let device = resolve_device(settings.device)?;
    if device.is_cpu() {
        configure_threads(settings.threads);
    }
    let dtype = resolve_dtype(settings.dtype, &device, config)?;
    let model_max = max_position_embeddings(config);
    let max_model_len = settings.max_model_len.unwrap_or(model_max);
    if max_model_len == 0 {
        bail!("MAX_MODEL_LENGTH must be at least 1")
    }
    check_max_model_len(
        max_model_len,
        derived_max_model_len(config),
        settings.allow_long_max_model_len,
    )?;
    Ok(Placement {
        architecture,
        device,
        dtype,
        model_max,
        max_model_len,
    })
}

/// Loads a GGUF file: its metadata stands in for config.json, its blocks are used as stored.
fn load_gguf(settings: &EngineSettings, file: &Path) -> Result<LoadedModel> {
    if let Quantization::InSitu(name) = &settings.quantization {
        bail!(
            "QUANTIZATION={name} quantizes float checkpoints; {} is a GGUF file, already quantized \
             (use QUANTIZATION=gguf or leave it unset)",
            file.display()
        )
    }
    let gguf = Arc::new(gguf::GgufFile::open(file)?);
    let config = gguf.config().clone();
    let Placement {
        architecture,
        device,
        dtype,
        model_max,
        max_model_len,
    } = placement(settings, &config)?;
    let weights = Weights::gguf(gguf.clone(), dtype, &device);
    let model = load_causal_model(&config, weights, max_model_len)
        .with_context(|| format!("cannot load the {architecture} model in {}", file.display()))?;
    let meta = ModelMeta {
        architecture,
        model_type: config
            .get("model_type")
            .and_then(Value::as_str)
            .map(str::to_string),
        eos_token_ids: gguf.eos_token_ids(),
        bos_token_id: gguf.bos_token_id(),
        pad_token_id: None,
        max_position_embeddings: model_max,
        max_model_len,
        model_dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
        dtype,
        device,
    };
    Ok(LoadedModel {
        model,
        meta,
        gguf: Some(gguf),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn eos_ids_merge_lists_and_ints() -> Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": [7, 9], "bos_token_id": 1}"#,
        )?;
        let (eos, bos) = special_ids(dir.path(), &json!({"eos_token_id": 9, "bos_token_id": 2}))?;
        assert_eq!(eos, vec![7, 9]);
        assert_eq!(bos, Some(1));
        let (eos, bos) = special_ids(
            tempfile::tempdir()?.path(),
            &json!({"eos_token_id": [3, 4]}),
        )?;
        assert_eq!((eos, bos), (vec![3, 4], None));
        Ok(())
    }

    #[test]
    fn auto_dtype_is_f32_on_cpu() -> Result<()> {
        let cfg = json!({"torch_dtype": "bfloat16"});
        assert_eq!(
            resolve_dtype(DTypeChoice::Auto, &Device::Cpu, &cfg)?,
            DType::F32
        );
        assert_eq!(
            resolve_dtype(DTypeChoice::BF16, &Device::Cpu, &cfg)?,
            DType::BF16
        );
        Ok(())
    }

    #[test]
    fn max_model_len_past_the_positions_is_refused_unless_rope_scaling_or_override_allows_it() {
        let gpt2 = json!({"n_positions": 512});
        assert_eq!(derived_max_model_len(&gpt2), 512);
        assert!(check_max_model_len(512, 512, false).is_ok());
        let err = check_max_model_len(4096, 512, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("MAX_MODEL_LENGTH=4096") && err.contains("512"),
            "{err}"
        );
        assert!(check_max_model_len(4096, 512, true).is_ok());
        let linear = json!({"max_position_embeddings": 512,
                            "rope_scaling": {"type": "linear", "factor": 8.0}});
        assert_eq!(derived_max_model_len(&linear), 4096);
        let yarn = json!({"max_position_embeddings": 512,
                          "rope_parameters": {"rope_type": "yarn", "factor": 4.0}});
        assert_eq!(derived_max_model_len(&yarn), 2048);
        let llama3 = json!({"max_position_embeddings": 131072,
                            "rope_scaling": {"rope_type": "llama3", "factor": 8.0}});
        assert_eq!(derived_max_model_len(&llama3), 131072);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_in_a_cpu_build_is_a_clear_error() {
        let err = resolve_device(DeviceChoice::Cuda).unwrap_err().to_string();
        assert!(err.contains("cuda"), "{err}");
        assert!(resolve_device(DeviceChoice::Auto).is_ok_and(|d| d.is_cpu()));
    }
}
