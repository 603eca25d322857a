//! MLA attention (absorbed form for decode, expanded form for prefill chunks), the lightning
//! indexer, and the IndexCache hand-off.

use std::borrow::Cow;

use rayon::prelude::*;

use kernels::{IndexerInputs, MlaAttentionInputs, MlaDims, MlaKeyPlan, MlaPrefillInputs, RopeStyle};

use super::weights::{AttentionWeights, IndexerWeights};
use super::{Segment, TopkRows};
use crate::config::ModelConfig;
use crate::error::{Result, WorkerError};
use crate::kv_cache::KvCache;
use crate::rope::RopeTable;

/// HF builds `q_a_layernorm`, `kv_a_layernorm` with the RMSNorm default, not `rms_norm_eps`.
const LATENT_NORM_EPS: f32 = 1e-6;
/// The indexer's `k_norm` LayerNorm epsilon.
const INDEX_K_NORM_EPS: f32 = 1e-6;

/// What a layer's attention needs besides its weights.
pub struct AttnCtx<'a> {
    /// Model config.
    pub cfg: &'a ModelConfig,
    /// Rotary table.
    pub rope: &'a RopeTable,
    /// Global layer index (for messages).
    pub layer: usize,
    /// Layer index within the cache (range-relative).
    pub cache_layer: usize,
}

/// The attention shapes of `c`, as the kernels take them.
fn mla_dims(c: &ModelConfig) -> MlaDims {
    MlaDims {
        heads: c.num_attention_heads,
        kv_rank: c.kv_lora_rank,
        nope_dim: c.qk_nope_head_dim,
        rope_dim: c.qk_rope_head_dim,
        v_dim: c.v_head_dim,
    }
}

/// The position of every row of `segments`, in row order.
fn row_positions(segments: &[Segment]) -> Vec<usize> {
    segments.iter().flat_map(|s| s.start..s.start + s.len).collect()
}

fn rope_rows(x: &mut [f32], width: usize, offset: usize, dim: usize, cos: &[f32], sin: &[f32], style: RopeStyle) {
    for chunk in x.chunks_exact_mut(width) {
        kernels::apply_rope(&mut chunk[offset..offset + dim], cos, sin, style);
    }
}

/// Wall time of a pass's attention parts, summed over its layers.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttnSeconds {
    /// The lightning indexer: projections, key writes, scoring, top-k.
    pub indexer: f64,
    /// Attention over the selected keys (either form), from the rotated queries and the
    /// selections to the per-head outputs, before `o_proj`.
    pub core: f64,
}

/// Runs the layer's attention over all rows; updates `topk` on Full layers.
pub fn forward(
    ctx: &AttnCtx<'_>,
    w: &AttentionWeights,
    x: &[f32],
    segments: &[Segment],
    topk: &mut [Option<TopkRows>],
    cache: &mut KvCache,
    seconds: &mut AttnSeconds,
) -> Result<Vec<f32>> {
    let c = ctx.cfg;
    let rows: usize = segments.iter().map(|s| s.len).sum();
    let dims = mla_dims(c);
    let (h, dn, dr, dv) = (dims.heads, dims.nope_dim, dims.rope_dim, dims.v_dim);
    let dq = dn + dr;

    let qa = w.q_a.forward(x, rows);
    let mut qr = vec![0.0; qa.len()];
    kernels::rms_norm(&qa, &w.q_a_norm, LATENT_NORM_EPS, &mut qr);
    let mut q = w.q_b.forward(&qr, rows);
    // Rotate the queries in parallel (the f64 sin/cos of the rotary table is per row).
    let positions = row_positions(segments);
    q.par_chunks_mut(h * dq).zip(positions.par_iter()).for_each_init(
        || (vec![0.0; dr / 2], vec![0.0; dr / 2]),
        |(cos, sin), (q_row, &pos)| {
            ctx.rope.cos_sin(pos, cos, sin);
            rope_rows(q_row, dq, dn, dr, cos, sin, RopeStyle::Interleaved);
        },
    );
    write_latents(ctx, w, x, segments, cache)?;

    if let Some(ix) = &w.indexer {
        let t0 = std::time::Instant::now();
        run_indexer(ctx, ix, x, &qr, segments, topk, cache)?;
        seconds.indexer += t0.elapsed().as_secs_f64();
    } else {
        for (s, t) in segments.iter().zip(topk.iter()) {
            let ok = t.as_ref().is_some_and(|t| t.len() == s.len);
            if !ok {
                return Err(WorkerError::invalid(
                    "relay",
                    format!(
                        "layer {} is Shared but no Full layer selected keys for sequence {}",
                        ctx.layer, s.seq
                    ),
                ));
            }
        }
    }

    // Each segment runs in the cheaper of the two forms for its selection (module docs of
    // `kernels::attention_prefill`): a prefill chunk usually expanded, a decode row absorbed.
    let form = MlaForm::from_env();
    let t0 = std::time::Instant::now();
    let mut v = vec![0.0; rows * h * dv];
    let mut absorbed = Vec::new();
    let mut row = 0;
    for (s, t) in segments.iter().zip(topk.iter()) {
        let selected = t.as_ref().map(Vec::as_slice).unwrap_or(&[]);
        let plan = MlaKeyPlan::new(selected);
        if form.expand(&plan, s.len, dims) {
            let blocks = cache.layer_blocks(ctx.cache_layer, s.seq)?;
            let inp = MlaPrefillInputs {
                q: &q[row * h * dq..(row + s.len) * h * dq],
                ckv_blocks: &blocks.ckv,
                kpe_blocks: &blocks.kpe,
                block_size: cache.block_size(),
                selected,
                plan: &plan,
                kv_b: &w.kv_b,
                dims,
                scale: c.softmax_scale(),
            };
            kernels::mla_prefill_attention(&inp, &mut v[row * h * dv..(row + s.len) * h * dv]);
        } else {
            absorbed.push((row, s, selected));
        }
        row += s.len;
    }
    if !absorbed.is_empty() {
        absorbed_attention(ctx, w, &q, &absorbed, cache, &mut v)?;
    }
    seconds.core += t0.elapsed().as_secs_f64();
    Ok(w.o.forward(&v, rows))
}

