//! Throughput of the hot kernels at DeepSeek-like shapes.
//!
//! Run with `cargo run -p kernels --release --bin kernel-bench`. Each line reports the best
//! of a few repetitions, which is the figure least disturbed by other load on the machine.

use std::hint::black_box;
use std::time::Instant;

use kernels::{
    gemv_t, indexer_topk, matmul_t, mla_prefill_attention, select_topk, sparse_mla_attention, IndexerInputs,
    MlaAttentionInputs, MlaDims, MlaKeyPlan, MlaPrefillInputs,
};

/// Deterministic filler (xorshift), so runs are comparable.
fn fill(n: usize, seed: u64) -> Vec<f32> {
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

/// Best wall time of `reps` runs of `f`, in seconds.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up: page faults, rayon pool start, caches
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn row(name: &str, time: f64, flops: f64, extra: &str) {
    println!(
        "{name:<46} {:>10.3} ms {:>9.1} GFLOP/s  {extra}",
        time * 1e3,
        flops / time / 1e9
    );
}

fn bench_matmul(m: usize, k: usize, n: usize, reps: usize) {
    let x = fill(m * k, 1);
    let w = fill(n * k, 2);
    let mut out = vec![0.0f32; m * n];
    let t = best(reps, || matmul_t(black_box(&x), black_box(&w), &mut out, m, k, n));
    row(&format!("matmul_t m={m} k={k} n={n}"), t, 2.0 * (m * n * k) as f64, "");
}

fn bench_gemv(k: usize, n: usize) {
    let x = fill(k, 3);
    let w = fill(n * k, 4);
    let mut out = vec![0.0f32; n];
    let t = best(30, || gemv_t(black_box(&x), black_box(&w), &mut out, k, n));
    let gbs = (4 * n * k) as f64 / t / 1e9;
    // The GEMV streams its weight once, so its ceiling is the rate at which the rayon
    // threads can read memory at this moment (shared hosts vary by tens of percent): read
    // the same bytes with a plain parallel sum and report both.
    let ceiling = read_bandwidth(&w);
    row(
        &format!("gemv_t k={k} n={n}"),
        t,
        2.0 * (n * k) as f64,
        &format!("{gbs:.1} GB/s = {:.0}% of the read ceiling", 100.0 * gbs / ceiling),
    );
    println!(
        "{:<46} {:>10} {:>17}  {ceiling:.1} GB/s (parallel sum over the same {} MiB)",
        "memory read ceiling",
        "",
        "",
        (4 * n * k) >> 20
    );
}

/// Best read bandwidth (GB/s) of a parallel sum over `data`, split across the rayon threads.
fn read_bandwidth(data: &[f32]) -> f64 {
    use rayon::prelude::*;
    let chunk = data.len().div_ceil(rayon::current_num_threads().max(1) * 8).max(1);
    let t = best(30, || {
        // Integer sums of the bit patterns: they vectorize on any x86-64 (this binary is
        // built for the baseline ISA), so the loop is bound by memory, not by adds.
        let total: u32 = data
            .par_chunks(chunk)
            .map(|c| {
                let mut acc = [0u32; 32];
                for v in c.chunks_exact(32) {
                    for i in 0..32 {
                        acc[i] = acc[i].wrapping_add(v[i].to_bits());
                    }
                }
                acc.iter().fold(0u32, |a, &b| a.wrapping_add(b))
            })
            .reduce(|| 0, u32::wrapping_add);
        black_box(total);
    });
    (4 * data.len()) as f64 / t / 1e9
}

fn bench_indexer(n_keys: usize) {
    let (heads, dim, topk, rows, block_size) = (16, 128, 2048, 256, 64);
    let q = fill(rows * heads * dim, 5);
    let weights: Vec<f32> = fill(rows * heads, 6).iter().map(|w| w * 0.02).collect();
    let keys = fill(n_keys * dim, 7);
    let blocks: Vec<&[f32]> = keys.chunks(block_size * dim).collect();
    let positions: Vec<usize> = (n_keys - rows..n_keys).collect();
    let inp = IndexerInputs {
        q: &q,
        weights: &weights,
        key_blocks: &blocks,
        block_size,
        positions: &positions,
        heads,
        dim,
        topk,
    };
    let mut out = Vec::new();
    let t = best(5, || indexer_topk(black_box(&inp), &mut out));
    let flops: f64 = positions.iter().map(|&p| 2.0 * (heads * dim * (p + 1)) as f64).sum();
    let per_row = t / rows as f64 * 1e6;
    row(
        &format!("indexer_topk {n_keys} keys, {rows} rows, h16 d128 k2048"),
        t,
        flops,
        &format!("{per_row:.1} us/row"),
    );

    // Decode: one row at the end of the context.
    let last = [n_keys - 1];
    let inp = IndexerInputs {
        q: &q[..heads * dim],
        weights: &weights[..heads],
        positions: &last,
        ..inp
    };
    let t = best(20, || indexer_topk(black_box(&inp), &mut out));
    let flops = 2.0 * (heads * dim * n_keys) as f64;
    row(&format!("indexer_topk {n_keys} keys, 1 row (decode)"), t, flops, "");
}

fn bench_topk() {
    // 4096 is a prefill row half-way through a 4K prompt (half its keys win), 32768 a long one.
    for n in [4096, 32 * 1024] {
        let scores = fill(n, 8);
        let mut out = Vec::new();
        let t = best(200, || select_topk(black_box(&scores), 2048, &mut out));
        println!("{:<46} {:>10.3} ms", format!("select_topk n={n} k=2048"), t * 1e3);
    }
}

fn bench_attention(rows: usize, stride: u32) {
    let (heads, rank, rope, n_sel, n_keys, block_size) = (16, 512, 64, 2048, 16384, 64);
    let q_latent = fill(rows * heads * rank, 9);
    let q_rope = fill(rows * heads * rope, 10);
    // Small values keep the softmax from collapsing onto a single key.
    let ckv: Vec<f32> = fill(n_keys * rank, 11).iter().map(|v| v * 0.1).collect();
    let kpe = fill(n_keys * rope, 12);
    let ckv_blocks: Vec<&[f32]> = ckv.chunks(block_size * rank).collect();
    let kpe_blocks: Vec<&[f32]> = kpe.chunks(block_size * rope).collect();
    // Every `stride`-th key, offset per row: spread over the cache like a real selection.
    let selected: Vec<Vec<u32>> = (0..rows)
        .map(|r| (0..n_sel as u32).map(|i| i * stride + (r as u32 % stride)).collect())
        .collect();
    let inp = MlaAttentionInputs {
        q_latent: &q_latent,
        q_rope: &q_rope,
        ckv_blocks: &ckv_blocks,
        kpe_blocks: &kpe_blocks,
        block_size,
        selected: &selected,
        heads,
        kv_rank: rank,
        rope_dim: rope,
        scale: 192f32.powf(-0.5),
    };
    let mut out = vec![0.0f32; rows * heads * rank];
    let t = best(5, || sparse_mla_attention(black_box(&inp), &mut out));
    let flops = (rows * heads * n_sel) as f64 * (2.0 * (rank + rope) as f64 + 2.0 * rank as f64);
    let per_row = t / rows as f64 * 1e6;
    row(
        &format!("sparse_mla_attention {rows} rows, 2048 keys stride {stride}"),
        t,
        flops,
        &format!("{per_row:.1} us/row"),
    );
}

/// A prefill chunk's attention both ways: `rows` rows at positions `start..`, each selecting
/// every key up to itself while that is at most `topk`, else `topk` keys (every other one
/// near the row, like an index over a long prompt: the row's own key included). Without
/// `vs_absorbed` only the expanded form runs (the absorbed one takes minutes at 4096 rows).
fn bench_prefill_attention(rows: usize, start: usize, topk: usize, vs_absorbed: bool) {
    let d = MlaDims {
        heads: 16,
        kv_rank: 512,
        nope_dim: 128,
        rope_dim: 64,
        v_dim: 128,
    };
    let (h, r, dq, block_size) = (d.heads, d.kv_rank, d.nope_dim + d.rope_dim, 64);
    let n_keys = start + rows;
    let ckv: Vec<f32> = fill(n_keys * r, 21).iter().map(|v| v * 0.1).collect();
    let kpe = fill(n_keys * d.rope_dim, 22);
    let ckv_blocks: Vec<&[f32]> = ckv.chunks(block_size * r).collect();
    let kpe_blocks: Vec<&[f32]> = kpe.chunks(block_size * d.rope_dim).collect();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let selected: Vec<Vec<u32>> = (0..rows)
        .map(|i| {
            let t = (start + i) as u32;
            if (t as usize) < topk {
                return (0..=t).collect();
            }
            // Random topk - 1 earlier keys plus the row itself.
            let mut pick: Vec<u32> = (0..t).collect();
            for j in 0..topk - 1 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let s = j + (rng % (pick.len() - j) as u64) as usize;
                pick.swap(j, s);
            }
            pick.truncate(topk - 1);
            pick.push(t);
            pick.sort_unstable();
            pick
        })
        .collect();
    let plan = MlaKeyPlan::new(&selected);
    let macs = plan.macs(rows, d);
    let scale = 192f32.powf(-0.5);
    let q = fill(rows * h * dq, 23);
    let kv_b: Vec<f32> = fill(h * (d.nope_dim + d.v_dim) * r, 24)
        .iter()
        .map(|v| v * 0.05)
        .collect();
    let inp = MlaPrefillInputs {
        q: &q,
        ckv_blocks: &ckv_blocks,
        kpe_blocks: &kpe_blocks,
        block_size,
        selected: &selected,
        plan: &plan,
        kv_b: &kv_b,
        dims: d,
        scale,
    };
    let mut out = vec![0.0f32; rows * h * d.v_dim];
    let t_exp = best(2, || mla_prefill_attention(black_box(&inp), &mut out));
    let name = format!("prefill attn {rows} rows @{start} topk {topk}");
    if !vs_absorbed {
        row(&format!("{name} expanded"), t_exp, 2.0 * macs.expanded, "");
        return;
    }
    let q_latent = fill(rows * h * r, 25);
    let q_rope = fill(rows * h * d.rope_dim, 26);
    let abs = MlaAttentionInputs {
        q_latent: &q_latent,
        q_rope: &q_rope,
        ckv_blocks: &ckv_blocks,
        kpe_blocks: &kpe_blocks,
        block_size,
        selected: &selected,
        heads: h,
        kv_rank: r,
        rope_dim: d.rope_dim,
        scale,
    };
    let mut out_abs = vec![0.0f32; rows * h * r];
    let t_abs = best(2, || sparse_mla_attention(black_box(&abs), &mut out_abs));
    // What `EXPANDED_MAC_COST` would have to be for the cost model to price both forms as
    // they ran here: seconds per expanded multiply-add over seconds per absorbed one.
    let mac_cost = (t_exp / macs.expanded) / (t_abs / macs.absorbed);
    row(
        &format!("{name} expanded"),
        t_exp,
        2.0 * macs.expanded,
        &format!("{:.2}x absorbed kernel; MAC cost ratio {mac_cost:.2}", t_abs / t_exp),
    );
    row(
        &format!("{name} absorbed"),
        t_abs,
        2.0 * macs.absorbed,
        "attention only",
    );
}

