//! The admin API and `irctl` against a real local cluster: status, drain/undrain, live
//! pattern changes (new requests only, equal to the single-process engine with that
//! pattern), live re-planning of the stages ([`replan`]), the pattern search (same commit
//! order as a brute-force evaluation with the engine), token authentication, and clear
//! errors for bad arguments.

mod replan;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use proto::v1::{self as pb};
use serde_json::Value;
use worker::{Engine, EngineOptions, GenerationRequest, Model};

use super::cluster::{self, fixture, prompt_cases, Cluster};
use super::{assert_same, greedy, local, Answer};

/// Runs `irctl --coordinator ADDR args…` without any token from the environment.
fn irctl(addr: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_irctl"))
        .args(["--coordinator", addr])
        .args(args)
        .env_remove("INDEXRELAY_ADMIN_TOKEN")
        .env_remove("INDEXRELAY_COORDINATOR")
        .output()
        .expect("run irctl")
}

/// Runs irctl off the async executor (it blocks).
async fn irctl_async(addr: &str, args: &[&str]) -> Output {
    let addr = addr.to_string();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        irctl(&addr, &args)
    })
    .await
    .unwrap()
}

/// The JSON a successful irctl call printed.
fn ok_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "irctl failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("irctl --json prints one JSON object")
}

/// Asserts a failed irctl call whose stderr contains `needle`.
fn assert_fails(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected a failure mentioning {needle:?}; stderr: {err}"
    );
    assert!(err.contains(needle), "stderr should mention {needle:?}: {err}");
}

/// A raw admin client (for steps that must happen while a request is surely in flight:
/// starting a process takes long on a loaded machine).
fn admin_client(addr: &str) -> pb::admin_client::AdminClient<tonic::transport::Channel> {
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    pb::admin_client::AdminClient::new(ch)
}

/// Starts a long greedy request; returns once its first token is out, with a handle giving
/// its tokens and when it ended.
async fn start_long(c: &Cluster, prompt: Vec<u32>, n: usize) -> tokio::task::JoinHandle<(Vec<u32>, Instant)> {
    let client = c.client();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut stream = client
            .clone()
            .generate(cluster::request(prompt, n, greedy(), false))
            .await
            .unwrap()
            .into_inner();
        let mut tokens = stream.message().await.unwrap().unwrap().token_ids;
        let _ = started_tx.send(());
        while let Some(msg) = stream.message().await.unwrap() {
            tokens.extend(msg.token_ids);
        }
        (tokens, Instant::now())
    });
    started_rx.await.unwrap();
    task
}

fn engine_with(dir: &Path, pattern: Option<&str>) -> Engine {
    Engine::new(Model::load(dir, pattern).unwrap(), EngineOptions::default()).unwrap()
}

