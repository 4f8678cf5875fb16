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

#[test]
fn the_official_openai_client_passes_the_e2e_suite() {
    let python = python();
    if let Err(why) = python_ready(&python) {
        if std::env::var("REQUIRE_PYTHON_E2E").as_deref() == Ok("1") {
            panic!("REQUIRE_PYTHON_E2E=1 but {why} (pip install -r tests/e2e/requirements.txt)");
        }
        eprintln!("SKIPPED the OpenAI e2e suite: {why}");
        return;
    }
    let model = fixture("llama");
    let vars = vec![
        ("MODEL_NAME".to_string(), model.display().to_string()),
        (
            "OPENAI_SERVED_MODEL_NAME_OVERRIDE".to_string(),
            SERVED_NAME.to_string(),
        ),
        ("KV_CACHE_MEMORY".to_string(), "64MiB".to_string()),
        ("MAX_CONCURRENCY".to_string(), "8".to_string()),
    ];
    let mut server = Running::start(&vars, &["serve", "--host", "127.0.0.1", "--port", "0"]);
    let base_url = server.wait_listening(Duration::from_secs(120));
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    let out = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(&suite)
        .env("WORKER_BASE_URL", &base_url)
        .env("WORKER_MODEL", SERVED_NAME)
        .env("WORKER_FIXTURE", &model)
        .output()
        .expect("run pytest");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{report}");
    assert!(
        out.status.success(),
        "the e2e suite failed:\n{report}\n--- server stderr ---\n{}",
        server.stderr()
    );
}

/// vLLM's embedding extensions through the official client, against `serve` on the bert-embed fixture.
#[test]
fn the_official_openai_client_uses_vllms_embedding_extensions() {
    let python = python();
    if let Err(why) = python_ready(&python) {
        if std::env::var("REQUIRE_PYTHON_E2E").as_deref() == Ok("1") {
            panic!("REQUIRE_PYTHON_E2E=1 but {why} (pip install -r tests/e2e/requirements.txt)");
        }
        eprintln!("SKIPPED the OpenAI embeddings e2e suite: {why}");
        return;
    }
    let model = fixture("bert-embed");
    let vars = vec![("MODEL_NAME".to_string(), model.display().to_string())];
    let mut server = Running::start(&vars, &["serve", "--host", "127.0.0.1", "--port", "0"]);
    let base_url = server.wait_listening(Duration::from_secs(120));
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/test_embeddings_vllm.py");
    let out = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(&suite)
        .env("WORKER_EMBED_BASE_URL", &base_url)
        .env("WORKER_EMBED_FIXTURE", &model)
        .output()
        .expect("run pytest");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{report}");
    assert!(
        out.status.success() && report.contains("6 passed"),
        "the embeddings e2e suite failed:\n{report}\n--- server stderr ---\n{}",
        server.stderr()
    );
}

/// `REASONING_PARSER` through the official client, against `serve` on the llama fixture.
#[test]
fn the_official_openai_client_reads_reasoning_content() {
    let python = python();
    if let Err(why) = python_ready(&python) {
        if std::env::var("REQUIRE_PYTHON_E2E").as_deref() == Ok("1") {
            panic!("REQUIRE_PYTHON_E2E=1 but {why} (pip install -r tests/e2e/requirements.txt)");
        }
        eprintln!("SKIPPED the reasoning e2e suite: {why}");
        return;
    }
    let model = fixture("llama");
    let vars = vec![
        ("MODEL_NAME".to_string(), model.display().to_string()),
        (
            "OPENAI_SERVED_MODEL_NAME_OVERRIDE".to_string(),
            "m".to_string(),
        ),
        ("KV_CACHE_MEMORY".to_string(), "64MiB".to_string()),
        ("REASONING_PARSER".to_string(), "qwen3".to_string()),
    ];
    let mut server = Running::start(&vars, &["serve", "--host", "127.0.0.1", "--port", "0"]);
    let base_url = server.wait_listening(Duration::from_secs(120));
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/test_reasoning.py");
    let out = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(&suite)
        .env("WORKER_REASONING_BASE_URL", &base_url)
        .output()
        .expect("run pytest");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{report}");
    assert!(
        out.status.success() && report.contains("2 passed"),
        "the reasoning e2e suite failed:\n{report}\n--- server stderr ---\n{}",
        server.stderr()
    );
}
