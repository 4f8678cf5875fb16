//! One request inside the engine thread: its choices (n / best_of siblings or beams), their samplers,
//! detokenizers and stop rules, and the events it owes its stream. The engine loop feeds it logits rows
//! as the scheduler's sequences produce them.

use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::beam::{BeamConfig, BeamSearch, Live};
use crate::engine::batch::LogitsWanted;
use crate::engine::constraint::{Compiled, SeqConstraint};
use crate::engine::detokenize::{DecodeOptions, Detokenizer};
use crate::engine::sampling::device::RowPlan;
use crate::engine::sampling::{log_softmax, rank_of, top_n, Sampled, Sampler};
use crate::engine::scheduler::{Scheduled, Scheduler, SeqId};
use crate::engine::stop::{StopConditions, StopStrings};
use crate::engine::tokenizer::Tokenizer;
use crate::engine::types::{
    ChoiceDelta, Finish, FinishReason, GenerationEvent, RequestMetrics, SamplingParams, StopReason,
    TokenLogprob, Usage,
};

/// What the engine thread needs of a request to start it.
pub(crate) struct Submission {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// The request's compiled structured-output constraint.
    pub constraint: Option<Compiled>,
    pub tx: UnboundedSender<GenerationEvent>,
    pub arrival: Instant,
    /// The LoRA adapter the request runs with (0: the base model).
    pub adapter: u32,
}

struct Choice {
    seq: Option<SeqId>,
    sampler: Sampler,
    detok: Detokenizer,
    stops: StopStrings,
    output: Vec<u32>,
    cum_logprob: f64,
    finish: Option<Finish>,
    /// Everything emitted so far, kept when output is held back until the end (best_of > n).
    held: Option<ChoiceDelta>,
    /// The choice's structured-output matcher (`None` when unconstrained).
    constraint: Option<SeqConstraint>,
    /// Its row after the constraint's mask.
    masked: Vec<f32>,
}

impl Choice {
    /// The next token of a constrained choice, chosen from `row` under its grammar's mask (against
    /// `draft`, a forced token to verify, when given) and fed to the grammar; `None` when the
    /// grammar can go no further.
    fn pick_constrained(&mut self, row: &[f32], draft: Option<u32>) -> Option<Sampled> {
        let constraint = self.constraint.as_mut()?;
        let mut masked = std::mem::take(&mut self.masked);
        masked.clear();
        masked.extend_from_slice(row);
        let open = constraint.apply(&mut masked);
        let mut token = match draft {
            Some(d) => self.sampler.choose_masked_against(&masked, d),
            None => self.sampler.choose_masked(&masked),
        };
        if open && !constraint.allows(token) {
            // The processors (min_tokens, a bias) masked every token the grammar allows: the
            // grammar wins, with its most likely token.
            token = crate::engine::sampling::argmax(&masked);
        }
        self.masked = masked;
        let s = self.sampler.take(row, token);
        if !open || !constraint.allows(s.token_id) || constraint.advance(s.token_id).is_err() {
            return None;
        }
        Some(s)
    }
}

struct Beam {
    seq: SeqId,
    live: Live,
    pending: Option<Vec<f32>>,
}

struct BeamRun {
    search: BeamSearch,
    beams: Vec<Beam>,
}

pub(crate) struct RequestState {
    pub request_id: String,
    tx: UnboundedSender<GenerationEvent>,
    params: SamplingParams,
    prompt: Vec<u32>,
    stop: StopConditions,
    root: SeqId,
    /// The prompt has been computed and the choices exist.
    started: bool,
    choices: Vec<Choice>,
    beam: Option<BeamRun>,
    prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    arrival: Instant,
    first_scheduled: Option<Instant>,
    first_token: Option<Instant>,
    cached_prompt_tokens: usize,
    finished: bool,
    max_model_len: usize,
    drafted_tokens: usize,
    accepted_tokens: usize,
    /// Tokens a grammar forced that a step accepted beside its own (fast-forward).
    forced_tokens: usize,
    /// Forward passes the request took part in, and the last one.
    steps: usize,
    last_step: Option<usize>,
}

