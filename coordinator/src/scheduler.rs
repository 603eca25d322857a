//! Continuous batching across the pipeline.
//!
//! One task owns every sequence's state. It keeps up to `max_inflight` micro-batches in the
//! pipeline at once (so every stage has work), each made of prefill chunks and decode steps
//! of sequences that are not already in flight. Stage 0 receives the batch; activations flow
//! worker to worker; the last stage's `TokenReport` comes back through the collector.
//! Sequences are admitted against the KV capacity the workers report, and a finished,
//! failed or cancelled sequence is released on every stage.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::v1::{self as pb, forward_request::Input};
use tokio::sync::mpsc;

use crate::cluster::Cluster;
use crate::control::ClusterControl;
use crate::error::CoordinatorError;

/// A validated, tokenized request.
#[derive(Clone, Debug)]
pub struct SubmitRequest {
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// Tokens to generate.
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass.
    pub top_p: f32,
    /// Top-k (0 = off).
    pub top_k: u32,
    /// Resolved seed.
    pub seed: u64,
    /// Return prompt logprobs.
    pub prompt_logprobs: bool,
    /// Ignore end-of-sequence tokens.
    pub ignore_eos: bool,
    /// IndexCache pattern to run under; `None` takes the active one when submitted (and the
    /// sequence keeps it to the end).
    pub pattern: Option<Arc<str>>,
    /// The request's span context: its micro-batches' spans descend from it.
    pub trace: worker::telemetry::TraceContext,
}

/// Why a sequence finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// Hit `max_new_tokens`.
    Length,
    /// Generated an end-of-sequence token.
    Stop,
}

/// What a request's stream receives.
#[derive(Clone, Debug)]
pub enum Event {
    /// Prompt logprobs, first `None`.
    PromptLogprobs(Vec<Option<f32>>),
    /// One generated token.
    Token {
        /// Token id.
        id: u32,
        /// Its logprob.
        logprob: f32,
    },
    /// The end.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Prompt length.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
    },
    /// The request failed.
    Failed(CoordinatorError),
}

enum Cmd {
    /// The request, its event sender and when it was submitted (for the queue-time metric).
    Submit(SubmitRequest, mpsc::UnboundedSender<Event>, Instant),
    Report(pb::TokenReport),
    StageHealth(usize, bool),
    /// Hold or resume admission; answered once the scheduler task obeys.
    Hold(bool, tokio::sync::oneshot::Sender<()>),
}

/// Scheduler settings.
#[derive(Clone, Debug)]
pub struct SchedulerOptions {
    /// Most prompt tokens per micro-batch.
    pub prefill_chunk: usize,
    /// Micro-batches in flight at once (≥ number of stages keeps every stage busy).
    pub max_inflight: usize,
    /// End-of-sequence ids.
    pub eos: Vec<u32>,
    /// Collector address the last stage reports to.
    pub report_to: String,
    /// KV capacity in blocks (the smallest stage's) and block size.
    pub kv_blocks: usize,
    /// Positions per block.
    pub block_size: usize,
    /// Operator controls (active pattern, drained workers).
    pub control: Arc<ClusterControl>,
}

/// Cheap handle to the scheduler task.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Cmd>,
    healthy: Arc<AtomicBool>,
    running: Arc<AtomicUsize>,
    waiting: Arc<AtomicUsize>,
    control: Arc<ClusterControl>,
    held: Arc<AtomicBool>,
}

