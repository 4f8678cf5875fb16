//! Aggregate decode tokens/s with LoRA adapters against the base model alone, in one engine: the
//! same number of concurrent greedy streams, run on the base model, then spread over the adapters
//! (every adapter active in every step), alternating for `rounds` rounds; prints the medians and
//! the median per-round ratio.
//!
//! `cargo run --release --example lora_bench -- MODEL_DIR ADAPTER_DIR... [--streams 16]
//! [--prompt-len 32] [--new-tokens 64] [--rounds 3]` (`scripts/bench_lora.py` makes the adapters).

use std::time::Instant;

use futures::StreamExt;
use worker_candle::engine::lora::AdapterSpec;
use worker_candle::engine::settings::LoraSettings;
use worker_candle::engine::{
    Engine, EngineSettings, GenerateRequest, GenerationEvent, Prompt, SamplingParams,
};

fn prompt(len: usize, salt: u64) -> Vec<u32> {
    let mut x = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            100 + (x % 20_000) as u32
        })
        .collect()
}

/// Decode tokens/s of `engines.len()` streams at once (stream i on engines[i]): tokens after each
/// stream's first, over the time from the last first token to the last token.
async fn run(engines: &[Engine], p: usize, n: usize, salt: u64) -> f64 {
    let streams = engines.iter().enumerate().map(|(i, e)| {
        let req = GenerateRequest {
            request_id: format!("b{i}"),
            prompt: Prompt::Tokens(prompt(p, salt + i as u64)),
            add_special_tokens: false,
            params: SamplingParams {
                temperature: 0.0,
                max_tokens: Some(n),
                ignore_eos: true,
                ..Default::default()
            },
        };
        let e = e.clone();
        async move {
            let mut s = e.generate(req).expect("accepted");
            let mut first = None;
            let mut tokens = 0;
            while let Some(ev) = s.next().await {
                match ev {
                    GenerationEvent::Delta(d) => {
                        if first.is_none() && !d.token_ids.is_empty() {
                            first = Some(Instant::now());
                        }
                        tokens += d.token_ids.len();
                    }
                    GenerationEvent::Done { .. } => break,
                    GenerationEvent::Error(e) => panic!("{e}"),
                    _ => {}
                }
            }
            (first.expect("a token"), Instant::now(), tokens)
        }
    });
    let outs = futures::future::join_all(streams).await;
    let start = outs.iter().map(|o| o.0).max().unwrap();
    let end = outs.iter().map(|o| o.1).max().unwrap();
    let tokens: usize = outs.iter().map(|o| o.2 - 1).sum();
    tokens as f64 / (end - start).as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let model = args.next().ok_or_else(|| anyhow::anyhow!("usage: lora_bench MODEL_DIR ADAPTER_DIR... [--streams 16] [--prompt-len 32] [--new-tokens 64] [--rounds 3]"))?;
    let (mut adapters, mut streams, mut p, mut n, mut rounds) = (Vec::new(), 16, 32, 64, 3);
    while let Some(a) = args.next() {
        let mut v = || -> anyhow::Result<usize> {
            Ok(args
                .next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))?
                .parse()?)
        };
        match a.as_str() {
            "--streams" => streams = v()?,
            "--prompt-len" => p = v()?,
            "--new-tokens" => n = v()?,
            "--rounds" => rounds = v()?,
            dir => adapters.push(dir.to_string()),
        }
    }
    let mut s = EngineSettings::for_model(&model);
    s.max_num_seqs = streams.max(16);
    s.kv_cache_memory = Some(512 << 20);
    s.enable_prefix_caching = false;
    s.lora = Some(LoraSettings {
        max_loras: adapters.len().max(1),
        max_lora_rank: 64,
        modules: adapters
            .iter()
            .enumerate()
            .map(|(i, d)| AdapterSpec {
                name: format!("a{i}"),
                path: d.into(),
            })
            .collect(),
    });
    let engine = tokio::task::spawn_blocking(move || Engine::start(s)).await??;
    let base: Vec<Engine> = (0..streams).map(|_| engine.clone()).collect();
    let spread: Vec<Engine> = (0..streams)
        .map(|i| {
            engine
                .with_adapter(&format!("a{}", i % adapters.len()))
                .expect("loaded")
        })
        .collect();
    run(&base, p, 4, 999).await; // warm-up
    let (mut b, mut l, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let salt = 1000 * (round as u64 + 1);
        let tb = run(&base, p, n, salt).await;
        let tl = run(&spread, p, n, salt + 500).await;
        println!(
            "round {round}: base {tb:.1} tok/s, {} adapters {tl:.1} tok/s, ratio {:.3}",
            adapters.len(),
            tl / tb
        );
        b.push(tb);
        l.push(tl);
        r.push(tl / tb);
    }
    println!(
        "{streams} streams, prompt {p}, {n} new tokens: base {:.1} tok/s, over {} adapters {:.1} tok/s, ratio {:.3}",
        median(b),
        adapters.len(),
        median(l),
        median(r)
    );
    Ok(())
}
