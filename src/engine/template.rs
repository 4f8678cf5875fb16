//! Chat templates rendered with minijinja, compatibly with Hugging Face transformers
//! (`transformers.utils.chat_template_utils`): `trim_blocks` + `lstrip_blocks`, loop controls,
//! `raise_exception`, `strftime_now`, a `tojson` that writes JSON the way Python's `json.dumps` does
//! (no HTML escaping, `", "`/`": "` separators), and Python string/dict methods via pycompat.

use std::path::Path;
use std::sync::Arc;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::{Map, Value as Json};

use super::error::EngineError;

const DEFAULT: &str = "default";
const TOOL_USE: &str = "tool_use";

/// A compiled chat template (and, when the model ships one, its `tool_use` variant).
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    has_tool_use: bool,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("has_tool_use", &self.has_tool_use)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

/// What a chat template is rendered with, besides the messages.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions<'a> {
    pub tools: Option<&'a [Json]>,
    pub documents: Option<&'a [Json]>,
    pub add_generation_prompt: bool,
    /// Leave the last (assistant) message open so the model continues it.
    pub continue_final_message: bool,
    /// `chat_template_kwargs`: extra variables for the template.
    pub extra: Option<&'a Map<String, Json>>,
}

impl ChatTemplate {
    /// Compiles `source`. `{% generation %}` markers (used by transformers for assistant masks) are
    /// removed, since minijinja does not know the tag.
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, EngineError> {
        Self::with_variants(source, None, bos_token, eos_token)
    }

    /// A default template and an optional `tool_use` one, picked when a request has tools.
    pub(crate) fn with_variants(
        default: &str,
        tool_use: Option<&str>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, EngineError> {
        let mut env = hf_environment();
        env.add_template_owned(DEFAULT, strip_generation_tags(default))
            .map_err(template_error)?;
        if let Some(tool_use) = tool_use {
            env.add_template_owned(TOOL_USE, strip_generation_tags(tool_use))
                .map_err(template_error)?;
        }
        Ok(Self {
            env: Arc::new(env),
            has_tool_use: tool_use.is_some(),
            bos_token,
            eos_token,
        })
    }

    /// The model folder's template, the way transformers finds it: `chat_template.jinja`, else
    /// `chat_template` in `tokenizer_config.json` (a string, or a list of named templates). `custom`
    /// (`CUSTOM_CHAT_TEMPLATE`) wins over both. `Ok(None)`: the model has no template.
    pub fn from_model_dir(dir: &Path, custom: Option<&str>) -> Result<Option<Self>, EngineError> {
        let config: Json = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                EngineError::Template(format!("tokenizer_config.json is not valid JSON: {e}"))
            })?,
            Err(_) => Json::Null,
        };
        let jinja = std::fs::read_to_string(dir.join("chat_template.jinja")).ok();
        Self::from_tokenizer_config(&config, jinja.as_deref(), custom)
    }

    /// The template a parsed `tokenizer_config.json` holds, unless a `chat_template.jinja` (`jinja`) or
    /// `custom` one wins.
    pub(crate) fn from_tokenizer_config(
        config: &Json,
        jinja: Option<&str>,
        custom: Option<&str>,
    ) -> Result<Option<Self>, EngineError> {
        let bos = special_token(config, "bos_token");
        let eos = special_token(config, "eos_token");
        if let Some(custom) = custom {
            return Self::new(custom, bos, eos).map(Some);
        }
        if let Some(source) = jinja {
            return Self::new(source, bos, eos).map(Some);
        }
        match config.get("chat_template") {
            Some(Json::String(source)) => Self::new(source, bos, eos).map(Some),
            Some(Json::Array(named)) => {
                let find = |name: &str| {
                    named
                        .iter()
                        .find(|t| t.get("name").and_then(Json::as_str) == Some(name))
                        .and_then(|t| t.get("template"))
                        .and_then(Json::as_str)
                };
                match find(DEFAULT) {
                    Some(default) => {
                        Self::with_variants(default, find(TOOL_USE), bos, eos).map(Some)
                    }
                    None => Err(EngineError::Template(
                        "tokenizer_config.json lists chat templates but none named `default`"
                            .into(),
                    )),
                }
            }
            _ => Ok(None),
        }
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Renders a conversation to the prompt text (special tokens written by the template itself).
    pub fn render(
        &self,
        messages: &[Json],
        options: &RenderOptions<'_>,
    ) -> Result<String, EngineError> {
        if options.continue_final_message && options.add_generation_prompt {
            return Err(EngineError::invalid(
                "continue_final_message",
                "continue_final_message and add_generation_prompt cannot both be true",
            ));
        }
        let name = if options.tools.is_some() && self.has_tool_use {
            TOOL_USE
        } else {
            DEFAULT
        };
        let template = self.env.get_template(name).map_err(template_error)?;
        let rendered = template
            .render(Value::from(minijinja::value::Serde(
                self.context(messages, options),
            )))
            .map_err(template_error)?;
        if options.continue_final_message {
            return cut_after_final_message(rendered, messages);
        }
        Ok(rendered)
    }

    /// The variables, in transformers' precedence: special tokens, then the caller's kwargs, then the
    /// named arguments (which a kwarg cannot override).
    fn context(&self, messages: &[Json], options: &RenderOptions<'_>) -> Map<String, Json> {
        let mut ctx = Map::new();
        let token = |t: &Option<String>| t.clone().map(Json::String).unwrap_or(Json::Null);
        ctx.insert("bos_token".into(), token(&self.bos_token));
        ctx.insert("eos_token".into(), token(&self.eos_token));
        if let Some(extra) = options.extra {
            ctx.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        ctx.insert("messages".into(), Json::Array(messages.to_vec()));
        let list = |l: Option<&[Json]>| l.map(|l| Json::Array(l.to_vec())).unwrap_or(Json::Null);
        ctx.insert("tools".into(), list(options.tools));
        ctx.insert("documents".into(), list(options.documents));
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(options.add_generation_prompt),
        );
        ctx
    }
}

