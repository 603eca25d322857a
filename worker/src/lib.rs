//! IndexRelay worker: loads a DSA checkpoint (or one layer range of it), keeps the paged KV
//! cache, and runs the forward pass with DeepSeek Sparse Attention and IndexCache.
//!
//! The crate knows nothing about networking or the coordinator: the stage server (later)
//! wraps [`model::Model::forward`], which takes tokens or hidden states plus relayed top-k
//! indices and returns hidden states plus the indices a downstream Shared layer needs.

pub mod checkpoint;
pub mod config;
pub mod embedded;
pub mod engine;
pub mod error;
pub mod gpu;
pub mod huge_pages;
pub mod kv_cache;
pub mod membership;
pub mod model;
pub mod pattern;
pub mod relay;
pub mod rope;
pub mod sampling;
pub mod serve_cli;
pub mod shutdown;
pub mod stage;
pub mod telemetry;
pub mod tokenizer;

pub use config::{Architecture, ModelConfig};
pub use engine::{CpuBackend, Engine, EngineOptions, FinishReason, GenerationOutput, GenerationRequest, StepBackend};
pub use error::{Result, WorkerError};
pub use model::{LayerRange, Model, Segment, StageInput, StageOutput};
pub use pattern::{IndexPattern, LayerKind};
pub use sampling::SamplingParams;
