//! One measured configuration in a child process of its own (so its peak RSS is its own), and
//! the parent side that spawns it and reads its result line.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use worker::sampling::argmax;
use worker::{Model, Segment, StageInput};

use crate::args::ChildArgs;

/// Prefix of the one stdout line a child prints its result on.
const RESULT_MARKER: &str = "DSA_BENCH_RESULT ";

/// `USER_HZ`: the unit of `/proc/self/stat` CPU times (100 on Linux x86-64).
const CLOCK_TICKS: f64 = 100.0;

/// Sequence id of the child's untimed warm-up forward.
const WARMUP_SEQ: u64 = 1;

/// What one child measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ChildResult {
    /// Prompt length.
    pub(crate) context: usize,
    /// The active pattern (one letter per layer).
    pub(crate) pattern: String,
    /// Rayon threads.
    pub(crate) threads: usize,
    /// Model load time.
    pub(crate) load_seconds: f64,
    /// VmRSS right after loading (bytes).
    pub(crate) rss_after_load: u64,
    /// VmHWM after loading: the peak of the load phase (bytes).
    pub(crate) peak_rss_load: u64,
    /// Whether the high-water mark could be reset after loading.
    pub(crate) hwm_reset: bool,
    /// VmHWM at the end: the peak of prefill + decode when the reset worked (bytes).
    pub(crate) peak_rss_inference: u64,
    /// Whole-process peak: max of the two (bytes).
    pub(crate) peak_rss: u64,
    /// Prefill wall time: every chunk's forward plus the last row's logits.
    pub(crate) prefill_seconds: f64,
    /// Indexer wall time inside the prefill.
    pub(crate) prefill_indexer_seconds: f64,
    /// Wall time of attention over the selected keys inside the prefill.
    pub(crate) prefill_attention_seconds: f64,
    /// CPU seconds (all threads) used by the prefill.
    pub(crate) prefill_cpu_seconds: f64,
    /// CPU seconds other processes used on the machine during the prefill.
    pub(crate) prefill_other_cpu_seconds: f64,
    /// Wall time of each prefill chunk's forward.
    pub(crate) chunk_seconds: Vec<f64>,
    /// Indexer time of each prefill chunk.
    pub(crate) chunk_indexer_seconds: Vec<f64>,
    /// Full layers run per forward call.
    pub(crate) full_layers: usize,
    /// Shared layers run per forward call.
    pub(crate) shared_layers: usize,
    /// Greedy token after the prompt.
    pub(crate) first_token: u32,
    /// Decode steps run.
    pub(crate) decode_tokens: usize,
    /// Wall time of the decode steps (forward + logits + argmax each).
    pub(crate) decode_seconds: f64,
    /// Indexer time inside decode.
    pub(crate) decode_indexer_seconds: f64,
    /// CPU seconds (all threads) of the decode steps.
    pub(crate) decode_cpu_seconds: f64,
    /// CPU seconds other processes used on the machine during decode.
    pub(crate) decode_other_cpu_seconds: f64,
    /// KV-cache storage allocated at the end (bytes).
    pub(crate) cache_bytes: u64,
}

/// One field of `/proc/self/status`, in bytes (0 when unavailable).
pub(crate) fn proc_status_bytes(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// CPU time (user + system, all threads) this process has used, in seconds.
pub(crate) fn cpu_seconds() -> f64 {
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
pub(crate) fn machine_busy_seconds() -> f64 {
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
pub(crate) fn reset_hwm() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

pub(crate) fn read_prompt(path: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a JSON array of ids", path.display()))
}

pub(crate) fn write_f32(path: &Path, v: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

pub(crate) fn read_f32(path: &Path) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The child: load, prefill in chunks, optionally decode; print one result line.
pub(crate) fn child(a: &ChildArgs) -> Result<()> {
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

/// Runs this binary as a child for one configuration.
pub(crate) fn spawn_child(args: &ChildArgs) -> Result<ChildResult> {
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
