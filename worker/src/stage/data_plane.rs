//! The data plane between neighbouring stages: how hidden states and relayed top-k rows
//! travel from one stage to the next.
//!
//! gRPC (`ForwardRequest.hidden`, and the compressed relay in `Segment.relay`, through both
//! hosts' memory) always works and is the default. When both stages compute on GPUs and have
//! NCCL, they move hidden states and relayed top-k rows GPU to GPU instead: on connecting to
//! the next stage, a stage offers the transports it can send over (`Stage/OpenDataPlane`,
//! with a fresh NCCL unique id when it offers `nccl`); the next stage picks one ([`choose`])
//! and, for `nccl`, both join a 2-rank communicator (the sender as rank 0). The
//! `ForwardRequest` still carries the batch's metadata (segments, batch id, `report_to`) and
//! announces what comes over NCCL: the hidden-state size and each relayed segment's shape
//! (`NcclPayload`, checked by the receiver in `super::PeerInput`). Any failure (a stage on
//! the CPU, no NCCL library, both stages on one GPU, a failed negotiation or join) leaves the
//! pair on gRPC.
//!
//! The negotiation is plain code, tested without a GPU; the NCCL link itself is
//! `kernels::cuda::NcclPeer` (feature `cuda`).

use std::sync::{Arc, Mutex};

use proto::v1::{self as pb};

use super::StageDevice;
use crate::error::{Result, WorkerError};

/// The gRPC transport's name in offers and answers.
pub const GRPC: &str = "grpc";
/// The NCCL transport's name in offers and answers.
pub const NCCL: &str = "nccl";
/// Bytes of an NCCL unique id.
pub const NCCL_ID_BYTES: usize = 128;

/// One end of an NCCL link between neighbouring stages.
#[cfg(feature = "cuda")]
pub use kernels::cuda::NcclPeer as PeerLink;

/// One end of an NCCL link: none exists in a build without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub enum PeerLink {}

/// A link shared by the compute thread and whoever opened it (one NCCL call at a time).
pub type SharedLink = Arc<Mutex<PeerLink>>;

/// How hidden states and the relay travel to the next stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// In `ForwardRequest.hidden` and `Segment.relay`.
    Grpc,
    /// Over an NCCL communicator.
    Nccl,
}

impl Transport {
    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Grpc => GRPC,
            Transport::Nccl => NCCL,
        }
    }
}

/// What one stage can use for its data plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// This worker's id.
    pub worker_id: String,
    /// Where it computes.
    pub device: StageDevice,
    /// Its host name.
    pub host: String,
    /// Whether it can join an NCCL communicator (a GPU stage with the NCCL library).
    pub nccl: bool,
}

impl Capabilities {
    /// This process's capabilities for a stage on `device`.
    pub fn detect(worker_id: &str, device: StageDevice) -> Self {
        Capabilities {
            worker_id: worker_id.to_string(),
            device,
            host: host_name(),
            nccl: matches!(device, StageDevice::Cuda(_)) && nccl_library_present(),
        }
    }
}

