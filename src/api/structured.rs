//! Structured-output fields, read the same way on every door: OpenAI's `response_format`, vLLM's
//! `structured_outputs` (and `guided_decoding`, its older name inside `sampling_params`) and the older
//! flat `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`,
//! `guided_whitespace_pattern` and `guided_decoding_backend`. At most one constraint per request.

use serde_json::{Map, Value};

use crate::api::error::ApiError;
use crate::engine::constraint::{Structure, StructuredOutput};

/// The request fields this module reads.
pub(crate) const FIELDS: &[&str] = &[
    "response_format",
    "structured_outputs",
    "guided_decoding",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_whitespace_pattern",
    "guided_decoding_backend",
];

/// The keys of vLLM's `StructuredOutputsParams` read here (the constraint kinds, then options).
const KINDS: &[&str] = &["json", "regex", "choice", "grammar", "json_object"];
const OPTIONS: &[&str] = &[
    "whitespace_pattern",
    "disable_fallback",
    "disable_any_whitespace",
    "disable_additional_properties",
    "backend",
];

/// The request's constraint, if it asks for one; a malformed one, or two at once, is a 400.
pub(crate) fn read(fields: &Map<String, Value>) -> Result<Option<StructuredOutput>, ApiError> {
    let get = |k: &str| fields.get(k).filter(|v| !v.is_null());
    let mut found: Vec<(String, Structure)> = Vec::new();
    let mut whitespace: Option<String> = None;
    if let Some(format) = get("response_format")
        && let Some(s) = response_format(format)?
    {
        found.push(("response_format".into(), s));
    }
    for key in ["structured_outputs", "guided_decoding"] {
        if let Some(v) = get(key) {
            let (s, ws) = structured_outputs(key, v)?;
            if let Some(s) = s {
                found.push((key.into(), s));
            }
            whitespace = whitespace.or(ws);
        }
    }
    for key in [
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
    ] {
        if let Some(v) = get(key) {
            found.push((key.into(), kind(key, &key["guided_".len()..], v)?));
        }
    }
    if let Some(v) = get("guided_whitespace_pattern") {
        whitespace = Some(string("guided_whitespace_pattern", v)?);
    }
    if let Some(v) = get("guided_decoding_backend") {
        // Every backend name means llguidance here.
        string("guided_decoding_backend", v)?;
    }
    match found.len() {
        0 => Ok(None),
        1 => {
            let (param, structure) = found.remove(0);
            let mut out = StructuredOutput::new(structure);
            out.whitespace_pattern = whitespace;
            out.param = param;
            Ok(Some(out))
        }
        _ => Err(ApiError::invalid(
            &found[1].0,
            format!(
                "only one structured output constraint may be given, got `{}` and `{}`",
                found[0].0, found[1].0
            ),
        )),
    }
}

/// OpenAI's `response_format`: `text` (no constraint), `json_object`, or `json_schema` with
/// `{name, schema, strict}`.
fn response_format(format: &Value) -> Result<Option<Structure>, ApiError> {
    let invalid = |m: &str| ApiError::invalid("response_format", m);
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Structure::JsonObject)),
        Some("json_schema") => {
            let Some(js) = format.get("json_schema").filter(|v| v.is_object()) else {
                return Err(invalid(
                    "`response_format.json_schema` is required for type json_schema",
                ));
            };
            match js.get("schema").filter(|v| !v.is_null()) {
                None => Ok(Some(Structure::JsonObject)),
                Some(schema) => Ok(Some(Structure::Json(json_schema(
                    "response_format",
                    schema,
                )?))),
            }
        }
        _ => Err(invalid(
            "`response_format.type` must be text, json_object or json_schema",
        )),
    }
}

/// vLLM's `structured_outputs` object: one of `json`, `regex`, `choice`, `grammar`, `json_object`,
/// with `whitespace_pattern`; its other options are accepted.
fn structured_outputs(
    param: &str,
    v: &Value,
) -> Result<(Option<Structure>, Option<String>), ApiError> {
    let Value::Object(o) = v else {
        return Err(ApiError::invalid(
            param,
            format!("`{param}` must be an object"),
        ));
    };
    if let Some(k) = o
        .keys()
        .find(|k| !KINDS.contains(&k.as_str()) && !OPTIONS.contains(&k.as_str()))
    {
        return Err(ApiError::invalid(
            param,
            format!(
                "`{param}.{k}` is not supported (supported: {})",
                KINDS.join(", ")
            ),
        ));
    }
    let mut kinds = Vec::new();
    for k in KINDS {
        match o.get(*k) {
            None | Some(Value::Null) | Some(Value::Bool(false)) if *k == "json_object" => {}
            None | Some(Value::Null) => {}
            Some(value) => kinds.push(kind(param, k, value)?),
        }
    }
    if kinds.len() > 1 {
        return Err(ApiError::invalid(
            param,
            format!("`{param}` may give only one of {}", KINDS.join(", ")),
        ));
    }
    let ws = match o.get("whitespace_pattern") {
        None | Some(Value::Null) => None,
        Some(v) => Some(string(param, v)?),
    };
    Ok((kinds.pop(), ws))
}

