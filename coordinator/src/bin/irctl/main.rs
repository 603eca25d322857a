//! `irctl`: the IndexRelay operator CLI over the coordinator's admin gRPC service.
//!
//! Human-readable tables by default, one JSON object on stdout with `--json`. Progress of
//! long operations goes to stderr. Errors print `error: …` and exit non-zero (2 for bad
//! arguments, 1 for everything else).

mod data;
mod render;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use proto::v1::admin_client::AdminClient;
use proto::v1::{self as pb, calibrate_event::Event};
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
#[command(
    name = "irctl",
    version,
    about = "Operate an IndexRelay cluster through its coordinator"
)]
struct Cli {
    /// Coordinator gRPC address (`host:port` or `http://host:port`).
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:50051",
        env = "INDEXRELAY_COORDINATOR"
    )]
    coordinator: String,
    /// Admin bearer token (default: $INDEXRELAY_ADMIN_TOKEN).
    #[arg(long, global = true, env = "INDEXRELAY_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print one JSON object instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Workers, the stage plan, the active pattern, requests running and waiting.
    Status,
    /// Stop new sequences on a worker (address, worker id or stage number); in-flight ones
    /// finish. With one pipeline, new requests are refused until `undrain`.
    Drain {
        /// Worker address, id or stage number.
        worker: String,
    },
    /// Let a drained worker take new sequences again.
    Undrain {
        /// Worker address, id or stage number.
        worker: String,
    },
    /// Show or change the IndexCache pattern.
    Pattern {
        #[command(subcommand)]
        cmd: PatternCmd,
    },
    /// Search an IndexCache pattern (the greedy, training-free search) on a calibration set.
    Calibrate(CalibrateArgs),
}

#[derive(Subcommand)]
enum PatternCmd {
    /// The active pattern.
    Get,
    /// Make a pattern (one F/S per layer, layer 0 F) active for requests that start from now,
    /// and re-balance the stage plan for it if the planner splits it otherwise (new requests
    /// wait while running ones finish and the moved stages reload).
    Set {
        /// The pattern, e.g. FSSFSS.
        pattern: String,
        /// Keep the running stage plan.
        #[arg(long)]
        keep_plan: bool,
        /// Seconds a re-plan waits for running requests before giving up (default 300).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4_000_000))]
        drain_timeout: Option<u32>,
    },
}

#[derive(clap::Args)]
struct CalibrateArgs {
    /// JSON lines of {"token_ids": [...]} or {"text": "..."}.
    #[arg(long)]
    data: PathBuf,
    /// Stop when this many layers are Full.
    #[arg(long)]
    target_full: u32,
    /// Make the resulting pattern active.
    #[arg(long)]
    apply: bool,
    /// Keep each stage's first layer Full (as well as layer 0).
    #[arg(long)]
    per_stage: bool,
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The admin client and the token to attach.
struct Admin {
    client: AdminClient<Channel>,
    token: Option<String>,
}

impl Admin {
    async fn connect(addr: &str, token: Option<String>) -> Result<Self> {
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let ep = Endpoint::from_shared(uri.clone())
            .with_context(|| format!("--coordinator {addr:?} is not a valid address (expected host:port)"))?
            .connect_timeout(Duration::from_secs(5));
        let ch = ep
            .connect()
            .await
            .with_context(|| format!("cannot reach the coordinator at {uri}"))?;
        Ok(Admin {
            client: AdminClient::new(ch)
                .max_encoding_message_size(256 << 20)
                .max_decoding_message_size(256 << 20),
            token: token.filter(|t| !t.is_empty()),
        })
    }

    fn req<T>(&self, msg: T) -> Result<tonic::Request<T>> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            let v = format!("Bearer {t}")
                .parse()
                .context("--token holds characters that cannot be sent in a header")?;
            r.metadata_mut().insert("authorization", v);
        }
        Ok(r)
    }
}

