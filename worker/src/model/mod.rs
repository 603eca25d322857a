//! The DSA model over a contiguous layer range: loading and the batched forward pass.
//!
//! A batch is a list of sequence segments (consecutive new positions of one sequence) whose
//! rows are concatenated. Projections and MLPs run over all rows at once; attention and the
//! indexer run per segment against that sequence's paged cache.

mod attention;
mod checks;
mod moe;
mod output_rows;
mod per_request;
pub mod weights;

pub use checks::{check_input, check_relay, check_rows, check_segments, check_segments_relayed, CacheLengths};
#[cfg(feature = "cuda")]
pub(crate) use per_request::{get_or_load, load_indexer, prepare_indexers};

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{Result, WorkerError};
use crate::kv_cache::{KvCache, LayerCacheShape};
use crate::pattern::{IndexPattern, LayerKind};
use crate::rope::RopeTable;
use per_request::run_group;
use weights::{IndexerWeights, LayerWeights, Linear, Loader, Mlp};

/// Top-k key positions per query row of a segment (each row sorted ascending).
pub type TopkRows = Vec<Vec<u32>>;

/// A half-open range of decoder layers `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerRange {
    /// First layer.
    pub start: usize,
    /// One past the last layer.
    pub end: usize,
}

impl LayerRange {
    /// The range `[start, end)`.
    pub fn new(start: usize, end: usize) -> Self {
        LayerRange { start, end }
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// One sequence's slice of a forward batch.
#[derive(Clone, Debug)]
pub struct Segment {
    /// Sequence id (cache key).
    pub seq: u64,
    /// Position of the first new row (= tokens already cached for this sequence).
    pub start: usize,
    /// New rows.
    pub len: usize,
    /// Top-k rows relayed from upstream; required when the range starts on a Shared layer.
    pub relay: Option<TopkRows>,
}

/// What enters a stage: token ids (first stage) or hidden states from the previous stage.
#[derive(Clone, Debug)]
pub enum StageInput {
    /// Token ids, one per row.
    Tokens(Vec<u32>),
    /// Hidden states, `rows × hidden_size`.
    Hidden(Vec<f32>),
}

/// What leaves a stage.
#[derive(Clone, Debug)]
pub struct StageOutput {
    /// Hidden states after the last layer of the range (before the final norm), `rows × d`.
    pub hidden: Vec<f32>,
    /// Per segment, the top-k rows the next layer needs when it is Shared (else `None`).
    pub relay: Vec<Option<TopkRows>>,
    /// Full layers run in this pass.
    pub full_layers_run: usize,
    /// Shared layers run in this pass.
    pub shared_layers_run: usize,
    /// Wall time spent in the lightning indexer (projections, scoring, top-k).
    pub indexer_seconds: f64,
    /// Wall time spent in attention over the selected keys (see
    /// [`attention::AttnSeconds::core`]).
    pub attention_seconds: f64,
}

/// The model restricted to one layer range.
///
/// `pattern` is the start-up IndexCache pattern: its Full layers' indexers are loaded with
/// the model. A forward pass may run each segment under its own pattern
/// ([`Model::forward_with_patterns`]); an indexer that pattern needs is then loaded from the
/// checkpoint on first use (or ahead of time by [`Model::prepare_pattern`]).
pub struct Model {
    cfg: ModelConfig,
    pattern: IndexPattern,
    range: LayerRange,
    dir: PathBuf,
    embed: Option<Vec<f32>>,
    /// Layer weights; their attention views carry no indexer (see `indexers`).
    layers: Vec<LayerWeights>,
    /// Per layer of the range, its indexer once loaded.
    indexers: Vec<OnceLock<std::sync::Arc<IndexerWeights>>>,
    norm: Option<Vec<f32>>,
    lm_head: Option<Linear>,
    rope: RopeTable,
}

impl Model {
    /// Loads the whole model from `dir`.
    pub fn load(dir: &Path, pattern_override: Option<&str>) -> Result<Self> {
        let cfg = ModelConfig::from_dir(dir)?;
        let n = cfg.num_hidden_layers;
        Self::load_range(dir, cfg, pattern_override, LayerRange::new(0, n))
    }

    /// Loads layers `range` only: embeddings when it starts at 0, norm and head when it ends
    /// at the last layer. Shared layers load no indexer weights.
    pub fn load_range(dir: &Path, cfg: ModelConfig, pattern_override: Option<&str>, range: LayerRange) -> Result<Self> {
        let n = cfg.num_hidden_layers;
        if range.is_empty() || range.end > n {
            return Err(WorkerError::invalid(
                "layer_range",
                format!(
                    "[{}, {}) is not a non-empty range within 0..{n}",
                    range.start, range.end
                ),
            ));
        }
        let (pattern, _) = IndexPattern::resolve(&cfg, pattern_override)?;
        let ckpt = Checkpoint::open(dir)?;
        for i in range.start..range.end {
            let name = format!("model.layers.{i}.self_attn.indexer.wq_b.weight");
            if pattern.is_full(i) && !ckpt.has(&name) {
                return Err(WorkerError::Pattern(format!(
                    "layer {i} is F (Full) but the checkpoint has no indexer for it (missing tensor `{name}`)"
                )));
            }
        }
        let l = Loader { ckpt: &ckpt, cfg: &cfg };
        let d = cfg.hidden_size;
        let mut layers = (range.start..range.end)
            .map(|i| LayerWeights::load(&l, i, pattern.is_full(i)))
            .collect::<Result<Vec<_>>>()?;
        let indexers = layers
            .iter_mut()
            .map(|lw| {
                let cell = OnceLock::new();
                if let Some(ix) = lw.attn.indexer.take() {
                    let _ = cell.set(ix);
                }
                cell
            })
            .collect();
        let first = range.start == 0;
        let last = range.end == n;
        let embed = if first || (last && cfg.tie_word_embeddings) {
            Some(l.tensor("model.embed_tokens.weight", &[cfg.vocab_size, d])?)
        } else {
            None
        };
        let (norm, lm_head) = if last {
            let head = if cfg.tie_word_embeddings && !ckpt.has("lm_head.weight") {
                Linear {
                    w: embed.clone().unwrap_or_default(),
                    out: cfg.vocab_size,
                    inp: d,
                }
            } else {
                l.linear("lm_head", cfg.vocab_size, d)?
            };
            (Some(l.vector("model.norm.weight", d)?), Some(head))
        } else {
            (None, None)
        };
        let rope = RopeTable::new(&cfg.rope, cfg.qk_rope_head_dim);
        Ok(Model {
            embed: if first { embed } else { None },
            cfg,
            pattern,
            range,
            dir: dir.to_path_buf(),
            layers,
            indexers,
            norm,
            lm_head,
            rope,
        })
    }

    /// The model config.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The active IndexCache pattern (whole model).
    pub fn pattern(&self) -> &IndexPattern {
        &self.pattern
    }

    /// The loaded layer range.
    pub fn range(&self) -> LayerRange {
        self.range
    }

    /// Whether this range ends at the last layer (holds the norm and head).
    pub fn is_last(&self) -> bool {
        self.lm_head.is_some()
    }

    /// Bytes of indexer weights held by each loaded layer (0 where no pattern used so far
    /// made the layer Full).
    pub fn indexer_weight_bytes(&self) -> Vec<usize> {
        self.indexers
            .iter()
            .map(|ix| ix.get().map_or(0, |ix| ix.bytes()))
            .collect()
    }

    /// The cache row widths of each loaded layer.
    pub fn cache_shapes(&self) -> Vec<LayerCacheShape> {
        (self.range.start..self.range.end)
            .map(|i| LayerCacheShape {
                latent: self.cfg.kv_lora_rank,
                rope: self.cfg.qk_rope_head_dim,
                index_key: self.pattern.is_full(i).then_some(self.cfg.index_head_dim),
            })
            .collect()
    }

    /// A KV cache sized for this range.
    pub fn new_cache(&self, block_size: usize, capacity_blocks: usize) -> KvCache {
        KvCache::new(self.cache_shapes(), block_size, capacity_blocks)
    }

    fn embed_tokens(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let embed = self.embed.as_ref().ok_or_else(|| {
            WorkerError::invalid(
                "input",
                format!(
                    "layer range starts at {}, so it takes hidden states, not tokens",
                    self.range.start
                ),
            )
        })?;
        let d = self.cfg.hidden_size;
        let mut h = Vec::with_capacity(tokens.len() * d);
        for (i, &t) in tokens.iter().enumerate() {
            if t as usize >= self.cfg.vocab_size {
                return Err(WorkerError::invalid(
                    "prompt_ids",
                    format!(
                        "token id {t} at index {i} is outside the vocabulary (vocab_size = {})",
                        self.cfg.vocab_size
                    ),
                ));
            }
            h.extend_from_slice(&embed[t as usize * d..(t as usize + 1) * d]);
        }
        Ok(h)
    }

    /// Runs the range over a batch of segments under the start-up pattern, updating their
    /// cache entries.
    pub fn forward(&self, cache: &mut KvCache, segments: &[Segment], input: StageInput) -> Result<StageOutput> {
        let patterns = vec![&self.pattern; segments.len()];
        self.forward_with_patterns(cache, segments, &patterns, input)
    }

    /// Runs the range over a batch of segments, segment `i` under `patterns[i]` (a sequence
    /// must keep one pattern for its whole life: a change is refused, since its cached
    /// indexer keys would not match).
    pub fn forward_with_patterns(
        &self,
        cache: &mut KvCache,
        segments: &[Segment],
        patterns: &[&IndexPattern],
        input: StageInput,
    ) -> Result<StageOutput> {
        self.forward_keeping(cache, segments, patterns, input, None)
    }

    /// Runs the batch as [`Model::forward_with_patterns`] does, for a caller that reads the
    /// output of batch rows `rows` only (the rows whose logits it wants; any order, repeats
    /// allowed). On the range that holds the final layer, that layer computes its attention
    /// and MLP for those rows alone; every row's cache entries are still written (see
    /// `output_rows`). The returned `hidden` holds the distinct rows of `rows`, ascending;
    /// the second value gives, per entry of `rows`, its row there (what
    /// [`Model::for_each_logits_row`] takes).
    pub fn forward_for_rows(
        &self,
        cache: &mut KvCache,
        segments: &[Segment],
        patterns: &[&IndexPattern],
        input: StageInput,
        rows: &[usize],
    ) -> Result<(StageOutput, Vec<usize>)> {
        let mut keep = rows.to_vec();
        keep.sort_unstable();
        keep.dedup();
        let out = self.forward_keeping(cache, segments, patterns, input, Some(&keep))?;
        // Every row is in `keep`, so the search always finds it.
        let at = rows
            .iter()
            .map(|r| keep.binary_search(r).unwrap_or_else(|i| i))
            .collect();
        Ok((out, at))
    }

    /// The forward pass; with `keep`, only those rows' hidden states are returned, and the
    /// final layer (when this range holds it) runs its attention and MLP for them alone.
    fn forward_keeping(
        &self,
        cache: &mut KvCache,
        segments: &[Segment],
        patterns: &[&IndexPattern],
        input: StageInput,
        keep: Option<&[usize]>,
    ) -> Result<StageOutput> {
        let d = self.cfg.hidden_size;
        let rows = checks::check_input(&self.cfg, segments, patterns, &input)?;
        if let Some(keep) = keep {
            output_rows::check_keep(keep, rows)?;
        }
        let mut hidden = match input {
            StageInput::Tokens(t) => self.embed_tokens(&t)?,
            StageInput::Hidden(h) => h,
        };
        checks::check_segments(&self.cfg, self.range, cache, segments, patterns)?;
        let n_layers = self.cfg.num_hidden_layers;
        // Per layer, the indexer when some segment runs it as Full (loaded now, before the
        // cache changes, so a missing indexer fails the batch cleanly).
        let layer_indexers = (self.range.start..self.range.end)
            .map(|layer| {
                if patterns.iter().any(|p| p.is_full(layer)) {
                    self.indexer(layer).map(Some)
                } else {
                    Ok(None)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let needed: usize = segments
            .iter()
            .map(|s| cache.blocks_needed(s.seq, s.start + s.len))
            .sum();
        if needed > cache.free_blocks() {
            return Err(WorkerError::CacheFull {
                needed,
                free: cache.free_blocks(),
                total: cache.capacity_blocks(),
            });
        }
        for s in segments {
            cache.grow(s.seq, s.start + s.len)?;
        }
        let mut topk: Vec<Option<TopkRows>> = segments.iter().map(|s| s.relay.clone()).collect();
        let mut stats = LayerStats::default();
        let prune = keep.filter(|k| k.len() < rows && self.range.end == n_layers);
        let mut kept = None;
        for (li, layer) in self.layers.iter().enumerate() {
            let global = self.range.start + li;
            let ix = &layer_indexers[li];
            let full_segs: Vec<bool> = patterns.iter().map(|p| p.is_full(global)).collect();
            stats.full += usize::from(full_segs.iter().any(|f| *f));
            stats.shared += usize::from(full_segs.iter().any(|f| !*f));
            match prune {
                Some(keep) if global == n_layers - 1 => {
                    let mut x = vec![0.0; rows * d];
                    kernels::rms_norm(&hidden, &layer.input_norm, self.cfg.rms_norm_eps, &mut x);
                    self.fill_layer_cache(li, ix, &x, segments, patterns, cache, &mut stats)?;
                    let batch = output_rows::keep_rows(segments, &topk, keep);
                    let pats: Vec<&IndexPattern> = batch.origin.iter().map(|&i| patterns[i]).collect();
                    let mut h = output_rows::gather_rows(&hidden, keep, d);
                    let mut t = batch.topk;
                    if !keep.is_empty() {
                        self.run_layer(li, ix, &mut h, &batch.segments, &pats, &mut t, cache, &mut stats)?;
                    }
                    kept = Some(h);
                }
                _ => self.run_layer(li, ix, &mut hidden, segments, patterns, &mut topk, cache, &mut stats)?,
            }
        }
        let hidden = match (kept, keep) {
            (Some(h), _) => h,
            (None, Some(keep)) if keep.len() < rows => output_rows::gather_rows(&hidden, keep, d),
            (None, _) => hidden,
        };
        // A segment's top-k travels on when the next stage starts on a layer that is Shared
        // under that segment's pattern (never after the final layer, the only one pruned).
        let relay = topk
            .into_iter()
            .zip(patterns)
            .map(|(t, p)| {
                let next_shared = self.range.end < n_layers && p.kind(self.range.end) == LayerKind::Shared;
                if next_shared {
                    t
                } else {
                    None
                }
            })
            .collect();
        Ok(StageOutput {
            hidden,
            relay,
            full_layers_run: stats.full,
            shared_layers_run: stats.shared,
            indexer_seconds: stats.seconds.indexer,
            attention_seconds: stats.seconds.core,
        })
    }

    /// The attention context of range layer `li`.
    fn attn_ctx(&self, li: usize) -> attention::AttnCtx<'_> {
        attention::AttnCtx {
            cfg: &self.cfg,
            rope: &self.rope,
            layer: self.range.start + li,
            cache_layer: li,
        }
    }

    /// One decoder layer over the batch: attention (each segment Full or Shared under its
    /// pattern) and MLP, added into `hidden`; adds its attention times to `stats`.
    #[allow(clippy::too_many_arguments)]
    fn run_layer(
        &self,
        li: usize,
        indexer: &Option<std::sync::Arc<IndexerWeights>>,
        hidden: &mut [f32],
        segments: &[Segment],
        patterns: &[&IndexPattern],
        topk: &mut [Option<TopkRows>],
        cache: &mut KvCache,
        stats: &mut LayerStats,
    ) -> Result<()> {
        let d = self.cfg.hidden_size;
        let rows = hidden.len() / d;
        let layer = &self.layers[li];
        let global = self.range.start + li;
        let mut x = vec![0.0; rows * d];
        kernels::rms_norm(hidden, &layer.input_norm, self.cfg.rms_norm_eps, &mut x);
        let ctx = self.attn_ctx(li);
        let full_segs: Vec<bool> = patterns.iter().map(|p| p.is_full(global)).collect();
        let first = full_segs.first().copied().unwrap_or(false);
        let seconds = &mut stats.seconds;
        let attn = if full_segs.iter().all(|f| *f == first) {
            let view = layer.attn.view(if first { indexer.clone() } else { None });
            attention::forward(&ctx, &view, &x, segments, topk, cache, seconds)?
        } else {
            // Sequences disagree on this layer: run the Full and the Shared ones apart.
            let mut attn = vec![0.0; rows * d];
            for kind in [true, false] {
                let view = layer.attn.view(if kind { indexer.clone() } else { None });
                let pick: Vec<usize> = (0..segments.len()).filter(|&i| full_segs[i] == kind).collect();
                run_group(&pick, segments, topk, &x, &mut attn, d, |segs, topk, xg| {
                    attention::forward(&ctx, &view, xg, segs, topk, cache, seconds)
                })?;
            }
            attn
        };
        add_in_place(hidden, &attn);
        kernels::rms_norm(hidden, &layer.post_norm, self.cfg.rms_norm_eps, &mut x);
        let mlp = match &layer.mlp {
            Mlp::Dense(m) => m.forward(&x, rows),
            Mlp::Moe(m) => moe::forward(&self.cfg, m, &x, rows),
        };
        add_in_place(hidden, &mlp);
        Ok(())
    }

    /// Writes range layer `li`'s cache entries for every row of the batch (`x` its normed
    /// input) without running its attention: latents for all segments, indexer keys for
    /// those whose pattern makes the layer Full.
    #[allow(clippy::too_many_arguments)]
    fn fill_layer_cache(
        &self,
        li: usize,
        indexer: &Option<std::sync::Arc<IndexerWeights>>,
        x: &[f32],
        segments: &[Segment],
        patterns: &[&IndexPattern],
        cache: &mut KvCache,
        stats: &mut LayerStats,
    ) -> Result<()> {
        let d = self.cfg.hidden_size;
        let layer = &self.layers[li];
        let ctx = self.attn_ctx(li);
        let global = self.range.start + li;
        let full_segs: Vec<bool> = patterns.iter().map(|p| p.is_full(global)).collect();
        let seconds = &mut stats.seconds;
        if full_segs.iter().all(|f| *f == full_segs[0]) {
            let view = layer.attn.view(if full_segs[0] { indexer.clone() } else { None });
            return attention::fill_cache(&ctx, &view, x, segments, cache, seconds);
        }
        for kind in [true, false] {
            let view = layer.attn.view(if kind { indexer.clone() } else { None });
            let pick: Vec<usize> = (0..segments.len()).filter(|&i| full_segs[i] == kind).collect();
            let (segs, xg) = per_request::gather_group(&pick, segments, x, d);
            attention::fill_cache(&ctx, &view, &xg, &segs, cache, seconds)?;
        }
        Ok(())
    }

    /// Final norm and `lm_head` over `rows` hidden rows: `rows × vocab` logits.
    pub fn logits(&self, hidden: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (Some(norm), Some(head)) = (&self.norm, &self.lm_head) else {
            return Err(WorkerError::invalid(
                "logits",
                format!(
                    "layer range ends at {}, before the last layer: it has no head",
                    self.range.end
                ),
            ));
        };
        let mut x = vec![0.0; hidden.len()];
        kernels::rms_norm(hidden, norm, self.cfg.rms_norm_eps, &mut x);
        Ok(head.forward(&x, rows))
    }
}

impl Model {
    /// Visits the logits and log-probabilities of selected hidden rows, materializing at most
    /// `chunk` rows × vocab at a time. `f(i, logits, logprobs)` gets the index into `rows`.
    pub fn for_each_logits_row(
        &self,
        hidden: &[f32],
        rows: &[usize],
        chunk: usize,
        mut f: impl FnMut(usize, &[f32], &[f32]),
    ) -> Result<()> {
        let d = self.cfg.hidden_size;
        let vocab = self.cfg.vocab_size;
        let mut lp = vec![0.0; vocab];
        let mut h = Vec::new();
        for (c, part) in rows.chunks(chunk.max(1)).enumerate() {
            h.clear();
            for &row in part {
                h.extend_from_slice(&hidden[row * d..(row + 1) * d]);
            }
            let logits = self.logits(&h, part.len())?;
            for (i, row_logits) in logits.chunks_exact(vocab).enumerate() {
                kernels::log_softmax(row_logits, &mut lp);
                f(c * chunk.max(1) + i, row_logits, &lp);
            }
        }
        Ok(())
    }
}

/// Counts and times a forward pass accumulates over its layers.
#[derive(Default)]
struct LayerStats {
    full: usize,
    shared: usize,
    seconds: attention::AttnSeconds,
}

/// `acc += x`, in parallel: at prefill sizes (16 MiB of 4096 rows) a serial pass leaves a
/// core idle.
fn add_in_place(acc: &mut [f32], x: &[f32]) {
    const PART: usize = 1 << 14;
    acc.par_chunks_mut(PART).zip(x.par_chunks(PART)).for_each(|(acc, x)| {
        for (a, b) in acc.iter_mut().zip(x) {
            *a += b;
        }
    });
}
