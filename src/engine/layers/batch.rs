//! Index tensors derived once per forward pass from a packed `ForwardBatch` and shared by every layer:
//! token positions, the cache slots to write, the context slots to gather, per-sequence lengths.

use candle_core::{Device, Result, Tensor};

use crate::engine::models::{ForwardBatch, LogitsWanted};

pub struct BatchLayout {
    pub num_tokens: usize,
    /// u32 `[num_tokens]`: each new token's position in its sequence.
    pub positions: Tensor,
    /// u32 `[num_tokens, kv_row]`: each new token's cache slot, repeated along the row (`scatter_set`).
    pub write_index: Tensor,
    /// u32 `[total_ctx]`: every sequence's context slots (cached + new), back to back.
    pub gather_slots: Tensor,
    pub seqlens_q: Vec<usize>,
    pub seqlens_k: Vec<usize>,
    /// u32 `[rows]`: which new tokens' outputs the caller wants (logits / hidden states).
    pub output_rows: Tensor,
}

impl BatchLayout {
    pub fn new(
        batch: &ForwardBatch,
        block_size: usize,
        kv_row: usize,
        device: &Device,
    ) -> Result<Self> {
        let num_tokens = batch.tokens.len();
        let mut positions = Vec::with_capacity(num_tokens);
        let mut write_slots = Vec::with_capacity(num_tokens);
        let mut gather = Vec::new();
        let mut output_rows = Vec::new();
        let (mut seqlens_q, mut seqlens_k) = (Vec::new(), Vec::new());
        let mut offset = 0u32;
        for seq in &batch.seqs {
            let total = seq.context_len + seq.num_new;
            if seq.block_table.len() * block_size < total {
                candle_core::bail!(
                    "block table of {} blocks cannot hold {total} tokens",
                    seq.block_table.len()
                );
            }
            let slot = |pos: usize| {
                seq.block_table[pos / block_size] * block_size as u32 + (pos % block_size) as u32
            };
            for pos in seq.context_len..total {
                positions.push(pos as u32);
                write_slots.push(slot(pos));
            }
            gather.extend((0..total).map(slot));
            match seq.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last => output_rows.push(offset + seq.num_new as u32 - 1),
                LogitsWanted::All => output_rows.extend(offset..offset + seq.num_new as u32),
            }
            seqlens_q.push(seq.num_new);
            seqlens_k.push(total);
            offset += seq.num_new as u32;
        }
        if offset as usize != num_tokens {
            candle_core::bail!("batch has {num_tokens} tokens but its sequences claim {offset}");
        }
        let write_index = Tensor::from_vec(write_slots, (num_tokens, 1), device)?
            .broadcast_as((num_tokens, kv_row))?
            .contiguous()?;
        let rows = output_rows.len();
        let total_ctx = gather.len();
        Ok(Self {
            num_tokens,
            positions: Tensor::from_vec(positions, num_tokens, device)?,
            write_index,
            gather_slots: Tensor::from_vec(gather, total_ctx, device)?,
            seqlens_q,
            seqlens_k,
            output_rows: Tensor::from_vec(output_rows, rows, device)?,
        })
    }
}
