//! The end-to-end suite: the official `openai` Python client (tests/e2e, pytest) against the real
//! `worker-candle serve` on the llama fixture. Python comes from `WORKER_TEST_PYTHON` (else `python3`);
//! without Python or the `openai` package the test prints why and passes, unless
//! `REQUIRE_PYTHON_E2E=1` (CI), where that is a failure.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::process::{fixture, Running};

const SERVED_NAME: &str = "fixture-llama";

pub(crate) fn python() -> String {
    std::env::var("WORKER_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Whether the interpreter has what the suite imports.
pub(crate) fn python_ready(python: &str) -> Result<(), String> {
    let out = Command::new(python)
        .args(["-c", "import openai, pytest"])
        .output()
        .map_err(|e| format!("cannot run `{python}`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{python}` lacks openai/pytest: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Starts `serve` with `vars` and runs the pytest `suite` (under tests/e2e) against it, the server's
/// base URL in `url_var` beside `env`; `passed` (e.g. "6 passed") must be in the report when given.
/// Without Python or its packages it prints why and returns, unless `REQUIRE_PYTHON_E2E=1`.
fn run_suite(
    what: &str,
    vars: &[(&str, String)],
    suite: &str,
    url_var: &str,
    env: &[(&str, String)],
    passed: Option<&str>,
) {
    let python = python();
    if let Err(why) = python_ready(&python) {
        if std::env::var("REQUIRE_PYTHON_E2E").as_deref() == Ok("1") {
            panic!("REQUIRE_PYTHON_E2E=1 but {why} (pip install -r tests/e2e/requirements.txt)");
        }
        eprintln!("SKIPPED the {what} e2e suite: {why}");
        return;
    }
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let mut server = Running::start(&vars, &["serve", "--host", "127.0.0.1", "--port", "0"]);
    let base_url = server.wait_listening(Duration::from_secs(120));
    let suite = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/e2e")
        .join(suite);
    let out = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(&suite)
        .env(url_var, &base_url)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run pytest");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{report}");
    assert!(
        out.status.success() && passed.is_none_or(|p| report.contains(p)),
        "the {what} e2e suite failed:\n{report}\n--- server stderr ---\n{}",
        server.stderr()
    );
}

#[test]
fn the_official_openai_client_passes_the_e2e_suite() {
    let model = fixture("llama").display().to_string();
    run_suite(
        "OpenAI",
        &[
            ("MODEL_NAME", model.clone()),
            ("OPENAI_SERVED_MODEL_NAME_OVERRIDE", SERVED_NAME.into()),
            ("KV_CACHE_MEMORY", "64MiB".into()),
            ("MAX_CONCURRENCY", "8".into()),
        ],
        "",
        "WORKER_BASE_URL",
        &[
            ("WORKER_MODEL", SERVED_NAME.into()),
            ("WORKER_FIXTURE", model),
        ],
        None,
    );
}

/// vLLM's embedding extensions through the official client, against `serve` on the bert-embed fixture.
#[test]
fn the_official_openai_client_uses_vllms_embedding_extensions() {
    let model = fixture("bert-embed").display().to_string();
    run_suite(
        "OpenAI embeddings",
        &[("MODEL_NAME", model.clone())],
        "test_embeddings_vllm.py",
        "WORKER_EMBED_BASE_URL",
        &[("WORKER_EMBED_FIXTURE", model)],
        Some("6 passed"),
    );
}

/// `REASONING_PARSER` through the official client, against `serve` on the llama fixture.
#[test]
fn the_official_openai_client_reads_reasoning_content() {
    run_suite(
        "reasoning",
        &[
            ("MODEL_NAME", fixture("llama").display().to_string()),
            ("OPENAI_SERVED_MODEL_NAME_OVERRIDE", "m".into()),
            ("KV_CACHE_MEMORY", "64MiB".into()),
            ("REASONING_PARSER", "qwen3".into()),
        ],
        "test_reasoning.py",
        "WORKER_REASONING_BASE_URL",
        &[],
        Some("2 passed"),
    );
}

/// `TOOL_CALL_PARSER=qwen3_coder` and `ENABLE_AUTO_TOOL_CHOICE=false` through the official client.
#[test]
fn the_official_openai_client_gets_qwen3_coder_calls_and_vllms_auto_refusal() {
    run_suite(
        "tool parsers",
        &[
            ("MODEL_NAME", fixture("llama").display().to_string()),
            ("OPENAI_SERVED_MODEL_NAME_OVERRIDE", "m".into()),
            ("KV_CACHE_MEMORY", "64MiB".into()),
            ("TOOL_CALL_PARSER", "qwen3_coder".into()),
            ("ENABLE_AUTO_TOOL_CHOICE", "false".into()),
        ],
        "test_tool_parsers.py",
        "WORKER_TOOLS_BASE_URL",
        &[],
        Some("3 passed"),
    );
}
