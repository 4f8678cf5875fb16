//! A fixed pool of KV-cache blocks with reference counts.
//!
//! Blocks are shared (n/best_of siblings, beams, prefix-cache hits), so a block returns to the free queue
//! only when its last owner lets go. The free queue is an intrusive doubly linked list over block ids:
//! every operation is O(1), including taking a block out of the middle when a prefix-cache hit revives it.
//! Blocks freed with `keep = true` (they hold a cached prefix) go to the back and are reused last, in LRU
//! order; blocks with nothing worth keeping go to the front and are reused first.

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
pub(crate) struct BlockAllocator {
    refs: Vec<u32>,
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    num_free: usize,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize) -> Self {
        assert!(num_blocks < NIL as usize, "too many KV blocks");
        let mut alloc = Self {
            refs: vec![0; num_blocks],
            prev: vec![NIL; num_blocks],
            next: vec![NIL; num_blocks],
            head: NIL,
            tail: NIL,
            num_free: 0,
        };
        for b in 0..num_blocks as u32 {
            alloc.push_back(b);
        }
        alloc
    }

    /// Blocks nobody owns (some may still hold a cached prefix; allocating them evicts it).
    pub(crate) fn num_free(&self) -> usize {
        self.num_free
    }

    pub(crate) fn ref_count(&self, block: u32) -> u32 {
        self.refs[block as usize]
    }

    /// The block `allocate` would hand out next, without taking it (the caller evicts its cached prefix).
    pub(crate) fn peek_free(&self) -> Option<u32> {
        (self.head != NIL).then_some(self.head)
    }

    /// Takes the block at the front of the free queue, owned once.
    pub(crate) fn allocate(&mut self) -> Option<u32> {
        let b = self.peek_free()?;
        self.unlink(b);
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// One more owner for `block`; a free block (a revived cached prefix) leaves the free queue.
    pub(crate) fn acquire(&mut self, block: u32) {
        if self.refs[block as usize] == 0 {
            self.unlink(block);
        }
        self.refs[block as usize] += 1;
    }

    /// One owner fewer. Returns true when the block became free. `keep`: the block holds a cached
    /// prefix worth keeping as long as possible.
    pub fn release(&mut self, block: u32, keep: bool) -> bool {
        let r = &mut self.refs[block as usize];
        debug_assert!(*r > 0, "double free of block {block}");
        if *r == 0 {
            return false;
        }
        *r -= 1;
        if *r > 0 {
            return false;
        }
        if keep {
            self.push_back(block);
        } else {
            self.push_front(block);
        }
        true
    }

    fn push_back(&mut self, b: u32) {
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        if self.tail != NIL {
            self.next[self.tail as usize] = b;
        } else {
            self.head = b;
        }
        self.tail = b;
        self.num_free += 1;
    }

    fn push_front(&mut self, b: u32) {
        self.next[b as usize] = self.head;
        self.prev[b as usize] = NIL;
        if self.head != NIL {
            self.prev[self.head as usize] = b;
        } else {
            self.tail = b;
        }
        self.head = b;
        self.num_free += 1;
    }

    fn unlink(&mut self, b: u32) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        if p != NIL {
            self.next[p as usize] = n;
        } else {
            self.head = n;
        }
        if n != NIL {
            self.prev[n as usize] = p;
        } else {
            self.tail = p;
        }
        self.prev[b as usize] = NIL;
        self.next[b as usize] = NIL;
        self.num_free -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_every_block_once_then_runs_out() {
        let mut a = BlockAllocator::new(3);
        let mut got: Vec<u32> = (0..3).map(|_| a.allocate().unwrap()).collect();
        got.sort();
        assert_eq!(got, vec![0, 1, 2]);
        assert_eq!(a.num_free(), 0);
        assert_eq!(a.allocate(), None);
    }

    #[test]
    fn shared_block_is_free_only_after_last_release() {
        let mut a = BlockAllocator::new(2);
        let b = a.allocate().unwrap();
        a.acquire(b);
        assert_eq!(a.ref_count(b), 2);
        assert!(!a.release(b, false));
        assert_eq!(a.num_free(), 1);
        assert!(a.release(b, false));
        assert_eq!(a.num_free(), 2);
    }

    #[test]
    fn kept_blocks_are_reused_last_in_lru_order() {
        let mut a = BlockAllocator::new(4);
        let bs: Vec<u32> = (0..4).map(|_| a.allocate().unwrap()).collect();
        a.release(bs[0], true);
        a.release(bs[1], true);
        a.release(bs[2], false);
        assert_eq!(a.allocate(), Some(bs[2]), "plain free blocks first");
        assert_eq!(a.allocate(), Some(bs[0]), "then the least recently kept");
        assert_eq!(a.allocate(), Some(bs[1]));
    }

    #[test]
    fn acquiring_a_free_block_takes_it_out_of_the_middle_of_the_queue() {
        let mut a = BlockAllocator::new(3);
        let bs: Vec<u32> = (0..3).map(|_| a.allocate().unwrap()).collect();
        for &b in &bs {
            a.release(b, true);
        }
        a.acquire(bs[1]);
        assert_eq!(a.num_free(), 2);
        assert_eq!(a.allocate(), Some(bs[0]));
        assert_eq!(a.allocate(), Some(bs[2]));
        assert_eq!(a.allocate(), None);
        assert_eq!(a.ref_count(bs[1]), 1);
    }
}
