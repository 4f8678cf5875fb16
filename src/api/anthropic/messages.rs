//! `POST /v1/messages`: Anthropic's Messages API as a chat request. `system` and the `messages`
//! (text, `tool_use` and `tool_result` blocks) become chat messages, `tools` chat tools; the reply
//! comes back as `text` and `tool_use` content blocks with Anthropic's stop reasons, streamed as its
//! events (`message_start` … `message_stop`).

use futures::stream::BoxStream;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::api::error::ApiError;
use crate::api::openai::chat::{self, ChatRequest};
use crate::api::openai::outcome::collect;
use crate::api::openai::params::Body;
use crate::api::openai::reasoning::ReasoningSplitter;
use crate::api::openai::tools::{new_call_id, ToolCall, ToolCallDetector};
use crate::api::openai::{OpenAiResponse, OpenAiSettings, StreamEvent};
use crate::engine::{
    ChoiceDelta, Engine, Finish, FinishReason, GenerationEvent, GenerationStream, StopReason,
};

/// The request fields this route takes; any other is refused.
const FIELDS: &[&str] = &[
    "model",
    "messages",
    "system",
    "max_tokens",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "stream",
    "metadata",
    "service_tier",
    "thinking",
    "cache_control",
];

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Fields {
    max_tokens: Option<usize>,
    stop_sequences: Option<Vec<String>>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    tools: Option<Vec<Value>>,
    stream: Option<bool>,
    #[allow(dead_code)]
    metadata: Option<Map<String, Value>>,
    #[allow(dead_code)]
    service_tier: Option<String>,
    /// A prompt-caching hint; caching here is automatic (prefix caching).
    #[allow(dead_code)]
    cache_control: Option<Value>,
}

/// A parsed Messages request: the chat body it becomes.
#[derive(Debug)]
struct Request {
    chat: Map<String, Value>,
    stream: bool,
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

fn parse(body: &Body<'_>) -> Result<Request, ApiError> {
    if let Some(key) = body.0.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(invalid(
            key,
            format!(
                "{key}: Extra inputs are not permitted (not a supported parameter of /v1/messages)"
            ),
        ));
    }
    let f: Fields = body.typed()?;
    let Some(max_tokens) = f.max_tokens else {
        return Err(invalid("max_tokens", "max_tokens: Field required"));
    };
    if max_tokens == 0 {
        return Err(invalid("max_tokens", "max_tokens: must be at least 1"));
    }
    if body
        .raw("thinking")
        .is_some_and(|t| t.get("type").and_then(Value::as_str) != Some("disabled"))
    {
        return Err(invalid(
            "thinking",
            "thinking: extended thinking is not supported",
        ));
    }
    let mut messages = Vec::new();
    match body.raw("system") {
        None => {}
        Some(system) => {
            let text = blocks_text(system, "system")?;
            messages.push(json!({"role": "system", "content": text}));
        }
    }
    messages.extend(chat_messages(body.raw("messages"))?);

    let mut chat = Map::new();
    chat.insert("messages".into(), Value::Array(messages));
    chat.insert("max_tokens".into(), json!(max_tokens));
    if let Some(stop) = f.stop_sequences {
        chat.insert("stop".into(), json!(stop));
    }
    if let Some(t) = f.temperature {
        chat.insert("temperature".into(), json!(t));
    }
    if let Some(p) = f.top_p {
        chat.insert("top_p".into(), json!(p));
    }
    if let Some(k) = f.top_k {
        chat.insert("top_k".into(), json!(k));
    }
    let tools = f.tools.unwrap_or_default();
    let choice = body.raw("tool_choice").map(tool_choice).transpose()?;
    if !tools.is_empty() {
        chat.insert("tools".into(), Value::Array(chat_tools(&tools)?));
        if let Some((choice, parallel)) = choice {
            chat.insert("tool_choice".into(), choice);
            chat.insert("parallel_tool_calls".into(), json!(parallel));
        }
    }
    Ok(Request {
        chat,
        stream: f.stream.unwrap_or(false),
    })
}

