//! The incremental detokenizer over the fixtures' real tokenizers: deltas are valid UTF-8, never end in
//! a half character, and concatenate to the whole decode (and to transformers' `greedy_text`).

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use worker_candle::engine::detokenize::{DecodeOptions, Detokenizer};
use worker_candle::engine::tokenizer::Tokenizer;

const CAUSAL: [&str; 6] = ["llama", "qwen2", "mistral", "phi3", "gemma2", "gpt2"];

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn tokenizer(name: &str) -> Tokenizer {
    Tokenizer::from_dir(fixture_dir(name)).expect("fixture tokenizer loads")
}

/// Deltas of `ids` followed by the final flush.
fn deltas(tok: &Tokenizer, ids: &[u32], opts: DecodeOptions) -> Vec<String> {
    let mut d = Detokenizer::new(tok.clone(), opts);
    let mut out: Vec<String> = ids.iter().map(|id| d.push(*id).unwrap()).collect();
    out.push(d.finish().unwrap());
    out
}

const OPTION_SETS: [DecodeOptions; 3] = [
    DecodeOptions {
        skip_special_tokens: true,
        spaces_between_special_tokens: true,
    },
    DecodeOptions {
        skip_special_tokens: false,
        spaces_between_special_tokens: true,
    },
    DecodeOptions {
        skip_special_tokens: false,
        spaces_between_special_tokens: false,
    },
];

#[test]
fn greedy_text_of_every_reference_case() {
    for name in CAUSAL {
        let tok = tokenizer(name);
        let text = std::fs::read_to_string(fixture_dir(name).join("reference.json")).unwrap();
        let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
        for case in reference["cases"].as_array().unwrap() {
            let ids: Vec<u32> = case["greedy_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let expected = case["greedy_text"].as_str().unwrap();
            let got = deltas(&tok, &ids, DecodeOptions::default()).concat();
            assert_eq!(got, expected, "{name}: {ids:?}");
        }
    }
}

#[test]
fn multibyte_text_round_trips_in_valid_pieces() {
    let texts = [
        "Hello, world! 👋🏽 Ça va? 日本語のテキスト。",
        "emoji family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
        "中文测试：你好，世界！Русский текст. العربية",
        "<|im_start|>user\n🎉 party<|im_end|>\n<|im_start|>assistant\n",
    ];
    for name in CAUSAL {
        let tok = tokenizer(name);
        for text in texts {
            let ids = tok.encode(text, false).unwrap();
            for opts in OPTION_SETS {
                let pieces = deltas(&tok, &ids, opts);
                let expected = tok
                    .decode_with(
                        &ids,
                        opts.skip_special_tokens,
                        opts.spaces_between_special_tokens,
                    )
                    .unwrap();
                assert_eq!(pieces.concat(), expected, "{name} {opts:?}");
                assert!(
                    pieces.iter().all(|p| !p.contains('\u{FFFD}')),
                    "{name}: a delta split a character: {pieces:?}"
                );
            }
            // With special tokens kept and no extra spaces, the text comes back exactly.
            assert_eq!(deltas(&tok, &ids, OPTION_SETS[2]).concat(), text);
        }
    }
}

/// Random token streams (the model can emit any id, including byte tokens that never form a valid
/// character): the deltas still concatenate to the whole decode, and only the flush or a later valid
/// character releases a replacement character.
#[test]
fn random_token_streams_concatenate_to_the_decode() {
    let mut rng = StdRng::seed_from_u64(2);
    for name in ["llama", "gpt2"] {
        let tok = tokenizer(name);
        let vocab = tok.vocab_size() as u32;
        for round in 0..60 {
            let len = rng.random_range(1..40);
            let ids: Vec<u32> = (0..len).map(|_| rng.random_range(0..vocab)).collect();
            let opts = OPTION_SETS[round % OPTION_SETS.len()];
            let pieces = deltas(&tok, &ids, opts);
            let expected = tok
                .decode_with(
                    &ids,
                    opts.skip_special_tokens,
                    opts.spaces_between_special_tokens,
                )
                .unwrap();
            assert_eq!(pieces.concat(), expected, "{name} {ids:?} {opts:?}");
            let before_flush = &pieces[..pieces.len() - 1];
            assert!(
                before_flush.iter().all(|p| !p.ends_with('\u{FFFD}')),
                "{name}: {pieces:?}"
            );
        }
    }
}
