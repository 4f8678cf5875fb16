//! The paged KV cache: per layer, one key and one value tensor of `num_blocks * block_size` slots, each
//! slot one token's `[kv_heads * head_dim]` row. Owned by the scheduler; a model writes the new tokens'
//! keys/values into their slots and gathers a sequence's context back through its block table.

use candle_core::{DType, Device, Result, Tensor};

use super::models::ModelSpec;

pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    block_size: usize,
    num_blocks: usize,
}

impl KvCache {
    pub fn new(spec: &ModelSpec, num_blocks: usize, block_size: usize) -> Result<Self> {
        let row = spec.num_kv_heads * spec.head_dim;
        let slots = num_blocks * block_size;
        let layers = (0..spec.num_layers)
            .map(|_| {
                let k = Tensor::zeros((slots, row), spec.dtype, &spec.device)?;
                let v = Tensor::zeros((slots, row), spec.dtype, &spec.device)?;
                Ok((k, v))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            block_size,
            num_blocks,
        })
    }

    /// Bytes one block takes across all layers (keys and values).
    pub fn bytes_per_block(spec: &ModelSpec, block_size: usize) -> usize {
        2 * spec.num_layers
            * block_size
            * spec.num_kv_heads
            * spec.head_dim
            * spec.dtype.size_in_bytes()
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn dtype(&self) -> DType {
        self.layers[0].0.dtype()
    }

    pub fn device(&self) -> &Device {
        self.layers[0].0.device()
    }

    /// Writes `k`, `v` (`[n, kv_heads * head_dim]`) of one layer into the slots `write_index` names
    /// (`[n, kv_heads * head_dim]` u32, each row filled with its slot number).
    pub fn write(&self, layer: usize, write_index: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        let (ck, cv) = &self.layers[layer];
        ck.scatter_set(write_index, &k.contiguous()?, 0)?;
        cv.scatter_set(write_index, &v.contiguous()?, 0)?;
        Ok(())
    }

    /// The keys and values at `slots` (u32 `[m]`), `[m, kv_heads * head_dim]` each.
    pub fn gather(&self, layer: usize, slots: &Tensor) -> Result<(Tensor, Tensor)> {
        let (ck, cv) = &self.layers[layer];
        Ok((ck.index_select(slots, 0)?, cv.index_select(slots, 0)?))
    }

    /// Copies block `src` onto block `dst` in every layer (copy-on-write of a shared partial block).
    pub fn copy_block(&self, src: usize, dst: usize) -> Result<()> {
        let bs = self.block_size;
        for (k, v) in &self.layers {
            k.slice_set(&k.narrow(0, src * bs, bs)?.contiguous()?, 0, dst * bs)?;
            v.slice_set(&v.narrow(0, src * bs, bs)?.contiguous()?, 0, dst * bs)?;
        }
        Ok(())
    }
}
