//! The engine loop over a toy executor that keeps a real paged cache of token ids and derives each
//! position's logits from every token its block table reaches: a wrong block table, a bad
//! copy-on-write or a stale prefix-cache block changes the output.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;

use super::*;
use crate::engine::scheduler::SchedulerConfig;
use crate::engine::types::{
    ChoiceDelta, FinishReason, RequestMetrics, SamplingParams, StopReason, TokenLogprob, Usage,
};

const BS: usize = 4;

struct ToyExec {
    slots: Vec<u32>,
    vocab: usize,
    /// Each position's row depends on its own token only (a bigram model): greedy output falls into
    /// cycles that prompt lookup predicts. Otherwise on every token the block table reaches.
    bigram: bool,
}

impl ToyExec {
    fn row(&self, table: &[u32], upto: usize) -> Vec<f32> {
        let mut h = DefaultHasher::new();
        let from = if self.bigram { upto } else { 0 };
        for p in from..=upto {
            self.slots[table[p / BS] as usize * BS + p % BS].hash(&mut h);
        }
        let seed = h.finish();
        (0..self.vocab as u64)
            .map(|t| {
                let mut h = DefaultHasher::new();
                (seed, t).hash(&mut h);
                (h.finish() % 10_000) as f32 / 1000.0
            })
            .collect()
    }
}

impl Executor for ToyExec {
    fn execute(&mut self, copies: &[(u32, u32)], batch: &ForwardBatch) -> anyhow::Result<Vec<f32>> {
        for &(src, dst) in copies {
            let (s, d) = (src as usize * BS, dst as usize * BS);
            self.slots.copy_within(s..s + BS, d);
        }
        let mut out = Vec::new();
        let mut off = 0;
        for s in &batch.seqs {
            for j in 0..s.num_new {
                let p = s.context_len + j;
                self.slots[s.block_table[p / BS] as usize * BS + p % BS] = batch.tokens[off + j];
            }
            off += s.num_new;
            let first = match s.logits {
                LogitsWanted::None => continue,
                LogitsWanted::Last => s.context_len + s.num_new - 1,
                LogitsWanted::All => s.context_len,
            };
            for p in first..s.context_len + s.num_new {
                out.extend(self.row(&s.block_table, p));
            }
        }
        Ok(out)
    }
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama")).unwrap()
}

/// What a toy model says of itself (`Engine::launch` sets `can_generate` / `can_embed` by kind).
fn toy_info(name: &str, vocab: usize) -> ModelInfo {
    ModelInfo {
        served_model_name: name.into(),
        architecture: "toy".into(),
        max_model_len: 64,
        vocab_size: vocab,
        can_generate: true,
        can_embed: false,
        created: 0,
        prefix_caching: false,
        matryoshka: None,
    }
}

fn engine(
    num_blocks: usize,
    budget: usize,
    max_seqs: usize,
    prefix: bool,
    eos: Vec<u32>,
) -> Engine {
    toy_engine(num_blocks, budget, max_seqs, prefix, eos, false, None)
}

fn toy_engine(
    num_blocks: usize,
    budget: usize,
    max_seqs: usize,
    prefix: bool,
    eos: Vec<u32>,
    bigram: bool,
    speculation: Option<Speculation>,
) -> Engine {
    Engine::launch(toy_parts(
        num_blocks,
        budget,
        max_seqs,
        prefix,
        eos,
        bigram,
        speculation,
    ))
}

fn toy_parts(
    num_blocks: usize,
    budget: usize,
    max_seqs: usize,
    prefix: bool,
    eos: Vec<u32>,
    bigram: bool,
    speculation: Option<Speculation>,
) -> EngineParts {
    let tokenizer = tokenizer();
    let vocab = tokenizer.vocab_size();
    EngineParts {
        info: toy_info("toy", vocab),
        tokenizer,
        template: None,
        kind: EngineKind::Generator(Generator {
            executor: Box::new(ToyExec {
                slots: vec![0; num_blocks * BS],
                vocab,
                bigram,
            }),
            eos_token_ids: eos,
            scheduler: SchedulerConfig {
                block_size: BS,
                num_blocks,
                max_num_seqs: max_seqs,
                max_num_batched_tokens: budget,
                enable_prefix_caching: prefix,
                max_loras: 1,
            },
            speculation,
            adapters: Vec::new(),
            fast_forward: true,
        }),
    }
}

#[derive(Debug, Default)]
struct Outcome {
    prompt: Vec<u32>,
    choices: Vec<ChoiceDelta>,
    usage: Usage,
    metrics: RequestMetrics,
    deltas: usize,
}

async fn collect(mut stream: GenerationStream) -> Outcome {
    let mut o = Outcome::default();
    while let Some(ev) = stream.next().await {
        match ev {
            GenerationEvent::Prompt {
                prompt_token_ids, ..
            } => o.prompt = prompt_token_ids,
            GenerationEvent::Delta(d) => {
                o.deltas += 1;
                while o.choices.len() <= d.index {
                    let index = o.choices.len();
                    o.choices.push(ChoiceDelta {
                        index,
                        text: String::new(),
                        token_ids: vec![],
                        logprobs: vec![],
                        finish: None,
                    });
                }
                let c = &mut o.choices[d.index];
                c.text.push_str(&d.text);
                c.token_ids.extend(d.token_ids);
                c.logprobs.extend(d.logprobs);
                assert!(c.finish.is_none(), "delta after finish");
                c.finish = d.finish;
            }
            GenerationEvent::Done { usage, metrics } => {
                o.usage = usage;
                o.metrics = metrics;
                return o;
            }
            GenerationEvent::Error(e) => panic!("engine error: {e}"),
        }
    }
    panic!("stream ended without Done")
}