/// Borrowed engine state a request works with.
pub(crate) struct Ctx<'a> {
    pub sched: &'a mut Scheduler,
    pub tokenizer: &'a Tokenizer,
}

impl RequestState {
    pub fn new(
        sub: Submission,
        sched: &mut Scheduler,
        tokenizer: &Tokenizer,
        eos: &[u32],
        max_model_len: usize,
    ) -> Self {
        let p = &sub.params;
        let stop = StopConditions::new(p, eos, sub.prompt.len(), max_model_len);
        let root = sched.add_for(sub.prompt.clone(), p.prompt_logprobs.is_none(), sub.adapter);
        let width = p.best_of.unwrap_or(p.n).max(p.n);
        let suppressed = stop.min_tokens_suppressed();
        let choices = if p.use_beam_search {
            Vec::new()
        } else {
            (0..width)
                .map(|i| Choice {
                    seq: None,
                    sampler: Sampler::new(p, &sub.prompt, &suppressed, i),
                    detok: Detokenizer::with_context(
                        tokenizer.clone(),
                        DecodeOptions::from_params(p),
                        &sub.prompt,
                    ),
                    stops: StopStrings::from_params(p),
                    output: Vec::new(),
                    cum_logprob: 0.0,
                    finish: None,
                    held: None,
                    constraint: sub.constraint.as_ref().map(Compiled::start),
                    masked: Vec::new(),
                })
                .collect()
        };
        let prompt_logprobs = p.prompt_logprobs.map(|_| vec![None; sub.prompt.len()]);
        Self {
            request_id: sub.request_id,
            tx: sub.tx,
            stop,
            root,
            started: false,
            choices,
            beam: None,
            prompt_logprobs,
            arrival: sub.arrival,
            first_scheduled: None,
            first_token: None,
            cached_prompt_tokens: 0,
            finished: false,
            max_model_len,
            drafted_tokens: 0,
            accepted_tokens: 0,
            forced_tokens: 0,
            steps: 0,
            last_step: None,
            prompt: sub.prompt,
            params: sub.params,
        }
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.tx.is_closed()
    }

    /// The scheduler sequences this request still owns.
    pub(crate) fn live_seqs(&self) -> Vec<SeqId> {
        if !self.started {
            return vec![self.root];
        }
        match &self.beam {
            Some(b) => b.beams.iter().map(|b| b.seq).collect(),
            None => self.choices.iter().filter_map(|c| c.seq).collect(),
        }
    }

    /// Which logits rows this request wants from a scheduled chunk.
    pub(crate) fn logits_wanted(&self, sc: &Scheduled) -> LogitsWanted {
        let wants_prompt = self.prompt_logprobs.is_some()
            && !self.started
            && sc.id == self.root
            && sc.context_len + 1 < self.prompt.len();
        if wants_prompt {
            LogitsWanted::All
        } else if sc.completes {
            LogitsWanted::Last
        } else {
            LogitsWanted::None
        }
    }

    pub(crate) fn on_scheduled(&mut self, sc: &Scheduled, sched: &Scheduler) {
        if self.first_scheduled.is_none() {
            self.first_scheduled = Some(Instant::now());
            if sc.id == self.root {
                self.cached_prompt_tokens = sched.cached_tokens(self.root);
            }
        }
    }

    /// Rows for every new position of a prompt chunk: row `j` predicts position `context_len + j + 1`.
    pub(crate) fn collect_prompt_logprobs(
        &mut self,
        sc: &Scheduled,
        rows: &[f32],
        tokenizer: &Tokenizer,
    ) {
        let (Some(k), Some(out)) = (self.params.prompt_logprobs, self.prompt_logprobs.as_mut())
        else {
            return;
        };
        let vocab = rows.len() / sc.num_new.max(1);
        for (j, row) in rows.chunks_exact(vocab).enumerate() {
            let target = sc.context_len + j + 1;
            if target >= self.prompt.len() {
                break;
            }
            let lsm = log_softmax(row);
            let id = self.prompt[target];
            out[target] = Some(token_logprob(
                id,
                lsm[id as usize],
                rank_of(&lsm, id),
                &top_n(&lsm, k),
                tokenizer,
            ));
        }
    }

