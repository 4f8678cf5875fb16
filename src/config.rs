//! Environment → typed, validated settings, all at start-up.
//!
//! Every variable is declared once, in [`SETTINGS`] (name, default, doc line) next to the parser that
//! reads it ([`Config::from_vars`]); the README's tables are checked against that list. A malformed
//! value stops the worker with a message naming the variable, the value and what was expected.
//! `main` reads the environment once, before the async runtime starts; nothing else in the crate reads
//! it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::api::stream_batch::BatchPolicy;
use crate::engine::lora::AdapterSpec;
use crate::engine::settings::LoraSettings;
use crate::engine::settings::{
    DTypeChoice, DeviceChoice, EngineSettings, KvCacheDtype, OutputSyntax, Quantization,
};
use crate::engine::speculative::SpeculativeConfig;
use crate::hub::HubConfig;

/// The model `serve` uses when `MODEL_NAME` is not set.
pub const DEFAULT_SERVE_MODEL: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// worker-vllm / `vllm serve` settings accepted with no effect on this engine, each with the
/// reason; logged in one start-up line when set (as variables or in `CONFIG_FILE`).
pub const NO_EFFECT: &[(&str, &str)] = &[
    (
        "TRUST_REMOTE_CODE",
        "no Python model code runs here; the architectures are built in",
    ),
    (
        "ENFORCE_EAGER",
        "candle runs eagerly; there are no CUDA graphs to capture",
    ),
    ("MAX_SEQ_LEN_TO_CAPTURE", "there are no CUDA graphs"),
    ("DISTRIBUTED_EXECUTOR_BACKEND", "one process on one device"),
    ("DISABLE_CUSTOM_ALL_REDUCE", "no multi-GPU all-reduce"),
    (
        "SWAP_SPACE",
        "preempted sequences are recomputed, not swapped out",
    ),
    (
        "VLLM_CPU_FRACTION",
        "the KV cache's budget is KV_CACHE_MEMORY",
    ),
    (
        "WORKER_CUDA_VERSION",
        "a build argument of the CUDA image, not a run-time setting",
    ),
    (
        "SPECULATIVE_MODEL",
        "worker-vllm's older name: use SPECULATIVE_CONFIG",
    ),
    (
        "NUM_SPECULATIVE_TOKENS",
        "worker-vllm's older name: use SPECULATIVE_CONFIG",
    ),
    (
        "DATA_PARALLEL_SIZE",
        "one replica per worker: scale with workers",
    ),
    ("CPU_OFFLOAD_GB", "weights stay on the device they load on"),
    ("COMPILATION_CONFIG", "no torch.compile"),
    (
        "NUM_SCHEDULER_STEPS",
        "the scheduler plans one step at a time",
    ),
];

/// Other `vllm serve` options (the names as variables: upper case, underscores): accepted and
/// reported as having no effect, never silently dropped.
const VLLM_OPTIONS: &[&str] = &[
    "HF_CONFIG_PATH",
    "TASK",
    "RUNNER",
    "CONVERT",
    "ENABLE_PROMPT_EMBEDS",
    "ALLOWED_LOCAL_MEDIA_PATH",
    "CONFIG_FORMAT",
    "CODE_REVISION",
    "ROPE_SCALING",
    "ROPE_THETA",
    "HF_OVERRIDES",
    "CUDA_GRAPH_SIZES",
    "MAX_CUDAGRAPH_CAPTURE_SIZE",
    "DATA_PARALLEL_RANK",
    "DATA_PARALLEL_SIZE_LOCAL",
    "DATA_PARALLEL_ADDRESS",
    "DATA_PARALLEL_RPC_PORT",
    "DATA_PARALLEL_BACKEND",
    "ENABLE_EXPERT_PARALLEL",
    "ENABLE_EPLB",
    "RAY_WORKERS_USE_NSIGHT",
    "PREFIX_CACHING_HASH_ALGO",
    "DISABLE_CASCADE_ATTN",
    "NUM_GPU_BLOCKS_OVERRIDE",
    "MAX_NUM_PARTIAL_PREFILLS",
    "MAX_LONG_PARTIAL_PREFILLS",
    "LONG_PREFILL_TOKEN_THRESHOLD",
    "LOGPROBS_MODE",
    "LIMIT_MM_PER_PROMPT",
    "MM_PROCESSOR_KWARGS",
    "DISABLE_MM_PREPROCESSOR_CACHE",
    "ENABLE_LORA_BIAS",
    "FULLY_SHARDED_LORAS",
    "MAX_CPU_LORAS",
    "LORA_DTYPE",
    "LORA_EXTRA_VOCAB_SIZE",
    "LONG_LORA_SCALING_FACTORS",
    "MULTI_STEP_STREAM_OUTPUTS",
    "NUM_LOOKAHEAD_SLOTS",
    "MODEL_LOADER_EXTRA_CONFIG",
    "IGNORE_PATTERNS",
    "PREEMPTION_MODE",
    "SCHEDULER_DELAY_FACTOR",
    "DISABLE_CHUNKED_MM_INPUT",
    "GUIDED_DECODING_DISABLE_FALLBACK",
    "GUIDED_DECODING_DISABLE_ANY_WHITESPACE",
    "GUIDED_DECODING_DISABLE_ADDITIONAL_PROPERTIES",
    "LOGITS_PROCESSOR_PATTERN",
    "QLORA_ADAPTER_NAME_OR_PATH",
    "SHOW_HIDDEN_METRICS_FOR_VERSION",
    "OTLP_TRACES_ENDPOINT",
    "COLLECT_DETAILED_TRACES",
    "DISABLE_ASYNC_OUTPUT_PROC",
    "SCHEDULING_POLICY",
    "SCHEDULER_CLS",
    "OVERRIDE_NEURON_CONFIG",
    "OVERRIDE_POOLER_CONFIG",
    "WORKER_CLS",
    "WORKER_EXTENSION_CLS",
    "KV_TRANSFER_CONFIG",
    "KV_EVENTS_CONFIG",
    "GENERATION_CONFIG",
    "OVERRIDE_GENERATION_CONFIG",
    "ENABLE_SLEEP_MODE",
    "MODEL_IMPL",
    "CALCULATE_KV_SCALES",
    "ADDITIONAL_CONFIG",
    "ENABLE_REASONING",
    "USE_TQDM_ON_LOAD",
    "PT_LOAD_MAP_LOCATION",
    "STRUCTURED_OUTPUTS_CONFIG",
    "ASYNC_SCHEDULING",
    "KV_SHARING_FAST_PREFILL",
    "MM_ENCODER_TP_MODE",
    "ENABLE_DBO",
    "SPECULATIVE_DRAFT_TENSOR_PARALLEL_SIZE",
    // the OpenAI server's options
    "UVICORN_LOG_LEVEL",
    "DISABLE_UVICORN_ACCESS_LOG",
    "ALLOW_CREDENTIALS",
    "ALLOWED_ORIGINS",
    "ALLOWED_METHODS",
    "ALLOWED_HEADERS",
    "PROMPT_ADAPTERS",
    "CHAT_TEMPLATE_CONTENT_FORMAT",
    "SSL_KEYFILE",
    "SSL_CERTFILE",
    "SSL_CA_CERTS",
    "ENABLE_SSL_REFRESH",
    "SSL_CERT_REQS",
    "RETURN_TOKENS_AS_TOKEN_IDS",
    "DISABLE_FRONTEND_MULTIPROCESSING",
    "ENABLE_REQUEST_ID_HEADERS",
    "TOOL_PARSER_PLUGIN",
    "EXPAND_TOOLS_EVEN_IF_TOOL_CHOICE_NONE",
    "EXCLUDE_TOOLS_WHEN_TOOL_CHOICE_NONE",
    "LOG_CONFIG_FILE",
    "MAX_LOG_LEN",
    "DISABLE_FASTAPI_DOCS",
    "ENABLE_PROMPT_TOKENS_DETAILS",
    "ENABLE_SERVER_LOAD_TRACKING",
    "ENABLE_FORCE_INCLUDE_USAGE",
    "ENABLE_TOKENIZER_INFO_ENDPOINT",
    "API_SERVER_COUNT",
    "H11_MAX_INCOMPLETE_EVENT_SIZE",
    "H11_MAX_HEADER_COUNT",
    "LOG_ERROR_STACK",
    "TOKENS_ONLY",
];

/// `vllm serve` options whose upper-cased names are too common to claim from the environment
/// (they count only in `CONFIG_FILE`).
const FILE_ONLY_OPTIONS: &[&str] = &[
    "HOST",
    "ROOT_PATH",
    "MIDDLEWARE",
    "HEADLESS",
    "UDS",
    "CONFIG",
];

