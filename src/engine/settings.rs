//! Everything the engine needs to start, already parsed and validated (see `crate::config`, which
//! builds this from the environment). Nothing in the engine reads the environment.

use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeChoice {
    /// float32 on CPU, the checkpoint's dtype on GPU.
    #[default]
    Auto,
    F32,
    BF16,
    F16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// `QUANTIZATION`: what the weights are or should become.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Quantization {
    #[default]
    None,
    /// A llama.cpp GGUF file (`GGUF_FILE` picks one in a folder with several).
    Gguf,
    /// In-situ quantization at load: `q8_0`, `q4_0`, `q4k`, `q6k`, ...
    InSitu(String),
    /// Checkpoints quantized by AWQ / GPTQ / FP8 (`quantization_config` in config.json); `Fp8` on a
    /// float checkpoint quantizes it to 8 bits at load (q8_0), as vLLM's dynamic FP8 does.
    Awq,
    Gptq,
    Fp8,
}

/// `KV_CACHE_DTYPE`: how keys and values are stored in the paged cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    /// The model's dtype.
    #[default]
    Auto,
    /// 8-bit integers, one float32 scale per 32 values of a token's kv head (`int8`).
    Int8,
    /// fp8 e4m3 codes, one float32 scale per 32 values of a token's kv head (`fp8`, `fp8_e4m3`).
    Fp8E4m3,
    /// fp8 e5m2 codes, one float32 scale per 32 values of a token's kv head (`fp8_e5m2`).
    Fp8E5m2,
}

impl KvCacheDtype {
    /// The setting's value for this kind.
    pub fn name(self) -> &'static str {
        match self {
            KvCacheDtype::Auto => "auto",
            KvCacheDtype::Int8 => "int8",
            KvCacheDtype::Fp8E4m3 => "fp8_e4m3",
            KvCacheDtype::Fp8E5m2 => "fp8_e5m2",
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// A local model folder or a `.gguf` file (hub ids are resolved to folders before this point).
    pub model_path: PathBuf,
    /// The name the model answers to (`OPENAI_SERVED_MODEL_NAME_OVERRIDE`, else `MODEL_NAME`).
    pub served_model_name: String,
    /// A separate tokenizer folder (`TOKENIZER_NAME`), else the model folder.
    pub tokenizer_path: Option<PathBuf>,
    pub gguf_file: Option<String>,
    pub dtype: DTypeChoice,
    pub device: DeviceChoice,
    pub quantization: Quantization,
    /// `MAX_MODEL_LENGTH`; `None` = the model's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    /// `VLLM_ALLOW_LONG_MAX_MODEL_LEN`: accept a `max_model_len` past the model's positions (vLLM's
    /// escape hatch; outputs past them may be wrong, and a model whose position table ends there
    /// fails those requests).
    pub allow_long_max_model_len: bool,
    /// KV cache budget in bytes (`KV_CACHE_MEMORY`); `None` = a default derived from the device.
    pub kv_cache_memory: Option<u64>,
    /// `KV_CACHE_DTYPE`: the KV cache's storage (8-bit kinds on CPU only).
    pub kv_cache_dtype: KvCacheDtype,
    /// On GPU: fraction of device memory the engine may use (`GPU_MEMORY_UTILIZATION`).
    pub gpu_memory_utilization: f32,
    /// Tokens per KV block.
    pub block_size: usize,
    /// `MAX_NUM_SEQS`: sequences per step.
    pub max_num_seqs: usize,
    /// `MAX_NUM_BATCHED_TOKENS`: tokens (prompt chunks + decodes) per step.
    pub max_num_batched_tokens: usize,
    pub enable_prefix_caching: bool,
    /// `CUSTOM_CHAT_TEMPLATE`: overrides the model's template.
    pub custom_chat_template: Option<String>,
    /// Compute threads on CPU; `None` = what the process may use (cgroup quota).
    pub threads: Option<usize>,
    /// `SPECULATIVE_CONFIG`: speculative decoding, if on.
    pub speculative: Option<super::speculative::SpeculativeConfig>,
    /// `ENABLE_LORA`: LoRA adapters, if on.
    pub lora: Option<LoraSettings>,
    /// `VLLM_ALLOW_RUNTIME_LORA_UPDATING`: adapters may be loaded and unloaded while serving.
    pub allow_runtime_lora_updating: bool,
    /// `ENABLE_CHUNKED_PREFILL`: false = a step's token budget covers a whole prompt
    /// (at least `max_model_len`), so prompts are not split across steps.
    pub enable_chunked_prefill: bool,
    /// `DISABLE_SLIDING_WINDOW`: cap the context at the model's sliding window (vLLM's meaning).
    pub disable_sliding_window: bool,
    /// `SEED`: seeds the engine's generator of per-request seeds (requests without a `seed`).
    pub seed: Option<u64>,
    /// `MAX_LOGPROBS`: most `logprobs` / `prompt_logprobs` per request.
    pub max_logprobs: usize,
    /// `SAMPLE_ON_DEVICE`: choose tokens where the logits are (greedy and plain-temperature rows,
    /// their logprobs) instead of copying whole rows back; `None` = on a GPU only.
    pub sample_on_device: Option<bool>,
    /// How the model writes tool calls and reasoning (`TOOL_CALL_PARSER`, `REASONING_PARSER`).
    pub output_syntax: OutputSyntax,
    /// `STRUCTURED_OUTPUT_FAST_FORWARD`: the tokens a grammar forces are verified in one forward
    /// pass instead of a step each.
    pub fast_forward: bool,
}

/// How the model writes tool calls and reasoning, as vLLM's parsers name it: the front doors
/// parse the output (and force tool calls) with these.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputSyntax {
    /// `TOOL_CALL_PARSER` (`hermes`, `llama3_json`, `mistral`, ...); `None` = detect.
    pub tool_call_parser: Option<String>,
    /// `REASONING_PARSER` (`deepseek_r1`, `qwen3`, ...); `None` = no reasoning split.
    pub reasoning_parser: Option<String>,
    /// `ENABLE_AUTO_TOOL_CHOICE`: `Some(false)` refuses `tool_choice: "auto"` (vLLM without
    /// `--enable-auto-tool-choice`); unset (`None`) or true, the model may call tools when it likes.
    pub enable_auto_tool_choice: Option<bool>,
}

