//! Prometheus metrics (text exposition format 0.0.4, written by hand: a handful of series
//! does not justify a registry crate).
//!
//! Request-level metrics are recorded in one place for both front ends: every request goes
//! through [`RequestTracker::submit`], and its events are observed as they are read from
//! the scheduler. Queue time is recorded by the scheduler itself at admission, the only
//! place that knows when a sequence left the waiting queue.

use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::Stream;

use crate::app::{App, RawRequest};
use crate::error::CoordinatorError;
use crate::scheduler::{Event, SchedulerHandle};

/// Histogram bucket bounds in seconds: fine below a second for inter-token latency, and up
/// to 600 s because long-context prefill and queueing take minutes.
const BUCKETS: [f64; 24] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 60.0,
    80.0, 120.0, 240.0, 480.0, 600.0,
];

/// The error classes of [`CoordinatorError::class`], listed so every series exists (at 0)
/// from the start: a rate over a series that appears late misses its first increments.
const ERROR_CLASSES: [&str; 4] = ["invalid_request", "not_found", "unavailable", "internal"];

/// A cumulative histogram with the fixed [`BUCKETS`].
pub struct Histogram {
    inner: Mutex<HistogramData>,
}

struct HistogramData {
    /// Per-bucket (non-cumulative) counts; the last slot is +Inf.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            inner: Mutex::new(HistogramData {
                counts: [0; BUCKETS.len() + 1],
                sum: 0.0,
                count: 0,
            }),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let v = d.as_secs_f64();
        let i = BUCKETS.iter().position(|b| v <= *b).unwrap_or(BUCKETS.len());
        let mut h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        h.counts[i] += 1;
        h.sum += v;
        h.count += 1;
    }

    /// Number of observations so far.
    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).count
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in BUCKETS.iter().zip(&h.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum {}", h.sum);
        let _ = writeln!(out, "{name}_count {}", h.count);
    }
}

/// Every series the coordinator exports (gauges are read from the scheduler at scrape time).
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
    /// Failed requests per error class, in [`ERROR_CLASSES`] order.
    errors: [AtomicU64; ERROR_CLASSES.len()],
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    time_to_first_token: Histogram::new(),
    inter_token_latency: Histogram::new(),
    request_duration: Histogram::new(),
    request_queue: Histogram::new(),
    prompt_tokens: AtomicU64::new(0),
    generation_tokens: AtomicU64::new(0),
    relay_bytes: AtomicU64::new(0),
    errors: Default::default(),
});

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

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} counter");
    let _ = writeln!(out, "{name} {v}");
}

fn gauge(out: &mut String, name: &str, help: &str, v: usize) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    let _ = writeln!(out, "{name} {v}");
}

/// The text exposition of every metric, with the gauges read from `sched` now.
pub fn render(sched: &SchedulerHandle) -> String {
    let m = global();
    let mut out = String::with_capacity(8192);
    m.time_to_first_token.render(
        &mut out,
        "indexrelay_time_to_first_token_seconds",
        "Time from submission to the first generated token.",
    );
    m.inter_token_latency.render(
        &mut out,
        "indexrelay_inter_token_latency_seconds",
        "Time between consecutive generated tokens of a request.",
    );
    m.request_duration.render(
        &mut out,
        "indexrelay_request_duration_seconds",
        "Time from submission to the end of a request (finished or failed).",
    );
    m.request_queue.render(
        &mut out,
        "indexrelay_request_queue_seconds",
        "Time a request waited for KV cache capacity before admission.",
    );
    counter(
        &mut out,
        "indexrelay_prompt_tokens_total",
        "Prompt tokens prefilled.",
        m.prompt_tokens.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "indexrelay_generation_tokens_total",
        "Tokens generated.",
        m.generation_tokens.load(Ordering::Relaxed),
    );
    let _ = writeln!(
        out,
        "# HELP indexrelay_request_errors_total Failed requests by error class."
    );
    let _ = writeln!(out, "# TYPE indexrelay_request_errors_total counter");
    for (c, v) in ERROR_CLASSES.iter().zip(&m.errors) {
        let _ = writeln!(
            out,
            "indexrelay_request_errors_total{{class=\"{c}\"}} {}",
            v.load(Ordering::Relaxed)
        );
    }
    counter(
        &mut out,
        "indexrelay_relay_bytes_total",
        "Compressed IndexCache relay bytes sent between stages.",
        m.relay_bytes.load(Ordering::Relaxed),
    );
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

/// A request's event stream that records the request-level metrics as events are read.
/// Dropping it drops the scheduler receiver, which cancels the sequence.
pub struct RequestTracker {
    rx: mpsc::UnboundedReceiver<Event>,
    submitted: Instant,
    last_token: Option<Instant>,
    prompt_len: usize,
    prompt_counted: bool,
    ended: bool,
}

impl RequestTracker {
    /// Validates, tokenizes and submits `raw`; a rejected request is counted as an error.
    /// Returns the prompt ids (the front ends echo and score them) and the tracked stream.
    pub async fn submit(app: &App, raw: RawRequest) -> Result<(Vec<u32>, RequestTracker), CoordinatorError> {
        let submitted = Instant::now();
        let res = async {
            let req = app.prepare(raw).await?;
            let prompt = req.prompt.clone();
            let rx = app.scheduler.submit(req)?;
            Ok((prompt, rx))
        }
        .await;
        match res {
            Ok((prompt, rx)) => {
                let tracker = RequestTracker {
                    rx,
                    submitted,
                    last_token: None,
                    prompt_len: prompt.len(),
                    prompt_counted: false,
                    ended: false,
                };
                Ok((prompt, tracker))
            }
            Err(e) => {
                record_error(&e);
                Err(e)
            }
        }
    }

    /// The next event, recorded.
    pub async fn recv(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let ev = std::task::ready!(self.rx.poll_recv(cx));
        match &ev {
            Some(e) => self.observe(e),
            None if !self.ended => {
                // The scheduler dropped the sender without a last event: it stopped.
                self.ended = true;
                record_error(&CoordinatorError::Internal(String::new()));
            }
            None => {}
        }
        Poll::Ready(ev)
    }

    fn observe(&mut self, ev: &Event) {
        let m = global();
        let now = Instant::now();
        // Any event but a failure means the prefill completed (prompt logprobs and the
        // first token both come from the prefill's last chunk): count the prompt once.
        if !self.prompt_counted && !matches!(ev, Event::Failed(_)) {
            self.prompt_counted = true;
            m.prompt_tokens.fetch_add(self.prompt_len as u64, Ordering::Relaxed);
        }
        match ev {
            Event::PromptLogprobs(_) => {}
            Event::Token { .. } => {
                match self.last_token {
                    None => m.time_to_first_token.observe(now - self.submitted),
                    Some(t) => m.inter_token_latency.observe(now - t),
                }
                self.last_token = Some(now);
                m.generation_tokens.fetch_add(1, Ordering::Relaxed);
            }
            Event::Finished { .. } => {
                m.request_duration.observe(now - self.submitted);
                self.ended = true;
            }
            Event::Failed(e) => {
                record_error(e);
                m.request_duration.observe(now - self.submitted);
                self.ended = true;
            }
        }
    }
}

impl Stream for RequestTracker {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.get_mut().poll_event(cx)
    }
}
