//! The per-segment checks a forward pass makes before it touches the cache, shared by the CPU
//! model and the GPU one so both refuse the same input with the same message.

use super::{LayerRange, Segment, StageInput};
use crate::config::ModelConfig;
use crate::error::{Result, WorkerError};
use crate::kv_cache::KvCache;
use crate::pattern::{IndexPattern, LayerKind};

/// What the checks read from a KV cache, whichever device holds it.
pub trait CacheLengths {
    /// Cached positions of `seq` (0 if unknown).
    fn seq_len(&self, seq: u64) -> usize;
    /// Positions of `seq` holding indexer keys in range-relative layer `layer`.
    fn index_len(&self, layer: usize, seq: u64) -> usize;
}

impl CacheLengths for KvCache {
    fn seq_len(&self, seq: u64) -> usize {
        KvCache::seq_len(self, seq)
    }
    fn index_len(&self, layer: usize, seq: u64) -> usize {
        KvCache::index_len(self, layer, seq)
    }
}

/// Checks a batch's shape before anything runs: one pattern per segment, and one token (or
/// `hidden_size` values) per segment row. Returns the number of rows.
pub fn check_input(
    cfg: &ModelConfig,
    segments: &[Segment],
    patterns: &[&IndexPattern],
    input: &StageInput,
) -> Result<usize> {
    let rows = check_rows(segments, patterns)?;
    let d = cfg.hidden_size;
    match input {
        StageInput::Tokens(t) if t.len() != rows => Err(WorkerError::invalid(
            "input",
            format!("{} tokens for {rows} segment rows", t.len()),
        )),
        StageInput::Hidden(h) if h.len() != rows * d => Err(WorkerError::invalid(
            "hidden",
            format!("{} values for {rows} rows × hidden_size {d}", h.len()),
        )),
        _ => Ok(rows),
    }
}

/// Checks that a batch has one pattern per segment; returns its rows (the segments' lengths
/// summed). The part of [`check_input`] that does not look at the input.
pub fn check_rows(segments: &[Segment], patterns: &[&IndexPattern]) -> Result<usize> {
    if patterns.len() != segments.len() {
        return Err(WorkerError::invalid(
            "index_pattern",
            format!("{} patterns for {} segments", patterns.len(), segments.len()),
        ));
    }
    Ok(segments.iter().map(|s| s.len).sum())
}

/// Checks every segment of a batch for the layer range `range`: non-empty, continuing its
/// cached positions, within `max_position_embeddings`, a pattern of the model's length, a
/// relay where the range starts on a Shared layer, and the same pattern as the sequence's
/// earlier segments (its indexer keys exist exactly on its Full layers).
pub fn check_segments(
    cfg: &ModelConfig,
    range: LayerRange,
    cache: &impl CacheLengths,
    segments: &[Segment],
    patterns: &[&IndexPattern],
) -> Result<()> {
    check_segments_relayed(cfg, range, cache, segments, patterns, &[])
}

/// [`check_segments`] for a batch whose segments `i` with `on_device[i]` got their relay on
/// the device (over NCCL, its shape checked by the stage): their host relay is not required.
pub fn check_segments_relayed(
    cfg: &ModelConfig,
    range: LayerRange,
    cache: &impl CacheLengths,
    segments: &[Segment],
    patterns: &[&IndexPattern],
    on_device: &[bool],
) -> Result<()> {
    let n_layers = cfg.num_hidden_layers;
    for (i, (s, p)) in segments.iter().zip(patterns).enumerate() {
        if s.len == 0 {
            return Err(WorkerError::invalid(
                "segment.len",
                format!("sequence {} has an empty segment", s.seq),
            ));
        }
        let cached = cache.seq_len(s.seq);
        if s.start != cached {
            return Err(WorkerError::invalid(
                "segment.start",
                format!(
                    "sequence {} starts at {} but {cached} positions are cached",
                    s.seq, s.start
                ),
            ));
        }
        if s.start + s.len > cfg.max_position_embeddings {
            return Err(WorkerError::invalid(
                "segment",
                format!(
                    "sequence {} would reach {} positions, over max_position_embeddings = {}",
                    s.seq,
                    s.start + s.len,
                    cfg.max_position_embeddings
                ),
            ));
        }
        if p.len() != n_layers {
            return Err(WorkerError::Pattern(format!(
                "sequence {}: has {} entries but the model has num_hidden_layers = {n_layers}",
                s.seq,
                p.len()
            )));
        }
        if p.kind(range.start) == LayerKind::Shared && !on_device.get(i).copied().unwrap_or(false) {
            check_relay(s, range.start)?;
        }
        for (li, layer) in (range.start..range.end).enumerate() {
            let keys = cache.index_len(li, s.seq);
            let expected = if p.is_full(layer) { s.start } else { 0 };
            if keys != expected {
                return Err(WorkerError::Pattern(format!(
                    "sequence {} changed its IndexCache pattern mid-sequence at layer {layer} (now {}): a sequence keeps the pattern it started with",
                    s.seq, p
                )));
            }
        }
    }
    Ok(())
}

/// Checks that a segment entering on a Shared layer carries one sorted, causal index row per
/// position.
pub fn check_relay(s: &Segment, layer: usize) -> Result<()> {
    let Some(rows) = &s.relay else {
        return Err(WorkerError::invalid(
            "relay",
            format!(
                "layer {layer} is Shared (S) and starts this range, but no top-k indices were relayed for sequence {}",
                s.seq
            ),
        ));
    };
    if rows.len() != s.len {
        return Err(WorkerError::invalid(
            "relay",
            format!(
                "sequence {}: {} relayed rows for a segment of {} positions",
                s.seq,
                rows.len(),
                s.len
            ),
        ));
    }
    for (i, r) in rows.iter().enumerate() {
        let t = (s.start + i) as u32;
        let sorted = r.windows(2).all(|w| w[0] < w[1]);
        if r.is_empty() || !sorted || r.last().is_some_and(|&x| x > t) {
            return Err(WorkerError::invalid(
                "relay",
                format!(
                    "sequence {}: row {i} must be a non-empty ascending subset of [0, {t}]",
                    s.seq
                ),
            ));
        }
    }
    Ok(())
}
