//! The GPU path, on a machine with an NVIDIA GPU (`bash scripts/gpu-check.sh`): compiled only with
//! `--features cuda`, so CI (no GPU) never builds it; CI runs the CPU twins of what it covers (the same
//! fixtures and references in `engine_fixtures`, batching in `engine_fixtures` and the runner's tests,
//! device-side sampling with `SAMPLE_ON_DEVICE=1` in `engine::runner::tests`, the KV budget from
//! device memory in `engine::device_memory`). With `--features cuda` the rest of the suite also runs
//! on the GPU wherever it leaves `DEVICE` at `auto`.

use crate::common::fixtures::{cases, collect, greedy, start, CAUSAL};
use worker_candle::engine::settings::{DTypeChoice, DeviceChoice};

/// Every fixture in float32 on the GPU: greedy tokens equal to transformers', top-5 logprobs within
/// 1e-3 (cuBLAS sums in another order than the CPU), tokens chosen on the device (the default there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_matches_transformers_in_f32_on_the_gpu() {
    for model in CAUSAL {
        let engine = start(model, |s| {
            s.device = DeviceChoice::Cuda;
            s.dtype = DTypeChoice::F32;
        });
        for (i, case) in cases(model).iter().enumerate() {
            let mut req = greedy(case.input_ids.clone(), 24, Some(5));
            req.params.ignore_eos = case.ignore_eos;
            let out = collect(&engine, req).await.choice;
            assert_eq!(out.token_ids, case.greedy_ids, "{model} case {i}");
            for (step, want) in case.top5.iter().enumerate() {
                for ((id, lp), (wid, wlp)) in
                    out.logprobs[step].top.iter().map(|t| (t.0, t.2)).zip(want)
                {
                    assert_eq!(id, *wid, "{model} case {i} step {step}");
                    assert!((lp - wlp).abs() < 1e-3, "{model} case {i} step {step}");
                }
            }
        }
    }
}

/// bfloat16 on the GPU, against the float32 reference: the stated tolerance is 0.1 on every top-5
/// logprob of the first steps, and the same first token wherever the reference's top two are more
/// than 0.1 apart (closer than that, bf16 rounding may swap them, as it does in transformers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_stays_within_the_bf16_tolerance_on_the_gpu() {
    const BF16_TOL: f32 = 0.1;
    for model in CAUSAL {
        let engine = start(model, |s| {
            s.device = DeviceChoice::Cuda;
            s.dtype = DTypeChoice::BF16;
        });
        let mut worst = 0f32;
        for (i, case) in cases(model).iter().enumerate() {
            let mut req = greedy(case.input_ids.clone(), 1, Some(5));
            req.params.ignore_eos = true;
            let out = collect(&engine, req).await.choice;
            let first = &case.top5[0];
            if first[0].1 - first[1].1 > BF16_TOL {
                assert_eq!(
                    out.token_ids[0], first[0].0,
                    "{model} case {i}: first token"
                );
            }
            let got = &out.logprobs[0].top;
            for (wid, wlp) in first {
                // The reference's token among ours, wherever bf16 ranked it.
                if let Some(t) = got.iter().find(|t| t.0 == *wid) {
                    worst = worst.max((t.2 - wlp).abs());
                }
            }
        }
        assert!(worst < BF16_TOL, "{model}: bf16 logprobs off by {worst}");
        eprintln!("{model}: bf16 worst top-5 |Δ logprob| {worst:.4}");
    }
}

/// Continuous batching on the GPU: every case run together (with the others in the batch) gives the
/// tokens it gets alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_outputs_equal_unbatched_on_the_gpu() {
    for model in CAUSAL {
        let engine = start(model, |s| {
            s.device = DeviceChoice::Cuda;
            s.dtype = DTypeChoice::F32;
        });
        let cases = cases(model);
        let request = |c: &crate::common::fixtures::Case| {
            let mut r = greedy(c.input_ids.clone(), 24, None);
            r.params.ignore_eos = true;
            r
        };
        let mut alone = Vec::new();
        for c in &cases {
            alone.push(collect(&engine, request(c)).await.choice.token_ids);
        }
        let together =
            futures::future::join_all(cases.iter().map(|c| collect(&engine, request(c)))).await;
        for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(a, &t.choice.token_ids, "{model} case {i}");
        }
    }
}
