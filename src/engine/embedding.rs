//! Embeddings: sentence-transformers layout (`modules.json`, `1_Pooling/config.json`, a `Normalize`
//! module) over a BERT-family encoder (`models::bert`). Pooling, normalisation and Matryoshka
//! truncation are pure functions here, so they are tested alone.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde_json::Value;

use super::batch::{ForwardBatch, LogitsWanted, SeqInput};
use super::error::EngineError;
use super::kv_cache::KvCache;
use super::layers::weights::{FilesBackend, SafetensorsFiles};
use super::loader::load_causal;
use super::loader::{read_config, resolve_device, resolve_dtype, safetensors_files};
use super::models::bert::{BertConfig, BertModel, ENCODER_ARCHITECTURES};
use super::models::{causal_architecture, CausalLM};
use super::parts::{Embedder, EngineKind, EngineParts, ModelInfo};
use super::settings::EngineSettings;
use super::template::ChatTemplate;
use super::tokenizer::Tokenizer;
use super::types::{EmbedOutput, EmbedRequest};

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// How token states become one vector (sentence-transformers' `pooling_mode_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Cls,
    Mean,
    Max,
    LastToken,
}

/// What follows the transformer: pooling, then L2 normalisation when a `Normalize` module is listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolingSpec {
    pub pooling: Pooling,
    pub normalize: bool,
}

impl PoolingSpec {
    /// The spec for one request: its `normalize` (vLLM's) overrides the model's `Normalize` module.
    pub(crate) fn for_request(self, normalize: Option<bool>) -> Self {
        Self {
            normalize: normalize.unwrap_or(self.normalize),
            ..self
        }
    }

    /// One input's hidden states `[tokens, hidden]` → the vector the client gets (`dims` long).
    fn vector(&self, states: &Tensor, dims: usize) -> candle_core::Result<Vec<f32>> {
        let pooled = pool(states, self.pooling)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        Ok(finish_vector(pooled, self.normalize, dims))
    }

    /// Reads `modules.json` and the pooling module's `config.json`. Without `modules.json` (a bare
    /// model folder): `default` pooling, normalised, as vLLM does.
    pub fn from_dir(dir: &Path, default: Pooling) -> anyhow::Result<Self> {
        let modules_path = dir.join("modules.json");
        if !modules_path.exists() {
            return Ok(Self {
                pooling: default,
                normalize: true,
            });
        }
        let modules = read_json(&modules_path)?;
        let Some(list) = modules.as_array() else {
            bail!("{} is not a list of modules", modules_path.display())
        };
        let mut pooling = None;
        let mut normalize = false;
        for m in list {
            let kind = m.get("type").and_then(Value::as_str).unwrap_or_default();
            let path = m.get("path").and_then(Value::as_str).unwrap_or_default();
            match kind.rsplit('.').next().unwrap_or_default() {
                "Transformer" => {}
                "Pooling" => {
                    let cfg = read_json(&dir.join(path).join("config.json"))?;
                    pooling = Some(pooling_from_config(&cfg)?);
                }
                "Normalize" => normalize = true,
                other => bail!(
                    "modules.json lists a `{other}` module, which this engine does not run (supported: Transformer, Pooling, Normalize)"
                ),
            }
        }
        Ok(Self {
            pooling: pooling.unwrap_or(default),
            normalize,
        })
    }
}

/// The pooling mode a sentence-transformers `Pooling` config selects (exactly one).
pub(crate) fn pooling_from_config(cfg: &Value) -> anyhow::Result<Pooling> {
    if let Some(mode) = cfg.get("pooling_mode").and_then(Value::as_str) {
        return pooling_by_name(mode);
    }
    let on = |k: &str| cfg.get(k).and_then(Value::as_bool) == Some(true);
    let modes: Vec<Pooling> = [
        ("pooling_mode_cls_token", Pooling::Cls),
        ("pooling_mode_mean_tokens", Pooling::Mean),
        ("pooling_mode_max_tokens", Pooling::Max),
        ("pooling_mode_lasttoken", Pooling::LastToken),
    ]
    .iter()
    .filter(|(k, _)| on(k))
    .map(|(_, p)| *p)
    .collect();
    for unsupported in [
        "pooling_mode_mean_sqrt_len_tokens",
        "pooling_mode_weightedmean_tokens",
    ] {
        if on(unsupported) {
            bail!("pooling config asks for `{unsupported}`, which this engine does not support")
        }
    }
    match modes.as_slice() {
        [one] => Ok(*one),
        [] => bail!("the pooling config enables no pooling mode"),
        _ => bail!(
            "the pooling config enables several pooling modes (concatenation is not supported)"
        ),
    }
}

