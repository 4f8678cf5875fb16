//! Speculative decoding against plain decoding on input-grounded tasks (rewrite a given text, edit
//! given code): single-stream decode tokens/s of both, alternating rounds, and whether the greedy
//! outputs are identical.
//!
//! `cargo run --release --example spec_bench -- <model> '<SPECULATIVE_CONFIG json>' [rounds] [new_tokens]`
//! (`<model>` a folder or a `.gguf` file; `QUANTIZATION=q8_0` quantizes a float checkpoint as it loads.)

use std::time::Instant;

use futures::StreamExt;
use worker_candle::engine::speculative::SpeculativeConfig;
use worker_candle::engine::{
    Engine, EngineSettings, GenerateRequest, GenerationEvent, Prompt, SamplingParams,
};

const TASKS: &[&str] = &[
    "Rewrite the following paragraph, keeping every sentence but fixing the spelling mistakes:\n\n\
     The quick brown fox jumpped over the lazy dog. It was a sunny day in the park, and the childen \
     were playing football near the old oak tree. Their parents sat on the benches, talking about \
     the wether and the prices of food at the market. Later that afternoon, the fox came back and \
     stole a sandwich from a picnic basket while everyone was looking at the ducks in the pond.",
    "Add a docstring to this Python function and return the code unchanged otherwise:\n\n\
     def moving_average(values, window):\n    if window <= 0:\n        raise ValueError(\"window must be positive\")\n    \
     result = []\n    total = 0.0\n    for i, v in enumerate(values):\n        total += v\n        \
     if i >= window:\n            total -= values[i - window]\n        if i >= window - 1:\n            \
     result.append(total / window)\n    return result\n",
    "Repeat the following list exactly, one item per line, and add the word 'done' at the end:\n\n\
     apples, bananas, cherries, dates, elderberries, figs, grapes, honeydew melons, kiwis, lemons, \
     mangoes, nectarines, oranges, papayas, quinces, raspberries, strawberries, tangerines",
];

async fn run(engine: &Engine, ids: &[u32], new_tokens: usize) -> anyhow::Result<(Vec<u32>, f64)> {
    let mut stream = engine.generate(GenerateRequest {
        request_id: "bench".into(),
        prompt: Prompt::Tokens(ids.to_vec()),
        add_special_tokens: false,
        params: SamplingParams {
            temperature: 0.0,
            max_tokens: Some(new_tokens),
            ..Default::default()
        },
    })?;
    let mut out = Vec::new();
    let mut first = None;
    while let Some(ev) = stream.next().await {
        match ev {
            GenerationEvent::Delta(d) => {
                first.get_or_insert_with(Instant::now);
                out.extend(d.token_ids);
            }
            GenerationEvent::Error(e) => anyhow::bail!("engine error: {e}"),
            GenerationEvent::Done { .. } => break,
            GenerationEvent::Prompt { .. } => {}
        }
    }
    let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    // the first token comes from the prompt's pass: decode speed is the rest
    Ok((
        out.clone(),
        (out.len().saturating_sub(1)) as f64 / secs.max(1e-9),
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    // SAFETY: the first statement of main; no other thread exists yet.
    unsafe { worker_candle::engine::loader::prepare_candle_env(None) };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(model), Some(config)) = (args.first(), args.get(1)) else {
        anyhow::bail!(
            "usage: spec_bench <model> '<SPECULATIVE_CONFIG json>' [rounds] [new_tokens]"
        );
    };
    let rounds: usize = args.get(2).map_or(Ok(3), |s| s.parse())?;
    let new_tokens: usize = args.get(3).map_or(Ok(160), |s| s.parse())?;
    let spec = SpeculativeConfig::parse(config).map_err(anyhow::Error::msg)?;
    let settings = |speculative| {
        let mut s = EngineSettings::for_model(model);
        s.enable_prefix_caching = false;
        s.speculative = speculative;
        if let Some(q) = std::env::var("QUANTIZATION")
            .ok()
            .filter(|q| !q.is_empty() && q != "none")
        {
            s.quantization = worker_candle::engine::settings::Quantization::InSitu(q);
        }
        s
    };
    let plain = Engine::start(settings(None))?;
    let fast = Engine::start(settings(Some(spec)))?;
    let template = plain
        .chat_template()
        .ok_or_else(|| anyhow::anyhow!("the model has no chat template"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    println!("task | plain tok/s | speculative tok/s | speed-up | identical");
    let mut ratios = Vec::new();
    for (t, task) in TASKS.iter().enumerate() {
        let messages = [serde_json::json!({"role": "user", "content": task})];
        let options = worker_candle::engine::template::RenderOptions {
            add_generation_prompt: true,
            ..Default::default()
        };
        let text = template.render(&messages, &options)?;
        let ids = plain.tokenizer().encode(&text, false)?;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut identical = true;
        for _ in 0..rounds {
            let (x, sa) = rt.block_on(run(&plain, &ids, new_tokens))?;
            let (y, sb) = rt.block_on(run(&fast, &ids, new_tokens))?;
            identical &= x == y;
            a.push(sa);
            b.push(sb);
        }
        let (ma, mb) = (median(a), median(b));
        ratios.push(mb / ma);
        println!("{t} | {ma:.1} | {mb:.1} | {:.2}x | {identical}", mb / ma);
    }
    let s = fast.stats();
    use std::sync::atomic::Ordering::Relaxed;
    let (drafted, accepted, steps) = (
        s.spec_draft_tokens.load(Relaxed),
        s.spec_accepted_tokens.load(Relaxed),
        s.spec_verify_steps.load(Relaxed),
    );
    println!(
        "acceptance {accepted}/{drafted} = {:.2}; {:.2} tokens per verifying step; median speed-up {:.2}x",
        accepted as f64 / drafted.max(1) as f64,
        (accepted + steps) as f64 / steps.max(1) as f64,
        median(ratios)
    );
    Ok(())
}
