use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::*;

fn grammars() -> Grammars {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/qwen2");
    let tok = Tokenizer::from_dir(dir).expect("fixture tokenizer");
    let eos = vec![tok.eos_token_id().expect("eos")];
    // the model's row is wider than the tokenizer's vocabulary
    Grammars::new(tok.clone(), tok.vocab_size() + 8, eos)
}

/// Draws uniformly among the allowed tokens until EOS (or `max` tokens); the text and whether EOS
/// ended it.
fn walk(g: &Grammars, spec: &StructuredOutput, seed: u64, max: usize) -> (String, bool) {
    let compiled = g.compile(spec).expect("compiles");
    let mut c = compiled.start();
    let mut rng = StdRng::seed_from_u64(seed);
    let eos = g.eos[0];
    let mut out = Vec::new();
    for _ in 0..max {
        let mut row = vec![0.0f32; g.vocab_size];
        assert!(c.apply(&mut row), "the grammar allows something");
        let allowed: Vec<u32> = (0..row.len() as u32)
            .filter(|&i| row[i as usize] == 0.0)
            .collect();
        // prefer EOS half the time it is allowed, so walks end
        let tok = if allowed.contains(&eos) && rng.random_bool(0.5) {
            eos
        } else {
            allowed[rng.random_range(0..allowed.len())]
        };
        assert!(c.allows(tok));
        if tok == eos {
            assert!(c.is_accepting());
            return (g.tokenizer.decode(&out, true).unwrap(), true);
        }
        c.advance(tok).expect("an allowed token is accepted");
        out.push(tok);
    }
    (g.tokenizer.decode(&out, true).unwrap(), false)
}

#[test]
fn json_schema_walks_give_valid_json() {
    let g = grammars();
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 5},
            "kind": {"enum": ["cat", "dog"]},
            "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
            "ok": {"type": "boolean"}
        },
        "required": ["name", "kind", "tags", "ok"],
        "additionalProperties": false
    });
    let spec = StructuredOutput::new(Structure::Json(schema));
    for seed in 0..10 {
        let (text, ended) = walk(&g, &spec, seed, 200);
        assert!(ended, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(v["name"].as_str().unwrap().chars().count() <= 5, "{text}");
        assert!(
            ["cat", "dog"].contains(&v["kind"].as_str().unwrap()),
            "{text}"
        );
        assert!(v["tags"].as_array().unwrap().len() <= 3, "{text}");
        assert!(v["ok"].is_boolean(), "{text}");
    }
}

#[test]
fn regex_choice_and_lark_walks_match() {
    let g = grammars();
    let date = StructuredOutput::new(Structure::Regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}".into()));
    for seed in 0..5 {
        let (text, ended) = walk(&g, &date, seed, 50);
        assert!(ended, "{text:?}");
        let b = text.as_bytes();
        assert_eq!(b.len(), 10, "{text}");
        assert!(b[4] == b'-' && b[7] == b'-', "{text}");
    }
    let choice = StructuredOutput::new(Structure::Choice(vec!["yes".into(), "no \"way\"".into()]));
    for seed in 0..5 {
        let (text, _) = walk(&g, &choice, seed, 50);
        assert!(text == "yes" || text == "no \"way\"", "{text}");
    }
    let lark = StructuredOutput::new(Structure::Grammar(
        "start: expr\nexpr: NUM | \"(\" expr \"+\" expr \")\"\nNUM: /[0-9]/".into(),
    ));
    for seed in 0..5 {
        let (text, ended) = walk(&g, &lark, seed, 200);
        if ended {
            let opens = text.matches('(').count();
            assert_eq!(opens, text.matches(')').count(), "{text}");
            assert!(
                text.chars()
                    .all(|c| c.is_ascii_digit() || "()+".contains(c)),
                "{text}"
            );
        }
    }
}

#[test]
fn bad_grammars_are_refused_with_a_message() {
    let g = grammars();
    let bad = [
        Structure::Json(json!({"type": "object", "properties": {"a": {"type": "nonsense"}}})),
        Structure::Regex("(unclosed".into()),
        Structure::Grammar("start: undefined_rule".into()),
        Structure::Choice(Vec::new()),
    ];
    for b in bad {
        let e = g.compile(&StructuredOutput::new(b.clone())).unwrap_err();
        assert!(!e.is_empty(), "{b:?}");
    }
}

#[test]
fn a_refused_token_is_an_error_and_eos_waits_for_a_complete_match() {
    let g = grammars();
    let spec = StructuredOutput::new(Structure::Choice(vec!["ab".into()]));
    let mut c = g.compile(&spec).unwrap().start();
    let eos = g.eos[0];
    assert!(!c.allows(eos), "EOS before the match is complete");
    assert!(!c.is_accepting());
    let z = g.tokenizer.encode("z", false).unwrap()[0];
    assert!(!c.allows(z));
    let ab = g.tokenizer.encode("ab", false).unwrap();
    let mut fork = c.clone();
    assert!(fork.advance(z).is_err(), "z cannot start `ab`");
    for t in ab {
        c.advance(t).unwrap();
    }
    assert!(c.is_accepting());
    assert!(c.allows(eos));
}

