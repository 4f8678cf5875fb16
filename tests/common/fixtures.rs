//! The fixture models' reference cases (`reference.json`, computed by transformers) and an engine to run
//! them through, for tests that compare what the engine generates with the reference.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use serde_json::Value;
use worker_candle::engine::batch::{ForwardBatch, LogitsWanted, SeqInput};
use worker_candle::engine::kv_cache::KvCache;
use worker_candle::engine::models::CausalLM;
use worker_candle::engine::{
    ChoiceDelta, Engine, EngineSettings, GenerateRequest, GenerationEvent, Prompt, RequestMetrics,
    SamplingParams,
};

/// Every causal fixture.
pub const CAUSAL: &[&str] = &[
    "llama",
    "qwen2",
    "mistral",
    "phi3",
    "gemma2",
    "gpt2",
    "qwen3",
    "llama31",
    "mistral_sw",
    "gemma3",
    "qwen3_moe",
    "mixtral",
    "qwen2_moe",
    "smollm3",
    "olmo2",
    "granite",
    "phi4",
];

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub struct Case {
    pub input_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    /// Absent from the newer fixtures (ids only).
    pub greedy_text: Option<String>,
    pub finished_by_eos: bool,
    /// The newer fixtures generated 24 tokens whatever came (EOS included).
    pub ignore_eos: bool,
    pub top5: Vec<Vec<(u32, f32)>>,
    pub last_logits: Vec<f32>,
    pub prompt: Option<String>,
}

pub fn reference(model: &str) -> Value {
    let text = std::fs::read_to_string(fixture(model).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn cases(model: &str) -> Vec<Case> {
    let v = reference(model);
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            input_ids: ids(&c["input_ids"]),
            greedy_ids: ids(&c["greedy_ids"]),
            greedy_text: c["greedy_text"].as_str().map(str::to_string),
            finished_by_eos: c["finished_by_eos"].as_bool().unwrap_or(false),
            ignore_eos: c["finished_by_eos"].is_null(),
            top5: c["top5_logprobs_first_steps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|step| {
                    step.as_array()
                        .unwrap()
                        .iter()
                        .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32))
                        .collect()
                })
                .collect(),
            last_logits: c["last_logits"]
                .as_array()
                .map(|a| a.iter().map(|x| x.as_f64().unwrap() as f32).collect())
                .unwrap_or_default(),
            prompt: c["prompt"].as_str().map(str::to_string),
        })
        .collect()
}

/// An engine on `path` with room for a few dozen short sequences; `f` adjusts the settings.
pub fn start_at(path: &Path, f: impl FnOnce(&mut EngineSettings)) -> Engine {
    let mut s = EngineSettings::for_model(path);
    s.max_num_seqs = 32;
    s.kv_cache_memory = Some(8 << 20);
    f(&mut s);
    Engine::start(s).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
}

pub fn start(model: &str, f: impl FnOnce(&mut EngineSettings)) -> Engine {
    start_at(&fixture(model), f)
}

pub fn greedy(prompt: Vec<u32>, max_tokens: usize, logprobs: Option<usize>) -> GenerateRequest {
    GenerateRequest {
        request_id: "test".into(),
        prompt: Prompt::Tokens(prompt),
        add_special_tokens: false,
        params: SamplingParams {
            temperature: 0.0,
            max_tokens: Some(max_tokens),
            logprobs,
            ..Default::default()
        },
    }
}

pub struct Outcome {
    pub choice: ChoiceDelta,
    pub metrics: RequestMetrics,
}

pub async fn collect(engine: &Engine, req: GenerateRequest) -> Outcome {
    let mut stream = engine.generate(req).expect("request accepted");
    let mut choice = ChoiceDelta {
        index: 0,
        text: String::new(),
        token_ids: vec![],
        logprobs: vec![],
        finish: None,
    };
    while let Some(ev) = stream.next().await {
        match ev {
            GenerationEvent::Delta(d) => {
                choice.text.push_str(&d.text);
                choice.token_ids.extend(d.token_ids);
                choice.logprobs.extend(d.logprobs);
                choice.finish = d.finish;
            }
            GenerationEvent::Done { metrics, .. } => return Outcome { choice, metrics },
            GenerationEvent::Error(e) => panic!("engine error: {e}"),
            GenerationEvent::Prompt { .. } => {}
        }
    }
    panic!("stream ended without Done");
}

