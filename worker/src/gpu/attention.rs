//! MLA attention (absorbed form, prefill and decode) and the lightning indexer on the device,
//! mirroring `crate::model::attention`: projections over all rows, RoPE, cache writes, the
//! indexer's top-k on Full layers (or the selection carried from the nearest Full layer, or
//! relayed, on Shared ones), sparse attention per segment, `o_proj` added into the residual.
//!
//! The CPU may run a prefill chunk in the expanded form; the GPU always runs the absorbed one.
//! Both are the same attention (the kernels' module docs show the algebra); only rounding
//! differs.

use kernels::cuda::{
    CudaSlice, GpuIndexerInputs, GpuKernels, GpuMlaInputs, PagedView, RopeLayout, StridedGemm, WeightLayout,
};
use kernels::RopeStyle;

use super::cache::DeviceKvCache;
use super::model::{dev, GpuModel};
use super::weights::{Act, DevIndexer, DevLayer};
use crate::error::{Result, WorkerError};
use crate::model::{Segment, TopkRows};

/// HF builds `q_a_layernorm` and `kv_a_layernorm` with the RMSNorm default epsilon.
const LATENT_NORM_EPS: f32 = 1e-6;
/// The indexer's `k_norm` LayerNorm epsilon.
const INDEX_K_NORM_EPS: f32 = 1e-6;

/// One segment's selected key positions on the device: `rows` rows of `ld` slots, the first
/// `lens[r]` of row r used.
pub struct DevTopk {
    sel: CudaSlice<u32>,
    lens: CudaSlice<i32>,
    ld: usize,
    max_len: usize,
    rows: usize,
}

impl DevTopk {
    /// Uploads host rows (a relay), padding each to the longest.
    pub fn upload(k: &GpuKernels, rows: &TopkRows) -> Result<Self> {
        let ld = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut sel = vec![0u32; rows.len() * ld];
        for (i, r) in rows.iter().enumerate() {
            sel[i * ld..i * ld + r.len()].copy_from_slice(r);
        }
        let lens: Vec<i32> = rows.iter().map(|r| r.len() as i32).collect();
        Ok(DevTopk {
            sel: dev(k.upload(&sel))?,
            lens: dev(k.upload(&lens))?,
            ld,
            max_len: ld,
            rows: rows.len(),
        })
    }

    /// Rows received from the previous stage for a segment starting at position `start`:
    /// `sel` holds `rows × ld` positions, `lens` the `rows` counts (shape and values checked
    /// by the stage: `GpuStage`'s `check_relay`).
    pub fn received(sel: CudaSlice<u32>, lens: CudaSlice<i32>, ld: usize, start: usize) -> Self {
        let rows = lens.len();
        DevTopk {
            sel,
            lens,
            ld,
            // Row r selects at most min(ld, start + r + 1) positions.
            max_len: ld.min(start + rows),
            rows,
        }
    }

    /// The positions (`rows × ld`), the counts (`rows`), and `ld`: what a stage sends on.
    pub fn into_parts(self) -> (CudaSlice<u32>, CudaSlice<i32>, usize) {
        (self.sel, self.lens, self.ld)
    }

    /// The host rows (what a stage relays on).
    pub fn download(&self, k: &GpuKernels) -> Result<TopkRows> {
        let sel = dev(k.download(&self.sel))?;
        let lens = dev(k.download(&self.lens))?;
        Ok(lens
            .iter()
            .enumerate()
            .map(|(i, &n)| sel[i * self.ld..i * self.ld + n.max(0) as usize].to_vec())
            .collect())
    }
}

/// Per-batch device inputs every layer shares: RoPE rows, cache slots, block tables.
pub struct BatchPlan {
    rows: usize,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    /// Pool slot of every row (its sequence's position).
    slots: CudaSlice<i32>,
    segs: Vec<SegPlan>,
}

struct SegPlan {
    /// First batch row of the segment.
    row: usize,
    table: CudaSlice<i32>,
    positions: CudaSlice<i32>,
    /// All zeros: the segment's rows all start at its (only) block table.
    table_start: CudaSlice<i32>,
}