/// `vllm serve`'s names (in a config file) for this worker's variables, where they differ.
const VLLM_ALIASES: &[(&str, &str)] = &[
    ("MODEL", "MODEL_NAME"),
    ("REVISION", "MODEL_REVISION"),
    ("TOKENIZER", "TOKENIZER_NAME"),
    ("SERVED_MODEL_NAME", "OPENAI_SERVED_MODEL_NAME_OVERRIDE"),
    ("CHAT_TEMPLATE", "CUSTOM_CHAT_TEMPLATE"),
    ("RESPONSE_ROLE", "OPENAI_RESPONSE_ROLE"),
    ("KV_CACHE_MEMORY_BYTES", "KV_CACHE_MEMORY"),
];

/// Why a recognised vLLM option has no effect here.
fn no_effect_reason(name: &str) -> Option<&'static str> {
    NO_EFFECT
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, why)| *why)
        .or_else(|| {
            (VLLM_OPTIONS.contains(&name) || FILE_ONLY_OPTIONS.contains(&name))
                .then_some("a vLLM option with no counterpart in this engine")
        })
}

/// A secret read from the environment; `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A malformed variable: the message names it, its value and what is expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid environment variable {name}={value:?}: expected {expected}")]
pub struct ConfigError {
    pub name: String,
    pub value: String,
    pub expected: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// One environment variable: its name, its default as the README states it, and what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub name: &'static str,
    pub default: &'static str,
    pub doc: &'static str,
}

const fn setting(name: &'static str, default: &'static str, doc: &'static str) -> Setting {
    Setting { name, default, doc }
}

/// Every variable this worker reads (worker-vllm's ignored ones aside, see [`NO_EFFECT`]).
/// [`Config::from_vars`] parses each through [`Vars`], which refuses a name not declared here.
pub const SETTINGS: &[Setting] = &[
    // Config file
    setting(
        "CONFIG_FILE",
        "",
        "a YAML file of `vllm serve` options; environment variables win over it",
    ),
    setting("VLLM_CONFIG_FILE", "", "the same (worker-vllm's name)"),
    // Model
    setting(
        "MODEL_NAME",
        "",
        "hub repository id or local folder / `.gguf` file",
    ),
    setting("MODEL_REVISION", "main", "hub revision"),
    setting("BASE_PATH", "/runpod-volume", "root of the model cache"),
    setting(
        "HF_TOKEN",
        "",
        "token for private/gated repos (never logged)",
    ),
    setting("TOKENIZER_NAME", "", "a different tokenizer"),
    setting("TOKENIZER_REVISION", "", "the revision of `TOKENIZER_NAME`"),
    setting("CUSTOM_CHAT_TEMPLATE", "", "a Jinja chat template (text)"),
    setting("MAX_MODEL_LENGTH", "", "context length"),
    setting("MAX_MODEL_LEN", "", "context length (vLLM's spelling)"),
    setting(
        "VLLM_ALLOW_LONG_MAX_MODEL_LEN",
        "0",
        "1: accept a context length past the model's positions",
    ),
    setting(
        "QUANTIZATION",
        "none",
        "gguf, awq, gptq, fp8 (checked against config.json's quantization_config), or an in-situ kind (q8_0, q4_0, ...)",
    ),
    setting(
        "GGUF_FILE",
        "",
        "which `.gguf` file of a folder or hub repository to load",
    ),
    setting("DTYPE", "auto", "float32, bfloat16, float16"),
    setting(
        "LOAD_FORMAT",
        "auto",
        "auto, safetensors or gguf (the weights this engine loads); others refused",
    ),
    setting(
        "TOKENIZER_MODE",
        "auto",
        "auto, hf or slow (all load tokenizer.json); mistral refused",
    ),
    setting(
        "SKIP_TOKENIZER_INIT",
        "0",
        "1 is refused: the engine needs its tokenizer",
    ),
    setting(
        "DOWNLOAD_DIR",
        "",
        "the hub cache to download into and load from, instead of `$BASE_PATH/huggingface-cache/hub`",
    ),
    setting(
        "MAX_PARALLEL_LOADING_WORKERS",
        "4",
        "model files downloaded at once",
    ),
    setting(
        "DISABLE_SLIDING_WINDOW",
        "0",
        "1: cap the context length at the model's sliding window",
    ),
    setting("DEVICE", "auto", "cpu, cuda"),
    setting(
        "SAMPLE_ON_DEVICE",
        "auto",
        "choose greedy and plain-temperature tokens (and their logprobs) on the model's device; auto: on a GPU",
    ),
    // Hub
    setting(
        "HF_ENDPOINT",
        "https://huggingface.co",
        "the hub to download from",
    ),
    setting(
        "HF_HUB_OFFLINE",
        "0",
        "1: never download; use the cache only",
    ),
    setting("HF_HOME", "", "the fallback cache is `$HF_HOME/hub`"),
    setting(
        "XDG_CACHE_HOME",
        "",
        "else `$XDG_CACHE_HOME/huggingface/hub`",
    ),
    setting("HOME", "", "else `$HOME/.cache/huggingface/hub`"),
    // Engine
    setting(
        "KV_CACHE_MEMORY",
        "",
        "KV cache budget in bytes (4GiB, 512MiB, 2GB)",
    ),
    setting(
        "GPU_MEMORY_UTILIZATION",
        "0.9",
        "fraction of GPU memory the engine may use",
    ),
    setting("MAX_NUM_SEQS", "256", "sequences per scheduler step"),
    setting("MAX_NUM_BATCHED_TOKENS", "2048", "tokens per step"),
    setting(
        "ENABLE_CHUNKED_PREFILL",
        "1",
        "0: a prompt is never split across steps (a step's budget covers a whole prompt)",
    ),
    setting(
        "KV_CACHE_DTYPE",
        "auto",
        "auto (the model's dtype), int8, fp8 / fp8_e4m3 or fp8_e5m2 (8-bit keys and values, CPU only)",
    ),
    setting(
        "TENSOR_PARALLEL_SIZE",
        "1",
        "1 only: one device per worker",
    ),
    setting(
        "PIPELINE_PARALLEL_SIZE",
        "1",
        "1 only: one device per worker",
    ),
    setting(
        "SEED",
        "",
        "seeds the sampling of requests without a `seed` (reproducible runs)",
    ),
    setting(
        "GUIDED_DECODING_BACKEND",
        "auto",
        "structured output backend; every name (auto, guidance, xgrammar, outlines, lm-format-enforcer) means llguidance",
    ),
    setting(
        "STRUCTURED_OUTPUT_FAST_FORWARD",
        "true",
        "verify the tokens a structured-output grammar forces in one forward pass (false: one step per token)",
    ),
    setting(
        "TOOL_CALL_PARSER",
        "auto",
        "how tool calls are written: hermes, llama3_json, mistral, qwen3_coder, or auto (detect any)",
    ),
    setting(
        "ENABLE_AUTO_TOOL_CHOICE",
        "",
        "unset: tool calls are parsed whenever a request has tools; false: tool_choice auto is a 400, as vLLM without --enable-auto-tool-choice",
    ),
    setting(
        "REASONING_PARSER",
        "",
        "deepseek_r1 or qwen3: text between <think> and </think> goes to reasoning_content",
    ),
    setting(
        "MAX_LOGPROBS",
        "20",
        "most `logprobs` / `prompt_logprobs` a request may ask",
    ),
    setting(
        "ENABLE_PREFIX_CACHING",
        "1",
        "reuse KV blocks of shared prompt prefixes",
    ),
    setting("BLOCK_SIZE", "16", "tokens per KV block"),
    setting("NUM_THREADS", "", "compute threads on CPU"),
    setting(
        "SPECULATIVE_CONFIG",
        "",
        "speculative decoding (JSON: ngram prompt lookup or a draft model)",
    ),
    setting("ENABLE_LORA", "0", "serve LoRA adapters (`LORA_MODULES`)"),
    setting("MAX_LORAS", "1", "LoRA adapters the running requests may use at once"),
    setting("MAX_LORA_RANK", "16", "the largest LoRA rank an adapter may have"),
    setting(
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
        "0",
        "`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (with ENABLE_LORA)",
    ),
    setting(
        "LORA_MODULES",
        "",
        "LoRA adapters loaded at start: JSON list of `{\"name\", \"path\"}` or `name=path` pairs",
    ),
    // Serverless
    setting(
        "MAX_CONCURRENCY",
        "100",
        "jobs (or local requests) run at once",
    ),
    setting("DEFAULT_BATCH_SIZE", "50", "most tokens per streamed post"),
    setting(
        "DEFAULT_MIN_BATCH_SIZE",
        "1",
        "tokens in the first streamed post",
    ),
    setting(
        "DEFAULT_BATCH_SIZE_GROWTH_FACTOR",
        "3",
        "growth of streamed posts",
    ),
    setting(
        "GRACEFUL_SHUTDOWN_TIMEOUT",
        "30",
        "seconds SIGTERM waits for jobs in flight",
    ),
    setting("DISABLE_LOG_REQUESTS", "0", "1: do not log job inputs"),
    setting(
        "ENABLE_LOG_REQUESTS",
        "",
        "vLLM's newer switch: 1 logs job inputs, 0 does not (wins over DISABLE_LOG_REQUESTS)",
    ),
    setting("DISABLE_LOG_STATS", "0", "1: no periodic stats log line"),
    setting("LOG_FORMAT", "human", "human or json"),
    setting("API_KEY", "", "bearer token required by `serve`"),
    // `serve` limits
    setting(
        "MAX_REQUEST_BODY_BYTES",
        "16MiB",
        "largest request body `serve` reads (413 beyond)",
    ),
    setting(
        "MAX_REQUEST_OUTPUT_TOKENS",
        "1048576",
        "most output one request (or queue job) may pin: n × max_tokens × (1 + logprobs)",
    ),
    setting(
        "FINISHED_JOBS_MAX_BYTES",
        "256MiB",
        "total size of the finished `/run` records `serve` keeps",
    ),
    setting(
        "FINISHED_JOBS_MAX_AGE",
        "1800",
        "seconds `serve` keeps a finished `/run` record",
    ),
    setting(
        "HTTP_HEADER_READ_TIMEOUT",
        "30",
        "seconds `serve` waits for a request's headers",
    ),
    setting(
        "HTTP_BODY_READ_TIMEOUT",
        "60",
        "seconds `serve` waits for a request's body",
    ),
    // OpenAI
    setting(
        "RAW_OPENAI_OUTPUT",
        "1",
        "streamed OpenAI jobs post SSE text (1) or chunk lists (0)",
    ),
    setting(
        "OPENAI_SERVED_MODEL_NAME_OVERRIDE",
        "",
        "the name the model answers to",
    ),
    setting(
        "OPENAI_RESPONSE_ROLE",
        "assistant",
        "role of generated chat messages",
    ),
    setting(
        "RESPONSES_STORE_MAX_COUNT",
        "10000",
        "most stored `/v1/responses` responses kept (oldest forgotten first)",
    ),
    setting(
        "RESPONSES_STORE_MAX_BYTES",
        "64MiB",
        "total size of the stored `/v1/responses` responses",
    ),
    setting(
        "RESPONSES_STORE_MAX_AGE",
        "86400",
        "seconds a stored `/v1/responses` response is kept",
    ),
    // Platform
    setting("RUNPOD_WEBHOOK_GET_JOB", "", "job-take URL"),
    setting("RUNPOD_WEBHOOK_POST_OUTPUT", "", "job-done URL"),
    setting("RUNPOD_WEBHOOK_POST_STREAM", "", "job-stream URL"),
    setting("RUNPOD_WEBHOOK_PING", "", "heartbeat URL"),
    setting("RUNPOD_PING_INTERVAL", "10000", "heartbeat interval (ms)"),
    setting("RUNPOD_AI_API_KEY", "", "the queue's key (never logged)"),
    setting("RUNPOD_POD_ID", "", "this worker's id"),
    setting("RUNPOD_ENDPOINT_ID", "", "the endpoint's id"),
    setting("RUNPOD_POD_HOSTNAME", "", "this worker's host name"),
    setting(
        "PORT",
        "",
        "load-balancing endpoint: `serve`'s port (binds 0.0.0.0); set, it makes `serve` the default mode",
    ),
    setting(
        "PORT_HEALTH",
        "",
        "load-balancing endpoint: the port of `GET /ping` when it differs from `PORT`",
    ),
];

