//! Which front door a job goes to: the OpenAI passthrough (`openai_route` +
//! `openai_input`), the generic route (`route` + `body` + `method`), or a native worker-vllm input.

use serde_json::{Map, Value};

use crate::api::error::ApiError;
use crate::api::openai::normalize_route;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Get,
    Post,
    Delete,
}

impl Method {
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
            Self::Delete => "DELETE",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum JobRequest {
    /// An OpenAI route, `/v1/...`.
    OpenAi {
        route: String,
        method: Method,
        body: Option<Value>,
    },
    Native(Map<String, Value>),
    /// A native batch job: OpenAI batch-file lines (`{"custom_id", "method", "url", "body"}`) run
    /// together; the job's output is the list of result lines.
    Batch(Vec<Value>),
}

/// Fields of a native embedding job passed on to `/v1/embeddings` with `embedding_input` as `input`.
const EMBEDDING_FIELDS: &[&str] = &[
    "dimensions",
    "encoding_format",
    "truncate_prompt_tokens",
    "truncation_side",
    "normalize",
    "add_special_tokens",
    "model",
];

/// The OpenAI routes a job may name.
pub(crate) const OPENAI_ROUTES: &[(&str, Method)] = &[
    ("/v1/chat/completions", Method::Post),
    ("/v1/completions", Method::Post),
    ("/v1/models", Method::Get),
    ("/v1/embeddings", Method::Post),
    ("/v1/responses", Method::Post),
    ("/v1/messages", Method::Post),
    ("/v1/load_lora_adapter", Method::Post),
    ("/v1/unload_lora_adapter", Method::Post),
];

pub(crate) fn parse(input: &Value) -> Result<JobRequest, ApiError> {
    let fields = match input {
        Value::Object(fields) => fields,
        Value::Null => return Err(ApiError::bad_request("the job has no `input`")),
        other => {
            return Err(ApiError::bad_request(format!(
                "the job's `input` must be a JSON object, got {other}"
            )))
        }
    };
    if let Some(route) = non_null(fields.get("openai_route")) {
        let body = non_null(fields.get("openai_input"));
        let method = non_null(fields.get("method"));
        return openai(route, "openai_route", body, "openai_input", method);
    }
    if let Some(route) = non_null(fields.get("route")) {
        let body = non_null(fields.get("body"));
        return openai(route, "route", body, "body", non_null(fields.get("method")));
    }
    if let Some(batch) = non_null(fields.get("batch")) {
        return match batch {
            Value::Array(lines) => Ok(JobRequest::Batch(lines.clone())),
            other => Err(ApiError::bad_request(format!(
                "`batch` must be a list of batch requests ({{\"custom_id\", \"method\", \"url\", \"body\"}}), got {other}"
            ))),
        };
    }
    if let Some(input) = non_null(fields.get("embedding_input")) {
        return Ok(embedding_job(input, fields));
    }
    Ok(JobRequest::Native(fields.clone()))
}

/// A native embedding job is the embeddings route with `embedding_input` as its `input`.
fn embedding_job(input: &Value, fields: &Map<String, Value>) -> JobRequest {
    let mut body = Map::new();
    body.insert("input".into(), input.clone());
    for key in EMBEDDING_FIELDS {
        if let Some(v) = non_null(fields.get(*key)) {
            body.insert((*key).into(), v.clone());
        }
    }
    JobRequest::OpenAi {
        route: "/v1/embeddings".into(),
        method: Method::Post,
        body: Some(Value::Object(body)),
    }
}

/// A 400 when a job may produce more than `limit` (`MAX_REQUEST_OUTPUT_TOKENS`) tokens and logprobs:
/// its sequences (`n`, `best_of`) × `max_tokens` (else the context length) × (1 + the logprobs per
/// token). Every request passes here before it reaches the engine: `serve`'s routes and queue jobs.
pub(crate) fn check_output_size(
    input: &Value,
    limit: u64,
    max_model_len: Option<usize>,
) -> Result<(), ApiError> {
    let Some(asked) = requested_output(input, max_model_len) else {
        return Ok(());
    };
    if asked <= limit {
        return Ok(());
    }
    Err(ApiError::invalid(
        "max_tokens",
        format!(
            "this request may produce {asked} tokens and logprobs (n × max_tokens × (1 + logprobs)), more than this endpoint holds for one request ({limit}, MAX_REQUEST_OUTPUT_TOKENS); lower n, max_tokens or logprobs"
        ),
    ))
}

/// How many tokens (each with its logprobs) a request may make the worker hold, from an OpenAI body
/// (alone, or a job's `openai_input` or `body`) or a native input's `sampling_params`; `None` when it
/// says too little to tell (the validator judges malformed values).
fn requested_output(input: &Value, max_model_len: Option<usize>) -> Option<u64> {
    let request = input
        .get("openai_input")
        .or_else(|| input.get("body"))
        .or_else(|| input.get("sampling_params"))
        .unwrap_or(input);
    let count = |key: &str| request.get(key).and_then(Value::as_u64);
    let sequences = count("n").unwrap_or(1).max(count("best_of").unwrap_or(1));
    let max_tokens = count("max_completion_tokens")
        .or_else(|| count("max_tokens"))
        .or_else(|| count("max_output_tokens"))
        .or(max_model_len.map(|n| n as u64))?;
    let logprobs = match request.get("logprobs") {
        // Chat: `logprobs: true` with `top_logprobs` alternatives.
        Some(Value::Bool(true)) => 1 + count("top_logprobs").unwrap_or(0),
        // Completions and native: the number of alternatives.
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        _ => 0,
    };
    Some(
        sequences
            .saturating_mul(max_tokens)
            .saturating_mul(1 + logprobs),
    )
}

fn non_null(v: Option<&Value>) -> Option<&Value> {
    v.filter(|v| !v.is_null())
}

fn openai(
    route: &Value,
    route_field: &str,
    body: Option<&Value>,
    body_field: &str,
    method: Option<&Value>,
) -> Result<JobRequest, ApiError> {
    let Value::String(route) = route else {
        return Err(ApiError::bad_request(format!(
            "`{route_field}` must be a string such as \"/v1/chat/completions\", got {route}"
        )));
    };
    let path = normalize_route(route);
    if let Some(body) = body
        && !body.is_object()
    {
        return Err(ApiError::bad_request(format!(
            "`{body_field}` must be a JSON object, got {body}"
        )));
    }
    let method = match method {
        None => {
            if body.is_some() {
                Method::Post
            } else {
                Method::Get
            }
        }
        Some(Value::String(m)) if m.eq_ignore_ascii_case("GET") => Method::Get,
        Some(Value::String(m)) if m.eq_ignore_ascii_case("POST") => Method::Post,
        Some(Value::String(m)) if m.eq_ignore_ascii_case("DELETE") => Method::Delete,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "`method` must be \"GET\", \"POST\" or \"DELETE\", got {other}"
            )))
        }
    };
    // A stored response: retrieved (GET, also without a `method`) or deleted (DELETE).
    if let Some(id) = path.strip_prefix("/v1/responses/") {
        let method = if method == Method::Delete {
            Method::Delete
        } else {
            Method::Get
        };
        if id.is_empty() || id.contains('/') {
            return Err(ApiError::not_found(format!("unknown route `{route}`")));
        }
        return Ok(JobRequest::OpenAi {
            route: path,
            method,
            body: None,
        });
    }
    // The model list (and a model's card) answer whatever the method: the platform's
    // `/openai/v1/models` arrives as `{"openai_route": "/v1/models", "openai_input": {}}`.
    if path == "/v1/models" || path.starts_with("/v1/models/") {
        return Ok(JobRequest::OpenAi {
            route: path,
            method: Method::Get,
            body: None,
        });
    }
    let Some((_, expected)) = OPENAI_ROUTES.iter().find(|(r, _)| *r == path) else {
        let known: Vec<&str> = OPENAI_ROUTES.iter().map(|(r, _)| *r).collect();
        return Err(ApiError::not_found(format!(
            "unknown route `{route}`; this worker serves {}",
            known.join(", ")
        )));
    };
    if *expected != method {
        let hint = if *expected == Method::Post {
            format!(" (send the request body in `{body_field}`)")
        } else {
            String::new()
        };
        return Err(ApiError::method_not_allowed(format!(
            "`{path}` takes {}, not {}{hint}",
            expected.as_str(),
            method.as_str()
        )));
    }
    Ok(JobRequest::OpenAi {
        route: path,
        method,
        body: body.cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn openai_passthrough() {
        let r = parse(
            &json!({"openai_route": "/v1/chat/completions", "openai_input": {"messages": []}}),
        )
        .unwrap();
        assert_eq!(
            r,
            JobRequest::OpenAi {
                route: "/v1/chat/completions".into(),
                method: Method::Post,
                body: Some(json!({"messages": []}))
            }
        );
        let models = parse(&json!({"openai_route": "/v1/models"})).unwrap();
        assert_eq!(
            models,
            JobRequest::OpenAi {
                route: "/v1/models".into(),
                method: Method::Get,
                body: None
            }
        );
        let prefixed = parse(&json!({"openai_route": "/openai/v1/models/"})).unwrap();
        assert_eq!(prefixed, models);
        // worker-vllm's form of the platform's /openai/v1/models: a POST-style job.
        let posted = parse(&json!({"openai_route": "/v1/models", "openai_input": {}})).unwrap();
        assert_eq!(posted, models);
        let card =
            parse(&json!({"openai_route": "/openai/v1/models/m", "openai_input": {}})).unwrap();
        assert!(
            matches!(card, JobRequest::OpenAi { ref route, method: Method::Get, .. } if route == "/v1/models/m")
        );
    }

    #[test]
    fn generic_route() {
        let r =
            parse(&json!({"route": "/v1/completions", "body": {"prompt": "x"}, "method": "post"}))
                .unwrap();
        assert!(matches!(
            r,
            JobRequest::OpenAi {
                method: Method::Post,
                ..
            }
        ));
        let g = parse(&json!({"route": "/v1/models", "method": "GET"})).unwrap();
        assert!(matches!(
            g,
            JobRequest::OpenAi {
                method: Method::Get,
                ..
            }
        ));
    }

    #[test]
    fn native_otherwise() {
        let r = parse(&json!({"prompt": "hello"})).unwrap();
        assert!(matches!(r, JobRequest::Native(ref m) if m["prompt"] == "hello"));
        let batch = parse(&json!({"batch": [{"custom_id": "a"}]})).unwrap();
        assert_eq!(batch, JobRequest::Batch(vec![json!({"custom_id": "a"})]));
        let err = parse(&json!({"batch": "nope"})).unwrap_err();
        assert!(
            err.message().contains("`batch` must be a list"),
            "{}",
            err.message()
        );
        let emb =
            parse(&json!({"embedding_input": ["a", "b"], "dimensions": 8, "prompt": "x"})).unwrap();
        assert_eq!(
            emb,
            JobRequest::OpenAi {
                route: "/v1/embeddings".into(),
                method: Method::Post,
                body: Some(json!({"input": ["a", "b"], "dimensions": 8})),
            }
        );
    }

    #[test]
    fn bad_jobs_get_clear_errors() {
        let missing = parse(&Value::Null).unwrap_err();
        assert!(missing.message().contains("no `input`"));
        assert_eq!(parse(&json!("text")).unwrap_err().status(), 400);
        let unknown = parse(&json!({"openai_route": "/v1/images"})).unwrap_err();
        assert_eq!(unknown.status(), 404);
        assert!(unknown.message().contains("/v1/images"));
        assert_eq!(
            parse(&json!({"openai_route": 5})).unwrap_err().status(),
            400
        );
        assert_eq!(
            parse(&json!({"openai_route": "/v1/chat/completions", "openai_input": "hi"}))
                .unwrap_err()
                .status(),
            400
        );
        let no_body = parse(&json!({"openai_route": "/v1/chat/completions"})).unwrap_err();
        assert_eq!(no_body.status(), 405);
        assert!(no_body.message().contains("openai_input"));
        assert_eq!(
            parse(&json!({"route": "/v1/models", "method": "PUT"}))
                .unwrap_err()
                .status(),
            400
        );
    }
}