impl BatchPlan {
    /// Uploads the batch's RoPE rows, slots and block tables (after the cache grew).
    pub fn new(m: &GpuModel, cache: &DeviceKvCache, segments: &[Segment]) -> Result<Self> {
        let k = &m.k;
        let half = m.cfg.qk_rope_head_dim / 2;
        let rows: usize = segments.iter().map(|s| s.len).sum();
        let (mut cos, mut sin) = (vec![0.0; rows * half], vec![0.0; rows * half]);
        let mut slots = Vec::with_capacity(rows);
        let mut segs = Vec::with_capacity(segments.len());
        let mut row = 0;
        for s in segments {
            for i in 0..s.len {
                let r = row + i;
                m.rope().cos_sin(
                    s.start + i,
                    &mut cos[r * half..(r + 1) * half],
                    &mut sin[r * half..(r + 1) * half],
                );
            }
            slots.extend(cache.slots(s.seq, s.start, s.len)?);
            let positions: Vec<i32> = (s.start..s.start + s.len).map(|p| p as i32).collect();
            segs.push(SegPlan {
                row,
                table: dev(k.upload(&cache.block_table(s.seq)?))?,
                positions: dev(k.upload(&positions))?,
                table_start: dev(k.zeros::<i32>(s.len))?,
            });
            row += s.len;
        }
        Ok(BatchPlan {
            rows,
            cos: dev(k.upload(&cos))?,
            sin: dev(k.upload(&sin))?,
            slots: dev(k.upload(&slots))?,
            segs,
        })
    }
}

/// What one layer's attention needs besides the batch.
pub struct LayerInputs<'a> {
    /// Global layer index (messages).
    pub layer: usize,
    /// Range-relative layer index (cache).
    pub cache_layer: usize,
    /// The layer's weights.
    pub weights: &'a DevLayer,
    /// The indexer, when some segment runs the layer as Full.
    pub indexer: Option<&'a DevIndexer>,
    /// Per segment: whether it runs the layer as Full.
    pub full_segs: &'a [bool],
}

fn rope(
    k: &GpuKernels,
    x: &mut CudaSlice<f32>,
    plan: &BatchPlan,
    vecs_per_row: usize,
    stride: usize,
    half: usize,
    style: RopeStyle,
) -> Result<()> {
    let layout = RopeLayout {
        n_vecs: plan.rows * vecs_per_row,
        vecs_per_row,
        stride,
        offset: 0,
        half,
    };
    dev(k.rope(
        &mut x.slice_mut(..),
        &plan.cos.slice(..),
        &plan.sin.slice(..),
        layout,
        style,
    ))
}

