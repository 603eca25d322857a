//! Prometheus metrics (text exposition format 0.0.4, written by hand: a handful of series
//! does not justify a registry crate).
//!
//! Where each series comes from:
//! - request latencies and token counts: [`RequestTracker`], which every request of both
//!   front ends goes through;
//! - queue time: the scheduler at admission, the only place that knows when a sequence left
//!   the waiting queue;
//! - per-stage forward time, indexer layer runs and KV usage: the [`pb::StageStats`] each
//!   stage appends to a micro-batch, handed over in the last stage's report (KV usage is
//!   also refreshed by the scheduler's health poll, so it falls back to 0 once sequences
//!   are released);
//! - running / waiting: the scheduler's gauges, read at scrape time.

mod histogram;
mod tracker;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use proto::v1 as pb;

pub use histogram::{Histogram, BUCKETS};
pub use tracker::RequestTracker;

use crate::error::CoordinatorError;
use crate::scheduler::SchedulerHandle;

/// The error classes of [`CoordinatorError::class`], listed so every series exists (at 0)
/// from the start: a rate over a series that appears late misses its first increments.
const ERROR_CLASSES: [&str; 4] = ["invalid_request", "not_found", "unavailable", "internal"];

/// Every series the coordinator exports (the running/waiting gauges are read from the
/// scheduler at scrape time).
#[derive(Default)]
pub struct Metrics {
    /// Submit → first generated token.
    pub time_to_first_token: Histogram,
    /// Gap between consecutive generated tokens of one request.
    pub inter_token_latency: Histogram,
    /// Submit → finished or failed.
    pub request_duration: Histogram,
    /// Submit → admission (KV capacity granted).
    pub request_queue: Histogram,
    /// Prompt tokens of requests whose prefill completed.
    pub prompt_tokens: AtomicU64,
    /// Generated tokens.
    pub generation_tokens: AtomicU64,
    /// Relay bytes sent between stages.
    pub relay_bytes: AtomicU64,
    /// Layer runs (per sequence segment) that computed the indexer.
    pub full_layers: AtomicU64,
    /// Layer runs that reused the previous Full layer's top-k.
    pub shared_layers: AtomicU64,
    /// Failed requests per error class, in [`ERROR_CLASSES`] order.
    errors: [AtomicU64; ERROR_CLASSES.len()],
    /// Forward time per stage index.
    stage_forward: Mutex<BTreeMap<usize, Histogram>>,
    /// Per stage index: the worker serving it and its KV cache usage in [0, 1].
    kv_usage: Mutex<BTreeMap<usize, (String, f64)>>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    &METRICS
}

/// Adds bytes of compressed relay sent between stages.
pub fn add_relay_bytes(n: u64) {
    METRICS.relay_bytes.fetch_add(n, Ordering::Relaxed);
}

/// Counts one failed request under its error class.
pub fn record_error(e: &CoordinatorError) {
    let i = ERROR_CLASSES
        .iter()
        .position(|c| *c == e.class())
        .unwrap_or(ERROR_CLASSES.len() - 1);
    METRICS.errors[i].fetch_add(1, Ordering::Relaxed);
}

/// Records how long a request waited for admission.
pub fn observe_queue_time(d: Duration) {
    METRICS.request_queue.observe(d);
}

/// The failed-request count of one error class (for tests and status pages).
pub fn errors_of(class: &str) -> u64 {
    ERROR_CLASSES
        .iter()
        .position(|c| *c == class)
        .map_or(0, |i| METRICS.errors[i].load(Ordering::Relaxed))
}

fn usage_ratio(used: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        used as f64 / total as f64
    }
}

fn set_kv_usage(stage: usize, worker: &str, ratio: f64) {
    let mut m = METRICS.kv_usage.lock().unwrap_or_else(|e| e.into_inner());
    m.insert(stage, (worker.to_string(), ratio));
}

/// Records what every stage reported for one micro-batch (index = stage).
pub fn record_stage_stats(stats: &[pb::StageStats]) {
    let m = global();
    let mut forward = m.stage_forward.lock().unwrap_or_else(|e| e.into_inner());
    for (i, s) in stats.iter().enumerate() {
        forward
            .entry(i)
            .or_default()
            .observe(Duration::from_nanos(s.forward_nanos));
        m.full_layers.fetch_add(s.full_layers, Ordering::Relaxed);
        m.shared_layers.fetch_add(s.shared_layers, Ordering::Relaxed);
        set_kv_usage(i, &s.worker_id, usage_ratio(s.kv_blocks_used, s.kv_blocks_total));
    }
}