fn pooling_by_name(name: &str) -> anyhow::Result<Pooling> {
    Ok(match name {
        "cls" => Pooling::Cls,
        "mean" => Pooling::Mean,
        "max" => Pooling::Max,
        "lasttoken" | "last" => Pooling::LastToken,
        other => bail!("unsupported pooling mode `{other}`"),
    })
}

/// Pools one sequence's states `[len, hidden]` (padding already cut off) to `[hidden]`.
pub(crate) fn pool(states: &Tensor, pooling: Pooling) -> candle_core::Result<Tensor> {
    let len = states.dim(0)?;
    match pooling {
        Pooling::Cls => states.get(0),
        Pooling::LastToken => states.get(len.saturating_sub(1)),
        Pooling::Mean => states.mean(0),
        Pooling::Max => states.max(0),
    }
}

/// Scales `v` to unit L2 norm (a zero vector stays zero, as torch's `normalize` with eps leaves it).
pub(crate) fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

/// The requested Matryoshka size, checked against the model's: `None` = the whole vector.
pub(crate) fn check_dimensions(
    dimensions: Option<usize>,
    model_dim: usize,
) -> Result<usize, EngineError> {
    match dimensions {
        None => Ok(model_dim),
        Some(0) => Err(EngineError::invalid(
            "dimensions",
            "`dimensions` must be at least 1",
        )),
        Some(d) if d > model_dim => Err(EngineError::invalid(
            "dimensions",
            format!("`dimensions` is {d}, larger than the model's embedding size of {model_dim}"),
        )),
        Some(d) => Ok(d),
    }
}

/// Pooled vector → what the client gets: normalised when the model normalises, cut to `dims` and
/// normalised again (Matryoshka: a prefix of a normalised vector is not unit length).
pub(crate) fn finish_vector(mut v: Vec<f32>, normalize: bool, dims: usize) -> Vec<f32> {
    if normalize {
        l2_normalize(&mut v);
    }
    if dims < v.len() {
        v.truncate(dims);
        if normalize {
            l2_normalize(&mut v);
        }
    }
    v
}

/// Checks what every embedder checks: inputs present, non-empty, within the context, token ids within
/// the vocabulary.
pub(crate) fn validate_inputs(
    inputs: &[Vec<u32>],
    max_len: usize,
    vocab: usize,
) -> Result<(), EngineError> {
    if inputs.is_empty() {
        return Err(EngineError::invalid("input", "`input` is empty"));
    }
    for (i, input) in inputs.iter().enumerate() {
        if input.is_empty() {
            return Err(EngineError::invalid(
                "input",
                format!("input {i} has no tokens"),
            ));
        }
        if input.len() > max_len {
            return Err(EngineError::invalid(
                "input",
                format!(
                    "This model's maximum context length is {max_len} tokens (max_position_embeddings). However, input {i} has {} tokens. Shorten it or set `truncate_prompt_tokens`.",
                    input.len()
                ),
            ));
        }
        if let Some(bad) = input.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::invalid(
                "input",
                format!("input {i}: token id {bad} is out of range for a vocabulary of {vocab}"),
            ));
        }
    }
    Ok(())
}

