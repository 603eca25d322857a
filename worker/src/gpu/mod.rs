//! The GPU side of the worker.
//!
//! Always compiled: [`device`] (what `--device auto|cpu|cuda:N` and `--gpu-memory-fraction`
//! resolve to, in every build) and [`capacity`] (the device KV cache's block arithmetic, a
//! pure function tested on the CPU).
//!
//! With the `cuda` feature: a device copy of the model for one layer range
//! ([`GpuModel`]), mirroring [`crate::Model::forward_with_patterns`] step by step with the
//! kernels of `kernels::cuda`; its paged KV cache on the device ([`DeviceKvCache`]); and the
//! engine backend ([`GpuBackend`]) that lets [`crate::Engine`] run on it, and the stage
//! server's ([`GpuStage`]), which lets `worker serve` run a layer range on it. Linear weights live on
//! the device as BF16 (cuBLAS BF16×BF16→F32); norms, biases, the MoE router, the indexer's
//! head weights and `kv_b_proj` (the absorbed attention's matrices) stay F32. Logits come back
//! to the host, where the CPU engine's sampler and log-softmax run, so tokens and logprobs
//! share one code path.

pub mod capacity;
pub mod device;

#[cfg(feature = "cuda")]
mod attention;
#[cfg(feature = "cuda")]
mod backend;
#[cfg(feature = "cuda")]
mod cache;
#[cfg(feature = "cuda")]
mod mlp;
#[cfg(feature = "cuda")]
mod model;
#[cfg(feature = "cuda")]
mod stage;
#[cfg(feature = "cuda")]
mod weights;

#[cfg(feature = "cuda")]
pub use backend::{cache_blocks_for, GpuBackend, GpuEngineOptions};
#[cfg(feature = "cuda")]
pub use cache::DeviceKvCache;
pub use capacity::{device_cache_blocks, workspace_reserve_bytes, MemoryFraction};
pub use device::{resolve_device, DeviceArg, ResolvedDevice};
#[cfg(feature = "cuda")]
pub use model::{DeviceStageOutput, GpuModel, GpuWeightDtype};
#[cfg(feature = "cuda")]
pub use stage::GpuStage;
