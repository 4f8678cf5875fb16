//! The RunPod Hub files: `.runpod/hub.json`'s form names only variables the worker reads (and all
//! of them but those the platform or the system sets), its options, defaults and presets parse;
//! every `.runpod/tests.json` job runs through `--test-input` on a fixture model with the shape the
//! Hub's check expects.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use worker_candle::config::{Config, SETTINGS};

use crate::common::process::{fixture, run};

/// Read by the worker but not offered in the Hub's form: set by the platform (queue URLs, ids), by
/// the system (the home and cache folders), or only for load-balancing endpoints (the Hub deploys
/// queue endpoints).
const NOT_IN_THE_FORM: &[&str] = &["HF_HOME", "XDG_CACHE_HOME", "HOME", "PORT", "PORT_HEALTH"];

fn read(name: &str) -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/.runpod/");
    let text = std::fs::read_to_string(format!("{path}{name}")).expect("the file");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"))
}

/// A form value as the variable's text (booleans through the input's true/false values).
fn as_text(value: &Value, input: &Value) -> String {
    match value {
        Value::Bool(b) => {
            let key = if *b { "trueValue" } else { "falseValue" };
            input[key]
                .as_str()
                .expect("a boolean input names its values")
                .to_string()
        }
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn parses(name: &str, value: &str) -> Result<Config, String> {
    Config::from_vars([(name.to_string(), value.to_string())]).map_err(|e| e.to_string())
}

#[test]
fn the_hub_form_names_every_variable_the_worker_reads_and_no_other() {
    let hub = read("hub.json");
    assert_eq!(hub["type"], "serverless");
    assert_eq!(hub["category"], "language");
    assert!(hub["title"].is_string() && hub["description"].is_string());
    let config = &hub["config"];
    assert!(["CPU", "GPU"].contains(&config["runsOn"].as_str().unwrap()));
    if config["runsOn"] == "CPU" {
        assert!(
            config["cpuFlavor"].is_string(),
            "a CPU listing names its flavors"
        );
    } else {
        assert!(config["gpuIds"].is_string() && config["gpuCount"].is_number());
    }
    assert!(config["containerDiskInGb"].is_number());

    let env = config["env"].as_array().expect("env");
    let declared: BTreeSet<&str> = SETTINGS.iter().map(|s| s.name).collect();
    let mut in_form = BTreeSet::new();
    for entry in env {
        let key = entry["key"].as_str().expect("key");
        assert!(
            declared.contains(key),
            "{key} is in hub.json but the worker does not read it"
        );
        assert!(in_form.insert(key), "{key} twice in hub.json");
        let input = &entry["input"];
        assert!(
            input["name"].is_string() && input["description"].is_string(),
            "{key}"
        );
        assert!(
            input["advanced"].is_boolean(),
            "{key}: every input says whether it is advanced"
        );
        let kind = input["type"].as_str().unwrap();
        assert!(
            ["string", "number", "boolean"].contains(&kind),
            "{key}: {kind}"
        );
        // Every offered value is one the worker accepts.
        if let Some(default) = input.get("default") {
            let text = as_text(default, input);
            parses(key, &text).unwrap_or_else(|e| panic!("{key} default {text}: {e}"));
        }
        if kind == "boolean" {
            for value in [true, false] {
                let text = as_text(&Value::Bool(value), input);
                parses(key, &text).unwrap_or_else(|e| panic!("{key}={text}: {e}"));
            }
        }
        for option in input["options"].as_array().into_iter().flatten() {
            let text = as_text(&option["value"], input);
            parses(key, &text).unwrap_or_else(|e| panic!("{key} option {text}: {e}"));
        }
    }
    let basic: Vec<&str> = env
        .iter()
        .filter(|e| e["input"]["advanced"] == false)
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert!(
        basic.contains(&"MODEL_NAME") && basic.len() < env.len() / 2,
        "{basic:?}"
    );
    let missing: Vec<&&str> = declared
        .iter()
        .filter(|n| !in_form.contains(**n))
        .filter(|n| !n.starts_with("RUNPOD_") && !NOT_IN_THE_FORM.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "read by the worker, missing from hub.json: {missing:?}"
    );

    let presets = config["presets"].as_array().expect("presets");
    assert!(!presets.is_empty());
    assert!(presets
        .iter()
        .any(|p| p["defaults"]["MODEL_NAME"] == "HuggingFaceTB/SmolLM2-135M-Instruct"));
    for preset in presets {
        let vars: Vec<(String, String)> = preset["defaults"]
            .as_object()
            .expect("defaults")
            .iter()
            .map(|(k, v)| (k.clone(), as_text(v, &Value::Null)))
            .collect();
        for (k, _) in &vars {
            assert!(
                declared.contains(k.as_str()),
                "preset sets {k}, which the worker does not read"
            );
        }
        Config::from_vars(vars).unwrap_or_else(|e| panic!("preset {}: {e}", preset["name"]));
    }
}

#[test]
fn every_tests_json_job_passes_through_test_input_on_a_fixture() {
    let tests = read("tests.json");
    let config = &tests["config"];
    assert!(config["cpuFlavor"].is_string() || config["gpuTypeId"].is_string());
    let mut vars: Vec<(String, String)> = config["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            let key = e["key"].as_str().unwrap().to_string();
            assert!(
                SETTINGS.iter().any(|s| s.name == key),
                "tests.json sets {key}, not read"
            );
            (key, e["value"].as_str().unwrap().to_string())
        })
        .collect();
    let model = vars
        .iter()
        .find(|(k, _)| k == "MODEL_NAME")
        .map(|(_, v)| v.clone())
        .expect("tests.json names its model");
    assert_eq!(model, "HuggingFaceTB/SmolLM2-135M-Instruct");
    // The fixture stands in for the model, under its name; nothing downloads.
    vars.retain(|(k, _)| k != "MODEL_NAME" && k != "KV_CACHE_MEMORY" && k != "MAX_MODEL_LEN");
    vars.push(("MODEL_NAME".into(), fixture("llama").display().to_string()));
    vars.push(("OPENAI_SERVED_MODEL_NAME_OVERRIDE".into(), model.clone()));
    vars.push(("KV_CACHE_MEMORY".into(), "64MiB".into()));
    let jobs = tests["tests"].as_array().expect("tests");
    let mut routes = BTreeSet::new();
    for job in jobs {
        let name = job["name"].as_str().expect("name");
        assert!(
            job["timeout"].as_u64().is_some_and(|t| t > 0),
            "{name}: a timeout"
        );
        let input = serde_json::json!({ "input": job["input"] }).to_string();
        let out = run(&vars, &["--test-input", &input], Duration::from_secs(120));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name} failed: {stderr}");
        let result: Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(result.get("error").is_none(), "{name}: {result}");
        let output = &result["output"][0];
        let route = job["input"]["openai_route"].as_str().unwrap_or("native");
        routes.insert(route.to_string());
        match route {
            "native" => {
                let text = &output["choices"][0]["tokens"][0];
                assert!(
                    text.as_str().is_some_and(|t| !t.is_empty()),
                    "{name}: {result}"
                );
                assert!(
                    output["usage"]["output"].as_u64().unwrap() > 0,
                    "{name}: {result}"
                );
            }
            "/v1/models" => assert_eq!(output["data"][0]["id"], model.as_str(), "{name}"),
            "/v1/chat/completions" => {
                assert_eq!(output["object"], "chat.completion", "{name}: {result}");
                assert!(
                    output["choices"][0]["message"]["content"].is_string(),
                    "{name}"
                );
                assert_eq!(output["model"], model.as_str());
            }
            "/v1/completions" => {
                assert_eq!(output["object"], "text_completion", "{name}: {result}");
                assert!(output["choices"][0]["text"].is_string(), "{name}");
            }
            other => panic!("{name}: a route this test does not check: {other}"),
        }
    }
    for route in ["native", "/v1/chat/completions", "/v1/completions"] {
        assert!(routes.contains(route), "tests.json has no {route} job");
    }
}
