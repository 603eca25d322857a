//! `dsa_bench`: end-to-end benchmark of the CPU engine on a synthetic DeepSeek-V3.2-shaped
//! checkpoint, all-Full versus an IndexCache pattern, optionally side by side with HF
//! transformers.
//!
//! What it measures (results go to `docs/PERFORMANCE.md`):
//! - **Prefill** time at each `--contexts` length through [`Model::forward`] with chunked
//!   prefill (consecutive `--chunk`-token segments of one sequence), plus the last row's
//!   logits. [`worker::StageOutput::indexer_seconds`] gives the lightning indexer's share
//!   `f` of all-Full prefill; removing a fraction `r` of the indexers (r = 0.75 for the 1/4
//!   pattern `FSSSFSSS`) can at best speed prefill up by `1 / (1 − r·f)`. The benchmark
//!   reports that bound, the measured speed-up, and their ratio.
//! - **Decode** tokens/s at `--decode-context`: after the prefill, `--decode-tokens` greedy
//!   steps of one row each through [`Model::forward`] + [`Model::logits`].
//! - **Peak RSS** of each configuration: every configuration runs in its own child process
//!   (this binary re-invoked with the hidden `child` subcommand), which reports `VmHWM` from
//!   `/proc/self/status` once after loading and once after inference (the high-water mark
//!   is reset in between through `/proc/self/clear_refs`, so load and inference peaks are
//!   told apart).
//! - With `--hf`: the same checkpoint and prompt ids through HF transformers on CPU
//!   (`scripts/hf_compare.py`, run as a child process), its prefill time and peak RSS next
//!   to the engine's, and the largest absolute difference of the last position's logits.
//!   `--hf-repeats N` runs HF after each of the first N rounds of engine runs and compares
//!   fastest with fastest, so a drifting host slows both sides alike.
//!   `--hf-oom-context` additionally tries HF at a longer context under an address-space
//!   limit and reports whether it ran out of memory.
//!
//! The checkpoint is written with [`write_synthetic_model`] into a scratch folder (removed
//! at the end unless `--keep-model`), or taken from `--model-dir`.
//!
//! Quick run: `dsa_bench --contexts 4096 --decode-context 4096 --layers 4`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};

use kernels::{MlaDims, MlaKeyPlan};
use worker::embedded::{write_synthetic_model, SyntheticSpec};
use worker::sampling::{argmax, Rng};
use worker::{Architecture, Model, Segment, StageInput};

/// The same allocator as the `worker` binary, so the engine is measured as it serves.
#[global_allocator]
static ALLOC: worker::huge_pages::HugePageAlloc = worker::huge_pages::HugePageAlloc;

/// Prefix of the one stdout line a child prints its result on.
const RESULT_MARKER: &str = "DSA_BENCH_RESULT ";

/// `USER_HZ`: the unit of `/proc/self/stat` CPU times (100 on Linux x86-64).
const CLOCK_TICKS: f64 = 100.0;

/// Sequence id of the child's untimed warm-up forward.
const WARMUP_SEQ: u64 = 1;

/// Pattern names the `--patterns` flag understands besides explicit F/S strings.
const PATTERN_FULL: &str = "full";
/// One Full layer in four: `FSSS` repeated over the layers.
const PATTERN_QUARTER: &str = "quarter";

#[derive(Parser)]
#[command(
    name = "dsa_bench",
    about = "Prefill/decode benchmark of the DSA engine: all-Full vs IndexCache, vs HF transformers",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Internal subcommands (the orchestrator runs when none is given).
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Orchestrator options.
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Measures one configuration in this process and prints one JSON result line.
    #[command(hide = true)]
    Child(ChildArgs),
    /// Diagnostic: how local the indexer's top-k selections of some layers are (how many
    /// KV-cache blocks a row's selection touches), over the last prefill chunk.
    SelectionStats(SelectionArgs),
}

/// Options of the `selection-stats` diagnostic.
#[derive(Args, Clone, Debug)]
struct SelectionArgs {
    /// Prompt length; statistics cover the rows of the last chunk.
    #[arg(long, default_value_t = 16384)]
    context: usize,
    /// Layers whose own selection is measured (each must have a layer after it).
    #[arg(long, value_delimiter = ',', default_value = "0,2,4,6")]
    layers: Vec<usize>,
    /// Prefill chunk.
    #[arg(long, default_value_t = 2048)]
    chunk: usize,
    /// KV-cache block size (also the unit of "blocks touched").
    #[arg(long, default_value_t = 64)]
    block_size: usize,
    /// Seed of the random prompt (the benchmark's default prompt).
    #[arg(long, default_value_t = 1)]
    prompt_seed: u64,
    /// Use this checkpoint instead of writing a synthetic one.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Model shape of the synthetic checkpoint.
    #[command(flatten)]
    shape: ShapeArgs,
}

