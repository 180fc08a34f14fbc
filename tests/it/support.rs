//! What the fault tests (faults/) and the daemon and records tests share: a daemon's configuration per node, etcd read with
//! the real etcdctl, what a folder holds and whether a set in it is complete, a replayable
//! PRNG, and a throttling TCP proxy in front of etcd.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{Config, Work, assert_sha256sums};

/// A daemon's config for `node` (staging: `w.staging()` for node-a, else `staging-<node>`);
/// `election` is the body of `[election]`; `extra` follows (targets, other tables).
pub fn daemon_config(w: &Work, node: &str, endpoint: &str, cron: &str, election: &str, extra: &str) -> PathBuf {
    Config::node(node, endpoint, &staging_of(w, node))
        .set("etcd", "connect_timeout", "2s")
        .set("schedule", "cron", cron)
        .set("schedule", "timezone", "UTC")
        .set("schedule", "jitter", "0s")
        .merge("election", election)
        .tail(extra)
        .write(&w.path().join(format!("{node}.toml")))
}

pub fn staging_of(w: &Work, node: &str) -> PathBuf {
    if node == "node-a" {
        w.staging()
    } else {
        w.path().join(format!("staging-{node}"))
    }
}

/// Retention that deletes nothing (every keep rule 0, no max_age), for tests that count sets.
pub const NO_RETENTION: &str =
    "\n[retention]\nkeep_last = 0\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\nmin_keep = 0\n";

pub fn etcdctl(endpoints: &str) -> Command {
    crate::common::etcdctl_at(None, endpoints, None)
}

pub fn etcd_get(endpoints: &str, key: &str) -> Option<String> {
    let out = etcdctl(endpoints)
        .args(["get", "--print-value-only", key])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!v.is_empty()).then_some(v)
}

/// Every key under `prefix` (the prefix stripped) with its JSON value.
pub fn etcd_prefix(endpoints: &str, prefix: &str) -> BTreeMap<String, serde_json::Value> {
    let out = etcdctl(endpoints).args(["get", "--prefix", prefix]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| {
            (
                c[0].trim_start_matches(prefix).to_string(),
                serde_json::from_str(c[1]).unwrap_or_else(|_| serde_json::Value::String(c[1].to_string())),
            )
        })
        .collect()
}

/// Names in `dir`, hidden ones included, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|e| e.map(|e| e.unwrap().file_name().into_string().unwrap()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

pub fn visible(dir: &Path) -> Vec<String> {
    entries(dir).into_iter().filter(|n| !n.starts_with('.')).collect()
}

pub fn hidden(dir: &Path) -> Vec<String> {
    entries(dir).into_iter().filter(|n| n.starts_with('.')).collect()
}

/// A set folder holds a manifest naming files that are all there at their sizes, and
/// `sha256sum -c` passes (plain sets only).
pub fn assert_complete(set: &Path) {
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(set.join("manifest.json")).unwrap_or_else(|_| panic!("{} has no manifest", set.display())),
    )
    .unwrap();
    assert_eq!(m["id"].as_str(), set.file_name().and_then(|n| n.to_str()), "{m}");
    for f in m["files"].as_array().unwrap() {
        let name = f["stored_name"].as_str().unwrap();
        let len = std::fs::metadata(set.join(name))
            .unwrap_or_else(|_| panic!("{}/{name} is missing", set.display()))
            .len();
        assert_eq!(len, f["stored_size"].as_u64().unwrap(), "{}/{name}", set.display());
    }
    assert_sha256sums(set);
}

pub fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// A tiny deterministic PRNG (xorshift), so a failing random schedule can be replayed.
pub fn next_rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// A TCP proxy in front of etcd that passes the server's bytes at `rate` bytes per second
/// (0: unthrottled; changeable while it runs): a slow snapshot stream, so a test can act
/// while it flows. `down` counts the server's bytes passed so far.
pub struct ThrottleProxy {
    port: u16,
    pub down: Arc<AtomicU64>,
    pub rate: Arc<AtomicU64>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl ThrottleProxy {
    pub async fn start(upstream: &str, rate: u64) -> ThrottleProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = upstream.trim_start_matches("http://").to_string();
        let down = Arc::new(AtomicU64::new(0));
        let rate = Arc::new(AtomicU64::new(rate));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let (d, r) = (down.clone(), rate.clone());
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    c = listener.accept() => match c { Ok((c, _)) => c, Err(_) => return },
                    _ = &mut stopped => return,
                };
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    let _ = sw.shutdown().await;
                });
                let (d, r) = (d.clone(), r.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let rate = r.load(SeqCst);
                        if rate > 0 {
                            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        d.fetch_add(n as u64, SeqCst);
                    }
                    let _ = cw.shutdown().await;
                });
            }
        });
        ThrottleProxy {
            port,
            down,
            rate,
            _stop: stop,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
