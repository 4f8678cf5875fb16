//! Multi-head attention over the paged KV cache for a packed, ragged batch: each sequence's new tokens
//! attend causally to its cached context and to each other. GQA, sliding windows, logit soft-capping.
//!
//! Two kernels compute the same thing: candle's fused variable-length CPU flash attention (one call per
//! layer for the whole batch) and a per-sequence matmul/softmax loop that runs on any device and also
//! covers soft-capping. Tests hold them equal.

use candle_core::{DType, Device, Result, Tensor};

use super::batch::BatchLayout;
use super::linear::Linear;
use super::norm::Norm;
use super::rope::Rope;
use crate::engine::kv_cache::KvCache;

#[derive(Debug, Clone)]
pub struct AttentionConfig {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    /// Gemma 2: `tanh(score / cap) * cap` before the softmax.
    pub softcap: Option<f64>,
    /// Keys further back than this many positions are not attended to.
    pub sliding_window: Option<usize>,
}

pub enum QkvProj {
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// One weight, q then k then v (Phi-3, GPT-2).
    Fused(Linear),
}

pub struct Attention {
    pub qkv: QkvProj,
    pub o: Linear,
    /// Per-head RMSNorm of queries and keys (Qwen 3).
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    pub cfg: AttentionConfig,
}

/// Which kernel to use; `Auto` picks the fused one where it applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    Auto,
    Loop,
}

impl Attention {
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = match &mut self.qkv {
            QkvProj::Separate { q, k, v } => vec![q, k, v],
            QkvProj::Fused(l) => vec![l],
        };
        v.push(&mut self.o);
        v
    }

    fn project(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.cfg;
        let n = x.dim(0)?;
        let (q, k, v) = match &self.qkv {
            QkvProj::Separate { q, k, v } => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
            QkvProj::Fused(l) => {
                let qkv = l.forward(x)?;
                let (qs, kvs) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
                (
                    qkv.narrow(1, 0, qs)?,
                    qkv.narrow(1, qs, kvs)?,
                    qkv.narrow(1, qs + kvs, kvs)?,
                )
            }
        };
        Ok((
            q.reshape((n, c.num_heads, c.head_dim))?,
            k.reshape((n, c.num_kv_heads, c.head_dim))?,
            v.reshape((n, c.num_kv_heads, c.head_dim))?,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        layout: &BatchLayout,
        rope: Option<(&Rope, &Tensor, &Tensor)>,
        cache: &KvCache,
        layer: usize,
        kernel: AttentionKernel,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let n = x.dim(0)?;
        let (mut q, mut k, v) = self.project(x)?;
        if let Some(norm) = &self.q_norm {
            q = norm.forward(&q)?;
        }
        if let Some(norm) = &self.k_norm {
            k = norm.forward(&k)?;
        }
        if let Some((rope, cos, sin)) = rope {
            q = rope.apply(&q, cos, sin)?;
            k = rope.apply(&k, cos, sin)?;
        }
        let kv_row = c.num_kv_heads * c.head_dim;
        cache.write(
            layer,
            &layout.write_index,
            &k.reshape((n, kv_row))?,
            &v.reshape((n, kv_row))?,
        )?;
        let (ck, cv) = cache.gather(layer, &layout.gather_slots)?;
        let total = ck.dim(0)?;
        let ck = ck.reshape((total, c.num_kv_heads, c.head_dim))?;
        let cv = cv.reshape((total, c.num_kv_heads, c.head_dim))?;
        let q = q.contiguous()?;
        let out = if kernel == AttentionKernel::Auto && self.fused_applies(&q) {
            self.fused(&q, &ck, &cv, layout)?
        } else {
            self.looped(&q, &ck, &cv, layout)?
        };
        self.o.forward(&out.reshape((n, c.num_heads * c.head_dim))?)
    }

    fn fused_applies(&self, q: &Tensor) -> bool {
        self.cfg.softcap.is_none()
            && matches!(q.device(), Device::Cpu)
            && matches!(q.dtype(), DType::F32 | DType::F16)
    }

    fn fused(&self, q: &Tensor, k: &Tensor, v: &Tensor, layout: &BatchLayout) -> Result<Tensor> {
        let dev = q.device();
        let lens =
            |l: &[usize]| Tensor::from_vec(l.iter().map(|&x| x as u32).collect(), l.len(), dev);
        let max_q = layout.seqlens_q.iter().copied().max().unwrap_or(0);
        let max_k = layout.seqlens_k.iter().copied().max().unwrap_or(0);
        candle_nn::attention::flash_attn_varlen_cpu(
            q,
            &k.contiguous()?,
            &v.contiguous()?,
            None,
            &lens(&layout.seqlens_q)?,
            &lens(&layout.seqlens_k)?,
            max_q,
            max_k,
            self.cfg.scale as f32,
            true,
            self.cfg.sliding_window.map(|w| w.saturating_sub(1)),
            None,
        )
    }

    fn looped(&self, q: &Tensor, k: &Tensor, v: &Tensor, layout: &BatchLayout) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(layout.seqlens_q.len());
        let (mut q_off, mut k_off) = (0, 0);
        for (&lq, &lk) in layout.seqlens_q.iter().zip(&layout.seqlens_k) {
            let qi = q.narrow(0, q_off, lq)?;
            let ki = k.narrow(0, k_off, lk)?;
            let vi = v.narrow(0, k_off, lk)?;
            outs.push(self.one_sequence(&qi, &ki, &vi)?);
            q_off += lq;
            k_off += lk;
        }
        Tensor::cat(&outs, 0)
    }

    /// `q`: `[lq, H, D]` (the last `lq` positions of the `lk`-long context), `k`/`v`: `[lk, KVH, D]`.
    fn one_sequence(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        let (lq, lk) = (q.dim(0)?, k.dim(0)?);
        let rep = c.num_heads / c.num_kv_heads;
        // Group query heads by their kv head so one batched matmul serves GQA without copying keys.
        let qg =
            q.transpose(0, 1)?
                .contiguous()?
                .reshape((c.num_kv_heads, rep * lq, c.head_dim))?;
        let kt = k.transpose(0, 1)?.contiguous()?;
        let vt = v.transpose(0, 1)?.contiguous()?;
        let mut scores = (qg.matmul(&kt.t()?)? * c.scale)?;
        if let Some(cap) = c.softcap {
            scores = ((scores / cap)?.tanh()? * cap)?;
        }
        let scores = scores
            .reshape((c.num_heads, lq, lk))?
            .broadcast_add(&self.mask(lq, lk, q.device(), scores.dtype())?)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
            .to_dtype(vt.dtype())?;
        let out = probs
            .reshape((c.num_kv_heads, rep * lq, lk))?
            .matmul(&vt)?
            .reshape((c.num_heads, lq, c.head_dim))?;
        out.transpose(0, 1)
    }

    fn mask(&self, lq: usize, lk: usize, device: &Device, dtype: DType) -> Result<Tensor> {
        let offset = lk - lq;
        let window = self.cfg.sliding_window.unwrap_or(usize::MAX);
        let mask: Vec<f32> = (0..lq)
            .flat_map(|i| {
                let pos = offset + i;
                (0..lk).map(move |j| {
                    if j > pos || pos - j >= window {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        Tensor::from_vec(mask, (lq, lk), device)?
            .to_dtype(dtype)?
            .unsqueeze(0)
    }
}
