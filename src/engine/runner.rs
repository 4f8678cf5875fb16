//! The `Engine` handle and the thread that owns the model: requests arrive on a channel; the thread
//! loops over scheduler steps (one forward pass for every running sequence plus prompt chunks), feeds
//! each request its logits rows and streams events back. The handle validates and tokenizes on the
//! caller's side so client errors come back at once.

mod beam;
mod draft;
pub mod load;
mod lora;
mod request;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::task::{Context, Poll};
use std::time::Instant;

use futures::Stream;
use tokio::sync::mpsc;

use self::draft::DraftModel;
use self::lora::Inbox;
use self::request::{Ctx, RequestState, Submission};
use super::batch::{ForwardBatch, LogitsWanted, SeqInput};
use super::constraint::{Grammars, SeqConstraint};
use super::error::EngineError;
use super::lora::AdapterInfo;
use super::parts::{
    Embedder, EngineKind, EngineParts, Executor, Generator, ModelInfo, Proposer, Speculation,
};
use super::sampling::device::RowPlan;
use super::sampling::Sampled;
use super::scheduler::{Scheduled, Scheduler, SeqId, StepPlan};
use super::settings::{EngineSettings, OutputSyntax};
use super::speculative::{NgramProposer, DEFAULT_DISABLE_BY_BATCH_SIZE, MAX_SPECULATIVE_TOKENS};
use super::template::ChatTemplate;
use super::tokenizer::Tokenizer;
use super::types::{EmbedOutput, EmbedRequest, GenerateRequest, GenerationEvent, Prompt};
use super::validate::ValidationLimits;

/// Live counters of the engine thread (KV blocks, sequences), for metrics and tests.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub total_blocks: AtomicUsize,
    pub free_blocks: AtomicUsize,
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub steps: AtomicUsize,
    pub preemptions: AtomicUsize,
    /// Speculative decoding: draft tokens verified, accepted, and decode steps that verified a draft.
    pub spec_draft_tokens: AtomicUsize,
    pub spec_accepted_tokens: AtomicUsize,
    pub spec_verify_steps: AtomicUsize,
    /// Structured output's fast-forward: forced tokens verified, and those the pass accepted (each
    /// one a decode step saved).
    pub forced_draft_tokens: AtomicUsize,
    pub forced_tokens: AtomicUsize,
}

impl EngineStats {
    fn count_forced(&self, drafted: usize, accepted: usize) {
        self.forced_draft_tokens
            .fetch_add(drafted, Ordering::Relaxed);
        self.forced_tokens.fetch_add(accepted, Ordering::Relaxed);
    }
}

/// A cheap, cloneable handle to the engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
    /// The LoRA adapter this handle's requests run with (0: the base model); see `with_adapter`.
    adapter: u32,
}

struct EngineInner {
    info: ModelInfo,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    embedder: Option<Arc<dyn Embedder>>,
    submit: Option<std_mpsc::Sender<Inbox>>,
    stats: Arc<EngineStats>,
    /// `SEED`: draws the seed of each request that has none (reproducible runs).
    seeds: Option<std::sync::Mutex<rand::rngs::StdRng>>,
    /// `MAX_LOGPROBS`.
    max_logprobs: usize,
    /// The LoRA adapters served beside the base model.
    adapters: std::sync::RwLock<Vec<AdapterInfo>>,
    /// The next adapter id (ids are never reused).
    next_adapter: std::sync::atomic::AtomicU32,
    /// `MAX_LORA_RANK` when LoRA is on, and whether adapters may be loaded at run time.
    lora: Option<(usize, bool)>,
    /// Compiles structured-output constraints (generators only).
    grammars: Option<Grammars>,
    output_syntax: OutputSyntax,
}

impl Engine {
    /// Loads the model and starts the engine thread.
    pub fn start(settings: EngineSettings) -> anyhow::Result<Engine> {
        let mut engine = Self::launch(load::load(&settings)?);
        if let Some(inner) = Arc::get_mut(&mut engine.inner) {
            inner.seeds = settings.seed.map(|seed| {
                std::sync::Mutex::new(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(
                    seed,
                ))
            });
            inner.max_logprobs = settings.max_logprobs;
            inner.lora = settings
                .lora
                .as_ref()
                .map(|l| (l.max_lora_rank, settings.allow_runtime_lora_updating));
            inner.output_syntax = settings.output_syntax.clone();
        }
        Ok(engine)
    }