/// The variables, read through their declarations: an unset or blank variable takes its default.
struct Vars(Vec<(String, String)>);

impl Vars {
    /// The value, else the declared default; `None` when both are empty.
    fn text(&self, name: &str) -> Option<String> {
        let declared = SETTINGS
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{name} is not declared in config::SETTINGS"));
        // The environment follows the config file: the last non-blank value wins.
        self.0
            .iter()
            .rev()
            .find(|(k, v)| k == name && !v.trim().is_empty())
            .map(|(_, v)| v.clone())
            .or_else(|| (!declared.default.is_empty()).then(|| declared.default.to_string()))
    }

    /// The value parsed by `parse` (`Err` = what was expected); `None` when unset without default.
    fn parse<T>(
        &self,
        name: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match self.text(name) {
            None => Ok(None),
            Some(v) => parse(v.trim()).map(Some).map_err(|expected| ConfigError {
                name: name.into(),
                value: v.clone(),
                expected,
            }),
        }
    }

    /// A variable with a default: always a value.
    fn get<T>(
        &self,
        name: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        match self.parse(name, parse)? {
            Some(v) => Ok(v),
            None => panic!("{name} has no default in config::SETTINGS"),
        }
    }

    fn secret(&self, name: &str) -> Option<Secret> {
        self.text(name).map(Secret)
    }
}

/// Where the model comes from (the engine's knobs are in [`Config::engine`]).
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// `MODEL_NAME`: a local folder or file, or a hub repository id.
    pub name: Option<String>,
    pub revision: Option<String>,
    /// `BASE_PATH`: the hub cache root (`models--org--name/...`).
    pub base_path: PathBuf,
    pub hf_token: Option<Secret>,
    pub tokenizer_name: Option<String>,
    pub tokenizer_revision: Option<String>,
    pub gguf_file: Option<String>,
    /// `DOWNLOAD_DIR`: the hub cache to use instead of the one under `BASE_PATH`.
    pub download_dir: Option<PathBuf>,
}

/// The hub client's settings from the environment (`HF_ENDPOINT`, `HF_HUB_OFFLINE`, the cache).
#[derive(Debug, Clone)]
pub struct HubSettings {
    pub endpoint: String,
    pub offline: bool,
    /// Where downloads go when `BASE_PATH` is not writable.
    pub fallback_cache: PathBuf,
    /// `MAX_PARALLEL_LOADING_WORKERS`: files downloaded at once.
    pub loading_workers: usize,
}

/// The OpenAI front door's settings.
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// `RAW_OPENAI_OUTPUT`: streamed OpenAI jobs post SSE text (true) or chunk objects (false).
    pub raw_output: bool,
    pub served_model_name_override: Option<String>,
    /// `OPENAI_RESPONSE_ROLE`: the role of generated chat messages.
    pub response_role: String,
    /// `RESPONSES_STORE_MAX_COUNT`: most stored `/v1/responses` responses.
    pub responses_store_max_count: usize,
    /// `RESPONSES_STORE_MAX_BYTES`: most bytes of stored responses (their JSON).
    pub responses_store_max_bytes: usize,
    /// `RESPONSES_STORE_MAX_AGE`: how long a stored response is kept.
    pub responses_store_max_age: Duration,
}

/// The platform's variables (RunPod sets them on its workers).
#[derive(Debug, Clone)]
pub struct RunpodConfig {
    pub webhook_get_job: Option<String>,
    pub webhook_post_output: Option<String>,
    pub webhook_post_stream: Option<String>,
    pub webhook_ping: Option<String>,
    pub ping_interval: Duration,
    pub api_key: Option<Secret>,
    pub pod_id: Option<String>,
    pub endpoint_id: Option<String>,
    pub pod_hostname: Option<String>,
}

impl RunpodConfig {
    /// Whether the queue variables are there (a worker on the platform, or an emulator).
    pub fn has_queue(&self) -> bool {
        self.webhook_get_job.is_some()
    }
}

