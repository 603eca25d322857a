//! Launch wrappers for the DSA path: indexer scores, top-k, the chunked indexer top-k,
//! sparse MLA attention (prefill and decode) and sampling on top of top-k.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::context::{grid, int, launch, need, GpuKernels};
use super::error::{CudaError, Result};
use super::ops::SAMPLE_MAX_CANDIDATES;

/// (row, head) slots per indexer block: heads (rounded up to 8) may not exceed it.
const IX_BM: usize = 128;
const IX_BN: usize = 128;
const IX_THREADS: u32 = 256;
const TK_THREADS: u32 = 512;
/// Threads per row, and most blocks (rows are grid-strided), of `validate_topk_rows`.
const VT_THREADS: u32 = 128;
const VT_MAX_BLOCKS: usize = 65_535;
/// Heads per attention block, and the attention limits of attention.cu.
const AT_HEADS: usize = 16;
const AT_THREADS: u32 = 128;
const AT_MAX_RANK: usize = 512;
const AT_MAX_ROPE: usize = 64;
/// Fewest selected keys per attention split, and most splits.
const AT_MIN_KEYS_PER_SPLIT: usize = 64;
const AT_MAX_SPLITS: usize = 64;
/// Default budget for one chunk of indexer scores (rows x keys floats).
const INDEXER_SCRATCH_BYTES: usize = 256 << 20;

/// A paged cache on the device: block `b` of a sequence lives at physical block
/// `block_table[b]` of `pool`, each block `block_size` vectors of the cache's width.
pub struct PagedView<'a> {
    /// All physical blocks, contiguous.
    pub pool: CudaView<'a, f32>,
    /// Logical block -> physical block.
    pub block_table: CudaView<'a, i32>,
    /// Vectors per block.
    pub block_size: usize,
}

/// Which order top-k selects in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopkOrder {
    /// kernels::select_topk: NaN as -inf, -0 == +0, ties to the lower index.
    Scores,
    /// f32::total_cmp, ties to the lower index (the worker's sampling order).
    TotalCmp,
}

/// Inputs of [`GpuKernels::indexer_topk`] for the query rows of one sequence.
pub struct GpuIndexerInputs<'a> {
    /// rows x heads x dim queries (RoPE applied).
    pub q: CudaView<'a, f32>,
    /// rows x heads head weights, every scale folded in.
    pub weights: CudaView<'a, f32>,
    /// rows absolute positions (row t scores keys 0..=t).
    pub positions: CudaView<'a, i32>,
    /// The largest value in `positions` (sizes the launch; the host knows it).
    pub max_position: usize,
    /// The sequence's indexer-key cache (`dim` floats per key).
    pub keys: PagedView<'a>,
    /// Indexer heads.
    pub heads: usize,
    /// Indexer head dimension.
    pub dim: usize,
    /// Keys kept per row.
    pub topk: usize,
}

/// Inputs of [`GpuKernels::sparse_mla_attention`].
pub struct GpuMlaInputs<'a> {
    /// rows x heads x kv_rank absorbed queries.
    pub q_latent: CudaView<'a, f32>,
    /// rows x heads x rope_dim rotated query rope parts.
    pub q_rope: CudaView<'a, f32>,
    /// Latent cache pool (kv_rank floats per position).
    pub ckv_pool: CudaView<'a, f32>,
    /// Rope-key cache pool (rope_dim floats per position), same paging.
    pub kpe_pool: CudaView<'a, f32>,
    /// Block tables of every sequence in the batch, concatenated.
    pub block_tables: CudaView<'a, i32>,
    /// Per row: where its sequence's table starts in `block_tables`.
    pub table_start: CudaView<'a, i32>,
    /// Positions per cache block.
    pub block_size: usize,
    /// rows x sel_ld selected positions (the first sel_len[r] of row r are used).
    pub selected: CudaView<'a, u32>,
    /// Row stride of `selected`.
    pub sel_ld: usize,
    /// Per row: selected count (<= sel_ld).
    pub sel_len: CudaView<'a, i32>,
    /// Attention heads.
    pub heads: usize,
    /// Latent dimension (<= 512).
    pub kv_rank: usize,
    /// Rope dimension (<= 64).
    pub rope_dim: usize,
    /// Softmax scale.
    pub scale: f32,
}

