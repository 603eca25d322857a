//! The `Stage` gRPC service, the compute thread and the ordered sender.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use proto::v1::collector_client::CollectorClient;
use proto::v1::stage_client::StageClient;
use proto::v1::stage_server::{Stage, StageServer};
use proto::v1::{self as pb};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};

use super::observe::ForwardObservation;
use super::{compute, links, reconfigure, Outbound, StageCompute, StageHandle, StageState};
use crate::error::Result;
use crate::telemetry::{self, TraceContext};

/// How to run a stage server.
pub struct ServeOptions {
    /// Worker id reported in `Info`.
    pub worker_id: String,
    /// Served model name.
    pub model_name: String,
    /// Listen address.
    pub listen: SocketAddr,
    /// Next stage's address (`None` on the last stage).
    pub next: Option<String>,
    /// Rows whose logits are materialized at once.
    pub logits_chunk: usize,
    /// Checkpoint folder (`Reconfigure` loads other ranges from it).
    pub model_dir: std::path::PathBuf,
    /// etcd registration to re-publish after `Reconfigure` (`None` without etcd).
    pub registration: Option<crate::membership::Registration>,
}

struct StageService {
    state: StageHandle,
    /// Micro-batches for the compute thread, each with the trace context it continues.
    jobs: std::sync::mpsc::Sender<(pb::ForwardRequest, TraceContext)>,
}

