//! A pipeline stage: one worker's layer range behind the `Stage` gRPC service.
//!
//! `Forward` only enqueues: a dedicated compute thread runs micro-batches in arrival order
//! (the model math never blocks the async executor), and one ordered sender task ships each
//! result straight to the next stage, or, on the last stage, samples and reports tokens to
//! the coordinator's collector. Sequences' cache entries stay here until `Release`.
//! `Reconfigure` swaps in another layer range (model and cache together) while no sequence
//! holds cache here.

mod compute;
mod observe;
mod reconfigure;
mod service;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use proto::v1::{self as pb, ForwardRequest, TokenReport};

use crate::kv_cache::KvCache;
use crate::model::Model;
use crate::sampling::Rng;

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
    /// The layer range; replaced (together with `cache`, under its lock) by `Reconfigure`.
    model: RwLock<Arc<Model>>,
    /// Served model name.
    pub model_name: String,
    /// Paged cache of this range.
    pub cache: Mutex<KvCache>,
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
}

/// Spans kept per stage.
const MAX_SPANS: usize = 256;

impl StageState {
    /// The model as loaded now. Whoever also uses the cache takes the model while holding
    /// the cache lock, so the two always belong to the same range.
    pub fn model(&self) -> Arc<Model> {
        self.model.read().unwrap_or_else(|p| p.into_inner()).clone()
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
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let mut rngs = self.rngs.lock().unwrap_or_else(|p| p.into_inner());
        for s in seqs {
            cache.release(*s);
            rngs.remove(s);
        }
    }
}

/// Handle used by the service to enqueue work.
pub type StageHandle = Arc<StageState>;
