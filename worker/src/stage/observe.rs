//! What a stage reports about each micro-batch it computes:
//! - a [`pb::StageStats`] entry, appended to the batch's list as it travels the pipeline so
//!   the last stage hands every stage's entry to the coordinator (whose `/metrics` turn them
//!   into per-stage series);
//! - a `stage.forward` span, child of the span that sent the batch here (the coordinator's
//!   dispatch for stage 0, the previous stage's forward after that), whose context travels
//!   on to the next stage.

use std::collections::HashMap;
use std::time::Instant;

use proto::v1::{self as pb};
use tracing::field::Empty;

use super::{Outbound, StageState};
use crate::pattern::IndexPattern;
use crate::telemetry::{self, TraceContext};

/// One micro-batch under observation, from arrival on the compute thread to its outbound
/// message.
pub struct ForwardObservation {
    /// Entries of the stages before this one.
    upstream: Vec<pb::StageStats>,
    started: Instant,
    /// Relay bytes the batch carried in (the count is cumulative along the pipeline).
    relay_in: u64,
    full_layers: u64,
    shared_layers: u64,
    span: tracing::Span,
}

impl ForwardObservation {
    /// Starts observing `req` (taking the upstream stages' entries out of it) in a span
    /// continuing `parent`.
    pub fn start(state: &StageState, req: &mut pb::ForwardRequest, parent: TraceContext) -> Self {
        let (full_layers, shared_layers) = layer_runs(state, &req.segments);
        let range = state.compute().range();
        // Stages append in pipeline order, so the entries so far give this stage's index.
        let stage = req.stage_stats.len();
        let span = tracing::info_span!(
            "stage.forward",
            otel.name = %format!("stage {stage} forward"),
            indexrelay.stage = stage,
            indexrelay.worker = %state.worker_id,
            indexrelay.layers = %format!("{}..{}", range.start, range.end),
            indexrelay.batch_id = req.batch_id,
            indexrelay.segments = req.segments.len(),
            indexrelay.sequences = %req.segments.iter().map(|s| s.seq.to_string()).collect::<Vec<_>>().join(","),
            indexrelay.full_layers = full_layers,
            indexrelay.shared_layers = shared_layers,
            indexrelay.relay_bytes = Empty,
            indexrelay.relay_in_bytes = req.relay_bytes,
        );
        telemetry::set_parent(&span, parent);
        ForwardObservation {
            upstream: std::mem::take(&mut req.stage_stats),
            started: Instant::now(),
            relay_in: req.relay_bytes,
            full_layers,
            shared_layers,
            span,
        }
    }

    /// Appends this stage's entry to the outbound message (activations for the next stage
    /// or the report to the coordinator, including an error report), closes the span and
    /// returns its context for the next hop.
    pub fn finish(mut self, state: &StageState, out: &mut Outbound) -> TraceContext {
        let compute = state.compute();
        let range = compute.range();
        let cache = compute.cache_stats();
        let (used, total) = (cache.used_blocks, cache.capacity_blocks);
        let relay_out = match out {
            Outbound::Next(req) => req.relay_bytes,
            Outbound::Report(_, _) => self.relay_in,
        };
        let own = pb::StageStats {
            worker_id: state.worker_id.clone(),
            layer_start: range.start as u32,
            layer_end: range.end as u32,
            forward_nanos: self.started.elapsed().as_nanos() as u64,
            full_layers: self.full_layers,
            shared_layers: self.shared_layers,
            relay_bytes: relay_out.saturating_sub(self.relay_in),
            kv_blocks_used: used as u64,
            kv_blocks_total: total as u64,
        };
        self.span.record("indexrelay.relay_bytes", own.relay_bytes);
        self.upstream.push(own);
        match out {
            Outbound::Next(req) => req.stage_stats = self.upstream,
            Outbound::Report(_, report) => {
                if !report.error.is_empty() {
                    telemetry::set_error(&self.span, &report.error);
                }
                report.stage_stats = self.upstream;
            }
        }
        telemetry::context_of(&self.span)
    }
}

/// Layer runs of this stage's range over the batch's segments, by kind (Full, Shared), each
/// segment under its own pattern (an empty or unparsable one counts as the stage's own:
/// a bad pattern fails the batch anyway).
fn layer_runs(state: &StageState, segments: &[pb::Segment]) -> (u64, u64) {
    let model = state.compute();
    let range = model.range();
    let layers = model.config().num_hidden_layers;
    let mut parsed: HashMap<&str, Option<IndexPattern>> = HashMap::new();
    let (mut full, mut shared) = (0, 0);
    for s in segments {
        let own = parsed
            .entry(s.index_pattern.as_str())
            .or_insert_with(|| match s.index_pattern.as_str() {
                "" => None,
                text => IndexPattern::parse(text, layers).ok(),
            })
            .as_ref()
            .unwrap_or(model.pattern());
        let f = (range.start..range.end).filter(|l| own.is_full(*l)).count() as u64;
        full += f;
        shared += range.len() as u64 - f;
    }
    (full, shared)
}
