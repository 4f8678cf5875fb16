//! A decoder model served as an embedder (Qwen3-Embedding style: `modules.json` with last-token
//! pooling and `Normalize` next to a causal checkpoint), against transformers' last hidden state
//! (`tests/data/embeddings/decoder_reference.py`).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use worker_candle::engine::embedding::{is_embedding_model, DecoderEmbedder, Pooling};
use worker_candle::engine::parts::Embedder;
use worker_candle::engine::settings::DeviceChoice;
use worker_candle::engine::{EmbedRequest, Engine, EngineSettings};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The llama fixture plus a sentence-transformers pooling layout.
fn embedding_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = root().join("tests/fixtures/llama");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() && path.file_name().unwrap() != "reference.json" {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let modules = json!([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
    ]);
    std::fs::write(dir.path().join("modules.json"), modules.to_string()).unwrap();
    std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
    std::fs::write(
        dir.path().join("1_Pooling/config.json"),
        json!({"word_embedding_dimension": 64, "pooling_mode_lasttoken": true}).to_string(),
    )
    .unwrap();
    dir
}

fn settings(dir: &Path) -> EngineSettings {
    let mut s = EngineSettings::for_model(dir);
    s.device = DeviceChoice::Cpu;
    s
}

fn reference() -> Vec<(Vec<u32>, Vec<f32>)> {
    let text = std::fs::read_to_string(root().join("tests/data/embeddings/decoder_reference.json"))
        .unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                serde_json::from_value(c["input_ids"].clone()).unwrap(),
                serde_json::from_value(c["embedding"].clone()).unwrap(),
            )
        })
        .collect()
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

#[test]
fn last_token_embeddings_match_transformers_alone_and_batched() {
    let dir = embedding_folder();
    assert!(is_embedding_model(dir.path()));
    assert!(!is_embedding_model(&root().join("tests/fixtures/llama")));
    let e = DecoderEmbedder::load(&settings(dir.path())).unwrap();
    assert_eq!(e.spec().pooling, Pooling::LastToken);
    assert!(e.spec().normalize);
    let cases = reference();
    let request = |inputs: Vec<Vec<u32>>| EmbedRequest {
        request_id: "t".into(),
        inputs,
        dimensions: None,
        normalize: None,
    };
    let batched = e
        .embed(&request(cases.iter().map(|c| c.0.clone()).collect()))
        .unwrap();
    assert_eq!(
        batched.prompt_tokens,
        cases.iter().map(|c| c.0.len()).sum::<usize>()
    );
    for (c, got) in cases.iter().zip(&batched.embeddings) {
        assert_close(got, &c.1);
        let alone = e.embed(&request(vec![c.0.clone()])).unwrap();
        assert_close(&alone.embeddings[0], &c.1);
    }
}

#[tokio::test]
async fn the_engine_serves_a_decoder_embedder_without_generation() {
    let dir = embedding_folder();
    let engine = Engine::start(settings(dir.path())).unwrap();
    assert!(engine.info().can_embed);
    assert!(!engine.info().can_generate);
    let case = &reference()[0];
    let out = engine
        .embed(EmbedRequest {
            request_id: "t".into(),
            inputs: vec![case.0.clone()],
            dimensions: Some(16),
            normalize: None,
        })
        .await
        .unwrap();
    assert_eq!(out.embeddings[0].len(), 16);
    let norm = case.1[..16].iter().map(|x| x * x).sum::<f32>().sqrt();
    let want: Vec<f32> = case.1[..16].iter().map(|x| x / norm).collect();
    assert_close(&out.embeddings[0], &want);
}
