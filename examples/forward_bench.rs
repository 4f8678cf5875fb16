//! Single-stream model speed, without the engine around it: prefill of a prompt in one forward, then
//! greedy decode one token per forward, through the paged KV cache.
//!
//! `cargo run --release --example forward_bench -- MODEL_DIR [PROMPT_TOKENS=128] [NEW_TOKENS=128] [RUNS=3]`
//!
//! Prints the median prefill and decode tokens/s over the runs and the process's resident memory, and
//! the best run of each (on a shared machine, the least disturbed).
//! `MODEL_DIR` may be a `.gguf` file. `DTYPE=f32|bf16|f16` overrides the dtype (default: the loader's
//! auto choice); `QUANTIZATION=q8_0|q4k|...` quantizes at load; `RAYON_NUM_THREADS` the thread count;
//! `ATTENTION=loop|varlen|fused` the attention path (default: automatic).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use worker_candle::engine::batch::{ForwardBatch, LogitsWanted, SeqInput};
use worker_candle::engine::kv_cache::KvCache;
use worker_candle::engine::layers::AttentionImpl;
use worker_candle::engine::loader::load_causal;
use worker_candle::engine::models::CausalLM;
use worker_candle::engine::settings::{DTypeChoice, EngineSettings, Quantization};

const BLOCK: usize = 16;

fn arg(args: &[String], i: usize, default: usize) -> Result<usize> {
    match args.get(i) {
        Some(s) => s
            .parse()
            .with_context(|| format!("argument {i} `{s}` is not a number")),
        None => Ok(default),
    }
}

fn step(
    model: &dyn CausalLM,
    cache: &mut KvCache,
    tokens: Vec<u32>,
    ctx: usize,
    blocks: &[u32],
) -> Result<u32> {
    let batch = ForwardBatch {
        seqs: vec![SeqInput {
            context_len: ctx,
            num_new: tokens.len(),
            block_table: blocks.to_vec(),
            logits: LogitsWanted::Last,
        }],
        tokens,
        adapters: Vec::new(),
    };
    let logits = model.forward(&batch, cache)?.squeeze(0)?;
    Ok(logits.argmax(0)?.to_scalar::<u32>()?)
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
        bail!("usage: forward_bench MODEL_DIR [PROMPT_TOKENS] [NEW_TOKENS] [RUNS]")
    };
    let (p, n, runs) = (
        arg(&args, 2, 128)?,
        arg(&args, 3, 128)?,
        arg(&args, 4, 3)?.max(1),
    );
    let mut settings = EngineSettings::for_model(dir);
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
    let t = Instant::now();
    let mut loaded = load_causal(&settings)?;
    // the worker drops the GGUF file (and its mapping) once the model is loaded; so does this
    loaded.gguf = None;
    let imp = match std::env::var("ATTENTION").as_deref() {
        Ok("loop") => AttentionImpl::Loop,
        Ok("varlen") => AttentionImpl::Varlen,
        Ok("fused") => AttentionImpl::Fused,
        _ => AttentionImpl::Auto,
    };
    loaded.model.set_attention_impl(imp);
    let model = loaded.model.as_ref();
    let spec = model.spec().clone();
    eprintln!(
        "loaded {} ({:?} on {:?}) in {:.2}s, {} threads",
        loaded.meta.architecture,
        spec.dtype,
        spec.device,
        t.elapsed().as_secs_f64(),
        candle_core::utils::get_num_threads()
    );
    let vocab = spec.vocab_size as u64;
    // a fixed pseudo-random prompt (xorshift), the same every run
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let prompt: Vec<u32> = (0..p)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab) as u32
        })
        .collect();
    let nblocks = (p + n).div_ceil(BLOCK);
    let blocks: Vec<u32> = (0..nblocks as u32).collect();
    let mut cache = KvCache::new(&spec, nblocks, BLOCK)?;
    // warm-up: first touches of the weights and allocator
    step(model, &mut cache, prompt[..8.min(p)].to_vec(), 0, &blocks)?;
    let (mut pre, mut dec) = (Vec::new(), Vec::new());
    let (mut pre_cpu, mut dec_cpu) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (t, c) = (Instant::now(), cpu_seconds());
        let mut tok = step(model, &mut cache, prompt.clone(), 0, &blocks)?;
        pre.push(p as f64 / t.elapsed().as_secs_f64());
        pre_cpu.push((cpu_seconds() - c) * 1e3 / p as f64);
        let (t, c) = (Instant::now(), cpu_seconds());
        for i in 0..n {
            tok = step(model, &mut cache, vec![tok], p + i, &blocks)?;
        }
        dec.push(n as f64 / t.elapsed().as_secs_f64());
        dec_cpu.push((cpu_seconds() - c) * 1e3 / n.max(1) as f64);
    }
    let best = |v: &[f64]| v.iter().copied().fold(0f64, f64::max);
    let (best_pre, best_dec) = (best(&pre), best(&dec));
    println!(
        "{}: prompt {p} tokens, {n} new tokens, median of {runs}: prefill {:.1} tok/s, decode {:.1} tok/s, rss {:.0} MiB (best: prefill {best_pre:.1}, decode {best_dec:.1})",
        loaded.meta.architecture,
        median(pre),
        median(dec),
        rss_mib()
    );
    // CPU time of all threads (spinning included): with one thread, the work itself, which a
    // machine busy with other processes disturbs far less than the wall clock
    println!(
        "cpu ms per token (median): prefill {:.3}, decode {:.3}",
        median(pre_cpu),
        median(dec_cpu)
    );
    Ok(())
}

/// User + system CPU seconds of the whole process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: `getrusage` fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

/// The process's resident set (VmRSS), MiB; 0 where /proc is absent.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
