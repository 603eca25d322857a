//! How many KV blocks fit on a device: `--gpu-memory-fraction` × total memory, minus the
//! weights, minus a workspace reserve, in blocks of [`crate::kv_cache::KvCache::bytes_per_block`]
//! (the CPU cache's unit, so the coordinator admits against the same kind of number).
//!
//! Pure arithmetic, compiled and tested in every build.

use std::fmt;
use std::str::FromStr;

use crate::config::ModelConfig;
use crate::error::{Result, WorkerError};

/// Bytes in a GiB, for messages.
const GIB: f64 = (1u64 << 30) as f64;
/// Scratch the indexer's score chunks use (kernels' default budget for `indexer_topk`).
const INDEXER_SCRATCH_BYTES: usize = 256 << 20;
/// cuBLAS workspace, the CUDA context's own allocations and allocator slack.
const FIXED_RESERVE_BYTES: usize = 512 << 20;

/// `--gpu-memory-fraction`: the share of the device's total memory this worker may use, in
/// (0, 1] (default 0.9).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryFraction(f64);

impl MemoryFraction {
    /// The fraction, checked: finite, > 0 and ≤ 1; the error names the flag and the limits.
    pub fn new(f: f64) -> Result<Self> {
        if f.is_finite() && f > 0.0 && f <= 1.0 {
            Ok(MemoryFraction(f))
        } else {
            Err(WorkerError::invalid(
                "--gpu-memory-fraction",
                format!("{f} must be greater than 0 and at most 1 (a share of the device's total memory)"),
            ))
        }
    }

    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl Default for MemoryFraction {
    fn default() -> Self {
        MemoryFraction(0.9)
    }
}

impl FromStr for MemoryFraction {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let f: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("--gpu-memory-fraction {s:?} is not a number in (0, 1]"))?;
        MemoryFraction::new(f).map_err(|e| e.to_string())
    }
}

impl fmt::Display for MemoryFraction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Device memory a forward pass needs besides weights and cache: every activation buffer for
/// `prefill_chunk` rows (the widest batch), the indexer's score scratch, `logits_chunk` rows
/// of logits, and a fixed reserve for cuBLAS and the context. An upper bound, not a
/// measurement: buffers that are never alive at once are all counted.
pub fn workspace_reserve_bytes(cfg: &ModelConfig, prefill_chunk: usize, logits_chunk: usize) -> usize {
    let c = cfg;
    let (d, h) = (c.hidden_size, c.num_attention_heads);
    let (dn, dr, dv, r) = (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank);
    let inter = c
        .intermediate_size
        .max(c.moe_intermediate_size * c.n_shared_experts.max(1));
    let row_floats = 4 * d
        + 3 * c.q_lora_rank
        + h * (dn + dr + 2 * r + 2 * dv)
        + r
        + dr
        + c.index_n_heads * (c.index_head_dim + 1)
        + c.index_head_dim
        + 4 * inter
        + c.n_routed_experts
        + 2 * c.index_topk
        + 8;
    prefill_chunk * row_floats * 4 + INDEXER_SCRATCH_BYTES + 2 * logits_chunk * c.vocab_size * 4 + FIXED_RESERVE_BYTES
}

