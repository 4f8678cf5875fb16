//! Tool calls in model output: Hermes/Qwen `<tool_call>{json}</tool_call>` blocks, Qwen3-Coder's
//! XML calls (`<tool_call>\n<function=NAME>\n<parameter=ARG>...`, see `qwen3_xml`), Llama-3 JSON
//! (`{"name": ..., "parameters"|"arguments": ...}`, optionally after `<|python_tag|>`, several joined
//! by `;` or in a list) and Mistral `[TOOL_CALLS] [...]`. Pure: text in, calls out; plus a streaming
//! detector that lets ordinary text through and holds back everything from a tool-call start on.

mod qwen3_xml;

use rand::distr::Alphanumeric;
use rand::Rng;
use serde_json::Value;

const HERMES_START: &str = "<tool_call>";
const HERMES_END: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const MISTRAL_START: &str = "[TOOL_CALLS]";
const MARKERS: [&str; 4] = [
    HERMES_START,
    PYTHON_TAG,
    MISTRAL_START,
    qwen3_xml::FUNCTION_START,
];

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text, as OpenAI sends them.
    pub arguments: String,
}

/// `parse_tool_calls_for` without tools (XML calls' values stay text).
#[cfg(test)]
fn parse_tool_calls(text: &str) -> Option<(Option<String>, Vec<ToolCall>)> {
    parse_tool_calls_for(text, &[])
}

/// Text before the tool calls (`None` when blank) and the calls; `None` when the text holds no
/// parseable tool call. `tools`: the request's, whose schemas type the values of XML calls.
pub(crate) fn parse_tool_calls_for(
    text: &str,
    tools: &[Value],
) -> Option<(Option<String>, Vec<ToolCall>)> {
    let (content, calls) = if let Some(at) = text.find(HERMES_START) {
        (&text[..at], parse_hermes(&text[at..], tools)?)
    } else if let Some(at) = text.find(qwen3_xml::FUNCTION_START) {
        (&text[..at], parse_xml_calls(&text[at..], tools)?)
    } else if let Some(at) = text.find(MISTRAL_START) {
        (
            &text[..at],
            parse_json_calls(&text[at + MISTRAL_START.len()..])?,
        )
    } else if let Some(at) = text.find(PYTHON_TAG) {
        (
            &text[..at],
            parse_json_calls(&text[at + PYTHON_TAG.len()..])?,
        )
    } else {
        ("", parse_json_calls(text)?)
    };
    if calls.is_empty() {
        return None;
    }
    let content = Some(content.trim_end().to_string()).filter(|c| !c.trim().is_empty());
    Some((content, calls))
}

/// `<tool_call>{...}</tool_call>` blocks (or Qwen3-Coder's `<function=...>` inside them); the last
/// may be unterminated (the model stopped on EOS).
fn parse_hermes(mut text: &str, tools: &[Value]) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    while let Some(start) = text.find(HERMES_START) {
        let body = &text[start + HERMES_START.len()..];
        let (json, rest) = match body.find(HERMES_END) {
            Some(end) => (&body[..end], &body[end + HERMES_END.len()..]),
            None => (body, ""),
        };
        calls.push(match qwen3_xml::parse_call(json, tools) {
            Some((name, args)) => xml_call(name, &args),
            None => call_from_value(&serde_json::from_str(json.trim()).ok()?)?,
        });
        text = rest;
    }
    Some(calls)
}

/// Qwen3-Coder's `<function=...>` calls without their `<tool_call>` blocks.
fn parse_xml_calls(text: &str, tools: &[Value]) -> Option<Vec<ToolCall>> {
    let starts: Vec<usize> = text
        .match_indices(qwen3_xml::FUNCTION_START)
        .map(|(i, _)| i)
        .collect();
    starts
        .iter()
        .enumerate()
        .map(|(k, &at)| {
            let end = starts.get(k + 1).copied().unwrap_or(text.len());
            let (name, args) = qwen3_xml::parse_call(&text[at..end], tools)?;
            Some(xml_call(name, &args))
        })
        .collect()
}

fn xml_call(name: String, arguments: &Value) -> ToolCall {
    ToolCall {
        id: new_call_id(),
        name,
        arguments: arguments.to_string(),
    }
}

/// A JSON object, a list of objects, or objects joined by `;` (Llama 3.x).
fn parse_json_calls(text: &str) -> Option<Vec<ToolCall>> {
    let text = text.trim();
    if !text.starts_with('{') && !text.starts_with('[') {
        return None;
    }
    if let Ok(value) = serde_json::from_str::<Value>(text) {
        return match value {
            Value::Array(items) => items.iter().map(call_from_value).collect(),
            other => Some(vec![call_from_value(&other)?]),
        };
    }
    text.split(';')
        .map(|part| call_from_value(&serde_json::from_str(part.trim()).ok()?))
        .collect()
}

