//! Sparse MLA attention in absorbed (MQA) form: every head attends to the same selected
//! latent vectors `c_kv[s]` (which serve as both key and value) plus a shared rope key.
//!
//! One task handles one query row and a group of its heads. Selected keys are visited in
//! tiles of [`KEY_TILE`]: the tile's latent vectors are read from the paged cache once and
//! stay in L1 while all of the task's heads score them and accumulate them. Softmax is
//! online (running max and denominator per head), so no per-row score array is stored.

use rayon::prelude::*;

use crate::simd::{self, exp_nonpositive, multiversion, Simd};

/// Selected keys per tile: 8 latent vectors of 512 floats are 16 KiB, which stay in L1
/// next to four heads' queries while the tile is scored (16 keys measured ~25% slower, 4
/// the same as 8).
const KEY_TILE: usize = 8;

/// Output vectors per head kept in registers while a tile is accumulated (two heads at a
/// time, so eight FMA chains: enough to cover the FMA latency on two FMA ports).
const ACC_VECTORS: usize = 4;

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
    let groups = if rows >= tasks {
        1
    } else {
        tasks.div_ceil(rows).min(heads)
    };
    // Multiples of four heads keep the 4-way dot kernel busy.
    let group_heads = heads.div_ceil(groups).next_multiple_of(4).min(heads);
    out.par_chunks_mut(heads * rank).enumerate().for_each(|(row, row_out)| {
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
fn attend_impl<S: Simd>(
    s: S,
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
    if selected.is_empty() {
        // Contract violation in release builds: zeros rather than 0/0 = NaN.
        out.fill(0.0);
        return;
    }

    scratch.clear();
    scratch.resize(nh * (KEY_TILE + 2), 0.0);
    let (probs, rest) = scratch.split_at_mut(nh * KEY_TILE);
    let (max, denom) = rest.split_at_mut(nh);
    max.fill(f32::NEG_INFINITY);
    out.fill(0.0);

    let empty: &[f32] = &[];
    let key = |pos: u32| -> (&[f32], &[f32]) {
        let (b, o) = (pos as usize / bs, pos as usize % bs);
        (
            &inp.ckv_blocks[b][o * rank..][..rank],
            &inp.kpe_blocks[b][o * rope..][..rope],
        )
    };
    for (t, tile) in selected.chunks(KEY_TILE).enumerate() {
        let nt = tile.len();
        let mut ckv = [empty; KEY_TILE];
        let mut kpe = [empty; KEY_TILE];
        for (j, &pos) in tile.iter().enumerate() {
            (ckv[j], kpe[j]) = key(pos);
        }
        // Selected keys are scattered over the cache, so the hardware prefetcher cannot
        // guess them: request the next tile while this one is computed.
        let next = selected.get((t + 1) * KEY_TILE..).unwrap_or(&[]);
        for &pos in next.iter().take(KEY_TILE) {
            let (c, k) = key(pos);
            simd::prefetch(c);
            simd::prefetch(k);
        }

        // Logits of the tile for every head, four heads per pass over each key.
        let mut h = 0;
        while h + 4 <= nh {
            let mut ql4 = [empty; 4];
            let mut qr4 = [empty; 4];
            for u in 0..4 {
                ql4[u] = &ql[(h + u) * rank..][..rank];
                qr4[u] = &qr[(h + u) * rope..][..rope];
            }
            // Two keys at a time: each query vector load serves two FMAs. The latent and
            // rope parts accumulate into the same registers, so one reduction per logit.
            let mut j = 0;
            while j + 2 <= nt {
                let mut acc = [[s.zero(); 2]; 4];
                let mut tail = [[0.0f32; 2]; 4];
                simd::dot_4x2_acc(s, ql4, [ckv[j], ckv[j + 1]], &mut acc, &mut tail);
                simd::dot_4x2_acc(s, qr4, [kpe[j], kpe[j + 1]], &mut acc, &mut tail);
                for u in 0..4 {
                    for v in 0..2 {
                        let logit = s.hsum(acc[u][v]) + tail[u][v];
                        probs[(h + u) * KEY_TILE + j + v] = logit * inp.scale;
                    }
                }
                j += 2;
            }
            if j < nt {
                let a = simd::dot4(s, ql4, ckv[j]);
                let b = simd::dot4(s, qr4, kpe[j]);
                for u in 0..4 {
                    probs[(h + u) * KEY_TILE + j] = (a[u] + b[u]) * inp.scale;
                }
            }
            h += 4;
        }
        for h in h..nh {
            let (qlh, qrh) = (&ql[h * rank..][..rank], &qr[h * rope..][..rope]);
            for j in 0..nt {
                let logit = simd::dot(s, qlh, ckv[j]) + simd::dot(s, qrh, kpe[j]);
                probs[h * KEY_TILE + j] = logit * inp.scale;
            }
        }

        // Online softmax: rescale what was accumulated under the old max, then add the tile.
        for h in 0..nh {
            let p = &mut probs[h * KEY_TILE..][..nt];
            let acc = &mut out[h * rank..][..rank];
            let mut tile_max = f32::NEG_INFINITY;
            for &v in p.iter() {
                tile_max = tile_max.max(v);
            }
            if tile_max > max[h] {
                let correction = exp_nonpositive(max[h] - tile_max);
                denom[h] *= correction;
                scale(s, acc, correction);
                max[h] = tile_max;
            }
            let m = max[h];
            let sum = if let Ok(p) = <&mut [f32; KEY_TILE]>::try_from(&mut *p) {
                // A whole tile: a fixed-length loop the compiler turns into vector code.
                let mut e = [0.0f32; KEY_TILE];
                for (e, &v) in e.iter_mut().zip(p.iter()) {
                    *e = exp_nonpositive(v - m);
                }
                *p = e;
                e.iter().sum::<f32>()
            } else {
                p.iter_mut()
                    .map(|v| {
                        *v = exp_nonpositive(*v - m);
                        *v
                    })
                    .sum()
            };
            denom[h] += sum;
        }
        accumulate(s, out, probs, &ckv[..nt], rank);
    }
    for h in 0..nh {
        scale(s, &mut out[h * rank..][..rank], 1.0 / denom[h]);
    }
}

/// `x *= factor`.
#[inline(always)]
fn scale<S: Simd>(s: S, x: &mut [f32], factor: f32) {
    let f = s.splat(factor);
    let mut chunks = x.chunks_exact_mut(S::LANES);
    for c in &mut chunks {
        s.store(c, s.mul(s.load(c), f));
    }
    chunks.into_remainder().iter_mut().for_each(|v| *v *= factor);
}

/// `out[h] += Σ_j probs[h][j] · keys[j]` for every head `h` (`probs` rows are `KEY_TILE`
/// apart). Columns are the outer loop, so one block of columns of the tile's keys and of
/// every head's output stays in L1 while all heads pass over it. Heads go in pairs that
/// share each key load; their 2 × [`ACC_VECTORS`] outputs stay in registers across the
/// tile, giving eight independent FMA chains.
#[inline(always)]
fn accumulate<S: Simd>(s: S, out: &mut [f32], probs: &[f32], keys: &[&[f32]], rank: usize) {
    let w = S::LANES;
    let nh = out.len() / rank;
    let block = ACC_VECTORS * w;
    let mut c = 0;
    while c + block <= rank {
        let mut h = 0;
        while h + 2 <= nh {
            let mut regs = [[s.zero(); ACC_VECTORS]; 2];
            for (u, r) in regs.iter_mut().enumerate() {
                for (v, reg) in r.iter_mut().enumerate() {
                    *reg = s.load(&out[(h + u) * rank + c + v * w..]);
                }
            }
            let (p0, p1) = (&probs[h * KEY_TILE..], &probs[(h + 1) * KEY_TILE..]);
            for (j, key) in keys.iter().enumerate() {
                let key = &key[c..c + block];
                let (a0, a1) = (s.splat(p0[j]), s.splat(p1[j]));
                for v in 0..ACC_VECTORS {
                    let k = s.load(&key[v * w..]);
                    regs[0][v] = s.fmadd(a0, k, regs[0][v]);
                    regs[1][v] = s.fmadd(a1, k, regs[1][v]);
                }
            }
            for (u, r) in regs.iter().enumerate() {
                for (v, reg) in r.iter().enumerate() {
                    s.store(&mut out[(h + u) * rank + c + v * w..], *reg);
                }
            }
            h += 2;
        }
        if h < nh {
            let mut regs = [s.zero(); ACC_VECTORS];
            for (v, reg) in regs.iter_mut().enumerate() {
                *reg = s.load(&out[h * rank + c + v * w..]);
            }
            for (&pj, key) in probs[h * KEY_TILE..].iter().zip(keys) {
                let (a, key) = (s.splat(pj), &key[c..c + block]);
                for (v, reg) in regs.iter_mut().enumerate() {
                    *reg = s.fmadd(a, s.load(&key[v * w..]), *reg);
                }
            }
            for (v, reg) in regs.iter().enumerate() {
                s.store(&mut out[h * rank + c + v * w..], *reg);
            }
        }
        c += block;
    }
    // Columns past the last full block: one vector, then single elements.
    for h in 0..nh {
        let acc = &mut out[h * rank..][..rank];
        let p = &probs[h * KEY_TILE..][..keys.len()];
        let mut c = c;
        while c + w <= rank {
            let mut reg = s.load(&acc[c..]);
            for (&pj, key) in p.iter().zip(keys) {
                reg = s.fmadd(s.splat(pj), s.load(&key[c..]), reg);
            }
            s.store(&mut acc[c..], reg);
            c += w;
        }
        for (&pj, key) in p.iter().zip(keys) {
            for (a, &k) in acc[c..].iter_mut().zip(&key[c..rank]) {
                *a += pj * k;
            }
        }
    }
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
