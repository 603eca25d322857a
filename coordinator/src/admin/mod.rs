//! The admin gRPC service (`indexrelay.v1.Admin`) that `irctl` drives: cluster status,
//! drain/undrain, the IndexCache pattern, and the pattern search.
//!
//! Pattern changes are per request: the active pattern is stamped on each request when it
//! is submitted and travels with every segment of it to the stages, so running sequences
//! keep theirs and calibration candidates run side by side. Any split is correct under any
//! pattern (a stage starting on a Shared layer gets the relay), but the planner balances
//! Full layers (which cost more) across stages, so a new pattern may call for another split:
//! `SetPattern` then re-plans live (see [`replan`]): admission is held (requests queue, none
//! is refused), the running requests finish, the stages whose range moves reload it, and
//! admission resumes. A split pinned with `--split` at launch, or `keep_plan`, is kept.

pub mod auth;
pub mod calibrate;
pub mod replan;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use proto::v1::admin_server::Admin;
use proto::v1::{self as pb};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::cluster::Cluster;
use crate::error::CoordinatorError;
use crate::planner::{self, CostModel};

/// How long a stage may take to load the indexers a new pattern needs.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(600);

/// The admin service over the running cluster.
pub struct AdminApi {
    /// The served model and the scheduler (with its controls).
    pub app: Arc<App>,
    /// The stages.
    pub cluster: Arc<Cluster>,
    /// Decoder layers of the model.
    pub num_layers: usize,
    /// The operator pinned the split at launch (`--split`): never re-planned.
    pub plan_pinned: bool,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::CalibrateEvent, Status>> + Send>>;

/// The layer ranges of `plan` judged against `pattern` (true = Full).
fn spans(plan: &[std::ops::Range<usize>], pattern: &[bool]) -> Vec<pb::StageSpan> {
    plan.iter()
        .enumerate()
        .map(|(i, r)| pb::StageSpan {
            stage: i as u32,
            layer_start: r.start as u32,
            layer_end: r.end as u32,
            relay_in: r.start > 0 && !pattern.get(r.start).copied().unwrap_or(true),
            full_layers: pattern[r.clone()].iter().filter(|f| **f).count() as u32,
        })
        .collect()
}

fn full_flags(pattern: &str) -> Vec<bool> {
    pattern.chars().map(|c| c == 'F').collect()
}

impl AdminApi {
    fn pattern_info(&self) -> pb::PatternInfo {
        let active = self.app.scheduler.control().pattern();
        let full = full_flags(&active.pattern);
        let suggested = planner::balance(&full, self.cluster.stages.len(), CostModel::default())
            .map(|p| spans(&p, &full))
            .unwrap_or_default();
        pb::PatternInfo {
            pattern: active.pattern.to_string(),
            epoch: active.epoch,
            full_layers: full.iter().filter(|f| **f).count() as u32,
            num_layers: self.num_layers as u32,
            suggested_plan: suggested,
            plan_changed: false,
            plan: spans(&self.cluster.plan(), &full),
            plan_pinned: self.plan_pinned,
        }
    }

    /// Every stage's `Info`, asked concurrently (an error string for one that does not answer).
    async fn stage_infos(&self) -> Vec<Result<pb::StageInfo, String>> {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..self.cluster.stages.len() {
            let cluster = self.cluster.clone();
            set.spawn(async move { (i, cluster.info(i, Duration::from_secs(1)).await) });
        }
        let mut out: Vec<Result<pb::StageInfo, String>> = vec![Err("no answer".into()); self.cluster.stages.len()];
        while let Some(r) = set.join_next().await {
            if let Ok((i, info)) = r {
                out[i] = info;
            }
        }
        out
    }

    fn worker_status(&self, i: usize, info: &Result<pb::StageInfo, String>, drained: bool) -> pb::WorkerStatus {
        let st = &self.cluster.stages[i];
        let layers = self.cluster.plan()[i].clone();
        let mut w = pb::WorkerStatus {
            address: st.addr.clone(),
            stage: i as u32,
            layer_start: layers.start as u32,
            layer_end: layers.end as u32,
            drained,
            ..Default::default()
        };
        match info {
            Ok(info) => {
                w.worker_id = info.worker_id.clone();
                w.healthy = true;
                w.kv_blocks_total = info.kv_blocks_total;
                w.kv_blocks_free = info.kv_blocks_free;
                w.kv_usage = if info.kv_blocks_total == 0 {
                    0.0
                } else {
                    (info.kv_blocks_total - info.kv_blocks_free.min(info.kv_blocks_total)) as f64
                        / info.kv_blocks_total as f64
                };
                w.in_flight = info.active_sequences;
            }
            Err(e) => w.error = e.clone(),
        }
        w
    }

