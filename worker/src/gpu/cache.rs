//! The paged KV cache on the device, the GPU twin of [`crate::kv_cache::KvCache`].
//!
//! Same bookkeeping as the CPU cache: a block holds `block_size` consecutive positions of one
//! sequence, and a block id addresses the same slot in every layer, so a sequence has one
//! block table for the range. Each layer keeps the MLA latent and the rotated rope key per
//! position in pools allocated up front (`capacity` blocks, sized by
//! [`super::capacity::device_cache_blocks`]). Indexer keys live in a per-layer pool that
//! exists only on layers some sequence runs as Full: allocated up front for the start-up
//! pattern's Full layers, on first use for a layer another pattern makes Full. A sequence's
//! indexer keys sit at its main slots, and only sequences that run the layer as Full write
//! them (`index_len` tracks who did, for the same pattern-change check as the CPU).

use std::collections::HashMap;

use kernels::cuda::{CudaSlice, CudaView, GpuKernels};

use super::model::dev;
use crate::error::{Result, WorkerError};
use crate::kv_cache::LayerCacheShape;

struct DevLayerStore {
    shape: LayerCacheShape,
    ckv: CudaSlice<f32>,
    kpe: CudaSlice<f32>,
    /// Indexer-key pool (`capacity × block_size × index_width`), once some sequence ran the
    /// layer as Full or the start-up pattern makes it Full.
    index: Option<CudaSlice<f32>>,
    /// Per sequence, positions that hold indexer keys.
    index_lens: HashMap<u64, usize>,
}

#[derive(Clone, Debug, Default)]
struct SeqEntry {
    blocks: Vec<u32>,
    len: usize,
}

/// Paged cache on the device for a contiguous range of layers.
pub struct DeviceKvCache {
    block_size: usize,
    capacity: usize,
    index_width: usize,
    layers: Vec<DevLayerStore>,
    free: Vec<u32>,
    seqs: HashMap<u64, SeqEntry>,
}