/// Splits input indices, sorted by length, into batches whose padded size stays under `max_tokens`
/// (similar lengths together waste little padding).
pub(crate) fn plan_batches(lens: &[usize], max_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| lens[i]);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in order {
        // Sorted ascending, so this input is the longest of the batch so far.
        if !current.is_empty() && (current.len() + 1) * lens[i] > max_tokens {
            batches.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// Padded tokens one encoder forward pass may hold.
const MAX_BATCH_TOKENS: usize = 16 * 1024;

/// An encoder model with its pooling: computes `EmbedOutput`s.
pub struct EncoderEmbedder {
    model: BertModel,
    spec: PoolingSpec,
}

impl EncoderEmbedder {
    pub fn new(model: BertModel, spec: PoolingSpec) -> Self {
        Self { model, spec }
    }

    /// Loads the encoder and pooling of a sentence-transformers (or bare BERT) folder.
    pub fn load(settings: &EngineSettings) -> anyhow::Result<Self> {
        let dir = &settings.model_path;
        if settings.quantization != crate::engine::settings::Quantization::None {
            anyhow::bail!(
                "QUANTIZATION={:?} applies to decoder models; BERT-family embedders run in float \
                 (unset QUANTIZATION)",
                settings.quantization
            )
        }
        let raw = read_config(dir)?;
        let cfg: BertConfig = serde_json::from_value(raw.clone())
            .with_context(|| format!("{}/config.json is not a BERT config", dir.display()))?;
        let device = resolve_device(settings.device)?;
        let dtype = resolve_dtype(settings.dtype, &device, &raw)?;
        // read a tensor at a time (no memory map whose pages stay resident beside the weights)
        let files = Arc::new(SafetensorsFiles::open(&safetensors_files(dir)?)?);
        let vb = VarBuilder::from_backend(Box::new(FilesBackend(files)), dtype, device.clone());
        let model = BertModel::load(vb, &cfg).context("loading the encoder")?;
        Ok(Self::new(model, PoolingSpec::from_dir(dir, Pooling::Cls)?))
    }

    pub fn spec(&self) -> PoolingSpec {
        self.spec
    }

    /// The longest input, in tokens.
    pub(crate) fn max_input_len(&self) -> usize {
        self.model.config().max_input_len()
    }

    pub fn dimensions(&self) -> usize {
        self.model.hidden_size()
    }

    pub fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }
}

impl Embedder for EncoderEmbedder {
    fn embed(&self, request: &EmbedRequest) -> Result<EmbedOutput, EngineError> {
        validate_inputs(&request.inputs, self.max_input_len(), self.vocab_size())?;
        let dims = check_dimensions(request.dimensions, self.dimensions())?;
        let lens: Vec<usize> = request.inputs.iter().map(Vec::len).collect();
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); request.inputs.len()];
        for batch in plan_batches(&lens, MAX_BATCH_TOKENS) {
            let seqs: Vec<&[u32]> = batch
                .iter()
                .map(|&i| request.inputs[i].as_slice())
                .collect();
            let hidden = self.model.forward(&seqs)?;
            for (row, &i) in batch.iter().enumerate() {
                let states = hidden.get(row)?.narrow(0, 0, lens[i])?;
                out[i] = self
                    .spec
                    .for_request(request.normalize)
                    .vector(&states, dims)?;
            }
        }
        Ok(EmbedOutput {
            embeddings: out,
            prompt_tokens: lens.iter().sum(),
        })
    }
}

/// Whether a model folder holds an encoder this engine serves as an embedder.
pub(crate) fn is_encoder_model(dir: &Path) -> bool {
    let Ok(cfg) = read_config(dir) else {
        return false;
    };
    let named = cfg
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str);
    match named {
        Some(arch) => ENCODER_ARCHITECTURES.contains(&arch),
        None => matches!(
            cfg.get("model_type").and_then(Value::as_str),
            Some("bert" | "roberta" | "xlm-roberta")
        ),
    }
}

/// KV blocks a decoder embedder keeps for its forward passes (one batch at a time).
const DECODER_CACHE_TOKENS: usize = 8 * 1024;

/// A decoder model used as an embedder (Qwen3-Embedding style): one prefill pass over each input,
/// the final normed hidden states pooled (last token, normally). The model and a small KV cache of
/// its own sit behind a lock: embedding requests run one batch at a time.
pub struct DecoderEmbedder {
    state: std::sync::Mutex<(Box<dyn CausalLM>, KvCache)>,
    spec: PoolingSpec,
    max_len: usize,
    block_size: usize,
}

