//! Environment → typed, validated settings, all at start-up.
//!
//! `envy` maps the environment onto [`RawEnv`] (every variable we know, as text); [`Config::from_vars`]
//! then parses each one, so a malformed value stops the worker with a message naming the variable, the
//! value and what was expected. Nothing else in the crate reads the environment.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::api::stream_batch::BatchPolicy;
use crate::engine::settings::{DTypeChoice, DeviceChoice, EngineSettings, Quantization};

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

/// Where the model comes from and how the engine runs it.
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
    pub quantization: Quantization,
    pub gguf_file: Option<String>,
    pub custom_chat_template: Option<String>,
    pub max_model_len: Option<usize>,
    pub dtype: DTypeChoice,
    pub device: DeviceChoice,
    pub kv_cache_memory: Option<u64>,
    pub gpu_memory_utilization: f32,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub enable_prefix_caching: bool,
    pub block_size: usize,
    pub threads: Option<usize>,
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

/// Every variable we read, as text. Field names are the variables' names in lower case (envy's mapping).
#[derive(Debug, Default, Deserialize)]
struct RawEnv {
    model_name: Option<String>,
    model_revision: Option<String>,
    base_path: Option<String>,
    hf_token: Option<String>,
    tokenizer_name: Option<String>,
    tokenizer_revision: Option<String>,
    quantization: Option<String>,
    gguf_file: Option<String>,
    custom_chat_template: Option<String>,
    max_model_length: Option<String>,
    max_model_len: Option<String>,
    dtype: Option<String>,
    device: Option<String>,
    kv_cache_memory: Option<String>,
    gpu_memory_utilization: Option<String>,
    max_num_seqs: Option<String>,
    max_num_batched_tokens: Option<String>,
    enable_prefix_caching: Option<String>,
    block_size: Option<String>,
    num_threads: Option<String>,
    default_batch_size: Option<String>,
    default_min_batch_size: Option<String>,
    default_batch_size_growth_factor: Option<String>,
    raw_openai_output: Option<String>,
    openai_served_model_name_override: Option<String>,
    openai_response_role: Option<String>,
    max_concurrency: Option<String>,
    disable_log_stats: Option<String>,
    disable_log_requests: Option<String>,
    graceful_shutdown_timeout: Option<String>,
    api_key: Option<String>,
    log_format: Option<String>,
    runpod_webhook_get_job: Option<String>,
    runpod_webhook_post_output: Option<String>,
    runpod_webhook_post_stream: Option<String>,
    runpod_webhook_ping: Option<String>,
    runpod_ping_interval: Option<String>,
    runpod_ai_api_key: Option<String>,
    runpod_pod_id: Option<String>,
    runpod_endpoint_id: Option<String>,
    runpod_pod_hostname: Option<String>,
}