/// The local endpoint's bounds: what one request may make it read or hold, and how long finished
/// records are kept.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeLimits {
    /// `MAX_REQUEST_BODY_BYTES`: larger bodies get a 413 before they are read whole.
    pub max_body_bytes: usize,
    /// `MAX_REQUEST_OUTPUT_TOKENS`: `n × max_tokens × (1 + logprobs)` above this is a 400.
    pub max_output_tokens: u64,
    /// `FINISHED_JOBS_MAX_BYTES`: the finished `/run` records kept, in total (oldest go first).
    pub finished_max_bytes: usize,
    /// `FINISHED_JOBS_MAX_AGE`: a finished record older than this is forgotten.
    pub finished_max_age: Duration,
    /// `HTTP_HEADER_READ_TIMEOUT`: a connection that sends no complete request head in this time
    /// (idle keep-alive ones too) is closed.
    pub header_read_timeout: Duration,
    /// `HTTP_BODY_READ_TIMEOUT`: a request whose body is not read whole in this time gets a 408.
    pub body_read_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 << 20,
            max_output_tokens: 1 << 20,
            finished_max_bytes: 256 << 20,
            finished_max_age: Duration::from_secs(1800),
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub model: ModelConfig,
    /// The engine's knobs; [`Config::engine_settings`] adds the resolved paths and the served name.
    pub engine: EngineSettings,
    pub hub: HubSettings,
    pub openai: OpenAiConfig,
    pub runpod: RunpodConfig,
    /// `PORT`: a load-balancing endpoint's HTTP port.
    pub port: Option<u16>,
    /// `PORT_HEALTH`: where `GET /ping` answers when it is not `PORT`.
    pub port_health: Option<u16>,
    /// `DEFAULT_BATCH_SIZE`, `DEFAULT_MIN_BATCH_SIZE`, `DEFAULT_BATCH_SIZE_GROWTH_FACTOR`.
    pub stream_batch: BatchPolicy,
    /// `MAX_CONCURRENCY`: jobs (or local requests) run at once.
    pub max_concurrency: usize,
    pub disable_log_stats: bool,
    pub disable_log_requests: bool,
    /// `GRACEFUL_SHUTDOWN_TIMEOUT` (seconds): how long SIGTERM waits for jobs in flight.
    pub shutdown_timeout: Duration,
    /// `API_KEY`: the bearer token `serve` requires.
    pub api_key: Option<Secret>,
    /// What `serve` holds for one request or for finished ones.
    pub serve_limits: ServeLimits,
    pub log_format: LogFormat,
    /// vLLM options set (as variables or in the config file) that mean nothing here, with the reason.
    pub no_effect: Vec<(String, &'static str)>,
    /// `CONFIG_FILE` (or `VLLM_CONFIG_FILE`), when set.
    pub config_file: Option<PathBuf>,
    /// Keys of the config file that are neither a `vllm serve` option nor a variable of this worker.
    pub unknown_file_keys: Vec<String>,
}

impl Config {
    /// Reads the process environment: call once, in `main`, before any thread starts.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Parses a set of variables (the environment, or a test's list).
    pub fn from_vars<I, K, V>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let env: Vec<(String, String)> = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        // `CONFIG_FILE` (else `VLLM_CONFIG_FILE`): a second source, beneath the environment.
        let file_var = ["CONFIG_FILE", "VLLM_CONFIG_FILE"]
            .into_iter()
            .find_map(|name| {
                env.iter()
                    .rev()
                    .find(|(k, v)| k == name && !v.trim().is_empty())
                    .map(|(k, v)| (k.clone(), v.trim().to_string()))
            });
        let file = match &file_var {
            Some((name, path)) => ConfigFile::read(name, path)?,
            None => ConfigFile::default(),
        };
        let mut no_effect: Vec<(String, &'static str)> = Vec::new();
        for (name, value) in &env {
            let declared = SETTINGS.iter().any(|s| s.name == name);
            if declared || value.trim().is_empty() || FILE_ONLY_OPTIONS.contains(&name.as_str()) {
                continue;
            }
            if let Some(why) = no_effect_reason(name)
                && !no_effect.iter().any(|(n, _)| n == name)
            {
                no_effect.push((name.clone(), why));
            }
        }
        for (name, why) in file.no_effect {
            if !no_effect.iter().any(|(n, _)| *n == name) {
                no_effect.push((name, why));
            }
        }
        let mut all = file.values;
        all.extend(env);
        let v = Vars(all);
        for name in ["TENSOR_PARALLEL_SIZE", "PIPELINE_PARALLEL_SIZE"] {
            v.get(name, |s| match positive(s)? {
                1 => Ok(()),
                _ => Err("1: this worker runs on one device (multi-GPU is not implemented)".into()),
            })?;
        }
        v.get("LOAD_FORMAT", |s| match s.to_ascii_lowercase().as_str() {
            "auto" | "safetensors" | "gguf" => Ok(()),
            _ => Err("auto, safetensors or gguf: the weight formats this engine loads".into()),
        })?;
        v.get("TOKENIZER_MODE", |s| match s.to_ascii_lowercase().as_str() {
            "auto" | "hf" | "slow" | "fast" => Ok(()),
            _ => Err("auto, hf or slow: the tokenizer is always tokenizer.json (mistral_common is not supported)".into()),
        })?;
        v.get("SKIP_TOKENIZER_INIT", |s| match boolean(s)? {
            false => Ok(()),
            true => Err("0: the engine needs its tokenizer (chat templates, stop strings, detokenized streams)".into()),
        })?;
        let text = |name| v.text(name);
        let max_model_len = match v.parse("MAX_MODEL_LENGTH", positive)? {
            Some(n) => Some(n),
            None => v.parse("MAX_MODEL_LEN", positive)?,
        };
        let model = ModelConfig {
            name: text("MODEL_NAME"),
            revision: text("MODEL_REVISION"),
            base_path: PathBuf::from(v.get("BASE_PATH", |s| Ok(s.to_string()))?),
            hf_token: v.secret("HF_TOKEN"),
            tokenizer_name: text("TOKENIZER_NAME"),
            tokenizer_revision: text("TOKENIZER_REVISION"),
            gguf_file: text("GGUF_FILE"),
            download_dir: text("DOWNLOAD_DIR").map(PathBuf::from),
        };
        // Every structured-output backend name means llguidance: checked, nothing to choose.
        v.get("GUIDED_DECODING_BACKEND", guided_backend)?;
        let engine = EngineSettings {
            gguf_file: model.gguf_file.clone(),
            dtype: v.get("DTYPE", parse_dtype)?,
            device: v.get("DEVICE", parse_device)?,
            quantization: v.get("QUANTIZATION", parse_quantization)?,
            max_model_len,
            allow_long_max_model_len: v.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", boolean)?,
            kv_cache_memory: v.parse("KV_CACHE_MEMORY", |s| {
                parse_bytes(s)
                    .ok_or_else(|| "a size in bytes, e.g. 4294967296, 4GiB, 512MiB or 2GB".into())
            })?,
            kv_cache_dtype: v.get("KV_CACHE_DTYPE", parse_kv_cache_dtype)?,
            gpu_memory_utilization: v.get("GPU_MEMORY_UTILIZATION", fraction)?,
            max_num_seqs: v.get("MAX_NUM_SEQS", positive)?,
            max_num_batched_tokens: v.get("MAX_NUM_BATCHED_TOKENS", positive)?,
            enable_prefix_caching: v.get("ENABLE_PREFIX_CACHING", boolean)?,
            block_size: v.get("BLOCK_SIZE", positive)?,
            custom_chat_template: text("CUSTOM_CHAT_TEMPLATE"),
            threads: v.parse("NUM_THREADS", positive)?,
            speculative: v.parse("SPECULATIVE_CONFIG", SpeculativeConfig::parse)?,
            lora: lora_settings(&v)?,
            allow_runtime_lora_updating: v.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", boolean)?,
            enable_chunked_prefill: v.get("ENABLE_CHUNKED_PREFILL", boolean)?,
            disable_sliding_window: v.get("DISABLE_SLIDING_WINDOW", boolean)?,
            sample_on_device: v.get("SAMPLE_ON_DEVICE", |s| {
                match s.to_ascii_lowercase().as_str() {
                    "auto" => Ok(None),
                    other => boolean(other)
                        .map(Some)
                        .map_err(|_| "auto, or a boolean: 1, 0, true or false".to_string()),
                }
            })?,
            seed: v.parse("SEED", |s| {
                s.parse::<u64>()
                    .map_err(|_| "a non-negative integer".to_string())
            })?,
            max_logprobs: v.get("MAX_LOGPROBS", |s| {
                s.parse::<usize>()
                    .map_err(|_| "a non-negative integer".to_string())
            })?,
            fast_forward: v.get("STRUCTURED_OUTPUT_FAST_FORWARD", boolean)?,
            output_syntax: OutputSyntax {
                enable_auto_tool_choice: v.parse("ENABLE_AUTO_TOOL_CHOICE", boolean)?,
                tool_call_parser: v
                    .get("TOOL_CALL_PARSER", tool_call_parser)?
                    .filter(|p| p != "auto"),
                reasoning_parser: v.parse("REASONING_PARSER", reasoning_parser)?,
            },
            ..EngineSettings::for_model(PathBuf::new())
        };
        let hub = HubSettings {
            endpoint: v.get("HF_ENDPOINT", |s| Ok(s.to_string()))?,
            offline: v.get("HF_HUB_OFFLINE", boolean)?,
            fallback_cache: fallback_cache(text("HF_HOME"), text("XDG_CACHE_HOME"), text("HOME")),
            loading_workers: v.get("MAX_PARALLEL_LOADING_WORKERS", positive)?,
        };
        let stream_batch = BatchPolicy {
            max_batch_size: v.get("DEFAULT_BATCH_SIZE", positive)?,
            min_batch_size: v.get("DEFAULT_MIN_BATCH_SIZE", positive)?,
            growth_factor: v.get("DEFAULT_BATCH_SIZE_GROWTH_FACTOR", growth)?,
        };
        let openai = OpenAiConfig {
            raw_output: v.get("RAW_OPENAI_OUTPUT", boolean)?,
            served_model_name_override: text("OPENAI_SERVED_MODEL_NAME_OVERRIDE"),
            response_role: v.get("OPENAI_RESPONSE_ROLE", |s| Ok(s.to_string()))?,
            responses_store_max_count: v.get("RESPONSES_STORE_MAX_COUNT", positive)?,
            responses_store_max_bytes: v.get("RESPONSES_STORE_MAX_BYTES", size)?,
            responses_store_max_age: Duration::from_secs(
                v.get("RESPONSES_STORE_MAX_AGE", positive)? as u64,
            ),
        };
        let runpod = RunpodConfig {
            webhook_get_job: text("RUNPOD_WEBHOOK_GET_JOB"),
            webhook_post_output: text("RUNPOD_WEBHOOK_POST_OUTPUT"),
            webhook_post_stream: text("RUNPOD_WEBHOOK_POST_STREAM"),
            webhook_ping: text("RUNPOD_WEBHOOK_PING"),
            ping_interval: Duration::from_millis(v.get("RUNPOD_PING_INTERVAL", positive)? as u64),
            api_key: v.secret("RUNPOD_AI_API_KEY"),
            pod_id: text("RUNPOD_POD_ID"),
            endpoint_id: text("RUNPOD_ENDPOINT_ID"),
            pod_hostname: text("RUNPOD_POD_HOSTNAME"),
        };
        Ok(Self {
            model,
            engine,
            hub,
            openai,
            runpod,
            port: v.parse("PORT", port)?,
            port_health: v.parse("PORT_HEALTH", port)?,
            stream_batch,
            max_concurrency: v.get("MAX_CONCURRENCY", positive)?,
            disable_log_stats: v.get("DISABLE_LOG_STATS", boolean)?,
            disable_log_requests: match v.parse("ENABLE_LOG_REQUESTS", boolean)? {
                Some(enable) => !enable,
                None => v.get("DISABLE_LOG_REQUESTS", boolean)?,
            },
            shutdown_timeout: Duration::from_secs(
                v.get("GRACEFUL_SHUTDOWN_TIMEOUT", positive)? as u64
            ),
            api_key: v.secret("API_KEY"),
            serve_limits: ServeLimits {
                max_body_bytes: v.get("MAX_REQUEST_BODY_BYTES", size)?,
                max_output_tokens: v.get("MAX_REQUEST_OUTPUT_TOKENS", positive)? as u64,
                finished_max_bytes: v.get("FINISHED_JOBS_MAX_BYTES", size)?,
                finished_max_age: Duration::from_secs(
                    v.get("FINISHED_JOBS_MAX_AGE", positive)? as u64
                ),
                header_read_timeout: Duration::from_secs(
                    v.get("HTTP_HEADER_READ_TIMEOUT", positive)? as u64,
                ),
                body_read_timeout: Duration::from_secs(
                    v.get("HTTP_BODY_READ_TIMEOUT", positive)? as u64
                ),
            },
            log_format: v.get("LOG_FORMAT", parse_log_format)?,
            no_effect,
            config_file: file_var.map(|(_, path)| PathBuf::from(path)),
            unknown_file_keys: file.unknown,
        })
    }

