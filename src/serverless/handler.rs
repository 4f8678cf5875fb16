//! The job handler on the real engine: routes a job (`routing.rs`) to the native front door or the
//! OpenAI one and turns the engine's events into the job's output pieces.

use std::sync::Arc;

use async_stream::stream;
use futures::StreamExt;
use serde_json::{json, Value};

use super::job::{Job, JobHandler, PieceStream};
use super::metrics::Metrics;
use super::openai_bridge;
use super::routing::{self, JobRequest};
use crate::api::error::ApiError;
use crate::api::native::{self, NativeOutput, NativePrompt};
use crate::api::stream_batch::BatchPolicy;
use crate::config::Config;
use crate::engine::{Engine, EngineError, GenerateRequest, GenerationEvent};

/// What the handler needs from the configuration.
#[derive(Debug, Clone)]
pub struct HandlerSettings {
    pub batch_defaults: BatchPolicy,
    /// `RAW_OPENAI_OUTPUT`.
    pub raw_openai_output: bool,
    pub response_role: String,
    pub log_requests: bool,
    /// `MAX_REQUEST_OUTPUT_TOKENS`: what one job may produce (`n × max_tokens × (1 + logprobs)`).
    pub max_output_tokens: u64,
    /// The stored `/v1/responses` bounds: count, bytes, age (`RESPONSES_STORE_MAX_*`).
    pub responses_store: (usize, usize, std::time::Duration),
}

impl HandlerSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            batch_defaults: config.stream_batch,
            raw_openai_output: config.openai.raw_output,
            response_role: config.openai.response_role.clone(),
            log_requests: !config.disable_log_requests,
            max_output_tokens: config.serve_limits.max_output_tokens,
            responses_store: (
                config.openai.responses_store_max_count,
                config.openai.responses_store_max_bytes,
                config.openai.responses_store_max_age,
            ),
        }
    }
}

#[derive(Clone)]
pub struct EngineHandler {
    engine: Engine,
    settings: Arc<HandlerSettings>,
    metrics: Arc<Metrics>,
}

impl EngineHandler {
    /// A native batch job: every line through the OpenAI front door, concurrently (the engine batches
    /// them); one piece, the result lines in input order.
    fn batch(&self, lines: Vec<Value>) -> PieceStream {
        let engine = self.engine.clone();
        let settings = crate::api::openai::OpenAiSettings {
            served_model_name: engine.info().served_model_name.clone(),
            response_role: self.settings.response_role.clone(),
        };
        futures::stream::once(async move {
            Ok(Value::Array(
                crate::batch::run_values(&engine, &settings, lines).await,
            ))
        })
        .boxed()
    }

    pub fn new(engine: Engine, settings: HandlerSettings, metrics: Arc<Metrics>) -> Self {
        metrics.watch_engine(&engine);
        let (count, bytes, age) = settings.responses_store;
        crate::api::openai::response_store::configure(count, bytes, age);
        Self {
            engine,
            settings: Arc::new(settings),
            metrics,
        }
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(crate) fn settings(&self) -> &HandlerSettings {
        &self.settings
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

impl JobHandler for EngineHandler {
    fn handle(&self, job: &Job) -> PieceStream {
        if self.settings.log_requests {
            tracing::debug!(job_id = %job.id, input = %job.input, "job input");
        }
        let max_model_len = Some(self.engine.info().max_model_len);
        let checked =
            routing::check_output_size(&job.input, self.settings.max_output_tokens, max_model_len)
                .and_then(|()| routing::parse(&job.input));
        match checked {
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
            Ok(JobRequest::Native(input)) => self.native(&job.id, &input),
            Ok(JobRequest::OpenAi {
                route,
                method,
                body,
            }) => openai_bridge::pieces(self, &route, method, body),
            Ok(JobRequest::Batch(lines)) => self.batch(lines),
        }
    }
}

impl EngineHandler {
    fn native(&self, job_id: &str, input: &serde_json::Map<String, Value>) -> PieceStream {
        let engine = match native::engine_for(&self.engine, input) {
            Ok(engine) => engine,
            Err(e) => return futures::stream::once(async move { Err(e) }).boxed(),
        };
        let prepared = native::parse_input(input, self.settings.batch_defaults).and_then(|input| {
            let (text, add_special_tokens) = match &input.prompt {
                NativePrompt::Text {
                    prompt,
                    chat: false,
                } => (prompt.clone(), true),
                NativePrompt::Text { prompt, chat: true } => (
                    render_chat(&engine, &[json!({"role": "user", "content": prompt})])?,
                    false,
                ),
                NativePrompt::Messages(messages) => (render_chat(&engine, messages)?, false),
            };
            let n = input.sampling_params.n;
            let request = GenerateRequest {
                request_id: job_id.to_string(),
                prompt: native::prompt(
                    &engine,
                    text,
                    add_special_tokens,
                    input.truncate_prompt_tokens,
                )?,
                add_special_tokens,
                params: input.sampling_params.clone(),
            };
            let events = engine.generate(request)?;
            Ok((events, NativeOutput::new(n, input.stream, input.batch)))
        });
        let (mut events, mut output) = match prepared {
            Ok(p) => p,
            Err(e) => return futures::stream::once(async move { Err(ApiError::from(e)) }).boxed(),
        };
        let metrics = self.metrics.clone();
        stream! {
            while let Some(event) = events.next().await {
                if let GenerationEvent::Done { usage, metrics: m } = &event {
                    metrics.record_generation(usage.prompt_tokens, usage.completion_tokens, Some(m.time_to_first_token));
                }
                match output.on_event(event) {
                    Ok(Some(piece)) => yield Ok(piece),
                    Ok(None) => {}
                    Err(e) => {
                        yield Err(ApiError::from(e));
                        return;
                    }
                }
                if output.is_finished() {
                    return;
                }
            }
            yield Err(ApiError::internal("the engine ended the request without finishing it"));
        }
        .boxed()
    }
}

/// Renders chat messages through the model's chat template (or `CUSTOM_CHAT_TEMPLATE`).
pub(crate) fn render_chat(engine: &Engine, messages: &[Value]) -> Result<String, EngineError> {
    openai_bridge::render_chat(engine, messages)
}