/// Writes the layer's cache entries of every row (the latent, and the indexer key when the
/// layer runs its indexer) without computing any row's attention: what the final layer needs
/// of rows whose output no one reads (see `Model::forward_for_logits`).
pub fn fill_cache(
    ctx: &AttnCtx<'_>,
    w: &AttentionWeights,
    x: &[f32],
    segments: &[Segment],
    cache: &mut KvCache,
    seconds: &mut AttnSeconds,
) -> Result<()> {
    write_latents(ctx, w, x, segments, cache)?;
    if let Some(ix) = &w.indexer {
        let t0 = std::time::Instant::now();
        write_index_keys(ctx, ix, x, segments, cache)?;
        seconds.indexer += t0.elapsed().as_secs_f64();
    }
    Ok(())
}

/// Writes every row's latent cache entry: `c_kv` after its norm, and the rotated `k_pe`.
fn write_latents(
    ctx: &AttnCtx<'_>,
    w: &AttentionWeights,
    x: &[f32],
    segments: &[Segment],
    cache: &mut KvCache,
) -> Result<()> {
    let c = ctx.cfg;
    let rows: usize = segments.iter().map(|s| s.len).sum();
    let (r, dr) = (c.kv_lora_rank, c.qk_rope_head_dim);
    let kv = w.kv_a.forward(x, rows);
    let positions = row_positions(segments);
    let mut ckv = vec![0.0; rows * r];
    let mut kpe = vec![0.0; rows * dr];
    // Built in parallel; only the cache writes are serial.
    kv.par_chunks(r + dr)
        .zip(ckv.par_chunks_mut(r).zip(kpe.par_chunks_mut(dr)))
        .zip(positions.par_iter())
        .for_each_init(
            || (vec![0.0; dr / 2], vec![0.0; dr / 2]),
            |(cos, sin), ((kv_row, (ckv_row, kpe_row)), &pos)| {
                ctx.rope.cos_sin(pos, cos, sin);
                kernels::rms_norm(&kv_row[..r], &w.kv_a_norm, LATENT_NORM_EPS, ckv_row);
                kpe_row.copy_from_slice(&kv_row[r..]);
                kernels::apply_rope(kpe_row, cos, sin, RopeStyle::Interleaved);
            },
        );
    let mut row = 0;
    for s in segments {
        for pos in s.start..s.start + s.len {
            cache.write_kv(
                ctx.cache_layer,
                s.seq,
                pos,
                &ckv[row * r..][..r],
                &kpe[row * dr..][..dr],
            )?;
            row += 1;
        }
    }
    Ok(())
}

/// Which attention form segments run in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MlaForm {
    /// The cheaper form by [`MlaKeyPlan::macs`] (the default).
    Auto,
    /// Always absorbed (the decode form).
    Absorbed,
    /// Always expanded (the prefill form).
    Expanded,
}

impl MlaForm {
    /// `INDEXRELAY_MLA_FORM=auto|absorbed|expanded` pins the form (tests run both through
    /// the same fixtures); anything else is `auto`.
    fn from_env() -> Self {
        static FORM: std::sync::OnceLock<MlaForm> = std::sync::OnceLock::new();
        *FORM.get_or_init(|| match std::env::var("INDEXRELAY_MLA_FORM").as_deref() {
            Ok("absorbed") => MlaForm::Absorbed,
            Ok("expanded") => MlaForm::Expanded,
            _ => MlaForm::Auto,
        })
    }

