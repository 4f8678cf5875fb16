//! Qwen3-Coder's XML tool calls (vLLM's `qwen3_coder` / `qwen3_xml` parsers):
//!
//! ```text
//! <tool_call>
//! <function=NAME>
//! <parameter=ARG>
//! VALUE
//! </parameter>
//! </function>
//! </tool_call>
//! ```
//!
//! A value is raw text for a `string` parameter and JSON for the others, typed by the tool's
//! `parameters` schema as vLLM types it. Parsing, and the Lark grammar that forces calls in it.

use serde_json::{Map, Value};

pub(super) const FUNCTION_START: &str = "<function=";
const FUNCTION_END: &str = "</function>";
const PARAMETER_START: &str = "<parameter=";
const PARAMETER_END: &str = "</parameter>";

/// One `<function=NAME>...</function>` call (the text inside a `<tool_call>` block, or from
/// `<function=` on): its name and arguments as a JSON object, typed by `tools`. `None` when it is
/// not one.
pub(super) fn parse_call(text: &str, tools: &[Value]) -> Option<(String, Value)> {
    let rest = text.trim_start().strip_prefix(FUNCTION_START)?;
    let (name, mut rest) = rest.split_once('>')?;
    let name = name.trim();
    if name.is_empty() || name.contains('\n') {
        return None;
    }
    let properties = tools
        .iter()
        .find(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(name))
        .and_then(|t| t.pointer("/function/parameters/properties"));
    let body_end = rest.find(FUNCTION_END).unwrap_or(rest.len());
    rest = &rest[..body_end];
    let mut args = Map::new();
    while let Some(at) = rest.find(PARAMETER_START) {
        let after = &rest[at + PARAMETER_START.len()..];
        let (param, after) = after.split_once('>')?;
        // an unterminated value ends where the next parameter starts
        let end = after
            .find(PARAMETER_END)
            .or_else(|| after.find(PARAMETER_START))
            .unwrap_or(after.len());
        let mut value = &after[..end];
        value = value.strip_prefix('\n').unwrap_or(value);
        value = value.strip_suffix('\n').unwrap_or(value);
        let param = param.trim();
        let schema = properties.and_then(|p| p.get(param));
        args.insert(param.to_string(), typed(value, schema));
        rest = &after[end..];
        rest = rest.strip_prefix(PARAMETER_END).unwrap_or(rest);
    }
    Some((name.to_string(), Value::Object(args)))
}

/// A parameter's text as the JSON value its schema's type says (vLLM's conversion): `null` is
/// null; strings (and parameters the tool does not declare) stay text; numbers, booleans,
/// objects and arrays are parsed, and kept as text when they do not parse.
fn typed(text: &str, schema: Option<&Value>) -> Value {
    if text.eq_ignore_ascii_case("null") {
        return Value::Null;
    }
    let raw = || Value::String(text.to_string());
    let Some(schema) = schema else {
        return raw();
    };
    let kind = match schema.get("type") {
        Some(Value::String(t)) => Some(t.as_str()),
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).find(|t| *t != "null"),
        _ => None,
    };
    let trimmed = text.trim();
    match kind {
        Some("string" | "str" | "text") => raw(),
        Some("integer" | "int") => trimmed.parse::<i64>().map_or_else(|_| raw(), Value::from),
        Some("number" | "float") => match trimmed.parse::<f64>() {
            Ok(f) if f.fract() == 0.0 && f.abs() < 9e15 && !trimmed.contains(['.', 'e', 'E']) => {
                Value::from(f as i64)
            }
            Ok(f) => serde_json::Number::from_f64(f).map_or_else(raw, Value::Number),
            Err(_) => raw(),
        },
        Some("boolean" | "bool") => match trimmed.to_ascii_lowercase().as_str() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => raw(),
        },
        _ => serde_json::from_str(trimmed).unwrap_or_else(|_| raw()),
    }
}

