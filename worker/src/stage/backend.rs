//! [`StageCompute`]: what the stage server runs a micro-batch on, whatever the device.
//!
//! The stage's compute path (`compute.rs`), its observation (`observe.rs`), `Info`, `Release`,
//! `PreparePattern` and `Reconfigure` only talk to this trait. [`CpuStage`] is the CPU model
//! with its host KV cache (the behaviour the stage server always had); with the `cuda`
//! feature, `crate::gpu::GpuStage` is the device model with its device KV cache. Each
//! implementation owns its model and its cache together, so a batch can never run one range's
//! layers on another range's cache.

use std::path::Path;
use std::sync::Mutex;

use crate::config::ModelConfig;
use crate::engine::LogitsVisitor;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::model::{LayerRange, Model, Segment, StageInput, TopkRows};
use crate::pattern::IndexPattern;

/// Where a stage computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageDevice {
    /// The CPU kernels.
    Cpu,
    /// CUDA device with this ordinal.
    Cuda(usize),
}

impl std::fmt::Display for StageDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StageDevice::Cpu => f.write_str("cpu"),
            StageDevice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The KV cache's occupancy, as `Info` and the per-batch stats report it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Positions per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub capacity_blocks: usize,
    /// Blocks free now.
    pub free_blocks: usize,
    /// Blocks held by sequences.
    pub used_blocks: usize,
    /// Sequences holding cache.
    pub sequences: usize,
}

/// The last stage's request for logits: the batch rows to visit, at most `chunk` rows of
/// logits materialized at once.
pub struct LogitsRequest<'a, 'v> {
    /// Batch rows (indices into the micro-batch's rows), visited in this order.
    pub rows: &'a [usize],
    /// Most logits rows materialized at once.
    pub chunk: usize,
    /// Gets `(index into rows, logits, log-probabilities)`.
    pub visit: &'a mut LogitsVisitor<'v>,
}

/// What a micro-batch leaves on the host.
#[derive(Debug, Default)]
pub struct BatchOutput {
    /// Hidden states for the next stage, `rows × hidden_size` (empty when logits were asked
    /// for: the last stage sends no hidden states on).
    pub hidden: Vec<f32>,
    /// Per segment, the top-k rows the next stage needs when it starts on a Shared layer.
    pub relay: Vec<Option<TopkRows>>,
}

/// A layer range with its KV cache on some device: everything the stage server needs.
pub trait StageCompute: Send + Sync {
    /// The model config.
    fn config(&self) -> &ModelConfig;

    /// The start-up IndexCache pattern.
    fn pattern(&self) -> &IndexPattern;

    /// The loaded layer range.
    fn range(&self) -> LayerRange;

    /// Whether the range ends at the last layer (holds the final norm and head).
    fn is_last(&self) -> bool;

    /// Where this range computes.
    fn device(&self) -> StageDevice;

    /// Checks that this range can run `pattern` and loads the indexers it needs now;
    /// returns the layers loaded by this call (see [`Model::prepare_pattern`]).
    fn prepare_pattern(&self, pattern: &IndexPattern) -> Result<Vec<usize>>;

    /// Runs a micro-batch through the range, segment `i` under `patterns[i]`, updating the
    /// segments' cache entries. With `logits` (last stage only) the rows asked for are
    /// visited and no hidden states come back; without, the hidden states and relay for the
    /// next stage do.
    fn forward(
        &self,
        segments: &[Segment],
        patterns: &[&IndexPattern],
        input: StageInput,
        logits: Option<LogitsRequest<'_, '_>>,
    ) -> Result<BatchOutput>;

    /// Frees the cache entries of `seqs` (unknown sequences are a no-op).
    fn release(&self, seqs: &[u64]);

    /// The cache's occupancy now.
    fn cache_stats(&self) -> CacheStats;

    /// Loads layers `range` of the checkpoint in `dir` (the one this range came from;
    /// `pattern`: the new start-up pattern) on the same device, beside this range, with a cache
    /// of the same block size. Its cache may be left for [`StageCompute::allocate_cache`] (a
    /// device cache is, so that this range's can be freed first).
    fn load_range(&self, dir: &Path, range: LayerRange, pattern: &str) -> Result<Box<dyn StageCompute>>;

    /// Frees the cache's memory ahead of a swap (only while no sequence holds cache). A no-op
    /// on the CPU, whose cache grows on demand.
    fn free_cache(&self) {}

    /// Allocates the cache if it is not (after [`StageCompute::load_range`] or
    /// [`StageCompute::free_cache`]).
    fn allocate_cache(&self) -> Result<()> {
        Ok(())
    }
}

/// The CPU model and its host KV cache.
pub struct CpuStage {
    model: Model,
    cache: Mutex<KvCache>,
}

impl CpuStage {
    /// `model` with a cache of `kv_blocks` blocks of `block_size` positions.
    pub fn new(model: Model, block_size: usize, kv_blocks: usize) -> Self {
        let cache = model.new_cache(block_size, kv_blocks);
        CpuStage {
            model,
            cache: Mutex::new(cache),
        }
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, KvCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StageCompute for CpuStage {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn pattern(&self) -> &IndexPattern {
        self.model.pattern()
    }

    fn range(&self) -> LayerRange {
        self.model.range()
    }

    fn is_last(&self) -> bool {
        self.model.is_last()
    }

    fn device(&self) -> StageDevice {
        StageDevice::Cpu
    }

    fn prepare_pattern(&self, pattern: &IndexPattern) -> Result<Vec<usize>> {
        self.model.prepare_pattern(pattern)
    }

    fn forward(
        &self,
        segments: &[Segment],
        patterns: &[&IndexPattern],
        input: StageInput,
        logits: Option<LogitsRequest<'_, '_>>,
    ) -> Result<BatchOutput> {
        // The cache lock is held for the forward only: logits need the model alone.
        let out = {
            let mut cache = self.cache();
            self.model
                .forward_with_patterns(&mut cache, segments, patterns, input)?
        };
        match logits {
            Some(l) => {
                let visit = l.visit;
                self.model
                    .for_each_logits_row(&out.hidden, l.rows, l.chunk, |i, lg, lp| visit(i, lg, lp))?;
                Ok(BatchOutput {
                    hidden: Vec::new(),
                    relay: out.relay,
                })
            }
            None => Ok(BatchOutput {
                hidden: out.hidden,
                relay: out.relay,
            }),
        }
    }

    fn release(&self, seqs: &[u64]) {
        let mut cache = self.cache();
        for s in seqs {
            cache.release(*s);
        }
    }

    fn cache_stats(&self) -> CacheStats {
        let c = self.cache();
        CacheStats {
            block_size: c.block_size(),
            capacity_blocks: c.capacity_blocks(),
            free_blocks: c.free_blocks(),
            used_blocks: c.used_blocks(),
            sequences: c.sequences(),
        }
    }

    fn load_range(&self, dir: &Path, range: LayerRange, pattern: &str) -> Result<Box<dyn StageCompute>> {
        let model = Model::load_range(dir, self.config().clone(), Some(pattern), range)?;
        let c = self.cache_stats();
        Ok(Box::new(CpuStage::new(model, c.block_size, c.capacity_blocks)))
    }
}