fn request(prompt: Vec<u32>, f: impl FnOnce(&mut SamplingParams)) -> GenerateRequest {
    let mut params = SamplingParams {
        temperature: 0.0,
        max_tokens: Some(12),
        ..Default::default()
    };
    f(&mut params);
    GenerateRequest {
        request_id: "t".into(),
        prompt: Prompt::Tokens(prompt),
        add_special_tokens: false,
        params,
    }
}

fn prompt(len: usize, base: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 100 + (base * 7 + i * 13) % 800)
        .collect()
}

async fn wait_idle(e: &Engine) {
    for _ in 0..500 {
        let s = e.stats();
        if s.running.load(Ordering::Relaxed) == 0
            && s.waiting.load(Ordering::Relaxed) == 0
            && s.free_blocks.load(Ordering::Relaxed) == s.total_blocks.load(Ordering::Relaxed)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("engine did not free its blocks");
}

#[tokio::test]
async fn outputs_are_the_same_alone_and_batched_under_preemption() {
    let prompts: Vec<Vec<u32>> = (0..9).map(|i| prompt(3 + i * 2, i as u32 % 3)).collect();
    let roomy = engine(256, 64, 64, false, vec![]);
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(collect(roomy.generate(request(p.clone(), |_| {})).unwrap()).await);
    }
    // 10 blocks of 4 = 40 slots: the longest request (19 + 12) fits alone, all nine do not.
    let tight = engine(10, 8, 16, true, vec![]);
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| tight.generate(request(p.clone(), |_| {})).unwrap())
        .collect();
    let together = futures::future::join_all(streams.into_iter().map(collect)).await;
    for (a, b) in alone.iter().zip(&together) {
        assert_eq!(a.choices[0].token_ids.len(), 12);
        assert_eq!(a.choices[0].token_ids, b.choices[0].token_ids);
        assert_eq!(a.choices[0].text, b.choices[0].text);
    }
    assert!(
        tight.stats().preemptions.load(Ordering::Relaxed) > 0,
        "the budget forced preemption"
    );
    wait_idle(&tight).await;
}

#[tokio::test]
async fn prefix_cache_hit_gives_the_same_output() {
    let e = engine(64, 64, 8, true, vec![]);
    let p = prompt(18, 1);
    let miss = collect(e.generate(request(p.clone(), |_| {})).unwrap()).await;
    let hit = collect(e.generate(request(p.clone(), |_| {})).unwrap()).await;
    assert_eq!(miss.metrics.cached_prompt_tokens, 0);
    assert_eq!(hit.metrics.cached_prompt_tokens, 16);
    assert_eq!(miss.choices[0].token_ids, hit.choices[0].token_ids);
}

#[tokio::test]
async fn dropping_the_stream_cancels_and_frees_blocks() {
    let e = engine(64, 64, 8, false, vec![]);
    let mut s = e
        .generate(request(prompt(10, 2), |p| p.max_tokens = None))
        .unwrap();
    let mut seen = 0;
    while let Some(ev) = s.next().await {
        if matches!(ev, GenerationEvent::Delta(_)) {
            seen += 1;
            if seen == 3 {
                break;
            }
        }
    }
    drop(s);
    wait_idle(&e).await;
}

#[tokio::test]
async fn until_context_full_finishes_with_length() {
    let e = engine(64, 64, 8, false, vec![]);
    let o = collect(
        e.generate(request(prompt(50, 2), |p| p.max_tokens = None))
            .unwrap(),
    )
    .await;
    assert_eq!(o.choices[0].token_ids.len(), 14, "max_model_len 64 - 50");
    assert_eq!(
        o.choices[0].finish.as_ref().unwrap().reason,
        FinishReason::Length
    );
    assert_eq!(o.usage.completion_tokens, 14);
}

#[tokio::test]
async fn too_long_prompts_and_bad_params_are_rejected() {
    let e = engine(64, 64, 8, false, vec![]);
    match e.generate(request(prompt(64, 0), |_| {})) {
        Err(EngineError::PromptTooLong {
            prompt_tokens: 64,
            max_model_len: 64,
        }) => {}
        other => panic!("{:?}", other.err()),
    }
    let err = e
        .generate(request(prompt(4, 0), |p| p.temperature = -1.0))
        .err()
        .unwrap();
    assert_eq!(err.param(), Some("temperature"));
    let err = e.generate(request(vec![5000], |_| {})).err().unwrap();
    assert_eq!(err.param(), Some("prompt"));
}

#[tokio::test]
async fn seeded_siblings_share_the_prompt_and_repeat() {
    let e = engine(64, 64, 8, false, vec![]);
    let r = || {
        request(prompt(9, 1), |p| {
            p.n = 3;
            p.temperature = 1.0;
            p.seed = Some(7);
        })
    };
    let a = collect(e.generate(r()).unwrap()).await;
    let b = collect(e.generate(r()).unwrap()).await;
    assert_eq!(a.choices.len(), 3);
    for (x, y) in a.choices.iter().zip(&b.choices) {
        assert_eq!(x.token_ids, y.token_ids);
    }
    assert_ne!(a.choices[0].token_ids, a.choices[1].token_ids);
    assert_eq!(a.usage.completion_tokens, 36);
    wait_idle(&e).await;
}

