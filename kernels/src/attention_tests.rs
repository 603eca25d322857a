//! Tests of sparse MLA attention against plain per-head loops in `f64`.

use super::*;
use crate::simd::for_each_isa;
use crate::test_util::{assert_close, paged, Rng};

struct Case {
    heads: usize,
    kv_rank: usize,
    rope_dim: usize,
    block_size: usize,
    n_keys: usize,
    scale: f32,
    /// Number of selected keys per row.
    picks: Vec<usize>,
}

fn run_case(c: &Case, seed: u64) {
    let mut rng = Rng::new(seed);
    let rows = c.picks.len();
    let q_latent = rng.vec(rows * c.heads * c.kv_rank);
    let q_rope = rng.vec(rows * c.heads * c.rope_dim);
    let ckv = rng.vec(c.n_keys * c.kv_rank);
    let kpe = rng.vec(c.n_keys * c.rope_dim);
    let selected: Vec<Vec<u32>> = c
        .picks
        .iter()
        .map(|&n| {
            let mut all: Vec<u32> = (0..c.n_keys as u32).collect();
            for i in 0..n {
                let j = i + rng.below(c.n_keys - i);
                all.swap(i, j);
            }
            let mut pick = all[..n].to_vec();
            pick.sort_unstable();
            pick
        })
        .collect();

    let (ckv_pages, kpe_pages) = (
        paged(&ckv, c.kv_rank, c.block_size),
        paged(&kpe, c.rope_dim, c.block_size),
    );
    let ckv_refs: Vec<&[f32]> = ckv_pages.iter().map(|b| b.as_slice()).collect();
    let kpe_refs: Vec<&[f32]> = kpe_pages.iter().map(|b| b.as_slice()).collect();
    let inp = MlaAttentionInputs {
        q_latent: &q_latent,
        q_rope: &q_rope,
        ckv_blocks: &ckv_refs,
        kpe_blocks: &kpe_refs,
        block_size: c.block_size,
        selected: &selected,
        heads: c.heads,
        kv_rank: c.kv_rank,
        rope_dim: c.rope_dim,
        scale: c.scale,
    };
    let mut out = vec![f32::NAN; rows * c.heads * c.kv_rank];
    sparse_mla_attention(&inp, &mut out);

    let (r_, d_) = (c.kv_rank, c.rope_dim);
    let mut expected = vec![0.0f32; out.len()];
    for r in 0..rows {
        for h in 0..c.heads {
            let qh = &q_latent[(r * c.heads + h) * r_..][..r_];
            let qp = &q_rope[(r * c.heads + h) * d_..][..d_];
            let logits: Vec<f64> = selected[r]
                .iter()
                .map(|&s| {
                    let s = s as usize;
                    let mut acc = 0.0f64;
                    for i in 0..r_ {
                        acc += qh[i] as f64 * ckv[s * r_ + i] as f64;
                    }
                    for i in 0..d_ {
                        acc += qp[i] as f64 * kpe[s * d_ + i] as f64;
                    }
                    acc * c.scale as f64
                })
                .collect();
            let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for i in 0..r_ {
                let v: f64 = selected[r]
                    .iter()
                    .zip(&weights)
                    .map(|(&s, w)| w * ckv[s as usize * r_ + i] as f64)
                    .sum();
                expected[(r * c.heads + h) * r_ + i] = (v / total) as f32;
            }
        }
    }
    assert_close(&out, &expected, 1e-4, 1e-5);
}

#[test]
fn odd_shapes_with_tile_boundaries_and_partial_blocks() {
    // 5 heads (one 4-head pass + a single head), rank 70 (one register block + a tail),
    // picks around the 16-key tile size, blocks of 7 with the last one partial.
    let c = Case {
        heads: 5,
        kv_rank: 70,
        rope_dim: 3,
        block_size: 7,
        n_keys: 50,
        scale: 0.7,
        picks: vec![1, 15, 16, 17, 33, 50, 2, 9, 40],
    };
    run_case(&c, 60);
}

#[test]
fn decode_row_splits_heads_across_tasks() {
    let c = Case {
        heads: 16,
        kv_rank: 128,
        rope_dim: 16,
        block_size: 64,
        n_keys: 300,
        scale: 0.3,
        picks: vec![200],
    };
    run_case(&c, 61);
    let c = Case {
        heads: 3,
        kv_rank: 1,
        rope_dim: 1,
        block_size: 1,
        n_keys: 20,
        scale: 1.0,
        picks: vec![20],
    };
    run_case(&c, 62);
}

#[test]
fn sharp_softmax_rescales_across_tiles() {
    // A large scale makes the running maximum jump between tiles many times.
    let c = Case {
        heads: 8,
        kv_rank: 64,
        rope_dim: 8,
        block_size: 16,
        n_keys: 200,
        scale: 2.0,
        picks: vec![200, 100, 77],
    };
    run_case(&c, 63);
}

#[test]
fn deepseek_shapes() {
    let c = Case {
        heads: 16,
        kv_rank: 512,
        rope_dim: 64,
        block_size: 64,
        n_keys: 400,
        scale: 192f32.powf(-0.5),
        picks: vec![400, 1, 250],
    };
    run_case(&c, 64);
}

#[test]
fn every_isa_matches_reference() {
    // Odd head count and rank exercise the pair/single-head and vector/scalar tails.
    let c = Case {
        heads: 7,
        kv_rank: 150,
        rope_dim: 12,
        block_size: 10,
        n_keys: 90,
        scale: 0.5,
        picks: vec![1, 9, 40, 90],
    };
    for_each_isa(|_| run_case(&c, 65));
}
