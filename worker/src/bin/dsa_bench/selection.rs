//! The `selection` diagnostic: how local the indexer's top-k selections are.

use anyhow::{bail, Result};

use worker::embedded::write_synthetic_model;
use worker::sampling::Rng;
use worker::{Model, Segment, StageInput};

use crate::args::SelectionArgs;

/// Prints, per layer, how local its selections are: rows of the last chunk with more visible
/// keys than `index_topk`, the KV-cache blocks a row's selection touches (the minimum is
/// `index_topk / block_size`), the share of selected keys whose predecessor is also
/// selected, and the share within the last `index_topk` positions.
///
/// A layer's own selection is observed through the public API as the relay of the range
/// `[0, layer + 1)` loaded with a pattern that is all Full except layer `layer + 1`.
pub(crate) fn selection_stats(a: &SelectionArgs) -> Result<()> {
    let scratch = std::env::temp_dir().join(format!("dsa-bench-sel-{}", std::process::id()));
    let dir = match &a.model_dir {
        Some(d) => d.clone(),
        None => {
            write_synthetic_model(&scratch, &a.shape.spec())?;
            scratch.clone()
        }
    };
    let cfg = worker::ModelConfig::from_dir(&dir)?;
    let n = cfg.num_hidden_layers;
    let topk = cfg.index_topk;
    let mut rng = Rng::new(a.prompt_seed);
    let ids: Vec<u32> = (0..a.context)
        .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
        .collect();
    println!(
        "| layer | rows | blocks touched per row (min {}) | selected keys next to a selected key | in the last {topk} \
         positions |",
        topk.div_ceil(a.block_size)
    );
    println!("|---:|---:|---:|---:|---:|");
    for &l in &a.layers {
        if l + 1 >= n {
            bail!("layer {l}: a layer after it is needed to observe its selection");
        }
        let pattern: String = (0..n).map(|i| if i == l + 1 { 'S' } else { 'F' }).collect();
        let model = Model::load_range(&dir, cfg.clone(), Some(&pattern), worker::LayerRange::new(0, l + 1))?;
        let mut cache = model.new_cache(a.block_size, a.context.div_ceil(a.block_size));
        let mut last = None;
        for (ci, chunk) in ids.chunks(a.chunk.max(1)).enumerate() {
            let seg = Segment {
                seq: 0,
                start: ci * a.chunk.max(1),
                len: chunk.len(),
                relay: None,
            };
            let out = model.forward(
                &mut cache,
                std::slice::from_ref(&seg),
                StageInput::Tokens(chunk.to_vec()),
            )?;
            last = out.relay.into_iter().next().flatten().map(|rows| (seg, rows));
        }
        let Some((seg, rows)) = last else {
            bail!("layer {l}: no selection was relayed");
        };
        let (mut n_rows, mut blocks, mut adjacent, mut recent, mut keys) = (0usize, 0usize, 0usize, 0usize, 0usize);
        for (i, row) in rows.iter().enumerate() {
            let t = seg.start + i;
            if t < topk {
                continue;
            }
            n_rows += 1;
            keys += row.len();
            let mut prev_block = usize::MAX;
            for (j, &p) in row.iter().enumerate() {
                let b = p as usize / a.block_size;
                if b != prev_block {
                    blocks += 1;
                    prev_block = b;
                }
                if j > 0 && row[j - 1] + 1 == p {
                    adjacent += 1;
                }
                if p as usize + topk > t {
                    recent += 1;
                }
            }
        }
        let nr = n_rows.max(1) as f64;
        let nk = keys.max(1) as f64;
        println!(
            "| {l} | {n_rows} | {:.1} | {:.1}% | {:.1}% |",
            blocks as f64 / nr,
            100.0 * adjacent as f64 / nk,
            100.0 * recent as f64 / nk
        );
    }
    if a.model_dir.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok(())
}
