//! What a loaded engine is made of, before `Engine::launch` starts it: the tokenizer, the facts front
//! doors read (`ModelInfo`), the chat template and one kind of work: a generator (an `Executor` the
//! engine thread drives through the scheduler) or an embedder. The loaders (`runner::load`,
//! `embedding`) build these; the runner consumes them; neither imports the other. A leaf of the
//! engine's assembly: it names the types it holds and imports no loader, model or runner.

use std::path::Path;
use std::sync::Arc;

use super::batch::ForwardBatch;
use super::error::EngineError;
use super::lora::AdapterInfo;
use super::sampling::device::RowPlan;
use super::sampling::Sampled;
use super::scheduler::SchedulerConfig;
use super::speculative::NgramProposer;
use super::template::ChatTemplate;
use super::tokenizer::Tokenizer;
use super::types::{EmbedOutput, EmbedRequest};

/// Facts about the served model that front doors need.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The name the model answers to.
    pub served_model_name: String,
    pub architecture: String,
    pub max_model_len: usize,
    pub vocab_size: usize,
    /// Whether generation is possible (false for encoder-only embedding models).
    pub can_generate: bool,
    /// Whether `/v1/embeddings` is possible.
    pub can_embed: bool,
    /// Unix seconds at load (OpenAI's `created` for `/v1/models`).
    pub created: u64,
    /// Whether prompts reuse cached blocks (`ENABLE_PREFIX_CACHING`); set when the engine launches.
    pub prefix_caching: bool,
    /// Embedding models trained for shorter vectors (vLLM's `is_matryoshka`): `None` = not (the
    /// `dimensions` parameter is refused), else the allowed sizes (empty = any).
    pub matryoshka: Option<Vec<usize>>,
}

/// Runs one planned step on the model: copies blocks (copy-on-write), then the forward pass. Returns
/// float32 logits, `rows × vocab` flattened, the rows each sequence asked for, in batch order.
pub(crate) trait Executor: Send {
    fn execute(&mut self, copies: &[(u32, u32)], batch: &ForwardBatch) -> anyhow::Result<Vec<f32>>;

    /// Whether [`Executor::execute_sampling`] chooses tokens where the logits are (`SAMPLE_ON_DEVICE`).
    fn samples_on_device(&self) -> bool {
        false
    }

    /// `execute`, with the logits rows listed in `on_device` (row index, plan; ascending rows) chosen
    /// on the model's device instead of copied back: the other rows' logits (flattened, in order) and
    /// the tokens chosen, in `on_device`'s order. Called only when `samples_on_device`.
    fn execute_sampling(
        &mut self,
        copies: &[(u32, u32)],
        batch: &ForwardBatch,
        on_device: &[(usize, RowPlan)],
    ) -> anyhow::Result<(Vec<f32>, Vec<Sampled>)> {
        let _ = (copies, batch, on_device);
        anyhow::bail!("this executor does not sample on its device")
    }
    /// Loads the LoRA adapter in `dir` as `id` (its rank at most `max_rank`); returns its rank.
    fn load_adapter(&mut self, _id: u32, _dir: &Path, _max_rank: usize) -> anyhow::Result<usize> {
        anyhow::bail!("this engine does not serve LoRA adapters")
    }

    /// Forgets LoRA adapter `id`.
    fn unload_adapter(&mut self, _id: u32) {}
}

/// Embeddings (`Engine::embed` calls it off the async runtime).
pub trait Embedder: Send + Sync {
    fn embed(&self, request: &EmbedRequest) -> Result<EmbedOutput, EngineError>;
}

/// Everything an engine is made of, once loaded.
pub(crate) struct EngineParts {
    pub tokenizer: Tokenizer,
    /// `can_generate` and `can_embed` follow from `kind` when the engine launches.
    pub info: ModelInfo,
    pub template: Option<ChatTemplate>,
    pub kind: EngineKind,
}

/// The one kind of work a loaded model does.
pub(crate) enum EngineKind {
    /// Text generation: the engine thread schedules requests onto the executor.
    Generator(Generator),
    /// Embeddings only; generation is answered with `EngineError::Unsupported`.
    Embedder(Arc<dyn Embedder>),
}

/// A generating model and how the engine thread schedules it.
pub(crate) struct Generator {
    pub executor: Box<dyn Executor>,
    /// EOS ids of the tokenizer and `generation_config.json`.
    pub eos_token_ids: Vec<u32>,
    pub scheduler: SchedulerConfig,
    /// Speculative decoding (`SPECULATIVE_CONFIG`), if on.
    pub speculation: Option<Speculation>,
    /// The LoRA adapters loaded into the executor's model (`LORA_MODULES`).
    pub adapters: Vec<AdapterInfo>,
    /// Structured output's fast-forward (`EngineSettings::fast_forward`).
    pub fast_forward: bool,
}

/// How the engine guesses tokens ahead (speculative decoding).
pub(crate) struct Speculation {
    pub proposer: Proposer,
    /// Tokens proposed per step.
    pub num_tokens: usize,
    /// No speculation in a step with more decoding sequences than this.
    pub disable_by_batch_size: usize,
}

/// Where guesses come from.
pub(crate) enum Proposer {
    /// Prompt lookup.
    Ngram(NgramProposer),
    /// A draft model: its executor, over a KV cache in the target's block layout (the scheduler's
    /// `block_size`). The engine thread runs it after scheduling (the scheduler reserves room for its
    /// guesses first).
    Draft(Box<dyn Executor>),
}
