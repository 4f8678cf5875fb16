//! `POST /v1/responses`, OpenAI's Responses API, translated onto chat: `instructions` and the
//! `input` items (messages, `function_call`, `function_call_output`) become chat messages, after
//! those of a stored `previous_response_id`; the reply comes back as `message` and `function_call`
//! output items, streamed as the Responses events (`response.created` … `response.completed`). With
//! `REASONING_PARSER`, the model's `<think>` text comes first as a `reasoning` item (its
//! `reasoning_text` content streamed as `response.reasoning_text.delta`).

use futures::stream::BoxStream;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::chat::{self, ChatRequest};
use super::outcome::collect;
use super::params::Body;
use super::reasoning::ReasoningSplitter;
use super::response_store;
use super::tools::{ToolCall, ToolCallDetector};
use super::{OpenAiResponse, OpenAiSettings, StreamEvent};
use crate::api::error::ApiError;
use crate::engine::{ChoiceDelta, Finish, FinishReason, GenerationEvent, GenerationStream, Usage};

/// The request fields this route takes; any other is refused.
const FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "stream",
    "store",
    "previous_response_id",
    "metadata",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
    "text",
    "truncation",
    "include",
    "reasoning",
    "background",
];

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Fields {
    /// Checked against the served name by `dispatch`.
    #[allow(dead_code)]
    model: Option<String>,
    instructions: Option<String>,
    max_output_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    tools: Option<Vec<Value>>,
    parallel_tool_calls: Option<bool>,
    stream: Option<bool>,
    store: Option<bool>,
    previous_response_id: Option<String>,
    metadata: Option<Map<String, Value>>,
    user: Option<String>,
    #[allow(dead_code)]
    safety_identifier: Option<String>,
    #[allow(dead_code)]
    prompt_cache_key: Option<String>,
    #[allow(dead_code)]
    service_tier: Option<String>,
    truncation: Option<String>,
    include: Option<Vec<String>>,
    background: Option<bool>,
}

/// A parsed Responses request: the chat body it becomes and what the response echoes.
#[derive(Debug)]
struct Request {
    chat: Map<String, Value>,
    /// The conversation to store: the previous response's, then this input (no instructions).
    conversation: Vec<Value>,
    stream: bool,
    store: bool,
    /// The request's settings as the response object repeats them.
    echo: Map<String, Value>,
}

fn unsupported(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

fn parse(body: &Body<'_>) -> Result<Request, ApiError> {
    if let Some(key) = body.0.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(unsupported(
            key,
            format!("`{key}` is not a supported parameter of /v1/responses"),
        ));
    }
    let f: Fields = body.typed()?;
    if f.background == Some(true) {
        return Err(unsupported(
            "background",
            "`background` mode is not supported",
        ));
    }
    if matches!(f.truncation.as_deref(), Some(t) if t != "disabled") {
        return Err(unsupported(
            "truncation",
            "only `truncation: \"disabled\"` is supported",
        ));
    }
    if f.include.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(unsupported("include", "`include` is not supported"));
    }
    if body.raw("reasoning").is_some_and(|r| {
        r.as_object()
            .is_none_or(|o| o.values().any(|v| !v.is_null()))
    }) {
        return Err(unsupported("reasoning", "`reasoning` is not supported"));
    }
    let (text, response_format) = text_format(body.raw("text"))?;
    let stream = f.stream.unwrap_or(false);
    let store = f.store.unwrap_or(true);

    let mut conversation = match &f.previous_response_id {
        Some(id) => response_store::get(id).ok_or_else(|| {
            ApiError::not_found(format!(
                "no stored response `{id}` (responses are kept in this worker's memory, within bounds, when `store` is true)"
            ))
            .with_param("previous_response_id")
        })?,
        None => Vec::new(),
    };
    conversation.extend(input_messages(body.raw("input"))?);
    let mut messages = Vec::new();
    if let Some(instructions) = &f.instructions {
        messages.push(json!({"role": "system", "content": instructions}));
    }
    messages.extend(conversation.iter().cloned());

    let mut chat = Map::new();
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(max) = f.max_output_tokens {
        chat.insert("max_tokens".into(), json!(max));
    }
    if let Some(t) = f.temperature {
        chat.insert("temperature".into(), json!(t));
    }
    if let Some(p) = f.top_p {
        chat.insert("top_p".into(), json!(p));
    }
    let tools = f.tools.clone().unwrap_or_default();
    if !tools.is_empty() {
        chat.insert("tools".into(), Value::Array(chat_tools(&tools)?));
        if let Some(choice) = body.raw("tool_choice") {
            chat.insert("tool_choice".into(), chat_tool_choice(choice)?);
        }
    } else if let Some(choice) = body.raw("tool_choice") {
        chat_tool_choice(choice)?;
    }
    if let Some(parallel) = f.parallel_tool_calls {
        chat.insert("parallel_tool_calls".into(), json!(parallel));
    }
    if let Some(format) = response_format {
        chat.insert("response_format".into(), format);
    }

    let mut echo = Map::new();
    echo.insert("instructions".into(), json!(f.instructions));
    echo.insert("max_output_tokens".into(), json!(f.max_output_tokens));
    echo.insert("metadata".into(), json!(f.metadata.unwrap_or_default()));
    echo.insert(
        "parallel_tool_calls".into(),
        json!(f.parallel_tool_calls.unwrap_or(true)),
    );
    echo.insert("previous_response_id".into(), json!(f.previous_response_id));
    echo.insert("store".into(), json!(store));
    echo.insert("temperature".into(), json!(f.temperature.unwrap_or(1.0)));
    echo.insert("text".into(), text);
    echo.insert(
        "tool_choice".into(),
        body.raw("tool_choice").cloned().unwrap_or(json!("auto")),
    );
    echo.insert("tools".into(), Value::Array(tools));
    echo.insert("top_p".into(), json!(f.top_p.unwrap_or(1.0)));
    echo.insert("truncation".into(), json!("disabled"));
    echo.insert("user".into(), json!(f.user));
    Ok(Request {
        chat,
        conversation,
        stream,
        store,
        echo,
    })
}

