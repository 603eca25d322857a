//! [`GpuBackend`]: the engine's [`StepBackend`] on a CUDA device. Forward passes run on the
//! device; only the logits of the rows the engine asks for come back, and the host's
//! log-softmax and sampler take it from there (the CPU engine's code).

use std::path::Path;

use super::cache::DeviceKvCache;
use super::capacity::{device_cache_blocks, workspace_reserve_bytes, MemoryFraction};
use super::model::{GpuModel, GpuWeightDtype};
use crate::config::ModelConfig;
use crate::engine::{EngineOptions, LogitsVisitor, StepBackend};
use crate::error::{Result, WorkerError};
use crate::model::{LayerRange, Segment, StageInput};
use crate::pattern::IndexPattern;

/// How a GPU engine is set up.
#[derive(Clone, Copy, Debug)]
pub struct GpuEngineOptions {
    /// CUDA device ordinal.
    pub ordinal: usize,
    /// Share of the device's memory for weights, workspace and KV cache.
    pub memory_fraction: MemoryFraction,
    /// At most this many KV blocks (None: as many as the memory fraction leaves).
    pub max_blocks: Option<usize>,
    /// Positions per KV block.
    pub block_size: usize,
    /// Most prompt tokens per forward pass (sizes the workspace reserve).
    pub prefill_chunk: usize,
    /// Most logits rows materialized at once (sizes the workspace reserve).
    pub logits_chunk: usize,
    /// How linear weights are held.
    pub weight_dtype: GpuWeightDtype,
}

impl GpuEngineOptions {
    /// Device `ordinal` with the engine's block size and chunking, the default memory
    /// fraction, no block cap and BF16 weights.
    pub fn new(ordinal: usize, engine: &EngineOptions) -> Self {
        GpuEngineOptions {
            ordinal,
            memory_fraction: MemoryFraction::default(),
            max_blocks: None,
            block_size: engine.block_size,
            prefill_chunk: engine.prefill_chunk,
            logits_chunk: engine.logits_chunk,
            weight_dtype: GpuWeightDtype::default(),
        }
    }
}

/// KV blocks for `model` under `o`: what `--gpu-memory-fraction` leaves after the model's
/// weights and the workspace reserve, capped by `o.max_blocks`.
pub fn cache_blocks_for(model: &GpuModel, o: &GpuEngineOptions) -> Result<usize> {
    let total = model.kernels().info().total_memory;
    let workspace = workspace_reserve_bytes(model.config(), o.prefill_chunk, o.logits_chunk);
    let fit = device_cache_blocks(
        total,
        o.memory_fraction,
        model.weight_bytes(),
        workspace,
        model.cache_bytes_per_block(o.block_size),
    )?;
    let blocks = o.max_blocks.map_or(fit, |cap| cap.min(fit));
    tracing::info!(
        blocks,
        fit,
        weight_bytes = model.weight_bytes(),
        workspace,
        "device KV cache sized"
    );
    Ok(blocks)
}

/// A whole-model range on the GPU with its device KV cache.
pub struct GpuBackend {
    model: GpuModel,
    cache: DeviceKvCache,
}

impl GpuBackend {
    /// Loads every layer of the checkpoint in `dir` onto device `o.ordinal` and allocates
    /// the KV cache.
    pub fn load(dir: &Path, pattern_override: Option<&str>, o: &GpuEngineOptions) -> Result<Self> {
        let cfg = ModelConfig::from_dir(dir)?;
        let range = LayerRange::new(0, cfg.num_hidden_layers);
        let model = GpuModel::load_range(dir, cfg, pattern_override, range, o.ordinal, o.weight_dtype)?;
        Self::from_model(model, o)
    }

    /// Wraps a whole-range model, sizing and allocating its cache.
    pub fn from_model(model: GpuModel, o: &GpuEngineOptions) -> Result<Self> {
        if !model.is_last() || model.range().start != 0 {
            return Err(WorkerError::invalid("model", "the engine needs the whole layer range"));
        }
        let blocks = cache_blocks_for(&model, o)?;
        let cache = model.new_cache(o.block_size, blocks)?;
        Ok(GpuBackend { model, cache })
    }

    /// The device model.
    pub fn model(&self) -> &GpuModel {
        &self.model
    }

    /// The device KV cache.
    pub fn cache(&self) -> &DeviceKvCache {
        &self.cache
    }
}

impl StepBackend for GpuBackend {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn pattern(&self) -> &IndexPattern {
        self.model.pattern()
    }

    fn forward_logits(
        &mut self,
        segments: &[Segment],
        tokens: Vec<u32>,
        rows: &[usize],
        chunk: usize,
        visit: &mut LogitsVisitor<'_>,
    ) -> Result<()> {
        let out = self
            .model
            .forward(&mut self.cache, segments, StageInput::Tokens(tokens))?;
        self.model
            .for_each_logits_row(&out.hidden.slice(..), rows, chunk, visit)
    }

    fn release(&mut self, seq: u64) {
        self.cache.release(seq);
    }

    fn used_blocks(&self) -> usize {
        self.cache.used_blocks()
    }
}
