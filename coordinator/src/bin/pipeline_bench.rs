//! Pipeline benchmark: time to first token of a long prompt through 1, 2 and 3 stages on
//! loopback (the pipeline's overhead), and decode throughput at 1, 8 and 32 concurrent
//! requests. Starts real clusters with the `coordinator` binary next to this one.
//!
//! `cargo build --release -p coordinator && target/release/pipeline_bench [--prompt-len 4096]
//! [--model DIR]` (default: the embedded default model).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use proto::v1::generation_client::GenerationClient;
use proto::v1::{self as pb};
use tonic::transport::Channel;

struct Running {
    child: Child,
    pids: Vec<String>,
    addr: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        for p in &self.pids {
            let _ = Command::new("kill").args(["-9", p]).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(bin: &PathBuf, model: &Option<String>, stages: usize) -> Result<Running> {
    let mut cmd = Command::new(bin);
    cmd.args(["--stages", &stages.to_string(), "--grpc-port", "0", "--http-port", "0"]);
    if let Some(m) = model {
        cmd.args(["--model", m]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting coordinator")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|p| p.strip_prefix(k))
            .map(str::to_string)
    };
    let Some(addr) = field("grpc=") else {
        bail!("cluster did not start: {line:?}")
    };
    let pids = field("worker_pids=")
        .unwrap_or_default()
        .split(',')
        .map(str::to_string)
        .collect();
    Ok(Running { child, pids, addr })
}

fn request(prompt: Vec<u32>, n: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::TokenIds(pb::TokenIds { ids: prompt })),
        max_new_tokens: n,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Seconds to the first token, and seconds to the last.
async fn one(mut c: GenerationClient<Channel>, prompt: Vec<u32>, n: u32) -> Result<(f64, f64, usize)> {
    let t0 = Instant::now();
    let mut s = c.generate(request(prompt, n)).await?.into_inner();
    let (mut first, mut count) = (None, 0);
    while let Some(m) = s.message().await? {
        if !m.token_ids.is_empty() && first.is_none() {
            first = Some(t0.elapsed().as_secs_f64());
        }
        count += m.token_ids.len();
    }
    Ok((first.unwrap_or(0.0), t0.elapsed().as_secs_f64(), count))
}

fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 7) % 256)
        .collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let prompt_len: usize = flag("--prompt-len").unwrap_or_else(|| "4096".into()).parse()?;
    let model = flag("--model");
    let bin = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("coordinator");

    println!("## Time to first token, {prompt_len}-token prompt, 1 request (best of 3)\n");
    println!("| stages | TTFT s | overhead vs 1 stage |");
    println!("|---:|---:|---:|");
    let mut base = 0.0;
    for stages in 1..=3 {
        let r = start(&bin, &model, stages)?;
        let c = GenerationClient::new(Channel::from_shared(format!("http://{}", r.addr))?.connect().await?);
        let mut best = f64::MAX;
        for i in 0..3 {
            best = best.min(one(c.clone(), prompt(prompt_len, i), 1).await?.0);
        }
        if stages == 1 {
            base = best;
        }
        println!("| {stages} | {best:.3} | {:+.1}% |", (best / base - 1.0) * 100.0);
    }

    println!("\n## Decode throughput, 3 stages, 64-token prompts, 64 new tokens each\n");
    println!("| concurrent | total tokens/s | per-request tokens/s |");
    println!("|---:|---:|---:|");
    let r = start(&bin, &model, 3)?;
    let c = GenerationClient::new(Channel::from_shared(format!("http://{}", r.addr))?.connect().await?);
    for conc in [1usize, 8, 32] {
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..conc)
            .map(|i| tokio::spawn(one(c.clone(), prompt(64, i as u32 + 100), 64)))
            .collect();
        let mut tokens = 0;
        for t in tasks {
            tokens += t.await??.2;
        }
        let wall = t0.elapsed().as_secs_f64();
        println!(
            "| {conc} | {:.1} | {:.1} |",
            tokens as f64 / wall,
            tokens as f64 / wall / conc as f64
        );
    }
    Ok(())
}
