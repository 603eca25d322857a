//! MLA attention for prefill in expanded (multi-head) form.
//!
//! Decode attends one row to its selected keys, and the absorbed kernel in
//! [`crate::attention`] is the cheap way there: per row × key × head it costs
//! `2·kv_rank + rope_dim` multiply-adds (1088 for DeepSeek-V3.2's shapes) and expands
//! nothing. A prefill chunk has many rows that see mostly the same keys, so it pays to
//! expand each key once through `kv_b_proj` into every head's `k_nope` and `v`
//! (`kv_rank × heads × (nope + v)` per key) and then run row-block × key-tile GEMMs that
//! cost `nope + rope + v` per row × key × head (320 for V3.2) at GEMM efficiency. This is
//! the prefill/decode split vLLM and SGLang make for MLA.
//!
//! Keys are visited in tiles over the union of the rows' selections. A block of rows
//! scores every key of a tile up to its last row's position and masks the keys a row did
//! not select, so sparse rows pay for the union of their block rather than their own top-k:
//! [`MlaKeyPlan::macs`] prices both forms so the caller can pick.

use rayon::prelude::*;

use crate::linear::{gemm_strided, matmul_t, Product, Strided};
use crate::simd::{exp_nonpositive, multiversion, Simd};

/// Query rows per block: the M of the score and value GEMMs.
const ROW_BLOCK: usize = 128;

/// Keys per tile: a tile's expanded keys (heads × (nope + v) floats each) are computed once
/// and shared by every row block; 512 keys × 16 heads × 256 floats are 8 MiB. Against 256
/// keys, half the GEMM calls and online-softmax rescales, and a value GEMM twice as deep:
/// `kernel-bench chunk` 7–11% faster (median 8%; 1024 was in between).
const KEY_TILE: usize = 512;

/// Rows per score/value GEMM call: `gemm` packs the key-side operand once the other side
/// is wider than 8 micro-kernel columns of 6, so at most 48 rows keep it reading the keys
/// and values in place.
const GEMM_ROWS: usize = 48;

/// Padding of the transposed keys' row stride, so consecutive rows do not alias in L1.
const KEY_PAD: usize = 16;

/// Floats per 64-byte cache line: row strides are multiples of it, buffers start on one.
const LINE_FLOATS: usize = 16;

/// Expanded multiply-adds run this much cheaper than absorbed ones: the expanded form is
/// block GEMMs, the absorbed one per-row dot products (`kernel-bench prefill` measured 1.4×
/// to 1.7× more multiply-adds per second on near-dense chunks).
const EXPANDED_MAC_COST: f64 = 0.65;

/// Which keys a chunk's rows need, computed once and shared by the cost estimate and the
/// kernel.
pub struct MlaKeyPlan {
    /// Sorted union of every row's selected positions.
    union: Vec<u32>,
    /// Per block of [`ROW_BLOCK`] rows, its largest selected position.
    block_last: Vec<u32>,
    /// Total selected keys over all rows.
    selected_total: usize,
}

/// The shapes that price a chunk's attention.
#[derive(Clone, Copy, Debug)]
pub struct MlaDims {
    /// Attention heads.
    pub heads: usize,
    /// Latent (compressed KV) dimension.
    pub kv_rank: usize,
    /// Non-rotary part of each head's query/key.
    pub nope_dim: usize,
    /// Rotary part of queries and keys.
    pub rope_dim: usize,
    /// Value dimension per head.
    pub v_dim: usize,
}

/// Multiply-adds of a chunk's attention in each form (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct MlaMacs {
    /// Absorbed form: query absorption, per-row attention over the selected keys, value
    /// expansion of the outputs.
    pub absorbed: f64,
    /// Expanded form: key expansion of the union, masked block GEMMs.
    pub expanded: f64,
}

impl MlaMacs {
    /// Whether the expanded form is expected to run faster, weighing each form's
    /// multiply-adds by how fast it runs them.
    pub fn prefers_expanded(&self) -> bool {
        self.expanded * EXPANDED_MAC_COST < self.absorbed
    }
}