    /// The name the model answers to: the override, else `MODEL_NAME` (else the given fallback).
    pub(crate) fn served_model_name(&self, fallback: &str) -> String {
        self.openai
            .served_model_name_override
            .clone()
            .or_else(|| self.model.name.clone())
            .unwrap_or_else(|| fallback.to_string())
    }

    /// The engine's settings for a model already resolved to a local path.
    pub fn engine_settings(
        &self,
        model_path: PathBuf,
        tokenizer_path: Option<PathBuf>,
    ) -> EngineSettings {
        let fallback = model_path.display().to_string();
        EngineSettings {
            served_model_name: self.served_model_name(&fallback),
            model_path,
            tokenizer_path,
            ..self.engine.clone()
        }
    }

    /// The hub client for `MODEL_NAME`'s downloads.
    pub fn hub_config(&self) -> HubConfig {
        HubConfig {
            endpoint: self.hub.endpoint.clone(),
            token: self.model.hf_token.as_ref().map(|t| t.expose().to_string()),
            offline: self.hub.offline,
            attempts: 6,
            backoff: Duration::from_millis(500),
            concurrency: self.hub.loading_workers,
            progress: true,
            fallback_cache: self.hub.fallback_cache.clone(),
        }
    }
}

/// A `vllm serve` YAML config file, turned into variables.
#[derive(Debug, Default)]
struct ConfigFile {
    /// (variable, value) for the settings this worker reads.
    values: Vec<(String, String)>,
    no_effect: Vec<(String, &'static str)>,
    unknown: Vec<String>,
}

impl ConfigFile {
    fn read(var: &str, path: &str) -> Result<Self, ConfigError> {
        let error = |expected: String| ConfigError {
            name: var.to_string(),
            value: path.to_string(),
            expected,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| error(format!("a readable YAML file ({e})")))?;
        Self::parse(&text)
            .map_err(|e| error(format!("a YAML mapping of `vllm serve` options: {e}")))
    }

    fn parse(text: &str) -> Result<Self, String> {
        let value: serde_norway::Value = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        let mapping = match value {
            serde_norway::Value::Null => return Ok(Self::default()),
            serde_norway::Value::Mapping(m) => m,
            _ => return Err("the file is not a mapping (`key: value` lines)".into()),
        };
        let mut file = Self::default();
        for (key, value) in mapping {
            let serde_norway::Value::String(key) = key else {
                return Err(format!("the key {key:?} is not a string"));
            };
            let name = key
                .trim()
                .trim_start_matches("--")
                .replace('-', "_")
                .to_ascii_uppercase();
            let name = VLLM_ALIASES
                .iter()
                .find(|(vllm, _)| *vllm == name)
                .map_or(name, |(_, ours)| ours.to_string());
            if SETTINGS.iter().any(|s| s.name == name) {
                if let Some(mut text) = yaml_text(&name, value)? {
                    // vLLM's `chat-template` is a file's path or the template itself.
                    if name == "CUSTOM_CHAT_TEMPLATE" && std::path::Path::new(text.trim()).is_file()
                    {
                        text = std::fs::read_to_string(text.trim())
                            .map_err(|e| format!("chat-template {}: {e}", text.trim()))?;
                    }
                    file.values.push((name, text));
                }
            } else if let Some(why) = no_effect_reason(&name) {
                file.no_effect.push((name, why));
            } else {
                file.unknown.push(key);
            }
        }
        Ok(file)
    }
}

/// A YAML value as the variable's text: scalars as written, a one-item list as its item, vLLM's
/// `served-model-name` list as its first name (the one the model answers to), mappings and lists
/// as JSON (`speculative-config`); `null` as unset.
fn yaml_text(name: &str, value: serde_norway::Value) -> Result<Option<String>, String> {
    use serde_norway::Value as Y;
    Ok(match value {
        Y::Null => None,
        Y::Bool(b) => Some(b.to_string()),
        Y::Number(n) => Some(n.to_string()),
        Y::String(s) => Some(s),
        Y::Sequence(items)
            if !items.is_empty()
                && (items.len() == 1 || name == "OPENAI_SERVED_MODEL_NAME_OVERRIDE")
                && !matches!(items[0], Y::Mapping(_) | Y::Sequence(_)) =>
        {
            yaml_text(name, items.into_iter().next().unwrap_or(Y::Null))?
        }
        other => Some(serde_json::to_string(&other).map_err(|e| format!("{name}: {e}"))?),
    })
}

/// Where downloads go when `BASE_PATH` is not writable: `$HF_HOME/hub`, else the user cache.
fn fallback_cache(hf_home: Option<String>, xdg: Option<String>, home: Option<String>) -> PathBuf {
    if let Some(home) = hf_home {
        return PathBuf::from(home).join("hub");
    }
    if let Some(xdg) = xdg {
        return PathBuf::from(xdg).join("huggingface").join("hub");
    }
    match home {
        Some(home) => PathBuf::from(home)
            .join(".cache")
            .join("huggingface")
            .join("hub"),
        None => std::env::temp_dir().join("huggingface").join("hub"),
    }
}

/// `ENABLE_LORA`, `MAX_LORAS`, `MAX_LORA_RANK` and `LORA_MODULES` (each path still a name for the
/// hub to resolve); `LORA_MODULES` without `ENABLE_LORA` is an error, as in vLLM.
fn lora_settings(v: &Vars) -> Result<Option<LoraSettings>, ConfigError> {
    let modules = v.parse("LORA_MODULES", parse_lora_modules)?;
    if !v.get("ENABLE_LORA", boolean)? {
        if let Some(m) = modules.filter(|m| !m.is_empty()) {
            return Err(ConfigError {
                name: "LORA_MODULES".into(),
                value: m
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                expected: "ENABLE_LORA=1 as well: LoRA adapters are served only with ENABLE_LORA, \
                           as in vLLM"
                    .into(),
            });
        }
        return Ok(None);
    }
    Ok(Some(LoraSettings {
        max_loras: v.get("MAX_LORAS", positive)?,
        max_lora_rank: v.get("MAX_LORA_RANK", positive)?,
        modules: modules.unwrap_or_default(),
    }))
}

/// `LORA_MODULES` as worker-vllm passes it (a JSON list of `{"name", "path", "base_model_name"?}`,
/// or one such object) or as `vllm serve --lora-modules` takes it (`name=path`, space separated).
fn parse_lora_modules(s: &str) -> Result<Vec<AdapterSpec>, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Module {
        name: String,
        path: String,
        #[serde(default)]
        #[allow(dead_code)]
        base_model_name: Option<String>,
    }
    let expected = "a JSON list of {\"name\": ..., \"path\": ..., \"base_model_name\"?: ...} or \
                    space-separated name=path pairs";
    let modules: Vec<(String, String)> = if s.starts_with('[') || s.starts_with('{') {
        let list: Vec<Module> = if s.starts_with('[') {
            serde_json::from_str(s).map_err(|e| format!("{expected} ({e})"))?
        } else {
            vec![serde_json::from_str(s).map_err(|e| format!("{expected} ({e})"))?]
        };
        list.into_iter().map(|m| (m.name, m.path)).collect()
    } else {
        s.split_whitespace()
            .map(|pair| match pair.split_once('=') {
                Some((n, p)) => Ok((n.to_string(), p.to_string())),
                None => Err(format!("{expected} (`{pair}` has no `=`)")),
            })
            .collect::<Result<_, _>>()?
    };
    let mut out: Vec<AdapterSpec> = Vec::new();
    for (name, path) in modules {
        let (name, path) = (name.trim().to_string(), path.trim().to_string());
        if name.is_empty() || path.is_empty() {
            return Err(format!("{expected} (an empty name or path)"));
        }
        if out.iter().any(|a| a.name == name) {
            return Err(format!("{expected} (the name `{name}` twice)"));
        }
        out.push(AdapterSpec {
            name,
            path: PathBuf::from(path),
        });
    }
    Ok(out)
}

