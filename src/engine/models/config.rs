//! `config.json` as Hugging Face writes it, read leniently: field names vary across architectures and
//! transformers versions (`n_embd` / `hidden_size`, `rope_theta` at the top or in `rope_parameters`).

use anyhow::{anyhow, Context};
use serde_json::Value;

use crate::engine::layers::{Activation, RopeScaling};

pub struct HfConfig {
    raw: Value,
}

impl HfConfig {
    pub fn new(raw: Value) -> Self {
        Self { raw }
    }

    pub fn raw(&self) -> &Value {
        &self.raw
    }

    fn first(&self, keys: &[&str]) -> Option<&Value> {
        keys.iter()
            .filter_map(|k| self.raw.get(*k))
            .find(|v| !v.is_null())
    }

    pub fn opt_usize(&self, keys: &[&str]) -> Option<usize> {
        self.first(keys)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
    }

    pub fn usize(&self, keys: &[&str]) -> anyhow::Result<usize> {
        self.opt_usize(keys)
            .ok_or_else(|| anyhow!("config.json lacks {}", keys.join(" / ")))
    }

    pub fn opt_f64(&self, keys: &[&str]) -> Option<f64> {
        self.first(keys).and_then(|v| v.as_f64())
    }

    pub fn bool(&self, key: &str, default: bool) -> bool {
        self.first(&[key])
            .and_then(|v| v.as_bool())
            .unwrap_or(default)
    }

    pub fn str(&self, keys: &[&str]) -> Option<&str> {
        self.first(keys).and_then(|v| v.as_str())
    }

    pub fn hidden_size(&self) -> anyhow::Result<usize> {
        self.usize(&["hidden_size", "n_embd", "d_model"])
    }

    pub fn num_layers(&self) -> anyhow::Result<usize> {
        self.usize(&["num_hidden_layers", "n_layer"])
    }

    pub fn num_heads(&self) -> anyhow::Result<usize> {
        self.usize(&["num_attention_heads", "n_head"])
    }

    pub fn num_kv_heads(&self) -> anyhow::Result<usize> {
        match self.opt_usize(&["num_key_value_heads"]) {
            Some(n) => Ok(n),
            None => self.num_heads(),
        }
    }

    pub fn head_dim(&self) -> anyhow::Result<usize> {
        match self.opt_usize(&["head_dim"]) {
            Some(d) => Ok(d),
            None => Ok(self.hidden_size()? / self.num_heads()?),
        }
    }

    pub fn vocab_size(&self) -> anyhow::Result<usize> {
        self.usize(&["vocab_size"])
    }

    pub fn max_position_embeddings(&self) -> anyhow::Result<usize> {
        self.usize(&["max_position_embeddings", "n_positions", "n_ctx"])
    }

    pub fn eps(&self) -> f64 {
        self.opt_f64(&["rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps"])
            .unwrap_or(1e-5)
    }

    pub fn tie_word_embeddings(&self, default: bool) -> bool {
        self.bool("tie_word_embeddings", default)
    }

    /// The RoPE parameters, whichever layout the checkpoint uses.
    fn rope_parameters(&self) -> Option<&Value> {
        self.first(&["rope_parameters", "rope_scaling"])
    }

    pub fn rope_theta(&self) -> f64 {
        self.opt_f64(&["rope_theta"])
            .or_else(|| {
                self.rope_parameters()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(10_000.0)
    }

    pub fn rope_scaling(&self) -> anyhow::Result<RopeScaling> {
        RopeScaling::from_config(self.rope_parameters()).map_err(|e| anyhow!(e))
    }

    pub fn partial_rotary_factor(&self) -> f64 {
        self.opt_f64(&["partial_rotary_factor"])
            .or_else(|| {
                self.rope_parameters()
                    .and_then(|p| p.get("partial_rotary_factor"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(1.0)
    }

    pub fn activation(&self, default: &str) -> anyhow::Result<Activation> {
        let name = self
            .str(&["hidden_activation", "hidden_act", "activation_function"])
            .unwrap_or(default);
        Activation::from_name(name).with_context(|| format!("unsupported activation '{name}'"))
    }

    pub fn sliding_window(&self) -> Option<usize> {
        self.opt_usize(&["sliding_window"])
    }
}