#[tonic::async_trait]
impl Stage for StageService {
    async fn forward(&self, req: Request<pb::ForwardRequest>) -> std::result::Result<Response<pb::ForwardAck>, Status> {
        let parent = telemetry::extract(req.metadata());
        self.jobs
            .send((req.into_inner(), parent))
            .map_err(|_| Status::unavailable("stage compute thread stopped"))?;
        Ok(Response::new(pb::ForwardAck {}))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> std::result::Result<Response<pb::ReleaseResponse>, Status> {
        let state = self.state.clone();
        let seqs = req.into_inner().seqs;
        // Locks may be held by a running forward: wait off the executor.
        tokio::task::spawn_blocking(move || state.release(&seqs))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    async fn info(&self, _req: Request<pb::InfoRequest>) -> std::result::Result<Response<pb::StageInfo>, Status> {
        let state = self.state.clone();
        let info = tokio::task::spawn_blocking(move || {
            let model = state.compute();
            let cache = model.cache_stats();
            let range = model.range();
            pb::StageInfo {
                worker_id: state.worker_id.clone(),
                layer_start: range.start as u32,
                layer_end: range.end as u32,
                num_layers: model.config().num_hidden_layers as u32,
                index_pattern: model.pattern().to_string(),
                kv_blocks_total: cache.capacity_blocks as u64,
                kv_blocks_free: cache.free_blocks as u64,
                block_size: cache.block_size as u32,
                model: state.model_name.clone(),
                active_sequences: cache.sequences as u32,
                data_plane: state
                    .links
                    .outbound_transport()
                    .map_or(String::new(), |t| t.as_str().to_string()),
                device: model.device().to_string(),
                recent_batches: state
                    .spans
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .cloned()
                    .collect(),
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(info))
    }

    async fn prepare_pattern(
        &self,
        req: Request<pb::PreparePatternRequest>,
    ) -> std::result::Result<Response<pb::PreparePatternResponse>, Status> {
        let state = self.state.clone();
        let text = req.into_inner().index_pattern;
        // Loading indexer weights reads the checkpoint: off the executor.
        let loaded = tokio::task::spawn_blocking(move || {
            let model = state.compute();
            let pattern = crate::IndexPattern::parse(&text, model.config().num_hidden_layers)?;
            model.prepare_pattern(&pattern)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::invalid_argument(format!("stage {}: {e}", self.state.worker_id)))?;
        Ok(Response::new(pb::PreparePatternResponse {
            loaded_layers: loaded.into_iter().map(|l| l as u32).collect(),
        }))
    }

    async fn reconfigure(
        &self,
        req: Request<pb::ReconfigureRequest>,
    ) -> std::result::Result<Response<pb::ReconfigureResponse>, Status> {
        let state = self.state.clone();
        let req = req.into_inner();
        // Loading a range reads the checkpoint: off the executor (Info keeps answering).
        tokio::task::spawn_blocking(move || reconfigure::reconfigure(&state, &req))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map(Response::new)
    }

    async fn open_data_plane(
        &self,
        req: Request<pb::DataPlaneOffer>,
    ) -> std::result::Result<Response<pb::DataPlaneAnswer>, Status> {
        let state = self.state.clone();
        let offer = req.into_inner();
        // Probing for the NCCL library loads it: off the executor.
        tokio::task::spawn_blocking(move || links::open_inbound(&state, &offer))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map(Response::new)
    }
}

async fn channel(addr: &str) -> std::result::Result<Channel, tonic::transport::Error> {
    let uri = if addr.starts_with("http") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(uri)?.connect().await
}

/// Ships results in order: one batch's activations never overtake an earlier batch's. On
/// connecting to the next stage it negotiates the data plane (NCCL or gRPC); a failed send
/// drops the NCCL link (the next connection negotiates afresh).
async fn sender(mut rx: mpsc::UnboundedReceiver<(Outbound, TraceContext)>, state: StageHandle) {
    let next = state.next.clone();
    let mut next_client: Option<StageClient<Channel>> = None;
    let mut collectors: HashMap<String, CollectorClient<Channel>> = HashMap::new();
    while let Some((msg, cx)) = rx.recv().await {
        match msg {
            Outbound::Next(req) => {
                let (batch_id, report_to) = (req.batch_id, req.report_to.clone());
                let over_nccl = matches!(req.input, Some(pb::forward_request::Input::Nccl(_)));
                // The next stage's span continues this one's.
                let req = telemetry::request_with(req, &cx);
                let sent = match (&mut next_client, &next) {
                    (Some(c), _) => c.forward(req).await.map(|_| ()).map_err(|e| e.to_string()),
                    // Its hidden states went to an NCCL link that was dropped since.
                    (None, _) if over_nccl => Err("the NCCL link to the next stage was lost".to_string()),
                    (None, Some(addr)) => match channel(addr).await {
                        Ok(ch) => {
                            let mut c = StageClient::new(ch).max_decoding_message_size(usize::MAX);
                            links::open_outbound(&state, &mut c).await;
                            let r = c.forward(req).await.map(|_| ()).map_err(|e| e.to_string());
                            next_client = Some(c);
                            r
                        }
                        Err(e) => Err(format!("cannot reach next stage {addr}: {e}")),
                    },
                    (None, None) => Err("no next stage configured".to_string()),
                };
                if let Err(e) = sent {
                    next_client = None;
                    state.links.set_outbound(super::data_plane::Transport::Grpc, None);
                    let report = pb::TokenReport {
                        batch_id,
                        error: format!("next stage unavailable: {e}"),
                        ..Default::default()
                    };
                    report_to_collector(&mut collectors, &report_to, report).await;
                }
            }
            Outbound::Report(addr, report) => report_to_collector(&mut collectors, &addr, report).await,
        }
    }
}

async fn report_to_collector(
    collectors: &mut HashMap<String, CollectorClient<Channel>>,
    addr: &str,
    report: pb::TokenReport,
) {
    if !collectors.contains_key(addr) {
        match channel(addr).await {
            Ok(ch) => {
                collectors.insert(addr.to_string(), CollectorClient::new(ch));
            }
            Err(e) => {
                tracing::warn!(%addr, error = %e, "cannot reach the coordinator's collector; report dropped");
                return;
            }
        }
    }
    if let Some(c) = collectors.get_mut(addr) {
        if let Err(e) = c.report(report).await {
            tracing::warn!(%addr, error = %e, "report to the coordinator failed");
            collectors.remove(addr);
        }
    }
}

/// Serves a layer range (`compute`: its model and KV cache, on the CPU or a GPU) as a stage
/// until the process is stopped.
pub async fn serve(compute: Box<dyn StageCompute>, opts: ServeOptions) -> Result<()> {
    tracing::info!(device = %compute.device(), "stage layer range loaded");
    let state: StageHandle = Arc::new(StageState {
        worker_id: opts.worker_id.clone(),
        model_name: opts.model_name.clone(),
        rngs: Mutex::new(HashMap::new()),
        next: opts.next.clone(),
        logits_chunk: opts.logits_chunk,
        spans: Mutex::new(std::collections::VecDeque::new()),
        compute: std::sync::RwLock::new(Arc::from(compute)),
        batch: Mutex::new(()),
        links: Default::default(),
        model_dir: opts.model_dir.clone(),
        registration: opts.registration.clone(),
        reconfiguring: Mutex::new(()),
    });
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (job_tx, job_rx) = std::sync::mpsc::channel::<(pb::ForwardRequest, TraceContext)>();
    let compute_state = state.clone();
    std::thread::Builder::new()
        .name("stage-compute".into())
        .spawn(move || {
            for (mut req, parent) in job_rx {
                let observation = ForwardObservation::start(&compute_state, &mut req, parent);
                let mut out = compute::process(&compute_state, req);
                let cx = observation.finish(&compute_state, &mut out);
                if out_tx.send((out, cx)).is_err() {
                    break;
                }
            }
        })
        .map_err(|error| crate::error::WorkerError::Io {
            path: "stage-compute thread".into(),
            error,
        })?;
    tokio::spawn(sender(out_rx, state.clone()));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<StageServer<StageService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| crate::error::WorkerError::invalid("reflection", e.to_string()))?;
    let svc = StageServer::new(StageService { state, jobs: job_tx })
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    tracing::info!(listen = %opts.listen, worker = %opts.worker_id, "stage serving");
    // On the stop signal the server stops accepting and lets open calls finish; the
    // coordinator's long-lived channels never close by themselves, so the drain is bounded.
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(svc)
        .serve_with_shutdown(opts.listen, async move {
            crate::shutdown::shutdown_signal().await;
            tracing::info!("stop signal: draining for up to {STOP_GRACE:?}");
            let _ = stopping_tx.send(());
        });
    tokio::select! {
        r = server => r.map_err(|e| crate::error::WorkerError::invalid("listen", format!("{}: {e}", opts.listen))),
        _ = async {
            if stopping_rx.await.is_ok() {
                tokio::time::sleep(STOP_GRACE).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => Ok(()),
    }
}

/// How long a stopping stage waits for open calls before exiting anyway.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