/// `text`: its echo and, for `format` `json_schema` (`{name, schema, strict}`) or `json_object`, chat's
/// `response_format` (enforced by constrained decoding).
fn text_format(text: Option<&Value>) -> Result<(Value, Option<Value>), ApiError> {
    let plain = json!({"format": {"type": "text"}});
    let Some(text) = text else {
        return Ok((plain, None));
    };
    let Some(fields) = text.as_object() else {
        return Err(unsupported("text", "`text` must be an object"));
    };
    if let Some(key) = fields.keys().find(|k| *k != "format") {
        return Err(unsupported(
            "text",
            format!("`text.{key}` is not supported"),
        ));
    }
    let Some(format) = fields.get("format").filter(|f| !f.is_null()) else {
        return Ok((plain, None));
    };
    let chat_format = match format.get("type").and_then(Value::as_str) {
        Some("text") => return Ok((plain, None)),
        Some("json_object") => json!({"type": "json_object"}),
        Some("json_schema") => {
            let mut schema = Map::new();
            for key in ["name", "schema", "strict", "description"] {
                if let Some(v) = format.get(key) {
                    schema.insert(key.into(), v.clone());
                }
            }
            json!({"type": "json_schema", "json_schema": schema})
        }
        _ => {
            return Err(unsupported(
                "text",
                format!(
                    "`text.format` must be text, json_object or json_schema, got {}",
                    format.get("type").unwrap_or(&Value::Null)
                ),
            ))
        }
    };
    Ok((text.clone(), Some(chat_format)))
}

/// The text of a content: a string, or `input_text` / `output_text` parts.
fn content_text(content: Option<&Value>, at: &str) -> Result<String, ApiError> {
    let invalid = |m: String| ApiError::invalid("input", m);
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(j, part)| match part.get("type").and_then(Value::as_str) {
                Some("input_text" | "output_text" | "text") => part
                    .get("text")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| invalid(format!("{at}.content[{j}] needs a string `text`"))),
                Some(other) => Err(invalid(format!(
                    "{at}.content[{j}]: content of type `{other}` is not supported (text only)"
                ))),
                None => Err(invalid(format!("{at}.content[{j}] needs a `type`"))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|texts| texts.join("\n")),
        _ => Err(invalid(format!(
            "{at}.content must be a string or a list of input_text parts"
        ))),
    }
}

