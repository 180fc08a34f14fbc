//! `status`: this node's runs and the cluster's runner.

use std::io::Write;

use anyhow::Result;

use super::human;
use crate::config::Settings;
use crate::error::Stop;

/// `status`: this node's runs from its state file (works with the daemon stopped), the next
/// scheduled run, and, when etcd answers, the cluster's current runner and last run.
pub(super) async fn status(settings: &Settings, json: bool) -> Result<()> {
    let state = crate::staging::state::State::load(&settings.snapshot.staging_dir);
    let schedule = crate::daemon::schedule_of(settings).map_err(|e| Stop::Usage(e.to_string()))?;
    let next = schedule
        .as_ref()
        .and_then(|s| s.next_at(chrono::Utc::now()))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    let cluster = async {
        let (member, _) = crate::etcd::connect_first(&settings.etcd).await?;
        let mut e = crate::etcd::election::Election::of(member.client.clone(), settings);
        Ok::<_, anyhow::Error>((e.last().await?, e.runner().await?))
    };
    let (last, runner, etcd_error) = match tokio::time::timeout(
        settings.etcd.connect_timeout.0 + settings.etcd.request_timeout.0,
        cluster,
    )
    .await
    {
        Ok(Ok((last, runner))) => (last, runner, None),
        Ok(Err(e)) => (None, None, Some(crate::error::one_line(&e))),
        Err(_) => (None, None, Some("etcd did not answer in time".to_string())),
    };
    let staged = crate::delivery::scan(&settings.snapshot.staging_dir);
    let pending: Vec<_> = staged
        .iter()
        .filter(|s| !s.pending.is_empty())
        .map(|s| serde_json::json!({"id": s.id(), "targets": s.pending, "bytes": s.set.manifest.total_stored_size()}))
        .collect();
    let local: Vec<&str> = staged.iter().filter(|s| s.pending.is_empty()).map(|s| s.id()).collect();
    // Read only: the key is created by the daemon's start or the next backup.
    let signing = settings.signing.as_ref().map(|sg| match sg.key_file.exists() {
        true => crate::trust::signing::Signer::load(&sg.key_file).map(Some),
        false => Ok(None),
    });
    if json {
        let signing = match &signing {
            None => serde_json::Value::Null,
            Some(r) => {
                let key = settings.signing.as_ref().map(|s| s.key_file.display().to_string());
                match r {
                    Ok(Some(k)) => {
                        serde_json::json!({"key_file": key, "fingerprint": k.fingerprint(), "allowed_signers": k.allowed_signers_line(&settings.node_name)})
                    }
                    Ok(None) => serde_json::json!({"key_file": key, "error": "not created yet"}),
                    Err(e) => serde_json::json!({"key_file": key, "error": crate::error::one_line(e)}),
                }
            }
        };
        let v = serde_json::json!({
            "node": settings.node_name,
            "signing": signing,
            "newest_set": state.newest_set,
            "next_run": next,
            "pending": pending,
            "local_copies": local,
            "last_drill": state.last_drill,
            "import_refused": state.import_refused,
            "runs": state.runs,
            "cluster_last_run": last,
            "current_runner": runner,
            "etcd_error": etcd_error,
        });
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    outln!("node        {}", settings.node_name);
    if let (Some(sg), Some(r)) = (&settings.signing, &signing) {
        match r {
            Ok(Some(k)) => {
                outln!(
                    "signing     key {} in '{}'; its allowed_signers line:",
                    k.fingerprint(),
                    sg.key_file.display()
                );
                outln!("            {}", k.allowed_signers_line(&settings.node_name));
            }
            Ok(None) => outln!(
                "signing     key '{}' not created yet (the daemon's start or the next backup creates it)",
                sg.key_file.display()
            ),
            Err(e) => outln!("signing     UNUSABLE: {}", crate::error::one_line(e)),
        }
    }
    if let Some(n) = &state.newest_set {
        let until = n
            .restorable_until
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        match until {
            Some(t) => {
                let t = t.to_utc();
                let word = if t <= chrono::Utc::now() {
                    "certificates EXPIRED on"
                } else {
                    "restorable until"
                };
                outln!(
                    "newest set  {}: {word} {} ({})",
                    n.id,
                    crate::trust::certs::when(&t),
                    n.restorable_until_source.as_deref().unwrap_or("?")
                );
            }
            None => outln!("newest set  {}: no certificates recorded", n.id),
        }
    }
    for r in &state.import_refused {
        outln!("import      REFUSED '{}' (since {}): {}", r.path, r.at, r.reason);
    }
    outln!(
        "schedule    {}; next run {}",
        schedule
            .as_ref()
            .map(|s| s.describe())
            .unwrap_or_else(|| "none (schedule.cron is empty)".into()),
        next.as_deref().unwrap_or("none")
    );
    match &runner {
        Some(r) => outln!("running     {r}"),
        None if etcd_error.is_none() => outln!("running     nothing"),
        None => {}
    }
    match &last {
        Some(r) => outln!(
            "cluster     last run {} by {}: {}{}",
            r.run,
            r.node,
            r.result,
            r.id.as_ref().map(|i| format!(", set {i}")).unwrap_or_default()
        ),
        None if etcd_error.is_none() => outln!("cluster     no run recorded yet"),
        None => {}
    }
    if let Some(e) = &etcd_error {
        outln!("cluster     unknown: {e}");
    }
    if let Some(r) = &state.running {
        outln!("this node   running {r}");
    }
    if pending.is_empty() {
        outln!("pending     none");
    }
    for s in staged.iter().filter(|s| !s.pending.is_empty()) {
        outln!(
            "pending     {} ({}) for {}",
            s.id(),
            human(s.set.manifest.total_stored_size()),
            s.pending.join(", ")
        );
    }
    if !local.is_empty() {
        outln!("local copy  {}", local.join(", "));
    }
    if let Some(d) = &state.last_drill {
        outln!(
            "drill       {} of {}: {}: {}",
            d.finished,
            d.id,
            if d.ok { "ok" } else { "FAILED" },
            d.summary
        );
    }
    if state.runs.is_empty() {
        outln!("this node   no run yet");
    }
    for r in state.runs.iter().take(5) {
        let size = r.bytes.map(|b| format!(", {}", human(b))).unwrap_or_default();
        let why = r.reason.as_ref().map(|x| format!(": {x}")).unwrap_or_default();
        outln!(
            "this node   {} {} {}{}{} ({:.1} s){}",
            r.started,
            r.trigger,
            r.result,
            r.id.as_ref().map(|i| format!(" {i}")).unwrap_or_default(),
            size,
            r.duration_s,
            why
        );
    }
    Ok(())
}
