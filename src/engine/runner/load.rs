//! From settings to `EngineParts`: the model, its tokenizer and facts, and the KV budget in blocks.

use std::path::Path;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::engine::batch::ForwardBatch;
use crate::engine::gguf::GgufFile;
use crate::engine::kv_cache::KvCache;
use crate::engine::loader::{load_causal, LoadedModel};
use crate::engine::models::CausalLM;
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

/// How many KV blocks the budget buys. `budget`: `KV_CACHE_MEMORY`, else on GPU the share
/// `gpu_memory_utilization` of the free memory (`gpu_free`), else the CPU default. Never fewer than
/// one full-length sequence needs, so every admissible request can run.
pub(crate) fn num_kv_blocks(
    settings: &EngineSettings,
    bytes_per_block: u64,
    max_model_len: usize,
    gpu_free: Option<u64>,
) -> usize {
    let bs = settings.block_size.max(1);
    let per_seq = max_model_len.div_ceil(bs) as u64;
    let budget = match (settings.kv_cache_memory, gpu_free) {
        (Some(b), _) => b,
        (None, Some(free)) => (free as f64 * settings.gpu_memory_utilization as f64) as u64,
        (None, None) => {
            let wanted = per_seq * settings.max_num_seqs as u64 * bytes_per_block;
            wanted.min(DEFAULT_CPU_KV_BYTES)
        }
    };
    ((budget / bytes_per_block.max(1)) as usize).max(1)
}

/// The model and its paged cache: the executor the engine thread drives.
pub(crate) struct CausalExecutor {
    model: Box<dyn CausalLM>,
    cache: KvCache,
}

impl CausalExecutor {
    pub fn new(model: Box<dyn CausalLM>, cache: KvCache) -> Self {
        Self { model, cache }
    }
}

impl Executor for CausalExecutor {
    fn execute(&mut self, copies: &[(u32, u32)], batch: &ForwardBatch) -> anyhow::Result<Vec<f32>> {
        for &(src, dst) in copies {
            self.cache.copy_block(src, dst)?;
        }
        let logits = self.model.forward(batch, &mut self.cache)?;
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// Loads tokenizer, model, chat template and a KV cache sized by the budget.
pub fn load(settings: &EngineSettings) -> anyhow::Result<EngineParts> {
    if let Some(parts) = crate::engine::embedding::embedding_parts(settings)? {
        return Ok(parts);
    }
    let LoadedModel { model, meta, gguf } = load_causal(settings)?;
    let (tokenizer, template) = tokenizer_and_template(settings, gguf.as_deref())?;
    let spec = model.spec().clone();
    let block_size = settings.block_size.max(1);
    let bytes_per_block = KvCache::bytes_per_block(&spec, block_size) as u64;
    // TODO(cuda): pass the device's free memory so GPU_MEMORY_UTILIZATION applies.
    let num_blocks = num_kv_blocks(settings, bytes_per_block, meta.max_model_len, None);
    let capacity = num_blocks * block_size;
    let mut max_model_len = meta.max_model_len;
    if capacity < max_model_len {
        tracing::warn!(
            capacity,
            max_model_len,
            "the KV cache holds fewer tokens than the context length; lowering the context length to fit"
        );
        max_model_len = capacity;
    }
    let cache = KvCache::new(&spec, num_blocks, block_size)?;
    tracing::info!(
        num_blocks,
        block_size,
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
            executor: Box::new(CausalExecutor::new(model, cache)),
            eos_token_ids,
            scheduler: SchedulerConfig {
                block_size,
                num_blocks,
                max_num_seqs: settings.max_num_seqs.max(1),
                max_num_batched_tokens: settings.max_num_batched_tokens.max(1),
                enable_prefix_caching: settings.enable_prefix_caching,
            },
            speculation: speculation(settings, num_blocks, block_size, spec.vocab_size)?,
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
            let cache = KvCache::new(&spec, num_blocks, block_size)?;
            tracing::info!(
                draft = %model,
                kv_cache_mib = (num_blocks * KvCache::bytes_per_block(&spec, block_size)) as f64
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
        assert_eq!(num_kv_blocks(&s, 1000, 2048, Some(1 << 40)), 10);
        s.kv_cache_memory = None;
        // 256 seqs x 128 blocks x 1 MiB is far above the cap.
        assert_eq!(num_kv_blocks(&s, 1 << 20, 2048, None), 1024);
        s.max_num_seqs = 2;
        assert_eq!(num_kv_blocks(&s, 1 << 20, 2048, None), 256);
        s.gpu_memory_utilization = 0.5;
        assert_eq!(num_kv_blocks(&s, 1000, 2048, Some(1_000_000)), 500);
    }
}
