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

mod args;
mod child;
mod flops;
mod hf;
mod report;
mod selection;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;

use worker::embedded::write_synthetic_model;
use worker::sampling::Rng;

use args::{ChildArgs, Cli, Cmd, RunArgs};
use child::{child, cpu_seconds, machine_busy_seconds, read_f32, spawn_child, ChildResult};
use hf::{run_hf, HfResult};
use report::{print_decode, print_flops, print_hf, print_prefill, print_speedup};
use selection::selection_stats;

/// The same allocator as the `worker` binary, so the engine is measured as it serves.
#[global_allocator]
static ALLOC: worker::huge_pages::HugePageAlloc = worker::huge_pages::HugePageAlloc;

/// Pattern names the `--patterns` flag understands besides explicit F/S strings.
const PATTERN_FULL: &str = "full";
/// One Full layer in four: `FSSS` repeated over the layers.
const PATTERN_QUARTER: &str = "quarter";

/// A pattern as the user named it and as passed to the child.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct PatternChoice {
    /// Display name.
    pub(crate) label: String,
    /// The override passed to `Model::load` (`None`: the checkpoint's all-Full).
    pub(crate) override_pattern: Option<String>,
    /// Fraction of layers that are Shared (indexers removed).
    pub(crate) removed: f64,
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

/// Everything the orchestrator measured, for `--json-out`.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Report {
    pub(crate) machine: BTreeMap<String, String>,
    pub(crate) runs: Vec<(String, ChildResult)>,
    /// Per HF context, its fastest run.
    pub(crate) hf: Vec<HfResult>,
    /// Per HF context, every run's prefill seconds.
    pub(crate) hf_every_run: Vec<(usize, Vec<f64>)>,
    pub(crate) hf_logits_max_abs_diff: Vec<(usize, f64, f64)>,
    pub(crate) hf_oom: Option<HfResult>,
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

pub(crate) fn mib(b: u64) -> f64 {
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    match &cli.cmd {
        Some(Cmd::Child(a)) => child(a),
        Some(Cmd::SelectionStats(a)) => selection_stats(a),
        None => orchestrate(&cli.run),
    }
}
