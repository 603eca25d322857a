//! Membership through a real etcd (Debian's `etcd-server`): workers started separately
//! register with a lease, the coordinator assigns their stages, a dead worker is noticed
//! within seconds, and etcd being briefly away does not stop serving.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::cluster::{fixture, generate_with, prompt_cases, Cluster};
use super::{assert_same, greedy, local};

pub(super) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub(super) struct Proc(pub(super) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0.id().to_string()]).status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A throw-away single-node etcd on loopback.
pub(super) fn start_etcd(dir: &Path) -> (Proc, String) {
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let child = Command::new("etcd")
        .args(["--data-dir", dir.to_str().unwrap()])
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-cluster", &format!("default=http://127.0.0.1:{peer}")])
        .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd (Debian package etcd-server) must be installed");
    // Wait until it answers.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
        assert!(Instant::now() < deadline, "etcd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (Proc(child), url)
}

pub(super) fn start_worker(etcd: &str, dir: &Path, id: &str) -> Proc {
    start_worker_on(etcd, dir, id, free_port())
}

/// A worker process joining through etcd, serving on `port`.
pub(super) fn start_worker_on(etcd: &str, dir: &Path, id: &str, port: u16) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args([
            "stage",
            "--etcd",
            etcd,
            "--etcd-prefix",
            "/indexrelay/test",
            "--lease-ttl",
            "2",
        ])
        .args(["--worker-id", id, "--listen", &format!("127.0.0.1:{port}")])
        .arg("--model")
        .arg(dir)
        .args(["--model-name", dir.file_name().unwrap().to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Proc(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_membership_serves_survives_etcd_outage_and_notices_dead_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let (etcd, url) = start_etcd(tmp.path());
    let dir = fixture("dsv32_pattern");
    let w0 = start_worker(&url, &dir, "w0");
    let w1_port = free_port();
    let w1 = start_worker_on(&url, &dir, "w1", w1_port);
    let w2 = start_worker(&url, &dir, "w2");
    let c = Cluster::start(&dir, 3, &[2, 4], &["--etcd", &url, "--etcd-prefix", "/indexrelay/test"]).await;

    let prompts = prompt_cases(&dir);
    let reqs: Vec<_> = prompts.iter().map(|p| (p.clone(), 6, greedy())).collect();
    let want = local(&dir, &reqs, true);
    for (i, (p, n, s)) in reqs.iter().enumerate() {
        let got = generate_with(c.client(), p.clone(), *n, s.clone(), true).await.unwrap();
        assert_same(&format!("etcd cluster prompt {i}"), &got, &want[i]);
    }

    // etcd paused: the cluster keeps serving on the assignments it has.
    let _ = Command::new("kill").args(["-STOP", &etcd.0.id().to_string()]).status();
    let got = generate_with(c.client(), reqs[0].0.clone(), 6, greedy(), true)
        .await
        .unwrap();
    assert_same("while etcd is away", &got, &want[0]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = Command::new("kill").args(["-CONT", &etcd.0.id().to_string()]).status();
    let got = generate_with(c.client(), reqs[1].0.clone(), 6, greedy(), true)
        .await
        .unwrap();
    assert_same("after etcd is back", &got, &want[1]);

    // A worker dies: noticed within seconds (unhealthy, requests refused as unavailable).
    drop(w1);
    let t0 = Instant::now();
    while c.health().await == super::pb_serving() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "dead worker not noticed within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = generate_with(c.client(), vec![1, 2, 3], 2, greedy(), false)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);

    // The stage comes back (same worker id and address; its assignment is still in etcd):
    // the cluster reports itself healthy again and answers as before.
    let w1 = start_worker_on(&url, &dir, "w1", w1_port);
    let t0 = Instant::now();
    while c.health().await != super::pb_serving() {
        assert!(t0.elapsed() < Duration::from_secs(60), "restarted stage not noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = generate_with(c.client(), reqs[2].0.clone(), 6, greedy(), true)
        .await
        .unwrap();
    assert_same("after the stage is back", &got, &want[2]);
    drop((w0, w1, w2));
}
