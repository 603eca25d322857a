//! `Stage/Reconfigure`: serving another layer range of the same model without a restart.
//!
//! The coordinator re-plans only while no request runs, so the cache is empty here; the
//! call is refused otherwise (moving live cache entries between workers is not supported).
//! The new range is loaded first, off to the side, and swapped in with a fresh cache between
//! micro-batches, so a failed load leaves the old range serving and a micro-batch never
//! sees one range's model with another range's cache. On a GPU the new range's weights load
//! beside the old ones; the old range's device cache is freed just before the new one is
//! allocated (and re-allocated if that fails), so the device needs room for both ranges'
//! weights at once, not for two caches.

use std::sync::Arc;
use std::time::Instant;

use proto::v1::{self as pb};
use tonic::Status;

use super::StageState;
use crate::model::LayerRange;
use crate::pattern::IndexPattern;

/// Why a stage refuses or fails a reconfiguration.
fn busy(state: &StageState, live: usize) -> Status {
    Status::failed_precondition(format!(
        "stage {}: {live} live sequence(s) hold KV cache here; a stage changes its layer range \
         only when none does (the coordinator re-plans after in-flight requests finish)",
        state.worker_id
    ))
}

/// Loads `req`'s range and swaps it in; blocking (reads the checkpoint).
pub fn reconfigure(state: &StageState, req: &pb::ReconfigureRequest) -> Result<pb::ReconfigureResponse, Status> {
    let _one_at_a_time = state.reconfiguring.lock().unwrap_or_else(|p| p.into_inner());
    let current = state.compute();
    let n = current.config().num_hidden_layers;
    let (start, end) = (req.layer_start as usize, req.layer_end as usize);
    if start >= end || end > n {
        return Err(Status::invalid_argument(format!(
            "stage {}: invalid `layer_start`/`layer_end`: [{start}, {end}) is not a non-empty range within 0..{n}",
            state.worker_id
        )));
    }
    let pattern = if req.index_pattern.is_empty() {
        current.pattern().clone()
    } else {
        IndexPattern::parse(&req.index_pattern, n)
            .map_err(|e| Status::invalid_argument(format!("stage {}: {e}", state.worker_id)))?
    };
    let live = current.cache_stats().sequences;
    if live > 0 {
        return Err(busy(state, live));
    }
    let old = current.range();
    if (old.start, old.end) == (start, end) {
        // Same range: nothing to reload, only what the pattern needs.
        current
            .prepare_pattern(&pattern)
            .map_err(|e| Status::invalid_argument(format!("stage {}: {e}", state.worker_id)))?;
        return Ok(pb::ReconfigureResponse {
            layer_start: start as u32,
            layer_end: end as u32,
            changed: false,
            load_seconds: 0.0,
        });
    }
    let t0 = Instant::now();
    let range = LayerRange::new(start, end);
    let text = pattern.to_string();
    let loaded = current.load_range(&state.model_dir, range, &text).map_err(|e| {
        Status::invalid_argument(format!(
            "stage {}: loading layers {start}..{end}: {e} (still serving {}..{})",
            state.worker_id, old.start, old.end
        ))
    })?;
    let load_seconds = t0.elapsed().as_secs_f64();
    {
        let _between_batches = state.hold_batches();
        // A sequence may have arrived while loading: keep the old range then.
        let live = current.cache_stats().sequences;
        if live > 0 {
            return Err(busy(state, live));
        }
        current.free_cache();
        if let Err(e) = loaded.allocate_cache() {
            drop(loaded);
            let kept = match current.allocate_cache() {
                Ok(()) => format!("still serving {}..{}", old.start, old.end),
                Err(again) => format!(
                    "and the old range {}..{} could not get its cache back either: {again}",
                    old.start, old.end
                ),
            };
            return Err(Status::resource_exhausted(format!(
                "stage {}: allocating the KV cache of layers {start}..{end}: {e} ({kept})",
                state.worker_id
            )));
        }
        state.set_compute(Arc::from(loaded));
        state.rngs.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
    tracing::info!(
        worker = %state.worker_id,
        from = %format!("{}..{}", old.start, old.end),
        to = %format!("{start}..{end}"),
        load_seconds,
        "stage reconfigured to a new layer range"
    );
    if let Some(r) = &state.registration {
        r.publish_range(start, end);
    }
    Ok(pb::ReconfigureResponse {
        layer_start: start as u32,
        layer_end: end as u32,
        changed: true,
        load_seconds,
    })
}
