//! Prefill work by phase, computed from the shapes (not measured), to turn times into rates.

use serde::Serialize;

use kernels::{MlaDims, MlaKeyPlan};

use crate::args::ShapeArgs;

/// Per-phase FLOPs of a prefill of `n` tokens, computed from the shapes (not measured).
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct FlopModel {
    /// MLA projections (q_a, q_b, kv_a, o).
    pub(crate) attn_proj: f64,
    /// Attention over the selected keys, per chunk in the form the engine picks
    /// ([`kernels::MlaMacs::prefers_expanded`]) for a plan whose blocks cover every earlier key
    /// ([`MlaKeyPlan::covering`]): absorbed (incl. the W_uk / W_uv products) or expanded
    /// (key expansion through kv_b plus the masked block GEMMs).
    pub(crate) attn_core: f64,
    /// Indexer projections (wq_b, wk, weights_proj).
    pub(crate) indexer_proj: f64,
    /// Indexer scoring (rows with more visible keys than index_topk).
    pub(crate) indexer_score: f64,
    /// Dense MLP, router, routed and shared experts.
    pub(crate) mlp: f64,
    /// The last row's lm_head.
    pub(crate) head: f64,
}

impl FlopModel {
    /// A prefill of `n` tokens the way the engine runs one for generation: every layer writes
    /// every row's cache entries, but the final layer (Full when `last_full`) runs its queries,
    /// attention, indexer scoring and MLP for the prompt's last row only; indexer queries are
    /// projected only for rows past `index_topk` (the others select every key unscored).
    pub(crate) fn prefill(s: &ShapeArgs, n: usize, chunk: usize, full_layers: usize, last_full: bool) -> Self {
        let f = |x: usize| x as f64;
        let (d, h, r, dn, dr, dv) = (s.hidden, s.heads, s.kv_lora_rank, s.nope_dim, s.rope_dim, s.v_dim);
        let per_tok_proj = 2 * (d * s.q_lora_rank + s.q_lora_rank * h * (dn + dr) + d * (r + dr) + h * dv * d);
        // kv_a runs for every row (cache entries); q_a, q_b and o only for rows whose output is read.
        let latent = 2 * d * (r + dr);
        let query_side = per_tok_proj - latent;
        let dims = MlaDims {
            heads: h,
            kv_rank: r,
            nope_dim: dn,
            rope_dim: dr,
            v_dim: dv,
        };
        let attn_macs: f64 = (0..n)
            .step_by(chunk.max(1))
            .map(|start| {
                let rows = chunk.max(1).min(n - start);
                let m = MlaKeyPlan::covering(start, rows, s.index_topk).macs(rows, dims);
                if m.prefers_expanded() {
                    m.expanded
                } else {
                    m.absorbed
                }
            })
            .sum();
        // The final layer's one row runs absorbed, like a decode row.
        let last_row_macs = MlaKeyPlan::covering(n - 1, 1, s.index_topk).macs(1, dims).absorbed;
        let index_key = 2 * d * s.index_dim;
        let index_query = 2 * (s.q_lora_rank * s.index_heads * s.index_dim + d * s.index_heads);
        let scored_rows = n - s.index_topk.min(n);
        let last_scored = usize::from(n > s.index_topk);
        let last_full = usize::from(last_full);
        // Σ_{t ≥ topk} (t + 1) keys scored.
        let scored: f64 = (s.index_topk.min(n)..n).map(|t| f(t + 1)).sum::<f64>();
        let score_flops = f(2 * s.index_heads * s.index_dim);
        let moe_layers = s.layers.saturating_sub(s.first_k_dense);
        let dense_layers = s.layers - moe_layers;
        let dense_row = f(6 * d * s.intermediate);
        let moe_row = f(6 * d * s.moe_intermediate * (s.experts_per_tok + 1) + 2 * d * s.experts);
        let last_row = if moe_layers > 0 { moe_row } else { dense_row };
        let body = s.layers.saturating_sub(1);
        FlopModel {
            attn_proj: f(s.layers * n * latent) + f(body * n * query_side) + f(query_side),
            attn_core: f(body) * 2.0 * attn_macs + 2.0 * last_row_macs,
            indexer_proj: f(full_layers * n * index_key)
                + f((full_layers - last_full) * scored_rows * index_query)
                + f(last_full * last_scored * index_query),
            indexer_score: f(full_layers - last_full) * scored * score_flops
                + f(last_full * last_scored * n) * score_flops,
            mlp: f(dense_layers) * f(n) * dense_row + f(moe_layers) * f(n) * moe_row - f(n - 1) * last_row,
            head: f(2 * d * s.vocab),
        }
    }

    pub(crate) fn total(&self) -> f64 {
        self.attn_proj + self.attn_core + self.indexer_proj + self.indexer_score + self.mlp + self.head
    }
}