#[tokio::test]
async fn best_of_returns_the_top_n_by_cumulative_logprob_at_the_end() {
    let e = engine(64, 64, 8, false, vec![]);
    let o = collect(
        e.generate(request(prompt(9, 1), |p| {
            p.n = 2;
            p.best_of = Some(4);
            p.temperature = 1.0;
            p.seed = Some(3);
            p.logprobs = Some(0);
        }))
        .unwrap(),
    )
    .await;
    assert_eq!(o.choices.len(), 2);
    assert_eq!(o.deltas, 2, "one delta per returned choice, at the end");
    let cum = |c: &ChoiceDelta| c.logprobs.iter().map(|l| l.logprob as f64).sum::<f64>();
    assert!(cum(&o.choices[0]) >= cum(&o.choices[1]));
    // The four candidates are the first four seeded siblings: the best two of them come back.
    let all = collect(
        e.generate(request(prompt(9, 1), |p| {
            p.n = 4;
            p.temperature = 1.0;
            p.seed = Some(3);
            p.logprobs = Some(0);
        }))
        .unwrap(),
    )
    .await;
    let mut sums: Vec<f64> = all.choices.iter().map(cum).collect();
    sums.sort_by(|a, b| b.total_cmp(a));
    assert!((sums[0] - cum(&o.choices[0])).abs() < 1e-6);
    assert!((sums[1] - cum(&o.choices[1])).abs() < 1e-6);
}

/// Log-probability of `output` after `prompt`, as the engine's prompt logprobs report it.
async fn score(e: &Engine, prompt: &[u32], output: &[u32]) -> f64 {
    let mut all = prompt.to_vec();
    all.extend_from_slice(output);
    let mut s = e
        .generate(request(all, |p| {
            p.prompt_logprobs = Some(1);
            p.max_tokens = Some(1);
        }))
        .unwrap();
    let Some(GenerationEvent::Prompt {
        prompt_logprobs: Some(lps),
        ..
    }) = s.next().await
    else {
        panic!("prompt event first");
    };
    lps[prompt.len()..]
        .iter()
        .map(|l| l.as_ref().unwrap().logprob as f64)
        .sum()
}

#[tokio::test]
async fn beam_search_returns_distinct_beams_best_first() {
    let e = engine(128, 64, 16, false, vec![]);
    let p = prompt(7, 2);
    let beams = collect(
        e.generate(request(p.clone(), |p| {
            p.use_beam_search = true;
            p.n = 2;
            p.best_of = Some(3);
        }))
        .unwrap(),
    )
    .await;
    assert_eq!(beams.choices.len(), 2);
    assert_ne!(beams.choices[0].token_ids, beams.choices[1].token_ids);
    for c in &beams.choices {
        assert_eq!(c.token_ids.len(), 12);
        assert_eq!(c.finish.as_ref().unwrap().reason, FinishReason::Length);
    }
    let s0 = score(&e, &p, &beams.choices[0].token_ids).await;
    let s1 = score(&e, &p, &beams.choices[1].token_ids).await;
    assert!(s0 >= s1, "{s0} < {s1}");
    wait_idle(&e).await;
}

#[tokio::test]
async fn stop_strings_and_stop_ids_end_the_choice() {
    let e = engine(64, 64, 8, false, vec![]);
    let p = prompt(6, 0);
    let full = collect(e.generate(request(p.clone(), |_| {})).unwrap()).await;
    let text = full.choices[0].text.clone();
    let ids = full.choices[0].token_ids.clone();
    // A stop string taken from the middle of the text.
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let o = collect(
        e.generate(request(p.clone(), |p| p.stop = vec![stop.clone()]))
            .unwrap(),
    )
    .await;
    let at = text.find(&stop).unwrap();
    assert_eq!(o.choices[0].text, text[..at]);
    assert_eq!(
        o.choices[0].finish.as_ref().unwrap().stop_reason,
        Some(StopReason::Text(stop))
    );
    let o = collect(
        e.generate(request(p.clone(), |p| p.stop_token_ids = vec![ids[4]]))
            .unwrap(),
    )
    .await;
    let first = ids.iter().position(|&t| t == ids[4]).unwrap();
    assert_eq!(o.choices[0].token_ids, ids[..=first]);
    assert_eq!(
        o.choices[0].finish.as_ref().unwrap().reason,
        FinishReason::Stop
    );
}

#[tokio::test]
async fn eos_stops_unless_ignored_and_min_tokens_holds_it_back() {
    let plain = engine(64, 64, 8, false, vec![]);
    let p = prompt(6, 0);
    let ids = collect(plain.generate(request(p.clone(), |_| {})).unwrap())
        .await
        .choices[0]
        .token_ids
        .clone();
    let eos = ids[2];
    let e = engine(64, 64, 8, false, vec![eos]);
    let o = collect(e.generate(request(p.clone(), |_| {})).unwrap()).await;
    assert_eq!(o.choices[0].token_ids, ids[..3]);
    assert_eq!(o.choices[0].finish.as_ref().unwrap().stop_reason, None);
    let o = collect(
        e.generate(request(p.clone(), |p| p.ignore_eos = true))
            .unwrap(),
    )
    .await;
    assert_eq!(o.choices[0].token_ids, ids);
    let o = collect(
        e.generate(request(p.clone(), |p| p.min_tokens = 5))
            .unwrap(),
    )
    .await;
    assert!(o.choices[0].token_ids.len() >= 5);
    assert!(!o.choices[0].token_ids[..4].contains(&eos));
}

