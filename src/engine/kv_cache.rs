//! The paged KV cache: per layer, one key and one value tensor of `num_blocks * block_size` slots.
//! Owned by the scheduler; models write new keys/values into slots and gather a sequence's slots back
//! through its block table.
//!
//! Layout per layer: `[kv_heads, slots, head_dim]`. Heads first so that a sequence whose blocks are
//! consecutive (the common case with a fresh allocator) is read back as a zero-copy `narrow`, already in
//! the `[kv_heads, len, head_dim]` shape attention multiplies with.

use candle_core::{bail, Result, Tensor};

use super::batch::ModelSpec;

pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    num_blocks: usize,
    block_size: usize,
}

/// Where a run of consecutive new tokens goes: `len` tokens from `token_start` (row in the packed
/// batch) into slots `slot_start..slot_start+len` (never crossing a block boundary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRun {
    pub token_start: usize,
    pub slot_start: usize,
    pub len: usize,
}

/// How one sequence's context is read back.
#[derive(Debug, Clone)]
pub enum Gather {
    /// The slots are consecutive: `start..start+len`.
    Range { start: usize, len: usize },
    /// Arbitrary slots, in position order (u32 indices on the model's device).
    Slots(Tensor),
}

impl Gather {
    pub fn len(&self) -> usize {
        match self {
            Gather::Range { len, .. } => *len,
            Gather::Slots(t) => t.dims1().unwrap_or(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl KvCache {
    pub fn new(spec: &ModelSpec, num_blocks: usize, block_size: usize) -> Result<Self> {
        if num_blocks == 0 || block_size == 0 {
            bail!("a KV cache needs at least one block of at least one slot")
        }
        let shape = (spec.num_kv_heads, num_blocks * block_size, spec.head_dim);
        let layers = (0..spec.num_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, spec.dtype, &spec.device)?,
                    Tensor::zeros(shape, spec.dtype, &spec.device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            num_blocks,
            block_size,
        })
    }

    /// Bytes one block takes over all layers, keys and values.
    pub(crate) fn bytes_per_block(spec: &ModelSpec, block_size: usize) -> usize {
        2 * spec.num_layers
            * spec.num_kv_heads
            * spec.head_dim
            * block_size
            * spec.dtype.size_in_bytes()
    }

    pub(crate) fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Copies every layer's keys and values of block `src` into block `dst` (copy-on-write of a shared
    /// prompt block before a sibling sequence writes into it).
    pub(crate) fn copy_block(&mut self, src: u32, dst: u32) -> Result<()> {
        let (src, dst) = (src as usize, dst as usize);
        if src >= self.num_blocks || dst >= self.num_blocks {
            bail!(
                "copy_block({src}, {dst}) outside a cache of {} blocks",
                self.num_blocks
            )
        }
        if src == dst {
            return Ok(());
        }
        let bs = self.block_size;
        for (k, v) in &self.layers {
            for t in [k, v] {
                let block = t.narrow(1, src * bs, bs)?.contiguous()?;
                t.slice_set(&block, 1, dst * bs)?;
            }
        }
        Ok(())
    }

    /// Writes the new keys/values `[tokens, kv_heads, head_dim]` of a packed batch into their slots.
    pub fn write(&mut self, layer: usize, k: &Tensor, v: &Tensor, runs: &[SlotRun]) -> Result<()> {
        let (kc, vc) = self.layer(layer)?;
        for run in runs {
            for (src, dst) in [(k, kc), (v, vc)] {
                let part = src
                    .narrow(0, run.token_start, run.len)?
                    .transpose(0, 1)?
                    .contiguous()?;
                dst.slice_set(&part, 1, run.slot_start)?;
            }
        }
        Ok(())
    }

    /// One sequence's keys and values, `[kv_heads, len, head_dim]` each.
    pub fn gather(&self, layer: usize, how: &Gather) -> Result<(Tensor, Tensor)> {
        let (k, v) = self.layer(layer)?;
        match how {
            Gather::Range { start, len } => {
                Ok((k.narrow(1, *start, *len)?, v.narrow(1, *start, *len)?))
            }
            Gather::Slots(idx) => Ok((k.index_select(idx, 1)?, v.index_select(idx, 1)?)),
        }
    }

    /// A layer's whole key and value tensors, `[kv_heads, slots, head_dim]`.
    pub(crate) fn layer_tensors(&self, layer: usize) -> Result<(&Tensor, &Tensor)> {
        self.layer(layer)
    }

    fn layer(&self, layer: usize) -> Result<(&Tensor, &Tensor)> {
        match self.layers.get(layer) {
            Some((k, v)) => Ok((k, v)),
            None => bail!(
                "layer {layer} outside a cache of {} layers",
                self.layers.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn spec() -> ModelSpec {
        ModelSpec {
            architecture: "test".into(),
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 3,
            hidden_size: 6,
            vocab_size: 10,
            max_position_embeddings: 64,
            dtype: DType::F32,
            device: Device::Cpu,
        }
    }

    #[test]
    fn bytes_per_block_counts_keys_and_values_of_every_layer() {
        assert_eq!(KvCache::bytes_per_block(&spec(), 4), 2 * 2 * 2 * 3 * 4 * 4);
    }

    #[test]
    fn write_then_gather_round_trips_through_scattered_blocks() -> Result<()> {
        let mut cache = KvCache::new(&spec(), 4, 2)?;
        // three tokens, blocks [3, 1]: slots 6, 7, 2
        let k = Tensor::arange(0f32, 18., &Device::Cpu)?.reshape((3, 2, 3))?;
        let v = (&k + 100.)?;
        let runs = [
            SlotRun {
                token_start: 0,
                slot_start: 6,
                len: 2,
            },
            SlotRun {
                token_start: 2,
                slot_start: 2,
                len: 1,
            },
        ];
        cache.write(1, &k, &v, &runs)?;
        let idx = Tensor::new(&[6u32, 7, 2], &Device::Cpu)?;
        let (gk, gv) = cache.gather(1, &Gather::Slots(idx))?;
        let want = k.transpose(0, 1)?.contiguous()?;
        assert_eq!(gk.to_vec3::<f32>()?, want.to_vec3::<f32>()?);
        assert_eq!(gv.to_vec3::<f32>()?, (want + 100.)?.to_vec3::<f32>()?);
        // layer 0 untouched
        let (k0, _) = cache.gather(0, &Gather::Range { start: 6, len: 2 })?;
        assert!(k0.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| *x == 0.));
        Ok(())
    }

    #[test]
    fn copy_block_duplicates_contents() -> Result<()> {
        let mut cache = KvCache::new(&spec(), 3, 2)?;
        let k = Tensor::arange(0f32, 12., &Device::Cpu)?.reshape((2, 2, 3))?;
        let run = SlotRun {
            token_start: 0,
            slot_start: 0,
            len: 2,
        };
        cache.write(0, &k, &k, &[run])?;
        cache.copy_block(0, 2)?;
        let (a, _) = cache.gather(0, &Gather::Range { start: 0, len: 2 })?;
        let (b, _) = cache.gather(0, &Gather::Range { start: 4, len: 2 })?;
        assert_eq!(a.to_vec3::<f32>()?, b.to_vec3::<f32>()?);
        assert!(cache.copy_block(0, 3).is_err());
        Ok(())
    }
}
