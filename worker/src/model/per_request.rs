//! What lets each request run under its own IndexCache pattern: indexers loaded on first
//! use, and running one layer's attention separately for the sequences that use it as Full
//! and those that use it as Shared.

use std::path::Path;
use std::sync::Arc;

use super::weights::{IndexerWeights, Loader};
use super::{Model, Segment, TopkRows};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{Result, WorkerError};
use crate::pattern::IndexPattern;

/// Reads layer `layer`'s indexer weights from the checkpoint in `dir`; an error names the
/// layer when the checkpoint has none (the CPU and GPU models both load indexers lazily).
pub(crate) fn load_indexer(dir: &Path, cfg: &ModelConfig, layer: usize) -> Result<IndexerWeights> {
    let prefix = format!("model.layers.{layer}.self_attn.indexer");
    let ckpt = Checkpoint::open(dir)?;
    if !ckpt.has(&format!("{prefix}.wq_b.weight")) {
        return Err(WorkerError::Pattern(format!(
            "layer {layer} is F (Full) but the checkpoint has no indexer for it (missing tensor `{prefix}.wq_b.weight`)"
        )));
    }
    IndexerWeights::load(&Loader { ckpt: &ckpt, cfg }, &prefix)
}

/// Checks that `pattern` fits the model and has `ensure(layer)` load the indexer of every
/// layer of `range` it makes Full (`ensure` returns whether this call loaded it); returns
/// the layers loaded. Shared by the CPU and GPU models' `prepare_pattern`.
pub(crate) fn prepare_indexers(
    cfg: &ModelConfig,
    range: super::LayerRange,
    pattern: &IndexPattern,
    mut ensure: impl FnMut(usize) -> Result<bool>,
) -> Result<Vec<usize>> {
    if pattern.len() != cfg.num_hidden_layers {
        return Err(WorkerError::Pattern(format!(
            "has {} entries but the model has num_hidden_layers = {}",
            pattern.len(),
            cfg.num_hidden_layers
        )));
    }
    let mut loaded = Vec::new();
    for layer in range.start..range.end {
        if pattern.is_full(layer) && ensure(layer)? {
            loaded.push(layer);
        }
    }
    Ok(loaded)
}

impl Model {
    /// The indexer of global layer `layer` (in this range), loading it from the checkpoint on
    /// first use; an error names the layer when the checkpoint has none.
    pub(super) fn indexer(&self, layer: usize) -> Result<Arc<IndexerWeights>> {
        let cell = &self.indexers[layer - self.range.start];
        if let Some(ix) = cell.get() {
            return Ok(ix.clone());
        }
        let ix = Arc::new(load_indexer(&self.dir, &self.cfg, layer)?);
        tracing::info!(layer, "loaded indexer weights for a pattern that makes this layer Full");
        // Another thread may have loaded it meanwhile: keep whichever landed first.
        let _ = cell.set(ix);
        Ok(cell
            .get()
            .cloned()
            .unwrap_or_else(|| unreachable!("the cell was just set")))
    }

    /// Checks that this range can run `pattern` (every layer it makes Full has indexer
    /// weights) and loads the indexers it needs; returns the layers loaded by this call.
    pub fn prepare_pattern(&self, pattern: &IndexPattern) -> Result<Vec<usize>> {
        prepare_indexers(&self.cfg, self.range, pattern, |layer| {
            if self.indexers[layer - self.range.start].get().is_some() {
                return Ok(false);
            }
            self.indexer(layer).map(|_| true)
        })
    }
}

/// Runs `f` (one attention call) on the segments `pick` only: gathers their rows of `x`,
/// hands over their top-k rows, and scatters the output rows into `out`.
pub(super) fn run_group(
    pick: &[usize],
    segments: &[Segment],
    topk: &mut [Option<TopkRows>],
    x: &[f32],
    out: &mut [f32],
    d: usize,
    mut f: impl FnMut(&[Segment], &mut [Option<TopkRows>], &[f32]) -> Result<Vec<f32>>,
) -> Result<()> {
    let mut offsets = Vec::with_capacity(segments.len());
    let mut row = 0;
    for s in segments {
        offsets.push(row);
        row += s.len;
    }
    let mut xg = Vec::new();
    let mut segs = Vec::with_capacity(pick.len());
    let mut topk_g = Vec::with_capacity(pick.len());
    for &i in pick {
        let s = &segments[i];
        xg.extend_from_slice(&x[offsets[i] * d..(offsets[i] + s.len) * d]);
        // The relay already sits in `topk`; the attention call only needs the positions.
        segs.push(Segment {
            seq: s.seq,
            start: s.start,
            len: s.len,
            relay: None,
        });
        topk_g.push(topk[i].take());
    }
    let result = f(&segs, &mut topk_g, &xg);
    for (&i, t) in pick.iter().zip(topk_g) {
        topk[i] = t;
    }
    let y = result?;
    let mut row = 0;
    for &i in pick {
        let len = segments[i].len;
        out[offsets[i] * d..(offsets[i] + len) * d].copy_from_slice(&y[row * d..(row + len) * d]);
        row += len;
    }
    Ok(())
}