#[tokio::test]
async fn prompt_logprobs_cover_every_prompt_token() {
    let e = engine(64, 4, 8, true, vec![]);
    let p = prompt(10, 0);
    let mut s = e
        .generate(request(p.clone(), |p| p.prompt_logprobs = Some(2)))
        .unwrap();
    let Some(GenerationEvent::Prompt {
        prompt_logprobs: Some(lps),
        prompt_token_ids,
    }) = s.next().await
    else {
        panic!("prompt event first");
    };
    assert_eq!(prompt_token_ids, p);
    assert_eq!(lps.len(), 10);
    assert!(lps[0].is_none());
    for (i, lp) in lps.iter().enumerate().skip(1) {
        let lp = lp.as_ref().unwrap();
        assert_eq!(lp.token_id, p[i]);
        assert_eq!(lp.top.len(), 2);
        assert!(lp.top[0].2 >= lp.logprob || lp.top.iter().any(|t| t.0 == p[i]));
    }
}

/// The outcomes of `requests`, one after another or all submitted at once.
async fn run_all(e: &Engine, requests: &[GenerateRequest], together: bool) -> Vec<Outcome> {
    if together {
        let streams: Vec<_> = requests
            .iter()
            .map(|r| e.generate(r.clone()).unwrap())
            .collect();
        return futures::future::join_all(streams.into_iter().map(collect)).await;
    }
    let mut v = Vec::new();
    for r in requests {
        v.push(collect(e.generate(r.clone()).unwrap()).await);
    }
    v
}

fn ngram(k: usize, disable_by_batch_size: usize) -> Option<Speculation> {
    Some(Speculation {
        proposer: Proposer::Ngram(crate::engine::speculative::NgramProposer { min: 1, max: 3 }),
        num_tokens: k,
        disable_by_batch_size,
    })
}

/// Greedy speculative decoding gives plain decoding's tokens, text, logprobs and finish, whether the
/// drafts are mostly right (bigram toy: cycles) or mostly wrong (context-hashing toy), alone and
/// batched under preemption, with siblings, stop strings and max_tokens.
#[tokio::test]
async fn speculative_greedy_output_equals_plain_decoding() {
    for bigram in [true, false] {
        let requests: Vec<GenerateRequest> = (0..8)
            .map(|i| {
                request(prompt(3 + i * 3, i as u32 % 4), |p| {
                    p.max_tokens = Some(20 + i * 5);
                    p.logprobs = Some(2);
                    if i == 3 {
                        p.n = 2;
                        p.seed = Some(5);
                    }
                    if i == 5 {
                        p.stop = vec!["a".into()];
                    }
                })
            })
            .collect();
        let plain = toy_engine(256, 64, 64, true, vec![], bigram, None);
        let mut want = Vec::new();
        for r in &requests {
            want.push(collect(plain.generate(r.clone()).unwrap()).await);
        }
        // alone, then all at once in a cache too small for all of them (preemption)
        for (blocks, together) in [(256, false), (24, true)] {
            let spec = toy_engine(blocks, 64, 64, true, vec![], bigram, ngram(4, 64));
            let got = run_all(&spec, &requests, together).await;
            for (i, (a, b)) in want.iter().zip(&got).enumerate() {
                assert_eq!(a.choices.len(), b.choices.len());
                for (ca, cb) in a.choices.iter().zip(&b.choices) {
                    let ctx = format!("bigram {bigram}, request {i}, together {together}");
                    assert_eq!(ca.token_ids, cb.token_ids, "{ctx}");
                    assert_eq!(ca.text, cb.text, "{ctx}");
                    assert_eq!(ca.finish, cb.finish, "{ctx}");
                    assert_eq!(ca.logprobs.len(), cb.logprobs.len(), "{ctx}");
                    for (la, lb) in ca.logprobs.iter().zip(&cb.logprobs) {
                        assert_eq!(la.token_id, lb.token_id);
                        assert!((la.logprob - lb.logprob).abs() < 1e-5, "{ctx}");
                    }
                }
                assert_eq!(a.usage, b.usage);
            }
            let st = spec.stats();
            let drafted = st.spec_draft_tokens.load(Ordering::Relaxed);
            let accepted = st.spec_accepted_tokens.load(Ordering::Relaxed);
            assert!(drafted > 0, "drafts were verified");
            if bigram {
                assert!(
                    accepted * 2 > drafted,
                    "cycles are predicted: {accepted}/{drafted}"
                );
                if !together {
                    let steps = st.steps.load(Ordering::Relaxed);
                    let plain_steps = plain.stats().steps.load(Ordering::Relaxed);
                    assert!(
                        steps * 10 < plain_steps * 9,
                        "{steps} vs {plain_steps} steps"
                    );
                }
            }
            wait_idle(&spec).await;
        }
    }
}

#[tokio::test]
async fn speculation_pauses_for_large_batches_and_sampling_still_finishes() {
    // disable_by_batch_size 1: with three requests decoding together, no drafts at all
    let e = toy_engine(256, 64, 64, false, vec![], true, ngram(4, 1));
    let streams: Vec<_> = (0..3)
        .map(|i| e.generate(request(prompt(6, i), |_| {})).unwrap())
        .collect();
    futures::future::join_all(streams.into_iter().map(collect)).await;
    let s = e.stats();
    let steps_with_drafts = s.spec_verify_steps.load(Ordering::Relaxed);
    // only the tail where one request decodes alone may speculate
    assert!(steps_with_drafts < 12, "{steps_with_drafts}");
    // sampled requests run to their length with drafts verified by rejection sampling
    let e = toy_engine(256, 64, 64, false, vec![], true, ngram(3, 8));
    let o = collect(
        e.generate(request(prompt(6, 1), |p| {
            p.temperature = 0.8;
            p.seed = Some(3);
            p.max_tokens = Some(40);
        }))
        .unwrap(),
    )
    .await;
    assert_eq!(o.choices[0].token_ids.len(), 40);
    assert_eq!(o.usage.completion_tokens, 40);
    wait_idle(&e).await;
}