impl DecoderEmbedder {
    pub fn new(
        model: Box<dyn CausalLM>,
        spec: PoolingSpec,
        max_len: usize,
    ) -> anyhow::Result<Self> {
        let block_size = 16;
        let tokens = DECODER_CACHE_TOKENS.max(max_len);
        let cache = KvCache::new(model.spec(), tokens.div_ceil(block_size), block_size)?;
        Ok(Self {
            state: std::sync::Mutex::new((model, cache)),
            spec,
            max_len,
            block_size,
        })
    }

    /// Loads the causal model of a sentence-transformers folder (`modules.json` present).
    pub fn load(settings: &EngineSettings) -> anyhow::Result<Self> {
        let loaded = load_causal(settings)?;
        let spec = PoolingSpec::from_dir(&settings.model_path, Pooling::LastToken)?;
        Self::new(loaded.model, spec, loaded.meta.max_model_len)
    }

    pub fn spec(&self) -> PoolingSpec {
        self.spec
    }

    /// Splits inputs (in order) into runs whose blocks fit the cache.
    fn plan(&self, lens: &[usize], num_blocks: usize) -> Vec<Vec<usize>> {
        let mut batches: Vec<Vec<usize>> = Vec::new();
        let mut used = 0;
        for (i, len) in lens.iter().enumerate() {
            let blocks = len.div_ceil(self.block_size);
            if used + blocks > num_blocks || batches.is_empty() {
                batches.push(Vec::new());
                used = 0;
            }
            used += blocks;
            if let Some(b) = batches.last_mut() {
                b.push(i);
            }
        }
        batches
    }
}

impl Embedder for DecoderEmbedder {
    fn embed(&self, request: &EmbedRequest) -> Result<EmbedOutput, EngineError> {
        let state = self.state.lock();
        let mut state =
            state.map_err(|_| EngineError::Internal("the embedder's lock is poisoned".into()))?;
        let (model, cache) = &mut *state;
        let model_spec = model.spec().clone();
        validate_inputs(&request.inputs, self.max_len, model_spec.vocab_size)?;
        let dims = check_dimensions(request.dimensions, model_spec.hidden_size)?;
        let lens: Vec<usize> = request.inputs.iter().map(Vec::len).collect();
        let wanted = match self.spec.pooling {
            Pooling::LastToken => LogitsWanted::Last,
            _ => LogitsWanted::All,
        };
        let mut out = Vec::with_capacity(lens.len());
        for batch in self.plan(&lens, cache.num_blocks()) {
            let mut next_block = 0u32;
            let mut tokens = Vec::new();
            let mut seqs = Vec::new();
            for &i in &batch {
                let blocks = lens[i].div_ceil(self.block_size) as u32;
                tokens.extend_from_slice(&request.inputs[i]);
                seqs.push(SeqInput {
                    context_len: 0,
                    num_new: lens[i],
                    block_table: (next_block..next_block + blocks).collect(),
                    logits: wanted,
                });
                next_block += blocks;
            }
            let hidden = model.hidden_states(
                &ForwardBatch {
                    tokens,
                    seqs,
                    adapters: Vec::new(),
                },
                cache,
            )?;
            let mut row = 0;
            for &i in &batch {
                let rows = if wanted == LogitsWanted::Last {
                    1
                } else {
                    lens[i]
                };
                let states = hidden.narrow(0, row, rows)?;
                row += rows;
                out.push(
                    self.spec
                        .for_request(request.normalize)
                        .vector(&states, dims)?,
                );
            }
        }
        Ok(EmbedOutput {
            embeddings: out,
            prompt_tokens: lens.iter().sum(),
        })
    }
}

/// vLLM's `is_matryoshka`: `None` when `config.json` neither lists `matryoshka_dimensions` nor sets
/// `is_matryoshka` (then `dimensions` is refused); else the dimensions allowed (empty: any).
pub(crate) fn matryoshka(config: &Value) -> Option<Vec<usize>> {
    let listed: Option<Vec<usize>> = config
        .get("matryoshka_dimensions")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .filter(|v: &Vec<usize>| !v.is_empty());
    match listed {
        Some(dims) => Some(dims),
        None if config.get("is_matryoshka").and_then(Value::as_bool) == Some(true) => {
            Some(Vec::new())
        }
        None => None,
    }
}

