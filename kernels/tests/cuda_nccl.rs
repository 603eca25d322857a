//! The NCCL link between two stages (`kernels::cuda::NcclPeer`).
//!
//! - Everywhere: without the NCCL library (`libnccl.so`) creating a unique id or joining is
//!   an error naming the library, never a panic; with it, a unique id is 128 bytes.
//! - On a GPU host (`#[ignore]`d; `scripts/gpu-check.sh run` runs them): two ranks on two
//!   GPUs send hidden states and indices GPU to GPU; two ranks on one GPU fail to join
//!   cleanly (NCCL needs one GPU per rank) instead of hanging, which is why stages on one GPU
//!   stay on gRPC.

use std::sync::mpsc;
use std::time::Duration;

use kernels::cuda::{self, CudaError, GpuKernels, KernelCache, NcclPeer, NCCL_UNIQUE_ID_BYTES};

#[test]
fn nccl_unique_ids_need_the_library_and_never_panic() {
    match cuda::nccl_unique_id() {
        Ok(id) => {
            assert!(cuda::nccl_present());
            assert_eq!(id.len(), NCCL_UNIQUE_ID_BYTES);
            assert!(id.iter().any(|b| *b != 0), "a unique id is not all zeros");
            assert_ne!(cuda::nccl_unique_id().unwrap(), id, "each id is fresh");
        }
        Err(e) => {
            assert!(!cuda::nccl_present(), "{e}");
            assert!(matches!(e, CudaError::LibraryMissing { .. }), "{e}");
            assert!(e.to_string().contains("libnccl.so"), "{e}");
        }
    }
}

/// One rank's device and link.
type Joined = cuda::Result<(GpuKernels, NcclPeer)>;

/// Joins rank 0 on `dev0` and rank 1 on `dev1` from two threads; `None` when the joins did
/// not both return within a minute.
fn join_pair(dev0: usize, dev1: usize) -> Option<(Joined, Joined)> {
    let id = cuda::nccl_unique_id().expect("the NCCL tests need libnccl.so on the loader path");
    let (tx, rx) = mpsc::channel();
    for (rank, ordinal) in [(0, dev0), (1, dev1)] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let joined = GpuKernels::new(ordinal, &KernelCache::from_env()).and_then(|k| {
                let peer = NcclPeer::join(&k, &id, rank)?;
                Ok((k, peer))
            });
            let _ = tx.send((rank, joined));
        });
    }
    let mut out = [None, None];
    for _ in 0..2 {
        let (rank, joined) = rx.recv_timeout(Duration::from_secs(60)).ok()?;
        out[rank] = Some(joined);
    }
    let [a, b] = out;
    Some((a?, b?))
}

#[test]
#[ignore = "needs two CUDA GPUs and NCCL; run by scripts/gpu-check.sh when the host has two"]
fn two_gpus_exchange_hidden_states_and_indices_over_nccl() {
    assert!(
        cuda::device_count().unwrap_or(0) >= 2,
        "this test needs two GPUs (gpu-check.sh runs it only then)"
    );
    let (r0, r1) = join_pair(0, 1).expect("both ranks join within a minute");
    let ((k0, p0), (k1, p1)) = (r0.unwrap(), r1.unwrap());
    assert_eq!((p0.rank(), p1.rank()), (0, 1));
    round_trips((k0, p0), (k1, p1));
}

/// Several messages in a row (hidden states and indices) arrive in order, bit for bit (what
/// the stages rely on). Each rank is driven by its own thread, as each stage is.
fn round_trips(sender: (GpuKernels, NcclPeer), receiver: (GpuKernels, NcclPeer)) {
    let hidden: Vec<f32> = (0..3 * 4096).map(|i| (i as f32 * 0.37).sin()).collect();
    let idx: Vec<u32> = (0..2048).map(|i| i * 3 + 1).collect();
    let messages: Vec<Vec<f32>> = (0..3u32)
        .map(|round| hidden.iter().map(|x| x + round as f32).collect())
        .collect();
    let sent = messages.clone();
    let sent_idx = idx.clone();
    let sending = std::thread::spawn(move || {
        let (k0, p0) = sender;
        for h in &sent {
            p0.send(k0.upload(h).unwrap()).unwrap();
            p0.send_u32(k0.upload(&sent_idx).unwrap()).unwrap();
        }
        p0.synchronize().unwrap();
    });
    let (k1, p1) = receiver;
    for (round, h) in messages.iter().enumerate() {
        let mut got_h = k1.zeros::<f32>(h.len()).unwrap();
        let mut got_i = k1.zeros::<u32>(idx.len()).unwrap();
        p1.recv(&mut got_h).unwrap();
        p1.recv(&mut got_i).unwrap();
        p1.synchronize().unwrap();
        assert_eq!(
            &k1.download(&got_h).unwrap(),
            h,
            "round {round}: hidden states bit for bit"
        );
        assert_eq!(k1.download(&got_i).unwrap(), idx, "round {round}: indices");
    }
    sending.join().expect("the sending rank finished");
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL; run by scripts/gpu-check.sh"]
fn two_ranks_on_one_gpu_never_hang() {
    // NCCL has refused two ranks on one device ("duplicate GPU"); the stages do not rely on
    // it either way (one GPU stays on gRPC), but a join must return, and an error must be a
    // clean NCCL error.
    let (r0, r1) = join_pair(0, 0).expect("joining two ranks on one GPU returns (it must not hang)");
    match (r0, r1) {
        (Err(a), Err(b)) => {
            for (rank, e) in [(0, a), (1, b)] {
                assert!(matches!(e, CudaError::Nccl { .. }), "rank {rank}: {e}");
                eprintln!("rank {rank} on one GPU: {e}");
            }
        }
        (Ok(sender), Ok(receiver)) => {
            eprintln!("this NCCL accepts two ranks on one GPU; checking a round trip");
            round_trips(sender, receiver);
        }
        (a, b) => panic!(
            "one rank joined and the other did not: {:?} / {:?}",
            a.err().map(|e| e.to_string()),
            b.err().map(|e| e.to_string())
        ),
    }
}