impl Config {
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
        let vars: Vec<(String, String)> = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let ignored = IGNORED_VARIABLES
            .iter()
            .filter(|name| vars.iter().any(|(k, _)| k == *name))
            .map(|name| name.to_string())
            .collect();
        // Only upper-case names are ours: envy lower-cases keys, so `model_name` would otherwise alias.
        let upper = vars
            .into_iter()
            .filter(|(k, _)| k.chars().all(|c| !c.is_ascii_lowercase()));
        let raw: RawEnv = envy::from_iter(upper).map_err(|e| ConfigError {
            name: "(environment)".into(),
            value: String::new(),
            expected: e.to_string(),
        })?;
        let mut config = Self::from_raw(raw)?;
        config.ignored = ignored;
        Ok(config)
    }

    fn from_raw(raw: RawEnv) -> Result<Self, ConfigError> {
        let max_model_len = match raw.max_model_length {
            Some(v) => parse_opt_usize("MAX_MODEL_LENGTH", Some(v))?,
            None => parse_opt_usize("MAX_MODEL_LEN", raw.max_model_len)?,
        };
        let model = ModelConfig {
            name: non_empty(raw.model_name),
            revision: non_empty(raw.model_revision),
            base_path: PathBuf::from(
                non_empty(raw.base_path).unwrap_or_else(|| "/runpod-volume".into()),
            ),
            hf_token: non_empty(raw.hf_token).map(Secret),
            tokenizer_name: non_empty(raw.tokenizer_name),
            tokenizer_revision: non_empty(raw.tokenizer_revision),
            quantization: parse_quantization(raw.quantization)?,
            gguf_file: non_empty(raw.gguf_file),
            custom_chat_template: non_empty(raw.custom_chat_template),
            max_model_len,
            dtype: parse_dtype(raw.dtype)?,
            device: parse_device(raw.device)?,
            kv_cache_memory: match non_empty(raw.kv_cache_memory) {
                None => None,
                Some(v) => Some(parse_bytes(&v).ok_or_else(|| ConfigError {
                    name: "KV_CACHE_MEMORY".into(),
                    value: v.clone(),
                    expected: "a size in bytes, e.g. 4294967296, 4GiB, 512MiB or 2GB".into(),
                })?),
            },
            gpu_memory_utilization: parse_fraction(
                "GPU_MEMORY_UTILIZATION",
                raw.gpu_memory_utilization,
                0.9,
            )?,
            max_num_seqs: parse_positive("MAX_NUM_SEQS", raw.max_num_seqs, 256)?,
            max_num_batched_tokens: parse_positive(
                "MAX_NUM_BATCHED_TOKENS",
                raw.max_num_batched_tokens,
                2048,
            )?,
            enable_prefix_caching: parse_bool(
                "ENABLE_PREFIX_CACHING",
                raw.enable_prefix_caching,
                true,
            )?,
            block_size: parse_positive("BLOCK_SIZE", raw.block_size, 16)?,
            threads: parse_opt_usize("NUM_THREADS", raw.num_threads)?,
        };
        let stream_batch = BatchPolicy {
            max_batch_size: parse_positive("DEFAULT_BATCH_SIZE", raw.default_batch_size, 50)?,
            min_batch_size: parse_positive(
                "DEFAULT_MIN_BATCH_SIZE",
                raw.default_min_batch_size,
                1,
            )?,
            growth_factor: parse_growth(raw.default_batch_size_growth_factor)?,
        };
        let openai = OpenAiConfig {
            raw_output: parse_bool("RAW_OPENAI_OUTPUT", raw.raw_openai_output, true)?,
            served_model_name_override: non_empty(raw.openai_served_model_name_override),
            response_role: non_empty(raw.openai_response_role)
                .unwrap_or_else(|| "assistant".into()),
        };
        let runpod = RunpodConfig {
            webhook_get_job: non_empty(raw.runpod_webhook_get_job),
            webhook_post_output: non_empty(raw.runpod_webhook_post_output),
            webhook_post_stream: non_empty(raw.runpod_webhook_post_stream),
            webhook_ping: non_empty(raw.runpod_webhook_ping),
            ping_interval: Duration::from_millis(parse_positive(
                "RUNPOD_PING_INTERVAL",
                raw.runpod_ping_interval,
                10_000,
            )? as u64),
            api_key: non_empty(raw.runpod_ai_api_key).map(Secret),
            pod_id: non_empty(raw.runpod_pod_id),
            endpoint_id: non_empty(raw.runpod_endpoint_id),
            pod_hostname: non_empty(raw.runpod_pod_hostname),
        };
        Ok(Self {
            model,
            openai,
            runpod,
            stream_batch,
            max_concurrency: parse_positive("MAX_CONCURRENCY", raw.max_concurrency, 100)?,
            disable_log_stats: parse_bool("DISABLE_LOG_STATS", raw.disable_log_stats, false)?,
            disable_log_requests: parse_bool(
                "DISABLE_LOG_REQUESTS",
                raw.disable_log_requests,
                false,
            )?,
            shutdown_timeout: Duration::from_secs(parse_positive(
                "GRACEFUL_SHUTDOWN_TIMEOUT",
                raw.graceful_shutdown_timeout,
                30,
            )? as u64),
            api_key: non_empty(raw.api_key).map(Secret),
            log_format: parse_log_format(raw.log_format)?,
            ignored: Vec::new(),
        })
    }

    /// The name the model answers to: the override, else `MODEL_NAME` (else the given fallback).
    pub fn served_model_name(&self, fallback: &str) -> String {
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
        let m = &self.model;
        EngineSettings {
            served_model_name: self.served_model_name(&fallback),
            model_path,
            tokenizer_path,
            gguf_file: m.gguf_file.clone(),
            dtype: m.dtype,
            device: m.device,
            quantization: m.quantization.clone(),
            max_model_len: m.max_model_len,
            kv_cache_memory: m.kv_cache_memory,
            gpu_memory_utilization: m.gpu_memory_utilization,
            block_size: m.block_size,
            max_num_seqs: m.max_num_seqs,
            max_num_batched_tokens: m.max_num_batched_tokens,
            enable_prefix_caching: m.enable_prefix_caching,
            custom_chat_template: m.custom_chat_template.clone(),
            threads: m.threads,
        }
    }
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.trim().is_empty())
}

fn invalid(name: &str, value: &str, expected: &str) -> ConfigError {
    ConfigError {
        name: name.into(),
        value: value.into(),
        expected: expected.into(),
    }
}