/// `bos_token` / `eos_token` in tokenizer_config.json: a string or an AddedToken object.
fn special_token(config: &Json, key: &str) -> Option<String> {
    match config.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

fn template_error(e: Error) -> EngineError {
    // `raise_exception` messages are the template author's words for the client; keep them bare.
    if e.kind() == ErrorKind::InvalidOperation {
        if let Some(detail) = e.detail() {
            return EngineError::Template(detail.to_string());
        }
    }
    EngineError::Template(e.to_string())
}

/// transformers' `continue_final_message`: cut the rendering right after the last message's content,
/// dropping whatever end-of-turn tokens the template wrote after it.
fn cut_after_final_message(rendered: String, messages: &[Json]) -> Result<String, EngineError> {
    let invalid = |m: &str| EngineError::invalid("continue_final_message", m);
    let last = messages
        .last()
        .ok_or_else(|| invalid("continue_final_message needs at least one message"))?;
    let content = match last.get("content") {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Array(parts)) => parts
            .iter()
            .rev()
            .find_map(|p| p.get("text").and_then(Json::as_str))
            .map(str::to_string)
            .ok_or_else(|| invalid("the final message has no text part to continue"))?,
        _ => return Err(invalid("the final message has no content to continue")),
    };
    let needle = content.trim();
    match rendered.rfind(needle) {
        Some(at) => {
            let mut rendered = rendered;
            rendered.truncate(at + needle.len());
            Ok(rendered)
        }
        None => Err(invalid(
            "the final message does not appear in the rendered chat, so it cannot be continued",
        )),
    }
}

/// Removes `{% generation %}` and `{% endgeneration %}` tags (any whitespace-control variant).
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}").map(|end| end + 2) else {
            break;
        };
        let tag = &rest[start + 2..start + len - 2];
        let word = tag.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if word != "generation" && word != "endgeneration" {
            out.push_str(&rest[start..start + len]);
        }
        rest = &rest[start + len..];
    }
    out.push_str(rest);
    out
}

/// The environment transformers builds (an immutable sandbox with these settings and helpers).
fn hf_environment() -> Environment<'static> {
    let mut env = Environment::new();
    if let Ok(syntax) = SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
    {
        env.set_syntax(syntax);
    }
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `json.dumps(x, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`, as transformers' filter.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let _ = kwargs.get::<Option<Value>>("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut json = serde_json::to_value(value).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("cannot serialize: {e}"),
        )
    })?;
    if sort_keys {
        sort_json_keys(&mut json);
    }
    Ok(Value::from_safe_string(python_json(&json, indent)))
}