/// Records a stage's KV usage from its `Info` answer (the health poll).
pub fn observe_stage_info(stage: usize, info: &pb::StageInfo) {
    let used = info.kv_blocks_total.saturating_sub(info.kv_blocks_free);
    set_kv_usage(stage, &info.worker_id, usage_ratio(used, info.kv_blocks_total));
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    header(out, name, "histogram", help);
    h.render(out, name, "");
}

fn counter(out: &mut String, name: &str, help: &str, v: &AtomicU64) {
    header(out, name, "counter", help);
    let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
}

/// A counter family with one series per value of `label`.
fn labelled_counter<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    series: impl IntoIterator<Item = (&'a str, &'a AtomicU64)>,
) {
    header(out, name, "counter", help);
    for (value, v) in series {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {}", v.load(Ordering::Relaxed));
    }
}

fn gauge(out: &mut String, name: &str, help: &str, v: usize) {
    header(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {v}");
}

/// Escapes a label value (backslash, quote, newline).
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The text exposition of every metric, with the gauges read from `sched` now.
pub fn render(sched: &SchedulerHandle) -> String {
    let m = global();
    let mut out = String::with_capacity(16384);
    histogram(
        &mut out,
        "indexrelay_time_to_first_token_seconds",
        "Time from submission to the first generated token.",
        &m.time_to_first_token,
    );
    histogram(
        &mut out,
        "indexrelay_inter_token_latency_seconds",
        "Time between consecutive generated tokens of a request.",
        &m.inter_token_latency,
    );
    histogram(
        &mut out,
        "indexrelay_request_duration_seconds",
        "Time from submission to the end of a request (finished or failed).",
        &m.request_duration,
    );
    histogram(
        &mut out,
        "indexrelay_request_queue_seconds",
        "Time a request waited for KV cache capacity before admission.",
        &m.request_queue,
    );
    let name = "indexrelay_stage_forward_seconds";
    header(
        &mut out,
        name,
        "histogram",
        "Time a pipeline stage spent computing one micro-batch.",
    );
    for (stage, h) in m.stage_forward.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        h.render(&mut out, name, &format!("stage=\"{stage}\""));
    }
    counter(
        &mut out,
        "indexrelay_prompt_tokens_total",
        "Prompt tokens prefilled.",
        &m.prompt_tokens,
    );
    counter(
        &mut out,
        "indexrelay_generation_tokens_total",
        "Tokens generated.",
        &m.generation_tokens,
    );
    labelled_counter(
        &mut out,
        "indexrelay_request_errors_total",
        "Failed requests by error class.",
        "class",
        ERROR_CLASSES.iter().copied().zip(&m.errors),
    );
    counter(
        &mut out,
        "indexrelay_relay_bytes_total",
        "Compressed IndexCache relay bytes sent between stages.",
        &m.relay_bytes,
    );
    labelled_counter(
        &mut out,
        "indexrelay_indexer_layers_total",
        "Layer runs (one per sequence segment and layer) by IndexCache kind: full computed the indexer, shared reused the top-k of the Full layer before.",
        "kind",
        [("full", &m.full_layers), ("shared", &m.shared_layers)],
    );
    header(
        &mut out,
        "indexrelay_kv_cache_usage_ratio",
        "gauge",
        "Fraction of a worker's KV cache blocks in use.",
    );
    for (stage, (worker, ratio)) in m.kv_usage.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let _ = writeln!(
            out,
            "indexrelay_kv_cache_usage_ratio{{stage=\"{stage}\",worker=\"{}\"}} {ratio}",
            escape_label(worker)
        );
    }
    gauge(
        &mut out,
        "indexrelay_requests_running",
        "Sequences admitted into the pipeline.",
        sched.running(),
    );
    gauge(
        &mut out,
        "indexrelay_requests_waiting",
        "Sequences waiting for KV cache capacity.",
        sched.waiting(),
    );
    out
}
