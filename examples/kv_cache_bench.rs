//! The 8-bit KV cache (`KV_CACHE_DTYPE` `int8`, `fp8_e4m3`, `fp8_e5m2`) beside the float cache on one
//! model: memory per token, quality (teacher-forced over a text) and decode speed at a long context.
//!
//! `cargo run --release --example kv_cache_bench -- MODEL_DIR [CONTEXT=2048] [NEW=64] [ROUNDS=3] [TEXT_FILE]`
//!
//! - memory: KV bytes per token and the tokens 1 GiB holds, per kind;
//! - quality: the text (default: this repository's README.md) tokenized by the model's tokenizer, its
//!   first 16 tokens prefilled, then one decode step per following token (at most 512), on each
//!   cache: the share of steps whose top token is the float cache's and the mean / worst
//!   `|Δ log p|` of that token;
//! - speed: a CONTEXT-token prompt prefilled (chunks of 256) into each kind's cache, then in each
//!   round NEW greedy decode steps from the end of the context, timed in wall time and in the
//!   process's CPU time (steadier on a shared machine); the kinds alternate within each round;
//!   medians over ROUNDS.
//!
//! `RAYON_NUM_THREADS` sets the thread count; `KINDS=auto,int8,fp8_e4m3` the kinds timed;
//! `QUANTIZATION=q8_0|q4k|...` quantizes the weights at load.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use worker_candle::engine::batch::{ForwardBatch, LogitsWanted, SeqInput};
use worker_candle::engine::kv_cache::KvCache;
use worker_candle::engine::loader::load_causal;
use worker_candle::engine::models::CausalLM;
use worker_candle::engine::settings::{EngineSettings, KvCacheDtype, Quantization};
use worker_candle::engine::tokenizer::Tokenizer;

const BLOCK: usize = 16;

fn kind(name: &str) -> Result<KvCacheDtype> {
    Ok(match name {
        "auto" => KvCacheDtype::Auto,
        "int8" => KvCacheDtype::Int8,
        "fp8" | "fp8_e4m3" => KvCacheDtype::Fp8E4m3,
        "fp8_e5m2" => KvCacheDtype::Fp8E5m2,
        other => bail!("unknown KV cache kind {other}"),
    })
}

fn arg(args: &[String], i: usize, default: usize) -> Result<usize> {
    match args.get(i) {
        Some(s) => s
            .parse()
            .with_context(|| format!("argument {i} `{s}` is not a number")),
        None => Ok(default),
    }
}

/// One forward of `tokens` after `ctx` cached ones; the last position's logits.
fn step(
    model: &dyn CausalLM,
    cache: &mut KvCache,
    tokens: &[u32],
    ctx: usize,
    blocks: &[u32],
) -> Result<Vec<f32>> {
    let batch = ForwardBatch {
        seqs: vec![SeqInput {
            context_len: ctx,
            num_new: tokens.len(),
            block_table: blocks.to_vec(),
            logits: LogitsWanted::Last,
        }],
        tokens: tokens.to_vec(),
        adapters: Vec::new(),
    };
    Ok(model.forward(&batch, cache)?.squeeze(0)?.to_vec1::<f32>()?)
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len())
        .max_by(|a, b| v[*a].total_cmp(&v[*b]))
        .unwrap_or(0) as u32
}