    /// The next-token logits of sequence `seq` (its chunk reached its last token).
    pub(crate) fn on_logits(&mut self, seq: SeqId, row: &[f32], ctx: &mut Ctx) {
        if self.finished {
            return;
        }
        if !self.started {
            if seq != self.root {
                return;
            }
            self.start(row, ctx);
        } else if let Some(run) = self.beam.as_mut() {
            if let Some(b) = run.beams.iter_mut().find(|b| b.seq == seq) {
                b.pending = Some(log_softmax(row));
            }
            self.beam_step_if_ready(ctx);
        } else if let Some(i) = self.choices.iter().position(|c| c.seq == Some(seq)) {
            self.sample_choice(i, row, ctx);
        }
        self.finish_if_done(ctx);
    }

    /// The device plan for `seq`'s next token (see `Sampler::device_plan`): only for a started,
    /// unfinished request sampling choices (not beam search) without a structured-output
    /// constraint; `None` leaves the row to the host.
    pub(crate) fn device_plan(&mut self, seq: SeqId) -> Option<RowPlan> {
        if self.finished || !self.started || self.beam.is_some() {
            return None;
        }
        let choice = self.choices.iter_mut().find(|c| c.seq == Some(seq))?;
        if choice.constraint.is_some() {
            // A structured-output mask applies on the host.
            return None;
        }
        choice.sampler.device_plan()
    }

    /// A token the device chose for `seq` by its `device_plan`: recorded and emitted as `on_logits`
    /// would.
    pub(crate) fn on_device_sampled(&mut self, seq: SeqId, sampled: Sampled, ctx: &mut Ctx) {
        if self.finished {
            return;
        }
        if let Some(i) = self.choices.iter().position(|c| c.seq == Some(seq)) {
            self.choices[i].sampler.accept_device(&sampled);
            self.emit(i, sampled, ctx);
        }
        self.finish_if_done(ctx);
    }

    fn start(&mut self, row: &[f32], ctx: &mut Ctx) {
        self.started = true;
        let _ = self.tx.send(GenerationEvent::Prompt {
            prompt_token_ids: self.prompt.clone(),
            prompt_logprobs: self.prompt_logprobs.take(),
        });
        if self.stop.max_tokens == 0 {
            ctx.sched.remove(self.root);
            for c in &mut self.choices {
                c.finish = Some(length());
            }
            if self.params.use_beam_search {
                self.finish_beams(Vec::new(), ctx);
            }
            return;
        }
        if self.params.use_beam_search {
            let width = self
                .params
                .best_of
                .unwrap_or(self.params.n)
                .max(self.params.n);
            let mut run = BeamRun {
                search: BeamSearch::new(BeamConfig {
                    width,
                    length_penalty: self.params.length_penalty,
                    early_stopping: self.params.early_stopping,
                    prompt_len: self.prompt.len(),
                    max_tokens: self.stop.max_tokens,
                }),
                beams: Vec::new(),
            };
            run.beams.push(Beam {
                seq: self.root,
                live: Live {
                    tokens: Vec::new(),
                    cum: 0.0,
                },
                pending: Some(log_softmax(row)),
            });
            self.beam = Some(run);
            self.beam_step_if_ready(ctx);
            return;
        }
        // Siblings share the prompt's blocks; fork before anyone appends a token.
        self.choices[0].seq = Some(self.root);
        for i in 1..self.choices.len() {
            self.choices[i].seq = ctx.sched.fork(self.root);
        }
        for i in 0..self.choices.len() {
            self.sample_choice(i, row, ctx);
        }
    }

    fn sample_choice(&mut self, i: usize, row: &[f32], ctx: &mut Ctx) {
        let c = &mut self.choices[i];
        if c.seq.is_none() {
            return;
        }
        if c.constraint.is_none() {
            let s = c.sampler.sample(row);
            self.emit(i, s, ctx);
            return;
        }
        match c.pick_constrained(row, None) {
            Some(s) => {
                self.emit(i, s, ctx);
            }
            // The grammar allows nothing more: the output cannot be completed, which is reported
            // as running out of room, never as a stop.
            None => self.end_choice(i, length(), ctx),
        }
    }

