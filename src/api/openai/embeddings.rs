//! `POST /v1/embeddings`: `input` as a string, a list of strings, token ids or lists of token ids;
//! `encoding_format` `float` or `base64` (little-endian float32); `dimensions` (Matryoshka);
//! vLLM's `truncate_prompt_tokens` and `add_special_tokens`.

use base64::Engine as _;
use serde_json::{json, Value};

use super::chat::parse_messages;
use super::params::{check_fields, truncation, Body, Truncation};
use super::{shapes, OpenAiResponse, OpenAiSettings};
use crate::api::error::ApiError;
use crate::engine::template::RenderOptions;
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
    /// `input`, or (vLLM's chat-style request) `messages` rendered by the chat template.
    pub inputs: Vec<EmbedInput>,
    pub chat: Option<ChatInput>,
    pub encoding_format: EncodingFormat,
    pub dimensions: Option<usize>,
    /// `truncate_prompt_tokens` (`-1`: the model's maximum) with `truncation_side` (default
    /// `right`: the first tokens are kept, as the tokenizers of embedding models truncate).
    pub truncate: Option<Truncation>,
    pub add_special_tokens: bool,
    /// vLLM's `normalize` (none: as the model's modules say).
    pub normalize: Option<bool>,
}

/// vLLM's chat-style embeddings request: messages and how to render them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChatInput {
    pub messages: Vec<Value>,
    pub chat_template: Option<String>,
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
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
    truncation_side: Option<String>,
    add_special_tokens: Option<bool>,
    normalize: Option<bool>,
    chat_template: Option<String>,
    chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
    /// Accepted (its type checked) as OpenAI and vLLM do, but not acted on.
    #[allow(dead_code)]
    user: Option<String>,
}

/// The fields an embeddings request may carry (OpenAI's, vLLM's, and metadata accepted unread).
const EMBEDDING_FIELDS: &[&str] = &[
    "model",
    "input",
    "messages",
    "encoding_format",
    "dimensions",
    "user",
    "truncate_prompt_tokens",
    "truncation_side",
    "add_special_tokens",
    "normalize",
    "chat_template",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "request_id",
    "priority",
    "metadata",
];

pub(crate) fn parse(body: &Body<'_>) -> Result<EmbeddingsRequest, ApiError> {
    check_fields(body, &[EMBEDDING_FIELDS])?;
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
    let truncate = truncation(
        f.truncate_prompt_tokens,
        Some(f.truncation_side.as_deref().unwrap_or("right")),
    )?;
    let (inputs, chat) = match (body.raw("input"), body.raw("messages")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "messages",
                "send either `input` or `messages`, not both",
            ))
        }
        (None, Some(messages)) => {
            let add_generation_prompt = f.add_generation_prompt.unwrap_or(false);
            let continue_final_message = f.continue_final_message.unwrap_or(false);
            if add_generation_prompt && continue_final_message {
                return Err(ApiError::invalid(
                    "continue_final_message",
                    "`continue_final_message` needs `add_generation_prompt` set to false",
                ));
            }
            let chat = ChatInput {
                messages: parse_messages(Some(messages))?,
                chat_template: f.chat_template,
                chat_template_kwargs: f.chat_template_kwargs,
                add_generation_prompt,
                continue_final_message,
            };
            (Vec::new(), Some(chat))
        }
        (input, None) => (parse_input(input)?, None),
    };
    Ok(EmbeddingsRequest {
        inputs,
        encoding_format,
        dimensions,
        truncate,
        // vLLM: the template writes special tokens for messages; plain inputs get them added.
        add_special_tokens: f.add_special_tokens.unwrap_or(chat.is_none()),
        normalize: f.normalize,
        chat,
    })
}

