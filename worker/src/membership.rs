//! etcd membership, shared by workers (registration, assignment) and the coordinator
//! (discovery, assignment, liveness).
//!
//! Keys live under a cluster prefix, values are JSON:
//! - `{prefix}/workers/{worker_id}`: a [`WorkerRecord`], attached to the worker's lease, so
//!   it disappears within one TTL of the worker dying;
//! - `{prefix}/assignments/{worker_id}`: the [`Assignment`] the coordinator chose.
//!
//! The lease is kept alive at TTL/2 on its own task; when etcd is away the task retries and
//! re-registers with a fresh lease once etcd is back. Serving never depends on etcd being up.

use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};

use crate::error::{Result, WorkerError};

/// What a worker announces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Unique id within the cluster.
    pub worker_id: String,
    /// gRPC address other processes reach it on.
    pub addr: String,
    /// Served model name.
    pub model: String,
}

/// The layer range (and downstream stage) the coordinator gives a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// Stage index (0-based).
    pub stage: usize,
    /// First layer.
    pub layer_start: usize,
    /// One past the last layer.
    pub layer_end: usize,
    /// Next stage's address (`None` on the last stage).
    pub next: Option<String>,
}

fn etcd_err(what: &str, e: etcd_client::Error) -> WorkerError {
    WorkerError::invalid("etcd", format!("{what}: {e}"))
}

/// The key of a worker's record.
pub fn worker_key(prefix: &str, id: &str) -> String {
    format!("{}/workers/{id}", prefix.trim_end_matches('/'))
}

/// The key of a worker's assignment.
pub fn assignment_key(prefix: &str, id: &str) -> String {
    format!("{}/assignments/{id}", prefix.trim_end_matches('/'))
}

/// Connects with a short timeout (etcd being away must not hang start-up forever).
pub async fn connect(endpoints: &[String]) -> Result<Client> {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(3));
    Client::connect(endpoints, Some(opts))
        .await
        .map_err(|e| etcd_err(&format!("connecting to {endpoints:?}"), e))
}

/// Keeps `record` registered under a lease of `ttl_s` seconds for as long as the task
/// runs, re-registering after any etcd outage. Never returns.
pub async fn keep_registered(endpoints: Vec<String>, prefix: String, record: WorkerRecord, ttl_s: i64) {
    let key = worker_key(&prefix, &record.worker_id);
    let value = serde_json::to_string(&record).unwrap_or_default();
    let half = Duration::from_millis((ttl_s.max(2) * 500) as u64);
    loop {
        match register_once(&endpoints, &key, &value, ttl_s, half).await {
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "etcd registration lost; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn register_once(endpoints: &[String], key: &str, value: &str, ttl_s: i64, half: Duration) -> Result<()> {
    let mut client = connect(endpoints).await?;
    let lease = client
        .lease_grant(ttl_s, None)
        .await
        .map_err(|e| etcd_err("lease grant", e))?;
    client
        .put(key, value, Some(PutOptions::new().with_lease(lease.id())))
        .await
        .map_err(|e| etcd_err("register", e))?;
    tracing::info!(%key, lease = lease.id(), "registered in etcd");
    let (mut keeper, mut stream) = client
        .lease_keep_alive(lease.id())
        .await
        .map_err(|e| etcd_err("keep-alive", e))?;
    loop {
        tokio::time::sleep(half).await;
        keeper.keep_alive().await.map_err(|e| etcd_err("keep-alive", e))?;
        match tokio::time::timeout(half, stream.message()).await {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {}
            Ok(Ok(Some(_))) => return Err(WorkerError::invalid("etcd", "lease expired")),
            Ok(Ok(None)) => return Err(WorkerError::invalid("etcd", "keep-alive stream closed")),
            Ok(Err(e)) => return Err(etcd_err("keep-alive", e)),
            Err(_) => return Err(WorkerError::invalid("etcd", "keep-alive answer timed out")),
        }
    }
}

/// Waits until the coordinator writes this worker's assignment.
pub async fn wait_for_assignment(endpoints: &[String], prefix: &str, worker_id: &str) -> Result<Assignment> {
    let key = assignment_key(prefix, worker_id);
    loop {
        match try_wait_assignment(endpoints, &key).await {
            Ok(a) => return Ok(a),
            Err(e) => {
                tracing::warn!(error = %e, "waiting for a stage assignment; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn try_wait_assignment(endpoints: &[String], key: &str) -> Result<Assignment> {
    let mut client = connect(endpoints).await?;
    let mut stream = client
        .watch(key, Some(WatchOptions::new()))
        .await
        .map_err(|e| etcd_err("watch", e))?;
    let got = client.get(key, None).await.map_err(|e| etcd_err("get", e))?;
    if let Some(kv) = got.kvs().first() {
        return parse(kv.value());
    }
    while let Some(resp) = stream.message().await.map_err(|e| etcd_err("watch", e))? {
        for ev in resp.events() {
            if ev.event_type() == EventType::Put {
                if let Some(kv) = ev.kv() {
                    return parse(kv.value());
                }
            }
        }
    }
    Err(WorkerError::invalid("etcd", "watch ended"))
}

fn parse<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| WorkerError::invalid("etcd", format!("malformed value: {e}")))
}

/// Every registered worker, sorted by id.
pub async fn list_workers(client: &mut Client, prefix: &str) -> Result<Vec<WorkerRecord>> {
    let p = format!("{}/workers/", prefix.trim_end_matches('/'));
    let got = client
        .get(p.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| etcd_err("list workers", e))?;
    let mut out: Vec<WorkerRecord> = got.kvs().iter().filter_map(|kv| parse(kv.value()).ok()).collect();
    out.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
    Ok(out)
}

/// Writes a worker's assignment.
pub async fn assign(client: &mut Client, prefix: &str, worker_id: &str, a: &Assignment) -> Result<()> {
    let v = serde_json::to_string(a).unwrap_or_default();
    client
        .put(assignment_key(prefix, worker_id), v, None)
        .await
        .map_err(|e| etcd_err("assign", e))?;
    Ok(())
}