/// The real decoder on every fixture architecture (and a quantized GGUF): greedy speculative decoding
/// gives the tokens plain decoding gives, one request at a time and all together. Drafts verify
/// several positions in one pass through the same kernels a prompt chunk takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculative_decoding_matches_plain_decoding_on_every_fixture() {
    use crate::engine::settings::{DeviceChoice, EngineSettings};
    use crate::engine::speculative::{SpeculativeConfig, SpeculativeMethod};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let models = [
        "llama",
        "llama31",
        "mistral",
        "mistral_sw",
        "qwen2",
        "qwen3",
        "phi3",
        "gemma2",
        "gpt2",
        "gguf/llama-q8_0.gguf",
    ];
    for name in models {
        let path = root.join(name);
        let settings = |spec: bool| {
            let mut s = EngineSettings::for_model(&path);
            s.device = DeviceChoice::Cpu;
            s.kv_cache_memory = Some(8 << 20);
            s.speculative = spec.then_some(SpeculativeConfig {
                method: SpeculativeMethod::Ngram {
                    prompt_lookup_min: 1,
                    prompt_lookup_max: 3,
                },
                num_speculative_tokens: 4,
                disable_by_batch_size: 8,
            });
            s
        };
        let plain = Engine::start(settings(false)).unwrap();
        let spec = Engine::start(settings(true)).unwrap();
        let tok = plain.tokenizer().clone();
        // prompts that repeat themselves, so that lookups find something to propose
        let prompts: Vec<Vec<u32>> = [
            "the cat sat on the mat. the cat sat on the mat. the cat",
            "one two three four one two three four one two",
            "Hello Hello Hello",
            "a b c d e f g a b c d e f g a b",
        ]
        .iter()
        .map(|t| tok.encode(t, false).unwrap())
        .collect();
        let req = |p: &Vec<u32>| request(p.clone(), |p| p.max_tokens = Some(24));
        let mut want = Vec::new();
        for p in &prompts {
            want.push(collect(plain.generate(req(p)).unwrap()).await);
        }
        for p in prompts.iter().zip(&want) {
            let got = collect(spec.generate(req(p.0)).unwrap()).await;
            assert_eq!(
                got.choices[0].token_ids, p.1.choices[0].token_ids,
                "{name} alone"
            );
        }
        let streams: Vec<_> = prompts
            .iter()
            .map(|p| spec.generate(req(p)).unwrap())
            .collect();
        let together = futures::future::join_all(streams.into_iter().map(collect)).await;
        for (a, b) in want.iter().zip(&together) {
            assert_eq!(
                a.choices[0].token_ids, b.choices[0].token_ids,
                "{name} batched"
            );
        }
        let st = spec.stats();
        assert!(
            st.spec_draft_tokens.load(Ordering::Relaxed) > 0,
            "{name}: drafts were verified"
        );
        eprintln!(
            "{name}: accepted {}/{} draft tokens",
            st.spec_accepted_tokens.load(Ordering::Relaxed),
            st.spec_draft_tokens.load(Ordering::Relaxed)
        );
    }
}

fn draft_spec(bigram: bool, num_blocks: usize, k: usize) -> Option<Speculation> {
    let vocab = tokenizer().vocab_size();
    Some(Speculation {
        proposer: Proposer::Draft(Box::new(ToyExec {
            slots: vec![0; num_blocks * BS],
            vocab,
            bigram,
        })),
        num_tokens: k,
        disable_by_batch_size: 64,
    })
}

/// A draft model writing through the target's block tables: a draft equal to the target is always
/// right; a different one mostly wrong; either way greedy output is plain decoding's, alone and
/// batched under preemption (where the draft cache must notice the new block tables).
#[tokio::test]
async fn draft_model_speculation_equals_plain_decoding() {
    let requests: Vec<GenerateRequest> = (0..6)
        .map(|i| {
            request(prompt(4 + i * 3, i as u32 % 3), |p| {
                p.max_tokens = Some(16 + i * 3);
                if i == 2 {
                    p.n = 2;
                    p.seed = Some(1);
                }
            })
        })
        .collect();
    let plain = toy_engine(256, 64, 64, true, vec![], false, None);
    let mut want = Vec::new();
    for r in &requests {
        want.push(collect(plain.generate(r.clone()).unwrap()).await);
    }
    for (same, blocks, together) in [
        (true, 256, false),
        (false, 256, false),
        (true, 20, true),
        (false, 20, true),
    ] {
        // `same`: the draft computes the target's rows (context hashing); else a bigram model
        let e = toy_engine(
            blocks,
            64,
            64,
            true,
            vec![],
            false,
            draft_spec(!same, blocks, 3),
        );
        let got = run_all(&e, &requests, together).await;
        for (i, (a, b)) in want.iter().zip(&got).enumerate() {
            for (ca, cb) in a.choices.iter().zip(&b.choices) {
                assert_eq!(
                    ca.token_ids, cb.token_ids,
                    "same {same}, together {together}, request {i}"
                );
            }
        }
        let st = e.stats();
        let drafted = st.spec_draft_tokens.load(Ordering::Relaxed);
        let accepted = st.spec_accepted_tokens.load(Ordering::Relaxed);
        assert!(drafted > 0);
        if same && !together {
            assert_eq!(
                accepted, drafted,
                "a draft equal to the target is always right"
            );
        }
        if !same {
            assert!(accepted * 4 < drafted, "{accepted}/{drafted}");
        }
        wait_idle(&e).await;
    }
}

