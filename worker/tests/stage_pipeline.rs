//! The stage server path on the CPU: stages served in process (`worker::stage::serve` over
//! [`CpuStage`]), chained over loopback gRPC, give the single-process engine's greedy tokens
//! and logprobs to the bit, relaying top-k indices where a stage starts on a Shared layer;
//! CPU stages negotiate the gRPC data plane, and a malformed data-plane offer is refused
//! with the field named.

mod support;

use proto::v1::{self as pb};
use support::{engine_greedy, first_prompt, fixture, Pipeline};
use worker::stage::{CpuStage, StageCompute};
use worker::{LayerRange, Model, ModelConfig};

fn cpu_stages(dir: &std::path::Path, bounds: &[usize]) -> Vec<Box<dyn StageCompute>> {
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let mut edges = vec![0];
    edges.extend_from_slice(bounds);
    edges.push(cfg.num_hidden_layers);
    edges
        .windows(2)
        .map(|w| {
            let m = Model::load_range(dir, cfg.clone(), None, LayerRange::new(w[0], w[1])).unwrap();
            Box::new(CpuStage::new(m, 16, 256)) as Box<dyn StageCompute>
        })
        .collect()
}

#[test]
fn cpu_stage_servers_give_the_engine_tokens_and_logprobs() {
    let dir = fixture("dsv32_pattern"); // FSSFSS: a stage at 2 starts on Shared (relay), at 3 on Full
    let prompt = first_prompt("dsv32_pattern");
    let want = engine_greedy(&dir, &prompt, 5);
    let mut p = Pipeline::start(&dir, cpu_stages(&dir, &[2, 3]));
    let got = p.greedy(7, &prompt, 5);
    assert_eq!(got, want, "the CPU stages equal the engine to the bit");
    assert!(p.relay_bytes > 0, "the stage starting on a Shared layer got a relay");
    for i in 0..2 {
        let info = p.info(i);
        assert_eq!(info.data_plane, "grpc", "CPU stage {i} negotiated gRPC to the next");
        assert_eq!(info.device, "cpu");
    }
    assert_eq!(p.info(2).data_plane, "", "the last stage sends no hidden states");
    let before = p.info(0);
    assert_eq!(before.active_sequences, 1);
    assert!(before.kv_blocks_free < before.kv_blocks_total);
    p.release(7);
    for i in 0..3 {
        let info = p.info(i);
        assert_eq!(info.active_sequences, 0, "stage {i} freed the sequence");
        assert_eq!(info.kv_blocks_free, info.kv_blocks_total, "stage {i}");
        assert_eq!(info.block_size, 16);
    }
}

#[test]
fn data_plane_offers_are_answered_or_refused_naming_the_field() {
    let dir = fixture("dsv32_pattern");
    let p = Pipeline::start(&dir, cpu_stages(&dir, &[3]));
    let nccl_offer = pb::DataPlaneOffer {
        transports: vec!["nccl".into(), "grpc".into()],
        worker_id: "gpu-peer".into(),
        device: "cuda:0".into(),
        host: "elsewhere".into(),
        nccl_unique_id: vec![7; 128],
    };
    // A GPU stage offering NCCL to a CPU stage gets gRPC, with the reason.
    let a = p.open_data_plane(1, nccl_offer.clone()).unwrap();
    assert_eq!(a.transport, "grpc");
    assert!(a.reason.contains("CPU"), "{}", a.reason);
    let grpc_only = pb::DataPlaneOffer {
        transports: vec!["grpc".into()],
        nccl_unique_id: Vec::new(),
        ..nccl_offer.clone()
    };
    assert_eq!(p.open_data_plane(1, grpc_only).unwrap().transport, "grpc");
    let bad = [
        (vec!["rdma"], 128, "`transports`", "\"rdma\""),
        (vec![], 0, "`transports`", "no transport"),
        (vec!["nccl"], 16, "`nccl_unique_id`", "16 bytes"),
    ];
    for (transports, id_len, field, what) in bad {
        let offer = pb::DataPlaneOffer {
            transports: transports.iter().map(|t| t.to_string()).collect(),
            nccl_unique_id: vec![1; id_len],
            ..nccl_offer.clone()
        };
        let e = p.open_data_plane(1, offer).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(
            e.message().contains(field) && e.message().contains(what) && e.message().contains("stage-1"),
            "{transports:?}: {}",
            e.message()
        );
    }
    // A batch that says its hidden states come over NCCL, where none was opened, fails with
    // a report naming the input (the offers above opened none).
    let prompt = first_prompt("dsv32_pattern");
    let mut p = p;
    let report = p.forward_raw(
        1,
        pb::ForwardRequest {
            segments: vec![pb::Segment {
                seq: 3,
                start: 0,
                len: prompt.len() as u32,
                ..Default::default()
            }],
            input: Some(pb::forward_request::Input::Nccl(pb::NcclPayload {
                hidden_floats: 4096,
                ..Default::default()
            })),
            ..Default::default()
        },
    );
    assert!(
        report.error.contains("stage-1") && report.error.contains("NCCL") && report.error.contains("`input`"),
        "{}",
        report.error
    );
}
