//! System tests: a real local cluster (coordinator + one worker process per stage) must give
//! exactly what the single-process engine gives, for every split, under concurrency, and
//! fail cleanly when a worker dies.

mod admin;
mod cluster;
mod etcd;
mod http;
mod metrics;
mod raw;
mod reflection;
mod tracing;

use std::path::Path;
use std::time::{Duration, Instant};

use cluster::{fixture, prompt_cases, Cluster};
use proto::v1::{self as pb};
use worker::{Engine, EngineOptions, GenerationRequest, Model, SamplingParams};

/// What one request produced.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    tokens: Vec<u32>,
    prompt_logprobs: Vec<Option<f32>>,
}

fn local(dir: &Path, reqs: &[(Vec<u32>, usize, SamplingParams)], prompt_logprobs: bool) -> Vec<Answer> {
    let mut e = Engine::new(Model::load(dir, None).unwrap(), EngineOptions::default()).unwrap();
    reqs.iter()
        .map(|(p, n, s)| {
            let out = e
                .generate(vec![GenerationRequest {
                    prompt: p.clone(),
                    max_new_tokens: *n,
                    sampling: s.clone(),
                    prompt_logprobs,
                    ignore_eos: true,
                }])
                .unwrap()
                .remove(0);
            Answer {
                tokens: out.token_ids,
                prompt_logprobs: out.prompt_logprobs.unwrap_or_default(),
            }
        })
        .collect()
}

fn assert_same(name: &str, got: &Answer, want: &Answer) {
    assert_eq!(got.tokens, want.tokens, "{name}: token ids");
    assert_eq!(
        got.prompt_logprobs.len(),
        want.prompt_logprobs.len(),
        "{name}: prompt logprobs"
    );
    for (i, (g, w)) in got.prompt_logprobs.iter().zip(&want.prompt_logprobs).enumerate() {
        match (g, w) {
            (None, None) => {}
            (Some(g), Some(w)) => assert!((g - w).abs() <= 1e-5, "{name}: prompt logprob {i}: {g} vs {w}"),
            _ => panic!("{name}: prompt logprob {i} presence differs"),
        }
    }
}