fn sort_json_keys(value: &mut Json) {
    match value {
        Json::Object(map) => {
            let mut entries: Vec<(String, Json)> = std::mem::take(map).into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            for (k, mut v) in entries {
                sort_json_keys(&mut v);
                map.insert(k, v);
            }
        }
        Json::Array(items) => items.iter_mut().for_each(sort_json_keys),
        _ => {}
    }
}

/// JSON text as Python's `json.dumps(ensure_ascii=False)` writes it: `", "` and `": "` separators
/// without indent, `","` and `": "` with it.
pub(crate) fn python_json(value: &Json, indent: Option<usize>) -> String {
    let mut out = String::new();
    write_python_json(&mut out, value, indent, 0);
    out
}

fn write_python_json(out: &mut String, value: &Json, indent: Option<usize>, depth: usize) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    let separator = if indent.is_some() { "," } else { ", " };
    match value {
        Json::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                write_python_json(out, item, indent, depth + 1);
            }
            newline(out, depth);
            out.push(']');
        }
        Json::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                out.push_str(&Json::String(key.clone()).to_string());
                out.push_str(": ");
                write_python_json(out, item, indent, depth + 1);
            }
            newline(out, depth);
            out.push('}');
        }
        Json::Number(n) if n.is_f64() => out.push_str(&python_float(n.as_f64().unwrap_or(0.0))),
        other => out.push_str(&other.to_string()),
    }
}

/// Python's float repr: shortest round-trip digits, decimal for exponents in [-4, 16), else
/// scientific with a signed two-digit exponent.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if f == 0.0 || (-4..16).contains(&exp) {
        return format!("{f:?}");
    }
    let sign = if exp < 0 { '-' } else { '+' };
    format!("{mantissa}e{sign}{:02}", exp.abs())
}

