//! A draft model's guesses (speculative decoding with `"model"` in `SPECULATIVE_CONFIG`): a smaller
//! causal model sharing the tokenizer proposes the next tokens greedily, a few passes per step, batched
//! over every speculating sequence. Its KV cache has the target's block layout and it writes through
//! the target's block tables, so one allocation (scheduler, copy-on-write, preemption) serves both
//! models. Its output is only ever a guess the target verifies: a stale draft cache costs acceptance,
//! never correctness.

use std::collections::{HashMap, HashSet};

use super::Executor;
use crate::engine::batch::{ForwardBatch, LogitsWanted, SeqInput};
use crate::engine::sampling::argmax;
use crate::engine::scheduler::{Scheduled, Scheduler, SeqId};

pub struct DraftModel {
    exec: Box<dyn Executor>,
    block_size: usize,
    /// Per sequence: positions of the draft cache that hold its tokens, and the block table they
    /// were written through (a different table means preemption or a copy: start over).
    computed: HashMap<SeqId, (usize, Vec<u32>)>,
}

impl DraftModel {
    pub fn new(exec: Box<dyn Executor>, block_size: usize) -> Self {
        Self {
            exec,
            block_size: block_size.max(1),
            computed: HashMap::new(),
        }
    }

    /// Replaces the placeholder drafts the scheduler reserved room for (`sc.draft`, its length the
    /// most tokens wanted) with the draft model's greedy guesses; `num_new` follows the length kept.
    /// Guesses stop at an id outside the target's vocabulary. The drafts of `forced` (tokens a
    /// grammar forces) are kept.
    pub fn fill(
        &mut self,
        seqs: &mut [Scheduled],
        sched: &Scheduler,
        target_vocab: usize,
        forced: &HashSet<SeqId>,
    ) {
        self.computed.retain(|id, _| sched.contains(*id));
        let idx: Vec<usize> = (0..seqs.len())
            .filter(|&i| !seqs[i].draft.is_empty() && !forced.contains(&seqs[i].id))
            .collect();
        if idx.is_empty() {
            return;
        }
        let wanted: Vec<usize> = idx.iter().map(|&i| seqs[i].draft.len()).collect();
        let mut drafts: Vec<Vec<u32>> = vec![Vec::new(); idx.len()];
        let mut live: Vec<bool> = vec![true; idx.len()];
        let max_k = wanted.iter().copied().max().unwrap_or(0);
        for pass in 0..max_k {
            let mut batch = ForwardBatch {
                adapters: Vec::new(),
                tokens: Vec::new(),
                seqs: Vec::new(),
            };
            let mut members = Vec::new();
            for (j, &i) in idx.iter().enumerate() {
                if !live[j] || drafts[j].len() >= wanted[j] {
                    continue;
                }
                let sc = &seqs[i];
                let (context_len, tokens) = if pass == 0 {
                    // catch up to the sequence's last real token
                    let from = self.reusable(sc);
                    let all = sched.tokens(sc.id).unwrap_or_default();
                    (from, all[from..=sc.context_len].to_vec())
                } else {
                    (sc.context_len + pass, vec![drafts[j][pass - 1]])
                };
                batch.seqs.push(SeqInput {
                    context_len,
                    num_new: tokens.len(),
                    block_table: sc.block_table.clone(),
                    logits: LogitsWanted::Last,
                });
                batch.tokens.extend(tokens);
                members.push(j);
            }
            if members.is_empty() {
                break;
            }
            let logits = match self.exec.execute(&[], &batch) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "draft model pass failed; verifying what was guessed");
                    break;
                }
            };
            let vocab = logits.len() / members.len();
            for (row, &j) in logits.chunks_exact(vocab.max(1)).zip(&members) {
                let id = argmax(row);
                if (id as usize) < target_vocab {
                    drafts[j].push(id);
                } else {
                    live[j] = false;
                }
            }
            if pass == 0 {
                for &j in &members {
                    let sc = &seqs[idx[j]];
                    self.computed
                        .insert(sc.id, (sc.context_len + 1, sc.block_table.clone()));
                }
            }
        }
        for (j, &i) in idx.iter().enumerate() {
            let draft = std::mem::take(&mut drafts[j]);
            let sc = &mut seqs[i];
            sc.num_new = 1 + draft.len();
            sc.draft = draft;
        }
    }

    /// How many leading positions of `sc` the draft cache already holds.
    fn reusable(&self, sc: &Scheduled) -> usize {
        let Some((n, table)) = self.computed.get(&sc.id) else {
            return 0;
        };
        let n = (*n).min(sc.context_len);
        let blocks = n.div_ceil(self.block_size);
        let same = table.len() >= blocks
            && sc.block_table.len() >= blocks
            && table[..blocks] == sc.block_table[..blocks];
        if same {
            n
        } else {
            0
        }
    }
}
