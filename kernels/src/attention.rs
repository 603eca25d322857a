//! Sparse MLA attention in absorbed (MQA) form: every head attends to the same selected
//! latent vectors `c_kv[s]` (which serve as both key and value) plus a shared rope key.
//!
//! One task handles one query row and a group of its heads. Selected keys are visited in
//! tiles of [`KEY_TILE`]: the tile's latent vectors are read from the paged cache once and
//! stay in L1 while all of the task's heads score them and accumulate them. Softmax is
//! online (running max and denominator per head), so no per-row score array is stored.

use rayon::prelude::*;

use crate::simd::{self, fmadd, multiversion};

/// Selected keys per tile: 16 latent vectors of 512 floats are 32 KiB, which fits in L1
/// next to a head's accumulator.
const KEY_TILE: usize = 16;

/// Output floats kept in registers while a tile is accumulated into one head's output.
const ACC_WIDTH: usize = 64;

/// Inputs of [`sparse_mla_attention`] for one sequence.
pub struct MlaAttentionInputs<'a> {
    /// rows × heads × kv_rank: each head's nope query already multiplied through
    /// kv_b_proj's key part.
    pub q_latent: &'a [f32],
    /// rows × heads × rope_dim rotated query rope parts.
    pub q_rope: &'a [f32],
    /// Paged latent cache: block b holds c_kv of positions b*block_size.., each kv_rank
    /// floats.
    pub ckv_blocks: &'a [&'a [f32]],
    /// Paged rope-key cache, same paging, each rope_dim floats.
    pub kpe_blocks: &'a [&'a [f32]],
    /// Positions per cache block.
    pub block_size: usize,
    /// Per row, the selected key positions (sorted ascending, non-empty).
    pub selected: &'a [Vec<u32>],
    /// Attention heads.
    pub heads: usize,
    /// Latent (compressed KV) dimension.
    pub kv_rank: usize,
    /// Rope part dimension of queries and keys.
    pub rope_dim: usize,
    /// Softmax scale (qk_head_dim^-0.5, times YaRN mscale² where configured).
    pub scale: f32,
}

/// out: rows × heads × kv_rank, out[r,h] = Σ_s softmax_s(scale·(q_latent[r,h]·ckv[s] +
/// q_rope[r,h]·kpe[s])) · ckv[s]
///
/// Parallel over rows; with fewer rows than twice the thread count (decode) each row's heads
/// are also split into groups so every thread has work. Scratch is a few floats per head.
pub fn sparse_mla_attention(inp: &MlaAttentionInputs<'_>, out: &mut [f32]) {
    let rows = inp.selected.len();
    let (heads, rank) = (inp.heads, inp.kv_rank);
    debug_assert_eq!(inp.q_latent.len(), rows * heads * rank, "attention: q_latent shape");
    debug_assert_eq!(inp.q_rope.len(), rows * heads * inp.rope_dim, "attention: q_rope shape");
    debug_assert_eq!(out.len(), rows * heads * rank, "attention: out shape");
    debug_assert!(inp.block_size > 0, "attention: block_size is 0");
    if rows == 0 || heads == 0 || rank == 0 {
        return;
    }
    let tasks = 2 * rayon::current_num_threads();
    let groups = if rows >= tasks { 1 } else { tasks.div_ceil(rows).min(heads) };
    // Multiples of four heads keep the 4-way dot kernel busy.
    let group_heads = heads.div_ceil(groups).next_multiple_of(4).min(heads);
    out.par_chunks_mut(heads * rank)
        .enumerate()
        .for_each(|(row, row_out)| {
            row_out
                .par_chunks_mut(group_heads * rank)
                .enumerate()
                .for_each_init(Vec::new, |scratch, (g, head_out)| {
                    attend(inp, row, g * group_heads, head_out, scratch);
                });
        });
}

multiversion! {
    /// Attention of row `row`, heads `h0..h0 + out.len() / kv_rank`, into `out`.
    fn attend(
        inp: &MlaAttentionInputs<'_>,
        row: usize,
        h0: usize,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) => attend_impl
}

