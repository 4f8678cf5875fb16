//! Continuous-batching policy (pure: no model, no tensors).
//!
//! Sequences wait in FCFS order, then run. Every step decodes each running sequence (one token) and
//! spends the rest of the `max_num_batched_tokens` budget on chunks of prompts (chunked prefill), admitting
//! waiting sequences while `max_num_seqs` and the KV blocks allow. When a decode finds no free block, the
//! newest running sequence is preempted: its blocks are freed and it goes back to the waiting queue with
//! all its tokens (prompt and generated), to be recomputed later. Nothing is dropped.
//!
//! The plan a step produces names, per sequence, the KV positions to compute and the block table that
//! covers them; the runner turns it into a `ForwardBatch`, runs it and calls `commit`.

use std::collections::{HashMap, VecDeque};

use super::block_allocator::BlockAllocator;
use super::prefix_cache::{chain_hash, PrefixCache};

pub(crate) type SeqId = u64;

#[derive(Debug, Clone)]
pub(crate) struct SchedulerConfig {
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub enable_prefix_caching: bool,
    /// `MAX_LORAS`: the most LoRA adapters the running sequences may use at once.
    pub max_loras: usize,
}

#[derive(Debug, Clone)]
struct Seq {
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    num_computed: usize,
    blocks: Vec<u32>,
    /// Names of the leading full, computed blocks (for chaining the next one's name).
    hashes: Vec<u64>,
    /// Admission order; siblings forked from a sequence share it.
    arrival: u64,
    use_prefix_cache: bool,
    cached_tokens: usize,
    running: bool,
    /// Guessed next tokens to verify in the next step (speculative decoding); never in `tokens`.
    draft: Vec<u32>,
    /// The LoRA adapter it runs with (0: the base model); it also roots its blocks' names.
    adapter: u32,
}

impl Seq {
    fn remaining(&self) -> usize {
        self.tokens.len() - self.num_computed
    }
}

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Scheduled {
    pub id: SeqId,
    /// Tokens already in the cache; the new ones sit at positions `context_len..context_len + num_new`.
    pub context_len: usize,
    pub num_new: usize,
    pub block_table: Vec<u32>,
    /// Whether this chunk reaches the sequence's last token (its logits predict the next token).
    pub completes: bool,
    /// Guessed tokens computed after the last one (positions `context_len + 1..`), whose logits rows
    /// verify them; `num_new` counts them. Empty unless the runner set a draft for this decode.
    pub draft: Vec<u32>,
    /// The LoRA adapter (0: the base model).
    pub adapter: u32,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct StepPlan {
    pub seqs: Vec<Scheduled>,
    /// Copy-on-write: (source, destination) blocks to copy before the forward pass.
    pub copies: Vec<(u32, u32)>,
    /// Sequences sent back to the waiting queue this step.
    pub preempted: Vec<SeqId>,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    pub(crate) fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.num_new).sum()
    }
}

