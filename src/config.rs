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
use crate::engine::settings::{DTypeChoice, DeviceChoice, EngineSettings, Quantization};
use crate::engine::speculative::SpeculativeConfig;
use crate::hub::HubConfig;

/// The model `serve` uses when `MODEL_NAME` is not set.
pub const DEFAULT_SERVE_MODEL: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// worker-vllm variables that mean nothing to this engine: accepted (so existing endpoint
/// configurations keep working) and logged as ignored.
pub const IGNORED_VARIABLES: &[&str] = &[
    "LOAD_FORMAT",
    "TRUST_REMOTE_CODE",
    "TENSOR_PARALLEL_SIZE",
    "PIPELINE_PARALLEL_SIZE",
    "VLLM_CPU_FRACTION",
    "MAX_PARALLEL_LOADING_WORKERS",
    "ENFORCE_EAGER",
    "KV_CACHE_DTYPE",
    "SWAP_SPACE",
    "DISTRIBUTED_EXECUTOR_BACKEND",
    "MAX_SEQ_LEN_TO_CAPTURE",
    "DISABLE_CUSTOM_ALL_REDUCE",
    "ENABLE_CHUNKED_PREFILL",
    "MAX_LOGPROBS",
    "TOKENIZER_MODE",
    "WORKER_CUDA_VERSION",
    "SEED",
    "ENABLE_LORA",
    "MAX_LORAS",
    "MAX_LORA_RANK",
    "LORA_MODULES",
    "SPECULATIVE_MODEL",
    "NUM_SPECULATIVE_TOKENS",
];

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

/// Every variable this worker reads (worker-vllm's ignored ones aside, see [`IGNORED_VARIABLES`]).
/// [`Config::from_vars`] parses each through [`Vars`], which refuses a name not declared here.
pub const SETTINGS: &[Setting] = &[
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
    setting("DEVICE", "auto", "cpu, cuda"),
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
    setting("DISABLE_LOG_STATS", "0", "1: no periodic stats log line"),
    setting("LOG_FORMAT", "human", "human or json"),
    setting("API_KEY", "", "bearer token required by `serve`"),
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
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.trim().is_empty())
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
}

/// The hub client's settings from the environment (`HF_ENDPOINT`, `HF_HUB_OFFLINE`, the cache).
#[derive(Debug, Clone)]
pub struct HubSettings {
    pub endpoint: String,
    pub offline: bool,
    /// Where downloads go when `BASE_PATH` is not writable.
    pub fallback_cache: PathBuf,
}

/// The OpenAI front door's settings.
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// `RAW_OPENAI_OUTPUT`: streamed OpenAI jobs post SSE text (true) or chunk objects (false).
    pub raw_output: bool,
    pub served_model_name_override: Option<String>,
    /// `OPENAI_RESPONSE_ROLE`: the role of generated chat messages.
    pub response_role: String,
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

#[derive(Debug, Clone)]
pub struct Config {
    pub model: ModelConfig,
    /// The engine's knobs; [`Config::engine_settings`] adds the resolved paths and the served name.
    pub engine: EngineSettings,
    pub hub: HubSettings,
    pub openai: OpenAiConfig,
    pub runpod: RunpodConfig,
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
    pub log_format: LogFormat,
    /// Variables of [`IGNORED_VARIABLES`] that are set.
    pub ignored: Vec<String>,
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
        let v = Vars(
            vars.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        let ignored = IGNORED_VARIABLES
            .iter()
            .filter(|name| v.0.iter().any(|(k, _)| k == *name))
            .map(|name| name.to_string())
            .collect();
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
        };
        let engine = EngineSettings {
            gguf_file: model.gguf_file.clone(),
            dtype: v.get("DTYPE", parse_dtype)?,
            device: v.get("DEVICE", parse_device)?,
            quantization: v.get("QUANTIZATION", parse_quantization)?,
            max_model_len,
            kv_cache_memory: v.parse("KV_CACHE_MEMORY", |s| {
                parse_bytes(s)
                    .ok_or_else(|| "a size in bytes, e.g. 4294967296, 4GiB, 512MiB or 2GB".into())
            })?,
            gpu_memory_utilization: v.get("GPU_MEMORY_UTILIZATION", fraction)?,
            max_num_seqs: v.get("MAX_NUM_SEQS", positive)?,
            max_num_batched_tokens: v.get("MAX_NUM_BATCHED_TOKENS", positive)?,
            enable_prefix_caching: v.get("ENABLE_PREFIX_CACHING", boolean)?,
            block_size: v.get("BLOCK_SIZE", positive)?,
            custom_chat_template: text("CUSTOM_CHAT_TEMPLATE"),
            threads: v.parse("NUM_THREADS", positive)?,
            speculative: v.parse("SPECULATIVE_CONFIG", SpeculativeConfig::parse)?,
            ..EngineSettings::for_model(PathBuf::new())
        };
        let hub = HubSettings {
            endpoint: v.get("HF_ENDPOINT", |s| Ok(s.to_string()))?,
            offline: v.get("HF_HUB_OFFLINE", boolean)?,
            fallback_cache: fallback_cache(text("HF_HOME"), text("XDG_CACHE_HOME"), text("HOME")),
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
            stream_batch,
            max_concurrency: v.get("MAX_CONCURRENCY", positive)?,
            disable_log_stats: v.get("DISABLE_LOG_STATS", boolean)?,
            disable_log_requests: v.get("DISABLE_LOG_REQUESTS", boolean)?,
            shutdown_timeout: Duration::from_secs(
                v.get("GRACEFUL_SHUTDOWN_TIMEOUT", positive)? as u64
            ),
            api_key: v.secret("API_KEY"),
            log_format: v.get("LOG_FORMAT", parse_log_format)?,
            ignored,
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
            concurrency: 4,
            progress: true,
            fallback_cache: self.hub.fallback_cache.clone(),
        }
    }
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
        assert!(c.ignored.is_empty());
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
    fn worker_vllm_only_variables_are_accepted_and_listed() {
        let c = parse(&[("LOAD_FORMAT", "auto"), ("TENSOR_PARALLEL_SIZE", "2")]).unwrap();
        assert_eq!(c.ignored, vec!["LOAD_FORMAT", "TENSOR_PARALLEL_SIZE"]);
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
        assert!(IGNORED_VARIABLES
            .iter()
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