    /// `MAX_LOGPROBS`: the most `logprobs` a request may ask.
    pub fn max_logprobs(&self) -> usize {
        self.inner.max_logprobs
    }

    /// Starts the engine over already loaded parts: the engine thread for a generator, none for an
    /// embedder (`start` with the real model; the runner's tests with their own executor).
    pub(crate) fn launch(parts: EngineParts) -> Engine {
        let EngineParts {
            tokenizer,
            mut info,
            template,
            kind,
        } = parts;
        info.can_generate = matches!(kind, EngineKind::Generator(_));
        info.can_embed = matches!(kind, EngineKind::Embedder(_));
        info.prefix_caching =
            matches!(&kind, EngineKind::Generator(g) if g.scheduler.enable_prefix_caching);
        let stats = Arc::new(EngineStats::default());
        let grammars = match &kind {
            EngineKind::Generator(g) => Some(Grammars::new(
                tokenizer.clone(),
                info.vocab_size,
                g.eos_token_ids.clone(),
            )),
            EngineKind::Embedder(_) => None,
        };
        let (submit, embedder, adapters) = match kind {
            EngineKind::Generator(generator) => {
                let adapters = generator.adapters.clone();
                let submit = Core::start(generator, &tokenizer, &info, &stats);
                (submit, None, adapters)
            }
            EngineKind::Embedder(embedder) => (None, Some(embedder), Vec::new()),
        };
        Engine {
            inner: Arc::new(EngineInner {
                info,
                tokenizer,
                template,
                embedder,
                submit,
                stats,
                seeds: None,
                max_logprobs: super::validate::MAX_LOGPROBS,
                next_adapter: (adapters.iter().map(|a| a.id).max().unwrap_or(0) + 1).into(),
                adapters: adapters.into(),
                lora: None,
                grammars,
                output_syntax: OutputSyntax::default(),
            }),
            adapter: 0,
        }
    }

    /// How the model writes tool calls and reasoning (`TOOL_CALL_PARSER`, `REASONING_PARSER`).
    pub fn output_syntax(&self) -> &OutputSyntax {
        &self.inner.output_syntax
    }

    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    /// The LoRA adapters served beside the base model (`LORA_MODULES`, and those loaded since).
    pub fn adapters(&self) -> Vec<AdapterInfo> {
        self.inner
            .adapters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// This engine with its requests run under the LoRA adapter `name`; `None` when no adapter has
    /// that name.
    pub fn with_adapter(&self, name: &str) -> Option<Engine> {
        let id = self.adapters().iter().find(|a| a.name == name)?.id;
        Some(Engine {
            inner: self.inner.clone(),
            adapter: id,
        })
    }

    /// The adapter this handle's requests run with, if any.
    pub fn adapter(&self) -> Option<AdapterInfo> {
        self.adapters().into_iter().find(|a| a.id == self.adapter)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }

    /// The chat template, if the model (or `CUSTOM_CHAT_TEMPLATE`) has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.inner.template.as_ref()
    }

    pub fn stats(&self) -> &EngineStats {
        &self.inner.stats
    }