/// How many leading tokens two sequences share.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// A path to hold a model to: a prompt, the tokens that should follow it, and (when known) the logits
/// after the prompt.
pub struct TokenPath {
    pub prompt: Vec<u32>,
    pub next: Vec<u32>,
    pub last_logits: Vec<f32>,
}

/// Each path fed to `model` as one prompt (teacher forcing): the positions where the model's top token
/// is the path's next one, the positions, and the worst error of the logits after the prompt relative
/// to the largest `|logit|` wanted.
pub fn teacher_forced(model: &dyn CausalLM, paths: &[TokenPath]) -> (usize, usize, f32) {
    let (mut hit, mut n, mut worst) = (0, 0, 0f32);
    for path in paths {
        let mut tokens = path.prompt.clone();
        tokens.extend(&path.next[..path.next.len() - 1]);
        let blocks = tokens.len().div_ceil(4);
        let mut cache = KvCache::new(model.spec(), blocks, 4).unwrap();
        let batch = ForwardBatch {
            adapters: Vec::new(),
            tokens: tokens.clone(),
            seqs: vec![SeqInput {
                context_len: 0,
                num_new: tokens.len(),
                block_table: (0..blocks as u32).collect(),
                logits: LogitsWanted::All,
            }],
        };
        let logits = model
            .forward(&batch, &mut cache)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let p = path.prompt.len();
        if !path.last_logits.is_empty() {
            let spread = path.last_logits.iter().fold(0f32, |a, x| a.max(x.abs()));
            let err = logits[p - 1]
                .iter()
                .zip(&path.last_logits)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            worst = worst.max(err / spread);
        }
        for (k, next) in path.next.iter().enumerate() {
            let row = &logits[p - 1 + k];
            let top = (0..row.len())
                .max_by(|a, b| row[*a].total_cmp(&row[*b]))
                .unwrap();
            hit += usize::from(top as u32 == *next);
            n += 1;
        }
    }
    (hit, n, worst)
}

/// A Llama-shaped model 256 wide (k-quant blocks are 256 long; the fixtures are 64 wide) with the
/// llama fixture's tokenizer, random weights of the fixtures' scale.
pub fn wide_llama(dir: &std::path::Path) {
    use candle_core::{Device, Tensor};
    let (hidden, inter, layers, vocab) = (256usize, 512usize, 2usize, 1024usize);
    let (heads, kv_heads, head_dim) = (4usize, 2usize, 64usize);
    let dev = Device::Cpu;
    let mut w = std::collections::HashMap::new();
    // seeded, so every run builds the same model
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut put = |name: String, shape: &[usize], std: f32| {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                if std == 0.0 {
                    return 1.0;
                }
                // Box-Muller
                let (u, v): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
                std * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect();
        w.insert(name, Tensor::from_vec(values, shape, &dev).unwrap());
    };
    put("model.embed_tokens.weight".into(), &[vocab, hidden], 1.0);
    put("lm_head.weight".into(), &[vocab, hidden], 0.1);
    put("model.norm.weight".into(), &[hidden], 0.0);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        put(format!("{p}.input_layernorm.weight"), &[hidden], 0.0);
        put(
            format!("{p}.post_attention_layernorm.weight"),
            &[hidden],
            0.0,
        );
        put(
            format!("{p}.self_attn.q_proj.weight"),
            &[heads * head_dim, hidden],
            0.1,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            &[kv_heads * head_dim, hidden],
            0.1,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            &[kv_heads * head_dim, hidden],
            0.1,
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            &[hidden, heads * head_dim],
            0.1,
        );
        put(format!("{p}.mlp.gate_proj.weight"), &[inter, hidden], 0.1);
        put(format!("{p}.mlp.up_proj.weight"), &[inter, hidden], 0.1);
        put(format!("{p}.mlp.down_proj.weight"), &[hidden, inter], 0.1);
    }
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "rms_norm_eps": 1e-6,
        "vocab_size": vocab, "max_position_embeddings": 512, "rope_theta": 10000.0,
        "bos_token_id": 3, "eos_token_id": 6, "tie_word_embeddings": false
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("llama").join(f), dir.join(f)).unwrap();
    }
}