impl DeviceKvCache {
    /// Allocates `capacity` blocks of `block_size` positions for every layer of `shapes`
    /// (indexer-key pools of `index_width` floats on the layers whose shape has one).
    pub fn new(
        k: &GpuKernels,
        shapes: Vec<LayerCacheShape>,
        index_width: usize,
        block_size: usize,
        capacity: usize,
    ) -> Result<Self> {
        if block_size == 0 || capacity == 0 {
            return Err(WorkerError::invalid(
                "kv cache",
                format!("block_size {block_size} and capacity {capacity} must be at least 1"),
            ));
        }
        let slots = capacity * block_size;
        let layers = shapes
            .into_iter()
            .map(|shape| {
                Ok(DevLayerStore {
                    ckv: alloc(k, slots * shape.latent)?,
                    kpe: alloc(k, slots * shape.rope)?,
                    index: match shape.index_key {
                        Some(w) => Some(alloc(k, slots * w)?),
                        None => None,
                    },
                    shape,
                    index_lens: HashMap::new(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DeviceKvCache {
            block_size,
            capacity,
            index_width,
            layers,
            // Popped from the back: fresh blocks are handed out in ascending order.
            free: (0..capacity as u32).rev().collect(),
            seqs: HashMap::new(),
        })
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn capacity_blocks(&self) -> usize {
        self.capacity
    }

    /// Blocks held by sequences.
    pub fn used_blocks(&self) -> usize {
        self.capacity - self.free.len()
    }

    /// Free blocks.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Sequences holding blocks.
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Cached positions of a sequence (0 if unknown).
    pub fn seq_len(&self, seq: u64) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.len)
    }

    /// Positions of `seq` holding indexer keys in layer `layer` (0 where it runs the layer
    /// as Shared).
    pub fn index_len(&self, layer: usize, seq: u64) -> usize {
        self.layers[layer].index_lens.get(&seq).copied().unwrap_or(0)
    }

    /// Blocks needed to grow `seq` to `new_len` positions.
    pub fn blocks_needed(&self, seq: u64, new_len: usize) -> usize {
        let have = self.seqs.get(&seq).map_or(0, |s| s.blocks.len());
        new_len.div_ceil(self.block_size).saturating_sub(have)
    }

    /// Ensures `seq` has blocks for `new_len` positions and records that length.
    pub fn grow(&mut self, seq: u64, new_len: usize) -> Result<()> {
        let needed = self.blocks_needed(seq, new_len);
        if needed > self.free.len() {
            return Err(WorkerError::CacheFull {
                needed,
                free: self.free.len(),
                total: self.capacity,
            });
        }
        let e = self.seqs.entry(seq).or_default();
        for _ in 0..needed {
            e.blocks.push(self.free.pop().expect("checked above"));
        }
        e.len = e.len.max(new_len);
        Ok(())
    }

    /// Frees every block of `seq`; unknown sequences are a no-op.
    pub fn release(&mut self, seq: u64) {
        if let Some(e) = self.seqs.remove(&seq) {
            self.free.extend(e.blocks);
        }
        for l in &mut self.layers {
            l.index_lens.remove(&seq);
        }
    }

    /// The block table of `seq` as the kernels take it.
    pub fn block_table(&self, seq: u64) -> Result<Vec<i32>> {
        let e = self.seqs.get(&seq).ok_or(WorkerError::UnknownSequence(seq))?;
        Ok(e.blocks.iter().map(|&b| b as i32).collect())
    }

    /// Pool slots of positions `start..start + len` of `seq`.
    pub fn slots(&self, seq: u64, start: usize, len: usize) -> Result<Vec<i32>> {
        let e = self.seqs.get(&seq).ok_or(WorkerError::UnknownSequence(seq))?;
        let bs = self.block_size;
        (start..start + len)
            .map(|pos| {
                let b = *e.blocks.get(pos / bs).ok_or(WorkerError::UnknownSequence(seq))?;
                Ok((b as usize * bs + pos % bs) as i32)
            })
            .collect()
    }

    /// Writes rows of latents and rope keys to `slots` of layer `layer` (range-relative).
    pub fn write_kv(
        &mut self,
        k: &GpuKernels,
        layer: usize,
        slots: &CudaView<i32>,
        ckv: &CudaView<f32>,
        kpe: &CudaView<f32>,
    ) -> Result<()> {
        let l = &mut self.layers[layer];
        let (w, r) = (l.shape.latent, l.shape.rope);
        dev(k.scatter_rows(ckv, w, slots, &mut l.ckv.slice_mut(..)))?;
        dev(k.scatter_rows(kpe, r, slots, &mut l.kpe.slice_mut(..)))
    }

    /// Writes indexer keys of `seq` (rows for positions `start..start + slots.len()`) to
    /// layer `layer`, allocating the layer's pool on its first Full use.
    pub fn write_index_keys(
        &mut self,
        k: &GpuKernels,
        layer: usize,
        seq: u64,
        end: usize,
        slots: &CudaView<i32>,
        keys: &CudaView<f32>,
    ) -> Result<()> {
        let (w, slot_count) = (self.index_width, self.capacity * self.block_size);
        let l = &mut self.layers[layer];
        if l.index.is_none() {
            l.index = Some(alloc(k, slot_count * w)?);
        }
        let pool = l.index.as_mut().expect("allocated above");
        dev(k.scatter_rows(keys, w, slots, &mut pool.slice_mut(..)))?;
        let n = l.index_lens.entry(seq).or_default();
        *n = (*n).max(end);
        Ok(())
    }

    /// The latent and rope-key pools of layer `layer`.
    pub fn kv_pools(&self, layer: usize) -> (CudaView<'_, f32>, CudaView<'_, f32>) {
        let l = &self.layers[layer];
        (l.ckv.slice(..), l.kpe.slice(..))
    }

    /// The indexer-key pool of layer `layer` (None before any sequence ran it as Full).
    pub fn index_pool(&self, layer: usize) -> Option<CudaView<'_, f32>> {
        self.layers[layer].index.as_ref().map(|p| p.slice(..))
    }

    /// Bytes of device memory the cache holds.
    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| 4 * (l.ckv.len() + l.kpe.len() + l.index.as_ref().map_or(0, |p| p.len())))
            .sum()
    }
}

fn alloc(k: &GpuKernels, len: usize) -> Result<CudaSlice<f32>> {
    k.zeros::<f32>(len.max(1)).map_err(|e| {
        WorkerError::Device(format!(
            "allocating {:.2} GiB of KV cache on the device: {e} (lower --gpu-memory-fraction or --kv-blocks)",
            (len * 4) as f64 / (1u64 << 30) as f64
        ))
    })
}

impl crate::model::CacheLengths for DeviceKvCache {
    fn seq_len(&self, seq: u64) -> usize {
        DeviceKvCache::seq_len(self, seq)
    }
    fn index_len(&self, layer: usize, seq: u64) -> usize {
        DeviceKvCache::index_len(self, layer, seq)
    }
}