    /// Counts the forward pass `step` (once, however many of its sequences it ran).
    pub(crate) fn count_step(&mut self, step: usize) {
        if self.last_step != Some(step) {
            self.last_step = Some(step);
            self.steps += 1;
        }
    }

    /// Fast-forward: the tokens the grammar of each constrained choice the next step decodes forces
    /// next, as its draft (at most `k`, never past `max_tokens` or the context length).
    pub(crate) fn forced_drafts(&mut self, sched: &Scheduler, k: usize) -> Vec<(SeqId, Vec<u32>)> {
        if !self.started || self.beam.is_some() || self.finished {
            return Vec::new();
        }
        let mut out = Vec::new();
        for ci in 0..self.choices.len() {
            let c = &self.choices[ci];
            let Some(seq) = c.seq.filter(|s| sched.is_decoding(*s)) else {
                continue;
            };
            if c.constraint.is_none() {
                continue;
            }
            let k = k.min(self.room(c, sched.tokens(seq).map_or(0, |t| t.len())));
            let Some(constraint) = self.choices[ci].constraint.as_mut() else {
                continue;
            };
            if k > 0 {
                let mut forced = constraint.forced_tokens();
                forced.truncate(k);
                if !forced.is_empty() {
                    out.push((seq, forced));
                }
            }
        }
        out
    }

    /// How many tokens may follow a choice's next one: never past `max_tokens` or the context.
    fn room(&self, c: &Choice, seq_len: usize) -> usize {
        self.stop
            .max_tokens
            .saturating_sub(c.output.len() + 1)
            .min(self.max_model_len.saturating_sub(seq_len + 1))
    }

    /// Ends choice `i` without a new token.
    fn end_choice(&mut self, i: usize, finish: Finish, ctx: &mut Ctx) {
        let hold = self.holds_output();
        let c = &mut self.choices[i];
        let Some(seq) = c.seq.take() else {
            return;
        };
        ctx.sched.remove(seq);
        let mut text = c.detok.finish().unwrap_or_default();
        text = c.stops.push(&text, false).text;
        text.push_str(&c.stops.flush());
        c.finish = Some(finish.clone());
        let delta = ChoiceDelta {
            index: i,
            text,
            token_ids: Vec::new(),
            logprobs: Vec::new(),
            finish: Some(finish),
        };
        if hold {
            merge(c.held.get_or_insert_with(|| empty_delta(i)), delta);
        } else {
            let _ = self.tx.send(GenerationEvent::Delta(delta));
        }
    }

    /// Takes out the matcher of the choice decoding `seq` (see `Core::take_constraints`).
    pub(crate) fn take_constraint(&mut self, seq: SeqId) -> Option<SeqConstraint> {
        let c = self.choices.iter_mut().find(|c| c.seq == Some(seq))?;
        c.constraint.take()
    }

    /// Gives back a matcher taken by `take_constraint`.
    pub(crate) fn put_constraint(&mut self, seq: SeqId, constraint: SeqConstraint) {
        if let Some(c) = self.choices.iter_mut().find(|c| c.seq == Some(seq)) {
            c.constraint = Some(constraint);
        }
    }

    /// Guessed next tokens for each choice the next step decodes (speculative decoding), at most `k`
    /// and never past `max_tokens` or the context length.
    pub(crate) fn drafts(
        &self,
        sched: &Scheduler,
        k: usize,
        propose: &mut dyn FnMut(&[u32], usize) -> Vec<u32>,
    ) -> Vec<(SeqId, Vec<u32>)> {
        if !self.started || self.beam.is_some() || self.finished {
            return Vec::new();
        }
        let mut out = Vec::new();
        // A constrained choice never speculates: a guess is not checked against its grammar.
        for c in self.choices.iter().filter(|c| c.constraint.is_none()) {
            let Some(seq) = c.seq.filter(|s| sched.is_decoding(*s)) else {
                continue;
            };
            let Some(tokens) = sched.tokens(seq) else {
                continue;
            };
            // one token comes from the model itself after the accepted ones
            let k = k.min(self.room(c, tokens.len()));
            if k > 0 {
                let draft = propose(tokens, k);
                if !draft.is_empty() {
                    out.push((seq, draft));
                }
            }
        }
        out
    }

