//! The compute side of a stage: decode a micro-batch, run the layer range, and turn the
//! result into the message for the next hop.

use proto::v1::{self as pb, forward_request::Input};

use std::sync::{Mutex, MutexGuard};

use super::{BatchInput, BatchSink, LogitsRequest, Outbound, PeerInput, StageCompute, StageState};
use crate::error::{Result, WorkerError};
use crate::model::{Segment, StageInput};
use crate::pattern::IndexPattern;
use crate::relay;
use crate::sampling::{sample, Rng, SamplingParams};

/// Runs one micro-batch; every failure becomes an error report for the coordinator.
pub fn process(state: &StageState, req: pb::ForwardRequest) -> Outbound {
    let report_to = req.report_to.clone();
    let batch_id = req.batch_id;
    let started = unix_nanos();
    let result = run(state, req);
    state.record_span(pb::BatchSpan {
        batch_id,
        start_unix_nanos: started,
        end_unix_nanos: unix_nanos(),
    });
    match result {
        Ok(out) => out,
        Err(e) => Outbound::Report(
            report_to,
            pb::TokenReport {
                batch_id,
                error: format!("stage {}: {e}", state.worker_id),
                ..Default::default()
            },
        ),
    }
}

/// A decoded micro-batch.
struct Batch {
    segments: Vec<Segment>,
    /// Per segment, its own pattern (`None`: the stage's start-up one).
    patterns: Vec<Option<IndexPattern>>,
    /// Host input rows (`None`: hidden states over NCCL).
    input: Option<StageInput>,
}

