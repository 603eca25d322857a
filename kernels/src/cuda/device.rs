//! Backend selection for `--device auto|cpu|cuda:N`.
//!
//! cudarc panics when a CUDA library is missing, so the driver library is probed with
//! `is_culib_present` before any driver call, and the driver calls themselves run under
//! `catch_unwind` (an old driver lacking a symbol panics too). Every failure is a
//! [`CudaError`]; `auto` turns it into a CPU choice with the reason.

use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::str::FromStr;

use cudarc::driver::{sys, CudaContext};

use super::error::{CudaError, Result};
use super::nvrtc::Arch;

/// What the operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA device 0 when the driver is present and the device opens, else the CPU.
    Auto,
    /// The CPU kernels.
    Cpu,
    /// CUDA device N; failing to open it is an error.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = CudaError;

    /// Accepts `auto`, `cpu`, `cuda` (device 0) and `cuda:N`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(CudaError::invalid(
                    "device",
                    format!("{s:?}: expected auto, cpu, cuda or cuda:N (N a device ordinal)"),
                )),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Facts about an opened CUDA device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaDeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name (e.g. "NVIDIA H100 80GB HBM3").
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Total device memory in bytes.
    pub total_memory: usize,
    /// Streaming multiprocessors.
    pub sm_count: usize,
}

impl CudaDeviceInfo {
    /// The real architecture to compile for.
    pub fn arch(&self) -> Arch {
        Arch::from_compute_capability(self.compute_capability.0, self.compute_capability.1)
    }
}

/// The backend chosen for a [`DeviceSpec`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Run the CPU kernels. `reason` says why `auto` did not pick CUDA (None when the CPU
    /// was asked for); the caller logs it once.
    Cpu {
        /// Why CUDA was not used.
        reason: Option<String>,
    },
    /// Run the CUDA kernels on this device.
    Cuda(CudaDeviceInfo),
}

/// Whether the CUDA driver library (libcuda) can be loaded. Never panics.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the candidate library names.
    unsafe { sys::is_culib_present() }
}

/// Runs `f` (cudarc driver calls), turning a panic inside cudarc into an error.
pub(crate) fn guarded<T>(context: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic without message".into());
        Err(CudaError::driver(context, format!("cudarc panicked: {msg}")))
    })
}

fn require_driver() -> Result<()> {
    if driver_present() {
        Ok(())
    } else {
        Err(CudaError::LibraryMissing {
            library: "the CUDA driver library (libcuda.so)",
            hint: "no NVIDIA driver is installed or it is not on the loader path".into(),
        })
    }
}

/// Number of CUDA devices (an error when the driver is missing or fails to initialize).
pub fn device_count() -> Result<usize> {
    require_driver()?;
    guarded("counting devices", || {
        CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .map_err(|e| CudaError::driver("counting devices", e))
    })
}

/// Opens device `ordinal` and reads its properties.
pub fn probe(ordinal: usize) -> Result<CudaDeviceInfo> {
    let count = device_count()?;
    if ordinal >= count {
        return Err(CudaError::invalid(
            "device",
            format!("cuda:{ordinal} does not exist: the driver reports {count} device(s)"),
        ));
    }
    guarded("opening the device", || {
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::driver(format!("opening cuda:{ordinal}"), e))?;
        info_of(&ctx)
    })
}

/// Properties of an open context's device.
pub(crate) fn info_of(ctx: &CudaContext) -> Result<CudaDeviceInfo> {
    let err = |what: &'static str| move |e| CudaError::driver(what, e);
    let sm = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(err("reading the SM count"))?;
    Ok(CudaDeviceInfo {
        ordinal: ctx.ordinal(),
        name: ctx.name().map_err(err("reading the device name"))?,
        compute_capability: ctx
            .compute_capability()
            .map_err(err("reading the compute capability"))?,
        total_memory: ctx.total_mem().map_err(err("reading the memory size"))?,
        sm_count: sm.max(1) as usize,
    })
}

/// Chooses the backend for `spec`. `cpu` and `auto` never fail (auto falls back to the CPU
/// with the reason); `cuda:N` fails with a structured error when the device cannot be used.
pub fn select_backend(spec: DeviceSpec) -> Result<Backend> {
    match spec {
        DeviceSpec::Cpu => Ok(Backend::Cpu { reason: None }),
        DeviceSpec::Cuda(n) => probe(n).map(Backend::Cuda),
        DeviceSpec::Auto => Ok(match probe(0) {
            Ok(info) => Backend::Cuda(info),
            Err(e) => Backend::Cpu {
                reason: Some(format!("CUDA not used: {e}")),
            },
        }),
    }
}
