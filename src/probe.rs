//! A quick look at etcd and every target, side by side: one attempt each, bounded by the
//! target's `connect_timeout` and a few seconds. The daemon runs it at start and after each
//! reload (so a dead WebDAV port or an unmounted `file://` root is reported then, not at
//! 02:30), and `check-config --connect` runs the same checks.

use std::time::Duration;

use anyhow::Result;

use crate::config::{Settings, TargetSettings};
use crate::staging::state::{Probe, State};
use crate::targets;

/// Opens the target for one attempt, asks it whether it is ready and lists its sets: how
/// many complete sets of the cluster it holds.
pub async fn target(settings: &Settings, t: &TargetSettings) -> Result<usize> {
    let once = t.single_attempt();
    let target = targets::open(&once, None)?;
    let within = t.connect_timeout.0 + Duration::from_secs(5);
    tokio::time::timeout(within, target.preflight())
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {}", humantime::format_duration(within)))??;
    Ok(target.list_sets(settings.cluster_name.as_deref()).await?.len())
}

/// The target's route (direct, or through which proxy), for a report.
pub fn route(t: &TargetSettings) -> Result<String> {
    Ok(targets::open(&t.single_attempt(), None)?.route())
}

/// etcd's problem, if it has one.
pub async fn etcd(settings: &Settings) -> Option<String> {
    let within = settings.etcd.connect_timeout.0 + settings.etcd.request_timeout.0;
    match tokio::time::timeout(within, crate::etcd::connect_first(&settings.etcd)).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(crate::error::one_line(&e)),
        Err(_) => Some(format!("no answer within {}", humantime::format_duration(within))),
    }
}

/// Strips "target 'NAME': " where an error already starts with it.
fn about(name: &str, e: &anyhow::Error) -> String {
    let line = crate::error::one_line(e);
    let prefix = format!("target '{name}': ");
    line.strip_prefix(&prefix).map(str::to_string).unwrap_or(line)
}

/// etcd and every target, side by side.
pub async fn all(settings: &Settings) -> Probe {
    let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let targets = futures_util::future::join_all(settings.targets.iter().map(|t| async move {
        let problem = target(settings, t).await.err().map(|e| about(&t.name, &e));
        (t.name.clone(), problem)
    }));
    let (etcd, targets) = tokio::join!(etcd(settings), targets);
    Probe {
        at,
        etcd,
        targets: targets.into_iter().collect(),
    }
}

/// Probes in the background and says at once what is wrong: an error line per problem, the
/// problems in `STATUS=`, the record in `state.json` (for `status` and the metrics). Never
/// stops the daemon. `when` names the occasion ("at start", "after the reload").
pub fn spawn(
    tasks: &tokio_util::task::TaskTracker,
    settings: Settings,
    when: &'static str,
    stop: tokio_util::sync::CancellationToken,
) {
    tasks.spawn(async move {
        // A stop does not wait for a target that does not answer.
        let probe = tokio::select! {
            p = all(&settings) => p,
            _ = stop.cancelled() => return,
        };
        let problems = probe.problems();
        for p in &problems {
            tracing::error!("probe {when} found a problem: {p}");
        }
        if problems.is_empty() {
            tracing::info!("probe {when}: etcd and every target answer");
        } else {
            crate::notify::status(&format!("problem: {}", problems.join("; ")));
        }
        // A slower probe never replaces a newer one's finding (a start's after a reload's).
        State::update_or_log(&settings.snapshot.staging_dir, |s| {
            if s.probe.as_ref().is_none_or(|old| old.at <= probe.at) {
                s.probe = Some(probe);
            }
        });
        crate::metrics::refresh(&settings);
    });
}
