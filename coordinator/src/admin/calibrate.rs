//! The training-free IndexCache pattern search (DESIGN.md §1), run by the cluster.
//!
//! Start all-Full. At each step, every layer still Full (except layer 0 and, per stage,
//! each stage's first layer) is a candidate: the pattern with that one layer flipped to
//! Shared is scored by the mean next-token negative log-likelihood over every position of
//! the fixed calibration set (the prompt logprobs the last stage computes). All candidates
//! of a step are submitted at once, so the scheduler spreads them over the whole pipeline
//! and its KV capacity. The flip with the lowest loss is committed (ties: the lower layer);
//! the search stops at the target number of Full layers.

use std::sync::Arc;
use std::time::Instant;

use proto::v1::{self as pb, calibrate_event, calibration_sample};
use tokio::sync::mpsc;
use tonic::Status;

use super::AdminApi;
use crate::error::CoordinatorError;
use crate::scheduler::{Event, SchedulerHandle, SubmitRequest};

/// Mean next-token negative log-likelihood over every scored position of every sample, and
/// the number of positions. Entries that are `None` (a sample's first token) are skipped.
/// Summation runs in sample order, then position order, in f64.
pub fn mean_nll(per_sample: &[Vec<Option<f32>>]) -> (f64, u64) {
    let mut sum = 0.0f64;
    let mut n = 0u64;
    for lps in per_sample {
        for lp in lps.iter().flatten() {
            sum -= f64::from(*lp);
            n += 1;
        }
    }
    (if n == 0 { 0.0 } else { sum / n as f64 }, n)
}

/// A validated search.
pub struct Search {
    samples: Arc<Vec<Vec<u32>>>,
    target_full: usize,
    /// Layers that must stay Full.
    forced: Vec<bool>,
    apply: bool,
    /// The search kept each stage's first layer Full: the result belongs to this split.
    per_stage: bool,
}

fn invalid(field: impl Into<String>, msg: impl Into<String>) -> Status {
    CoordinatorError::invalid(field, msg).to_status()
}

impl Search {
    /// Checks the request and tokenizes text samples.
    pub async fn new(api: &AdminApi, req: pb::CalibrateRequest) -> Result<Self, Status> {
        let app = &api.app;
        let n = api.num_layers;
        if req.samples.is_empty() {
            return Err(invalid("samples", "the calibration set is empty"));
        }
        let mut samples = Vec::with_capacity(req.samples.len());
        for (i, s) in req.samples.into_iter().enumerate() {
            let field = format!("samples[{i}]");
            let ids = match s.input {
                Some(calibration_sample::Input::TokenIds(t)) => t.ids,
                Some(calibration_sample::Input::Text(text)) => {
                    let tok = app
                        .tokenizer
                        .clone()
                        .ok_or_else(|| invalid(&field, "this model has no tokenizer; give token_ids"))?;
                    tokio::task::spawn_blocking(move || tok.encode(&text))
                        .await
                        .map_err(|e| Status::internal(e.to_string()))?
                        .map_err(|e| invalid(&field, e.to_string()))?
                }
                None => return Err(invalid(&field, "needs token_ids or text")),
            };
            if ids.len() < 2 {
                return Err(invalid(
                    &field,
                    format!("has {} tokens; at least 2 are needed to score a next token", ids.len()),
                ));
            }
            if ids.len() > app.max_context {
                return Err(invalid(
                    &field,
                    format!(
                        "has {} tokens, over the context limit of {}",
                        ids.len(),
                        app.max_context
                    ),
                ));
            }
            if let Some((j, t)) = ids.iter().enumerate().find(|(_, t)| **t as usize >= app.vocab_size) {
                return Err(invalid(
                    &field,
                    format!(
                        "token id {t} at index {j} is outside the vocabulary (vocab_size = {})",
                        app.vocab_size
                    ),
                ));
            }
            samples.push(ids);
        }
        let mut forced = vec![false; n];
        forced[0] = true;
        if req.per_stage {
            for layers in api.cluster.plan() {
                forced[layers.start] = true;
            }
        }
        let min = forced.iter().filter(|f| **f).count();
        let target_full = req.target_full as usize;
        if target_full < min || target_full > n {
            let why = if req.per_stage {
                format!("layer 0 and each stage's first layer stay Full ({min} layers)")
            } else {
                "layer 0 stays Full".to_string()
            };
            return Err(invalid(
                "target_full",
                format!("must be between {min} and {n} (the model's layers); {why}; got {target_full}"),
            ));
        }
        // The search starts all-Full: every layer needs its indexer.
        let all_full = "F".repeat(n);
        api.prepare_everywhere(&all_full).await.map_err(|e| {
            Status::new(
                e.code(),
                format!(
                    "the search starts from all-Full, which this checkpoint cannot run: {}",
                    e.message()
                ),
            )
        })?;
        Ok(Search {
            samples: Arc::new(samples),
            target_full,
            forced,
            apply: req.apply,
            per_stage: req.per_stage,
        })
    }

