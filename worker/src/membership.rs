//! etcd membership, shared by workers (registration, assignment) and the coordinator
//! (discovery, assignment, liveness).
//!
//! Keys live under a cluster prefix, values are JSON:
//! - `{prefix}/workers/{worker_id}`: a [`WorkerRecord`], attached to the worker's lease, so
//!   it disappears within one TTL of the worker dying; it carries the layer range the worker
//!   serves once it has loaded one;
//! - `{prefix}/assignments/{worker_id}`: the [`Assignment`] the coordinator chose.
//!
//! The lease is kept alive at TTL/2 on its own task; when etcd is away the task retries and
//! re-registers with a fresh lease once etcd is back. Serving never depends on etcd being up.
//! After a live re-plan moves a worker's range ([`Registration::publish_range`]) the record
//! is re-put and the assignment's range rewritten, so a restarted worker loads the range the
//! cluster now expects.

use std::sync::Arc;
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
    /// First layer served (absent until a range is loaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_start: Option<usize>,
    /// One past the last layer served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_end: Option<usize>,
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

/// A worker's registration in etcd, kept alive on its own task; cheap to clone.
#[derive(Clone)]
pub struct Registration {
    endpoints: Vec<String>,
    prefix: String,
    record: Arc<tokio::sync::watch::Sender<WorkerRecord>>,
}

impl Registration {
    /// Registers `record` under a lease of `ttl_s` seconds and keeps it registered for the
    /// life of the process, re-registering after any etcd outage.
    pub fn start(endpoints: Vec<String>, prefix: String, record: WorkerRecord, ttl_s: i64) -> Self {
        let (tx, rx) = tokio::sync::watch::channel(record);
        tokio::spawn(keep_registered(endpoints.clone(), prefix.clone(), rx, ttl_s));
        Registration {
            endpoints,
            prefix,
            record: Arc::new(tx),
        }
    }

    /// The record as registered now.
    pub fn record(&self) -> WorkerRecord {
        self.record.borrow().clone()
    }

    /// Announces the layer range served now: the record is re-put under the lease at once,
    /// and the range of this worker's assignment (if any) is rewritten on a background task
    /// (retried while etcd is away, for up to a minute).
    pub fn publish_range(&self, start: usize, end: usize) {
        self.record.send_modify(|r| {
            r.layer_start = Some(start);
            r.layer_end = Some(end);
        });
        let (endpoints, prefix, id) = (self.endpoints.clone(), self.prefix.clone(), self.record().worker_id);
        tokio::spawn(async move {
            for _ in 0..120 {
                match update_assigned_range(&endpoints, &prefix, &id, start, end).await {
                    Ok(()) => return,
                    Err(e) => tracing::warn!(error = %e, "rewriting the assignment's range; retrying"),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
}

/// Sets the range of `worker_id`'s assignment, keeping its stage and next address; nothing
/// to do when it has none (a worker started with an explicit range).
async fn update_assigned_range(
    endpoints: &[String],
    prefix: &str,
    worker_id: &str,
    start: usize,
    end: usize,
) -> Result<()> {
    let mut client = connect(endpoints).await?;
    let key = assignment_key(prefix, worker_id);
    let got = client.get(key.as_str(), None).await.map_err(|e| etcd_err("get", e))?;
    let Some(kv) = got.kvs().first() else {
        return Ok(());
    };
    let mut a: Assignment = parse(kv.value())?;
    if (a.layer_start, a.layer_end) == (start, end) {
        return Ok(());
    }
    a.layer_start = start;
    a.layer_end = end;
    assign(&mut client, prefix, worker_id, &a).await
}

/// Keeps the record `record` holds registered under a lease of `ttl_s` seconds for as long
/// as the task runs, re-putting it whenever it changes and re-registering after any etcd
/// outage. Never returns.
pub async fn keep_registered(
    endpoints: Vec<String>,
    prefix: String,
    mut record: tokio::sync::watch::Receiver<WorkerRecord>,
    ttl_s: i64,
) {
    let half = Duration::from_millis((ttl_s.max(2) * 500) as u64);
    loop {
        match register_once(&endpoints, &prefix, &mut record, ttl_s, half).await {
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "etcd registration lost; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn register_once(
    endpoints: &[String],
    prefix: &str,
    record: &mut tokio::sync::watch::Receiver<WorkerRecord>,
    ttl_s: i64,
    half: Duration,
) -> Result<()> {
    let mut client = connect(endpoints).await?;
    let lease = client
        .lease_grant(ttl_s, None)
        .await
        .map_err(|e| etcd_err("lease grant", e))?;
    let put = |r: &WorkerRecord| {
        (
            worker_key(prefix, &r.worker_id),
            serde_json::to_string(r).unwrap_or_default(),
        )
    };
    let (key, value) = put(&record.borrow_and_update());
    client
        .put(key.as_str(), value, Some(PutOptions::new().with_lease(lease.id())))
        .await
        .map_err(|e| etcd_err("register", e))?;
    tracing::info!(%key, lease = lease.id(), "registered in etcd");
    let (mut keeper, mut stream) = client
        .lease_keep_alive(lease.id())
        .await
        .map_err(|e| etcd_err("keep-alive", e))?;
    loop {
        // A changed record (a new layer range) is re-put at once under the same lease.
        match tokio::time::timeout(half, record.changed()).await {
            Ok(Ok(())) => {
                let (key, value) = put(&record.borrow_and_update());
                client
                    .put(key.as_str(), value, Some(PutOptions::new().with_lease(lease.id())))
                    .await
                    .map_err(|e| etcd_err("re-register", e))?;
                tracing::info!(%key, "registration updated in etcd");
                continue;
            }
            // Nobody can change the record any more: just keep the lease.
            Ok(Err(_)) => tokio::time::sleep(half).await,
            Err(_) => {}
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_carry_the_range_once_known_and_older_records_still_parse() {
        let mut r = WorkerRecord {
            worker_id: "w0".into(),
            addr: "127.0.0.1:7001".into(),
            model: "m".into(),
            layer_start: None,
            layer_end: None,
        };
        let before = serde_json::to_string(&r).unwrap();
        assert!(!before.contains("layer_"), "no range before one is loaded: {before}");
        // A record written before ranges were published.
        let old: WorkerRecord = parse(br#"{"worker_id":"w0","addr":"127.0.0.1:7001","model":"m"}"#).unwrap();
        assert_eq!(old, r);
        r.layer_start = Some(2);
        r.layer_end = Some(5);
        let after: WorkerRecord = parse(serde_json::to_string(&r).unwrap().as_bytes()).unwrap();
        assert_eq!((after.layer_start, after.layer_end), (Some(2), Some(5)));
    }
}
