//! The one attention every architecture uses: a packed ragged batch over the paged KV cache. Each
//! sequence attends causally to its cached context plus its own new tokens; grouped-query heads,
//! optional sliding window, logit soft-capping and scale override are parameters.
//!
//! Two interchangeable paths: a per-sequence loop of matmul/softmax (any device, any dtype) and candle's
//! packed CPU flash attention (`flash_attn_varlen_cpu`). Tests hold them to the same results.
//!
//! Over an 8-bit cache (`KV_CACHE_DTYPE`, CPU) the fused kernel reads the codes directly; the loop and
//! the packed path, which serve chunks of more than `FUSED_MAX_NEW` new tokens, multiply a float
//! copy of the sequence's context (its cost shared by the chunk's tokens).

use candle_core::{bail, DType, Device, Result, Tensor};

use super::causal_softmax::CausalSoftmax;
use super::cpu_attention::{PagedAttention, SeqSlots};
use super::kv8::Kv8Rows;
use crate::engine::batch::{ForwardBatch, LogitsWanted};
use crate::engine::kv_cache::{Gather, KvCache, SlotRun};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionImpl {
    /// On CPU in f32, the fused paged kernel for decode steps and short chunks, matmuls for long
    /// chunks; elsewhere the loop.
    #[default]
    Auto,
    /// The per-sequence loop of matmul/softmax (any device, any dtype).
    Loop,
    /// candle's packed CPU flash attention where it applies (CPU, f32/f16, no soft-capping), else the loop.
    Varlen,
    /// The fused paged CPU kernel where it applies (CPU, f32), else the loop.
    Fused,
}

/// Up to this many new tokens per sequence, `Auto` uses the fused CPU kernel: beyond, the per-query
/// dot products lose to gemm.
const FUSED_MAX_NEW: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct AttentionParams {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies q·k (usually `1/sqrt(head_dim)`).
    pub scale: f64,
    /// `cap * tanh(scores / cap)` before the mask (Gemma 2).
    pub softcap: Option<f64>,
    /// Keys further back than this many positions (the query's own included) are masked.
    pub sliding_window: Option<usize>,
}

/// One sequence's place in the packed batch.
#[derive(Debug, Clone)]
pub(crate) struct SeqPlan {
    pub token_start: usize,
    pub num_new: usize,
    pub context_len: usize,
    pub gather: Gather,
    /// Additive causal mask `[num_new, context_len + num_new]`, `None` where nothing is masked (decode).
    mask_full: Option<Tensor>,
    mask_window: Option<Tensor>,
}

/// Everything about a batch that every layer shares, computed once per forward.
#[derive(Debug, Clone)]
pub(crate) struct BatchPlan {
    pub positions: Tensor,
    pub runs: Vec<SlotRun>,
    pub seqs: Vec<SeqPlan>,
    /// Rows of the packed batch whose logits are wanted, in batch order (u32), and how many.
    pub rows: Tensor,
    pub num_rows: usize,
    pub num_tokens: usize,
    window: Option<usize>,
    seqlens: Option<(Tensor, Tensor)>,
    imp: AttentionImpl,
    /// Every sequence's slot per position, for the fused CPU kernel (empty elsewhere).
    slots: Vec<SeqSlots>,
}

