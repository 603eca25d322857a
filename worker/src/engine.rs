//! The single-process engine: continuous batching of several sequences through the whole
//! model, with chunked prefill, decode, sampling and prompt logprobs.
//!
//! The scheduling, sampling and logprob logic is written once over [`StepBackend`]: the CPU
//! model and cache ([`CpuBackend`], the default) or, with the `cuda` feature, the GPU ones
//! (`crate::gpu::GpuBackend`). Either way logits reach the host sampler the same way.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::ModelConfig;
use crate::error::{Result, WorkerError};
use crate::kv_cache::KvCache;
use crate::model::{Model, Segment, StageInput};
use crate::pattern::IndexPattern;
use crate::sampling::{sample, Rng, SamplingParams};

/// Visits one logits row: `(index into the requested rows, logits, log-probabilities)`.
pub type LogitsVisitor<'a> = dyn FnMut(usize, &[f32], &[f32]) + 'a;

/// What the engine runs a forward pass on: a whole-model range with its KV cache.
pub trait StepBackend {
    /// The model config.
    fn config(&self) -> &ModelConfig;

    /// The start-up IndexCache pattern.
    fn pattern(&self) -> &IndexPattern;

    /// Runs `segments` (token input, one token per row) through every layer, then visits the
    /// logits and log-probabilities of the batch rows `rows`, at most `chunk` rows of logits
    /// materialized at once.
    fn forward_logits(
        &mut self,
        segments: &[Segment],
        tokens: Vec<u32>,
        rows: &[usize],
        chunk: usize,
        visit: &mut LogitsVisitor<'_>,
    ) -> Result<()>;

    /// Frees every cache block of `seq` (idempotent).
    fn release(&mut self, seq: u64);

    /// Cache blocks held by sequences.
    fn used_blocks(&self) -> usize;
}

/// The CPU backend: the model and its host KV cache.
pub struct CpuBackend {
    model: Model,
    cache: KvCache,
}

impl StepBackend for CpuBackend {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn pattern(&self) -> &IndexPattern {
        self.model.pattern()
    }

    fn forward_logits(
        &mut self,
        segments: &[Segment],
        tokens: Vec<u32>,
        rows: &[usize],
        chunk: usize,
        visit: &mut LogitsVisitor<'_>,
    ) -> Result<()> {
        let patterns = vec![self.model.pattern(); segments.len()];
        let (out, at) =
            self.model
                .forward_for_rows(&mut self.cache, segments, &patterns, StageInput::Tokens(tokens), rows)?;
        self.model
            .for_each_logits_row(&out.hidden, &at, chunk, |i, logits, lp| visit(i, logits, lp))
    }

    fn release(&mut self, seq: u64) {
        self.cache.release(seq);
    }

    fn used_blocks(&self) -> usize {
        self.cache.used_blocks()
    }
}

/// One generation request in token ids.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    /// Prompt token ids (non-empty).
    pub prompt: Vec<u32>,
    /// Tokens to generate (0 = only score the prompt).
    pub max_new_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Return the log-probability of every prompt token given the ones before it.
    pub prompt_logprobs: bool,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// An end-of-sequence token was generated.
    Stop,
}

impl FinishReason {
    /// OpenAI's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

/// The result of one request.
#[derive(Clone, Debug)]
pub struct GenerationOutput {
    /// Generated token ids.
    pub token_ids: Vec<u32>,
    /// Natural-log probability of each generated token under the model (before sampling
    /// transforms).
    pub token_logprobs: Vec<f32>,
    /// One entry per prompt token, the first `None`.
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
    /// Why it stopped.
    pub finish_reason: FinishReason,
}

/// Engine sizing.
#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    /// Positions per KV block.
    pub block_size: usize,
    /// KV blocks in the pool.
    pub cache_blocks: usize,
    /// Most prompt tokens processed in one forward pass (bounds activation memory).
    pub prefill_chunk: usize,
    /// Most rows whose logits are materialized at once (bounds `rows × vocab`).
    pub logits_chunk: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            block_size: 64,
            cache_blocks: 4096,
            prefill_chunk: 2048,
            logits_chunk: 64,
        }
    }
}