impl MlaKeyPlan {
    /// The plan of `rows` consecutive rows from position `start`, row `t` selecting
    /// `min(t + 1, topk)` keys, when the selections of every block of rows together cover
    /// every position up to the block's last row. That holds exactly for rows that select
    /// all their keys, and was measured for `dsa_bench`'s model at 4K (each 128-row block's
    /// union of top-2048 selections held every earlier key): benchmarks price a prefill with
    /// it without running the indexer.
    pub fn covering(start: usize, rows: usize, topk: usize) -> Self {
        let end = start + rows;
        MlaKeyPlan {
            union: (0..end as u32).collect(),
            block_last: (0..rows.div_ceil(ROW_BLOCK))
                .map(|b| ((start + (b + 1) * ROW_BLOCK).min(end) - 1) as u32)
                .collect(),
            selected_total: (start..end).map(|t| (t + 1).min(topk)).sum(),
        }
    }

    /// Plans `selected` (per row, sorted ascending, non-empty).
    pub fn new(selected: &[Vec<u32>]) -> Self {
        let last = selected.iter().filter_map(|s| s.last()).copied().max();
        let n = last.map_or(0, |l| l as usize + 1);
        // A row that selected every position up to its last (all rows before `index_topk`)
        // only extends the covered prefix; the others are marked, a part of the rows per
        // task, and the parts' marks merged.
        let prefix = selected
            .iter()
            .filter_map(|s| s.last().filter(|&&l| s.len() == l as usize + 1))
            .map(|&l| l as usize + 1)
            .max()
            .unwrap_or(0);
        let seen = selected
            .par_chunks(ROW_BLOCK)
            .fold(
                || vec![false; n],
                |mut seen, rows| {
                    for row in rows
                        .iter()
                        .filter(|s| s.last().is_some_and(|&l| s.len() != l as usize + 1))
                    {
                        for &p in row {
                            seen[p as usize] = true;
                        }
                    }
                    seen
                },
            )
            .reduce(
                || vec![false; n],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a |= b);
                    a
                },
            );
        let union = (0..n as u32)
            .filter(|&p| (p as usize) < prefix || seen[p as usize])
            .collect();
        let block_last = selected
            .chunks(ROW_BLOCK)
            .map(|b| b.iter().filter_map(|s| s.last()).copied().max().unwrap_or(0))
            .collect();
        MlaKeyPlan {
            union,
            block_last,
            selected_total: selected.iter().map(Vec::len).sum(),
        }
    }

    /// Prices both forms for `rows` rows (the length of the planned `selected`).
    pub fn macs(&self, rows: usize, d: MlaDims) -> MlaMacs {
        let h = d.heads as f64;
        let absorbed = self.selected_total as f64 * h * (2 * d.kv_rank + d.rope_dim) as f64
            + rows as f64 * h * (d.kv_rank * (d.nope_dim + d.v_dim)) as f64;
        let mut pairs = 0.0;
        for (b, &last) in self.block_last.iter().enumerate() {
            let block_rows = ROW_BLOCK.min(rows - b * ROW_BLOCK);
            let keys = self.union.partition_point(|&p| p <= last);
            pairs += (block_rows * keys) as f64;
        }
        let expanded = self.union.len() as f64 * h * (d.kv_rank * (d.nope_dim + d.v_dim)) as f64
            + pairs * h * (d.nope_dim + d.rope_dim + d.v_dim) as f64;
        MlaMacs { absorbed, expanded }
    }
}

