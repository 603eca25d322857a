//! What lets each request run under its own IndexCache pattern: indexers loaded on first
//! use, and running one layer's attention separately for the sequences that use it as Full
//! and those that use it as Shared.

use std::path::Path;
use std::sync::{Arc, OnceLock};

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

/// The value in `cell`, made by `load` on first use, and whether this call made it. Two
/// threads may both load; the first value stored wins and both return it. The CPU and GPU
/// models keep their lazily loaded indexers this way.
pub(crate) fn get_or_load<T>(cell: &OnceLock<Arc<T>>, load: impl FnOnce() -> Result<T>) -> Result<(Arc<T>, bool)> {
    if let Some(v) = cell.get() {
        return Ok((v.clone(), false));
    }
    let _ = cell.set(Arc::new(load()?));
    let v = cell
        .get()
        .cloned()
        .unwrap_or_else(|| unreachable!("the cell was just set"));
    Ok((v, true))
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
        self.indexer_loaded(layer).map(|(ix, _)| ix)
    }

    /// [`Model::indexer`], and whether this call loaded it.
    fn indexer_loaded(&self, layer: usize) -> Result<(Arc<IndexerWeights>, bool)> {
        get_or_load(&self.indexers[layer - self.range.start], || {
            let ix = load_indexer(&self.dir, &self.cfg, layer)?;
            tracing::info!(layer, "loaded indexer weights for a pattern that makes this layer Full");
            Ok(ix)
        })
    }

    /// Checks that this range can run `pattern` (every layer it makes Full has indexer
    /// weights) and loads the indexers it needs; returns the layers loaded by this call.
    pub fn prepare_pattern(&self, pattern: &IndexPattern) -> Result<Vec<usize>> {
        prepare_indexers(&self.cfg, self.range, pattern, |layer| {
            self.indexer_loaded(layer).map(|(_, loaded)| loaded)
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
    let (segs, xg) = gather_group(pick, segments, x, d);
    let mut topk_g: Vec<Option<TopkRows>> = pick.iter().map(|&i| topk[i].take()).collect();
    let result = f(&segs, &mut topk_g, &xg);
    for (&i, t) in pick.iter().zip(topk_g) {
        topk[i] = t;
    }
    let y = result?;
    let offsets = first_rows(segments);
    let mut row = 0;
    for &i in pick {
        let len = segments[i].len;
        out[offsets[i] * d..(offsets[i] + len) * d].copy_from_slice(&y[row * d..(row + len) * d]);
        row += len;
    }
    Ok(())
}

/// Each segment's first row in the batch.
fn first_rows(segments: &[Segment]) -> Vec<usize> {
    segments
        .iter()
        .scan(0, |row, s| {
            let first = *row;
            *row += s.len;
            Some(first)
        })
        .collect()
}

/// The segments `pick` of the batch (their relays left out: a group's selections travel
/// separately) and their rows of `x` (rows of `d` values).
pub(super) fn gather_group(pick: &[usize], segments: &[Segment], x: &[f32], d: usize) -> (Vec<Segment>, Vec<f32>) {
    let offsets = first_rows(segments);
    let mut xg = Vec::new();
    let mut segs = Vec::with_capacity(pick.len());
    for &i in pick {
        let s = &segments[i];
        xg.extend_from_slice(&x[offsets[i] * d..(offsets[i] + s.len) * d]);
        segs.push(Segment {
            seq: s.seq,
            start: s.start,
            len: s.len,
            relay: None,
        });
    }
    (segs, xg)
}
