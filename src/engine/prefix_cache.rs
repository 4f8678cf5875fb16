//! `ENABLE_PREFIX_CACHING`: full KV blocks are named by a chain hash (the parent block's hash and the
//! block's own tokens), so two prompts that start alike find the same blocks. Only full blocks are
//! shared: a partially filled block is still being written. A block keeps its name after its last owner
//! frees it and is forgotten only when the allocator hands it out again (LRU eviction).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

/// The name of a full block given the name of the block before it.
pub(crate) fn chain_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// The name the first block of a sequence run with LoRA adapter `adapter` chains from: none for
/// the base model, the adapter's own otherwise, so the same tokens under different adapters (whose
/// keys and values differ) never share blocks.
pub(crate) fn adapter_root(adapter: u32) -> Option<u64> {
    (adapter != 0).then(|| {
        let mut h = DefaultHasher::new();
        ("lora", adapter).hash(&mut h);
        h.finish()
    })
}

/// Names of the full blocks of `tokens`, in order, the first chained from `root`.
pub(crate) fn block_hashes(root: Option<u64>, tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut parent = root;
    tokens
        .chunks_exact(block_size)
        .map(|chunk| {
            let h = chain_hash(parent, chunk);
            parent = Some(h);
            h
        })
        .collect()
}

#[derive(Debug, Clone)]
pub(crate) struct PrefixCache {
    by_hash: HashMap<u64, u32>,
    hash_of: Vec<Option<u64>>,
}

impl PrefixCache {
    pub fn new(num_blocks: usize) -> Self {
        Self {
            by_hash: HashMap::new(),
            hash_of: vec![None; num_blocks],
        }
    }

    pub fn lookup(&self, hash: u64) -> Option<u32> {
        self.by_hash.get(&hash).copied()
    }

    /// The longest run of cached blocks that starts `tokens`, leaving at least one token uncached (the
    /// model must compute the last position to produce logits).
    pub(crate) fn longest_prefix(
        &self,
        root: Option<u64>,
        tokens: &[u32],
        block_size: usize,
    ) -> Vec<u32> {
        let usable = tokens.len().saturating_sub(1);
        block_hashes(root, &tokens[..usable], block_size)
            .into_iter()
            .map_while(|h| self.lookup(h))
            .collect()
    }

    /// Names `block`. Returns false (and changes nothing) when another block already has this name:
    /// two sequences computed the same prefix at once; the first one stays the shared copy.
    pub fn insert(&mut self, hash: u64, block: u32) -> bool {
        if self.by_hash.contains_key(&hash) || self.hash_of[block as usize].is_some() {
            return false;
        }
        self.by_hash.insert(hash, block);
        self.hash_of[block as usize] = Some(hash);
        true
    }

    pub(crate) fn is_cached(&self, block: u32) -> bool {
        self.hash_of[block as usize].is_some()
    }

    /// Forgets `block`'s contents (it is about to be overwritten).
    pub(crate) fn evict(&mut self, block: u32) {
        if let Some(h) = self.hash_of[block as usize].take() {
            self.by_hash.remove(&h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_the_whole_prefix() {
        let a = block_hashes(None, &[1, 2, 3, 4], 2);
        let b = block_hashes(None, &[9, 9, 3, 4], 2);
        assert_eq!(a.len(), 2);
        assert_ne!(a[1], b[1], "same block tokens after a different prefix");
        assert_eq!(
            block_hashes(None, &[1, 2, 3, 4, 5], 2),
            a,
            "partial block has no name"
        );
    }

    #[test]
    fn an_adapter_roots_its_own_chain() {
        let toks = [1, 2, 3, 4, 5];
        let mut c = PrefixCache::new(8);
        for (i, h) in block_hashes(adapter_root(3), &toks, 2)
            .into_iter()
            .enumerate()
        {
            assert!(c.insert(h, i as u32));
        }
        assert_eq!(c.longest_prefix(adapter_root(3), &toks, 2), vec![0, 1]);
        assert!(c.longest_prefix(None, &toks, 2).is_empty());
        assert!(c.longest_prefix(adapter_root(4), &toks, 2).is_empty());
        assert_eq!(adapter_root(0), None);
    }

    #[test]
    fn longest_prefix_leaves_one_token_to_compute() {
        let mut c = PrefixCache::new(8);
        let toks = [1, 2, 3, 4, 5, 6];
        for (i, h) in block_hashes(None, &toks, 2).into_iter().enumerate() {
            assert!(c.insert(h, i as u32));
        }
        assert_eq!(c.longest_prefix(None, &toks, 2), vec![0, 1]);
        assert_eq!(
            c.longest_prefix(None, &[1, 2, 3, 4, 5, 6, 7], 2),
            vec![0, 1, 2]
        );
        assert_eq!(c.longest_prefix(None, &[1, 2, 0, 0, 5, 6, 7], 2), vec![0]);
        assert!(c.longest_prefix(None, &[7, 2, 3], 2).is_empty());
    }

    #[test]
    fn evicted_blocks_are_forgotten_and_duplicates_refused() {
        let mut c = PrefixCache::new(4);
        let h = chain_hash(None, &[1, 2]);
        assert!(c.insert(h, 3));
        assert!(!c.insert(h, 2));
        assert!(c.is_cached(3) && !c.is_cached(2));
        c.evict(3);
        assert_eq!(c.lookup(h), None);
        assert!(c.by_hash.is_empty());
        assert!(c.insert(h, 2));
        assert_eq!(c.by_hash.len(), 1);
    }
}