fn parse_bool(name: &str, v: Option<String>, default: bool) -> Result<bool, ConfigError> {
    let Some(v) = non_empty(v) else {
        return Ok(default);
    };
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(invalid(name, &v, "a boolean: 1, 0, true or false")),
    }
}

fn parse_opt_usize(name: &str, v: Option<String>) -> Result<Option<usize>, ConfigError> {
    match non_empty(v) {
        None => Ok(None),
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(invalid(name, &v, "a positive integer")),
        },
    }
}

fn parse_positive(name: &str, v: Option<String>, default: usize) -> Result<usize, ConfigError> {
    Ok(parse_opt_usize(name, v)?.unwrap_or(default))
}

fn parse_fraction(name: &str, v: Option<String>, default: f32) -> Result<f32, ConfigError> {
    let Some(v) = non_empty(v) else {
        return Ok(default);
    };
    match v.trim().parse::<f32>() {
        Ok(x) if x > 0.0 && x <= 1.0 => Ok(x),
        _ => Err(invalid(name, &v, "a number in (0, 1], e.g. 0.9")),
    }
}

fn parse_growth(v: Option<String>) -> Result<f64, ConfigError> {
    let Some(v) = non_empty(v) else {
        return Ok(3.0);
    };
    match v.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 1.0 => Ok(x),
        _ => Err(invalid(
            "DEFAULT_BATCH_SIZE_GROWTH_FACTOR",
            &v,
            "a number >= 1, e.g. 3",
        )),
    }
}

fn parse_dtype(v: Option<String>) -> Result<DTypeChoice, ConfigError> {
    let Some(v) = non_empty(v) else {
        return Ok(DTypeChoice::Auto);
    };
    match v.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(DTypeChoice::Auto),
        "float32" | "f32" | "float" => Ok(DTypeChoice::F32),
        "bfloat16" | "bf16" => Ok(DTypeChoice::BF16),
        "float16" | "f16" | "half" => Ok(DTypeChoice::F16),
        _ => Err(invalid(
            "DTYPE",
            &v,
            "one of auto, float32, bfloat16, float16",
        )),
    }
}

fn parse_device(v: Option<String>) -> Result<DeviceChoice, ConfigError> {
    let Some(v) = non_empty(v) else {
        return Ok(DeviceChoice::Auto);
    };
    match v.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(DeviceChoice::Auto),
        "cpu" => Ok(DeviceChoice::Cpu),
        "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
        _ => Err(invalid("DEVICE", &v, "one of auto, cpu, cuda")),
    }
}

/// In-situ quantization kinds candle can apply to float weights at load.
const IN_SITU: &[&str] = &[
    "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2k", "q3k", "q4k", "q5k", "q6k", "q8k",
];

fn parse_quantization(v: Option<String>) -> Result<Quantization, ConfigError> {
    let Some(v) = non_empty(v) else {
        return Ok(Quantization::None);
    };
    let lower = v.trim().to_ascii_lowercase();
    match lower.as_str() {
        "none" => Ok(Quantization::None),
        "gguf" => Ok(Quantization::Gguf),
        "awq" => Ok(Quantization::Awq),
        "gptq" => Ok(Quantization::Gptq),
        q if IN_SITU.contains(&q) => Ok(Quantization::InSitu(q.to_string())),
        _ => Err(invalid(
            "QUANTIZATION",
            &v,
            &format!("one of none, gguf, awq, gptq, {}", IN_SITU.join(", ")),
        )),
    }
}

/// `4294967296`, `4GiB`, `512MiB`, `2GB`, `1.5G` (bare K/M/G are binary units).
pub fn parse_bytes(text: &str) -> Option<u64> {
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

fn parse_log_format(v: Option<String>) -> Result<LogFormat, ConfigError> {
    let Some(v) = non_empty(v) else {
        return Ok(LogFormat::Human);
    };
    match v.trim().to_ascii_lowercase().as_str() {
        "human" | "text" | "pretty" => Ok(LogFormat::Human),
        "json" => Ok(LogFormat::Json),
        _ => Err(invalid("LOG_FORMAT", &v, "human or json")),
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
        assert_eq!(c.model.quantization, Quantization::None);
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
        assert_eq!(c.model.kv_cache_memory, Some(4 << 30));
        assert_eq!(c.model.dtype, DTypeChoice::BF16);
        assert_eq!(c.model.device, DeviceChoice::Cpu);
        assert_eq!(c.model.quantization, Quantization::InSitu("q4k".into()));
        assert_eq!(c.model.max_model_len, Some(4096));
        assert!(!c.model.enable_prefix_caching);
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
