//! LoRA adapters made by the `peft` library on the fixture models (`tests/fixtures/lora`, see
//! `gen_lora.py`): greedy tokens and top-5 logprobs equal to transformers + peft, adapters and the
//! base model mixed in one batch, quantized bases, the clear errors, and the real binary serving
//! adapters by the OpenAI `model` field and the native `lora` input.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};
use worker_candle::engine::lora::AdapterSpec;
use worker_candle::engine::settings::{LoraSettings, Quantization};
use worker_candle::engine::speculative::SpeculativeConfig;
use worker_candle::engine::{Engine, EngineSettings};

use crate::common::fixtures::{collect, fixture, greedy, ids, reference, start_at};
use crate::common::process::{run, Running};

const TOL: f64 = 1e-4;

fn adapter_dir(name: &str) -> PathBuf {
    fixture("lora").join(name)
}

fn adapter_ref(name: &str) -> Value {
    let text = std::fs::read_to_string(adapter_dir(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn lora(names: &[&str], max_loras: usize, max_rank: usize) -> LoraSettings {
    LoraSettings {
        max_loras,
        max_lora_rank: max_rank,
        modules: names
            .iter()
            .map(|n| AdapterSpec {
                name: n.to_string(),
                path: adapter_dir(n),
            })
            .collect(),
    }
}

fn start_with(base: &Path, names: &[&str], f: impl FnOnce(&mut EngineSettings)) -> Engine {
    start_at(base, |s| {
        s.lora = Some(lora(names, 4, 16));
        s.block_size = 4;
        f(s);
    })
}

/// Greedy ids and, per step, the top-5 (id, logprob).
type Greedy = (Vec<u32>, Vec<Vec<(u32, f32)>>);

/// The greedy ids and per-step top-5 of `engine` (an adapter's, or the base's) on `prompt`.
async fn run_greedy(engine: &Engine, prompt: Vec<u32>, n: usize) -> Greedy {
    let out = collect(engine, greedy(prompt, n, Some(5))).await;
    let tops = out
        .choice
        .logprobs
        .iter()
        .map(|l| l.top.iter().map(|(id, _, lp)| (*id, *lp)).collect())
        .collect();
    (out.choice.token_ids, tops)
}

fn assert_matches(name: &str, case: &Value, got: &Greedy) {
    assert_eq!(got.0, ids(&case["greedy_ids"]), "{name}: greedy ids");
    for (step, want) in case["top5_logprobs_first_steps"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        for (k, w) in want.as_array().unwrap().iter().enumerate() {
            let (id, lp) = got.1[step][k];
            assert_eq!(
                id as u64,
                w[0].as_u64().unwrap(),
                "{name}: step {step} top {k}"
            );
            let d = (lp as f64 - w[1].as_f64().unwrap()).abs();
            assert!(d < TOL, "{name}: step {step} top {k}: logprob off by {d}");
        }
    }
}

/// Every peft adapter (ranks 4, 8 and 16; attention, MLP or all projections; rsLoRA; one layer
/// only; Phi-3's fused qkv_proj and gate_up_proj) computes what transformers + peft compute.
#[tokio::test(flavor = "multi_thread")]
async fn adapters_match_transformers_and_peft() {
    for name in [
        "llama-r8-attn",
        "llama-r4-all",
        "llama-r16-mlp",
        "phi3-r8-fused",
    ] {
        let r = adapter_ref(name);
        let base = fixture(r["base"].as_str().unwrap());
        let engine = start_with(&base, &[name], |_| {});
        let adapted = engine.with_adapter(name).expect("the adapter is served");
        assert_eq!(adapted.adapter().unwrap().name, name);
        for case in r["cases"].as_array().unwrap() {
            let got = run_greedy(&adapted, ids(&case["input_ids"]), 12).await;
            assert_matches(name, case, &got);
        }
    }
}

/// Two adapters and the base model, the same prompts, all at once: one batch per step (far fewer
/// steps than requests × tokens), each request the output it gets alone; the prompts' KV blocks,
/// cached by the earlier runs of each, are never shared across adapters.
#[tokio::test(flavor = "multi_thread")]
async fn two_adapters_and_the_base_in_one_batch_give_each_its_alone_output() {
    let names = ["llama-r8-attn", "llama-r4-all"];
    let engine = start_with(&fixture("llama"), &names, |s| {
        s.lora = Some(lora(&names, 2, 16))
    });
    let base_cases = reference("llama")["cases"].as_array().unwrap().clone();
    let mut jobs = Vec::new();
    for (i, case) in base_cases.iter().take(3).enumerate() {
        let want: Vec<u32> = ids(&case["greedy_ids"])[..12].to_vec();
        jobs.push((
            engine.clone(),
            ids(&case["input_ids"]),
            want,
            "base".to_string(),
        ));
        for n in names {
            let c = &adapter_ref(n)["cases"][i];
            jobs.push((
                engine.with_adapter(n).unwrap(),
                ids(&c["input_ids"]),
                ids(&c["greedy_ids"]),
                n.to_string(),
            ));
        }
    }
    // alone, one after the other (this also fills the prefix cache with every prompt's blocks)
    for (e, prompt, want, who) in &jobs {
        assert_eq!(
            &run_greedy(e, prompt.clone(), 12).await.0,
            want,
            "{who} alone"
        );
    }
    let before = engine
        .stats()
        .steps
        .load(std::sync::atomic::Ordering::Relaxed);
    let outs = join_all(jobs.iter().map(|(e, p, _, _)| run_greedy(e, p.clone(), 12))).await;
    let steps = engine
        .stats()
        .steps
        .load(std::sync::atomic::Ordering::Relaxed)
        - before;
    for ((_, _, want, who), got) in jobs.iter().zip(outs) {
        assert_eq!(&got.0, want, "{who} in the mixed batch");
    }
    assert!(
        steps < 40,
        "{} requests of 12 tokens took {steps} steps",
        jobs.len()
    );
}

/// MAX_LORAS=1 with two adapters: requests of the second wait for the first's to finish, and
/// every request still gets its own output.
#[tokio::test(flavor = "multi_thread")]
async fn max_loras_bounds_the_adapters_running_at_once() {
    let names = ["llama-r8-attn", "llama-r4-all"];
    let engine = start_with(&fixture("llama"), &names, |s| {
        s.lora = Some(lora(&names, 1, 16))
    });
    let jobs: Vec<_> = names
        .iter()
        .flat_map(|n| {
            let r = adapter_ref(n);
            let e = engine.with_adapter(n).unwrap();
            (0..2)
                .map(move |i| {
                    (
                        e.clone(),
                        ids(&r["cases"][i]["input_ids"]),
                        ids(&r["cases"][i]["greedy_ids"]),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let outs = join_all(jobs.iter().map(|(e, p, _)| run_greedy(e, p.clone(), 12))).await;
    for ((_, _, want), got) in jobs.iter().zip(outs) {
        assert_eq!(&got.0, want);
    }
}

/// The adapter stays in float over quantized bases: in-situ q8_0 and llama.cpp's q8_0 GGUF of the
/// same model follow transformers + peft's float greedy path (q8_0 rounding allowed for at the
/// tail), and differ from the base model's; the AWQ fixture takes an adapter of its shape.
#[tokio::test(flavor = "multi_thread")]
async fn adapters_over_quantized_bases() {
    let name = "llama-r8-attn";
    let r = adapter_ref(name);
    let gguf = fixture("gguf").join("llama-q8_0.gguf");
    for (what, base, quant) in [
        (
            "in-situ q8_0",
            fixture("llama"),
            Quantization::InSitu("q8_0".into()),
        ),
        ("GGUF q8_0", gguf, Quantization::None),
    ] {
        let engine = start_with(&base, &[name], |s| s.quantization = quant);
        let adapted = engine.with_adapter(name).unwrap();
        let case = &r["cases"][0];
        let want = ids(&case["greedy_ids"]);
        let got = run_greedy(&adapted, ids(&case["input_ids"]), 12).await;
        let same = got.0.iter().zip(&want).take_while(|(a, b)| a == b).count();
        assert!(
            same >= 6,
            "{what}: {:?} vs the float reference {want:?}",
            got.0
        );
        let (base_out, _) = run_greedy(&engine, ids(&case["input_ids"]), 12).await;
        assert_ne!(base_out, got.0, "{what}: the adapter changes nothing");
    }
    let engine = start_with(&fixture("awq"), &["wide-r4"], |_| {});
    let prompt = ids(&reference("llama")["cases"][0]["input_ids"]);
    let (base_out, base_top) = run_greedy(&engine, prompt.clone(), 6).await;
    let (lora_out, lora_top) =
        run_greedy(&engine.with_adapter("wide-r4").unwrap(), prompt, 6).await;
    assert!(
        base_out != lora_out || base_top != lora_top,
        "AWQ: the adapter changes nothing"
    );
}

/// Speculative decoding stays exact with adapters: prompt lookup, and a draft model (the base
/// model itself, guessing without the adapter) both give transformers + peft's greedy tokens.
#[tokio::test(flavor = "multi_thread")]
async fn speculative_decoding_keeps_the_adapters_output() {
    let name = "llama-r8-attn";
    let r = adapter_ref(name);
    let draft = fixture("llama").display().to_string();
    for config in [
        r#"{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}"#.to_string(),
        format!(r#"{{"model": "{draft}", "num_speculative_tokens": 3}}"#),
    ] {
        let spec = SpeculativeConfig::parse(&config).unwrap();
        let engine = start_with(&fixture("llama"), &[name], |s| s.speculative = Some(spec));
        let adapted = engine.with_adapter(name).unwrap();
        for case in r["cases"].as_array().unwrap() {
            let got = run_greedy(&adapted, ids(&case["input_ids"]), 12).await;
            assert_eq!(got.0, ids(&case["greedy_ids"]), "{config}");
        }
        let drafted = engine
            .stats()
            .spec_draft_tokens
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(drafted > 0, "{config}: nothing was speculated");
    }
}

fn start_err(base: &Path, l: LoraSettings) -> String {
    let mut s = EngineSettings::for_model(base);
    s.kv_cache_memory = Some(8 << 20);
    s.lora = Some(l);
    match Engine::start(s) {
        Ok(_) => panic!("the engine started"),
        Err(e) => format!("{e:#}"),
    }
}

/// A rank above MAX_LORA_RANK, an adapter for another base (shapes differ), an adapter on an
/// architecture without LoRA, and an unknown adapter's name are clear errors.
#[test]
fn bad_adapters_are_clear_errors() {
    let e = start_err(&fixture("llama"), lora(&["llama-r16-mlp"], 1, 8));
    assert!(
        e.contains("llama-r16-mlp") && e.contains("rank 16") && e.contains("MAX_LORA_RANK=8"),
        "{e}"
    );
    let e = start_err(&fixture("llama"), lora(&["wide-r4"], 1, 16));
    assert!(
        e.contains("wide-r4") && e.contains("another base model"),
        "{e}"
    );
    let e = start_err(&fixture("llama"), lora(&["phi3-r8-fused"], 1, 16));
    assert!(
        e.contains("gate_up_proj") && e.contains("another base model"),
        "{e}"
    );
    let e = start_err(&fixture("gpt2"), lora(&["llama-r8-attn"], 1, 16));
    assert!(e.contains("Llama-family"), "{e}");
    let engine = start_with(&fixture("llama"), &["llama-r8-attn"], |_| {});
    assert!(engine.with_adapter("nope").is_none());
    assert_eq!(engine.adapters().len(), 1);
}

/// VLLM_ALLOW_RUNTIME_LORA_UPDATING: an adapter loaded while serving computes what peft computes;
/// a second load of its name, an unload of an unknown name are refused; once unloaded, a handle
/// taken before fails its request rather than run the base model; without the setting, no loads.
#[tokio::test(flavor = "multi_thread")]
async fn adapters_load_and_unload_at_run_time() {
    let name = "llama-r4-all";
    let r = adapter_ref(name);
    let engine = start_with(&fixture("llama"), &[], |s| {
        s.allow_runtime_lora_updating = true
    });
    assert!(engine.with_adapter("x").is_none());
    let info = engine.load_adapter("x", &adapter_dir(name)).await.unwrap();
    assert_eq!(info.rank, 4);
    let x = engine.with_adapter("x").unwrap();
    let case = &r["cases"][0];
    assert_matches(
        name,
        case,
        &run_greedy(&x, ids(&case["input_ids"]), 12).await,
    );
    let again = engine
        .load_adapter("x", &adapter_dir(name))
        .await
        .unwrap_err();
    assert!(again.to_string().contains("already been loaded"), "{again}");
    let wide = engine
        .load_adapter("w", &adapter_dir("wide-r4"))
        .await
        .unwrap_err();
    assert!(wide.to_string().contains("another base model"), "{wide}");
    assert!(engine.with_adapter("w").is_none());
    engine.unload_adapter("x").await.unwrap();
    assert!(engine.with_adapter("x").is_none());
    assert!(engine.unload_adapter("x").await.is_err());
    let mut stream = x
        .generate(greedy(ids(&case["input_ids"]), 4, None))
        .unwrap();
    let first = futures::StreamExt::next(&mut stream).await.unwrap();
    assert!(
        matches!(first, worker_candle::engine::GenerationEvent::Error(_)),
        "{first:?}"
    );

    let fixed = start_with(&fixture("llama"), &[name], |_| {});
    let e = fixed
        .load_adapter("y", &adapter_dir(name))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("VLLM_ALLOW_RUNTIME_LORA_UPDATING"),
        "{e}"
    );
}

fn serve_vars(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut vars = vec![
        (
            "MODEL_NAME".to_string(),
            fixture("llama").display().to_string(),
        ),
        ("KV_CACHE_MEMORY".to_string(), "64MiB".to_string()),
    ];
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    vars
}

/// The binary: LORA_MODULES in both forms; `/v1/models` lists the adapter with its parent; the
/// `model` field and the native `lora` pick it; an unknown name is OpenAI's 404.
#[tokio::test(flavor = "multi_thread")]
async fn serve_picks_adapters_by_model_name_and_native_lora() {
    let dir = adapter_dir("llama-r8-attn").display().to_string();
    let modules = json!([{"name": "sql", "path": dir, "base_model_name": "base"}]).to_string();
    let mut server = Running::start(
        &serve_vars(&[
            ("ENABLE_LORA", "1"),
            ("LORA_MODULES", &modules),
            ("OPENAI_SERVED_MODEL_NAME_OVERRIDE", "base"),
            ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1"),
        ]),
        &["serve", "--host", "127.0.0.1", "--port", "0"],
    );
    let base = tokio::task::block_in_place(|| server.wait_listening(Duration::from_secs(120)));
    let http = reqwest::Client::new();
    let models: Value = http
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let data = models["data"].as_array().unwrap();
    assert_eq!(data.len(), 2, "{models}");
    assert_eq!(
        (data[1]["id"].as_str(), data[1]["parent"].as_str()),
        (Some("sql"), Some("base"))
    );
    let card: Value = http
        .get(format!("{base}/v1/models/sql"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(card["parent"], "base");

    let prompt = "Hello, my name is";
    let completion = |model: &str| {
        http.post(format!("{base}/v1/completions"))
            .json(&json!({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": true}))
            .send()
    };
    let r = completion("sql").await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["model"], "sql");
    let text = body["choices"][0]["text"].as_str().unwrap().to_string();
    let base_body: Value = completion("base").await.unwrap().json().await.unwrap();
    assert_ne!(
        base_body["choices"][0]["text"].as_str().unwrap(),
        text,
        "the adapter changes nothing"
    );

    let missing = completion("nope").await.unwrap();
    assert_eq!(missing.status(), 404);
    let err: Value = missing.json().await.unwrap();
    assert_eq!(err["error"]["code"], "model_not_found", "{err}");

    // a native job: `lora` names the adapter
    let job = |input: Value| {
        http.post(format!("{base}/runsync"))
            .json(&json!({"input": input}))
            .send()
    };
    let native: Value = job(json!({"prompt": prompt, "lora": "sql",
        "sampling_params": {"max_tokens": 8, "temperature": 0, "ignore_eos": true}}))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(native["status"], "COMPLETED", "{native}");
    let native_text: String = native["output"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["choices"][0]["tokens"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    assert_eq!(native_text, text, "{native}");
    let unknown: Value = job(json!({"prompt": "hi", "lora": "nope"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(unknown["status"], "FAILED", "{unknown}");
    assert!(unknown.to_string().contains("nope"), "{unknown}");
    // the OpenAI route in a job (`openai_input`): its model name picks the adapter
    let bridged: Value = job(json!({"openai_route": "/v1/completions", "openai_input":
        {"model": "sql", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": true}}))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(
        bridged["output"][0]["choices"][0]["text"],
        text.as_str(),
        "{bridged}"
    );

    // vLLM's runtime routes
    let admin =
        |route: &str, body: Value| http.post(format!("{base}/v1/{route}")).json(&body).send();
    let mlp = adapter_dir("llama-r16-mlp").display().to_string();
    let loaded = admin(
        "load_lora_adapter",
        json!({"lora_name": "mlp", "lora_path": mlp}),
    )
    .await
    .unwrap();
    assert_eq!(loaded.status(), 200);
    let models: Value = http
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 3, "{models}");
    assert_eq!(completion("mlp").await.unwrap().status(), 200);
    let again = admin(
        "load_lora_adapter",
        json!({"lora_name": "mlp", "lora_path": mlp}),
    )
    .await
    .unwrap();
    assert_eq!(again.status(), 400);
    let gone = admin("unload_lora_adapter", json!({"lora_name": "mlp"}))
        .await
        .unwrap();
    assert_eq!(gone.status(), 200);
    assert_eq!(completion("mlp").await.unwrap().status(), 404);
    let missing = admin("unload_lora_adapter", json!({"lora_name": "mlp"}))
        .await
        .unwrap();
    assert_eq!(missing.status(), 400);
    server.terminate();
}

/// Start-up errors of the binary: LORA_MODULES without ENABLE_LORA, a rank above MAX_LORA_RANK.
#[test]
fn serve_refuses_lora_modules_without_enable_lora_and_ranks_above_the_maximum() {
    let dir = adapter_dir("llama-r16-mlp").display().to_string();
    let pair = format!("mlp={dir}");
    let out = run(
        &serve_vars(&[("LORA_MODULES", &pair)]),
        &["--test-input", "{}"],
        Duration::from_secs(120),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("LORA_MODULES") && stderr.contains("ENABLE_LORA=1"),
        "{stderr}"
    );
    let out = run(
        &serve_vars(&[
            ("LORA_MODULES", &pair),
            ("ENABLE_LORA", "1"),
            ("MAX_LORA_RANK", "8"),
        ]),
        &["--test-input", r#"{"input": {"prompt": "hi"}}"#],
        Duration::from_secs(120),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rank 16") && stderr.contains("MAX_LORA_RANK=8"),
        "{stderr}"
    );
}

const REPO: &str = "org/sql-lora";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A hub serving `files` as the repository `REPO`.
async fn start_hub(files: Vec<(&'static str, Vec<u8>)>) -> String {
    use axum::extract::Request;
    use axum::response::IntoResponse;
    let files: std::sync::Arc<std::collections::BTreeMap<String, Vec<u8>>> =
        std::sync::Arc::new(files.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
    let app = axum::Router::new().fallback(move |request: Request| {
        let files = files.clone();
        async move {
            let path = request.uri().path().to_string();
            if path == format!("/api/models/{REPO}/revision/main") {
                let siblings: Vec<Value> = files
                    .iter()
                    .map(|(name, bytes)| json!({"rfilename": name, "size": bytes.len()}))
                    .collect();
                return axum::Json(json!({"id": REPO, "sha": COMMIT, "siblings": siblings}))
                    .into_response();
            }
            match path
                .strip_prefix(&format!("/{REPO}/resolve/{COMMIT}/"))
                .and_then(|f| files.get(f))
            {
                Some(bytes) => bytes.clone().into_response(),
                None => axum::http::StatusCode::NOT_FOUND.into_response(),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, app).await.ok();
    });
    url
}

fn hub_at(endpoint: &str, offline: bool, fallback: &Path) -> worker_candle::hub::Hub {
    worker_candle::hub::Hub::new(worker_candle::hub::HubConfig {
        endpoint: endpoint.to_string(),
        token: None,
        offline,
        attempts: 2,
        backoff: Duration::from_millis(10),
        concurrency: 2,
        progress: false,
        fallback_cache: fallback.to_path_buf(),
    })
    .unwrap()
}

/// An adapter named by a hub repository downloads into the model's cache (its two files only),
/// then loads from there without the network; a repository without adapter weights is an error.
#[tokio::test(flavor = "multi_thread")]
async fn an_adapter_from_the_hub_lands_in_the_model_cache() {
    let name = "llama-r8-attn";
    let read = |f: &str| std::fs::read(adapter_dir(name).join(f)).unwrap();
    let url = start_hub(vec![
        ("adapter_config.json", read("adapter_config.json")),
        (
            "adapter_model.safetensors",
            read("adapter_model.safetensors"),
        ),
        ("README.md", b"# card".to_vec()),
    ])
    .await;
    let base = tempfile::tempdir().unwrap();
    let source = worker_candle::hub::ModelSource {
        name: "unused".into(),
        revision: None,
        base_path: base.path().to_path_buf(),
        token: None,
        tokenizer_name: None,
        tokenizer_revision: None,
        gguf_file: None,
        download_dir: None,
    };
    let path = hub_at(&url, false, base.path())
        .resolve_adapter(&source, REPO)
        .await
        .unwrap();
    assert!(path.starts_with(base.path()), "{}", path.display());
    assert!(path.join("adapter_model.safetensors").is_file() && !path.join("README.md").exists());
    let cached = hub_at("http://127.0.0.1:1", true, base.path())
        .resolve_adapter(&source, REPO)
        .await
        .unwrap();
    assert_eq!(cached, path);
    let engine = start_at(&fixture("llama"), |s| {
        s.lora = Some(LoraSettings {
            max_loras: 1,
            max_lora_rank: 16,
            modules: vec![AdapterSpec {
                name: "sql".into(),
                path,
            }],
        })
    });
    let case = &adapter_ref(name)["cases"][0];
    let got = run_greedy(
        &engine.with_adapter("sql").unwrap(),
        ids(&case["input_ids"]),
        12,
    )
    .await;
    assert_eq!(got.0, ids(&case["greedy_ids"]));

    let bare = start_hub(vec![("adapter_config.json", read("adapter_config.json"))]).await;
    let other = tempfile::tempdir().unwrap();
    let source = worker_candle::hub::ModelSource {
        base_path: other.path().to_path_buf(),
        ..source
    };
    let e = hub_at(&bare, false, other.path())
        .resolve_adapter(&source, REPO)
        .await
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("adapter_model.safetensors"),
        "{e:#}"
    );
}

/// Writes a PEFT adapter of rank 4 on `targets` (module path under a layer, its in and out widths)
/// into a fresh folder, with small random weights.
fn write_adapter(targets: &[(&str, usize, usize)]) -> tempfile::TempDir {
    use candle_core::{Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let modules: Vec<&str> = targets
        .iter()
        .map(|(m, _, _)| m.rsplit('.').next().unwrap())
        .collect();
    let config = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": modules});
    std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for (module, i, o) in targets {
        let name = format!("base_model.model.model.layers.0.{module}");
        let a = Tensor::randn(0f32, 0.5, (4, *i), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 0.5, (*o, 4), &Device::Cpu).unwrap();
        tensors.insert(format!("{name}.lora_A.weight"), a);
        tensors.insert(format!("{name}.lora_B.weight"), b);
    }
    candle_core::safetensors::save(&tensors, dir.path().join("adapter_model.safetensors")).unwrap();
    dir
}

/// On a mixture-of-experts model, an adapter on the attention projections serves (and changes the
/// output); one on the experts' projections is a clear start-up error, never silently ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixture_of_experts_models_take_attention_adapters_and_refuse_expert_ones() {
    let base = fixture("qwen3_moe");
    let settings = |dir: &Path| LoraSettings {
        max_loras: 1,
        max_lora_rank: 16,
        modules: vec![AdapterSpec {
            name: "a".into(),
            path: dir.to_path_buf(),
        }],
    };
    // hidden 64, 4 heads of 16, experts of width 32
    let experts = write_adapter(&[("mlp.experts.0.gate_proj", 64, 32)]);
    let e = start_err(&base, settings(experts.path()));
    assert!(
        e.contains("mixture-of-experts") && e.contains("gate_proj"),
        "{e}"
    );
    let attention = write_adapter(&[("self_attn.q_proj", 64, 64), ("self_attn.v_proj", 64, 32)]);
    let engine = start_at(&base, |s| {
        s.lora = Some(settings(attention.path()));
        s.block_size = 4;
    });
    let prompt: Vec<u32> = (10..30).collect();
    let plain = run_greedy(&engine, prompt.clone(), 8).await;
    let adapted = run_greedy(&engine.with_adapter("a").unwrap(), prompt, 8).await;
    assert_ne!(plain.1, adapted.1, "the adapter changes the distribution");
}