#[test]
fn the_constraint_starts_after_the_marker() {
    let g = grammars();
    let mut spec = StructuredOutput::new(Structure::Regex("[0-9]+".into()));
    spec.starts_after = Some("</think>".into());
    let mut c = g.compile(&spec).unwrap().start();
    let think = g
        .tokenizer
        .encode("hmm, let me see</think>", false)
        .unwrap();
    let mut row = vec![0.0; g.vocab_size];
    for t in think {
        assert!(!c.is_active());
        assert!(!c.allows(g.eos[0]), "no end before the constrained part");
        assert!(c.apply(&mut row));
        c.advance(t).unwrap();
    }
    assert!(c.is_active(), "active after </think>");
    assert!(c.apply(&mut row));
    let letter = g.tokenizer.encode("x", false).unwrap()[0];
    assert_eq!(row[letter as usize], f32::NEG_INFINITY);
}

#[test]
fn forced_tokens_spell_what_the_grammar_forces() {
    let g = grammars();
    let spec = StructuredOutput::new(Structure::Regex("hello world [0-9]".into()));
    let mut c = g.compile(&spec).unwrap().start();
    let forced = c.forced_tokens();
    let text = g.tokenizer.decode(&forced, true).unwrap();
    assert!(
        !forced.is_empty() && "hello world ".starts_with(&text),
        "{text:?}"
    );
}

/// Whether the tokens of `pieces` (text, or an id) are each allowed in turn and end in a complete
/// match (EOS allowed after them).
fn accepts(g: &Grammars, spec: &StructuredOutput, pieces: &[Result<&str, u32>]) -> bool {
    let mut c = g.compile(spec).expect("compiles").start();
    for piece in pieces {
        let ids = match piece {
            Ok(text) => g.tokenizer.encode(text, false).unwrap(),
            Err(id) => vec![*id],
        };
        for t in ids {
            if !c.allows(t) || c.advance(t).is_err() {
                return false;
            }
        }
    }
    c.allows(g.eos[0])
}

/// With `reasoning_prefix`, the answer may follow a `<think>` block the model opens itself (as
/// text, or with the vocabulary's own `<think>` / `</think>` tokens), and the constraint holds
/// for the answer after it; without the block the answer alone still matches.
#[test]
fn an_optional_reasoning_block_may_come_before_the_constrained_answer() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}},
        "required": ["a"], "additionalProperties": false});
    let mut spec = StructuredOutput::new(Structure::Json(schema));
    spec.reasoning_prefix = true;
    let g = grammars();
    let answer = r#"{"a":12}"#;
    assert!(accepts(&g, &spec, &[Ok(answer)]));
    assert!(accepts(
        &g,
        &spec,
        &[Ok("<think>Let me think: {\"a\"</think>\n\n"), Ok(answer)]
    ));
    assert!(accepts(&g, &spec, &[Ok("<think></think>"), Ok(answer)]));
    assert!(!accepts(&g, &spec, &[Ok("<think>no end"), Ok(answer)]));
    assert!(!accepts(&g, &spec, &[Ok("<think>x</think>not json")]));
    assert!(!accepts(&g, &spec, &[Ok("prose first"), Ok(answer)]));
    // a constraint that spells the block itself keeps it where it says
    let mut own = StructuredOutput::new(Structure::Regex("<think>[a-z]+</think>[0-9]".into()));
    own.reasoning_prefix = true;
    assert!(accepts(&g, &own, &[Ok("<think>abc</think>7")]));
    assert!(!accepts(
        &g,
        &own,
        &[Ok("<think>a b</think><think>abc</think>7")]
    ));
    // off: the block is refused
    spec.reasoning_prefix = false;
    assert!(!accepts(&g, &spec, &[Ok("<think>x</think>"), Ok(answer)]));
    spec.reasoning_prefix = true;

    // `<think>` and `</think>` as added tokens (Qwen3's vocabulary)
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/qwen2");
    let base = Tokenizer::from_dir(dir).unwrap();
    let mut hf = base.hf().clone();
    hf.add_tokens([
        tokenizers::AddedToken::from("<think>", false),
        tokenizers::AddedToken::from("</think>", false),
    ])
    .unwrap();
    let open = hf.token_to_id("<think>").unwrap();
    let close = hf.token_to_id("</think>").unwrap();
    let tok = Tokenizer::new(hf, base.config().clone());
    let eos = vec![tok.eos_token_id().unwrap()];
    let g = Grammars::new(tok.clone(), tok.vocab_size() + 8, eos);
    assert!(g.think_tokens());
    assert!(accepts(
        &g,
        &spec,
        &[
            Err(open),
            Ok("thinking hard"),
            Err(close),
            Ok("\n"),
            Ok(answer)
        ]
    ));
    assert!(accepts(&g, &spec, &[Ok(answer)]));
    assert!(!accepts(&g, &spec, &[Err(open), Ok(answer)]));
    assert!(!accepts(&g, &spec, &[Err(close), Ok(answer)]));
}