    /// The logits rows of a decode that verified `draft`: row `j` predicts the token after draft
    /// token `j - 1`. Tokens are chosen row by row (`Sampler::sample_draft`) and emitted while they
    /// equal the draft; the first that differs, or the row after the whole draft, ends the step.
    /// Returns how many draft tokens were accepted.
    pub(crate) fn on_draft_logits(
        &mut self,
        seq: SeqId,
        rows: &[f32],
        vocab: usize,
        draft: &[u32],
        ctx: &mut Ctx,
    ) -> usize {
        let Some(i) = self.choices.iter().position(|c| c.seq == Some(seq)) else {
            return 0;
        };
        if self.finished || !self.started {
            return 0;
        }
        let mut accepted = 0;
        // A constrained choice's draft is what its grammar forces (fast-forward): every row is
        // masked by the grammar as a step of its own would be.
        let forced = self.choices[i].constraint.is_some();
        for (j, row) in rows.chunks_exact(vocab).enumerate() {
            let c = &mut self.choices[i];
            let s = match (draft.get(j), forced) {
                (d, true) => match c.pick_constrained(row, d.copied()) {
                    Some(s) => s,
                    None => {
                        self.end_choice(i, length(), ctx);
                        break;
                    }
                },
                (Some(&d), false) => c.sampler.sample_draft(row, d),
                (None, false) => c.sampler.sample(row),
            };
            let matched = draft.get(j) == Some(&s.token_id);
            if !self.emit(i, s, ctx) || !matched {
                break;
            }
            accepted += 1;
        }
        if forced {
            self.forced_tokens += accepted;
        } else {
            self.drafted_tokens += draft.len();
            self.accepted_tokens += accepted;
        }
        if self.choices[i].seq.is_some() {
            ctx.sched.accept_draft(seq, accepted);
        }
        self.finish_if_done(ctx);
        accepted
    }

    /// Records and streams one chosen token of choice `i`; false when the choice finished with it.
    fn emit(&mut self, i: usize, s: crate::engine::sampling::Sampled, ctx: &mut Ctx) -> bool {
        self.first_token.get_or_insert_with(Instant::now);
        let hold = self.holds_output();
        let want_logprobs = self.params.logprobs.is_some();
        let c = &mut self.choices[i];
        let Some(seq) = c.seq else {
            return false;
        };
        let tok = s.token_id;
        c.output.push(tok);
        c.cum_logprob += s.logprob.unwrap_or(0.0) as f64;
        let n = c.output.len();
        let mut finish = self.stop.check(tok, n);
        let active = self.stop.stop_strings_active(n);
        let piece = c.detok.push(tok).unwrap_or_default();
        let pushed = c.stops.push(&piece, active);
        let mut text = pushed.text;
        if let Some(s) = pushed.stopped {
            finish = Some(Finish {
                reason: FinishReason::Stop,
                stop_reason: Some(StopReason::Text(s)),
            });
        } else if finish.is_some() {
            let rest = c.detok.finish().unwrap_or_default();
            let pushed = c.stops.push(&rest, active);
            text.push_str(&pushed.text);
            match pushed.stopped {
                Some(s) => {
                    finish = Some(Finish {
                        reason: FinishReason::Stop,
                        stop_reason: Some(StopReason::Text(s)),
                    })
                }
                None => text.push_str(&c.stops.flush()),
            }
        }
        let logprobs = if want_logprobs {
            let lp = s.logprob.unwrap_or(f32::NAN);
            vec![token_logprob(tok, lp, s.rank, &s.top, ctx.tokenizer)]
        } else {
            Vec::new()
        };
        let live = finish.is_none();
        if finish.is_some() {
            ctx.sched.remove(seq);
            c.seq = None;
            c.finish = finish.clone();
        } else {
            ctx.sched.append_token(seq, tok);
        }
        let delta = ChoiceDelta {
            index: i,
            text,
            token_ids: vec![tok],
            logprobs,
            finish,
        };
        if hold {
            merge(c.held.get_or_insert_with(|| empty_delta(i)), delta);
        } else {
            let _ = self.tx.send(GenerationEvent::Delta(delta));
        }
        live
    }

