//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

use serde_json::{json, Value};

use crate::engine::EngineError;

#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiError {
    pub status: u16,
    pub message: String,
    /// OpenAI's `type` (`BadRequestError`, `NotFoundError`, ...), as vLLM names them.
    pub kind: &'static str,
    pub param: Option<String>,
}

impl OpenAiError {
    pub fn bad_request(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "BadRequestError",
            param: param.map(str::to_string),
        }
    }

    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::bad_request(Some(param), message)
    }

    pub fn not_found(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: 404,
            message: message.into(),
            kind: "NotFoundError",
            param: param.map(str::to_string),
        }
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self {
            status: 405,
            message: message.into(),
            kind: "MethodNotAllowedError",
            param: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
            kind: "InternalServerError",
            param: None,
        }
    }

    /// The `error` object (without the envelope).
    pub fn object(&self) -> Value {
        json!({
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.status,
        })
    }

    /// The whole error body, `{"error": {...}}`.
    pub fn body(&self) -> Value {
        json!({ "error": self.object() })
    }
}

impl std::fmt::Display for OpenAiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl From<EngineError> for OpenAiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        match &e {
            EngineError::Unavailable(_) => Self {
                status: 503,
                message,
                kind: "ServiceUnavailableError",
                param: None,
            },
            EngineError::Cancelled => Self {
                status: 499,
                message,
                kind: "CancelledError",
                param: None,
            },
            _ if e.is_client_error() => Self::bad_request(e.param(), message),
            _ => Self::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_statuses_and_params() {
        let e = OpenAiError::from(EngineError::invalid("top_p", "top_p must be in (0, 1]"));
        assert_eq!(e.status, 400);
        assert_eq!(
            e.body(),
            json!({"error": {"message": "top_p must be in (0, 1]", "type": "BadRequestError", "param": "top_p", "code": 400}})
        );
        let e = OpenAiError::from(EngineError::PromptTooLong {
            prompt_tokens: 10,
            max_model_len: 8,
        });
        assert_eq!((e.status, e.param.as_deref()), (400, Some("messages")));
        assert_eq!(
            OpenAiError::from(EngineError::Internal("x".into())).status,
            500
        );
        assert_eq!(
            OpenAiError::from(EngineError::Unavailable("x".into())).status,
            503
        );
    }
}
