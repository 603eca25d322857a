//! A pipeline stage: one worker's layer range behind the `Stage` gRPC service.
//!
//! `Forward` only enqueues: a dedicated compute thread runs micro-batches in arrival order
//! (the model math never blocks the async executor), and one ordered sender task ships each
//! result straight to the next stage, or, on the last stage, samples and reports tokens to
//! the coordinator's collector. Sequences' cache entries stay here until `Release`.
//! `Reconfigure` swaps in another layer range (model and cache together) while no sequence
//! holds cache here. The model and cache sit behind [`StageCompute`]: the CPU model
//! ([`CpuStage`]) or, with the `cuda` feature, the GPU one (`crate::gpu::GpuStage`).

mod backend;
mod compute;
pub mod data_plane;
mod links;
mod observe;
mod peer_input;
mod reconfigure;
mod service;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use proto::v1::{self as pb, ForwardRequest, TokenReport};

use crate::sampling::Rng;

pub use backend::{
    no_nccl, BatchInput, BatchOutput, BatchSink, CacheStats, CpuStage, LogitsRequest, StageCompute, StageDevice,
};
pub use peer_input::{PeerInput, RelayShape};
pub use service::{serve, ServeOptions};

/// Work for the ordered sender.
#[derive(Debug)]
pub enum Outbound {
    /// Activations (and relay) for the next stage.
    Next(ForwardRequest),
    /// Sampled tokens / errors for the coordinator at this address.
    Report(String, TokenReport),
}

/// Shared state of a stage.
pub struct StageState {
    /// This worker's id.
    pub worker_id: String,
    /// The layer range with its KV cache; replaced by `Reconfigure` (under `batch`).
    compute: RwLock<Arc<dyn StageCompute>>,
    /// Held while a micro-batch runs and while `Reconfigure` swaps ranges, so a batch runs
    /// entirely on one range and a range is swapped only between batches.
    batch: Mutex<()>,
    /// Served model name.
    pub model_name: String,
    /// Checkpoint folder the model was loaded from (another range loads from it too).
    pub model_dir: PathBuf,
    /// etcd registration, re-published when the range changes.
    pub registration: Option<crate::membership::Registration>,
    /// Serializes `Reconfigure` calls.
    reconfiguring: Mutex<()>,
    /// Per-sequence sampling generators (last stage only), seeded on first use.
    pub rngs: Mutex<HashMap<u64, Rng>>,
    /// Address of the next stage (`None` on the last stage).
    pub next: Option<String>,
    /// Rows whose logits are materialized at once.
    pub logits_chunk: usize,
    /// Recent micro-batch spans, newest last (bounded), for pipelining diagnostics.
    pub spans: Mutex<VecDeque<pb::BatchSpan>>,
    /// Data-plane links to the neighbouring stages (NCCL when both compute on GPUs).
    links: links::Links,
}

/// Spans kept per stage.
const MAX_SPANS: usize = 256;

impl StageState {
    /// The layer range (model and cache) served now.
    pub fn compute(&self) -> Arc<dyn StageCompute> {
        self.compute.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Swaps in another range; only under [`StageState::hold_batches`].
    fn set_compute(&self, c: Arc<dyn StageCompute>) {
        *self.compute.write().unwrap_or_else(|p| p.into_inner()) = c;
    }

    /// Keeps the range from changing (and other batches from starting) while held.
    fn hold_batches(&self) -> MutexGuard<'_, ()> {
        self.batch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers a computed micro-batch's span.
    pub fn record_span(&self, span: pb::BatchSpan) {
        let mut spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        if spans.len() == MAX_SPANS {
            spans.pop_front();
        }
        spans.push_back(span);
    }

    /// Frees sequences' cache and sampling state (idempotent).
    pub fn release(&self, seqs: &[u64]) {
        self.compute().release(seqs);
        let mut rngs = self.rngs.lock().unwrap_or_else(|p| p.into_inner());
        for s in seqs {
            rngs.remove(s);
        }
    }
}

/// Handle used by the service to enqueue work.
pub type StageHandle = Arc<StageState>;
