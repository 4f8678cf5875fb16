//! From settings to `EngineParts`: the model, its tokenizer and facts, and the KV budget in blocks.

use std::path::Path;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use candle_core::Tensor;

use crate::engine::batch::ForwardBatch;
use crate::engine::device_memory::{activation_reserve, gpu_kv_budget, MemoryProbe};
use crate::engine::gguf::GgufFile;
use crate::engine::kv_cache::KvCache;
use crate::engine::loader::{load_causal, LoadedModel};
use crate::engine::lora::{load_adapter, AdapterInfo};
use crate::engine::models::CausalLM;
use crate::engine::sampling::device::{sample_rows, RowPlan};
use crate::engine::sampling::Sampled;
use crate::engine::scheduler::SchedulerConfig;
use crate::engine::settings::EngineSettings;
use crate::engine::template::ChatTemplate;
use crate::engine::tokenizer::Tokenizer;

use crate::engine::parts::{
    EngineKind, EngineParts, Executor, Generator, ModelInfo, Proposer, Speculation,
};
use crate::engine::speculative::{NgramProposer, SpeculativeMethod};

/// Default KV budget on CPU when `KV_CACHE_MEMORY` is unset: enough for `max_num_seqs` full-length
/// sequences, capped (a CPU box shares its memory with the weights and everything else).
pub(crate) const DEFAULT_CPU_KV_BYTES: u64 = 1 << 30;

/// How many KV blocks the budget buys. `budget`: `KV_CACHE_MEMORY`, else on GPU `gpu_budget` (what
/// `device_memory::gpu_kv_budget` leaves of `GPU_MEMORY_UTILIZATION`), else the CPU default, never
/// more than half the memory the host has left (`host_free`, when known). At least one block.
pub(crate) fn num_kv_blocks(
    settings: &EngineSettings,
    bytes_per_block: u64,
    max_model_len: usize,
    gpu_budget: Option<u64>,
    host_free: Option<u64>,
) -> usize {
    let bs = settings.block_size.max(1);
    let per_seq = max_model_len.div_ceil(bs) as u64;
    let budget = match (settings.kv_cache_memory, gpu_budget) {
        (Some(b), _) => b,
        (None, Some(budget)) => budget,
        (None, None) => {
            let wanted = per_seq * settings.max_num_seqs as u64 * bytes_per_block;
            let default = wanted.min(DEFAULT_CPU_KV_BYTES);
            host_free.map_or(default, |free| default.min(free / 2))
        }
    };
    ((budget / bytes_per_block.max(1)) as usize).max(1)
}

/// The start-up checks of the KV budget, before anything is allocated: an explicit
/// `KV_CACHE_MEMORY` must fit the memory the host has left (`host_free`, for a cache in host
/// memory), and the cache must hold one sequence of `max_model_len` tokens. When neither
/// `KV_CACHE_MEMORY` nor `MAX_MODEL_LENGTH` was set, the context is lowered to what the default
/// budget holds instead (logged); set explicitly, it is an error, as in vLLM. The context length to
/// serve.
pub(crate) fn check_kv_budget(
    settings: &EngineSettings,
    num_blocks: usize,
    bytes_per_block: u64,
    max_model_len: usize,
    host_free: Option<u64>,
) -> anyhow::Result<usize> {
    let bytes = num_blocks as u64 * bytes_per_block;
    if let (Some(asked), Some(free)) = (settings.kv_cache_memory, host_free) {
        if bytes > free {
            anyhow::bail!(
                "KV_CACHE_MEMORY={} is more than the {} of memory this worker has left \
                 (on a GPU its free memory; on CPU MemAvailable, or the cgroup's memory.max less its \
                 usage); lower KV_CACHE_MEMORY",
                human_bytes(asked),
                human_bytes(free)
            );
        }
    }
    let block_size = settings.block_size.max(1);
    let capacity = num_blocks * block_size;
    if capacity >= max_model_len {
        return Ok(max_model_len);
    }
    let explicit = settings.kv_cache_memory.is_some() || settings.max_model_len.is_some();
    if explicit {
        let needed = max_model_len.div_ceil(block_size) as u64 * bytes_per_block;
        anyhow::bail!(
            "the KV cache ({} for {capacity} tokens) cannot hold one sequence of the context \
             length {max_model_len} ({} needed); raise KV_CACHE_MEMORY or lower MAX_MODEL_LENGTH \
             to at most {capacity}",
            human_bytes(bytes),
            human_bytes(needed)
        );
    }
    tracing::warn!(
        capacity,
        max_model_len,
        "the default KV cache holds fewer tokens than the model's context length; lowering the \
         context length to fit (set KV_CACHE_MEMORY to keep it)"
    );
    Ok(capacity)
}

