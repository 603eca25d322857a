//! The local launcher: plans the stages, starts one `worker serve` process per stage on
//! loopback, waits until each answers with the expected layer range, and serves.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use proto::v1::admin_server::AdminServer;
use proto::v1::collector_server::CollectorServer;
use proto::v1::generation_server::GenerationServer;
use tokio::process::{Child, Command};
use tonic::transport::Server;

use crate::admin::{auth::BearerAuth, AdminApi};
use crate::app::App;
use crate::cluster::{Cluster, StageEndpoint};
use crate::control::ClusterControl;
use crate::grpc_api::{CollectorApi, GenerationApi};
use crate::http;
use crate::membership;
use crate::planner::{self, CostModel};
use crate::scheduler::{self, SchedulerOptions};
use worker::shutdown::shutdown_signal;

/// What the launcher starts.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    /// Address the public gRPC and HTTP ports bind to.
    pub host: std::net::IpAddr,
    /// Host the last stage reports tokens to (this coordinator's gRPC port on it).
    pub advertise_host: String,
    /// How long stages may take to register and load.
    pub startup_timeout: Duration,
    /// Model folder.
    pub model_dir: PathBuf,
    /// Served model name.
    pub model_name: String,
    /// Number of stages.
    pub stages: usize,
    /// Pinned interior boundaries.
    pub split: Option<Vec<usize>>,
    /// IndexCache pattern override.
    pub index_pattern: Option<String>,
    /// Public gRPC port (0 = any free port).
    pub grpc_port: u16,
    /// OpenAI-compatible HTTP port (0 = any free port).
    pub http_port: u16,
    /// KV blocks per worker.
    pub kv_blocks: usize,
    /// Positions per block.
    pub block_size: usize,
    /// Most prompt tokens per micro-batch.
    pub prefill_chunk: usize,
    /// etcd endpoints: when set, workers started separately join through etcd instead of
    /// being spawned here.
    pub etcd: Option<Vec<String>>,
    /// Cluster key prefix in etcd.
    pub etcd_prefix: String,
    /// Program and leading arguments that start a stage server (`worker serve`).
    pub stage_command: (PathBuf, Vec<String>),
    /// Bearer token the admin API requires (`None`: the admin API is open).
    pub admin_token: Option<String>,
    /// `--device` passed to every spawned stage (`None`: the stages' default, auto).
    pub device: Option<String>,
}

