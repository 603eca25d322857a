//! [`GpuStage`]: the stage server's [`StageCompute`] on a CUDA device, the device model of one
//! layer range with its device KV cache.
//!
//! Input rows arrive on the host (tokens, or hidden states from the previous stage over gRPC)
//! and are uploaded, or arrive on the device over the NCCL data plane; a middle stage
//! downloads its output hidden states for gRPC or sends them over NCCL (the relay comes back
//! to the host either way: it travels compressed in the request); the last stage keeps its
//! hidden states on the device and brings back only the logits rows the sampler needs, as
//! [`super::GpuBackend`] does for the engine.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use super::backend::{cache_blocks_for, GpuEngineOptions};
use super::cache::DeviceKvCache;
use super::model::{dev, GpuModel};
use crate::config::ModelConfig;
use crate::error::{Result, WorkerError};
use crate::model::{LayerRange, Segment};
use crate::pattern::IndexPattern;
use crate::stage::data_plane::PeerLink;
use crate::stage::{BatchInput, BatchOutput, BatchSink, CacheStats, StageCompute, StageDevice};
use kernels::cuda::CudaSlice;

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

    /// Receives `floats` hidden-state values from the previous stage over `link`.
    fn receive(&self, floats: usize, link: &PeerLink) -> Result<CudaSlice<f32>> {
        if floats == 0 {
            return Err(WorkerError::invalid(
                "nccl.hidden_floats",
                "0: a micro-batch over NCCL carries at least one row",
            ));
        }
        let mut h = dev(self.model.kernels().zeros::<f32>(floats))?;
        dev(link.recv(&mut h))?;
        Ok(h)
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
        input: BatchInput<'_>,
        sink: BatchSink<'_, '_>,
    ) -> Result<BatchOutput> {
        // Hidden states over NCCL are received first, whatever happens next.
        let received = match input {
            BatchInput::Host(i) => Err(i),
            BatchInput::Peer { floats, link } => Ok(self.receive(floats, link)?),
        };
        let out = {
            let mut guard = self.cache();
            let cache = guard.as_mut().ok_or_else(|| {
                WorkerError::Device("this stage has no KV cache (a failed Reconfigure left it without one)".into())
            })?;
            match received {
                Err(host) => self.model.forward_with_patterns(cache, segments, patterns, host)?,
                Ok(hidden) => self.model.forward_device_hidden(cache, segments, patterns, hidden)?,
            }
        };
        match sink {
            BatchSink::Logits(l) => {
                self.model
                    .for_each_logits_row(&out.hidden.slice(..), l.rows, l.chunk, l.visit)?;
                Ok(BatchOutput {
                    relay: out.relay,
                    ..BatchOutput::default()
                })
            }
            BatchSink::Host => Ok(BatchOutput {
                hidden: self.model.download(&out.hidden)?,
                relay: out.relay,
                sent_floats: 0,
            }),
            BatchSink::Peer(link) => {
                let sent_floats = out.hidden.len();
                dev(link.send(out.hidden))?;
                Ok(BatchOutput {
                    hidden: Vec::new(),
                    relay: out.relay,
                    sent_floats,
                })
            }
        }
    }

    fn nccl_unique_id(&self) -> Result<Vec<u8>> {
        dev(kernels::cuda::nccl_unique_id()).map(|id| id.to_vec())
    }

    fn join_peer(&self, unique_id: &[u8], rank: usize) -> Result<PeerLink> {
        dev(PeerLink::join(self.model.kernels(), unique_id, rank))
    }

    fn discard_peer_input(&self, floats: usize, link: &PeerLink) -> Result<()> {
        self.receive(floats, link).map(drop)
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
