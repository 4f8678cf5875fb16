//! Model architectures, one file each, over the shared layers in `super::layers`. A model is a pure
//! function of (tokens, positions, KV cache): it owns no cache and no sequence state, so the scheduler can
//! pack any mix of prefill chunks and decodes into one forward pass.

use candle_core::{bail, Device, Result, Tensor};
use serde_json::Value;

use super::batch::{ForwardBatch, ModelSpec};
use super::kv_cache::KvCache;
use super::layers::AttentionImpl;
use super::layers::Weights;
use super::lora::LoraWeights;

pub mod bert;
pub mod decoder;
pub mod gemma2;
pub mod gemma3;
pub mod gpt2;
pub mod granite;
pub mod llama;
pub mod mistral;
pub mod mixtral;
pub mod olmo2;
pub mod phi3;
pub mod qwen2;
pub mod qwen2_moe;
pub mod qwen3;
pub mod qwen3_moe;
pub mod smollm3;

pub trait CausalLM: Send {
    /// Runs the batch, writing its keys and values into `cache`, and returns float32 logits
    /// `[rows, vocab]`: the rows each sequence asked for, in batch order.
    fn forward(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Tensor>;

    /// The final (normed) hidden states of the rows asked for, `[rows, hidden]`, for decoder models used
    /// as embedders (last-token pooling).
    fn hidden_states(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Tensor>;

    fn spec(&self) -> &ModelSpec;

    /// Picks the attention path (the default chooses per batch; tests force the portable loop to
    /// compare the two).
    fn set_attention_impl(&mut self, _imp: AttentionImpl) {}

    /// Adds LoRA adapter `id` (its pairs checked against the projections' shapes); sequences of the
    /// batch that name `id` run with it.
    fn add_adapter(&mut self, _id: u32, _weights: &LoraWeights) -> Result<()> {
        bail!("LoRA adapters are supported on the Llama-family decoders (Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3) only")
    }

    /// Forgets adapter `id`.
    fn remove_adapter(&mut self, _id: u32) {}
}

/// The causal architectures this build runs: (config.json `architectures` entry, `model_type`).
pub(crate) const SUPPORTED_ARCHITECTURES: &[(&str, &str)] = &[
    ("LlamaForCausalLM", "llama"),
    ("MistralForCausalLM", "mistral"),
    ("Qwen2ForCausalLM", "qwen2"),
    ("Qwen3ForCausalLM", "qwen3"),
    ("Phi3ForCausalLM", "phi3"),
    ("Gemma2ForCausalLM", "gemma2"),
    ("Gemma3ForCausalLM", "gemma3_text"),
    ("Gemma3ForConditionalGeneration", "gemma3"),
    ("GPT2LMHeadModel", "gpt2"),
    ("MixtralForCausalLM", "mixtral"),
    ("Qwen2MoeForCausalLM", "qwen2_moe"),
    ("Qwen3MoeForCausalLM", "qwen3_moe"),
    ("SmolLM3ForCausalLM", "smollm3"),
    ("Olmo2ForCausalLM", "olmo2"),
    ("GraniteForCausalLM", "granite"),
];

pub(crate) use gemma3::text_config;

/// The supported architecture a config.json names (by `architectures`, else `model_type`), or an error
/// listing the supported ones.
pub(crate) fn causal_architecture(config: &Value) -> Result<&'static str> {
    let named: Vec<&str> = config
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let model_type = config.get("model_type").and_then(Value::as_str);
    for (arch, mt) in SUPPORTED_ARCHITECTURES {
        if named.contains(arch) || (named.is_empty() && model_type == Some(*mt)) {
            return Ok(arch);
        }
    }
    let what = match (named.first(), model_type) {
        (Some(a), _) => a.to_string(),
        (None, Some(m)) => format!("model_type `{m}`"),
        (None, None) => "a config.json without `architectures` or `model_type`".to_string(),
    };
    let list: Vec<&str> = SUPPORTED_ARCHITECTURES.iter().map(|(a, _)| *a).collect();
    bail!(
        "unsupported model architecture {what}; supported: {}",
        list.join(", ")
    )
}

/// Builds the model config.json describes from the weights in `vb`. `max_positions` bounds the
/// sequence length (RoPE tables are built that far).
pub(crate) fn load_causal_model(
    config: &Value,
    vb: Weights,
    max_positions: usize,
) -> Result<Box<dyn CausalLM>> {
    Ok(match causal_architecture(config)? {
        "LlamaForCausalLM" => Box::new(llama::load(vb, config, max_positions)?),
        "MistralForCausalLM" => Box::new(mistral::load(vb, config, max_positions)?),
        "Qwen2ForCausalLM" => Box::new(qwen2::load(vb, config, max_positions)?),
        "Qwen3ForCausalLM" => Box::new(qwen3::load(vb, config, max_positions)?),
        "Phi3ForCausalLM" => Box::new(phi3::load(vb, config, max_positions)?),
        "Gemma2ForCausalLM" => Box::new(gemma2::load(vb, config, max_positions)?),
        "Gemma3ForCausalLM" | "Gemma3ForConditionalGeneration" => {
            Box::new(gemma3::load(vb, config, max_positions)?)
        }
        "GPT2LMHeadModel" => Box::new(gpt2::load(vb, config, max_positions)?),
        "MixtralForCausalLM" => Box::new(mixtral::load(vb, config, max_positions)?),
        "Qwen2MoeForCausalLM" => Box::new(qwen2_moe::load(vb, config, max_positions)?),
        "Qwen3MoeForCausalLM" => Box::new(qwen3_moe::load(vb, config, max_positions)?),
        "SmolLM3ForCausalLM" => Box::new(smollm3::load(vb, config, max_positions)?),
        "Olmo2ForCausalLM" => Box::new(olmo2::load(vb, config, max_positions)?),
        "GraniteForCausalLM" => Box::new(granite::load(vb, config, max_positions)?),
        other => bail!("architecture {other} is listed as supported but has no loader"),
    })
}

/// The batch's token ids as a tensor, checked against the vocabulary.
pub(crate) fn token_tensor(tokens: &[u32], vocab_size: usize, device: &Device) -> Result<Tensor> {
    if let Some(t) = tokens.iter().find(|t| **t as usize >= vocab_size) {
        bail!("token id {t} outside the vocabulary of {vocab_size}")
    }
    Tensor::new(tokens, device)
}