/// How stages are started: `$INDEXRELAY_WORKER_BIN serve` when set, else this executable's
/// own `stage` subcommand (the same server as `worker serve`, so one binary suffices).
pub fn default_stage_command() -> (PathBuf, Vec<String>) {
    if let Ok(p) = std::env::var("INDEXRELAY_WORKER_BIN") {
        return (PathBuf::from(p), vec!["serve".into()]);
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("coordinator"));
    (exe, vec!["stage".into()])
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn_worker(
    o: &LaunchOptions,
    i: usize,
    layers: &std::ops::Range<usize>,
    port: u16,
    next: Option<u16>,
) -> Result<Child> {
    let (program, lead) = &o.stage_command;
    let mut cmd = Command::new(program);
    cmd.args(lead)
        .arg("--model")
        .arg(&o.model_dir)
        .args([
            "--layer-start",
            &layers.start.to_string(),
            "--layer-end",
            &layers.end.to_string(),
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--worker-id", &format!("stage-{i}")])
        .args(["--model-name", &o.model_name])
        .args([
            "--kv-blocks",
            &o.kv_blocks.to_string(),
            "--block-size",
            &o.block_size.to_string(),
        ])
        .kill_on_drop(true);
    if let Some(n) = next {
        cmd.args(["--next", &format!("127.0.0.1:{n}")]);
    }
    if let Some(p) = &o.index_pattern {
        cmd.args(["--index-pattern", p]);
    }
    if let Some(d) = &o.device {
        cmd.args(["--device", d]);
    }
    cmd.spawn().with_context(|| format!("starting {}", program.display()))
}

/// Plans stages for the model in `dir`.
pub fn plan(
    dir: &Path,
    stages: usize,
    split: Option<&[usize]>,
    pattern: Option<&str>,
) -> Result<(planner::Plan, String)> {
    let cfg = worker::ModelConfig::from_dir(dir)?;
    let (pattern, _) = worker::IndexPattern::resolve(&cfg, pattern)?;
    let plan = match split {
        Some(s) => {
            if s.len() + 1 != stages {
                bail!(
                    "--split gives {} boundaries, so it needs --stages {} (got {stages})",
                    s.len(),
                    s.len() + 1
                );
            }
            planner::pinned(s, pattern.len())?
        }
        None => {
            let full: Vec<bool> = (0..pattern.len()).map(|i| pattern.is_full(i)).collect();
            planner::balance(&full, stages, CostModel::default())?
        }
    };
    Ok((plan, pattern.to_string()))
}

/// Where a started cluster serves.
#[derive(Clone, Debug)]
pub struct Ready {
    /// Public gRPC address.
    pub grpc: SocketAddr,
    /// OpenAI-compatible HTTP address.
    pub http: SocketAddr,
    /// Worker process ids, in stage order.
    pub worker_pids: Vec<u32>,
    /// Stage gRPC addresses, in stage order.
    pub worker_addrs: Vec<String>,
}

/// Starts the workers and serves gRPC and HTTP until Ctrl-C; reports the bound addresses
/// and the workers' process ids through `on_ready` once the cluster answers.
pub async fn run(o: LaunchOptions, on_ready: impl FnOnce(&Ready)) -> Result<()> {
    let (plan, pattern) = plan(&o.model_dir, o.stages, o.split.as_deref(), o.index_pattern.as_deref())?;
    // Bound before any worker starts, so a taken port fails at once rather than after loading.
    let http_listener = tokio::net::TcpListener::bind((o.host, o.http_port))
        .await
        .with_context(|| format!("binding the HTTP port {} (--http-port 0 picks a free one)", o.http_port))?;
    let http_addr = http_listener.local_addr()?;
    let mut children = Vec::new();
    let endpoints: Vec<StageEndpoint> = match &o.etcd {
        // Workers started separately register in etcd; the coordinator assigns their stages.
        Some(etcd) => membership::assign_from_etcd(etcd, &o.etcd_prefix, &plan, o.startup_timeout).await?,
        None => {
            let ports: Vec<u16> = (0..plan.len()).map(|_| free_port()).collect::<Result<_>>()?;
            for (i, layers) in plan.iter().enumerate() {
                children.push(spawn_worker(&o, i, layers, ports[i], ports.get(i + 1).copied())?);
            }
            plan.iter()
                .zip(&ports)
                .map(|(l, p)| StageEndpoint {
                    addr: format!("127.0.0.1:{p}"),
                    layers: l.clone(),
                })
                .collect()
        }
    };
    let cluster = Arc::new(Cluster::new(endpoints).map_err(anyhow::Error::msg)?);
    // Wait for every stage to load and answer with the planned layer range.
    let deadline = Instant::now() + o.startup_timeout;
    let mut kv_blocks = usize::MAX;
    let mut block_size = o.block_size;
    for (i, st) in cluster.stages.iter().enumerate() {
        loop {
            if let Some(Ok(Some(status))) = children.get_mut(i).map(|c| c.try_wait()) {
                bail!("worker for stage {i} exited during start-up ({status})");
            }
            match cluster.info(i, Duration::from_secs(1)).await {
                Ok(info) => {
                    let serves = info.layer_start as usize..info.layer_end as usize;
                    if serves != st.layers && o.etcd.is_some() && info.active_sequences == 0 {
                        // A worker that joined through etcd may still serve the range an
                        // earlier coordinator's live re-plan gave it: move it to this plan.
                        tracing::info!(stage = i, from = ?serves, to = ?st.layers, "moving a stage to the planned range");
                        cluster
                            .reconfigure(i, st.layers.clone(), &pattern, Duration::from_secs(600))
                            .await
                            .map_err(|e| {
                                anyhow::anyhow!("stage {i} cannot load layers {:?}: {}", st.layers, e.message())
                            })?;
                        continue;
                    }
                    if info.layer_start as usize != st.layers.start || info.layer_end as usize != st.layers.end {
                        bail!(
                            "stage {i} serves layers {}..{}, expected {:?}",
                            info.layer_start,
                            info.layer_end,
                            st.layers
                        );
                    }
                    kv_blocks = kv_blocks.min(info.kv_blocks_total as usize);
                    block_size = info.block_size as usize;
                    break;
                }
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => bail!("stage {i} did not come up: {e}"),
            }
        }
        // The coordinator sends its pattern with every request; a worker started on its own
        // (etcd) may have been given another one, so make sure it can run this one.
        cluster
            .prepare_pattern(i, &pattern, Duration::from_secs(600))
            .await
            .map_err(|e| anyhow::anyhow!("stage {i} cannot run the pattern {pattern}: {}", e.message()))?;
    }
    // Bound here (port 0 = any free one), served once every service is built.
    let listener = tokio::net::TcpListener::bind((o.host, o.grpc_port))
        .await
        .with_context(|| format!("binding the gRPC port {} (--grpc-port 0 picks a free one)", o.grpc_port))?;
    let grpc_addr: SocketAddr = listener.local_addr()?;
    // The last stage dials this to report tokens: the advertised host, not the bind address.
    let report_to = match o.advertise_host.parse::<std::net::IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, grpc_addr.port()).to_string(),
        Err(_) => format!("{}:{}", o.advertise_host, grpc_addr.port()),
    };
    let sched = scheduler::start(
        cluster.clone(),
        SchedulerOptions {
            prefill_chunk: o.prefill_chunk,
            max_inflight: cluster.stages.len() + 1,
            eos: worker::ModelConfig::from_dir(&o.model_dir)?.eos_token_ids,
            report_to,
            kv_blocks,
            block_size,
            control: Arc::new(ClusterControl::new(
                &pattern,
                cluster.stages.iter().map(|s| s.addr.clone()).collect(),
            )),
        },
    );
    let app = Arc::new(App::new(&o.model_dir, o.model_name.clone(), sched.clone())?);
    let admin = AdminApi {
        app: app.clone(),
        cluster: cluster.clone(),
        num_layers: plan.last().map_or(0, |r| r.end),
        // A hand-pinned split is the operator's: `pattern set` never re-plans it.
        plan_pinned: o.split.is_some(),
    };
    // Calibration sets travel in one message.
    let admin = tonic::service::interceptor::InterceptedService::new(
        AdminServer::new(admin).max_decoding_message_size(256 << 20),
        BearerAuth::new(o.admin_token.as_deref()),
    );
    let http_router = http::router(app.clone(), &o.model_dir);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<GenerationServer<GenerationApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    tracing::info!(%grpc_addr, %http_addr, stages = plan.len(), %pattern, "cluster ready");
    on_ready(&Ready {
        grpc: grpc_addr,
        http: http_addr,
        worker_pids: children.iter().filter_map(|c| c.id()).collect(),
        worker_addrs: cluster.stages.iter().map(|s| s.addr.clone()).collect(),
    });
    let health_sched = sched.clone();
    tokio::spawn(async move {
        let mut last = true;
        loop {
            let now = health_sched.healthy();
            if now != last {
                if now {
                    health_reporter.set_serving::<GenerationServer<GenerationApi>>().await;
                } else {
                    health_reporter
                        .set_not_serving::<GenerationServer<GenerationApi>>()
                        .await;
                }
                last = now;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let http = http::serve(http_listener, http_router, shutdown_signal());
    let grpc = Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(GenerationServer::new(GenerationApi { app }))
        .add_service(admin)
        .add_service(CollectorServer::new(CollectorApi { scheduler: sched }).max_decoding_message_size(usize::MAX))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown_signal(),
        );
    // Either server failing ends the process (and, through kill_on_drop, the workers).
    tokio::try_join!(async { grpc.await.context("gRPC server") }, async {
        http.await.context("HTTP server")
    })?;
    drop(children);
    Ok(())
}
