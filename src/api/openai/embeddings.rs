//! `POST /v1/embeddings`: `input` as a string, a list of strings, token ids or lists of token ids;
//! `encoding_format` `float` or `base64` (little-endian float32); `dimensions` (Matryoshka);
//! vLLM's `truncate_prompt_tokens` and `add_special_tokens`.

use base64::Engine as _;
use serde_json::{json, Value};

use super::params::Body;
use super::{shapes, OpenAiResponse, OpenAiSettings};
use crate::api::error::ApiError;
use crate::engine::{EmbedRequest, Engine};

/// One input before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum EmbedInput {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EncodingFormat {
    Float,
    Base64,
}

/// A parsed embeddings request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EmbeddingsRequest {
    pub inputs: Vec<EmbedInput>,
    pub encoding_format: EncodingFormat,
    pub dimensions: Option<usize>,
    /// Keep only the first this many tokens of each input (`-1`: the model's maximum).
    pub truncate_prompt_tokens: Option<i64>,
    pub add_special_tokens: bool,
}

fn invalid_input() -> ApiError {
    ApiError::invalid(
        "input",
        "`input` must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    )
}

fn token_ids(v: &[Value]) -> Option<Vec<u32>> {
    v.iter()
        .map(|t| t.as_u64().and_then(|n| u32::try_from(n).ok()))
        .collect()
}

/// `input` in any of its four shapes.
pub(crate) fn parse_input(input: Option<&Value>) -> Result<Vec<EmbedInput>, ApiError> {
    let Some(input) = input else {
        return Err(ApiError::invalid("input", "`input` is required"));
    };
    let inputs = match input {
        Value::String(s) => vec![EmbedInput::Text(s.clone())],
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::invalid("input", "`input` is an empty list"))
        }
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(Value::as_str)
            .map(|s| EmbedInput::Text(s.to_string()))
            .collect(),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            vec![EmbedInput::Tokens(
                token_ids(items).ok_or_else(invalid_input)?,
            )]
        }
        Value::Array(items) if items.iter().all(Value::is_array) => items
            .iter()
            .map(|i| {
                let ids = i
                    .as_array()
                    .and_then(|a| token_ids(a))
                    .ok_or_else(invalid_input)?;
                Ok(EmbedInput::Tokens(ids))
            })
            .collect::<Result<_, ApiError>>()?,
        _ => return Err(invalid_input()),
    };
    for (i, input) in inputs.iter().enumerate() {
        let empty = match input {
            EmbedInput::Text(s) => s.is_empty(),
            EmbedInput::Tokens(t) => t.is_empty(),
        };
        if empty {
            return Err(ApiError::invalid("input", format!("input {i} is empty")));
        }
    }
    Ok(inputs)
}

/// The typed fields of an embeddings request (`input` has its own reader, [`parse_input`]).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct EmbeddingsFields {
    encoding_format: Option<String>,
    dimensions: Option<i64>,
    truncate_prompt_tokens: Option<i64>,
    add_special_tokens: Option<bool>,
    /// Accepted (its type checked) as OpenAI and vLLM do, but not acted on.
    #[allow(dead_code)]
    user: Option<String>,
}

pub(crate) fn parse(body: &Body<'_>) -> Result<EmbeddingsRequest, ApiError> {
    let f: EmbeddingsFields = body.typed()?;
    let encoding_format = match f.encoding_format.as_deref() {
        None | Some("float") => EncodingFormat::Float,
        Some("base64") => EncodingFormat::Base64,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("`encoding_format` must be \"float\" or \"base64\", got \"{other}\""),
            ));
        }
    };
    let dimensions = match f.dimensions {
        Some(d) if d < 1 => {
            return Err(ApiError::invalid(
                "dimensions",
                "`dimensions` must be at least 1",
            ));
        }
        d => d.map(|d| d as usize),
    };
    let truncate_prompt_tokens = f.truncate_prompt_tokens;
    if matches!(truncate_prompt_tokens, Some(k) if k < 1 && k != -1) {
        return Err(ApiError::invalid(
            "truncate_prompt_tokens",
            "`truncate_prompt_tokens` must be at least 1 (or -1 for the model's maximum)",
        ));
    }
    Ok(EmbeddingsRequest {
        inputs: parse_input(body.raw("input"))?,
        encoding_format,
        dimensions,
        truncate_prompt_tokens,
        add_special_tokens: f.add_special_tokens.unwrap_or(true),
    })
}

/// Tokenizes and truncates every input; `max_len` is the model's context.
fn tokenize(
    engine: &Engine,
    request: &EmbeddingsRequest,
    max_len: usize,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let keep = match request.truncate_prompt_tokens {
        None => None,
        Some(-1) => Some(max_len),
        Some(k) if k as usize > max_len => {
            return Err(ApiError::invalid(
                "truncate_prompt_tokens",
                format!(
                    "`truncate_prompt_tokens` is {k}, more than the model's maximum context length of {max_len} tokens (max_position_embeddings)"
                ),
            ))
        }
        Some(k) => Some(k as usize),
    };
    request
        .inputs
        .iter()
        .map(|input| {
            let mut ids = match input {
                EmbedInput::Text(s) => engine.tokenizer().encode(s, request.add_special_tokens)?,
                EmbedInput::Tokens(t) => t.clone(),
            };
            if let Some(k) = keep {
                ids.truncate(k);
            }
            Ok(ids)
        })
        .collect()
}

