//! `/metrics` after real traffic through a 3-stage cluster: every series operators rely on
//! is present, and each moves the way the traffic says it must (by exact amounts where the
//! traffic fixes them).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use worker::SamplingParams;

use super::cluster::{self, fixture, Cluster};

/// One scrape: every sample, keyed by its series as written (`name{labels}`).
struct Scrape {
    samples: BTreeMap<String, f64>,
    text: String,
}

impl Scrape {
    async fn take(c: &Cluster) -> Scrape {
        let text = reqwest::get(format!("http://{}/metrics", c.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {l:?}"));
                (
                    series.to_string(),
                    value.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")),
                )
            })
            .collect();
        Scrape { samples, text }
    }

    fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{}", self.text))
    }

    /// `self[series] - before[series]`.
    fn delta(&self, before: &Scrape, series: &str) -> f64 {
        self.get(series) - before.get(series)
    }

    /// Checks that a family is declared with its type.
    fn assert_family(&self, name: &str, kind: &str) {
        assert!(
            self.text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} is not declared as a {kind}:\n{}",
            self.text
        );
    }
}

const HISTOGRAMS: [&str; 4] = [
    "indexrelay_time_to_first_token_seconds",
    "indexrelay_inter_token_latency_seconds",
    "indexrelay_request_duration_seconds",
    "indexrelay_request_queue_seconds",
];

fn kv(stage: usize) -> String {
    format!("indexrelay_kv_cache_usage_ratio{{stage=\"{stage}\",worker=\"stage-{stage}\"}}")
}

fn forward_count(stage: usize) -> String {
    format!("indexrelay_stage_forward_seconds_count{{stage=\"{stage}\"}}")
}

fn errors(class: &str) -> String {
    format!("indexrelay_request_errors_total{{class=\"{class}\"}}")
}