/// `input` as chat messages: a string is one user message; items are messages, `function_call`s
/// (an assistant message's tool calls) and `function_call_output`s (tool messages).
fn input_messages(input: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let invalid = |m: String| ApiError::invalid("input", m);
    let items = match input {
        None => return Err(invalid("`input` is required".into())),
        Some(Value::String(text)) => return Ok(vec![json!({"role": "user", "content": text})]),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(invalid(
                "`input` must be a string or a list of items".into(),
            ))
        }
    };
    let mut messages: Vec<Value> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let str_field = |key: &str| {
            item.get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| invalid(format!("{at} needs a string `{key}`")))
        };
        match item.get("type").and_then(Value::as_str) {
            None | Some("message") => {
                let role = match str_field("role")?.as_str() {
                    "developer" | "system" => "system",
                    "user" => "user",
                    "assistant" => "assistant",
                    other => return Err(invalid(format!("{at}: unknown role `{other}`"))),
                };
                let content = content_text(item.get("content"), &at)?;
                messages.push(json!({"role": role, "content": content}));
            }
            Some("function_call") => {
                let call = json!({"id": str_field("call_id")?, "type": "function",
                    "function": {"name": str_field("name")?, "arguments": str_field("arguments")?}});
                match messages.last_mut() {
                    Some(last) if last["role"] == "assistant" => {
                        match last.get_mut("tool_calls").and_then(Value::as_array_mut) {
                            Some(calls) => calls.push(call),
                            None => last["tool_calls"] = json!([call]),
                        }
                    }
                    _ => messages.push(
                        json!({"role": "assistant", "content": null, "tool_calls": [call]}),
                    ),
                }
            }
            Some("function_call_output") => {
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    other => content_text(other, &at)?,
                };
                messages.push(
                    json!({"role": "tool", "tool_call_id": str_field("call_id")?, "content": output}),
                );
            }
            // Reasoning items of earlier outputs are dropped (this worker produces none).
            Some("reasoning") => {}
            Some(other) => {
                return Err(invalid(format!(
                    "{at}: items of type `{other}` are not supported (message, function_call, function_call_output)"
                )))
            }
        }
    }
    if messages.is_empty() {
        return Err(invalid("`input` must not be empty".into()));
    }
    Ok(messages)
}

/// Responses' flat function tools as chat tools.
fn chat_tools(tools: &[Value]) -> Result<Vec<Value>, ApiError> {
    tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            let name = tool.get("name").and_then(Value::as_str);
            match (tool.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => {
                    let mut function = json!({"name": name});
                    for key in ["description", "parameters", "strict"] {
                        if let Some(v) = tool.get(key).filter(|v| !v.is_null()) {
                            function[key] = v.clone();
                        }
                    }
                    Ok(json!({"type": "function", "function": function}))
                }
                (Some("function"), None) => Err(ApiError::invalid(
                    "tools",
                    format!("tools[{i}] needs a string `name`"),
                )),
                (other, _) => Err(ApiError::invalid(
                    "tools",
                    format!(
                        "tools[{i}]: tools of type {} are not supported (function tools only)",
                        other.unwrap_or("null")
                    ),
                )),
            }
        })
        .collect()
}

/// Responses' `tool_choice` (`"auto"`, `"none"`, `"required"`, `{"type": "function", "name"}`).
fn chat_tool_choice(choice: &Value) -> Result<Value, ApiError> {
    match choice {
        Value::String(s) if ["auto", "none", "required"].contains(&s.as_str()) => {
            Ok(choice.clone())
        }
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            match o.get("name").and_then(Value::as_str) {
                Some(name) => Ok(json!({"type": "function", "function": {"name": name}})),
                None => Err(ApiError::invalid(
                    "tool_choice",
                    "a function `tool_choice` needs a `name`",
                )),
            }
        }
        _ => Err(ApiError::invalid(
            "tool_choice",
            "`tool_choice` must be auto, none, required or {\"type\": \"function\", \"name\": ...}",
        )),
    }
}

/// An error of the chat request this one became, naming this route's parameter.
fn own_param(e: ApiError) -> ApiError {
    match e.param() {
        Some("messages") => e.with_param("input"),
        Some("max_tokens") => e.with_param("max_output_tokens"),
        _ => e,
    }
}

/// `prefix_` and 32 hex digits, like OpenAI's ids.
fn new_id(prefix: &str) -> String {
    format!("{prefix}_{:032x}", rand::random::<u128>())
}

fn usage(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.total_tokens(),
    })
}

/// The response object's fixed parts, the output items it grows, and what gets stored.
struct Reply {
    id: String,
    created_at: u64,
    model: String,
    echo: Map<String, Value>,
    conversation: Vec<Value>,
    store: bool,
    parallel_tool_calls: bool,
}