/// Tokenizes and truncates every input; `max_len` is the model's context.
fn tokenize(
    engine: &Engine,
    request: &EmbeddingsRequest,
    max_len: usize,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let rendered;
    let inputs = match &request.chat {
        Some(chat) => {
            rendered = [EmbedInput::Text(render(engine, chat)?)];
            &rendered[..]
        }
        None => &request.inputs[..],
    };
    inputs
        .iter()
        .map(|input| {
            let mut ids = match input {
                EmbedInput::Text(s) => engine.tokenizer().encode(s, request.add_special_tokens)?,
                EmbedInput::Tokens(t) => t.clone(),
            };
            if let Some(t) = &request.truncate {
                t.apply(&mut ids, max_len)?;
            }
            Ok(ids)
        })
        .collect()
}

/// The messages of a chat-style request as one text, by the request's template or the model's.
fn render(engine: &Engine, chat: &ChatInput) -> Result<String, ApiError> {
    let template = super::chat::template(engine, chat.chat_template.as_deref())?;
    let options = RenderOptions {
        add_generation_prompt: chat.add_generation_prompt,
        continue_final_message: chat.continue_final_message,
        extra: chat.chat_template_kwargs.as_ref(),
        ..Default::default()
    };
    Ok(template.render(&chat.messages, &options)?)
}

/// vLLM refuses `dimensions` on a model not trained for shorter vectors (not Matryoshka), and sizes
/// other than those it lists.
fn check_matryoshka(
    dimensions: Option<usize>,
    matryoshka: Option<&Vec<usize>>,
    model: &str,
) -> Result<(), ApiError> {
    let Some(d) = dimensions else {
        return Ok(());
    };
    match matryoshka {
        None => Err(ApiError::invalid(
            "dimensions",
            format!("Model \"{model}\" does not support matryoshka representation, changing output dimensions will lead to poor results."),
        )),
        Some(sizes) if !sizes.is_empty() && !sizes.contains(&d) => Err(ApiError::invalid(
            "dimensions",
            format!("Model \"{model}\" only supports {sizes:?} matryoshka dimensions, using other output dimensions will lead to poor results."),
        )),
        Some(_) => Ok(()),
    }
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
    check_matryoshka(
        request.dimensions,
        engine.info().matryoshka.as_ref(),
        &settings.served_model_name,
    )?;
    let inputs = tokenize(engine, &request, engine.info().max_model_len)?;
    let out = engine
        .embed(EmbedRequest {
            request_id: shapes::new_id("embd"),
            inputs,
            dimensions: request.dimensions,
            normalize: request.normalize,
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
        assert_eq!((r.dimensions, r.truncate), (None, None));
        assert!(r.add_special_tokens);
        let r = parse(&body(
            &json!({"input": "x", "encoding_format": "base64", "dimensions": 8, "truncate_prompt_tokens": -1}),
        ))
        .unwrap();
        assert_eq!(r.encoding_format, EncodingFormat::Base64);
        assert_eq!(
            (r.dimensions, r.truncate),
            (
                Some(8),
                Some(Truncation {
                    keep: None,
                    left: false
                })
            )
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
    fn chat_style_requests_and_matryoshka() {
        let r = parse(&body(
            &json!({"messages": [{"role": "user", "content": "hi"}], "normalize": false}),
        ))
        .unwrap();
        assert!(r.chat.is_some() && r.inputs.is_empty() && !r.add_special_tokens);
        assert_eq!(r.normalize, Some(false));
        let both = json!({"input": "x", "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(parse(&body(&both)).unwrap_err().param(), Some("messages"));
        assert_eq!(
            parse(&body(&json!({"input": "x", "typo": 1})))
                .unwrap_err()
                .param(),
            Some("typo")
        );
        assert!(check_matryoshka(None, None, "m").is_ok());
        assert_eq!(
            check_matryoshka(Some(8), None, "m").unwrap_err().param(),
            Some("dimensions")
        );
        assert!(check_matryoshka(Some(8), Some(&vec![]), "m").is_ok());
        assert!(check_matryoshka(Some(8), Some(&vec![16, 32]), "m").is_err());
        assert!(check_matryoshka(Some(16), Some(&vec![16, 32]), "m").is_ok());
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