/// `1.5 GiB`, `512 MiB`, `300 B`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Host memory this process may still take: `MemAvailable` of /proc/meminfo, or what the cgroup's
/// limit leaves (`memory.max` less `memory.current`, cgroup v2; v1's `memory.limit_in_bytes` less
/// `memory.usage_in_bytes`), whichever is smaller. `None` where neither can be read.
pub(crate) fn host_memory_available() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let meminfo = read("/proc/meminfo").and_then(|t| mem_available(&t));
    let cgroup = cgroup_left(
        read("/sys/fs/cgroup/memory.max").as_deref(),
        read("/sys/fs/cgroup/memory.current").as_deref(),
    )
    .or_else(|| {
        cgroup_left(
            read("/sys/fs/cgroup/memory/memory.limit_in_bytes").as_deref(),
            read("/sys/fs/cgroup/memory/memory.usage_in_bytes").as_deref(),
        )
    });
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `MemAvailable` in bytes from the text of /proc/meminfo.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A cgroup's limit less its usage; `None` without a limit (`max`, or v1's huge sentinel).
fn cgroup_left(limit: Option<&str>, usage: Option<&str>) -> Option<u64> {
    let limit: u64 = limit?.trim().parse().ok()?;
    if limit >= 1 << 60 {
        return None;
    }
    let usage: u64 = usage.and_then(|u| u.trim().parse().ok()).unwrap_or(0);
    Some(limit.saturating_sub(usage))
}

/// The model and its paged cache: the executor the engine thread drives.
pub(crate) struct CausalExecutor {
    model: Box<dyn CausalLM>,
    cache: KvCache,
    /// Choose eligible rows' tokens on the model's device (`SAMPLE_ON_DEVICE`).
    sample_on_device: bool,
}

impl CausalExecutor {
    pub fn new(model: Box<dyn CausalLM>, cache: KvCache) -> Self {
        Self {
            model,
            cache,
            sample_on_device: false,
        }
    }

    /// Samples eligible rows on the model's device (`SAMPLE_ON_DEVICE`).
    pub fn sampling_on_device(mut self, on: bool) -> Self {
        self.sample_on_device = on;
        self
    }

    fn forward(&mut self, copies: &[(u32, u32)], batch: &ForwardBatch) -> anyhow::Result<Tensor> {
        for &(src, dst) in copies {
            self.cache.copy_block(src, dst)?;
        }
        Ok(self.model.forward(batch, &mut self.cache)?)
    }
}

impl Executor for CausalExecutor {
    fn execute(&mut self, copies: &[(u32, u32)], batch: &ForwardBatch) -> anyhow::Result<Vec<f32>> {
        let logits = self.forward(copies, batch)?;
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }

    fn samples_on_device(&self) -> bool {
        self.sample_on_device
    }

    fn execute_sampling(
        &mut self,
        copies: &[(u32, u32)],
        batch: &ForwardBatch,
        on_device: &[(usize, RowPlan)],
    ) -> anyhow::Result<(Vec<f32>, Vec<Sampled>)> {
        let logits = self.forward(copies, batch)?;
        let rows = logits.dim(0)?;
        let device = logits.device().clone();
        let picked: Vec<u32> = on_device.iter().map(|(r, _)| *r as u32).collect();
        if picked.iter().any(|r| *r as usize >= rows) {
            anyhow::bail!("a device-sampled row past the {rows} logits rows");
        }
        let plans: Vec<RowPlan> = on_device.iter().map(|(_, p)| *p).collect();
        let sampled = sample_rows(
            &logits.index_select(&Tensor::new(picked.as_slice(), &device)?, 0)?,
            &plans,
        )?;
        let rest: Vec<u32> = (0..rows as u32)
            .filter(|r| picked.binary_search(r).is_err())
            .collect();
        let host = if rest.is_empty() {
            Vec::new()
        } else {
            logits
                .index_select(&Tensor::new(rest.as_slice(), &device)?, 0)?
                .flatten_all()?
                .to_vec1::<f32>()?
        };
        Ok((host, sampled))
    }
    fn load_adapter(&mut self, id: u32, dir: &Path, max_rank: usize) -> anyhow::Result<usize> {
        let spec = self.model.spec().clone();
        let weights = load_adapter(dir, max_rank, spec.dtype, &spec.device)?;
        self.model.add_adapter(id, &weights)?;
        Ok(weights.rank)
    }

    fn unload_adapter(&mut self, id: u32) {
        self.model.remove_adapter(id);
    }
}

