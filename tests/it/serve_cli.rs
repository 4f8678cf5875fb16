//! The command line of the real binary where no model is needed: how it explains itself, how it
//! rejects bad configuration, and its logs.

use std::time::Duration;

use crate::common::process::run;

fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const LIMIT: Duration = Duration::from_secs(30);

#[test]
fn without_queue_or_command_it_says_how_to_start_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let out = crate::common::process::command(&[], &[])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("worker-candle serve"), "{stderr}");
    assert!(stderr.contains("--test-input"), "{stderr}");
    assert!(stderr.contains("RUNPOD_WEBHOOK_GET_JOB"), "{stderr}");
}

#[test]
fn a_malformed_variable_stops_start_up_with_its_name_value_and_expectation() {
    let out = run(&vars(&[("MAX_CONCURRENCY", "many")]), &["serve"], LIMIT);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("MAX_CONCURRENCY"), "{stderr}");
    assert!(stderr.contains("many"), "{stderr}");
    assert!(stderr.contains("positive integer"), "{stderr}");
}

#[test]
fn the_queue_worker_requires_model_name() {
    let out = run(
        &vars(&[
            (
                "RUNPOD_WEBHOOK_GET_JOB",
                "http://127.0.0.1:9/v2/job-take/$ID?gpu=x",
            ),
            (
                "RUNPOD_WEBHOOK_POST_OUTPUT",
                "http://127.0.0.1:9/v2/job-done/$RUNPOD_POD_ID/$ID?gpu=x",
            ),
        ]),
        &[],
        LIMIT,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("MODEL_NAME is required"), "{stderr}");
}

#[test]
fn test_input_that_is_not_json_fails() {
    let out = run(&[], &["--test-input", "{nope"], LIMIT);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not valid JSON"), "{stderr}");
}

#[test]
fn json_logs_name_ignored_variables_and_never_show_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let out = crate::common::process::command(
        &vars(&[
            ("LOG_FORMAT", "json"),
            ("ENFORCE_EAGER", "true"),
            ("HF_TOKEN", "hf_topsecret"),
            ("RUNPOD_AI_API_KEY", "rp_topsecret"),
            ("RUST_LOG", "debug"),
        ]),
        &[],
    )
    .current_dir(dir.path())
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("ENFORCE_EAGER"))
        .unwrap_or_else(|| panic!("no log line about ENFORCE_EAGER: {stderr}"));
    let parsed: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
    assert!(parsed["fields"]["message"]
        .as_str()
        .unwrap()
        .contains("accepted, no effect on this engine"));
    assert!(!stderr.contains("topsecret"), "{stderr}");
}
