//! Prometheus metrics, from the node's state file and staging: written for node_exporter's
//! textfile collector (`metrics.textfile`, atomically) and/or served by the daemon on
//! `GET /metrics` (`metrics.listen`). Both show this node's view; a cluster's last success is
//! the `max()` over its nodes, since one node runs each backup.
//!
//! The exposition is the official Prometheus client's (`prometheus-client`): a [`Collector`]
//! reads the state at each scrape and its Prometheus text format (0.0.4) encoder writes it,
//! escaping included. The endpoint is hyper's HTTP/1.1 server, bounded (see [`serve`]).

use std::convert::Infallible;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, header};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::outcome::RunResult;
use crate::staging::state::State;

fn unix(ts: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(ts).ok().map(|t| t.timestamp())
}

/// Seconds rounded to the millisecond, as they are exported.
fn millis(secs: f64) -> f64 {
    (secs * 1000.0).round() / 1000.0
}

/// What the metric families are written through: one call per family, names as exported
/// (a counter's without its `_total`, which the encoder appends).
struct Families<'a>(DescriptorEncoder<'a>);

impl Families<'_> {
    /// A gauge without labels.
    fn gauge(&mut self, name: &str, help: &str, value: impl EncodeGaugeValue) -> fmt::Result {
        let metric = ConstGauge::new(value);
        metric.encode(self.0.encode_descriptor(name, help, None, metric.metric_type())?)
    }

    /// A gauge with one series per value of `label`; nothing at all without series.
    fn gauges<V: EncodeGaugeValue + Copy>(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        series: &[(&str, V)],
    ) -> fmt::Result {
        if series.is_empty() {
            return Ok(());
        }
        let mut family = self.0.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (value_of_label, value) in series {
            let labels = [(label, *value_of_label)];
            ConstGauge::new(*value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A counter (`<name>_total`) with one series per value of `label`; its HELP and TYPE
    /// also without series.
    fn counters(&mut self, name: &str, help: &str, label: &str, series: &[(&str, u64)]) -> fmt::Result {
        let mut family = self.0.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (value_of_label, value) in series {
            let labels = [(label, *value_of_label)];
            ConstCounter::new(*value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The node's metrics, read afresh from `<staging>` each time they are encoded.
#[derive(Debug)]
struct NodeMetrics {
    staging: PathBuf,
}

impl Collector for NodeMetrics {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        write_families(&mut Families(encoder), &self.staging)
    }
}

/// The exposition text (Prometheus text format 0.0.4) for the node whose staging directory
/// is `staging`.
pub fn render(staging: &Path) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(NodeMetrics {
        staging: staging.to_path_buf(),
    }));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

fn write_families(out: &mut Families, staging: &Path) -> fmt::Result {
    let state = State::load(staging);
    // Runs this node took (not skipped, not another node's).
    let attempts: Vec<_> = state
        .runs
        .iter()
        .filter(|r| r.result.took_a_set() || r.result == RunResult::Failed)
        .collect();
    let last_ok = state.runs.iter().find(|r| r.result == RunResult::Ok);
    out.gauge(
        "etcd_backupd_last_success_timestamp_seconds",
        "When this node last stored a backup on every target (unix time; 0: never).",
        last_ok.and_then(|r| unix(&r.finished)).unwrap_or(0),
    )?;
    if let Some(last) = attempts.first() {
        out.gauge(
            "etcd_backupd_last_attempt_timestamp_seconds",
            "When this node's last backup attempt ended.",
            unix(&last.finished).unwrap_or(0),
        )?;
        out.gauge(
            "etcd_backupd_last_attempt_success",
            "1 if this node's last backup attempt stored the set on every target.",
            i64::from(last.result == RunResult::Ok),
        )?;
        out.gauge(
            "etcd_backupd_last_duration_seconds",
            "Duration of this node's last backup attempt.",
            millis(last.duration_s),
        )?;
        out.gauge(
            "etcd_backupd_last_bytes",
            "Bytes stored by this node's last backup attempt.",
            last.bytes.unwrap_or(0),
        )?;
        if let Some(p) = &last.pace {
            out.gauge(
                "etcd_backupd_last_snapshot_slowed_seconds",
                "How long this node's last snapshot pull was held back to keep etcd's latency within priority.etcd_latency_budget.",
                millis(p.slowed_s),
            )?;
            out.gauge(
                "etcd_backupd_last_snapshot_etcd_latency_ratio",
                "etcd's probe latency (median) during this node's last snapshot pull, over its latency before the pull.",
                millis(p.during_p50_ms / p.baseline_ms.max(1e-3)),
            )?;
        }
    }
    let (pending, pending_bytes) = crate::staging::sets::pending(staging);
    out.gauge(
        "etcd_backupd_pending_sets",
        "Verified sets in staging waiting for a target.",
        pending,
    )?;
    out.gauge(
        "etcd_backupd_pending_bytes",
        "Bytes of the sets waiting in staging.",
        pending_bytes,
    )?;
    out.gauge(
        "etcd_backupd_is_runner",
        "1 while this node runs a backup.",
        i64::from(state.running.is_some()),
    )?;
    out.gauge(
        "etcd_backupd_newest_set_restorable_until_timestamp_seconds",
        "When the first leaf certificate in the static resources of the newest set this node staged expires (unix time; 0: none recorded).",
        state
            .newest_set
            .as_ref()
            .and_then(|s| s.restorable_until.as_deref())
            .and_then(unix)
            .unwrap_or(0),
    )?;
    out.gauge(
        "etcd_backupd_import_refused_sets",
        "Platform backup folders under import.dirs that cannot be imported (see status).",
        state.import_refused.len(),
    )?;
    out.gauge(
        "etcd_backupd_probe_problems",
        "Problems the daemon's last probe of etcd and the targets found (at start and after each reload; see status).",
        state.probe.as_ref().map(|p| p.problems().len()).unwrap_or(0),
    )?;
    let runs: Vec<(&str, u64)> = RunResult::ALL
        .map(RunResult::as_str)
        .into_iter()
        .map(|result| (result, state.runs_total.get(result).copied().unwrap_or(0)))
        .collect();
    out.counters(
        "etcd_backupd_runs",
        "Runs seen by this node, by result.",
        "result",
        &runs,
    )?;
    let skips: Vec<(&str, u64)> = state.skips_total.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    out.counters(
        "etcd_backupd_skips",
        "Skipped runs, by kind of reason.",
        "reason",
        &skips,
    )?;
    write_coverage(out, &state)?;
    write_journal(out, &state)
}

/// The journal's writer on this node (absent where it never wrote): what a restore to a
/// moment can reach. Alert on the newest across nodes (only the writer's moves).
fn write_journal(out: &mut Families, state: &State) -> fmt::Result {
    let Some(j) = &state.journal else {
        return Ok(());
    };
    out.gauge(
        "etcd_backupd_journal_writing",
        "1 while this node's journal writer holds the lock and watches etcd.",
        i64::from(j.writing),
    )?;
    out.gauge(
        "etcd_backupd_journal_durable_timestamp_seconds",
        "The newest moment the journal covers on every target holding snapshots, as this node's writer stored it (unix time; 0: none): fetch --at can restore up to here.",
        j.durable_until.as_deref().and_then(unix).unwrap_or(0),
    )?;
    out.gauge(
        "etcd_backupd_journal_durable_revision",
        "The newest etcd revision the journal holds on every target holding snapshots, as this node's writer stored it.",
        j.durable_revision,
    )?;
    let family = out.0.encode_descriptor(
        "etcd_backupd_journal_chain_breaks",
        "Journal chains this node's writer ended because etcd compacted revisions it had not stored (a restore cannot cross the break).",
        None,
        MetricType::Counter,
    )?;
    ConstCounter::new(j.breaks_total).encode(family)
}

/// Coverage: what each target held when this node last listed it (after a run's retention),
/// and the newest set a drill here restored from it.
fn write_coverage(out: &mut Families, state: &State) -> fmt::Result {
    out.gauges(
        "etcd_backupd_target_newest_set_timestamp_seconds",
        "Creation time of the newest complete set on the target, as this node last listed it after a backup (unix time; 0: none).",
        "target",
        &state
            .targets
            .iter()
            .map(|(n, c)| (n.as_str(), c.newest_complete_time.as_deref().and_then(unix).unwrap_or(0)))
            .collect::<Vec<_>>(),
    )?;
    out.gauges(
        "etcd_backupd_target_sets",
        "Complete (not damaged) sets of this cluster on the target, as this node last listed it after a backup.",
        "target",
        &state
            .targets
            .iter()
            .map(|(n, c)| (n.as_str(), c.sets))
            .collect::<Vec<_>>(),
    )?;
    let drilled = state.last_drill.as_ref().map(|d| &d.drilled);
    let mut drill_targets: std::collections::BTreeSet<&str> = state.targets.keys().map(String::as_str).collect();
    drill_targets.extend(drilled.into_iter().flat_map(|m| m.keys().map(String::as_str)));
    out.gauges(
        "etcd_backupd_target_newest_drilled_set_timestamp_seconds",
        "Creation time of the newest set from the target that a successful restore drill on this host restored (unix time; 0: none).",
        "target",
        &drill_targets
            .into_iter()
            .map(|n| (n, drilled.and_then(|m| m.get(n)).and_then(|t| unix(t)).unwrap_or(0)))
            .collect::<Vec<_>>(),
    )?;
    if let Some(d) = &state.last_drill {
        out.gauge(
            "etcd_backupd_last_drill_success",
            "1 if the last restore drill on this host succeeded.",
            i64::from(d.ok),
        )?;
        out.gauge(
            "etcd_backupd_last_drill_timestamp_seconds",
            "When the last restore drill on this host ended.",
            unix(&d.finished).unwrap_or(0),
        )?;
        if let Some(secs) = d.restore_seconds {
            out.gauge(
                "etcd_backupd_last_drill_restore_duration_seconds",
                "How long the last restore drill on this host, when it succeeded, took from its start until the restored etcd answered: fetching the set from its target, checking it (signature, checksums, decryption and decompression), snapshot restore and starting etcd on the restored data. Not included: the platform's restore procedure on the cluster.",
                millis(secs),
            )?;
        }
    }
    Ok(())
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

/// A failure that goes on is logged again this often (besides its first time and changes).
const REMIND: Duration = Duration::from_secs(3600);
/// A client must have sent its whole request head this soon after connecting.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection (one request: no keep-alive) is closed this long after it was accepted,
/// whatever state it is in: a client reading the answer slowly cannot hold it longer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(20);
/// Connections served at once; more wait in the listen backlog until one ends.
const MAX_CONNECTIONS: usize = 8;
/// The largest request head read (hyper's minimum buffer); a longer one is refused.
const MAX_HEAD: usize = 8192;

/// Serves `GET /metrics` on `addr` in the background until `stop`. Metrics never stop
/// backups: nothing here can end the daemon. A bind failure (the port taken, the address not
/// on this host yet) is logged as a warning with the address and the error, the first time,
/// when the error changes and once an hour, and the bind is retried every
/// `retry` (`metrics.listen_retry`); once it succeeds, recovery is logged. A serving task that dies (a panic) is
/// started again the same way.
pub fn spawn(
    tasks: &tokio_util::task::TaskTracker,
    (addr, retry): (String, Duration),
    staging: PathBuf,
    stop: CancellationToken,
) {
    tasks.spawn(async move {
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
                    match tokio::spawn(serve(listener, staging.clone(), stop.clone())).await {
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

/// Answers connections on `listener` until `stop`, with hyper's HTTP/1.1 server: one request
/// per connection, its head within [`HEAD_TIMEOUT`] and at most [`MAX_HEAD`] bytes, the
/// whole connection within [`CONNECTION_TIMEOUT`], at most [`MAX_CONNECTIONS`] at once. The
/// text is rendered on the blocking pool (it reads files), never on the daemon's own tasks.
async fn serve(listener: tokio::net::TcpListener, staging: PathBuf, stop: CancellationToken) {
    let staging: Arc<Path> = staging.into();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false);
    let mut accept_failing = false;
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
            _ = stop.cancelled() => return,
        };
        let sock = tokio::select! {
            s = listener.accept() => match s {
                Ok((sock, _)) => {
                    accept_failing = false;
                    sock
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
        let conn = http.serve_connection(
            hyper_util::rt::TokioIo::new(sock),
            hyper::service::service_fn(move |req| answer(req, staging.clone())),
        );
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                // An error is the client's (gone, too slow, not HTTP): nothing to log.
                _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// The answer to one request: the exposition on `GET` or `HEAD /metrics` (any query), 405
/// for another method there, 404 elsewhere.
async fn answer(req: Request<hyper::body::Incoming>, staging: Arc<Path>) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
        resp
    };
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            PLAIN,
            "only /metrics is served here\n".into(),
        ));
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut resp = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "/metrics answers GET and HEAD\n".into(),
        );
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(resp);
    }
    Ok(match tokio::task::spawn_blocking(move || render(&staging)).await {
        Ok(text) => reply(
            StatusCode::OK,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            text,
        ),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            PLAIN,
            format!("cannot render the metrics: {e}\n"),
        ),
    })
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