/// Inputs of [`mla_prefill_attention`] for one sequence's chunk.
pub struct MlaPrefillInputs<'a> {
    /// rows × heads × (nope_dim + rope_dim) queries, rope part already rotated.
    pub q: &'a [f32],
    /// Paged latent cache: block b holds c_kv of positions b*block_size.., each kv_rank
    /// floats.
    pub ckv_blocks: &'a [&'a [f32]],
    /// Paged rope-key cache, same paging, each rope_dim floats.
    pub kpe_blocks: &'a [&'a [f32]],
    /// Positions per cache block.
    pub block_size: usize,
    /// Per row, the selected key positions (sorted ascending, non-empty).
    pub selected: &'a [Vec<u32>],
    /// The plan of `selected` ([`MlaKeyPlan::new`]).
    pub plan: &'a MlaKeyPlan,
    /// `kv_b_proj.weight`: heads × (nope_dim + v_dim) rows of kv_rank, each head's key
    /// rows first.
    pub kv_b: &'a [f32],
    /// Shapes.
    pub dims: MlaDims,
    /// Softmax scale (qk_head_dim^-0.5, times YaRN mscale² where configured).
    pub scale: f32,
}

/// Scratch and running softmax state of one block of rows.
struct BlockState<'a> {
    /// rows × heads × v_dim output accumulator (unnormalized until the end).
    out: &'a mut [f32],
    /// rows × heads running maximum of the scaled logits.
    max: &'a mut [f32],
    /// rows × heads running softmax denominator.
    denom: &'a mut [f32],
    /// Per row, the index of the first selected position not yet passed.
    cursor: &'a mut [usize],
}

/// out: rows × heads × v_dim, out[r, h] = Σ_s softmax_s(scale · (q[r,h] · k_h[s])) · v_h[s]
/// over the row's selected positions s, where k_h[s] = [W_uk_h · c_kv[s], k_pe[s]] and
/// v_h[s] = W_uv_h · c_kv[s]. Same result as the absorbed kernel followed by the value
/// expansion, in a different order of summation.
pub fn mla_prefill_attention(inp: &MlaPrefillInputs<'_>, out: &mut [f32]) {
    let d = inp.dims;
    let rows = inp.selected.len();
    let (h, r, dv) = (d.heads, d.kv_rank, d.v_dim);
    let dkv = d.nope_dim + d.v_dim;
    debug_assert_eq!(
        inp.q.len(),
        rows * h * (d.nope_dim + d.rope_dim),
        "prefill attention: q shape"
    );
    debug_assert_eq!(out.len(), rows * h * dv, "prefill attention: out shape");
    debug_assert_eq!(inp.kv_b.len(), h * dkv * r, "prefill attention: kv_b shape");
    debug_assert_eq!(
        inp.plan.block_last.len(),
        rows.div_ceil(ROW_BLOCK),
        "prefill attention: plan"
    );
    if rows == 0 || h == 0 || dv == 0 {
        return;
    }
    out.fill(0.0);
    let mut max = vec![f32::NEG_INFINITY; rows * h];
    let mut denom = vec![0.0f32; rows * h];
    let mut cursor = vec![0usize; rows];
    let mut ckv = vec![0.0f32; KEY_TILE * r];
    let mut kpe = vec![0.0f32; KEY_TILE * d.rope_dim];
    let mut expanded = vec![0.0f32; KEY_TILE * h * dkv];
    let dq = d.nope_dim + d.rope_dim;
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    let bs = inp.block_size;
    for tile in inp.plan.union.chunks(KEY_TILE) {
        let n = tile.len();
        for (j, &p) in tile.iter().enumerate() {
            let (b, o) = (p as usize / bs, p as usize % bs);
            ckv[j * r..][..r].copy_from_slice(&inp.ckv_blocks[b][o * r..][..r]);
            kpe[j * d.rope_dim..][..d.rope_dim].copy_from_slice(&inp.kpe_blocks[b][o * d.rope_dim..][..d.rope_dim]);
        }
        let e = &mut expanded[..n * h * dkv];
        matmul_t(&ckv[..n * r], inp.kv_b, e, n, r, h * dkv);
        // Regroup per head into the layouts the GEMMs read without packing: keys
        // transposed, dq × n ([nope | rope] down the rows, the rope key shared by every
        // head), so a key's scores for consecutive keys are contiguous; values n × dv.
        // Rows start on cache lines (the GEMMs load them as whole vectors): strides are
        // multiples of 16 floats and the buffers start on a 64-byte boundary.
        let ks = n.next_multiple_of(LINE_FLOATS) + KEY_PAD;
        let keys = cache_aligned(&mut keys, h * ks * dq);
        let vs = dv.next_multiple_of(LINE_FLOATS) + KEY_PAD;
        let values = cache_aligned(&mut values, h * n * vs);
        keys.par_chunks_mut(ks * dq)
            .zip(values.par_chunks_mut(n * vs))
            .enumerate()
            .for_each(|(head, (k, v))| {
                for j in 0..n {
                    let src = &e[(j * h + head) * dkv..][..dkv];
                    for (c, &x) in src[..d.nope_dim].iter().enumerate() {
                        k[c * ks + j] = x;
                    }
                    for (c, &x) in kpe[j * d.rope_dim..][..d.rope_dim].iter().enumerate() {
                        k[(d.nope_dim + c) * ks + j] = x;
                    }
                    v[j * vs..][..dv].copy_from_slice(&src[d.nope_dim..]);
                }
            });
        let ops = TileOperands {
            keys,
            values,
            key_stride: ks,
            value_stride: vs,
        };
        out.par_chunks_mut(ROW_BLOCK * h * dv)
            .zip(max.par_chunks_mut(ROW_BLOCK * h))
            .zip(denom.par_chunks_mut(ROW_BLOCK * h))
            .zip(cursor.par_chunks_mut(ROW_BLOCK))
            .enumerate()
            .for_each_init(Scratch::default, |scratch, (b, (((out, max), denom), cursor))| {
                let mut st = BlockState {
                    out,
                    max,
                    denom,
                    cursor,
                };
                block_tile(inp, b, tile, &ops, &mut st, scratch);
            });
    }
    out.par_chunks_mut(dv).zip(denom.par_iter()).for_each(|(o, &l)| {
        // A row always selects at least one key, so l > 0; guard against 0/0 anyway.
        let f = if l > 0.0 { 1.0 / l } else { 0.0 };
        o.iter_mut().for_each(|v| *v *= f);
    });
}