    /// Finds a worker by address, worker id or stage number.
    async fn resolve(&self, name: &str) -> Result<(usize, Vec<Result<pb::StageInfo, String>>), Status> {
        let name = name.trim();
        if name.is_empty() {
            return Err(CoordinatorError::invalid("worker", "give a worker address, id or stage number").to_status());
        }
        let infos = self.stage_infos().await;
        let bare = |a: &str| {
            a.trim_start_matches("http://")
                .trim_start_matches("https://")
                .to_string()
        };
        let found = self
            .cluster
            .stages
            .iter()
            .position(|s| bare(&s.addr) == bare(name))
            .or_else(|| infos.iter().position(|i| i.as_ref().is_ok_and(|i| i.worker_id == name)))
            .or_else(|| name.parse::<usize>().ok().filter(|i| *i < self.cluster.stages.len()));
        match found {
            Some(i) => Ok((i, infos)),
            None => {
                let known: Vec<String> = self
                    .cluster
                    .stages
                    .iter()
                    .zip(&infos)
                    .enumerate()
                    .map(|(i, (s, info))| match info {
                        Ok(info) => format!("{} ({}, stage {i})", info.worker_id, s.addr),
                        Err(_) => format!("{} (stage {i})", s.addr),
                    })
                    .collect();
                Err(Status::not_found(format!(
                    "no worker `{name}`; workers: {}",
                    known.join(", ")
                )))
            }
        }
    }

    async fn set_drained(&self, name: &str, drained: bool) -> Result<pb::DrainResponse, Status> {
        let (i, infos) = self.resolve(name).await?;
        let control = self.app.scheduler.control();
        if control.set_drained(i, drained) {
            tracing::info!(stage = i, addr = %self.cluster.stages[i].addr, drained, "worker drain state changed");
        }
        Ok(pb::DrainResponse {
            worker: Some(self.worker_status(i, &infos[i], drained)),
            accepting: control.admission_blocked().is_none(),
        })
    }

    /// Validates `pattern` for the model and has every stage load what it needs.
    pub async fn prepare_everywhere(&self, pattern: &str) -> Result<(), Status> {
        worker::IndexPattern::parse(pattern, self.num_layers)
            .map_err(|e| CoordinatorError::invalid("pattern", e.to_string()).to_status())?;
        let mut set = tokio::task::JoinSet::new();
        for i in 0..self.cluster.stages.len() {
            let cluster = self.cluster.clone();
            let p = pattern.to_string();
            set.spawn(async move { cluster.prepare_pattern(i, &p, PREPARE_TIMEOUT).await });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => {
                    let msg = format!("invalid `pattern`: {}", status.message());
                    return Err(Status::new(status.code(), msg));
                }
                Err(e) => return Err(Status::internal(e.to_string())),
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Admin for AdminApi {
    type CalibrateStream = EventStream;

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        let infos = self.stage_infos().await;
        let control = self.app.scheduler.control();
        let drained = control.drained();
        let workers = (0..self.cluster.stages.len())
            .map(|i| self.worker_status(i, &infos[i], drained.get(i).copied().unwrap_or(false)))
            .collect();
        let pattern = self.pattern_info();
        Ok(Response::new(pb::ClusterStatus {
            model: self.app.model_name.clone(),
            workers,
            plan: pattern.plan.clone(),
            pattern: Some(pattern),
            requests_running: self.app.scheduler.running() as u32,
            requests_waiting: self.app.scheduler.waiting() as u32,
            accepting: control.admission_blocked().is_none(),
            replanning: self.app.scheduler.admission_held(),
        }))
    }

    async fn drain(&self, req: Request<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        Ok(Response::new(self.set_drained(&req.into_inner().worker, true).await?))
    }

    async fn undrain(&self, req: Request<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        Ok(Response::new(self.set_drained(&req.into_inner().worker, false).await?))
    }

    async fn get_pattern(&self, _req: Request<pb::GetPatternRequest>) -> Result<Response<pb::PatternInfo>, Status> {
        Ok(Response::new(self.pattern_info()))
    }

    async fn set_pattern(&self, req: Request<pb::SetPatternRequest>) -> Result<Response<pb::PatternInfo>, Status> {
        let req = req.into_inner();
        let pattern = req.pattern.trim().to_ascii_uppercase();
        let drain_timeout = match req.drain_timeout_ms {
            0 => replan::DEFAULT_DRAIN_TIMEOUT,
            ms => Duration::from_millis(ms.into()),
        };
        self.prepare_everywhere(&pattern).await?;
        let info = self.activate_pattern(&pattern, req.keep_plan, drain_timeout).await?;
        Ok(Response::new(info))
    }

    async fn calibrate(&self, req: Request<pb::CalibrateRequest>) -> Result<Response<EventStream>, Status> {
        let search = calibrate::Search::new(self, req.into_inner()).await?;
        Ok(Response::new(search.start(self.shared())))
    }
}

impl AdminApi {
    /// A cheap copy for background tasks.
    fn shared(&self) -> Arc<AdminApi> {
        Arc::new(AdminApi {
            app: self.app.clone(),
            cluster: self.cluster.clone(),
            num_layers: self.num_layers,
            plan_pinned: self.plan_pinned,
        })
    }
}
