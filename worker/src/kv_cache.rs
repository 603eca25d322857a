//! The paged KV cache of one worker's layer range.
//!
//! A block holds `block_size` consecutive positions of one sequence. A block id addresses the
//! same slot in every layer, so a sequence has one block table for the whole range. Each layer
//! keeps the MLA latent (`c_kv`, `kv_lora_rank` floats) and the rotated rope key
//! (`qk_rope_head_dim` floats) per position. Indexer keys (`index_head_dim` floats) are kept
//! only where a sequence runs a layer as Full: each request carries its IndexCache pattern,
//! so index keys have their own per-layer, per-sequence block tables, allocated on first
//! write. Shared layers (for that sequence) cost no indexer memory at all.

use std::collections::HashMap;

use crate::error::{Result, WorkerError};

/// Widths of one layer's cached rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerCacheShape {
    /// Latent width (`kv_lora_rank`).
    pub latent: usize,
    /// Rope key width (`qk_rope_head_dim`).
    pub rope: usize,
    /// Indexer key width, on layers that are Full under the start-up pattern (capacity
    /// planning). Other layers learn the width on their first index-key write.
    pub index_key: Option<usize>,
}

struct LayerStore {
    shape: LayerCacheShape,
    ckv: Vec<f32>,
    kpe: Vec<f32>,
    index: IndexStore,
}

/// One layer's indexer keys: blocks of their own, held only by sequences that run the layer
/// as Full.
#[derive(Default)]
struct IndexStore {
    /// Key width (0 until known).
    width: usize,
    data: Vec<f32>,
    /// Per sequence: its index-key blocks and how many positions hold keys.
    tables: HashMap<u64, (Vec<u32>, usize)>,
    free: Vec<u32>,
    allocated: usize,
}

/// A sequence's cache bookkeeping.
#[derive(Clone, Debug, Default)]
struct SeqEntry {
    blocks: Vec<u32>,
    len: usize,
}

/// Paged cache for a contiguous range of layers.
pub struct KvCache {
    block_size: usize,
    capacity: usize,
    layers: Vec<LayerStore>,
    free: Vec<u32>,
    allocated: usize,
    seqs: HashMap<u64, SeqEntry>,
}

/// The block views of one layer for one sequence, as the kernels take them.
pub struct LayerBlocks<'a> {
    /// Latent rows per block.
    pub ckv: Vec<&'a [f32]>,
    /// Rope-key rows per block.
    pub kpe: Vec<&'a [f32]>,
    /// Indexer-key rows per block (empty on Shared layers).
    pub index_k: Vec<&'a [f32]>,
}

impl KvCache {
    /// A cache of at most `capacity` blocks of `block_size` positions; storage grows on demand.
    pub fn new(shapes: Vec<LayerCacheShape>, block_size: usize, capacity: usize) -> Self {
        KvCache {
            block_size,
            capacity,
            layers: shapes
                .into_iter()
                .map(|shape| LayerStore {
                    shape,
                    ckv: Vec::new(),
                    kpe: Vec::new(),
                    index: IndexStore {
                        width: shape.index_key.unwrap_or(0),
                        ..IndexStore::default()
                    },
                })
                .collect(),
            free: Vec::new(),
            allocated: 0,
            seqs: HashMap::new(),
        }
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
        self.seqs.values().map(|s| s.blocks.len()).sum()
    }