impl Reply {
    fn object(
        &self,
        status: &str,
        output: &[Value],
        usage: Value,
        finish: Option<&Finish>,
    ) -> Value {
        let incomplete = matches!(finish, Some(f) if f.reason == FinishReason::Length);
        let mut body = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": null,
            "incomplete_details": if incomplete && status != "in_progress" {
                json!({"reason": "max_output_tokens"})
            } else {
                Value::Null
            },
            "model": self.model,
            "output": output,
            "usage": usage,
        });
        for (k, v) in &self.echo {
            body[k] = v.clone();
        }
        body
    }

    fn status(finish: Option<&Finish>) -> &'static str {
        match finish.map(|f| f.reason) {
            Some(FinishReason::Length) => "incomplete",
            _ => "completed",
        }
    }

    fn message_item(id: &str, text: &str, status: &str) -> Value {
        json!({"type": "message", "id": id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
    }

    fn reasoning_item(id: &str, text: &str, status: &str) -> Value {
        json!({"type": "reasoning", "id": id, "status": status, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]})
    }

    fn call_item(id: &str, call: &ToolCall, status: &str) -> Value {
        json!({"type": "function_call", "id": id, "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": status})
    }

    /// Keeps the conversation with this reply for a later `previous_response_id`, and the response
    /// object for `GET /v1/responses/{id}`.
    fn remember(&self, text: &str, calls: &[ToolCall], object: &Value) {
        if !self.store {
            return;
        }
        let mut conversation = self.conversation.clone();
        let mut reply = json!({"role": "assistant", "content": text});
        if !calls.is_empty() {
            reply["tool_calls"] = Value::Array(
                calls
                    .iter()
                    .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                    .collect(),
            );
            if text.is_empty() {
                reply["content"] = Value::Null;
            }
        }
        conversation.push(reply);
        response_store::put(&self.id, conversation, object.clone());
    }

    /// Text and tool calls of a whole reply.
    fn split(&self, request: &ChatRequest, text: &str) -> (String, Vec<ToolCall>) {
        if let Some((content, mut calls)) = request.tool_calls_in(text) {
            if !self.parallel_tool_calls {
                calls.truncate(1);
            }
            return (content.unwrap_or_default(), calls);
        }
        (text.to_string(), Vec::new())
    }

    /// The output items: the reasoning (with a reasoning parser, when the model reasoned), a message
    /// (unless the reply is only tool calls), then the calls.
    fn output(
        &self,
        reasoning: Option<&str>,
        message_id: &str,
        text: &str,
        calls: &[ToolCall],
    ) -> Vec<Value> {
        let mut output = Vec::new();
        if let Some(r) = reasoning {
            output.push(Self::reasoning_item(&new_id("rs"), r, "completed"));
        }
        if !text.is_empty() || calls.is_empty() {
            output.push(Self::message_item(message_id, text, "completed"));
        }
        output.extend(
            calls
                .iter()
                .map(|c| Self::call_item(&new_id("fc"), c, "completed")),
        );
        output
    }
}

/// `GET /v1/responses/{id}`: a stored response object; OpenAI's 404 when unknown or expired.
pub(crate) fn retrieve(id: &str) -> Result<Value, ApiError> {
    response_store::retrieve(id).ok_or_else(|| not_stored(id))
}

/// `DELETE /v1/responses/{id}`: forgets a stored response; OpenAI's 404 when unknown or expired.
pub(crate) fn delete(id: &str) -> Result<Value, ApiError> {
    if response_store::delete(id) {
        Ok(json!({"id": id, "object": "response", "deleted": true}))
    } else {
        Err(not_stored(id))
    }
}

fn not_stored(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "Response with id '{id}' not found (responses are kept in this worker's memory, within the RESPONSES_STORE_* bounds, when `store` is true)"
    ))
}

pub(crate) async fn handle(
    engine: &crate::engine::Engine,
    settings: &OpenAiSettings,
    body: &Body<'_>,
) -> Result<OpenAiResponse, ApiError> {
    let request = parse(body)?;
    let id = new_id("resp");
    let (chat, events) = chat::start(engine, &Body(&request.chat), &id).map_err(own_param)?;
    let reply = Reply {
        id,
        created_at: super::shapes::unix_now(),
        model: settings.served_model_name.clone(),
        echo: request.echo,
        conversation: request.conversation,
        store: request.store,
        parallel_tool_calls: chat.parallel_tool_calls,
    };
    if request.stream {
        return Ok(OpenAiResponse::Stream(stream_events(reply, chat, events)));
    }
    let outcome = collect(events, 1).await.map_err(own_param)?;
    let choice = outcome.choices.first().cloned().unwrap_or_default();
    let (reasoning, answer) = match chat.reasoning {
        Some(in_reasoning) => ReasoningSplitter::split(in_reasoning, &choice.text),
        None => (None, choice.text.clone()),
    };
    let (text, calls) = reply.split(&chat, &answer);
    let output = reply.output(reasoning.as_deref(), &new_id("msg"), &text, &calls);
    let finish = choice.finish.as_ref();
    let object = reply.object(
        Reply::status(finish),
        &output,
        usage(&outcome.usage),
        finish,
    );
    reply.remember(&text, &calls, &object);
    Ok(OpenAiResponse::Json(object))
}

