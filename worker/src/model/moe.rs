//! Mixture-of-experts: group-limited sigmoid routing with the correction bias, routed experts
//! batched per expert, plus the shared experts.

use rayon::prelude::*;

use super::weights::MoeWeights;
use crate::config::ModelConfig;

/// Chosen experts and their weights for one token.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// Expert ids.
    pub experts: Vec<usize>,
    /// Output weights (sigmoid scores, optionally renormalized, times the scaling factor).
    pub weights: Vec<f32>,
}

/// Indices of the `k` largest values; ties go to the lower index (deterministic).
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Routes one token from its router logits.
pub fn route(cfg: &ModelConfig, logits: &[f32], bias: &[f32]) -> Route {
    let e = logits.len();
    let scores: Vec<f32> = logits.iter().map(|&l| kernels::sigmoid(l)).collect();
    let choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
    let per_group = e / cfg.n_group;
    // A group's score is the sum of its two best choice scores.
    let group_scores: Vec<f32> = choice
        .chunks_exact(per_group)
        .map(|g| top_indices(g, 2.min(per_group)).iter().map(|&i| g[i]).sum())
        .collect();
    let groups = top_indices(&group_scores, cfg.topk_group);
    let mut masked = vec![f32::NEG_INFINITY; e];
    for g in groups {
        masked[g * per_group..(g + 1) * per_group].copy_from_slice(&choice[g * per_group..(g + 1) * per_group]);
    }
    let experts = top_indices(&masked, cfg.num_experts_per_tok);
    let mut weights: Vec<f32> = experts.iter().map(|&i| scores[i]).collect();
    if cfg.norm_topk_prob {
        let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
        for w in &mut weights {
            *w /= sum;
        }
    }
    for w in &mut weights {
        *w *= cfg.routed_scaling_factor;
    }
    Route { experts, weights }
}

/// Applies the MoE block to `rows` normalized rows.
pub fn forward(cfg: &ModelConfig, m: &MoeWeights, x: &[f32], rows: usize) -> Vec<f32> {
    let d = cfg.hidden_size;
    let e = cfg.n_routed_experts;
    let mut logits = vec![0.0; rows * e];
    kernels::matmul_t(x, &m.router, &mut logits, rows, d, e);
    // Routing, gathering and combining are per-row work done in parallel; at prefill sizes
    // they would otherwise leave a core idle for a sixth of the block's time.
    let routes: Vec<Route> = logits.par_chunks_exact(e).map(|l| route(cfg, l, &m.bias)).collect();
    // Group tokens by expert so each expert runs one GEMM over its tokens.
    let mut assigned: Vec<Vec<usize>> = vec![Vec::new(); e];
    for (r, route) in routes.iter().enumerate() {
        for &ex in &route.experts {
            assigned[ex].push(r);
        }
    }
    let outputs: Vec<Option<Vec<f32>>> = assigned
        .iter()
        .enumerate()
        .map(|(ex, toks)| {
            if toks.is_empty() {
                return None;
            }
            let mut gathered = vec![0.0; toks.len() * d];
            gathered
                .par_chunks_exact_mut(d)
                .zip(toks.par_iter())
                .for_each(|(g, &r)| g.copy_from_slice(&x[r * d..(r + 1) * d]));
            Some(m.experts[ex].forward(&gathered, toks.len()))
        })
        .collect();
    // Where each expert put each token's row: tokens were appended in row order.
    let mut slot = vec![0usize; e];
    let mut at: Vec<Vec<usize>> = Vec::with_capacity(rows);
    for route in &routes {
        at.push(
            route
                .experts
                .iter()
                .map(|&ex| {
                    slot[ex] += 1;
                    slot[ex] - 1
                })
                .collect(),
        );
    }
    let mut out = match &m.shared {
        Some(s) => s.forward(x, rows),
        None => vec![0.0; rows * d],
    };
    out.par_chunks_exact_mut(d).enumerate().for_each(|(r, o)| {
        // Experts are added in ascending id order, whatever order routing listed them in.
        let mut picks: Vec<(usize, usize, f32)> = routes[r]
            .experts
            .iter()
            .zip(&at[r])
            .zip(&routes[r].weights)
            .map(|((&ex, &i), &w)| (ex, i, w))
            .collect();
        picks.sort_unstable_by_key(|p| p.0);
        for (ex, i, w) in picks {
            let y = outputs[ex].as_ref().expect("a routed expert has outputs");
            for (o, v) in o.iter_mut().zip(&y[i * d..(i + 1) * d]) {
                *o += w * v;
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(n_group: usize, topk_group: usize, k: usize, norm: bool) -> ModelConfig {
        let text = format!(
            r#"{{"model_type":"deepseek_v32","vocab_size":10,"hidden_size":8,"intermediate_size":8,
            "moe_intermediate_size":4,"num_hidden_layers":2,"num_attention_heads":2,"q_lora_rank":4,
            "kv_lora_rank":4,"qk_nope_head_dim":2,"qk_rope_head_dim":2,"v_head_dim":2,
            "n_routed_experts":8,"num_experts_per_tok":{k},"n_group":{n_group},"topk_group":{topk_group},
            "norm_topk_prob":{norm},"routed_scaling_factor":2.0,"max_position_embeddings":64,
            "index_n_heads":2,"index_head_dim":4,"index_topk":4}}"#
        );
        ModelConfig::from_json_str(&text, Path::new("config.json")).unwrap()
    }

    #[test]
    fn group_limit_excludes_the_best_expert_of_a_weak_group() {
        // Group 0 = experts 0..4, group 1 = 4..8. Expert 7 is best alone, but group 0's top-2
        // sum wins, so with topk_group = 1 only group 0's experts may be chosen.
        let c = cfg(2, 1, 2, true);
        let logits = [2.0, 1.9, -5.0, -5.0, -5.0, -5.0, -5.0, 3.0];
        let r = route(&c, &logits, &[0.0; 8]);
        assert_eq!(r.experts, vec![0, 1]);
        let (s0, s1) = (kernels::sigmoid(2.0), kernels::sigmoid(1.9));
        assert!((r.weights[0] - 2.0 * s0 / (s0 + s1)).abs() < 1e-6);
    }

    #[test]
    fn bias_steers_choice_but_not_weights() {
        let c = cfg(1, 1, 1, false);
        let logits = [1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let mut bias = [0.0; 8];
        bias[1] = 1.0;
        let r = route(&c, &logits, &bias);
        assert_eq!(r.experts, vec![1]);
        assert!((r.weights[0] - 2.0 * kernels::sigmoid(0.5)).abs() < 1e-6);
    }
}
