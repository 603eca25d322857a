//! The GPU engine against the CPU engine on every golden fixture (needs a CUDA GPU: the tests
//! are `#[ignore]`d and `scripts/gpu-check.sh run` runs them with `--include-ignored`).
//!
//! - BF16 weights (the serving default): the same greedy tokens as the CPU engine, prompt and
//!   generated logprobs within 2e-2 (issue 5's BF16 tolerance), alone and batched with small
//!   blocks and chunked prefill.
//! - F32 weights: the same kernels without BF16 rounding, logprobs within 2e-3 (separates a
//!   kernel bug from rounding).
//! - Two layer ranges on one GPU, hidden states and relayed top-k indices handed over in
//!   process, give the same tokens as one range (splits before a Shared layer relay, splits
//!   before a Full one do not).
//!
//! Fixtures come from `$INDEXRELAY_FIXTURES` (the GPU host runs prebuilt binaries from another
//! checkout) or `tests/fixtures/golden`; the device from `$INDEXRELAY_TEST_DEVICE` (default 0).

use std::path::Path;

use serde_json::Value;
use worker::gpu::{GpuBackend, GpuEngineOptions, GpuModel, GpuWeightDtype, MemoryFraction};
use worker::model::TopkRows;
use worker::sampling::argmax;
use worker::{
    Engine, EngineOptions, GenerationOutput, GenerationRequest, LayerRange, Model, ModelConfig, SamplingParams,
    Segment, StageInput,
};

mod support;
use support::fixture;

/// BF16 weights and activations against the F32 CPU engine.
const BF16_TOL: f64 = 2e-2;
/// F32 weights: only summation order differs.
const F32_TOL: f64 = 2e-3;
const FIXTURES: [&str; 6] = [
    "dsv32_dense",
    "dsv32_pattern",
    "glm_dense",
    "glm_pattern",
    "dsv32_fp8",
    "dsv32_fp8_twin",
];

fn ordinal() -> usize {
    std::env::var("INDEXRELAY_TEST_DEVICE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn cases(name: &str) -> Vec<(Vec<u32>, usize)> {
    // The fp8 checkpoint shares its twin's expected.json.
    let file = if name == "dsv32_fp8" { "dsv32_fp8_twin" } else { name };
    let text = std::fs::read_to_string(fixture(file).join("expected.json")).unwrap();
    let exp: Value = serde_json::from_str(&text).unwrap();
    exp["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = c["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            (ids, c["max_new_tokens"].as_u64().unwrap() as usize)
        })
        .collect()
}

fn greedy(prompt: Vec<u32>, n: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_new_tokens: n,
        sampling: SamplingParams::default(),
        prompt_logprobs: true,
        ignore_eos: false,
    }
}

fn gpu_engine(dir: &Path, opts: EngineOptions, dtype: GpuWeightDtype) -> Engine<GpuBackend> {
    let o = GpuEngineOptions {
        // Several engines share the device in one test process: a small, fixed cache each.
        memory_fraction: MemoryFraction::new(0.5).unwrap(),
        max_blocks: Some(opts.cache_blocks),
        weight_dtype: dtype,
        ..GpuEngineOptions::new(ordinal(), &opts)
    };
    match GpuBackend::load(dir, None, &o) {
        Ok(b) => Engine::with_backend(b, opts),
        Err(e) => panic!("the GPU parity tests need a CUDA device: {e}"),
    }
}

fn run_all<B: worker::StepBackend>(
    e: &mut Engine<B>,
    reqs: &[GenerationRequest],
    batched: bool,
) -> Vec<GenerationOutput> {
    if batched {
        e.generate(reqs.to_vec()).unwrap()
    } else {
        reqs.iter()
            .map(|r| e.generate(vec![r.clone()]).unwrap().remove(0))
            .collect()
    }
}

fn compare(what: &str, gpu: &[GenerationOutput], cpu: &[GenerationOutput], tol: f64) {
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert_eq!(g.token_ids, c.token_ids, "{what} case {i}: greedy tokens");
        let (gp, cp) = (g.prompt_logprobs.as_ref().unwrap(), c.prompt_logprobs.as_ref().unwrap());
        assert_eq!(gp.len(), cp.len(), "{what} case {i}: prompt logprob count");
        let mut worst = 0.0f64;
        for (j, (x, y)) in gp.iter().zip(cp).enumerate().skip(1) {
            let d = (x.unwrap() as f64 - y.unwrap() as f64).abs();
            worst = worst.max(d);
            assert!(d <= tol, "{what} case {i} prompt token {j}: GPU {x:?} vs CPU {y:?}");
        }
        for (j, (x, y)) in g.token_logprobs.iter().zip(&c.token_logprobs).enumerate() {
            let d = (*x as f64 - *y as f64).abs();
            worst = worst.max(d);
            assert!(d <= tol, "{what} case {i} generated {j}: GPU {x} vs CPU {y}");
        }
        eprintln!("{what} case {i}: tokens equal, largest logprob difference {worst:.2e}");
    }
}