/// A string, or a list of `text` blocks, as one text.
fn blocks_text(value: &Value, at: &str) -> Result<String, ApiError> {
    let param = at.split(['.', '[']).next().unwrap_or(at);
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => blocks
            .iter()
            .enumerate()
            .map(
                |(j, block)| match block.get("type").and_then(Value::as_str) {
                    Some("text") => block
                        .get("text")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .ok_or_else(|| invalid(param, format!("{at}.{j}.text: Field required"))),
                    other => Err(invalid(
                        param,
                        format!(
                            "{at}.{j}: blocks of type {} are not supported here (text only)",
                            other.unwrap_or("null")
                        ),
                    )),
                },
            )
            .collect::<Result<Vec<_>, _>>()
            .map(|texts| texts.join("\n")),
        _ => Err(invalid(
            param,
            format!("{at}: must be a string or a list of text blocks"),
        )),
    }
}

/// `messages` as chat messages: text blocks joined, an assistant's `tool_use` blocks as tool calls,
/// a user's `tool_result` blocks as tool messages (before the rest of that user turn).
fn chat_messages(value: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let items = match value {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => {
            return Err(invalid(
                "messages",
                "messages: at least one message is required",
            ))
        }
        None => return Err(invalid("messages", "messages: Field required")),
        Some(_) => return Err(invalid("messages", "messages: must be a list of messages")),
    };
    let mut out = Vec::new();
    for (i, message) in items.iter().enumerate() {
        let at = format!("messages.{i}");
        let role = match message.get("role").and_then(Value::as_str) {
            Some(role @ ("user" | "assistant")) => role,
            _ => {
                return Err(invalid(
                    "messages",
                    format!("{at}.role: must be \"user\" or \"assistant\""),
                ))
            }
        };
        let blocks = match message.get("content") {
            Some(Value::String(text)) => {
                out.push(json!({"role": role, "content": text}));
                continue;
            }
            Some(Value::Array(blocks)) => blocks,
            _ => {
                return Err(invalid(
                    "messages",
                    format!("{at}.content: must be a string or a list of content blocks"),
                ))
            }
        };
        let mut texts = Vec::new();
        let mut calls = Vec::new();
        for (j, block) in blocks.iter().enumerate() {
            let at = format!("{at}.content.{j}");
            let field = |key: &str| {
                block
                    .get(key)
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid("messages", format!("{at}.{key}: Field required")))
            };
            match block.get("type").and_then(Value::as_str) {
                Some("text") => texts.push(field("text")?.to_string()),
                Some("tool_use") if role == "assistant" => {
                    let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                    calls.push(json!({"id": field("id")?, "type": "function",
                        "function": {"name": field("name")?, "arguments": input.to_string()}}));
                }
                Some("tool_result") if role == "user" => {
                    let content = match block.get("content") {
                        None | Some(Value::Null) => String::new(),
                        Some(content) => {
                            blocks_text(content, &format!("messages.{i}.content.{j}.content"))?
                        }
                    };
                    let content = if block.get("is_error").and_then(Value::as_bool) == Some(true) {
                        format!("Error: {content}")
                    } else {
                        content
                    };
                    out.push(json!({"role": "tool", "tool_call_id": field("tool_use_id")?, "content": content}));
                }
                // Earlier turns' thinking is not shown to the model again.
                Some("thinking" | "redacted_thinking") if role == "assistant" => {}
                other => {
                    return Err(invalid(
                        "messages",
                        format!(
                            "{at}: content blocks of type {} are not supported in {role} messages",
                            other.unwrap_or("null")
                        ),
                    ))
                }
            }
        }
        if texts.is_empty() && calls.is_empty() && role == "user" {
            continue; // only tool results
        }
        let mut chat = json!({"role": role, "content": texts.join("\n")});
        if !calls.is_empty() {
            if texts.is_empty() {
                chat["content"] = Value::Null;
            }
            chat["tool_calls"] = Value::Array(calls);
        }
        out.push(chat);
    }
    Ok(out)
}

