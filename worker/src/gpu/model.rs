//! [`GpuModel`]: one layer range on the device, with the CPU model's forward pass step by
//! step (`crate::model::Model::forward_with_patterns`): the same checks, the same per-layer
//! order (input norm, MLA attention with the lightning indexer on Full layers, residual, post
//! norm, MLP, residual), the same relay in and out.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use kernels::cuda::{CudaSlice, CudaView, Gemm, GpuKernels, KernelCache};

use super::attention::{self, DevTopk, LayerInputs};
use super::cache::DeviceKvCache;
use super::mlp;
use super::weights::{Act, DevIndexer, DevLayer, DevLinear};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{Result, WorkerError};
use crate::kv_cache::{KvCache, LayerCacheShape};
use crate::model::weights::{LayerWeights, Loader};
use crate::model::{LayerRange, Segment, StageInput, TopkRows};
use crate::pattern::{IndexPattern, LayerKind};
use crate::rope::RopeTable;

/// Maps a CUDA backend error into the worker's.
pub(crate) fn dev<T>(r: kernels::cuda::Result<T>) -> Result<T> {
    r.map_err(|e| WorkerError::Device(e.to_string()))
}

/// How linear weights are held on the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GpuWeightDtype {
    /// BF16, multiplied with BF16 activations and F32 accumulation (the serving default).
    #[default]
    Bf16,
    /// F32 (a diagnostic: isolates the kernels from BF16 rounding).
    F32,
}

/// What leaves a stage on the GPU: hidden states stay on the device; the relay comes back to
/// the host (`TopkRows`) or stays on the device (`DevTopk`, for a stage that sends it over
/// NCCL).
pub struct DeviceStageOutput<R = TopkRows> {
    /// Hidden states after the last layer of the range, `rows × d`, on the device.
    pub hidden: CudaSlice<f32>,
    /// Per segment, the top-k rows the next layer needs when it is Shared (else `None`).
    pub relay: Vec<Option<R>>,
    /// Full layers run in this pass.
    pub full_layers_run: usize,
    /// Shared layers run in this pass.
    pub shared_layers_run: usize,
}

/// The model restricted to one layer range, on one CUDA device.
pub struct GpuModel {
    pub(super) k: GpuKernels,
    pub(super) gemm: Gemm,
    pub(super) cfg: ModelConfig,
    pattern: IndexPattern,
    range: LayerRange,
    dir: PathBuf,
    dtype: GpuWeightDtype,
    embed: Option<CudaSlice<f32>>,
    layers: Vec<DevLayer>,
    indexers: Vec<OnceLock<Arc<DevIndexer>>>,
    norm: Option<CudaSlice<f32>>,
    lm_head: Option<DevLinear>,
    rope: RopeTable,
}

