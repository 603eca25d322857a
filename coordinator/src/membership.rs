//! Cluster membership: the embedded static list (filled by the local launcher) or etcd.
//!
//! With etcd, workers register themselves (see `worker::membership`); the coordinator waits
//! for enough of them, assigns each a stage of the plan (writing the downstream address too,
//! so activations go worker to worker), and watches the prefix so a worker whose lease
//! expires is noticed within seconds. If etcd goes away the cluster keeps serving on the
//! assignments it has; the per-stage health poll still detects dead workers.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use worker::membership::{self, Assignment, WorkerRecord};

use crate::cluster::StageEndpoint;
use crate::planner::Plan;

/// Waits (up to `timeout`) for `plan.len()` registered workers, assigns them stages in
/// worker-id order, and returns the stage endpoints.
pub async fn assign_from_etcd(
    endpoints: &[String],
    prefix: &str,
    plan: &Plan,
    timeout: Duration,
) -> Result<Vec<StageEndpoint>> {
    let deadline = Instant::now() + timeout;
    let workers: Vec<WorkerRecord> = loop {
        let found = match membership::connect(endpoints).await {
            Ok(mut c) => membership::list_workers(&mut c, prefix).await.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "etcd unreachable while waiting for workers");
                Vec::new()
            }
        };
        if found.len() >= plan.len() {
            break found.into_iter().take(plan.len()).collect();
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {} workers registered under {prefix} in etcd within {timeout:?}",
                found.len(),
                plan.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut client = membership::connect(endpoints).await.context("connecting to etcd")?;
    for (i, (w, layers)) in workers.iter().zip(plan).enumerate() {
        let a = Assignment {
            stage: i,
            layer_start: layers.start,
            layer_end: layers.end,
            next: workers.get(i + 1).map(|n| n.addr.clone()),
        };
        membership::assign(&mut client, prefix, &w.worker_id, &a).await?;
        tracing::info!(worker = %w.worker_id, stage = i, ?layers, "assigned");
    }
    Ok(workers
        .iter()
        .zip(plan)
        .map(|(w, layers)| StageEndpoint {
            addr: w.addr.clone(),
            layers: layers.clone(),
        })
        .collect())
}
