//! `/v1/embeddings` over HTTP through the real binary (`worker-candle serve` on the bert-embed fixture):
//! every input shape, base64, dimensions, truncation, errors in OpenAI's shape, and a native job.

use std::time::Duration;

use crate::common::process::{fixture, Running};
use serde_json::{json, Value};
use worker_candle::api::openai::embeddings::decode_base64;

struct Worker {
    _process: Running,
    base: String,
    http: reqwest::Client,
    reference: Vec<(String, Vec<u32>, Vec<f32>)>,
}

const MODEL: &str = "bert-test";

fn start() -> Worker {
    start_dir(fixture("bert-embed"))
}

fn start_dir(dir: std::path::PathBuf) -> Worker {
    let envs = vec![
        ("MODEL_NAME".to_string(), dir.display().to_string()),
        (
            "OPENAI_SERVED_MODEL_NAME_OVERRIDE".to_string(),
            MODEL.to_string(),
        ),
    ];
    let mut process = Running::start(&envs, &["serve", "--port", "0"]);
    let base = process.wait_listening(Duration::from_secs(60));
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let reference = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["input"].as_str().unwrap().to_string(),
                serde_json::from_value(c["input_ids"].clone()).unwrap(),
                serde_json::from_value(c["embedding"].clone()).unwrap(),
            )
        })
        .collect();
    Worker {
        _process: process,
        base,
        http: reqwest::Client::new(),
        reference,
    }
}

impl Worker {
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }
}

fn vector(item: &Value) -> Vec<f32> {
    match &item["embedding"] {
        Value::String(s) => decode_base64(s).expect("base64 of f32"),
        v => serde_json::from_value(v.clone()).unwrap(),
    }
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-5, "max deviation {worst}");
}