impl SchedulerHandle {
    /// Queues a request; events arrive on the returned receiver. Dropping it cancels.
    /// Refused while a worker is drained; a request without a pattern gets the active one.
    pub fn submit(&self, mut req: SubmitRequest) -> Result<mpsc::UnboundedReceiver<Event>, CoordinatorError> {
        if !self.healthy() {
            return Err(CoordinatorError::Unavailable("a pipeline stage is down".into()));
        }
        if let Some(why) = self.control.admission_blocked() {
            return Err(CoordinatorError::Unavailable(why));
        }
        if req.pattern.is_none() {
            req.pattern = Some(self.control.pattern().pattern);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.tx
            .send(Cmd::Submit(req, tx, Instant::now()))
            .map_err(|_| CoordinatorError::Internal("scheduler stopped".into()))?;
        Ok(rx)
    }

    /// Delivers a last-stage report.
    pub fn report(&self, r: pb::TokenReport) {
        let _ = self.tx.send(Cmd::Report(r));
    }

    /// Whether every stage answers.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Sequences in the pipeline.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Sequences waiting for KV capacity.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Operator controls (active pattern, drained workers).
    pub fn control(&self) -> &Arc<ClusterControl> {
        &self.control
    }

    /// Holds (`true`) or resumes admission: while held, new requests are accepted and wait
    /// in the queue, and none starts on the stages (a live re-plan needs them idle). Returns
    /// once the scheduler task has obeyed, so after a hold [`Self::running`] only falls.
    pub async fn hold_admission(&self, held: bool) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Cmd::Hold(held, tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Whether admission is held.
    pub fn admission_held(&self) -> bool {
        self.held.load(Ordering::Relaxed)
    }
}

struct Seq {
    req: SubmitRequest,
    tx: mpsc::UnboundedSender<Event>,
    prefilled: usize,
    generated: Vec<u32>,
    prompt_lps: Vec<Option<f32>>,
    in_flight: bool,
    blocks: usize,
}

/// A segment of a micro-batch: (sequence, first position, rows).
type SegSpan = (u64, usize, usize);

struct Inflight {
    sent: Instant,
    /// (seq, start, len) per segment.
    segs: Vec<SegSpan>,
}

struct State {
    opts: SchedulerOptions,
    cluster: Arc<Cluster>,
    seqs: HashMap<u64, Seq>,
    order: Vec<u64>,
    waiting: VecDeque<(u64, SubmitRequest, mpsc::UnboundedSender<Event>, Instant)>,
    inflight: HashMap<u64, Inflight>,
    next_seq: u64,
    next_batch: u64,
    used_blocks: usize,
    stage_up: Vec<bool>,
    healthy: Arc<AtomicBool>,
    running: Arc<AtomicUsize>,
    waiting_n: Arc<AtomicUsize>,
    held: Arc<AtomicBool>,
}

/// Starts the scheduler task and the stage health poller.
pub fn start(cluster: Arc<Cluster>, opts: SchedulerOptions) -> SchedulerHandle {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handle = SchedulerHandle {
        tx: tx.clone(),
        healthy: Arc::new(AtomicBool::new(true)),
        running: Arc::new(AtomicUsize::new(0)),
        waiting: Arc::new(AtomicUsize::new(0)),
        control: opts.control.clone(),
        held: Arc::new(AtomicBool::new(false)),
    };
    let n = cluster.stages.len();
    let mut st = State {
        opts,
        cluster: cluster.clone(),
        seqs: HashMap::new(),
        order: Vec::new(),
        waiting: VecDeque::new(),
        inflight: HashMap::new(),
        next_seq: 1,
        next_batch: 1,
        used_blocks: 0,
        stage_up: vec![true; n],
        healthy: handle.healthy.clone(),
        running: handle.running.clone(),
        waiting_n: handle.waiting.clone(),
        held: handle.held.clone(),
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            st.admit();
            while st.inflight.len() < st.opts.max_inflight.max(1) {
                match st.build_batch() {
                    Some((req, segs)) => st.send(req, segs).await,
                    None => break,
                }
            }
            st.publish();
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Cmd::Submit(req, tx, at)) => st.enqueue(req, tx, at),
                    Some(Cmd::Report(r)) => st.on_report(r),
                    Some(Cmd::StageHealth(i, up)) => st.on_health(i, up),
                    Some(Cmd::Hold(held, done)) => {
                        // Admission runs at the top of the loop, before counts are published:
                        // from here on nothing starts until resumed.
                        st.held.store(held, Ordering::Relaxed);
                        let _ = done.send(());
                    }
                    None => break,
                },
                _ = tick.tick() => st.reap_cancelled(),
            }
        }
    });
    tokio::spawn(health_poller(cluster, tx));
    handle
}

/// Polls every stage once a second; a stage that does not answer within a second is down.
async fn health_poller(cluster: Arc<Cluster>, tx: mpsc::UnboundedSender<Cmd>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        for i in 0..cluster.stages.len() {
            let info = cluster.info(i, Duration::from_secs(1)).await;
            if let Ok(info) = &info {
                crate::metrics::observe_stage_info(i, info);
            }
            let up = info.is_ok();
            if tx.send(Cmd::StageHealth(i, up)).is_err() {
                return;
            }
        }
    }
}

impl State {
    fn blocks_for(&self, r: &SubmitRequest) -> usize {
        (r.prompt.len() + r.max_new_tokens).div_ceil(self.opts.block_size.max(1))
    }