/// Per-task buffers of [`block_tile`].
#[derive(Default)]
struct Scratch {
    /// rows × keys scores, then probabilities.
    scores: Vec<f32>,
    /// rows × keys: 0 where the row selected the key, -inf where it did not (added to the
    /// logits, which keeps the softmax loop free of branches). Only rows without a prefix
    /// write and use theirs; the others' slots hold whatever an earlier tile left.
    mask: Vec<f32>,
    /// Per row, `Some(n)` when the row selected exactly the tile's first `n` keys.
    prefix: Vec<Option<usize>>,
    /// Per group of [`GEMM_ROWS`] rows, how many of the tile's keys its GEMMs cover.
    group_keys: Vec<usize>,
}

/// One key tile's expanded keys and values, per head, in the layouts the GEMMs read in
/// place.
struct TileOperands<'a> {
    /// Per head, (nope + rope) rows of `key_stride` floats: the tile's keys transposed.
    keys: &'a [f32],
    /// Per head, one row of `value_stride` floats per key (v_dim used).
    values: &'a [f32],
    /// Row stride of the transposed keys: the tile's length plus [`KEY_PAD`].
    key_stride: usize,
    /// Row stride of the values: v_dim plus [`KEY_PAD`].
    value_stride: usize,
}

/// Adds key tile `tile` to row block `b`.
fn block_tile(
    inp: &MlaPrefillInputs<'_>,
    b: usize,
    tile: &[u32],
    ops: &TileOperands<'_>,
    st: &mut BlockState<'_>,
    scratch: &mut Scratch,
) {
    let d = inp.dims;
    let (h, dv) = (d.heads, d.v_dim);
    let dq = d.nope_dim + d.rope_dim;
    let n = tile.len();
    let rows = st.cursor.len();
    let row0 = b * ROW_BLOCK;
    // Keys past the block's last selected position are masked for every row: skip them.
    let nk = tile.partition_point(|&p| p <= inp.plan.block_last[b]);
    if nk == 0 {
        return;
    }
    // Per row, how its selection meets this tile: a row that selected every key up to
    // its own (all rows before `index_topk`) takes a prefix of the tile and needs no mask.
    scratch.prefix.clear();
    // Only masked rows write (and later read) their part of the mask.
    if scratch.mask.len() < rows * nk {
        scratch.mask.resize(rows * nk, f32::NEG_INFINITY);
    }
    let keys_here = &tile[..nk];
    let contiguous = keys_here[nk - 1] - keys_here[0] == (nk - 1) as u32;
    let mut any = false;
    for (i, cur) in st.cursor.iter_mut().enumerate() {
        let sel = &inp.selected[row0 + i];
        let last = *sel.last().expect("a row selects at least one key");
        if sel.len() == last as usize + 1 {
            let valid = keys_here.partition_point(|&p| p <= last);
            scratch.prefix.push(Some(valid));
            any |= valid > 0;
            continue;
        }
        scratch.prefix.push(None);
        let mask = &mut scratch.mask[i * nk..][..nk];
        if contiguous {
            // The tile's keys are consecutive positions: a selected position's slot is
            // its offset from the first. A linear walk from the cursor, which normally
            // sits at the tile's first key already.
            mask.fill(f32::NEG_INFINITY);
            let (first, last) = (keys_here[0], keys_here[nk - 1]);
            let mut c = *cur;
            while c < sel.len() && sel[c] < first {
                c += 1;
            }
            let lo = c;
            while c < sel.len() && sel[c] <= last {
                mask[(sel[c] - first) as usize] = 0.0;
                c += 1;
            }
            any |= c > lo;
            *cur = c;
            continue;
        }
        for (m, &p) in mask.iter_mut().zip(keys_here) {
            while *cur < sel.len() && sel[*cur] < p {
                *cur += 1;
            }
            let hit = *cur < sel.len() && sel[*cur] == p;
            *m = if hit { 0.0 } else { f32::NEG_INFINITY };
            any |= hit;
        }
    }
    if !any {
        return;
    }
    // Each GEMM group of rows stops at its own last selected key: on the causal diagonal
    // that is up to a block's worth of keys fewer than the block's.
    scratch.group_keys.clear();
    scratch.group_keys.extend((0..rows).step_by(GEMM_ROWS).map(|r0| {
        let last = (r0..rows.min(r0 + GEMM_ROWS))
            .filter_map(|i| inp.selected[row0 + i].last())
            .copied()
            .max()
            .unwrap_or(0);
        keys_here.partition_point(|&p| p <= last)
    }));
    let s = cache_aligned(&mut scratch.scores, rows * nk);
    let q = &inp.q[row0 * h * dq..(row0 + rows) * h * dq];
    for head in 0..h {
        for (g, &gk) in scratch.group_keys.iter().enumerate() {
            if gk == 0 {
                continue;
            }
            let r0 = g * GEMM_ROWS;
            let rs = GEMM_ROWS.min(rows - r0);
            // Scores: rs × dq queries against the tile's first gk keys (dq × n, row-major).
            // At most GEMM_ROWS rows per call: `gemm` then reads the keys in place instead
            // of packing them again for every row block.
            gemm_strided(
                &mut s[r0 * nk..],
                Strided::rows(nk),
                &q[r0 * h * dq + head * dq..],
                Strided::rows(h * dq),
                &ops.keys[head * ops.key_stride * dq..],
                Strided::rows(ops.key_stride),
                (rs, gk, dq),
                Product::Overwrite(inp.scale),
            );
            for i in r0..r0 + rs {
                let at = i * h + head;
                let row = &mut s[i * nk..][..gk];
                let out = &mut st.out[at * dv..][..dv];
                match scratch.prefix[i] {
                    Some(valid) => {
                        row[valid..].fill(0.0);
                        softmax_tile(&mut row[..valid], None, &mut st.max[at], &mut st.denom[at], out)
                    }
                    None => softmax_tile(
                        row,
                        Some(&scratch.mask[i * nk..][..gk]),
                        &mut st.max[at],
                        &mut st.denom[at],
                        out,
                    ),
                }
            }
            // Values: out[i, head] += Σ_j p[i, j] · v_head[j].
            gemm_strided(
                &mut st.out[r0 * h * dv + head * dv..],
                Strided::rows(h * dv),
                &s[r0 * nk..],
                Strided::rows(nk),
                &ops.values[head * n * ops.value_stride..],
                Strided::rows(ops.value_stride),
                (rs, dv, gk),
                Product::Accumulate,
            );
        }
    }
}