    /// Whether a segment of `rows` rows with key plan `plan` runs expanded.
    fn expand(self, plan: &MlaKeyPlan, rows: usize, dims: MlaDims) -> bool {
        match self {
            MlaForm::Absorbed => false,
            MlaForm::Expanded => true,
            MlaForm::Auto => plan.macs(rows, dims).prefers_expanded(),
        }
    }
}

/// Absorbed-form attention of the segments in `segs` (first row, segment, selection):
/// their queries are packed, absorbed through W_uk, attended, expanded through W_uv, and
/// written to their rows of `v` (rows × heads × v_dim).
fn absorbed_attention(
    ctx: &AttnCtx<'_>,
    w: &AttentionWeights,
    q: &[f32],
    segs: &[(usize, &Segment, &[Vec<u32>])],
    cache: &KvCache,
    v: &mut [f32],
) -> Result<()> {
    let c = ctx.cfg;
    let d = mla_dims(c);
    let (h, r, dn, dr, dv) = (d.heads, d.kv_rank, d.nope_dim, d.rope_dim, d.v_dim);
    let dq = dn + dr;
    let rows: usize = segs.iter().map(|(_, s, _)| s.len).sum();
    let packed: Vec<(usize, usize)> = segs.iter().map(|&(row, s, _)| (row, s.len)).collect();
    let src_rows = || packed.iter().flat_map(|&(row, len)| row..row + len);

    // Absorb W_uk into the query: q_latent[row, head] = W_uk_headᵀ · q_nope[row, head].
    let mut q_latent = vec![0.0; rows * h * r];
    let mut q_rope = vec![0.0; rows * h * dr];
    let mut nope = vec![0.0; rows * dn];
    let mut lat = vec![0.0; rows * r];
    for head in 0..h {
        for (i, src) in src_rows().enumerate() {
            let src = &q[(src * h + head) * dq..(src * h + head + 1) * dq];
            nope[i * dn..(i + 1) * dn].copy_from_slice(&src[..dn]);
            q_rope[(i * h + head) * dr..(i * h + head + 1) * dr].copy_from_slice(&src[dn..]);
        }
        kernels::matmul_t(&nope, &w.w_uk_t[head], &mut lat, rows, dn, r);
        for i in 0..rows {
            q_latent[(i * h + head) * r..(i * h + head + 1) * r].copy_from_slice(&lat[i * r..(i + 1) * r]);
        }
    }

    let mut o_latent = vec![0.0; rows * h * r];
    let mut row = 0;
    for &(_, s, selected) in segs {
        let blocks = cache.layer_blocks(ctx.cache_layer, s.seq)?;
        let span = row * h..(row + s.len) * h;
        let inp = MlaAttentionInputs {
            q_latent: &q_latent[span.start * r..span.end * r],
            q_rope: &q_rope[span.start * dr..span.end * dr],
            ckv_blocks: &blocks.ckv,
            kpe_blocks: &blocks.kpe,
            block_size: cache.block_size(),
            selected,
            heads: h,
            kv_rank: r,
            rope_dim: dr,
            scale: c.softmax_scale(),
        };
        kernels::sparse_mla_attention(&inp, &mut o_latent[span.start * r..span.end * r]);
        row += s.len;
    }

    // Expand each head's latent output through W_uv into the segments' rows of `v`.
    let mut vh = vec![0.0; rows * dv];
    for head in 0..h {
        for i in 0..rows {
            lat[i * r..(i + 1) * r].copy_from_slice(&o_latent[(i * h + head) * r..(i * h + head + 1) * r]);
        }
        kernels::matmul_t(&lat, w.w_uv(head, dn, dv), &mut vh, rows, r, dv);
        for (i, dst) in src_rows().enumerate() {
            v[(dst * h + head) * dv..(dst * h + head + 1) * dv].copy_from_slice(&vh[i * dv..(i + 1) * dv]);
        }
    }
    Ok(())
}