/// Polls until `check` holds on a scrape, or panics with `what` after `limit`.
async fn eventually(c: &Cluster, limit: Duration, what: &str, check: impl Fn(&Scrape) -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        let s = Scrape::take(c).await;
        if check(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "{what} within {limit:?}:\n{}", s.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_moves_with_traffic() {
    // FFSFSF split [0,2) [2,4) [4,6): both later stages start on a Shared layer, so the
    // relay carries indices; 8 blocks of 64 positions hold one 310-token request at a time.
    let dir = fixture("glm_pattern");
    let c = Cluster::start(&dir, 3, &[2, 4], &["--kv-blocks", "8", "--block-size", "64"]).await;
    let before = Scrape::take(&c).await;
    for h in HISTOGRAMS {
        before.assert_family(h, "histogram");
        // Buckets reach 600 s (long prefill and queueing take minutes).
        before.get(&format!("{h}_bucket{{le=\"600\"}}"));
        before.get(&format!("{h}_bucket{{le=\"+Inf\"}}"));
    }
    before.assert_family("indexrelay_stage_forward_seconds", "histogram");
    for name in [
        "indexrelay_prompt_tokens_total",
        "indexrelay_generation_tokens_total",
        "indexrelay_relay_bytes_total",
        "indexrelay_indexer_layers_total",
        "indexrelay_request_errors_total",
    ] {
        before.assert_family(name, "counter");
    }
    for name in [
        "indexrelay_requests_running",
        "indexrelay_requests_waiting",
        "indexrelay_kv_cache_usage_ratio",
    ] {
        before.assert_family(name, "gauge");
    }

    // 1. Sequential requests: every count is known exactly. A prompt shorter than the
    // prefill chunk is one forward, and each further token one more: `n` forwards for `n`
    // tokens, each through all six layers (four Full, two Shared) on every stage.
    let reqs: [(usize, usize); 3] = [(5, 3), (17, 6), (40, 9)];
    for (len, n) in reqs {
        let prompt: Vec<u32> = (0..len as u32).map(|i| (i * 11 + 3) % 320).collect();
        let got = c.generate(prompt, n, SamplingParams::default(), false).await.unwrap();
        assert_eq!(got.tokens.len(), n);
    }
    let after = Scrape::take(&c).await;
    let prompt_total: usize = reqs.iter().map(|r| r.0).sum();
    let tokens_total: usize = reqs.iter().map(|r| r.1).sum();
    let forwards = tokens_total as f64;
    assert_eq!(
        after.delta(&before, "indexrelay_prompt_tokens_total"),
        prompt_total as f64
    );
    assert_eq!(
        after.delta(&before, "indexrelay_generation_tokens_total"),
        tokens_total as f64
    );
    let count = |h: &str| after.delta(&before, &format!("{h}_count"));
    assert_eq!(count("indexrelay_time_to_first_token_seconds"), 3.0);
    assert_eq!(
        count("indexrelay_inter_token_latency_seconds"),
        (tokens_total - 3) as f64
    );
    assert_eq!(count("indexrelay_request_duration_seconds"), 3.0);
    assert_eq!(count("indexrelay_request_queue_seconds"), 3.0);
    for h in HISTOGRAMS.iter().take(3) {
        assert!(after.delta(&before, &format!("{h}_sum")) > 0.0, "{h}_sum did not grow");
    }
    for stage in 0..3 {
        // Absent before any traffic: the first forward creates the stage's series.
        let was = before.samples.get(&forward_count(stage)).copied().unwrap_or(0.0);
        assert_eq!(
            after.get(&forward_count(stage)) - was,
            forwards,
            "stage {stage} forwards"
        );
        assert!(after.get(&format!("indexrelay_stage_forward_seconds_sum{{stage=\"{stage}\"}}")) > 0.0);
        after.get(&format!(
            "indexrelay_stage_forward_seconds_bucket{{stage=\"{stage}\",le=\"600\"}}"
        ));
    }
    assert_eq!(
        after.delta(&before, "indexrelay_indexer_layers_total{kind=\"full\"}"),
        4.0 * forwards
    );
    assert_eq!(
        after.delta(&before, "indexrelay_indexer_layers_total{kind=\"shared\"}"),
        2.0 * forwards
    );
    assert!(after.delta(&before, "indexrelay_relay_bytes_total") > 0.0);
    for class in ["invalid_request", "not_found", "unavailable", "internal"] {
        assert_eq!(after.delta(&before, &errors(class)), 0.0, "{class}");
    }

    // 2. Two long requests that cannot share the KV cache: one runs while the other waits;
    // every worker's cache is in use meanwhile, and everything falls back afterwards.
    let mid = Scrape::take(&c).await;
    let long: Vec<u32> = (0..10).collect();
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            let (client, prompt) = (c.client(), long.clone());
            tokio::spawn(
                async move { cluster::generate_with(client, prompt, 300, SamplingParams::default(), false).await },
            )
        })
        .collect();
    let (mut saw_waiting, mut saw_running) = (false, false);
    let mut saw_kv = [false; 3];
    while !tasks.iter().all(|t| t.is_finished()) {
        let s = Scrape::take(&c).await;
        saw_waiting |= s.get("indexrelay_requests_waiting") >= 1.0;
        saw_running |= s.get("indexrelay_requests_running") >= 1.0;
        for (stage, seen) in saw_kv.iter_mut().enumerate() {
            *seen |= s.samples.get(&kv(stage)).is_some_and(|v| *v > 0.0);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().tokens.len(), 300);
    }
    assert!(saw_running, "requests_running never rose");
    assert!(
        saw_waiting,
        "requests_waiting never rose although the cache holds one request"
    );
    assert_eq!(saw_kv, [true; 3], "KV usage per worker never rose above 0");
    eventually(&c, Duration::from_secs(5), "gauges back to 0", |s| {
        s.get("indexrelay_requests_running") == 0.0
            && s.get("indexrelay_requests_waiting") == 0.0
            && (0..3).all(|i| s.get(&kv(i)) == 0.0)
    })
    .await;
    let end = Scrape::take(&c).await;
    assert_eq!(end.delta(&mid, "indexrelay_request_queue_seconds_count"), 2.0);
    // The second request waited for the whole first one (300 tokens through 3 stages).
    assert!(end.delta(&mid, "indexrelay_request_queue_seconds_sum") > 0.01);
    assert_eq!(end.delta(&mid, "indexrelay_generation_tokens_total"), 600.0);

    // 3. Errors, by class.
    let bad = c
        .client()
        .generate(cluster::request(vec![], 4, SamplingParams::default(), false))
        .await;
    assert_eq!(bad.unwrap_err().code(), tonic::Code::InvalidArgument);
    let mut req = cluster::request(vec![1, 2], 2, SamplingParams::default(), false);
    req.model = "no-such-model".into();
    assert_eq!(
        c.client().generate(req).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    c.kill_worker(1);
    let deadline = Instant::now() + Duration::from_secs(10);
    let unavailable = loop {
        let r = c
            .client()
            .generate(cluster::request(vec![1, 2], 2, SamplingParams::default(), false))
            .await;
        match r {
            Err(s) if s.code() == tonic::Code::Unavailable => break s,
            // Before the health poll notices, a request may still be accepted (and fail in
            // the stream); drain it so it is counted before the next try.
            Ok(resp) => {
                let mut stream = resp.into_inner();
                while let Ok(Some(_)) = stream.message().await {}
            }
            Err(s) => panic!("unexpected {s:?}"),
        }
        assert!(Instant::now() < deadline, "the cluster never refused with UNAVAILABLE");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(unavailable.message().contains("stage"), "{unavailable:?}");
    let last = Scrape::take(&c).await;
    assert_eq!(last.delta(&end, &errors("invalid_request")), 1.0);
    assert_eq!(last.delta(&end, &errors("not_found")), 1.0);
    assert!(last.delta(&end, &errors("unavailable")) >= 1.0);
    assert_eq!(last.delta(&end, &errors("internal")), 0.0);
}
