//! Aggregate decode speed at several concurrencies, through the model and its paged KV cache (no
//! scheduler, no HTTP): `B` sequences each prefill a prompt, then decode together, one token per
//! sequence per forward pass, greedy (the argmax is taken on the model's device; only ids come back).
//! Single-stream decode is also reported as a fraction of the memory-bandwidth bound: each token reads
//! every weight once, so one stream cannot beat `bandwidth / weight bytes` tokens/s.
//!
//! `cargo run --release [--features cuda] --example batch_decode_bench -- MODEL_DIR [CONCURRENCY=1,16,64,256] [PROMPT=32] [NEW=64]`
//!
//! Environment: `DEVICE=cpu|cuda` (default: the loader's auto choice), `DTYPE=f32|bf16|f16`,
//! `QUANTIZATION` (in situ), `BANDWIDTH_GBPS` (the device's memory bandwidth, default 4800: an
//! NVIDIA H200's HBM3e; an H100 SXM is 3350, an A100 80GB 2039).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::D;
use worker_candle::engine::batch::{ForwardBatch, LogitsWanted, SeqInput};
use worker_candle::engine::kv_cache::KvCache;
use worker_candle::engine::loader::load_causal;
use worker_candle::engine::models::CausalLM;
use worker_candle::engine::settings::{DTypeChoice, DeviceChoice, EngineSettings, Quantization};

const BLOCK: usize = 16;
/// Most tokens in one prefill pass.
const PREFILL_CHUNK: usize = 2048;

/// One forward over `seqs` (tokens, context length, blocks): the greedy next token of each.
fn step(
    model: &dyn CausalLM,
    cache: &mut KvCache,
    seqs: &[(Vec<u32>, usize, Vec<u32>)],
) -> Result<Vec<u32>> {
    let batch = ForwardBatch {
        tokens: seqs.iter().flat_map(|s| s.0.iter().copied()).collect(),
        seqs: seqs
            .iter()
            .map(|(t, ctx, blocks)| SeqInput {
                context_len: *ctx,
                num_new: t.len(),
                block_table: blocks.clone(),
                logits: LogitsWanted::Last,
            })
            .collect(),
        adapters: Vec::new(),
    };
    let logits = model.forward(&batch, cache)?;
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

/// The weights' bytes: the model's files (safetensors or GGUF).
fn weight_bytes(path: &std::path::Path) -> u64 {
    if path.is_file() {
        return path.metadata().map_or(0, |m| m.len());
    }
    std::fs::read_dir(path)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn main() -> Result<()> {
    // SAFETY: the first statement of main; no other thread exists yet.
    unsafe { worker_candle::engine::loader::prepare_candle_env(None) };
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = args.get(1) else {
        bail!("usage: batch_decode_bench MODEL_DIR [CONCURRENCY=1,16,64,256] [PROMPT=32] [NEW=64]")
    };
    let concurrency: Vec<usize> = args
        .get(2)
        .map_or("1,16,64,256", String::as_str)
        .split(',')
        .map(|c| {
            c.trim()
                .parse()
                .context("CONCURRENCY: numbers separated by commas")
        })
        .collect::<Result<_>>()?;
    let number = |i: usize, default: usize| -> Result<usize> {
        args.get(i).map_or(Ok(default), |s| {
            s.parse().context("PROMPT and NEW are numbers")
        })
    };
    let (prompt_len, new) = (number(3, 32)?.max(1), number(4, 64)?.max(1));
    let mut settings = EngineSettings::for_model(dir);
    settings.device = match std::env::var("DEVICE").as_deref() {
        Ok("cuda") => DeviceChoice::Cuda,
        Ok("cpu") => DeviceChoice::Cpu,
        _ => DeviceChoice::Auto,
    };
    settings.dtype = match std::env::var("DTYPE").as_deref() {
        Ok("f32") | Ok("float32") => DTypeChoice::F32,
        Ok("bf16") | Ok("bfloat16") => DTypeChoice::BF16,
        Ok("f16") | Ok("float16") => DTypeChoice::F16,
        _ => DTypeChoice::Auto,
    };
    if let Ok(q) = std::env::var("QUANTIZATION")
        && !q.is_empty()
        && q != "none"
    {
        settings.quantization = Quantization::InSitu(q);
    }
    let bandwidth: f64 = std::env::var("BANDWIDTH_GBPS")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(4800.0);
    let t = Instant::now();
    let mut loaded = load_causal(&settings)?;
    loaded.gguf = None;
    let model = loaded.model.as_ref();
    let spec = model.spec().clone();
    let bytes = weight_bytes(&settings.model_path);
    eprintln!(
        "loaded {} ({:?} on {:?}, {:.2} GiB of weights) in {:.1}s",
        loaded.meta.architecture,
        spec.dtype,
        spec.device,
        bytes as f64 / (1u64 << 30) as f64,
        t.elapsed().as_secs_f64()
    );
    let vocab = spec.vocab_size as u64;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut random_token = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % vocab) as u32
    };
    let per_seq = (prompt_len + new).div_ceil(BLOCK);
    let mut single = None;
    for &b in &concurrency {
        let b = b.max(1);
        let mut cache = KvCache::new(&spec, b * per_seq, BLOCK)?;
        let tables: Vec<Vec<u32>> = (0..b)
            .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
            .collect();
        // Prefill, a few sequences per pass.
        let mut next = vec![0u32; b];
        let per_pass = (PREFILL_CHUNK / prompt_len).max(1);
        for start in (0..b).step_by(per_pass) {
            let end = (start + per_pass).min(b);
            let seqs: Vec<(Vec<u32>, usize, Vec<u32>)> = (start..end)
                .map(|s| {
                    let prompt = (0..prompt_len).map(|_| random_token()).collect();
                    (prompt, 0, tables[s].clone())
                })
                .collect();
            let picked = step(model, &mut cache, &seqs)?;
            next[start..end].copy_from_slice(&picked);
        }
        // Decode: one warm-up step, then `new - 1` timed steps.
        let mut ctx = prompt_len;
        let mut decode = |next: &mut Vec<u32>, ctx: usize| -> Result<()> {
            let seqs: Vec<(Vec<u32>, usize, Vec<u32>)> = (0..b)
                .map(|s| (vec![next[s]], ctx, tables[s].clone()))
                .collect();
            *next = step(model, &mut cache, &seqs)?;
            Ok(())
        };
        decode(&mut next, ctx)?;
        ctx += 1;
        let t = Instant::now();
        for _ in 1..new {
            decode(&mut next, ctx)?;
            ctx += 1;
        }
        let secs = t.elapsed().as_secs_f64();
        let aggregate = (b * (new - 1)) as f64 / secs;
        if b == 1 {
            single = Some(aggregate);
        }
        let bound = bandwidth * 1e9 / bytes.max(1) as f64;
        let vs_single = single.map_or(String::new(), |s| {
            format!(", {:.1}x one stream", aggregate / s)
        });
        println!(
            "concurrency {b:>4}: {aggregate:>9.1} tok/s aggregate, {:>7.1} tok/s per stream{vs_single}{}",
            aggregate / b as f64,
            if b == 1 {
                format!(
                    ", {:.0}% of the bandwidth bound ({bound:.0} tok/s at {bandwidth} GB/s)",
                    100.0 * aggregate / bound
                )
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