/// The llama fixture with its own q8_0 copy as the draft (quantized in situ as it loads): the tokens
/// of plain float32 decoding, most guesses accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quantized_copy_drafts_for_the_float_model() {
    use crate::engine::settings::{DeviceChoice, EngineSettings};
    use crate::engine::speculative::{SpeculativeConfig, SpeculativeMethod};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
    let settings = |spec: bool| {
        let mut s = EngineSettings::for_model(&path);
        s.device = DeviceChoice::Cpu;
        s.kv_cache_memory = Some(8 << 20);
        s.speculative = spec.then_some(SpeculativeConfig {
            method: SpeculativeMethod::Draft {
                model: path.display().to_string(),
                quantization: Some("q8_0".into()),
            },
            num_speculative_tokens: 3,
            disable_by_batch_size: 8,
        });
        s
    };
    let plain = Engine::start(settings(false)).unwrap();
    let spec = Engine::start(settings(true)).unwrap();
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(5 + i * 4, i as u32)).collect();
    let req = |p: &Vec<u32>| request(p.clone(), |p| p.max_tokens = Some(20));
    let mut want = Vec::new();
    for p in &prompts {
        want.push(collect(plain.generate(req(p)).unwrap()).await);
    }
    for (p, w) in prompts.iter().zip(&want) {
        let got = collect(spec.generate(req(p)).unwrap()).await;
        assert_eq!(got.choices[0].token_ids, w.choices[0].token_ids);
    }
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| spec.generate(req(p)).unwrap())
        .collect();
    let together = futures::future::join_all(streams.into_iter().map(collect)).await;
    for (a, b) in want.iter().zip(&together) {
        assert_eq!(a.choices[0].token_ids, b.choices[0].token_ids);
    }
    let st = spec.stats();
    let drafted = st.spec_draft_tokens.load(Ordering::Relaxed);
    let accepted = st.spec_accepted_tokens.load(Ordering::Relaxed);
    eprintln!("q8_0 draft for float32 llama: accepted {accepted}/{drafted}");
    assert!(accepted * 2 > drafted, "{accepted}/{drafted}");
}

/// Sums each input's ids into a one-number vector.
struct ToyEmbedder;

impl Embedder for ToyEmbedder {
    fn embed(&self, request: &EmbedRequest) -> Result<EmbedOutput, EngineError> {
        Ok(EmbedOutput {
            embeddings: request
                .inputs
                .iter()
                .map(|ids| vec![ids.iter().sum::<u32>() as f32])
                .collect(),
            prompt_tokens: request.inputs.iter().map(Vec::len).sum(),
        })
    }
}

/// An embedder is an engine of its own kind: it embeds, and generation is unsupported (no engine
/// thread, no scheduler), whatever the loaded `ModelInfo` said.
#[tokio::test]
async fn an_embedding_engine_embeds_and_does_not_generate() {
    let tokenizer = tokenizer();
    let vocab = tokenizer.vocab_size();
    let e = Engine::launch(EngineParts {
        info: toy_info("embed", vocab),
        tokenizer,
        template: None,
        kind: EngineKind::Embedder(Arc::new(ToyEmbedder)),
    });
    assert!(!e.info().can_generate && e.info().can_embed);
    assert!(matches!(
        e.generate(request(prompt(3, 5), |_| {})),
        Err(EngineError::Unsupported(m)) if m == "the model embed cannot generate text"
    ));
    let out = e
        .embed(EmbedRequest {
            request_id: "r".into(),
            inputs: vec![vec![1, 2], vec![3]],
            dimensions: None,
            normalize: None,
        })
        .await
        .unwrap();
    assert_eq!(out.embeddings, vec![vec![3.0], vec![3.0]]);
    assert_eq!(out.prompt_tokens, 3);
    assert_eq!(e.stats().total_blocks.load(Ordering::Relaxed), 0);
}

/// A generator does not embed.
#[tokio::test]
async fn a_generating_engine_does_not_embed() {
    let e = engine(8, 16, 2, false, vec![]);
    assert!(e.info().can_generate && !e.info().can_embed);
    let err = e
        .embed(EmbedRequest {
            request_id: "r".into(),
            inputs: vec![vec![1]],
            dimensions: None,
            normalize: None,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::Unsupported(_)), "{err:?}");
}

/// A toy model that fails (or panics) on any step whose batch holds `poison`, after writing its
/// cache slots as a kernel that fails half-way would.
struct PoisonedExec {
    inner: ToyExec,
    poison: u32,
    panic: bool,
}

impl Executor for PoisonedExec {
    fn execute(&mut self, copies: &[(u32, u32)], batch: &ForwardBatch) -> anyhow::Result<Vec<f32>> {
        let out = self.inner.execute(copies, batch)?;
        if batch.tokens.contains(&self.poison) {
            if self.panic {
                panic!("index out of range in a kernel");
            }
            anyhow::bail!("index-select invalid index 600\nstack backtrace:\n   0: candle::kernel");
        }
        Ok(out)
    }
}