impl BatchPlan {
    /// Checks the batch against the cache and lays it out. `window` is the model's sliding window, if
    /// any layer has one; `max_positions` the longest position the model handles.
    pub fn new(
        batch: &ForwardBatch,
        cache: &KvCache,
        window: Option<usize>,
        max_positions: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let bs = cache.block_size();
        let total: usize = batch.seqs.iter().map(|s| s.num_new).sum();
        if total != batch.tokens.len() {
            bail!(
                "batch has {} tokens but its sequences claim {total}",
                batch.tokens.len()
            )
        }
        let mut positions = Vec::with_capacity(total);
        let mut runs = Vec::new();
        let mut seqs = Vec::with_capacity(batch.seqs.len());
        let mut rows = Vec::new();
        let mut slots = Vec::new();
        let mut token_start = 0;
        for (i, s) in batch.seqs.iter().enumerate() {
            let len = s.context_len + s.num_new;
            if s.num_new == 0 {
                bail!("sequence {i} of the batch has no new tokens")
            }
            if len > max_positions {
                bail!("sequence {i} reaches position {len}, beyond the model's {max_positions}")
            }
            if s.block_table.len() * bs < len {
                bail!(
                    "sequence {i}: {} blocks cannot hold {len} tokens",
                    s.block_table.len()
                )
            }
            if let Some(b) = s
                .block_table
                .iter()
                .take(len.div_ceil(bs))
                .find(|b| **b as usize >= cache.num_blocks())
            {
                bail!(
                    "sequence {i}: block {b} outside a cache of {} blocks",
                    cache.num_blocks()
                )
            }
            let slot = |pos: usize| s.block_table[pos / bs] as usize * bs + pos % bs;
            let mut pos = s.context_len;
            while pos < len {
                let run = (bs - pos % bs).min(len - pos);
                runs.push(SlotRun {
                    token_start: token_start + pos - s.context_len,
                    slot_start: slot(pos),
                    len: run,
                });
                pos += run;
            }
            positions.extend((s.context_len..len).map(|p| p as u32));
            let first = slot(0);
            let consecutive =
                (0..len.div_ceil(bs)).all(|b| s.block_table[b] as usize == first / bs + b);
            let gather = if consecutive {
                Gather::Range { start: first, len }
            } else {
                let slots: Vec<u32> = (0..len).map(|p| slot(p) as u32).collect();
                Gather::Slots(Tensor::new(slots, device)?)
            };
            // the fused kernel: a float32 cache, or an 8-bit one whatever the model's dtype
            if device.is_cpu() && (dtype == DType::F32 || cache.format().is_some()) {
                slots.push(SeqSlots {
                    token_start,
                    num_new: s.num_new,
                    context_len: s.context_len,
                    slots: (0..len).map(|p| slot(p) as u32).collect(),
                });
            }
            let mask_full = causal_mask(s.context_len, s.num_new, None, device, dtype)?;
            let mask_window = match window {
                Some(w) => causal_mask(s.context_len, s.num_new, Some(w), device, dtype)?,
                None => None,
            };
            match s.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last => rows.push((token_start + s.num_new - 1) as u32),
                LogitsWanted::All => {
                    rows.extend((token_start..token_start + s.num_new).map(|r| r as u32))
                }
            }
            seqs.push(SeqPlan {
                token_start,
                num_new: s.num_new,
                context_len: s.context_len,
                gather,
                mask_full,
                mask_window,
            });
            token_start += s.num_new;
        }
        let num_rows = rows.len();
        Ok(Self {
            positions: Tensor::new(positions, device)?,
            runs,
            seqs,
            rows: Tensor::new(rows, device)?,
            num_rows,
            num_tokens: total,
            window,
            seqlens: None,
            imp: AttentionImpl::Auto,
            slots,
        })
    }

    /// Chooses the attention path (tests compare them).
    pub(crate) fn with_impl(mut self, imp: AttentionImpl) -> Self {
        self.imp = imp;
        self
    }

    /// The rows of `x` `[tokens, ..]` whose logits are wanted.
    pub(crate) fn select_rows(&self, x: &Tensor) -> Result<Tensor> {
        if self.num_rows == self.num_tokens {
            return Ok(x.clone());
        }
        x.index_select(&self.rows, 0)
    }

    /// Writes this layer's new keys/values into the cache, then attends. `q` `[tokens, heads, head_dim]`,
    /// `k`/`v` `[tokens, kv_heads, head_dim]`; returns `[tokens, heads * head_dim]`.
    pub(crate) fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut KvCache,
        p: &AttentionParams,
    ) -> Result<Tensor> {
        if p.sliding_window.is_some() && p.sliding_window != self.window {
            bail!(
                "attention window {:?} differs from the batch plan's {:?}",
                p.sliding_window,
                self.window
            )
        }
        cache.write(layer, k, v, &self.runs)?;
        let fused_ok =
            !self.slots.is_empty() && (q.dtype() == DType::F32 || cache.format().is_some());
        let varlen_ok = q.device().is_cpu()
            && matches!(q.dtype(), DType::F32 | DType::F16)
            && p.softcap.is_none();
        let short = self.seqs.iter().all(|s| s.num_new <= FUSED_MAX_NEW);
        match self.imp {
            AttentionImpl::Fused if fused_ok => self.attend_fused(layer, q, cache, p),
            AttentionImpl::Auto if fused_ok && short => self.attend_fused(layer, q, cache, p),
            AttentionImpl::Varlen if varlen_ok => self.attend_varlen(layer, q, cache, p),
            _ => self.attend_loop(layer, q, cache, p),
        }
    }

    fn attend_fused(
        &self,
        layer: usize,
        q: &Tensor,
        cache: &KvCache,
        p: &AttentionParams,
    ) -> Result<Tensor> {
        let op = PagedAttention {
            seqs: &self.slots,
            params: *p,
        };
        if let Some((format, eight)) = cache.eight_bit(layer)? {
            let rows = Kv8Rows {
                format,
                layer: eight,
                head_dim: p.head_dim,
            };
            return op.forward_rows(q, &rows);
        }
        let (k, v) = cache.layer_tensors(layer)?;
        op.forward(q, k, v)
    }

    fn attend_loop(
        &self,
        layer: usize,
        q: &Tensor,
        cache: &KvCache,
        p: &AttentionParams,
    ) -> Result<Tensor> {
        let (h, kvh, d) = (p.num_heads, p.num_kv_heads, p.head_dim);
        let g = h / kvh;
        let mut outs = Vec::with_capacity(self.seqs.len());
        for s in &self.seqs {
            let n = s.num_new;
            let l = s.context_len + n;
            let (k, v) = cache.gather(layer, &s.gather)?;
            // cuBLAS wants unit-stride batches; the CPU gemm takes the strided view as is
            let k = if k.device().is_cpu() {
                k
            } else {
                k.contiguous()?
            };
            // [n, kvh*g, d] -> [kvh, g*n, d]: the heads sharing one kv head become rows of one matmul
            let qs = q
                .narrow(0, s.token_start, n)?
                .reshape((n, kvh, g, d))?
                .permute((1, 2, 0, 3))?
                .contiguous()?
                .reshape((kvh, g * n, d))?;
            if q.device().is_cpu() && qs.dtype() == DType::F32 {
                // scale, soft cap, mask and softmax in one pass, in place
                let probs = qs.matmul(&k.t()?)?;
                probs.inplace_op1(&CausalSoftmax {
                    ctx: s.context_len,
                    n,
                    window: p.sliding_window,
                    scale: p.scale as f32,
                    softcap: p.softcap.map(|c| c as f32),
                })?;
                let o = probs.matmul(&v.contiguous()?)?; // [kvh, g*n, d]
                outs.push(
                    o.reshape((kvh, g, n, d))?
                        .permute((2, 0, 1, 3))?
                        .reshape((n, h * d))?,
                );
                continue;
            }
            let mut scores = (qs.matmul(&k.t()?)? * p.scale)?;
            if scores.dtype() != DType::F32 {
                scores = scores.to_dtype(DType::F32)?;
            }
            if let Some(cap) = p.softcap {
                scores = ((scores / cap)?.tanh()? * cap)?;
            }
            let mask = if p.sliding_window.is_some() {
                &s.mask_window
            } else {
                &s.mask_full
            };
            if let Some(m) = mask {
                scores = scores
                    .reshape((kvh, g, n, l))?
                    .broadcast_add(&m.to_dtype(DType::F32)?)?
                    .reshape((kvh, g * n, l))?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
            let o = probs.matmul(&v.contiguous()?)?; // [kvh, g*n, d]
            outs.push(
                o.reshape((kvh, g, n, d))?
                    .permute((2, 0, 1, 3))?
                    .reshape((n, h * d))?,
            );
        }
        if outs.len() == 1 {
            return outs
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("empty batch".into()));
        }
        Tensor::cat(&outs, 0)
    }

    fn attend_varlen(
        &mut self,
        layer: usize,
        q: &Tensor,
        cache: &KvCache,
        p: &AttentionParams,
    ) -> Result<Tensor> {
        let (t, h, d) = q.dims3()?;
        let mut ks = Vec::with_capacity(self.seqs.len());
        let mut vs = Vec::with_capacity(self.seqs.len());
        for s in &self.seqs {
            let (k, v) = cache.gather(layer, &s.gather)?;
            ks.push(k.transpose(0, 1)?);
            vs.push(v.transpose(0, 1)?);
        }
        let k = Tensor::cat(&ks, 0)?.contiguous()?;
        let v = Tensor::cat(&vs, 0)?.contiguous()?;
        if self.seqlens.is_none() {
            let lq: Vec<u32> = self.seqs.iter().map(|s| s.num_new as u32).collect();
            let lk: Vec<u32> = self
                .seqs
                .iter()
                .map(|s| (s.context_len + s.num_new) as u32)
                .collect();
            self.seqlens = Some((Tensor::new(lq, q.device())?, Tensor::new(lk, q.device())?));
        }
        let Some((lq, lk)) = &self.seqlens else {
            bail!("sequence lengths missing")
        };
        let max_q = self.seqs.iter().map(|s| s.num_new).max().unwrap_or(0);
        let max_k = self
            .seqs
            .iter()
            .map(|s| s.context_len + s.num_new)
            .max()
            .unwrap_or(0);
        let out = candle_nn::attention::flash_attn_varlen_cpu(
            &q.contiguous()?,
            &k,
            &v,
            None,
            lq,
            lk,
            max_q,
            max_k,
            p.scale as f32,
            true,
            p.sliding_window.map(|w| w.saturating_sub(1)),
            None,
        )?;
        out.reshape((t, h * d))
    }
}