/// `LORA_MODULES`: each adapter loaded into `model` (ids from 1; 0 is the base model).
fn load_adapters(
    settings: &EngineSettings,
    model: &mut dyn CausalLM,
) -> anyhow::Result<Vec<AdapterInfo>> {
    let Some(lora) = &settings.lora else {
        return Ok(Vec::new());
    };
    let spec = model.spec().clone();
    let mut out = Vec::new();
    for (i, a) in lora.modules.iter().enumerate() {
        if a.name == settings.served_model_name {
            anyhow::bail!(
                "the LoRA adapter `{}` has the served model's name; name it differently",
                a.name
            );
        }
        let weights = load_adapter(&a.path, lora.max_lora_rank, spec.dtype, &spec.device)
            .with_context(|| format!("loading the LoRA adapter `{}`", a.name))?;
        let id = i as u32 + 1;
        model.add_adapter(id, &weights).with_context(|| {
            format!(
                "the LoRA adapter `{}` ({}) does not fit the base model",
                a.name,
                a.path.display()
            )
        })?;
        tracing::info!(adapter = %a.name, rank = weights.rank, path = %a.path.display(), "LoRA adapter loaded");
        out.push(AdapterInfo {
            id,
            name: a.name.clone(),
            path: a.path.clone(),
            rank: weights.rank,
        });
    }
    Ok(out)
}

