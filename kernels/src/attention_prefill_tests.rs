//! Tests of expanded-form prefill attention against a plain per-head loop in `f64` that
//! expands every key through `kv_b_proj`.

use super::*;
use crate::simd::for_each_isa;
use crate::test_util::{assert_close, paged, Rng};

/// How a case's rows select keys.
enum Selection {
    /// Row i sits at position `start + i` and sees every key up to it (prefill before the
    /// context exceeds index_topk).
    Causal { start: usize },
    /// Row i sits at position `start + i` and picks `k` random keys up to it (always itself).
    Sparse { start: usize, k: usize },
}

struct Case {
    dims: MlaDims,
    block_size: usize,
    rows: usize,
    selection: Selection,
    scale: f32,
}

fn selection(c: &Case, rng: &mut Rng) -> Vec<Vec<u32>> {
    (0..c.rows)
        .map(|i| match c.selection {
            Selection::Causal { start } => (0..=(start + i) as u32).collect(),
            Selection::Sparse { start, k } => {
                let t = start + i;
                let mut all: Vec<u32> = (0..t as u32).collect();
                let k = k.min(t + 1);
                for j in 0..k - 1 {
                    let s = j + rng.below(all.len() - j);
                    all.swap(j, s);
                }
                let mut pick = all[..k - 1].to_vec();
                pick.push(t as u32);
                pick.sort_unstable();
                pick
            }
        })
        .collect()
}

fn run_case(c: &Case, seed: u64) {
    let d = c.dims;
    let mut rng = Rng::new(seed);
    let selected = selection(c, &mut rng);
    let n_keys = selected.iter().map(|s| *s.last().unwrap() as usize + 1).max().unwrap();
    let (h, r, dn, dr, dv) = (d.heads, d.kv_rank, d.nope_dim, d.rope_dim, d.v_dim);
    let dq = dn + dr;
    let q = rng.vec(c.rows * h * dq);
    let ckv = rng.vec(n_keys * r);
    let kpe = rng.vec(n_keys * dr);
    let kv_b: Vec<f32> = rng.vec(h * (dn + dv) * r).iter().map(|v| v * 0.2).collect();

    let (ckv_pages, kpe_pages) = (paged(&ckv, r, c.block_size), paged(&kpe, dr, c.block_size));
    let ckv_refs: Vec<&[f32]> = ckv_pages.iter().map(|b| b.as_slice()).collect();
    let kpe_refs: Vec<&[f32]> = kpe_pages.iter().map(|b| b.as_slice()).collect();
    let plan = MlaKeyPlan::new(&selected);
    let inp = MlaPrefillInputs {
        q: &q,
        ckv_blocks: &ckv_refs,
        kpe_blocks: &kpe_refs,
        block_size: c.block_size,
        selected: &selected,
        plan: &plan,
        kv_b: &kv_b,
        dims: d,
        scale: c.scale,
    };
    let mut out = vec![f32::NAN; c.rows * h * dv];
    mla_prefill_attention(&inp, &mut out);

    // Reference: expand every key per head, softmax over the row's selection.
    let expand = |s: usize, head: usize, row: usize| -> f64 {
        let w = &kv_b[(head * (dn + dv) + row) * r..][..r];
        (0..r).map(|i| w[i] as f64 * ckv[s * r + i] as f64).sum()
    };
    let mut expected = vec![0.0f32; out.len()];
    for (row, sel) in selected.iter().enumerate() {
        for head in 0..h {
            let qh = &q[(row * h + head) * dq..][..dq];
            let logits: Vec<f64> = sel
                .iter()
                .map(|&s| {
                    let s = s as usize;
                    let nope: f64 = (0..dn).map(|i| qh[i] as f64 * expand(s, head, i)).sum();
                    let rope: f64 = (0..dr).map(|i| qh[dn + i] as f64 * kpe[s * dr + i] as f64).sum();
                    (nope + rope) * c.scale as f64
                })
                .collect();
            let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for i in 0..dv {
                let v: f64 = sel
                    .iter()
                    .zip(&weights)
                    .map(|(&s, w)| w * expand(s as usize, head, dn + i))
                    .sum();
                expected[(row * h + head) * dv + i] = (v / total) as f32;
            }
        }
    }
    assert_close(&out, &expected, 1e-4, 1e-5);
}

fn dims(heads: usize, kv_rank: usize, nope_dim: usize, rope_dim: usize, v_dim: usize) -> MlaDims {
    MlaDims {
        heads,
        kv_rank,
        nope_dim,
        rope_dim,
        v_dim,
    }
}

#[test]
fn causal_rows_across_row_blocks_and_key_tiles() {
    // 70 rows = one full row block + a partial one, from just below the first key tile's
    // end: two key tiles.
    let c = Case {
        dims: dims(3, 24, 8, 4, 6),
        block_size: 7,
        rows: 70,
        selection: Selection::Causal { start: KEY_TILE - 6 },
        scale: 0.4,
    };
    run_case(&c, 1);
}

#[test]
fn row_groups_stop_at_their_own_last_key() {
    // 100 rows from KEY_TILE - 56: the second key tile (positions KEY_TILE..) reaches the
    // block's later row groups but not its first (up to KEY_TILE - 9), which must skip it.
    let c = Case {
        dims: dims(2, 16, 8, 4, 8),
        block_size: 8,
        rows: 100,
        selection: Selection::Causal { start: KEY_TILE - 56 },
        scale: 0.5,
    };
    run_case(&c, 8);
}