fn log_softmax(v: &[f32]) -> Vec<f64> {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = v.iter().map(|x| (*x as f64 - m).exp()).sum::<f64>().ln() + m;
    v.iter().map(|x| *x as f64 - lse).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    // SAFETY: the first statement of main; no other thread exists yet.
    unsafe { worker_candle::engine::loader::prepare_candle_env(None) };
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = args.get(1) else {
        bail!("usage: kv_cache_bench MODEL_DIR [CONTEXT] [NEW] [ROUNDS] [TEXT_FILE]")
    };
    let (context, new, rounds) = (
        arg(&args, 2, 2048)?,
        arg(&args, 3, 64)?,
        arg(&args, 4, 3)?.max(1),
    );
    let text_file = args
        .get(5)
        .cloned()
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/README.md").to_string());
    let kinds: Vec<(String, KvCacheDtype)> = std::env::var("KINDS")
        .unwrap_or_else(|_| "auto,int8,fp8_e4m3".into())
        .split(',')
        .map(|k| Ok((k.to_string(), kind(k)?)))
        .collect::<Result<_>>()?;
    let mut settings = EngineSettings::for_model(dir);
    if let Ok(q) = std::env::var("QUANTIZATION")
        && !q.is_empty()
        && q != "none"
    {
        settings.quantization = Quantization::InSitu(q);
    }
    let loaded = load_causal(&settings)?;
    let model = loaded.model.as_ref();
    let spec = model.spec().clone();
    eprintln!(
        "loaded {} ({} layers, {} kv heads x {}, {:?}), {} threads",
        loaded.meta.architecture,
        spec.num_layers,
        spec.num_kv_heads,
        spec.head_dim,
        spec.dtype,
        candle_core::utils::get_num_threads()
    );

    println!("== memory");
    let all = ["auto", "int8", "fp8_e4m3", "fp8_e5m2"];
    let float = KvCache::bytes_per_block(&spec, BLOCK, KvCacheDtype::Auto) / BLOCK;
    for name in all {
        let per = KvCache::bytes_per_block(&spec, BLOCK, kind(name)?) / BLOCK;
        println!(
            "{name:>9}: {per} bytes per token, {} tokens in 1 GiB ({:.2}x the float cache)",
            (1usize << 30) / (per * BLOCK) * BLOCK,
            float as f64 / per as f64
        );
    }

    println!("== quality (teacher-forced against the float cache)");
    let tokenizer = Tokenizer::from_dir(dir)?;
    let text = std::fs::read_to_string(&text_file).with_context(|| text_file.clone())?;
    let mut ids = tokenizer.encode(&text, false)?;
    ids.truncate(16 + 512);
    let n = ids.len();
    if n < 32 {
        bail!("{text_file}: only {n} tokens")
    }
    let nblocks = n.div_ceil(BLOCK) + 1;
    let blocks: Vec<u32> = (0..nblocks as u32).collect();
    let path = |dtype: KvCacheDtype| -> Result<Vec<Vec<f32>>> {
        let mut cache = KvCache::with_dtype(&spec, nblocks, BLOCK, dtype)?;
        let mut out = vec![step(model, &mut cache, &ids[..16], 0, &blocks)?];
        for p in 16..n - 1 {
            out.push(step(model, &mut cache, &ids[p..p + 1], p, &blocks)?);
        }
        Ok(out)
    };
    let reference = path(KvCacheDtype::Auto)?;
    let truth = reference
        .iter()
        .zip(&ids[16..])
        .filter(|(l, t)| argmax(l) == **t)
        .count();
    println!(
        "     auto: {} steps over {text_file}, the float cache's top token is the text's on {truth}",
        reference.len()
    );
    for name in ["int8", "fp8_e4m3", "fp8_e5m2"] {
        let got = path(kind(name)?)?;
        let (mut same, mut sum, mut worst) = (0, 0f64, 0f64);
        for (a, b) in reference.iter().zip(&got) {
            let top = argmax(a);
            same += usize::from(argmax(b) == top);
            let d = (log_softmax(a)[top as usize] - log_softmax(b)[top as usize]).abs();
            sum += d;
            worst = worst.max(d);
        }
        println!(
            "{name:>9}: top-1 agreement {same}/{} = {:.4}, mean |Δ log p| {:.5}, worst {:.4}",
            got.len(),
            same as f64 / got.len() as f64,
            sum / got.len() as f64,
            worst
        );
    }

    println!("== speed: decode {new} tokens after a {context}-token context, median of {rounds}");
    let vocab = spec.vocab_size as u64;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let prompt: Vec<u32> = (0..context)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab) as u32
        })
        .collect();
    let nblocks = (context + new).div_ceil(BLOCK);
    let blocks: Vec<u32> = (0..nblocks as u32).collect();
    // each kind's cache prefilled once; every round decodes from the end of the context again
    let mut caches = Vec::new();
    for (name, dtype) in &kinds {
        let t = Instant::now();
        let mut cache = KvCache::with_dtype(&spec, nblocks, BLOCK, *dtype)?;
        let mut last = Vec::new();
        for (c, chunk) in prompt.chunks(256).enumerate() {
            last = step(model, &mut cache, chunk, c * 256, &blocks)?;
        }
        eprintln!("{name}: prefilled in {:.1}s", t.elapsed().as_secs_f64());
        caches.push((cache, argmax(&last)));
    }
    let mut rates: Vec<Vec<(f64, f64)>> = vec![Vec::new(); kinds.len()];
    for round in 0..rounds {
        for j in 0..kinds.len() {
            // alternate the order: round r starts with kind r
            let k = (j + round) % kinds.len();
            let (cache, first) = &mut caches[k];
            let mut tok = *first;
            let (t, cpu) = (Instant::now(), cpu_seconds());
            for i in 0..new {
                tok = argmax(&step(model, cache, &[tok], context + i, &blocks)?);
            }
            let wall = new as f64 / t.elapsed().as_secs_f64();
            let per_cpu = new as f64 / (cpu_seconds() - cpu).max(1e-3);
            eprintln!(
                "round {round}: {} {wall:.1} tok/s, {per_cpu:.1} tok per CPU-second",
                kinds[k].0
            );
            rates[k].push((wall, per_cpu));
        }
    }
    let med = |k: usize, f: fn(&(f64, f64)) -> f64| median(rates[k].iter().map(f).collect());
    let (base_wall, base_cpu) = (med(0, |r| r.0), med(0, |r| r.1));
    for (k, (name, _)) in kinds.iter().enumerate() {
        let (wall, cpu) = (med(k, |r| r.0), med(k, |r| r.1));
        println!(
            "{name:>9}: decode {wall:.1} tok/s ({:.2}x {}), {cpu:.1} tok per CPU-second ({:.2}x)",
            wall / base_wall,
            kinds[0].0,
            cpu / base_cpu
        );
    }
    Ok(())
}

/// User + system CPU time of this process, seconds (/proc/self/stat, clock ticks of 1/100 s); 0
/// where /proc is absent.
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(0.0)
}