fn run_indexer(
    ctx: &AttnCtx<'_>,
    ix: &IndexerWeights,
    x: &[f32],
    qr: &[f32],
    segments: &[Segment],
    topk: &mut [Option<TopkRows>],
    cache: &mut KvCache,
) -> Result<()> {
    let c = ctx.cfg;
    let rows: usize = segments.iter().map(|s| s.len).sum();
    let (hi, di, dr) = (c.index_n_heads, c.index_head_dim, c.qk_rope_head_dim);
    let style = c.arch.indexer_rope_style();
    // Rows at positions below index_topk select every earlier key without being scored, so
    // only the others get query projections. Those are a suffix of each segment: per
    // segment, its first scored row and their count.
    let suffixes: Vec<(usize, usize)> = segments
        .iter()
        .scan(0, |row, s| {
            let dense = c.index_topk.saturating_sub(s.start).min(s.len);
            let first = *row + dense;
            *row += s.len;
            Some((first, s.len - dense))
        })
        .collect();
    let n: usize = suffixes.iter().map(|&(_, len)| len).sum();
    let (dqr, d) = (qr.len() / rows.max(1), x.len() / rows.max(1));
    let (mut qi, mut weights) = if n == 0 {
        (Vec::new(), Vec::new())
    } else {
        (
            ix.wq_b.forward(&row_ranges(qr, dqr, &suffixes), n),
            ix.weights_proj.forward(&row_ranges(x, d, &suffixes), n),
        )
    };
    // Fold both scales into the head weights: ReLU(a·s) = s·ReLU(a) for s > 0.
    let scale = (hi as f32).powf(-0.5) * (di as f32).powf(-0.5);
    for v in &mut weights {
        *v *= scale;
    }
    // Each indexer head is [rope | nope]: rope part first. Rotated in parallel per row.
    let scored_positions: Vec<usize> = segments
        .iter()
        .zip(&suffixes)
        .flat_map(|(s, &(_, len))| s.start + s.len - len..s.start + s.len)
        .collect();
    qi.par_chunks_mut(hi * di)
        .zip(scored_positions.par_iter())
        .for_each_init(
            || (vec![0.0; dr / 2], vec![0.0; dr / 2]),
            |(cos, sin), (q_row, &pos)| {
                ctx.rope.cos_sin(pos, cos, sin);
                rope_rows(q_row, di, 0, dr, cos, sin, style);
            },
        );
    write_index_keys(ctx, ix, x, segments, cache)?;
    let mut at = 0;
    for ((s, t), &(_, len)) in segments.iter().zip(topk.iter_mut()).zip(&suffixes) {
        let blocks = cache.layer_blocks(ctx.cache_layer, s.seq)?;
        let dense = s.len - len;
        // Dense rows take every key up to their own; `indexer_topk` scores the suffix.
        let mut out: TopkRows = (s.start..s.start + dense).map(|t| (0..=t as u32).collect()).collect();
        let positions = &scored_positions[at..at + len];
        let inp = IndexerInputs {
            q: &qi[at * hi * di..(at + len) * hi * di],
            weights: &weights[at * hi..(at + len) * hi],
            key_blocks: &blocks.index_k,
            block_size: cache.block_size(),
            positions,
            heads: hi,
            dim: di,
            topk: c.index_topk,
        };
        let mut scored = Vec::new();
        kernels::indexer_topk(&inp, &mut scored);
        out.append(&mut scored);
        *t = Some(out);
        at += len;
    }
    Ok(())
}

/// The rows `first..first + len` of each range in `ranges`, concatenated, of `a` (rows of
/// `width` floats): borrowed when there is only one non-empty range.
fn row_ranges<'a>(a: &'a [f32], width: usize, ranges: &[(usize, usize)]) -> Cow<'a, [f32]> {
    let mut non_empty = ranges.iter().filter(|&&(_, len)| len > 0);
    match (non_empty.next(), non_empty.next()) {
        (None, _) => Cow::Borrowed(&[]),
        (Some(&(first, len)), None) => Cow::Borrowed(&a[first * width..(first + len) * width]),
        _ => Cow::Owned(
            ranges
                .iter()
                .flat_map(|&(first, len)| &a[first * width..(first + len) * width])
                .copied()
                .collect(),
        ),
    }
}

/// Writes every row's indexer key: `wk`, its LayerNorm, and the rotated rope part.
fn write_index_keys(
    ctx: &AttnCtx<'_>,
    ix: &IndexerWeights,
    x: &[f32],
    segments: &[Segment],
    cache: &mut KvCache,
) -> Result<()> {
    let c = ctx.cfg;
    let rows: usize = segments.iter().map(|s| s.len).sum();
    let (di, dr) = (c.index_head_dim, c.qk_rope_head_dim);
    let style = c.arch.indexer_rope_style();
    let kraw = ix.wk.forward(x, rows);
    let mut ki = vec![0.0; kraw.len()];
    kernels::layer_norm(&kraw, &ix.k_norm_w, &ix.k_norm_b, INDEX_K_NORM_EPS, &mut ki);
    let positions = row_positions(segments);
    ki.par_chunks_mut(di).zip(positions.par_iter()).for_each_init(
        || (vec![0.0; dr / 2], vec![0.0; dr / 2]),
        |(cos, sin), (k_row, &pos)| {
            ctx.rope.cos_sin(pos, cos, sin);
            kernels::apply_rope(&mut k_row[..dr], cos, sin, style);
        },
    );
    let mut row = 0;
    for s in segments {
        for pos in s.start..s.start + s.len {
            cache.write_index_key(ctx.cache_layer, s.seq, pos, &ki[row * di..][..di])?;
            row += 1;
        }
    }
    Ok(())
}
