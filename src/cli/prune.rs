//! `prune`: retention applied to the targets by hand.

use std::io::Write;

use anyhow::{Result, bail};

use crate::config::Settings;
use crate::error::Stop;
use crate::targets;

/// The cluster folder retention works on: `cluster_name`, or the etcd cluster ID.
pub(super) async fn cluster_folder(settings: &Settings) -> Result<String> {
    if let Some(c) = &settings.cluster_name {
        return Ok(c.clone());
    }
    let within = settings.etcd.connect_timeout.0 + settings.etcd.request_timeout.0;
    match tokio::time::timeout(within, crate::etcd::connect_first(&settings.etcd)).await {
        Ok(Ok((_, status))) => Ok(settings.cluster_folder(status.cluster_id)),
        Ok(Err(e)) => bail!(Stop::Usage(format!(
            "cluster_name is not set and etcd cannot tell the cluster ID ({}); set cluster_name",
            crate::error::one_line(&e)
        ))),
        Err(_) => bail!(Stop::Usage(
            "cluster_name is not set and etcd did not answer in time; set cluster_name".into()
        )),
    }
}

pub(super) async fn prune(
    settings: &Settings,
    dry_run: bool,
    force: bool,
    only: Option<&str>,
    json: bool,
) -> Result<()> {
    let state = crate::staging::state::State::load(&settings.snapshot.staging_dir);
    if let Some(r) = state.runs.first()
        && {
            use crate::outcome::RunResult::*;
            matches!(r.result, Failed | Skipped | Partial | Pending)
        }
        && !force
        && !dry_run
    {
        // A refusal on purpose (exit 3, as a skip), not a usage error.
        bail!(Stop::Refused(format!(
            "this node's newest backup ({}) {}; retention deletes nothing until a backup succeeds (--force to prune anyway)",
            r.run, r.result
        )));
    }
    let cluster = cluster_folder(settings).await?;
    let policy = settings.retention_policy();
    let chosen: Vec<_> = match only {
        Some(name) => vec![
            settings
                .target(name)
                .ok_or_else(|| Stop::Usage(format!("--target {name:?}: no such target")))?,
        ],
        None => settings.targets.iter().collect(),
    };
    let mut failed = Vec::new();
    // `--json`: each target's decisions, printed once at the end.
    let mut docs = Vec::new();
    for t in chosen {
        let report = async {
            let target = targets::open(t, None)?;
            crate::delivery::retention::prune_target(
                target.as_ref(),
                &cluster,
                &settings.node_name,
                &policy,
                settings.time_zone(),
                dry_run,
            )
            .await
        }
        .await;
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                if json {
                    docs.push(serde_json::json!({"target": t.name, "ok": false, "error": crate::error::one_line(&e)}));
                } else {
                    outln!("target '{}': FAILED: {}", t.name, crate::error::one_line(&e));
                }
                failed.push(t.name.clone());
                continue;
            }
        };
        if !report.errors.is_empty() {
            failed.push(t.name.clone());
        }
        if json {
            let decisions: Vec<serde_json::Value> = report
                .decisions
                .iter()
                .map(|d| serde_json::json!({"id": d.id, "keep": d.keep, "reasons": d.reasons}))
                .collect();
            docs.push(serde_json::json!({
                "target": t.name,
                "ok": report.errors.is_empty(),
                "decisions": decisions,
                "debris_removed": report.debris_removed,
                "journal_segments_removed": report.segments_removed,
                "errors": report.errors,
            }));
            continue;
        }
        let verb = if dry_run { "would delete" } else { "deleted" };
        outln!(
            "target '{}', cluster {}: {} set(s), keep {}, {verb} {}",
            t.name,
            cluster,
            report.decisions.len(),
            report.decisions.iter().filter(|d| d.keep).count(),
            report.decisions.iter().filter(|d| !d.keep).count()
        );
        for d in &report.decisions {
            outln!("  {}  {}", d.id, d.summary());
        }
        if report.segments_removed > 0 {
            outln!(
                "  {} {} journal segment(s) no kept set can use",
                if dry_run { "would remove" } else { "removed" },
                report.segments_removed
            );
        }
        if report.debris_removed > 0 {
            outln!("  removed {} incomplete upload(s)", report.debris_removed);
        }
        for e in &report.errors {
            outln!("  FAILED: {e}");
        }
    }
    if json {
        let v = serde_json::json!({"cluster": cluster, "dry_run": dry_run, "targets": docs});
        super::report::print(v, failed.is_empty())?;
    }
    if !failed.is_empty() {
        bail!("prune failed on: {}", failed.join(", "));
    }
    Ok(())
}