/// `len` floats of `buf` (grown as needed) from its first cache-line boundary, so that rows
/// whose stride is a multiple of [`LINE_FLOATS`] never straddle two lines: a vector load
/// that does costs two.
fn cache_aligned(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    let slack = LINE_FLOATS - 1;
    if buf.len() < len + slack {
        buf.resize(len + slack, 0.0);
    }
    let at = buf.as_ptr().align_offset(LINE_FLOATS * 4).min(slack);
    &mut buf[at..at + len]
}

multiversion! {
    /// Turns one row's scaled scores (plus `mask`, 0 or -inf per key, when given) into
    /// probabilities under the running maximum `max` (updated), adds their sum to `denom`
    /// (after rescaling it), and rescales the row's accumulated output `out` to match.
    fn softmax_tile(s: &mut [f32], mask: Option<&[f32]>, max: &mut f32, denom: &mut f32, out: &mut [f32])
        => softmax_tile_impl
}

#[inline(always)]
fn softmax_tile_impl<S: Simd>(
    _s: S,
    scores: &mut [f32],
    mask: Option<&[f32]>,
    max: &mut f32,
    denom: &mut f32,
    out: &mut [f32],
) {
    // Lane arrays keep the reductions vectorizable (no reassociation of one scalar chain).
    const L: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; L];
    let tail = scores.len() / L * L;
    let mut tile_max = f32::NEG_INFINITY;
    if let Some(mask) = mask {
        for (c, m) in scores.chunks_exact_mut(L).zip(mask.chunks_exact(L)) {
            for i in 0..L {
                c[i] += m[i];
                lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
            }
        }
        for (c, &m) in scores[tail..].iter_mut().zip(&mask[tail..]) {
            *c += m;
            tile_max = tile_max.max(*c);
        }
    } else {
        for c in scores.chunks_exact(L) {
            for i in 0..L {
                lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
            }
        }
        for &c in &scores[tail..] {
            tile_max = tile_max.max(c);
        }
    }
    let tile_max = lanes.iter().fold(tile_max, |a, &b| a.max(b));
    let new_max = max.max(tile_max);
    if new_max == f32::NEG_INFINITY {
        // Nothing selected yet, here or before: probabilities 0, nothing to rescale.
        scores.fill(0.0);
        return;
    }
    let corr = if *max == f32::NEG_INFINITY {
        0.0
    } else {
        exp_nonpositive(*max - new_max)
    };
    *max = new_max;
    let mut sums = [0.0f32; L];
    let mut chunks = scores.chunks_exact_mut(L);
    for c in &mut chunks {
        for i in 0..L {
            c[i] = exp_nonpositive(c[i] - new_max);
            sums[i] += c[i];
        }
    }
    let mut sum = sums.iter().sum::<f32>();
    for c in chunks.into_remainder() {
        *c = exp_nonpositive(*c - new_max);
        sum += *c;
    }
    *denom = *denom * corr + sum;
    if corr != 1.0 {
        out.iter_mut().for_each(|v| *v *= corr);
    }
}

#[cfg(test)]
#[path = "attention_prefill_tests.rs"]
mod tests;
