//! The stage server on a GPU (needs a CUDA device: the tests are `#[ignore]`d and
//! `scripts/gpu-check.sh run` runs them with `--include-ignored`): two layer ranges on one
//! GPU, each behind its own stage server (`worker::stage::serve` over `GpuStage`), hidden
//! states and relayed top-k indices passed between them over loopback gRPC, give the CPU
//! engine's greedy tokens, with logprobs within BF16 tolerance (two stages on one GPU stay on
//! the gRPC data plane: NCCL needs one GPU per rank); a `Reconfigure` that moves the boundary
//! on the GPU keeps giving them. On a host with two GPUs and NCCL, stages on different GPUs
//! move hidden states and relayed top-k rows over NCCL and give the same tokens (gpu-check.sh
//! runs that test only there).

mod support;

use support::{engine_greedy, first_prompt, fixture, Greedy, Pipeline};
use worker::gpu::{GpuEngineOptions, GpuStage, MemoryFraction};
use worker::stage::StageCompute;
use worker::{EngineOptions, LayerRange, ModelConfig};

/// BF16 weights and activations against the F32 CPU engine (issue 5's tolerance).
const BF16_TOL: f32 = 2e-2;

fn ordinal() -> usize {
    std::env::var("INDEXRELAY_TEST_DEVICE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// One stage per range between `bounds`, stage `i` on device `devices[i]`.
fn gpu_stages_on(dir: &std::path::Path, bounds: &[usize], devices: &[usize]) -> Vec<Box<dyn StageCompute>> {
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let mut edges = vec![0];
    edges.extend_from_slice(bounds);
    edges.push(cfg.num_hidden_layers);
    edges
        .windows(2)
        .zip(devices)
        .map(|(w, &device)| {
            let opts = GpuEngineOptions {
                // Stages may share a device: a small share and a small fixed cache each.
                memory_fraction: MemoryFraction::new(0.3).unwrap(),
                max_blocks: Some(256),
                block_size: 16,
                ..GpuEngineOptions::new(device, &EngineOptions::default())
            };
            let s = GpuStage::load(dir, cfg.clone(), None, LayerRange::new(w[0], w[1]), opts)
                .unwrap_or_else(|e| panic!("the GPU stage tests need a CUDA device: {e}"));
            Box::new(s) as Box<dyn StageCompute>
        })
        .collect()
}

/// Every stage on the test device.
fn gpu_stages(dir: &std::path::Path, bounds: &[usize]) -> Vec<Box<dyn StageCompute>> {
    gpu_stages_on(dir, bounds, &[ordinal(); 8][..bounds.len() + 1])
}

fn close(what: &str, got: &Greedy, want: &Greedy) {
    assert_eq!(got.tokens, want.tokens, "{what}: greedy tokens");
    for (i, (g, c)) in got
        .token_logprobs
        .iter()
        .zip(&want.token_logprobs)
        .chain(got.prompt_logprobs.iter().zip(&want.prompt_logprobs))
        .enumerate()
    {
        assert!((g - c).abs() <= BF16_TOL, "{what}: logprob {i}: GPU {g} vs CPU {c}");
    }
    assert_eq!(got.prompt_logprobs.len(), want.prompt_logprobs.len(), "{what}");
}

#[test]
#[ignore = "needs a CUDA GPU; run by scripts/gpu-check.sh"]
fn two_gpu_stage_servers_on_one_gpu_give_the_cpu_engine_tokens() {
    let dir = fixture("dsv32_pattern"); // FSSFSS: a stage at 2 starts on Shared (relay)
    let prompt = first_prompt("dsv32_pattern");
    let want = engine_greedy(&dir, &prompt, 6);
    let mut p = Pipeline::start(&dir, gpu_stages(&dir, &[2]));
    let got = p.greedy(1, &prompt, 6);
    close("split at 2", &got, &want);
    assert!(p.relay_bytes > 0, "the stage starting on a Shared layer got a relay");
    let first = p.info(0);
    assert_eq!(first.device, format!("cuda:{}", ordinal()));
    assert_eq!(first.data_plane, "grpc", "stages on one GPU stay on gRPC");
    for i in 0..2 {
        let info = p.info(i);
        assert_eq!(info.block_size, 16);
        assert!(info.kv_blocks_total > 0 && info.kv_blocks_total <= 256, "{info:?}");
    }
    // A live sequence holds cache: Reconfigure is refused.
    let busy = p.reconfigure(0, 0, 3).unwrap_err();
    assert_eq!(busy.code(), tonic::Code::FailedPrecondition, "{busy}");
    p.release(1);
    // Move the boundary to 3 (a Full layer: no relay) on the GPU, then decode again.
    let r0 = p.reconfigure(0, 0, 3).unwrap();
    let r1 = p.reconfigure(1, 3, 6).unwrap();
    assert!(r0.changed && r1.changed);
    let before = p.relay_bytes;
    let again = p.greedy(2, &prompt, 6);
    close("split at 3 after Reconfigure", &again, &want);
    assert_eq!(p.relay_bytes, before, "no relay into a stage starting on a Full layer");
    p.release(2);
    let info = p.info(1);
    assert_eq!((info.layer_start, info.layer_end), (3, 6));
    assert_eq!(info.kv_blocks_free, info.kv_blocks_total);
}

#[test]
#[ignore = "needs two CUDA GPUs and NCCL; run by scripts/gpu-check.sh when the host has two"]
fn stage_servers_on_two_gpus_move_hidden_states_over_nccl() {
    let n = kernels::cuda::device_count().unwrap_or(0);
    assert!(
        n >= 2,
        "this test needs two GPUs, found {n} (gpu-check.sh runs it only then)"
    );
    assert!(
        kernels::cuda::nccl_present(),
        "this test needs libnccl.so on the loader path"
    );
    let dir = fixture("dsv32_pattern");
    let prompt = first_prompt("dsv32_pattern");
    let want = engine_greedy(&dir, &prompt, 6);
    let topk = ModelConfig::from_dir(&dir).unwrap().index_topk;
    // Over NCCL a relayed segment goes uncompressed, `rows × (ld + 1) × 4` bytes with ld =
    // index_topk when it comes from an indexer, and the counters add exactly that; over gRPC
    // the compressed rows of this short prompt are far smaller.
    let nccl_relay_bytes = |hops: usize| (hops * (prompt.len() + 5) * (topk + 1) * 4) as u64;
    // Three stages: cuda:0 -> cuda:1 -> cuda:0, so both hops cross GPUs; FSSFSS makes layers
    // 2 and 4 Shared, so both hops also relay top-k rows.
    let mut p = Pipeline::start(&dir, gpu_stages_on(&dir, &[2, 4], &[0, 1, 0]));
    // The first batch goes over gRPC while the link opens; the rest over NCCL.
    let got = p.greedy(1, &prompt, 6);
    close("two GPUs over NCCL", &got, &want);
    for i in 0..2 {
        assert_eq!(p.info(i).data_plane, "nccl", "stage {i} sends over NCCL");
    }
    // A second sequence runs entirely over the open links, its relays too (each of its 6
    // batches relays its rows on both hops).
    let before = p.relay_bytes;
    let again = p.greedy(2, &prompt, 6);
    close("second sequence over NCCL", &again, &want);
    assert_eq!(p.relay_bytes - before, nccl_relay_bytes(2), "both hops relay over NCCL");
    p.release(1);
    p.release(2);
    drop(p);

    // Four stages [0,1) [1,2) [2,3) [3,6) alternating GPUs: layers 1 and 2 are Shared, so
    // stage 1 passes on over NCCL the relay it received over NCCL (no indexer of its own),
    // and stage 3 starts on a Full layer (no relay into it).
    let mut p = Pipeline::start(&dir, gpu_stages_on(&dir, &[1, 2, 3], &[0, 1, 0, 1]));
    let got = p.greedy(1, &prompt, 6);
    close("four stages over NCCL", &got, &want);
    for i in 0..3 {
        assert_eq!(p.info(i).data_plane, "nccl", "stage {i} sends over NCCL");
    }
    let before = p.relay_bytes;
    let again = p.greedy(2, &prompt, 6);
    close("relay passed on over NCCL", &again, &want);
    assert_eq!(
        p.relay_bytes - before,
        nccl_relay_bytes(2),
        "two of three hops relay over NCCL"
    );
    p.release(1);
    p.release(2);
}