    /// best_of > n: output is ranked at the end, so nothing streams before.
    fn holds_output(&self) -> bool {
        self.choices.len() > self.params.n
    }

    fn beam_step_if_ready(&mut self, ctx: &mut Ctx) {
        let Some(run) = self.beam.as_mut() else {
            return;
        };
        if run.beams.iter().any(|b| b.pending.is_none()) {
            return;
        }
        self.first_token.get_or_insert_with(Instant::now);
        let rows: Vec<Vec<f32>> = run
            .beams
            .iter_mut()
            .map(|b| b.pending.take().unwrap_or_default())
            .collect();
        let lives: Vec<Live> = run.beams.iter().map(|b| b.live.clone()).collect();
        let stop = &self.stop;
        let out = run.search.step(&lives, &rows, |t, n| stop.check(t, n));
        // Fork extra children before any parent grows; a parent nobody continues is dropped.
        let mut used = vec![false; run.beams.len()];
        let mut next = Vec::with_capacity(out.next.len());
        for &(parent, tok, cum) in &out.next {
            let seq = if used[parent] {
                ctx.sched.fork(run.beams[parent].seq)
            } else {
                used[parent] = true;
                Some(run.beams[parent].seq)
            };
            let Some(seq) = seq else { continue };
            let mut tokens = run.beams[parent].live.tokens.clone();
            tokens.push(tok);
            next.push((seq, tok, Live { tokens, cum }));
        }
        for (b, used) in run.beams.iter().zip(&used) {
            if !used {
                ctx.sched.remove(b.seq);
            }
        }
        for (seq, tok, _) in &next {
            ctx.sched.append_token(*seq, *tok);
        }
        run.beams = next
            .into_iter()
            .map(|(seq, _, live)| Beam {
                seq,
                live,
                pending: None,
            })
            .collect();
        if out.done {
            let lives: Vec<Live> = run.beams.iter().map(|b| b.live.clone()).collect();
            self.finish_beams(lives, ctx);
        }
    }

    fn finish_beams(&mut self, lives: Vec<Live>, ctx: &mut Ctx) {
        let Some(run) = self.beam.take() else {
            self.emit_done(0);
            return;
        };
        for b in &run.beams {
            ctx.sched.remove(b.seq);
        }
        let best = run.search.best(self.params.n, &lives);
        let mut completion = 0;
        for (rank, h) in best.into_iter().enumerate() {
            let mut detok = Detokenizer::with_context(
                ctx.tokenizer.clone(),
                DecodeOptions::from_params(&self.params),
                &self.prompt,
            );
            let mut text = String::new();
            for &t in &h.tokens {
                text.push_str(&detok.push(t).unwrap_or_default());
            }
            text.push_str(&detok.finish().unwrap_or_default());
            completion += h.tokens.len();
            let _ = self.tx.send(GenerationEvent::Delta(ChoiceDelta {
                index: rank,
                text,
                token_ids: h.tokens,
                logprobs: Vec::new(),
                finish: Some(h.finish),
            }));
        }
        self.emit_done(completion);
    }