    /// Validates and tokenizes the request, then queues it. Errors here are the client's (bad
    /// parameters, prompt too long); later errors arrive as `GenerationEvent::Error`.
    pub fn generate(&self, mut request: GenerateRequest) -> Result<GenerationStream, EngineError> {
        let info = &self.inner.info;
        let Some(submit) = &self.inner.submit else {
            return Err(EngineError::Unsupported(format!(
                "the model {} cannot generate text",
                info.served_model_name
            )));
        };
        request.params.validate(&ValidationLimits {
            max_logprobs: self.inner.max_logprobs,
            ..ValidationLimits::new(info.vocab_size)
        })?;
        if request.params.seed.is_none()
            && let Some(seeds) = &self.inner.seeds
        {
            let mut seeds = seeds.lock().unwrap_or_else(|e| e.into_inner());
            request.params.seed = Some(rand::RngCore::next_u64(&mut *seeds));
        }
        let constraint = match (&request.params.structured, &self.inner.grammars) {
            (None, _) => None,
            (Some(spec), _) if request.params.use_beam_search => {
                return Err(EngineError::invalid(
                    spec.param.clone(),
                    "structured output cannot be combined with beam search",
                ));
            }
            (Some(spec), Some(grammars)) => Some(
                grammars
                    .compile(spec)
                    .map_err(|e| EngineError::invalid(spec.param.clone(), e))?,
            ),
            (Some(_), None) => None,
        };
        let prompt = match request.prompt {
            Prompt::Text(text) => self
                .inner
                .tokenizer
                .encode(&text, request.add_special_tokens)?,
            Prompt::Tokens(ids) => ids,
        };
        if prompt.is_empty() {
            return Err(EngineError::invalid("prompt", "the prompt is empty"));
        }
        if let Some(bad) = prompt.iter().find(|&&t| t as usize >= info.vocab_size) {
            return Err(EngineError::invalid(
                "prompt",
                format!(
                    "token id {bad} is out of range for a vocabulary of {}",
                    info.vocab_size
                ),
            ));
        }
        if prompt.len() >= info.max_model_len {
            return Err(EngineError::PromptTooLong {
                prompt_tokens: prompt.len(),
                max_model_len: info.max_model_len,
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        submit
            .send(Inbox::Request(Box::new(Submission {
                request_id: request.request_id,
                prompt,
                params: request.params,
                constraint,
                tx,
                arrival: Instant::now(),
                adapter: self.adapter,
            })))
            .map_err(|_| EngineError::Unavailable("the engine has stopped".into()))?;
        Ok(GenerationStream::new(rx))
    }

    pub async fn embed(&self, request: EmbedRequest) -> Result<EmbedOutput, EngineError> {
        let Some(embedder) = self.inner.embedder.clone() else {
            return Err(EngineError::Unsupported(format!(
                "the model {} does not serve embeddings",
                self.inner.info.served_model_name
            )));
        };
        tokio::task::spawn_blocking(move || embedder.embed(&request))
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
    }
}

/// The events of one request. Dropping it cancels the request: the scheduler removes its sequences at
/// the next step and frees their blocks.
pub struct GenerationStream {
    rx: mpsc::UnboundedReceiver<GenerationEvent>,
}

impl GenerationStream {
    pub fn new(rx: mpsc::UnboundedReceiver<GenerationEvent>) -> Self {
        Self { rx }
    }
}

impl Stream for GenerationStream {
    type Item = GenerationEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// The engine thread's state.
struct Core {
    executor: Box<dyn Executor>,
    sched: Scheduler,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    max_model_len: usize,
    requests: HashMap<u64, RequestState>,
    owner: HashMap<SeqId, u64>,
    next_key: u64,
    stats: Arc<EngineStats>,
    speculation: Option<Speculating>,
    vocab_size: usize,
    /// The LoRA adapters the executor holds.
    adapters: Vec<u32>,
    /// Structured output's fast-forward is on, and the sequences whose draft this step is the
    /// tokens their grammar forces.
    fast_forward: bool,
    forced: std::collections::HashSet<SeqId>,
}

/// `Speculation` as the engine thread runs it: a draft model's executor wrapped with its
/// per-sequence state.
struct Speculating {
    guesser: Guesser,
    num_tokens: usize,
    disable_by_batch_size: usize,
}

enum Guesser {
    Ngram(NgramProposer),
    Draft(DraftModel),
}

impl Speculating {
    fn new(spec: Speculation, block_size: usize) -> Self {
        let Speculation {
            proposer,
            num_tokens,
            disable_by_batch_size,
        } = spec;
        let guesser = match proposer {
            Proposer::Ngram(p) => Guesser::Ngram(p),
            Proposer::Draft(exec) => Guesser::Draft(DraftModel::new(exec, block_size)),
        };
        Self {
            guesser,
            num_tokens,
            disable_by_batch_size,
        }
    }
}

impl Core {
    /// Starts the engine thread over a generator; `None` if the thread cannot be spawned.
    fn start(
        generator: Generator,
        tokenizer: &Tokenizer,
        info: &ModelInfo,
        stats: &Arc<EngineStats>,
    ) -> Option<std_mpsc::Sender<Inbox>> {
        let Generator {
            executor,
            eos_token_ids,
            scheduler,
            speculation,
            adapters,
            fast_forward,
        } = generator;
        stats
            .total_blocks
            .store(scheduler.num_blocks, Ordering::Relaxed);
        let speculation = speculation.map(|s| Speculating::new(s, scheduler.block_size));
        let (tx, rx) = std_mpsc::channel();
        let core = Core {
            executor,
            sched: Scheduler::new(scheduler),
            tokenizer: tokenizer.clone(),
            eos: eos_token_ids,
            max_model_len: info.max_model_len,
            requests: HashMap::new(),
            owner: HashMap::new(),
            next_key: 0,
            stats: stats.clone(),
            speculation,
            vocab_size: info.vocab_size,
            adapters: adapters.iter().map(|a| a.id).collect(),
            fast_forward,
            forced: Default::default(),
        };
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || core.run(rx))
            .map(|_| tx)
            .ok()
    }

    fn run(mut self, rx: std_mpsc::Receiver<Inbox>) {
        loop {
            if self.requests.is_empty() {
                match rx.recv() {
                    Ok(msg) => self.receive(msg),
                    Err(_) => return,
                }
            }
            while let Ok(msg) = rx.try_recv() {
                self.receive(msg);
            }
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            if stepped.is_err() {
                self.recover_from_panic();
            }
            self.publish_stats();
        }
    }

    fn receive(&mut self, msg: Inbox) {
        match msg {
            Inbox::Request(sub) => self.add(*sub),
            Inbox::Adapter(change) => {
                lora::apply(change, &mut *self.executor, &self.sched, &mut self.adapters)
            }
        }
    }

    fn add(&mut self, sub: Submission) {
        if sub.adapter != 0 && !self.adapters.contains(&sub.adapter) {
            let _ = sub.tx.send(GenerationEvent::Error(EngineError::invalid(
                "model",
                "the LoRA adapter this request names was unloaded",
            )));
            return;
        }
        let key = self.next_key;
        self.next_key += 1;
        let req = RequestState::new(
            sub,
            &mut self.sched,
            &self.tokenizer,
            &self.eos,
            self.max_model_len,
        );
        for s in req.live_seqs() {
            self.owner.insert(s, key);
        }
        self.requests.insert(key, req);
    }

    /// A bug must not take the engine down with every later request: fail what is in flight and
    /// start over with an empty scheduler.
    fn recover_from_panic(&mut self) {
        tracing::error!("engine step panicked; failing the requests in flight");
        let cfg = self.sched.config().clone();
        for (_, mut r) in self.requests.drain() {
            r.fail(
                EngineError::Internal("engine step failed".into()),
                &mut self.sched,
            );
        }
        self.owner.clear();
        self.sched = Scheduler::new(cfg);
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        s.free_blocks
            .store(self.sched.num_free_blocks(), Ordering::Relaxed);
        s.running.store(self.sched.num_running(), Ordering::Relaxed);
        s.waiting.store(self.sched.num_waiting(), Ordering::Relaxed);
    }

    fn drop_cancelled(&mut self) {
        let cancelled: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.is_cancelled())
            .map(|(k, _)| *k)
            .collect();
        for key in cancelled {
            if let Some(mut r) = self.requests.remove(&key) {
                tracing::info!(request_id = %r.request_id, "request cancelled");
                r.abandon(&mut self.sched);
            }
        }
    }

    /// Speculative decoding: a draft for every sequence the next step decodes, unless the batch is
    /// large enough that extra positions no longer pay; an empty one for the others.
    /// (A draft model's guesses are placeholders here, filled in by `fill_drafts` once the scheduler
    /// has given them room.)
    fn propose_drafts(&mut self) {
        let Some(spec) = &self.speculation else {
            return;
        };
        let on = self.sched.num_running() <= spec.disable_by_batch_size;
        let k_max = spec.num_tokens;
        let ngram = match &spec.guesser {
            Guesser::Ngram(p) => Some(*p),
            Guesser::Draft(_) => None,
        };
        let mut propose = |tokens: &[u32], k: usize| match ngram {
            Some(p) => p.propose(tokens, k),
            None => vec![0; k],
        };
        for req in self.requests.values() {
            for seq in req.live_seqs() {
                self.sched.set_draft(seq, Vec::new());
            }
            if on {
                for (seq, draft) in req.drafts(&self.sched, k_max, &mut propose) {
                    self.sched.set_draft(seq, draft);
                }
            }
        }
    }

    /// Structured output's fast-forward: the tokens each constrained sequence's grammar forces next
    /// become its draft for this step, verified in the one forward pass as a speculative draft is
    /// (each row masked by the grammar, so the output is what one step per token gives). As with
    /// speculation, not for a step with more decoding sequences than `DEFAULT_DISABLE_BY_BATCH_SIZE`:
    /// a large batch already fills the arithmetic units, and multi-token rows only slow it.
    fn propose_forced(&mut self) {
        self.forced.clear();
        if !self.fast_forward || self.sched.num_running() > DEFAULT_DISABLE_BY_BATCH_SIZE {
            return;
        }
        for req in self.requests.values_mut() {
            for (seq, draft) in req.forced_drafts(&self.sched, MAX_SPECULATIVE_TOKENS) {
                self.sched.set_draft(seq, draft);
                self.forced.insert(seq);
            }
        }
    }

    fn step(&mut self) {
        self.drop_cancelled();
        self.propose_drafts();
        self.propose_forced();
        let mut plan = self.sched.schedule();
        if let Some(Speculating {
            guesser: Guesser::Draft(draft),
            ..
        }) = &mut self.speculation
        {
            draft.fill(&mut plan.seqs, &self.sched, self.vocab_size, &self.forced);
        }
        self.stats
            .preemptions
            .fetch_add(plan.preempted.len(), Ordering::Relaxed);
        if plan.is_empty() {
            self.unstick();
            return;
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let (batch, wants) = self.build_batch(&plan);
        let on_device = self.device_plans(&plan, &wants);
        let mut masks = self.take_constraints(&plan);
        let forward = if masks.is_empty() {
            self.forward(&plan, &batch, &wants, &on_device)
        } else {
            // The next masks of the constrained sequences are computed while the model runs.
            std::thread::scope(|scope| {
                let work = scope.spawn(|| {
                    for (_, _, c) in masks.iter_mut() {
                        c.prepare();
                    }
                });
                let out = self.forward(&plan, &batch, &wants, &on_device);
                let _ = work.join();
                out
            })
        };
        for (key, seq, c) in masks {
            if let Some(req) = self.requests.get_mut(&key) {
                req.put_constraint(seq, c);
            }
        }
        let Some((logits, ranges, sampled)) = forward else {
            return;
        };
        self.sched.commit(&plan);
        let rows: usize = plan
            .seqs
            .iter()
            .zip(&wants)
            .zip(&ranges)
            .filter(|(_, r)| r.is_some())
            .map(|((sc, w), _)| rows_of(*w, sc.num_new))
            .sum();
        let vocab = logits.len().checked_div(rows).unwrap_or(0);
        for (((sc, want), range), sampled) in plan.seqs.iter().zip(wants).zip(ranges).zip(sampled) {
            let Some(&key) = self.owner.get(&sc.id) else {
                continue;
            };
            if !self.requests.contains_key(&key) {
                continue;
            }
            // A panic in one request's sampling or detokenizing fails that request alone.
            let handled =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match (range, sampled) {
                    (_, Some(s)) => self.on_seq_sampled(key, sc, s),
                    (Some(range), None) => self.on_seq_logits(key, sc, want, &logits[range], vocab),
                    (None, None) => {}
                }));
            if handled.is_err() {
                tracing::error!(
                    seq = sc.id,
                    "handling a sequence's logits panicked; failing its request"
                );
                self.fail_request(key, step_failed("its sampling step failed"));
            }
        }
    }

    /// Which of the step's sequences have their next token chosen on the model's device (when the
    /// executor samples there): a decoding sequence wanting its last row only, no draft to verify,
    /// whose sampler qualifies (`Sampler::device_plan`, which draws the row's uniform).
    fn device_plans(&mut self, plan: &StepPlan, wants: &[LogitsWanted]) -> Vec<Option<RowPlan>> {
        if !self.executor.samples_on_device() {
            return vec![None; plan.seqs.len()];
        }
        plan.seqs
            .iter()
            .zip(wants)
            .map(|(sc, want)| {
                if *want != LogitsWanted::Last || !sc.completes || !sc.draft.is_empty() {
                    return None;
                }
                let key = self.owner.get(&sc.id)?;
                self.requests.get_mut(key)?.device_plan(sc.id)
            })
            .collect()
    }

    /// A token chosen on the device for one scheduled sequence, for its request (`key`).
    fn on_seq_sampled(&mut self, key: u64, sc: &Scheduled, sampled: Sampled) {
        let Some(req) = self.requests.get_mut(&key) else {
            return;
        };
        let mut ctx = Ctx {
            sched: &mut self.sched,
            tokenizer: &self.tokenizer,
        };
        req.on_device_sampled(sc.id, sampled, &mut ctx);
        if req.is_finished() {
            self.requests.remove(&key);
            self.owner.retain(|_, k| *k != key);
        }
    }

    /// The matchers of the constrained sequences this step samples, taken out of their requests
    /// so their masks can be computed beside the forward pass (`put_constraint` gives them back).
    fn take_constraints(&mut self, plan: &StepPlan) -> Vec<(u64, SeqId, SeqConstraint)> {
        let mut out = Vec::new();
        for sc in plan
            .seqs
            .iter()
            .filter(|sc| sc.completes && (sc.draft.is_empty() || self.forced.contains(&sc.id)))
        {
            let Some(&key) = self.owner.get(&sc.id) else {
                continue;
            };
            if let Some(c) = self
                .requests
                .get_mut(&key)
                .and_then(|r| r.take_constraint(sc.id))
            {
                out.push((key, sc.id, c));
            }
        }
        out
    }

    /// The logits of one scheduled sequence, for its request (`key`).
    fn on_seq_logits(
        &mut self,
        key: u64,
        sc: &Scheduled,
        want: LogitsWanted,
        chunk: &[f32],
        vocab: usize,
    ) {
        let Some(req) = self.requests.get_mut(&key) else {
            return;
        };
        let n = chunk.len();
        if !sc.draft.is_empty() {
            let mut ctx = Ctx {
                sched: &mut self.sched,
                tokenizer: &self.tokenizer,
            };
            let accepted = req.on_draft_logits(sc.id, chunk, vocab, &sc.draft, &mut ctx);
            let stats = &self.stats;
            if self.forced.contains(&sc.id) {
                stats.count_forced(sc.draft.len(), accepted);
            } else {
                stats.spec_verify_steps.fetch_add(1, Ordering::Relaxed);
                stats
                    .spec_draft_tokens
                    .fetch_add(sc.draft.len(), Ordering::Relaxed);
                stats
                    .spec_accepted_tokens
                    .fetch_add(accepted, Ordering::Relaxed);
            }
        } else if want == LogitsWanted::All {
            req.collect_prompt_logprobs(sc, chunk, &self.tokenizer);
        }
        if sc.completes && n > 0 && sc.draft.is_empty() {
            let mut ctx = Ctx {
                sched: &mut self.sched,
                tokenizer: &self.tokenizer,
            };
            req.on_logits(sc.id, &chunk[n - vocab..], &mut ctx);
            for s in req.live_seqs() {
                self.owner.insert(s, key);
            }
        }
        if req.is_finished() {
            self.requests.remove(&key);
            self.owner.retain(|_, k| *k != key);
        }
    }

    /// The step's forward pass: the logits and, per scheduled sequence, its rows in them (`None`
    /// for a sequence whose request failed). When the batched pass fails, each sequence is run
    /// alone, so one sequence's failure (a position past the model's table, a kernel's error or
    /// panic) fails its request only and the others go on with their own logits. `None` when
    /// nothing is left to commit.
    fn forward(
        &mut self,
        plan: &StepPlan,
        batch: &ForwardBatch,
        wants: &[LogitsWanted],
        on_device: &[Option<RowPlan>],
    ) -> Option<StepLogits> {
        let rows: Vec<usize> = plan
            .seqs
            .iter()
            .zip(wants)
            .map(|(sc, w)| rows_of(*w, sc.num_new))
            .collect();
        // The rows chosen on the device leave no logits on the host.
        let host_rows: Vec<usize> = rows
            .iter()
            .zip(on_device)
            .map(|(r, d)| if d.is_some() { 0 } else { *r })
            .collect();
        let total: usize = host_rows.iter().sum();
        let mut device_rows = Vec::new();
        let mut row = 0;
        for (r, d) in rows.iter().zip(on_device) {
            if let Some(p) = d {
                device_rows.push((row, *p));
            }
            row += r;
        }
        let error = match self.execute(&plan.copies, batch, &device_rows) {
            Ok((logits, sampled)) if total == 0 || logits.len() % total == 0 => {
                let vocab = logits.len().checked_div(total).unwrap_or(0);
                let mut at = 0;
                let mut sampled = sampled.into_iter();
                let ranges = host_rows
                    .iter()
                    .zip(on_device)
                    .map(|(r, d)| {
                        if d.is_some() {
                            return None;
                        }
                        let range = at..at + r * vocab;
                        at += r * vocab;
                        Some(range)
                    })
                    .collect();
                let sampled = on_device
                    .iter()
                    .map(|d| d.and_then(|_| sampled.next()))
                    .collect();
                return Some((logits, ranges, sampled));
            }
            Ok((logits, _)) => {
                anyhow::anyhow!("model returned {} logits for {total} rows", logits.len())
            }
            Err(e) => e,
        };
        if plan.seqs.len() == 1 {
            self.fail_seq_of(plan.seqs[0].id, &error);
            return None;
        }
        tracing::warn!(
            seqs = plan.seqs.len(),
            "the batched forward pass failed ({}); running its sequences one by one",
            first_line(&error)
        );
        let mut logits = Vec::new();
        let mut ranges = Vec::with_capacity(plan.seqs.len());
        let mut sampled = Vec::with_capacity(plan.seqs.len());
        let mut copies: &[(u32, u32)] = &plan.copies;
        let mut at = 0;
        for (i, sc) in plan.seqs.iter().enumerate() {
            let start: usize = plan.seqs[..i].iter().map(|s| s.num_new).sum();
            if !self.sched.contains(sc.id) {
                // Its request failed with a sibling's pass.
                ranges.push(None);
                sampled.push(None);
                continue;
            }
            let one = ForwardBatch {
                tokens: batch.tokens[start..start + sc.num_new].to_vec(),
                seqs: vec![batch.seqs[i].clone()],
                adapters: batch.adapters.get(i).map(|&a| vec![a]).unwrap_or_default(),
            };
            let device_row: Vec<(usize, RowPlan)> =
                on_device[i].map(|p| (0, p)).into_iter().collect();
            match self.execute(copies, &one, &device_row) {
                Ok((_, mut s)) if !device_row.is_empty() && s.len() == 1 => {
                    copies = &[];
                    ranges.push(None);
                    sampled.push(s.pop());
                }
                Ok((l, _))
                    if device_row.is_empty()
                        && (rows[i] == 0 || (!l.is_empty() && l.len() % rows[i] == 0)) =>
                {
                    copies = &[];
                    logits.extend_from_slice(&l);
                    ranges.push(Some(at..at + l.len()));
                    sampled.push(None);
                    at += l.len();
                }
                Ok((l, _)) => {
                    let e =
                        anyhow::anyhow!("model returned {} logits for {} rows", l.len(), rows[i]);
                    self.fail_seq_of(sc.id, &e);
                    ranges.push(None);
                    sampled.push(None);
                }
                Err(e) => {
                    self.fail_seq_of(sc.id, &e);
                    ranges.push(None);
                    sampled.push(None);
                }
            }
        }
        Some((logits, ranges, sampled))
    }

    /// The executor's forward pass, a panic in it turned into an error.
    /// `on_device`: the rows chosen on the model's device (see `Executor::execute_sampling`).
    fn execute(
        &mut self,
        copies: &[(u32, u32)],
        batch: &ForwardBatch,
        on_device: &[(usize, RowPlan)],
    ) -> anyhow::Result<(Vec<f32>, Vec<Sampled>)> {
        let executor = &mut self.executor;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if on_device.is_empty() {
                executor.execute(copies, batch).map(|l| (l, Vec::new()))
            } else {
                executor.execute_sampling(copies, batch, on_device)
            }
        }))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the forward pass panicked")))
    }

    /// Fails the request owning `seq` after its forward pass failed: the full error in the log, its
    /// first line (never a backtrace) to the client.
    fn fail_seq_of(&mut self, seq: SeqId, error: &anyhow::Error) {
        let Some(&key) = self.owner.get(&seq) else {
            self.sched.remove(seq);
            return;
        };
        let request_id = self
            .requests
            .get(&key)
            .map(|r| r.request_id.clone())
            .unwrap_or_default();
        tracing::error!(%request_id, "forward pass failed: {error:?}");
        let reason = format!("its forward pass failed: {}", first_line(error));
        self.fail_request(key, step_failed(&reason));
    }

    fn fail_request(&mut self, key: u64, error: EngineError) {
        if let Some(mut r) = self.requests.remove(&key) {
            r.fail(error, &mut self.sched);
        }
        self.owner.retain(|_, k| *k != key);
    }

    /// Nothing could be scheduled although sequences exist: sequences holding blocks while they wait
    /// for a sibling (beam search) can starve a preempted one. Make room; if nothing runs at all, the
    /// oldest waiting request cannot fit the cache and fails.
    fn unstick(&mut self) {
        if self.sched.is_idle() {
            return;
        }
        if self.sched.preempt_newest().is_some() {
            self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Some(seq) = self.sched.first_waiting() {
            if let Some(&key) = self.owner.get(&seq) {
                if let Some(mut r) = self.requests.remove(&key) {
                    let msg = "the request does not fit the KV cache".to_string();
                    r.fail(EngineError::Internal(msg), &mut self.sched);
                }
                self.owner.retain(|_, k| *k != key);
            } else {
                self.sched.remove(seq);
            }
        }
    }

    fn build_batch(&mut self, plan: &StepPlan) -> (ForwardBatch, Vec<LogitsWanted>) {
        let mut tokens = Vec::with_capacity(plan.num_tokens());
        let mut seqs = Vec::with_capacity(plan.seqs.len());
        let mut wants = Vec::with_capacity(plan.seqs.len());
        let mut adapters = Vec::with_capacity(plan.seqs.len());
        for sc in &plan.seqs {
            adapters.push(sc.adapter);
            let want = match self
                .owner
                .get(&sc.id)
                .and_then(|k| self.requests.get_mut(k))
            {
                Some(req) => {
                    req.on_scheduled(sc, &self.sched);
                    req.count_step(self.stats.steps.load(Ordering::Relaxed));
                    req.logits_wanted(sc)
                }
                None => LogitsWanted::None,
            };
            let want = if sc.draft.is_empty() {
                want
            } else {
                LogitsWanted::All
            };
            let all = self.sched.tokens(sc.id).unwrap_or_default();
            let real = sc.num_new - sc.draft.len();
            tokens.extend_from_slice(&all[sc.context_len..sc.context_len + real]);
            tokens.extend_from_slice(&sc.draft);
            seqs.push(SeqInput {
                context_len: sc.context_len,
                num_new: sc.num_new,
                block_table: sc.block_table.clone(),
                logits: want,
            });
            wants.push(want);
        }
        let adapters = if adapters.iter().any(|&a| a != 0) {
            adapters
        } else {
            Vec::new()
        };
        (
            ForwardBatch {
                tokens,
                seqs,
                adapters,
            },
            wants,
        )
    }
}

/// A step's logits, and each scheduled sequence's rows in them (`None`: its request failed).
/// A step's host logits, each sequence's rows in them (`None`: failed, or chosen on the device) and
/// the tokens chosen on the device.
type StepLogits = (
    Vec<f32>,
    Vec<Option<std::ops::Range<usize>>>,
    Vec<Option<Sampled>>,
);

/// The error a request gets when the engine could not compute its step.
fn step_failed(reason: &str) -> EngineError {
    EngineError::Internal(format!("the engine could not run this request: {reason}"))
}

/// The first line of an error's message: candle appends a backtrace to its errors' text when
/// `RUST_BACKTRACE` is set, and clients must never see one.
fn first_line(error: &anyhow::Error) -> String {
    let text = error.to_string();
    let line = text.lines().next().unwrap_or_default().trim();
    let mut line = line.to_string();
    if line.len() > 300 {
        let mut cut = 300;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
    }
    line
}

fn rows_of(want: LogitsWanted, num_new: usize) -> usize {
    match want {
        LogitsWanted::None => 0,
        LogitsWanted::Last => 1,
        LogitsWanted::All => num_new,
    }
}

#[cfg(test)]
mod tests;
