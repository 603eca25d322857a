//! The coordinator's view of the pipeline: one lazily connected client per stage, and the
//! running stage plan (which a live re-plan changes; the pipeline order never changes).

use std::ops::Range;
use std::sync::RwLock;
use std::time::Duration;

use proto::v1::stage_client::StageClient;
use proto::v1::{self as pb};
use tonic::transport::{Channel, Endpoint};
use worker::telemetry::{request_with, TraceContext};

/// One stage of the pipeline.
#[derive(Clone, Debug)]
pub struct StageEndpoint {
    /// gRPC address (`host:port`).
    pub addr: String,
    /// Layers it was started with (the running range is [`Cluster::plan`]'s).
    pub layers: Range<usize>,
}

/// Clients for every stage, in pipeline order.
pub struct Cluster {
    /// The stages, as started.
    pub stages: Vec<StageEndpoint>,
    clients: Vec<StageClient<Channel>>,
    /// The running plan: each stage's layer range now.
    plan: RwLock<Vec<Range<usize>>>,
    /// Held while the plan is being changed (one re-plan at a time).
    pub replan_lock: tokio::sync::Mutex<()>,
}

fn client(addr: &str) -> Result<StageClient<Channel>, String> {
    let uri = if addr.starts_with("http") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let ch = Endpoint::from_shared(uri)
        .map_err(|e| format!("bad stage address {addr}: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    Ok(StageClient::new(ch)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

impl Cluster {
    /// Clients for `stages` (no connection is made until first use).
    pub fn new(stages: Vec<StageEndpoint>) -> Result<Self, String> {
        let clients = stages.iter().map(|s| client(&s.addr)).collect::<Result<_, _>>()?;
        let plan = RwLock::new(stages.iter().map(|s| s.layers.clone()).collect());
        Ok(Cluster {
            stages,
            clients,
            plan,
            replan_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Each stage's layer range now.
    pub fn plan(&self) -> Vec<Range<usize>> {
        self.plan.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records the plan the stages now serve.
    pub fn set_plan(&self, plan: Vec<Range<usize>>) {
        *self.plan.write().unwrap_or_else(|p| p.into_inner()) = plan;
    }

    /// Has stage `i` load and serve `layers` (with `pattern`'s indexers); the error names
    /// the stage.
    pub async fn reconfigure(
        &self,
        i: usize,
        layers: Range<usize>,
        pattern: &str,
        timeout: Duration,
    ) -> Result<pb::ReconfigureResponse, tonic::Status> {
        let mut c = self.clients[i].clone();
        let req = pb::ReconfigureRequest {
            layer_start: layers.start as u32,
            layer_end: layers.end as u32,
            index_pattern: pattern.to_string(),
        };
        match tokio::time::timeout(timeout, c.reconfigure(req)).await {
            Ok(r) => r.map(|r| r.into_inner()),
            Err(_) => Err(tonic::Status::unavailable(format!(
                "stage {i} did not load layers {layers:?} within {timeout:?}"
            ))),
        }
    }

    /// Sends a micro-batch to stage 0, whose span continues `trace`.
    pub async fn forward_first(&self, req: pb::ForwardRequest, trace: &TraceContext) -> Result<(), String> {
        let mut c = self.clients[0].clone();
        c.forward(request_with(req, trace))
            .await
            .map(|_| ())
            .map_err(|e| e.message().to_string())
    }

    /// Frees sequences on every stage; unreachable stages are skipped (they lost the cache).
    pub async fn release_everywhere(&self, seqs: Vec<u64>) {
        for (i, c) in self.clients.iter().enumerate() {
            let mut c = c.clone();
            let req = pb::ReleaseRequest { seqs: seqs.clone() };
            if let Err(e) = tokio::time::timeout(Duration::from_secs(2), c.release(req)).await {
                tracing::debug!(stage = i, error = %e, "release timed out");
            }
        }
    }

    /// Asks stage `i` to check and load what `pattern` needs (its indexers); the error
    /// names the stage and the layer.
    pub async fn prepare_pattern(&self, i: usize, pattern: &str, timeout: Duration) -> Result<Vec<u32>, tonic::Status> {
        let mut c = self.clients[i].clone();
        let req = pb::PreparePatternRequest {
            index_pattern: pattern.to_string(),
        };
        match tokio::time::timeout(timeout, c.prepare_pattern(req)).await {
            Ok(r) => r.map(|r| r.into_inner().loaded_layers),
            Err(_) => Err(tonic::Status::unavailable(format!(
                "stage {i} did not prepare the pattern within {timeout:?}"
            ))),
        }
    }

    /// Stage `i`'s info, failing after `timeout`.
    pub async fn info(&self, i: usize, timeout: Duration) -> Result<pb::StageInfo, String> {
        let mut c = self.clients[i].clone();
        match tokio::time::timeout(timeout, c.info(pb::InfoRequest {})).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(e)) => Err(e.message().to_string()),
            Err(_) => Err(format!("stage {i} did not answer within {timeout:?}")),
        }
    }
}
