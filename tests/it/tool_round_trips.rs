//! Tool round trips on `/v1/responses` and `/v1/messages` with the official `openai` and `anthropic`
//! clients (tests/e2e/test_tool_round_trips.py) against the real `worker-candle serve` on the llama
//! fixture, with a chat template that supports tools (`CUSTOM_CHAT_TEMPLATE` =
//! tests/e2e/tool_template.jinja) and an API key. Skipped like the e2e suite without Python.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::process::{fixture, Running};
use crate::openai_client::{python, python_ready};

const SERVED_NAME: &str = "fixture-llama";
const KEY: &str = "tool-round-trip-key";

#[test]
fn the_official_clients_round_trip_tool_calls() {
    let python = python();
    if let Err(why) = python_ready(&python) {
        if std::env::var("REQUIRE_PYTHON_E2E").as_deref() == Ok("1") {
            panic!("REQUIRE_PYTHON_E2E=1 but {why} (pip install -r tests/e2e/requirements.txt)");
        }
        eprintln!("SKIPPED the tool round-trip suite: {why}");
        return;
    }
    let e2e = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    let template = std::fs::read_to_string(e2e.join("tool_template.jinja")).unwrap();
    let model = fixture("llama");
    let vars = vec![
        ("MODEL_NAME".to_string(), model.display().to_string()),
        (
            "OPENAI_SERVED_MODEL_NAME_OVERRIDE".to_string(),
            SERVED_NAME.to_string(),
        ),
        ("CUSTOM_CHAT_TEMPLATE".to_string(), template),
        ("API_KEY".to_string(), KEY.to_string()),
        ("KV_CACHE_MEMORY".to_string(), "64MiB".to_string()),
    ];
    let mut server = Running::start(&vars, &["serve", "--host", "127.0.0.1", "--port", "0"]);
    let base_url = server.wait_listening(Duration::from_secs(120));
    let out = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"])
        .arg(e2e.join("test_tool_round_trips.py"))
        .env("WORKER_BASE_URL", &base_url)
        .env("WORKER_MODEL", SERVED_NAME)
        .env("WORKER_FIXTURE", &model)
        .env("WORKER_API_KEY", KEY)
        .output()
        .expect("run pytest");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{report}");
    assert!(
        out.status.success() && report.contains("4 passed"),
        "the tool round-trip suite failed:\n{report}\n--- server stderr ---\n{}",
        server.stderr()
    );
}
