//! One run as the daemon and `backup` both do it: guards, then the election, then the
//! backup pipeline while the lock is held, then the record in etcd and in the node's state.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::election::{Claim, Election, RunRecord};
use crate::manifest::Trigger;
use crate::pipeline::{self, BackupOptions, BackupReport};
use crate::state::{RunState, State, TargetState};
use crate::{etcd, fsutil, guards};

pub enum Outcome {
    /// The backup ran (whether every target took it is in the report).
    Ran(Box<BackupReport>),
    /// A guard said no, or this node does not compete.
    Skipped(String),
    /// Another node ran it.
    Elsewhere(RunRecord),
}

/// Free space for staging, measured on its nearest existing ancestor.
fn staging_free(staging: &Path) -> Result<u64> {
    let mut p = staging;
    while !p.exists() {
        p = p.parent().unwrap_or(Path::new("/"));
    }
    fsutil::free_space(p)
}

/// Runs `run` once. `wait_max` bounds how long this node waits for another holder of the run
/// lock (zero: give up at once, as a manual `backup` does).
pub async fn run_once(
    settings: &Settings,
    opts: &BackupOptions,
    run: &str,
    elect: bool,
    wait_max: Duration,
    cancel: &CancellationToken,
) -> Result<Outcome> {
    let (mut member, status) = etcd::connect_first(&settings.etcd).await?;
    let facts = guards::gather(&mut member).await?;
    let free = staging_free(&settings.snapshot.staging_dir)?;
    if let Some(reason) = guards::check(settings, &facts, &status, free, Utc::now()) {
        return Ok(Outcome::Skipped(reason));
    }
    if !elect {
        return Ok(Outcome::Ran(Box::new(pipeline::run_backup(settings, opts).await?)));
    }
    let mut election = Election::new(
        member.client.clone(),
        &settings.election.prefix,
        &settings.node_name,
        settings.election.lease_ttl.0,
    );
    let held = match election.contend(run, &status, wait_max, cancel).await? {
        Claim::Won(held) => held,
        Claim::Done(rec) => return Ok(Outcome::Elsewhere(rec)),
        Claim::Skip(reason) => return Ok(Outcome::Skipped(reason)),
    };
    let lost = held.lost.clone();
    let result = tokio::select! {
        r = pipeline::run_backup(settings, opts) => r,
        _ = lost.cancelled() => Err(anyhow!("lost the election lease mid-run; another node takes this run over")),
        _ = cancel.cancelled() => Err(anyhow!("stopped while backing up; the incomplete set stays hidden and is removed by the next run")),
    };
    match result {
        Ok(report) => {
            let record = RunRecord {
                run: run.to_string(),
                node: settings.node_name.clone(),
                id: Some(report.manifest.id.clone()),
                result: if report.all_stored() {
                    "ok".into()
                } else {
                    "failed".into()
                },
                finished: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            };
            if let Err(e) = election.finish(held, &record).await {
                tracing::error!(error = %crate::error::one_line(&e), "cannot record the run in etcd");
            }
            Ok(Outcome::Ran(Box::new(report)))
        }
        Err(e) => {
            // Let another node take the run at once rather than after the lease expires...
            // unless it failed for a reason every node would share; either way it is retried
            // by whoever holds the lock next.
            election.release(held).await;
            Err(e)
        }
    }
}

/// The node-local record of a run's outcome.
pub fn record(
    trigger: Trigger,
    run: &str,
    started: chrono::DateTime<Utc>,
    t0: Instant,
    outcome: &Result<Outcome>,
) -> RunState {
    let trigger = serde_json::to_value(trigger)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let mut s = RunState {
        run: run.to_string(),
        trigger,
        started: started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        finished: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        result: String::new(),
        reason: None,
        id: None,
        bytes: None,
        duration_s: t0.elapsed().as_secs_f64(),
        targets: Vec::new(),
    };
    match outcome {
        Ok(Outcome::Ran(r)) => {
            s.result = if r.all_stored() { "ok".into() } else { "failed".into() };
            s.id = Some(r.manifest.id.clone());
            s.bytes = Some(r.manifest.total_stored_size());
            s.targets = r
                .targets
                .iter()
                .map(|t| TargetState {
                    name: t.name.clone(),
                    ok: t.result.is_ok(),
                    error: t.result.clone().err(),
                })
                .collect();
        }
        Ok(Outcome::Skipped(reason)) => {
            s.result = "skipped".into();
            s.reason = Some(reason.clone());
        }
        Ok(Outcome::Elsewhere(rec)) => {
            s.result = "done-elsewhere".into();
            s.reason = Some(format!("node {} ran it ({})", rec.node, rec.result));
            s.id = rec.id.clone();
        }
        Err(e) => {
            s.result = "failed".into();
            s.reason = Some(crate::error::one_line(e));
        }
    }
    s
}

/// Adds a run to the node's state file; a failure to write it is logged, not fatal.
pub fn remember(staging: &Path, run: RunState) {
    if let Err(e) = pipeline::prepare_staging(staging) {
        tracing::warn!(error = %crate::error::one_line(&e), "cannot write the state file");
        return;
    }
    let mut state = State::load(staging);
    state.push(run);
    state.running = None;
    if let Err(e) = state.save(staging) {
        tracing::warn!(error = %crate::error::one_line(&e), "cannot write the state file");
    }
}
