//! The CUDA backend (feature `cuda`): CUDA C kernels embedded in the binary, compiled with
//! NVRTC for the device's architecture at start-up (compiled images cached on disk), and
//! launched through cudarc, which loads the driver, NVRTC and cuBLAS at run time, so nothing
//! CUDA is needed to build.
//!
//! - [`select_backend`] implements `--device auto|cpu|cuda:N` without ever panicking when
//!   CUDA is absent.
//! - [`GpuKernels`] is one device with every kernel loaded; its methods mirror the CPU
//!   kernels' semantics (same tie-breaking, same rounding where the CPU is exact), so GPU
//!   outputs can be compared with CPU ones (`tests/cuda_parity.rs`).
//! - [`NcclPeer`] links two neighbouring pipeline stages' GPUs (NCCL send/recv).
//! - [`compile`] and [`KernelCache`] build kernels without a device (CI checks every source
//!   with NVRTC; `scripts/gpu-check.sh` ships a pre-filled cache to the GPU host).

mod blas;
mod cache;
mod context;
mod device;
mod error;
mod nccl;
mod nvrtc;
mod ops;
mod ops_dsa;
mod ops_rows;
mod sources;

pub use blas::{Gemm, GemmShape, StridedGemm, WeightLayout};
pub use cache::{cache_key, CacheOutcome, KernelCache, CACHE_DIR_ENV};
pub use context::{GpuKernels, ARCH_ENV};
pub use device::{device_count, driver_present, probe, select_backend, Backend, CudaDeviceInfo, DeviceSpec};
pub use error::{CudaError, Result};
pub use nccl::{nccl_present, nccl_unique_id, NcclPeer, NCCL_UNIQUE_ID_BYTES};
pub use nvrtc::{compile, ensure_nvrtc, nvrtc_version, options_for, ptx_entries, Arch, NVRTC_LIB_ENV};
pub use ops::{MoeRouting, RopeLayout, SAMPLE_MAX_CANDIDATES};
pub use ops_dsa::{GpuIndexerInputs, GpuMlaInputs, PagedView, TopkOrder};
pub use sources::{KernelSource, ALL_SOURCES, PRELUDE};

/// cudarc's device buffer types, re-exported so callers need no direct cudarc dependency.
pub use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