/// Additive mask for `n` new tokens after `ctx` cached ones: query `i` (position `ctx+i`) sees keys
/// `j <= ctx+i` and, with a window `w`, `j > ctx+i-w`. `None` when nothing would be masked.
fn causal_mask(
    ctx: usize,
    n: usize,
    window: Option<usize>,
    device: &Device,
    dtype: DType,
) -> Result<Option<Tensor>> {
    let l = ctx + n;
    let masked = |i: usize, j: usize| j > ctx + i || window.is_some_and(|w| j + w <= ctx + i);
    if !(0..n).any(|i| (0..l).any(|j| masked(i, j))) {
        return Ok(None);
    }
    let mut m = Vec::with_capacity(n * l);
    for i in 0..n {
        m.extend((0..l).map(|j| if masked(i, j) { f32::NEG_INFINITY } else { 0.0 }));
    }
    Ok(Some(Tensor::from_vec(m, (n, l), device)?.to_dtype(dtype)?))
}

/// `cap * tanh(x / cap)`.
pub(crate) fn softcap(x: &Tensor, cap: f64) -> Result<Tensor> {
    (x / cap)?.tanh()? * cap
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::batch::{ModelSpec, SeqInput};
    use crate::engine::settings::KvCacheDtype;

    fn spec(kv_heads: usize, head_dim: usize, dtype: DType) -> ModelSpec {
        ModelSpec {
            architecture: "test".into(),
            num_layers: 1,
            num_kv_heads: kv_heads,
            head_dim,
            hidden_size: 0,
            vocab_size: 0,
            max_position_embeddings: 4096,
            dtype,
            device: Device::Cpu,
        }
    }

    /// Deterministic values in `[-amp, amp]`.
    fn noise(n: usize, seed: usize, amp: f32) -> Vec<f32> {
        let mut s = (seed as u32).wrapping_mul(2_654_435_761) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 * 2.0 - 1.0) * amp
            })
            .collect()
    }

    /// Two sequences (one with a cached context and scattered blocks, one fresh), a prefill chunk
    /// then a decode step; every step's output of the cache `dtype` on path `imp`.
    fn run(
        model_dtype: DType,
        dtype: KvCacheDtype,
        imp: AttentionImpl,
        (h, kvh, d): (usize, usize, usize),
        p: &AttentionParams,
    ) -> Result<Vec<Vec<f32>>> {
        let dev = Device::Cpu;
        let bs = 4;
        let mut cache = KvCache::with_dtype(&spec(kvh, d, model_dtype), 24, bs, dtype)?;
        let tables = [(0..12u32).rev().collect::<Vec<_>>(), (12..24).collect()];
        let mut outs = Vec::new();
        let mut seen = [0usize, 0];
        for (step, news) in [[19usize, 7], [1, 1], [5, 2], [1, 1]].iter().enumerate() {
            let seqs: Vec<SeqInput> = (0..2)
                .map(|i| SeqInput {
                    context_len: seen[i],
                    num_new: news[i],
                    block_table: tables[i].clone(),
                    logits: LogitsWanted::All,
                })
                .collect();
            let t: usize = news.iter().sum();
            let batch = ForwardBatch {
                tokens: vec![0; t],
                seqs,
                adapters: Vec::new(),
            };
            let q = Tensor::from_vec(noise(t * h * d, 3 * step + 1, 1.0), (t, h, d), &dev)?;
            let k = Tensor::from_vec(noise(t * kvh * d, 3 * step + 2, 3.0), (t, kvh, d), &dev)?;
            let v = Tensor::from_vec(noise(t * kvh * d, 3 * step + 3, 1.0), (t, kvh, d), &dev)?;
            let (q, k, v) = (
                q.to_dtype(model_dtype)?,
                k.to_dtype(model_dtype)?,
                v.to_dtype(model_dtype)?,
            );
            let mut plan =
                BatchPlan::new(&batch, &cache, p.sliding_window, 4096, &dev, model_dtype)?
                    .with_impl(imp);
            let o = plan.attend(0, &q, &k, &v, &mut cache, p)?;
            assert_eq!(o.dtype(), model_dtype);
            outs.push(o.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            for i in 0..2 {
                seen[i] += news[i];
            }
        }
        Ok(outs)
    }

    #[test]
    fn fused_kernel_over_an_8_bit_cache_equals_the_dequantized_reference_on_odd_shapes(
    ) -> Result<()> {
        for (h, kvh, d, window, softcap) in [
            (6, 2, 13, None, None),
            (3, 3, 20, Some(5), None),
            (4, 1, 64, None, Some(3.0)),
            (2, 2, 7, Some(9), Some(2.0)),
        ] {
            let p = AttentionParams {
                num_heads: h,
                num_kv_heads: kvh,
                head_dim: d,
                scale: 1.0 / (d as f64).sqrt(),
                softcap,
                sliding_window: window,
            };
            for dtype in [
                KvCacheDtype::Int8,
                KvCacheDtype::Fp8E4m3,
                KvCacheDtype::Fp8E5m2,
            ] {
                let f32 = DType::F32;
                let fused = run(f32, dtype, AttentionImpl::Fused, (h, kvh, d), &p)?;
                let looped = run(f32, dtype, AttentionImpl::Loop, (h, kvh, d), &p)?;
                let float = run(
                    f32,
                    KvCacheDtype::Auto,
                    AttentionImpl::Loop,
                    (h, kvh, d),
                    &p,
                )?;
                // a bfloat16 model reads the 8-bit cache through the same fused kernel
                let bf16 = run(DType::BF16, dtype, AttentionImpl::Auto, (h, kvh, d), &p)?;
                // bound on the quantization error, relative to the output's size
                let bound = match dtype {
                    KvCacheDtype::Int8 => 0.03,
                    KvCacheDtype::Fp8E4m3 => 0.12,
                    _ => 0.25,
                };
                for (a, c) in bf16.iter().zip(&float) {
                    let size = c.iter().map(|x| x.abs()).fold(0f32, f32::max);
                    let err = a
                        .iter()
                        .zip(c)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max);
                    // bfloat16 rounds inputs and output to 8 bits of mantissa besides
                    assert!(
                        err < (bound + 0.03) * size,
                        "{dtype:?} bf16: {err} of {size}"
                    );
                }
                for (step, ((a, b), c)) in fused.iter().zip(&looped).zip(&float).enumerate() {
                    let exact = a
                        .iter()
                        .zip(b)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        exact < 1e-5,
                        "{dtype:?} {h}/{kvh}x{d} step {step}: fused vs dequantized {exact}"
                    );
                    let size = c.iter().map(|x| x.abs()).fold(0f32, f32::max);
                    let err = a
                        .iter()
                        .zip(c)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max);
                    assert!(err > 0.0, "{dtype:?}: no quantization at all?");
                    assert!(
                        err < bound * size,
                        "{dtype:?} {h}/{kvh}x{d} step {step}: {err} of {size}"
                    );
                }
            }
        }
        Ok(())
    }
}
