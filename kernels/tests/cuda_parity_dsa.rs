//! GPU vs CPU parity of the DSA kernels: indexer scores and top-k, radix top-k on its own,
//! and sparse MLA attention for prefill and decode over paged caches. Ignored by default
//! (they need a CUDA GPU); `scripts/gpu-check.sh` runs them with `--ignored`.

mod cuda_util;

use cuda_util::{assert_close, gpu, Paged, Rng};
use kernels::cuda::{GpuIndexerInputs, GpuKernels, GpuMlaInputs, PagedView, TopkOrder};
use kernels::{IndexerInputs, MlaAttentionInputs};

/// Runs topk_rows on host rows (all of length n) and returns each row's selection.
fn gpu_topk(k: &GpuKernels, scores: &[f32], n: usize, topk: usize, order: TopkOrder) -> Vec<Vec<u32>> {
    let rows = scores.len() / n;
    let sd = k.upload(scores).unwrap();
    let lens = k.upload(&vec![n as i32; rows]).unwrap();
    let mut out = k.zeros::<u32>(rows * topk).unwrap();
    let mut out_len = k.zeros::<i32>(rows).unwrap();
    k.topk_rows(
        &sd.slice(..),
        n,
        &lens.slice(..),
        0,
        topk,
        order,
        &mut out.slice_mut(..),
        &mut out_len.slice_mut(..),
    )
    .unwrap();
    let (o, l) = (k.download(&out).unwrap(), k.download(&out_len).unwrap());
    (0..rows).map(|r| o[r * topk..][..l[r] as usize].to_vec()).collect()
}

