//! The serving side's one error: what went wrong ([`ErrorKind`]), a message, and the request
//! parameter at fault. The HTTP status, OpenAI's error body and RunPod's error object are views of it;
//! nothing parses an error back out of JSON.

use std::time::Duration;

use serde_json::{json, Value};

use crate::engine::EngineError;

/// What kind of failure, which fixes the status and OpenAI's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// The client's request is malformed or out of range (400).
    BadRequest,
    /// A wrong or missing API key (401).
    Unauthorized,
    /// No such route or model (404).
    NotFound,
    /// The route exists but takes another method (405).
    MethodNotAllowed,
    /// The job ran past its execution timeout, or the client sent its body too slowly (408).
    TimedOut,
    /// The request body is larger than the endpoint reads (413).
    PayloadTooLarge,
    /// The body is not in a media type the route reads (415).
    UnsupportedMediaType,
    /// The client or the queue cancelled the work (499).
    Cancelled,
    /// A fault of the worker (500).
    Internal,
    /// The engine is full or the worker is shutting down (503).
    Unavailable,
}

impl ErrorKind {
    /// The status code (499 for a cancelled request, nginx's "client closed request").
    pub(crate) fn status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::TimedOut => 408,
            Self::PayloadTooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::Cancelled => 499,
            Self::Internal => 500,
            Self::Unavailable => 503,
        }
    }

    /// OpenAI's `type`, as vLLM names them.
    pub(crate) fn type_name(self) -> &'static str {
        match self {
            Self::BadRequest => "BadRequestError",
            Self::Unauthorized => "AuthenticationError",
            Self::NotFound => "NotFoundError",
            Self::MethodNotAllowed => "MethodNotAllowedError",
            Self::TimedOut => "TimeoutError",
            Self::PayloadTooLarge => "PayloadTooLargeError",
            Self::UnsupportedMediaType => "UnsupportedMediaTypeError",
            Self::Cancelled => "CancelledError",
            Self::Internal => "InternalServerError",
            Self::Unavailable => "ServiceUnavailableError",
        }
    }
}

/// The wire shape of an error body: OpenAI's, or Anthropic's on the Messages route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum ErrorShape {
    #[default]
    OpenAi,
    Anthropic,
}

/// One failure of a request or a job.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    kind: ErrorKind,
    message: String,
    param: Option<String>,
    shape: ErrorShape,
    /// OpenAI's machine-readable `error.code` (`model_not_found`, ...), where one applies.
    code: Option<&'static str>,
}

impl ApiError {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
            shape: ErrorShape::OpenAi,
            code: None,
        }
    }

    /// The same error, shown in Anthropic's shape (see [`ApiError::body`]).
    pub(crate) fn in_anthropic_shape(mut self) -> Self {
        self.shape = ErrorShape::Anthropic;
        self
    }

    /// Sets OpenAI's `error.code` (a string such as `context_length_exceeded`).
    pub(crate) fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// Names the request parameter at fault (OpenAI's `error.param`).
    pub(crate) fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }

    /// A bad value of the parameter `param`.
    pub(crate) fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::bad_request(message).with_param(param)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub(crate) fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::MethodNotAllowed, message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unauthorized, message).with_code("invalid_api_key")
    }

    /// A request body over the endpoint's limit of `limit` bytes.
    pub(crate) fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::UnsupportedMediaType, message)
    }

    pub(crate) fn payload_too_large(limit: usize) -> Self {
        Self::new(
            ErrorKind::PayloadTooLarge,
            format!("the request body is larger than the limit of {limit} bytes (MAX_REQUEST_BODY_BYTES)"),
        )
        .with_code("request_too_large")
    }

    /// A job cancelled by the client or the queue.
    pub(crate) fn cancelled() -> Self {
        Self::new(ErrorKind::Cancelled, "the job was cancelled")
    }

    /// A job that ran past `limit`.
    pub(crate) fn timed_out(limit: Duration) -> Self {
        Self::new(
            ErrorKind::TimedOut,
            format!(
                "the job ran past its execution timeout of {} ms",
                limit.as_millis()
            ),
        )
    }

    /// A job stopped because the worker shut down first.
    pub(crate) fn shutting_down() -> Self {
        Self::new(
            ErrorKind::Unavailable,
            "the worker shut down before the job finished",
        )
    }

    pub(crate) fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub(crate) fn status(&self) -> u16 {
        self.kind.status()
    }

    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn param(&self) -> Option<&str> {
        self.param.as_deref()
    }

    /// OpenAI's `error.code`: a string, or `None` (JSON null) where no code applies. A 404 about
    /// the `model` parameter is `model_not_found`, as OpenAI answers.
    pub(crate) fn code(&self) -> Option<&'static str> {
        self.code.or(match (self.kind, self.param.as_deref()) {
            (ErrorKind::NotFound, Some("model")) => Some("model_not_found"),
            _ => None,
        })
    }

    /// OpenAI's `error` object: `{"message", "type", "param", "code"}`, every key present (`param`
    /// and `code` a string or null).
    pub(crate) fn openai_object(&self) -> Value {
        json!({
            "message": self.message,
            "type": self.kind.type_name(),
            "param": self.param,
            "code": self.code(),
        })
    }

    /// OpenAI's whole error body, `{"error": {...}}`.
    pub(crate) fn openai_body(&self) -> Value {
        json!({ "error": self.openai_object() })
    }

    /// Anthropic's error body, `{"type": "error", "error": {"type", "message"}}`.
    pub(crate) fn anthropic_body(&self) -> Value {
        let kind = match self.kind {
            ErrorKind::BadRequest
            | ErrorKind::MethodNotAllowed
            | ErrorKind::UnsupportedMediaType => "invalid_request_error",
            ErrorKind::Unauthorized => "authentication_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::TimedOut => "timeout_error",
            ErrorKind::Unavailable => "overloaded_error",
            ErrorKind::PayloadTooLarge => "request_too_large",
            ErrorKind::Cancelled | ErrorKind::Internal => "api_error",
        };
        json!({"type": "error", "error": {"type": kind, "message": self.message}})
    }

    /// The error body of the route that failed: OpenAI's, or Anthropic's for the Messages route.
    pub(crate) fn body(&self) -> Value {
        match self.shape {
            ErrorShape::OpenAi => self.openai_body(),
            ErrorShape::Anthropic => self.anthropic_body(),
        }
    }

    /// The object worker-vllm yields for a failed job: `{"message", "type", "code"}`.
    pub(crate) fn runpod_object(&self) -> Value {
        json!({"message": self.message, "type": self.kind.type_name(), "code": self.status()})
    }

    /// A job result's `error` text (RunPod's job-done body): the RunPod object as JSON text.
    pub(crate) fn runpod_text(&self) -> String {
        self.runpod_object().to_string()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.kind.type_name())
    }
}

