//! Every CUDA kernel source compiles with NVRTC, without a GPU (CI runs this with the NVRTC
//! library from PyPI's `nvidia-cuda-nvrtc-cu12` wheel; see `.ci/run`).
//!
//! NVRTC missing is a failure here, not a skip: `cargo test -p kernels --all-features nvrtc`
//! is the check that the kernels compile.

use kernels::cuda::{self, Arch, CacheOutcome, KernelCache, ALL_SOURCES};

/// Architectures every kernel must build for: A100 (sm_80), H100/H200 (sm_90), and PTX for
/// compute_80 (what the driver JITs on anything newer).
const ARCHES: &[&str] = &["sm_80", "sm_90", "compute_80"];

fn nvrtc_or_fail() {
    if let Err(e) = cuda::ensure_nvrtc() {
        panic!(
            "{e}\nInstall it with: python3 -m venv .venv-nvrtc && .venv-nvrtc/bin/pip install nvidia-cuda-nvrtc-cu12, \
             then run with LD_LIBRARY_PATH=$(echo .venv-nvrtc/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib)"
        );
    }
}

#[test]
fn nvrtc_compiles_every_kernel_source_for_sm80_sm90_and_ptx() {
    nvrtc_or_fail();
    let version = cuda::nvrtc_version().expect("NVRTC version");
    eprintln!("NVRTC {}.{}", version.0, version.1);
    let mut failures = Vec::new();
    for arch in ARCHES {
        let arch: Arch = arch.parse().unwrap();
        for src in ALL_SOURCES {
            match cuda::compile(src, &arch) {
                Ok(image) => {
                    assert!(!image.is_empty(), "{} for {arch}: empty image", src.name);
                    if arch.is_real() {
                        // An ELF CUBIN.
                        assert_eq!(&image[..4], b"\x7fELF", "{} for {arch}: not a CUBIN", src.name);
                    } else {
                        // PTX must define exactly the entry points the Rust side loads.
                        let mut found = cuda::ptx_entries(std::str::from_utf8(&image).unwrap());
                        found.sort();
                        let mut want: Vec<String> = src.entries.iter().map(|s| s.to_string()).collect();
                        want.sort();
                        assert_eq!(found, want, "{} for {arch}: entry points", src.name);
                    }
                }
                Err(e) => failures.push(format!("{e}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "kernels failed to compile:\n{}",
        failures.join("\n\n")
    );
}

#[test]
fn nvrtc_reports_a_compile_error_with_the_log() {
    nvrtc_or_fail();
    let bad = cuda::KernelSource {
        name: "broken.cu",
        code: "extern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }",
        entries: &["broken"],
    };
    let err = cuda::compile(&bad, &"sm_90".parse().unwrap()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("broken.cu") && msg.contains("sm_90"), "{msg}");
    assert!(msg.contains("undefined_name"), "the NVRTC log is missing: {msg}");
}

#[test]
fn nvrtc_cache_compiles_once_then_hits() {
    nvrtc_or_fail();
    let dir = std::env::temp_dir().join(format!("indexrelay-nvrtc-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cache = KernelCache::new(&dir);
    let src = &ALL_SOURCES[0];
    let sm90: Arch = "sm_90".parse().unwrap();
    let (first, outcome) = cache.load_or_compile(src, &sm90).unwrap();
    assert_eq!(outcome, CacheOutcome::Compiled);
    let (second, outcome) = cache.load_or_compile(src, &sm90).unwrap();
    assert_eq!(outcome, CacheOutcome::Hit);
    assert_eq!(first, second);
    // Another architecture is another entry.
    let sm80: Arch = "sm_80".parse().unwrap();
    assert_ne!(cache.path_for(src, &sm80), cache.path_for(src, &sm90));
    assert_eq!(cache.load_or_compile(src, &sm80).unwrap().1, CacheOutcome::Compiled);
    // Exactly the two images, no temporary files left behind.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names.iter().all(|n| n.ends_with(".cubin") && !n.starts_with(".tmp")),
        "{names:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
