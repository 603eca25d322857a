//! An in-process pipeline of stage servers (`worker::stage::serve`) on loopback ports, with a
//! collector standing in for the coordinator, driven by greedy decoding: the stage server
//! path end to end, on whatever [`StageCompute`] each stage is given (CPU or GPU).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proto::v1::collector_server::{Collector, CollectorServer};
use proto::v1::forward_request::Input;
use proto::v1::stage_client::StageClient;
use proto::v1::{self as pb};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Server};
use worker::stage::{ServeOptions, StageCompute};
use worker::{Engine, EngineOptions, GenerationRequest, Model, SamplingParams};

/// The golden fixture `name` (`$INDEXRELAY_FIXTURES` on a GPU host running prebuilt binaries).
pub fn fixture(name: &str) -> PathBuf {
    let root = std::env::var_os("INDEXRELAY_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden"));
    root.join(name)
}

/// The first prompt of fixture `name`'s expected cases.
pub fn first_prompt(name: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    let exp: serde_json::Value = serde_json::from_str(&text).unwrap();
    exp["cases"][0]["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// What greedy decoding gave.
#[derive(Debug, PartialEq)]
pub struct Greedy {
    /// Generated tokens.
    pub tokens: Vec<u32>,
    /// Their logprobs.
    pub token_logprobs: Vec<f32>,
    /// Logprobs of prompt tokens 1.. given their prefix.
    pub prompt_logprobs: Vec<f32>,
}

/// The single-process CPU engine's greedy run (the reference).
pub fn engine_greedy(dir: &Path, prompt: &[u32], n: usize) -> Greedy {
    let mut e = Engine::new(Model::load(dir, None).unwrap(), EngineOptions::default()).unwrap();
    let out = e
        .generate(vec![GenerationRequest {
            prompt: prompt.to_vec(),
            max_new_tokens: n,
            sampling: SamplingParams::default(),
            prompt_logprobs: true,
            ignore_eos: true,
        }])
        .unwrap()
        .remove(0);
    Greedy {
        tokens: out.token_ids,
        token_logprobs: out.token_logprobs,
        prompt_logprobs: out
            .prompt_logprobs
            .unwrap()
            .into_iter()
            .skip(1)
            .map(Option::unwrap)
            .collect(),
    }
}

struct Reports(mpsc::UnboundedSender<pb::TokenReport>);

#[tonic::async_trait]
impl Collector for Reports {
    async fn report(
        &self,
        req: tonic::Request<pb::TokenReport>,
    ) -> Result<tonic::Response<pb::ReportAck>, tonic::Status> {
        let _ = self.0.send(req.into_inner());
        Ok(tonic::Response::new(pb::ReportAck {}))
    }
}

fn free_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Stage servers in a chain, stage 0 first, and the collector their reports reach.
pub struct Pipeline {
    rt: tokio::runtime::Runtime,
    /// Stage addresses, in pipeline order.
    pub addrs: Vec<String>,
    collector: String,
    reports: mpsc::UnboundedReceiver<pb::TokenReport>,
    next_batch: u64,
    /// Compressed relay bytes the pipeline's batches carried so far.
    pub relay_bytes: u64,
}

impl Pipeline {
    /// Serves each of `stages` (consecutive layer ranges of the checkpoint in `dir`) on a
    /// loopback port, each sending to the next.
    pub fn start(dir: &Path, stages: Vec<Box<dyn StageCompute>>) -> Pipeline {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (tx, reports) = mpsc::unbounded_channel();
        let collector_addr = free_addr();
        rt.spawn(
            Server::builder()
                .add_service(CollectorServer::new(Reports(tx)))
                .serve(collector_addr),
        );
        let listen: Vec<std::net::SocketAddr> = stages.iter().map(|_| free_addr()).collect();
        let addrs: Vec<String> = listen.iter().map(|a| a.to_string()).collect();
        for (i, compute) in stages.into_iter().enumerate() {
            let opts = ServeOptions {
                worker_id: format!("stage-{i}"),
                model_name: "test".into(),
                listen: listen[i],
                next: addrs.get(i + 1).cloned(),
                logits_chunk: 64,
                model_dir: dir.to_path_buf(),
                registration: None,
            };
            rt.spawn(async move {
                if let Err(e) = worker::stage::serve(compute, opts).await {
                    panic!("stage {i} stopped: {e}");
                }
            });
        }
        let p = Pipeline {
            rt,
            addrs,
            collector: format!("http://{collector_addr}"),
            reports,
            next_batch: 1,
            relay_bytes: 0,
        };
        for a in &p.addrs {
            p.client(a);
        }
        p
    }

    /// A client of the stage at `addr`, waiting (up to 60 s) for it to listen.
    fn client(&self, addr: &str) -> StageClient<Channel> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.rt.block_on(StageClient::connect(format!("http://{addr}"))) {
                Ok(c) => return c.max_decoding_message_size(usize::MAX),
                Err(e) if Instant::now() > deadline => panic!("stage {addr} never listened: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Sends `req` (its batch id and `report_to` filled in) to stage `i` and waits for the
    /// report it leads to.
    pub fn forward_raw(&mut self, i: usize, mut req: pb::ForwardRequest) -> pb::TokenReport {
        let batch_id = self.next_batch;
        self.next_batch += 1;
        req.batch_id = batch_id;
        req.report_to = self.collector.clone();
        let mut c = self.client(&self.addrs[i].clone());
        self.rt.block_on(c.forward(req)).expect("the stage takes the batch");
        let report = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(300), self.reports.recv()).await })
            .expect("a report within 300 s")
            .expect("the collector is running");
        assert_eq!(report.batch_id, batch_id);
        report
    }

    /// Sends one micro-batch (one segment) to stage 0 and waits for the last stage's report.
    fn step(&mut self, seq: u64, start: usize, tokens: Vec<u32>, targets: Vec<u32>) -> pb::SegmentResult {
        let req = pb::ForwardRequest {
            segments: vec![pb::Segment {
                seq,
                start: start as u32,
                len: tokens.len() as u32,
                sample_last: true,
                prompt_targets: targets,
                sampling: Some(pb::SegmentSampling::default()),
                ..Default::default()
            }],
            input: Some(Input::Tokens(pb::TokenIds { ids: tokens })),
            ..Default::default()
        };
        let report = self.forward_raw(0, req);
        assert!(
            report.error.is_empty(),
            "batch {} failed: {}",
            report.batch_id,
            report.error
        );
        self.relay_bytes += report.relay_bytes;
        report.results.into_iter().next().expect("one segment result")
    }

    /// Greedy decoding of `n` tokens for sequence `seq` (temperature 0: the stage's sampler
    /// takes the argmax), with the prompt's logprobs.
    pub fn greedy(&mut self, seq: u64, prompt: &[u32], n: usize) -> Greedy {
        let first = self.step(seq, 0, prompt.to_vec(), prompt[1..].to_vec());
        let mut out = Greedy {
            tokens: vec![first.token.expect("a sampled token")],
            token_logprobs: vec![first.token_logprob],
            prompt_logprobs: first.prompt_logprobs,
        };
        let mut pos = prompt.len();
        while out.tokens.len() < n {
            let last = *out.tokens.last().unwrap();
            let r = self.step(seq, pos, vec![last], Vec::new());
            out.tokens.push(r.token.expect("a sampled token"));
            out.token_logprobs.push(r.token_logprob);
            pos += 1;
        }
        out
    }

    /// Frees `seq` on every stage.
    pub fn release(&self, seq: u64) {
        for a in &self.addrs {
            let mut c = self.client(a);
            self.rt
                .block_on(c.release(pb::ReleaseRequest { seqs: vec![seq] }))
                .unwrap();
        }
    }

    /// `Info` of stage `i`.
    pub fn info(&self, i: usize) -> pb::StageInfo {
        let mut c = self.client(&self.addrs[i]);
        self.rt.block_on(c.info(pb::InfoRequest {})).unwrap().into_inner()
    }

    /// `OpenDataPlane` of stage `i` with `offer`.
    pub fn open_data_plane(&self, i: usize, offer: pb::DataPlaneOffer) -> Result<pb::DataPlaneAnswer, tonic::Status> {
        let mut c = self.client(&self.addrs[i]);
        self.rt.block_on(c.open_data_plane(offer)).map(|r| r.into_inner())
    }

    /// `Reconfigure` of stage `i`.
    pub fn reconfigure(
        &self,
        i: usize,
        layer_start: u32,
        layer_end: u32,
    ) -> Result<pb::ReconfigureResponse, tonic::Status> {
        let mut c = self.client(&self.addrs[i]);
        let req = pb::ReconfigureRequest {
            layer_start,
            layer_end,
            index_pattern: String::new(),
        };
        self.rt.block_on(c.reconfigure(req)).map(|r| r.into_inner())
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // The servers run until the runtime goes.
        let rt = std::mem::replace(
            &mut self.rt,
            tokio::runtime::Builder::new_current_thread().build().unwrap(),
        );
        rt.shutdown_background();
    }
}