/// Whether a folder holds a decoder packaged as a sentence-transformers embedder (`modules.json`
/// next to a supported causal architecture).
pub(crate) fn is_decoder_embedder(dir: &Path) -> bool {
    dir.join("modules.json").is_file()
        && read_config(dir).is_ok_and(|c| causal_architecture(&c).is_ok())
}

/// Whether the engine should serve this folder as an embedding model.
pub fn is_embedding_model(dir: &Path) -> bool {
    is_encoder_model(dir) || is_decoder_embedder(dir)
}

/// An encoder loaded for the engine, with the facts `ModelInfo` needs.
pub struct LoadedEmbedder {
    pub embedder: Arc<EncoderEmbedder>,
    pub architecture: String,
    pub max_model_len: usize,
    pub vocab_size: usize,
}

/// Loads the encoder at `settings.model_path` (see `is_encoder_model`).
pub fn load_encoder(settings: &EngineSettings) -> anyhow::Result<LoadedEmbedder> {
    let embedder = EncoderEmbedder::load(settings)?;
    let cfg = read_config(&settings.model_path)?;
    let architecture = cfg
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .unwrap_or("BertModel")
        .to_string();
    let max_model_len = settings
        .max_model_len
        .map_or(embedder.max_input_len(), |m| {
            m.min(embedder.max_input_len())
        });
    Ok(LoadedEmbedder {
        architecture,
        max_model_len,
        vocab_size: embedder.vocab_size(),
        embedder: Arc::new(embedder),
    })
}

struct LoadedAny {
    embedder: Arc<dyn Embedder>,
    spec: PoolingSpec,
    dimensions: usize,
    architecture: String,
    max_model_len: usize,
    vocab_size: usize,
}

/// The engine's parts for an embedding model (encoder, or decoder in sentence-transformers layout):
/// the embedder, the tokenizer, no generation. `None` when the folder is no embedding model (see
/// `is_embedding_model`).
pub(crate) fn embedding_parts(settings: &EngineSettings) -> anyhow::Result<Option<EngineParts>> {
    if !is_embedding_model(&settings.model_path) {
        return Ok(None);
    }
    let tok_dir = settings
        .tokenizer_path
        .clone()
        .unwrap_or_else(|| settings.model_path.clone());
    let tokenizer = Tokenizer::from_dir(&tok_dir)
        .with_context(|| format!("loading the tokenizer from {}", tok_dir.display()))?;
    let loaded = if is_encoder_model(&settings.model_path) {
        let e = load_encoder(settings)?;
        LoadedAny {
            dimensions: e.embedder.dimensions(),
            spec: e.embedder.spec(),
            architecture: e.architecture,
            max_model_len: e.max_model_len,
            vocab_size: e.vocab_size,
            embedder: e.embedder,
        }
    } else {
        let arch = causal_architecture(&read_config(&settings.model_path)?)?.to_string();
        let d = DecoderEmbedder::load(settings)?;
        let (dimensions, vocab_size, max_model_len) = {
            let state = d.state.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            let spec = state.0.spec();
            (spec.hidden_size, spec.vocab_size, d.max_len)
        };
        LoadedAny {
            dimensions,
            spec: d.spec(),
            architecture: arch,
            max_model_len,
            vocab_size,
            embedder: Arc::new(d),
        }
    };
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    tracing::info!(
        architecture = %loaded.architecture,
        dimensions = loaded.dimensions,
        pooling = ?loaded.spec,
        "embedding model loaded"
    );
    Ok(Some(EngineParts {
        info: ModelInfo {
            served_model_name: settings.served_model_name.clone(),
            architecture: loaded.architecture,
            max_model_len: loaded.max_model_len,
            vocab_size: loaded.vocab_size.max(tokenizer.vocab_size()),
            can_generate: false,
            can_embed: true,
            created,
            prefix_caching: false,
            matryoshka: matryoshka(&read_config(&settings.model_path)?),
        },
        tokenizer,
        // vLLM embeds chat `messages` rendered with the model's template (or CUSTOM_CHAT_TEMPLATE).
        template: ChatTemplate::from_model_dir(&tok_dir, settings.custom_chat_template.as_deref())
            .unwrap_or_else(|e| {
                tracing::warn!("chat template: {e}; chat-style embedding requests are refused");
                None
            }),
        kind: EngineKind::Embedder(loaded.embedder),
    }))
}