/// Options of the orchestrator (the default mode).
#[derive(Args, Clone, Debug)]
struct RunArgs {
    /// Prompt lengths to prefill (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "4096,16384,32768")]
    contexts: Vec<usize>,
    /// Patterns to compare: `full` (the checkpoint's all-Full), `quarter` (FSSS repeated),
    /// or explicit F/S strings, one letter per layer.
    #[arg(long, value_delimiter = ',', default_value = "full,quarter")]
    patterns: Vec<String>,
    /// Context at which decode is measured (0: no decode).
    #[arg(long, default_value_t = 16384)]
    decode_context: usize,
    /// Greedy decode steps after the prefill at `--decode-context`.
    #[arg(long, default_value_t = 16)]
    decode_tokens: usize,
    /// Prefill chunk (rows per forward call).
    #[arg(long, default_value_t = 2048)]
    chunk: usize,
    /// KV-cache block size (positions).
    #[arg(long, default_value_t = 64)]
    block_size: usize,
    /// Seed of the random prompt.
    #[arg(long, default_value_t = 1)]
    prompt_seed: u64,
    /// Use this checkpoint instead of writing a synthetic one (the shape flags are then
    /// ignored except `--layers`, which must match it).
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Keep the synthetic checkpoint and scratch files (their folder is printed).
    #[arg(long)]
    keep_model: bool,
    /// Model shape.
    #[command(flatten)]
    shape: ShapeArgs,
    /// Also run HF transformers on the same checkpoint and prompt.
    #[arg(long)]
    hf: bool,
    /// Python interpreter with torch + transformers.
    #[arg(long, default_value = "/opt/hfenv/bin/python")]
    python: PathBuf,
    /// The HF comparison script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/hf_compare.py"))]
    hf_script: PathBuf,
    /// Torch threads for HF.
    #[arg(long, default_value_t = 2)]
    hf_threads: usize,
    /// HF attention implementation: `eager` (what the golden fixtures use) or `sdpa` (HF's
    /// default for DSA models).
    #[arg(long, default_value = "eager", value_parser = ["eager", "sdpa"])]
    hf_attn: String,
    /// Contexts at which HF runs (comma-separated; each is also run by the engine, all-Full).
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    hf_contexts: Vec<usize>,
    /// Also try HF at this context under `--hf-mem-limit-gb` and report whether it ran out of
    /// memory.
    #[arg(long)]
    hf_oom_context: Option<usize>,
    /// Address-space limit (GB) for the `--hf-oom-context` run; the script lowers it further
    /// so that at least 2 GiB of the machine stay free.
    #[arg(long, default_value_t = 22.0)]
    hf_mem_limit_gb: f64,
    /// Run every engine configuration this many times (interleaved) and keep the fastest.
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Run HF this many times per `--hf-contexts` entry (at most `--repeats`), each right
    /// after one round of engine runs so both sides see the same drift of a shared host;
    /// the fastest HF run is compared with the fastest engine run.
    #[arg(long, default_value_t = 1)]
    hf_repeats: usize,
    /// Before each engine run, wait until other processes use less than this many cores
    /// (averaged over 5 s), so that the runs see an otherwise idle machine (0: don't wait).
    #[arg(long, default_value_t = 0.25)]
    quiet_below: f64,
    /// Longest wait for a quiet machine before a run starts anyway (seconds).
    #[arg(long, default_value_t = 900)]
    quiet_max_wait: u64,
    /// Write every result as JSON here.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

/// Shape of the synthetic checkpoint (defaults: DeepSeek-V3.2 proportions, scaled down).
#[derive(Args, Clone, Debug)]
struct ShapeArgs {
    /// Decoder layers.
    #[arg(long, default_value_t = 8)]
    layers: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 16)]
    heads: usize,
    /// q_lora_rank.
    #[arg(long, default_value_t = 768)]
    q_lora_rank: usize,
    /// kv_lora_rank.
    #[arg(long, default_value_t = 512)]
    kv_lora_rank: usize,
    /// qk_nope_head_dim.
    #[arg(long, default_value_t = 128)]
    nope_dim: usize,
    /// qk_rope_head_dim.
    #[arg(long, default_value_t = 64)]
    rope_dim: usize,
    /// v_head_dim.
    #[arg(long, default_value_t = 128)]
    v_dim: usize,
    /// Indexer heads.
    #[arg(long, default_value_t = 16)]
    index_heads: usize,
    /// Indexer head dimension.
    #[arg(long, default_value_t = 128)]
    index_dim: usize,
    /// Keys kept per query row by the indexer.
    #[arg(long, default_value_t = 2048)]
    index_topk: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 32768)]
    vocab: usize,
    /// max_position_embeddings.
    #[arg(long, default_value_t = 40000)]
    max_positions: usize,
    /// Routed experts.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    experts_per_tok: usize,
    /// Expert groups.
    #[arg(long, default_value_t = 4)]
    n_group: usize,
    /// Expert groups kept per token.
    #[arg(long, default_value_t = 2)]
    topk_group: usize,
    /// Expert intermediate size.
    #[arg(long, default_value_t = 512)]
    moe_intermediate: usize,
    /// Dense MLP intermediate size (the first `--first-k-dense` layers).
    #[arg(long, default_value_t = 2048)]
    intermediate: usize,
    /// Leading dense layers.
    #[arg(long, default_value_t = 1)]
    first_k_dense: usize,
    /// Weight seed.
    #[arg(long, default_value_t = 20261128)]
    weight_seed: u64,
}

impl ShapeArgs {
    fn spec(&self) -> SyntheticSpec {
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
struct ChildArgs {
    /// Checkpoint folder.
    #[arg(long)]
    model: PathBuf,
    /// JSON array of prompt ids (the first `--context` are used).
    #[arg(long)]
    prompt: PathBuf,
    /// Prompt length.
    #[arg(long)]
    context: usize,
    /// IndexCache pattern override (none: the checkpoint's).
    #[arg(long)]
    pattern: Option<String>,
    /// Prefill chunk.
    #[arg(long)]
    chunk: usize,
    /// KV-cache block size.
    #[arg(long)]
    block_size: usize,
    /// Greedy decode steps after the prefill.
    #[arg(long, default_value_t = 0)]
    decode_tokens: usize,
    /// Write the last prompt position's logits here (raw little-endian f32).
    #[arg(long)]
    logits_out: Option<PathBuf>,
    /// Untimed warm-up forward over this many prompt ids (another sequence, released).
    #[arg(long, default_value_t = 16)]
    warmup_tokens: usize,
}

/// What one child measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ChildResult {
    /// Prompt length.
    context: usize,
    /// The active pattern (one letter per layer).
    pattern: String,
    /// Rayon threads.
    threads: usize,
    /// Model load time.
    load_seconds: f64,
    /// VmRSS right after loading (bytes).
    rss_after_load: u64,
    /// VmHWM after loading: the peak of the load phase (bytes).
    peak_rss_load: u64,
    /// Whether the high-water mark could be reset after loading.
    hwm_reset: bool,
    /// VmHWM at the end: the peak of prefill + decode when the reset worked (bytes).
    peak_rss_inference: u64,
    /// Whole-process peak: max of the two (bytes).
    peak_rss: u64,
    /// Prefill wall time: every chunk's forward plus the last row's logits.
    prefill_seconds: f64,
    /// Indexer wall time inside the prefill.
    prefill_indexer_seconds: f64,
    /// Wall time of attention over the selected keys inside the prefill.
    prefill_attention_seconds: f64,
    /// CPU seconds (all threads) used by the prefill.
    prefill_cpu_seconds: f64,
    /// CPU seconds other processes used on the machine during the prefill.
    prefill_other_cpu_seconds: f64,
    /// Wall time of each prefill chunk's forward.
    chunk_seconds: Vec<f64>,
    /// Indexer time of each prefill chunk.
    chunk_indexer_seconds: Vec<f64>,
    /// Full layers run per forward call.
    full_layers: usize,
    /// Shared layers run per forward call.
    shared_layers: usize,
    /// Greedy token after the prompt.
    first_token: u32,
    /// Decode steps run.
    decode_tokens: usize,
    /// Wall time of the decode steps (forward + logits + argmax each).
    decode_seconds: f64,
    /// Indexer time inside decode.
    decode_indexer_seconds: f64,
    /// CPU seconds (all threads) of the decode steps.
    decode_cpu_seconds: f64,
    /// CPU seconds other processes used on the machine during decode.
    decode_other_cpu_seconds: f64,
    /// KV-cache storage allocated at the end (bytes).
    cache_bytes: u64,
}

/// One field of `/proc/self/status`, in bytes (0 when unavailable).
fn proc_status_bytes(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// CPU time (user + system, all threads) this process has used, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |x| x.1);
    let f: Vec<f64> = rest.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    // `rest` starts at field 3 (the state letter, which does not parse), so field n is f[n - 4].
    match (f.get(10), f.get(11)) {
        (Some(u), Some(s)) => (u + s) / CLOCK_TICKS,
        _ => 0.0,
    }
}

/// Busy CPU seconds of the whole machine (all cores, everything but idle and I/O wait) from
/// `/proc/stat`; minus this process's own CPU time it is what other processes used.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find_map(|l| l.strip_prefix("cpu ")) else {
        return 0.0;
    };
    let v: Vec<f64> = cpu.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...: drop idle (3) and iowait (4).
    let busy: f64 = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum();
    busy / CLOCK_TICKS
}

