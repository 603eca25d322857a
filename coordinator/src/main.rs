//! `coordinator`: starts a local IndexRelay cluster (K stage workers on loopback) and serves
//! the public API.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;

use coordinator::launcher::{default_stage_command, run, LaunchOptions};

#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "IndexRelay coordinator and local cluster launcher"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Sub>,
    /// Checkpoint folder; default: the embedded default model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Served model name (default: the folder name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Number of pipeline stages (worker processes).
    #[arg(long, default_value_t = 2)]
    stages: usize,
    /// Pin stage boundaries: `--split 3,5` gives [0,3), [3,5), [5,N).
    #[arg(long, value_delimiter = ',')]
    split: Option<Vec<usize>>,
    /// IndexCache pattern override, one F/S per layer.
    #[arg(long)]
    index_pattern: Option<String>,
    /// Address the public gRPC and HTTP ports bind to (`0.0.0.0` in a container).
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Host name or IP the last stage uses to reach this coordinator's gRPC port (default:
    /// `--host`, which must then not be unspecified; in Kubernetes, the pod IP).
    #[arg(long)]
    advertise_host: Option<String>,
    /// How long to wait for every stage to register and load its layers (seconds).
    #[arg(long, default_value_t = 300)]
    startup_timeout_secs: u64,
    /// Public gRPC port (0 = any free port).
    #[arg(long, default_value_t = 50051)]
    grpc_port: u16,
    /// OpenAI-compatible HTTP port (0 = any free port).
    #[arg(long, default_value_t = 8000)]
    http_port: u16,
    /// KV blocks per worker.
    #[arg(long, default_value_t = 4096)]
    kv_blocks: usize,
    /// Positions per KV block.
    #[arg(long, default_value_t = 64)]
    block_size: usize,
    /// etcd endpoints (comma-separated): workers started separately with
    /// `worker serve --etcd URL` join instead of being spawned here.
    #[arg(long, value_delimiter = ',')]
    etcd: Option<Vec<String>>,
    /// Cluster key prefix in etcd.
    #[arg(long, default_value = "/indexrelay/default")]
    etcd_prefix: String,
    /// Most prompt tokens per micro-batch.
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
    /// Bearer token the admin API (irctl) requires; default: $INDEXRELAY_ADMIN_TOKEN, and
    /// without either the admin API is open.
    #[arg(long)]
    admin_token: Option<String>,
    /// Compute device of the stages this launcher starts (auto, cpu or cuda:N; passed to
    /// each as `--device`).
    #[arg(long)]
    device: Option<String>,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Serve one stage (what the launcher starts; same as `worker serve`).
    #[command(hide = true)]
    Stage(worker::serve_cli::ServeArgs),
}

fn main() {
    let cli = Cli::parse();
    // A stage run by the launcher is a worker to tracing backends.
    let service = match cli.cmd {
        Some(Sub::Stage(_)) => worker::telemetry::WORKER_SERVICE,
        None => worker::telemetry::COORDINATOR_SERVICE,
    };
    let telemetry = worker::telemetry::init(service, "info");
    if let Err(e) = main_inner(cli) {
        eprintln!("error: {e:#}");
        // `exit` skips destructors: flush the spans first.
        drop(telemetry);
        std::process::exit(1);
    }
}

fn main_inner(cli: Cli) -> Result<()> {
    if let Some(Sub::Stage(args)) = cli.cmd {
        return worker::serve_cli::run(args);
    }
    if cli.stages == 0 {
        anyhow::bail!("--stages must be at least 1");
    }
    let model_dir = match cli.model {
        Some(d) => d,
        None => worker::embedded::ensure_default_model(worker::Architecture::DeepseekV32)?,
    };
    let model_name = cli.served_model_name.unwrap_or_else(|| {
        model_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "indexrelay".into())
    });
    let advertise_host = match cli.advertise_host {
        Some(h) if h.trim().is_empty() => anyhow::bail!("--advertise-host must not be empty"),
        Some(h) => h,
        None if cli.host.is_unspecified() => anyhow::bail!(
            "--host {} binds every interface: give --advertise-host, the address the last stage reaches this coordinator at",
            cli.host
        ),
        None => cli.host.to_string(),
    };
    if cli.startup_timeout_secs == 0 {
        anyhow::bail!("--startup-timeout-secs must be at least 1");
    }
    let opts = LaunchOptions {
        host: cli.host,
        advertise_host,
        startup_timeout: std::time::Duration::from_secs(cli.startup_timeout_secs),
        model_dir,
        model_name,
        stages: cli.stages,
        split: cli.split,
        index_pattern: cli.index_pattern,
        grpc_port: cli.grpc_port,
        http_port: cli.http_port,
        kv_blocks: cli.kv_blocks,
        block_size: cli.block_size,
        prefill_chunk: cli.prefill_chunk,
        stage_command: default_stage_command(),
        etcd: cli.etcd,
        etcd_prefix: cli.etcd_prefix,
        admin_token: coordinator::admin::auth::resolve_token(cli.admin_token),
        device: cli.device,
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run(opts, |r| {
        // One machine-readable line so scripts and tests know where to connect.
        let pids: Vec<String> = r.worker_pids.iter().map(u32::to_string).collect();
        println!(
            "READY grpc={} http={} worker_pids={} worker_addrs={}",
            r.grpc,
            r.http,
            pids.join(","),
            r.worker_addrs.join(",")
        );
    }))
}