/// Cosine similarity of two vectors (tests, ranking).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb).max(1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pooling_configs() {
        let p = |v: Value| pooling_from_config(&v);
        assert_eq!(
            p(json!({"word_embedding_dimension": 64, "pooling_mode_mean_tokens": true})).unwrap(),
            Pooling::Mean
        );
        assert_eq!(
            p(json!({"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false})).unwrap(),
            Pooling::Cls
        );
        assert_eq!(
            p(json!({"pooling_mode_lasttoken": true})).unwrap(),
            Pooling::LastToken
        );
        assert_eq!(p(json!({"pooling_mode": "max"})).unwrap(), Pooling::Max);
        assert!(p(json!({})).is_err());
        assert!(
            p(json!({"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": true})).is_err()
        );
        assert!(p(json!({"pooling_mode_weightedmean_tokens": true})).is_err());
    }

    #[test]
    fn pools_rows() {
        let t = Tensor::new(
            &[[1f32, 2.0], [3.0, -4.0], [5.0, 0.0]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let v = |p| pool(&t, p).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(Pooling::Cls), vec![1.0, 2.0]);
        assert_eq!(v(Pooling::LastToken), vec![5.0, 0.0]);
        assert_eq!(v(Pooling::Mean), vec![3.0, -2.0 / 3.0]);
        assert_eq!(v(Pooling::Max), vec![5.0, 2.0]);
    }

    #[test]
    fn matryoshka_truncation_renormalises() {
        let v = finish_vector(vec![3.0, 4.0, 12.0], true, 2);
        assert!(
            (v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6,
            "{v:?}"
        );
        let whole = finish_vector(vec![3.0, 4.0, 12.0], true, 3);
        assert!((whole[2] - 12.0 / 13.0).abs() < 1e-6);
        assert_eq!(
            finish_vector(vec![3.0, 4.0, 12.0], false, 2),
            vec![3.0, 4.0]
        );
        assert_eq!(finish_vector(vec![0.0, 0.0], true, 2), vec![0.0, 0.0]);
    }

    #[test]
    fn dimensions_are_checked() {
        assert_eq!(check_dimensions(None, 64).unwrap(), 64);
        assert_eq!(check_dimensions(Some(32), 64).unwrap(), 32);
        for bad in [0, 65] {
            let e = check_dimensions(Some(bad), 64).unwrap_err();
            assert_eq!(e.param(), Some("dimensions"));
        }
    }

    #[test]
    fn inputs_are_validated() {
        assert!(validate_inputs(&[], 8, 16).is_err());
        assert!(validate_inputs(&[vec![]], 8, 16).is_err());
        let e = validate_inputs(&[vec![1; 9]], 8, 16).unwrap_err();
        assert!(e.to_string().contains("maximum context length is 8"), "{e}");
        assert!(validate_inputs(&[vec![1; 8], vec![2]], 8, 16).is_ok());
        let e = validate_inputs(&[vec![1, 16]], 8, 16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("token id 16"), "{e}");
    }

    #[test]
    fn batches_cover_every_input_once_within_budget() {
        let lens = [5, 1, 9, 3, 9, 2, 7];
        let batches = plan_batches(&lens, 16);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>());
        for b in &batches {
            let longest = b.iter().map(|&i| lens[i]).max().unwrap();
            assert!(b.len() == 1 || b.len() * longest <= 16, "{b:?}");
        }
        // An input longer than the budget still gets a batch of its own.
        assert_eq!(plan_batches(&[40], 16), vec![vec![0]]);
    }
}
