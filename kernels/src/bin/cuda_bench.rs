//! cuda-bench: times the DSA kernels on a CUDA GPU against the device's measured ceilings.
//!
//! ```text
//! cuda-bench [--device N] [--contexts 32768,131072] [--reps 10]
//! cuda-bench --precompile sm_90[,sm_80...]      # fill the kernel cache with NVRTC, no GPU
//! ```
//!
//! First it measures the ceilings with the same compiler and launch path: a streaming copy
//! (and cuMemcpyDtoD; the better counts) for memory bandwidth, and independent FMA chains for
//! the FP32 rate. Then it times, per context length: the indexer score (a 128-row prefill
//! chunk: FLOP-bound; one decode row: bandwidth-bound), top-k with k = 2048 (128 rows and 8
//! rows), and sparse MLA attention over 2048 selected keys (32 decode rows, 128 prefill rows)
//! at DeepSeek-V3.2 shapes. It prints a Markdown table: best time of `reps` runs, achieved
//! rate, ceiling, percent. Kernel images come from the cache (`$INDEXRELAY_KERNEL_CACHE`),
//! so a GPU host needs no NVRTC when the cache was filled elsewhere with --precompile.

use std::process::ExitCode;

use kernels::cuda::{
    self, Arch, CudaError, GpuIndexerInputs, GpuKernels, GpuMlaInputs, KernelCache, PagedView, TopkOrder, ALL_SOURCES,
};

/// Indexer / attention shapes of DeepSeek-V3.2.
const IDX_HEADS: usize = 64;
const IDX_DIM: usize = 128;
const TOPK: usize = 2048;
const MLA_HEADS: usize = 128;
const KV_RANK: usize = 512;
const ROPE: usize = 64;
const BLOCK: usize = 64;

