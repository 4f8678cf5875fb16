//! LoRA at a projection: the low-rank products of every adapter in the batch added to the base
//! projection's output, all adapters in one pass. A projection (`LoraSite`) may compute several of
//! PEFT's modules side by side (q/k/v or gate/up fused at load): an adapter's pairs for them stack
//! into one `A` (`[Σr, in]`) and one block-diagonal `B` (`[out, Σr]`). The adapters present in a
//! step are stacked once more along the rank (cached until the set changes), and a 0/1 mask keeps
//! each row to its own adapter's columns: `y += ((x · Aᵀ) ⊙ mask) · Bᵀ`, four operations per
//! projection whatever the number of adapters. Rows of the base model (adapter 0) get nothing added.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{bail, DType, Result, Tensor};

use crate::engine::batch::ForwardBatch;
use crate::engine::lora::LoraPair;

/// Each adapter's columns in a stack: `(id, start, width)`.
type Columns = Vec<(u32, usize, usize)>;

/// Which adapter each row of a forward pass runs with, and the adapters present.
pub(crate) struct LoraRows {
    rows: Vec<u32>,
    active: Vec<u32>,
    /// Masks already built this pass, by column layout (sites of one kind share one).
    masks: RefCell<Vec<(Columns, Tensor)>>,
}

impl LoraRows {
    /// `None` when every row runs the base model (nothing to add anywhere).
    pub(crate) fn new(batch: &ForwardBatch) -> Option<Self> {
        if batch.adapters.iter().all(|&a| a == 0) {
            return None;
        }
        let mut rows = Vec::with_capacity(batch.tokens.len());
        for (i, s) in batch.seqs.iter().enumerate() {
            let a = batch.adapters.get(i).copied().unwrap_or(0);
            rows.extend(std::iter::repeat_n(a, s.num_new));
        }
        let mut active: Vec<u32> = rows.iter().copied().filter(|&a| a != 0).collect();
        active.sort_unstable();
        active.dedup();
        Some(Self {
            rows,
            active,
            masks: RefCell::new(Vec::new()),
        })
    }

    fn mask(&self, cols: &[(u32, usize, usize)], width: usize, like: &Tensor) -> Result<Tensor> {
        if let Some((_, m)) = self.masks.borrow().iter().find(|(c, _)| c == cols) {
            return Ok(m.clone());
        }
        let mut data = vec![0f32; self.rows.len() * width];
        for (r, &a) in self.rows.iter().enumerate() {
            if let Some(&(_, start, w)) = cols.iter().find(|(id, _, _)| *id == a) {
                data[r * width + start..r * width + start + w].fill(1.0);
            }
        }
        let m = Tensor::from_vec(data, (self.rows.len(), width), like.device())?
            .to_dtype(like.dtype())?;
        self.masks.borrow_mut().push((cols.to_vec(), m.clone()));
        Ok(m)
    }
}

/// The adapters present in a step, stacked: `a_t` `[in, W]`, `b_t` `[W, out]`, and each adapter's
/// columns `(id, start, width)`.
#[derive(Clone)]
struct Stacked {
    ids: Vec<u32>,
    a_t: Tensor,
    b_t: Tensor,
    cols: Columns,
}

