//! Command-line arguments of `dsa_bench` and of its per-configuration child processes.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use worker::embedded::SyntheticSpec;
use worker::Architecture;

#[derive(Parser)]
#[command(
    name = "dsa_bench",
    about = "Prefill/decode benchmark of the DSA engine: all-Full vs IndexCache, vs HF transformers",
    args_conflicts_with_subcommands = true
)]
pub(crate) struct Cli {
    /// Internal subcommands (the orchestrator runs when none is given).
    #[command(subcommand)]
    pub(crate) cmd: Option<Cmd>,
    /// Orchestrator options.
    #[command(flatten)]
    pub(crate) run: RunArgs,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Measures one configuration in this process and prints one JSON result line.
    #[command(hide = true)]
    Child(ChildArgs),
    /// Diagnostic: how local the indexer's top-k selections of some layers are (how many
    /// KV-cache blocks a row's selection touches), over the last prefill chunk.
    SelectionStats(SelectionArgs),
}

/// Options of the `selection-stats` diagnostic.
#[derive(Args, Clone, Debug)]
pub(crate) struct SelectionArgs {
    /// Prompt length; statistics cover the rows of the last chunk.
    #[arg(long, default_value_t = 16384)]
    pub(crate) context: usize,
    /// Layers whose own selection is measured (each must have a layer after it).
    #[arg(long, value_delimiter = ',', default_value = "0,2,4,6")]
    pub(crate) layers: Vec<usize>,
    /// Prefill chunk.
    #[arg(long, default_value_t = 2048)]
    pub(crate) chunk: usize,
    /// KV-cache block size (also the unit of "blocks touched").
    #[arg(long, default_value_t = 64)]
    pub(crate) block_size: usize,
    /// Seed of the random prompt (the benchmark's default prompt).
    #[arg(long, default_value_t = 1)]
    pub(crate) prompt_seed: u64,
    /// Use this checkpoint instead of writing a synthetic one.
    #[arg(long)]
    pub(crate) model_dir: Option<PathBuf>,
    /// Model shape of the synthetic checkpoint.
    #[command(flatten)]
    pub(crate) shape: ShapeArgs,
}

/// Options of the orchestrator (the default mode).
#[derive(Args, Clone, Debug)]
pub(crate) struct RunArgs {
    /// Prompt lengths to prefill (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "4096,16384,32768")]
    pub(crate) contexts: Vec<usize>,
    /// Patterns to compare: `full` (the checkpoint's all-Full), `quarter` (FSSS repeated),
    /// or explicit F/S strings, one letter per layer.
    #[arg(long, value_delimiter = ',', default_value = "full,quarter")]
    pub(crate) patterns: Vec<String>,
    /// Context at which decode is measured (0: no decode).
    #[arg(long, default_value_t = 16384)]
    pub(crate) decode_context: usize,
    /// Greedy decode steps after the prefill at `--decode-context`.
    #[arg(long, default_value_t = 16)]
    pub(crate) decode_tokens: usize,
    /// Prefill chunk (rows per forward call).
    #[arg(long, default_value_t = 2048)]
    pub(crate) chunk: usize,
    /// KV-cache block size (positions).
    #[arg(long, default_value_t = 64)]
    pub(crate) block_size: usize,
    /// Seed of the random prompt.
    #[arg(long, default_value_t = 1)]
    pub(crate) prompt_seed: u64,
    /// Use this checkpoint instead of writing a synthetic one (the shape flags are then
    /// ignored except `--layers`, which must match it).
    #[arg(long)]
    pub(crate) model_dir: Option<PathBuf>,
    /// Keep the synthetic checkpoint and scratch files (their folder is printed).
    #[arg(long)]
    pub(crate) keep_model: bool,
    /// Model shape.
    #[command(flatten)]
    pub(crate) shape: ShapeArgs,
    /// Also run HF transformers on the same checkpoint and prompt.
    #[arg(long)]
    pub(crate) hf: bool,
    /// Python interpreter with torch + transformers.
    #[arg(long, default_value = "/opt/hfenv/bin/python")]
    pub(crate) python: PathBuf,
    /// The HF comparison script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/hf_compare.py"))]
    pub(crate) hf_script: PathBuf,
    /// Torch threads for HF.
    #[arg(long, default_value_t = 2)]
    pub(crate) hf_threads: usize,
    /// HF attention implementation: `eager` (what the golden fixtures use) or `sdpa` (HF's
    /// default for DSA models).
    #[arg(long, default_value = "eager", value_parser = ["eager", "sdpa"])]
    pub(crate) hf_attn: String,
    /// Contexts at which HF runs (comma-separated; each is also run by the engine, all-Full).
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    pub(crate) hf_contexts: Vec<usize>,
    /// Also try HF at this context under `--hf-mem-limit-gb` and report whether it ran out of
    /// memory.
    #[arg(long)]
    pub(crate) hf_oom_context: Option<usize>,
    /// Address-space limit (GB) for the `--hf-oom-context` run; the script lowers it further
    /// so that at least 2 GiB of the machine stay free.
    #[arg(long, default_value_t = 22.0)]
    pub(crate) hf_mem_limit_gb: f64,
    /// Run every engine configuration this many times (interleaved) and keep the fastest.
    #[arg(long, default_value_t = 1)]
    pub(crate) repeats: usize,
    /// Run HF this many times per `--hf-contexts` entry (at most `--repeats`), each right
    /// after one round of engine runs so both sides see the same drift of a shared host;
    /// the fastest HF run is compared with the fastest engine run.
    #[arg(long, default_value_t = 1)]
    pub(crate) hf_repeats: usize,
    /// Before each engine run, wait until other processes use less than this many cores
    /// (averaged over 5 s), so that the runs see an otherwise idle machine (0: don't wait).
    #[arg(long, default_value_t = 0.25)]
    pub(crate) quiet_below: f64,
    /// Longest wait for a quiet machine before a run starts anyway (seconds).
    #[arg(long, default_value_t = 900)]
    pub(crate) quiet_max_wait: u64,
    /// Write every result as JSON here.
    #[arg(long)]
    pub(crate) json_out: Option<PathBuf>,
}