/// A gRPC error as one readable line.
fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    // Arguments are checked before connecting, so a typo never waits on the network.
    if let Cmd::Pattern {
        cmd: PatternCmd::Set { pattern, .. },
    } = &cli.cmd
    {
        check_pattern_chars(pattern)?;
    }
    if let Cmd::Calibrate(a) = &cli.cmd {
        if a.target_full == 0 {
            bail!("--target-full must be at least 1 (layer 0 always stays Full)");
        }
    }
    let samples = match &cli.cmd {
        Cmd::Calibrate(a) => Some(data::read_samples(&a.data)?),
        _ => None,
    };
    let mut admin = Admin::connect(&cli.coordinator, cli.token.clone()).await?;
    match cli.cmd {
        Cmd::Status => {
            let req = admin.req(pb::StatusRequest {})?;
            let s = admin.client.status(req).await.map_err(status_err)?.into_inner();
            if cli.json {
                print_json(&render::status_json(&s))?;
            } else {
                println!("{}", render::status_text(&s));
            }
        }
        Cmd::Drain { worker } | Cmd::Undrain { worker } if worker.trim().is_empty() => {
            bail!("WORKER must be a worker address, id or stage number")
        }
        Cmd::Drain { worker } => {
            let req = admin.req(pb::DrainRequest { worker })?;
            let r = admin.client.drain(req).await.map_err(status_err)?.into_inner();
            print_drain(&r, cli.json, true)?;
        }
        Cmd::Undrain { worker } => {
            let req = admin.req(pb::DrainRequest { worker })?;
            let r = admin.client.undrain(req).await.map_err(status_err)?.into_inner();
            print_drain(&r, cli.json, false)?;
        }
        Cmd::Pattern { cmd } => {
            let mut set = false;
            let p = match cmd {
                PatternCmd::Get => {
                    let req = admin.req(pb::GetPatternRequest {})?;
                    admin.client.get_pattern(req).await
                }
                PatternCmd::Set {
                    pattern,
                    keep_plan,
                    drain_timeout,
                } => {
                    let req = admin.req(pb::SetPatternRequest {
                        pattern,
                        keep_plan,
                        drain_timeout_ms: drain_timeout.map_or(0, |s| s * 1000),
                    })?;
                    set = true;
                    admin.client.set_pattern(req).await
                }
            }
            .map_err(status_err)?
            .into_inner();
            if cli.json {
                print_json(&render::pattern_json(&p, set))?;
            } else {
                println!("{}", render::pattern_text(&p, set));
            }
        }
        Cmd::Calibrate(a) => {
            let req = admin.req(pb::CalibrateRequest {
                samples: samples.unwrap_or_default(),
                target_full: a.target_full,
                per_stage: a.per_stage,
                apply: a.apply,
            })?;
            let mut stream = admin.client.calibrate(req).await.map_err(status_err)?.into_inner();
            let mut result = None;
            while let Some(ev) = stream.message().await.map_err(status_err)? {
                match ev.event {
                    Some(Event::Progress(p)) => report_progress(&p),
                    Some(Event::Result(r)) => result = Some(r),
                    None => {}
                }
            }
            let Some(r) = result else {
                bail!("the coordinator ended the calibration without a result");
            };
            if cli.json {
                print_json(&render::calibration_json(&r))?;
            } else {
                println!("{}", render::calibration_text(&r));
            }
        }
    }
    Ok(())
}

fn check_pattern_chars(p: &str) -> Result<()> {
    if p.is_empty() {
        bail!("PATTERN is empty: give one F (Full) or S (Shared) per layer, e.g. FSSFSS");
    }
    if let Some((i, c)) = p.chars().enumerate().find(|(_, c)| !matches!(c, 'F' | 'S' | 'f' | 's')) {
        bail!("PATTERN character {i} is {c:?}: only F (Full) and S (Shared) are allowed");
    }
    Ok(())
}

fn print_drain(r: &pb::DrainResponse, json: bool, drained: bool) -> Result<()> {
    if json {
        return print_json(&serde_json::json!({
            "worker": r.worker.as_ref().map(render::worker_json),
            "accepting": r.accepting,
        }));
    }
    if let Some(w) = &r.worker {
        println!(
            "{} {} ({}, stage {}, layers {}..{}); {} sequence(s) in flight",
            if drained { "drained" } else { "undrained" },
            if w.worker_id.is_empty() { "?" } else { &w.worker_id },
            w.address,
            w.stage,
            w.layer_start,
            w.layer_end,
            w.in_flight
        );
    }
    if !r.accepting {
        println!("the cluster refuses new requests until every drained worker is undrained");
    }
    Ok(())
}

fn report_progress(p: &pb::CalibrateProgress) {
    let t = p.elapsed_seconds;
    if let Some(b) = p.baseline_loss {
        eprintln!("calibrate: baseline (all Full) loss {b:.6} [{t:.1} s]");
    } else if let Some(c) = &p.committed {
        eprintln!(
            "calibrate: step {}/{}: layer {} -> S, loss {:.6} [{t:.1} s]",
            p.step, p.total_steps, c.layer, c.loss
        );
    } else {
        eprintln!(
            "calibrate: step {}/{}: {}/{} candidates scored [{t:.1} s]",
            p.step + 1,
            p.total_steps,
            p.candidates_done,
            p.candidates_total
        );
    }
}