/// Runs one layer's attention over all rows and adds `o_proj`'s output into `hidden`;
/// updates `topk` for the segments that run the layer as Full.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    m: &GpuModel,
    inp: &LayerInputs<'_>,
    x: &Act<'_>,
    plan: &BatchPlan,
    segments: &[Segment],
    topk: &mut [Option<DevTopk>],
    cache: &mut DeviceKvCache,
    hidden: &mut CudaSlice<f32>,
) -> Result<()> {
    let (k, g, c) = (&m.k, &m.gemm, &m.cfg);
    let w = inp.weights;
    let rows = plan.rows;
    let (h, r, dn, dr, dv) = (
        c.num_attention_heads,
        c.kv_lora_rank,
        c.qk_nope_head_dim,
        c.qk_rope_head_dim,
        c.v_head_dim,
    );
    let (qlr, half) = (c.q_lora_rank, dr / 2);
    let zeros = |n: usize| dev(k.zeros::<f32>(n));

    let mut qa = zeros(rows * qlr)?;
    w.q_a.forward(g, x, rows, &mut qa.slice_mut(..), 1.0, 0.0)?;
    let mut qr = zeros(rows * qlr)?;
    dev(k.rms_norm(
        &qa.slice(..),
        &w.q_a_norm.slice(..),
        LATENT_NORM_EPS,
        &mut qr.slice_mut(..),
    ))?;
    let mut qr16 = dev(k.zeros::<u16>(rows * qlr))?;
    dev(k.to_bf16(&qr.slice(..), &mut qr16.slice_mut(..)))?;
    let qra = Act {
        f32: qr.slice(..),
        bf16: qr16.slice(..),
    };
    let mut q_nope = zeros(rows * h * dn)?;
    w.q_nope.forward(g, &qra, rows, &mut q_nope.slice_mut(..), 1.0, 0.0)?;
    let mut q_pe = zeros(rows * h * dr)?;
    w.q_pe.forward(g, &qra, rows, &mut q_pe.slice_mut(..), 1.0, 0.0)?;
    rope(k, &mut q_pe, plan, h, dr, half, RopeStyle::Interleaved)?;

    let mut ckv_raw = zeros(rows * r)?;
    w.kv_ckv.forward(g, x, rows, &mut ckv_raw.slice_mut(..), 1.0, 0.0)?;
    let mut ckv = zeros(rows * r)?;
    dev(k.rms_norm(
        &ckv_raw.slice(..),
        &w.kv_a_norm.slice(..),
        LATENT_NORM_EPS,
        &mut ckv.slice_mut(..),
    ))?;
    let mut kpe = zeros(rows * dr)?;
    w.kv_pe.forward(g, x, rows, &mut kpe.slice_mut(..), 1.0, 0.0)?;
    rope(k, &mut kpe, plan, 1, dr, half, RopeStyle::Interleaved)?;
    cache.write_kv(
        k,
        inp.cache_layer,
        &plan.slots.slice(..),
        &ckv.slice(..),
        &kpe.slice(..),
    )?;

    if let Some(ix) = inp.indexer {
        run_indexer(m, inp, ix, x, &qra, plan, segments, topk, cache)?;
    }
    for ((s, t), full) in segments.iter().zip(topk.iter()).zip(inp.full_segs) {
        let ok = t.as_ref().is_some_and(|t| t.rows == s.len);
        if !full && !ok {
            return Err(WorkerError::invalid(
                "relay",
                format!(
                    "layer {} is Shared but no Full layer selected keys for sequence {}",
                    inp.layer, s.seq
                ),
            ));
        }
    }

    // Absorb W_uk into the queries: q_latent[row, head] = q_nope[row, head] · W_uk[head],
    // W_uk[head] the [nope × rank] rows of kv_b_proj for that head.
    let mut q_latent = zeros(rows * h * r)?;
    let absorb = absorb_gemm(rows, h, dn, dv, r);
    dev(g.strided_f32(
        &q_nope.slice(..),
        &w.kv_b.slice(..),
        &mut q_latent.slice_mut(..),
        &absorb,
    ))?;

    let mut o_latent = zeros(rows * h * r)?;
    let block_size = cache.block_size();
    for (i, s) in segments.iter().enumerate() {
        let sp = &plan.segs[i];
        let t = topk[i].as_ref().ok_or_else(|| {
            WorkerError::invalid(
                "relay",
                format!("layer {}: no keys selected for sequence {}", inp.layer, s.seq),
            )
        })?;
        let (a, b) = (sp.row * h, (sp.row + s.len) * h);
        let (ckv_pool, kpe_pool) = cache.kv_pools(inp.cache_layer);
        let mla = GpuMlaInputs {
            q_latent: q_latent.slice(a * r..b * r),
            q_rope: q_pe.slice(a * dr..b * dr),
            ckv_pool,
            kpe_pool,
            block_tables: sp.table.slice(..),
            table_start: sp.table_start.slice(..),
            block_size,
            selected: t.sel.slice(..),
            sel_ld: t.ld,
            sel_len: t.lens.slice(..),
            heads: h,
            kv_rank: r,
            rope_dim: dr,
            scale: c.softmax_scale(),
        };
        dev(k.sparse_mla_attention(&mla, t.max_len, &mut o_latent.slice_mut(a * r..b * r)))?;
    }

    // Expand through W_uv: v[row, head] = o_latent[row, head] · W_uv[head]ᵀ, W_uv[head] the
    // [v × rank] rows of kv_b_proj after that head's nope rows.
    let mut v = zeros(rows * h * dv)?;
    let expand = expand_gemm(rows, h, dn, dv, r);
    dev(g.strided_f32(
        &o_latent.slice(..),
        &w.kv_b.slice(dn * r..),
        &mut v.slice_mut(..),
        &expand,
    ))?;
    let mut v16 = dev(k.zeros::<u16>(rows * h * dv))?;
    dev(k.to_bf16(&v.slice(..), &mut v16.slice_mut(..)))?;
    let va = Act {
        f32: v.slice(..),
        bf16: v16.slice(..),
    };
    // The residual add rides on the GEMM: hidden = v · W_oᵀ + hidden.
    w.o.forward(g, &va, rows, &mut hidden.slice_mut(..), 1.0, 1.0)
}

