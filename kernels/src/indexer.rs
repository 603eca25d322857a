//! The DeepSeek Sparse Attention "lightning indexer": per query row, score every earlier key
//! with `I[t,s] = Σ_h w[t,h] · ReLU(q[t,h] · k[s])` and keep the top-k positions.
//!
//! The product `q · k` for a chunk of rows and a tile of keys is one GEMM with all heads of
//! all rows stacked as GEMM rows; the ReLU, head weights and head sum are folded into the
//! chunk's score matrix right after, while the tile's logits are still in cache. Logits for
//! all rows × heads × keys never exist at once.

use std::mem;

use rayon::prelude::*;

use crate::disjoint::DisjointRows;
use crate::linear::matmul_t_with;
use crate::simd::{multiversion, Simd};
use crate::topk::select_topk;

/// Target GEMM height (`chunk rows × heads`): tall enough that the packed key tile is reused
/// by many query vectors, small enough that a tile's logits stay in L2.
const CHUNK_QUERY_VECTORS: usize = 512;
/// Bounds on query rows per chunk.
const MIN_CHUNK_ROWS: usize = 8;
const MAX_CHUNK_ROWS: usize = 32;
/// Keys per GEMM tile. Paged blocks smaller than this are copied together into one
/// contiguous tile so that each GEMM call is large enough to amortize its packing.
const TILE_KEYS: usize = 256;

/// Inputs of [`indexer_topk`] for one sequence.
pub struct IndexerInputs<'a> {
    /// rows × heads × dim query vectors (RoPE already applied).
    pub q: &'a [f32],
    /// rows × heads head weights, already multiplied by every scale (heads^-0.5 · dim^-0.5).
    pub weights: &'a [f32],
    /// Paged indexer-key cache: block b holds keys of positions b*block_size ..
    /// (b+1)*block_size, each `dim` floats (block slice length block_size*dim; the last
    /// block may be only partly valid).
    pub key_blocks: &'a [&'a [f32]],
    /// Keys per cache block.
    pub block_size: usize,
    /// Absolute position t of each query row; row t scores keys 0..=t (causal, current token
    /// included).
    pub positions: &'a [usize],
    /// Indexer heads.
    pub heads: usize,
    /// Indexer head dimension.
    pub dim: usize,
    /// Keys to keep per row.
    pub topk: usize,
}

/// For each row: indices (sorted ascending) of the min(topk, t+1) keys with the highest score
/// I[t,s] = Σ_h weights[t,h] · ReLU(q[t,h]·k[s]), ties broken as in select_topk.
///
/// `out` is resized to the number of rows; existing inner vectors are reused. Rows with
/// `t + 1 <= topk` get `0..=t` without any scoring (attention is dense there).
///
/// Scored rows are sorted by position and processed in chunks of 8–32 rows (about 512
/// query vectors). Within a chunk, key tiles are scored in parallel and then rows select in
/// parallel; chunks run one after another, which is what bounds memory. Scratch, independent
/// of the number of rows:
/// - chunk scores: `chunk_rows × (max position in chunk + 1)` floats (rounded up to a tile);
/// - per running tile task: `chunk_rows·heads × 256` logits;
/// - when cache blocks are smaller than a tile: the keys up to the last scored position,
///   contiguous (`positions × dim` floats, 16 MiB at 32K keys of 128 floats), copied once;
/// - per running select task: one row of scores as packed `u64` keys (`select_topk` reads
///   the row's scores in place).
pub fn indexer_topk(inp: &IndexerInputs<'_>, out: &mut Vec<Vec<u32>>) {
    let rows = inp.positions.len();
    let (heads, dim) = (inp.heads, inp.dim);
    debug_assert_eq!(inp.q.len(), rows * heads * dim, "indexer: q is not rows×heads×dim");
    debug_assert_eq!(inp.weights.len(), rows * heads, "indexer: weights is not rows×heads");
    debug_assert!(inp.block_size > 0, "indexer: block_size is 0");
    out.resize_with(rows, Vec::new);

    let mut scored = Vec::new();
    for (r, &t) in inp.positions.iter().enumerate() {
        if t < inp.topk {
            out[r].clear();
            out[r].extend(0..=t as u32);
        } else {
            scored.push(r);
        }
    }
    if scored.is_empty() {
        return;
    }
    // Rows of similar position share a chunk, so few keys are scored past a row's own end.
    scored.sort_by_key(|&r| inp.positions[r]);

    let chunk_rows = (CHUNK_QUERY_VECTORS / heads.max(1)).clamp(MIN_CHUNK_ROWS, MAX_CHUNK_ROWS);
    // Paged blocks smaller than a tile are copied into one contiguous run of keys once per
    // call, not once per chunk of rows and tile.
    let n_keys = inp.positions[*scored.last().expect("non-empty")] + 1;
    debug_assert!(
        inp.key_blocks.len() >= n_keys.div_ceil(inp.block_size),
        "indexer: key cache has fewer blocks than positions need"
    );
    let keys = contiguous_keys(inp, n_keys);
    let mut chunk = ChunkScratch::default();
    for rows in scored.chunks(chunk_rows) {
        chunk.score(inp, rows, keys.as_deref());
        let stride = chunk.row_stride;
        let mut results: Vec<(usize, Vec<u32>)> = rows.iter().map(|&r| (r, mem::take(&mut out[r]))).collect();
        let scores = &chunk.scores;
        results.par_iter_mut().enumerate().for_each(|(i, (r, sel))| {
            // The row's scores up to its own position: every tile of the chunk wrote them.
            let n = inp.positions[*r] + 1;
            select_topk(&scores[i * stride..][..n], inp.topk, sel);
        });
        for (r, sel) in results {
            out[r] = sel;
        }
    }
}

