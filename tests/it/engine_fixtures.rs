//! The engine on every causal fixture: greedy output and top-5 logprobs match `reference.json` (what
//! transformers computes), alone and while other requests share the batch, under preemption and with
//! prefix-cache hits.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::fixtures::{cases, collect, fixture, greedy, start, Case, CAUSAL};
use futures::StreamExt;
use serde_json::Value;
use worker_candle::engine::{
    ChoiceDelta, Engine, EngineError, FinishReason, GenerateRequest, GenerationEvent, Prompt,
};

const MODELS: &[&str] = CAUSAL;

fn check_case(model: &str, i: usize, case: &Case, out: &ChoiceDelta) {
    assert_eq!(
        out.token_ids, case.greedy_ids,
        "{model} case {i}: greedy ids"
    );
    if let Some(text) = &case.greedy_text {
        assert_eq!(&out.text, text, "{model} case {i}: greedy text");
    }
    let reason = out.finish.as_ref().unwrap().reason;
    let expected = if case.finished_by_eos {
        FinishReason::Stop
    } else {
        FinishReason::Length
    };
    assert_eq!(reason, expected, "{model} case {i}: finish reason");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_output_and_logprobs_match_the_reference_alone() {
    for model in MODELS {
        let engine = start(model, |_| {});
        for (i, case) in cases(model).iter().enumerate() {
            let mut req = greedy(case.input_ids.clone(), 24, Some(5));
            req.params.ignore_eos = case.ignore_eos;
            let out = collect(&engine, req).await;
            check_case(model, i, case, &out.choice);
            for (step, want) in case.top5.iter().enumerate() {
                let got = &out.choice.logprobs[step];
                assert_eq!(got.token_id, case.greedy_ids[step]);
                assert!(
                    (got.logprob - want[0].1).abs() < 1e-4,
                    "{model} case {i} step {step}"
                );
                for ((id, lp), (wid, wlp)) in got.top.iter().map(|t| (t.0, t.2)).zip(want) {
                    assert_eq!(id, *wid, "{model} case {i} step {step}: top-5 ids");
                    assert!(
                        (lp - wlp).abs() < 1e-4,
                        "{model} case {i} step {step}: {lp} vs {wlp}"
                    );
                }
            }
        }
    }
}

/// Eight other requests of different lengths, started at different times, share every step.
async fn with_neighbours(engine: &Engine, model: &str) {
    let cases = cases(model);
    let noise = |k: usize| {
        let mut r = greedy(
            (0..(5 + 13 * k) as u32)
                .map(|t| 40 + (t * 31 + k as u32) % 900)
                .collect(),
            8 + 5 * k,
            None,
        );
        r.params.temperature = 0.8;
        r.params.seed = Some(k as u64);
        r
    };
    let mut tasks = Vec::new();
    for k in 0..8 {
        let e = engine.clone();
        let req = noise(k);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(3 * k as u64)).await;
            collect(&e, req).await;
        }));
    }
    let runs = cases.iter().enumerate().map(|(i, c)| {
        let e = engine.clone();
        let mut req = greedy(c.input_ids.clone(), 24, None);
        req.params.ignore_eos = c.ignore_eos;
        async move {
            tokio::time::sleep(Duration::from_millis(2 * i as u64)).await;
            collect(&e, req).await
        }
    });
    let outs = futures::future::join_all(runs).await;
    for (i, (case, out)) in cases.iter().zip(&outs).enumerate() {
        check_case(model, i, case, &out.choice);
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn wait_all_free(engine: &Engine) {
    let s = engine.stats();
    for _ in 0..500 {
        if s.free_blocks.load(Ordering::Relaxed) == s.total_blocks.load(Ordering::Relaxed)
            && s.running.load(Ordering::Relaxed) == 0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("blocks were not freed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_output_is_the_same_among_other_requests() {
    for model in MODELS {
        let engine = start(model, |s| s.max_num_batched_tokens = 64);
        with_neighbours(&engine, model).await;
        wait_all_free(&engine).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_too_small_for_everyone_preempts_and_still_matches() {
    // Room for about 160 tokens: any one request fits, the fifteen together do not.
    let engine = start("llama", |s| {
        s.kv_cache_memory = Some(10 * 2 * 2 * 2 * 16 * 16 * 4);
        s.max_model_len = Some(160);
    });
    assert_eq!(engine.stats().total_blocks.load(Ordering::Relaxed), 10);
    with_neighbours(&engine, "llama").await;
    assert!(engine.stats().preemptions.load(Ordering::Relaxed) > 0);
    wait_all_free(&engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_cache_hit_gives_the_same_output() {
    let engine = start("qwen2", |s| s.enable_prefix_caching = true);
    let case = cases("qwen2").pop().unwrap();
    let miss = collect(&engine, greedy(case.input_ids.clone(), 24, None)).await;
    let hit = collect(&engine, greedy(case.input_ids.clone(), 24, None)).await;
    assert_eq!(miss.metrics.cached_prompt_tokens, 0);
    assert_eq!(
        hit.metrics.cached_prompt_tokens,
        case.input_ids.len() / 16 * 16
    );
    assert_eq!(hit.choice.token_ids, case.greedy_ids);
    assert_eq!(miss.choice.token_ids, case.greedy_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_frees_its_blocks() {
    let engine = start("mistral", |_| {});
    let case = cases("mistral").pop().unwrap();
    let mut stream = engine
        .generate(greedy(case.input_ids.clone(), 200, None))
        .unwrap();
    let mut deltas = 0;
    while let Some(ev) = stream.next().await {
        if matches!(ev, GenerationEvent::Delta(_)) {
            deltas += 1;
            if deltas == 2 {
                break;
            }
        }
    }
    assert!(
        engine.stats().free_blocks.load(Ordering::Relaxed)
            < engine.stats().total_blocks.load(Ordering::Relaxed)
    );
    drop(stream);
    wait_all_free(&engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_that_fills_the_context_is_rejected_with_both_numbers() {
    let engine = start("gpt2", |s| s.max_model_len = Some(64));
    assert_eq!(engine.info().max_model_len, 64);
    match engine.generate(greedy(vec![5; 64], 4, None)) {
        Err(e @ EngineError::PromptTooLong { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("64 tokens") && msg.contains("64"), "{msg}");
            assert_eq!(
                e,
                EngineError::PromptTooLong {
                    prompt_tokens: 64,
                    max_model_len: 64
                }
            );
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("accepted"),
    }
    // One token shorter fits, and generation stops at the context end.
    let out = collect(&engine, greedy(vec![5; 63], 10, None)).await;
    assert_eq!(out.choice.token_ids.len(), 1);
    assert_eq!(out.choice.finish.unwrap().reason, FinishReason::Length);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_repeats_and_n_siblings_differ() {
    let engine = start("phi3", |_| {});
    let case = &cases("phi3")[0];
    let req = || {
        let mut r = greedy(case.input_ids.clone(), 12, None);
        r.params.temperature = 1.0;
        r.params.n = 3;
        r.params.seed = Some(42);
        r
    };
    let run = |r: GenerateRequest| {
        let e = engine.clone();
        async move {
            let mut s = e.generate(r).unwrap();
            let mut out = vec![Vec::new(); 3];
            while let Some(ev) = s.next().await {
                if let GenerationEvent::Delta(d) = ev {
                    out[d.index].extend(d.token_ids);
                }
            }
            out
        }
    };
    let a = run(req()).await;
    let b = run(req()).await;
    assert_eq!(a, b);
    assert!(a[0] != a[1] || a[1] != a[2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_prompt_is_tokenized_like_the_reference() {
    let engine = start("llama", |_| {});
    let text = std::fs::read_to_string(fixture("llama").join("reference.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let case = &v["cases"][0];
    let mut req = greedy(vec![], 24, None);
    req.prompt = Prompt::Text(case["prompt"].as_str().unwrap().to_string());
    req.add_special_tokens = true;
    let mut stream = engine.generate(req).unwrap();
    let Some(GenerationEvent::Prompt {
        prompt_token_ids, ..
    }) = stream.next().await
    else {
        panic!("prompt event first");
    };
    let want: Vec<u32> = case["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(prompt_token_ids, want);
    let mut ids = Vec::new();
    while let Some(ev) = stream.next().await {
        if let GenerationEvent::Delta(d) = ev {
            ids.extend(d.token_ids);
        }
    }
    assert_eq!(ids, cases("llama")[0].greedy_ids);
}