/// The batch that absorbs W_uk into the queries: per head, `q_latent[row, head] =
/// q_nope[row, head] · W_uk[head]`, with `q_nope` `rows × heads × nope`, `W_uk[head]` the
/// `[nope × rank]` rows of `kv_b_proj` (`[heads · (nope + v), rank]`) for that head, and
/// `q_latent` `rows × heads × rank`.
fn absorb_gemm(rows: usize, h: usize, dn: usize, dv: usize, r: usize) -> StridedGemm {
    StridedGemm {
        m: rows,
        n: r,
        k: dn,
        batch: h,
        x_ld: h * dn,
        x_stride: dn,
        w_layout: WeightLayout::InOut,
        w_ld: r,
        w_stride: (dn + dv) * r,
        out_ld: h * r,
        out_stride: r,
        alpha: 1.0,
        beta: 0.0,
    }
}

/// The batch that expands latent outputs through W_uv (applied to `kv_b_proj` from offset
/// `nope · rank`): per head, `v[row, head] = o_latent[row, head] · W_uv[head]ᵀ`, `W_uv[head]`
/// the `[v × rank]` rows after that head's nope rows, `v` `rows × heads × v_dim`.
fn expand_gemm(rows: usize, h: usize, dn: usize, dv: usize, r: usize) -> StridedGemm {
    StridedGemm {
        m: rows,
        n: dv,
        k: r,
        batch: h,
        x_ld: h * r,
        x_stride: r,
        w_layout: WeightLayout::OutIn,
        w_ld: r,
        w_stride: (dn + dv) * r,
        out_ld: h * dv,
        out_stride: dv,
        alpha: 1.0,
        beta: 0.0,
    }
}