/// The Responses events of one streamed reply, numbered by `sequence_number`.
struct Events {
    reply: Reply,
    sequence: u64,
    message_id: String,
    /// Whether the message item is open, its place in the output, and its text so far.
    message_open: bool,
    message_index: usize,
    text: String,
    /// `REASONING_PARSER` on: splits the reasoning from the answer as it streams.
    reasoning: Option<ReasoningSplitter>,
    /// The reasoning item's id, whether it is open, and its text so far.
    reasoning_id: String,
    reasoning_open: bool,
    reasoning_text: String,
    detector: Option<ToolCallDetector>,
    /// Output items finished so far.
    output: Vec<Value>,
    calls: Vec<ToolCall>,
    finish: Option<Finish>,
}

impl Events {
    fn event(&mut self, kind: &str, fields: Value) -> StreamEvent {
        let mut event = json!({"type": kind, "sequence_number": self.sequence});
        if let Value::Object(fields) = fields {
            for (k, v) in fields {
                event[k] = v;
            }
        }
        self.sequence += 1;
        StreamEvent::Data(event)
    }

    fn lifecycle(&mut self, kind: &str, status: &str, usage: Value) -> StreamEvent {
        let response = self
            .reply
            .object(status, &self.output.clone(), usage, self.finish.as_ref());
        self.event(kind, json!({"response": response}))
    }