/// One sequence whose forward pass fails (an error with a backtrace, or a panic) fails its own
/// request with a one-line message; the seven sharing its steps finish with the tokens they get
/// alone.
#[tokio::test]
async fn a_poisoned_sequence_fails_alone_and_its_batch_goes_on() {
    const POISON: u32 = 5;
    for panic in [false, true] {
        let tokenizer = tokenizer();
        let vocab = tokenizer.vocab_size();
        let poisoned = Engine::launch(EngineParts {
            info: toy_info("toy", vocab),
            tokenizer,
            template: None,
            kind: EngineKind::Generator(Generator {
                executor: Box::new(PoisonedExec {
                    inner: ToyExec {
                        slots: vec![0; 256 * BS],
                        vocab,
                        bigram: false,
                    },
                    poison: POISON,
                    panic,
                }),
                eos_token_ids: vec![],
                scheduler: SchedulerConfig {
                    block_size: BS,
                    num_blocks: 256,
                    max_num_seqs: 64,
                    max_num_batched_tokens: 256,
                    enable_prefix_caching: true,
                    max_loras: 1,
                },
                speculation: None,
                adapters: Vec::new(),
                fast_forward: true,
            }),
        });
        let long = |p: &mut SamplingParams| p.max_tokens = Some(40);
        let requests: Vec<GenerateRequest> = (0..7)
            .map(|i| request(prompt(5 + i, i as u32), long))
            .collect();
        let alone = run_all(&engine(256, 256, 64, true, vec![]), &requests, false).await;
        assert!(alone
            .iter()
            .all(|a| !a.choices[0].token_ids.contains(&POISON)));
        let mut streams: Vec<_> = requests
            .iter()
            .map(|r| poisoned.generate(r.clone()).unwrap())
            .collect();
        let mut bad = prompt(6, 9);
        bad[3] = POISON;
        let mut bad = poisoned.generate(request(bad, long)).unwrap();
        streams.push(poisoned.generate(request(prompt(4, 11), long)).unwrap());
        let error = loop {
            match bad.next().await {
                Some(GenerationEvent::Error(e)) => break e.to_string(),
                Some(GenerationEvent::Done { .. }) | None => panic!("the poisoned request ended"),
                Some(_) => {}
            }
        };
        assert!(error.contains("could not run this request"), "{error}");
        assert!(
            !error.contains('\n') && !error.contains("backtrace"),
            "{error}"
        );
        let together = futures::future::join_all(streams.into_iter().map(collect)).await;
        for (a, b) in alone.iter().zip(&together) {
            assert_eq!(
                a.choices[0].token_ids, b.choices[0].token_ids,
                "panic: {panic}"
            );
        }
        assert_eq!(together[7].choices[0].token_ids.len(), 40);
        wait_idle(&poisoned).await;
    }
}

/// Sampling on the model's device (`SAMPLE_ON_DEVICE`, run here on the CPU through the same tensor
/// ops a GPU runs) gives the host path's greedy tokens, logprobs, top alternatives and ranks, alone and
/// in a batch that mixes device rows with host rows (penalties, top-p) and a seeded sampled request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_on_the_device_matches_the_host_path() {
    use crate::engine::settings::{DeviceChoice, EngineSettings};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in ["llama", "qwen2", "gguf/llama-q8_0.gguf"] {
        let path = root.join(name);
        let settings = |on: bool| {
            let mut s = EngineSettings::for_model(&path);
            s.device = DeviceChoice::Cpu;
            s.kv_cache_memory = Some(8 << 20);
            s.sample_on_device = Some(on);
            s
        };
        let host = Engine::start(settings(false)).unwrap();
        let device = Engine::start(settings(true)).unwrap();
        let tok = host.tokenizer().clone();
        let prompts: Vec<Vec<u32>> = ["the cat sat on the mat", "one two three", "Hello"]
            .iter()
            .map(|t| tok.encode(t, false).unwrap())
            .collect();
        let greedy = |p: &Vec<u32>| {
            request(p.clone(), |p| {
                p.max_tokens = Some(16);
                p.logprobs = Some(3);
            })
        };
        let penalised = |p: &Vec<u32>| {
            request(p.clone(), |p| {
                p.max_tokens = Some(16);
                p.temperature = 0.8;
                p.top_p = 0.9;
                p.repetition_penalty = 1.3;
                p.seed = Some(5);
            })
        };
        let sampled = |p: &Vec<u32>| {
            request(p.clone(), |p| {
                p.max_tokens = Some(16);
                p.temperature = 1.0;
                p.seed = Some(7);
                p.n = 2;
                p.logprobs = Some(2);
            })
        };
        let same = |a: &Outcome, b: &Outcome, what: &str| {
            assert_eq!(a.choices.len(), b.choices.len(), "{name} {what}");
            for (x, y) in a.choices.iter().zip(&b.choices) {
                assert_eq!(x.token_ids, y.token_ids, "{name} {what}");
                for (l, m) in x.logprobs.iter().zip(&y.logprobs) {
                    assert!((l.logprob - m.logprob).abs() < 1e-4, "{name} {what}");
                    assert_eq!(l.rank, m.rank, "{name} {what}");
                    let ids = |t: &TokenLogprob| t.top.iter().map(|a| a.0).collect::<Vec<_>>();
                    assert_eq!(ids(l), ids(m), "{name} {what}");
                }
            }
        };
        for p in &prompts {
            let want = collect(host.generate(greedy(p)).unwrap()).await;
            let got = collect(device.generate(greedy(p)).unwrap()).await;
            assert_eq!(got.choices[0].logprobs.len(), 16);
            same(&want, &got, "greedy alone");
        }
        // One batch: device rows (greedy, sampled) beside host rows (penalties and top-p).
        let mut want = Vec::new();
        for p in &prompts {
            want.push(collect(host.generate(greedy(p)).unwrap()).await);
            want.push(collect(host.generate(penalised(p)).unwrap()).await);
        }
        let mut streams = Vec::new();
        for p in &prompts {
            streams.push(device.generate(greedy(p)).unwrap());
            streams.push(device.generate(penalised(p)).unwrap());
            streams.push(device.generate(sampled(p)).unwrap());
        }
        let got = futures::future::join_all(streams.into_iter().map(collect)).await;
        for (i, w) in want.iter().enumerate() {
            same(w, &got[i / 2 * 3 + i % 2], "batched");
        }
        // The sampled request (n = 2, its first token from the host, the rest from the device)
        // finishes both choices, with logprobs that are log-probabilities of the tokens drawn.
        for s in (0..prompts.len()).map(|i| &got[i * 3 + 2]) {
            assert_eq!(s.choices.len(), 2);
            for c in &s.choices {
                assert_eq!(c.token_ids.len(), 16, "{name}");
                for (t, l) in c.token_ids.iter().zip(&c.logprobs) {
                    assert_eq!(*t, l.token_id);
                    assert!(l.logprob <= 0.0 && l.rank >= 1 && l.top.len() == 2);
                    assert!(l.top[0].2 >= l.logprob - 1e-5);
                }
            }
        }
    }
}