/// One constraint kind's value.
fn kind(param: &str, kind: &str, v: &Value) -> Result<Structure, ApiError> {
    Ok(match kind {
        "json" => Structure::Json(json_schema(param, v)?),
        "regex" => Structure::Regex(string(param, v)?),
        "grammar" => Structure::Grammar(string(param, v)?),
        "json_object" => match v {
            Value::Bool(true) => Structure::JsonObject,
            _ => {
                return Err(ApiError::invalid(
                    param,
                    format!("`{param}.json_object` must be true"),
                ))
            }
        },
        _ => {
            let choices = match v {
                Value::Array(items) if !items.is_empty() => items
                    .iter()
                    .map(|i| i.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>(),
                _ => None,
            };
            Structure::Choice(choices.ok_or_else(|| {
                ApiError::invalid(param, "the choice list must be a non-empty list of strings")
            })?)
        }
    })
}

/// A JSON schema: an object, `true`, or its JSON text.
fn json_schema(param: &str, v: &Value) -> Result<Value, ApiError> {
    match v {
        Value::Object(_) => Ok(v.clone()),
        Value::Bool(true) => Ok(Value::Object(Map::new())),
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(parsed @ Value::Object(_)) => Ok(parsed),
            _ => Err(ApiError::invalid(
                param,
                "the JSON schema text is not a JSON object",
            )),
        },
        _ => Err(ApiError::invalid(
            param,
            "the JSON schema must be an object",
        )),
    }
}

fn string(param: &str, v: &Value) -> Result<String, ApiError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| ApiError::invalid(param, format!("`{param}` must be a string")))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn read_json(v: Value) -> Result<Option<StructuredOutput>, ApiError> {
        read(v.as_object().unwrap())
    }

    #[test]
    fn every_door_reads_its_constraint() {
        let schema = json!({"type": "object"});
        let cases = [
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}}),
                Structure::Json(schema.clone()),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_object"}}),
                Structure::JsonObject,
                "response_format",
            ),
            (
                json!({"structured_outputs": {"regex": "a+"}}),
                Structure::Regex("a+".into()),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"json_object": true}}),
                Structure::JsonObject,
                "structured_outputs",
            ),
            (
                json!({"guided_json": "{\"type\": \"object\"}"}),
                Structure::Json(schema.clone()),
                "guided_json",
            ),
            (
                json!({"guided_choice": ["a", "b"], "guided_decoding_backend": "xgrammar"}),
                Structure::Choice(vec!["a".into(), "b".into()]),
                "guided_choice",
            ),
            (
                json!({"guided_grammar": "start: \"a\""}),
                Structure::Grammar("start: \"a\"".into()),
                "guided_grammar",
            ),
        ];
        for (body, want, param) in cases {
            let got = read_json(body.clone()).unwrap().unwrap();
            assert_eq!(got.structure, want, "{body}");
            assert_eq!(got.param, param);
        }
        assert!(read_json(json!({"response_format": {"type": "text"}}))
            .unwrap()
            .is_none());
        let ws = read_json(json!({"guided_json": {}, "guided_whitespace_pattern": " ?"}))
            .unwrap()
            .unwrap();
        assert_eq!(ws.whitespace_pattern.as_deref(), Some(" ?"));
    }

    #[test]
    fn malformed_or_double_constraints_are_400s() {
        for (body, param) in [
            (
                json!({"guided_json": {}, "guided_regex": "a"}),
                "guided_regex",
            ),
            (
                json!({"response_format": {"type": "json_object"}, "structured_outputs": {"choice": ["a"]}}),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"regex": "a", "choice": ["a"]}}),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"structural_tag": "x"}}),
                "structured_outputs",
            ),
            (json!({"guided_choice": []}), "guided_choice"),
            (json!({"guided_regex": 3}), "guided_regex"),
            (
                json!({"response_format": {"type": "xml"}}),
                "response_format",
            ),
        ] {
            let e = read_json(body.clone()).unwrap_err();
            assert_eq!(e.param(), Some(param), "{body}");
            assert_eq!(e.status(), 400);
        }
    }
}
