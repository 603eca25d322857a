//! `--device` and `--gpu-memory-fraction` on the `worker` command line: parsing, validation,
//! `auto` falling back to the CPU where there is no GPU, and `cuda:N` failing cleanly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/golden")
        .join(name)
}

fn worker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_worker")).args(args).output().unwrap()
}

fn generate(extra: &[&str]) -> Output {
    let dir = fixture("dsv32_pattern");
    let mut args = vec![
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "5,6,7,8,9",
        "--max-new-tokens",
        "3",
        "--json",
    ];
    args.extend_from_slice(extra);
    worker(&args)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json_ok(out: &Output) -> Value {
    assert!(out.status.success(), "stderr: {}", stderr(out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Whether this test binary's `worker` could pick a GPU for `auto` (only a `cuda` build on a
/// machine with a driver).
fn gpu_possible() -> bool {
    cfg!(feature = "cuda") && Path::new("/dev/nvidiactl").exists()
}

#[test]
fn cpu_and_auto_run_on_the_cpu_and_give_the_same_tokens() {
    let cpu = json_ok(&generate(&["--device", "cpu"]));
    assert_eq!(cpu["device"], "cpu");
    assert_eq!(cpu["token_ids"].as_array().unwrap().len(), 3);
    let default = json_ok(&generate(&[]));
    if !gpu_possible() {
        // The default is auto, and auto without a usable GPU is the CPU.
        assert_eq!(default["device"], "cpu");
        assert_eq!(default["token_ids"], cpu["token_ids"]);
        assert_eq!(default["token_logprobs"], cpu["token_logprobs"]);
        let auto = json_ok(&generate(&["--device", "auto", "--gpu-memory-fraction", "0.5"]));
        assert_eq!(auto["device"], "cpu");
        assert_eq!(auto["token_ids"], cpu["token_ids"]);
    }
}

#[test]
fn cuda_without_a_gpu_is_a_clean_error_naming_the_flag() {
    if gpu_possible() {
        return;
    }
    for dev in ["cuda:0", "cuda", "cuda:7"] {
        let out = generate(&["--device", dev]);
        let err = stderr(&out);
        assert!(!out.status.success(), "{dev} must fail here");
        assert!(!err.contains("panicked"), "{dev}: no panic: {err}");
        assert!(err.contains("--device cuda:"), "{dev}: names the flag: {err}");
        if cfg!(feature = "cuda") {
            assert!(err.contains("driver"), "{dev}: says the driver is missing: {err}");
        } else {
            assert!(err.contains("without the `cuda` feature"), "{dev}: says why: {err}");
        }
    }
}

#[test]
fn bad_device_and_memory_fraction_values_are_rejected() {
    for dev in ["gpu", "cuda:", "cuda:x", "cuda:-1"] {
        let out = generate(&["--device", dev]);
        let err = stderr(&out);
        assert!(!out.status.success(), "{dev} must be rejected");
        assert!(
            err.contains("--device") && err.contains("auto, cpu, cuda or cuda:N"),
            "{dev}: {err}"
        );
    }
    for f in ["0", "1.5", "-0.2", "abc", "nan"] {
        let out = generate(&["--device", "cpu", "--gpu-memory-fraction", f]);
        let err = stderr(&out);
        assert!(!out.status.success(), "{f} must be rejected");
        assert!(err.contains("--gpu-memory-fraction"), "{f}: {err}");
        assert!(!err.contains("panicked"), "{f}: {err}");
    }
    let out = generate(&["--device", "cpu", "--gpu-memory-fraction", "1"]);
    json_ok(&out);
}

#[test]
fn serve_takes_the_device_flags_and_refuses_cuda_cleanly() {
    if gpu_possible() {
        return;
    }
    let dir = fixture("dsv32_pattern");
    let base = [
        "serve",
        "--model",
        dir.to_str().unwrap(),
        "--layer-start",
        "0",
        "--layer-end",
        "6",
        "--listen",
        "127.0.0.1:0",
    ];
    let mut args = base.to_vec();
    args.extend_from_slice(&["--device", "cuda:0"]);
    let out = worker(&args);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("--device cuda:0") && !err.contains("panicked"), "{err}");
    let mut args = base.to_vec();
    args.extend_from_slice(&["--gpu-memory-fraction", "2"]);
    let out = worker(&args);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--gpu-memory-fraction"), "{}", stderr(&out));
}
