//! The HF transformers side of the comparison: `scripts/hf_compare.py` in a child process.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::args::RunArgs;

/// What `scripts/hf_compare.py` printed (fields it may omit are optional).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct HfResult {
    /// Prompt length.
    #[serde(default)]
    pub(crate) context: usize,
    /// Torch threads.
    #[serde(default)]
    pub(crate) threads: usize,
    /// transformers version.
    #[serde(default)]
    pub(crate) transformers: String,
    /// Experts implementation used.
    #[serde(default)]
    pub(crate) experts_implementation: String,
    /// Attention implementation used.
    #[serde(default)]
    pub(crate) attn_implementation: String,
    /// Load time.
    #[serde(default)]
    pub(crate) load_seconds: f64,
    /// Prefill forward time (absent on OOM).
    pub(crate) prefill_seconds: Option<f64>,
    /// CPU seconds of the forward.
    pub(crate) prefill_cpu_seconds: Option<f64>,
    /// CPU other processes used during the forward, in cores.
    pub(crate) other_load: Option<f64>,
    /// Peak RSS, `ru_maxrss` (bytes).
    #[serde(default)]
    pub(crate) peak_rss_bytes: u64,
    /// RSS after loading (bytes).
    #[serde(default)]
    pub(crate) rss_after_load_bytes: u64,
    /// Peak RSS of the forward alone (`VmHWM` after a reset; bytes).
    #[serde(default)]
    pub(crate) peak_rss_forward_bytes: u64,
    /// Parameters.
    #[serde(default)]
    pub(crate) params: u64,
    /// Whether the forward failed to allocate.
    #[serde(default)]
    pub(crate) oom: bool,
    /// Error message, if any.
    pub(crate) error: Option<String>,
    /// Address-space limit applied (bytes).
    pub(crate) mem_limit_bytes: Option<u64>,
    /// Greedy token after the prompt.
    pub(crate) argmax: Option<u32>,
}

pub(crate) fn run_hf(
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