/// Anthropic's tools (`name`, `description`, `input_schema`) as chat tools.
fn chat_tools(tools: &[Value]) -> Result<Vec<Value>, ApiError> {
    tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            if let Some(kind) = tool.get("type").and_then(Value::as_str)
                && kind != "custom"
            {
                return Err(invalid(
                    "tools",
                    format!(
                        "tools.{i}: tools of type {kind} are not supported (custom tools only)"
                    ),
                ));
            }
            let Some(name) = tool.get("name").and_then(Value::as_str) else {
                return Err(invalid("tools", format!("tools.{i}.name: Field required")));
            };
            let Some(schema) = tool.get("input_schema").filter(|s| s.is_object()) else {
                return Err(invalid(
                    "tools",
                    format!("tools.{i}.input_schema: Field required"),
                ));
            };
            let mut function = json!({"name": name, "parameters": schema});
            if let Some(description) = tool.get("description").filter(|d| !d.is_null()) {
                function["description"] = description.clone();
            }
            Ok(json!({"type": "function", "function": function}))
        })
        .collect()
}

/// Anthropic's `tool_choice` as chat's, with whether parallel calls are allowed.
fn tool_choice(choice: &Value) -> Result<(Value, bool), ApiError> {
    let parallel = choice
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        != Some(true);
    let chat = match choice.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => match choice.get("name").and_then(Value::as_str) {
            Some(name) => json!({"type": "function", "function": {"name": name}}),
            None => return Err(invalid("tool_choice", "tool_choice.name: Field required")),
        },
        _ => {
            return Err(invalid(
                "tool_choice",
                "tool_choice.type: must be auto, any, tool or none",
            ))
        }
    };
    Ok((chat, parallel))
}

/// `toolu_` and 24 random letters and digits.
fn tool_use_id() -> String {
    new_call_id().replacen("call_", "toolu_", 1)
}

/// `stop_reason` and `stop_sequence` of a finished reply.
fn stop(finish: Option<&Finish>, tool_use: bool) -> (Value, Value) {
    if tool_use {
        return (json!("tool_use"), Value::Null);
    }
    match finish {
        Some(Finish {
            reason: FinishReason::Length,
            ..
        }) => (json!("max_tokens"), Value::Null),
        Some(Finish {
            reason: FinishReason::Stop,
            stop_reason: Some(StopReason::Text(s)),
        }) => (json!("stop_sequence"), json!(s)),
        _ => (json!("end_turn"), Value::Null),
    }
}

fn tool_use_block(call: &ToolCall) -> Value {
    let input: Value = serde_json::from_str(&call.arguments)
        .ok()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    json!({"type": "tool_use", "id": tool_use_id(), "name": call.name, "input": input})
}

/// A `thinking` block: the model's reasoning (`REASONING_PARSER`), unsigned.
fn thinking_block(thinking: &str) -> Value {
    json!({"type": "thinking", "thinking": thinking, "signature": ""})
}

/// A whole reply as content blocks (its reasoning as a `thinking` block with a reasoning parser,
/// text, then a `tool_use` block per parsed tool call), and whether it calls tools.
fn content_blocks(chat: &ChatRequest, reply: &str) -> (Vec<Value>, bool) {
    let (reasoning, reply) = match chat.reasoning {
        Some(in_reasoning) => ReasoningSplitter::split(in_reasoning, reply),
        None => (None, reply.to_string()),
    };
    let reply = reply.as_str();
    let (text, calls) = match chat.tool_calls_in(reply) {
        Some((content, mut calls)) => {
            if !chat.parallel_tool_calls {
                calls.truncate(1);
            }
            (content.unwrap_or_default(), calls)
        }
        None => (reply.to_string(), Vec::new()),
    };
    let mut content: Vec<Value> = reasoning
        .as_deref()
        .map(thinking_block)
        .into_iter()
        .collect();
    if !text.is_empty() || calls.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    content.extend(calls.iter().map(tool_use_block));
    (content, !calls.is_empty())
}