/// Decodes `req`'s segments, relays, patterns and input.
fn decode(compute: &dyn StageCompute, req: &mut pb::ForwardRequest) -> Result<Batch> {
    let segments = req
        .segments
        .iter()
        .map(|s| {
            let relay = match &s.relay {
                Some(r) => Some(relay::decode(&r.packed, s.len as usize, s.start as usize)?),
                None => None,
            };
            Ok(Segment {
                seq: s.seq,
                start: s.start as usize,
                len: s.len as usize,
                relay,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let input = match req.input.take() {
        Some(Input::Tokens(t)) => Some(StageInput::Tokens(t.ids)),
        Some(Input::Hidden(h)) => {
            Some(StageInput::Hidden(proto::bytes_to_f32s(&h).ok_or_else(|| {
                WorkerError::invalid("hidden", "length is not a multiple of 4 bytes")
            })?))
        }
        Some(Input::Nccl(_)) => None,
        None => {
            return Err(WorkerError::invalid(
                "input",
                "a micro-batch needs tokens or hidden states",
            ))
        }
    };
    // Each segment runs under its sequence's pattern (empty: the stage's start-up one).
    let layers = compute.config().num_hidden_layers;
    let patterns = req
        .segments
        .iter()
        .map(|s| {
            if s.index_pattern.is_empty() {
                Ok(None)
            } else {
                IndexPattern::parse(&s.index_pattern, layers).map(Some)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Batch {
        segments,
        patterns,
        input,
    })
}

/// Each segment's pattern: its own, else the stage's start-up one.
fn resolve<'a>(compute: &'a dyn StageCompute, patterns: &'a [Option<IndexPattern>]) -> Vec<&'a IndexPattern> {
    patterns
        .iter()
        .map(|p| p.as_ref().unwrap_or(compute.pattern()))
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn run(state: &StageState, mut req: pb::ForwardRequest) -> Result<Outbound> {
    // `Reconfigure` swaps ranges only between batches: the whole batch runs on one range.
    let _batch = state.hold_batches();
    let compute = state.compute();
    let compute = &*compute;
    // Hidden states and relays announced over NCCL are received whatever becomes of the
    // batch, so the previous stage's sends are always matched.
    let inbound = match &req.input {
        Some(Input::Nccl(p)) => Some((PeerInput::announced(p), state.links.inbound_link()?)),
        _ => None,
    };
    let inbound = inbound.as_ref().map(|(a, l)| (a, lock(l)));
    let decoded = decode(compute, &mut req).and_then(|b| {
        if let Some((announced, _)) = &inbound {
            let range = compute.range();
            let topk = compute.config().index_topk;
            announced.check_relays(&b.segments, &resolve(compute, &b.patterns), range.start, topk)?;
        }
        Ok(b)
    });
    let batch = match decoded {
        Ok(b) => b,
        Err(e) => {
            if let Some((announced, link)) = &inbound {
                if let Err(d) = compute.discard_peer_input(announced, link) {
                    tracing::warn!(error = %d, "could not discard the input received over NCCL");
                }
            }
            return Err(e);
        }
    };
    let patterns = resolve(compute, &batch.patterns);
    let input = match (batch.input, &inbound) {
        (Some(i), _) => BatchInput::Host(i),
        (None, Some((announced, link))) => BatchInput::Peer { announced, link },
        (None, None) => unreachable!("an NCCL input has its link"),
    };
    if !compute.is_last() {
        let next = state.links.outbound_link();
        let next = next.as_ref().map(|l| lock(l));
        let sink = match &next {
            Some(link) => BatchSink::Peer(link),
            None => BatchSink::Host,
        };
        let out = compute.forward(&batch.segments, &patterns, input, sink)?;
        for (s, r) in req.segments.iter_mut().zip(&out.relay) {
            s.relay = r.as_ref().map(|rows| {
                let packed = relay::encode(rows, s.start as usize);
                req.relay_bytes += packed.len() as u64;
                req.relay_raw_bytes += relay::raw_bytes(rows) as u64;
                pb::Relay { packed }
            });
        }
        // A relay over NCCL is not compressed: both counters add the bytes sent.
        req.relay_bytes += out.sent.relay_bytes();
        req.relay_raw_bytes += out.sent.relay_bytes();
        req.input = Some(match next {
            Some(_) => Input::Nccl(out.sent.payload()),
            None => Input::Hidden(proto::f32s_to_bytes(&out.hidden)),
        });
        return Ok(Outbound::Next(req));
    }
    let results = sample_and_score(state, compute, &batch.segments, &patterns, input, &req.segments)?;
    Ok(Outbound::Report(
        req.report_to,
        pb::TokenReport {
            batch_id: req.batch_id,
            results,
            error: String::new(),
            relay_bytes: req.relay_bytes,
            relay_raw_bytes: req.relay_raw_bytes,
            // Filled in by the observation.
            stage_stats: Vec::new(),
        },
    ))
}

/// The last stage's work: runs the batch, then prompt logprobs for the requested rows and a
/// sampled token for segments that end on a sampling row.
fn sample_and_score(
    state: &StageState,
    compute: &dyn StageCompute,
    batch: &[Segment],
    patterns: &[&IndexPattern],
    input: BatchInput<'_>,
    segments: &[pb::Segment],
) -> Result<Vec<pb::SegmentResult>> {
    // (segment, row in batch, Some(target) for a prompt logprob / None to sample)
    let mut wanted: Vec<(usize, usize, Option<u32>)> = Vec::new();
    let mut row0 = 0;
    for (si, s) in segments.iter().enumerate() {
        for (i, t) in s.prompt_targets.iter().enumerate().take(s.len as usize) {
            wanted.push((si, row0 + i, Some(*t)));
        }
        if s.sample_last {
            wanted.push((si, row0 + s.len as usize - 1, None));
        }
        row0 += s.len as usize;
    }
    let mut results: Vec<pb::SegmentResult> = segments
        .iter()
        .map(|s| pb::SegmentResult {
            seq: s.seq,
            ..Default::default()
        })
        .collect();
    let rows: Vec<usize> = wanted.iter().map(|w| w.1).collect();
    // Taken after the forward, as the logits are visited (a Release may run meanwhile).
    let mut rngs = None;
    let mut visit = |i: usize, logits: &[f32], lp: &[f32]| {
        let (si, _, target) = wanted[i];
        let r = &mut results[si];
        match target {
            Some(t) => r.prompt_logprobs.push(lp[t as usize]),
            None => {
                let s = &segments[si];
                let p = s.sampling.unwrap_or_default();
                let params = SamplingParams {
                    temperature: p.temperature,
                    top_p: if p.top_p > 0.0 { p.top_p } else { 1.0 },
                    top_k: p.top_k as usize,
                    seed: Some(p.seed),
                };
                let rngs = rngs.get_or_insert_with(|| state.rngs.lock().unwrap_or_else(|p| p.into_inner()));
                let rng = rngs.entry(s.seq).or_insert_with(|| Rng::new(p.seed));
                let tok = sample(logits, &params, rng);
                r.token = Some(tok);
                r.token_logprob = lp[tok as usize];
            }
        }
    };
    let logits = LogitsRequest {
        rows: &rows,
        chunk: state.logits_chunk,
        visit: &mut visit,
    };
    compute.forward(batch, patterns, input, BatchSink::Logits(logits))?;
    Ok(results)
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
