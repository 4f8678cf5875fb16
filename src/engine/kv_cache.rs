//! The paged KV cache: per layer, one key and one value tensor of `num_blocks * block_size` slots.
//! Owned by the scheduler; models write new keys/values into slots and gather a sequence's slots back
//! through its block table.

/// Skeleton; the models work defines the storage.
pub struct KvCache {}