/// The model's sliding window from its `config.json` (`None` when it has none, or it is switched
/// off by `use_sliding_window: false`).
fn sliding_window(settings: &EngineSettings) -> Option<usize> {
    let text = std::fs::read_to_string(settings.model_path.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    if config.get("use_sliding_window") == Some(&serde_json::Value::Bool(false)) {
        return None;
    }
    let window = config.get("sliding_window")?.as_u64()?;
    usize::try_from(window).ok().filter(|w| *w > 0)
}

/// Loads tokenizer, model, chat template and a KV cache sized by the budget.
pub fn load(settings: &EngineSettings) -> anyhow::Result<EngineParts> {
    if let Some(parts) = crate::engine::embedding::embedding_parts(settings)? {
        if settings
            .lora
            .as_ref()
            .is_some_and(|l| !l.modules.is_empty())
        {
            anyhow::bail!("LoRA adapters (LORA_MODULES) need a model that generates text; this one serves embeddings");
        }
        return Ok(parts);
    }
    let LoadedModel {
        mut model,
        meta,
        gguf,
    } = load_causal(settings)?;
    let adapters = load_adapters(settings, model.as_mut())?;
    let (tokenizer, template) = tokenizer_and_template(settings, gguf.as_deref())?;
    let spec = model.spec().clone();
    let block_size = settings.block_size.max(1);
    let kv_dtype = settings.kv_cache_dtype;
    let bytes_per_block = KvCache::bytes_per_block(&spec, block_size, kv_dtype) as u64;
    // The cache lives in host memory on CPU; on a GPU, in the device's memory, whose figures are
    // read now that the weights are loaded (GPU_MEMORY_UTILIZATION applies, as in vLLM).
    let gpu_memory = meta.device.memory();
    let host_free = match gpu_memory {
        Some(gpu) => Some(gpu.free),
        None if meta.device.is_cpu() => host_memory_available(),
        None => None,
    };
    let gpu_budget = match gpu_memory {
        Some(gpu) if settings.kv_cache_memory.is_none() => {
            let reserve = activation_reserve(
                settings.max_num_batched_tokens,
                settings.max_num_seqs,
                spec.hidden_size,
                spec.vocab_size,
                spec.dtype.size_in_bytes(),
            );
            Some(
                gpu_kv_budget(gpu, settings.gpu_memory_utilization, reserve)
                    .map_err(anyhow::Error::msg)?,
            )
        }
        _ => None,
    };
    let num_blocks = num_kv_blocks(
        settings,
        bytes_per_block,
        meta.max_model_len,
        gpu_budget,
        host_free,
    );
    let max_model_len = check_kv_budget(
        settings,
        num_blocks,
        bytes_per_block,
        meta.max_model_len,
        host_free,
    )?;
    // DISABLE_SLIDING_WINDOW (vLLM's meaning): full attention, the context capped at the window.
    let max_model_len = match sliding_window(settings).filter(|_| settings.disable_sliding_window) {
        Some(window) if window < max_model_len => {
            tracing::info!(
                window,
                "DISABLE_SLIDING_WINDOW: the context length is capped at the sliding window"
            );
            window
        }
        _ => max_model_len,
    };
    let cache = KvCache::with_dtype(&spec, num_blocks, block_size, kv_dtype)?;
    tracing::info!(
        num_blocks,
        block_size,
        kv_cache_dtype = kv_dtype.name(),
        kv_cache_tokens = num_blocks * block_size,
        kv_bytes_per_token = bytes_per_block / block_size as u64,
        kv_cache_mib = (num_blocks as u64 * bytes_per_block) as f64 / (1 << 20) as f64,
        max_model_len,
        "KV cache allocated"
    );
    let mut eos_token_ids = meta.eos_token_ids.clone();
    eos_token_ids.extend(tokenizer.eos_token_id());
    eos_token_ids.sort_unstable();
    eos_token_ids.dedup();
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(EngineParts {
        tokenizer,
        info: ModelInfo {
            served_model_name: settings.served_model_name.clone(),
            architecture: meta.architecture,
            max_model_len,
            vocab_size: spec.vocab_size,
            can_generate: true,
            can_embed: false,
            created,
            prefix_caching: false,
            matryoshka: None,
        },
        template,
        kind: EngineKind::Generator(Generator {
            executor: Box::new(
                CausalExecutor::new(model, cache)
                    .sampling_on_device(settings.sample_on_device.unwrap_or(!meta.device.is_cpu())),
            ),
            eos_token_ids,
            scheduler: SchedulerConfig {
                block_size,
                num_blocks,
                max_num_seqs: settings.max_num_seqs.max(1),
                // ENABLE_CHUNKED_PREFILL=0: a step's budget holds a whole prompt.
                max_num_batched_tokens: if settings.enable_chunked_prefill {
                    settings.max_num_batched_tokens.max(1)
                } else {
                    settings.max_num_batched_tokens.max(max_model_len)
                },
                enable_prefix_caching: settings.enable_prefix_caching,
                max_loras: settings.lora.as_ref().map_or(1, |l| l.max_loras.max(1)),
            },
            speculation: speculation(settings, num_blocks, block_size, spec.vocab_size)?,
            adapters,
            fast_forward: settings.fast_forward,
        }),
    })
}

/// The engine's speculation from `SPECULATIVE_CONFIG`; a draft model loads on the target's device,
/// its KV cache in the target's block layout (`num_blocks` of `block_size`).
fn speculation(
    settings: &EngineSettings,
    num_blocks: usize,
    block_size: usize,
    vocab_size: usize,
) -> anyhow::Result<Option<Speculation>> {
    let Some(config) = &settings.speculative else {
        return Ok(None);
    };
    let proposer = match &config.method {
        SpeculativeMethod::Ngram {
            prompt_lookup_min,
            prompt_lookup_max,
        } => Proposer::Ngram(NgramProposer {
            min: *prompt_lookup_min,
            max: *prompt_lookup_max,
        }),
        SpeculativeMethod::Draft {
            model,
            quantization,
        } => {
            let mut draft = EngineSettings::for_model(model);
            draft.device = settings.device;
            draft.dtype = settings.dtype;
            draft.threads = settings.threads;
            if let Some(q) = quantization {
                draft.quantization = crate::engine::settings::Quantization::InSitu(q.clone());
            }
            let LoadedModel { model: m, .. } =
                load_causal(&draft).with_context(|| format!("loading the draft model {model}"))?;
            let spec = m.spec().clone();
            if spec.vocab_size < vocab_size.min(spec.vocab_size) {
                anyhow::bail!("the draft model's vocabulary does not cover the target's");
            }
            let kv_dtype = settings.kv_cache_dtype;
            let cache = KvCache::with_dtype(&spec, num_blocks, block_size, kv_dtype)?;
            tracing::info!(
                draft = %model,
                kv_cache_mib = (num_blocks * KvCache::bytes_per_block(&spec, block_size, kv_dtype))
                    as f64
                    / (1 << 20) as f64,
                "draft model loaded for speculative decoding"
            );
            Proposer::Draft(Box::new(CausalExecutor::new(m, cache)))
        }
    };
    Ok(Some(Speculation {
        proposer,
        num_tokens: config.num_speculative_tokens,
        disable_by_batch_size: config.disable_by_batch_size,
    }))
}

/// The tokenizer and chat template: from `TOKENIZER_NAME`'s folder when set, else the model folder's;
/// a GGUF file without a `tokenizer.json` beside it brings its own in its metadata.
fn tokenizer_and_template(
    settings: &EngineSettings,
    gguf: Option<&GgufFile>,
) -> anyhow::Result<(Tokenizer, Option<ChatTemplate>)> {
    let custom = settings.custom_chat_template.as_deref();
    let dir = match (&settings.tokenizer_path, gguf) {
        (Some(dir), _) => dir.clone(),
        (None, Some(g)) => {
            let beside = g.path().parent().map(Path::to_path_buf).unwrap_or_default();
            if !beside.join("tokenizer.json").is_file() {
                return gguf_tokenizer(g, custom);
            }
            beside
        }
        (None, None) => settings.model_path.clone(),
    };
    let tokenizer = Tokenizer::from_dir(&dir)
        .with_context(|| format!("loading the tokenizer from {}", dir.display()))?;
    let mut template = ChatTemplate::from_model_dir(&dir, custom)
        .map_err(|e| anyhow::anyhow!("chat template: {e}"))?;
    if let (None, Some(g)) = (&template, gguf) {
        template = ChatTemplate::from_tokenizer_config(&g.tokenizer_config(), None, None)
            .map_err(|e| anyhow::anyhow!("chat template: {e}"))?;
    }
    Ok((tokenizer, template))
}

/// The tokenizer and template a GGUF file's metadata describes.
fn gguf_tokenizer(
    g: &GgufFile,
    custom: Option<&str>,
) -> anyhow::Result<(Tokenizer, Option<ChatTemplate>)> {
    let (json, config) = g.tokenizer_files()?;
    let inner = tokenizers::Tokenizer::from_str(&json.to_string()).map_err(|e| {
        anyhow::anyhow!(
            "{}: cannot build a tokenizer from the GGUF metadata: {e}",
            g.path().display()
        )
    })?;
    let template = ChatTemplate::from_tokenizer_config(&config, None, custom)
        .map_err(|e| anyhow::anyhow!("chat template: {e}"))?;
    Ok((Tokenizer::new(inner, config), template))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_budget_wins_and_default_is_capped() {
        let mut s = EngineSettings::for_model("/x");
        s.kv_cache_memory = Some(10_000);
        assert_eq!(num_kv_blocks(&s, 1000, 2048, Some(1 << 40), None), 10);
        s.kv_cache_memory = None;
        // 256 seqs x 128 blocks x 1 MiB is far above the cap.
        assert_eq!(num_kv_blocks(&s, 1 << 20, 2048, None, None), 1024);
        // ... and a host with 512 MiB left gets half of it.
        assert_eq!(num_kv_blocks(&s, 1 << 20, 2048, None, Some(512 << 20)), 256);
        s.max_num_seqs = 2;
        assert_eq!(num_kv_blocks(&s, 1 << 20, 2048, None, None), 256);
        // On a GPU the budget is what device_memory left of GPU_MEMORY_UTILIZATION.
        assert_eq!(num_kv_blocks(&s, 1000, 2048, Some(500_000), None), 500);
    }

    #[test]
    fn a_budget_past_the_memory_left_or_short_of_one_sequence_is_a_start_up_error() {
        let mut s = EngineSettings::for_model("/x");
        s.kv_cache_memory = Some(100 << 30);
        let blocks = num_kv_blocks(&s, 1 << 20, 512, None, Some(8 << 30));
        let err = check_kv_budget(&s, blocks, 1 << 20, 512, Some(8 << 30))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("KV_CACHE_MEMORY=100.0 GiB") && err.contains("8.0 GiB"),
            "{err}"
        );
        // Unknown host memory: no check.
        assert_eq!(
            check_kv_budget(&s, blocks, 1 << 20, 512, None).unwrap(),
            512
        );

        // One block of 16 tokens cannot hold a 512-token context: an error, as in vLLM...
        s.kv_cache_memory = Some(1);
        let blocks = num_kv_blocks(&s, 1 << 10, 512, None, None);
        assert_eq!(blocks, 1);
        let err = check_kv_budget(&s, blocks, 1 << 10, 512, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("KV_CACHE_MEMORY") && err.contains("at most 16"),
            "{err}"
        );
        // ... and so with an explicit MAX_MODEL_LENGTH; only the defaults lower the context.
        s.kv_cache_memory = None;
        s.max_model_len = Some(512);
        assert!(check_kv_budget(&s, 1, 1 << 10, 512, None).is_err());
        s.max_model_len = None;
        assert_eq!(check_kv_budget(&s, 1, 1 << 10, 512, None).unwrap(), 16);
    }

    #[test]
    fn host_memory_is_the_smaller_of_meminfo_and_the_cgroup() {
        let meminfo = "MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    2048 kB\n";
        assert_eq!(mem_available(meminfo), Some(2 << 20));
        assert_eq!(cgroup_left(Some("max\n"), Some("5")), None);
        assert_eq!(cgroup_left(Some("1000\n"), Some("400\n")), Some(600));
        assert_eq!(cgroup_left(Some("9223372036854771712"), None), None);
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(human_bytes(1), "1 B");
    }
}
