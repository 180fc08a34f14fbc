//! Prometheus metrics, from the node's state file and staging: written for node_exporter's
//! textfile collector (`metrics.textfile`, atomically) and/or served by the daemon on
//! `GET /metrics` (`metrics.listen`). Both show this node's view; a cluster's last success is
//! the `max()` over its nodes, since one node runs each backup.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::outcome::RunResult;
use crate::staging::state::State;

fn unix(ts: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(ts).ok().map(|t| t.timestamp())
}

fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
}

/// A label value in the exposition format: `\`, `"` and newlines escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A gauge with one series per target (`target="<name>"`); nothing without series.
fn target_gauge(out: &mut String, name: &str, help: &str, series: &[(&str, String)]) {
    if series.is_empty() {
        return;
    }
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (target, value) in series {
        let _ = writeln!(out, "{name}{{target=\"{}\"}} {value}", label_value(target));
    }
}

/// The exposition text for the node whose staging directory is `staging`.
pub fn render(staging: &Path) -> String {
    let state = State::load(staging);
    let mut out = String::new();
    // Runs this node took (not skipped, not another node's).
    let attempts: Vec<_> = state
        .runs
        .iter()
        .filter(|r| r.result.took_a_set() || r.result == RunResult::Failed)
        .collect();
    let last_ok = state.runs.iter().find(|r| r.result == RunResult::Ok);
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
            u8::from(last.result == RunResult::Ok),
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
    gauge(
        &mut out,
        "etcd_backupd_newest_set_restorable_until_timestamp_seconds",
        "When the first leaf certificate in the static resources of the newest set this node staged expires (unix time; 0: none recorded).",
        state
            .newest_set
            .as_ref()
            .and_then(|s| s.restorable_until.as_deref())
            .and_then(unix)
            .unwrap_or(0),
    );
    gauge(
        &mut out,
        "etcd_backupd_import_refused_sets",
        "Platform backup folders under import.dirs that cannot be imported (see status).",
        state.import_refused.len(),
    );
    let _ = writeln!(
        out,
        "# HELP etcd_backupd_runs_total Runs seen by this node, by result.\n# TYPE etcd_backupd_runs_total counter"
    );
    for result in RunResult::ALL.map(RunResult::as_str) {
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
    // Coverage: what each target held when this node last listed it (after a run's
    // retention), and the newest set a drill here restored from it.
    let coverage: Vec<(&str, &crate::staging::state::TargetCoverage)> =
        state.targets.iter().map(|(n, c)| (n.as_str(), c)).collect();
    target_gauge(
        &mut out,
        "etcd_backupd_target_newest_set_timestamp_seconds",
        "Creation time of the newest complete set on the target, as this node last listed it after a backup (unix time; 0: none).",
        &coverage
            .iter()
            .map(|(n, c)| {
                (
                    *n,
                    c.newest_complete_time
                        .as_deref()
                        .and_then(unix)
                        .unwrap_or(0)
                        .to_string(),
                )
            })
            .collect::<Vec<_>>(),
    );
    target_gauge(
        &mut out,
        "etcd_backupd_target_sets",
        "Complete (not damaged) sets of this cluster on the target, as this node last listed it after a backup.",
        &coverage
            .iter()
            .map(|(n, c)| (*n, c.sets.to_string()))
            .collect::<Vec<_>>(),
    );
    let drilled = state.last_drill.as_ref().map(|d| &d.drilled);
    let mut drill_targets: std::collections::BTreeSet<&str> = state.targets.keys().map(String::as_str).collect();
    drill_targets.extend(drilled.into_iter().flat_map(|m| m.keys().map(String::as_str)));
    target_gauge(
        &mut out,
        "etcd_backupd_target_newest_drilled_set_timestamp_seconds",
        "Creation time of the newest set from the target that a successful restore drill on this host restored (unix time; 0: none).",
        &drill_targets
            .into_iter()
            .map(|n| {
                let t = drilled.and_then(|m| m.get(n)).and_then(|t| unix(t)).unwrap_or(0);
                (n, t.to_string())
            })
            .collect::<Vec<_>>(),
    );
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
        if let Some(secs) = d.restore_seconds {
            gauge(
                &mut out,
                "etcd_backupd_last_drill_restore_duration_seconds",
                "How long the last restore drill on this host, when it succeeded, took from its start until the restored etcd answered: fetching the set from its target, checking it (signature, checksums, decryption and decompression), snapshot restore and starting etcd on the restored data. Not included: the platform's restore procedure on the cluster.",
                format!("{secs:.3}"),
            );
        }
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

/// How long a metrics endpoint that could not bind (or failed) waits before trying again.
const RETRY: Duration = Duration::from_secs(30);
/// A failure that goes on is logged again this often (besides its first time and changes).
const REMIND: Duration = Duration::from_secs(3600);

/// The retry interval; `ETCD_BACKUPD_METRICS_RETRY_MS` shortens it for the test suite only
/// (internal, not a setting).
fn retry_interval() -> Duration {
    std::env::var("ETCD_BACKUPD_METRICS_RETRY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .unwrap_or(RETRY)
}

/// Serves `GET /metrics` on `addr` in the background until `stop`. Metrics never stop
/// backups: nothing here can end the daemon. A bind failure (the port taken, the address not
/// on this host yet) is logged as a warning with the address and the error, the first time,
/// when the error changes and once an hour, and the bind is retried every
/// [`RETRY`]; once it succeeds, recovery is logged. A serving task that dies (a panic) is
/// started again the same way.
pub fn spawn(tasks: &tokio_util::task::TaskTracker, addr: String, staging: PathBuf, stop: CancellationToken) {
    tasks.spawn(async move {
        let retry = retry_interval();
        let mut failures: u64 = 0;
        let mut logged: Option<(String, Instant)> = None;
        loop {
            let bound = tokio::select! {
                b = tokio::net::TcpListener::bind(addr.as_str()) => b,
                _ = stop.cancelled() => return,
            };
            let error = match bound {
                Ok(listener) => {
                    if failures > 0 {
                        tracing::info!(address = %addr, failed_attempts = failures, "metrics endpoint is up again: serving /metrics");
                    } else {
                        tracing::info!(address = %addr, "serving metrics on /metrics");
                    }
                    failures = 0;
                    logged = None;
                    // Its own task: a panic while serving ends that task, not this loop.
                    match tokio::spawn(accept_loop(listener, staging.clone(), stop.clone())).await {
                        Ok(()) => return,
                        Err(e) => format!("the metrics endpoint failed: {e}"),
                    }
                }
                Err(e) => e.to_string(),
            };
            failures += 1;
            let repeat = logged
                .as_ref()
                .is_some_and(|(last, at)| *last == error && at.elapsed() < REMIND);
            if repeat {
                tracing::debug!(address = %addr, error = %error, attempts = failures, "metrics endpoint still down");
            } else {
                tracing::warn!(
                    address = %addr, error = %error, attempts = failures, retry_in = %humantime::format_duration(retry),
                    "cannot serve metrics on metrics.listen; backups go on, retrying in the background"
                );
                logged = Some((error, Instant::now()));
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = stop.cancelled() => return,
            }
        }
    });
}

/// Answers connections on `listener` until `stop`: a tiny HTTP/1.1 responder, one request
/// per connection, enough for Prometheus and curl.
async fn accept_loop(listener: tokio::net::TcpListener, staging: PathBuf, stop: CancellationToken) {
    let mut accept_failing = false;
    loop {
        let (mut sock, _) = tokio::select! {
            s = listener.accept() => match s {
                Ok(s) => {
                    accept_failing = false;
                    s
                }
                // Out of file descriptors, say: do not spin, and say so once.
                Err(e) => {
                    if !accept_failing {
                        tracing::warn!(error = %e, "the metrics endpoint cannot accept connections; retrying");
                        accept_failing = true;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let staging = staging.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut got = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::state::{DrillState, TargetCoverage};

    #[test]
    fn coverage_and_drill_per_target() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = State::default();
        state.targets.insert(
            "nfs".into(),
            TargetCoverage {
                sets: 3,
                newest_complete_id: Some("2026-11-25_023012".into()),
                newest_complete_time: Some("2026-11-25T02:30:12Z".into()),
                listed_at: "2026-11-25T02:31:00Z".into(),
            },
        );
        // A target holding no complete set, its name needing escapes.
        state.targets.insert("we\\ird\"x".into(), TargetCoverage::default());
        state.last_drill = Some(DrillState {
            id: "2026-11-24_023000".into(),
            finished: "2026-11-25T04:00:00Z".into(),
            ok: true,
            summary: "revision 9".into(),
            target: Some("nfs".into()),
            set_time: Some("2026-11-24T02:30:00Z".into()),
            restore_seconds: Some(12.3456),
            // A target drilled once, no longer listed here.
            drilled: [
                ("nfs".to_string(), "2026-11-24T02:30:00Z".to_string()),
                ("old".to_string(), "2026-11-01T00:00:00Z".to_string()),
            ]
            .into(),
        });
        state.save(dir.path()).unwrap();
        let text = render(dir.path());
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        for want in [
            "etcd_backupd_target_newest_set_timestamp_seconds{target=\"nfs\"} 1795573812",
            "etcd_backupd_target_newest_set_timestamp_seconds{target=\"we\\\\ird\\\"x\"} 0",
            "etcd_backupd_target_sets{target=\"nfs\"} 3",
            "etcd_backupd_target_sets{target=\"we\\\\ird\\\"x\"} 0",
            "etcd_backupd_target_newest_drilled_set_timestamp_seconds{target=\"nfs\"} 1795487400",
            "etcd_backupd_target_newest_drilled_set_timestamp_seconds{target=\"old\"} 1793491200",
            "etcd_backupd_target_newest_drilled_set_timestamp_seconds{target=\"we\\\\ird\\\"x\"} 0",
            "etcd_backupd_last_drill_restore_duration_seconds 12.346",
        ] {
            assert!(lines.contains(&want), "{want} not in\n{text}");
        }
        for name in [
            "etcd_backupd_target_newest_set_timestamp_seconds",
            "etcd_backupd_target_sets",
            "etcd_backupd_target_newest_drilled_set_timestamp_seconds",
            "etcd_backupd_last_drill_restore_duration_seconds",
        ] {
            assert!(text.contains(&format!("# TYPE {name} gauge\n")), "{name}");
        }

        // A failed drill measured nothing; a node that never listed a target exports no
        // target series.
        let state = State {
            last_drill: Some(DrillState {
                id: "latest".into(),
                finished: "2026-11-25T04:00:00Z".into(),
                ok: false,
                summary: "no".into(),
                target: None,
                set_time: None,
                restore_seconds: None,
                drilled: Default::default(),
            }),
            ..State::default()
        };
        state.save(dir.path()).unwrap();
        let text = render(dir.path());
        assert!(
            !text.contains("restore_duration") && !text.contains("target="),
            "{text}"
        );
    }
}