struct Args {
    device: usize,
    contexts: Vec<usize>,
    reps: usize,
    precompile: Option<Vec<Arch>>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        device: 0,
        contexts: vec![32 * 1024, 128 * 1024],
        reps: 10,
        precompile: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => a.device = value()?.parse().map_err(|e| format!("--device: {e}"))?,
            "--reps" => a.reps = value()?.parse().map_err(|e| format!("--reps: {e}"))?,
            "--contexts" => {
                a.contexts = value()?
                    .split(',')
                    .map(|s| s.parse().map_err(|e| format!("--contexts {s:?}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--precompile" => {
                let arches = value()?
                    .split(',')
                    .map(|s| s.parse::<Arch>().map_err(|e| e.to_string()))
                    .collect::<Result<_, _>>()?;
                a.precompile = Some(arches);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.reps == 0 || a.contexts.iter().any(|&c| c < TOPK + 128) {
        return Err(format!("--reps must be >= 1 and every context >= {}", TOPK + 128));
    }
    Ok(a)
}

/// SplitMix64 filler (deterministic inputs, no rand dependency).
struct Rng(u64);

impl Rng {
    fn f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        ((self.f32() * 0.5 + 0.5) * n as f32) as usize % n
    }
}

/// Best time in seconds of `reps` runs of `f` (after one warm-up), timed with CUDA events.
fn time(k: &GpuKernels, reps: usize, mut f: impl FnMut() -> Result<(), CudaError>) -> Result<f64, CudaError> {
    let err = |e| CudaError::Driver {
        context: "timing".into(),
        message: format!("{e}"),
    };
    let flags = Some(cudarc_event_default());
    f()?;
    k.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let start = k.context().new_event(flags).map_err(err)?;
        let end = k.context().new_event(flags).map_err(err)?;
        start.record(k.stream()).map_err(err)?;
        f()?;
        end.record(k.stream()).map_err(err)?;
        best = best.min(start.elapsed_ms(&end).map_err(err)? as f64 / 1e3);
    }
    Ok(best)
}

fn cudarc_event_default() -> cudarc::driver::sys::CUevent_flags {
    cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT
}

struct Row {
    kernel: String,
    context: usize,
    shape: String,
    seconds: f64,
    /// (achieved, ceiling, unit)
    rate: (f64, f64, &'static str),
}

fn print_table(ceil_bw: f64, ceil_flops: f64, rows: &[Row]) {
    println!(
        "\nCeilings: copy bandwidth {:.0} GB/s, FP32 FMA rate {:.1} TFLOP/s\n",
        ceil_bw / 1e9,
        ceil_flops / 1e12
    );
    println!("| kernel | context | shape | best time | achieved | ceiling | % |");
    println!("|---|---:|---|---:|---:|---:|---:|");
    for r in rows {
        let (got, ceil, unit) = r.rate;
        let scale = if unit == "TFLOP/s" { 1e12 } else { 1e9 };
        println!(
            "| {} | {} | {} | {:.1} µs | {:.1} {unit} | {:.1} {unit} | {:.0}% |",
            r.kernel,
            r.context,
            r.shape,
            r.seconds * 1e6,
            got / scale,
            ceil / scale,
            100.0 * got / ceil
        );
    }
}

fn ceilings(k: &GpuKernels, reps: usize) -> Result<(f64, f64), CudaError> {
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let n4 = 64usize << 20; // 64 Mi float4 = 1 GiB per buffer
    let src = k.zeros::<f32>(n4 * 4)?;
    let mut dst = k.zeros::<f32>(n4 * 4)?;
    let sms = k.info().sm_count as u32;
    let copy = || {
        let f = k.function("copy_f32x4")?;
        let n = n4 as i64;
        let mut b = k.stream().launch_builder(f);
        b.arg(&src).arg(&mut dst).arg(&n);
        let cfg = LaunchConfig {
            grid_dim: (sms * 32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: both buffers hold n4 float4s.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| CudaError::Driver {
            context: "copy".into(),
            message: e.to_string(),
        })
    };
    let t_copy = time(k, reps, copy)?;
    let mut dst2 = k.zeros::<f32>(n4 * 4)?;
    let t_dtod = time(k, reps, || {
        k.stream().memcpy_dtod(&src, &mut dst2).map_err(|e| CudaError::Driver {
            context: "memcpy_dtod".into(),
            message: e.to_string(),
        })
    })?;
    let bytes = 2.0 * (n4 * 16) as f64;
    let bw = (bytes / t_copy).max(bytes / t_dtod);

    let (blocks, threads, iters) = (sms * 16, 256u32, 4096i32);
    let mut out = k.zeros::<f32>((blocks * threads) as usize)?;
    let (a, bconst) = (0.999f32, 1e-3f32);
    let t_fma = time(k, reps, || {
        let f = k.function("fma_peak_f32")?;
        let mut b = k.stream().launch_builder(f);
        b.arg(&mut out).arg(&iters).arg(&a).arg(&bconst);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: out holds one float per thread.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| CudaError::Driver {
            context: "fma".into(),
            message: e.to_string(),
        })
    })?;
    let flops = (blocks as f64) * (threads as f64) * (iters as f64) * 16.0;
    Ok((bw, flops / t_fma))
}

fn run(a: &Args) -> Result<(), CudaError> {
    let cache = KernelCache::from_env();
    if let Some(arches) = &a.precompile {
        for arch in arches {
            for src in ALL_SOURCES {
                let (_, outcome) = cache.load_or_compile(src, arch)?;
                println!(
                    "{arch} {}: {outcome:?} -> {}",
                    src.name,
                    cache.path_for(src, arch).display()
                );
            }
        }
        return Ok(());
    }
    let k = GpuKernels::new(a.device, &cache)?;
    let info = k.info().clone();
    println!(
        "device: {} ({}; {} SMs; {:.0} GiB); kernels {} ({} compiled now, cache {})",
        info.name,
        k.arch(),
        info.sm_count,
        info.total_memory as f64 / (1u64 << 30) as f64,
        ALL_SOURCES.len(),
        k.compiled_at_startup(),
        cache.dir().display()
    );
    let (bw, flops) = ceilings(&k, a.reps)?;
    let mut rng = Rng(42);
    let mut rows = Vec::new();
    for &ctx in &a.contexts {
        // Indexer keys and a shuffled block table.
        let n_blocks = ctx.div_ceil(BLOCK);
        let keys = k.upload(&rng.vec(n_blocks * BLOCK * IDX_DIM, 1.0))?;
        let mut table: Vec<i32> = (0..n_blocks as i32).collect();
        for i in (1..n_blocks).rev() {
            table.swap(i, rng.below(i + 1));
        }
        let table = k.upload(&table)?;
        for &(nrows, label) in &[(128usize, "prefill chunk"), (1, "decode")] {
            let positions: Vec<i32> = (0..nrows).map(|i| (ctx - nrows + i) as i32).collect();
            let pos = k.upload(&positions)?;
            let q = k.upload(&rng.vec(nrows * IDX_HEADS * IDX_DIM, 1.0))?;
            let w = k.upload(&rng.vec(nrows * IDX_HEADS, 0.01))?;
            let inp = GpuIndexerInputs {
                q: q.slice(..),
                weights: w.slice(..),
                positions: pos.slice(..),
                max_position: ctx - 1,
                keys: PagedView {
                    pool: keys.slice(..),
                    block_table: table.slice(..),
                    block_size: BLOCK,
                },
                heads: IDX_HEADS,
                dim: IDX_DIM,
                topk: TOPK,
            };
            let mut scores = k.zeros::<f32>(nrows * ctx)?;
            let t = time(&k, a.reps, || k.indexer_scores(&inp, &mut scores.slice_mut(..), ctx))?;
            let work: f64 = positions
                .iter()
                .map(|&p| (p as f64 + 1.0) * (IDX_HEADS * IDX_DIM * 2) as f64)
                .sum();
            let shape = format!("{label}: {nrows} rows x {IDX_HEADS} heads x {IDX_DIM}");
            let rate = if nrows > 1 {
                (work / t, flops, "TFLOP/s")
            } else {
                ((ctx * IDX_DIM * 4) as f64 / t, bw, "GB/s")
            };
            rows.push(Row {
                kernel: "indexer score".into(),
                context: ctx,
                shape,
                seconds: t,
                rate,
            });
        }
        for &nrows in &[128usize, 8] {
            let scores = k.upload(&rng.vec(nrows * ctx, 1.0))?;
            let lens = k.upload(&vec![ctx as i32; nrows])?;
            let mut out = k.zeros::<u32>(nrows * TOPK)?;
            let mut out_len = k.zeros::<i32>(nrows)?;
            let t = time(&k, a.reps, || {
                k.topk_rows(
                    &scores.slice(..),
                    ctx,
                    &lens.slice(..),
                    0,
                    TOPK,
                    TopkOrder::Scores,
                    &mut out.slice_mut(..),
                    &mut out_len.slice_mut(..),
                )
            })?;
            rows.push(Row {
                kernel: "top-k".into(),
                context: ctx,
                shape: format!("{nrows} rows, k = {TOPK} (bytes: one read of the scores)"),
                seconds: t,
                rate: ((nrows * ctx * 4) as f64 / t, bw, "GB/s"),
            });
        }
        drop(keys);
        // Attention: one latent cache of ctx positions shared by the rows, each row with its
        // own random selection of 2048 positions.
        let ckv = k.upload(&rng.vec(n_blocks * BLOCK * KV_RANK, 1.0))?;
        let kpe = k.upload(&rng.vec(n_blocks * BLOCK * ROPE, 1.0))?;
        for &(nrows, label) in &[(32usize, "decode batch"), (128, "prefill chunk")] {
            let mut sel = Vec::with_capacity(nrows * TOPK);
            for _ in 0..nrows {
                let stride = ctx / TOPK;
                let mut row: Vec<u32> = (0..TOPK).map(|i| (i * stride + rng.below(stride)) as u32).collect();
                row.sort_unstable();
                sel.extend(row);
            }
            let sel = k.upload(&sel)?;
            let lens = k.upload(&vec![TOPK as i32; nrows])?;
            let starts = k.upload(&vec![0i32; nrows])?;
            let ql = k.upload(&rng.vec(nrows * MLA_HEADS * KV_RANK, 0.05))?;
            let qr = k.upload(&rng.vec(nrows * MLA_HEADS * ROPE, 0.05))?;
            let inp = GpuMlaInputs {
                q_latent: ql.slice(..),
                q_rope: qr.slice(..),
                ckv_pool: ckv.slice(..),
                kpe_pool: kpe.slice(..),
                block_tables: table.slice(..),
                table_start: starts.slice(..),
                block_size: BLOCK,
                selected: sel.slice(..),
                sel_ld: TOPK,
                sel_len: lens.slice(..),
                heads: MLA_HEADS,
                kv_rank: KV_RANK,
                rope_dim: ROPE,
                scale: 1.0 / ((KV_RANK + ROPE) as f32).sqrt(),
            };
            let mut out = k.zeros::<f32>(nrows * MLA_HEADS * KV_RANK)?;
            let t = time(&k, a.reps, || {
                k.sparse_mla_attention(&inp, TOPK, &mut out.slice_mut(..))
            })?;
            let bytes = (nrows * TOPK * (KV_RANK + ROPE) * 4) as f64;
            let work = (nrows * MLA_HEADS * TOPK * (2 * (KV_RANK + ROPE) + 2 * KV_RANK)) as f64;
            for rate in [(bytes / t, bw, "GB/s"), (work / t, flops, "TFLOP/s")] {
                rows.push(Row {
                    kernel: "sparse MLA attention".into(),
                    context: ctx,
                    shape: format!("{label}: {nrows} rows x {MLA_HEADS} heads, {TOPK} keys"),
                    seconds: t,
                    rate,
                });
            }
        }
    }
    print_table(bw, flops, &rows);
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("cuda-bench: {msg}");
            }
            eprintln!(
                "usage: cuda-bench [--device N] [--contexts 32768,131072] [--reps 10] | --precompile sm_90[,sm_80]"
            );
            return ExitCode::from(2);
        }
    };
    if args.precompile.is_none() && !cuda::driver_present() {
        eprintln!("cuda-bench: no CUDA driver on this machine (use --precompile to only fill the kernel cache)");
        return ExitCode::from(1);
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cuda-bench: {e}");
            ExitCode::from(1)
        }
    }
}
