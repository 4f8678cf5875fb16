//! `POST /v1/chat/completions`: messages rendered by the chat template, then one generation with `n`
//! choices; tool calls parsed out of the output; chat-shaped logprobs; streaming as OpenAI does.

use std::borrow::Cow;

use futures::stream::BoxStream;
use futures::StreamExt;
use serde_json::{json, Map, Value};

use super::outcome::{collect, ChoiceOutcome};
use super::params::{
    check_fields, extensions, sampling_params, stream_options, Body, Extensions, StreamOptions,
    COMMON_FIELDS,
};
use super::reasoning::{starts_in_reasoning, ReasoningSplitter, THINK_END};
use super::shapes;
use super::tools::{
    forced_calls_grammar, parse_tool_calls_for, ToolCall, ToolCallDetector, ToolSyntax,
};
use super::{OpenAiResponse, OpenAiSettings, StreamEvent};
use crate::api::error::ApiError;
use crate::engine::constraint::{Structure, StructuredOutput};
use crate::engine::template::{ChatTemplate, RenderOptions};
use crate::engine::{
    ChoiceDelta, Engine, EngineError, GenerateRequest, GenerationEvent, GenerationStream, Prompt,
    SamplingParams, Usage,
};

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// A parsed chat request.
#[derive(Debug, Clone)]
pub(crate) struct ChatRequest {
    /// Messages as the template sees them (content parts joined, tool-call arguments as objects).
    pub messages: Vec<Value>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: ToolChoice,
    pub parallel_tool_calls: bool,
    pub documents: Option<Vec<Value>>,
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
    pub chat_template: Option<String>,
    pub chat_template_kwargs: Option<Map<String, Value>>,
    pub params: SamplingParams,
    /// `top_logprobs` when `logprobs` is true.
    pub top_logprobs: Option<usize>,
    /// vLLM's `echo`: the reply starts with the last message's content when it has the reply's role.
    pub echo: bool,
    /// vLLM's `add_special_tokens` (default false: the template writes them).
    pub add_special_tokens: bool,
    pub stream: StreamOptions,
    pub ext: Extensions,
    /// `REASONING_PARSER` on: whether the output starts inside the reasoning block (`None`: off).
    pub reasoning: Option<bool>,
}

impl ChatRequest {
    /// Whether output is parsed for tool calls.
    pub(crate) fn parses_tools(&self) -> bool {
        self.tools.is_some() && self.tool_choice != ToolChoice::None
    }

    /// The tool calls of a whole reply (its schemas type XML calls' values), when this request
    /// parses them: the text before them and the calls.
    pub(crate) fn tool_calls_in(&self, text: &str) -> Option<(Option<String>, Vec<ToolCall>)> {
        self.parses_tools()
            .then(|| parse_tool_calls_for(text, self.tools.as_deref().unwrap_or_default()))
            .flatten()
    }

    /// A streaming tool-call detector, when this request parses tool calls.
    pub(crate) fn tool_detector(&self) -> Option<ToolCallDetector> {
        self.parses_tools()
            .then(|| ToolCallDetector::for_tools(self.tools.as_deref().unwrap_or_default()))
    }
}

/// The chat route's own typed fields (the sampling ones are shared, see `params`; `messages`,
/// `tools`, `tool_choice` and `response_format` have their own readers).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct ChatFields {
    max_completion_tokens: Option<usize>,
    logprobs: Option<bool>,
    top_logprobs: Option<usize>,
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
    parallel_tool_calls: Option<bool>,
    documents: Option<Vec<Value>>,
    chat_template: Option<String>,
    chat_template_kwargs: Option<Map<String, Value>>,
    echo: Option<bool>,
    add_special_tokens: Option<bool>,
}

/// The chat route's own fields (besides [`COMMON_FIELDS`]).
const CHAT_FIELDS: &[&str] = &[
    "messages",
    "tools",
    "tool_choice",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "add_generation_prompt",
    "continue_final_message",
    "parallel_tool_calls",
    "documents",
    "chat_template",
    "chat_template_kwargs",
    "echo",
    "add_special_tokens",
    // Accepted as vLLM accepts them; no effect on a model without a reasoning parser.
    "reasoning_effort",
    "include_reasoning",
];