    fn open_message(&mut self) -> Vec<StreamEvent> {
        if self.message_open {
            return Vec::new();
        }
        self.message_open = true;
        self.message_index = self.output.len();
        let index = self.message_index;
        let item = json!({"type": "message", "id": self.message_id, "status": "in_progress",
            "role": "assistant", "content": []});
        let id = self.message_id.clone();
        vec![
            self.event("response.output_item.added", json!({"output_index": index, "item": item})),
            self.event(
                "response.content_part.added",
                json!({"item_id": id, "output_index": index, "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
            ),
        ]
    }

    fn on_text(&mut self, text: &str) -> Vec<StreamEvent> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut events = self.open_message();
        self.text.push_str(text);
        let (id, index) = (self.message_id.clone(), self.message_index);
        events.push(self.event(
            "response.output_text.delta",
            json!({"item_id": id, "output_index": index, "content_index": 0, "delta": text, "logprobs": []}),
        ));
        events
    }

    /// Reasoning text: the reasoning item opens (first in the output) with its first piece.
    fn on_reasoning(&mut self, text: &str) -> Vec<StreamEvent> {
        let mut events = Vec::new();
        if text.is_empty() {
            return events;
        }
        let id = self.reasoning_id.clone();
        if !self.reasoning_open {
            self.reasoning_open = true;
            let mut item = Reply::reasoning_item(&id, "", "in_progress");
            item["content"] = json!([]);
            events.push(self.event(
                "response.output_item.added",
                json!({"output_index": 0, "item": item}),
            ));
            events.push(self.event(
                "response.content_part.added",
                json!({"item_id": id, "output_index": 0, "content_index": 0,
                    "part": {"type": "reasoning_text", "text": ""}}),
            ));
        }
        self.reasoning_text.push_str(text);
        events.push(self.event(
            "response.reasoning_text.delta",
            json!({"item_id": id, "output_index": 0, "content_index": 0, "delta": text}),
        ));
        events
    }

    /// The end of the reasoning (the answer begins, or the reply ends): its item is done.
    fn close_reasoning(&mut self) -> Vec<StreamEvent> {
        if !self.reasoning_open {
            return Vec::new();
        }
        self.reasoning_open = false;
        let (id, text) = (self.reasoning_id.clone(), self.reasoning_text.clone());
        let item = Reply::reasoning_item(&id, &text, "completed");
        self.output.push(item.clone());
        vec![
            self.event(
                "response.reasoning_text.done",
                json!({"item_id": id, "output_index": 0, "content_index": 0, "text": text}),
            ),
            self.event(
                "response.content_part.done",
                json!({"item_id": id, "output_index": 0, "content_index": 0,
                    "part": {"type": "reasoning_text", "text": text}}),
            ),
            self.event(
                "response.output_item.done",
                json!({"output_index": 0, "item": item}),
            ),
        ]
    }

    /// Answer text: past the tool-call detector, into the message.
    fn on_answer(&mut self, answer: &str) -> Vec<StreamEvent> {
        let text = match &mut self.detector {
            Some(d) => d.push(answer),
            None => answer.to_string(),
        };
        self.on_text(&text)
    }

    fn on_delta(&mut self, delta: ChoiceDelta) -> Vec<StreamEvent> {
        let (thought, answer) = match &mut self.reasoning {
            Some(s) => s.push(&delta.text),
            None => (String::new(), delta.text),
        };
        let mut events = self.on_reasoning(&thought);
        if !answer.is_empty() {
            events.extend(self.close_reasoning());
        }
        events.extend(self.on_answer(&answer));
        let Some(finish) = delta.finish else {
            return events;
        };
        if let Some(mut splitter) = self.reasoning.take() {
            let (thought, answer) = splitter.finish();
            events.extend(self.on_reasoning(&thought));
            events.extend(self.close_reasoning());
            events.extend(self.on_answer(&answer));
        }
        self.finish = Some(finish);
        if let Some(detector) = self.detector.take() {
            let detected = detector.finish();
            events.extend(self.on_text(&detected.text));
            self.calls = detected.calls;
            if !self.reply.parallel_tool_calls {
                self.calls.truncate(1);
            }
        }
        if self.calls.is_empty() {
            events.extend(self.open_message());
        }
        if self.message_open {
            let (id, text, index) = (
                self.message_id.clone(),
                self.text.clone(),
                self.message_index,
            );
            events.push(self.event(
                "response.output_text.done",
                json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
            ));
            events.push(self.event(
                "response.content_part.done",
                json!({"item_id": id, "output_index": index, "content_index": 0,
                    "part": {"type": "output_text", "text": text, "annotations": [], "logprobs": []}}),
            ));
            let item = Reply::message_item(&id, &text, "completed");
            self.output.push(item.clone());
            events.push(self.event(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            ));
        }
        for call in self.calls.clone() {
            let index = self.output.len();
            let item_id = new_id("fc");
            let mut item = Reply::call_item(&item_id, &call, "in_progress");
            item["arguments"] = json!("");
            events.push(self.event(
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            ));
            events.push(self.event(
                "response.function_call_arguments.delta",
                json!({"item_id": item_id, "output_index": index, "delta": call.arguments}),
            ));
            events.push(self.event(
                "response.function_call_arguments.done",
                json!({"item_id": item_id, "output_index": index, "name": call.name, "arguments": call.arguments}),
            ));
            let item = Reply::call_item(&item_id, &call, "completed");
            self.output.push(item.clone());
            events.push(self.event(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            ));
        }
        events
    }
}

fn stream_events(
    reply: Reply,
    request: ChatRequest,
    events: GenerationStream,
) -> BoxStream<'static, StreamEvent> {
    let mut state = Events {
        reply,
        sequence: 0,
        message_id: new_id("msg"),
        message_open: false,
        message_index: 0,
        text: String::new(),
        reasoning: request.reasoning.map(ReasoningSplitter::new),
        reasoning_id: new_id("rs"),
        reasoning_open: false,
        reasoning_text: String::new(),
        detector: request.tool_detector(),
        output: Vec::new(),
        calls: Vec::new(),
        finish: None,
    };
    async_stream::stream! {
        yield state.lifecycle("response.created", "in_progress", Value::Null);
        yield state.lifecycle("response.in_progress", "in_progress", Value::Null);
        futures::pin_mut!(events);
        while let Some(event) = events.next().await {
            match event {
                GenerationEvent::Prompt { .. } => {}
                GenerationEvent::Delta(delta) => {
                    for e in state.on_delta(delta) {
                        yield e;
                    }
                }
                GenerationEvent::Done { usage: u, .. } => {
                    let status = Reply::status(state.finish.as_ref());
                    let kind = if status == "incomplete" { "response.incomplete" } else { "response.completed" };
                    let last = state.lifecycle(kind, status, usage(&u));
                    if let StreamEvent::Data(event) = &last {
                        state.reply.remember(&state.text, &state.calls, &event["response"]);
                    }
                    yield last;
                    return;
                }
                GenerationEvent::Error(e) => {
                    yield StreamEvent::Error(own_param(e.into()));
                    return;
                }
            }
        }
        yield StreamEvent::Error(ApiError::internal("the engine ended the request without finishing it"));
    }
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_json(v: Value) -> Result<Request, ApiError> {
        parse(&Body(v.as_object().unwrap()))
    }