    fn enqueue(&mut self, req: SubmitRequest, tx: mpsc::UnboundedSender<Event>, submitted: Instant) {
        if self.blocks_for(&req) > self.opts.kv_blocks {
            let _ = tx.send(Event::Failed(CoordinatorError::invalid(
                "max_tokens",
                format!(
                    "prompt ({}) + max_tokens ({}) needs {} KV blocks but the cluster has {}",
                    req.prompt.len(),
                    req.max_new_tokens,
                    self.blocks_for(&req),
                    self.opts.kv_blocks
                ),
            )));
            return;
        }
        let id = self.next_seq;
        self.next_seq += 1;
        self.waiting.push_back((id, req, tx, submitted));
    }

    /// Moves waiting requests in while the KV capacity allows (FIFO, no overtaking); none
    /// while a worker is drained or admission is held for a re-plan.
    fn admit(&mut self) {
        if self.opts.control.admission_blocked().is_some() || self.held.load(Ordering::Relaxed) {
            return;
        }
        while let Some((_, req, _, _)) = self.waiting.front() {
            let need = self.blocks_for(req);
            if self.used_blocks + need > self.opts.kv_blocks {
                break;
            }
            let Some((id, req, tx, submitted)) = self.waiting.pop_front() else {
                break;
            };
            crate::metrics::observe_queue_time(submitted.elapsed());
            self.used_blocks += need;
            self.order.push(id);
            self.seqs.insert(
                id,
                Seq {
                    prompt_lps: vec![None],
                    req,
                    tx,
                    prefilled: 0,
                    generated: Vec::new(),
                    in_flight: false,
                    blocks: need,
                },
            );
        }
    }

    fn publish(&self) {
        self.running.store(self.seqs.len(), Ordering::Relaxed);
        self.waiting_n.store(self.waiting.len(), Ordering::Relaxed);
        self.healthy.store(self.stage_up.iter().all(|u| *u), Ordering::Relaxed);
    }

    fn build_batch(&mut self) -> Option<(pb::ForwardRequest, Vec<SegSpan>)> {
        let mut budget = self.opts.prefill_chunk.max(1);
        let mut segments = Vec::new();
        let mut tokens = Vec::new();
        let mut segs = Vec::new();
        for id in &self.order {
            let Some(s) = self.seqs.get_mut(id) else { continue };
            if s.in_flight {
                continue;
            }
            let plen = s.req.prompt.len();
            let sampling = Some(pb::SegmentSampling {
                temperature: s.req.temperature,
                top_p: s.req.top_p,
                top_k: s.req.top_k,
                seed: s.req.seed,
                step: s.generated.len() as u32,
            });
            let (start, len) = if s.prefilled < plen {
                if budget == 0 {
                    continue;
                }
                let n = (plen - s.prefilled).min(budget);
                budget -= n;
                (s.prefilled, n)
            } else {
                (plen + s.generated.len() - 1, 1)
            };
            let prefill = start < plen;
            let ends_prompt = start + len >= plen;
            let prompt_targets = if prefill && s.req.prompt_logprobs {
                (start..start + len)
                    .filter(|p| p + 1 < plen)
                    .map(|p| s.req.prompt[p + 1])
                    .collect()
            } else {
                Vec::new()
            };
            if prefill {
                tokens.extend_from_slice(&s.req.prompt[start..start + len]);
            } else {
                tokens.push(*s.generated.last().unwrap_or(&s.req.prompt[plen - 1]));
            }
            segments.push(pb::Segment {
                seq: *id,
                start: start as u32,
                len: len as u32,
                relay: None,
                sample_last: ends_prompt && s.req.max_new_tokens > 0,
                prompt_targets,
                sampling,
                index_pattern: s.req.pattern.as_deref().unwrap_or_default().to_string(),
            });
            segs.push((*id, start, len));
            s.in_flight = true;
        }
        if segments.is_empty() {
            return None;
        }
        let batch_id = self.next_batch;
        self.next_batch += 1;
        Some((
            pb::ForwardRequest {
                batch_id,
                segments,
                input: Some(Input::Tokens(pb::TokenIds { ids: tokens })),
                report_to: self.opts.report_to.clone(),
                pattern_epoch: 0,
                relay_bytes: 0,
                relay_raw_bytes: 0,
                stage_stats: Vec::new(),
            },
            segs,
        ))
    }

    async fn send(&mut self, req: pb::ForwardRequest, segs: Vec<SegSpan>) {
        let batch_id = req.batch_id;
        let requests = segs
            .iter()
            .filter_map(|(id, _, _)| self.seqs.get(id))
            .map(|s| &s.req.trace);
        let span = crate::telemetry::dispatch_span(batch_id, segs.len(), requests);
        self.inflight.insert(
            batch_id,
            Inflight {
                sent: Instant::now(),
                segs,
            },
        );
        let trace = worker::telemetry::context_of(&span);
        if let Err(e) = self.cluster.forward_first(req, &trace).await {
            self.fail_batch(batch_id, CoordinatorError::Unavailable(format!("stage 0: {e}")));
        }
    }

