//! The decoder shared by the Llama family (Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3, SmolLM3, OLMo 2,
//! Granite, and the mixtures of experts Mixtral and Qwen2/3-MoE): they differ only in the switches of
//! [`DecoderConfig`], which each architecture's file fills from its config.json. Weight names follow the HF layout `model.layers.N.{self_attn,mlp}.*`.

use crate::engine::layers::Weights;
use candle_core::{bail, DType, Device, Result, Tensor};

use super::CausalLM;
use crate::engine::batch::{ForwardBatch, ModelSpec};
use crate::engine::kv_cache::KvCache;
use crate::engine::layers::attention::softcap;
use crate::engine::layers::lora::{LoraRows, LoraSite};
use crate::engine::layers::{
    Activation, AttentionImpl, AttentionParams, BatchPlan, Embedding, FeedForward, GatedMlp,
    Linear, MoeConfig, Norm, Rope, RopeConfig, SparseMoe,
};
use crate::engine::lora::LoraWeights;

#[derive(Debug, Clone)]
pub(crate) struct DecoderConfig {
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub norm_eps: f64,
    /// Gemma: RMSNorm scales by `1 + w`.
    pub norm_plus_one: bool,
    pub tie_word_embeddings: bool,
    pub rope: RopeConfig,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3: RMSNorm over each head of q and k before RoPE.
    pub qk_norm: bool,
    /// Phi-3: one `qkv_proj` and one `gate_up_proj` weight.
    pub fused_weights: bool,
    pub activation: Activation,
    /// Gemma 2: norms after attention and MLP too (`post_attention_layernorm`, `pre_feedforward_layernorm`,
    /// `post_feedforward_layernorm`).
    pub sandwich_norms: bool,
    /// Gemma: embeddings multiplied by `sqrt(hidden_size)`.
    pub embed_scale: Option<f64>,
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    pub attn_scale: f64,
    /// Per layer: its sliding window, if any.
    pub layer_windows: Vec<Option<usize>>,
    /// Gemma 3: the RoPE of the sliding-window layers, when it differs from `rope`.
    pub rope_local: Option<RopeConfig>,
    /// Where `embed_tokens`, `layers` and `norm` live (`model`), and the output head (`lm_head`).
    pub prefix: String,
    pub lm_head_prefix: String,
    /// Mixtral, Qwen-MoE: the layers whose feed-forward is a mixture of experts.
    pub moe: Option<MoeConfig>,
    /// SmolLM3: per layer, true where it uses no RoPE (missing entries use it).
    pub no_rope_layers: Vec<bool>,
    /// OLMo 2: no norm before attention and MLP, one after each (`post_attention_layernorm`,
    /// `post_feedforward_layernorm`).
    pub post_norms_only: bool,
    /// OLMo 2: the q and k norms span the whole projection, not each head.
    pub qk_norm_whole: bool,
    /// Granite: attention and MLP outputs scaled by this before the residual add.
    pub residual_scale: Option<f64>,
    /// Granite: logits divided by this (`logits_scaling`).
    pub logits_divisor: Option<f64>,
}

impl DecoderConfig {
    fn window(&self) -> Result<Option<usize>> {
        let mut ws: Vec<usize> = self.layer_windows.iter().flatten().copied().collect();
        ws.dedup();
        match ws.as_slice() {
            [] => Ok(None),
            [w] => Ok(Some(*w)),
            _ => bail!("several different sliding windows are not supported"),
        }
    }
}

struct Layer {
    input_norm: Option<Norm>,
    qkv: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    o_proj: Linear,
    post_attn_norm: Option<Norm>,
    pre_mlp_norm: Option<Norm>,
    mlp: FeedForward,
    post_mlp_norm: Option<Norm>,
    attn: AttentionParams,
    /// LoRA adapters at qkv, o, gate/up and down.
    lora: [LoraSite; 4],
    rope: bool,
    qk_norm_whole: bool,
    residual_scale: Option<f64>,
}