    /// Cached positions of a sequence (0 if unknown).
    pub fn seq_len(&self, seq: u64) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.len)
    }

    /// Whether the sequence has cache state here.
    pub fn contains(&self, seq: u64) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// Sequences holding cache here.
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Positions of `seq` that hold indexer keys in layer `layer` (0 where the sequence
    /// runs the layer as Shared).
    pub fn index_len(&self, layer: usize, seq: u64) -> usize {
        self.layers[layer].index.tables.get(&seq).map_or(0, |t| t.1)
    }

    /// Blocks needed to grow `seq` to `new_len` positions.
    pub fn blocks_needed(&self, seq: u64, new_len: usize) -> usize {
        let have = self.seqs.get(&seq).map_or(0, |s| s.blocks.len());
        new_len.div_ceil(self.block_size).saturating_sub(have)
    }

    /// Free blocks.
    pub fn free_blocks(&self) -> usize {
        self.capacity - self.used_blocks()
    }

    /// Ensures `seq` has blocks for `new_len` positions and records that length.
    pub fn grow(&mut self, seq: u64, new_len: usize) -> Result<()> {
        let needed = self.blocks_needed(seq, new_len);
        let free = self.free_blocks();
        if needed > free {
            return Err(WorkerError::CacheFull {
                needed,
                free,
                total: self.capacity,
            });
        }
        for _ in 0..needed {
            let id = self.alloc_block();
            self.seqs.entry(seq).or_default().blocks.push(id);
        }
        let e = self.seqs.entry(seq).or_default();
        e.len = e.len.max(new_len);
        Ok(())
    }

    fn alloc_block(&mut self) -> u32 {
        if let Some(id) = self.free.pop() {
            return id;
        }
        let id = self.allocated as u32;
        self.allocated += 1;
        let bs = self.block_size;
        for l in &mut self.layers {
            l.ckv.resize(self.allocated * bs * l.shape.latent, 0.0);
            l.kpe.resize(self.allocated * bs * l.shape.rope, 0.0);
        }
        id
    }

    /// Frees every block of `seq`; unknown sequences are a no-op (release is idempotent).
    pub fn release(&mut self, seq: u64) {
        if let Some(e) = self.seqs.remove(&seq) {
            self.free.extend(e.blocks);
        }
        for l in &mut self.layers {
            if let Some((blocks, _)) = l.index.tables.remove(&seq) {
                l.index.free.extend(blocks);
            }
        }
    }

    fn slot(&self, seq: u64, pos: usize) -> Result<usize> {
        let e = self.seqs.get(&seq).ok_or(WorkerError::UnknownSequence(seq))?;
        let b = *e
            .blocks
            .get(pos / self.block_size)
            .ok_or(WorkerError::UnknownSequence(seq))?;
        Ok(b as usize * self.block_size + pos % self.block_size)
    }

    /// Stores the latent and rope key of `seq` at `pos` in layer `layer` (range-relative).
    pub fn write_kv(&mut self, layer: usize, seq: u64, pos: usize, ckv: &[f32], kpe: &[f32]) -> Result<()> {
        let slot = self.slot(seq, pos)?;
        let l = &mut self.layers[layer];
        let (w, r) = (l.shape.latent, l.shape.rope);
        l.ckv[slot * w..(slot + 1) * w].copy_from_slice(ckv);
        l.kpe[slot * r..(slot + 1) * r].copy_from_slice(kpe);
        Ok(())
    }

    /// Stores the indexer key of `seq` at `pos` in layer `layer` (where the sequence runs it
    /// as Full), allocating the sequence's index-key blocks on demand.
    pub fn write_index_key(&mut self, layer: usize, seq: u64, pos: usize, key: &[f32]) -> Result<()> {
        // Index keys only exist for positions the sequence has main-cache blocks for.
        self.slot(seq, pos)?;
        let bs = self.block_size;
        let ix = &mut self.layers[layer].index;
        if ix.width == 0 {
            ix.width = key.len();
        }
        let w = ix.width;
        if key.len() != w {
            return Err(WorkerError::invalid(
                "index_key",
                format!("layer {layer}: key of {} values, expected {w}", key.len()),
            ));
        }
        let blocks_needed = pos / bs + 1;
        while ix.tables.get(&seq).map_or(0, |t| t.0.len()) < blocks_needed {
            let id = match ix.free.pop() {
                Some(id) => id,
                None => {
                    ix.allocated += 1;
                    ix.data.resize(ix.allocated * bs * w, 0.0);
                    (ix.allocated - 1) as u32
                }
            };
            ix.tables.entry(seq).or_default().0.push(id);
        }
        let table = ix.tables.entry(seq).or_default();
        table.1 = table.1.max(pos + 1);
        let slot = table.0[pos / bs] as usize * bs + pos % bs;
        ix.data[slot * w..(slot + 1) * w].copy_from_slice(key);
        Ok(())
    }

    /// Block views of layer `layer` for `seq`.
    pub fn layer_blocks(&self, layer: usize, seq: u64) -> Result<LayerBlocks<'_>> {
        let e = self.seqs.get(&seq).ok_or(WorkerError::UnknownSequence(seq))?;
        let l = &self.layers[layer];
        let bs = self.block_size;
        fn view<'a>(blocks: &[u32], data: &'a [f32], bs: usize, w: usize) -> Vec<&'a [f32]> {
            if w == 0 {
                return Vec::new();
            }
            blocks
                .iter()
                .map(|b| &data[*b as usize * bs * w..(*b as usize + 1) * bs * w])
                .collect()
        }
        let index_blocks = l.index.tables.get(&seq).map_or(&[][..], |t| &t.0[..]);
        Ok(LayerBlocks {
            ckv: view(&e.blocks, &l.ckv, bs, l.shape.latent),
            kpe: view(&e.blocks, &l.kpe, bs, l.shape.rope),
            index_k: view(index_blocks, &l.index.data, bs, l.index.width),
        })
    }

    /// Bytes of storage allocated for indexer keys in layer `layer` (0 where no sequence
    /// ran it as Full).
    pub fn index_key_bytes(&self, layer: usize) -> usize {
        self.layers[layer].index.data.capacity() * 4
    }

    /// Bytes of storage allocated in total.
    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.ckv.capacity() + l.kpe.capacity() + l.index.data.capacity()) * 4)
            .sum()
    }

    /// Bytes one block costs across all layers (for capacity planning).
    pub fn bytes_per_block(shapes: &[LayerCacheShape], block_size: usize) -> usize {
        shapes
            .iter()
            .map(|s| (s.latent + s.rope + s.index_key.unwrap_or(0)) * block_size * 4)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes() -> Vec<LayerCacheShape> {
        vec![
            LayerCacheShape {
                latent: 4,
                rope: 2,
                index_key: Some(3),
            },
            LayerCacheShape {
                latent: 4,
                rope: 2,
                index_key: None,
            },
        ]
    }

    #[test]
    fn paging_round_trip_and_release() {
        let mut c = KvCache::new(shapes(), 4, 8);
        c.grow(1, 6).unwrap();
        c.grow(2, 3).unwrap();
        assert_eq!(c.used_blocks(), 3);
        for pos in 0..6 {
            let v = [pos as f32; 4];
            c.write_kv(1, 1, pos, &v, &[pos as f32 + 0.5; 2]).unwrap();
        }
        let b = c.layer_blocks(1, 1).unwrap();
        assert_eq!(b.ckv.len(), 2);
        assert_eq!(b.ckv[1][4], 5.0); // position 5 = block 1, offset 1
        assert!(b.index_k.is_empty());
        c.release(1);
        assert_eq!(c.used_blocks(), 1);
        c.grow(3, 8).unwrap(); // reuses freed blocks
        assert_eq!(c.used_blocks(), 3);
        let err = c.grow(4, 100).unwrap_err().to_string();
        assert!(err.contains("need 25 blocks"), "{err}");
    }

    #[test]
    fn shared_layers_hold_no_index_keys() {
        let mut c = KvCache::new(shapes(), 4, 8);
        c.grow(1, 16).unwrap();
        for pos in 0..16 {
            c.write_index_key(0, 1, pos, &[pos as f32; 3]).unwrap();
        }
        assert!(c.index_key_bytes(0) >= 16 * 3 * 4);
        assert_eq!(c.index_key_bytes(1), 0);
        assert_eq!(c.index_len(0, 1), 16);
        assert_eq!(c.index_len(1, 1), 0);
    }

    #[test]
    fn index_keys_are_per_sequence_and_freed_with_it() {
        let mut c = KvCache::new(shapes(), 4, 8);
        c.grow(1, 6).unwrap();
        c.grow(2, 6).unwrap();
        // Layer 1 (Shared by default) is Full for sequence 2 only.
        for pos in 0..6 {
            c.write_index_key(1, 2, pos, &[pos as f32 + 0.25; 3]).unwrap();
        }
        assert!(c.layer_blocks(1, 1).unwrap().index_k.is_empty());
        let b = c.layer_blocks(1, 2).unwrap();
        assert_eq!(b.index_k.len(), 2);
        assert_eq!(b.index_k[1][3], 5.25); // position 5 = block 1, offset 1, first value
        let bytes = c.index_key_bytes(1);
        c.release(2);
        assert_eq!(c.index_len(1, 2), 0);
        // Freed index blocks are reused: a new sequence does not grow the store.
        c.grow(3, 6).unwrap();
        for pos in 0..6 {
            c.write_index_key(1, 3, pos, &[1.0; 3]).unwrap();
        }
        assert_eq!(c.index_key_bytes(1), bytes);
        assert!(c.write_index_key(1, 3, 0, &[1.0; 2]).is_err());
        assert!(
            c.write_index_key(1, 3, 9, &[1.0; 3]).is_err(),
            "no main block for position 9"
        );
    }
}