    fn fail_batch(&mut self, batch_id: u64, err: CoordinatorError) {
        let Some(b) = self.inflight.remove(&batch_id) else {
            return;
        };
        for (id, _, _) in b.segs {
            self.finish(id, Some(Event::Failed(err.clone())));
        }
    }

    /// Removes a sequence, sends its last event and frees its cache on every stage.
    fn finish(&mut self, id: u64, last: Option<Event>) {
        if let Some(s) = self.seqs.remove(&id) {
            if let Some(ev) = last {
                let _ = s.tx.send(ev);
            }
            self.used_blocks = self.used_blocks.saturating_sub(s.blocks);
            self.order.retain(|x| *x != id);
            let cluster = self.cluster.clone();
            tokio::spawn(async move { cluster.release_everywhere(vec![id]).await });
        }
    }

    fn on_report(&mut self, r: pb::TokenReport) {
        if !r.error.is_empty() {
            self.fail_batch(r.batch_id, CoordinatorError::Unavailable(r.error));
            return;
        }
        crate::metrics::add_relay_bytes(r.relay_bytes);
        crate::metrics::record_stage_stats(&r.stage_stats);
        let Some(b) = self.inflight.remove(&r.batch_id) else {
            return;
        };
        let results: HashMap<u64, pb::SegmentResult> = r.results.into_iter().map(|x| (x.seq, x)).collect();
        for (id, start, len) in b.segs {
            let Some(s) = self.seqs.get_mut(&id) else { continue };
            s.in_flight = false;
            if s.tx.is_closed() {
                // The client went away. A decoding sequence is back in flight as soon as its
                // report is handled, so the periodic reaper would never see it idle: stop it here.
                self.finish(id, None);
                continue;
            }
            let res = results.get(&id);
            let plen = s.req.prompt.len();
            if start < plen {
                s.prefilled = start + len;
                if s.req.prompt_logprobs {
                    if let Some(res) = res {
                        s.prompt_lps.extend(res.prompt_logprobs.iter().map(|x| Some(*x)));
                    }
                    if s.prefilled >= plen {
                        let lps = std::mem::take(&mut s.prompt_lps);
                        let _ = s.tx.send(Event::PromptLogprobs(lps));
                    }
                }
            }
            let done = match res.and_then(|x| x.token.map(|t| (t, x.token_logprob))) {
                Some((t, lp)) => {
                    s.generated.push(t);
                    let _ = s.tx.send(Event::Token { id: t, logprob: lp });
                    if self.opts.eos.contains(&t) && !s.req.ignore_eos {
                        Some(FinishReason::Stop)
                    } else if s.generated.len() >= s.req.max_new_tokens {
                        Some(FinishReason::Length)
                    } else {
                        None
                    }
                }
                None if s.prefilled >= plen && s.req.max_new_tokens == 0 => Some(FinishReason::Length),
                None => None,
            };
            if let Some(reason) = done {
                let ev = Event::Finished {
                    reason,
                    prompt_tokens: plen,
                    completion_tokens: s.generated.len(),
                };
                self.finish(id, Some(ev));
            }
        }
    }

    fn on_health(&mut self, i: usize, up: bool) {
        let was = self.stage_up[i];
        self.stage_up[i] = up;
        if was && !up {
            tracing::warn!(stage = i, "stage stopped answering; failing in-flight requests");
            let ids: Vec<u64> = self.seqs.keys().copied().collect();
            let err = CoordinatorError::Unavailable(format!("stage {i} is down"));
            for id in ids {
                self.finish(id, Some(Event::Failed(err.clone())));
            }
            while let Some((_, _, tx, _)) = self.waiting.pop_front() {
                let _ = tx.send(Event::Failed(err.clone()));
            }
            self.inflight.clear();
        }
    }

    /// Drops sequences whose client went away (their cache is freed everywhere) and fails
    /// batches that have been lost for too long.
    fn reap_cancelled(&mut self) {
        let gone: Vec<u64> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.tx.is_closed() && !s.in_flight)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.finish(id, None);
        }
        self.waiting.retain(|(_, _, tx, _)| !tx.is_closed());
        let lost: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, b)| b.sent.elapsed() > Duration::from_secs(300))
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            self.fail_batch(
                id,
                CoordinatorError::Unavailable("micro-batch lost in the pipeline".into()),
            );
        }
    }
}
