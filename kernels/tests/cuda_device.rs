//! Backend selection and argument parsing of the CUDA backend. These run everywhere: on a
//! machine without the CUDA driver they check that nothing panics and `auto` falls back to
//! the CPU with a reason.

use kernels::cuda::{self, Arch, Backend, CudaError, DeviceSpec, KernelCache, ALL_SOURCES};

#[test]
fn device_specs_parse_and_reject_garbage() {
    assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
    assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
    assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
    assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
    for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
        let err = bad.parse::<DeviceSpec>().unwrap_err();
        assert!(
            matches!(err, CudaError::Invalid { field: "device", .. }),
            "{bad:?}: {err}"
        );
    }
    assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
}

#[test]
fn cpu_is_always_available_and_auto_never_fails() {
    assert_eq!(
        cuda::select_backend(DeviceSpec::Cpu).unwrap(),
        Backend::Cpu { reason: None }
    );
    match cuda::select_backend(DeviceSpec::Auto).unwrap() {
        Backend::Cpu { reason } => {
            let reason = reason.expect("auto must say why it did not pick CUDA");
            assert!(reason.contains("CUDA"), "{reason}");
        }
        Backend::Cuda(info) => assert!(cuda::driver_present() && !info.name.is_empty()),
    }
}

#[test]
fn missing_driver_is_an_error_not_a_panic() {
    if cuda::driver_present() {
        // A GPU host: a device ordinal that cannot exist is still an error, not a panic.
        let err = cuda::select_backend(DeviceSpec::Cuda(4096)).unwrap_err();
        assert!(matches!(err, CudaError::Invalid { field: "device", .. }), "{err}");
        return;
    }
    let err = cuda::select_backend(DeviceSpec::Cuda(0)).unwrap_err();
    assert!(matches!(err, CudaError::LibraryMissing { .. }), "{err}");
    assert!(cuda::device_count().is_err());
    assert!(cuda::GpuKernels::new(0, &KernelCache::new(std::env::temp_dir())).is_err());
}

#[test]
fn arch_strings_parse() {
    let a: Arch = "sm_90".parse().unwrap();
    assert!(a.is_real());
    assert_eq!(a.to_string(), "sm_90");
    assert_eq!(a.number(), 90);
    let a: Arch = "compute_80".parse().unwrap();
    assert!(!a.is_real());
    assert_eq!("sm_90a".parse::<Arch>().unwrap().to_string(), "sm_90a");
    assert_eq!(Arch::from_compute_capability(12, 0).to_string(), "sm_120");
    for bad in ["90", "sm_", "sm_9x", "sm_60", "compute_90ab"] {
        assert!(bad.parse::<Arch>().is_err(), "{bad}");
    }
}

#[test]
fn cache_keys_depend_on_source_options_and_arch() {
    let sm80: Arch = "sm_80".parse().unwrap();
    let sm90: Arch = "sm_90".parse().unwrap();
    let opts = cuda::options_for(&sm90);
    let (a, b) = (&ALL_SOURCES[0], &ALL_SOURCES[1]);
    let key = cuda::cache_key(a, &opts, &sm90);
    assert_eq!(key.len(), 32);
    assert_eq!(key, cuda::cache_key(a, &opts, &sm90), "keys are deterministic");
    assert_ne!(key, cuda::cache_key(b, &opts, &sm90));
    assert_ne!(key, cuda::cache_key(a, &opts, &sm80));
    let mut more = opts.clone();
    more.push("--use_fast_math".into());
    assert_ne!(key, cuda::cache_key(a, &more, &sm90));
}

#[test]
fn every_source_names_its_entry_points() {
    let mut names = std::collections::HashSet::new();
    for src in ALL_SOURCES {
        assert!(!src.entries.is_empty(), "{}", src.name);
        for e in src.entries {
            assert!(src.code.contains(&format!("{e}(")), "{} does not define {e}", src.name);
            assert!(names.insert(*e), "entry {e} defined twice");
        }
    }
}