impl GpuModel {
    /// Loads layers `range` of the checkpoint in `dir` onto CUDA device `ordinal` (kernels
    /// from the on-disk kernel cache, compiled with NVRTC when missing). Same checks and the
    /// same tensors as [`crate::Model::load_range`].
    pub fn load_range(
        dir: &Path,
        cfg: ModelConfig,
        pattern_override: Option<&str>,
        range: LayerRange,
        ordinal: usize,
        dtype: GpuWeightDtype,
    ) -> Result<Self> {
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
        let k = dev(GpuKernels::new(ordinal, &KernelCache::from_env()))?;
        let gemm = dev(k.gemm())?;
        let l = Loader { ckpt: &ckpt, cfg: &cfg };
        let d = cfg.hidden_size;
        let mut layers = Vec::with_capacity(range.len());
        let mut indexers = Vec::with_capacity(range.len());
        // One host layer at a time: it is uploaded, then dropped.
        for i in range.start..range.end {
            let mut lw = LayerWeights::load(&l, i, pattern.is_full(i))?;
            let cell = OnceLock::new();
            if let Some(ix) = lw.attn.indexer.take() {
                let _ = cell.set(Arc::new(DevIndexer::from_host(&k, &ix, dtype)?));
            }
            layers.push(DevLayer::from_host(&k, &cfg, &lw, dtype)?);
            indexers.push(cell);
        }
        let (first, last) = (range.start == 0, range.end == n);
        let embed_host = if first || (last && cfg.tie_word_embeddings) {
            Some(l.tensor("model.embed_tokens.weight", &[cfg.vocab_size, d])?)
        } else {
            None
        };
        let (norm, lm_head) = if last {
            let head = if cfg.tie_word_embeddings && !ckpt.has("lm_head.weight") {
                let w = embed_host.as_deref().unwrap_or_default();
                DevLinear::upload(&k, w, cfg.vocab_size, d, dtype)?
            } else {
                DevLinear::from_host(&k, &l.linear("lm_head", cfg.vocab_size, d)?, dtype)?
            };
            (Some(dev(k.upload(&l.vector("model.norm.weight", d)?))?), Some(head))
        } else {
            (None, None)
        };
        // The embedding is a lookup, not a product: F32, so the first stage's input rows
        // equal the CPU's exactly.
        let embed = match (&embed_host, first) {
            (Some(e), true) => Some(dev(k.upload(e))?),
            _ => None,
        };
        let rope = RopeTable::new(&cfg.rope, cfg.qk_rope_head_dim);
        Ok(GpuModel {
            k,
            gemm,
            cfg,
            pattern,
            range,
            dir: dir.to_path_buf(),
            dtype,
            embed,
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

    /// The start-up IndexCache pattern.
    pub fn pattern(&self) -> &IndexPattern {
        &self.pattern
    }

    /// The loaded layer range.
    pub fn range(&self) -> LayerRange {
        self.range
    }

    /// Whether this range holds the final norm and head.
    pub fn is_last(&self) -> bool {
        self.lm_head.is_some()
    }

    /// The device's kernels (its properties, stream, buffers).
    pub fn kernels(&self) -> &GpuKernels {
        &self.k
    }

    /// Bytes of weights on the device.
    pub fn weight_bytes(&self) -> usize {
        let f = |s: &Option<CudaSlice<f32>>| s.as_ref().map_or(0, |s| s.len() * 4);
        self.layers.iter().map(DevLayer::bytes).sum::<usize>()
            + self
                .indexers
                .iter()
                .map(|c| c.get().map_or(0, |ix| ix.bytes()))
                .sum::<usize>()
            + f(&self.embed)
            + f(&self.norm)
            + self.lm_head.as_ref().map_or(0, DevLinear::bytes)
    }

    /// The cache row widths of each loaded layer (as the CPU model's).
    pub fn cache_shapes(&self) -> Vec<LayerCacheShape> {
        (self.range.start..self.range.end)
            .map(|i| LayerCacheShape {
                latent: self.cfg.kv_lora_rank,
                rope: self.cfg.qk_rope_head_dim,
                index_key: self.pattern.is_full(i).then_some(self.cfg.index_head_dim),
            })
            .collect()
    }

    /// Bytes one cache block costs across the range (the CPU cache's unit).
    pub fn cache_bytes_per_block(&self, block_size: usize) -> usize {
        KvCache::bytes_per_block(&self.cache_shapes(), block_size)
    }

    /// A device KV cache of `capacity_blocks` blocks for this range.
    pub fn new_cache(&self, block_size: usize, capacity_blocks: usize) -> Result<DeviceKvCache> {
        DeviceKvCache::new(
            &self.k,
            self.cache_shapes(),
            self.cfg.index_head_dim,
            block_size,
            capacity_blocks,
        )
    }

    /// The indexer of global layer `layer`, uploaded from the checkpoint on first use.
    fn indexer(&self, layer: usize) -> Result<Arc<DevIndexer>> {
        self.indexer_loaded(layer).map(|(ix, _)| ix)
    }

    /// [`GpuModel::indexer`], and whether this call uploaded it.
    fn indexer_loaded(&self, layer: usize) -> Result<(Arc<DevIndexer>, bool)> {
        crate::model::get_or_load(&self.indexers[layer - self.range.start], || {
            let host = crate::model::load_indexer(&self.dir, &self.cfg, layer)?;
            let ix = DevIndexer::from_host(&self.k, &host, self.dtype)?;
            tracing::info!(
                layer,
                "uploaded indexer weights for a pattern that makes this layer Full"
            );
            Ok(ix)
        })
    }

    /// Checks that this range can run `pattern` (every layer it makes Full has indexer
    /// weights) and uploads the indexers it needs; returns the layers uploaded by this call
    /// (the twin of `Model::prepare_pattern`).
    pub fn prepare_pattern(&self, pattern: &IndexPattern) -> Result<Vec<usize>> {
        crate::model::prepare_indexers(&self.cfg, self.range, pattern, |layer| {
            self.indexer_loaded(layer).map(|(_, loaded)| loaded)
        })
    }

    /// Runs the range over a batch of segments under the start-up pattern.
    pub fn forward(
        &self,
        cache: &mut DeviceKvCache,
        segments: &[Segment],
        input: StageInput,
    ) -> Result<DeviceStageOutput> {
        let patterns = vec![&self.pattern; segments.len()];
        self.forward_with_patterns(cache, segments, &patterns, input)
    }

    /// Runs the range over a batch of segments, segment `i` under `patterns[i]`, updating
    /// their cache entries (the GPU twin of `Model::forward_with_patterns`).
    pub fn forward_with_patterns(
        &self,
        cache: &mut DeviceKvCache,
        segments: &[Segment],
        patterns: &[&IndexPattern],
        input: StageInput,
    ) -> Result<DeviceStageOutput> {
        let out = self.forward_host(cache, segments, patterns, input)?;
        self.relay_to_host(out)
    }

    /// [`GpuModel::forward_with_patterns`] with the relay left on the device.
    pub(super) fn forward_host(
        &self,
        cache: &mut DeviceKvCache,
        segments: &[Segment],
        patterns: &[&IndexPattern],
        input: StageInput,
    ) -> Result<DeviceStageOutput<DevTopk>> {
        let rows = crate::model::check_input(&self.cfg, segments, patterns, &input)?;
        let hidden = match input {
            StageInput::Tokens(t) => self.embed_tokens(&t)?,
            StageInput::Hidden(h) => dev(self.k.upload(&h))?,
        };
        self.run_layers(cache, segments, patterns, rows, hidden, Vec::new())
    }

    /// [`GpuModel::forward_host`] with the input already on the device (received from the
    /// previous stage over NCCL): `rows × hidden_size` hidden-state values and, per segment,
    /// the relay that came with them (`None`: the segment's host relay, if any, is used).
    pub(super) fn forward_received(
        &self,
        cache: &mut DeviceKvCache,
        segments: &[Segment],
        patterns: &[&IndexPattern],
        hidden: CudaSlice<f32>,
        relays: Vec<Option<DevTopk>>,
    ) -> Result<DeviceStageOutput<DevTopk>> {
        let rows = crate::model::check_rows(segments, patterns)?;
        let d = self.cfg.hidden_size;
        if hidden.len() != rows * d {
            return Err(WorkerError::invalid(
                "hidden",
                format!("{} values for {rows} rows × hidden_size {d}", hidden.len()),
            ));
        }
        self.run_layers(cache, segments, patterns, rows, hidden, relays)
    }

    /// Brings an output's relay to the host.
    pub(super) fn relay_to_host(&self, out: DeviceStageOutput<DevTopk>) -> Result<DeviceStageOutput> {
        let relay = out
            .relay
            .into_iter()
            .map(|t| t.map(|t| t.download(&self.k)).transpose())
            .collect::<Result<_>>()?;
        Ok(DeviceStageOutput {
            hidden: out.hidden,
            relay,
            full_layers_run: out.full_layers_run,
            shared_layers_run: out.shared_layers_run,
        })
    }

    /// The layers of the range over `rows` input rows `hidden` (checked against the batch),
    /// with `received[i]` (when given) segment `i`'s relay already on the device.
    fn run_layers(
        &self,
        cache: &mut DeviceKvCache,
        segments: &[Segment],
        patterns: &[&IndexPattern],
        rows: usize,
        mut hidden: CudaSlice<f32>,
        received: Vec<Option<DevTopk>>,
    ) -> Result<DeviceStageOutput<DevTopk>> {
        let d = self.cfg.hidden_size;
        let on_device: Vec<bool> = received.iter().map(Option::is_some).collect();
        crate::model::check_segments_relayed(&self.cfg, self.range, cache, segments, patterns, &on_device)?;
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
        let batch = attention::BatchPlan::new(self, cache, segments)?;
        let mut received = received.into_iter();
        let mut topk: Vec<Option<DevTopk>> = segments
            .iter()
            .map(|s| match received.next().flatten() {
                Some(t) => Ok(Some(t)),
                None => s.relay.as_ref().map(|r| DevTopk::upload(&self.k, r)).transpose(),
            })
            .collect::<Result<_>>()?;
        let (mut full, mut shared) = (0, 0);
        let mut x = dev(self.k.zeros::<f32>(rows * d))?;
        let mut x16 = dev(self.k.zeros::<u16>(rows * d))?;
        for (li, layer) in self.layers.iter().enumerate() {
            let global = self.range.start + li;
            self.norm_rows(&hidden, &layer.input_norm, &mut x, &mut x16)?;
            let full_segs: Vec<bool> = patterns.iter().map(|p| p.is_full(global)).collect();
            let inp = LayerInputs {
                layer: global,
                cache_layer: li,
                weights: layer,
                indexer: layer_indexers[li].as_deref(),
                full_segs: &full_segs,
            };
            let xa = Act {
                f32: x.slice(..),
                bf16: x16.slice(..),
            };
            attention::forward(self, &inp, &xa, &batch, segments, &mut topk, cache, &mut hidden)?;
            if full_segs.iter().any(|f| *f) {
                full += 1;
            }
            if full_segs.iter().any(|f| !*f) {
                shared += 1;
            }
            self.norm_rows(&hidden, &layer.post_norm, &mut x, &mut x16)?;
            let xa = Act {
                f32: x.slice(..),
                bf16: x16.slice(..),
            };
            mlp::forward(self, &layer.mlp, &xa, rows, &mut hidden)?;
        }
        let n_layers = self.cfg.num_hidden_layers;
        let relay = topk
            .into_iter()
            .zip(patterns)
            .map(|(t, p)| {
                let next_shared = self.range.end < n_layers && p.kind(self.range.end) == LayerKind::Shared;
                t.filter(|_| next_shared)
            })
            .collect();
        Ok(DeviceStageOutput {
            hidden,
            relay,
            full_layers_run: full,
            shared_layers_run: shared,
        })
    }

    /// RMSNorm of `hidden` into `x` and its BF16 copy.
    fn norm_rows(
        &self,
        hidden: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        x: &mut CudaSlice<f32>,
        x16: &mut CudaSlice<u16>,
    ) -> Result<()> {
        dev(self.k.rms_norm(
            &hidden.slice(..),
            &weight.slice(..),
            self.cfg.rms_norm_eps,
            &mut x.slice_mut(..),
        ))?;
        dev(self.k.to_bf16(&x.slice(..), &mut x16.slice_mut(..)))
    }

    fn embed_tokens(&self, tokens: &[u32]) -> Result<CudaSlice<f32>> {
        let embed = self.embed.as_ref().ok_or_else(|| {
            WorkerError::invalid(
                "input",
                format!(
                    "layer range starts at {}, so it takes hidden states, not tokens",
                    self.range.start
                ),
            )
        })?;
        if let Some((i, t)) = tokens
            .iter()
            .enumerate()
            .find(|(_, t)| **t as usize >= self.cfg.vocab_size)
        {
            return Err(WorkerError::invalid(
                "prompt_ids",
                format!(
                    "token id {t} at index {i} is outside the vocabulary (vocab_size = {})",
                    self.cfg.vocab_size
                ),
            ));
        }
        let d = self.cfg.hidden_size;
        let idx: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let idx = dev(self.k.upload(&idx))?;
        let mut h = dev(self.k.zeros::<f32>(tokens.len() * d))?;
        dev(self
            .k
            .gather_rows(&embed.slice(..), d, &idx.slice(..), &mut h.slice_mut(..)))?;
        Ok(h)
    }

    /// Final norm and `lm_head` over the hidden rows `rows` of `hidden`: `rows.len() × vocab`
    /// logits, on the host.
    pub fn logits_rows(&self, hidden: &CudaView<f32>, rows: &[usize]) -> Result<Vec<f32>> {
        let (Some(norm), Some(head)) = (&self.norm, &self.lm_head) else {
            return Err(WorkerError::invalid(
                "logits",
                format!(
                    "layer range ends at {}, before the last layer: it has no head",
                    self.range.end
                ),
            ));
        };
        let (d, n) = (self.cfg.hidden_size, rows.len());
        if n == 0 {
            return Ok(Vec::new());
        }
        let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        let idx = dev(self.k.upload(&idx))?;
        let mut h = dev(self.k.zeros::<f32>(n * d))?;
        dev(self.k.gather_rows(hidden, d, &idx.slice(..), &mut h.slice_mut(..)))?;
        let mut x = dev(self.k.zeros::<f32>(n * d))?;
        let mut x16 = dev(self.k.zeros::<u16>(n * d))?;
        self.norm_rows(&h, norm, &mut x, &mut x16)?;
        let mut logits = dev(self.k.zeros::<f32>(n * self.cfg.vocab_size))?;
        let xa = Act {
            f32: x.slice(..),
            bf16: x16.slice(..),
        };
        head.forward(&self.gemm, &xa, n, &mut logits.slice_mut(..), 1.0, 0.0)?;
        dev(self.k.download(&logits))
    }

    /// Visits the logits and log-probabilities (host log-softmax, as on the CPU) of the batch
    /// rows `rows` of `hidden`, at most `chunk` rows of logits on the host at once;
    /// `visit(i, logits, logprobs)` gets the index into `rows`.
    pub fn for_each_logits_row(
        &self,
        hidden: &CudaView<f32>,
        rows: &[usize],
        chunk: usize,
        visit: &mut crate::engine::LogitsVisitor<'_>,
    ) -> Result<()> {
        let vocab = self.cfg.vocab_size;
        let chunk = chunk.max(1);
        let mut lp = vec![0.0; vocab];
        for (c, part) in rows.chunks(chunk).enumerate() {
            let logits = self.logits_rows(hidden, part)?;
            for (i, row_logits) in logits.chunks_exact(vocab).enumerate() {
                kernels::log_softmax(row_logits, &mut lp);
                visit(c * chunk + i, row_logits, &lp);
            }
        }
        Ok(())
    }

    /// Copies device hidden states to the host (what a stage sends on).
    pub fn download(&self, hidden: &CudaSlice<f32>) -> Result<Vec<f32>> {
        dev(self.k.download(hidden))
    }

    /// The rotary table.
    pub(super) fn rope(&self) -> &RopeTable {
        &self.rope
    }
}