pub(crate) struct DecoderModel {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Norm,
    lm_head: Linear,
    rope: Rope,
    rope_local: Option<Rope>,
    cfg: DecoderConfig,
    window: Option<usize>,
    spec: ModelSpec,
    attention_impl: AttentionImpl,
}

fn load_norm(vb: &Weights, cfg: &DecoderConfig, size: usize) -> Result<Norm> {
    if cfg.norm_plus_one {
        Norm::rms_plus_one(vb, size, cfg.norm_eps)
    } else {
        Norm::rms(vb, size, cfg.norm_eps)
    }
}

impl Layer {
    fn load(vb: &Weights, cfg: &DecoderConfig, idx: usize) -> Result<Self> {
        let (hs, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let att = vb.pp("self_attn");
        let qkv = if cfg.fused_weights {
            att.pp("qkv_proj")
                .linear(hs, q_out + 2 * kv_out, cfg.qkv_bias)?
        } else {
            Linear::fuse(&[
                att.pp("q_proj").linear(hs, q_out, cfg.qkv_bias)?,
                att.pp("k_proj").linear(hs, kv_out, cfg.qkv_bias)?,
                att.pp("v_proj").linear(hs, kv_out, cfg.qkv_bias)?,
            ])?
        };
        let (q_norm, k_norm) = if cfg.qk_norm && cfg.qk_norm_whole {
            (
                Some(load_norm(&att.pp("q_norm"), cfg, q_out)?),
                Some(load_norm(&att.pp("k_norm"), cfg, kv_out)?),
            )
        } else if cfg.qk_norm {
            (
                Some(load_norm(&att.pp("q_norm"), cfg, hd)?),
                Some(load_norm(&att.pp("k_norm"), cfg, hd)?),
            )
        } else {
            (None, None)
        };
        let mlp_vb = vb.pp("mlp");
        let mlp = match &cfg.moe {
            Some(moe) if moe.sparse_layers.get(idx) == Some(&true) => FeedForward::Sparse(
                SparseMoe::load(&vb.pp(&moe.module), hs, moe, cfg.activation)?,
            ),
            _ if cfg.fused_weights => FeedForward::Dense(GatedMlp::load_fused(
                &mlp_vb,
                hs,
                cfg.intermediate_size,
                cfg.activation,
            )?),
            _ => FeedForward::Dense(GatedMlp::load(
                &mlp_vb,
                hs,
                cfg.intermediate_size,
                cfg.mlp_bias,
                cfg.activation,
            )?),
        };
        let norm = |name: &str| load_norm(&vb.pp(name), cfg, hs);
        let (post_attn_norm, pre_mlp_norm, post_mlp_norm) = if cfg.sandwich_norms {
            (
                Some(norm("post_attention_layernorm")?),
                Some(norm("pre_feedforward_layernorm")?),
                Some(norm("post_feedforward_layernorm")?),
            )
        } else if cfg.post_norms_only {
            (
                Some(norm("post_attention_layernorm")?),
                None,
                Some(norm("post_feedforward_layernorm")?),
            )
        } else {
            (None, Some(norm("post_attention_layernorm")?), None)
        };
        let i = cfg.intermediate_size;
        let lora = if cfg.fused_weights {
            [
                LoraSite::new(hs, &[("qkv_proj", q_out + 2 * kv_out)]),
                LoraSite::new(q_out, &[("o_proj", hs)]),
                LoraSite::new(hs, &[("gate_up_proj", 2 * i)]),
                LoraSite::new(i, &[("down_proj", hs)]),
            ]
        } else {
            [
                LoraSite::new(
                    hs,
                    &[("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)],
                ),
                LoraSite::new(q_out, &[("o_proj", hs)]),
                LoraSite::new(hs, &[("gate_proj", i), ("up_proj", i)]),
                LoraSite::new(i, &[("down_proj", hs)]),
            ]
        };
        Ok(Self {
            lora,
            input_norm: if cfg.post_norms_only {
                None
            } else {
                Some(norm("input_layernorm")?)
            },
            qkv,
            q_norm,
            k_norm,
            o_proj: att.pp("o_proj").linear(q_out, hs, cfg.o_bias)?,
            post_attn_norm,
            pre_mlp_norm,
            mlp,
            post_mlp_norm,
            attn: AttentionParams {
                num_heads: cfg.num_heads,
                num_kv_heads: cfg.num_kv_heads,
                head_dim: hd,
                scale: cfg.attn_scale,
                softcap: cfg.attn_softcap,
                sliding_window: cfg.layer_windows.get(idx).copied().flatten(),
            },
            rope: cfg.no_rope_layers.get(idx) != Some(&true),
            qk_norm_whole: cfg.qk_norm_whole,
            residual_scale: cfg.residual_scale,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        idx: usize,
        x: &Tensor,
        rope: &Rope,
        cos: &Tensor,
        sin: &Tensor,
        plan: &mut BatchPlan,
        cache: &mut KvCache,
        lora: Option<&LoraRows>,
    ) -> Result<Tensor> {
        let t = x.dim(0)?;
        let (h, kvh, d) = (
            self.attn.num_heads,
            self.attn.num_kv_heads,
            self.attn.head_dim,
        );
        let xn = match &self.input_norm {
            Some(n) => n.forward(x)?,
            None => x.clone(),
        };
        let qkv = self.lora[0].apply(lora, &xn, self.qkv.forward(&xn)?)?;
        let v = qkv
            .narrow(1, (h + kvh) * d, kvh * d)?
            .reshape((t, kvh, d))?;
        let (q, k) = if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            let (q, k) = (qkv.narrow(1, 0, h * d)?, qkv.narrow(1, h * d, kvh * d)?);
            let (q, k) = if self.qk_norm_whole {
                (
                    qn.forward(&q)?.reshape((t, h, d))?,
                    kn.forward(&k)?.reshape((t, kvh, d))?,
                )
            } else {
                (
                    qn.forward(&q.reshape((t, h, d))?)?,
                    kn.forward(&k.reshape((t, kvh, d))?)?,
                )
            };
            if self.rope {
                (rope.apply(&q, cos, sin)?, rope.apply(&k, cos, sin)?)
            } else {
                (q, k)
            }
        } else {
            // q and k heads rotated by one op
            let qk = qkv.narrow(1, 0, (h + kvh) * d)?.reshape((t, h + kvh, d))?;
            let qk = if self.rope {
                rope.apply(&qk, cos, sin)?
            } else {
                qk
            };
            (qk.narrow(1, 0, h)?, qk.narrow(1, h, kvh)?)
        };
        let a = plan.attend(idx, &q, &k, &v, cache, &self.attn)?;
        let mut a = self.lora[1].apply(lora, &a, self.o_proj.forward(&a)?)?;
        if let Some(n) = &self.post_attn_norm {
            a = n.forward(&a)?;
        }
        if let Some(s) = self.residual_scale {
            a = (a * s)?;
        }
        let x = (x + a)?;
        let h = match &self.pre_mlp_norm {
            Some(n) => n.forward(&x)?,
            None => x.clone(),
        };
        let mut m = match (lora, &self.mlp) {
            (Some(_), FeedForward::Dense(mlp)) => {
                mlp.forward_with(&h, |p, i, y| self.lora[2 + p].apply(lora, i, y))?
            }
            _ => self.mlp.forward(&h)?,
        };
        if let Some(n) = &self.post_mlp_norm {
            m = n.forward(&m)?;
        }
        if let Some(s) = self.residual_scale {
            m = (m * s)?;
        }
        x + m
    }
}

impl DecoderModel {
    /// `max_positions`: the longest sequence the engine will run (RoPE tables are built that far).
    pub fn load(vb: Weights, cfg: DecoderConfig, max_positions: usize) -> Result<Self> {
        if cfg.num_heads == 0
            || cfg.num_kv_heads == 0
            || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads)
        {
            bail!(
                "{} attention heads cannot be grouped over {} key/value heads",
                cfg.num_heads,
                cfg.num_kv_heads
            )
        }
        let window = cfg.window()?;
        let m = vb.pp(&cfg.prefix);
        let embed = m
            .pp("embed_tokens")
            .embedding(cfg.vocab_size, cfg.hidden_size)?;
        let layers = (0..cfg.num_layers)
            .map(|i| Layer::load(&m.pp(format!("layers.{i}")), &cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = load_norm(&m.pp("norm"), &cfg, cfg.hidden_size)?;
        let head = vb.pp(&cfg.lm_head_prefix);
        let lm_head = if cfg.tie_word_embeddings || !head.contains_tensor("weight") {
            vb.tied_lm_head(&embed)?
        } else {
            head.lm_head(cfg.hidden_size, cfg.vocab_size)?
        };
        let rope_of =
            |r: &RopeConfig| Rope::new(r, cfg.head_dim, max_positions, vb.dtype(), vb.device());
        let rope = rope_of(&cfg.rope)?;
        let rope_local = cfg.rope_local.as_ref().map(rope_of).transpose()?;
        let spec = ModelSpec {
            architecture: cfg.architecture.clone(),
            num_layers: cfg.num_layers,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            hidden_size: cfg.hidden_size,
            vocab_size: cfg.vocab_size,
            max_position_embeddings: cfg.max_position_embeddings,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        };
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
            rope,
            rope_local,
            cfg,
            window,
            spec,
            attention_impl: AttentionImpl::Auto,
        })
    }

    fn run(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Tensor> {
        let device: &Device = &self.spec.device;
        let mut plan = BatchPlan::new(
            batch,
            cache,
            self.window,
            self.rope.max_positions(),
            device,
            self.spec.dtype,
        )?
        .with_impl(self.attention_impl);
        let ids = super::token_tensor(&batch.tokens, self.cfg.vocab_size, device)?;
        let lora = LoraRows::new(batch);
        let mut x = self.embed.forward(&ids)?;
        if let Some(s) = self.cfg.embed_scale {
            // the reference rounds the scale to the model's dtype first
            let s = Tensor::new(s as f32, device)?.to_dtype(self.spec.dtype)?;
            x = x.broadcast_mul(&s)?;
        }
        let global = self.rope.tables(&plan.positions)?;
        let local = match &self.rope_local {
            Some(r) => Some((r, r.tables(&plan.positions)?)),
            None => None,
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let (rope, (cos, sin)) = match &local {
                Some((r, tables)) if layer.attn.sliding_window.is_some() => (*r, tables),
                _ => (&self.rope, &global),
            };
            x = layer.forward(i, &x, rope, cos, sin, &mut plan, cache, lora.as_ref())?;
        }
        if plan.num_rows == 0 {
            return Tensor::zeros((0, self.cfg.hidden_size), self.spec.dtype, device);
        }
        self.norm.forward(&plan.select_rows(&x)?)
    }
}

impl CausalLM for DecoderModel {
    fn forward(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.run(batch, cache)?;
        if h.dim(0)? == 0 {
            return Tensor::zeros((0, self.cfg.vocab_size), DType::F32, &self.spec.device);
        }
        let mut logits = self.lm_head.forward(&h)?;
        if let Some(cap) = self.cfg.final_softcap {
            logits = softcap(&logits, cap)?;
        }
        if let Some(div) = self.cfg.logits_divisor {
            logits = (logits / div)?;
        }
        logits.to_dtype(DType::F32)
    }

    fn hidden_states(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Tensor> {
        self.run(batch, cache)
    }

    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn set_attention_impl(&mut self, imp: AttentionImpl) {
        self.attention_impl = imp;
    }

    fn add_adapter(&mut self, id: u32, weights: &LoraWeights) -> Result<()> {
        let n = self.layers.len();
        let mut ready = Vec::new();
        for p in &weights.pairs {
            let Some(layer) = self.layers.get(p.layer) else {
                bail!(
                    "the adapter has weights for layer {} but the base model has {n} layers \
                     (an adapter for another base model?)",
                    p.layer
                )
            };
            if !layer.lora.iter().any(|s| s.covers(&p.module)) {
                bail!(
                    "the adapter targets `{}`, which is not a projection of this {} model \
                     (an adapter for another base model?)",
                    p.module,
                    self.cfg.architecture
                )
            }
            if matches!(layer.mlp, FeedForward::Sparse(_))
                && layer.lora[2..].iter().any(|s| s.covers(&p.module))
            {
                bail!(
                    "the adapter targets `{}` in layer {}, a mixture-of-experts layer: LoRA on                      experts is not supported (attention projections are)",
                    p.module,
                    p.layer
                )
            }
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let pairs: Vec<_> = weights.pairs.iter().filter(|p| p.layer == li).collect();
            for (si, site) in layer.lora.iter().enumerate() {
                if let Some(ab) = site.prepare(&pairs)? {
                    ready.push((li, si, ab));
                }
            }
        }
        for (li, si, ab) in ready {
            self.layers[li].lora[si].insert(id, ab);
        }
        Ok(())
    }

    fn remove_adapter(&mut self, id: u32) {
        for layer in &mut self.layers {
            for site in &mut layer.lora {
                site.remove(id);
            }
        }
    }
}

/// The config.json fields the Llama family shares, with the defaults transformers uses.
#[derive(Debug, Clone, serde::Deserialize)]
pub(crate) struct BaseConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    pub sliding_window: Option<usize>,
    pub layer_types: Option<Vec<String>>,
}

fn default_max_positions() -> usize {
    2048
}

fn default_eps() -> f64 {
    1e-6
}

fn default_act() -> String {
    "silu".into()
}

impl BaseConfig {
    pub fn parse(config: &serde_json::Value) -> Result<Self> {
        serde_json::from_value(config.clone())
            .map_err(|e| candle_core::Error::Msg(format!("config.json: {e}")))
    }

    /// A plain Llama-style decoder; architectures adjust the switches that differ.
    pub fn decoder(&self, architecture: &str, config: &serde_json::Value) -> Result<DecoderConfig> {
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        Ok(DecoderConfig {
            architecture: architecture.to_string(),
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings,
            norm_eps: self.rms_norm_eps,
            norm_plus_one: false,
            tie_word_embeddings: self.tie_word_embeddings,
            rope: RopeConfig::from_config(config, 10000.0)?,
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            qk_norm: false,
            fused_weights: false,
            activation: Activation::from_name(&self.hidden_act)?,
            sandwich_norms: false,
            embed_scale: None,
            attn_softcap: None,
            final_softcap: None,
            attn_scale: 1.0 / (head_dim as f64).sqrt(),
            layer_windows: self.layer_windows(false),
            rope_local: None,
            prefix: "model".into(),
            lm_head_prefix: "lm_head".into(),
            moe: None,
            no_rope_layers: Vec::new(),
            post_norms_only: false,
            qk_norm_whole: false,
            residual_scale: None,
            logits_divisor: None,
        })
    }

    /// Sliding windows per layer: from `layer_types` when given, else the window on every layer
    /// (`all_by_default`) or none.
    pub(crate) fn layer_windows(&self, all_by_default: bool) -> Vec<Option<usize>> {
        let n = self.num_hidden_layers;
        match (&self.layer_types, self.sliding_window) {
            (_, None) => vec![None; n],
            (Some(types), Some(w)) => (0..n)
                .map(|i| {
                    (types.get(i).map(String::as_str) == Some("sliding_attention")).then_some(w)
                })
                .collect(),
            (None, Some(w)) => vec![all_by_default.then_some(w); n],
        }
    }
}
