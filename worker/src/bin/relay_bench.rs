//! Measures the relay's size: the top-k rows a stage ending just before a Shared layer sends
//! downstream, compressed (delta + bit-packing, `worker::relay`) vs raw int32.
//!
//! `cargo run --release -p worker --bin relay_bench -- [--contexts 4096,16384,32768] [--topk 2048]`

use std::time::Instant;

use anyhow::{Context, Result};
use worker::embedded::{write_synthetic_model, SyntheticSpec};
use worker::{relay, Architecture, LayerRange, Model, ModelConfig, Segment, StageInput};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let contexts: Vec<usize> = flag("--contexts")
        .unwrap_or_else(|| "4096,16384,32768".into())
        .split(',')
        .map(|s| s.parse().context("--contexts"))
        .collect::<Result<_>>()?;
    let topk: usize = flag("--topk").unwrap_or_else(|| "2048".into()).parse()?;
    let max_ctx = *contexts.iter().max().unwrap_or(&4096);

    // The relay depends on the selection, not on model width: a narrow two-layer model
    // ("FS", the boundary before layer 1 needs a relay) keeps the run short.
    let dir = tempfile_dir()?;
    let spec = SyntheticSpec {
        hidden_size: 128,
        layers: 2,
        heads: 2,
        q_lora_rank: 64,
        kv_lora_rank: 64,
        nope_dim: 16,
        rope_dim: 16,
        v_dim: 16,
        index_heads: 4,
        index_dim: 64,
        index_topk: topk,
        max_positions: max_ctx + 1,
        first_k_dense: 2,
        pattern: Some("FS".into()),
        ..SyntheticSpec::default_for(Architecture::DeepseekV32)
    };
    write_synthetic_model(&dir, &spec)?;
    let cfg = ModelConfig::from_dir(&dir)?;
    let stage0 = Model::load_range(&dir, cfg, None, LayerRange::new(0, 1))?;

    println!("| context | rows relayed | raw int32 bytes/token | compressed bytes/token | ratio | encode ms/1K rows |");
    println!("|---|---|---|---|---|---|");
    for &ctx in &contexts {
        let mut cache = stage0.new_cache(64, ctx.div_ceil(64) + 1);
        let chunk = 2048;
        let (mut raw, mut packed, mut rows, mut enc_s) = (0usize, 0usize, 0usize, 0.0f64);
        let mut start = 0;
        let mut x = 12345u64;
        while start < ctx {
            let len = chunk.min(ctx - start);
            let tokens: Vec<u32> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % 256) as u32
                })
                .collect();
            let seg = Segment {
                seq: 1,
                start,
                len,
                relay: None,
            };
            let out = stage0.forward(&mut cache, &[seg], StageInput::Tokens(tokens))?;
            let r = out.relay[0]
                .as_ref()
                .context("stage before a Shared layer must relay")?;
            let t0 = Instant::now();
            let bytes = relay::encode(r, start);
            enc_s += t0.elapsed().as_secs_f64();
            raw += relay::raw_bytes(r);
            packed += bytes.len();
            rows += r.len();
            start += len;
        }
        println!(
            "| {ctx} | {rows} | {:.0} | {:.0} | {:.2}x | {:.2} |",
            raw as f64 / rows as f64,
            packed as f64 / rows as f64,
            raw as f64 / packed as f64,
            enc_s * 1e3 / (rows as f64 / 1000.0)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("indexrelay-relay-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