/// Structured output's fast-forward: the tokens a schema's fixed keys force are verified in the pass
/// that computes the sequence's next token, so a reply takes fewer forward passes than it has
/// tokens, and the tokens, text, logprobs and finish are those of one masked step per token (fast-
/// forward off) — alone, and batched under preemption, with siblings, a stop string and a
/// `max_tokens` cut inside the forced run.
#[tokio::test]
async fn fast_forward_verifies_forced_tokens_in_one_pass_and_changes_no_output() {
    use crate::engine::constraint::{Structure, StructuredOutput};
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "identifier_of_the_record": {"type": "integer", "minimum": 0, "maximum": 9},
            "is_the_record_still_active": {"type": "boolean"},
            "category_of_the_record": {"enum": ["first_category", "second_category"]}
        },
        "required": ["identifier_of_the_record", "is_the_record_still_active", "category_of_the_record"],
        "additionalProperties": false
    });
    let eos = tokenizer().eos_token_id().expect("eos");
    let launch = |blocks: usize, fast_forward: bool| {
        let mut parts = toy_parts(blocks, 64, 64, true, vec![eos], false, None);
        parts.info.max_model_len = 256;
        if let EngineKind::Generator(g) = &mut parts.kind {
            g.fast_forward = fast_forward;
        }
        Engine::launch(parts)
    };
    let requests: Vec<GenerateRequest> = (0..6)
        .map(|i| {
            request(prompt(3 + i * 2, i as u32), |p| {
                p.max_tokens = Some(if i == 4 { 9 } else { 120 });
                p.logprobs = Some(2);
                p.structured = Some(StructuredOutput::new(Structure::Json(schema.clone())));
                if i == 2 {
                    p.n = 2;
                    p.temperature = 1.0;
                    p.seed = Some(3);
                }
                if i == 3 {
                    p.stop = vec!["still".into()];
                }
            })
        })
        .collect();
    let plain = launch(256, false);
    let want = run_all(&plain, &requests, false).await;
    assert_eq!(plain.stats().forced_tokens.load(Ordering::Relaxed), 0);
    let plain_steps = plain.stats().steps.load(Ordering::Relaxed);
    for (blocks, together) in [(256, false), (40, true)] {
        let ff = launch(blocks, true);
        let got = run_all(&ff, &requests, together).await;
        for (i, (a, b)) in want.iter().zip(&got).enumerate() {
            let ctx = format!("request {i}, together {together}");
            assert_eq!(a.choices.len(), b.choices.len(), "{ctx}");
            for (ca, cb) in a.choices.iter().zip(&b.choices) {
                if i == 2 {
                    // sampled: a valid reply of its own, not the same draws
                    serde_json::from_str::<serde_json::Value>(&cb.text).expect(&ctx);
                    continue;
                }
                assert_eq!(ca.token_ids, cb.token_ids, "{ctx}");
                assert_eq!(ca.text, cb.text, "{ctx}");
                assert_eq!(ca.finish, cb.finish, "{ctx}");
                assert_eq!(ca.logprobs.len(), cb.logprobs.len(), "{ctx}");
                for (la, lb) in ca.logprobs.iter().zip(&cb.logprobs) {
                    assert_eq!(la.token_id, lb.token_id, "{ctx}");
                    assert!((la.logprob - lb.logprob).abs() < 1e-5, "{ctx}");
                }
            }
        }
        let reply = &want[0].choices[0];
        let value: serde_json::Value = serde_json::from_str(&reply.text).expect("valid JSON");
        assert!(value["category_of_the_record"].is_string(), "{value}");
        assert_eq!(
            want[4].choices[0].finish.as_ref().unwrap().reason,
            FinishReason::Length
        );
        assert_eq!(want[4].choices[0].token_ids.len(), 9);
        let st = ff.stats();
        let forced = st.forced_tokens.load(Ordering::Relaxed);
        assert!(forced > 0, "forced tokens were accepted");
        assert!(st.forced_draft_tokens.load(Ordering::Relaxed) >= forced);
        assert_eq!(st.spec_draft_tokens.load(Ordering::Relaxed), 0);
        if together {
            assert!(
                st.preemptions.load(Ordering::Relaxed) > 0,
                "a cache too small"
            );
        } else {
            let steps = st.steps.load(Ordering::Relaxed);
            let tokens: usize = want.iter().map(|o| o.usage.completion_tokens).sum();
            assert!(steps < plain_steps, "{steps} vs {plain_steps} steps");
            // the first request alone: fewer passes (prompt included) than tokens it produced
            let one = launch(256, true);
            let o = collect(one.generate(requests[0].clone()).unwrap()).await;
            let passes = one.stats().steps.load(Ordering::Relaxed);
            assert!(
                passes < o.usage.completion_tokens,
                "{passes} passes for {} tokens ({tokens} in all)",
                o.usage.completion_tokens
            );
        }
        wait_idle(&ff).await;
    }
}
