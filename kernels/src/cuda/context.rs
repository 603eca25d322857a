//! A CUDA device with every kernel module loaded: the handle all launch wrappers hang off.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchArgs, LaunchConfig, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::cache::{CacheOutcome, KernelCache};
use super::device::{self, guarded, CudaDeviceInfo};
use super::error::{CudaError, Result};
use super::nvrtc::Arch;
use super::sources::ALL_SOURCES;

/// Environment variable overriding the compile target (e.g. `compute_90` to load PTX and
/// let the driver JIT it, or `sm_90a`).
pub const ARCH_ENV: &str = "INDEXRELAY_CUDA_ARCH";

/// One device, one stream, all kernels loaded.
pub struct GpuKernels {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: CudaDeviceInfo,
    arch: Arch,
    functions: HashMap<&'static str, CudaFunction>,
    compiled: usize,
}

impl GpuKernels {
    /// Opens device `ordinal` and loads every kernel: from `cache` when present, otherwise
    /// compiled with NVRTC for the device's architecture (or `$INDEXRELAY_CUDA_ARCH`) and
    /// stored in `cache`.
    pub fn new(ordinal: usize, cache: &KernelCache) -> Result<Self> {
        let info = device::probe(ordinal)?;
        let arch = match std::env::var(ARCH_ENV) {
            Ok(a) if !a.is_empty() => a.parse()?,
            _ => info.arch(),
        };
        guarded("loading kernels", || {
            let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::driver(format!("opening cuda:{ordinal}"), e))?;
            let stream = ctx.default_stream();
            let mut functions = HashMap::new();
            let mut compiled = 0;
            for src in ALL_SOURCES {
                let (image, outcome) = cache.load_or_compile(src, &arch)?;
                compiled += (outcome == CacheOutcome::Compiled) as usize;
                let ptx = if arch.is_real() {
                    Ptx::from_binary(image)
                } else {
                    Ptx::from_src(String::from_utf8_lossy(&image).into_owned())
                };
                let module = ctx
                    .load_module(ptx)
                    .map_err(|e| CudaError::driver(format!("loading {} for {arch}", src.name), e))?;
                for &entry in src.entries {
                    let f = module
                        .load_function(entry)
                        .map_err(|e| CudaError::driver(format!("finding kernel {entry} in {}", src.name), e))?;
                    functions.insert(entry, f);
                }
            }
            Ok(GpuKernels {
                ctx,
                stream,
                info,
                arch: arch.clone(),
                functions,
                compiled,
            })
        })
    }

    /// The device's properties.
    pub fn info(&self) -> &CudaDeviceInfo {
        &self.info
    }

    /// The architecture the kernels were built for.
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// How many sources NVRTC compiled at start-up (0 when all came from the cache).
    pub fn compiled_at_startup(&self) -> usize {
        self.compiled
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every wrapper launches on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Copies host data to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| CudaError::driver("copying to the device", e))
    }

    /// Copies a device buffer back to the host (synchronizes the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(dev)
            .map_err(|e| CudaError::driver("copying to the host", e))
    }

    /// A zeroed device buffer of `len` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len)
            .map_err(|e| CudaError::driver("allocating device memory", e))
    }

    /// Waits for all work on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| CudaError::driver("synchronizing", e))
    }

    /// The loaded kernel `name` (an entry of [`super::ALL_SOURCES`]), for callers that launch
    /// it themselves (cuda-bench's ceiling probes).
    pub fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| CudaError::Unsupported(format!("kernel {name} is not loaded")))
    }

    /// A launch builder for kernel `name` on the stream.
    pub(crate) fn builder(&self, name: &'static str) -> Result<LaunchArgs<'_>> {
        Ok(self.stream.launch_builder(self.function(name)?))
    }
}

/// Launches a prepared builder, mapping the error.
pub(crate) fn launch(mut b: LaunchArgs<'_>, name: &str, cfg: LaunchConfig) -> Result<()> {
    // SAFETY: every wrapper validates buffer lengths against the shapes it passes, so the
    // kernel stays inside the buffers.
    unsafe { b.launch(cfg) }
        .map(|_| ())
        .map_err(|e| CudaError::driver(format!("launching {name}"), e))
}

/// A 1-D launch of `blocks` blocks of `threads` threads.
pub(crate) fn grid(blocks: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `v` as a kernel `int`, or an error naming `field`.
pub(crate) fn int(field: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| CudaError::invalid(field, format!("{v} exceeds the kernel limit {}", i32::MAX)))
}

/// Checks that a buffer holds at least `need` elements.
pub(crate) fn need(field: &'static str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(CudaError::invalid(
            field,
            format!("holds {have} elements, the shapes need {need}"),
        ));
    }
    Ok(())
}