fn run_one(e: &mut Engine, prompt: &[u32], n: usize, lps: bool) -> Answer {
    let out = e
        .generate(vec![GenerationRequest {
            prompt: prompt.to_vec(),
            max_new_tokens: n,
            sampling: greedy(),
            prompt_logprobs: lps,
            ignore_eos: true,
        }])
        .unwrap()
        .remove(0);
    Answer {
        tokens: out.token_ids,
        prompt_logprobs: out.prompt_logprobs.unwrap_or_default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn irctl_status_lists_every_worker_and_stage() {
    let dir = fixture("glm_pattern"); // FFSFSF
    let c = Cluster::start(&dir, 3, &[2, 4], &[]).await;
    let s = ok_json(&irctl_async(&c.addr, &["status", "--json"]).await);
    let workers = s["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 3);
    let ranges = [(0, 2), (2, 4), (4, 6)];
    for (i, w) in workers.iter().enumerate() {
        assert_eq!(w["address"], c.worker_addrs[i].as_str());
        assert_eq!(w["worker_id"], format!("stage-{i}").as_str());
        assert_eq!(w["stage"], i);
        assert_eq!(
            (w["layer_start"].as_u64().unwrap(), w["layer_end"].as_u64().unwrap()),
            ranges[i]
        );
        assert_eq!(w["health"], "up");
        assert_eq!(w["drained"], false);
        assert!(w["kv_blocks_total"].as_u64().unwrap() > 0);
        assert_eq!(w["in_flight"], 0);
    }
    let plan = s["plan"].as_array().unwrap();
    assert_eq!(plan.len(), 3);
    // Stages 1 and 2 start on layers 2 and 4, Shared under FFSFSF: they take the relay.
    let relay: Vec<bool> = plan.iter().map(|p| p["relay_in"].as_bool().unwrap()).collect();
    assert_eq!(relay, [false, true, true]);
    assert_eq!(s["pattern"]["pattern"], "FFSFSF");
    assert_eq!(s["pattern"]["full_layers"], 4);
    assert_eq!(s["requests"]["running"], 0);
    assert_eq!(s["requests"]["waiting"], 0);
    assert_eq!(s["accepting"], true);
    // The table names every worker too.
    let out = irctl_async(&c.addr, &["status"]).await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for a in &c.worker_addrs {
        assert!(text.contains(a.as_str()), "{text}");
    }
    assert!(text.contains("FFSFSF") && text.contains("RELAY-IN"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_new_sequences_while_in_flight_ones_finish() {
    let dir = fixture("glm_pattern");
    let prompt = prompt_cases(&dir)[2].clone();
    let n = 480;
    let want = local(&dir, &[(prompt.clone(), n, greedy())], false).remove(0);
    let c = Cluster::start(&dir, 2, &[], &[]).await;
    let mut stream = c
        .client()
        .generate(cluster::request(prompt.clone(), n, greedy(), false))
        .await
        .unwrap()
        .into_inner();
    let mut tokens = stream.message().await.unwrap().unwrap().token_ids;
    // Drain by worker id while the sequence decodes.
    let d = admin_client(&c.addr)
        .drain(pb::DrainRequest {
            worker: "stage-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let w = d.worker.unwrap();
    assert_eq!((w.address.as_str(), w.drained), (c.worker_addrs[1].as_str(), true));
    assert_eq!(w.in_flight, 1, "the sequence is in flight on the drained worker");
    assert!(!d.accepting);
    // irctl shows it (draining again changes nothing).
    let d = ok_json(&irctl_async(&c.addr, &["drain", "stage-1", "--json"]).await);
    assert_eq!(d["worker"]["address"], c.worker_addrs[1].as_str());
    assert_eq!(d["worker"]["drained"], true);
    assert_eq!(d["accepting"], false);
    let s = ok_json(&irctl_async(&c.addr, &["status", "--json"]).await);
    assert_eq!(s["workers"][1]["drained"], true);
    assert_eq!(s["workers"][0]["drained"], false);
    assert_eq!(s["accepting"], false);
    // A new request is refused with a clear, retryable error.
    let err = c.generate(vec![5, 6, 7], 3, greedy(), false).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("drained") && err.message().contains("undrain"),
        "{err:?}"
    );
    // The in-flight sequence finishes, with the same tokens as the single-process engine.
    let mut finished = false;
    while let Some(msg) = stream.message().await.unwrap() {
        tokens.extend(msg.token_ids);
        finished |= msg.finish_reason != 0;
    }
    assert!(finished);
    assert_eq!(tokens, want.tokens, "the drained pipeline's in-flight sequence");
    // No sequence is left on the drained worker.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = ok_json(&irctl_async(&c.addr, &["status", "--json"]).await);
        if s["workers"][1]["in_flight"] == 0 && s["requests"]["running"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "sequences left after drain: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Undrain by address: new requests run again.
    let u = ok_json(&irctl_async(&c.addr, &["undrain", &c.worker_addrs[1], "--json"]).await);
    assert_eq!(u["worker"]["drained"], false);
    assert_eq!(u["accepting"], true);
    let got = c.generate(prompt.clone(), 6, greedy(), false).await.unwrap();
    assert_eq!(got.tokens, want.tokens[..6]);
    let s = ok_json(&irctl_async(&c.addr, &["status", "--json"]).await);
    assert_eq!(s["accepting"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pattern_set_changes_new_requests_only_and_equals_the_engine() {
    let dir = fixture("glm_dense"); // all Full, every layer has indexer weights
    let prompts = prompt_cases(&dir);
    let (long, probe) = (prompts[0].clone(), prompts[1].clone());
    let new_pattern = "FSSFSS";
    let mut old_engine = engine_with(&dir, None);
    let mut new_engine = engine_with(&dir, Some(new_pattern));
    let long_want = run_one(&mut old_engine, &long, 420, false);
    let probe_old = run_one(&mut old_engine, &probe, 8, true);
    let probe_new = run_one(&mut new_engine, &probe, 8, true);
    assert_ne!(
        probe_old.prompt_logprobs, probe_new.prompt_logprobs,
        "the probe must be long enough for the pattern to matter"
    );
    // Stages 1 and 2 start on layers 2 and 4: Full now, Shared (relay needed) after the change.
    let c = Cluster::start(&dir, 3, &[2, 4], &[]).await;
    let before = c.generate(probe.clone(), 8, greedy(), true).await.unwrap();
    assert_same("probe before the change", &before, &probe_old);

    // Set the pattern while the long sequence decodes (its first token is out).
    let long_task = start_long(&c, long, 420).await;
    let p = admin_client(&c.addr)
        .set_pattern(pb::SetPatternRequest {
            pattern: new_pattern.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let set_done = Instant::now();
    assert_eq!((p.pattern.as_str(), p.epoch, p.full_layers), (new_pattern, 1, 2));
    let after = c.generate(probe.clone(), 8, greedy(), true).await.unwrap();
    assert_same("probe after the change", &after, &probe_new);
    let (long_tokens, long_end) = long_task.await.unwrap();
    assert!(
        long_end > set_done,
        "the long request must still have been running at the change"
    );
    assert_eq!(
        long_tokens, long_want.tokens,
        "the in-flight sequence keeps its start-up pattern"
    );
    // irctl sets patterns too (the same one again: a new epoch).
    let lower = new_pattern.to_lowercase();
    let p = ok_json(&irctl_async(&c.addr, &["pattern", "set", &lower, "--json"]).await);
    assert_eq!(p["pattern"], new_pattern);
    assert_eq!(p["epoch"], 2);
    assert_eq!(p["full_layers"], 2);
    let g = ok_json(&irctl_async(&c.addr, &["pattern", "get", "--json"]).await);
    assert_eq!(g["pattern"], new_pattern);
    let s = ok_json(&irctl_async(&c.addr, &["status", "--json"]).await);
    let relay: Vec<bool> = s["plan"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["relay_in"].as_bool().unwrap())
        .collect();
    assert_eq!(relay, [false, true, true]);
    // The public model list reports the active pattern.
    let models = c
        .client()
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(models.models[0].index_pattern, new_pattern);
    // Invalid patterns are refused with the reason; the active one stays.
    assert_fails(
        &irctl_async(&c.addr, &["pattern", "set", "FSS"]).await,
        "num_hidden_layers = 6",
    );
    assert_fails(&irctl_async(&c.addr, &["pattern", "set", "SFFFFF"]).await, "layer 0");
    let g = ok_json(&irctl_async(&c.addr, &["pattern", "get", "--json"]).await);
    assert_eq!(g["pattern"], new_pattern);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_layer_needs_indexer_weights_in_the_checkpoint() {
    let dir = fixture("dsv32_pattern"); // FSSFSS; Shared layers' indexer tensors are absent
    let c = Cluster::start(&dir, 2, &[], &[]).await;
    let out = irctl_async(&c.addr, &["pattern", "set", "FFSFSS"]).await;
    assert_fails(&out, "layer 1");
    assert_fails(&out, "indexer");
    // The search starts all-Full, which this checkpoint cannot run.
    let data = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(data.path(), "{\"token_ids\": [1, 2, 3, 4]}\n").unwrap();
    let path = data.path().to_str().unwrap();
    let out = irctl_async(&c.addr, &["calibrate", "--data", path, "--target-full", "2"]).await;
    assert_fails(&out, "all-Full");
    let g = ok_json(&irctl_async(&c.addr, &["pattern", "get", "--json"]).await);
    assert_eq!(g["pattern"], "FSSFSS");
}

/// Deterministic calibration prompts longer than index_topk (so the pattern matters).
fn calibration_samples() -> Vec<Vec<u32>> {
    let mut x = 0x2545_f491u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    [48usize, 64, 33]
        .iter()
        .map(|&n| (0..n).map(|_| (next() % 320) as u32).collect())
        .collect()
}

/// The greedy search by brute force with the single-process engine: every candidate of
/// every step scored. Returns the commit order with losses, the baseline, and the smallest
/// gap between a step's best and second-best candidate.
fn brute_force(
    dir: &Path,
    samples: &[Vec<u32>],
    target_full: usize,
    forced: &[usize],
) -> (Vec<(usize, f64)>, f64, f64) {
    let loss = |pattern: &str| {
        let mut e = engine_with(dir, Some(pattern));
        let per: Vec<Vec<Option<f32>>> = samples
            .iter()
            .map(|s| run_one(&mut e, s, 0, true).prompt_logprobs)
            .collect();
        coordinator::admin::calibrate::mean_nll(&per).0
    };
    let n = 6;
    let mut p = vec!['F'; n];
    let baseline = loss(&p.iter().collect::<String>());
    let mut steps = Vec::new();
    let mut min_gap = f64::INFINITY;
    while p.iter().filter(|c| **c == 'F').count() > target_full {
        let mut scored: Vec<(usize, f64)> = (0..n)
            .filter(|l| p[*l] == 'F' && !forced.contains(l))
            .map(|l| {
                let mut q = p.clone();
                q[l] = 'S';
                (l, loss(&q.iter().collect::<String>()))
            })
            .collect();
        scored.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        if scored.len() > 1 {
            min_gap = min_gap.min(scored[1].1 - scored[0].1);
        }
        p[scored[0].0] = 'S';
        steps.push(scored[0]);
    }
    (steps, baseline, min_gap)
}

fn assert_matches_brute_force(got: &Value, want: &(Vec<(usize, f64)>, f64, f64)) {
    let (steps, baseline, gap) = want;
    // Cluster and engine batch differently (rounding ~1e-6): the data must separate the
    // candidates by more than that for the order to be a meaningful comparison.
    assert!(
        *gap > 1e-4,
        "calibration data gives near-ties (gap {gap}); choose other samples"
    );
    let got_steps = got["steps"].as_array().unwrap();
    let order: Vec<u64> = got_steps.iter().map(|s| s["layer"].as_u64().unwrap()).collect();
    let want_order: Vec<u64> = steps.iter().map(|s| s.0 as u64).collect();
    assert_eq!(
        order, want_order,
        "commit order: cluster {got} vs brute force {steps:?}"
    );
    for (g, w) in got_steps.iter().zip(steps) {
        let g = g["loss"].as_f64().unwrap();
        assert!((g - w.1).abs() < 1e-4, "step loss {g} vs {}", w.1);
    }
    assert!((got["baseline_loss"].as_f64().unwrap() - baseline).abs() < 1e-4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibration_commits_in_the_brute_force_order() {
    let dir = fixture("glm_dense");
    let samples = calibration_samples();
    let data = tempfile::NamedTempFile::new().unwrap();
    let lines: Vec<String> = samples
        .iter()
        .map(|s| serde_json::json!({ "token_ids": s }).to_string())
        .collect();
    std::fs::write(data.path(), lines.join("\n")).unwrap();
    let path = data.path().to_str().unwrap().to_string();
    let c = Cluster::start(&dir, 2, &[3], &[]).await;

    let out = irctl_async(&c.addr, &["calibrate", "--data", &path, "--target-full", "2", "--json"]).await;
    let got = ok_json(&out);
    let want = tokio::task::spawn_blocking({
        let (dir, samples) = (dir.clone(), samples.clone());
        move || brute_force(&dir, &samples, 2, &[0])
    })
    .await
    .unwrap();
    assert_matches_brute_force(&got, &want);
    let pattern = got["pattern"].as_str().unwrap();
    assert_eq!(pattern.len(), 6);
    assert_eq!(pattern.matches('F').count(), 2);
    assert!(pattern.starts_with('F'));
    assert_eq!(got["applied"], false);
    // Progress went to stderr, one line per committed step at least.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("baseline") && err.contains("step 4/4"), "{err}");
    let g = ok_json(&irctl_async(&c.addr, &["pattern", "get", "--json"]).await);
    assert_eq!(g["pattern"], "FFFFFF", "without --apply the active pattern stays");

    // Per stage: the second stage's first layer (3) stays Full too; --apply activates it.
    let args = [
        "calibrate",
        "--data",
        &path,
        "--target-full",
        "3",
        "--per-stage",
        "--apply",
        "--json",
    ];
    let got = ok_json(&irctl_async(&c.addr, &args).await);
    let want = tokio::task::spawn_blocking({
        let (dir, samples) = (dir.clone(), samples.clone());
        move || brute_force(&dir, &samples, 3, &[0, 3])
    })
    .await
    .unwrap();
    assert_matches_brute_force(&got, &want);
    let pattern = got["pattern"].as_str().unwrap().to_string();
    assert_eq!(&pattern[3..4], "F");
    assert_eq!(got["applied"], true);
    let g = ok_json(&irctl_async(&c.addr, &["pattern", "get", "--json"]).await);
    assert_eq!(g["pattern"], pattern.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_the_token_when_one_is_configured() {
    let dir = fixture("glm_pattern");
    let c = Cluster::start(&dir, 2, &[], &["--admin-token", "s3cret"]).await;
    // A raw gRPC call without credentials.
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", c.addr))
        .unwrap()
        .connect_lazy();
    let mut admin = pb::admin_client::AdminClient::new(ch);
    let err = admin.status(pb::StatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let err = admin
        .set_pattern(pb::SetPatternRequest {
            pattern: "FSSSSS".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    // irctl without, with a wrong, and with the right token.
    assert_fails(&irctl_async(&c.addr, &["status"]).await, "token");
    assert_fails(
        &irctl_async(&c.addr, &["--token", "guess", "drain", "0"]).await,
        "invalid admin token",
    );
    let s = ok_json(&irctl_async(&c.addr, &["--token", "s3cret", "status", "--json"]).await);
    assert_eq!(s["workers"].as_array().unwrap().len(), 2);
    assert_eq!(s["accepting"], true, "the refused drain changed nothing");
    // The public API needs no token.
    let got = c.generate(vec![3, 4, 5], 2, greedy(), false).await.unwrap();
    assert_eq!(got.tokens.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_irctl_arguments_exit_non_zero_with_a_clear_message() {
    // Checked before any connection.
    let nowhere = "127.0.0.1:1";
    let out = irctl(nowhere, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
    assert_eq!(irctl(nowhere, &["drain"]).status.code(), Some(2));
    assert_fails(&irctl(nowhere, &["pattern", "set", "FSX"]), "character 2");
    assert_fails(
        &irctl(
            nowhere,
            &["calibrate", "--data", "/no/such/file.jsonl", "--target-full", "2"],
        ),
        "/no/such/file.jsonl",
    );
    assert_fails(
        &irctl(nowhere, &["calibrate", "--data", "x", "--target-full", "0"]),
        "--target-full",
    );
    assert_fails(&irctl(nowhere, &["status"]), "cannot reach the coordinator");
    assert_fails(&irctl("not an address", &["status"]), "--coordinator");
    let data = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(data.path(), "{\"token_ids\": [1, 2]}\n{\"tokens\": [1]}\n").unwrap();
    let path = data.path().to_str().unwrap();
    assert_fails(
        &irctl(nowhere, &["calibrate", "--data", path, "--target-full", "2"]),
        "line 2",
    );

    // Checked by the coordinator.
    let dir = fixture("glm_dense");
    let c = Cluster::start(&dir, 2, &[], &[]).await;
    assert_fails(
        &irctl_async(&c.addr, &["drain", "no-such-worker"]).await,
        "no worker `no-such-worker`",
    );
    std::fs::write(data.path(), "{\"token_ids\": [1, 2, 3]}\n").unwrap();
    assert_fails(
        &irctl_async(&c.addr, &["calibrate", "--data", path, "--target-full", "9"]).await,
        "target_full",
    );
    std::fs::write(data.path(), "{\"token_ids\": [1, 2, 3]}\n{\"token_ids\": [7]}\n").unwrap();
    assert_fails(
        &irctl_async(&c.addr, &["calibrate", "--data", path, "--target-full", "2"]).await,
        "samples[1]",
    );
    std::fs::write(data.path(), "{\"text\": \"hello\"}\n").unwrap();
    assert_fails(
        &irctl_async(&c.addr, &["calibrate", "--data", path, "--target-full", "2"]).await,
        "tokenizer",
    );
}
