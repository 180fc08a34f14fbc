//! `list`: the sets on the targets, newest first, with what each says about itself.

use std::io::Write;

use anyhow::Result;

use super::human;
use crate::config::Settings;
use crate::error::Stop;
use crate::targets;

pub(super) async fn list(settings: &Settings, target: Option<&str>, json: bool) -> Result<()> {
    let t = match target {
        Some(name) => settings
            .target(name)
            .ok_or_else(|| Stop::Usage(format!("--target {name:?}: no such target")))?,
        None => &settings.targets[0],
    };
    let target = targets::open(t, None)?;
    // Damaged sets too, as rows marked DAMAGED.
    let sets = target.list_all_sets(settings.cluster_name.as_deref()).await?;
    // What retention would do with each set, per cluster folder, as of now.
    let mut reasons = std::collections::HashMap::new();
    let clusters: std::collections::BTreeSet<&str> = sets.iter().map(|s| s.cluster.as_str()).collect();
    for c in clusters {
        let policy = settings.retention_policy();
        for d in crate::delivery::retention::plan_listed(&sets, c, &policy, chrono::Utc::now(), settings.time_zone()) {
            reasons.insert((c.to_string(), d.id.clone()), d);
        }
    }
    // What each set's signature says (against verify.allowed_signers when set), a few sets
    // at a time.
    let allowed = crate::restore::Trust::of(settings)?.allowed;
    let verdicts: Vec<Option<crate::trust::signing::Verdict>> = {
        use futures_util::StreamExt;
        let (target, allowed) = (target.as_ref(), allowed.as_ref());
        futures_util::stream::iter(&sets)
            .map(|s| async move {
                match crate::restore::signature_of(target, &s.cluster, &s.manifest, allowed).await {
                    Ok(v) => Some(v),
                    Err(e) => {
                        tracing::warn!(backup_id = %s.manifest.id, error = %crate::error::one_line(&e), "cannot read the set's signature");
                        None
                    }
                }
            })
            .buffered(8)
            .collect()
            .await
    };
    let now = chrono::Utc::now();
    let reason_of = |s: &targets::ListedSet| {
        let reason = reasons
            .get(&(s.cluster.clone(), s.manifest.id.clone()))
            .map(|d| d.summary())
            .unwrap_or_else(|| "keep: not counted (other cluster in its manifest)".into());
        match &s.damaged {
            Some(what) => format!("DAMAGED: {what}; {reason}"),
            None => reason,
        }
    };
    let mut out = std::io::stdout().lock();
    if json {
        let v: Vec<_> = sets
            .iter()
            .zip(&verdicts)
            .map(|(s, sig)| {
                let d = reasons.get(&(s.cluster.clone(), s.manifest.id.clone()));
                let sig = sig.as_ref().map(|v| serde_json::json!({"state": v.state(), "fingerprint": v.fingerprint()}));
                let expired = s.manifest.restorable_until().map(|t| t <= now);
                serde_json::json!({"cluster": s.cluster, "manifest": s.manifest, "damaged": s.damaged, "retention": d, "signature": sig, "certificates_expired": expired})
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<20} {:<18} {:<20} {:<12} {:>10} {:>10} {:<16} {:<13} {:<19} {:<58} RETENTION",
        "CLUSTER", "ID", "CREATED", "VERSION", "REVISION", "SIZE", "NODE", "TRIGGER", "RESTORABLE", "SIGNED"
    )?;
    for (s, sig) in sets.iter().zip(&verdicts) {
        let m = &s.manifest;
        let version = m
            .openshift
            .as_ref()
            .and_then(|o| o.version.clone())
            .unwrap_or_else(|| format!("etcd-{}", m.etcd.version));
        writeln!(
            out,
            "{:<20} {:<18} {:<20} {:<12} {:>10} {:>10} {:<16} {:<13} {:<19} {:<58} {}",
            s.cluster,
            m.id,
            m.created,
            version,
            m.etcd.revision,
            human(m.total_stored_size()),
            m.node,
            // A set taken despite a guard says so where the trigger is.
            format!(
                "{}{}",
                serde_json::to_value(m.trigger)?.as_str().unwrap_or_default(),
                if m.forced.is_empty() { "" } else { "+forced" }
            ),
            crate::trust::certs::expiry(m, now).cell(),
            sig.as_ref()
                .map_or_else(|| "?".to_string(), crate::trust::signing::Verdict::cell),
            reason_of(s)
        )?;
    }
    if sets.is_empty() {
        errln!("no complete backup sets on target '{}'", t.name);
    }
    Ok(())
}