/// A vector as base64 of its little-endian float32 bytes (what the OpenAI client decodes).
pub(crate) fn encode_base64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The inverse of `encode_base64`.
pub fn decode_base64(s: &str) -> Option<Vec<f32>> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    if bytes.len() % 4 != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

fn response(
    model: &str,
    format: EncodingFormat,
    embeddings: &[Vec<f32>],
    prompt_tokens: usize,
) -> Value {
    let data: Vec<Value> = embeddings
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = match format {
                EncodingFormat::Float => json!(v),
                EncodingFormat::Base64 => json!(encode_base64(v)),
            };
            json!({"index": index, "object": "embedding", "embedding": embedding})
        })
        .collect();
    json!({
        "id": shapes::new_id("embd"),
        "object": "list",
        "created": shapes::unix_now(),
        "model": model,
        "data": data,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens,
            "completion_tokens": 0,
        },
    })
}

pub(crate) async fn handle(
    engine: &Engine,
    settings: &OpenAiSettings,
    body: &Body<'_>,
) -> Result<OpenAiResponse, ApiError> {
    if !engine.info().can_embed {
        return Err(ApiError::invalid(
            "model",
            format!(
                "The model `{}` does not serve embeddings (it is not an embedding model)",
                settings.served_model_name
            ),
        ));
    }
    let request = parse(body)?;
    let inputs = tokenize(engine, &request, engine.info().max_model_len)?;
    let out = engine
        .embed(EmbedRequest {
            request_id: shapes::new_id("embd"),
            inputs,
            dimensions: request.dimensions,
        })
        .await?;
    Ok(OpenAiResponse::Json(response(
        &settings.served_model_name,
        request.encoding_format,
        &out.embeddings,
        out.prompt_tokens,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: &Value) -> Body<'_> {
        Body(v.as_object().unwrap())
    }

    #[test]
    fn input_shapes() {
        let p = |v: Value| parse_input(Some(&v));
        assert_eq!(p(json!("a")).unwrap(), vec![EmbedInput::Text("a".into())]);
        assert_eq!(
            p(json!(["a", "b"])).unwrap(),
            vec![EmbedInput::Text("a".into()), EmbedInput::Text("b".into())]
        );
        assert_eq!(
            p(json!([1, 2])).unwrap(),
            vec![EmbedInput::Tokens(vec![1, 2])]
        );
        assert_eq!(
            p(json!([[1], [2, 3]])).unwrap(),
            vec![EmbedInput::Tokens(vec![1]), EmbedInput::Tokens(vec![2, 3])]
        );
        for bad in [
            json!([]),
            json!(""),
            json!(["a", 1]),
            json!([-1]),
            json!([1.5]),
            json!([[]]),
            json!({"a": 1}),
            json!(3),
        ] {
            let e = p(bad.clone()).unwrap_err();
            assert_eq!((e.status(), e.param()), (400, Some("input")), "{bad}");
        }
        assert!(parse_input(None).is_err());
    }

    #[test]
    fn parameters() {
        let r = parse(&body(&json!({"input": "x"}))).unwrap();
        assert_eq!(r.encoding_format, EncodingFormat::Float);
        assert_eq!((r.dimensions, r.truncate_prompt_tokens), (None, None));
        assert!(r.add_special_tokens);
        let r = parse(&body(
            &json!({"input": "x", "encoding_format": "base64", "dimensions": 8, "truncate_prompt_tokens": -1}),
        ))
        .unwrap();
        assert_eq!(r.encoding_format, EncodingFormat::Base64);
        assert_eq!(
            (r.dimensions, r.truncate_prompt_tokens),
            (Some(8), Some(-1))
        );
        for (bad, param) in [
            (
                json!({"input": "x", "encoding_format": "int8"}),
                "encoding_format",
            ),
            (json!({"input": "x", "dimensions": 0}), "dimensions"),
            (json!({"input": "x", "dimensions": "8"}), "dimensions"),
            (
                json!({"input": "x", "truncate_prompt_tokens": 0}),
                "truncate_prompt_tokens",
            ),
        ] {
            let e = parse(&body(&bad)).unwrap_err();
            assert_eq!(e.param(), Some(param), "{bad}");
        }
    }

    #[test]
    fn base64_round_trip_is_little_endian_f32() {
        let v = vec![0.0f32, 1.0, -2.5, f32::MIN_POSITIVE, 0.1];
        let s = encode_base64(&v);
        assert_eq!(decode_base64(&s).unwrap(), v);
        // 1.0f32 is 00 00 80 3f in little-endian.
        assert_eq!(encode_base64(&[1.0]), "AACAPw==");
        assert!(decode_base64("AACA").is_none());
    }
}
