//! worker-candle's command line: the queue worker (default), `serve` (a local endpoint),
//! `--test-input` (one job), `download` and `run-batch`.

use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::Value;
use tokio::sync::watch;
use worker_candle::engine::speculative::SpeculativeMethod;

use worker_candle::config::{Config, LogFormat, DEFAULT_SERVE_MODEL};
use worker_candle::engine::Engine;
use worker_candle::serverless::handler::{EngineHandler, HandlerSettings};
use worker_candle::serverless::health::Readiness;
use worker_candle::serverless::job::{run_job, Job, JobHandler, JobResult, ResultSink};
use worker_candle::serverless::local::LocalEndpoint;
use worker_candle::serverless::metrics::Metrics;
use worker_candle::serverless::protocol::{QueueClient, QueueUrls, Timings};
use worker_candle::serverless::worker::Worker;

const HOW_TO_START: &str = "\
worker-candle: nothing to do.

This is a RunPod serverless worker; it takes jobs from the queue named by RUNPOD_WEBHOOK_GET_JOB, which
the platform sets. To try it locally:
  worker-candle serve --port 8000                       a local endpoint (/run, /runsync, /openai/v1/...)
  PORT=80 worker-candle                                 the same on 0.0.0.0:80 (a load-balancing endpoint)
  worker-candle --test-input '{\"input\": {\"prompt\": \"Hello\"}}'   run one job and print its output
  (or put a test_input.json in the working directory)
Set MODEL_NAME to a local model folder or a Hugging Face repository id.";

#[derive(Parser, Debug)]
#[command(
    name = "worker-candle",
    version,
    about = "A serverless LLM worker on candle"
)]
struct Cli {
    /// Run this one job (`{"input": {...}}`, or just the input) and print its output.
    #[arg(
        long = "test-input",
        alias = "test_input",
        value_name = "JSON",
        global = true
    )]
    test_input: Option<String>,
    /// The SDK's spelling of `serve` (`--rp_serve_api [--rp_api_host H] [--rp_api_port P]`).
    #[arg(long = "rp_serve_api", hide = true)]
    rp_serve_api: bool,
    #[arg(long = "rp_api_host", hide = true, default_value = "127.0.0.1")]
    rp_api_host: String,
    #[arg(long = "rp_api_port", hide = true, default_value_t = 8000)]
    rp_api_port: u16,
    /// Accepted for the SDK's sake; `MAX_CONCURRENCY` sets the concurrency.
    #[arg(long = "rp_api_concurrency", hide = true)]
    rp_api_concurrency: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Take jobs from the RunPod queue (the default when RUNPOD_WEBHOOK_GET_JOB is set).
    Worker,
    /// A local endpoint: /run, /runsync, /stream, /status, /cancel, /health, /metrics, /openai/v1.
    Serve(ServeArgs),
    /// Download MODEL_NAME (and TOKENIZER_NAME) into BASE_PATH and exit.
    Download,
    /// Run an OpenAI batch file (JSON lines) through the engine.
    RunBatch(RunBatchArgs),
}

#[derive(Args, Debug, Default)]
struct ServeArgs {
    /// The address to listen on [default: 0.0.0.0 when PORT is set, else 127.0.0.1].
    #[arg(long)]
    host: Option<String>,
    /// The port [default: PORT, else 8000].
    #[arg(long)]
    port: Option<u16>,
}