    #[test]
    fn input_items_become_chat_messages() {
        let r = parse_json(json!({
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                {"type": "message", "role": "developer", "content": "Answer in French."},
            ],
            "max_output_tokens": 7, "temperature": 0.5,
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get_weather"},
        }))
        .unwrap();
        assert_eq!(
            r.chat["messages"],
            json!([
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "system", "content": "Answer in French."},
            ])
        );
        assert_eq!(r.conversation.len(), 4, "the instructions are not stored");
        assert_eq!(
            r.chat["tools"],
            json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
        );
        assert_eq!(
            r.chat["tool_choice"],
            json!({"type": "function", "function": {"name": "get_weather"}})
        );
        let chat = chat::parse(&Body(&r.chat)).unwrap();
        assert_eq!(chat.params.max_tokens, Some(7));
        assert_eq!(
            chat.messages[2]["tool_calls"][0]["function"]["arguments"],
            json!({"city": "Paris"})
        );
        assert_eq!((r.stream, r.store), (false, true));
    }

    #[test]
    fn unsupported_requests_are_refused_naming_the_parameter() {
        for (body, param) in [
            (json!({"input": "x", "frobnicate": 1}), "frobnicate"),
            (
                json!({"input": "x", "text": {"format": {"type": "xml"}}}),
                "text",
            ),
            (
                json!({"input": "x", "tools": [{"type": "web_search"}]}),
                "tools",
            ),
            (
                json!({"input": [{"type": "input_image", "image_url": "x"}]}),
                "input",
            ),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
                "input",
            ),
            (json!({"input": []}), "input"),
            (json!({}), "input"),
            (
                json!({"input": "x", "max_output_tokens": "many"}),
                "max_output_tokens",
            ),
            (
                json!({"input": "x", "previous_response_id": "resp_nope"}),
                "previous_response_id",
            ),
            (json!({"input": "x", "background": true}), "background"),
            (
                json!({"input": "x", "reasoning": {"effort": "high"}}),
                "reasoning",
            ),
        ] {
            let e = parse_json(body.clone()).unwrap_err();
            assert_eq!(e.param(), Some(param), "{body}");
            assert!(e.status() == 400 || e.status() == 404, "{body}");
        }
        let r = parse_json(
            json!({"input": "x", "text": {"format": {"type": "text"}}, "tool_choice": "auto",
            "store": false, "truncation": "disabled", "include": [], "reasoning": null}),
        )
        .unwrap();
        assert_eq!(r.echo["text"], json!({"format": {"type": "text"}}));
        assert!(
            !r.chat.contains_key("tool_choice"),
            "no tools, no tool_choice"
        );
    }

    #[test]
    fn previous_responses_continue_the_conversation() {
        let stored = vec![
            json!({"role": "user", "content": "Hi"}),
            json!({"role": "assistant", "content": "Hello"}),
        ];
        response_store::put("resp_test_previous", stored, Value::Null);
        let r = parse_json(json!({"input": "Again", "instructions": "New rules.",
            "previous_response_id": "resp_test_previous"}))
        .unwrap();
        let roles: Vec<&str> = r.chat["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(r.echo["previous_response_id"], json!("resp_test_previous"));
    }

    fn reply(parallel: bool) -> Reply {
        Reply {
            id: "resp_1".into(),
            created_at: 1,
            model: "m".into(),
            echo: Map::new(),
            conversation: vec![json!({"role": "user", "content": "x"})],
            store: false,
            parallel_tool_calls: parallel,
        }
    }

    fn delta(text: &str, finish: Option<FinishReason>) -> ChoiceDelta {
        ChoiceDelta {
            index: 0,
            text: text.into(),
            token_ids: vec![],
            logprobs: vec![],
            finish: finish.map(|reason| Finish {
                reason,
                stop_reason: None,
            }),
        }
    }

    fn types(events: &[StreamEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                StreamEvent::Data(v) => v["type"].as_str().unwrap().to_string(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    /// A streamed reply's state, its sequence numbers from `sequence`.
    fn events(
        sequence: u64,
        detector: Option<ToolCallDetector>,
        reasoning: Option<bool>,
    ) -> Events {
        Events {
            reply: reply(true),
            sequence,
            message_id: "msg_1".into(),
            message_open: false,
            message_index: 0,
            text: String::new(),
            reasoning: reasoning.map(ReasoningSplitter::new),
            reasoning_id: "rs_1".into(),
            reasoning_open: false,
            reasoning_text: String::new(),
            detector,
            output: vec![],
            calls: vec![],
            finish: None,
        }
    }

    /// With a reasoning parser, the `<think>` text is a `reasoning` item before the message, streamed
    /// as `reasoning_text` events however the markers are cut, and the message moves to output 1.
    #[test]
    fn reasoning_comes_first_as_its_own_item() {
        for cut in 1..12 {
            let text = "<think>pick a number</think>\n42";
            let mut ev = events(0, None, Some(false));
            let mut all = ev.on_delta(delta(&text[..cut], None));
            all.extend(ev.on_delta(delta(&text[cut..], Some(FinishReason::Stop))));
            let kinds = types(&all);
            let first_answer = kinds
                .iter()
                .position(|k| k == "response.output_text.delta")
                .unwrap();
            let reasoning_done = kinds
                .iter()
                .position(|k| k == "response.reasoning_text.done")
                .unwrap();
            assert!(reasoning_done < first_answer, "cut {cut}: {kinds:?}");
            assert_eq!(
                ev.output,
                vec![
                    Reply::reasoning_item("rs_1", "pick a number", "completed"),
                    Reply::message_item("msg_1", "\n42", "completed"),
                ],
                "cut {cut}"
            );
            let StreamEvent::Data(last) = all.last().unwrap() else {
                panic!()
            };
            assert_eq!(last["output_index"], json!(1), "cut {cut}");
            assert_eq!(
                ev.text, "\n42",
                "only the answer is kept for the conversation"
            );
        }
        // Still reasoning when the reply ends: one reasoning item and an empty message.
        let mut ev = events(0, None, Some(true));
        ev.on_delta(delta("thinking on", Some(FinishReason::Length)));
        assert_eq!(
            ev.output,
            vec![
                Reply::reasoning_item("rs_1", "thinking on", "completed"),
                Reply::message_item("msg_1", "", "completed"),
            ]
        );
        // Whole replies put the same items in the same order.
        let out = reply(true).output(Some("pick a number"), "msg_1", "\n42", &[]);
        assert_eq!(out[0]["type"], json!("reasoning"));
        assert_eq!(out[0]["content"][0]["text"], json!("pick a number"));
        assert_eq!(out[1], Reply::message_item("msg_1", "\n42", "completed"));
    }

    #[test]
    fn streamed_text_follows_the_responses_event_order() {
        let mut events = events(2, None, None);
        let mut all = events.on_delta(delta("Hel", None));
        all.extend(events.on_delta(delta("lo", Some(FinishReason::Stop))));
        assert_eq!(
            types(&all),
            [
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
            ]
        );
        let StreamEvent::Data(done) = &all[4] else {
            panic!()
        };
        assert_eq!(
            (done["text"].clone(), done["sequence_number"].clone()),
            (json!("Hello"), json!(6))
        );
        assert_eq!(
            events.output,
            vec![Reply::message_item("msg_1", "Hello", "completed")]
        );
    }

    #[test]
    fn tool_calls_become_function_call_items() {
        let text = "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>";
        let mut events = events(0, Some(ToolCallDetector::default()), None);
        let all = events.on_delta(delta(text, Some(FinishReason::Stop)));
        assert_eq!(
            types(&all),
            [
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
            ]
        );
        let StreamEvent::Data(done) = &all[3] else {
            panic!()
        };
        assert_eq!(done["item"]["name"], json!("get_weather"));
        assert_eq!(done["item"]["arguments"], json!("{\"city\":\"Paris\"}"));
        assert!(done["item"]["call_id"]
            .as_str()
            .unwrap()
            .starts_with("call_"));

        // Not streamed: the same call as an output item, with no empty message before it.
        let request = chat::parse(&Body(
            json!({"messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "get_weather"}}]})
            .as_object()
            .unwrap(),
        ))
        .unwrap();
        let (content, calls) = reply(true).split(&request, &format!("Sure.{text}"));
        let output = reply(true).output(None, "msg_1", &content, &calls);
        assert_eq!(output.len(), 2);
        assert_eq!(output[0]["content"][0]["text"], json!("Sure."));
        assert_eq!(output[1]["type"], json!("function_call"));
        assert_eq!(output[1]["name"], json!("get_weather"));
    }

    #[test]
    fn a_stored_reply_carries_its_tool_calls() {
        let mut r = reply(true);
        r.store = true;
        r.id = "resp_test_stored".into();
        let call = ToolCall {
            id: "call_1".into(),
            name: "f".into(),
            arguments: "{}".into(),
        };
        r.remember(
            "",
            &[call],
            &json!({"id": "resp_test_stored", "object": "response"}),
        );
        let stored = response_store::get("resp_test_stored").unwrap();
        assert_eq!(stored.len(), 2);
        assert_eq!(stored[1]["content"], Value::Null);
        assert_eq!(stored[1]["tool_calls"][0]["id"], json!("call_1"));
    }

    #[test]
    fn chat_errors_name_the_responses_parameters() {
        let e = own_param(ApiError::invalid("messages", "the prompt is too long"));
        assert_eq!(e.param(), Some("input"));
        let e = own_param(ApiError::invalid("max_tokens", "too many"));
        assert_eq!(e.param(), Some("max_output_tokens"));
        assert_eq!(
            own_param(ApiError::invalid("top_p", "x")).param(),
            Some("top_p")
        );
    }

    #[test]
    fn usage_has_the_responses_shape() {
        let u = usage(&Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
        });
        assert_eq!(
            (
                u["input_tokens"].clone(),
                u["output_tokens"].clone(),
                u["total_tokens"].clone()
            ),
            (json!(3), json!(4), json!(7))
        );
        let incomplete = reply(true).object(
            "incomplete",
            &[],
            u,
            Some(&Finish {
                reason: FinishReason::Length,
                stop_reason: None,
            }),
        );
        assert_eq!(
            incomplete["incomplete_details"],
            json!({"reason": "max_output_tokens"})
        );
    }
}