/// One projection's adapters.
pub(crate) struct LoraSite {
    in_dim: usize,
    /// The PEFT modules this projection computes: (name, first output column, outputs).
    parts: Vec<(&'static str, usize, usize)>,
    /// Per adapter: `A` `[Σr, in]` and block-diagonal `B` `[out, Σr]`, scaling folded in.
    adapters: BTreeMap<u32, (Tensor, Tensor)>,
    stacked: Mutex<Option<Stacked>>,
}

impl LoraSite {
    pub(crate) fn new(in_dim: usize, parts: &[(&'static str, usize)]) -> Self {
        let mut at = 0;
        let parts = parts
            .iter()
            .map(|&(name, n)| {
                at += n;
                (name, at - n, n)
            })
            .collect();
        Self {
            in_dim,
            parts,
            adapters: BTreeMap::new(),
            stacked: Mutex::new(None),
        }
    }

    /// Whether `module` is one of this projection's.
    pub(crate) fn covers(&self, module: &str) -> bool {
        self.parts.iter().any(|(n, _, _)| *n == module)
    }

    fn out_dim(&self) -> usize {
        self.parts.iter().map(|(_, _, n)| n).sum()
    }

    /// An adapter's `A` and `B` for this projection from its pairs (those of modules it covers),
    /// checked against the projection's shape; `None` when the adapter has none here.
    pub(crate) fn prepare(&self, pairs: &[&LoraPair]) -> Result<Option<(Tensor, Tensor)>> {
        let mut a_parts = Vec::new();
        let mut b_cols = Vec::new();
        for (name, start, n) in &self.parts {
            let Some(p) = pairs.iter().find(|p| p.module == *name) else {
                continue;
            };
            let (r, i) = p.a.dims2()?;
            let (o, rb) = p.b.dims2()?;
            if i != self.in_dim || o != *n || rb != r {
                bail!(
                    "layers.{}.{name}: lora_A is [{r}, {i}] and lora_B [{o}, {rb}], but the base \
                     model's {name} maps {} inputs to {n} outputs (an adapter for another base \
                     model?)",
                    p.layer,
                    self.in_dim
                )
            }
            let (dtype, dev) = (p.b.dtype(), p.b.device());
            let mut col = Vec::new();
            if *start > 0 {
                col.push(Tensor::zeros((*start, r), dtype, dev)?);
            }
            col.push(p.b.clone());
            let after = self.out_dim() - start - n;
            if after > 0 {
                col.push(Tensor::zeros((after, r), dtype, dev)?);
            }
            a_parts.push(p.a.clone());
            b_cols.push(Tensor::cat(&col, 0)?);
        }
        if a_parts.is_empty() {
            return Ok(None);
        }
        Ok(Some((
            Tensor::cat(&a_parts, 0)?.contiguous()?,
            Tensor::cat(&b_cols, 1)?.contiguous()?,
        )))
    }

    pub(crate) fn insert(&mut self, id: u32, a_b: (Tensor, Tensor)) {
        self.adapters.insert(id, a_b);
        *self.stacked.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub(crate) fn remove(&mut self, id: u32) {
        self.adapters.remove(&id);
        *self.stacked.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// `y` (the base projection of `x`) plus each row's adapter's low-rank product.
    pub(crate) fn apply(&self, rows: Option<&LoraRows>, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let Some(rows) = rows else {
            return Ok(y);
        };
        let ids: Vec<u32> = rows
            .active
            .iter()
            .copied()
            .filter(|id| self.adapters.contains_key(id))
            .collect();
        if ids.is_empty() {
            return Ok(y);
        }
        let s = self.stacked(ids, x.dtype())?;
        let width = s.cols.iter().map(|c| c.2).sum();
        let t = x.matmul(&s.a_t)?;
        let t = t.broadcast_mul(&rows.mask(&s.cols, width, &t)?)?;
        let d = t.matmul(&s.b_t)?;
        let d = d.to_dtype(y.dtype())?;
        y + d
    }

    fn stacked(&self, ids: Vec<u32>, dtype: DType) -> Result<Stacked> {
        let mut cache = self.stacked.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = cache.as_ref().filter(|s| s.ids == ids) {
            return Ok(s.clone());
        }
        let mut a = Vec::new();
        let mut b = Vec::new();
        let mut cols = Vec::new();
        let mut at = 0;
        for id in &ids {
            let (ai, bi) = &self.adapters[id];
            let w = ai.dim(0)?;
            cols.push((*id, at, w));
            at += w;
            a.push(ai.clone());
            b.push(bi.clone());
        }
        let s = Stacked {
            a_t: Tensor::cat(&a, 0)?.to_dtype(dtype)?.t()?.contiguous()?,
            b_t: Tensor::cat(&b, 1)?.to_dtype(dtype)?.t()?.contiguous()?,
            ids,
            cols,
        };
        *cache = Some(s.clone());
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::batch::{LogitsWanted, SeqInput};
    use candle_core::Device;

    fn pair(module: &str, r: usize, i: usize, o: usize) -> Result<LoraPair> {
        let dev = Device::Cpu;
        Ok(LoraPair {
            layer: 0,
            module: module.into(),
            a: Tensor::randn(0f32, 1.0, (r, i), &dev)?,
            b: Tensor::randn(0f32, 1.0, (o, r), &dev)?,
        })
    }

    fn batch(adapters: &[u32], rows: &[usize]) -> ForwardBatch {
        ForwardBatch {
            tokens: vec![0; rows.iter().sum()],
            seqs: rows
                .iter()
                .map(|&n| SeqInput {
                    context_len: 0,
                    num_new: n,
                    block_table: vec![],
                    logits: LogitsWanted::Last,
                })
                .collect(),
            adapters: adapters.to_vec(),
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Two adapters (one on q and v only) and base rows in one pass: each row gets its own
    /// adapter's `x·Aᵀ·Bᵀ` on its own modules' columns, base rows nothing.
    #[test]
    fn each_row_gets_its_own_adapter_in_one_pass() -> Result<()> {
        let dev = Device::Cpu;
        let mut site = LoraSite::new(8, &[("q_proj", 6), ("k_proj", 4), ("v_proj", 4)]);
        let (q1, k1, v1) = (
            pair("q_proj", 2, 8, 6)?,
            pair("k_proj", 2, 8, 4)?,
            pair("v_proj", 2, 8, 4)?,
        );
        let (q2, v2) = (pair("q_proj", 3, 8, 6)?, pair("v_proj", 3, 8, 4)?);
        let one = site.prepare(&[&q1, &k1, &v1])?.unwrap();
        let two = site.prepare(&[&q2, &v2])?.unwrap();
        site.insert(7, one);
        site.insert(9, two);
        let x = Tensor::randn(0f32, 1.0, (5, 8), &dev)?;
        let y = Tensor::zeros((5, 14), DType::F32, &dev)?;
        let b = batch(&[9, 0, 7], &[2, 1, 2]);
        let rows = LoraRows::new(&b);
        let got = site.apply(rows.as_ref(), &x, y)?;
        let lo = |p: &LoraPair, xr: &Tensor| xr.matmul(&p.a.t()?)?.matmul(&p.b.t()?);
        let zeros = |n: usize| Tensor::zeros((1, n), DType::F32, &dev);
        for r in 0..5 {
            let xr = x.narrow(0, r, 1)?;
            let want = match r {
                0 | 1 => Tensor::cat(&[lo(&q2, &xr)?, zeros(4)?, lo(&v2, &xr)?], 1)?,
                2 => zeros(14)?,
                _ => Tensor::cat(&[lo(&q1, &xr)?, lo(&k1, &xr)?, lo(&v1, &xr)?], 1)?,
            };
            assert!(max_diff(&got.narrow(0, r, 1)?, &want) < 1e-4, "row {r}");
        }
        Ok(())
    }

    #[test]
    fn a_pair_of_the_wrong_shape_is_an_error() -> Result<()> {
        let site = LoraSite::new(8, &[("o_proj", 8)]);
        let e = site
            .prepare(&[&pair("o_proj", 2, 16, 8)?])
            .unwrap_err()
            .to_string();
        assert!(e.contains("another base model"), "{e}");
        assert!(site.prepare(&[&pair("q_proj", 2, 8, 8)?])?.is_none());
        Ok(())
    }
}