struct Active {
    seq: u64,
    req: GenerationRequest,
    prefilled: usize,
    out: GenerationOutput,
    rng: Rng,
    done: bool,
}

/// A loaded model with its cache, on the CPU unless built with another [`StepBackend`].
pub struct Engine<B: StepBackend = CpuBackend> {
    backend: B,
    opts: EngineOptions,
    next_seq: u64,
}

impl Engine<CpuBackend> {
    /// Wraps a full-range model.
    pub fn new(model: Model, opts: EngineOptions) -> Result<Self> {
        if !model.is_last() || model.range().start != 0 {
            return Err(WorkerError::invalid("model", "the engine needs the whole layer range"));
        }
        let cache = model.new_cache(opts.block_size, opts.cache_blocks);
        Ok(Engine::with_backend(CpuBackend { model, cache }, opts))
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.backend.model
    }

    /// The KV cache (for inspection).
    pub fn cache(&self) -> &KvCache {
        &self.backend.cache
    }
}

impl<B: StepBackend> Engine<B> {
    /// An engine over `backend` (which holds the whole layer range and its cache; the cache
    /// sizing in `opts` is the backend's business).
    pub fn with_backend(backend: B, opts: EngineOptions) -> Self {
        Engine {
            backend,
            opts,
            next_seq: 1,
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The model config.
    pub fn config(&self) -> &ModelConfig {
        self.backend.config()
    }

    /// The start-up IndexCache pattern.
    pub fn pattern(&self) -> &IndexPattern {
        self.backend.pattern()
    }

    /// Cache blocks held by sequences (0 once every request has finished).
    pub fn used_blocks(&self) -> usize {
        self.backend.used_blocks()
    }

    /// Checks a request against the model's limits.
    pub fn validate(&self, req: &GenerationRequest) -> Result<()> {
        let cfg = self.backend.config();
        if req.prompt.is_empty() {
            return Err(WorkerError::invalid("prompt", "must contain at least one token"));
        }
        if let Some((i, t)) = req
            .prompt
            .iter()
            .enumerate()
            .find(|(_, t)| **t as usize >= cfg.vocab_size)
        {
            return Err(WorkerError::invalid(
                "prompt_ids",
                format!(
                    "token id {t} at index {i} is outside the vocabulary (vocab_size = {})",
                    cfg.vocab_size
                ),
            ));
        }
        if req.prompt.len() > cfg.max_position_embeddings {
            return Err(WorkerError::invalid(
                "prompt_ids",
                format!(
                    "the prompt has {} tokens, past this model's maximum context length of {} tokens (max_position_embeddings)",
                    req.prompt.len(),
                    cfg.max_position_embeddings
                ),
            ));
        }
        let total = req.prompt.len() + req.max_new_tokens;
        if total > cfg.max_position_embeddings {
            return Err(WorkerError::invalid(
                "max_new_tokens",
                format!(
                    "this model's maximum context length is {} tokens (max_position_embeddings), but the request needs {total} ({} prompt + {} new)",
                    cfg.max_position_embeddings,
                    req.prompt.len(),
                    req.max_new_tokens
                ),
            ));
        }
        req.sampling.validate()
    }

    /// Runs requests to completion, batching them together.
    pub fn generate(&mut self, reqs: Vec<GenerationRequest>) -> Result<Vec<GenerationOutput>> {
        for r in &reqs {
            self.validate(r)?;
        }
        let mut active: Vec<Active> = reqs
            .into_iter()
            .map(|req| {
                let seq = self.next_seq;
                self.next_seq += 1;
                let seed = req.sampling.seed.unwrap_or_else(|| {
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos() as u64)
                        ^ seq
                });
                Active {
                    seq,
                    out: GenerationOutput {
                        token_ids: Vec::new(),
                        token_logprobs: Vec::new(),
                        prompt_logprobs: req.prompt_logprobs.then(|| vec![None]),
                        finish_reason: FinishReason::Length,
                    },
                    req,
                    prefilled: 0,
                    rng: Rng::new(seed),
                    done: false,
                }
            })
            .collect();
        let result = self.run(&mut active);
        for a in &active {
            self.backend.release(a.seq);
        }
        result?;
        Ok(active.into_iter().map(|a| a.out).collect())
    }

    fn run(&mut self, active: &mut [Active]) -> Result<()> {
        while active.iter().any(|a| !a.done) {
            self.step(active)?;
        }
        Ok(())
    }

    /// One forward pass: every decoding sequence advances one token, and prompts advance by
    /// up to `prefill_chunk` tokens in total.
    fn step(&mut self, active: &mut [Active]) -> Result<()> {
        let mut budget = self.opts.prefill_chunk.max(1);
        let mut segments = Vec::new();
        let mut tokens = Vec::new();
        // (active index, row in batch, what the row's logits are for)
        let mut wanted: Vec<(usize, usize, RowUse)> = Vec::new();
        for (ai, a) in active.iter().enumerate() {
            if a.done {
                continue;
            }
            let plen = a.req.prompt.len();
            let row0 = tokens.len();
            if a.prefilled < plen {
                if budget == 0 {
                    continue;
                }
                let n = (plen - a.prefilled).min(budget);
                budget -= n;
                tokens.extend_from_slice(&a.req.prompt[a.prefilled..a.prefilled + n]);
                segments.push(Segment {
                    seq: a.seq,
                    start: a.prefilled,
                    len: n,
                    relay: None,
                });
                for i in 0..n {
                    let pos = a.prefilled + i;
                    let is_last = pos + 1 == plen;
                    if a.req.prompt_logprobs && !is_last {
                        wanted.push((ai, row0 + i, RowUse::PromptTarget(a.req.prompt[pos + 1])));
                    }
                    if is_last {
                        wanted.push((ai, row0 + i, RowUse::Sample));
                    }
                }
            } else {
                let last = *a.out.token_ids.last().unwrap_or(&a.req.prompt[plen - 1]);
                let start = plen + a.out.token_ids.len() - 1;
                tokens.push(last);
                segments.push(Segment {
                    seq: a.seq,
                    start,
                    len: 1,
                    relay: None,
                });
                wanted.push((ai, row0, RowUse::Sample));
            }
        }
        let rows: Vec<usize> = wanted.iter().map(|(_, row, _)| *row).collect();
        let mut samples = Vec::new();
        let mut visit = |i: usize, logits: &[f32], lp: &[f32]| {
            let (ai, _, usage) = wanted[i];
            let a = &mut active[ai];
            match usage {
                RowUse::PromptTarget(t) => {
                    if let Some(v) = a.out.prompt_logprobs.as_mut() {
                        v.push(Some(lp[t as usize]));
                    }
                }
                RowUse::Sample => samples.push((ai, sample_row(a, logits, lp))),
            }
        };
        self.backend
            .forward_logits(&segments, tokens, &rows, self.opts.logits_chunk, &mut visit)?;
        for s in &segments {
            if let Some(a) = active.iter_mut().find(|a| a.seq == s.seq) {
                a.prefilled = a.prefilled.max((s.start + s.len).min(a.req.prompt.len()));
            }
        }
        for (ai, picked) in samples {
            self.accept(&mut active[ai], picked);
        }
        for a in active.iter() {
            if a.done {
                self.backend.release(a.seq);
            }
        }
        Ok(())
    }

    fn accept(&self, a: &mut Active, picked: Option<(u32, f32)>) {
        let Some((t, logprob)) = picked else {
            a.done = true;
            return;
        };
        a.out.token_ids.push(t);
        a.out.token_logprobs.push(logprob);
        let eos = self.backend.config().eos_token_ids.contains(&t);
        if eos && !a.req.ignore_eos {
            a.out.finish_reason = FinishReason::Stop;
            a.done = true;
        } else if a.out.token_ids.len() >= a.req.max_new_tokens {
            a.done = true;
        }
    }
}

/// Samples the next token of a sequence (None when it only scores its prompt).
fn sample_row(a: &mut Active, logits: &[f32], logprobs: &[f32]) -> Option<(u32, f32)> {
    if a.req.max_new_tokens == 0 {
        return None;
    }
    let t = sample(logits, &a.req.sampling, &mut a.rng);
    Some((t, logprobs[t as usize]))
}

#[derive(Clone, Copy, Debug)]
enum RowUse {
    /// Log-probability of this prompt token.
    PromptTarget(u32),
    /// Sample the next token.
    Sample,
}