impl std::error::Error for ApiError {}

/// The one mapping of engine errors: the client's mistakes are 400s (with the parameter at fault),
/// a full or stopping engine 503, a cancelled request 499, the rest 500.
impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let kind = match &e {
            EngineError::Unavailable(_) => ErrorKind::Unavailable,
            EngineError::Cancelled => ErrorKind::Cancelled,
            _ if e.is_client_error() => ErrorKind::BadRequest,
            _ => ErrorKind::Internal,
        };
        let param = e.param().map(str::to_string);
        let code =
            matches!(e, EngineError::PromptTooLong { .. }).then_some("context_length_exceeded");
        Self {
            kind,
            message: e.to_string(),
            param,
            shape: ErrorShape::OpenAi,
            code,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_statuses_and_params() {
        let e = ApiError::from(EngineError::invalid("top_p", "top_p must be in (0, 1]"));
        assert_eq!(e.status(), 400);
        assert_eq!(
            e.openai_body(),
            json!({"error": {"message": "top_p must be in (0, 1]", "type": "BadRequestError", "param": "top_p", "code": null}})
        );
        let e = ApiError::from(EngineError::PromptTooLong {
            prompt_tokens: 10,
            max_model_len: 8,
        });
        assert_eq!((e.status(), e.param()), (400, Some("messages")));
        assert_eq!(e.openai_object()["code"], "context_length_exceeded");
        assert_eq!(
            ApiError::from(EngineError::Internal("x".into())).status(),
            500
        );
        assert_eq!(
            ApiError::from(EngineError::Unavailable("x".into())).status(),
            503
        );
        assert_eq!(
            ApiError::from(EngineError::Cancelled).kind(),
            ErrorKind::Cancelled
        );
    }

    #[test]
    fn anthropic_errors_have_anthropic_bodies() {
        let e = ApiError::invalid("max_tokens", "max_tokens: Field required");
        assert_eq!(e.body(), e.openai_body());
        let e = e.in_anthropic_shape();
        assert_eq!(
            e.body(),
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}})
        );
        assert_eq!(e.status(), 400);
        let e = ApiError::not_found("x").in_anthropic_shape();
        assert_eq!(e.body()["error"]["type"], json!("not_found_error"));
    }

    #[test]
    fn openai_bodies_always_carry_param_and_a_string_or_null_code() {
        let plain = ApiError::bad_request("bad").openai_object();
        assert_eq!(
            plain,
            json!({"message": "bad", "type": "BadRequestError", "param": null, "code": null})
        );
        let model = ApiError::not_found("no such model").with_param("model");
        assert_eq!(model.openai_object()["code"], "model_not_found");
        assert_eq!(
            ApiError::unauthorized("no").openai_object()["code"],
            "invalid_api_key"
        );
        let big = ApiError::payload_too_large(10);
        assert_eq!(big.status(), 413);
        assert_eq!(big.openai_object()["code"], "request_too_large");
    }

    #[test]
    fn runpod_view_has_no_param() {
        let e = ApiError::invalid("n", "bad n");
        assert_eq!(
            e.runpod_object(),
            json!({"message": "bad n", "type": "BadRequestError", "code": 400})
        );
        let parsed: Value = serde_json::from_str(&e.runpod_text()).unwrap();
        assert_eq!(parsed, e.runpod_object());
        assert_eq!(ApiError::timed_out(Duration::from_millis(30)).status(), 408);
        assert_eq!(ApiError::shutting_down().status(), 503);
        assert_eq!(ApiError::cancelled().status(), 499);
    }
}
