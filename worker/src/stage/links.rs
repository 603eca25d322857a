//! A stage's data-plane links: the NCCL link to the next stage (opened by this stage's
//! sender when it connects) and the one from the previous stage (opened by
//! `Stage/OpenDataPlane`), with the transport in use for `Info`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use proto::v1::stage_client::StageClient;
use proto::v1::{self as pb};
use tonic::transport::Channel;
use tonic::Status;

use super::data_plane::{self, Capabilities, Choice, PeerLink, SharedLink, Transport};
use super::StageState;
use crate::error::{Result, WorkerError};

/// How long a stage waits for the next one to join the NCCL communicator before staying on
/// gRPC.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The link from the previous stage.
enum Inbound {
    /// None opened (gRPC).
    None,
    /// Joining the communicator (completes when the previous stage joins too).
    Joining(JoinHandle<Result<PeerLink>>),
    /// Joined.
    Ready(SharedLink),
    /// Joining failed: the reason, for the batches that expected it.
    Failed(String),
}

/// The stage's data-plane links.
pub struct Links {
    outbound: Mutex<(Option<Transport>, Option<SharedLink>)>,
    inbound: Mutex<Inbound>,
}

impl Default for Links {
    fn default() -> Self {
        Links {
            outbound: Mutex::new((None, None)),
            inbound: Mutex::new(Inbound::None),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Links {
    /// The NCCL link to the next stage, when one is open.
    pub fn outbound_link(&self) -> Option<SharedLink> {
        lock(&self.outbound).1.clone()
    }

    /// The transport to the next stage (`None` before it was negotiated).
    pub fn outbound_transport(&self) -> Option<Transport> {
        lock(&self.outbound).0
    }

    /// Records the transport to the next stage (dropping an NCCL link not passed again: the
    /// communicator is aborted once no batch uses it).
    pub fn set_outbound(&self, transport: Transport, link: Option<SharedLink>) {
        *lock(&self.outbound) = (Some(transport), link);
    }

    /// The NCCL link from the previous stage, waiting for the join to finish; an error when
    /// none was opened or joining failed.
    pub fn inbound_link(&self) -> Result<SharedLink> {
        let mut inbound = lock(&self.inbound);
        if let Inbound::Joining(_) = &*inbound {
            let Inbound::Joining(h) = std::mem::replace(&mut *inbound, Inbound::None) else {
                unreachable!("matched above")
            };
            *inbound = match h.join() {
                Ok(Ok(link)) => Inbound::Ready(Arc::new(Mutex::new(link))),
                Ok(Err(e)) => Inbound::Failed(e.to_string()),
                Err(_) => Inbound::Failed("the NCCL join panicked".into()),
            };
        }
        match &*inbound {
            Inbound::Ready(l) => Ok(l.clone()),
            Inbound::Failed(why) => Err(WorkerError::Device(format!(
                "hidden states were announced over NCCL, but joining the previous stage's communicator failed: {why}"
            ))),
            Inbound::None | Inbound::Joining(_) => Err(WorkerError::invalid(
                "input",
                "hidden states were announced over NCCL, but the previous stage opened no NCCL data plane here",
            )),
        }
    }
}

/// `Stage/OpenDataPlane` on the receiving stage: picks the transport for `offer` and, for
/// NCCL, starts joining the communicator as rank 1 (the caller joins as rank 0 once it has
/// the answer). A new offer replaces the link from the previous stage.
pub fn open_inbound(
    state: &StageState,
    offer: &pb::DataPlaneOffer,
) -> std::result::Result<pb::DataPlaneAnswer, Status> {
    let compute = state.compute();
    let local = Capabilities::detect(&state.worker_id, compute.device());
    let choice = data_plane::choose(&local, offer)
        .map_err(|e| Status::invalid_argument(format!("stage {}: {e}", state.worker_id)))?;
    let mut inbound = lock(&state.links.inbound);
    match &choice {
        Choice::Grpc { reason } => {
            tracing::info!(from = %offer.worker_id, %reason, "data plane from the previous stage: gRPC");
            *inbound = Inbound::None;
        }
        Choice::Nccl { unique_id } => {
            tracing::info!(from = %offer.worker_id, "data plane from the previous stage: NCCL (joining as rank 1)");
            let id = unique_id.clone();
            let joining = std::thread::Builder::new()
                .name("nccl-join".into())
                .spawn(move || compute.join_peer(&id, 1))
                .map_err(|e| Status::internal(format!("starting the NCCL join: {e}")))?;
            *inbound = Inbound::Joining(joining);
        }
    }
    Ok(data_plane::answer(&choice))
}

/// On connecting to the next stage: offers this stage's transports, and for an accepted
/// NCCL joins the communicator as rank 0. Anything failing leaves gRPC in place (logged).
pub async fn open_outbound(state: &Arc<StageState>, client: &mut StageClient<Channel>) {
    state.links.set_outbound(Transport::Grpc, None);
    let compute = state.compute();
    let local = Capabilities::detect(&state.worker_id, compute.device());
    let offer = data_plane::offer(&local, || compute.nccl_unique_id());
    let answer = match client.open_data_plane(offer.clone()).await {
        Ok(a) => a.into_inner(),
        Err(s) if s.code() == tonic::Code::Unimplemented => {
            tracing::info!("the next stage has no OpenDataPlane: gRPC data plane");
            return;
        }
        Err(s) => {
            tracing::warn!(status = %s, "data-plane negotiation failed: gRPC data plane");
            return;
        }
    };
    match data_plane::accepted(&offer, &answer) {
        Ok(Transport::Grpc) => {
            tracing::info!(reason = %answer.reason, "data plane to the next stage: gRPC");
        }
        Ok(Transport::Nccl) => {
            let id = offer.nccl_unique_id.clone();
            let join = tokio::task::spawn_blocking(move || compute.join_peer(&id, 0));
            match tokio::time::timeout(JOIN_TIMEOUT, join).await {
                Ok(Ok(Ok(link))) => {
                    tracing::info!("data plane to the next stage: NCCL (rank 0)");
                    state
                        .links
                        .set_outbound(Transport::Nccl, Some(Arc::new(Mutex::new(link))));
                }
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "joining the NCCL link failed: gRPC data plane"),
                Ok(Err(e)) => tracing::warn!(error = %e, "the NCCL join stopped: gRPC data plane"),
                Err(_) => {
                    tracing::warn!("the next stage did not join the NCCL link within {JOIN_TIMEOUT:?}: gRPC data plane")
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "bad data-plane answer: gRPC data plane"),
    }
}