impl GpuKernels {
    /// Raw indexer scores for `rows = positions.len()` query rows into `scores` (rows x ld);
    /// only `scores[r][s]` for `s <= positions[r]` is written.
    pub fn indexer_scores(&self, inp: &GpuIndexerInputs<'_>, scores: &mut CudaViewMut<f32>, ld: usize) -> Result<()> {
        let rows = inp.positions.len();
        let (heads, dim) = (inp.heads, inp.dim);
        let hp = heads.next_multiple_of(8);
        if heads == 0 || hp > IX_BM {
            return Err(CudaError::invalid("heads", format!("{heads} must be in 1..={IX_BM}")));
        }
        if dim == 0 {
            return Err(CudaError::invalid("dim", "must be at least 1"));
        }
        if ld <= inp.max_position {
            return Err(CudaError::invalid(
                "ld",
                format!("{ld} must exceed the largest position {}", inp.max_position),
            ));
        }
        let bs = inp.keys.block_size;
        if bs == 0 {
            return Err(CudaError::invalid("block_size", "must be at least 1"));
        }
        need("q", inp.q.len(), rows * heads * dim)?;
        need("weights", inp.weights.len(), rows * heads)?;
        need("block_table", inp.keys.block_table.len(), inp.max_position / bs + 1)?;
        need("scores", scores.len(), rows * ld)?;
        if rows == 0 {
            return Ok(());
        }
        int("key pool", inp.keys.pool.len())?;
        let rb = IX_BM / hp;
        let cfg = LaunchConfig {
            grid_dim: (
                (inp.max_position + 1).div_ceil(IX_BN) as u32,
                rows.div_ceil(rb) as u32,
                1,
            ),
            block_dim: (IX_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            int("rows", rows)?,
            heads as i32,
            int("dim", dim)?,
            int("block_size", bs)?,
        ];
        let ld_i = ld as i64;
        let mut b = self.builder("indexer_score_f32")?;
        b.arg(&inp.q).arg(&inp.weights).arg(&inp.positions).arg(&inp.keys.pool);
        b.arg(&inp.keys.block_table).arg(scores);
        for a in &args {
            b.arg(a);
        }
        b.arg(&ld_i);
        launch(b, "indexer_score_f32", cfg)
    }

    /// Top-k per row: row r has `lens[r] + len_add` scores at `scores[r * ld..]`; writes the
    /// `min(k, n)` selected indices ascending to `out[r * k..]` and the count to `out_len[r]`.
    #[allow(clippy::too_many_arguments)]
    pub fn topk_rows(
        &self,
        scores: &CudaView<f32>,
        ld: usize,
        lens: &CudaView<i32>,
        len_add: i32,
        k: usize,
        order: TopkOrder,
        out: &mut CudaViewMut<u32>,
        out_len: &mut CudaViewMut<i32>,
    ) -> Result<()> {
        let rows = lens.len();
        need("scores", scores.len(), rows.saturating_sub(1) * ld)?;
        need("out", out.len(), rows * k)?;
        need("out_len", out_len.len(), rows)?;
        if rows == 0 {
            return Ok(());
        }
        let (k_i, fold) = (int("k", k)?, (order == TopkOrder::Scores) as i32);
        let ld_i = ld as i64;
        let mut b = self.builder("topk_rows_f32")?;
        b.arg(scores)
            .arg(&ld_i)
            .arg(lens)
            .arg(&len_add)
            .arg(&k_i)
            .arg(&fold)
            .arg(out)
            .arg(out_len);
        launch(b, "topk_rows_f32", grid(int("rows", rows)? as u32, TK_THREADS))
    }

    /// Checks a relayed top-k selection (as received from another stage) before the attention
    /// kernels index the KV cache with it: `lens.len()` rows of `ld` slots in `sel`, row r at
    /// position `first_pos + r` (a segment's rows are consecutive positions), the first
    /// `lens[r]` slots used. Row r is valid iff `1 <= lens[r] <= ld` and each used position is
    /// at most `first_pos + r` (a row attends only to itself and earlier positions).
    ///
    /// Returns `None` when every row is valid, otherwise `Some` of the first invalid row.
    /// Downloads a 4-byte flag, so it synchronizes the stream.
    pub fn validate_topk_rows(
        &self,
        sel: &CudaView<u32>,
        lens: &CudaView<i32>,
        ld: usize,
        first_pos: usize,
    ) -> Result<Option<usize>> {
        let rows = lens.len();
        need("sel", sel.len(), rows * ld)?;
        if rows == 0 {
            return Ok(None);
        }
        let (rows_i, ld_i) = (int("rows", rows)?, int("ld", ld)?);
        let first_i = i64::try_from(first_pos)
            .map_err(|_| CudaError::invalid("first_pos", format!("{first_pos} exceeds {}", i64::MAX)))?;
        // The kernel raises the flag to rows - r for each invalid row r (atomicMax), so it ends
        // at 0 when all are valid and otherwise names the first invalid row, deterministically.
        let mut bad = self.zeros::<u32>(1)?;
        let mut b = self.builder("validate_topk_rows")?;
        b.arg(sel).arg(lens).arg(&rows_i).arg(&ld_i).arg(&first_i).arg(&mut bad);
        let blocks = rows.min(VT_MAX_BLOCKS) as u32;
        launch(b, "validate_topk_rows", grid(blocks, VT_THREADS))?;
        let bad = self.download(&bad)?[0] as usize;
        Ok((bad != 0).then(|| rows.saturating_sub(bad)))
    }

    /// kernels::indexer_topk on the device: for each row, the `min(topk, t + 1)` best key
    /// positions ascending in `out[r * topk..]`, the count in `out_len[r]`. Rows are scored in
    /// chunks so the score scratch stays within `scratch_bytes` (default 256 MiB when None).
    pub fn indexer_topk(
        &self,
        inp: &GpuIndexerInputs<'_>,
        scratch_bytes: Option<usize>,
        out: &mut CudaViewMut<u32>,
        out_len: &mut CudaViewMut<i32>,
    ) -> Result<()> {
        let rows = inp.positions.len();
        need("out", out.len(), rows * inp.topk)?;
        need("out_len", out_len.len(), rows)?;
        if rows == 0 {
            return Ok(());
        }
        let ld = (inp.max_position + 1).next_multiple_of(4);
        let budget = scratch_bytes.unwrap_or(INDEXER_SCRATCH_BYTES);
        let chunk = (budget / (ld * 4)).clamp(1, rows);
        let mut scores = self.zeros::<f32>(chunk * ld)?;
        for r0 in (0..rows).step_by(chunk) {
            let r1 = (r0 + chunk).min(rows);
            let part = GpuIndexerInputs {
                q: inp.q.slice(r0 * inp.heads * inp.dim..r1 * inp.heads * inp.dim),
                weights: inp.weights.slice(r0 * inp.heads..r1 * inp.heads),
                positions: inp.positions.slice(r0..r1),
                max_position: inp.max_position,
                keys: PagedView {
                    pool: inp.keys.pool.slice(..),
                    block_table: inp.keys.block_table.slice(..),
                    block_size: inp.keys.block_size,
                },
                heads: inp.heads,
                dim: inp.dim,
                topk: inp.topk,
            };
            let mut sv = scores.slice_mut(..);
            self.indexer_scores(&part, &mut sv, ld)?;
            let mut o = out.slice_mut(r0 * inp.topk..r1 * inp.topk);
            let mut ol = out_len.slice_mut(r0..r1);
            self.topk_rows(
                &scores.slice(..),
                ld,
                &part.positions,
                1,
                inp.topk,
                TopkOrder::Scores,
                &mut o,
                &mut ol,
            )?;
        }
        Ok(())
    }

    /// kernels::sparse_mla_attention on the device into `out` (rows x heads x kv_rank), for
    /// prefill and decode. `max_selected` (an upper bound of sel_len, known to the host)
    /// decides how many splits decode uses.
    pub fn sparse_mla_attention(
        &self,
        inp: &GpuMlaInputs<'_>,
        max_selected: usize,
        out: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let rows = inp.sel_len.len();
        let (heads, rank, rope) = (inp.heads, inp.kv_rank, inp.rope_dim);
        if rank == 0 || rank > AT_MAX_RANK {
            return Err(CudaError::invalid(
                "kv_rank",
                format!("{rank} must be in 1..={AT_MAX_RANK}"),
            ));
        }
        if rope > AT_MAX_ROPE {
            return Err(CudaError::invalid(
                "rope_dim",
                format!("{rope} exceeds the GPU limit {AT_MAX_ROPE}"),
            ));
        }
        if inp.block_size == 0 {
            return Err(CudaError::invalid("block_size", "must be at least 1"));
        }
        if max_selected > inp.sel_ld {
            return Err(CudaError::invalid(
                "max_selected",
                format!("{max_selected} exceeds sel_ld {}", inp.sel_ld),
            ));
        }
        need("q_latent", inp.q_latent.len(), rows * heads * rank)?;
        need("q_rope", inp.q_rope.len(), rows * heads * rope)?;
        need("table_start", inp.table_start.len(), rows)?;
        need("selected", inp.selected.len(), rows * inp.sel_ld)?;
        need("out", out.len(), rows * heads * rank)?;
        if rows == 0 || heads == 0 {
            return Ok(());
        }
        let groups = heads.div_ceil(AT_HEADS);
        let blocks = groups * rows;
        let want = (2 * self.info().sm_count).div_ceil(blocks);
        let splits = want
            .min(max_selected.div_ceil(AT_MIN_KEYS_PER_SPLIT))
            .clamp(1, AT_MAX_SPLITS);
        let (mut part_o, mut part_ml) = if splits > 1 {
            (
                self.zeros::<f32>(splits * rows * heads * rank)?,
                self.zeros::<f32>(splits * rows * heads * 2)?,
            )
        } else {
            (self.zeros::<f32>(1)?, self.zeros::<f32>(1)?)
        };
        let cfg = LaunchConfig {
            grid_dim: (groups as u32, int("rows", rows)? as u32, splits as u32),
            block_dim: (AT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            int("rows", rows)?,
            int("heads", heads)?,
            rank as i32,
            rope as i32,
            int("block_size", inp.block_size)?,
        ];
        let (sel_ld, splits_i) = (inp.sel_ld as i64, splits as i32);
        {
            let mut b = self.builder("sparse_mla_attention_f32")?;
            b.arg(&inp.q_latent)
                .arg(&inp.q_rope)
                .arg(&inp.ckv_pool)
                .arg(&inp.kpe_pool);
            b.arg(&inp.block_tables)
                .arg(&inp.table_start)
                .arg(&inp.selected)
                .arg(&sel_ld)
                .arg(&inp.sel_len);
            b.arg(&mut *out).arg(&mut part_o).arg(&mut part_ml);
            for a in &args {
                b.arg(a);
            }
            b.arg(&inp.scale).arg(&splits_i);
            launch(b, "sparse_mla_attention_f32", cfg)?;
        }
        if splits > 1 {
            let (rows_i, heads_i, rank_i) = (rows as i32, heads as i32, rank as i32);
            let mut b = self.builder("mla_combine_f32")?;
            b.arg(&part_o)
                .arg(&part_ml)
                .arg(out)
                .arg(&rows_i)
                .arg(&heads_i)
                .arg(&rank_i)
                .arg(&splits_i);
            launch(
                b,
                "mla_combine_f32",
                grid(int("rows x heads", rows * heads)? as u32, 128),
            )?;
        }
        Ok(())
    }

    /// Temperature / top-k / top-p sampling of one token per row (the worker's
    /// `sampling::sample` for temperature > 0), with `uniforms[r]` the row's uniform draw in
    /// [0, 1) from the request's generator. The candidate set (top_k, or the whole vocabulary
    /// when top_k is 0) may hold at most [`SAMPLE_MAX_CANDIDATES`]; larger sets return
    /// [`CudaError::Unsupported`] and the caller samples on the CPU.
    #[allow(clippy::too_many_arguments)]
    pub fn sample_rows(
        &self,
        logits: &CudaView<f32>,
        vocab: usize,
        temperature: f32,
        top_p: f32,
        top_k: usize,
        uniforms: &CudaView<f64>,
        out: &mut CudaViewMut<i32>,
    ) -> Result<()> {
        if vocab == 0 || !logits.len().is_multiple_of(vocab) {
            return Err(CudaError::invalid(
                "logits",
                format!("length {} is not rows of {vocab}", logits.len()),
            ));
        }
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(CudaError::invalid(
                "temperature",
                format!("{temperature} must be finite and > 0 (0 is greedy: use argmax_rows)"),
            ));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(CudaError::invalid("top_p", format!("{top_p} must be in (0, 1]")));
        }
        let rows = logits.len() / vocab;
        need("uniforms", uniforms.len(), rows)?;
        need("out", out.len(), rows)?;
        let c = if top_k > 0 && top_k < vocab { top_k } else { vocab };
        if c > SAMPLE_MAX_CANDIDATES {
            return Err(CudaError::Unsupported(format!(
                "sampling from {c} candidates (top_k {top_k}, vocabulary {vocab}); the GPU sorts at most \
                 {SAMPLE_MAX_CANDIDATES}"
            )));
        }
        if rows == 0 {
            return Ok(());
        }
        let zeros = self.zeros::<i32>(rows)?;
        let mut cand = self.zeros::<u32>(rows * c)?;
        let mut cand_len = self.zeros::<i32>(rows)?;
        let len_add = int("vocab", vocab)?;
        self.topk_rows(
            logits,
            vocab,
            &zeros.slice(..),
            len_add,
            c,
            TopkOrder::TotalCmp,
            &mut cand.slice_mut(..),
            &mut cand_len.slice_mut(..),
        )?;
        let (vocab_i, cand_ld) = (len_add, c as i64);
        let mut b = self.builder("sample_rows_f32")?;
        b.arg(logits).arg(&vocab_i).arg(&cand).arg(&cand_ld).arg(&cand_len);
        b.arg(&temperature).arg(&top_p).arg(uniforms).arg(out);
        launch(b, "sample_rows_f32", grid(int("rows", rows)? as u32, 1024))
    }
}
