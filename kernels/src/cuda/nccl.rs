//! NCCL point-to-point between two neighbouring pipeline stages: a 2-rank communicator
//! (rank 0 the sending stage, rank 1 the receiving one) whose unique id the stages exchange
//! over their gRPC control plane, then device buffers sent and received GPU to GPU.
//!
//! cudarc loads NCCL at run time under the name `libnccl.so`, which NCCL's packages ship only
//! as `libnccl.so.2` (plus a development link): [`nccl_present`] says whether the name loads,
//! and nothing here touches NCCL otherwise (cudarc panics on a missing library). NCCL needs
//! one GPU per rank: two ranks on the same device fail to join (an error, not a hang).
//!
//! The link runs on a stream of its own, so a send waiting for its receiver never holds up
//! the compute stream; cudarc's per-buffer events order the two streams. Sent buffers are
//! kept alive for a few more sends, so dropping one never makes the compute stream wait for a
//! transfer it has just queued.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm, Id, NcclType};

use super::context::GpuKernels;
use super::device::guarded;
use super::error::{CudaError, Result};

/// Bytes of an NCCL unique id (`ncclUniqueId`).
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

/// Sent buffers kept alive after their send was queued.
const KEEP_SENT: usize = 4;

/// Whether the NCCL library loads under the name cudarc uses (`libnccl.so`). Never panics.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen the candidate library names.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

fn missing() -> CudaError {
    CudaError::LibraryMissing {
        library: "the NCCL library (libnccl.so)",
        hint: "install NCCL; it ships libnccl.so.2, so link it as libnccl.so in a directory on \
               LD_LIBRARY_PATH (scripts/gpu-check.sh shows how)"
            .into(),
    }
}

fn nccl_error(context: &str, e: cudarc::nccl::result::NcclError) -> CudaError {
    CudaError::Nccl {
        context: context.to_string(),
        message: format!("{:?}", e.0),
    }
}

/// A fresh NCCL unique id for a new communicator (rank 0 creates it and sends it to rank 1).
pub fn nccl_unique_id() -> Result<[u8; NCCL_UNIQUE_ID_BYTES]> {
    if !nccl_present() {
        return Err(missing());
    }
    guarded("creating an NCCL unique id", || {
        let id = Id::new().map_err(|e| nccl_error("creating an NCCL unique id", e))?;
        Ok(id.internal().map(|c| c as u8))
    })
}

/// One end of a 2-rank NCCL communicator between neighbouring stages.
pub struct NcclPeer {
    comm: Comm,
    stream: Arc<CudaStream>,
    rank: usize,
    sent: Mutex<VecDeque<CudaSlice<f32>>>,
    sent_u32: Mutex<VecDeque<CudaSlice<u32>>>,
    sent_i32: Mutex<VecDeque<CudaSlice<i32>>>,
}

// SAFETY: the communicator is a handle NCCL lets any thread use, one call at a time; every
// call here goes through `&self` methods that the owner serializes (the worker keeps the
// peer behind a mutex), and cudarc's stream and buffers are Send already.
unsafe impl Send for NcclPeer {}

impl NcclPeer {
    /// Joins the communicator `id` as `rank` (0 or 1) on `k`'s device; blocks until the other
    /// rank joins too.
    pub fn join(k: &GpuKernels, id: &[u8], rank: usize) -> Result<Self> {
        if rank > 1 {
            return Err(CudaError::invalid(
                "rank",
                format!("{rank}: a stage link has ranks 0 and 1"),
            ));
        }
        let id: [u8; NCCL_UNIQUE_ID_BYTES] = id.try_into().map_err(|_| {
            CudaError::invalid(
                "nccl_unique_id",
                format!("{} bytes; an NCCL unique id has {NCCL_UNIQUE_ID_BYTES}", id.len()),
            )
        })?;
        if !nccl_present() {
            return Err(missing());
        }
        let ordinal = k.info().ordinal;
        guarded("joining an NCCL communicator", || {
            let stream = k
                .context()
                .new_stream()
                .map_err(|e| CudaError::driver("creating the NCCL link's stream", e))?;
            let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
            let comm = Comm::from_rank(stream.clone(), rank, 2, id)
                .map_err(|e| nccl_error(&format!("joining as rank {rank} on cuda:{ordinal}"), e))?;
            Ok(NcclPeer {
                comm,
                stream,
                rank,
                sent: Mutex::new(VecDeque::new()),
                sent_u32: Mutex::new(VecDeque::new()),
                sent_i32: Mutex::new(VecDeque::new()),
            })
        })
    }

    /// This end's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    fn peer(&self) -> i32 {
        1 - self.rank as i32
    }

    /// Queues sending `buf` to the other rank (it is kept until a few later sends).
    pub fn send(&self, buf: CudaSlice<f32>) -> Result<()> {
        send_kept(&self.comm, self.peer(), buf, &self.sent)
    }

    /// Queues sending `buf` (indices) to the other rank.
    pub fn send_u32(&self, buf: CudaSlice<u32>) -> Result<()> {
        send_kept(&self.comm, self.peer(), buf, &self.sent_u32)
    }

    /// Queues sending `buf` (counts) to the other rank; the receiver receives it as `i32`
    /// (NCCL matches a send and its receive by element count and type).
    pub fn send_i32(&self, buf: CudaSlice<i32>) -> Result<()> {
        send_kept(&self.comm, self.peer(), buf, &self.sent_i32)
    }

    /// Queues receiving `buf.len()` values from the other rank into `buf` (device work that
    /// later reads `buf` waits for it).
    pub fn recv<T: NcclType>(&self, buf: &mut CudaSlice<T>) -> Result<()> {
        self.comm
            .recv(buf, self.peer())
            .map(|_| ())
            .map_err(|e| nccl_error("receiving from the previous stage", e))
    }

    /// Waits until every queued send and receive finished.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| CudaError::driver("waiting for the NCCL link", e))
    }
}

fn send_kept<T: NcclType>(
    comm: &Comm,
    peer: i32,
    buf: CudaSlice<T>,
    kept: &Mutex<VecDeque<CudaSlice<T>>>,
) -> Result<()> {
    comm.send(&buf, peer)
        .map_err(|e| nccl_error("sending to the next stage", e))?;
    let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
    kept.push_back(buf);
    while kept.len() > KEEP_SENT {
        kept.pop_front();
    }
    Ok(())
}
