//! Live re-planning on `pattern set`: the planner's split for the new pattern is adopted
//! while requests keep their answers (in-flight ones finish under the old pattern, queued
//! and later ones run under the new one, all equal to the single-process engine), unless
//! the plan is pinned; a stage refuses to move while it holds a live sequence and keeps
//! serving its range when a load fails.

use std::time::{Duration, Instant};

use proto::v1::stage_client::StageClient;
use proto::v1::{self as pb};
use serde_json::Value;

use super::super::cluster::{self, fixture, prompt_cases, Cluster};
use super::super::{assert_same, greedy};
use super::{admin_client, engine_with, irctl_async, ok_json, run_one, start_long};

/// The (start, end) pairs of a JSON plan or worker list.
fn ranges(v: &Value) -> Vec<(u64, u64)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| (x["layer_start"].as_u64().unwrap(), x["layer_end"].as_u64().unwrap()))
        .collect()
}

fn stage_client(addr: &str) -> StageClient<tonic::transport::Channel> {
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    StageClient::new(ch)
}

/// The layer range stage `addr` itself reports.
async fn stage_range(addr: &str) -> (u32, u32) {
    let info = stage_client(addr).info(pb::InfoRequest {}).await.unwrap().into_inner();
    (info.layer_start, info.layer_end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pattern_set_re_plans_the_stages_live_and_answers_stay_equal_to_the_engine() {
    let dir = fixture("glm_dense"); // all Full: the planner splits 0..2, 2..4, 4..6
    let prompts = prompt_cases(&dir);
    let (long, probe) = (prompts[0].clone(), prompts[1].clone());
    // As long as the context allows, so it outlives a short drain timeout.
    let n_long = 510 - long.len();
    // FFSSSS costs more up front: the planner moves to 0..1, 1..3, 3..6.
    let (p1, p2) = ("FFSSSS", "FFSSSF");
    let mut old_engine = engine_with(&dir, None);
    let long_want = run_one(&mut old_engine, &long, n_long, false);
    let probe_old = run_one(&mut old_engine, &probe, 8, true);
    let mut p1_engine = engine_with(&dir, Some(p1));
    let probe_p1 = run_one(&mut p1_engine, &probe, 8, true);
    let long_p1 = run_one(&mut p1_engine, &long, n_long, false);
    let probe_p2 = run_one(&mut engine_with(&dir, Some(p2)), &probe, 8, true);
    assert_ne!(
        probe_old.prompt_logprobs, probe_p1.prompt_logprobs,
        "the pattern must matter"
    );
    assert_ne!(
        probe_p1.prompt_logprobs, probe_p2.prompt_logprobs,
        "the pattern must matter"
    );

    let c = Cluster::start(&dir, 3, &[], &[]).await; // no --split: the planner's plan
    let s = ok_json(&irctl_async(&c.addr, &["status", "--json"]).await);
    assert_eq!(ranges(&s["plan"]), [(0, 2), (2, 4), (4, 6)]);
    assert_eq!(s["pattern"]["plan_pinned"], false);
    let got = c.generate(probe.clone(), 8, greedy(), true).await.unwrap();
    assert_same("probe before any change", &got, &probe_old);

    // 1. A request runs when the pattern is set: the re-plan waits for it, and a request
    //    submitted meanwhile waits in the queue, then runs under the new pattern on the new
    //    plan.
    let long_task = start_long(&c, long.clone(), n_long).await;
    let admin = admin_client(&c.addr);
    let set_sent = Instant::now();
    let set_task = tokio::spawn({
        let mut admin = admin.clone();
        async move {
            admin
                .set_pattern(pb::SetPatternRequest {
                    pattern: p1.into(),
                    keep_plan: false,
                    drain_timeout_ms: 0,
                })
                .await
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = admin.clone().status(pb::StatusRequest {}).await.unwrap().into_inner();
        if s.replanning {
            assert!(s.accepting, "a re-plan does not refuse requests");
            // Admission is held while the long request still runs: the re-plan waits for it
            // (the stages refuse to move while they hold its cache).
            assert_eq!(s.requests_running, 1, "the long request runs during the hold: {s:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the re-plan never showed in status: {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let queued = tokio::spawn({
        let client = c.client();
        let probe = probe.clone();
        async move { cluster::generate_with(client, probe, 8, greedy(), true).await }
    });
    let set = set_task.await.unwrap();
    let p = set.unwrap().into_inner();
    let (long_tokens, long_end) = long_task.await.unwrap();
    assert!(
        long_end > set_sent,
        "the long request must still have run at the change"
    );
    assert_eq!(long_tokens, long_want.tokens, "the in-flight request keeps its pattern");
    assert_same(
        "request queued during the re-plan",
        &queued.await.unwrap().unwrap(),
        &probe_p1,
    );
    assert!(p.plan_changed);
    assert_eq!(p.pattern, p1);
    let plan: Vec<(u32, u32)> = p.plan.iter().map(|s| (s.layer_start, s.layer_end)).collect();
    assert_eq!(plan, [(0, 1), (1, 3), (3, 6)]);
    // status shows the new ranges for every worker, and the workers serve them.
    let s = ok_json(&irctl_async(&c.addr, &["status", "--json"]).await);
    assert_eq!(ranges(&s["plan"]), [(0, 1), (1, 3), (3, 6)]);
    assert_eq!(ranges(&s["workers"]), [(0, 1), (1, 3), (3, 6)]);
    assert_eq!(ranges(&s["pattern"]["suggested_plan"]), [(0, 1), (1, 3), (3, 6)]);
    assert_eq!(s["replanning"], false);
    for (i, want) in [(0, 1), (1, 3), (3, 6)].into_iter().enumerate() {
        assert_eq!(stage_range(&c.worker_addrs[i]).await, want, "stage {i}");
    }
    let got = c.generate(probe.clone(), 8, greedy(), true).await.unwrap();
    assert_same("probe on the new plan", &got, &probe_p1);

    // 2. A request that does not finish within the drain timeout (1 ms: decoding is fast
    //    here): the re-plan is abandoned, the new pattern stays active, the plan stays,
    //    admission resumes.
    let long_task = start_long(&c, long, n_long).await;
    let err = admin
        .clone()
        .set_pattern(pb::SetPatternRequest {
            pattern: p2.into(),
            keep_plan: false,
            drain_timeout_ms: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("re-plan aborted") && err.message().contains(p2),
        "{}",
        err.message()
    );
    assert!(
        !long_task.is_finished(),
        "the long request must outlive the drain timeout"
    );
    let s = admin.clone().status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(s.pattern.as_ref().unwrap().pattern, p2);
    let plan: Vec<(u32, u32)> = s.plan.iter().map(|s| (s.layer_start, s.layer_end)).collect();
    assert_eq!(plan, [(0, 1), (1, 3), (3, 6)]);
    assert!(!s.replanning);
    // Admission resumed: a request runs alongside the long one, under the new pattern.
    let got = c.generate(probe.clone(), 8, greedy(), true).await.unwrap();
    assert_same("probe after the abandoned re-plan", &got, &probe_p2);
    let (long_tokens, _) = long_task.await.unwrap();
    assert_eq!(long_tokens, long_p1.tokens, "the long request kept its pattern");

    // 3. --keep-plan: the plan stays although the planner would choose 0..2, 2..5, 5..6,
    //    and answers still equal the engine on the kept split.
    let k = ok_json(&irctl_async(&c.addr, &["pattern", "set", p2, "--keep-plan", "--json"]).await);
    assert_eq!(k["pattern"], p2);
    assert_eq!(k["plan_pinned"], false);
    assert_eq!(k["plan_changed"], false);
    assert_eq!(ranges(&k["plan"]), [(0, 1), (1, 3), (3, 6)]);
    assert_eq!(ranges(&k["suggested_plan"]), [(0, 2), (2, 5), (5, 6)]);
    let s = ok_json(&irctl_async(&c.addr, &["status", "--json"]).await);
    assert_eq!(ranges(&s["workers"]), [(0, 1), (1, 3), (3, 6)]);
    let got = c.generate(probe.clone(), 8, greedy(), true).await.unwrap();
    assert_same("probe with --keep-plan", &got, &probe_p2);

    // 4. Without it, irctl re-plans (table output says so).
    let out = irctl_async(&c.addr, &["pattern", "set", p2]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("re-balanced") && text.contains("2..5"), "{text}");
    let s = ok_json(&irctl_async(&c.addr, &["status", "--json"]).await);
    assert_eq!(ranges(&s["plan"]), [(0, 2), (2, 5), (5, 6)]);
    assert_eq!(ranges(&s["workers"]), [(0, 2), (2, 5), (5, 6)]);
    let got = c.generate(probe.clone(), 8, greedy(), true).await.unwrap();
    assert_same("probe after the second re-plan", &got, &probe_p2);
    // Setting the pattern the plan already fits changes nothing.
    let again = ok_json(&irctl_async(&c.addr, &["pattern", "set", p2, "--json"]).await);
    assert_eq!(again["plan_changed"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_split_is_never_re_planned() {
    let dir = fixture("glm_dense");
    let c = Cluster::start(&dir, 3, &[2, 4], &[]).await;
    let p = ok_json(&irctl_async(&c.addr, &["pattern", "set", "FFSSSS", "--json"]).await);
    assert_eq!(p["plan_changed"], false);
    assert_eq!(p["plan_pinned"], true);
    assert_eq!(ranges(&p["plan"]), [(0, 2), (2, 4), (4, 6)]);
    assert_eq!(ranges(&p["suggested_plan"]), [(0, 1), (1, 3), (3, 6)]);
    let out = irctl_async(&c.addr, &["status"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("pinned by --split"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_refuses_to_reconfigure_while_it_holds_a_sequence_and_survives_a_failed_load() {
    let dir = fixture("dsv32_pattern"); // FSSFSS; Shared layers have no indexer weights
    let prompts = prompt_cases(&dir);
    let (long, probe) = (prompts[0].clone(), prompts[1].clone());
    let n_long = 500 - long.len();
    let mut engine = engine_with(&dir, None);
    let long_want = run_one(&mut engine, &long, n_long, false);
    let probe_want = run_one(&mut engine, &probe, 6, true);
    let c = Cluster::start(&dir, 2, &[3], &[]).await;
    let long_task = start_long(&c, long, n_long).await;
    let mut stage1 = stage_client(&c.worker_addrs[1]);
    let err = stage1
        .reconfigure(pb::ReconfigureRequest {
            layer_start: 2,
            layer_end: 6,
            index_pattern: "FSSFSS".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("live sequence"), "{}", err.message());
    assert!(
        !long_task.is_finished(),
        "the refusal must have happened during the sequence"
    );
    // The stage kept its range and its cache: the sequence finishes with the right tokens.
    assert_eq!(stage_range(&c.worker_addrs[1]).await, (3, 6));
    let (tokens, _) = long_task.await.unwrap();
    assert_eq!(tokens, long_want.tokens);

    // Idle now (releases follow the end of a request shortly).
    let deadline = Instant::now() + Duration::from_secs(10);
    while stage1
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .active_sequences
        > 0
    {
        assert!(Instant::now() < deadline, "the finished sequence was never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A range outside the model, and one whose load fails (all-Full needs indexers this
    // checkpoint lacks): refused with the reason, the old range keeps serving.
    let err = stage1
        .reconfigure(pb::ReconfigureRequest {
            layer_start: 3,
            layer_end: 9,
            index_pattern: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("0..6"), "{}", err.message());
    let err = stage1
        .reconfigure(pb::ReconfigureRequest {
            layer_start: 2,
            layer_end: 6,
            index_pattern: "FFFFFF".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("indexer") && err.message().contains("still serving 3..6"),
        "{}",
        err.message()
    );
    assert_eq!(stage_range(&c.worker_addrs[1]).await, (3, 6));
    let got = c.generate(probe.clone(), 6, greedy(), true).await.unwrap();
    assert_same("after the refused reconfigurations", &got, &probe_want);
}

/// Swaps the two dimensions of `tensor`'s shape in `dir/model.safetensors`'s header (same
/// byte length, so every offset stays), through a new file renamed into place: processes
/// that already read the old file keep what they read.
fn break_shape(dir: &std::path::Path, tensor: &str) {
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap().to_string();
    let at = header.find(&format!("\"{tensor}\"")).expect("tensor in the header");
    let open = at + header[at..].find("\"shape\":[").unwrap() + "\"shape\":[".len();
    let close = open + header[open..].find(']').unwrap();
    let dims: Vec<&str> = header[open..close].split(',').collect();
    assert_eq!(dims.len(), 2);
    assert_ne!(dims[0], dims[1], "swapping must change the shape");
    assert_eq!(dims[0].len(), dims[1].len(), "the header must keep its length");
    let swapped = format!("{},{}", dims[1], dims[0]);
    bytes[8 + open..8 + close].copy_from_slice(swapped.as_bytes());
    let tmp = dir.join("model.safetensors.tmp");
    std::fs::write(&tmp, &bytes).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_plan_whose_load_fails_rolls_the_moved_stages_back() {
    let src = fixture("glm_dense");
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "expected.json", "model.safetensors"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let dir = tmp.path();
    let probe = prompt_cases(&src)[1].clone();
    let p1 = "FFSSSS"; // the planner moves 0..2, 2..4, 4..6 to 0..1, 1..3, 3..6
    let probe_p1 = run_one(&mut engine_with(&src, Some(p1)), &probe, 8, true);
    let c = Cluster::start(dir, 3, &[], &[]).await;
    // Stage 2 serves 4..6 and must load 3..6: a layer it already holds, broken on disk now,
    // makes its load fail, while stages 0 and 1 load 0..1 and 1..3 (and back) from intact
    // tensors.
    break_shape(dir, "model.layers.4.mlp.shared_experts.down_proj.weight");
    let err = admin_client(&c.addr)
        .set_pattern(pb::SetPatternRequest {
            pattern: p1.into(),
            keep_plan: false,
            drain_timeout_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let msg = err.message();
    assert!(
        msg.contains("re-plan aborted")
            && msg.contains("stage 2")
            && msg.contains("model.layers.4.mlp.shared_experts.down_proj.weight")
            && msg.contains("0..2, 2..4, 4..6")
            && !msg.contains("stage 0")
            && !msg.contains("stage 1"),
        "{msg}"
    );
    // Every stage is back on (or never left) its old range, the coordinator's plan says so,
    // the new pattern is active, and answers equal the engine's under it.
    let s = ok_json(&irctl_async(&c.addr, &["status", "--json"]).await);
    assert_eq!(ranges(&s["plan"]), [(0, 2), (2, 4), (4, 6)]);
    assert_eq!(ranges(&s["workers"]), [(0, 2), (2, 4), (4, 6)]);
    assert_eq!(s["pattern"]["pattern"], p1);
    assert_eq!(s["replanning"], false);
    for (i, want) in [(0, 2), (2, 4), (4, 6)].into_iter().enumerate() {
        assert_eq!(stage_range(&c.worker_addrs[i]).await, want, "stage {i}");
    }
    let got = c.generate(probe.clone(), 8, greedy(), true).await.unwrap();
    assert_same("probe after the rolled-back re-plan", &got, &probe_p1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_a_re_plan_rewrites_the_assignments_so_a_restarted_worker_loads_its_new_range() {
    use super::super::etcd::{free_port, start_etcd, start_worker, start_worker_on};
    use worker::membership;

    const PREFIX: &str = "/indexrelay/test";
    let tmp = tempfile::tempdir().unwrap();
    let (_etcd, url) = start_etcd(tmp.path());
    let dir = fixture("glm_dense");
    let probe = prompt_cases(&dir)[1].clone();
    let p1 = "FFSSSS"; // the planner moves 0..2, 2..4, 4..6 to 0..1, 1..3, 3..6
    let probe_p1 = run_one(&mut engine_with(&dir, Some(p1)), &probe, 8, true);
    let w0 = start_worker(&url, &dir, "w0");
    let w1_port = free_port();
    let w1 = start_worker_on(&url, &dir, "w1", w1_port);
    let w2 = start_worker(&url, &dir, "w2");
    let c = Cluster::start(&dir, 3, &[], &["--etcd", &url, "--etcd-prefix", PREFIX]).await;
    let s = ok_json(&irctl_async(&c.addr, &["status", "--json"]).await);
    assert_eq!(ranges(&s["plan"]), [(0, 2), (2, 4), (4, 6)]);
    // Which worker holds which stage is the coordinator's choice: read it from etcd.
    let endpoints = vec![url.clone()];
    let assigned = |id: &'static str| {
        let endpoints = endpoints.clone();
        async move {
            let a = membership::wait_for_assignment(&endpoints, PREFIX, id).await.unwrap();
            (a.stage, a.layer_start, a.layer_end)
        }
    };
    let before: Vec<(usize, usize, usize)> = vec![assigned("w0").await, assigned("w1").await, assigned("w2").await];

    let p = ok_json(&irctl_async(&c.addr, &["pattern", "set", p1, "--json"]).await);
    assert_eq!(p["plan_changed"], true);
    let new_plan = [(0usize, 1usize), (1, 3), (3, 6)];
    assert_eq!(ranges(&p["plan"]), [(0, 1), (1, 3), (3, 6)]);

    // Each worker re-publishes its record and rewrites its assignment's range (on a
    // background task: poll).
    let ids = ["w0", "w1", "w2"];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut client = membership::connect(&endpoints).await.unwrap();
        let records = membership::list_workers(&mut client, PREFIX).await.unwrap();
        let mut done = records.len() == 3;
        for (i, id) in ids.iter().enumerate() {
            let stage = before[i].0;
            let (a_stage, start, end) = assigned(id).await;
            assert_eq!(a_stage, stage, "{id} keeps its stage");
            let rec = records.iter().find(|r| r.worker_id == *id);
            let want = new_plan[stage];
            done &= (start, end) == want
                && rec.is_some_and(|r| (r.layer_start, r.layer_end) == (Some(want.0), Some(want.1)));
        }
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "etcd never showed the new ranges: {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // w1 dies and comes back on the same id and address: it loads the range the cluster
    // now expects (from the rewritten assignment), not the one it started with.
    drop(w1);
    let t0 = Instant::now();
    while c.health().await == super::super::pb_serving() {
        assert!(t0.elapsed() < Duration::from_secs(10), "dead worker not noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let w1 = start_worker_on(&url, &dir, "w1", w1_port);
    let t0 = Instant::now();
    while c.health().await != super::super::pb_serving() {
        assert!(t0.elapsed() < Duration::from_secs(60), "restarted worker not noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let w1_stage = before[1].0;
    assert_eq!(
        stage_range(&format!("127.0.0.1:{w1_port}")).await,
        (new_plan[w1_stage].0 as u32, new_plan[w1_stage].1 as u32)
    );
    let got = c.generate(probe.clone(), 8, greedy(), true).await.unwrap();
    assert_same("after the restart on the new plan", &got, &probe_p1);
    drop((w0, w1, w2));
}