/// Resets this process's peak-RSS high-water mark (`VmHWM`) to the current RSS.
fn reset_hwm() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn read_prompt(path: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a JSON array of ids", path.display()))
}

fn write_f32(path: &Path, v: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn read_f32(path: &Path) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The child: load, prefill in chunks, optionally decode; print one result line.
fn child(a: &ChildArgs) -> Result<()> {
    let t = Instant::now();
    let model =
        Model::load(&a.model, a.pattern.as_deref()).with_context(|| format!("loading {}", a.model.display()))?;
    let load_seconds = t.elapsed().as_secs_f64();
    let rss_after_load = proc_status_bytes("VmRSS");
    let peak_rss_load = proc_status_bytes("VmHWM");
    let hwm_reset = reset_hwm();

    let prompt = read_prompt(&a.prompt)?;
    if prompt.len() < a.context {
        bail!(
            "{} holds {} ids, fewer than --context {}",
            a.prompt.display(),
            prompt.len(),
            a.context
        );
    }
    let prompt = &prompt[..a.context];
    let cfg = model.config();
    let (d, vocab) = (cfg.hidden_size, cfg.vocab_size);
    let pattern: String = (0..cfg.num_hidden_layers)
        .map(|i| if model.pattern().is_full(i) { 'F' } else { 'S' })
        .collect();
    let total = a.context + a.decode_tokens;
    let mut cache = model.new_cache(a.block_size, total.div_ceil(a.block_size).max(1));

    // Untimed warm-up on another sequence: rayon pool start, first-touch page faults.
    if a.warmup_tokens > 0 {
        let n = a.warmup_tokens.min(a.context);
        let seg = Segment {
            seq: WARMUP_SEQ,
            start: 0,
            len: n,
            relay: None,
        };
        model.forward(&mut cache, &[seg], StageInput::Tokens(prompt[..n].to_vec()))?;
        cache.release(WARMUP_SEQ);
    }

    let (mut chunk_seconds, mut chunk_indexer_seconds) = (Vec::new(), Vec::new());
    let mut prefill_attention_seconds = 0.0;
    let (mut full_layers, mut shared_layers) = (0, 0);
    let mut last_hidden = Vec::new();
    let (cpu0, busy0) = (cpu_seconds(), machine_busy_seconds());
    let t = Instant::now();
    let n_chunks = prompt.len().div_ceil(a.chunk.max(1));
    for (ci, ids) in prompt.chunks(a.chunk.max(1)).enumerate() {
        let seg = Segment {
            seq: 0,
            start: ci * a.chunk.max(1),
            len: ids.len(),
            relay: None,
        };
        // As the engine runs a prompt for generation: only the last chunk's last row has its
        // logits read, so only that row runs the final layer's attention and MLP.
        let rows = if ci + 1 == n_chunks {
            vec![ids.len() - 1]
        } else {
            Vec::new()
        };
        let tc = Instant::now();
        let (out, _) = model.forward_for_rows(
            &mut cache,
            &[seg],
            &[model.pattern()],
            StageInput::Tokens(ids.to_vec()),
            &rows,
        )?;
        chunk_seconds.push(tc.elapsed().as_secs_f64());
        chunk_indexer_seconds.push(out.indexer_seconds);
        prefill_attention_seconds += out.attention_seconds;
        full_layers = out.full_layers_run;
        shared_layers = out.shared_layers_run;
        if !out.hidden.is_empty() {
            last_hidden = out.hidden[out.hidden.len() - d..].to_vec();
        }
    }
    let logits = model.logits(&last_hidden, 1)?;
    let prefill_seconds = t.elapsed().as_secs_f64();
    let prefill_cpu_seconds = cpu_seconds() - cpu0;
    let prefill_other_cpu_seconds = (machine_busy_seconds() - busy0 - prefill_cpu_seconds).max(0.0);
    if let Some(p) = &a.logits_out {
        write_f32(p, &logits[..vocab])?;
    }
    let first_token = argmax(&logits[..vocab]);

    let (mut decode_seconds, mut decode_indexer_seconds) = (0.0, 0.0);
    let (cpu0, busy0) = (cpu_seconds(), machine_busy_seconds());
    let mut next = first_token;
    for step in 0..a.decode_tokens {
        let seg = Segment {
            seq: 0,
            start: a.context + step,
            len: 1,
            relay: None,
        };
        let t = Instant::now();
        let out = model.forward(&mut cache, &[seg], StageInput::Tokens(vec![next]))?;
        let logits = model.logits(&out.hidden, 1)?;
        next = argmax(&logits);
        decode_seconds += t.elapsed().as_secs_f64();
        decode_indexer_seconds += out.indexer_seconds;
    }
    let decode_cpu_seconds = cpu_seconds() - cpu0;
    let decode_other_cpu_seconds = (machine_busy_seconds() - busy0 - decode_cpu_seconds).max(0.0);

    let peak_rss_inference = proc_status_bytes("VmHWM");
    let r = ChildResult {
        context: a.context,
        pattern,
        threads: rayon::current_num_threads(),
        load_seconds,
        rss_after_load,
        peak_rss_load,
        hwm_reset,
        peak_rss_inference,
        peak_rss: peak_rss_load.max(peak_rss_inference),
        prefill_seconds,
        prefill_indexer_seconds: chunk_indexer_seconds.iter().sum(),
        prefill_attention_seconds,
        prefill_cpu_seconds,
        prefill_other_cpu_seconds,
        chunk_seconds,
        chunk_indexer_seconds,
        full_layers,
        shared_layers,
        first_token,
        decode_tokens: a.decode_tokens,
        decode_seconds,
        decode_indexer_seconds,
        decode_cpu_seconds,
        decode_other_cpu_seconds,
        cache_bytes: cache.allocated_bytes() as u64,
    };
    println!("{RESULT_MARKER}{}", serde_json::to_string(&r)?);
    Ok(())
}

/// A pattern as the user named it and as passed to the child.
#[derive(Clone, Debug, Serialize)]
struct PatternChoice {
    /// Display name.
    label: String,
    /// The override passed to `Model::load` (`None`: the checkpoint's all-Full).
    override_pattern: Option<String>,
    /// Fraction of layers that are Shared (indexers removed).
    removed: f64,
}

fn resolve_pattern(name: &str, layers: usize) -> Result<PatternChoice> {
    let letters = match name {
        PATTERN_FULL => {
            return Ok(PatternChoice {
                label: "all-Full".into(),
                override_pattern: None,
                removed: 0.0,
            })
        }
        PATTERN_QUARTER => "FSSS".chars().cycle().take(layers).collect::<String>(),
        explicit => explicit.to_string(),
    };
    if letters.len() != layers || !letters.chars().all(|c| c == 'F' || c == 'S') {
        bail!("pattern `{name}` must be `full`, `quarter` or {layers} letters F/S");
    }
    let shared = letters.chars().filter(|&c| c == 'S').count();
    Ok(PatternChoice {
        label: letters.clone(),
        override_pattern: Some(letters),
        removed: shared as f64 / layers as f64,
    })
}

/// Runs this binary as a child for one configuration.
fn spawn_child(args: &ChildArgs) -> Result<ChildResult> {
    let exe = std::env::current_exe().context("locating the benchmark binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("child")
        .arg("--model")
        .arg(&args.model)
        .arg("--prompt")
        .arg(&args.prompt)
        .arg("--context")
        .arg(args.context.to_string())
        .arg("--chunk")
        .arg(args.chunk.to_string())
        .arg("--block-size")
        .arg(args.block_size.to_string())
        .arg("--decode-tokens")
        .arg(args.decode_tokens.to_string())
        .arg("--warmup-tokens")
        .arg(args.warmup_tokens.to_string());
    if let Some(p) = &args.pattern {
        cmd.arg("--pattern").arg(p);
    }
    if let Some(p) = &args.logits_out {
        cmd.arg("--logits-out").arg(p);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running a benchmark child")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("benchmark child failed ({}): {stdout}", out.status);
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(RESULT_MARKER))
        .context("benchmark child printed no result")?;
    Ok(serde_json::from_str(line)?)
}

/// What `scripts/hf_compare.py` printed (fields it may omit are optional).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct HfResult {
    /// Prompt length.
    #[serde(default)]
    context: usize,
    /// Torch threads.
    #[serde(default)]
    threads: usize,
    /// transformers version.
    #[serde(default)]
    transformers: String,
    /// Experts implementation used.
    #[serde(default)]
    experts_implementation: String,
    /// Attention implementation used.
    #[serde(default)]
    attn_implementation: String,
    /// Load time.
    #[serde(default)]
    load_seconds: f64,
    /// Prefill forward time (absent on OOM).
    prefill_seconds: Option<f64>,
    /// CPU seconds of the forward.
    prefill_cpu_seconds: Option<f64>,
    /// CPU other processes used during the forward, in cores.
    other_load: Option<f64>,
    /// Peak RSS, `ru_maxrss` (bytes).
    #[serde(default)]
    peak_rss_bytes: u64,
    /// RSS after loading (bytes).
    #[serde(default)]
    rss_after_load_bytes: u64,
    /// Peak RSS of the forward alone (`VmHWM` after a reset; bytes).
    #[serde(default)]
    peak_rss_forward_bytes: u64,
    /// Parameters.
    #[serde(default)]
    params: u64,
    /// Whether the forward failed to allocate.
    #[serde(default)]
    oom: bool,
    /// Error message, if any.
    error: Option<String>,
    /// Address-space limit applied (bytes).
    mem_limit_bytes: Option<u64>,
    /// Greedy token after the prompt.
    argmax: Option<u32>,
}

fn run_hf(
    r: &RunArgs,
    model: &Path,
    ids: &Path,
    context: usize,
    logits: Option<&Path>,
    limit: f64,
) -> Result<HfResult> {
    let mut cmd = Command::new(&r.python);
    cmd.arg(&r.hf_script)
        .arg("--model")
        .arg(model)
        .arg("--ids")
        .arg(ids)
        .arg("--context")
        .arg(context.to_string())
        .arg("--threads")
        .arg(r.hf_threads.to_string())
        .arg("--attn-implementation")
        .arg(&r.hf_attn);
    if let Some(p) = logits {
        cmd.arg("--logits-out").arg(p);
    }
    if limit > 0.0 {
        cmd.arg("--mem-limit-gb").arg(limit.to_string());
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {} {}", r.python.display(), r.hf_script.display()))?;
    let mut last = String::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            if line.trim_start().starts_with('{') {
                last = line;
            } else {
                eprintln!("[hf] {line}");
            }
        }
    }
    let status = child.wait()?;
    if last.is_empty() {
        bail!("hf_compare.py printed no result ({status})");
    }
    let res: HfResult = serde_json::from_str(&last).with_context(|| format!("parsing `{last}`"))?;
    if !status.success() {
        bail!("hf_compare.py failed ({status}): {}", res.error.unwrap_or_default());
    }
    Ok(res)
}

