//! The decoder-only transformer every supported architecture is an instance of: embeddings, a stack of
//! (norm → attention → norm → MLP) blocks with residuals, a final norm and the LM head. Architecture
//! files only map their config and weight names onto it.

use candle_core::{DType, Result, Tensor};

use super::attention::{Attention, AttentionKernel};
use super::batch::BatchLayout;
use super::linear::Linear;
use super::mlp::Mlp;
use super::norm::Norm;
use super::rope::Rope;
use crate::engine::kv_cache::KvCache;
use crate::engine::models::{CausalLM, ForwardBatch, ModelSpec};

pub struct DecoderLayer {
    pub input_norm: Norm,
    pub attn: Attention,
    /// Gemma 2 normalises the attention output before the residual.
    pub post_attn_norm: Option<Norm>,
    pub pre_mlp_norm: Norm,
    /// Gemma 2 normalises the MLP output before the residual.
    pub post_mlp_norm: Option<Norm>,
    pub mlp: Mlp,
}

impl DecoderLayer {
    fn forward(
        &self,
        x: &Tensor,
        layout: &BatchLayout,
        rope: Option<(&Rope, &Tensor, &Tensor)>,
        cache: &KvCache,
        layer: usize,
        kernel: AttentionKernel,
    ) -> Result<Tensor> {
        let mut h = self.attn.forward(
            &self.input_norm.forward(x)?,
            layout,
            rope,
            cache,
            layer,
            kernel,
        )?;
        if let Some(norm) = &self.post_attn_norm {
            h = norm.forward(&h)?;
        }
        let x = (x + h)?;
        let mut h = self.mlp.forward(&self.pre_mlp_norm.forward(&x)?)?;
        if let Some(norm) = &self.post_mlp_norm {
            h = norm.forward(&h)?;
        }
        x + h
    }
}

pub enum Positions {
    Rope(Rope),
    /// Learned absolute position embeddings `[max_positions, hidden]` (GPT-2).
    Learned(Tensor),
}

pub struct DecoderModel {
    pub embed: Tensor,
    /// Gemma multiplies embeddings by sqrt(hidden).
    pub embed_scale: Option<f64>,
    pub positions: Positions,
    pub layers: Vec<DecoderLayer>,
    pub final_norm: Norm,
    pub lm_head: Linear,
    /// Gemma 2: `tanh(logits / cap) * cap`.
    pub final_softcap: Option<f64>,
    pub spec: ModelSpec,
    pub kernel: AttentionKernel,
}

impl DecoderModel {
    /// Final normed hidden states of the rows the batch asks for.
    fn run(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Tensor> {
        let spec = &self.spec;
        let kv_row = spec.num_kv_heads * spec.head_dim;
        let layout = BatchLayout::new(batch, cache.block_size(), kv_row, &spec.device)?;
        let ids = Tensor::from_slice(&batch.tokens, batch.tokens.len(), &spec.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        if let Some(scale) = self.embed_scale {
            x = (x * scale)?;
        }
        let tables = match &self.positions {
            Positions::Rope(rope) => Some((rope, rope.at(&layout.positions)?)),
            Positions::Learned(table) => {
                x = (x + table.index_select(&layout.positions, 0)?)?;
                None
            }
        };
        let rope = tables.as_ref().map(|(r, (c, s))| (*r, c, s));
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &layout, rope, cache, i, self.kernel)?;
        }
        let x = x.index_select(&layout.output_rows, 0)?;
        self.final_norm.forward(&x)
    }

    /// Every linear layer, for quantization at load.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut all = Vec::new();
        for layer in &mut self.layers {
            all.extend(layer.attn.linears_mut());
            all.extend(layer.mlp.linears_mut());
        }
        all.push(&mut self.lm_head);
        all
    }
}

impl CausalLM for DecoderModel {
    fn forward(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.run(batch, cache)?;
        let mut logits = self.lm_head.forward(&h)?.to_dtype(DType::F32)?;
        if let Some(cap) = self.final_softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        Ok(logits)
    }

    fn hidden_states(&self, batch: &ForwardBatch, cache: &mut KvCache) -> Result<Tensor> {
        self.run(batch, cache)?.to_dtype(DType::F32)
    }

    fn spec(&self) -> &ModelSpec {
        &self.spec
    }
}