#[inline(always)]
fn attend_impl<const FMA: bool>(
    inp: &MlaAttentionInputs<'_>,
    row: usize,
    h0: usize,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (heads, rank, rope, bs) = (inp.heads, inp.kv_rank, inp.rope_dim, inp.block_size);
    let nh = out.len() / rank;
    let ql = &inp.q_latent[(row * heads + h0) * rank..][..nh * rank];
    let qr = &inp.q_rope[(row * heads + h0) * rope..][..nh * rope];
    let selected = &inp.selected[row];
    debug_assert!(!selected.is_empty(), "attention: row {row} selects no keys");

    scratch.clear();
    scratch.resize(nh * (KEY_TILE + 2), 0.0);
    let (probs, rest) = scratch.split_at_mut(nh * KEY_TILE);
    let (max, denom) = rest.split_at_mut(nh);
    max.fill(f32::NEG_INFINITY);
    out.fill(0.0);

    let empty: &[f32] = &[];
    for tile in selected.chunks(KEY_TILE) {
        let nt = tile.len();
        let mut ckv = [empty; KEY_TILE];
        let mut kpe = [empty; KEY_TILE];
        for (j, &s) in tile.iter().enumerate() {
            let (b, o) = (s as usize / bs, s as usize % bs);
            ckv[j] = &inp.ckv_blocks[b][o * rank..][..rank];
            kpe[j] = &inp.kpe_blocks[b][o * rope..][..rope];
        }

        // Logits of the tile for every head, four heads per pass over each key.
        let mut h = 0;
        while h + 4 <= nh {
            let ql4: [&[f32]; 4] = std::array::from_fn(|u| &ql[(h + u) * rank..][..rank]);
            let qr4: [&[f32]; 4] = std::array::from_fn(|u| &qr[(h + u) * rope..][..rope]);
            for j in 0..nt {
                let a = simd::dot4::<FMA>(ql4, ckv[j]);
                let b = simd::dot4::<FMA>(qr4, kpe[j]);
                for u in 0..4 {
                    probs[(h + u) * KEY_TILE + j] = (a[u] + b[u]) * inp.scale;
                }
            }
            h += 4;
        }
        for h in h..nh {
            let (qlh, qrh) = (&ql[h * rank..][..rank], &qr[h * rope..][..rope]);
            for j in 0..nt {
                let logit = simd::dot::<FMA>(qlh, ckv[j]) + simd::dot::<FMA>(qrh, kpe[j]);
                probs[h * KEY_TILE + j] = logit * inp.scale;
            }
        }

        // Online softmax: rescale what was accumulated under the old max, then add the tile.
        for h in 0..nh {
            let p = &mut probs[h * KEY_TILE..][..nt];
            let acc = &mut out[h * rank..][..rank];
            let tile_max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if tile_max > max[h] {
                let correction = (max[h] - tile_max).exp();
                denom[h] *= correction;
                acc.iter_mut().for_each(|v| *v *= correction);
                max[h] = tile_max;
            }
            let mut sum = 0.0f32;
            for v in p.iter_mut() {
                *v = (*v - max[h]).exp();
                sum += *v;
            }
            denom[h] += sum;
            accumulate::<FMA>(acc, p, &ckv[..nt]);
        }
    }
    for h in 0..nh {
        let inv = 1.0 / denom[h];
        out[h * rank..][..rank].iter_mut().for_each(|v| *v *= inv);
    }
}

/// `acc += Σ_j p[j] · keys[j]`, holding `ACC_WIDTH` outputs in registers across the tile so
/// each key element costs one load and one FMA.
#[inline(always)]
fn accumulate<const FMA: bool>(acc: &mut [f32], p: &[f32], keys: &[&[f32]]) {
    let n = acc.len();
    let full = n / ACC_WIDTH * ACC_WIDTH;
    let mut c = 0;
    while c < full {
        let mut regs = [0.0f32; ACC_WIDTH];
        regs.copy_from_slice(&acc[c..c + ACC_WIDTH]);
        for (&pj, key) in p.iter().zip(keys) {
            let k = &key[c..c + ACC_WIDTH];
            for i in 0..ACC_WIDTH {
                regs[i] = fmadd::<FMA>(pj, k[i], regs[i]);
            }
        }
        acc[c..c + ACC_WIDTH].copy_from_slice(&regs);
        c += ACC_WIDTH;
    }
    for (&pj, key) in p.iter().zip(keys) {
        for (a, &k) in acc[full..].iter_mut().zip(&key[full..n]) {
            *a = fmadd::<FMA>(pj, k, *a);
        }
    }
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
