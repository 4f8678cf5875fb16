//! Engine throughput: single-stream prefill and decode tokens/s, then aggregate decode tokens/s and
//! time to first token with 1, 4, 16, 64 (or `--concurrency`) requests submitted at once.
//!
//! `cargo bench --bench engine -- <model_dir> [--concurrency 1,4,16,64] [--prompt-len 128]
//! [--new-tokens 128] [--kv-cache-memory BYTES]`; `<model_dir>` may be a `.gguf` file, and
//! `QUANTIZATION=q8_0` (etc.) quantizes a float checkpoint as it loads.

use std::time::{Duration, Instant};

use futures::StreamExt;
use worker_candle::engine::{
    Engine, EngineSettings, GenerateRequest, GenerationEvent, Prompt, SamplingParams,
};

struct Args {
    model: String,
    concurrency: Vec<usize>,
    prompt_len: usize,
    new_tokens: usize,
    kv_cache_memory: Option<u64>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        model: String::new(),
        concurrency: vec![1, 4, 16, 64],
        prompt_len: 128,
        new_tokens: 128,
        kv_cache_memory: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--concurrency" => {
                args.concurrency = value()?
                    .split(',')
                    .map(|c| c.trim().parse())
                    .collect::<Result<_, _>>()?
            }
            "--prompt-len" => args.prompt_len = value()?.parse()?,
            "--new-tokens" => args.new_tokens = value()?.parse()?,
            "--kv-cache-memory" => args.kv_cache_memory = Some(value()?.parse()?),
            "--bench" => {}
            other if other.starts_with("--") => anyhow::bail!("unknown option {other}"),
            other => args.model = other.to_string(),
        }
    }
    if args.model.is_empty() {
        anyhow::bail!("usage: cargo bench --bench engine -- <model_dir> [--concurrency 1,4,16,64] [--prompt-len N] [--new-tokens N]");
    }
    Ok(args)
}

/// Distinct pseudo-random prompts, so no request hits another's prefix.
fn prompt(len: usize, vocab: usize, salt: u64) -> Vec<u32> {
    let mut x = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (10 + x % (vocab as u64 - 10)) as u32
        })
        .collect()
}

struct Timing {
    ttft: Duration,
    first_token_at: Instant,
    end: Instant,
    tokens: usize,
}

async fn run_one(engine: &Engine, ids: Vec<u32>, new_tokens: usize) -> anyhow::Result<Timing> {
    let start = Instant::now();
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: Some(new_tokens),
        ignore_eos: true,
        ..Default::default()
    };
    let mut stream = engine.generate(GenerateRequest {
        request_id: "bench".into(),
        prompt: Prompt::Tokens(ids),
        add_special_tokens: false,
        params,
    })?;
    let mut first = None;
    let mut tokens = 0;
    while let Some(ev) = stream.next().await {
        match ev {
            GenerationEvent::Delta(d) => {
                first.get_or_insert_with(Instant::now);
                tokens += d.token_ids.len();
            }
            GenerationEvent::Error(e) => anyhow::bail!("engine error: {e}"),
            GenerationEvent::Done { .. } => break,
            GenerationEvent::Prompt { .. } => {}
        }
    }
    let first_token_at = first.ok_or_else(|| anyhow::anyhow!("no token"))?;
    Ok(Timing {
        ttft: first_token_at - start,
        first_token_at,
        end: Instant::now(),
        tokens,
    })
}

fn main() -> anyhow::Result<()> {
    // SAFETY: the first statement of main; no other thread exists yet.
    unsafe { worker_candle::engine::loader::prepare_candle_env(None) };
    let args = parse_args()?;
    let mut settings = EngineSettings::for_model(&args.model);
    settings.enable_prefix_caching = false;
    settings.kv_cache_memory = args.kv_cache_memory;
    if let Some(q) = std::env::var("QUANTIZATION")
        .ok()
        .filter(|q| !q.is_empty() && q != "none")
    {
        settings.quantization = worker_candle::engine::settings::Quantization::InSitu(q);
    }
    let max_c = args.concurrency.iter().copied().max().unwrap_or(1);
    settings.max_num_seqs = settings.max_num_seqs.max(max_c);
    let t = Instant::now();
    let engine = Engine::start(settings)?;
    println!(
        "model {} ({}), loaded in {:.1} s; prompt {} tokens, {} new tokens",
        args.model,
        engine.info().architecture,
        t.elapsed().as_secs_f64(),
        args.prompt_len,
        args.new_tokens
    );
    let vocab = engine.info().vocab_size;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        // Warm-up (allocations, caches).
        run_one(&engine, prompt(16, vocab, 999), 4).await?;
        let one = run_one(&engine, prompt(args.prompt_len, vocab, 1), args.new_tokens).await?;
        let decode_s = (one.end - one.first_token_at).as_secs_f64();
        let single_decode = (one.tokens.saturating_sub(1)) as f64 / decode_s;
        println!(
            "single stream: prefill {:.1} tok/s (TTFT {:.0} ms), decode {:.1} tok/s",
            args.prompt_len as f64 / one.ttft.as_secs_f64(),
            one.ttft.as_secs_f64() * 1e3,
            single_decode
        );
        println!("| concurrency | aggregate decode tok/s | vs single | total tok/s | TTFT mean ms | TTFT max ms |");
        println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
        for (round, &c) in args.concurrency.iter().enumerate() {
            let start = Instant::now();
            let runs = (0..c).map(|i| {
                let ids = prompt(args.prompt_len, vocab, 1000 * (round as u64 + 2) + i as u64);
                run_one(&engine, ids, args.new_tokens)
            });
            let timings = futures::future::try_join_all(runs).await?;
            let wall = start.elapsed().as_secs_f64();
            let first = timings.iter().map(|t| t.first_token_at).min().unwrap_or(start);
            let last = timings.iter().map(|t| t.end).max().unwrap_or(start);
            let decoded: usize = timings.iter().map(|t| t.tokens.saturating_sub(1)).sum();
            let total: usize = timings.iter().map(|t| t.tokens).sum();
            let agg = decoded as f64 / (last - first).as_secs_f64();
            let ttfts: Vec<f64> = timings.iter().map(|t| t.ttft.as_secs_f64() * 1e3).collect();
            println!(
                "| {c} | {agg:.1} | {:.2}x | {:.1} | {:.0} | {:.0} |",
                agg / single_decode,
                total as f64 / wall,
                ttfts.iter().sum::<f64>() / c as f64,
                ttfts.iter().copied().fold(0.0, f64::max)
            );
        }
        anyhow::Ok(())
    })
}