pub(crate) async fn handle(
    engine: &Engine,
    settings: &OpenAiSettings,
    body: &Body<'_>,
) -> Result<OpenAiResponse, ApiError> {
    let request = parse(body)?;
    let id = format!("msg_{:032x}", rand::random::<u128>());
    let (chat, events) = chat::start(engine, &Body(&request.chat), &id)?;
    let model = settings.served_model_name.clone();
    if request.stream {
        return Ok(OpenAiResponse::Stream(stream_events(
            id, model, chat, events,
        )));
    }
    let outcome = collect(events, 1).await?;
    let choice = outcome.choices.first().cloned().unwrap_or_default();
    let (content, tool_use) = content_blocks(&chat, &choice.text);
    let (stop_reason, stop_sequence) = stop(choice.finish.as_ref(), tool_use);
    Ok(OpenAiResponse::Json(json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": {"input_tokens": outcome.usage.prompt_tokens, "output_tokens": outcome.usage.completion_tokens},
    })))
}

/// The Messages events of one streamed reply.
struct Events {
    id: String,
    model: String,
    input_tokens: usize,
    started: bool,
    /// The index of the open text block, if one is open; blocks are numbered from 0.
    text_block: Option<usize>,
    /// `REASONING_PARSER` on: splits the reasoning from the answer as it streams.
    reasoning: Option<ReasoningSplitter>,
    /// The index of the open thinking block, if one is open.
    thinking_block: Option<usize>,
    blocks: usize,
    detector: Option<ToolCallDetector>,
    parallel: bool,
    tool_use: bool,
    finish: Option<Finish>,
}

fn data(value: Value) -> StreamEvent {
    StreamEvent::Data(value)
}