/// `TOOL_CALL_PARSER`: vLLM's parser names this worker can read and force.
fn tool_call_parser(v: &str) -> Result<Option<String>, String> {
    const NAMES: &[&str] = &[
        "auto",
        "hermes",
        "qwen",
        "qwen2_5",
        "llama3_json",
        "llama4_json",
        "mistral",
        "qwen3_coder",
        "qwen3_xml",
    ];
    let name = v.trim().to_ascii_lowercase();
    if NAMES.contains(&name.as_str()) {
        Ok(Some(name))
    } else {
        Err(format!("one of {}", NAMES.join(", ")))
    }
}

/// `GUIDED_DECODING_BACKEND`: vLLM's backend names, all served by llguidance.
fn guided_backend(v: &str) -> Result<(), String> {
    const NAMES: &[&str] = &[
        "auto",
        "guidance",
        "llguidance",
        "xgrammar",
        "outlines",
        "lm-format-enforcer",
    ];
    let name = v.trim().to_ascii_lowercase();
    if NAMES.contains(&name.as_str()) {
        Ok(())
    } else {
        Err(format!("one of {}", NAMES.join(", ")))
    }
}

/// `REASONING_PARSER`: the parsers whose `<think>` blocks this worker splits out.
fn reasoning_parser(v: &str) -> Result<String, String> {
    const NAMES: &[&str] = &["deepseek_r1", "qwen3", "deepseek_v3", "granite", "glm45"];
    let name = v.trim().to_ascii_lowercase();
    if NAMES.contains(&name.as_str()) {
        Ok(name)
    } else {
        Err(format!("one of {}", NAMES.join(", ")))
    }
}

fn boolean(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err("a boolean: 1, 0, true or false".into()),
    }
}

fn positive(v: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("a positive integer".into()),
    }
}

fn size(v: &str) -> Result<usize, String> {
    parse_bytes(v)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| "a size in bytes, e.g. 16777216, 16MiB or 10MB".into())
}

fn port(v: &str) -> Result<u16, String> {
    match v.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("a TCP port, 1 to 65535".into()),
    }
}

fn fraction(v: &str) -> Result<f32, String> {
    match v.parse::<f32>() {
        Ok(x) if x > 0.0 && x <= 1.0 => Ok(x),
        _ => Err("a number in (0, 1], e.g. 0.9".into()),
    }
}

fn growth(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 1.0 => Ok(x),
        _ => Err("a number >= 1, e.g. 3".into()),
    }
}

fn parse_dtype(v: &str) -> Result<DTypeChoice, String> {
    match v.to_ascii_lowercase().as_str() {
        "auto" => Ok(DTypeChoice::Auto),
        "float32" | "f32" | "float" => Ok(DTypeChoice::F32),
        "bfloat16" | "bf16" => Ok(DTypeChoice::BF16),
        "float16" | "f16" | "half" => Ok(DTypeChoice::F16),
        _ => Err("one of auto, float32, bfloat16, float16".into()),
    }
}

fn parse_device(v: &str) -> Result<DeviceChoice, String> {
    match v.to_ascii_lowercase().as_str() {
        "auto" => Ok(DeviceChoice::Auto),
        "cpu" => Ok(DeviceChoice::Cpu),
        "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
        _ => Err("one of auto, cpu, cuda".into()),
    }
}

/// In-situ quantization kinds candle can apply to float weights at load.
const IN_SITU: &[&str] = &[
    "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2k", "q3k", "q4k", "q5k", "q6k", "q8k",
];

/// `KV_CACHE_DTYPE`: vLLM's names (`auto`, `fp8`, `fp8_e4m3`, `fp8_e5m2`) and `int8`.
fn parse_kv_cache_dtype(v: &str) -> Result<KvCacheDtype, String> {
    match v.to_ascii_lowercase().as_str() {
        "auto" => Ok(KvCacheDtype::Auto),
        "int8" => Ok(KvCacheDtype::Int8),
        "fp8" | "fp8_e4m3" => Ok(KvCacheDtype::Fp8E4m3),
        "fp8_e5m2" => Ok(KvCacheDtype::Fp8E5m2),
        _ => Err("auto (the model's dtype), int8, fp8, fp8_e4m3 or fp8_e5m2".into()),
    }
}

fn parse_quantization(v: &str) -> Result<Quantization, String> {
    let lower = v.to_ascii_lowercase();
    match lower.as_str() {
        "none" => Ok(Quantization::None),
        "gguf" => Ok(Quantization::Gguf),
        "awq" => Ok(Quantization::Awq),
        "gptq" => Ok(Quantization::Gptq),
        "fp8" => Ok(Quantization::Fp8),
        q if IN_SITU.contains(&q) => Ok(Quantization::InSitu(q.to_string())),
        _ => Err(format!(
            "one of none, gguf, awq, gptq, fp8, {}",
            IN_SITU.join(", ")
        )),
    }
}

