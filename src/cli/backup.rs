//! `backup`: the summary printed after a manual backup.

use std::io::Write;

use anyhow::Result;

use super::human;
use crate::run::pipeline::BackupReport;

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
        "snapshot_seconds": r.snapshot_duration.as_secs_f64(),
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
    let secs = r.snapshot_duration.as_secs_f64().max(1e-3);
    if let Some(s) = m.snapshot() {
        writeln!(
            out,
            "  snapshot  {:.1}s, {}/s, trailer verified",
            secs,
            human((s.size as f64 / secs) as u64)
        )?;
    }
    for t in &r.targets {
        match &t.result {
            Ok(()) => writeln!(out, "  target    {}: stored at {}", t.name, t.location)?,
            Err(e) => writeln!(out, "  target    {}: FAILED: {e}", t.name)?,
        }
    }
    Ok(())
}