/// Whether the NCCL library loads (never in a build without the `cuda` feature).
pub fn nccl_library_present() -> bool {
    #[cfg(feature = "cuda")]
    {
        kernels::cuda::nccl_present()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// This machine's host name (empty when it cannot be read).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

/// The offer a stage makes to the next one: `nccl` first when it can, with a unique id from
/// `new_id` (a failure there only drops `nccl` from the offer, logged), and always `grpc`.
pub fn offer(local: &Capabilities, new_id: impl FnOnce() -> Result<Vec<u8>>) -> pb::DataPlaneOffer {
    let mut o = pb::DataPlaneOffer {
        transports: vec![GRPC.to_string()],
        worker_id: local.worker_id.clone(),
        device: local.device.to_string(),
        host: local.host.clone(),
        nccl_unique_id: Vec::new(),
    };
    if local.nccl {
        match new_id() {
            Ok(id) => {
                o.transports.insert(0, NCCL.to_string());
                o.nccl_unique_id = id;
            }
            Err(e) => tracing::warn!(error = %e, "cannot create an NCCL unique id; offering gRPC only"),
        }
    }
    o
}

/// The receiving stage's choice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Hidden states in `ForwardRequest.hidden`, with the reason NCCL was not chosen.
    Grpc {
        /// Why not NCCL.
        reason: String,
    },
    /// Join the offered communicator as rank 1.
    Nccl {
        /// The communicator's unique id.
        unique_id: Vec<u8>,
    },
}

/// Picks the transport for `offer` on a stage with `local` capabilities: `nccl` when offered
/// and both sides can use it on different GPUs, else `grpc`. A malformed offer is an error
/// naming the field.
pub fn choose(local: &Capabilities, offer: &pb::DataPlaneOffer) -> Result<Choice> {
    if offer.transports.is_empty() {
        return Err(WorkerError::invalid(
            "transports",
            format!("the offer names no transport (known: {GRPC}, {NCCL})"),
        ));
    }
    let mut nccl_offered = false;
    for t in &offer.transports {
        match t.as_str() {
            GRPC => {}
            NCCL => nccl_offered = true,
            other => {
                return Err(WorkerError::invalid(
                    "transports",
                    format!("unknown data-plane transport {other:?} (known: {GRPC}, {NCCL})"),
                ))
            }
        }
    }
    let id_len = offer.nccl_unique_id.len();
    if nccl_offered && id_len != NCCL_ID_BYTES {
        return Err(WorkerError::invalid(
            "nccl_unique_id",
            format!("{id_len} bytes; an offer of {NCCL} needs the {NCCL_ID_BYTES}-byte NCCL unique id"),
        ));
    }
    if !nccl_offered && id_len > 0 {
        return Err(WorkerError::invalid(
            "nccl_unique_id",
            format!("{id_len} bytes given, but `transports` does not offer {NCCL}"),
        ));
    }
    let reason = if !nccl_offered {
        format!("the previous stage ({}) offers gRPC only", offer.device)
    } else if local.device == StageDevice::Cpu {
        "this stage computes on the CPU".to_string()
    } else if !local.nccl {
        "the NCCL library (libnccl.so) cannot be loaded on this stage".to_string()
    } else if offer.host == local.host && offer.device == local.device.to_string() {
        format!(
            "both stages use {} on host {:?} (NCCL needs one GPU per rank)",
            offer.device, offer.host
        )
    } else {
        return Ok(Choice::Nccl {
            unique_id: offer.nccl_unique_id.clone(),
        });
    };
    Ok(Choice::Grpc { reason })
}

/// The answer to send back for `choice`.
pub fn answer(choice: &Choice) -> pb::DataPlaneAnswer {
    match choice {
        Choice::Grpc { reason } => pb::DataPlaneAnswer {
            transport: GRPC.to_string(),
            reason: reason.clone(),
        },
        Choice::Nccl { .. } => pb::DataPlaneAnswer {
            transport: NCCL.to_string(),
            reason: String::new(),
        },
    }
}

/// The transport the next stage chose in `answer` to `offer`; an error (naming `transport`)
/// when it names one that was not offered.
pub fn accepted(offer: &pb::DataPlaneOffer, answer: &pb::DataPlaneAnswer) -> Result<Transport> {
    let t = match answer.transport.as_str() {
        GRPC => Transport::Grpc,
        NCCL => Transport::Nccl,
        other => {
            return Err(WorkerError::invalid(
                "transport",
                format!("the next stage answered {other:?}; expected {GRPC} or {NCCL}"),
            ))
        }
    };
    if !offer.transports.iter().any(|o| o == t.as_str()) {
        return Err(WorkerError::invalid(
            "transport",
            format!("the next stage chose {}, which was not offered", t.as_str()),
        ));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(device: StageDevice, host: &str, nccl: bool) -> Capabilities {
        Capabilities {
            worker_id: "w".into(),
            device,
            host: host.into(),
            nccl,
        }
    }

    fn id() -> Result<Vec<u8>> {
        Ok((0..NCCL_ID_BYTES as u8).collect())
    }

    #[test]
    fn two_cpu_stages_negotiate_grpc() {
        let up = Capabilities::detect("up", StageDevice::Cpu);
        assert!(!up.nccl, "a CPU stage never offers NCCL");
        let o = offer(&up, || panic!("no unique id is made for a CPU stage"));
        assert_eq!(o.transports, [GRPC]);
        assert!(o.nccl_unique_id.is_empty());
        let down = Capabilities::detect("down", StageDevice::Cpu);
        let c = choose(&down, &o).unwrap();
        assert!(
            matches!(&c, Choice::Grpc { reason } if reason.contains("gRPC only")),
            "{c:?}"
        );
        assert_eq!(accepted(&o, &answer(&c)).unwrap(), Transport::Grpc);
    }

    #[test]
    fn gpu_stages_on_different_gpus_with_nccl_choose_nccl() {
        let o = offer(&caps(StageDevice::Cuda(0), "a", true), id);
        assert_eq!(o.transports, [NCCL, GRPC]);
        assert_eq!(o.device, "cuda:0");
        let c = choose(&caps(StageDevice::Cuda(1), "a", true), &o).unwrap();
        assert_eq!(
            c,
            Choice::Nccl {
                unique_id: id().unwrap()
            }
        );
        assert_eq!(accepted(&o, &answer(&c)).unwrap(), Transport::Nccl);
        // The same ordinal on another host is another GPU.
        let other_host = choose(&caps(StageDevice::Cuda(0), "b", true), &o).unwrap();
        assert!(matches!(other_host, Choice::Nccl { .. }));
    }

    #[test]
    fn any_missing_piece_falls_back_to_grpc_with_the_reason() {
        let o = offer(&caps(StageDevice::Cuda(0), "a", true), id);
        let cases = [
            (caps(StageDevice::Cpu, "b", false), "on the CPU"),
            (caps(StageDevice::Cuda(0), "b", false), "NCCL library"),
            (caps(StageDevice::Cuda(0), "a", true), "one GPU per rank"),
        ];
        for (down, why) in cases {
            match choose(&down, &o).unwrap() {
                Choice::Grpc { reason } => assert!(reason.contains(why), "{down:?}: {reason}"),
                c => panic!("{down:?} must fall back to gRPC, chose {c:?}"),
            }
        }
        // A GPU stage whose unique id cannot be made offers gRPC only.
        let no_id = offer(&caps(StageDevice::Cuda(0), "a", true), || {
            Err(WorkerError::Device("no NCCL".into()))
        });
        assert_eq!(no_id.transports, [GRPC]);
        let c = choose(&caps(StageDevice::Cuda(1), "a", true), &no_id).unwrap();
        assert!(matches!(c, Choice::Grpc { .. }));
    }

    #[test]
    fn malformed_offers_and_answers_are_errors_naming_the_field() {
        let down = caps(StageDevice::Cuda(1), "a", true);
        let good = offer(&caps(StageDevice::Cuda(0), "a", true), id);
        let mut unknown = good.clone();
        unknown.transports = vec!["rdma".into(), GRPC.into()];
        let e = choose(&down, &unknown).unwrap_err().to_string();
        assert!(
            e.contains("`transports`") && e.contains("\"rdma\"") && e.contains("grpc, nccl"),
            "{e}"
        );
        let mut none = good.clone();
        none.transports.clear();
        let e = choose(&down, &none).unwrap_err().to_string();
        assert!(e.contains("`transports`") && e.contains("no transport"), "{e}");
        let mut short = good.clone();
        short.nccl_unique_id.truncate(5);
        let e = choose(&down, &short).unwrap_err().to_string();
        assert!(
            e.contains("`nccl_unique_id`") && e.contains("5 bytes") && e.contains("128"),
            "{e}"
        );
        let mut stray = good.clone();
        stray.transports = vec![GRPC.into()];
        let e = choose(&down, &stray).unwrap_err().to_string();
        assert!(
            e.contains("`nccl_unique_id`") && e.contains("does not offer nccl"),
            "{e}"
        );
        let grpc_only = offer(&caps(StageDevice::Cpu, "a", false), id);
        for (bad, why) in [("quic", "expected grpc or nccl"), (NCCL, "not offered")] {
            let a = pb::DataPlaneAnswer {
                transport: bad.into(),
                reason: String::new(),
            };
            let e = accepted(&grpc_only, &a).unwrap_err().to_string();
            assert!(e.contains("`transport`") && e.contains(why), "{bad}: {e}");
        }
    }
}