#[test]
fn sparse_rows_mask_unselected_keys() {
    let c = Case {
        dims: dims(2, 16, 8, 4, 8),
        block_size: 16,
        rows: 90,
        selection: Selection::Sparse {
            start: KEY_TILE - 56,
            k: 33,
        },
        scale: 0.6,
    };
    run_case(&c, 2);
}

#[test]
fn sharp_softmax_rescales_across_tiles() {
    // A large scale makes the running maximum jump between key tiles many times (three
    // tiles here).
    let c = Case {
        dims: dims(2, 16, 8, 4, 8),
        block_size: 64,
        rows: 20,
        selection: Selection::Sparse {
            start: 2 * KEY_TILE + 88,
            k: 300,
        },
        scale: 4.0,
    };
    run_case(&c, 3);
}

#[test]
fn first_rows_of_a_prompt() {
    // Row 0 sees only itself; a row block whose rows select nothing in a tile must skip it.
    let c = Case {
        dims: dims(4, 20, 6, 2, 5),
        block_size: 3,
        rows: 130,
        selection: Selection::Causal { start: 0 },
        scale: 0.5,
    };
    run_case(&c, 4);
}

#[test]
fn sparse_rows_whose_keys_leave_gaps() {
    // 20 rows picking 9 of 500+ earlier keys: the union has gaps, so the tiles below the
    // rows' own positions are not consecutive positions.
    let c = Case {
        dims: dims(2, 16, 8, 4, 8),
        block_size: 8,
        rows: 20,
        selection: Selection::Sparse { start: 500, k: 10 },
        scale: 0.7,
    };
    run_case(&c, 6);
}

#[test]
fn dense_and_sparse_rows_in_one_block() {
    // Rows 0..40 select every key up to themselves (a prefix of each tile), the rest 40
    // random ones: both kinds share a row block and its tiles.
    let c = Case {
        dims: dims(3, 16, 8, 4, 8),
        block_size: 16,
        rows: 100,
        selection: Selection::Sparse { start: 0, k: 40 },
        scale: 0.8,
    };
    run_case(&c, 7);
}

#[test]
fn every_isa_matches_reference() {
    let c = Case {
        dims: dims(3, 17, 5, 3, 7),
        block_size: 5,
        rows: 40,
        selection: Selection::Sparse { start: 30, k: 9 },
        scale: 0.9,
    };
    for_each_isa(|_| run_case(&c, 5));
}

#[test]
fn exp_is_accurate_and_flushes() {
    let mut worst = 0.0f64;
    for i in 0..=200_000 {
        let x = -(i as f32) * 86.0 / 200_000.0;
        let got = exp_nonpositive(x) as f64;
        let want = (x as f64).exp();
        worst = worst.max((got - want).abs() / want);
    }
    assert!(worst < 3e-7, "relative error {worst}");
    assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_nonpositive(-100.0), 0.0);
    assert_eq!(exp_nonpositive(0.0), 1.0);
}

#[test]
fn plan_prices_dense_and_sparse_chunks() {
    let d = dims(16, 512, 128, 64, 128);
    // 2048 causal rows from 0: union = 2048 keys; the expanded form is far cheaper.
    let causal: Vec<Vec<u32>> = (0..2048u32).map(|t| (0..=t).collect()).collect();
    let m = MlaKeyPlan::new(&causal).macs(causal.len(), d);
    assert!(m.expanded * 2.0 < m.absorbed, "{m:?}");
    // One decode row over 2048 of 16K keys: absorbed is far cheaper.
    let decode = vec![(0..2048u32).map(|i| i * 8).collect::<Vec<_>>()];
    let m = MlaKeyPlan::new(&decode).macs(1, d);
    assert!(m.absorbed * 10.0 < m.expanded, "{m:?}");
}

#[test]
fn covering_plan_prices_like_selections_that_cover_every_earlier_key() {
    let d = dims(4, 32, 16, 8, 16);
    // Dense rows (all from 0, topk above every position), and sparse rows that select
    // themselves and a window of topk - 1 earlier keys at spread offsets, so the chunk's
    // union is every key.
    for (start, rows, topk) in [(0usize, 300usize, 400usize), (200, 256, 128)] {
        let selected: Vec<Vec<u32>> = (start..start + rows)
            .map(|t| {
                let n = (t + 1).min(topk);
                let o = (t * 37) % (t + 2 - n);
                let mut s: Vec<u32> = (o as u32..(o + n - 1) as u32).collect();
                s.push(t as u32);
                s
            })
            .collect();
        let exact = MlaKeyPlan::new(&selected);
        let end = (start + rows) as u32;
        assert_eq!(
            exact.union,
            (0..end).collect::<Vec<_>>(),
            "the case must cover every key"
        );
        let covering = MlaKeyPlan::covering(start, rows, topk);
        assert_eq!(covering.union, exact.union);
        assert_eq!(covering.block_last, exact.block_last);
        assert_eq!(covering.selected_total, exact.selected_total);
        let (a, b) = (exact.macs(rows, d), covering.macs(rows, d));
        assert_eq!((a.absorbed, a.expanded), (b.absorbed, b.expanded));
    }
}