/// Per-phase FLOPs of a prefill of `n` tokens, computed from the shapes (not measured).
#[derive(Clone, Debug, Default, Serialize)]
struct FlopModel {
    /// MLA projections (q_a, q_b, kv_a, o).
    attn_proj: f64,
    /// Attention over the selected keys, per chunk in the form the engine picks
    /// ([`kernels::MlaMacs::prefers_expanded`]) for a plan whose blocks cover every earlier key
    /// ([`MlaKeyPlan::covering`]): absorbed (incl. the W_uk / W_uv products) or expanded
    /// (key expansion through kv_b plus the masked block GEMMs).
    attn_core: f64,
    /// Indexer projections (wq_b, wk, weights_proj).
    indexer_proj: f64,
    /// Indexer scoring (rows with more visible keys than index_topk).
    indexer_score: f64,
    /// Dense MLP, router, routed and shared experts.
    mlp: f64,
    /// The last row's lm_head.
    head: f64,
}

impl FlopModel {
    /// A prefill of `n` tokens the way the engine runs one for generation: every layer writes
    /// every row's cache entries, but the final layer (Full when `last_full`) runs its queries,
    /// attention, indexer scoring and MLP for the prompt's last row only; indexer queries are
    /// projected only for rows past `index_topk` (the others select every key unscored).
    fn prefill(s: &ShapeArgs, n: usize, chunk: usize, full_layers: usize, last_full: bool) -> Self {
        let f = |x: usize| x as f64;
        let (d, h, r, dn, dr, dv) = (s.hidden, s.heads, s.kv_lora_rank, s.nope_dim, s.rope_dim, s.v_dim);
        let per_tok_proj = 2 * (d * s.q_lora_rank + s.q_lora_rank * h * (dn + dr) + d * (r + dr) + h * dv * d);
        // kv_a runs for every row (cache entries); q_a, q_b and o only for rows whose output is read.
        let latent = 2 * d * (r + dr);
        let query_side = per_tok_proj - latent;
        let dims = MlaDims {
            heads: h,
            kv_rank: r,
            nope_dim: dn,
            rope_dim: dr,
            v_dim: dv,
        };
        let attn_macs: f64 = (0..n)
            .step_by(chunk.max(1))
            .map(|start| {
                let rows = chunk.max(1).min(n - start);
                let m = MlaKeyPlan::covering(start, rows, s.index_topk).macs(rows, dims);
                if m.prefers_expanded() {
                    m.expanded
                } else {
                    m.absorbed
                }
            })
            .sum();
        // The final layer's one row runs absorbed, like a decode row.
        let last_row_macs = MlaKeyPlan::covering(n - 1, 1, s.index_topk).macs(1, dims).absorbed;
        let index_key = 2 * d * s.index_dim;
        let index_query = 2 * (s.q_lora_rank * s.index_heads * s.index_dim + d * s.index_heads);
        let scored_rows = n - s.index_topk.min(n);
        let last_scored = usize::from(n > s.index_topk);
        let last_full = usize::from(last_full);
        // Σ_{t ≥ topk} (t + 1) keys scored.
        let scored: f64 = (s.index_topk.min(n)..n).map(|t| f(t + 1)).sum::<f64>();
        let score_flops = f(2 * s.index_heads * s.index_dim);
        let moe_layers = s.layers.saturating_sub(s.first_k_dense);
        let dense_layers = s.layers - moe_layers;
        let dense_row = f(6 * d * s.intermediate);
        let moe_row = f(6 * d * s.moe_intermediate * (s.experts_per_tok + 1) + 2 * d * s.experts);
        let last_row = if moe_layers > 0 { moe_row } else { dense_row };
        let body = s.layers.saturating_sub(1);
        FlopModel {
            attn_proj: f(s.layers * n * latent) + f(body * n * query_side) + f(query_side),
            attn_core: f(body) * 2.0 * attn_macs + 2.0 * last_row_macs,
            indexer_proj: f(full_layers * n * index_key)
                + f((full_layers - last_full) * scored_rows * index_query)
                + f(last_full * last_scored * index_query),
            indexer_score: f(full_layers - last_full) * scored * score_flops
                + f(last_full * last_scored * n) * score_flops,
            mlp: f(dense_layers) * f(n) * dense_row + f(moe_layers) * f(n) * moe_row - f(n - 1) * last_row,
            head: f(2 * d * s.vocab),
        }
    }

