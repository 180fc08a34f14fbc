//! `backup`: the summary printed after a manual backup.

use std::io::Write;

use anyhow::Result;

use anyhow::bail;

use super::human;
use crate::config::Settings;
use crate::error::Stop;
use crate::manifest::Trigger;
use crate::run;
use crate::run::pipeline::BackupReport;

/// What `backup` was asked for.
pub(super) struct Asked {
    pub(super) no_election: bool,
    pub(super) target: Option<String>,
    pub(super) force: bool,
    pub(super) json: bool,
}

/// A manual run's name (its election key) has one-second resolution, and only this node
/// makes its manual runs: one that finished in this same second would make this one look
/// done already, so this run waits for the next second instead.
async fn manual_run(settings: &Settings) -> run::RunKind {
    // Read once: only a run of this node in this second can take the name.
    let runs = crate::staging::state::State::load(&settings.snapshot.staging_dir).runs;
    loop {
        let now = chrono::Utc::now();
        let kind = run::RunKind::Manual {
            node: settings.node_name.clone(),
            at: now,
        };
        let name = kind.name();
        if !runs.iter().any(|r| r.run == name) {
            return kind;
        }
        let rest = 1000 - u64::from(now.timestamp_subsec_millis().min(999));
        tokio::time::sleep(std::time::Duration::from_millis(rest)).await;
    }
}

/// `backup`: one run now, through the guards and the election (unless `--no-election`),
/// recorded as the daemon's are, then its summary.
pub(super) async fn run(settings: &Settings, asked: Asked) -> Result<()> {
    // A staging directory that is not ours is a configuration error, found before etcd.
    crate::staging::check_staging(&settings.snapshot.staging_dir)?;
    crate::priority::apply(&settings.priority);
    let cancel = crate::daemon::cancel_on_signals();
    // A manual run competes like a scheduled one, but does not wait: if another node
    // holds the lock, this one is skipped.
    let kind = manual_run(settings).await;
    let run = kind.name();
    let mode = if settings.election.enabled && !asked.no_election {
        run::Mode::Elected {
            wait_max: std::time::Duration::ZERO,
        }
    } else {
        run::Mode::Alone
    };
    let request = run::Request {
        target: asked.target.clone(),
        force: if asked.force {
            run::pipeline::Force::Yes
        } else {
            run::pipeline::Force::No
        },
        ..run::Request::new(&kind, mode)
    };
    let (started, t0) = (chrono::Utc::now(), std::time::Instant::now());
    let outcome = run::run_once(settings, &request, &cancel).await;
    run::remember(
        &settings.snapshot.staging_dir,
        run::record(Trigger::Manual, &run, started, t0, &outcome),
    );
    crate::metrics::refresh(settings);
    match outcome? {
        run::Outcome::Ran(report) => {
            if asked.json {
                super::report::print(json(&report), report.all_stored())?;
            } else {
                print_backup_summary(&report)?;
            }
            if !report.all_stored() {
                let failed: Vec<String> = report
                    .targets
                    .iter()
                    .filter_map(|t| t.result.as_ref().err().map(|e| format!("{} ({e})", t.name)))
                    .collect();
                bail!(
                    "backup {} was not stored on: {} (it stays in staging and is delivered by the next run or the daemon)",
                    report.manifest.id,
                    failed.join("; ")
                );
            }
            Ok(())
        }
        run::Outcome::Skipped(reason) => bail!(Stop::Skipped(reason)),
        run::Outcome::Elsewhere(rec) => bail!(Stop::Skipped(crate::outcome::Skip::new(
            crate::outcome::SkipKind::Elsewhere,
            format!("node {} ran this backup", rec.node)
        ))),
    }
}

/// `backup --json`: the set, its files and each target's result.
pub(super) fn json(r: &BackupReport) -> serde_json::Value {
    let m = &r.manifest;
    let targets: Vec<serde_json::Value> = r
        .targets
        .iter()
        .map(|t| match &t.result {
            Ok(()) => serde_json::json!({"name": t.name, "ok": true, "location": t.location}),
            Err(e) => serde_json::json!({"name": t.name, "ok": false, "error": e}),
        })
        .collect();
    serde_json::json!({
        "id": m.id,
        "cluster": m.cluster_name,
        "result": r.result().as_str(),
        "seconds": r.duration.as_secs_f64(),
        "snapshot_seconds": r.snapshot.duration.as_secs_f64(),
        "pace": r.snapshot.pace,
        "etcd": m.etcd,
        "forced": m.forced,
        "files": m.files,
        "targets": targets,
    })
}

pub(super) fn print_backup_summary(r: &BackupReport) -> Result<()> {
    let m = &r.manifest;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "backup {} of cluster {} taken in {:.1}s",
        m.id,
        m.cluster_name,
        r.duration.as_secs_f64()
    )?;
    writeln!(
        out,
        "  etcd      {} (member {}, etcd {}, revision {})",
        m.etcd.endpoint, m.etcd.member_id, m.etcd.version, m.etcd.revision
    )?;
    for reason in &m.forced {
        writeln!(out, "  forced    {reason}")?;
    }
    for f in &m.files {
        writeln!(
            out,
            "  file      {}  {}  sha256 {}",
            f.stored_name,
            human(f.stored_size),
            f.sha256
        )?;
    }
    let secs = r.snapshot.duration.as_secs_f64().max(1e-3);
    if let Some(s) = m.snapshot() {
        writeln!(
            out,
            "  snapshot  {:.1}s, {}/s, trailer verified",
            secs,
            human((s.size as f64 / secs) as u64)
        )?;
        if let Some(p) = &r.snapshot.pace {
            writeln!(out, "  pace      {}", p.describe())?;
        }
    }
    for t in &r.targets {
        match &t.result {
            Ok(()) => writeln!(out, "  target    {}: stored at {}", t.name, t.location)?,
            Err(e) => writeln!(out, "  target    {}: FAILED: {e}", t.name)?,
        }
    }
    Ok(())
}
