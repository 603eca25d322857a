//! Starting a local cluster (the real `coordinator` binary) and talking to it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::v1::generation_client::GenerationClient;
use proto::v1::{self as pb};
use tonic::transport::Channel;
use worker::SamplingParams;

use super::Answer;

/// A golden fixture checkpoint.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/golden")
        .join(name)
}

/// The fixture's prompts.
pub fn prompt_cases(dir: &Path) -> Vec<Vec<u32>> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

/// A running coordinator process and its workers.
pub struct Cluster {
    child: Child,
    /// Public gRPC address.
    pub addr: String,
    /// OpenAI-compatible HTTP address.
    pub http: String,
    /// Worker process ids, in stage order.
    pub worker_pids: Vec<u32>,
    /// Stage addresses, in stage order.
    pub worker_addrs: Vec<String>,
}

impl Cluster {
    /// Starts `coordinator --model dir --stages K [--split …]` and waits for READY.
    pub async fn start(dir: &Path, stages: usize, split: &[usize], extra: &[&str]) -> Cluster {
        Cluster::start_with_env(dir, stages, split, extra, &[]).await
    }

    /// [`Cluster::start`] with extra environment variables (the workers inherit them).
    pub async fn start_with_env(
        dir: &Path,
        stages: usize,
        split: &[usize],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Cluster {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_coordinator"));
        cmd.envs(env.iter().copied());
        cmd.arg("--model")
            .arg(dir)
            .args(["--stages", &stages.to_string(), "--grpc-port", "0", "--http-port", "0"]);
        if !split.is_empty() {
            let s: Vec<String> = split.iter().map(usize::to_string).collect();
            cmd.args(["--split", &s.join(",")]);
        }
        cmd.args(extra).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = cmd.spawn().expect("start coordinator");
        let stdout = child.stdout.take().unwrap();
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        });
        let line = tokio::time::timeout(Duration::from_secs(120), line)
            .await
            .expect("cluster did not become ready within 120 s")
            .unwrap()
            .unwrap();
        let mut addr = String::new();
        let mut http = String::new();
        let mut worker_pids = Vec::new();
        let mut worker_addrs = Vec::new();
        for part in line.split_whitespace() {
            if let Some(a) = part.strip_prefix("grpc=") {
                addr = a.to_string();
            } else if let Some(a) = part.strip_prefix("http=") {
                http = a.to_string();
            } else if let Some(a) = part.strip_prefix("worker_addrs=") {
                worker_addrs = a.split(',').map(str::to_string).collect();
            } else if let Some(p) = part.strip_prefix("worker_pids=") {
                worker_pids = p.split(',').filter_map(|x| x.parse().ok()).collect();
            }
        }
        assert!(!addr.is_empty() && !http.is_empty(), "unexpected first line: {line:?}");
        let etcd = extra.contains(&"--etcd");
        assert_eq!(worker_pids.len(), if etcd { 0 } else { stages });
        Cluster {
            child,
            addr,
            http,
            worker_pids,
            worker_addrs,
        }
    }

    /// A client for the public API.
    pub fn client(&self) -> GenerationClient<Channel> {
        let ch = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_lazy();
        GenerationClient::new(ch)
    }

    /// Runs one request to the end.
    pub async fn generate(
        &self,
        prompt: Vec<u32>,
        n: usize,
        s: SamplingParams,
        lps: bool,
    ) -> Result<Answer, tonic::Status> {
        generate_with(self.client(), prompt, n, s, lps).await
    }

    /// Kills stage `i`'s worker process.
    pub fn kill_worker(&self, i: usize) {
        let _ = Command::new("kill")
            .args(["-9", &self.worker_pids[i].to_string()])
            .status();
    }

    /// `grpc.health.v1` status of the public service.
    pub async fn health(&self) -> i32 {
        let ch = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_lazy();
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
        let req = tonic_health::pb::HealthCheckRequest {
            service: "indexrelay.v1.Generation".into(),
        };
        h.check(req).await.map(|r| r.into_inner().status).unwrap_or(-1)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for pid in &self.worker_pids {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        let _ = self.child.kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A token-id request.
pub fn request(prompt: Vec<u32>, n: usize, s: SamplingParams, lps: bool) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::TokenIds(pb::TokenIds { ids: prompt })),
        max_new_tokens: n as u32,
        sampling: Some(pb::SamplingParams {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k as u32,
            seed: s.seed,
        }),
        prompt_logprobs: lps,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Streams one request to the end and collects the answer.
pub async fn generate_with(
    mut c: GenerationClient<Channel>,
    prompt: Vec<u32>,
    n: usize,
    s: SamplingParams,
    lps: bool,
) -> Result<Answer, tonic::Status> {
    let mut stream = c.generate(request(prompt, n, s, lps)).await?.into_inner();
    let mut ans = Answer {
        tokens: Vec::new(),
        prompt_logprobs: Vec::new(),
    };
    let mut finished = false;
    while let Some(msg) = stream.message().await? {
        if !msg.prompt_logprobs.is_empty() {
            ans.prompt_logprobs = msg.prompt_logprobs.iter().map(|p| p.logprob).collect();
        }
        ans.tokens.extend(msg.token_ids);
        finished |= msg.finish_reason != 0;
    }
    assert!(finished, "stream ended without a finish reason");
    Ok(ans)
}