#[test]
#[ignore = "needs a CUDA GPU; run by scripts/gpu-check.sh"]
fn cuda_topk_matches_select_topk_exactly() {
    let k = gpu();
    let mut rng = Rng::new(10);
    let mut cpu = Vec::new();
    for &(n, topk, rows) in &[
        (1, 1, 2),
        (10, 3, 3),
        (1000, 17, 4),
        (5000, 2048, 3),
        (65_536, 2048, 2),
        (262_144, 2048, 2),
    ] {
        // Four kinds of rows: continuous, heavy ties, concentrated (shared leading bits), and
        // specials (NaN, ±0, ±inf).
        let mut scores = Vec::with_capacity(rows * n * 4);
        for _ in 0..rows {
            scores.extend(rng.vec(n));
            scores.extend((0..n).map(|_| rng.below(50) as f32 - 25.0));
            scores.extend((0..n).map(|_| 1.0 + rng.below(4000) as f32 * 2.5e-7));
            scores.extend((0..n).map(|_| match rng.below(6) {
                0 => f32::NAN,
                1 => -0.0,
                2 => 0.0,
                3 => f32::NEG_INFINITY,
                4 => f32::INFINITY,
                _ => rng.f32(),
            }));
        }
        let got = gpu_topk(&k, &scores, n, topk, TopkOrder::Scores);
        for (r, row) in scores.chunks(n).enumerate() {
            kernels::select_topk(row, topk, &mut cpu);
            assert_eq!(got[r], cpu, "n={n} k={topk} row {r}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run by scripts/gpu-check.sh"]
fn cuda_topk_total_order_matches_total_cmp() {
    let k = gpu();
    let mut rng = Rng::new(11);
    let n = 3000;
    let row: Vec<f32> = (0..n)
        .map(|_| match rng.below(5) {
            0 => f32::NAN,
            1 => -f32::NAN,
            2 => -0.0,
            3 => 0.0,
            _ => rng.below(20) as f32,
        })
        .collect();
    for topk in [1, 7, 100, 2048] {
        let got = gpu_topk(&k, &row, n, topk, TopkOrder::TotalCmp);
        let mut idx: Vec<u32> = (0..n as u32).collect();
        idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        idx.truncate(topk);
        idx.sort_unstable();
        assert_eq!(got[0], idx, "k={topk}");
    }
}

struct IndexerCase {
    heads: usize,
    dim: usize,
    topk: usize,
    block_size: usize,
    positions: Vec<usize>,
}

/// Runs validate_topk_rows on host rows of `ld` slots.
fn gpu_validate(k: &GpuKernels, sel: &[u32], lens: &[i32], ld: usize, first_pos: usize) -> Option<usize> {
    let (sd, ld_dev) = (k.upload(sel).unwrap(), k.upload(lens).unwrap());
    k.validate_topk_rows(&sd.slice(..), &ld_dev.slice(..), ld, first_pos)
        .unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU; run by scripts/gpu-check.sh"]
fn cuda_validate_topk_rows_flags_the_first_bad_row() {
    let k = gpu();
    // More rows than one block of threads covers slots, and a large first position.
    let (rows, ld) = (300, 200);
    for first_pos in [0usize, 7, 5_000_000] {
        let mut sel = vec![u32::MAX; rows * ld]; // unused slots are never read
        let mut lens = vec![0i32; rows];
        for (r, len) in lens.iter_mut().enumerate() {
            let pos = first_pos + r;
            let n = ld.min(pos + 1);
            *len = n as i32;
            for j in 0..n {
                sel[r * ld + j] = (pos - j) as u32;
            }
        }
        assert_eq!(
            gpu_validate(&k, &sel, &lens, ld, first_pos),
            None,
            "first_pos {first_pos}: valid"
        );
        let last = |r: usize| r * ld + lens[r] as usize - 1;
        let mut past = sel.clone();
        past[last(250)] = (first_pos + 251) as u32;
        past[last(299)] = (first_pos + 300) as u32;
        assert_eq!(
            gpu_validate(&k, &past, &lens, ld, first_pos),
            Some(250),
            "past the row's position"
        );
        for (bad_len, row) in [(0, 3), (ld as i32 + 1, 0), (-1, 299)] {
            let mut l = lens.clone();
            l[row] = bad_len;
            assert_eq!(gpu_validate(&k, &sel, &l, ld, first_pos), Some(row), "len {bad_len}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run by scripts/gpu-check.sh"]
fn cuda_indexer_topk_matches_cpu() {
    let k = gpu();
    let mut rng = Rng::new(12);
    let cases = [
        // DeepSeek-V3.2 shape: a prefill chunk at the end of a 5K context, some rows dense.
        IndexerCase {
            heads: 64,
            dim: 128,
            topk: 2048,
            block_size: 64,
            positions: (0..40).map(|i| 5000 + i * 3).chain([10, 2047, 2048]).collect(),
        },
        // Odd sizes: heads not a multiple of 8, dim not a multiple of 16, tiny blocks.
        IndexerCase {
            heads: 5,
            dim: 20,
            topk: 37,
            block_size: 3,
            positions: (0..70).map(|i| i * 7).collect(),
        },
        // Decode: one row.
        IndexerCase {
            heads: 32,
            dim: 128,
            topk: 512,
            block_size: 16,
            positions: vec![3001],
        },
    ];
    for (ci, c) in cases.iter().enumerate() {
        let rows = c.positions.len();
        let max_pos = *c.positions.iter().max().unwrap();
        let n_keys = max_pos + 1;
        let q = rng.vec(rows * c.heads * c.dim);
        let scale = 1.0 / ((c.heads * c.dim) as f32).sqrt();
        let weights: Vec<f32> = rng.vec(rows * c.heads).iter().map(|v| v * scale).collect();
        let keys = rng.vec(n_keys * c.dim);
        let paged = Paged::new(&mut rng, &keys, c.dim, c.block_size);

        let blocks = paged.block_refs();
        let cpu_inp = IndexerInputs {
            q: &q,
            weights: &weights,
            key_blocks: &blocks,
            block_size: c.block_size,
            positions: &c.positions,
            heads: c.heads,
            dim: c.dim,
            topk: c.topk,
        };
        let mut cpu = Vec::new();
        kernels::indexer_topk(&cpu_inp, &mut cpu);

        let (qd, wd) = (k.upload(&q).unwrap(), k.upload(&weights).unwrap());
        let pos_i: Vec<i32> = c.positions.iter().map(|&p| p as i32).collect();
        let pd = k.upload(&pos_i).unwrap();
        let (pool, table) = (k.upload(&paged.pool).unwrap(), k.upload(&paged.table).unwrap());
        let inp = GpuIndexerInputs {
            q: qd.slice(..),
            weights: wd.slice(..),
            positions: pd.slice(..),
            max_position: max_pos,
            keys: PagedView {
                pool: pool.slice(..),
                block_table: table.slice(..),
                block_size: c.block_size,
            },
            heads: c.heads,
            dim: c.dim,
            topk: c.topk,
        };
        // Raw scores against an f64 reference.
        let ld = n_keys + 3;
        let mut sd = k.zeros::<f32>(rows * ld).unwrap();
        k.indexer_scores(&inp, &mut sd.slice_mut(..), ld).unwrap();
        let scores = k.download(&sd).unwrap();
        let reference = |r: usize, s: usize| -> f64 {
            (0..c.heads)
                .map(|h| {
                    let qv = &q[(r * c.heads + h) * c.dim..][..c.dim];
                    let dot: f64 = qv
                        .iter()
                        .zip(&keys[s * c.dim..][..c.dim])
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum();
                    weights[r * c.heads + h] as f64 * dot.max(0.0)
                })
                .sum()
        };
        for r in 0..rows {
            for s in (0..=c.positions[r]).step_by(7) {
                let (got, want) = (scores[r * ld + s] as f64, reference(r, s));
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "case {ci} row {r} key {s}: {got} vs {want}"
                );
            }
        }
        // Selections, with a small scratch budget so rows run in several chunks.
        let mut out = k.zeros::<u32>(rows * c.topk).unwrap();
        let mut out_len = k.zeros::<i32>(rows).unwrap();
        k.indexer_topk(
            &inp,
            Some(ld * 4 * 7),
            &mut out.slice_mut(..),
            &mut out_len.slice_mut(..),
        )
        .unwrap();
        let (o, l) = (k.download(&out).unwrap(), k.download(&out_len).unwrap());
        for r in 0..rows {
            let got = &o[r * c.topk..][..l[r] as usize];
            assert_eq!(got.len(), cpu[r].len(), "case {ci} row {r}: count");
            if got == &cpu[r][..] {
                continue;
            }
            // Summation order differs from the CPU's, so a near-tie at the cut may flip:
            // every disagreement must sit at the k-th score within rounding.
            let mut all: Vec<f64> = (0..=c.positions[r]).map(|s| reference(r, s)).collect();
            all.sort_by(|a, b| b.total_cmp(a));
            let cut = all[c.topk - 1];
            for s in got
                .iter()
                .filter(|s| !cpu[r].contains(s))
                .chain(cpu[r].iter().filter(|s| !got.contains(s)))
            {
                let v = reference(r, *s as usize);
                assert!(
                    (v - cut).abs() <= 1e-5 * (1.0 + cut.abs()),
                    "case {ci} row {r}: key {s} ({v}) is not a near-tie of the cut {cut}"
                );
            }
        }
    }
}

struct MlaCase {
    rows: usize,
    heads: usize,
    rank: usize,
    rope: usize,
    block_size: usize,
    context: usize,
    select: usize,
}

#[test]
#[ignore = "needs a CUDA GPU; run by scripts/gpu-check.sh"]
fn cuda_sparse_mla_attention_matches_cpu() {
    let k = gpu();
    let mut rng = Rng::new(13);
    let cases = [
        // Decode (splits > 1) at DeepSeek shapes, then prefill rows, then odd sizes.
        MlaCase {
            rows: 1,
            heads: 128,
            rank: 512,
            rope: 64,
            block_size: 64,
            context: 8000,
            select: 2048,
        },
        MlaCase {
            rows: 3,
            heads: 16,
            rank: 512,
            rope: 64,
            block_size: 64,
            context: 3000,
            select: 2048,
        },
        MlaCase {
            rows: 48,
            heads: 20,
            rank: 512,
            rope: 64,
            block_size: 32,
            context: 600,
            select: 300,
        },
        MlaCase {
            rows: 9,
            heads: 3,
            rank: 40,
            rope: 6,
            block_size: 5,
            context: 90,
            select: 33,
        },
    ];
    for (ci, c) in cases.iter().enumerate() {
        let ql: Vec<f32> = rng.vec(c.rows * c.heads * c.rank).iter().map(|v| v * 0.2).collect();
        let qr: Vec<f32> = rng.vec(c.rows * c.heads * c.rope).iter().map(|v| v * 0.2).collect();
        let ckv = rng.vec(c.context * c.rank);
        let kpe = rng.vec(c.context * c.rope);
        let ckv_p = Paged::new(&mut rng, &ckv, c.rank, c.block_size);
        // kpe shares the paging: reuse the same table by building it from the same permutation.
        let mut kpe_pool = vec![f32::NAN; ckv_p.pool.len() / c.rank * c.rope];
        let mut kpe_blocks = Vec::new();
        for (logical, &phys) in ckv_p.table.iter().enumerate() {
            let mut block = vec![0.0f32; c.block_size * c.rope];
            let lo = logical * c.block_size * c.rope;
            let hi = (lo + c.block_size * c.rope).min(kpe.len());
            block[..hi - lo].copy_from_slice(&kpe[lo..hi]);
            kpe_pool[phys as usize * c.block_size * c.rope..][..block.len()].copy_from_slice(&block);
            kpe_blocks.push(block);
        }
        // Row r selects `select` positions (fewer on the first row: a short context).
        let selected: Vec<Vec<u32>> = (0..c.rows)
            .map(|r| {
                if r == 0 && c.rows > 1 {
                    rng.subset(c.context, 1)
                } else {
                    rng.subset(c.context, c.select)
                }
            })
            .collect();
        let scale = 1.0 / ((c.rank + c.rope) as f32).sqrt();
        let (cb, kb) = (
            ckv_p.block_refs(),
            kpe_blocks.iter().map(|b| b.as_slice()).collect::<Vec<_>>(),
        );
        let cpu_inp = MlaAttentionInputs {
            q_latent: &ql,
            q_rope: &qr,
            ckv_blocks: &cb,
            kpe_blocks: &kb,
            block_size: c.block_size,
            selected: &selected,
            heads: c.heads,
            kv_rank: c.rank,
            rope_dim: c.rope,
            scale,
        };
        let mut cpu = vec![0.0; c.rows * c.heads * c.rank];
        kernels::sparse_mla_attention(&cpu_inp, &mut cpu);

        let sel_ld = c.select;
        let mut flat = vec![0u32; c.rows * sel_ld];
        for (r, s) in selected.iter().enumerate() {
            flat[r * sel_ld..][..s.len()].copy_from_slice(s);
        }
        let lens: Vec<i32> = selected.iter().map(|s| s.len() as i32).collect();
        let up = |v: &[f32]| k.upload(v).unwrap();
        let (qld, qrd, ckd, kpd) = (up(&ql), up(&qr), up(&ckv_p.pool), up(&kpe_pool));
        let table = k.upload(&ckv_p.table).unwrap();
        let starts = k.upload(&vec![0i32; c.rows]).unwrap();
        let (sd, ld) = (k.upload(&flat).unwrap(), k.upload(&lens).unwrap());
        let inp = GpuMlaInputs {
            q_latent: qld.slice(..),
            q_rope: qrd.slice(..),
            ckv_pool: ckd.slice(..),
            kpe_pool: kpd.slice(..),
            block_tables: table.slice(..),
            table_start: starts.slice(..),
            block_size: c.block_size,
            selected: sd.slice(..),
            sel_ld,
            sel_len: ld.slice(..),
            heads: c.heads,
            kv_rank: c.rank,
            rope_dim: c.rope,
            scale,
        };
        let mut od = k.zeros::<f32>(c.rows * c.heads * c.rank).unwrap();
        k.sparse_mla_attention(&inp, c.select, &mut od.slice_mut(..)).unwrap();
        assert_close(
            &k.download(&od).unwrap(),
            &cpu,
            1e-4,
            1e-5,
            &format!("attention case {ci}"),
        );
    }
}
