//! Prometheus metrics, from the node's state file and staging: written for node_exporter's
//! textfile collector (`metrics.textfile`, atomically) and/or served by the daemon on
//! `GET /metrics` (`metrics.listen`). Both show this node's view; a cluster's last success is
//! the `max()` over its nodes, since one node runs each backup.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::state::State;

fn unix(ts: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(ts).ok().map(|t| t.timestamp())
}

fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
}

/// The exposition text for the node whose staging directory is `staging`.
pub fn render(staging: &Path) -> String {
    let state = State::load(staging);
    let mut out = String::new();
    // Runs this node took (not skipped, not another node's).
    let attempts: Vec<_> = state
        .runs
        .iter()
        .filter(|r| r.result == "ok" || r.result == "failed")
        .collect();
    let last_ok = state.runs.iter().find(|r| r.result == "ok");
    gauge(
        &mut out,
        "etcd_backupd_last_success_timestamp_seconds",
        "When this node last stored a backup on every target (unix time; 0: never).",
        last_ok.and_then(|r| unix(&r.finished)).unwrap_or(0),
    );
    if let Some(last) = attempts.first() {
        gauge(
            &mut out,
            "etcd_backupd_last_attempt_timestamp_seconds",
            "When this node's last backup attempt ended.",
            unix(&last.finished).unwrap_or(0),
        );
        gauge(
            &mut out,
            "etcd_backupd_last_attempt_success",
            "1 if this node's last backup attempt stored the set on every target.",
            u8::from(last.result == "ok"),
        );
        gauge(
            &mut out,
            "etcd_backupd_last_duration_seconds",
            "Duration of this node's last backup attempt.",
            format!("{:.3}", last.duration_s),
        );
        gauge(
            &mut out,
            "etcd_backupd_last_bytes",
            "Bytes stored by this node's last backup attempt.",
            last.bytes.unwrap_or(0),
        );
    }
    let (pending, pending_bytes) = crate::delivery::pending(staging);
    gauge(
        &mut out,
        "etcd_backupd_pending_sets",
        "Verified sets in staging waiting for a target.",
        pending,
    );
    gauge(
        &mut out,
        "etcd_backupd_pending_bytes",
        "Bytes of the sets waiting in staging.",
        pending_bytes,
    );
    gauge(
        &mut out,
        "etcd_backupd_is_runner",
        "1 while this node runs a backup.",
        u8::from(state.running.is_some()),
    );
    let _ = writeln!(
        out,
        "# HELP etcd_backupd_runs_total Runs seen by this node, by result.\n# TYPE etcd_backupd_runs_total counter"
    );
    for result in ["ok", "failed", "skipped", "done-elsewhere"] {
        let n = state.runs_total.get(result).copied().unwrap_or(0);
        let _ = writeln!(out, "etcd_backupd_runs_total{{result=\"{result}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP etcd_backupd_skips_total Skipped runs, by kind of reason.\n# TYPE etcd_backupd_skips_total counter"
    );
    for (kind, n) in &state.skips_total {
        let _ = writeln!(out, "etcd_backupd_skips_total{{reason=\"{kind}\"}} {n}");
    }
    if let Some(d) = &state.last_drill {
        gauge(
            &mut out,
            "etcd_backupd_last_drill_success",
            "1 if the last restore drill on this host succeeded.",
            u8::from(d.ok),
        );
        gauge(
            &mut out,
            "etcd_backupd_last_drill_timestamp_seconds",
            "When the last restore drill on this host ended.",
            unix(&d.finished).unwrap_or(0),
        );
    }
    out
}

/// Rewrites `metrics.textfile`, if configured (temporary file + rename, so the collector
/// never reads half a file). Failures are logged, never fatal.
pub fn refresh(settings: &Settings) {
    let Some(path) = &settings.metrics.textfile else { return };
    let text = render(&settings.snapshot.staging_dir);
    let write = || -> Result<()> {
        let tmp = path.with_extension(format!("prom.{}.tmp", std::process::id()));
        std::fs::write(&tmp, text.as_bytes()).with_context(|| format!("metrics.textfile '{}'", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("metrics.textfile '{}'", path.display()))
    };
    if let Err(e) = write() {
        tracing::warn!(error = %crate::error::one_line(&e), "cannot write the metrics file");
    }
}

/// Serves `GET /metrics` on `addr` until `stop`: a tiny HTTP/1.1 responder, one request per
/// connection, enough for Prometheus and curl.
pub async fn serve(addr: &str, staging: std::path::PathBuf, stop: CancellationToken) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics.listen {addr}"))?;
    tracing::info!(address = %addr, "serving metrics on /metrics");
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = tokio::select! {
                s = listener.accept() => match s {
                    Ok(s) => s,
                    // Out of file descriptors, say: do not spin.
                    Err(_) => {
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let staging = staging.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = 0;
                let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                    while got < buf.len() {
                        let n = sock.read(&mut buf[got..]).await?;
                        if n == 0 {
                            break;
                        }
                        got += n;
                        if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                    Ok::<_, std::io::Error>(())
                })
                .await;
                if !matches!(read, Ok(Ok(()))) {
                    return;
                }
                let head = String::from_utf8_lossy(&buf[..got]);
                let (status, body) = if head.starts_with("GET /metrics ") || head.starts_with("GET /metrics?") {
                    ("200 OK", render(&staging))
                } else {
                    ("404 Not Found", "only /metrics is served here\n".to_string())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok(())
}