impl Events {
    fn start(&mut self) -> Vec<StreamEvent> {
        if self.started {
            return Vec::new();
        }
        self.started = true;
        vec![
            data(json!({"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": self.input_tokens, "output_tokens": 0}}})),
            data(json!({"type": "ping"})),
        ]
    }

    fn on_text(&mut self, text: &str, force: bool) -> Vec<StreamEvent> {
        let mut events = self.start();
        if text.is_empty() && !force {
            return events;
        }
        let index = match self.text_block {
            Some(index) => index,
            None => {
                let index = self.blocks;
                self.blocks += 1;
                self.text_block = Some(index);
                events.push(data(json!({"type": "content_block_start", "index": index,
                    "content_block": {"type": "text", "text": ""}})));
                index
            }
        };
        if !text.is_empty() {
            events.push(data(json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "text_delta", "text": text}})));
        }
        events
    }

    /// Reasoning text: a `thinking` block opens with its first piece.
    fn on_thinking(&mut self, thinking: &str) -> Vec<StreamEvent> {
        let mut events = self.start();
        if thinking.is_empty() {
            return events;
        }
        let index = match self.thinking_block {
            Some(index) => index,
            None => {
                let index = self.blocks;
                self.blocks += 1;
                self.thinking_block = Some(index);
                events.push(data(json!({"type": "content_block_start", "index": index,
                    "content_block": thinking_block("")})));
                index
            }
        };
        events.push(data(json!({"type": "content_block_delta", "index": index,
            "delta": {"type": "thinking_delta", "thinking": thinking}})));
        events
    }

    /// The end of the reasoning: its (unsigned) signature, and the block stops.
    fn close_thinking(&mut self) -> Vec<StreamEvent> {
        let Some(index) = self.thinking_block.take() else {
            return Vec::new();
        };
        vec![
            data(json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "signature_delta", "signature": ""}})),
            data(json!({"type": "content_block_stop", "index": index})),
        ]
    }

    /// Answer text: past the tool-call detector, into the text block.
    fn on_answer(&mut self, answer: &str) -> Vec<StreamEvent> {
        let text = match &mut self.detector {
            Some(d) => d.push(answer),
            None => answer.to_string(),
        };
        self.on_text(&text, false)
    }

    fn on_delta(&mut self, delta: ChoiceDelta) -> Vec<StreamEvent> {
        let (thought, answer) = match &mut self.reasoning {
            Some(s) => s.push(&delta.text),
            None => (String::new(), delta.text),
        };
        let mut events = self.on_thinking(&thought);
        if !answer.is_empty() {
            events.extend(self.close_thinking());
        }
        events.extend(self.on_answer(&answer));
        let Some(finish) = delta.finish else {
            return events;
        };
        if let Some(mut splitter) = self.reasoning.take() {
            let (thought, answer) = splitter.finish();
            events.extend(self.on_thinking(&thought));
            events.extend(self.close_thinking());
            events.extend(self.on_answer(&answer));
        }
        self.finish = Some(finish);
        let mut calls = Vec::new();
        if let Some(detector) = self.detector.take() {
            let detected = detector.finish();
            events.extend(self.on_text(&detected.text, false));
            calls = detected.calls;
            if !self.parallel {
                calls.truncate(1);
            }
        }
        if calls.is_empty() {
            events.extend(self.on_text("", true));
        }
        if let Some(index) = self.text_block.take() {
            events.push(data(json!({"type": "content_block_stop", "index": index})));
        }
        for call in &calls {
            let index = self.blocks;
            self.blocks += 1;
            let mut block = tool_use_block(call);
            let input = block["input"].to_string();
            block["input"] = json!({});
            events.push(data(
                json!({"type": "content_block_start", "index": index, "content_block": block}),
            ));
            events.push(data(json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "input_json_delta", "partial_json": input}})));
            events.push(data(json!({"type": "content_block_stop", "index": index})));
        }
        self.tool_use = !calls.is_empty();
        events
    }

    fn end(&mut self, input_tokens: usize, output_tokens: usize) -> Vec<StreamEvent> {
        let mut events = self.start();
        let (stop_reason, stop_sequence) = stop(self.finish.as_ref(), self.tool_use);
        events.push(data(json!({"type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}})));
        events.push(data(json!({"type": "message_stop"})));
        events
    }
}

fn stream_events(
    id: String,
    model: String,
    request: ChatRequest,
    events: GenerationStream,
) -> BoxStream<'static, StreamEvent> {
    let mut state = Events {
        id,
        model,
        input_tokens: 0,
        started: false,
        text_block: None,
        reasoning: request.reasoning.map(ReasoningSplitter::new),
        thinking_block: None,
        blocks: 0,
        detector: request.tool_detector(),
        parallel: request.parallel_tool_calls,
        tool_use: false,
        finish: None,
    };
    async_stream::stream! {
        futures::pin_mut!(events);
        while let Some(event) = events.next().await {
            let out = match event {
                GenerationEvent::Prompt { prompt_token_ids, .. } => {
                    state.input_tokens = prompt_token_ids.len();
                    state.start()
                }
                GenerationEvent::Delta(delta) => state.on_delta(delta),
                GenerationEvent::Done { usage, .. } => {
                    for e in state.end(usage.prompt_tokens, usage.completion_tokens) {
                        yield e;
                    }
                    return;
                }
                GenerationEvent::Error(e) => {
                    yield StreamEvent::Error(ApiError::from(e).in_anthropic_shape());
                    return;
                }
            };
            for e in out {
                yield e;
            }
        }
        yield StreamEvent::Error(
            ApiError::internal("the engine ended the request without finishing it").in_anthropic_shape(),
        );
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
    fn messages_with_tool_blocks_become_chat_messages() {
        let r = parse_json(json!({
            "max_tokens": 9,
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "And tomorrow?"}]},
            ],
            "stop_sequences": ["END"], "top_k": 5, "temperature": 0.2,
            "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        }))
        .unwrap();
        assert_eq!(
            r.chat["messages"],
            json!([
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "Let me look.", "tool_calls": [{"id": "toolu_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
                {"role": "user", "content": "And tomorrow?"},
            ])
        );
        assert_eq!(
            r.chat["tools"],
            json!([{"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object"}, "description": "Weather"}}])
        );
        let chat = chat::parse(&Body(&r.chat)).unwrap();
        assert_eq!(chat.params.stop, vec!["END".to_string()]);
        assert_eq!((chat.params.max_tokens, chat.params.top_k), (Some(9), 5));
        assert!(!chat.parallel_tool_calls && chat.parses_tools());
        assert_eq!(
            chat.messages[2]["tool_calls"][0]["function"]["arguments"],
            json!({"city": "Paris"})
        );
    }

    #[test]
    fn bad_requests_name_what_is_wrong() {
        let user = json!([{"role": "user", "content": "x"}]);
        for (body, param, says) in [
            (
                json!({"messages": user}),
                "max_tokens",
                "max_tokens: Field required",
            ),
            (
                json!({"max_tokens": 0, "messages": user}),
                "max_tokens",
                "at least 1",
            ),
            (json!({"max_tokens": 5}), "messages", "Field required"),
            (
                json!({"max_tokens": 5, "messages": user, "foo": 1}),
                "foo",
                "Extra inputs",
            ),
            (
                json!({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
                "messages",
                "role",
            ),
            (
                json!({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]}),
                "messages",
                "image",
            ),
            (
                json!({"max_tokens": 5, "messages": user, "tools": [{"name": "f"}]}),
                "tools",
                "input_schema",
            ),
            (
                json!({"max_tokens": 5, "messages": user, "tools": [{"type": "bash_20250124", "name": "bash"}]}),
                "tools",
                "bash",
            ),
            (
                json!({"max_tokens": 5, "messages": user, "thinking": {"type": "enabled", "budget_tokens": 1024}}),
                "thinking",
                "thinking",
            ),
            (
                json!({"max_tokens": "x", "messages": user}),
                "max_tokens",
                "max_tokens",
            ),
        ] {
            let e = parse_json(body.clone()).unwrap_err();
            assert_eq!((e.status(), e.param()), (400, Some(param)), "{body}");
            assert!(e.message().contains(says), "{body}: {}", e.message());
        }
    }

    fn events(detector: bool) -> Events {
        Events {
            id: "msg_1".into(),
            model: "m".into(),
            input_tokens: 3,
            started: false,
            text_block: None,
            reasoning: None,
            thinking_block: None,
            blocks: 0,
            detector: detector.then(ToolCallDetector::default),
            parallel: true,
            tool_use: false,
            finish: None,
        }
    }

    fn delta(text: &str, finish: Option<Finish>) -> ChoiceDelta {
        ChoiceDelta {
            index: 0,
            text: text.into(),
            token_ids: vec![],
            logprobs: vec![],
            finish,
        }
    }

    fn payloads(events: &[StreamEvent]) -> Vec<Value> {
        events
            .iter()
            .map(|e| match e {
                StreamEvent::Data(v) => v.clone(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn kinds(values: &[Value]) -> Vec<&str> {
        values.iter().map(|v| v["type"].as_str().unwrap()).collect()
    }

    #[test]
    fn a_streamed_text_reply_follows_anthropics_event_order() {
        let mut s = events(false);
        let mut all = s.start();
        all.extend(s.on_delta(delta("Hel", None)));
        let stop_seq = Finish {
            reason: FinishReason::Stop,
            stop_reason: Some(StopReason::Text("END".into())),
        };
        all.extend(s.on_delta(delta("lo", Some(stop_seq))));
        all.extend(s.end(3, 2));
        let all = payloads(&all);
        assert_eq!(
            kinds(&all),
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(all[0]["message"]["usage"]["input_tokens"], json!(3));
        assert_eq!(all[4]["delta"], json!({"type": "text_delta", "text": "lo"}));
        assert_eq!(
            all[6]["delta"],
            json!({"stop_reason": "stop_sequence", "stop_sequence": "END"})
        );
        assert_eq!(all[6]["usage"]["output_tokens"], json!(2));
    }

    /// With a reasoning parser the `<think>` text streams as a `thinking` block (thinking deltas, an
    /// unsigned signature) before the text block, however the markers are cut.
    #[test]
    fn reasoning_streams_as_a_thinking_block_first() {
        let text = "<think>why not</think>Yes.";
        for cut in 1..text.len() {
            let mut s = events(false);
            s.reasoning = Some(ReasoningSplitter::new(false));
            let mut all = s.on_delta(delta(&text[..cut], None));
            all.extend(s.on_delta(delta(
                &text[cut..],
                Some(Finish {
                    reason: FinishReason::Stop,
                    stop_reason: None,
                }),
            )));
            let all = payloads(&all);
            let starts: Vec<&Value> = all
                .iter()
                .filter(|e| e["type"] == json!("content_block_start"))
                .collect();
            assert_eq!(starts.len(), 2, "cut {cut}");
            assert_eq!(starts[0]["content_block"]["type"], json!("thinking"));
            assert_eq!(
                (starts[0]["index"].clone(), starts[1]["index"].clone()),
                (json!(0), json!(1))
            );
            let joined = |kind: &str, field: &str| -> String {
                all.iter()
                    .filter(|e| e["delta"]["type"] == json!(kind))
                    .map(|e| e["delta"][field].as_str().unwrap().to_string())
                    .collect()
            };
            assert_eq!(joined("thinking_delta", "thinking"), "why not", "cut {cut}");
            assert_eq!(joined("text_delta", "text"), "Yes.", "cut {cut}");
            assert_eq!(joined("signature_delta", "signature"), "");
        }
    }

    #[test]
    fn streamed_tool_calls_are_tool_use_blocks() {
        let mut s = events(true);
        let mut all = s.on_delta(delta("Sure. <tool_call>{\"name\": \"get_weather\", ", None));
        let eos = Finish {
            reason: FinishReason::Stop,
            stop_reason: None,
        };
        all.extend(s.on_delta(delta(
            "\"arguments\": {\"city\": \"Paris\"}}</tool_call>",
            Some(eos),
        )));
        all.extend(s.end(3, 9));
        let all = payloads(&all);
        assert_eq!(
            kinds(&all),
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(all[5]["index"], json!(1));
        assert_eq!(all[5]["content_block"]["type"], json!("tool_use"));
        assert_eq!(all[5]["content_block"]["name"], json!("get_weather"));
        assert!(all[5]["content_block"]["id"]
            .as_str()
            .unwrap()
            .starts_with("toolu_"));
        assert_eq!(
            all[6]["delta"],
            json!({"type": "input_json_delta", "partial_json": "{\"city\":\"Paris\"}"})
        );
        assert_eq!(all[8]["delta"]["stop_reason"], json!("tool_use"));
    }

    #[test]
    fn tool_calls_in_a_whole_reply_are_tool_use_blocks() {
        let body = json!({"max_tokens": 9, "messages": [{"role": "user", "content": "x"}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]});
        let chat = chat::parse(&Body(&parse_json(body).unwrap().chat)).unwrap();
        let reply = "Let me check.\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}</tool_call>";
        let (content, tool_use) = content_blocks(&chat, reply);
        assert!(tool_use);
        assert_eq!(content[0], json!({"type": "text", "text": "Let me check."}));
        assert_eq!(content[1]["type"], json!("tool_use"));
        assert_eq!(content[1]["input"], json!({"city": "Paris"}));
        assert_eq!(content[2]["input"], json!({"city": "Rome"}));
        assert!(content[1]["id"].as_str().unwrap().starts_with("toolu_"));
        // Without tools the same text is only text.
        let body = json!({"max_tokens": 9, "messages": [{"role": "user", "content": "x"}]});
        let chat = chat::parse(&Body(&parse_json(body).unwrap().chat)).unwrap();
        let (content, tool_use) = content_blocks(&chat, reply);
        assert!(!tool_use);
        assert_eq!(content, vec![json!({"type": "text", "text": reply})]);
    }

    #[test]
    fn stop_reasons_follow_anthropic() {
        let length = Finish {
            reason: FinishReason::Length,
            stop_reason: None,
        };
        assert_eq!(stop(Some(&length), false).0, json!("max_tokens"));
        let eos = Finish {
            reason: FinishReason::Stop,
            stop_reason: Some(StopReason::TokenId(2)),
        };
        assert_eq!(stop(Some(&eos), false), (json!("end_turn"), Value::Null));
        assert_eq!(stop(Some(&eos), true).0, json!("tool_use"));
    }
}
