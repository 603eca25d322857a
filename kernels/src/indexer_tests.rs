//! Tests of the lightning indexer against a naive full computation.

use super::*;
use crate::simd::for_each_isa;
use crate::test_util::Rng;

struct Case {
    heads: usize,
    dim: usize,
    block_size: usize,
    n_keys: usize,
    topk: usize,
    positions: Vec<usize>,
}

/// Naive `f64` scores of keys `0..=t` for one row.
fn reference_scores(q: &[f32], w: &[f32], keys: &[f32], heads: usize, dim: usize, t: usize) -> Vec<f64> {
    (0..=t)
        .map(|s| {
            let k = &keys[s * dim..(s + 1) * dim];
            (0..heads)
                .map(|h| {
                    let qh = &q[h * dim..(h + 1) * dim];
                    let d: f64 = qh.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
                    w[h] as f64 * d.max(0.0)
                })
                .sum()
        })
        .collect()
}

fn run_case(c: &Case, seed: u64) -> usize {
    let mut rng = Rng::new(seed);
    let rows = c.positions.len();
    let q = rng.vec(rows * c.heads * c.dim);
    let weights = rng.vec(rows * c.heads);
    let keys = rng.vec(c.n_keys * c.dim);
    // Paged copy; slots past the last valid key hold NaN, which would poison any score that
    // read them.
    let n_blocks = c.n_keys.div_ceil(c.block_size);
    let mut blocks = vec![vec![f32::NAN; c.block_size * c.dim]; n_blocks];
    for (s, key) in keys.chunks_exact(c.dim).enumerate() {
        let b = s / c.block_size;
        let o = (s % c.block_size) * c.dim;
        blocks[b][o..o + c.dim].copy_from_slice(key);
    }
    let block_refs: Vec<&[f32]> = blocks.iter().map(|b| b.as_slice()).collect();
    let inp = IndexerInputs {
        q: &q,
        weights: &weights,
        key_blocks: &block_refs,
        block_size: c.block_size,
        positions: &c.positions,
        heads: c.heads,
        dim: c.dim,
        topk: c.topk,
    };
    // Pre-filled with junk to check that every row is overwritten.
    let mut out = vec![vec![123u32; 3]; rows + 2];
    indexer_topk(&inp, &mut out);
    assert_eq!(out.len(), rows);

    let mut exact_rows = 0;
    for (r, &t) in c.positions.iter().enumerate() {
        let sel = &out[r];
        if t < c.topk {
            assert_eq!(*sel, (0..=t as u32).collect::<Vec<_>>(), "dense row {r}");
            continue;
        }
        assert_eq!(sel.len(), c.topk, "row {r}");
        assert!(sel.windows(2).all(|p| p[0] < p[1]), "row {r} not sorted/unique");
        assert!(sel.iter().all(|&s| s as usize <= t), "row {r} selected a future key");
        let qr = &q[r * c.heads * c.dim..(r + 1) * c.heads * c.dim];
        let scores = reference_scores(qr, &weights[r * c.heads..], &keys, c.heads, c.dim, t);
        let mut chosen = vec![false; t + 1];
        sel.iter().for_each(|&s| chosen[s as usize] = true);
        let worst_in = (0..=t)
            .filter(|&s| chosen[s])
            .map(|s| scores[s])
            .fold(f64::INFINITY, f64::min);
        let best_out = (0..=t)
            .filter(|&s| !chosen[s])
            .map(|s| scores[s])
            .fold(f64::NEG_INFINITY, f64::max);
        // Always true up to float error: nothing left out beats anything kept.
        assert!(
            worst_in >= best_out - 1e-4,
            "row {r}: kept {worst_in} < dropped {best_out}"
        );
        // Where the boundary is clear of rounding, the set must be exactly the reference's.
        let mut order: Vec<usize> = (0..=t).collect();
        order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
        if scores[order[c.topk - 1]] - scores[order[c.topk]] > 1e-3 {
            let mut expected: Vec<u32> = order[..c.topk].iter().map(|&s| s as u32).collect();
            expected.sort_unstable();
            assert_eq!(*sel, expected, "row {r}");
            exact_rows += 1;
        }
    }
    exact_rows
}

#[test]
fn small_blocks_gathered_into_one_tile_across_two_chunks() {
    // 3 heads -> 32-row chunks; 37 scored rows make a full and a partial chunk. Blocks of 5
    // keys are copied together into one tile; the last block is partial.
    let c = Case {
        heads: 3,
        dim: 7,
        block_size: 5,
        n_keys: 43,
        topk: 4,
        positions: (0..43).collect(),
    };
    let exact = run_case(&c, 50);
    assert!(exact > 20, "only {exact} rows had a clear top-k boundary");
}

#[test]
fn several_gathered_tiles_with_partial_last_block() {
    // 16 heads -> 32-row chunks; blocks of 100 -> tiles of 300 keys; 730 keys -> 3 tiles,
    // the last one partial and ending in a partial block. Positions are shuffled.
    let mut rng = Rng::new(51);
    let mut positions: Vec<usize> = (0..40).map(|_| 50 + rng.below(680)).collect();
    positions.extend([729, 3, 49, 50, 299, 300, 599, 600]);
    positions.swap(0, 45);
    let c = Case {
        heads: 16,
        dim: 20,
        block_size: 100,
        n_keys: 730,
        topk: 50,
        positions,
    };
    let exact = run_case(&c, 52);
    assert!(exact > 25, "only {exact} rows had a clear top-k boundary");
}

#[test]
fn large_blocks_used_in_place() {
    // Blocks of 300 keys are tiles of their own (no copy); 650 keys -> last block partial.
    let positions: Vec<usize> = (0..20).map(|i| 200 + i * 23).chain([649, 0]).collect();
    let c = Case {
        heads: 5,
        dim: 33,
        block_size: 300,
        n_keys: 650,
        topk: 120,
        positions,
    };
    let exact = run_case(&c, 53);
    assert!(exact > 10, "only {exact} rows had a clear top-k boundary");
}

#[test]
fn decode_single_row_and_topk_one() {
    let c = Case {
        heads: 2,
        dim: 1,
        block_size: 1,
        n_keys: 300,
        topk: 1,
        positions: vec![299],
    };
    run_case(&c, 54);
    let c = Case {
        heads: 4,
        dim: 16,
        block_size: 64,
        n_keys: 1000,
        topk: 64,
        positions: vec![999],
    };
    run_case(&c, 55);
}

#[test]
fn all_rows_dense_when_topk_covers_context() {
    let c = Case {
        heads: 2,
        dim: 4,
        block_size: 4,
        n_keys: 10,
        topk: 10,
        positions: (0..10).rev().collect(),
    };
    run_case(&c, 56);
}

#[test]
fn every_isa_matches_reference() {
    // 5 heads and 37-key partial tiles exercise the vector and scalar tails of the fold.
    let positions: Vec<usize> = (0..12).map(|i| 30 + i * 25).collect();
    let c = Case {
        heads: 5,
        dim: 9,
        block_size: 37,
        n_keys: 330,
        topk: 20,
        positions,
    };
    for_each_isa(|_| {
        run_case(&c, 57);
    });
}
