//! The `worker generate` command line exactly as reviewers call it.

use std::process::{Command, Output};

use serde_json::Value;

mod support;
use support::fixture;

fn worker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_worker")).args(args).output().unwrap()
}

fn json_ok(out: Output) -> Value {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn joined(v: &Value) -> String {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn generate_json_matches_the_golden_fixture() {
    // Both attention forms (absorbed, as for decode; expanded, as for prefill chunks) must
    // reproduce HF, whichever the cost model would pick for these short prompts.
    for form in ["absorbed", "expanded"] {
        for name in ["dsv32_pattern", "glm_pattern"] {
            let dir = fixture(name);
            let exp: Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
            for case in exp["cases"].as_array().unwrap() {
                let ids = joined(&case["prompt_ids"]);
                let out = Command::new(env!("CARGO_BIN_EXE_worker"))
                    .env("INDEXRELAY_MLA_FORM", form)
                    .args([
                        "generate",
                        "--model",
                        dir.to_str().unwrap(),
                        "--prompt-ids",
                        &ids,
                        "--max-new-tokens",
                        "8",
                        "--temperature",
                        "0",
                        "--prompt-logprobs",
                        "--json",
                    ])
                    .output()
                    .unwrap();
                let out = json_ok(out);
                let want_ids = &case["greedy_token_ids"];
                let n = want_ids.as_array().unwrap().len().min(8);
                assert_eq!(
                    out["token_ids"].as_array().unwrap()[..n],
                    want_ids.as_array().unwrap()[..n],
                    "{form} {name}"
                );
                let lp = out["prompt_logprobs"].as_array().unwrap();
                let want = case["prompt_logprobs"].as_array().unwrap();
                assert_eq!(lp.len(), want.len());
                assert!(lp[0].is_null());
                for (g, w) in lp.iter().zip(want).skip(1) {
                    let d = (g.as_f64().unwrap() - w.as_f64().unwrap()).abs();
                    assert!(d < 1e-4, "{form} {name}: prompt logprob off by {d}");
                }
            }
        }
    }
}

#[test]
fn index_pattern_flag_changes_the_model() {
    let dir = fixture("glm_dense");
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let case = &exp["override_cases"][0];
    let out = json_ok(worker(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        &joined(&case["prompt_ids"]),
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
        "--index-pattern",
        "FSFSSF",
        "--json",
    ]));
    assert_eq!(out["token_ids"], case["greedy_token_ids"]);
    assert_eq!(out["index_pattern"], "FSFSSF");
}

#[test]
fn seeded_sampling_is_reproducible() {
    let dir = fixture("glm_pattern");
    let args = [
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "5,6,7,8",
        "--max-new-tokens",
        "12",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
        "--seed",
        "42",
        "--json",
    ];
    let a = json_ok(worker(&args));
    let b = json_ok(worker(&args));
    assert_eq!(a["token_ids"], b["token_ids"]);
    assert_eq!(a["token_ids"].as_array().unwrap().len(), 12);
}

#[test]
fn embedded_default_model_takes_text_prompts() {
    for arch in ["deepseek_v32", "glm_moe_dsa"] {
        let out = json_ok(worker(&[
            "generate",
            "--arch",
            arch,
            "--prompt",
            "Hello, IndexRelay!",
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        ]));
        let prompt = out["prompt_token_ids"].as_array().unwrap();
        // BOS + one byte-level token per byte.
        assert_eq!(prompt.len(), 1 + "Hello, IndexRelay!".len());
        assert_eq!(prompt[0], 256);
        assert_eq!(out["token_ids"].as_array().unwrap().len(), 5);
        assert!(out["text"].is_string());
    }
}

#[test]
fn bad_arguments_fail_with_a_clear_message() {
    let dir = fixture("glm_pattern");
    let d = dir.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["generate", "--model", d, "--prompt", "hi", "--json"],
            "tokenizer.json",
        ),
        (
            &["generate", "--model", d, "--prompt-ids", "1,999", "--json"],
            "vocab_size = 320",
        ),
        (
            &[
                "generate",
                "--model",
                d,
                "--prompt-ids",
                "1,2",
                "--index-pattern",
                "SF",
                "--json",
            ],
            "index pattern",
        ),
        (
            &["generate", "--model", d, "--prompt-ids", "1,2", "--temperature", "-1"],
            "temperature",
        ),
        (
            &["generate", "--model", "/nonexistent/model", "--prompt-ids", "1"],
            "config.json",
        ),
    ];
    for (args, needle) in cases {
        let out = worker(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
