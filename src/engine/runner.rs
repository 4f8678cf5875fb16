//! The `Engine` handle and the thread that owns the model: it loads the model, then loops over
//! scheduler steps. (Skeleton: the scheduler work fills this in.)

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::mpsc;

use super::error::EngineError;
use super::settings::EngineSettings;
use super::tokenizer::Tokenizer;
use super::types::{EmbedOutput, EmbedRequest, GenerateRequest, GenerationEvent};

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
}

/// A cheap, cloneable handle to the engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    info: ModelInfo,
    tokenizer: Tokenizer,
    template: Option<super::template::ChatTemplate>,
}

impl Engine {
    /// Loads the model and starts the engine thread.
    pub fn start(_settings: EngineSettings) -> anyhow::Result<Engine> {
        anyhow::bail!("engine not implemented yet")
    }

    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }

    /// The chat template, if the model (or `CUSTOM_CHAT_TEMPLATE`) has one.
    pub fn chat_template(&self) -> Option<&super::template::ChatTemplate> {
        self.inner.template.as_ref()
    }

    /// Validates and tokenizes the request, then queues it. Errors here are the client's (bad
    /// parameters, prompt too long); later errors arrive as `GenerationEvent::Error`.
    pub fn generate(&self, _request: GenerateRequest) -> Result<GenerationStream, EngineError> {
        Err(EngineError::Unavailable(
            "engine not implemented yet".into(),
        ))
    }

    pub async fn embed(&self, _request: EmbedRequest) -> Result<EmbedOutput, EngineError> {
        Err(EngineError::Unavailable(
            "engine not implemented yet".into(),
        ))
    }
}

/// The events of one request. Dropping it cancels the request: the scheduler removes its sequences at
/// the next step and frees their blocks.
pub struct GenerationStream {
    rx: mpsc::UnboundedReceiver<GenerationEvent>,
}

impl GenerationStream {
    pub fn new(rx: mpsc::UnboundedReceiver<GenerationEvent>) -> Self {
        Self { rx }
    }
}

impl Stream for GenerationStream {
    type Item = GenerationEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}