fn greedy() -> SamplingParams {
    SamplingParams::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_equals_local_for_every_split() {
    let dir = fixture("dsv32_pattern"); // FSSFSS
    let reqs: Vec<(Vec<u32>, usize, SamplingParams)> =
        prompt_cases(&dir).into_iter().map(|p| (p, 8, greedy())).collect();
    let want = local(&dir, &reqs, true);
    // Splits at 1, 2 and 5 start a stage on a Shared layer: the relay must carry indices.
    let splits: [(usize, &[usize]); 6] = [
        (1, &[]),
        (2, &[3]),
        (2, &[2]),
        (3, &[1, 4]),
        (3, &[2, 5]),
        (4, &[1, 2, 5]),
    ];
    for (stages, split) in splits {
        let c = Cluster::start(&dir, stages, split, &[]).await;
        for (i, (p, n, _)) in reqs.iter().enumerate() {
            let name = format!("{stages} stages split {split:?} prompt {i}");
            let got = c.generate(p.clone(), *n, greedy(), true).await.unwrap();
            assert_same(&name, &got, &want[i]);
            // The same over HTTP: echo + logprobs gives the prompt logprobs (first null).
            let req = serde_json::json!({
                "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": true,
                "echo": true, "logprobs": 0, "return_token_ids": true,
            });
            let (status, r) = http::post(&c, "/v1/completions", &req).await;
            assert_eq!(status, 200, "{name}: {r}");
            let choice = &r["choices"][0];
            let lps = choice["logprobs"]["token_logprobs"].as_array().unwrap();
            let over_http = Answer {
                tokens: http::ids(&choice["token_ids"]),
                prompt_logprobs: lps[..p.len()].iter().map(|v| v.as_f64().map(|x| x as f32)).collect(),
            };
            assert_same(&format!("{name} (HTTP)"), &over_http, &want[i]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_each_equal_their_single_answer() {
    let dir = fixture("glm_pattern"); // FFSFSF
    let mut rng = 12345u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let reqs: Vec<(Vec<u32>, usize, SamplingParams)> = (0..32)
        .map(|i| {
            let len = 3 + (next() % 60) as usize;
            let prompt = (0..len).map(|_| (next() % 320) as u32).collect();
            let sampling = if i % 2 == 0 {
                greedy()
            } else {
                SamplingParams {
                    temperature: 0.8,
                    top_p: 0.95,
                    top_k: 40,
                    seed: Some(1000 + i as u64),
                }
            };
            (prompt, 4 + (next() % 12) as usize, sampling)
        })
        .collect();
    let want = local(&dir, &reqs, false);
    let c = Cluster::start(&dir, 3, &[2, 4], &[]).await;
    let mut tasks = Vec::new();
    for (p, n, s) in reqs.clone() {
        let c = c.client();
        tasks.push(tokio::spawn(
            async move { cluster::generate_with(c, p, n, s, false).await },
        ));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap().unwrap();
        assert_same(&format!("request {i}"), &got, &want[i]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_fails_streams_fast_and_cluster_reports_unhealthy() {
    let dir = fixture("glm_pattern");
    let c = Cluster::start(&dir, 3, &[2, 4], &[]).await;
    assert_eq!(c.health().await, pb_serving());
    let mut client = c.client();
    let req = cluster::request(vec![1, 2, 3, 4], 480, greedy(), false);
    let mut stream = client.generate(req).await.unwrap().into_inner();
    // Wait for the first token, then kill the middle stage.
    let first = stream.message().await.unwrap();
    assert!(first.is_some());
    c.kill_worker(1);
    let killed = Instant::now();
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(15), stream.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("stream ended normally after a worker was killed"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("no error within 15 s of killing a worker"),
        }
    };
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "error took {:?}",
        killed.elapsed()
    );
    // The cluster says it is unhealthy, and new requests are refused with UNAVAILABLE.
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.health().await == pb_serving() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(c.health().await, pb_serving());
    let mut client = c.client();
    let status = client
        .generate(cluster::request(vec![1, 2], 2, greedy(), false))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    // The failed sequence's cache is freed on the surviving workers.
    for stage in [0, 2] {
        let ch = tonic::transport::Channel::from_shared(format!("http://{}", c.worker_addrs[stage]))
            .unwrap()
            .connect_lazy();
        let mut sc = proto::v1::stage_client::StageClient::new(ch);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let info = sc.info(pb::InfoRequest {}).await.unwrap().into_inner();
            if info.kv_blocks_free == info.kv_blocks_total {
                break;
            }
            assert!(Instant::now() < deadline, "stage {stage} still holds cache blocks");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_invalid_argument_naming_the_field() {
    let dir = fixture("glm_pattern");
    let c = Cluster::start(&dir, 2, &[], &[]).await;
    let cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (cluster::request(vec![], 4, greedy(), false), "prompt"),
        (
            cluster::request(vec![1; 500], 100, greedy(), false),
            "maximum context length is 512",
        ),
        (cluster::request(vec![1, 400], 4, greedy(), false), "vocab_size = 320"),
        (
            cluster::request(
                vec![1],
                4,
                SamplingParams {
                    temperature: -1.0,
                    ..greedy()
                },
                false,
            ),
            "temperature",
        ),
        (
            cluster::request(vec![1], 4, SamplingParams { top_p: 1.5, ..greedy() }, false),
            "top_p",
        ),
        (
            pb::GenerateRequest {
                input: Some(pb::generate_request::Input::Text("hi".into())),
                max_new_tokens: 2,
                ..Default::default()
            },
            "tokenizer",
        ),
    ];
    for (req, needle) in cases {
        let status = c.client().generate(req).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(needle), "{needle}: {}", status.message());
    }
    let mut req = cluster::request(vec![1], 2, greedy(), false);
    req.model = "no-such-model".into();
    assert_eq!(
        c.client().generate(req).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    // A body that is not a GenerateRequest at all: a length-delimited field running past
    // the end of the message.
    let status = raw::server_streaming(&c.addr, "/indexrelay.v1.Generation/Generate", vec![0x0a, 0x05, 0x01]).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("malformed protobuf"), "{}", status.message());
    // The cluster still serves after bad input.
    let ok = c.generate(vec![1, 2, 3], 3, greedy(), false).await.unwrap();
    assert_eq!(ok.tokens.len(), 3);
}

fn pb_serving() -> i32 {
    tonic_health::pb::health_check_response::ServingStatus::Serving as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn micro_batches_overlap_across_stages() {
    // Several micro-batches in flight: while stage k computes batch b, stage k-1 already
    // computes a later batch. The stages' own span records must show that overlap.
    let dir = fixture("glm_pattern");
    let c = Cluster::start(&dir, 3, &[2, 4], &["--prefill-chunk", "16"]).await;
    let mut tasks = Vec::new();
    for i in 0..12u32 {
        let client = c.client();
        let prompt: Vec<u32> = (0..48).map(|j| (i * 7 + j) % 320).collect();
        tasks.push(tokio::spawn(async move {
            cluster::generate_with(client, prompt, 24, greedy(), false).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let mut spans: Vec<(usize, u64, u64)> = Vec::new();
    for (stage, addr) in c.worker_addrs.iter().enumerate() {
        let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let info = proto::v1::stage_client::StageClient::new(ch)
            .info(pb::InfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(!info.recent_batches.is_empty(), "stage {stage} computed nothing");
        spans.extend(
            info.recent_batches
                .iter()
                .map(|b| (stage, b.start_unix_nanos, b.end_unix_nanos)),
        );
    }
    let overlapping = spans
        .iter()
        .flat_map(|a| spans.iter().map(move |b| (a, b)))
        .filter(|(a, b)| a.0 != b.0 && a.1 < b.2 && b.1 < a.2)
        .count();
    assert!(
        overlapping > 0,
        "no two stages ever computed at the same time: the pipeline ran as a relay race"
    );
}
