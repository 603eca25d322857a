//! Fidelity against HF transformers: golden fixtures in `tests/fixtures/golden` (made by
//! `tests/fixtures/make_golden.py`) must give identical greedy tokens and prompt logprobs
//! within 1e-4, alone, batched, with chunked prefill, and split into layer ranges.
//! `INDEXRELAY_FIXTURES=DIR` runs the same checks on fixtures made elsewhere (the script
//! with other seeds writes the same six names).

use std::path::Path;

use serde_json::Value;
use worker::model::TopkRows;
use worker::pattern::IndexPattern;
use worker::{
    Engine, EngineOptions, GenerationRequest, LayerRange, Model, ModelConfig, SamplingParams, Segment, StageInput,
};

mod support;
use support::fixture;

const LOGPROB_TOL: f64 = 1e-4;

fn expected(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
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

fn engine(name: &str, pattern: Option<&str>, opts: EngineOptions) -> Engine {
    Engine::new(Model::load(&fixture(name), pattern).unwrap(), opts).unwrap()
}

fn check_cases(name: &str, cases: &Value, pattern: Option<&str>, opts: EngineOptions, batched: bool) {
    check_cases_with(name, cases, pattern, opts, batched, true)
}

/// [`check_cases`], with or without prompt logprobs: without them, the final layer runs
/// for the sampled rows only (`Model::forward_for_rows`), so the tokens and generated
/// logprobs check that path.
fn check_cases_with(
    name: &str,
    cases: &Value,
    pattern: Option<&str>,
    opts: EngineOptions,
    batched: bool,
    prompt_logprobs: bool,
) {
    let cases = cases.as_array().unwrap();
    let reqs: Vec<GenerationRequest> = cases
        .iter()
        .map(|c| GenerationRequest {
            prompt_logprobs,
            ..greedy(ids(&c["prompt_ids"]), c["max_new_tokens"].as_u64().unwrap() as usize)
        })
        .collect();
    let mut e = engine(name, pattern, opts);
    let outs = if batched {
        e.generate(reqs).unwrap()
    } else {
        reqs.into_iter()
            .map(|r| e.generate(vec![r]).unwrap().remove(0))
            .collect()
    };
    for (i, (c, o)) in cases.iter().zip(outs).enumerate() {
        assert_eq!(
            o.token_ids,
            ids(&c["greedy_token_ids"]),
            "{name} case {i}: greedy tokens"
        );
        if prompt_logprobs {
            let want = c["prompt_logprobs"].as_array().unwrap();
            let got = o.prompt_logprobs.unwrap();
            assert_eq!(got.len(), want.len(), "{name} case {i}: one prompt logprob per token");
            assert!(got[0].is_none() && want[0].is_null());
            for (j, (g, w)) in got.iter().zip(want).enumerate().skip(1) {
                let (g, w) = (g.unwrap() as f64, w.as_f64().unwrap());
                assert!((g - w).abs() <= LOGPROB_TOL, "{name} case {i} token {j}: {g} vs HF {w}");
            }
        } else {
            assert!(
                o.prompt_logprobs.is_none(),
                "{name} case {i}: no prompt logprobs asked for"
            );
        }
        for (j, (g, w)) in o
            .token_logprobs
            .iter()
            .zip(c["generated_logprobs"].as_array().unwrap())
            .enumerate()
        {
            let w = w.as_f64().unwrap();
            assert!(
                (*g as f64 - w).abs() <= LOGPROB_TOL,
                "{name} case {i} generated {j}: {g} vs HF {w}"
            );
        }
    }
    // Every sequence's cache is released once generation ends.
    assert_eq!(e.cache().used_blocks(), 0);
}

const FIXTURES: [&str; 5] = [
    "dsv32_dense",
    "dsv32_pattern",
    "glm_dense",
    "glm_pattern",
    "dsv32_fp8_twin",
];

#[test]
fn greedy_tokens_and_prompt_logprobs_match_hf() {
    for name in FIXTURES {
        let exp = expected(name);
        let model = Model::load(&fixture(name), None).unwrap();
        assert_eq!(
            model.pattern().to_string(),
            exp["pattern"].as_str().unwrap(),
            "{name}: pattern source"
        );
        check_cases(name, &exp["cases"], None, EngineOptions::default(), false);
    }
}

#[test]
fn batched_mixed_lengths_and_small_blocks_match_hf() {
    // Three prompts of different lengths in one batch, 4-position blocks and 16-token prefill
    // chunks: paging and chunking must not change a single token.
    for name in FIXTURES {
        check_cases(name, &expected(name)["cases"], None, small_blocks_and_chunks(), true);
    }
}

/// 4-position cache blocks, 16-token prefill chunks, 7 logits rows at a time.
fn small_blocks_and_chunks() -> EngineOptions {
    EngineOptions {
        block_size: 4,
        cache_blocks: 512,
        prefill_chunk: 16,
        logits_chunk: 7,
    }
}

#[test]
fn greedy_tokens_without_prompt_logprobs_match_hf() {
    // Alone with whole-prompt chunks, and batched with 16-token chunks (whose non-final
    // chunks want no logits at all, so their final layer only writes the cache).
    for name in FIXTURES {
        let cases = &expected(name)["cases"];
        check_cases_with(name, cases, None, EngineOptions::default(), false, false);
        check_cases_with(name, cases, None, small_blocks_and_chunks(), true, false);
    }
}

#[test]
fn pattern_override_matches_hf() {
    let exp = expected("glm_dense");
    let pattern = exp["override_pattern"].as_str().unwrap();
    check_cases(
        "glm_dense",
        &exp["override_cases"],
        Some(pattern),
        EngineOptions::default(),
        false,
    );
}

#[test]
fn fp8_block_checkpoint_matches_its_dequantized_twin() {
    let exp = expected("dsv32_fp8_twin");
    check_cases("dsv32_fp8", &exp["cases"], None, EngineOptions::default(), false);
    // Same tokens and near-identical logprobs as the f32 twin (dequantization is exact).
    let cases = exp["cases"].as_array().unwrap();
    let prompt = ids(&cases[0]["prompt_ids"]);
    let a = engine("dsv32_fp8", None, EngineOptions::default())
        .generate(vec![greedy(prompt.clone(), 4)])
        .unwrap();
    let b = engine("dsv32_fp8_twin", None, EngineOptions::default())
        .generate(vec![greedy(prompt, 4)])
        .unwrap();
    assert_eq!(a[0].token_ids, b[0].token_ids);
    for (x, y) in a[0]
        .prompt_logprobs
        .as_ref()
        .unwrap()
        .iter()
        .zip(b[0].prompt_logprobs.as_ref().unwrap())
        .skip(1)
    {
        assert!((x.unwrap() - y.unwrap()).abs() < 1e-5);
    }
}

/// Runs a prompt through consecutive layer ranges, relaying hidden states and top-k rows the
/// way the pipeline will, and returns the last-row logits.
fn run_split(dir: &Path, bounds: &[usize], prompt: &[u32]) -> (Vec<f32>, Vec<bool>) {
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let n = cfg.num_hidden_layers;
    let mut edges = vec![0];
    edges.extend_from_slice(bounds);
    edges.push(n);
    let mut input = StageInput::Tokens(prompt.to_vec());
    let mut relay: Option<TopkRows> = None;
    let mut relayed = Vec::new();
    let mut last = None;
    for w in edges.windows(2) {
        let model = Model::load_range(dir, cfg.clone(), None, LayerRange::new(w[0], w[1])).unwrap();
        let mut cache = model.new_cache(8, 64);
        let seg = Segment {
            seq: 1,
            start: 0,
            len: prompt.len(),
            relay: relay.take(),
        };
        let out = model.forward(&mut cache, &[seg], input).unwrap();
        relay = out.relay.into_iter().next().unwrap();
        relayed.push(relay.is_some());
        input = StageInput::Hidden(out.hidden.clone());
        if model.is_last() {
            let d = cfg.hidden_size;
            let h = &out.hidden[(prompt.len() - 1) * d..];
            last = Some(model.logits(h, 1).unwrap());
        }
    }
    (last.unwrap(), relayed)
}

#[test]
fn layer_ranges_with_relayed_indices_equal_the_whole_model() {
    let dir = fixture("dsv32_pattern"); // FSSFSS
    let prompt = ids(&expected("dsv32_pattern")["cases"][0]["prompt_ids"]);
    let (whole, _) = run_split(&dir, &[], &prompt);
    // Boundaries at 2 and 5 start stages on Shared layers (relay needed); 3 starts on Full.
    for bounds in [vec![2], vec![3], vec![1, 4], vec![2, 5], vec![1, 2, 5]] {
        let (split, relayed) = run_split(&dir, &bounds, &prompt);
        assert_eq!(split, whole, "split at {bounds:?} must equal the single-process result");
        let pattern = "FSSFSS".as_bytes();
        for (i, b) in bounds.iter().enumerate() {
            assert_eq!(
                relayed[i],
                pattern[*b] == b'S',
                "relay sent iff stage at {b} starts on Shared"
            );
        }
    }
}

#[test]
fn shared_stage_without_relay_is_an_error() {
    let dir = fixture("dsv32_pattern");
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let model = Model::load_range(&dir, cfg.clone(), None, LayerRange::new(1, 3)).unwrap();
    let mut cache = model.new_cache(8, 64);
    let seg = Segment {
        seq: 1,
        start: 0,
        len: 4,
        relay: None,
    };
    let err = model
        .forward(&mut cache, &[seg], StageInput::Hidden(vec![0.0; 4 * cfg.hidden_size]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("relay") && err.contains("Shared"), "{err}");
}

#[test]
fn shared_layers_hold_no_indexer_weights_or_key_cache() {
    let dir = fixture("dsv32_pattern"); // FSSFSS, shared layers' indexer tensors absent on disk
    let model = Model::load(&dir, None).unwrap();
    let bytes = model.indexer_weight_bytes();
    let pattern = model.pattern().clone();
    for (i, b) in bytes.iter().enumerate() {
        if pattern.is_full(i) {
            assert!(*b > 0, "Full layer {i} must hold its indexer");
        } else {
            assert_eq!(*b, 0, "Shared layer {i} must hold no indexer weights");
        }
    }
    let mut cache = model.new_cache(8, 64);
    let prompt = ids(&expected("dsv32_pattern")["cases"][0]["prompt_ids"]);
    let seg = Segment {
        seq: 7,
        start: 0,
        len: prompt.len(),
        relay: None,
    };
    model.forward(&mut cache, &[seg], StageInput::Tokens(prompt)).unwrap();
    for i in 0..pattern.len() {
        let kb = cache.index_key_bytes(i);
        assert_eq!(
            kb > 0,
            pattern.is_full(i),
            "layer {i}: indexer key cache only on Full layers"
        );
    }
    // An all-Full checkpoint overridden to the same pattern also drops the Shared indexers.
    let model = Model::load(&fixture("glm_dense"), Some("FSSFSS")).unwrap();
    assert_eq!(model.indexer_weight_bytes().iter().filter(|b| **b == 0).count(), 4);
}

#[test]
fn forward_for_rows_equals_the_full_pass_on_the_kept_rows_and_fills_the_whole_cache() {
    // Two sequences whose patterns disagree on the final layer (Full for one, Shared for the
    // other), so the final layer's cache fill and its cut-down batch both take the mixed path.
    let dir = fixture("dsv32_dense");
    let model = Model::load(&dir, None).unwrap();
    let cfg = model.config().clone();
    let (n, d) = (cfg.num_hidden_layers, cfg.hidden_size);
    let all_full = IndexPattern::all_full(n);
    let last_shared = IndexPattern::parse(&format!("{}S", "F".repeat(n - 1)), n).unwrap();
    let patterns = [&all_full, &last_shared];
    let (a, b) = (19, 23);
    let tokens: Vec<u32> = (0..(a + b) as u32)
        .map(|t| (t * 37 + 11) % cfg.vocab_size as u32)
        .collect();
    let segments = |start_a: usize, len_a: usize, start_b: usize, len_b: usize| {
        [(1, start_a, len_a), (2, start_b, len_b)].map(|(seq, start, len)| Segment {
            seq,
            start,
            len,
            relay: None,
        })
    };
    let mut full_cache = model.new_cache(4, 64);
    let mut kept_cache = model.new_cache(4, 64);
    let full = model
        .forward_with_patterns(
            &mut full_cache,
            &segments(0, a, 0, b),
            &patterns,
            StageInput::Tokens(tokens.clone()),
        )
        .unwrap();
    // Unordered, with a repeat: the last rows of both sequences and two inner rows.
    let rows = [a + b - 1, a - 1, 5, a - 1, a + 3];
    let (kept, at) = model
        .forward_for_rows(
            &mut kept_cache,
            &segments(0, a, 0, b),
            &patterns,
            StageInput::Tokens(tokens),
            &rows,
        )
        .unwrap();
    assert_eq!(kept.hidden.len(), 4 * d, "one hidden row per distinct kept row");
    assert_eq!(
        (kept.full_layers_run, kept.shared_layers_run),
        (full.full_layers_run, full.shared_layers_run)
    );
    for (&r, &i) in rows.iter().zip(&at) {
        let (got, want) = (&kept.hidden[i * d..][..d], &full.hidden[r * d..][..d]);
        let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "row {r}: max diff {worst}");
    }
    // The next token of each sequence reads every earlier row's final-layer cache entries.
    let next = vec![3, 5];
    let step = |cache: &mut worker::kv_cache::KvCache| {
        model
            .forward_with_patterns(
                cache,
                &segments(a, 1, b, 1),
                &patterns,
                StageInput::Tokens(next.clone()),
            )
            .unwrap()
            .hidden
    };
    let (x, y) = (step(&mut full_cache), step(&mut kept_cache));
    let worst = x.iter().zip(&y).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "decode after a kept-rows prefill: max diff {worst}");
}