#[derive(Args, Debug)]
pub struct RunBatchArgs {
    /// Input file of requests (JSON lines), `-` for stdin, or an http(s) URL (GET).
    #[arg(short = 'i', long = "input")]
    input: PathBuf,
    /// Output file of results (JSON lines), `-` for stdout, or an http(s) URL (PUT).
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    /// The model (overrides MODEL_NAME).
    #[arg(long)]
    model: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("worker-candle: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_format);
    if let Some(path) = &config.config_file {
        tracing::info!(
            "settings from {} (environment variables win)",
            path.display()
        );
    }
    if !config.unknown_file_keys.is_empty() {
        tracing::warn!(
            "unknown keys in the config file, ignored: {}",
            config.unknown_file_keys.join(", ")
        );
    }
    if !config.no_effect.is_empty() {
        let list: Vec<String> = config
            .no_effect
            .iter()
            .map(|(name, why)| format!("{name} ({why})"))
            .collect();
        tracing::info!("accepted, no effect on this engine: {}", list.join("; "));
    }
    // The compute pools, sized once on this (still the only) thread, before rayon's and tokio's
    // threads start. candle sizes its own CPU pools from the environment and has no API for it, so
    // NUM_THREADS is passed on there, here and nowhere else.
    // SAFETY: no other thread exists yet (the runtime and the pools start below), so nothing reads or
    // writes the environment concurrently.
    unsafe { worker_candle::engine::loader::prepare_candle_env(config.engine.threads) };
    let threads = worker_candle::engine::loader::configure_threads(config.engine.threads);
    tracing::debug!(threads, "compute threads");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("worker-candle: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let log_format = config.log_format;
    let code = match runtime.block_on(dispatch(cli, config)) {
        Ok(code) => code,
        Err(e) => {
            // Once: a JSON log line for log collectors, else one plain line.
            match log_format {
                LogFormat::Json => tracing::error!("{e:#}"),
                LogFormat::Human => eprintln!("worker-candle: {e:#}"),
            }
            ExitCode::FAILURE
        }
    };
    // Blocking tasks still running (a stuck post, an engine call) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

async fn dispatch(cli: Cli, config: Config) -> anyhow::Result<ExitCode> {
    if let Some(text) = &cli.test_input {
        return test_input(&config, text).await;
    }
    if cli.rp_serve_api {
        let args = ServeArgs {
            host: Some(cli.rp_api_host.clone()),
            port: Some(cli.rp_api_port),
        };
        return serve(&config, &args).await;
    }
    match cli.command {
        Some(Command::Serve(args)) => serve(&config, &args).await,
        Some(Command::Worker) => queue_worker(&config).await,
        Some(Command::Download) => download(&config).await,
        Some(Command::RunBatch(args)) => run_batch(&config, args).await,
        None => {
            if config.runpod.has_queue() {
                return queue_worker(&config).await;
            }
            // A load-balancing endpoint: the platform sets PORT and sends plain HTTP.
            if config.port.is_some() {
                return serve(&config, &ServeArgs::default()).await;
            }
            let local = Path::new("test_input.json");
            if local.is_file() {
                let text = std::fs::read_to_string(local).context("reading test_input.json")?;
                return test_input(&config, &text).await;
            }
            eprintln!("{HOW_TO_START}");
            Ok(ExitCode::from(2))
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

/// `MODEL_NAME` → a local folder (or file) and an optional tokenizer folder: the hub resolver
/// (a local path as is; a repo id from the cache under `BASE_PATH`, downloaded when missing).
async fn resolve_model(config: &Config, name: &str) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    let hub = worker_candle::hub::Hub::new(config.hub_config())?;
    let resolved = hub.resolve_source(&model_source(config, name)).await?;
    Ok((resolved.model, resolved.tokenizer))
}

fn model_source(config: &Config, name: &str) -> worker_candle::hub::ModelSource {
    let m = &config.model;
    worker_candle::hub::ModelSource {
        name: name.to_string(),
        revision: m.revision.clone(),
        base_path: m.base_path.clone(),
        token: m.hf_token.as_ref().map(|t| t.expose().to_string()),
        tokenizer_name: m.tokenizer_name.clone(),
        tokenizer_revision: m.tokenizer_revision.clone(),
        gguf_file: m.gguf_file.clone(),
        download_dir: m.download_dir.clone(),
    }
}

async fn start_engine(config: &Config, model_name: &str) -> anyhow::Result<Engine> {
    let (model_path, tokenizer_path) = resolve_model(config, model_name).await?;
    let mut settings = config.engine_settings(model_path, tokenizer_path);
    if config.openai.served_model_name_override.is_none() {
        settings.served_model_name = model_name.to_string();
    }
    // a draft model (speculative decoding) comes from where the model does: a path, or the hub cache
    if let Some(SpeculativeMethod::Draft { model, .. }) =
        settings.speculative.as_mut().map(|s| &mut s.method)
    {
        let mut source = model_source(config, model);
        source.gguf_file = None;
        source.tokenizer_name = None;
        let hub = worker_candle::hub::Hub::new(config.hub_config())?;
        let resolved = hub.resolve_source(&source).await?;
        *model = resolved.model.display().to_string();
    }
    // LoRA adapters come from where the model does: a folder, or the hub cache
    if let Some(lora) = settings.lora.as_mut() {
        let hub = worker_candle::hub::Hub::new(config.hub_config())?;
        let source = model_source(config, model_name);
        for a in &mut lora.modules {
            a.path = hub
                .resolve_adapter(&source, &a.path.display().to_string())
                .await?;
        }
    }
    tracing::info!(model = %model_name, "loading the model");
    let engine = tokio::task::spawn_blocking(move || Engine::start(settings))
        .await
        .context("the engine start-up task failed")??;
    tracing::info!(
        model = %engine.info().served_model_name,
        max_model_len = engine.info().max_model_len,
        "model ready"
    );
    if engine.info().can_generate {
        // A prompt past the context is refused after about a context's worth of tokenizing.
        engine
            .tokenizer()
            .limit_prompt_tokens(engine.info().max_model_len);
    }
    Ok(engine)
}

fn handler(config: &Config, engine: Engine, metrics: Arc<Metrics>) -> Arc<dyn JobHandler> {
    Arc::new(EngineHandler::new(
        engine,
        HandlerSettings::from_config(config),
        metrics,
    ))
}

async fn queue_worker(config: &Config) -> anyhow::Result<ExitCode> {
    let Some(model) = config.model.name.clone() else {
        anyhow::bail!(
            "MODEL_NAME is required: a Hugging Face repository id or a local model folder"
        );
    };
    let worker_id = config
        .runpod
        .pod_id
        .clone()
        .unwrap_or_else(|| format!("worker-{:016x}", rand::random::<u64>()));
    let urls = QueueUrls::from_config(&config.runpod, &worker_id)?;
    let client = QueueClient::new(
        urls,
        config.runpod.api_key.as_ref(),
        Timings::new(config.runpod.ping_interval),
    )?;
    let engine = start_engine(config, &model).await?;
    let metrics = Arc::new(Metrics::default());
    let _stats = log_stats(config, &metrics);
    let worker = Worker::new(
        client,
        handler(config, engine, metrics),
        config.max_concurrency,
        config.shutdown_timeout,
    );
    tracing::info!(
        worker_id,
        max_concurrency = config.max_concurrency,
        "taking jobs"
    );
    worker.run(shutdown_signal()).await;
    tracing::info!("worker stopped");
    Ok(ExitCode::SUCCESS)
}

/// `serve`: listens at once (`GET /ping` answers 204 while the model loads, other routes 503),
/// then serves the model; SIGTERM lets requests in flight finish within `GRACEFUL_SHUTDOWN_TIMEOUT`.
async fn serve(config: &Config, args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let model = config
        .model
        .name
        .clone()
        .unwrap_or_else(|| DEFAULT_SERVE_MODEL.to_string());
    let port = args.port.or(config.port).unwrap_or(8000);
    // In a container (a load-balancing endpoint sets PORT) the platform reaches the worker from outside.
    let host = args.host.clone().unwrap_or_else(|| {
        if config.port.is_some() {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        }
        .to_string()
    });
    let listener = tokio::net::TcpListener::bind((host.as_str(), port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port}"))?;
    let address = listener.local_addr()?;
    let readiness = Readiness::new();
    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut health_task = None;
    match config.port_health.filter(|p| *p != address.port()) {
        Some(health_port) => {
            let health = tokio::net::TcpListener::bind((host.as_str(), health_port))
                .await
                .with_context(|| format!("cannot listen on {host}:{health_port} (PORT_HEALTH)"))?;
            let health_address = health.local_addr()?;
            println!("ping on http://{health_address}/ping");
            let server = axum::serve(health, readiness.health_router())
                .with_graceful_shutdown(until_stopped(stopped.clone()));
            health_task = Some(tokio::spawn(server.into_future()));
        }
        None => println!("ping on http://{address}/ping"),
    }
    // local::serve: axum's accept loop with a header read timeout (half-open connections are closed)
    let server = worker_candle::serverless::local::serve(
        listener,
        readiness.router(),
        config.serve_limits.header_read_timeout,
        until_stopped(stopped.clone()),
    );
    let mut server = tokio::spawn(server);
    tracing::info!("GET /ping on http://{address} answers 204 until the model is ready");
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let metrics = Arc::new(Metrics::default());
    let engine = tokio::select! {
        engine = start_engine(config, &model) => engine?,
        _ = &mut signal => {
            let _ = stop.send(true);
            return Ok(ExitCode::SUCCESS);
        }
    };
    let _stats = log_stats(config, &metrics);
    let max_model_len = engine.info().max_model_len;
    let endpoint = LocalEndpoint::with_limits(
        handler(config, engine, metrics.clone()),
        config.max_concurrency,
        metrics,
        config.api_key.clone(),
        config.serve_limits.clone(),
        Some(max_model_len),
    );
    readiness.open(endpoint.router());
    tracing::info!("serving on http://{address}");
    // A line on stdout that scripts (and tests) can wait for: the model is ready.
    println!("listening on http://{address}");
    tokio::select! {
        result = &mut server => {
            result.context("the server task failed")?;
            return Ok(ExitCode::SUCCESS);
        }
        _ = &mut signal => {}
    }
    // New connections stop; requests in flight get GRACEFUL_SHUTDOWN_TIMEOUT to finish.
    let _ = stop.send(true);
    match tokio::time::timeout(config.shutdown_timeout, &mut server).await {
        Ok(result) => {
            result.context("the server task failed")?;
            tracing::info!("server stopped");
        }
        Err(_) => {
            tracing::warn!(
                "requests still in flight after GRACEFUL_SHUTDOWN_TIMEOUT ({}s); exiting",
                config.shutdown_timeout.as_secs()
            );
            server.abort();
        }
    }
    if let Some(task) = health_task {
        task.abort();
    }
    Ok(ExitCode::SUCCESS)
}

/// How often the stats line is logged.
const STATS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// The periodic stats line (vLLM's), unless `DISABLE_LOG_STATS`; it stops when the guard drops.
fn log_stats(config: &Config, metrics: &Arc<Metrics>) -> Option<AbortOnDrop> {
    (!config.disable_log_stats)
        .then(|| AbortOnDrop(tokio::spawn(metrics.clone().log_stats(STATS_INTERVAL))))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Prints the job-done body of a local job.
struct PrintSink;

impl ResultSink for PrintSink {
    async fn piece(&self, _job_id: &str, piece: &Value) {
        tracing::debug!("stream: {piece}");
    }

    async fn done(&self, _job_id: &str, result: &JobResult) {
        println!("{}", result.to_body());
    }
}

/// `--test-input`: `{"input": {...}}` (the SDK's shape) or the bare input.
async fn test_input(config: &Config, text: &str) -> anyhow::Result<ExitCode> {
    let value: Value = serde_json::from_str(text).context("the test input is not valid JSON")?;
    let input = match value {
        Value::Object(mut o) if o.contains_key("input") => o.remove("input").unwrap_or_default(),
        other => other,
    };
    let model = config.model.name.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "MODEL_NAME is required: a Hugging Face repository id or a local model folder"
        )
    })?;
    let engine = start_engine(config, &model).await?;
    let handler = handler(config, engine, Arc::default());
    let job = Job {
        id: "test-input".into(),
        input,
        extra: Default::default(),
    };
    let (_stop, stop_rx) = watch::channel(None);
    let outcome = run_job(&*handler, &job, &PrintSink, stop_rx).await;
    Ok(match outcome {
        worker_candle::serverless::job::Outcome::Completed => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

/// Downloads MODEL_NAME (and TOKENIZER_NAME) into the cache under BASE_PATH and prints the
/// resolved folders: the image build's step, on the cold start's code path.
async fn download(config: &Config) -> anyhow::Result<ExitCode> {
    let Some(name) = config.model.name.as_deref() else {
        anyhow::bail!("`download` needs MODEL_NAME");
    };
    let (model, tokenizer) = resolve_model(config, name).await?;
    println!("{}", model.display());
    if let Some(tokenizer) = tokenizer {
        println!("{}", tokenizer.display());
    }
    // the LoRA adapters too, so an image can carry them
    if let Some(lora) = &config.engine.lora {
        let hub = worker_candle::hub::Hub::new(config.hub_config())?;
        let source = model_source(config, name);
        for a in &lora.modules {
            let path = hub
                .resolve_adapter(&source, &a.path.display().to_string())
                .await?;
            println!("{}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Hook for `run-batch` (`worker_candle::batch`).
async fn run_batch(config: &Config, args: RunBatchArgs) -> anyhow::Result<ExitCode> {
    let model = args
        .model
        .clone()
        .or_else(|| config.model.name.clone())
        .ok_or_else(|| anyhow::anyhow!("run-batch needs --model or MODEL_NAME"))?;
    let engine = start_engine(config, &model).await?;
    let settings = worker_candle::api::openai::OpenAiSettings {
        served_model_name: engine.info().served_model_name.clone(),
        response_role: config.openai.response_role.clone(),
    };
    let args = worker_candle::batch::BatchArgs {
        input: args.input.display().to_string(),
        output: args.output.display().to_string(),
        model: Some(model),
    };
    let summary = worker_candle::batch::run(&engine, &settings, &args).await?;
    tracing::info!(
        lines = summary.lines,
        failed = summary.failed,
        "batch written to {}",
        args.output
    );
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("cannot listen for SIGTERM: {e}");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