/// Shape of the synthetic checkpoint (defaults: DeepSeek-V3.2 proportions, scaled down).
#[derive(Args, Clone, Debug)]
pub(crate) struct ShapeArgs {
    /// Decoder layers.
    #[arg(long, default_value_t = 8)]
    pub(crate) layers: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 1024)]
    pub(crate) hidden: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 16)]
    pub(crate) heads: usize,
    /// q_lora_rank.
    #[arg(long, default_value_t = 768)]
    pub(crate) q_lora_rank: usize,
    /// kv_lora_rank.
    #[arg(long, default_value_t = 512)]
    pub(crate) kv_lora_rank: usize,
    /// qk_nope_head_dim.
    #[arg(long, default_value_t = 128)]
    pub(crate) nope_dim: usize,
    /// qk_rope_head_dim.
    #[arg(long, default_value_t = 64)]
    pub(crate) rope_dim: usize,
    /// v_head_dim.
    #[arg(long, default_value_t = 128)]
    pub(crate) v_dim: usize,
    /// Indexer heads.
    #[arg(long, default_value_t = 16)]
    pub(crate) index_heads: usize,
    /// Indexer head dimension.
    #[arg(long, default_value_t = 128)]
    pub(crate) index_dim: usize,
    /// Keys kept per query row by the indexer.
    #[arg(long, default_value_t = 2048)]
    pub(crate) index_topk: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 32768)]
    pub(crate) vocab: usize,
    /// max_position_embeddings.
    #[arg(long, default_value_t = 40000)]
    pub(crate) max_positions: usize,
    /// Routed experts.
    #[arg(long, default_value_t = 8)]
    pub(crate) experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    pub(crate) experts_per_tok: usize,
    /// Expert groups.
    #[arg(long, default_value_t = 4)]
    pub(crate) n_group: usize,
    /// Expert groups kept per token.
    #[arg(long, default_value_t = 2)]
    pub(crate) topk_group: usize,
    /// Expert intermediate size.
    #[arg(long, default_value_t = 512)]
    pub(crate) moe_intermediate: usize,
    /// Dense MLP intermediate size (the first `--first-k-dense` layers).
    #[arg(long, default_value_t = 2048)]
    pub(crate) intermediate: usize,
    /// Leading dense layers.
    #[arg(long, default_value_t = 1)]
    pub(crate) first_k_dense: usize,
    /// Weight seed.
    #[arg(long, default_value_t = 20261128)]
    pub(crate) weight_seed: u64,
}

impl ShapeArgs {
    pub(crate) fn spec(&self) -> SyntheticSpec {
        SyntheticSpec {
            arch: Architecture::DeepseekV32,
            vocab_size: self.vocab,
            hidden_size: self.hidden,
            layers: self.layers,
            heads: self.heads,
            q_lora_rank: self.q_lora_rank,
            kv_lora_rank: self.kv_lora_rank,
            nope_dim: self.nope_dim,
            rope_dim: self.rope_dim,
            v_dim: self.v_dim,
            intermediate_size: self.intermediate,
            moe_intermediate_size: self.moe_intermediate,
            experts: self.experts,
            experts_per_tok: self.experts_per_tok,
            n_group: self.n_group,
            topk_group: self.topk_group,
            first_k_dense: self.first_k_dense,
            index_heads: self.index_heads,
            index_dim: self.index_dim,
            index_topk: self.index_topk,
            max_positions: self.max_positions,
            pattern: None,
            seed: self.weight_seed,
        }
    }
}

/// Options of one measured configuration.
#[derive(Args, Clone, Debug)]
pub(crate) struct ChildArgs {
    /// Checkpoint folder.
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// JSON array of prompt ids (the first `--context` are used).
    #[arg(long)]
    pub(crate) prompt: PathBuf,
    /// Prompt length.
    #[arg(long)]
    pub(crate) context: usize,
    /// IndexCache pattern override (none: the checkpoint's).
    #[arg(long)]
    pub(crate) pattern: Option<String>,
    /// Prefill chunk.
    #[arg(long)]
    pub(crate) chunk: usize,
    /// KV-cache block size.
    #[arg(long)]
    pub(crate) block_size: usize,
    /// Greedy decode steps after the prefill.
    #[arg(long, default_value_t = 0)]
    pub(crate) decode_tokens: usize,
    /// Write the last prompt position's logits here (raw little-endian f32).
    #[arg(long)]
    pub(crate) logits_out: Option<PathBuf>,
    /// Untimed warm-up forward over this many prompt ids (another sequence, released).
    #[arg(long, default_value_t = 16)]
    pub(crate) warmup_tokens: usize,
}