/// `4294967296`, `4GiB`, `512MiB`, `2GB`, `1.5G` (bare K/M/G are binary units).
pub(crate) fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().ok()?;
    let multiplier: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = number * multiplier;
    (bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

fn parse_log_format(v: &str) -> Result<LogFormat, String> {
    match v.to_ascii_lowercase().as_str() {
        "human" | "text" | "pretty" => Ok(LogFormat::Human),
        "json" => Ok(LogFormat::Json),
        _ => Err("human or json".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn serve_limits_default_as_declared_and_parse_sizes() {
        assert_eq!(parse(&[]).unwrap().serve_limits, ServeLimits::default());
        let c = parse(&[
            ("MAX_REQUEST_BODY_BYTES", "1MiB"),
            ("FINISHED_JOBS_MAX_AGE", "5"),
        ])
        .unwrap();
        assert_eq!(c.serve_limits.max_body_bytes, 1 << 20);
        assert_eq!(c.serve_limits.finished_max_age, Duration::from_secs(5));
        let e = parse(&[("MAX_REQUEST_BODY_BYTES", "lots")]).unwrap_err();
        assert_eq!(e.name, "MAX_REQUEST_BODY_BYTES");
    }

    #[test]
    fn defaults_match_worker_vllm() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.max_concurrency, 100);
        assert_eq!(c.stream_batch, BatchPolicy::default());
        assert!(c.openai.raw_output);
        assert_eq!(c.openai.response_role, "assistant");
        assert_eq!(c.model.base_path, PathBuf::from("/runpod-volume"));
        assert_eq!(c.runpod.ping_interval, Duration::from_millis(10_000));
        assert!(!c.runpod.has_queue());
        assert_eq!(c.engine.quantization, Quantization::None);
        assert!(c.no_effect.is_empty());
    }

    #[test]
    fn typed_values() {
        let c = parse(&[
            ("MODEL_NAME", "org/model"),
            ("MAX_CONCURRENCY", "8"),
            ("DEFAULT_BATCH_SIZE", "20"),
            ("DEFAULT_MIN_BATCH_SIZE", "2"),
            ("DEFAULT_BATCH_SIZE_GROWTH_FACTOR", "2"),
            ("RAW_OPENAI_OUTPUT", "0"),
            ("KV_CACHE_MEMORY", "4GiB"),
            ("DTYPE", "bf16"),
            ("DEVICE", "cpu"),
            ("QUANTIZATION", "Q4K"),
            ("MAX_MODEL_LEN", "4096"),
            ("ENABLE_PREFIX_CACHING", "false"),
            ("LOG_FORMAT", "json"),
            ("RUNPOD_WEBHOOK_GET_JOB", "http://q/job-take/$ID?gpu=x"),
            ("RUNPOD_PING_INTERVAL", "500"),
        ])
        .unwrap();
        assert_eq!(c.model.name.as_deref(), Some("org/model"));
        assert_eq!(c.max_concurrency, 8);
        assert_eq!(
            c.stream_batch,
            BatchPolicy {
                max_batch_size: 20,
                min_batch_size: 2,
                growth_factor: 2.0
            }
        );
        assert!(!c.openai.raw_output);
        assert_eq!(c.engine.kv_cache_memory, Some(4 << 30));
        assert_eq!(c.engine.dtype, DTypeChoice::BF16);
        assert_eq!(c.engine.device, DeviceChoice::Cpu);
        assert_eq!(c.engine.quantization, Quantization::InSitu("q4k".into()));
        assert_eq!(c.engine.max_model_len, Some(4096));
        assert!(!c.engine.enable_prefix_caching);
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(c.runpod.has_queue());
        assert_eq!(c.runpod.ping_interval, Duration::from_millis(500));
    }

    #[test]
    fn malformed_values_name_variable_value_and_expectation() {
        let e = parse(&[("MAX_CONCURRENCY", "lots")]).unwrap_err();
        assert_eq!(e.name, "MAX_CONCURRENCY");
        assert_eq!(e.value, "lots");
        let text = e.to_string();
        assert!(text.contains("MAX_CONCURRENCY") && text.contains("lots"));
        assert!(text.contains("positive integer"), "{text}");

        for (name, value) in [
            ("RAW_OPENAI_OUTPUT", "maybe"),
            ("KV_CACHE_MEMORY", "4 parsecs"),
            ("DTYPE", "int3"),
            ("DEVICE", "tpu"),
            ("QUANTIZATION", "squeezellm"),
            ("GPU_MEMORY_UTILIZATION", "1.5"),
            ("DEFAULT_BATCH_SIZE_GROWTH_FACTOR", "0.5"),
            ("LOG_FORMAT", "xml"),
            ("MAX_MODEL_LENGTH", "-1"),
            ("DEFAULT_BATCH_SIZE", "0"),
        ] {
            let e = parse(&[(name, value)]).unwrap_err();
            assert_eq!((e.name.as_str(), e.value.as_str()), (name, value));
            assert!(!e.expected.is_empty());
        }
    }

    #[test]
    fn vllm_options_without_effect_are_listed_with_their_reason() {
        let c = parse(&[
            ("ENFORCE_EAGER", "true"),
            ("ROPE_THETA", "10000"),
            ("HOST", "x"),
            ("PATH", "/bin"),
        ])
        .unwrap();
        let names: Vec<&str> = c.no_effect.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["ENFORCE_EAGER", "ROPE_THETA"]);
        assert!(c.no_effect[0].1.contains("CUDA graphs"));
    }

    #[test]
    fn kv_cache_dtype_takes_vllms_names_and_int8() {
        assert_eq!(
            parse(&[]).unwrap().engine.kv_cache_dtype,
            KvCacheDtype::Auto
        );
        for (value, want) in [
            ("auto", KvCacheDtype::Auto),
            ("int8", KvCacheDtype::Int8),
            ("INT8", KvCacheDtype::Int8),
            ("fp8", KvCacheDtype::Fp8E4m3),
            ("fp8_e4m3", KvCacheDtype::Fp8E4m3),
            ("fp8_e5m2", KvCacheDtype::Fp8E5m2),
        ] {
            let c = parse(&[("KV_CACHE_DTYPE", value)]).unwrap();
            assert_eq!(c.engine.kv_cache_dtype, want, "{value}");
        }
        let e = parse(&[("KV_CACHE_DTYPE", "q4")]).unwrap_err();
        assert_eq!(e.name, "KV_CACHE_DTYPE");
        assert!(
            e.to_string().contains("int8, fp8, fp8_e4m3 or fp8_e5m2"),
            "{e}"
        );
    }

    #[test]
    fn vllm_settings_mean_something_or_are_refused() {
        for (name, value, why) in [
            ("TENSOR_PARALLEL_SIZE", "2", "one device"),
            ("PIPELINE_PARALLEL_SIZE", "4", "one device"),
            ("KV_CACHE_DTYPE", "fp16", "int8, fp8"),
            ("KV_CACHE_DTYPE", "fp8_e3m4", "fp8_e5m2"),
            ("LOAD_FORMAT", "pt", "safetensors"),
            ("TOKENIZER_MODE", "mistral", "mistral"),
            ("SKIP_TOKENIZER_INIT", "1", "tokenizer"),
            ("SEED", "-3", "integer"),
            ("MAX_LOGPROBS", "many", "integer"),
        ] {
            let e = parse(&[(name, value)]).unwrap_err();
            assert_eq!(e.name, name);
            assert!(e.to_string().contains(why), "{e}");
        }
        let c = parse(&[
            ("TENSOR_PARALLEL_SIZE", "1"),
            ("KV_CACHE_DTYPE", "auto"),
            ("LOAD_FORMAT", "safetensors"),
            ("TOKENIZER_MODE", "auto"),
            ("SEED", "42"),
            ("MAX_LOGPROBS", "5"),
            ("ENABLE_CHUNKED_PREFILL", "false"),
            ("DISABLE_SLIDING_WINDOW", "1"),
            ("SAMPLE_ON_DEVICE", "true"),
            ("DOWNLOAD_DIR", "/cache"),
            ("MAX_PARALLEL_LOADING_WORKERS", "2"),
            ("DISABLE_LOG_REQUESTS", "1"),
            ("ENABLE_LOG_REQUESTS", "1"),
        ])
        .unwrap();
        assert_eq!(c.engine.seed, Some(42));
        assert_eq!(c.engine.max_logprobs, 5);
        assert!(!c.engine.enable_chunked_prefill);
        assert!(c.engine.disable_sliding_window);
        assert_eq!(c.engine.sample_on_device, Some(true));
        assert_eq!(parse(&[]).unwrap().engine.sample_on_device, None);
        assert!(parse(&[("SAMPLE_ON_DEVICE", "gpu")]).is_err());
        assert_eq!(c.model.download_dir, Some(PathBuf::from("/cache")));
        assert_eq!(c.hub_config().concurrency, 2);
        assert!(!c.disable_log_requests, "ENABLE_LOG_REQUESTS wins");
        assert!(c.no_effect.is_empty());
    }

    #[test]
    fn tool_settings_parse_with_auto_tool_choice_unset_by_default() {
        let syntax = |vars: &[(&str, &str)]| parse(vars).unwrap().engine.output_syntax;
        assert_eq!(syntax(&[]).enable_auto_tool_choice, None);
        assert_eq!(syntax(&[]).tool_call_parser, None);
        let s = syntax(&[
            ("ENABLE_AUTO_TOOL_CHOICE", "false"),
            ("TOOL_CALL_PARSER", "qwen3_coder"),
        ]);
        assert_eq!(s.enable_auto_tool_choice, Some(false));
        assert_eq!(s.tool_call_parser.as_deref(), Some("qwen3_coder"));
        assert_eq!(
            syntax(&[("ENABLE_AUTO_TOOL_CHOICE", "1")]).enable_auto_tool_choice,
            Some(true)
        );
        assert!(parse(&[("ENABLE_AUTO_TOOL_CHOICE", "maybe")]).is_err());
        assert!(parse(&[("TOOL_CALL_PARSER", "pythonic")]).is_err());
        assert!(parse(&[]).unwrap().engine.fast_forward);
        let off = parse(&[("STRUCTURED_OUTPUT_FAST_FORWARD", "false")]).unwrap();
        assert!(!off.engine.fast_forward);
        // vLLM's YAML flag
        let c = with_file("enable-auto-tool-choice: true\n", &[]).unwrap();
        assert_eq!(c.engine.output_syntax.enable_auto_tool_choice, Some(true));
    }

    fn with_file(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, text).unwrap();
        let path = path.display().to_string();
        let mut all = vec![("VLLM_CONFIG_FILE", path.as_str())];
        all.extend_from_slice(vars);
        parse(&all)
    }

    #[test]
    fn the_config_file_takes_vllm_names_beneath_the_environment() {
        let c = with_file(
            "model: org/model\nmax-model-len: 2048\nmax_num_seqs: 8\nenable-prefix-caching: false\n\
             served-model-name: [served]\nspeculative-config: {method: ngram, num_speculative_tokens: 3}\n\
             enforce-eager: true\nno-such-option: 1\nseed: 7\n",
            &[("MAX_NUM_SEQS", "4"), ("MAX_MODEL_LEN", "")],
        )
        .unwrap();
        assert_eq!(c.model.name.as_deref(), Some("org/model"));
        assert_eq!(
            c.engine.max_model_len,
            Some(2048),
            "a blank variable does not hide the file"
        );
        assert_eq!(c.engine.max_num_seqs, 4, "the environment wins");
        assert!(!c.engine.enable_prefix_caching);
        assert_eq!(
            c.openai.served_model_name_override.as_deref(),
            Some("served")
        );
        assert!(c.engine.speculative.is_some());
        assert_eq!(c.engine.seed, Some(7));
        assert_eq!(c.unknown_file_keys, vec!["no-such-option"]);
        assert_eq!(c.no_effect.len(), 1);
        assert_eq!(c.no_effect[0].0, "ENFORCE_EAGER");
    }

    #[test]
    fn the_config_file_reads_a_chat_template_path_and_the_first_served_name() {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("t.jinja");
        std::fs::write(&template, "{{ messages }}").unwrap();
        let c = with_file(
            &format!(
                "chat-template: {}\nserved-model-name: [first, second]\n",
                template.display()
            ),
            &[],
        )
        .unwrap();
        assert_eq!(
            c.engine.custom_chat_template.as_deref(),
            Some("{{ messages }}")
        );
        assert_eq!(
            c.openai.served_model_name_override.as_deref(),
            Some("first")
        );
        let c = with_file("chat-template: \"{{ 'inline' }}\"\n", &[]).unwrap();
        assert_eq!(
            c.engine.custom_chat_template.as_deref(),
            Some("{{ 'inline' }}")
        );
    }

    #[test]
    fn a_malformed_or_missing_config_file_is_a_start_up_error() {
        for text in [
            "model: [unclosed",
            "- a list\n- of things\n",
            "max-model-len: lots\n",
        ] {
            let e = with_file(text, &[]).unwrap_err();
            assert!(
                e.name == "VLLM_CONFIG_FILE" || e.name == "MAX_MODEL_LEN",
                "{e}"
            );
        }
        let e = parse(&[("CONFIG_FILE", "/no/such/file.yaml")]).unwrap_err();
        assert_eq!(e.name, "CONFIG_FILE");
        assert!(e.to_string().contains("/no/such/file.yaml"), "{e}");
    }

    #[test]
    fn secrets_never_appear_in_debug_output() {
        let c = parse(&[
            ("HF_TOKEN", "hf_supersecret"),
            ("RUNPOD_AI_API_KEY", "rp_supersecret"),
            ("API_KEY", "local_supersecret"),
        ])
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("supersecret"), "{shown}");
        assert_eq!(
            c.model.hf_token.as_ref().unwrap().expose(),
            "hf_supersecret"
        );
    }

    #[test]
    fn every_declared_default_parses_and_names_are_unique() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.engine.max_num_seqs, 256);
        assert_eq!(c.hub.endpoint, "https://huggingface.co");
        assert!(!c.hub.offline);
        let mut names: Vec<&str> = SETTINGS.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), SETTINGS.len());
        assert!(SETTINGS.iter().all(|s| !s.doc.is_empty()));
        assert!(NO_EFFECT
            .iter()
            .map(|(n, _)| n)
            .chain(VLLM_OPTIONS)
            .all(|i| SETTINGS.iter().all(|s| s.name != *i)));
    }

    #[test]
    fn the_hub_and_thread_settings_come_from_the_variables() {
        let c = parse(&[
            ("HF_ENDPOINT", "http://mirror"),
            ("HF_HUB_OFFLINE", "1"),
            ("HF_HOME", "/hf"),
            ("NUM_THREADS", "3"),
            ("HF_TOKEN", "t"),
        ])
        .unwrap();
        let hub = c.hub_config();
        assert_eq!(hub.endpoint, "http://mirror");
        assert!(hub.offline);
        assert_eq!(hub.fallback_cache, PathBuf::from("/hf/hub"));
        assert_eq!(hub.token.as_deref(), Some("t"));
        assert_eq!(c.engine.threads, Some(3));
        let c = parse(&[("HOME", "/home/u")]).unwrap();
        assert_eq!(
            c.hub.fallback_cache,
            PathBuf::from("/home/u/.cache/huggingface/hub")
        );
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("1024"), Some(1024));
        assert_eq!(parse_bytes("2KB"), Some(2000));
        assert_eq!(parse_bytes("512MiB"), Some(512 << 20));
        assert_eq!(parse_bytes("1.5G"), Some(3 << 29));
        assert_eq!(parse_bytes("0"), None);
        assert_eq!(parse_bytes("GiB"), None);
        assert_eq!(parse_bytes("-1"), None);
    }

    #[test]
    fn lora_modules_parse_in_both_forms_and_need_enable_lora() {
        let c = parse(&[
            ("ENABLE_LORA", "1"),
            ("MAX_LORAS", "4"),
            ("MAX_LORA_RANK", "64"),
            (
                "LORA_MODULES",
                r#"[{"name": "sql", "path": "org/sql-lora", "base_model_name": "m"}, {"name": "b", "path": "/a/b"}]"#,
            ),
        ])
        .unwrap();
        let l = c.engine.lora.unwrap();
        assert_eq!((l.max_loras, l.max_lora_rank), (4, 64));
        let names: Vec<_> = l
            .modules
            .iter()
            .map(|a| (a.name.as_str(), a.path.to_str().unwrap()))
            .collect();
        assert_eq!(names, [("sql", "org/sql-lora"), ("b", "/a/b")]);
        let c = parse(&[("ENABLE_LORA", "true"), ("LORA_MODULES", "a=/x b=org/y")]).unwrap();
        let l = c.engine.lora.unwrap();
        assert_eq!((l.max_loras, l.max_lora_rank, l.modules.len()), (1, 16, 2));
        assert_eq!(l.modules[1].path, PathBuf::from("org/y"));
        assert!(parse(&[]).unwrap().engine.lora.is_none());
        let e = parse(&[("LORA_MODULES", "a=/x")]).unwrap_err().to_string();
        assert!(
            e.contains("LORA_MODULES") && e.contains("ENABLE_LORA=1"),
            "{e}"
        );
        for bad in [
            "a",
            "[{\"name\": \"a\"}]",
            "a=/x a=/y",
            "{\"name\": \"a\", \"path\": \"p\", \"x\": 1}",
        ] {
            let e = parse(&[("ENABLE_LORA", "1"), ("LORA_MODULES", bad)]);
            assert!(e.is_err(), "{bad}");
        }
        assert!(parse(&[("ENABLE_LORA", "1"), ("MAX_LORA_RANK", "0")]).is_err());
    }

    #[test]
    fn engine_settings_carry_the_knobs_and_served_name() {
        let c = parse(&[
            ("MODEL_NAME", "org/model"),
            ("OPENAI_SERVED_MODEL_NAME_OVERRIDE", "my-model"),
            ("MAX_NUM_SEQS", "4"),
            ("BLOCK_SIZE", "32"),
        ])
        .unwrap();
        let s = c.engine_settings(PathBuf::from("/models/x"), None);
        assert_eq!(s.served_model_name, "my-model");
        assert_eq!(s.max_num_seqs, 4);
        assert_eq!(s.block_size, 32);
        assert_eq!(s.model_path, PathBuf::from("/models/x"));
        let plain = parse(&[("MODEL_NAME", "org/model")]).unwrap();
        assert_eq!(
            plain
                .engine_settings(PathBuf::from("/m"), None)
                .served_model_name,
            "org/model"
        );
    }
}
