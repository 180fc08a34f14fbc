//! The daemon's heartbeat: once a minute it stamps `state.json` (so `status` on the node
//! tells a running daemon from a state file left behind) and, when the election is on,
//! writes a summary of this node (last run, what each target held when it last listed it,
//! pending sets, problems, next run) to `<election.prefix>/nodes/<node_name>` in etcd, so
//! `status --cluster` on any node shows every node without ssh. One etcd write per node per
//! minute, with no lease: a node that died stays visible with its last heartbeat's age.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::staging::state::{DaemonBeat, RunState, State, TargetCoverage};

/// How often the daemon beats.
pub const INTERVAL: Duration = Duration::from_secs(60);
/// A heartbeat older than this means the daemon is not running (two and a half beats:
/// one missed beat under load is not an outage).
pub const ALIVE_WITHIN: Duration = Duration::from_secs(150);

/// The format of [`NodeBeat`]; a reader shows what it understands of a newer one.
pub const SCHEMA_VERSION: u32 = 1;

/// What one node says about itself in etcd.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeBeat {
    pub schema_version: u32,
    pub node: String,
    pub version: String,
    /// RFC 3339, UTC.
    pub beat: String,
    pub started: String,
    /// When its next run really starts (jitter included), RFC 3339 UTC.
    #[serde(default)]
    pub next_start: Option<String>,
    #[serde(default)]
    pub running: Option<String>,
    #[serde(default)]
    pub last_run: Option<RunState>,
    /// What each target held when this node last listed it.
    #[serde(default)]
    pub targets: BTreeMap<String, TargetCoverage>,
    #[serde(default)]
    pub pending_sets: u64,
    /// What its last probe found wrong, and import folders it refused.
    #[serde(default)]
    pub problems: Vec<String>,
}

/// The key of `node`'s heartbeat.
pub fn key(prefix: &str, node: &str) -> String {
    format!("{}/{node}", nodes_prefix(prefix))
}

/// Where every node's heartbeat is.
pub fn nodes_prefix(prefix: &str) -> String {
    format!("{prefix}/nodes")
}

/// Marks the daemon stopped in `state.json` (a clean exit): `status` then says it is not
/// running at once, not two and a half minutes later.
pub fn stopped(staging: &std::path::Path) {
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    State::update_or_log(staging, |s| {
        if let Some(d) = s.daemon.as_mut().filter(|d| d.pid == std::process::id()) {
            d.stopped = Some(now);
        }
    });
}

/// Is this node's daemon running, by its record: a recent heartbeat, no clean stop since,
/// and (where `/proc` shows this host's processes, as on the node) its process still there.
pub fn daemon_alive(d: &DaemonBeat, now: chrono::DateTime<Utc>) -> bool {
    let process = if std::path::Path::new("/proc/self").exists() {
        std::path::Path::new(&format!("/proc/{}", d.pid)).exists()
    } else {
        true
    };
    d.stopped.is_none() && process && alive(&d.beat, now)
}

/// Is a heartbeat at `beat` (RFC 3339) recent enough for a live daemon?
pub fn alive(beat: &str, now: chrono::DateTime<Utc>) -> bool {
    crate::clock::parse(beat).is_some_and(|t| {
        (now - t).to_std().unwrap_or(Duration::ZERO) <= ALIVE_WITHIN && t <= now + chrono::TimeDelta::minutes(5)
    })
}

/// This node's summary, from its state file.
pub fn of_state(settings: &Settings, state: &State, pending_sets: u64) -> NodeBeat {
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let daemon = state.daemon.clone();
    let mut problems = state.probe.as_ref().map(|p| p.problems()).unwrap_or_default();
    problems.extend(
        state
            .import_refused
            .iter()
            .map(|r| format!("import of '{}' refused: {}", r.path, r.reason)),
    );
    NodeBeat {
        schema_version: SCHEMA_VERSION,
        node: settings.node_name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        beat: daemon.as_ref().map(|d| d.beat.clone()).unwrap_or_else(|| now.clone()),
        started: daemon.map(|d| d.started).unwrap_or(now),
        next_start: state.next_start.clone(),
        running: state.running.clone(),
        last_run: state.runs.first().cloned(),
        targets: state.targets.clone(),
        pending_sets,
        problems,
    }
}

/// Beats every [`INTERVAL`] until `stop`: `state.json` first, then etcd (when the election
/// is on). A failure is logged once until it clears, never fatal.
pub fn spawn(tasks: &tokio_util::task::TaskTracker, settings: Settings, stop: tokio_util::sync::CancellationToken) {
    tasks.spawn(async move {
        let started = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let mut member: Option<crate::etcd::Member> = None;
        let mut failing = false;
        loop {
            let staging = &settings.snapshot.staging_dir;
            let beat = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            State::update_or_log(staging, |s| {
                s.daemon = Some(DaemonBeat {
                    pid: std::process::id(),
                    started: started.clone(),
                    beat: beat.clone(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    stopped: None,
                })
            });
            if settings.election.enabled {
                match publish(&settings, &mut member).await {
                    Ok(()) if failing => {
                        tracing::info!("the heartbeat reaches etcd again");
                        failing = false;
                    }
                    Ok(()) => {}
                    Err(e) => {
                        member = None;
                        if !failing {
                            tracing::warn!(error = %crate::error::one_line(&e), "cannot write this node's heartbeat to etcd; status --cluster shows it as silent until it can");
                            failing = true;
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(INTERVAL) => {}
                _ = stop.cancelled() => return,
            }
        }
    });
}

async fn publish(settings: &Settings, member: &mut Option<crate::etcd::Member>) -> anyhow::Result<()> {
    let m = match member {
        Some(m) => m,
        None => member.insert(crate::etcd::connect_first(&settings.etcd).await?.0),
    };
    let staging = &settings.snapshot.staging_dir;
    let beat = of_state(
        settings,
        &State::load(staging),
        crate::staging::sets::pending(staging).0 as u64,
    );
    m.put(
        &key(&settings.election.prefix, &settings.node_name),
        &serde_json::to_string(&beat)?,
    )
    .await
}

/// Every node's heartbeat in etcd, by node name; entries that do not parse are skipped.
pub async fn read_all(member: &mut crate::etcd::Member, prefix: &str) -> anyhow::Result<Vec<NodeBeat>> {
    let kvs = member.get_prefix(&format!("{}/", nodes_prefix(prefix))).await?;
    Ok(kvs
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice::<NodeBeat>(&v).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_is_alive_for_two_and_a_half_beats() {
        let now = crate::clock::parse("2026-12-07T12:00:00Z").unwrap();
        assert!(alive("2026-12-07T11:59:00Z", now));
        assert!(alive("2026-12-07T11:57:31Z", now));
        assert!(!alive("2026-12-07T11:57:29Z", now));
        assert!(!alive("not a time", now));
        // A clock far ahead is not a live daemon either.
        assert!(!alive("2026-12-07T13:00:00Z", now));
        assert_eq!(key("/etcd-backupd", "master-0"), "/etcd-backupd/nodes/master-0");
    }
}
