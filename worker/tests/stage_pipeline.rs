//! The stage server path on the CPU: stages served in process (`worker::stage::serve` over
//! [`CpuStage`]), chained over loopback gRPC, give the single-process engine's greedy tokens
//! and logprobs to the bit, relaying top-k indices where a stage starts on a Shared layer.

mod support;

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
