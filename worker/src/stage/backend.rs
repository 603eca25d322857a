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

use super::data_plane::PeerLink;
use super::PeerInput;
use crate::config::ModelConfig;
use crate::engine::LogitsVisitor;
use crate::error::{Result, WorkerError};
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

/// Where a micro-batch's input rows come from.
pub enum BatchInput<'a> {
    /// Tokens or hidden states on the host (the coordinator's tokens, gRPC's hidden states).
    Host(StageInput),
    /// Hidden states and relayed top-k rows sent by the previous stage over the NCCL `link`,
    /// as `announced` (its relays already checked against the batch). They are received
    /// before anything else can fail, so a failed batch never leaves the previous stage's
    /// sends unmatched.
    Peer {
        /// What comes over the link, in order.
        announced: &'a PeerInput,
        /// The link from the previous stage.
        link: &'a PeerLink,
    },
}

/// Where a micro-batch's output goes.
pub enum BatchSink<'a, 'v> {
    /// Hidden states back to the host (for gRPC).
    Host,
    /// The last stage: logits rows for the sampler, no hidden states.
    Logits(LogitsRequest<'a, 'v>),
    /// Hidden states and the relay sent to the next stage over the NCCL link (queued on the
    /// device).
    Peer(&'a PeerLink),
}

/// What a micro-batch leaves on the host.
#[derive(Debug, Default)]
pub struct BatchOutput {
    /// Hidden states for the next stage, `rows × hidden_size` (empty when they went to the
    /// logits or over NCCL).
    pub hidden: Vec<f32>,
    /// Per segment, the top-k rows the next stage needs when it starts on a Shared layer
    /// (all `None` when they went over NCCL).
    pub relay: Vec<Option<TopkRows>>,
    /// What went over NCCL (nothing otherwise): the next stage's `NcclPayload`.
    pub sent: PeerInput,
}

/// The error for NCCL asked of a stage that cannot use it.
pub fn no_nccl(device: StageDevice) -> WorkerError {
    WorkerError::Device(format!(
        "this stage computes on {device} and has no NCCL data plane (it needs a GPU and a build with \
         the `cuda` feature); hidden states travel over gRPC"
    ))
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
    /// segments' cache entries, and delivers the output to `sink`: the host (hidden states
    /// and relay for the next stage come back), the logits rows of the last stage, or the
    /// next stage over NCCL (hidden states, then the relay, device to device).
    fn forward(
        &self,
        segments: &[Segment],
        patterns: &[&IndexPattern],
        input: BatchInput<'_>,
        sink: BatchSink<'_, '_>,
    ) -> Result<BatchOutput>;

    /// A fresh NCCL unique id for a link to the next stage (GPU stages only).
    fn nccl_unique_id(&self) -> Result<Vec<u8>> {
        Err(no_nccl(self.device()))
    }

    /// Receives and discards everything `announced` over `link` (unchecked), for a batch
    /// that failed before its forward (so the previous stage's sends are still matched).
    fn discard_peer_input(&self, announced: &PeerInput, link: &PeerLink) -> Result<()> {
        let _ = (announced, link);
        Err(no_nccl(self.device()))
    }

    /// Joins the NCCL communicator `unique_id` as `rank` (0: the sending stage, 1: the
    /// receiving one) on this range's device; blocks until the other stage joins.
    fn join_peer(&self, unique_id: &[u8], rank: usize) -> Result<PeerLink> {
        let _ = (unique_id, rank);
        Err(no_nccl(self.device()))
    }

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
        input: BatchInput<'_>,
        sink: BatchSink<'_, '_>,
    ) -> Result<BatchOutput> {
        let input = match input {
            BatchInput::Host(i) => i,
            // A CPU stage never agrees to NCCL, so this is a peer's mistake.
            BatchInput::Peer { .. } => return Err(no_nccl(self.device())),
        };
        if matches!(sink, BatchSink::Peer(_)) {
            return Err(no_nccl(self.device()));
        }
        // The cache lock is held for the forward only: logits need the model alone.
        // The last stage computes its final layer for the rows whose logits are wanted only.
        let logits_rows = match &sink {
            BatchSink::Logits(l) => Some(l.rows),
            _ => None,
        };
        let (out, at) = {
            let mut cache = self.cache();
            match logits_rows {
                Some(rows) => self
                    .model
                    .forward_for_rows(&mut cache, segments, patterns, input, rows)?,
                None => (
                    self.model
                        .forward_with_patterns(&mut cache, segments, patterns, input)?,
                    Vec::new(),
                ),
            }
        };
        match sink {
            BatchSink::Logits(l) => {
                let visit = l.visit;
                self.model
                    .for_each_logits_row(&out.hidden, &at, l.chunk, |i, lg, lp| visit(i, lg, lp))?;
                Ok(BatchOutput {
                    relay: out.relay,
                    ..BatchOutput::default()
                })
            }
            _ => Ok(BatchOutput {
                hidden: out.hidden,
                relay: out.relay,
                sent: PeerInput::default(),
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