/// KV blocks that fit: `(fraction × total − weights − workspace) / bytes_per_block`. An error
/// (naming `--gpu-memory-fraction` and the figures) when not even one block fits.
pub fn device_cache_blocks(
    total_memory: usize,
    fraction: MemoryFraction,
    weight_bytes: usize,
    workspace_bytes: usize,
    bytes_per_block: usize,
) -> Result<usize> {
    if bytes_per_block == 0 {
        return Err(WorkerError::invalid(
            "bytes_per_block",
            "a KV block must hold at least one byte",
        ));
    }
    let budget = (total_memory as f64 * fraction.get()).floor() as usize;
    let used = weight_bytes.saturating_add(workspace_bytes);
    let blocks = budget.saturating_sub(used) / bytes_per_block;
    if blocks == 0 {
        return Err(WorkerError::invalid(
            "--gpu-memory-fraction",
            format!(
                "{fraction} of the device's {:.2} GiB is {:.2} GiB, but the weights take {:.2} GiB and the \
                 workspace {:.2} GiB: no room for one KV block of {bytes_per_block} bytes (raise the fraction \
                 or use a smaller layer range)",
                total_memory as f64 / GIB,
                budget as f64 / GIB,
                weight_bytes as f64 / GIB,
                workspace_bytes as f64 / GIB,
            ),
        ));
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const GB: usize = 1 << 30;

    #[test]
    fn fraction_is_checked_with_the_flag_named() {
        assert_eq!("0.5".parse::<MemoryFraction>().unwrap().get(), 0.5);
        assert_eq!("1".parse::<MemoryFraction>().unwrap().get(), 1.0);
        assert_eq!(MemoryFraction::default().get(), 0.9);
        for bad in ["0", "-0.1", "1.01", "NaN", "inf", "abc", ""] {
            let err = bad.parse::<MemoryFraction>().unwrap_err();
            assert!(err.contains("--gpu-memory-fraction"), "{bad:?}: {err}");
        }
        let err = MemoryFraction::new(2.0).unwrap_err().to_string();
        assert!(err.contains("at most 1") && err.contains("greater than 0"), "{err}");
    }

    #[test]
    fn blocks_are_what_is_left_after_weights_and_workspace() {
        // 80 GiB × 0.9 = 72 GiB; minus 40 GiB of weights and 2 GiB of workspace = 30 GiB.
        let f = MemoryFraction::new(0.9).unwrap();
        let blocks = device_cache_blocks(80 * GB, f, 40 * GB, 2 * GB, GB / 1024).unwrap();
        let budget = (80.0 * GB as f64 * 0.9).floor() as usize;
        assert_eq!(blocks, (budget - 42 * GB) / (GB / 1024));
        // A larger fraction never gives fewer blocks; larger blocks give fewer.
        let more = device_cache_blocks(80 * GB, MemoryFraction::new(1.0).unwrap(), 40 * GB, 2 * GB, GB / 1024).unwrap();
        assert!(more > blocks);
        let bigger = device_cache_blocks(80 * GB, f, 40 * GB, 2 * GB, GB / 512).unwrap();
        assert_eq!(bigger, blocks / 2);
    }

    #[test]
    fn no_room_is_an_error_naming_the_flag() {
        let f = MemoryFraction::new(0.1).unwrap();
        let err = device_cache_blocks(80 * GB, f, 40 * GB, 2 * GB, 4096)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--gpu-memory-fraction") && err.contains("no room"),
            "{err}"
        );
        // Exactly one block fits, then not even that.
        let one = device_cache_blocks(10_000, MemoryFraction::new(1.0).unwrap(), 5_000, 1_000, 4_000).unwrap();
        assert_eq!(one, 1);
        assert!(device_cache_blocks(10_000, MemoryFraction::new(1.0).unwrap(), 5_000, 1_001, 4_000).is_err());
        assert!(device_cache_blocks(10_000, f, 0, 0, 0).is_err());
    }

    #[test]
    fn workspace_grows_with_the_prefill_chunk_and_the_logits_chunk() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden/dsv32_dense");
        let cfg = ModelConfig::from_dir(&dir).unwrap();
        let base = workspace_reserve_bytes(&cfg, 1, 1);
        assert!(base >= FIXED_RESERVE_BYTES + INDEXER_SCRATCH_BYTES);
        let wide = workspace_reserve_bytes(&cfg, 2049, 1);
        // Every extra row costs at least its hidden state and its queries.
        assert!(wide - base >= 2048 * 4 * (cfg.hidden_size + cfg.num_attention_heads * cfg.kv_lora_rank));
        let logits = workspace_reserve_bytes(&cfg, 1, 65);
        assert_eq!(logits - base, 2 * 64 * cfg.vocab_size * 4);
    }
}