    /// Runs the search on a background task; its events arrive on the returned stream. The
    /// search stops (and its sequences are cancelled) when the client goes away.
    pub fn start(
        self,
        api: Arc<AdminApi>,
    ) -> std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::CalibrateEvent, Status>> + Send>> {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let result = self.run(&api, &tx).await;
            let msg = result.map(|r| pb::CalibrateEvent {
                event: Some(calibrate_event::Event::Result(r)),
            });
            let _ = tx.send(msg).await;
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    async fn run(
        self,
        api: &AdminApi,
        tx: &mpsc::Sender<Result<pb::CalibrateEvent, Status>>,
    ) -> Result<pb::CalibrateResult, Status> {
        let t0 = Instant::now();
        let sched = &api.app.scheduler;
        let n = self.forced.len();
        let total_steps = n - self.target_full;
        let mut progress = pb::CalibrateProgress {
            total_steps: total_steps as u32,
            ..Default::default()
        };
        let send = |p: &pb::CalibrateProgress| {
            let mut p = *p;
            p.elapsed_seconds = t0.elapsed().as_secs_f64();
            let ev = pb::CalibrateEvent {
                event: Some(calibrate_event::Event::Progress(p)),
            };
            let tx = tx.clone();
            async move {
                tx.send(Ok(ev))
                    .await
                    .map_err(|_| Status::cancelled("the client went away"))
            }
        };
        let mut pattern = vec![true; n];
        let (baseline, positions) = score(sched, &self.samples, &[to_string(&pattern)], |_| {}).await?[0];
        progress.baseline_loss = Some(baseline);
        send(&progress).await?;
        progress.baseline_loss = None;
        let mut steps = Vec::with_capacity(total_steps);
        for step in 0..total_steps {
            let candidates: Vec<usize> = (0..n).filter(|l| pattern[*l] && !self.forced[*l]).collect();
            let patterns: Vec<String> = candidates
                .iter()
                .map(|&l| {
                    let mut p = pattern.clone();
                    p[l] = false;
                    to_string(&p)
                })
                .collect();
            progress.step = step as u32;
            progress.candidates_total = candidates.len() as u32;
            progress.candidates_done = 0;
            progress.committed = None;
            let (done_tx, mut done_rx) = mpsc::unbounded_channel();
            let scoring = score(sched, &self.samples, &patterns, move |i| {
                let _ = done_tx.send(i);
            });
            tokio::pin!(scoring);
            let losses = loop {
                tokio::select! {
                    r = &mut scoring => break r?,
                    Some(_) = done_rx.recv() => {
                        progress.candidates_done += 1;
                        send(&progress).await?;
                    }
                }
            };
            // Lowest loss wins; on an exact tie the lower layer (the first) stays the choice.
            let mut best = 0;
            for (i, (loss, _)) in losses.iter().enumerate() {
                if *loss < losses[best].0 {
                    best = i;
                }
            }
            let layer = candidates[best];
            pattern[layer] = false;
            let committed = pb::CalibrationStep {
                layer: layer as u32,
                loss: losses[best].0,
            };
            tracing::info!(step, layer, loss = committed.loss, "calibration step committed");
            steps.push(committed);
            progress.step = step as u32 + 1;
            progress.candidates_done = candidates.len() as u32;
            progress.committed = Some(committed);
            send(&progress).await?;
        }
        let pattern = to_string(&pattern);
        if self.apply {
            // As `pattern set` does, re-planning if the planner splits it otherwise, except
            // for a per-stage search, whose result was chosen for the running split.
            api.prepare_everywhere(&pattern).await?;
            let keep_plan = self.per_stage;
            api.activate_pattern(&pattern, keep_plan, super::replan::DEFAULT_DRAIN_TIMEOUT)
                .await?;
            tracing::info!(%pattern, "calibrated pattern applied");
        }
        Ok(pb::CalibrateResult {
            steps,
            pattern,
            baseline_loss: baseline,
            applied: self.apply,
            positions,
        })
    }
}

fn to_string(full: &[bool]) -> String {
    full.iter().map(|f| if *f { 'F' } else { 'S' }).collect()
}

/// Scores every pattern on every sample at once; returns (loss, positions) per pattern, in
/// order, and calls `on_done(i)` as pattern `i` finishes.
async fn score(
    sched: &SchedulerHandle,
    samples: &Arc<Vec<Vec<u32>>>,
    patterns: &[String],
    on_done: impl Fn(usize),
) -> Result<Vec<(f64, u64)>, Status> {
    // Submit everything first so the scheduler can batch across candidates.
    let mut pending = Vec::with_capacity(patterns.len());
    for p in patterns {
        let pattern: Arc<str> = Arc::from(p.as_str());
        let mut rxs = Vec::with_capacity(samples.len());
        for s in samples.iter() {
            let req = SubmitRequest {
                prompt: s.clone(),
                max_new_tokens: 0,
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
                seed: 0,
                prompt_logprobs: true,
                ignore_eos: true,
                pattern: Some(pattern.clone()),
                trace: Default::default(),
            };
            rxs.push(sched.submit(req).map_err(|e| e.to_status())?);
        }
        pending.push(rxs);
    }
    let mut set = tokio::task::JoinSet::new();
    for (i, rxs) in pending.into_iter().enumerate() {
        set.spawn(async move {
            let mut per_sample = Vec::with_capacity(rxs.len());
            for rx in rxs {
                per_sample.push(prompt_logprobs(rx).await?);
            }
            Ok::<_, CoordinatorError>((i, mean_nll(&per_sample)))
        });
    }
    let mut out = vec![(0.0, 0); patterns.len()];
    while let Some(r) = set.join_next().await {
        let (i, loss) = r
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| e.to_status())?;
        out[i] = loss;
        on_done(i);
    }
    Ok(out)
}

/// Waits for one scoring request's prompt logprobs.
async fn prompt_logprobs(mut rx: mpsc::UnboundedReceiver<Event>) -> Result<Vec<Option<f32>>, CoordinatorError> {
    let mut lps = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::PromptLogprobs(v) => lps = Some(v),
            Event::Finished { .. } => break,
            Event::Failed(e) => return Err(e),
            Event::Token { .. } => {}
        }
    }
    lps.ok_or_else(|| CoordinatorError::Internal("a scoring request ended without prompt logprobs".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_nll_skips_first_tokens_and_averages_positions() {
        let (loss, n) = mean_nll(&[vec![None, Some(-1.0), Some(-2.0)], vec![None, Some(-3.0)]]);
        assert_eq!(n, 3);
        assert!((loss - 2.0).abs() < 1e-12);
        assert_eq!(mean_nll(&[vec![None]]), (0.0, 0));
    }

    #[test]
    fn patterns_render_as_f_and_s() {
        assert_eq!(to_string(&[true, false, false, true]), "FSSF");
    }
}
