//! A cumulative histogram with fixed buckets, in Prometheus text form.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Histogram bucket bounds in seconds: fine below a second for inter-token latency and
/// stage forwards, and up to 600 s because long-context prefill and queueing take minutes.
pub const BUCKETS: [f64; 24] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 60.0,
    80.0, 120.0, 240.0, 480.0, 600.0,
];

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

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            inner: Mutex::new(HistogramData {
                counts: [0; BUCKETS.len() + 1],
                sum: 0.0,
                count: 0,
            }),
        }
    }
}

impl Histogram {
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

    /// Writes the series of this histogram under `name`; `labels` (e.g. `stage="0"`) go
    /// in front of `le` on every sample.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (b, c) in BUCKETS.iter().zip(&h.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", h.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", h.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_labelled() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(700));
        let mut out = String::new();
        h.render(&mut out, "x", "stage=\"1\"");
        assert!(out.contains("x_bucket{stage=\"1\",le=\"0.001\"} 0\n"), "{out}");
        assert!(out.contains("x_bucket{stage=\"1\",le=\"0.005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{stage=\"1\",le=\"600\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{stage=\"1\",le=\"+Inf\"} 2\n"), "{out}");
        assert!(out.contains("x_count{stage=\"1\"} 2\n"), "{out}");
        let mut plain = String::new();
        h.render(&mut plain, "y", "");
        assert!(
            plain.contains("y_bucket{le=\"+Inf\"} 2\n") && plain.contains("y_count 2\n"),
            "{plain}"
        );
    }
}