fn main() {
    // An optional argument runs only the benchmarks whose group name contains it.
    let filter = std::env::args().nth(1).unwrap_or_default();
    let on = |group: &str| group.contains(filter.as_str());
    println!(
        "kernel-bench: {} rayon threads; best of several runs; attention is h16 r512 p64",
        rayon::current_num_threads()
    );
    println!("{:<46} {:>13} {:>17}  extra", "kernel / shape", "time", "throughput");
    if on("matmul") {
        bench_matmul(4096, 2048, 2048, 3);
        bench_matmul(4096, 1024, 3072, 3);
        bench_matmul(4096, 768, 3072, 3);
        // The shapes whose weight `gemm` would pack whole on one thread (n ≤ 1024): the
        // model's o_proj, q_a, kv_a, and a MoE expert's gate/up and down for 1024 tokens.
        bench_matmul(4096, 2048, 1024, 3);
        bench_matmul(4096, 1024, 768, 3);
        bench_matmul(4096, 1024, 576, 3);
        bench_matmul(1024, 1024, 1024, 10);
        bench_matmul(1024, 512, 1024, 10);
        for m in [1, 2, 4, 8, 16, 32] {
            bench_matmul(m, 4096, 4096, 20);
        }
    }
    if on("gemv") {
        bench_gemv(4096, 4096);
    }
    if on("indexer") {
        bench_indexer(4096);
        bench_indexer(16384);
    }
    if on("topk") {
        bench_topk();
    }
    if on("attention") {
        bench_attention(1, 1);
        bench_attention(1, 8);
        bench_attention(64, 8);
    }
    if on("prefill") {
        bench_prefill_attention(512, 0, 2048, true);
        bench_prefill_attention(512, 1536, 2048, true);
        bench_prefill_attention(512, 3584, 2048, true);
        bench_prefill_attention(256, 16128, 2048, true);
    }
    if on("crossover") {
        // Mid-chunk rows of a 16K prompt's chunks 2-4 (random top-2048 selections): where
        // the engine's cost model switches from the expanded form to the absorbed one.
        for start in [6144, 10240, 14336] {
            bench_prefill_attention(512, start, 2048, true);
        }
    }
    if on("chunk") {
        // The whole first chunk of a 4K prompt, as `dsa_bench --chunk 4096` runs it.
        bench_prefill_attention(4096, 0, 2048, false);
    }
}