/// The lightning indexer over all rows; the segments that run the layer as Full write their
/// keys and get their top-k.
#[allow(clippy::too_many_arguments)]
fn run_indexer(
    m: &GpuModel,
    inp: &LayerInputs<'_>,
    ix: &DevIndexer,
    x: &Act<'_>,
    qr: &Act<'_>,
    plan: &BatchPlan,
    segments: &[Segment],
    topk: &mut [Option<DevTopk>],
    cache: &mut DeviceKvCache,
) -> Result<()> {
    let (k, g, c) = (&m.k, &m.gemm, &m.cfg);
    let rows = plan.rows;
    let (hi, di, half) = (c.index_n_heads, c.index_head_dim, c.qk_rope_head_dim / 2);
    let style = c.arch.indexer_rope_style();
    let mut qi = dev(k.zeros::<f32>(rows * hi * di))?;
    ix.wq_b.forward(g, qr, rows, &mut qi.slice_mut(..), 1.0, 0.0)?;
    // Each indexer head is [rope | nope]: rope part first.
    rope(k, &mut qi, plan, hi, di, half, style)?;
    let mut kraw = dev(k.zeros::<f32>(rows * di))?;
    ix.wk.forward(g, x, rows, &mut kraw.slice_mut(..), 1.0, 0.0)?;
    let mut ki = dev(k.zeros::<f32>(rows * di))?;
    dev(k.layer_norm(
        &kraw.slice(..),
        &ix.k_norm_w.slice(..),
        &ix.k_norm_b.slice(..),
        INDEX_K_NORM_EPS,
        &mut ki.slice_mut(..),
    ))?;
    rope(k, &mut ki, plan, 1, di, half, style)?;
    // Both scales folded into the head weights: ReLU(a·s) = s·ReLU(a) for s > 0.
    let scale = (hi as f32).powf(-0.5) * (di as f32).powf(-0.5);
    let mut wts = dev(k.zeros::<f32>(rows * hi))?;
    ix.weights_proj
        .forward(g, x, rows, &mut wts.slice_mut(..), scale, 0.0)?;

    for (i, s) in segments.iter().enumerate() {
        if !inp.full_segs[i] {
            continue;
        }
        let sp = &plan.segs[i];
        let slots = plan.slots.slice(sp.row..sp.row + s.len);
        let keys = ki.slice(sp.row * di..(sp.row + s.len) * di);
        cache.write_index_keys(k, inp.cache_layer, s.seq, s.start + s.len, &slots, &keys)?;
    }
    for (i, s) in segments.iter().enumerate() {
        if !inp.full_segs[i] {
            continue;
        }
        let sp = &plan.segs[i];
        let pool = cache
            .index_pool(inp.cache_layer)
            .ok_or_else(|| WorkerError::Device(format!("layer {}: no indexer-key pool", inp.layer)))?;
        let q = qi.slice(sp.row * hi * di..(sp.row + s.len) * hi * di);
        let weights = wts.slice(sp.row * hi..(sp.row + s.len) * hi);
        let ixi = GpuIndexerInputs {
            q,
            weights,
            positions: sp.positions.slice(..),
            max_position: s.start + s.len - 1,
            keys: PagedView {
                pool,
                block_table: sp.table.slice(..),
                block_size: cache.block_size(),
            },
            heads: hi,
            dim: di,
            topk: c.index_topk,
        };
        let mut sel = dev(k.zeros::<u32>(s.len * c.index_topk))?;
        let mut lens = dev(k.zeros::<i32>(s.len))?;
        dev(k.indexer_topk(&ixi, None, &mut sel.slice_mut(..), &mut lens.slice_mut(..)))?;
        topk[i] = Some(DevTopk {
            sel,
            lens,
            ld: c.index_topk,
            max_len: c.index_topk.min(s.start + s.len),
            rows: s.len,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: length");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-5 + 1e-5 * y.abs(), "{what} [{i}]: {x} vs {y}");
        }
    }

    /// The strided batches equal the CPU model's per-head absorbed-form products
    /// (`model::attention::absorbed_attention`, with `w_uk_t` and `w_uv` built as in
    /// `model::weights`): the strides, leading dimensions and layouts are right.
    #[test]
    fn absorb_and_expand_batches_equal_the_cpu_per_head_products() {
        let (rows, h, dn, dv, r) = (3, 4, 5, 6, 7);
        let kv_b = rand(h * (dn + dv) * r, 1);
        let q_nope = rand(rows * h * dn, 2);
        let o_latent = rand(rows * h * r, 3);
        let mut got = vec![0.0; rows * h * r];
        absorb_gemm(rows, h, dn, dv, r).reference(&q_nope, &kv_b, &mut got);
        let mut got_v = vec![0.0; rows * h * dv];
        expand_gemm(rows, h, dn, dv, r).reference(&o_latent, &kv_b[dn * r..], &mut got_v);
        let (mut want, mut want_v) = (vec![0.0; rows * h * r], vec![0.0; rows * h * dv]);
        for head in 0..h {
            let base = head * (dn + dv) * r;
            let uk = &kv_b[base..base + dn * r];
            let mut w_uk_t = vec![0.0; r * dn];
            for i in 0..dn {
                for j in 0..r {
                    w_uk_t[j * dn + i] = uk[i * r + j];
                }
            }
            let nope: Vec<f32> = (0..rows)
                .flat_map(|i| q_nope[(i * h + head) * dn..(i * h + head + 1) * dn].to_vec())
                .collect();
            let mut lat = vec![0.0; rows * r];
            kernels::matmul_t(&nope, &w_uk_t, &mut lat, rows, dn, r);
            let w_uv = &kv_b[base + dn * r..base + (dn + dv) * r];
            let ol: Vec<f32> = (0..rows)
                .flat_map(|i| o_latent[(i * h + head) * r..(i * h + head + 1) * r].to_vec())
                .collect();
            let mut vh = vec![0.0; rows * dv];
            kernels::matmul_t(&ol, w_uv, &mut vh, rows, r, dv);
            for i in 0..rows {
                want[(i * h + head) * r..(i * h + head + 1) * r].copy_from_slice(&lat[i * r..(i + 1) * r]);
                want_v[(i * h + head) * dv..(i * h + head + 1) * dv].copy_from_slice(&vh[i * dv..(i + 1) * dv]);
            }
        }
        assert_close(&got, &want, "absorb");
        assert_close(&got_v, &want_v, "expand");
    }
}