/// `strftime_now(format)`: the current UTC time, for the strftime codes templates use.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    strftime(secs, &format)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// A small strftime over Unix seconds (UTC).
fn strftime(unix_secs: u64, format: &str) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs_of_day = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = ((days + 3).rem_euclid(7)) as usize;
    let month_name = MONTHS[(month - 1) as usize];
    let day_name = WEEKDAYS[weekday];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('B') => out.push_str(month_name),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(day_name),
            Some('a') => out.push_str(&day_name[..3]),
            Some('H') => out.push_str(&format!("{:02}", secs_of_day / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs_of_day / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs_of_day % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 → (year, month 1-12, day 1-31), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(source: &str, messages: Json) -> Result<String, EngineError> {
        let t = ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into()))?;
        let messages = messages.as_array().cloned().unwrap_or_default();
        t.render(&messages, &RenderOptions::default())
    }

    #[test]
    fn tojson_writes_python_separators_without_html_escaping() {
        let out = render(
            "{{ messages[0] | tojson }}",
            json!([{"role": "user", "content": "<b>&'é", "n": [1, 2.5]}]),
        )
        .unwrap();
        assert_eq!(
            out,
            r#"{"role": "user", "content": "<b>&'é", "n": [1, 2.5]}"#
        );
    }

    #[test]
    fn tojson_indent_matches_python() {
        let out = render(
            "{{ messages[0] | tojson(indent=2) }}",
            json!([{"a": [1], "b": {}}]),
        )
        .unwrap();
        assert_eq!(out, "{\n  \"a\": [\n    1\n  ],\n  \"b\": {}\n}");
        let out = render("{{ messages[0] | tojson(4) }}", json!([{"a": 1}])).unwrap();
        assert_eq!(out, "{\n    \"a\": 1\n}");
    }

    #[test]
    fn raise_exception_reports_the_templates_message() {
        let err = render("{{ raise_exception('roles must alternate') }}", json!([])).unwrap_err();
        assert_eq!(err, EngineError::Template("roles must alternate".into()));
    }

    #[test]
    fn blocks_are_trimmed_like_transformers() {
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content | trim }}]\n    {% endif %}\n{% endfor %}\n";
        let out = render(source, json!([{"role": "user", "content": " hi "}])).unwrap();
        assert_eq!(out, "[hi]\n");
    }

    #[test]
    fn python_string_methods_and_loop_controls_work() {
        let source = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content.strip().upper() }}{{ m.get('x', 'none') }}{% endfor %}";
        let out = render(source, json!([{"content": " a "}, {"content": "b"}])).unwrap();
        assert_eq!(out, "Anone");
    }

    #[test]
    fn generation_tags_are_removed() {
        let source = "{% for m in messages %}{% generation %}{{ m.content }}{%- endgeneration %}{% endfor %}";
        assert_eq!(render(source, json!([{"content": "x"}])).unwrap(), "x");
    }

    #[test]
    fn special_tokens_tools_and_kwargs_reach_the_template() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{{ tools[0].name }}{{ documents is none }}{{ flag }}{{ add_generation_prompt }}{{ eos_token }}",
            Some("<s>".into()),
            Some("</s>".into()),
        )
        .unwrap();
        let tools = vec![json!({"name": "f"})];
        let extra = json!({"flag": "F", "bos_token": "<B>"});
        let out = t
            .render(
                &[],
                &RenderOptions {
                    tools: Some(&tools),
                    add_generation_prompt: true,
                    extra: extra.as_object(),
                    ..Default::default()
                },
            )
            .unwrap();
        // pycompat prints booleans as Python does.
        assert_eq!(out, "<B>fTrueFTrue</s>");
    }

    #[test]
    fn continue_final_message_cuts_the_end_of_turn() {
        let t = ChatTemplate::new(
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}</end>{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let messages = [
            json!({"role": "user", "content": "hi"}),
            json!({"role": "assistant", "content": "Sure, "}),
        ];
        let options = RenderOptions {
            continue_final_message: true,
            ..Default::default()
        };
        assert_eq!(
            t.render(&messages, &options).unwrap(),
            "<user>hi</end><assistant>Sure,"
        );
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-07-23 12:34:56 UTC, a Tuesday.
        assert_eq!(
            strftime(1_721_738_096, "%d %b %Y %H:%M:%S %A %B %m %y %%"),
            "23 Jul 2024 12:34:56 Tuesday July 07 24 %"
        );
        assert_eq!(strftime(0, "%Y-%m-%d %a"), "1970-01-01 Thu");
    }

    #[test]
    fn python_floats_keep_their_point() {
        assert_eq!(
            python_json(&json!([1.0, 0.5, 1e20, -3, 1e-5, 0.0001, 1.5e16]), None),
            "[1.0, 0.5, 1e+20, -3, 1e-05, 0.0001, 1.5e+16]"
        );
    }

    /// The source `from_model_dir` found in `dir`, rendered with no messages (`None`: no template).
    fn found(dir: &Path) -> Option<String> {
        ChatTemplate::from_model_dir(dir, None)
            .unwrap()
            .map(|t| t.render(&[], &RenderOptions::default()).unwrap())
    }

    #[test]
    fn model_dir_lookup_takes_the_default_of_a_list_then_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tokenizer_config.json");
        std::fs::write(
            &config,
            r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
        )
        .unwrap();
        assert_eq!(found(dir.path()).as_deref(), Some("D"));
        std::fs::write(&config, r#"{"chat_template": "S"}"#).unwrap();
        assert_eq!(found(dir.path()).as_deref(), Some("S"));
        std::fs::write(&config, "{}").unwrap();
        assert_eq!(found(dir.path()), None);
        std::fs::remove_file(&config).unwrap();
        assert_eq!(found(dir.path()), None);
    }

    #[test]
    fn a_jinja_file_wins_over_tokenizer_config() {
        // transformers (v4.43+): `chat_template.jinja` is preferred to `tokenizer_config.json`'s.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("chat_template.jinja"), "J").unwrap();
        assert_eq!(found(dir.path()).as_deref(), Some("J"));
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"chat_template": "C", "bos_token": "<s>"}"#,
        )
        .unwrap();
        assert_eq!(found(dir.path()).as_deref(), Some("J"));
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"chat_template": [{"name": "default", "template": "D"}]}"#,
        )
        .unwrap();
        assert_eq!(found(dir.path()).as_deref(), Some("J"));
        // `CUSTOM_CHAT_TEMPLATE` wins over both.
        let custom = ChatTemplate::from_model_dir(dir.path(), Some("X"))
            .unwrap()
            .unwrap();
        assert_eq!(custom.render(&[], &RenderOptions::default()).unwrap(), "X");
    }

    #[test]
    fn syntax_errors_are_template_errors() {
        assert!(matches!(
            ChatTemplate::new("{% if %}", None, None),
            Err(EngineError::Template(_))
        ));
    }
}