#[tokio::test]
async fn embeddings_over_http() {
    let w = start();
    let texts: Vec<&str> = w.reference.iter().map(|r| r.0.as_str()).collect();

    // A list of strings, as the seed's example sends it.
    let (status, body) = w
        .post("/v1/embeddings", json!({"model": MODEL, "input": texts}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], MODEL);
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), texts.len());
    for (i, (item, r)) in data.iter().zip(&w.reference).enumerate() {
        assert_eq!(item["index"], i);
        assert_eq!(item["object"], "embedding");
        assert_close(&vector(item), &r.2);
    }
    let tokens: usize = w.reference.iter().map(|r| r.1.len()).sum();
    assert_eq!(body["usage"]["prompt_tokens"], tokens);
    assert_eq!(body["usage"]["total_tokens"], tokens);

    // One string; token ids; lists of token ids; base64, under /openai/v1 too.
    let (s, one) = w
        .post("/openai/v1/embeddings", json!({"input": texts[1]}))
        .await;
    assert_eq!(s, 200, "{one}");
    assert_close(&vector(&one["data"][0]), &w.reference[1].2);
    let (s, ids) = w
        .post(
            "/v1/embeddings",
            json!({"input": w.reference[2].1, "encoding_format": "base64"}),
        )
        .await;
    assert_eq!(s, 200, "{ids}");
    assert!(ids["data"][0]["embedding"].is_string());
    assert_close(&vector(&ids["data"][0]), &w.reference[2].2);
    let lists: Vec<&Vec<u32>> = w.reference.iter().map(|r| &r.1).collect();
    let (s, many) = w.post("/v1/embeddings", json!({"input": lists})).await;
    assert_eq!(s, 200, "{many}");
    assert_close(&vector(&many["data"][3]), &w.reference[3].2);

    // Matryoshka: a unit-length prefix.
    let (s, short) = w
        .post(
            "/v1/embeddings",
            json!({"input": texts[0], "dimensions": 8}),
        )
        .await;
    assert_eq!(s, 200, "{short}");
    let v = vector(&short["data"][0]);
    assert_eq!(v.len(), 8);
    let norm = w.reference[0].2[..8]
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt();
    let want: Vec<f32> = w.reference[0].2[..8].iter().map(|x| x / norm).collect();
    assert_close(&v, &want);

    // Errors in OpenAI's shape.
    for (body, param) in [
        (json!({"input": texts[0], "dimensions": 65}), "dimensions"),
        (json!({"input": vec![7u32; 200]}), "input"),
        (json!({"input": []}), "input"),
        (
            json!({"input": texts[0], "encoding_format": "hex"}),
            "encoding_format",
        ),
        (json!({"input": [5, 99999]}), "input"),
    ] {
        let (s, e) = w.post("/v1/embeddings", body.clone()).await;
        assert_eq!(s, 400, "{body} -> {e}");
        // The job bridge keeps status and message (not OpenAI's `param`); the message names it.
        let message = e["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(param), "{param}: {e}");
    }
    let (s, e) = w
        .post("/v1/embeddings", json!({"input": vec![7u32; 200]}))
        .await;
    assert!(
        e["error"]["message"].as_str().unwrap().contains("128"),
        "{s} {e}"
    );
    let (s, e) = w
        .post("/v1/embeddings", json!({"model": "other", "input": "x"}))
        .await;
    assert_eq!(s, 404, "{e}");

    // Truncation instead of rejection: the first 128 tokens.
    let long: Vec<u32> = (0..200).map(|i| 5 + i % 50).collect();
    let (s, cut) = w
        .post(
            "/v1/embeddings",
            json!({"input": long, "truncate_prompt_tokens": 128}),
        )
        .await;
    assert_eq!(s, 200, "{cut}");
    assert_eq!(cut["usage"]["prompt_tokens"], 128);
    let (_, first) = w
        .post("/v1/embeddings", json!({"input": &long[..128]}))
        .await;
    assert_close(&vector(&cut["data"][0]), &vector(&first["data"][0]));

    // An encoder cannot generate: a clear 400, not a hang.
    let (s, e) = w
        .post(
            "/v1/completions",
            json!({"prompt": "hello", "max_tokens": 2}),
        )
        .await;
    assert_eq!(s, 400, "{e}");
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// vLLM's extensions: `normalize: false`, chat-style `messages`, and `dimensions` refused on a model
/// not trained for it.
#[tokio::test]
async fn vllm_embedding_extensions() {
    let w = start();
    let text = w.reference[0].0.clone();
    let (s, raw) = w
        .post("/v1/embeddings", json!({"input": text, "normalize": false}))
        .await;
    assert_eq!(s, 200, "{raw}");
    let raw = vector(&raw["data"][0]);
    assert!((norm(&raw) - 1.0).abs() > 1e-3, "a raw mean-pooled vector");
    let unit: Vec<f32> = raw.iter().map(|x| x / norm(&raw)).collect();
    assert_close(&unit, &w.reference[0].2);
    let (s, same) = w
        .post("/v1/embeddings", json!({"input": text, "normalize": true}))
        .await;
    assert_eq!(s, 200);
    assert_close(&vector(&same["data"][0]), &w.reference[0].2);

    // Chat-style: the messages rendered by the template, embedded like that text.
    let template = "{% for m in messages %}{{ m.content }}{% endfor %}";
    let (s, chat) = w
        .post(
            "/v1/embeddings",
            json!({"messages": [{"role": "user", "content": text}], "chat_template": template,
                   "add_special_tokens": true}),
        )
        .await;
    assert_eq!(s, 200, "{chat}");
    assert_close(&vector(&chat["data"][0]), &w.reference[0].2);
    assert_eq!(chat["usage"]["prompt_tokens"], w.reference[0].1.len());
    // Without a template (the fixture has none): a clear 400.
    let (s, e) = w
        .post(
            "/v1/embeddings",
            json!({"messages": [{"role": "user", "content": text}]}),
        )
        .await;
    assert_eq!(s, 400, "{e}");
    let (s, e) = w
        .post("/v1/embeddings", json!({"input": text, "normalise": false}))
        .await;
    assert_eq!((s, &e["error"]["param"]), (400, &json!("normalise")));

    // The same encoder without `is_matryoshka` in its config: `dimensions` is a 400, as in vLLM.
    let plain = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("bert-embed")).unwrap() {
        let path = entry.unwrap().path();
        let target = plain.path().join(path.file_name().unwrap());
        if path.is_dir() {
            std::fs::create_dir(&target).unwrap();
            for f in std::fs::read_dir(&path).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, target.join(f.file_name().unwrap())).unwrap();
            }
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
    let config = plain.path().join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("is_matryoshka");
    std::fs::write(&config, cfg.to_string()).unwrap();
    let w = start_dir(plain.path().to_path_buf());
    let (s, e) = w
        .post("/v1/embeddings", json!({"input": text, "dimensions": 8}))
        .await;
    assert_eq!(
        (s, &e["error"]["param"]),
        (400, &json!("dimensions")),
        "{e}"
    );
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("matryoshka"));
    let (s, _) = w.post("/v1/embeddings", json!({"input": text})).await;
    assert_eq!(s, 200);
}