    fn total(&self) -> f64 {
        self.attn_proj + self.attn_core + self.indexer_proj + self.indexer_score + self.mlp + self.head
    }
}

/// Everything the orchestrator measured, for `--json-out`.
#[derive(Debug, Default, Serialize)]
struct Report {
    machine: BTreeMap<String, String>,
    runs: Vec<(String, ChildResult)>,
    /// Per HF context, its fastest run.
    hf: Vec<HfResult>,
    /// Per HF context, every run's prefill seconds.
    hf_every_run: Vec<(usize, Vec<f64>)>,
    hf_logits_max_abs_diff: Vec<(usize, f64, f64)>,
    hf_oom: Option<HfResult>,
}

fn machine_info() -> BTreeMap<String, String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|x| x.1.trim().to_string())
        })
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    BTreeMap::from([
        ("cpu".into(), cpu),
        ("cores".into(), cores.to_string()),
        ("mem_total".into(), mem),
        ("rayon_threads".into(), rayon::current_num_threads().to_string()),
        ("loadavg_at_start".into(), load.trim().to_string()),
    ])
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| it.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

/// The orchestrator: writes the model and prompt, runs every configuration, prints tables.
fn orchestrate(r: &RunArgs) -> Result<()> {
    let layers = r.shape.layers;
    let patterns = r
        .patterns
        .iter()
        .map(|p| resolve_pattern(p, layers))
        .collect::<Result<Vec<_>>>()?;
    let work = std::env::temp_dir().join(format!("dsa-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let model_dir = match &r.model_dir {
        Some(d) => d.clone(),
        None => {
            let dir = work.join("model");
            let t = Instant::now();
            write_synthetic_model(&dir, &r.shape.spec())?;
            eprintln!(
                "wrote synthetic checkpoint to {} in {:.1}s",
                dir.display(),
                t.elapsed().as_secs_f64()
            );
            dir
        }
    };
    let mut report = Report {
        machine: machine_info(),
        ..Report::default()
    };
    println!("## dsa_bench");
    for (k, v) in &report.machine {
        println!("- {k}: {v}");
    }
    println!(
        "- model: {} layers, hidden {}, {} heads, q_lora {}, kv_lora {}, nope/rope/v {}/{}/{}, indexer {}×{} topk {}, \
         {} experts ({} per token, inter {}), dense inter {}, vocab {}; checkpoint {:.0} MiB (f32)",
        layers,
        r.shape.hidden,
        r.shape.heads,
        r.shape.q_lora_rank,
        r.shape.kv_lora_rank,
        r.shape.nope_dim,
        r.shape.rope_dim,
        r.shape.v_dim,
        r.shape.index_heads,
        r.shape.index_dim,
        r.shape.index_topk,
        r.shape.experts,
        r.shape.experts_per_tok,
        r.shape.moe_intermediate,
        r.shape.intermediate,
        r.shape.vocab,
        mib(dir_bytes(&model_dir))
    );
    println!("- prefill chunk {}, KV block size {}", r.chunk, r.block_size);

    // One random prompt; every context uses a prefix of it (the same ids go to HF).
    let mut contexts = r.contexts.clone();
    if r.decode_context > 0 && !contexts.contains(&r.decode_context) {
        contexts.push(r.decode_context);
    }
    let longest = contexts
        .iter()
        .chain(&r.hf_contexts)
        .chain(&r.hf_oom_context)
        .copied()
        .max()
        .unwrap_or(0);
    let mut rng = Rng::new(r.prompt_seed);
    let ids: Vec<u32> = (0..longest)
        .map(|_| (rng.next_u64() % r.shape.vocab as u64) as u32)
        .collect();
    let prompt_path = work.join("prompt.json");
    std::fs::write(&prompt_path, serde_json::to_vec(&ids)?)?;

    // Engine runs, keyed by (context, pattern index).
    let full_idx = patterns.iter().position(|p| p.override_pattern.is_none());
    let mut jobs: Vec<(usize, usize)> = Vec::new();
    for &c in &contexts {
        for pi in 0..patterns.len() {
            jobs.push((c, pi));
        }
    }
    if r.hf {
        let Some(fi) = full_idx else {
            bail!("--hf compares against the all-Full model: include `full` in --patterns");
        };
        for &c in &r.hf_contexts {
            if !jobs.contains(&(c, fi)) {
                jobs.push((c, fi));
            }
        }
    }
    jobs.sort();
    if r.hf && r.hf_repeats > r.repeats.max(1) {
        bail!(
            "--hf-repeats is {} but must be at most --repeats ({}): each HF run follows one round of engine runs",
            r.hf_repeats,
            r.repeats.max(1)
        );
    }
    let mut all: BTreeMap<(usize, usize), Vec<ChildResult>> = BTreeMap::new();
    let mut hf_runs: BTreeMap<usize, Vec<HfResult>> = BTreeMap::new();
    for round in 0..r.repeats.max(1) {
        for &(c, pi) in &jobs {
            let res = run_engine(r, &patterns[pi], c, &model_dir, &prompt_path, &work, round)?;
            report.runs.push((patterns[pi].label.clone(), res.clone()));
            all.entry((c, pi)).or_default().push(res);
        }
        if r.hf && round < r.hf_repeats.max(1) {
            for &c in &r.hf_contexts {
                if r.quiet_below > 0.0 {
                    wait_for_quiet(r.quiet_below, r.quiet_max_wait);
                }
                eprintln!("hf: context {c}, round {} ...", round + 1);
                let hf_logits = work.join(format!("hf_logits_{c}.f32"));
                let hf = run_hf(r, &model_dir, &prompt_path, c, Some(&hf_logits), 0.0)?;
                eprintln!("  HF prefill {:.2}s", hf.prefill_seconds.unwrap_or(f64::NAN));
                hf_runs.entry(c).or_default().push(hf);
            }
        }
    }
    // Other load on the machine only ever slows a run down: keep each configuration's best.
    let pick = |key: fn(&ChildResult) -> f64| -> BTreeMap<(usize, usize), ChildResult> {
        all.iter()
            .filter_map(|(k, v)| {
                let best = v.iter().min_by(|a, b| key(a).total_cmp(&key(b)))?;
                Some((*k, best.clone()))
            })
            .collect()
    };
    let results = pick(|x| x.prefill_seconds);
    let decode_results = pick(|x| x.decode_seconds);

    print_prefill(r, &patterns, &results, &all);
    print_speedup(&patterns, full_idx, &results);
    print_decode(r, &patterns, full_idx, &decode_results, &all);

    if r.hf {
        let fi = full_idx.unwrap_or(0);
        for (&c, runs) in &hf_runs {
            let hf_logits = work.join(format!("hf_logits_{c}.f32"));
            let seconds = |h: &HfResult| h.prefill_seconds.unwrap_or(f64::INFINITY);
            let hf = runs
                .iter()
                .min_by(|a, b| seconds(a).total_cmp(&seconds(b)))
                .cloned()
                .context("no HF run")?;
            report.hf_every_run.push((c, runs.iter().map(seconds).collect()));
            let eng = read_f32(&work.join(format!("engine_logits_{c}.f32")))?;
            let hfl = read_f32(&hf_logits)?;
            let diff = eng.iter().zip(&hfl).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let scale = hfl.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            report.hf_logits_max_abs_diff.push((c, diff as f64, scale as f64));
            report.hf.push(hf);
        }
        if let Some(c) = r.hf_oom_context {
            eprintln!(
                "hf: context {c} under a {} GB address-space limit ...",
                r.hf_mem_limit_gb
            );
            report.hf_oom = Some(run_hf(r, &model_dir, &prompt_path, c, None, r.hf_mem_limit_gb)?);
        }
        print_hf(&report, fi, &results);
    }
    print_flops(r, &patterns, &results);

    if let Some(p) = &r.json_out {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)?;
    }
    if r.keep_model {
        eprintln!("kept scratch files in {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}

/// Waits (up to `max_wait` seconds) until the rest of the machine uses fewer than `below`
/// cores over a 5 s window; returns the last window's load.
fn wait_for_quiet(below: f64, max_wait: u64) -> f64 {
    const WINDOW: std::time::Duration = std::time::Duration::from_secs(5);
    let start = Instant::now();
    loop {
        let (busy0, own0) = (machine_busy_seconds(), cpu_seconds());
        std::thread::sleep(WINDOW);
        let other = (machine_busy_seconds() - busy0 - (cpu_seconds() - own0)) / WINDOW.as_secs_f64();
        if other < below || start.elapsed().as_secs() >= max_wait {
            if start.elapsed() > WINDOW {
                eprintln!(
                    "  waited {:.0}s for a quiet machine (other load now {other:.2} cores)",
                    start.elapsed().as_secs_f64()
                );
            }
            return other;
        }
    }
}

/// Runs one engine configuration in a child process and logs a one-line summary.
fn run_engine(
    r: &RunArgs,
    p: &PatternChoice,
    c: usize,
    model_dir: &Path,
    prompt_path: &Path,
    work: &Path,
    round: usize,
) -> Result<ChildResult> {
    let logits_out = (r.hf && p.override_pattern.is_none() && r.hf_contexts.contains(&c))
        .then(|| work.join(format!("engine_logits_{c}.f32")));
    let args = ChildArgs {
        model: model_dir.to_path_buf(),
        prompt: prompt_path.to_path_buf(),
        context: c,
        pattern: p.override_pattern.clone(),
        chunk: r.chunk,
        block_size: r.block_size,
        decode_tokens: if c == r.decode_context { r.decode_tokens } else { 0 },
        logits_out,
        warmup_tokens: 16,
    };
    if r.quiet_below > 0.0 {
        wait_for_quiet(r.quiet_below, r.quiet_max_wait);
    }
    eprintln!("engine: context {c}, pattern {}, round {} ...", p.label, round + 1);
    let res = spawn_child(&args)?;
    eprintln!(
        "  prefill {:.2}s (indexer {:.2}s, attention core {:.2}s, CPU {:.2}x, other load {:.2}x), peak RSS {:.0} MiB{}",
        res.prefill_seconds,
        res.prefill_indexer_seconds,
        res.prefill_attention_seconds,
        res.prefill_cpu_seconds / res.prefill_seconds,
        res.prefill_other_cpu_seconds / res.prefill_seconds,
        mib(res.peak_rss),
        if res.decode_tokens > 0 {
            format!(", decode {:.2} tok/s", res.decode_tokens as f64 / res.decode_seconds)
        } else {
            String::new()
        }
    );
    Ok(res)
}

/// Prints the prefill table (best run of each configuration) and every run's time.
fn print_prefill(
    r: &RunArgs,
    patterns: &[PatternChoice],
    results: &BTreeMap<(usize, usize), ChildResult>,
    all: &BTreeMap<(usize, usize), Vec<ChildResult>>,
) {
    println!(
        "\n### Prefill (chunk {}, one sequence; best of {} run(s))\n",
        r.chunk,
        r.repeats.max(1)
    );
    println!(
        "CPU = CPU seconds / wall seconds of the prefill (2.00 = both cores busy all the time); other load = \
         CPU seconds other processes used on the machine during the prefill / wall seconds.\n"
    );
    println!(
        "| context | pattern | prefill s | tok/s | indexer s | indexer share | CPU | other load | load s | \
         RSS after load MiB | peak RSS MiB (load / inference) | KV cache MiB |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (&(c, pi), x) in results {
        println!(
            "| {c} | {} | {:.2} | {:.0} | {:.2} | {:.1}% | {:.2} | {:.2} | {:.1} | {:.0} | {:.0} ({:.0} / {:.0}) | \
             {:.0} |",
            patterns[pi].label,
            x.prefill_seconds,
            c as f64 / x.prefill_seconds,
            x.prefill_indexer_seconds,
            100.0 * x.prefill_indexer_seconds / x.prefill_seconds,
            x.prefill_cpu_seconds / x.prefill_seconds,
            x.prefill_other_cpu_seconds / x.prefill_seconds,
            x.load_seconds,
            mib(x.rss_after_load),
            mib(x.peak_rss),
            mib(x.peak_rss_load),
            mib(x.peak_rss_inference),
            mib(x.cache_bytes),
        );
    }
    println!("\nPer-chunk forward seconds (indexer seconds):\n");
    for (&(c, pi), x) in results {
        let chunks: Vec<String> = x
            .chunk_seconds
            .iter()
            .zip(&x.chunk_indexer_seconds)
            .map(|(t, i)| format!("{t:.2} ({i:.2})"))
            .collect();
        println!("- {c} {}: {}", patterns[pi].label, chunks.join(", "));
    }
    if r.repeats > 1 {
        println!("\nEvery run's prefill seconds (other load):\n");
        for (&(c, pi), runs) in all {
            let times: Vec<String> = runs
                .iter()
                .map(|x| {
                    format!(
                        "{:.2} ({:.2})",
                        x.prefill_seconds,
                        x.prefill_other_cpu_seconds / x.prefill_seconds
                    )
                })
                .collect();
            println!("- {c} {}: {}", patterns[pi].label, times.join(", "));
        }
    }
}

fn print_speedup(patterns: &[PatternChoice], full_idx: Option<usize>, results: &BTreeMap<(usize, usize), ChildResult>) {
    let Some(fi) = full_idx else { return };
    println!("\n### IndexCache prefill speed-up vs the Amdahl bound\n");
    println!(
        "f = indexer share of all-Full prefill; r = fraction of indexers removed; bound = 1/(1 − r·f); target: \
         measured ≥ 90% of bound.\n"
    );
    println!(
        "| context | pattern | f | r | bound | measured speed-up | measured / bound | ≥ 90%? | \
         speed-up in CPU seconds (cross-check) |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---|---:|");
    for (&(c, pi), x) in results {
        if pi == fi {
            continue;
        }
        let Some(full) = results.get(&(c, fi)) else {
            continue;
        };
        let f = full.prefill_indexer_seconds / full.prefill_seconds;
        let removed = patterns[pi].removed;
        let bound = 1.0 / (1.0 - removed * f);
        let measured = full.prefill_seconds / x.prefill_seconds;
        let ratio = measured / bound;
        println!(
            "| {c} | {} | {:.3} | {:.2} | {:.3} | {:.3} | {:.1}% | {} | {:.3} |",
            patterns[pi].label,
            f,
            removed,
            bound,
            measured,
            100.0 * ratio,
            if ratio >= 0.9 { "yes" } else { "no" },
            full.prefill_cpu_seconds / x.prefill_cpu_seconds,
        );
    }
}

fn print_decode(
    r: &RunArgs,
    patterns: &[PatternChoice],
    full_idx: Option<usize>,
    results: &BTreeMap<(usize, usize), ChildResult>,
    all: &BTreeMap<(usize, usize), Vec<ChildResult>>,
) {
    if r.decode_context == 0 || r.decode_tokens == 0 {
        return;
    }
    println!(
        "\n### Decode at {} context ({} greedy tokens, one row per step; best of {} run(s))\n",
        r.decode_context,
        r.decode_tokens,
        r.repeats.max(1)
    );
    println!("bound = 1/(1 − r·f) with f the indexer share of all-Full decode; CPU and other load as for prefill.\n");
    println!(
        "| pattern | ms/token | tokens/s | indexer share | CPU | other load | speed-up vs all-Full | bound | \
         speed-up in CPU seconds |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let full = full_idx.and_then(|fi| results.get(&(r.decode_context, fi)));
    for (pi, p) in patterns.iter().enumerate() {
        let Some(x) = results.get(&(r.decode_context, pi)) else {
            continue;
        };
        let tps = x.decode_tokens as f64 / x.decode_seconds;
        let (speedup, bound, cpu_speedup) = match full {
            Some(f) => {
                let share = f.decode_indexer_seconds / f.decode_seconds;
                (
                    format!("{:.3}", f.decode_seconds / x.decode_seconds),
                    format!("{:.3}", 1.0 / (1.0 - p.removed * share)),
                    format!("{:.3}", f.decode_cpu_seconds / x.decode_cpu_seconds),
                )
            }
            None => ("–".into(), "–".into(), "–".into()),
        };
        println!(
            "| {} | {:.1} | {:.2} | {:.1}% | {:.2} | {:.2} | {speedup} | {bound} | {cpu_speedup} |",
            p.label,
            1e3 * x.decode_seconds / x.decode_tokens as f64,
            tps,
            100.0 * x.decode_indexer_seconds / x.decode_seconds,
            x.decode_cpu_seconds / x.decode_seconds,
            x.decode_other_cpu_seconds / x.decode_seconds,
        );
    }
    if r.repeats > 1 {
        println!("\nEvery run's decode ms/token (other load):\n");
        for (pi, p) in patterns.iter().enumerate() {
            let Some(runs) = all.get(&(r.decode_context, pi)) else {
                continue;
            };
            let times: Vec<String> = runs
                .iter()
                .map(|x| {
                    format!(
                        "{:.1} ({:.2})",
                        1e3 * x.decode_seconds / x.decode_tokens as f64,
                        x.decode_other_cpu_seconds / x.decode_seconds
                    )
                })
                .collect();
            println!("- {}: {}", p.label, times.join(", "));
        }
    }
}

fn print_hf(report: &Report, fi: usize, results: &BTreeMap<(usize, usize), ChildResult>) {
    println!("\n### Engine vs HF transformers (same checkpoint and prompt ids, all-Full, f32, CPU)\n");
    if let Some(h) = report.hf.first() {
        println!(
            "HF: transformers {}, {} attention, experts `{}`, {} torch threads, one no-cache forward with \
             logits_to_keep=1. Engine: chunked prefill + last-row logits.\n",
            h.transformers, h.attn_implementation, h.experts_implementation, h.threads
        );
    }
    println!(
        "| context | engine s | HF s | HF / engine (target ≥ 5) | other load engine / HF | engine peak RSS MiB | \
         HF peak RSS MiB | HF RSS after load / forward peak MiB | last-position logits max abs diff (max abs logit) \
         | same argmax |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for (h, &(c, diff, scale)) in report.hf.iter().zip(&report.hf_logits_max_abs_diff) {
        let Some(e) = results.get(&(c, fi)) else {
            continue;
        };
        let hs = h.prefill_seconds.unwrap_or(f64::NAN);
        println!(
            "| {c} | {:.2} | {:.2} | {:.2} | {:.2} / {:.2} | {:.0} | {:.0} | {:.0} / {:.0} | {:.3e} ({:.2}) | {} |",
            e.prefill_seconds,
            hs,
            hs / e.prefill_seconds,
            e.prefill_other_cpu_seconds / e.prefill_seconds,
            h.other_load.unwrap_or(f64::NAN),
            mib(e.peak_rss),
            mib(h.peak_rss_bytes),
            mib(h.rss_after_load_bytes),
            mib(h.peak_rss_forward_bytes),
            diff,
            scale,
            if h.argmax == Some(e.first_token) { "yes" } else { "no" }
        );
    }
    if report.hf_every_run.iter().any(|(_, v)| v.len() > 1) {
        println!("\nEvery HF run's prefill seconds (each after one round of engine runs; the fastest is compared):\n");
        for (c, v) in &report.hf_every_run {
            let times: Vec<String> = v.iter().map(|t| format!("{t:.2}")).collect();
            println!("- {c}: {}", times.join(", "));
        }
    }
    if let Some(o) = &report.hf_oom {
        let limit = o
            .mem_limit_bytes
            .map_or("none".into(), |b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64));
        if o.oom {
            println!(
                "\nHF at {} context under an address-space limit of {limit}: **out of memory** (`{}`), peak RSS {:.0} MiB.",
                o.context,
                o.error.clone().unwrap_or_default(),
                mib(o.peak_rss_bytes)
            );
        } else {
            println!(
                "\nHF at {} context under an address-space limit of {limit}: ran, {:.1} s, peak RSS {:.0} MiB.",
                o.context,
                o.prefill_seconds.unwrap_or(f64::NAN),
                mib(o.peak_rss_bytes)
            );
        }
    }
}

fn print_flops(r: &RunArgs, patterns: &[PatternChoice], results: &BTreeMap<(usize, usize), ChildResult>) {
    println!("\n### Prefill work by phase (GFLOP computed from the shapes, not measured) and achieved rate\n");
    println!(
        "attn core: per chunk, the form the engine picks (expanded or absorbed), assuming each 128-row block's \
         selections cover every earlier key (measured for this model at 4K). The final layer runs its queries, \
         attention, indexer scoring and MLP for the prompt's last row only (every row's cache entries are still \
         written), and indexer queries are projected only for rows past index_topk, as the engine does. Rates divide by \
         measured wall time: the indexer's, the attention core's, and the rest of the prefill's (projections, \
         MLP, norms).\n"
    );
    println!(
        "| context | pattern | attn proj | attn core | indexer proj | indexer score | MLP | total | indexer GFLOP/s | \
         attn core s | attn core GFLOP/s | rest GFLOP/s |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (&(c, pi), x) in results {
        let (full, last_full) = patterns[pi]
            .override_pattern
            .as_ref()
            .map_or((r.shape.layers, true), |p| {
                (p.chars().filter(|&ch| ch == 'F').count(), p.ends_with('F'))
            });
        let m = FlopModel::prefill(&r.shape, c, r.chunk, full, last_full);
        let g = 1e-9;
        let ix = m.indexer_proj + m.indexer_score;
        let core_s = x.prefill_attention_seconds;
        let rest_s = x.prefill_seconds - x.prefill_indexer_seconds - core_s;
        println!(
            "| {c} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} |",
            patterns[pi].label,
            m.attn_proj * g,
            m.attn_core * g,
            m.indexer_proj * g,
            m.indexer_score * g,
            m.mlp * g,
            m.total() * g,
            if x.prefill_indexer_seconds > 0.0 {
                ix * g / x.prefill_indexer_seconds
            } else {
                0.0
            },
            core_s,
            m.attn_core * g / core_s,
            (m.total() - ix - m.attn_core) * g / rest_s,
        );
    }
}

/// Prints, per layer, how local its selections are: rows of the last chunk with more visible
/// keys than `index_topk`, the KV-cache blocks a row's selection touches (the minimum is
/// `index_topk / block_size`), the share of selected keys whose predecessor is also
/// selected, and the share within the last `index_topk` positions.
///
/// A layer's own selection is observed through the public API as the relay of the range
/// `[0, layer + 1)` loaded with a pattern that is all Full except layer `layer + 1`.
fn selection_stats(a: &SelectionArgs) -> Result<()> {
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    match &cli.cmd {
        Some(Cmd::Child(a)) => child(a),
        Some(Cmd::SelectionStats(a)) => selection_stats(a),
        None => orchestrate(&cli.run),
    }
}
