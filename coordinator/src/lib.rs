//! The IndexRelay coordinator: public gRPC and OpenAI-compatible HTTP APIs, Prometheus
//! metrics, stage planning, continuous batching across the pipeline, and the local launcher
//! that starts a cluster on loopback.
//!
//! It never touches tensors: activations flow worker to worker; the coordinator only sends
//! token ids to stage 0 and receives sampled tokens from the last stage.

pub mod admin;
pub mod app;
pub mod cluster;
pub mod control;
pub mod error;
pub mod grpc_api;
pub mod http;
pub mod launcher;
pub mod membership;
pub mod metrics;
pub mod planner;
pub mod scheduler;
pub mod telemetry;

pub use error::CoordinatorError;
