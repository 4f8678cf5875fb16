//! Writes a model of a real checkpoint's shape with random weights (seeded on a GPU), for benchmarks where the
//! shape is what matters and downloading the real weights is not possible (a GPU machine without
//! network): `config.json` and one `model.safetensors`, in the shape's dtype. The tensors are drawn
//! on `DEVICE` (`cuda` on a GPU machine: an 8B model in seconds) and written from there.
//!
//! `cargo run --release --example random_model -- SHAPE OUT_DIR [DTYPE=bf16]`
//!
//! Shapes: `llama-3.1-8b`, `qwen2.5-7b`, `qwen2.5-0.5b`, `smollm2-135m`, `tiny` (a few MiB, for the
//! CPU test of this tool). Weights ~ N(0, 0.02), norms 1: logits are noise, the arithmetic is real.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

/// A decoder's shape (Llama / Qwen2 layout).
struct Shape {
    architecture: &'static str,
    model_type: &'static str,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    rope_theta: f64,
    max_position: usize,
    tied: bool,
    qkv_bias: bool,
}

fn shape(name: &str) -> Result<Shape> {
    let llama = |hidden, intermediate, layers, heads, kv_heads, vocab, tied| Shape {
        architecture: "LlamaForCausalLM",
        model_type: "llama",
        hidden,
        intermediate,
        layers,
        heads,
        kv_heads,
        vocab,
        rope_theta: 500_000.0,
        max_position: 8192,
        tied,
        qkv_bias: false,
    };
    let qwen2 = |hidden, intermediate, layers, heads, kv_heads, vocab, tied| Shape {
        architecture: "Qwen2ForCausalLM",
        model_type: "qwen2",
        rope_theta: 1_000_000.0,
        max_position: 32_768,
        qkv_bias: true,
        ..llama(hidden, intermediate, layers, heads, kv_heads, vocab, tied)
    };
    Ok(match name {
        "llama-3.1-8b" => llama(4096, 14336, 32, 32, 8, 128_256, false),
        "qwen2.5-7b" => qwen2(3584, 18944, 28, 28, 4, 152_064, false),
        "qwen2.5-0.5b" => qwen2(896, 4864, 24, 14, 2, 151_936, true),
        "smollm2-135m" => Shape {
            rope_theta: 100_000.0,
            ..llama(576, 1536, 30, 9, 3, 49_152, true)
        },
        "tiny" => llama(64, 128, 2, 4, 2, 256, false),
        other => bail!(
            "unknown shape {other:?}: llama-3.1-8b, qwen2.5-7b, qwen2.5-0.5b, smollm2-135m or tiny"
        ),
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(name), Some(out)) = (args.get(1), args.get(2)) else {
        bail!("usage: random_model SHAPE OUT_DIR [DTYPE=bf16]")
    };
    let dtype = match args.get(3).map(String::as_str) {
        None | Some("bf16") | Some("bfloat16") => DType::BF16,
        Some("f16") | Some("float16") => DType::F16,
        Some("f32") | Some("float32") => DType::F32,
        Some(other) => bail!("unknown dtype {other:?}: bf16, f16 or f32"),
    };
    let device = match std::env::var("DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0).context("DEVICE=cuda")?,
        _ => Device::Cpu,
    };
    // candle seeds a GPU's generator; the CPU's draws from the thread's own.
    if !device.is_cpu() {
        device.set_seed(42)?;
    }
    let s = shape(name)?;
    let out = Path::new(out);
    std::fs::create_dir_all(out)?;
    let head_dim = s.hidden / s.heads;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut bytes = 0usize;
    let mut put = |name: String, t: Tensor| -> Result<()> {
        bytes += t.elem_count() * dtype.size_in_bytes();
        tensors.insert(name, t.to_dtype(dtype)?);
        Ok(())
    };
    let random = |rows: usize, cols: usize| Tensor::randn(0f32, 0.02, (rows, cols), &device);
    let ones = |n: usize| Tensor::ones(n, DType::F32, &device);
    put(
        "model.embed_tokens.weight".into(),
        random(s.vocab, s.hidden)?,
    )?;
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        let q = s.heads * head_dim;
        let kv = s.kv_heads * head_dim;
        put(format!("{p}.self_attn.q_proj.weight"), random(q, s.hidden)?)?;
        put(
            format!("{p}.self_attn.k_proj.weight"),
            random(kv, s.hidden)?,
        )?;
        put(
            format!("{p}.self_attn.v_proj.weight"),
            random(kv, s.hidden)?,
        )?;
        put(format!("{p}.self_attn.o_proj.weight"), random(s.hidden, q)?)?;
        if s.qkv_bias {
            put(
                format!("{p}.self_attn.q_proj.bias"),
                random(1, q)?.squeeze(0)?,
            )?;
            put(
                format!("{p}.self_attn.k_proj.bias"),
                random(1, kv)?.squeeze(0)?,
            )?;
            put(
                format!("{p}.self_attn.v_proj.bias"),
                random(1, kv)?.squeeze(0)?,
            )?;
        }
        put(
            format!("{p}.mlp.gate_proj.weight"),
            random(s.intermediate, s.hidden)?,
        )?;
        put(
            format!("{p}.mlp.up_proj.weight"),
            random(s.intermediate, s.hidden)?,
        )?;
        put(
            format!("{p}.mlp.down_proj.weight"),
            random(s.hidden, s.intermediate)?,
        )?;
        put(format!("{p}.input_layernorm.weight"), ones(s.hidden)?)?;
        put(
            format!("{p}.post_attention_layernorm.weight"),
            ones(s.hidden)?,
        )?;
    }
    put("model.norm.weight".into(), ones(s.hidden)?)?;
    if !s.tied {
        put("lm_head.weight".into(), random(s.vocab, s.hidden)?)?;
    }
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;
    let config = json!({
        "architectures": [s.architecture],
        "model_type": s.model_type,
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "vocab_size": s.vocab,
        "rms_norm_eps": 1e-6,
        "rope_theta": s.rope_theta,
        "max_position_embeddings": s.max_position,
        "tie_word_embeddings": s.tied,
        "hidden_act": "silu",
        "torch_dtype": match dtype { DType::BF16 => "bfloat16", DType::F16 => "float16", _ => "float32" },
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    println!(
        "{name}: {} tensors, {:.2} GiB of {dtype:?} weights in {}",
        tensors.len(),
        bytes as f64 / (1u64 << 30) as f64,
        out.display()
    );
    Ok(())
}