fn parity(opts: EngineOptions, dtype: GpuWeightDtype, batched: bool, tol: f64) {
    for name in FIXTURES {
        let dir = fixture(name);
        let reqs: Vec<GenerationRequest> = cases(name).into_iter().map(|(p, n)| greedy(p, n)).collect();
        let mut cpu = Engine::new(Model::load(&dir, None).unwrap(), opts).unwrap();
        let want = run_all(&mut cpu, &reqs, batched);
        let mut gpu = gpu_engine(&dir, opts, dtype);
        let got = run_all(&mut gpu, &reqs, batched);
        compare(&format!("{name} {dtype:?}"), &got, &want, tol);
        assert_eq!(
            gpu.used_blocks(),
            0,
            "{name}: every sequence's device cache is released"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run by scripts/gpu-check.sh"]
fn gpu_bf16_greedy_tokens_and_logprobs_match_the_cpu_engine() {
    parity(EngineOptions::default(), GpuWeightDtype::Bf16, false, BF16_TOL);
}

#[test]
#[ignore = "needs a CUDA GPU; run by scripts/gpu-check.sh"]
fn gpu_batched_small_blocks_chunked_prefill_match_the_cpu_engine() {
    let opts = EngineOptions {
        block_size: 4,
        cache_blocks: 512,
        prefill_chunk: 16,
        logits_chunk: 7,
    };
    parity(opts, GpuWeightDtype::Bf16, true, BF16_TOL);
}

#[test]
#[ignore = "needs a CUDA GPU; run by scripts/gpu-check.sh"]
fn gpu_f32_weights_match_the_cpu_engine_closely() {
    parity(EngineOptions::default(), GpuWeightDtype::F32, false, F32_TOL);
}

/// Greedy decoding through consecutive layer ranges on one GPU, handing hidden states and
/// relayed top-k rows from range to range in process; returns the tokens and, per boundary,
/// whether a relay was sent on the prompt pass.
fn split_greedy(dir: &Path, bounds: &[usize], prompt: &[u32], n_new: usize) -> (Vec<u32>, Vec<bool>) {
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let mut edges = vec![0];
    edges.extend_from_slice(bounds);
    edges.push(cfg.num_hidden_layers);
    let mut stages: Vec<_> = edges
        .windows(2)
        .map(|w| {
            let range = LayerRange::new(w[0], w[1]);
            let m = GpuModel::load_range(dir, cfg.clone(), None, range, ordinal(), GpuWeightDtype::Bf16)
                .unwrap_or_else(|e| panic!("the GPU parity tests need a CUDA device: {e}"));
            let cache = m.new_cache(8, 64).unwrap();
            (m, cache)
        })
        .collect();
    let (mut tokens, mut relayed) = (Vec::new(), Vec::new());
    let (mut start, mut input_ids) = (0, prompt.to_vec());
    for step in 0..n_new {
        let len = input_ids.len();
        let mut input = StageInput::Tokens(input_ids.clone());
        let mut relay: Option<TopkRows> = None;
        let mut next = None;
        for (m, cache) in stages.iter_mut() {
            let seg = Segment {
                seq: 1,
                start,
                len,
                relay: relay.take(),
            };
            let out = m.forward(cache, &[seg], input).unwrap();
            relay = out.relay.into_iter().next().unwrap();
            if step == 0 && !m.is_last() {
                relayed.push(relay.is_some());
            }
            if m.is_last() {
                let logits = m.logits_rows(&out.hidden.slice(..), &[len - 1]).unwrap();
                next = Some(argmax(&logits));
                input = StageInput::Hidden(Vec::new());
            } else {
                input = StageInput::Hidden(m.download(&out.hidden).unwrap());
            }
        }
        let t = next.unwrap();
        tokens.push(t);
        start += len;
        input_ids = vec![t];
    }
    (tokens, relayed)
}

#[test]
#[ignore = "needs a CUDA GPU; run by scripts/gpu-check.sh"]
fn two_stages_on_one_gpu_give_the_same_tokens_as_one() {
    let dir = fixture("dsv32_pattern"); // FSSFSS
    let (prompt, _) = cases("dsv32_pattern").remove(0);
    let (whole, _) = split_greedy(&dir, &[], &prompt, 6);
    // The single-range GPU run equals the GPU engine's greedy tokens.
    let mut e = gpu_engine(&dir, EngineOptions::default(), GpuWeightDtype::Bf16);
    let engine = e.generate(vec![greedy(prompt.clone(), 6)]).unwrap().remove(0);
    assert_eq!(
        engine.token_ids[..],
        whole[..engine.token_ids.len()],
        "one range = the engine"
    );
    let pattern = b"FSSFSS";
    for bounds in [vec![2], vec![3], vec![1, 4], vec![2, 5]] {
        let (split, relayed) = split_greedy(&dir, &bounds, &prompt, 6);
        assert_eq!(split, whole, "split at {bounds:?} must give the single-range tokens");
        for (i, b) in bounds.iter().enumerate() {
            assert_eq!(
                relayed[i],
                pattern[*b] == b'S',
                "relay sent iff stage at {b} starts on Shared"
            );
        }
    }
}
