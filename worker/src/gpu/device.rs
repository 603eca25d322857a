//! `--device auto|cpu|cuda:N`: parsing and resolution in every build.
//!
//! With the `cuda` feature, parsing and selection are kernels' [`kernels::cuda::DeviceSpec`]
//! and [`kernels::cuda::select_backend`] (which probe the driver library with
//! `is_culib_present` before cudarc touches it, so a machine without CUDA gets an error, never
//! a panic). Without the feature the same grammar is parsed here, `auto` is the CPU and
//! `cuda:N` is an error saying the binary was built without the `cuda` feature.

use std::fmt;
use std::str::FromStr;

use crate::error::{Result, WorkerError};

/// What `--device` asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    /// CUDA device 0 when the driver is present and the device opens, else the CPU.
    Auto,
    /// The CPU kernels.
    Cpu,
    /// CUDA device N; failing to open it is an error.
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = String;

    /// Accepts `auto`, `cpu`, `cuda` (device 0) and `cuda:N`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        #[cfg(feature = "cuda")]
        {
            use kernels::cuda::DeviceSpec;
            s.parse::<DeviceSpec>()
                .map(|spec| match spec {
                    DeviceSpec::Auto => DeviceArg::Auto,
                    DeviceSpec::Cpu => DeviceArg::Cpu,
                    DeviceSpec::Cuda(n) => DeviceArg::Cuda(n),
                })
                .map_err(|e| e.to_string())
        }
        #[cfg(not(feature = "cuda"))]
        {
            // The grammar of kernels::cuda::DeviceSpec (not compiled in this build).
            match s {
                "auto" => Ok(DeviceArg::Auto),
                "cpu" => Ok(DeviceArg::Cpu),
                "cuda" => Ok(DeviceArg::Cuda(0)),
                _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                    Some(Ok(n)) => Ok(DeviceArg::Cuda(n)),
                    _ => Err(format!(
                        "invalid device: {s:?}: expected auto, cpu, cuda or cuda:N (N a device ordinal)"
                    )),
                },
            }
        }
    }
}

impl fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceArg::Auto => f.write_str("auto"),
            DeviceArg::Cpu => f.write_str("cpu"),
            DeviceArg::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The device a command runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolvedDevice {
    /// The CPU kernels.
    Cpu,
    /// A CUDA device that opened.
    Cuda {
        /// Device ordinal.
        ordinal: usize,
        /// Device name.
        name: String,
        /// Total device memory in bytes.
        total_memory: usize,
    },
}

/// Resolves `--device`: `cpu` and `auto` never fail (`auto` without a usable GPU is the CPU,
/// logged once at info level with the reason); `cuda:N` fails with a message naming the flag
/// when this build has no CUDA backend, the driver is missing, or device N does not exist.
pub fn resolve_device(arg: DeviceArg) -> Result<ResolvedDevice> {
    match arg {
        DeviceArg::Cpu => Ok(ResolvedDevice::Cpu),
        #[cfg(not(feature = "cuda"))]
        DeviceArg::Auto => {
            tracing::info!("--device auto: running on the CPU (this binary was built without the `cuda` feature)");
            Ok(ResolvedDevice::Cpu)
        }
        #[cfg(not(feature = "cuda"))]
        DeviceArg::Cuda(n) => Err(WorkerError::Device(format!(
            "--device cuda:{n}: this binary was built without the `cuda` feature (rebuild with \
             `cargo build -p worker --features cuda`), so only --device cpu or auto can run"
        ))),
        #[cfg(feature = "cuda")]
        DeviceArg::Auto | DeviceArg::Cuda(_) => {
            use kernels::cuda::{select_backend, Backend, DeviceSpec};
            let spec = match arg {
                DeviceArg::Cuda(n) => DeviceSpec::Cuda(n),
                _ => DeviceSpec::Auto,
            };
            match select_backend(spec) {
                Ok(Backend::Cuda(info)) => {
                    tracing::info!(device = %format!("cuda:{}", info.ordinal), name = %info.name, "running on the GPU");
                    Ok(ResolvedDevice::Cuda {
                        ordinal: info.ordinal,
                        name: info.name,
                        total_memory: info.total_memory,
                    })
                }
                Ok(Backend::Cpu { reason }) => {
                    tracing::info!(
                        reason = reason.as_deref().unwrap_or("CPU requested"),
                        "--device auto: running on the CPU"
                    );
                    Ok(ResolvedDevice::Cpu)
                }
                Err(e) => Err(WorkerError::Device(format!("--device {arg}: {e}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_device_grammar() {
        assert_eq!("auto".parse::<DeviceArg>(), Ok(DeviceArg::Auto));
        assert_eq!("cpu".parse::<DeviceArg>(), Ok(DeviceArg::Cpu));
        assert_eq!("cuda".parse::<DeviceArg>(), Ok(DeviceArg::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceArg>(), Ok(DeviceArg::Cuda(3)));
        for bad in ["", "gpu", "cuda:", "cuda:-1", "cuda:x", "CUDA:0", "cuda:0 "] {
            let err = bad.parse::<DeviceArg>().unwrap_err();
            assert!(err.contains("auto, cpu, cuda or cuda:N"), "{bad:?}: {err}");
        }
        for d in [DeviceArg::Auto, DeviceArg::Cpu, DeviceArg::Cuda(2)] {
            assert_eq!(d.to_string().parse::<DeviceArg>(), Ok(d));
        }
    }

    #[test]
    fn cpu_always_resolves_to_the_cpu() {
        assert_eq!(resolve_device(DeviceArg::Cpu).unwrap(), ResolvedDevice::Cpu);
    }

    /// Without the `cuda` feature, `auto` is the CPU and `cuda:N` names the missing feature.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_cuda_feature_auto_is_cpu_and_cuda_is_an_error() {
        assert_eq!(resolve_device(DeviceArg::Auto).unwrap(), ResolvedDevice::Cpu);
        let err = resolve_device(DeviceArg::Cuda(0)).unwrap_err().to_string();
        assert!(
            err.contains("--device cuda:0") && err.contains("`cuda` feature"),
            "{err}"
        );
    }

    /// With the feature: without a driver (this machine class) `auto` is the CPU and `cuda:N`
    /// a clean error; with one (the GPU host) `auto` picks device 0 and a device past the
    /// last is a clean error.
    #[cfg(feature = "cuda")]
    #[test]
    fn auto_and_cuda_resolve_without_panicking() {
        let auto = resolve_device(DeviceArg::Auto).unwrap();
        if kernels::cuda::driver_present() {
            let n = kernels::cuda::device_count().unwrap();
            assert_eq!(matches!(auto, ResolvedDevice::Cuda { ordinal: 0, .. }), n > 0);
            let err = resolve_device(DeviceArg::Cuda(n)).unwrap_err().to_string();
            assert!(
                err.contains(&format!("--device cuda:{n}")) && err.contains("does not exist"),
                "{err}"
            );
        } else {
            assert_eq!(auto, ResolvedDevice::Cpu);
            let err = resolve_device(DeviceArg::Cuda(0)).unwrap_err().to_string();
            assert!(err.contains("--device cuda:0") && err.contains("driver"), "{err}");
        }
    }
}
