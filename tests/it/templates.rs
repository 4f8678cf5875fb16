//! Chat templates rendered by `ChatTemplate` against what Hugging Face transformers renders: the
//! fixtures' own templates (their `reference.json` chat prompts) and published templates kept in
//! `tests/data/templates/` (expected strings computed by `generate_expected.py` with Python jinja2).

use std::path::{Path, PathBuf};

use serde_json::Value;
use worker_candle::engine::template::{ChatTemplate, RenderOptions};
use worker_candle::engine::EngineError;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/templates")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn fixture_templates_render_the_reference_chat_prompts() {
    let mut checked = 0;
    for model in ["llama", "qwen2", "mistral", "phi3", "gemma2", "gpt2"] {
        let dir = fixtures().join(model);
        let reference = read_json(&dir.join("reference.json"));
        let template = ChatTemplate::from_model_dir(&dir, None)
            .unwrap_or_else(|e| panic!("{model}: {e}"))
            .unwrap_or_else(|| panic!("{model} has a chat template"));
        for case in reference["cases"].as_array().expect("cases") {
            let Some(messages) = case["messages"].as_array() else {
                continue;
            };
            let options = RenderOptions {
                add_generation_prompt: true,
                ..Default::default()
            };
            let rendered = template
                .render(messages, &options)
                .unwrap_or_else(|e| panic!("{model}: {e}"));
            assert_eq!(rendered, case["prompt"].as_str().unwrap(), "{model}");
            checked += 1;
        }
    }
    assert!(checked >= 12, "only {checked} chat cases checked");
}

/// The engine's one lookup finds each fixture's template where it is kept: `tokenizer_config.json`
/// (llama), `chat_template.jinja` (mistral).
#[test]
fn fixture_templates_come_from_where_they_are_kept() {
    let messages = [serde_json::json!({"role": "user", "content": "Hi"})];
    let options = RenderOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    let render = |t: &ChatTemplate| t.render(&messages, &options).unwrap();
    for (model, source) in [
        (
            "llama",
            read_json(&fixtures().join("llama/tokenizer_config.json"))["chat_template"]
                .as_str()
                .expect("llama keeps its template in tokenizer_config.json")
                .to_string(),
        ),
        (
            "mistral",
            std::fs::read_to_string(fixtures().join("mistral/chat_template.jinja"))
                .expect("mistral keeps its template in chat_template.jinja"),
        ),
    ] {
        let dir = fixtures().join(model);
        let found = ChatTemplate::from_model_dir(&dir, None).unwrap().unwrap();
        let expected = ChatTemplate::new(
            &source,
            found.bos_token().map(str::to_string),
            found.eos_token().map(str::to_string),
        )
        .unwrap();
        assert_eq!(render(&found), render(&expected), "{model}");
    }
}

#[test]
fn an_embedding_model_has_no_chat_template() {
    let template = ChatTemplate::from_model_dir(&fixtures().join("bert-embed"), None).unwrap();
    assert!(template.is_none());
}

#[test]
fn a_custom_template_overrides_the_models() {
    let template = ChatTemplate::from_model_dir(
        &fixtures().join("llama"),
        Some("{{ bos_token }}|{% for m in messages %}{{ m.content }}{% endfor %}"),
    )
    .unwrap()
    .unwrap();
    let messages = [serde_json::json!({"role": "user", "content": "hi"})];
    let rendered = template
        .render(&messages, &RenderOptions::default())
        .unwrap();
    assert_eq!(rendered, "<|begin_of_text|>|hi");
}

#[test]
fn published_templates_render_as_transformers_does() {
    let cases = read_json(&data().join("expected.json"));
    let cases = cases.as_array().expect("a list of cases");
    assert!(cases.len() >= 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let source =
            std::fs::read_to_string(data().join(case["template"].as_str().unwrap())).unwrap();
        let token = |k: &str| case[k].as_str().map(str::to_string);
        let template = ChatTemplate::new(&source, token("bos_token"), token("eos_token"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let tools = case["tools"].as_array().map(Vec::as_slice);
        let options = RenderOptions {
            tools,
            add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap_or(false),
            extra: case["kwargs"].as_object(),
            ..Default::default()
        };
        let result = template.render(case["messages"].as_array().unwrap(), &options);
        match (&case["prompt"], &case["error"]) {
            (Value::String(expected), _) => {
                let rendered = result.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(&rendered, expected, "{name}");
            }
            (_, Value::String(message)) => {
                assert_eq!(
                    result,
                    Err(EngineError::Template(message.clone())),
                    "{name}"
                );
            }
            _ => panic!("{name}: expected.json has neither prompt nor error"),
        }
    }
}

#[test]
fn a_template_can_report_the_tools_it_received() {
    // The e2e suite's probe: raise_exception carries what the template saw back to the client.
    let template = ChatTemplate::new(
        "{{ raise_exception('tools: ' + (tools | map(attribute='function') | map(attribute='name') | join(',') if tools else 'none')) }}",
        None,
        None,
    )
    .unwrap();
    let tools = vec![
        serde_json::json!({"type": "function", "function": {"name": "a"}}),
        serde_json::json!({"type": "function", "function": {"name": "b"}}),
    ];
    let with = RenderOptions {
        tools: Some(&tools),
        ..Default::default()
    };
    assert_eq!(
        template.render(&[], &with),
        Err(EngineError::Template("tools: a,b".into()))
    );
    assert_eq!(
        template.render(&[], &RenderOptions::default()),
        Err(EngineError::Template("tools: none".into()))
    );
}

#[test]
fn named_templates_pick_tool_use_when_tools_are_given() {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "bos_token": {"content": "<s>", "special": true},
        "eos_token": "</s>",
        "chat_template": [
            {"name": "default", "template": "{{ bos_token }}plain"},
            {"name": "tool_use", "template": "{{ bos_token }}tools:{{ tools | length }}{{ eos_token }}"}
        ]
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let template = ChatTemplate::from_model_dir(dir.path(), None)
        .unwrap()
        .unwrap();
    let tools = vec![serde_json::json!({"type": "function", "function": {"name": "f"}})];
    let with_tools = RenderOptions {
        tools: Some(&tools),
        ..Default::default()
    };
    assert_eq!(template.render(&[], &with_tools).unwrap(), "<s>tools:1</s>");
    assert_eq!(
        template.render(&[], &RenderOptions::default()).unwrap(),
        "<s>plain"
    );
}