/// The Lark rules of one call in this syntax for each of `tools` (`call` is their alternatives):
/// each declared parameter in the schema's order, the required ones always, raw text for a string
/// (its `enum` or `const` when it has one, `maxLength` kept), JSON valid against the parameter's
/// schema for the others.
pub(super) fn call_rules(tools: &[Value]) -> String {
    let mut rules = String::new();
    let mut calls = Vec::new();
    for (f, tool) in tools.iter().enumerate() {
        let Some(name) = tool.pointer("/function/name").and_then(Value::as_str) else {
            continue;
        };
        let required: Vec<&str> = tool
            .pointer("/function/parameters/required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut params = Vec::new();
        if let Some(props) = tool
            .pointer("/function/parameters/properties")
            .and_then(Value::as_object)
        {
            for (p, (param, schema)) in props.iter().enumerate() {
                let rule = format!("f{f}p{p}");
                let value = format!("f{f}v{p}");
                rules.push_str(&format!(
                    "{rule}: {} {value} \"\\n\"\n{}\n",
                    lark_text(&format!("{PARAMETER_START}{param}>\n")),
                    value_rule(&value, schema),
                ));
                params.push(if required.contains(&param.as_str()) {
                    rule
                } else {
                    format!("{rule}?")
                });
            }
        }
        rules.push_str(&format!(
            "f{f}: {} {} {}\n",
            lark_text(&format!("{FUNCTION_START}{name}>\n")),
            params.join(" "),
            lark_text(&format!("{FUNCTION_END}\n")),
        ));
        calls.push(format!("f{f}"));
    }
    if calls.is_empty() {
        // no named tool (the route refuses those before): an empty call
        calls.push(lark_text(&format!("{FUNCTION_START}>\n{FUNCTION_END}\n")));
    }
    format!("call: {}\n{rules}", calls.join(" | "))
}

/// The rule `name`: a parameter's value and its closing tag (`\n</parameter>`).
fn value_rule(name: &str, schema: &Value) -> String {
    let end = lark_text(&format!("\n{PARAMETER_END}"));
    let strings = |v: &Value| -> Option<Vec<String>> {
        match v {
            Value::Array(items) => items.iter().map(|i| i.as_str().map(lark_text)).collect(),
            Value::String(s) => Some(vec![lark_text(s)]),
            _ => None,
        }
    };
    if let Some(alts) = schema
        .get("enum")
        .or_else(|| schema.get("const"))
        .and_then(strings)
        .filter(|a| !a.is_empty())
    {
        return format!("{name}: ({}) {end}", alts.join(" | "));
    }
    if schema.get("type").and_then(Value::as_str) == Some("string") {
        // raw text up to the first closing tag (lazy), at most maxLength characters
        let max = schema
            .get("maxLength")
            .and_then(Value::as_u64)
            .filter(|&m| m <= 256)
            .map_or("*".to_string(), |m| format!("{{0,{m}}}"));
        return format!("{name}[lazy]: /(.|\\n){max}\\n<\\/parameter>/");
    }
    let mut schema = schema.clone();
    if let Value::Object(map) = &mut schema {
        map.insert(
            "x-guidance".into(),
            serde_json::json!({"whitespace_flexible": false}),
        );
    }
    format!("{name}: %json {schema} {end}")
}

/// A Lark string literal of `text`.
fn lark_text(text: &str) -> String {
    Value::String(text.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "run", "parameters": {"type": "object",
            "properties": {"code": {"type": "string"}, "n": {"type": "integer"}, "x": {"type": "number"},
                "ok": {"type": "boolean"}, "opts": {"type": "object"}, "tags": {"type": "array"},
                "note": {"type": ["string", "null"]}},
            "required": ["code"]}}}),
        ]
    }

    #[test]
    fn values_are_typed_by_the_tool_schema() {
        let text = "<function=run>\n<parameter=code>\nfor i in x:\n    print(i)\n</parameter>\n<parameter=n>\n42\n</parameter>\n<parameter=x>\n2.5\n</parameter>\n<parameter=ok>\nTrue\n</parameter>\n<parameter=opts>\n{\"a\": [1]}\n</parameter>\n<parameter=tags>\n[\"a\", \"b\"]\n</parameter>\n<parameter=note>\nnull\n</parameter>\n<parameter=extra>\n7\n</parameter>\n</function>";
        let (name, args) = parse_call(text, &tools()).unwrap();
        assert_eq!(name, "run");
        assert_eq!(
            args,
            json!({"code": "for i in x:\n    print(i)", "n": 42, "x": 2.5, "ok": true,
                "opts": {"a": [1]}, "tags": ["a", "b"], "note": null, "extra": "7"})
        );
        // a string parameter that looks like a number stays text; without the tool, all is text
        let (_, args) = parse_call(
            "<function=run>\n<parameter=code>\n123\n</parameter>\n</function>",
            &tools(),
        )
        .unwrap();
        assert_eq!(args, json!({"code": "123"}));
        let (_, args) = parse_call(
            "<function=other>\n<parameter=n>\n1\n</parameter>\n</function>",
            &[],
        )
        .unwrap();
        assert_eq!(args, json!({"n": "1"}));
    }

    #[test]
    fn unterminated_values_and_non_calls() {
        let (_, args) = parse_call(
            "<function=run>\n<parameter=code>\nabc\n<parameter=n>\n3",
            &tools(),
        )
        .unwrap();
        assert_eq!(args, json!({"code": "abc", "n": 3}));
        assert_eq!(parse_call("{\"name\": \"run\"}", &tools()), None);
        assert_eq!(parse_call("<function=>", &tools()), None);
    }

    /// Random walks under the forced-call grammar (uniform among the allowed tokens) give XML calls
    /// that parse back to a tool of the list with arguments valid against its schema.
    #[test]
    fn forced_xml_calls_parse_back_and_match_the_schemas() {
        use crate::api::openai::tools::{forced_calls_grammar, parse_tool_calls_for, ToolSyntax};
        use crate::engine::constraint::{Grammars, Structure, StructuredOutput};
        use crate::engine::tokenizer::Tokenizer;
        use rand::{Rng, SeedableRng};
        let tools = vec![
            json!({"type": "function", "function": {"name": "write", "parameters": {"type": "object",
                "properties": {"path": {"type": "string", "maxLength": 6}, "mode": {"enum": ["a", "w"]},
                    "lines": {"type": "integer", "minimum": 1, "maximum": 9}, "force": {"type": "boolean"}},
                "required": ["path", "mode", "lines"]}}}),
            json!({"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}),
        ];
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/qwen2");
        let tok = Tokenizer::from_dir(dir).unwrap();
        let eos = tok.eos_token_id().unwrap();
        let g = Grammars::new(tok.clone(), tok.vocab_size(), vec![eos]);
        let grammar = forced_calls_grammar(&tools, ToolSyntax::Qwen3Xml, false, |_| None);
        let compiled = g
            .compile(&StructuredOutput::new(Structure::Grammar(grammar.clone())))
            .unwrap_or_else(|e| panic!("{e}\n{grammar}"));
        let mut finished = 0;
        for seed in 0..12 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut c = compiled.start();
            let mut out = Vec::new();
            let mut ended = false;
            for _ in 0..300 {
                let mut row = vec![0.0f32; tok.vocab_size()];
                assert!(c.apply(&mut row));
                let allowed: Vec<u32> = (0..row.len() as u32)
                    .filter(|&i| row[i as usize] == 0.0)
                    .collect();
                if allowed.contains(&eos) && rng.random_bool(0.7) {
                    ended = true;
                    break;
                }
                let t = allowed[rng.random_range(0..allowed.len())];
                if t == eos {
                    ended = true;
                    break;
                }
                c.advance(t).unwrap();
                out.push(t);
            }
            if !ended {
                continue;
            }
            finished += 1;
            let text = tok.decode(&out, false).unwrap();
            assert!(text.starts_with("<tool_call>\n<function="), "{text:?}");
            let (content, calls) =
                parse_tool_calls_for(&text, &tools).unwrap_or_else(|| panic!("{text:?}"));
            assert_eq!(content, None);
            for call in calls {
                let args: Value = serde_json::from_str(&call.arguments).unwrap();
                match call.name.as_str() {
                    "write" => {
                        assert!(
                            args["path"]
                                .as_str()
                                .is_some_and(|p| p.chars().count() <= 6),
                            "{text:?}"
                        );
                        assert!(
                            ["a", "w"].contains(&args["mode"].as_str().unwrap()),
                            "{text:?}"
                        );
                        assert!(
                            args["lines"].as_i64().is_some_and(|n| (1..=9).contains(&n)),
                            "{text:?}"
                        );
                        assert!(args.get("force").is_none_or(Value::is_boolean), "{text:?}");
                    }
                    "noop" => assert_eq!(args, json!({})),
                    other => panic!("{other}"),
                }
            }
        }
        assert!(finished >= 6, "{finished}");
    }
}