    fn finish_if_done(&mut self, _ctx: &mut Ctx) {
        if self.finished || !self.started || self.params.use_beam_search {
            return;
        }
        if self.choices.iter().any(|c| c.finish.is_none()) {
            return;
        }
        let mut completion = 0;
        if self.holds_output() {
            let mut order: Vec<usize> = (0..self.choices.len()).collect();
            order.sort_by(|&a, &b| {
                self.choices[b]
                    .cum_logprob
                    .total_cmp(&self.choices[a].cum_logprob)
            });
            for (rank, &i) in order.iter().take(self.params.n).enumerate() {
                let c = &mut self.choices[i];
                completion += c.output.len();
                let mut d = c.held.take().unwrap_or_else(|| empty_delta(rank));
                d.index = rank;
                if d.finish.is_none() {
                    d.finish = c.finish.clone();
                }
                let _ = self.tx.send(GenerationEvent::Delta(d));
            }
        } else {
            completion = self.choices.iter().map(|c| c.output.len()).sum();
        }
        self.emit_done(completion);
    }

    fn emit_done(&mut self, completion_tokens: usize) {
        if self.finished {
            return;
        }
        self.finished = true;
        let metrics = self.metrics(completion_tokens);
        tracing::info!(
            request_id = %self.request_id,
            prompt_tokens = self.prompt.len(),
            completion_tokens,
            cached_prompt_tokens = metrics.cached_prompt_tokens,
            queue_ms = metrics.queue_time.as_secs_f64() * 1e3,
            ttft_ms = metrics.time_to_first_token.as_secs_f64() * 1e3,
            total_ms = metrics.total_time.as_secs_f64() * 1e3,
            decode_tok_s = metrics.decode_tokens_per_s,
            spec_drafted = self.drafted_tokens,
            spec_accepted = self.accepted_tokens,
            forward_steps = self.steps,
            forced_tokens = self.forced_tokens,
            "request finished"
        );
        let _ = self.tx.send(GenerationEvent::Done {
            usage: Usage {
                prompt_tokens: self.prompt.len(),
                completion_tokens,
            },
            metrics,
        });
    }

    fn metrics(&self, completion_tokens: usize) -> RequestMetrics {
        let now = Instant::now();
        let since = |t: Option<Instant>| t.unwrap_or(now).duration_since(self.arrival);
        let decode_time = self
            .first_token
            .map(|t| now.duration_since(t).as_secs_f64())
            .unwrap_or(0.0);
        let decode_tokens = completion_tokens.saturating_sub(1);
        RequestMetrics {
            queue_time: since(self.first_scheduled),
            time_to_first_token: since(self.first_token),
            total_time: now.duration_since(self.arrival),
            decode_tokens_per_s: if decode_time > 0.0 {
                decode_tokens as f64 / decode_time
            } else {
                0.0
            },
            cached_prompt_tokens: self.cached_prompt_tokens,
        }
    }

    /// Ends the request with an error (engine failure); frees its sequences.
    pub fn fail(&mut self, error: crate::engine::EngineError, sched: &mut Scheduler) {
        for s in self.live_seqs() {
            sched.remove(s);
        }
        if !self.finished {
            self.finished = true;
            let _ = self.tx.send(GenerationEvent::Error(error));
        }
    }

    /// Drops the request's sequences (cancellation).
    pub(crate) fn abandon(&mut self, sched: &mut Scheduler) {
        for s in self.live_seqs() {
            sched.remove(s);
        }
        self.finished = true;
    }
}

fn length() -> Finish {
    Finish {
        reason: FinishReason::Length,
        stop_reason: None,
    }
}

fn empty_delta(index: usize) -> ChoiceDelta {
    ChoiceDelta {
        index,
        text: String::new(),
        token_ids: Vec::new(),
        logprobs: Vec::new(),
        finish: None,
    }
}

fn merge(into: &mut ChoiceDelta, d: ChoiceDelta) {
    into.text.push_str(&d.text);
    into.token_ids.extend(d.token_ids);
    into.logprobs.extend(d.logprobs);
    if d.finish.is_some() {
        into.finish = d.finish;
    }
}

fn token_logprob(
    id: u32,
    logprob: f32,
    rank: usize,
    top: &[(u32, f32)],
    tokenizer: &Tokenizer,
) -> TokenLogprob {
    TokenLogprob {
        token_id: id,
        rank,
        token: tokenizer.token_text(id),
        logprob,
        top: top
            .iter()
            .map(|&(t, lp)| (t, tokenizer.token_text(t), lp))
            .collect(),
    }
}
