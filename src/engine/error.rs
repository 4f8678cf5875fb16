//! Errors the engine reports to front doors. Each maps to one HTTP status / protocol error shape there.

use thiserror::Error;

#[derive(Debug, Clone, Error, PartialEq)]
pub enum EngineError {
    /// A request parameter is out of range or malformed; `param` names it as the client spelled it.
    #[error("{message}")]
    InvalidParameter { param: String, message: String },
    /// The prompt leaves no room for even one new token.
    #[error(
        "This model's maximum context length is {max_model_len} tokens. However, you requested {prompt_tokens} tokens in the prompt, which leaves no room for a completion (at least 1 token). Please reduce the length of the prompt."
    )]
    PromptTooLong {
        prompt_tokens: usize,
        max_model_len: usize,
    },
    /// The model has no chat template and none was configured (`CUSTOM_CHAT_TEMPLATE`).
    #[error(
        "The model has no chat template; set CUSTOM_CHAT_TEMPLATE or send a plain prompt to the completions route"
    )]
    NoChatTemplate,
    #[error("chat template error: {0}")]
    Template(String),
    /// The request asks for something this model or engine cannot do (e.g. embeddings from a generator).
    #[error("{0}")]
    Unsupported(String),
    /// The engine is shutting down or full.
    #[error("{0}")]
    Unavailable(String),
    #[error("the request was cancelled")]
    Cancelled,
    #[error("internal engine error: {0}")]
    Internal(String),
}

impl EngineError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidParameter {
            param: param.into(),
            message: message.into(),
        }
    }

    /// The parameter at fault, if any (OpenAI's `error.param`).
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::InvalidParameter { param, .. } => Some(param),
            Self::PromptTooLong { .. } => Some("messages"),
            _ => None,
        }
    }

    /// Whether the client is at fault (HTTP 400) rather than the server.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            Self::InvalidParameter { .. }
                | Self::PromptTooLong { .. }
                | Self::NoChatTemplate
                | Self::Template(_)
                | Self::Unsupported(_)
        )
    }
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        Self::Internal(e.to_string())
    }
}
