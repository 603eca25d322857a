//! [`GpuStage`]: the stage server's [`StageCompute`] on a CUDA device, the device model of one
//! layer range with its device KV cache.
//!
//! Input rows arrive on the host (tokens, or hidden states from the previous stage over gRPC)
//! and are uploaded; a middle stage downloads its output hidden states and relay for the next
//! stage; the last stage keeps its hidden states on the device and brings back only the
//! logits rows the sampler needs, as [`super::GpuBackend`] does for the engine.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use super::backend::{cache_blocks_for, GpuEngineOptions};
use super::cache::DeviceKvCache;
use super::model::GpuModel;
use crate::config::ModelConfig;
use crate::error::{Result, WorkerError};
use crate::model::{LayerRange, Segment, StageInput};
use crate::pattern::IndexPattern;
use crate::stage::{BatchOutput, CacheStats, LogitsRequest, StageCompute, StageDevice};

/// One layer range on a GPU with its KV cache (`None` only between `free_cache` and
/// `allocate_cache` during a `Reconfigure`).
pub struct GpuStage {
    model: GpuModel,
    cache: Mutex<Option<DeviceKvCache>>,
    opts: GpuEngineOptions,
}

impl GpuStage {
    /// Loads layers `range` of the checkpoint in `dir` onto device `opts.ordinal` and
    /// allocates its KV cache: as many blocks as `opts.memory_fraction` leaves after the
    /// weights and workspace, at most `opts.max_blocks`.
    pub fn load(
        dir: &Path,
        cfg: ModelConfig,
        pattern: Option<&str>,
        range: LayerRange,
        opts: GpuEngineOptions,
    ) -> Result<Self> {
        let stage = Self::load_weights(dir, cfg, pattern, range, opts)?;
        stage.allocate_cache()?;
        Ok(stage)
    }

    /// Loads the weights only (no cache yet).
    fn load_weights(
        dir: &Path,
        cfg: ModelConfig,
        pattern: Option<&str>,
        range: LayerRange,
        opts: GpuEngineOptions,
    ) -> Result<Self> {
        let model = GpuModel::load_range(dir, cfg, pattern, range, opts.ordinal, opts.weight_dtype)?;
        Ok(GpuStage {
            model,
            cache: Mutex::new(None),
            opts,
        })
    }

    /// The device model.
    pub fn model(&self) -> &GpuModel {
        &self.model
    }

    fn cache(&self) -> MutexGuard<'_, Option<DeviceKvCache>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StageCompute for GpuStage {
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
        StageDevice::Cuda(self.opts.ordinal)
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
        let out = {
            let mut guard = self.cache();
            let cache = guard.as_mut().ok_or_else(|| {
                WorkerError::Device("this stage has no KV cache (a failed Reconfigure left it without one)".into())
            })?;
            self.model.forward_with_patterns(cache, segments, patterns, input)?
        };
        match logits {
            Some(l) => {
                self.model
                    .for_each_logits_row(&out.hidden.slice(..), l.rows, l.chunk, l.visit)?;
                Ok(BatchOutput {
                    hidden: Vec::new(),
                    relay: out.relay,
                })
            }
            None => Ok(BatchOutput {
                hidden: self.model.download(&out.hidden)?,
                relay: out.relay,
            }),
        }
    }

    fn release(&self, seqs: &[u64]) {
        if let Some(cache) = self.cache().as_mut() {
            for s in seqs {
                cache.release(*s);
            }
        }
    }

    fn cache_stats(&self) -> CacheStats {
        match self.cache().as_ref() {
            Some(c) => CacheStats {
                block_size: c.block_size(),
                capacity_blocks: c.capacity_blocks(),
                free_blocks: c.free_blocks(),
                used_blocks: c.used_blocks(),
                sequences: c.sequences(),
            },
            None => CacheStats {
                block_size: self.opts.block_size,
                ..CacheStats::default()
            },
        }
    }

    fn load_range(&self, dir: &Path, range: LayerRange, pattern: &str) -> Result<Box<dyn StageCompute>> {
        let stage = Self::load_weights(dir, self.config().clone(), Some(pattern), range, self.opts)?;
        Ok(Box::new(stage))
    }

    fn free_cache(&self) {
        *self.cache() = None;
    }

    fn allocate_cache(&self) -> Result<()> {
        let mut guard = self.cache();
        if guard.is_none() {
            let blocks = cache_blocks_for(&self.model, &self.opts)?;
            *guard = Some(self.model.new_cache(self.opts.block_size, blocks)?);
        }
        Ok(())
    }
}
