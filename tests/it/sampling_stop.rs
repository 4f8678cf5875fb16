//! Stop strings over real token streams: the fixture tokenizer splits text (and multi-byte characters)
//! across tokens, the detokenizer holds half characters, the matcher holds possible stop prefixes.

use std::path::Path;

use worker_candle::engine::detokenize::{DecodeOptions, Detokenizer};
use worker_candle::engine::stop::StopStrings;
use worker_candle::engine::tokenizer::Tokenizer;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama")).unwrap()
}

/// Streams `text` token by token through the detokenizer and the stop matcher, as the engine does.
fn stream(text: &str, stops: &[&str], include: bool) -> (Vec<String>, Option<String>) {
    let tok = tokenizer();
    let ids = tok.encode(text, false).unwrap();
    let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
    let mut detok = Detokenizer::new(tok, DecodeOptions::default());
    let mut matcher = StopStrings::new(&stops, include);
    let mut pieces = Vec::new();
    for id in ids {
        let pushed = matcher.push(&detok.push(id).unwrap(), true);
        pieces.push(pushed.text);
        if pushed.stopped.is_some() {
            return (pieces, pushed.stopped);
        }
    }
    let pushed = matcher.push(&detok.finish().unwrap(), true);
    pieces.push(pushed.text);
    if pushed.stopped.is_none() {
        pieces.push(matcher.flush());
    }
    (pieces, pushed.stopped)
}

#[test]
fn stop_string_spanning_tokens_is_never_emitted() {
    let text = "The answer is 42.\n\nQuestion: what next?";
    let ids = tokenizer().encode("\n\nQuestion:", false).unwrap();
    assert!(ids.len() > 1, "the stop string must span several tokens");
    let (pieces, stopped) = stream(text, &["\n\nQuestion:"], false);
    assert_eq!(stopped.as_deref(), Some("\n\nQuestion:"));
    assert_eq!(pieces.concat(), "The answer is 42.");
    // No piece ever carried part of the stop string out.
    assert!(pieces.iter().all(|p| !p.contains('\n')));
}

#[test]
fn stop_string_kept_when_asked() {
    let (pieces, stopped) = stream("alpha beta gamma delta", &["gamma"], true);
    assert_eq!(stopped.as_deref(), Some("gamma"));
    assert_eq!(pieces.concat(), "alpha beta gamma");
}

#[test]
fn multibyte_stop_string_split_across_byte_tokens() {
    let (pieces, stopped) = stream("价格是 🎉🎉 好的", &["🎉🎉"], false);
    assert_eq!(stopped.as_deref(), Some("🎉🎉"));
    assert_eq!(pieces.concat(), "价格是 ");
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
}

#[test]
fn near_misses_are_released_in_full() {
    let text = "## heading ### not quite #### end";
    let (pieces, stopped) = stream(text, &["#####"], false);
    assert_eq!(stopped, None);
    assert_eq!(pieces.concat(), text);
}
