//! Single-stream model speed without the scheduler: prefill of P tokens, then N greedy decode steps,
//! median of 3 runs. `cargo run --release --example forward_bench -- MODEL_DIR [P] [N]`

use std::time::Instant;

use worker_candle::engine::kv_cache::KvCache;
use worker_candle::engine::loader::load_causal;
use worker_candle::engine::models::{CausalLM, ForwardBatch, LogitsWanted, SeqInput};
use worker_candle::engine::EngineSettings;

const BLOCK: usize = 16;

fn run(
    model: &dyn CausalLM,
    cache: &mut KvCache,
    tokens: Vec<u32>,
    context_len: usize,
) -> anyhow::Result<u32> {
    let total = context_len + tokens.len();
    let batch = ForwardBatch {
        seqs: vec![SeqInput {
            context_len,
            num_new: tokens.len(),
            block_table: (0..total.div_ceil(BLOCK) as u32).collect(),
            logits: LogitsWanted::Last,
        }],
        tokens,
    };
    let logits: Vec<f32> = model.forward(&batch, cache)?.squeeze(0)?.to_vec1()?;
    Ok(logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap_or(0))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .expect("usage: forward_bench MODEL_DIR [PROMPT] [NEW]");
    let p: usize = args.get(2).map_or(Ok(128), |s| s.parse())?;
    let n: usize = args.get(3).map_or(Ok(128), |s| s.parse())?;
    let loaded = load_causal(&EngineSettings::for_model(dir))?;
    let model = loaded.model.as_ref();
    let vocab = model.spec().vocab_size as u32;
    let prompt: Vec<u32> = (0..p as u32).map(|i| (i * 7919 + 100) % vocab).collect();
    let blocks = (p + n).div_ceil(BLOCK) + 1;
    let (mut pre, mut dec) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let mut cache = KvCache::new(model.spec(), blocks, BLOCK)?;
        let t = Instant::now();
        let mut tok = run(model, &mut cache, prompt.clone(), 0)?;
        pre.push(p as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for i in 0..n {
            tok = run(model, &mut cache, vec![tok], p + i)?;
        }
        dec.push(n as f64 / t.elapsed().as_secs_f64());
    }
    println!(
        "prefill {:.1} tok/s, decode {:.1} tok/s (prompt {p}, new {n}, median of 3)",
        median(pre),
        median(dec)
    );
    Ok(())
}