#[derive(Debug)]
pub(crate) struct Scheduler {
    cfg: SchedulerConfig,
    alloc: BlockAllocator,
    prefix: PrefixCache,
    seqs: HashMap<SeqId, Seq>,
    /// Both ordered by (arrival, id).
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    next_id: SeqId,
    next_arrival: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        assert!(cfg.block_size > 0 && cfg.max_num_batched_tokens > 0 && cfg.max_num_seqs > 0);
        Self {
            alloc: BlockAllocator::new(cfg.num_blocks),
            prefix: PrefixCache::new(cfg.num_blocks),
            cfg,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            next_arrival: 0,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues a new sequence. `use_prefix_cache = false` forces every prompt position to be computed
    /// (needed for prompt logprobs).
    #[cfg(test)]
    pub fn add(&mut self, tokens: Vec<u32>, use_prefix_cache: bool) -> SeqId {
        self.add_for(tokens, use_prefix_cache, 0)
    }

    /// `add` for a sequence run with LoRA adapter `adapter` (0: the base model).
    pub(crate) fn add_for(
        &mut self,
        tokens: Vec<u32>,
        use_prefix_cache: bool,
        adapter: u32,
    ) -> SeqId {
        assert!(!tokens.is_empty(), "a sequence needs at least one token");
        let id = self.new_id();
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.seqs.insert(
            id,
            Seq {
                tokens,
                num_computed: 0,
                blocks: Vec::new(),
                hashes: Vec::new(),
                arrival,
                use_prefix_cache: use_prefix_cache && self.cfg.enable_prefix_caching,
                cached_tokens: 0,
                running: false,
                draft: Vec::new(),
                adapter,
            },
        );
        self.waiting.push_back(id);
        id
    }

    /// A copy of `parent` that shares its blocks (copy-on-write for the partially filled last one).
    pub(crate) fn fork(&mut self, parent: SeqId) -> Option<SeqId> {
        let mut child = self.seqs.get(&parent)?.clone();
        for &b in &child.blocks {
            self.alloc.acquire(b);
        }
        child.cached_tokens = 0;
        child.draft.clear();
        let id = self.new_id();
        let running = child.running;
        self.seqs.insert(id, child);
        if running {
            let pos = self.sorted_pos(&self.running, id);
            self.running.insert(pos, id);
        } else {
            let pos = self.sorted_pos_deque(id);
            self.waiting.insert(pos, id);
        }
        Some(id)
    }

    pub(crate) fn append_token(&mut self, id: SeqId, token: u32) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.tokens.push(token);
        }
    }

    /// Whether `id` runs and has only its last token to compute: the next step decodes it.
    pub(crate) fn is_decoding(&self, id: SeqId) -> bool {
        self.seqs
            .get(&id)
            .is_some_and(|s| s.running && s.remaining() == 1)
    }

    /// Guessed next tokens for a decoding sequence, computed (and verified) alongside its last token in
    /// the next step when blocks and the token budget allow; dropped otherwise.
    pub(crate) fn set_draft(&mut self, id: SeqId, draft: Vec<u32>) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.draft = draft;
        }
    }

    /// After a step that verified a draft: the first `accepted` draft tokens were right (the runner
    /// appended them, then the model's own next token), so their keys and values already in the
    /// cache count as computed.
    pub(crate) fn accept_draft(&mut self, id: SeqId, accepted: usize) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        let to = (seq.num_computed + accepted).min(seq.tokens.len().saturating_sub(1));
        if seq.num_computed > 0 && to > seq.num_computed {
            seq.num_computed = to;
            self.name_full_blocks(id);
        }
    }

    /// Removes a finished or cancelled sequence and frees its blocks.
    pub fn remove(&mut self, id: SeqId) {
        self.free_blocks_of(id);
        self.running.retain(|&x| x != id);
        self.waiting.retain(|&x| x != id);
        self.seqs.remove(&id);
    }

    pub fn contains(&self, id: SeqId) -> bool {
        self.seqs.contains_key(&id)
    }

    pub fn tokens(&self, id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&id).map(|s| s.tokens.as_slice())
    }

    /// Prompt tokens served from the prefix cache at the sequence's first admission.
    pub(crate) fn cached_tokens(&self, id: SeqId) -> usize {
        self.seqs.get(&id).map_or(0, |s| s.cached_tokens)
    }

    pub(crate) fn num_free_blocks(&self) -> usize {
        self.alloc.num_free()
    }

    pub(crate) fn num_running(&self) -> usize {
        self.running.len()
    }

    pub(crate) fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Sends the newest running sequence back to the waiting queue (to break a stall).
    pub(crate) fn preempt_newest(&mut self) -> Option<SeqId> {
        let id = *self.running.last()?;
        self.preempt(id);
        Some(id)
    }

    pub(crate) fn first_waiting(&self) -> Option<SeqId> {
        self.waiting.front().copied()
    }

    /// Plans one step. The caller runs it and then calls `commit`.
    pub(crate) fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        self.schedule_decodes(&mut plan, &mut budget);
        let blocked = self.schedule_running_prefills(&mut plan, &mut budget);
        // After a preemption the cache is full: admitting now would only preempt again next step.
        if !blocked && plan.preempted.is_empty() {
            self.admit_waiting(&mut plan, &mut budget);
        }
        plan
    }

    /// Records that the plan ran: its positions are now in the cache; newly full blocks get their names.
    /// Draft positions are not committed: the runner says how many were right (`accept_draft`).
    pub fn commit(&mut self, plan: &StepPlan) {
        for s in &plan.seqs {
            let Some(seq) = self.seqs.get_mut(&s.id) else {
                continue;
            };
            seq.num_computed = (s.context_len + s.num_new).min(seq.tokens.len());
            seq.draft.clear();
            self.name_full_blocks(s.id);
        }
    }

    /// Names the computed full blocks of `id` not named yet (and offers them to the prefix cache).
    fn name_full_blocks(&mut self, id: SeqId) {
        let bs = self.cfg.block_size;
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        while seq.hashes.len() < seq.num_computed / bs {
            let i = seq.hashes.len();
            let h = chain_hash(
                seq.hashes
                    .last()
                    .copied()
                    .or_else(|| super::prefix_cache::adapter_root(seq.adapter)),
                &seq.tokens[i * bs..(i + 1) * bs],
            );
            seq.hashes.push(h);
            if self.cfg.enable_prefix_caching {
                self.prefix.insert(h, seq.blocks[i]);
            }
        }
    }

    fn schedule_decodes(&mut self, plan: &mut StepPlan, budget: &mut usize) {
        let mut i = 0;
        while i < self.running.len() && *budget > 0 {
            let id = self.running[i];
            if self.seqs[&id].remaining() != 1 {
                i += 1;
                continue;
            }
            let draft = std::mem::take(&mut self.seqs.get_mut(&id).expect("running").draft);
            let with_draft = 1 + draft.len();
            if !draft.is_empty()
                && with_draft <= *budget
                && self.reserve(id, with_draft, &mut plan.copies)
            {
                let mut sc = self.scheduled(id, with_draft);
                sc.completes = true;
                sc.draft = draft;
                plan.seqs.push(sc);
                *budget -= with_draft;
                i += 1;
                continue;
            }
            if self.reserve(id, 1, &mut plan.copies) {
                plan.seqs.push(self.scheduled(id, 1));
                *budget -= 1;
                i += 1;
                continue;
            }
            // Out of blocks: the newest running sequence (never one already scheduled, which are older)
            // makes room, possibly this one.
            let victim = *self.running.last().expect("running is not empty");
            self.preempt(victim);
            plan.preempted.push(victim);
        }
    }

    /// Continues prompts already running. Returns true when the cache is too full to admit anything.
    fn schedule_running_prefills(&mut self, plan: &mut StepPlan, budget: &mut usize) -> bool {
        let mut i = 0;
        while i < self.running.len() && *budget > 0 {
            let id = self.running[i];
            let rem = self.seqs[&id].remaining();
            if rem <= 1 {
                i += 1;
                continue;
            }
            let n = rem.min(*budget).min(self.tokens_that_fit(id));
            if n > 0 && self.reserve(id, n, &mut plan.copies) {
                plan.seqs.push(self.scheduled(id, n));
                *budget -= n;
                i += 1;
                continue;
            }
            // Make room from newer sequences that are not in this step; none: wait for decodes to end.
            let scheduled: Vec<SeqId> = plan.seqs.iter().map(|s| s.id).collect();
            let victim = self.running[i + 1..]
                .iter()
                .rev()
                .find(|v| !scheduled.contains(v))
                .copied();
            match victim {
                Some(v) => {
                    self.preempt(v);
                    plan.preempted.push(v);
                }
                None => return true,
            }
        }
        false
    }

    fn admit_waiting(&mut self, plan: &mut StepPlan, budget: &mut usize) {
        while *budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            if !self.adapter_fits(self.seqs[&id].adapter) {
                // MAX_LORAS adapters already run: it waits for one of them to finish
                break;
            }
            let hits = self.take_cached_prefix(id);
            let rem = self.seqs[&id].remaining();
            let n = rem.min(*budget).min(self.tokens_that_fit(id));
            if n == 0 || !self.reserve(id, n, &mut plan.copies) {
                self.undo_cached_prefix(id, hits);
                break;
            }
            self.waiting.pop_front();
            let pos = self.sorted_pos(&self.running, id);
            self.running.insert(pos, id);
            if let Some(s) = self.seqs.get_mut(&id) {
                s.running = true;
            }
            plan.seqs.push(self.scheduled(id, n));
            *budget -= n;
        }
    }

    /// How many sequences (running or waiting) run with LoRA adapter `adapter`.
    pub(crate) fn sequences_of_adapter(&self, adapter: u32) -> usize {
        self.seqs.values().filter(|s| s.adapter == adapter).count()
    }

    /// Whether a sequence of `adapter` may run beside the running ones without more than
    /// `max_loras` adapters at once.
    fn adapter_fits(&self, adapter: u32) -> bool {
        if adapter == 0 {
            return true;
        }
        let mut used: Vec<u32> = self
            .running
            .iter()
            .map(|id| self.seqs[id].adapter)
            .filter(|&a| a != 0)
            .collect();
        used.sort_unstable();
        used.dedup();
        used.contains(&adapter) || used.len() < self.cfg.max_loras
    }

    /// Prefix-cache hits for a sequence with nothing computed yet; returns how many blocks it took.
    fn take_cached_prefix(&mut self, id: SeqId) -> usize {
        let bs = self.cfg.block_size;
        let seq = &self.seqs[&id];
        if !seq.use_prefix_cache || seq.num_computed > 0 || !seq.blocks.is_empty() {
            return 0;
        }
        let root = super::prefix_cache::adapter_root(seq.adapter);
        let hits = self.prefix.longest_prefix(root, &seq.tokens, bs);
        for &b in &hits {
            self.alloc.acquire(b);
        }
        let seq = self.seqs.get_mut(&id).expect("checked above");
        seq.hashes = super::prefix_cache::block_hashes(root, &seq.tokens[..hits.len() * bs], bs);
        seq.num_computed = hits.len() * bs;
        if seq.cached_tokens == 0 {
            seq.cached_tokens = seq.num_computed;
        }
        let n = hits.len();
        seq.blocks = hits;
        n
    }

    fn undo_cached_prefix(&mut self, id: SeqId, hits: usize) {
        if hits > 0 {
            self.free_blocks_of(id);
        }
    }

    /// How many more tokens of `id` the free blocks could hold.
    fn tokens_that_fit(&self, id: SeqId) -> usize {
        let bs = self.cfg.block_size;
        let seq = &self.seqs[&id];
        let cow = self.needs_cow(seq) as usize;
        let Some(free) = self.alloc.num_free().checked_sub(cow) else {
            return 0;
        };
        ((seq.blocks.len() + free) * bs).saturating_sub(seq.num_computed)
    }

    fn needs_cow(&self, seq: &Seq) -> bool {
        !seq.num_computed.is_multiple_of(self.cfg.block_size)
            && seq
                .blocks
                .last()
                .is_some_and(|&b| self.alloc.ref_count(b) > 1)
    }

    /// Gives `id` the blocks to compute `n` more tokens (copying a shared partial last block first).
    /// Changes nothing and returns false when the free blocks are too few.
    fn reserve(&mut self, id: SeqId, n: usize, copies: &mut Vec<(u32, u32)>) -> bool {
        let bs = self.cfg.block_size;
        let seq = &self.seqs[&id];
        let cow = self.needs_cow(seq);
        let new_blocks = (seq.num_computed + n)
            .div_ceil(bs)
            .saturating_sub(seq.blocks.len());
        if new_blocks + cow as usize > self.alloc.num_free() {
            return false;
        }
        if cow {
            let old = *seq.blocks.last().expect("cow needs a block");
            let fresh = self.take_block();
            copies.push((old, fresh));
            self.release_block(old);
            let seq = self.seqs.get_mut(&id).expect("present");
            *seq.blocks.last_mut().expect("present") = fresh;
        }
        for _ in 0..new_blocks {
            let b = self.take_block();
            self.seqs.get_mut(&id).expect("present").blocks.push(b);
        }
        true
    }

    fn take_block(&mut self) -> u32 {
        let b = self.alloc.peek_free().expect("caller checked free blocks");
        self.prefix.evict(b);
        self.alloc.allocate().expect("caller checked free blocks")
    }

    fn release_block(&mut self, b: u32) {
        let keep = self.prefix.is_cached(b);
        self.alloc.release(b, keep);
    }

    fn free_blocks_of(&mut self, id: SeqId) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        let blocks = std::mem::take(&mut seq.blocks);
        seq.hashes.clear();
        seq.num_computed = 0;
        // The tail of a sequence is the least likely to be shared: free it first so it is evicted first.
        for b in blocks.into_iter().rev() {
            self.release_block(b);
        }
    }

    fn preempt(&mut self, id: SeqId) {
        self.free_blocks_of(id);
        self.running.retain(|&x| x != id);
        if let Some(s) = self.seqs.get_mut(&id) {
            s.running = false;
            s.draft.clear();
        }
        let pos = self.sorted_pos_deque(id);
        self.waiting.insert(pos, id);
    }

    fn scheduled(&self, id: SeqId, n: usize) -> Scheduled {
        let seq = &self.seqs[&id];
        Scheduled {
            id,
            context_len: seq.num_computed,
            num_new: n,
            block_table: seq.blocks.clone(),
            completes: seq.num_computed + n == seq.tokens.len(),
            draft: Vec::new(),
            adapter: seq.adapter,
        }
    }

    fn key(&self, id: SeqId) -> (u64, SeqId) {
        (self.seqs[&id].arrival, id)
    }

    fn sorted_pos(&self, list: &[SeqId], id: SeqId) -> usize {
        let k = self.key(id);
        list.partition_point(|&x| self.key(x) < k)
    }

    fn sorted_pos_deque(&self, id: SeqId) -> usize {
        let k = self.key(id);
        self.waiting.partition_point(|&x| self.key(x) < k)
    }

    fn new_id(&mut self) -> SeqId {
        self.next_id += 1;
        self.next_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(num_blocks: usize, budget: usize, max_seqs: usize, prefix: bool) -> SchedulerConfig {
        SchedulerConfig {
            block_size: 4,
            num_blocks,
            max_num_seqs: max_seqs,
            max_num_batched_tokens: budget,
            enable_prefix_caching: prefix,
            max_loras: 1,
        }
    }

    /// Runs a step as a model would: commit, then give every completed sequence a next token.
    fn step(s: &mut Scheduler) -> StepPlan {
        let plan = s.schedule();
        s.commit(&plan);
        for sc in &plan.seqs {
            if sc.completes {
                s.append_token(sc.id, 7);
            }
        }
        plan
    }

    fn tokens(n: usize, base: u32) -> Vec<u32> {
        (0..n as u32).map(|i| base + i).collect()
    }

    /// MAX_LORAS: a sequence of a third adapter waits while two others run; base-model sequences
    /// and sequences of a running adapter are admitted; each step names its sequences' adapters.
    #[test]
    fn max_loras_bounds_the_adapters_running_at_once() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_loras: 2,
            ..cfg(64, 64, 8, false)
        });
        let a = s.add_for(tokens(3, 10), true, 1);
        let b = s.add_for(tokens(3, 20), true, 2);
        let c = s.add_for(tokens(3, 30), true, 3);
        let plan = step(&mut s);
        let ran: Vec<(SeqId, u32)> = plan.seqs.iter().map(|sc| (sc.id, sc.adapter)).collect();
        assert_eq!(ran, [(a, 1), (b, 2)]);
        let d = s.add_for(tokens(3, 40), true, 1);
        s.remove(c);
        let e = s.add_for(tokens(3, 50), true, 0);
        let plan = step(&mut s);
        let ids: Vec<SeqId> = plan.seqs.iter().map(|sc| sc.id).collect();
        assert_eq!(ids, [a, b, d, e]);
        let f = s.add_for(tokens(3, 60), true, 3);
        s.remove(a);
        s.remove(d);
        step(&mut s);
        assert!(s.seqs[&f].running, "adapter 1 finished: adapter 3 runs");
    }

    #[test]
    fn long_prompt_is_chunked_and_decodes_ride_along() {
        let mut s = Scheduler::new(cfg(64, 8, 16, false));
        let a = s.add(tokens(3, 0), true);
        let p = step(&mut s);
        assert_eq!(p.seqs.len(), 1);
        assert!(p.seqs[0].completes);
        let b = s.add(tokens(20, 100), true);
        let p = step(&mut s);
        assert_eq!(p.seqs[0].id, a, "decodes first");
        assert_eq!((p.seqs[0].context_len, p.seqs[0].num_new), (3, 1));
        assert_eq!(p.seqs[1].id, b);
        assert_eq!(p.seqs[1].num_new, 7, "the rest of the budget");
        assert!(!p.seqs[1].completes);
        assert_eq!(p.num_tokens(), 8);
        let p = step(&mut s);
        assert_eq!(p.seqs[1].context_len, 7);
        let p = step(&mut s);
        assert_eq!(p.seqs[1].context_len, 14);
        assert_eq!(p.seqs[1].num_new, 6);
        assert!(p.seqs[1].completes);
        assert_eq!(p.seqs[1].block_table.len(), 5);
    }

    #[test]
    fn max_num_seqs_bounds_the_running_set() {
        let mut s = Scheduler::new(cfg(64, 100, 2, false));
        for i in 0..3 {
            s.add(tokens(2, i * 10), true);
        }
        let p = step(&mut s);
        assert_eq!(p.seqs.len(), 2);
        assert_eq!(s.num_waiting(), 1);
        let first = p.seqs[0].id;
        s.remove(first);
        let p = step(&mut s);
        assert_eq!(p.seqs.len(), 2, "a slot freed, the third one is admitted");
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_and_recomputes_it_later() {
        // 4 blocks of 4 tokens; two sequences of 8 tokens take 2 blocks each.
        let mut s = Scheduler::new(cfg(4, 64, 8, false));
        let a = s.add(tokens(8, 0), true);
        let b = s.add(tokens(8, 50), true);
        step(&mut s); // both prefilled, 9 tokens each after sampling
        assert_eq!(s.num_free_blocks(), 0);
        let p = step(&mut s); // both need a third block for position 8
        assert_eq!(p.preempted, vec![b]);
        assert_eq!(p.seqs.len(), 1);
        assert_eq!(p.seqs[0].id, a);
        assert_eq!(s.num_waiting(), 1);
        assert_eq!(s.tokens(b).unwrap().len(), 9, "generated tokens kept");
        s.remove(a);
        let p = step(&mut s);
        assert_eq!(p.seqs[0].id, b);
        assert_eq!((p.seqs[0].context_len, p.seqs[0].num_new), (0, 9));
        assert!(p.seqs[0].completes);
    }

    #[test]
    fn forked_siblings_share_full_blocks_and_copy_the_partial_one() {
        let mut s = Scheduler::new(cfg(16, 64, 8, false));
        let a = s.add(tokens(6, 0), true);
        let plan = s.schedule();
        s.commit(&plan);
        let b = s.fork(a).unwrap();
        assert_eq!(s.num_free_blocks(), 14, "the fork costs no block");
        s.append_token(a, 1);
        s.append_token(b, 2);
        let p = s.schedule();
        assert_eq!(p.copies.len(), 1, "the shared partial block is copied once");
        let ta = &p.seqs.iter().find(|x| x.id == a).unwrap().block_table;
        let tb = &p.seqs.iter().find(|x| x.id == b).unwrap().block_table;
        assert_eq!(ta[0], tb[0], "full block shared");
        assert_ne!(ta[1], tb[1]);
        let (src, dst) = p.copies[0];
        assert!([ta[1], tb[1]].contains(&src) && [ta[1], tb[1]].contains(&dst));
        s.commit(&p);
        s.remove(a);
        s.remove(b);
        assert_eq!(s.num_free_blocks(), 16);
    }

    #[test]
    fn prefix_cache_hit_reuses_full_blocks_and_leaves_the_last_token() {
        let mut s = Scheduler::new(cfg(16, 64, 8, true));
        let a = s.add(tokens(9, 0), true);
        step(&mut s);
        s.remove(a);
        // Same 8 first tokens: both full blocks are hits.
        let b = s.add(tokens(9, 0), true);
        let p = step(&mut s);
        assert_eq!((p.seqs[0].context_len, p.seqs[0].num_new), (8, 1));
        assert_eq!(s.cached_tokens(b), 8);
        // Exactly two blocks long: the last block must be computed again.
        let c = s.add(tokens(8, 0), true);
        let p = step(&mut s);
        let pc = p.seqs.iter().find(|x| x.id == c).unwrap();
        assert_eq!((pc.context_len, pc.num_new), (4, 4));
        // Opted out (prompt logprobs): no hit.
        let d = s.add(tokens(9, 0), false);
        let p = step(&mut s);
        let pd = p.seqs.iter().find(|x| x.id == d).unwrap();
        assert_eq!(pd.context_len, 0);
    }

    #[test]
    fn cached_blocks_are_evicted_when_space_is_needed() {
        let mut s = Scheduler::new(cfg(3, 64, 8, true));
        let a = s.add(tokens(9, 0), true);
        step(&mut s);
        s.remove(a);
        assert_eq!(s.num_free_blocks(), 3, "cached blocks still count as free");
        let b = s.add(tokens(12, 100), true);
        let p = step(&mut s);
        assert_eq!(p.seqs[0].id, b);
        assert_eq!(p.seqs[0].num_new, 12);
        s.remove(b);
        let c = s.add(tokens(9, 0), true);
        let p = step(&mut s);
        assert_eq!(p.seqs[0].id, c);
        assert_eq!(p.seqs[0].context_len, 0, "the old prefix was evicted");
    }

    #[test]
    fn removal_frees_everything_and_waiting_keeps_fcfs_order() {
        let mut s = Scheduler::new(cfg(4, 64, 8, false));
        let a = s.add(tokens(16, 0), true);
        let b = s.add(tokens(2, 0), true);
        let p = step(&mut s);
        assert_eq!(p.seqs.len(), 1, "b waits behind a (FCFS), no block left");
        assert_eq!(p.seqs[0].id, a);
        s.remove(a);
        assert_eq!(s.num_free_blocks(), 4);
        let p = step(&mut s);
        assert_eq!(p.seqs[0].id, b);
        s.remove(b);
        assert!(s.is_idle());
    }
}