impl EngineSettings {
    /// Settings for a local model folder with every other knob at its default.
    pub fn for_model(path: impl Into<PathBuf>) -> Self {
        let model_path = path.into();
        Self {
            served_model_name: model_path.display().to_string(),
            model_path,
            tokenizer_path: None,
            gguf_file: None,
            dtype: DTypeChoice::Auto,
            device: DeviceChoice::Auto,
            quantization: Quantization::None,
            max_model_len: None,
            allow_long_max_model_len: false,
            kv_cache_memory: None,
            kv_cache_dtype: KvCacheDtype::Auto,
            gpu_memory_utilization: 0.9,
            block_size: 16,
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            enable_prefix_caching: true,
            custom_chat_template: None,
            threads: None,
            speculative: None,
            lora: None,
            allow_runtime_lora_updating: false,
            enable_chunked_prefill: true,
            disable_sliding_window: false,
            seed: None,
            max_logprobs: super::validate::MAX_LOGPROBS,
            sample_on_device: None,
            output_syntax: OutputSyntax::default(),
            fast_forward: true,
        }
    }
}

/// LoRA serving (`ENABLE_LORA`, vLLM's meanings).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    /// `MAX_LORAS`: adapters the running sequences may use at once.
    pub max_loras: usize,
    /// `MAX_LORA_RANK`: the largest rank an adapter may have.
    pub max_lora_rank: usize,
    /// `LORA_MODULES`, each resolved to a local folder, loaded at start.
    pub modules: Vec<super::lora::AdapterSpec>,
}
