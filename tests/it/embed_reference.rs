//! The encoder embedder against `tests/fixtures/bert-embed/reference.json` (transformers +
//! sentence-transformers, float32): token ids, embeddings within 1e-5, cosine ranking of the seed's
//! sentences, Matryoshka truncation and long-input rejection.

use std::path::PathBuf;

use serde_json::Value;
use worker_candle::engine::embedding::{cosine, load_encoder, EncoderEmbedder, Pooling};
use worker_candle::engine::parts::Embedder;
use worker_candle::engine::settings::{DeviceChoice, EngineSettings};
use worker_candle::engine::tokenizer::Tokenizer;
use worker_candle::engine::EmbedRequest;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert-embed")
}

struct Case {
    input: String,
    ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixture().join("reference.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["pooling"], "mean");
    assert_eq!(v["normalize"], true);
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            input: c["input"].as_str().unwrap().to_string(),
            ids: serde_json::from_value(c["input_ids"].clone()).unwrap(),
            embedding: serde_json::from_value(c["embedding"].clone()).unwrap(),
        })
        .collect()
}

fn embedder() -> EncoderEmbedder {
    let mut settings = EngineSettings::for_model(fixture());
    settings.device = DeviceChoice::Cpu;
    let loaded = load_encoder(&settings).unwrap();
    assert_eq!(loaded.architecture, "BertModel");
    assert_eq!(loaded.max_model_len, 128);
    std::sync::Arc::try_unwrap(loaded.embedder)
        .ok()
        .expect("sole owner")
}

fn embed(e: &EncoderEmbedder, inputs: Vec<Vec<u32>>, dimensions: Option<usize>) -> Vec<Vec<f32>> {
    e.embed(&EmbedRequest {
        request_id: "t".into(),
        inputs,
        dimensions,
        normalize: None,
    })
    .unwrap()
    .embeddings
}

#[test]
fn layout_is_mean_pooling_then_normalize() {
    let e = embedder();
    assert_eq!(e.spec().pooling, Pooling::Mean);
    assert!(e.spec().normalize);
    assert_eq!(e.dimensions(), 64);
}

#[test]
fn tokenizer_gives_the_reference_ids() {
    let tok = Tokenizer::from_dir(fixture()).unwrap();
    for c in cases() {
        assert_eq!(tok.encode(&c.input, true).unwrap(), c.ids, "{}", c.input);
    }
}

#[test]
fn embeddings_match_the_reference_alone_and_batched() {
    let e = embedder();
    let cases = cases();
    let batched = embed(&e, cases.iter().map(|c| c.ids.clone()).collect(), None);
    let out = e
        .embed(&EmbedRequest {
            request_id: "t".into(),
            inputs: cases.iter().map(|c| c.ids.clone()).collect(),
            dimensions: None,
            normalize: None,
        })
        .unwrap();
    assert_eq!(
        out.prompt_tokens,
        cases.iter().map(|c| c.ids.len()).sum::<usize>()
    );
    for (c, got_batched) in cases.iter().zip(&batched) {
        let alone = &embed(&e, vec![c.ids.clone()], None)[0];
        for got in [alone, got_batched] {
            assert_eq!(got.len(), c.embedding.len());
            let worst = got
                .iter()
                .zip(&c.embedding)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-5, "{}: max deviation {worst}", c.input);
        }
    }
}

/// For every sentence, the others ordered by cosine similarity (most similar first).
fn ranking(vectors: &[Vec<f32>]) -> Vec<Vec<usize>> {
    (0..vectors.len())
        .map(|i| {
            let mut others: Vec<usize> = (0..vectors.len()).filter(|&j| j != i).collect();
            others.sort_by(|&a, &b| {
                cosine(&vectors[i], &vectors[b]).total_cmp(&cosine(&vectors[i], &vectors[a]))
            });
            others
        })
        .collect()
}

#[test]
fn cosine_ranking_of_the_seed_sentences_matches_the_reference() {
    let e = embedder();
    let cases = cases();
    let ours = embed(&e, cases.iter().map(|c| c.ids.clone()).collect(), None);
    let reference: Vec<Vec<f32>> = cases.iter().map(|c| c.embedding.clone()).collect();
    assert_eq!(ranking(&ours), ranking(&reference));
    for (i, v) in ours.iter().enumerate() {
        assert!((cosine(v, v) - 1.0).abs() < 1e-5);
        for (j, w) in ours.iter().enumerate() {
            let want = cosine(&reference[i], &reference[j]);
            assert!((cosine(v, w) - want).abs() < 1e-5, "{i},{j}");
        }
    }
}

#[test]
fn dimensions_truncate_and_renormalise() {
    let e = embedder();
    let c = &cases()[0];
    let full = &embed(&e, vec![c.ids.clone()], None)[0];
    let short = &embed(&e, vec![c.ids.clone()], Some(16))[0];
    assert_eq!(short.len(), 16);
    let norm: f32 = short.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    let prefix_norm: f32 = full[..16].iter().map(|x| x * x).sum::<f32>().sqrt();
    for (s, f) in short.iter().zip(&full[..16]) {
        assert!((s - f / prefix_norm).abs() < 1e-5);
    }
    let err = e
        .embed(&EmbedRequest {
            request_id: "t".into(),
            inputs: vec![c.ids.clone()],
            dimensions: Some(65),
            normalize: None,
        })
        .unwrap_err();
    assert_eq!(err.param(), Some("dimensions"));
}

#[test]
fn over_long_and_bad_inputs_are_client_errors() {
    let e = embedder();
    let bad = |inputs: Vec<Vec<u32>>| {
        e.embed(&EmbedRequest {
            request_id: "t".into(),
            inputs,
            dimensions: None,
            normalize: None,
        })
        .unwrap_err()
    };
    let long = bad(vec![vec![5; 129]]);
    assert!(long.is_client_error());
    assert!(long.to_string().contains("128"), "{long}");
    assert!(bad(vec![vec![5; 3], vec![]]).is_client_error());
    assert!(bad(vec![vec![5, 1024]]).is_client_error());
    assert!(bad(vec![]).is_client_error());
    // The longest allowed input runs.
    assert_eq!(embed(&e, vec![vec![5; 128]], None)[0].len(), 64);
}

/// all-MiniLM's tokenizer.json presets padding and truncation to 128; the engine must see the real
/// tokens (it counts, rejects or truncates itself).
#[test]
fn preset_padding_and_truncation_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer_config.json", "config.json"] {
        std::fs::copy(fixture().join(f), dir.path().join(f)).unwrap();
    }
    let text = std::fs::read_to_string(fixture().join("tokenizer.json")).unwrap();
    let mut tok: Value = serde_json::from_str(&text).unwrap();
    tok["padding"] = serde_json::json!({
        "strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": null,
        "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"
    });
    tok["truncation"] = serde_json::json!({
        "direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0
    });
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let c = &cases()[0];
    assert_eq!(tok.encode(&c.input, true).unwrap(), c.ids);
}