fn call_from_value(value: &Value) -> Option<ToolCall> {
    let object = value.as_object()?;
    let name = object.get("name")?.as_str()?.to_string();
    let arguments = match object.get("arguments").or_else(|| object.get("parameters")) {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    Some(ToolCall {
        id: new_call_id(),
        name,
        arguments,
    })
}

/// `call_` and 24 random letters and digits.
pub(crate) fn new_call_id() -> String {
    let suffix: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("call_{suffix}")
}

/// Streams text while watching for a tool call: text before a tool-call start goes out at once, a
/// possible start is held until it is decided, and from a start on everything is kept for parsing
/// at the end. Output that opens with `{` or `[` (Llama-3 JSON style) is held whole.
#[derive(Debug, Default)]
pub(crate) struct ToolCallDetector {
    held: String,
    capturing: bool,
    emitted_text: bool,
    /// The request's tools (they type XML calls' values).
    tools: Vec<Value>,
}

/// What the end of a choice leaves: text still to send, and the tool calls if there were any.
#[derive(Debug, PartialEq)]
pub(crate) struct Detected {
    pub text: String,
    pub calls: Vec<ToolCall>,
}

impl ToolCallDetector {
    /// A detector for a request with these `tools`.
    pub(crate) fn for_tools(tools: &[Value]) -> Self {
        Self {
            tools: tools.to_vec(),
            ..Self::default()
        }
    }

    /// Adds a delta; returns the text that can be sent now.
    pub(crate) fn push(&mut self, delta: &str) -> String {
        self.held.push_str(delta);
        if self.capturing {
            return String::new();
        }
        let start = self.held.trim_start();
        if !self.emitted_text {
            if start.is_empty() {
                return String::new();
            }
            if start.starts_with('{') || start.starts_with('[') {
                self.capturing = true;
                return String::new();
            }
        }
        if let Some(at) = MARKERS.iter().filter_map(|m| self.held.find(m)).min() {
            self.capturing = true;
            let rest = self.held.split_off(at);
            let ready = std::mem::replace(&mut self.held, rest);
            return self.emit(ready);
        }
        let keep = longest_marker_prefix_suffix(&self.held);
        let rest = self.held.split_off(self.held.len() - keep);
        let ready = std::mem::replace(&mut self.held, rest);
        self.emit(ready)
    }

    fn emit(&mut self, text: String) -> String {
        if !text.is_empty() {
            self.emitted_text = true;
        }
        text
    }

    /// Ends the choice: the held text parsed as tool calls, or given back as text when it is none.
    pub(crate) fn finish(self) -> Detected {
        if self.capturing
            && let Some((content, calls)) = parse_tool_calls_for(&self.held, &self.tools)
        {
            return Detected {
                text: content.unwrap_or_default(),
                calls,
            };
        }
        Detected {
            text: self.held,
            calls: Vec::new(),
        }
    }
}

/// Length of the longest end of `text` that could be the beginning of a marker.
fn longest_marker_prefix_suffix(text: &str) -> usize {
    MARKERS
        .iter()
        .flat_map(|marker| {
            (1..marker.len())
                .rev()
                .filter(|&n| text.is_char_boundary(text.len().saturating_sub(n)))
                .find(|&n| n <= text.len() && text.ends_with(&marker[..n]))
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_and_args(calls: &[ToolCall]) -> Vec<(String, String)> {
        calls
            .iter()
            .map(|c| (c.name.clone(), c.arguments.clone()))
            .collect()
    }

    #[test]
    fn hermes_blocks_parse_with_leading_content() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"time\", \"arguments\": {}}\n</tool_call>";
        let (content, calls) = parse_tool_calls(text).unwrap();
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(
            names_and_args(&calls),
            vec![
                ("get_weather".into(), r#"{"city":"Paris"}"#.into()),
                ("time".into(), "{}".into())
            ]
        );
        assert!(calls[0].id.starts_with("call_") && calls[0].id.len() == 29);
        assert_ne!(calls[0].id, calls[1].id);
    }

    #[test]
    fn an_unterminated_last_block_still_parses() {
        let (_, calls) =
            parse_tool_calls("<tool_call>{\"name\": \"f\", \"arguments\": {\"x\": 1}}").unwrap();
        assert_eq!(
            names_and_args(&calls),
            vec![("f".into(), r#"{"x":1}"#.into())]
        );
    }

    #[test]
    fn llama_json_styles_parse() {
        for text in [
            r#"{"name": "f", "parameters": {"x": 1}}"#,
            r#"<|python_tag|>{"name": "f", "parameters": {"x": 1}}"#,
            r#"  {"type": "function", "name": "f", "arguments": "{\"x\":1}"}"#,
        ] {
            let (content, calls) = parse_tool_calls(text).unwrap();
            assert_eq!(content, None);
            assert_eq!(
                names_and_args(&calls),
                vec![("f".into(), r#"{"x":1}"#.into())],
                "{text}"
            );
        }
        let (_, calls) = parse_tool_calls(
            r#"{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"y": "z"}}"#,
        )
        .unwrap();
        assert_eq!(
            names_and_args(&calls)[1],
            ("b".into(), r#"{"y":"z"}"#.into())
        );
    }

    #[test]
    fn mistral_lists_parse() {
        let (_, calls) =
            parse_tool_calls(r#"[TOOL_CALLS] [{"name": "a", "arguments": {"q": 1}}, {"name": "b", "arguments": {}}]"#)
                .unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].name, "b");
    }

    #[test]
    fn ordinary_text_and_broken_json_are_not_tool_calls() {
        assert_eq!(parse_tool_calls("The weather is fine."), None);
        assert_eq!(parse_tool_calls(r#"{"answer": 42}"#), None);
        assert_eq!(parse_tool_calls("<tool_call>{\"name\": \"f\", "), None);
        assert_eq!(parse_tool_calls(r#"{"name": 3}"#), None);
    }

    fn stream(deltas: &[&str]) -> (String, Detected) {
        let mut d = ToolCallDetector::default();
        let sent: String = deltas.iter().map(|x| d.push(x)).collect();
        (sent, d.finish())
    }

    #[test]
    fn the_detector_passes_text_and_holds_tool_calls() {
        let (sent, done) = stream(&[
            "Sure",
            ". <to",
            "ol_call>{\"name\": \"f\", ",
            "\"arguments\": {}}</tool_call>",
        ]);
        assert_eq!(sent, "Sure. ");
        assert_eq!(done.text, "");
        assert_eq!(names_and_args(&done.calls), vec![("f".into(), "{}".into())]);
    }

    #[test]
    fn the_detector_releases_a_false_start() {
        let (sent, done) = stream(&["a <to", "day"]);
        assert_eq!(format!("{sent}{}", done.text), "a <today");
        assert!(done.calls.is_empty());
        assert_eq!(sent, "a <today");
    }

    #[test]
    fn the_detector_holds_json_output_and_gives_it_back_when_it_is_not_a_call() {
        let (sent, done) = stream(&["  {\"answer\"", ": 42}"]);
        assert_eq!(sent, "");
        assert_eq!(done.text, "  {\"answer\": 42}");
        let (sent, done) = stream(&["{\"name\": \"f\", \"parameters\": {\"a\": [1]}}"]);
        assert_eq!((sent.as_str(), done.text.as_str()), ("", ""));
        assert_eq!(done.calls.len(), 1);
    }

    #[test]
    fn qwen3_coder_xml_calls_parse_whole_or_streamed() {
        let tools = [
            serde_json::json!({"type": "function", "function": {"name": "add",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "s": {"type": "string"}}}}}),
        ];
        let text = "I will add.\n<tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n<parameter=s>\n2\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=add>\n<parameter=a>\n3\n</parameter>\n</function>\n</tool_call>";
        let (content, calls) = parse_tool_calls_for(text, &tools).unwrap();
        assert_eq!(content.as_deref(), Some("I will add."));
        assert_eq!(
            names_and_args(&calls),
            vec![
                ("add".into(), r#"{"a":1,"s":"2"}"#.into()),
                ("add".into(), r#"{"a":3}"#.into())
            ]
        );
        // without the <tool_call> block
        let (_, calls) = parse_tool_calls_for(
            "<function=add>\n<parameter=a>\n5\n</parameter>\n</function>",
            &tools,
        )
        .unwrap();
        assert_eq!(
            names_and_args(&calls),
            vec![("add".into(), r#"{"a":5}"#.into())]
        );
        // streamed in small pieces
        let mut d = ToolCallDetector::for_tools(&tools);
        let sent: String = text
            .as_bytes()
            .chunks(5)
            .map(|c| d.push(std::str::from_utf8(c).unwrap()))
            .collect();
        let done = d.finish();
        assert_eq!(format!("{sent}{}", done.text).trim_end(), "I will add.");
        assert_eq!(
            names_and_args(&done.calls),
            vec![
                ("add".into(), r#"{"a":1,"s":"2"}"#.into()),
                ("add".into(), r#"{"a":3}"#.into())
            ]
        );
    }

    #[test]
    fn the_detector_keeps_multibyte_text_whole() {
        let (sent, done) = stream(&["héllo wörld ", "é"]);
        assert_eq!(format!("{sent}{}", done.text), "héllo wörld é");
    }
}

/// The tool-call syntaxes this worker parses and can force (vLLM's `TOOL_CALL_PARSER` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ToolSyntax {
    /// `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>` (Hermes, Qwen).
    Hermes,
    /// `{"name": ..., "parameters": ...}`, several joined by `; ` (Llama 3.x JSON).
    Llama3Json,
    /// `[TOOL_CALLS][{"name": ..., "arguments": ...}, ...]`.
    Mistral,
    /// `<tool_call>\n<function=NAME>\n<parameter=ARG>\nVALUE\n</parameter>\n</function>\n</tool_call>`
    /// (Qwen3-Coder).
    Qwen3Xml,
}

impl ToolSyntax {
    /// `TOOL_CALL_PARSER`'s syntax; `None` (auto) = the one whose marker is a single token of the
    /// vocabulary (`is_token`), else Hermes.
    pub(crate) fn choose(parser: Option<&str>, is_token: impl Fn(&str) -> bool) -> Self {
        match parser {
            Some("llama3_json" | "llama4_json") => Self::Llama3Json,
            Some("mistral") => Self::Mistral,
            Some("qwen3_coder" | "qwen3_xml") => Self::Qwen3Xml,
            Some(_) => Self::Hermes,
            None if is_token(HERMES_START) => Self::Hermes,
            None if is_token(MISTRAL_START) => Self::Mistral,
            None if is_token(PYTHON_TAG) => Self::Llama3Json,
            None => Self::Hermes,
        }
    }
}

/// A Lark grammar (llguidance's dialect) that forces the reply to be tool calls in `syntax`: each
/// names one of `tools` and has `arguments` valid against that tool's `parameters` schema; one call
/// when `one`, else one or more. `token_id` gives a marker's id when the vocabulary has it as one
/// token (the grammar then asks for that token, as the model writes it).
pub(crate) fn forced_calls_grammar(
    tools: &[Value],
    syntax: ToolSyntax,
    one: bool,
    token_id: impl Fn(&str) -> Option<u32>,
) -> String {
    let args_key = match syntax {
        ToolSyntax::Llama3Json => "parameters",
        _ => "arguments",
    };
    let alternatives: Vec<Value> = tools
        .iter()
        .filter_map(|t| {
            let name = t.pointer("/function/name")?.as_str()?;
            let params = t
                .pointer("/function/parameters")
                .filter(|p| p.is_object())
                .cloned()
                .unwrap_or_else(|| serde_json::json!({"type": "object"}));
            Some(serde_json::json!({
                "type": "object",
                "properties": {"name": {"const": name}, args_key: params},
                "required": ["name", args_key],
                "additionalProperties": false,
            }))
        })
        .collect();
    let schema = serde_json::json!({
        "anyOf": alternatives,
        "x-guidance": {"whitespace_flexible": false},
    });
    let marker = |m: &str| match token_id(m) {
        Some(id) => format!("<[{id}]>"),
        None => Value::String(m.to_string()).to_string(),
    };
    let many = |call: &str, sep: &str| {
        if one {
            call.to_string()
        } else {
            format!("{call} ({sep} {call})*")
        }
    };
    let call = format!("call: %json {schema}");
    match syntax {
        ToolSyntax::Hermes => format!(
            "start: {}\nblock: {} \"\\n\" call \"\\n\" {}\n{call}\n",
            many("block", "\"\\n\""),
            marker(HERMES_START),
            marker(HERMES_END),
        ),
        ToolSyntax::Llama3Json => {
            format!("start: {}\n{call}\n", many("call", "\"; \""))
        }
        ToolSyntax::Qwen3Xml => format!(
            "start: {}\nblock: {} \"\\n\" call {}\n{}",
            many("block", "\"\\n\""),
            marker(HERMES_START),
            marker(HERMES_END),
            qwen3_xml::call_rules(tools),
        ),
        ToolSyntax::Mistral => format!(
            "start: {} \"[\" {} \"]\"\n{call}\n",
            marker(MISTRAL_START),
            many("call", "\", \""),
        ),
    }
}