pub(crate) fn parse(body: &Body<'_>) -> Result<ChatRequest, ApiError> {
    check_fields(body, &[COMMON_FIELDS, CHAT_FIELDS])?;
    let messages = parse_messages(body.raw("messages"))?;
    let mut params = sampling_params(body, None)?;
    let f: ChatFields = body.typed()?;
    if let Some(max) = f.max_completion_tokens {
        params.max_tokens = Some(max);
    }
    let logprobs = f.logprobs.unwrap_or(false);
    let top_logprobs = f.top_logprobs;
    // The count is judged by the engine against `MAX_LOGPROBS` (see [`top_logprobs_param`]).
    match top_logprobs {
        Some(_) if !logprobs => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs` set to true",
            ))
        }
        _ => {}
    }
    if logprobs {
        params.logprobs = Some(top_logprobs.unwrap_or(0));
    }
    let (tools, tool_choice) = parse_tools(body)?;
    let add_generation_prompt = f.add_generation_prompt.unwrap_or(true);
    let continue_final_message = f.continue_final_message.unwrap_or(false);
    if add_generation_prompt && continue_final_message {
        return Err(ApiError::invalid(
            "continue_final_message",
            "`continue_final_message` needs `add_generation_prompt` set to false",
        ));
    }
    let stream = stream_options(body)?;
    Ok(ChatRequest {
        messages,
        tools,
        tool_choice,
        parallel_tool_calls: f.parallel_tool_calls.unwrap_or(true),
        documents: f.documents,
        add_generation_prompt,
        continue_final_message,
        chat_template: f.chat_template,
        chat_template_kwargs: f.chat_template_kwargs,
        params,
        top_logprobs: logprobs.then_some(top_logprobs.unwrap_or(0)),
        echo: f.echo.unwrap_or(false),
        add_special_tokens: f.add_special_tokens.unwrap_or(false),
        stream,
        ext: extensions(body)?,
        reasoning: None,
    })
}

/// A chat body parsed and rendered for `engine`: `tool_choice` required or named becomes a grammar
/// over the model's tool-call syntax, and with a reasoning parser a structured-output constraint
/// starts after the reasoning. The rendered prompt with it.
pub(crate) fn prepare(engine: &Engine, body: &Body<'_>) -> Result<(ChatRequest, String), ApiError> {
    let mut request = parse(body)?;
    enforce_tool_choice(engine, &mut request)?;
    let prompt = render(engine, &request)?;
    if let Some(parser) = engine.output_syntax().reasoning_parser.as_deref() {
        let in_reasoning = starts_in_reasoning(parser, &prompt);
        request.reasoning = Some(in_reasoning);
        if let Some(s) = request.params.structured.as_mut() {
            if in_reasoning {
                s.starts_after = Some(THINK_END.to_string());
            } else {
                // The model may open the block itself: the answer after it is constrained.
                s.reasoning_prefix = true;
            }
        }
    }
    Ok((request, prompt))
}

/// `tool_choice: "required"` or a named function: the reply is forced to be tool calls (one when
/// named or `parallel_tool_calls` is false) whose arguments match the tools' `parameters`.
fn enforce_tool_choice(engine: &Engine, request: &mut ChatRequest) -> Result<(), ApiError> {
    let one = match &request.tool_choice {
        ToolChoice::Required => !request.parallel_tool_calls,
        ToolChoice::Named(_) => true,
        ToolChoice::Auto
            if engine.output_syntax().enable_auto_tool_choice == Some(false)
                && request.tools.as_ref().is_some_and(|t| !t.is_empty()) =>
        {
            return Err(ApiError::invalid(
                "tool_choice",
                "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set (ENABLE_AUTO_TOOL_CHOICE is false on this worker)",
            ));
        }
        ToolChoice::None | ToolChoice::Auto => return Ok(()),
    };
    let Some(tools) = request.tools.as_deref() else {
        return Ok(());
    };
    if let Some(other) = &request.params.structured {
        return Err(ApiError::invalid(
            "tool_choice",
            format!(
                "`tool_choice` {} cannot be combined with `{}`: only one structured output constraint may be given",
                if one { "naming a function" } else { "\"required\"" },
                other.param
            ),
        ));
    }
    let tokenizer = engine.tokenizer();
    let token_id = |marker: &str| match tokenizer.encode(marker, false).ok()?.as_slice() {
        [id] if tokenizer.token_text(*id) == marker => Some(*id),
        _ => None,
    };
    let syntax = ToolSyntax::choose(engine.output_syntax().tool_call_parser.as_deref(), |m| {
        token_id(m).is_some()
    });
    let grammar = forced_calls_grammar(tools, syntax, one, token_id);
    let mut structured = StructuredOutput::new(Structure::Grammar(grammar));
    structured.param = "tool_choice".into();
    request.params.structured = Some(structured);
    Ok(())
}

/// Messages as templates expect them: `content` a string (text parts joined) or null, and assistant
/// tool-call `arguments` parsed from their JSON text into objects (as vLLM hands them to templates).
pub(crate) fn parse_messages(value: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let invalid = |m: String| ApiError::invalid("messages", m);
    let items = match value {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => return Err(invalid("`messages` must not be empty".into())),
        None => return Err(invalid("`messages` is required".into())),
        Some(_) => return Err(invalid("`messages` must be a list of messages".into())),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let Value::Object(message) = item else {
                return Err(invalid(format!("messages[{i}] must be an object")));
            };
            let mut message = message.clone();
            match message.get("role") {
                Some(Value::String(_)) => {}
                _ => return Err(invalid(format!("messages[{i}] needs a string `role`"))),
            }
            let content = normalize_content(message.get("content"))
                .map_err(|m| invalid(format!("messages[{i}].content: {m}")))?;
            message.insert("content".into(), content);
            if let Some(Value::Array(calls)) = message.get_mut("tool_calls") {
                for call in calls.iter_mut() {
                    if let Some(args) = call.pointer_mut("/function/arguments")
                        && let Value::String(text) = args
                        && let Ok(parsed) = serde_json::from_str::<Value>(text)
                    {
                        *args = parsed;
                    }
                }
            }
            Ok(Value::Object(message))
        })
        .collect()
}

fn normalize_content(content: Option<&Value>) -> Result<Value, String> {
    match content {
        None | Some(Value::Null) => Ok(Value::Null),
        Some(Value::String(s)) => Ok(Value::String(s.clone())),
        Some(Value::Array(parts)) => {
            let texts = parts
                .iter()
                .map(|part| match part.get("type").and_then(Value::as_str) {
                    Some("text") => part
                        .get("text")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .ok_or_else(|| "a text part needs a string `text`".to_string()),
                    Some(other) => Err(format!(
                        "content parts of type `{other}` are not supported; only `text` parts are"
                    )),
                    None => Err("each content part needs a `type`".to_string()),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Value::String(texts.join("\n")))
        }
        Some(_) => Err("must be a string, a list of content parts, or null".into()),
    }
}

fn parse_tools(body: &Body<'_>) -> Result<(Option<Vec<Value>>, ToolChoice), ApiError> {
    let tools: Option<Vec<Value>> = body.get("tools")?;
    if let Some(tools) = &tools {
        for (i, tool) in tools.iter().enumerate() {
            let ok = tool.get("type").and_then(Value::as_str) == Some("function")
                && tool
                    .pointer("/function/name")
                    .and_then(Value::as_str)
                    .is_some();
            if !ok {
                return Err(ApiError::invalid(
                    "tools",
                    format!("tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"),
                ));
            }
        }
    }
    let invalid = |m: &str| ApiError::invalid("tool_choice", m);
    let choice = match body.raw("tool_choice") {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => {
                return Err(invalid(
                    "`tool_choice` must be none, auto, required or a named function",
                ))
            }
        },
        Some(value) => match value.pointer("/function/name").and_then(Value::as_str) {
            Some(name) if value.get("type").and_then(Value::as_str) == Some("function") => {
                ToolChoice::Named(name.to_string())
            }
            _ => return Err(invalid(
                "a named `tool_choice` is {\"type\": \"function\", \"function\": {\"name\": ...}}",
            )),
        },
    };
    match (&choice, &tools) {
        // As vLLM: any `tool_choice` (even "none" or "auto") without `tools` is a 400.
        (_, None) if body.raw("tool_choice").is_some() => {
            return Err(invalid("When using `tool_choice`, `tools` must be set."))
        }
        (ToolChoice::Named(name), Some(tools)) => {
            let named: Vec<Value> = tools
                .iter()
                .filter(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(name))
                .cloned()
                .collect();
            if named.is_empty() {
                return Err(invalid(&format!("no tool named `{name}` in `tools`")));
            }
            // The template only offers the chosen function.
            return Ok((Some(named), choice));
        }
        _ => {}
    }
    Ok((tools, choice))
}

/// The template a request renders with: its own `chat_template`, else the model's (or
/// CUSTOM_CHAT_TEMPLATE).
pub(crate) fn template<'e>(
    engine: &'e Engine,
    source: Option<&str>,
) -> Result<Cow<'e, ChatTemplate>, ApiError> {
    Ok(match source {
        Some(source) => {
            let tokenizer = engine.tokenizer();
            Cow::Owned(ChatTemplate::new(
                source,
                tokenizer.bos_token().map(str::to_string),
                tokenizer.eos_token().map(str::to_string),
            )?)
        }
        None => Cow::Borrowed(engine.chat_template().ok_or(EngineError::NoChatTemplate)?),
    })
}

/// Renders the conversation with the request's template, else the model's (or CUSTOM_CHAT_TEMPLATE).
pub(crate) fn render(engine: &Engine, request: &ChatRequest) -> Result<String, ApiError> {
    let template = template(engine, request.chat_template.as_deref())?;
    let tools = if request.tool_choice == ToolChoice::None {
        None
    } else {
        request.tools.as_deref()
    };
    let options = RenderOptions {
        tools,
        documents: request.documents.as_deref(),
        add_generation_prompt: request.add_generation_prompt,
        continue_final_message: request.continue_final_message,
        extra: request.chat_template_kwargs.as_ref(),
    };
    Ok(template.render(&request.messages, &options)?)
}

/// A chat body parsed, rendered and started as request `request_id`: the entry point of the routes
/// that translate onto chat (`/v1/responses`, `/v1/messages`), which shape the events themselves.
/// The engine judges the alternatives per token against `MAX_LOGPROBS` as `logprobs`; on chat that
/// count is `top_logprobs`, and the error names it (as vLLM's does).
fn top_logprobs_param(e: EngineError) -> ApiError {
    let e = ApiError::from(e);
    if e.param() != Some("logprobs") {
        return e;
    }
    let message = e
        .message()
        .replacen("logprobs", "`top_logprobs`", 1)
        .replacen(", got", " (MAX_LOGPROBS), got", 1);
    ApiError::invalid("top_logprobs", message)
}

pub(crate) fn start(
    engine: &Engine,
    body: &Body<'_>,
    request_id: &str,
) -> Result<(ChatRequest, GenerationStream), ApiError> {
    let (request, prompt) = prepare(engine, body)?;
    let events = engine
        .generate(GenerateRequest {
            request_id: request_id.to_string(),
            prompt: Prompt::Text(prompt),
            add_special_tokens: false,
            params: request.params.clone(),
        })
        .map_err(top_logprobs_param)?;
    Ok((request, events))
}

pub(crate) async fn handle(
    engine: &Engine,
    settings: &OpenAiSettings,
    body: &Body<'_>,
) -> Result<OpenAiResponse, ApiError> {
    let (request, text) = prepare(engine, body)?;
    let prompt = match &request.ext.truncate {
        None => Prompt::Text(text),
        Some(t) => {
            let mut ids = engine
                .tokenizer()
                .encode(&text, request.add_special_tokens)?;
            t.apply(&mut ids, engine.info().max_model_len)?;
            Prompt::Tokens(ids)
        }
    };
    let id = shapes::new_id("chatcmpl");
    let events = engine
        .generate(GenerateRequest {
            request_id: id.clone(),
            prompt,
            add_special_tokens: request.add_special_tokens,
            params: request.params.clone(),
        })
        .map_err(top_logprobs_param)?;
    let reply = Reply {
        id,
        created: shapes::unix_now(),
        model: settings.served_model_name.clone(),
        role: settings.response_role.clone(),
        echo: echoed(&request, &settings.response_role),
        prefix_caching: engine.info().prefix_caching,
    };
    if request.stream.stream {
        return Ok(OpenAiResponse::Stream(stream_chunks(
            reply, request, events,
        )));
    }
    let mut outcome = collect(events, request.params.n).await?;
    if request.ext.tokens_as_ids {
        for c in &mut outcome.choices {
            shapes::spell_as_ids(&mut c.logprobs);
        }
    }
    let choices: Vec<Value> = outcome
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| reply.choice(i, c, &request))
        .collect();
    let mut body = reply.object("chat.completion", choices);
    body["usage"] = shapes::usage(&outcome.usage, reply.cached(outcome.cached_prompt_tokens));
    // vLLM's fields: `prompt_logprobs` (null unless asked for), `prompt_token_ids` (return_token_ids).
    body["prompt_logprobs"] = match &outcome.prompt_logprobs {
        Some(lps) => shapes::prompt_logprobs(&outcome.prompt_token_ids, lps),
        None => Value::Null,
    };
    if request.ext.return_token_ids {
        body["prompt_token_ids"] = json!(outcome.prompt_token_ids);
    }
    Ok(OpenAiResponse::Json(body))
}

/// The echoed start of the reply (vLLM's chat `echo`).
fn echoed(request: &ChatRequest, role: &str) -> String {
    if !request.echo {
        return String::new();
    }
    match request.messages.last() {
        Some(last) if last.get("role").and_then(Value::as_str) == Some(role) => last
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        _ => String::new(),
    }
}

struct Reply {
    id: String,
    created: u64,
    model: String,
    role: String,
    echo: String,
    prefix_caching: bool,
}

fn tool_calls_json(calls: &[ToolCall]) -> Value {
    Value::Array(
        calls
            .iter()
            .map(|c| {
                json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}})
            })
            .collect(),
    )
}

impl Reply {
    /// `cached_tokens` of the usage: none when prefix caching is off.
    fn cached(&self, cached: usize) -> Option<usize> {
        self.prefix_caching.then_some(cached)
    }

    fn object(&self, object: &str, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": shapes::SYSTEM_FINGERPRINT,
            "choices": choices,
        })
    }

    fn choice(&self, index: usize, choice: &ChoiceOutcome, request: &ChatRequest) -> Value {
        let mut text = format!("{}{}", self.echo, choice.text);
        let mut finish_reason = shapes::finish_reason(choice.finish.as_ref());
        let mut reasoning = None;
        if let Some(in_reasoning) = request.reasoning {
            let (r, answer) = ReasoningSplitter::split(in_reasoning, &text);
            reasoning = r;
            text = answer;
        }
        let mut message = json!({"role": self.role, "content": text});
        if let Some(r) = reasoning {
            message["reasoning_content"] = Value::String(r);
            if text.is_empty() {
                message["content"] = Value::Null;
            }
        }
        if let Some((content, mut calls)) = request.tool_calls_in(&text) {
            if !request.parallel_tool_calls {
                calls.truncate(1);
            }
            message["content"] = content.map_or(Value::Null, Value::String);
            message["tool_calls"] = tool_calls_json(&calls);
            finish_reason = json!("tool_calls");
        }
        let logprobs = request
            .top_logprobs
            .map_or(Value::Null, |k| shapes::chat_logprobs(&choice.logprobs, k));
        let mut value = json!({
            "index": index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
            "stop_reason": shapes::stop_reason(choice.finish.as_ref()),
        });
        if request.ext.return_token_ids {
            value["token_ids"] = json!(choice.token_ids);
        }
        value
    }

    fn chunk(&self, index: usize, delta: Value, logprobs: Value, finish_reason: Value) -> Value {
        self.object(
            "chat.completion.chunk",
            vec![json!({
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            })],
        )
    }
}

/// Turns one choice's deltas into chunks, holding back tool calls when they are parsed.
struct ChoiceStream {
    index: usize,
    detector: Option<ToolCallDetector>,
    reasoning: Option<ReasoningSplitter>,
}

impl ChoiceStream {
    fn on_delta(
        &mut self,
        reply: &Reply,
        request: &ChatRequest,
        mut delta: ChoiceDelta,
    ) -> Vec<Value> {
        if request.ext.tokens_as_ids {
            shapes::spell_as_ids(&mut delta.logprobs);
        }
        let token_ids = std::mem::take(&mut delta.token_ids);
        let mut chunks = self.chunks(reply, request, delta);
        if request.ext.return_token_ids && !token_ids.is_empty() {
            // vLLM puts a delta's new ids on the choice of its chunk.
            if chunks.is_empty() {
                chunks.push(reply.chunk(0, json!({"content": ""}), Value::Null, Value::Null));
                chunks[0]["choices"][0]["index"] = json!(self.index);
            }
            chunks[0]["choices"][0]["token_ids"] = json!(token_ids);
        }
        chunks
    }

    fn chunks(&mut self, reply: &Reply, request: &ChatRequest, delta: ChoiceDelta) -> Vec<Value> {
        let index = delta.index;
        let mut chunks = Vec::new();
        let mut answer = delta.text;
        if let Some(splitter) = &mut self.reasoning {
            let (mut r, mut a) = splitter.push(&answer);
            if delta.finish.is_some() {
                let (r2, a2) = splitter.finish();
                r.push_str(&r2);
                a.push_str(&a2);
            }
            if !r.is_empty() {
                chunks.push(reply.chunk(
                    index,
                    json!({"reasoning_content": r}),
                    Value::Null,
                    Value::Null,
                ));
            }
            answer = a;
        }
        let text = match &mut self.detector {
            Some(d) => d.push(&answer),
            None => answer,
        };
        let logprobs = request
            .top_logprobs
            .filter(|_| !delta.logprobs.is_empty())
            .map_or(Value::Null, |k| shapes::chat_logprobs(&delta.logprobs, k));
        let Some(finish) = delta.finish else {
            if text.is_empty() && logprobs.is_null() {
                return chunks;
            }
            chunks.push(reply.chunk(index, json!({"content": text}), logprobs, Value::Null));
            return chunks;
        };
        let mut finish_reason = shapes::finish_reason(Some(&finish));
        let mut text = text;
        let mut calls = Vec::new();
        if let Some(detector) = self.detector.take() {
            let detected = detector.finish();
            text.push_str(&detected.text);
            calls = detected.calls;
            if !request.parallel_tool_calls {
                calls.truncate(1);
            }
        }
        if !calls.is_empty() {
            if !text.is_empty() || !logprobs.is_null() {
                chunks.push(reply.chunk(index, json!({"content": text}), logprobs, Value::Null));
            }
            let deltas: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(k, c)| json!({"index": k, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                .collect();
            finish_reason = json!("tool_calls");
            chunks.push(reply.chunk(
                index,
                json!({"tool_calls": deltas}),
                Value::Null,
                finish_reason,
            ));
            return chunks;
        }
        let delta = if text.is_empty() {
            json!({})
        } else {
            json!({"content": text})
        };
        chunks.push(reply.chunk(index, delta, logprobs, finish_reason));
        chunks
    }
}

fn stream_chunks(
    reply: Reply,
    request: ChatRequest,
    events: GenerationStream,
) -> BoxStream<'static, StreamEvent> {
    let n = request.params.n;
    let mut choices: Vec<ChoiceStream> = (0..n)
        .map(|index| ChoiceStream {
            index,
            detector: request.tool_detector(),
            reasoning: request.reasoning.map(ReasoningSplitter::new),
        })
        .collect();
    // vLLM's `continuous_usage_stats`: the usage so far on every chunk.
    let mut so_far = Usage::default();
    let continuous = request.stream.continuous_usage;
    let with_usage = move |mut chunk: Value, so_far: &Usage| {
        if continuous {
            chunk["usage"] = shapes::usage(so_far, None);
        }
        chunk
    };
    async_stream::stream! {
        futures::pin_mut!(events);
        while let Some(event) = events.next().await {
            match event {
                GenerationEvent::Prompt { prompt_token_ids, .. } => {
                    so_far.prompt_tokens = prompt_token_ids.len();
                    for i in 0..n {
                        let delta = json!({"role": reply.role, "content": reply.echo});
                        let mut chunk = reply.chunk(i, delta, Value::Null, Value::Null);
                        if request.ext.return_token_ids {
                            chunk["prompt_token_ids"] = json!(prompt_token_ids);
                        }
                        yield StreamEvent::Data(with_usage(chunk, &so_far));
                    }
                }
                GenerationEvent::Delta(delta) => {
                    so_far.completion_tokens += delta.token_ids.len();
                    let Some(choice) = choices.get_mut(delta.index) else {
                        yield StreamEvent::Error(ApiError::internal("the engine sent an unknown choice"));
                        break;
                    };
                    for chunk in choice.on_delta(&reply, &request, delta) {
                        yield StreamEvent::Data(with_usage(chunk, &so_far));
                    }
                }
                GenerationEvent::Done { usage, metrics } => {
                    if request.stream.include_usage {
                        let mut chunk = reply.object("chat.completion.chunk", vec![]);
                        chunk["usage"] = shapes::usage(&usage, reply.cached(metrics.cached_prompt_tokens));
                        yield StreamEvent::Data(chunk);
                    }
                    yield StreamEvent::Done;
                    return;
                }
                GenerationEvent::Error(e) => {
                    yield StreamEvent::Error(e.into());
                    break;
                }
            }
        }
        yield StreamEvent::Done;
    }
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_json(v: Value) -> Result<ChatRequest, ApiError> {
        parse(&Body(v.as_object().unwrap()))
    }

    fn user(text: &str) -> Value {
        json!([{"role": "user", "content": text}])
    }

    #[test]
    fn content_parts_are_joined_and_other_parts_refused() {
        let r = parse_json(json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}))
        .unwrap();
        assert_eq!(r.messages[0]["content"], json!("a\nb"));
        let e = parse_json(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]}))
        .unwrap_err();
        assert_eq!(e.param(), Some("messages"));
        assert!(e.message().contains("image_url"));
        for bad in [
            json!({}),
            json!({"messages": []}),
            json!({"messages": [{"content": "x"}]}),
            json!({"messages": ["x"]}),
        ] {
            assert_eq!(parse_json(bad).unwrap_err().status(), 400);
        }
    }

    #[test]
    fn assistant_tool_call_arguments_become_objects_for_templates() {
        let r = parse_json(json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]}]}))
        .unwrap();
        assert_eq!(
            r.messages[0]["tool_calls"][0]["function"]["arguments"],
            json!({"x": 1})
        );
        assert_eq!(r.messages[0]["content"], Value::Null);
    }

    #[test]
    fn limits_logprobs_and_defaults() {
        let r = parse_json(
            json!({"messages": user("x"), "max_completion_tokens": 5, "max_tokens": 9,
            "logprobs": true, "top_logprobs": 3}),
        )
        .unwrap();
        assert_eq!(
            (r.params.max_tokens, r.params.logprobs, r.top_logprobs),
            (Some(5), Some(3), Some(3))
        );
        let r = parse_json(json!({"messages": user("x")})).unwrap();
        assert_eq!(
            (
                r.params.max_tokens,
                r.params.logprobs,
                r.add_generation_prompt
            ),
            (None, None, true)
        );
        let e = parse_json(json!({"messages": user("x"), "top_logprobs": 2})).unwrap_err();
        assert_eq!(e.param(), Some("top_logprobs"));
        let e =
            parse_json(json!({"messages": user("x"), "continue_final_message": true})).unwrap_err();
        assert_eq!(e.param(), Some("continue_final_message"));
    }

    fn tool(name: &str) -> Value {
        json!({"type": "function", "function": {"name": name, "parameters": {"type": "object"}}})
    }

    #[test]
    fn tool_choice_forms() {
        let tools = json!([tool("a"), tool("b")]);
        let r = parse_json(json!({"messages": user("x"), "tools": tools})).unwrap();
        assert_eq!(r.tool_choice, ToolChoice::Auto);
        assert!(r.parses_tools());
        let r = parse_json(json!({"messages": user("x"), "tools": tools, "tool_choice": "none"}))
            .unwrap();
        assert!(!r.parses_tools());
        let r = parse_json(json!({"messages": user("x"), "tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "b"}}}))
        .unwrap();
        assert_eq!(r.tool_choice, ToolChoice::Named("b".into()));
        assert_eq!(r.tools.unwrap(), vec![tool("b")]);
        for bad in [
            json!({"messages": user("x"), "tool_choice": "required"}),
            json!({"messages": user("x"), "tool_choice": "auto"}),
            json!({"messages": user("x"), "tool_choice": "none"}),
            json!({"messages": user("x"), "functions": []}),
            json!({"messages": user("x"), "tools": tools, "tool_choice": "sometimes"}),
            json!({"messages": user("x"), "tools": tools, "tool_choice": {"type": "function", "function": {"name": "c"}}}),
            json!({"messages": user("x"), "tools": [{"type": "function"}]}),
        ] {
            let e = parse_json(bad).unwrap_err();
            assert_eq!(e.status(), 400);
        }
    }

    #[test]
    fn response_format_is_a_constraint_and_leaves_the_messages_alone() {
        let r =
            parse_json(json!({"messages": user("x"), "response_format": {"type": "json_object"}}))
                .unwrap();
        assert_eq!(r.messages.len(), 1);
        let s = r.params.structured.unwrap();
        assert_eq!(
            s.structure,
            crate::engine::constraint::Structure::JsonObject
        );
        assert!(
            parse_json(json!({"messages": user("x"), "response_format": {"type": "yaml"}}))
                .is_err()
        );
    }

    fn reply() -> Reply {
        Reply {
            id: "chatcmpl-1".into(),
            created: 1,
            model: "m".into(),
            role: "assistant".into(),
            echo: String::new(),
            prefix_caching: false,
        }
    }

    fn finish_delta(text: &str) -> ChoiceDelta {
        ChoiceDelta {
            index: 0,
            text: text.into(),
            token_ids: vec![],
            logprobs: vec![],
            finish: Some(crate::engine::Finish {
                reason: crate::engine::FinishReason::Stop,
                stop_reason: None,
            }),
        }
    }

    #[test]
    fn non_streamed_tool_calls_fill_the_message() {
        let request = parse_json(json!({"messages": user("x"), "tools": [tool("f")]})).unwrap();
        let outcome = ChoiceOutcome {
            text: "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1}}</tool_call>".into(),
            finish: finish_delta("").finish,
            ..Default::default()
        };
        let choice = reply().choice(0, &outcome, &request);
        assert_eq!(choice["finish_reason"], json!("tool_calls"));
        assert_eq!(choice["message"]["content"], Value::Null);
        assert_eq!(
            choice["message"]["tool_calls"][0]["function"],
            json!({"name": "f", "arguments": "{\"a\":1}"})
        );
        let request = parse_json(json!({"messages": user("x")})).unwrap();
        let choice = reply().choice(0, &outcome, &request);
        assert_eq!(choice["finish_reason"], json!("stop"));
        assert!(choice["message"].get("tool_calls").is_none());
    }

    #[test]
    fn streamed_tool_calls_arrive_as_deltas_at_the_end() {
        let request = parse_json(json!({"messages": user("x"), "tools": [tool("f")]})).unwrap();
        let mut choice = ChoiceStream {
            index: 0,
            detector: Some(ToolCallDetector::default()),
            reasoning: None,
        };
        let mut first = finish_delta("Hi <tool_call>{\"name\": \"f\",");
        first.finish = None;
        let chunks = choice.on_delta(&reply(), &request, first);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0]["choices"][0]["delta"], json!({"content": "Hi "}));
        let chunks = choice.on_delta(
            &reply(),
            &request,
            finish_delta(" \"arguments\": {}}</tool_call>"),
        );
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], json!("tool_calls"));
        assert_eq!(
            last["choices"][0]["delta"]["tool_calls"][0]["function"]["name"],
            json!("f")
        );
        assert_eq!(
            last["choices"][0]["delta"]["tool_calls"][0]["index"],
            json!(0)
        );
    }
}