/// Reusable per-call buffers for one chunk of rows.
#[derive(Default)]
struct ChunkScratch {
    /// The chunk's query vectors, contiguous: (chunk_rows·heads) × dim.
    q: Vec<f32>,
    /// The chunk's head weights: chunk_rows × heads.
    weights: Vec<f32>,
    /// Scores, row-major: chunk_rows × `row_stride`. Each tile task writes its own columns
    /// of every row, and each row is selected from in place.
    scores: Vec<f32>,
    /// Floats per row of `scores`: the chunk's keys rounded up to whole tiles.
    row_stride: usize,
}

/// The first `n_keys` keys of `inp`'s paged blocks as one contiguous buffer, or `None` when
/// a block holds a whole tile (tiles are then read from the blocks in place).
fn contiguous_keys(inp: &IndexerInputs<'_>, n_keys: usize) -> Option<Vec<f32>> {
    let (bs, dim) = (inp.block_size, inp.dim);
    if bs >= TILE_KEYS {
        return None;
    }
    let mut keys = vec![0.0f32; n_keys * dim];
    keys.par_chunks_mut(bs * dim)
        .zip(inp.key_blocks.par_iter())
        .for_each(|(dst, block)| dst.copy_from_slice(&block[..dst.len()]));
    Some(keys)
}

impl ChunkScratch {
    /// Fills `self.scores` for `rows`, covering keys `0..=max position` of the chunk, read
    /// from `keys` ([`contiguous_keys`]) in tiles of [`TILE_KEYS`] when given, else from the
    /// blocks in place, a block per tile.
    fn score(&mut self, inp: &IndexerInputs<'_>, rows: &[usize], keys: Option<&[f32]>) {
        let (heads, dim) = (inp.heads, inp.dim);
        let qv = heads * dim;
        self.q.clear();
        self.weights.clear();
        for &r in rows {
            self.q.extend_from_slice(&inp.q[r * qv..(r + 1) * qv]);
            self.weights.extend_from_slice(&inp.weights[r * heads..(r + 1) * heads]);
        }
        let n_keys = rows.iter().map(|&r| inp.positions[r]).max().unwrap_or(0) + 1;
        let tile = if keys.is_some() { TILE_KEYS } else { inp.block_size };
        let n_tiles = n_keys.div_ceil(tile);
        let stride = n_tiles * tile;
        self.row_stride = stride;
        // Not cleared: a row is read only up to its own position, and every tile writes
        // its columns of every row below that.
        if self.scores.len() < rows.len() * stride {
            self.scores.resize(rows.len() * stride, 0.0);
        }

        let (q, weights) = (&self.q, &self.weights);
        let m = rows.len() * heads;
        let scores = DisjointRows::new(&mut self.scores, stride);
        (0..n_tiles).into_par_iter().for_each_init(Vec::new, |logits, ti| {
            let first = ti * tile;
            let valid = tile.min(n_keys - first);
            let tile_keys = match keys {
                Some(all) => &all[first * dim..][..valid * dim],
                None => &inp.key_blocks[ti][..valid * dim],
            };
            logits.resize(m * valid, 0.0);
            matmul_t_with(q, tile_keys, logits, m, dim, valid, false);
            // SAFETY: tile `ti` writes only columns first..first + valid of the chunk's
            // rows, which lie inside `self.scores` (rows × stride, stride ≥ first +
            // valid) and which no other tile task touches.
            fold_heads(logits, weights, unsafe { scores.columns(first) }, heads, valid);
        });
    }
}

multiversion! {
    /// `scores[r][j] = Σ_h weights[r][h] · ReLU(logits[r·heads + h][j])` for `j < valid`;
    /// `logits` rows are `valid` apart.
    fn fold_heads(
        logits: &[f32],
        weights: &[f32],
        scores: DisjointRows<'_>,
        heads: usize,
        valid: usize,
    ) => fold_heads_impl
}

#[inline(always)]
fn fold_heads_impl<S: Simd>(
    s: S,
    logits: &[f32],
    weights: &[f32],
    scores: DisjointRows<'_>,
    heads: usize,
    valid: usize,
) {
    if heads == 0 || valid == 0 {
        return;
    }
    let lanes = S::LANES;
    let full = valid / lanes * lanes;
    for (r, w) in weights.chunks_exact(heads).enumerate() {
        // SAFETY: `scores` addresses `valid` floats of each of the chunk's rows for this
        // task alone (see `DisjointRows`).
        let row = unsafe { scores.row(r, valid) };
        let l = &logits[r * heads * valid..][..heads * valid];
        // Each vector of scores is summed over all heads in a register and stored once.
        let mut j = 0;
        while j < full {
            let mut acc = [s.zero(); 2];
            for h in 0..heads {
                let v = s.relu(s.load(&l[h * valid + j..]));
                acc[h & 1] = s.fmadd(s.splat(w[h]), v, acc[h & 1]);
            }
            s.store(&mut row[j..], s.add(acc[0], acc[1]));
            j += lanes;
        }
        for (j, o) in row.iter_mut().enumerate().skip(full) {
            let mut sum = 0.0f32;
            for h in 0..heads {
                sum += w[h] * l[h * valid + j].max(0.0);
            }
            *o = sum;
        }
    }
}

#[cfg(test)]
#[path = "indexer_tests.rs"]
mod tests;
