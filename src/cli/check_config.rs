//! `check-config`: every check `backup` makes before it touches the network, and with
//! `--connect` the targets and etcd.

use std::io::Write;

use anyhow::{Result, bail};

use super::human;
use crate::config::{self, Settings};
use crate::error::Stop;
use crate::targets;

/// Everything `backup` checks before it touches the network, without changing anything, so
/// that a configuration `check-config` accepts is not refused by the first backup. Every
/// problem found is named; the exit code is 2.
pub(super) fn offline_checks(settings: &Settings) -> Result<()> {
    let mut problems = Vec::new();
    let mut check = |r: Result<()>| {
        if let Err(e) = r {
            problems.push(crate::error::one_line(&e));
        }
    };
    check(crate::staging::check_staging(&settings.snapshot.staging_dir));
    check(crate::etcd::TlsMaterial::load(&settings.etcd).map(|_| ()));
    check(settings.seal().map(|_| ()));
    check(settings.resources_seal().map(|_| ()));
    // A key not created yet is created by the daemon's first start or the next backup.
    if let Some(sg) = settings.signing.as_ref().filter(|s| s.key_file.exists()) {
        check(crate::trust::signing::Signer::load(&sg.key_file).map(|_| ()));
    }
    check(crate::restore::Trust::of(settings).map(|_| ()));
    for t in &settings.targets {
        check(targets::open(t, None).map(|_| ()));
    }
    match settings.snapshot.method {
        config::SnapshotMethod::Native => {
            if let Some(dir) = &settings.snapshot.static_resources_dir
                && !dir.is_dir()
            {
                check(Err(anyhow::anyhow!(
                    "snapshot.static_resources_dir '{}' is not a directory (set it to \"\" on a cluster without static pods)",
                    dir.display()
                )));
            }
        }
        config::SnapshotMethod::Script => {
            let script = &settings.snapshot.script;
            let runnable = nix::unistd::access(script.as_path(), nix::unistd::AccessFlags::X_OK);
            if let Err(e) = runnable {
                check(Err(anyhow::anyhow!("snapshot.script '{}': {e}", script.display())));
            }
        }
    }
    match problems.len() {
        0 => Ok(()),
        _ => bail!(Stop::Usage(problems.join("; "))),
    }
}

/// What is not a configuration error but will fail backups until it changes: a `file://`
/// root that does not exist (an unmounted share, mounted later, is not a mistake in the file).
pub(super) fn warnings(settings: &Settings) -> Vec<String> {
    settings
        .targets
        .iter()
        .filter(|t| t.url.scheme() == "file")
        .filter_map(|t| {
            let root = t.url.to_file_path().ok()?;
            (!root.is_dir()).then(|| {
                format!(
                    "target '{}': its file:// root '{}' does not exist (an unmounted share?); backups to it fail until it does",
                    t.name,
                    root.display()
                )
            })
        })
        .collect()
}

pub(super) async fn check_config(settings: &Settings, connect: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "# etcd-backupd configuration, merged from:")?;
    for f in &settings.files {
        writeln!(out, "#   {}", f.display())?;
    }
    writeln!(out, "# secrets are read from the *_file paths below and never printed")?;
    // Loads back as it is (`check-config --config` on this output gives the same settings).
    writeln!(out, "{}", settings.to_toml()?)?;
    drop(out);
    offline_checks(settings)?;
    for w in warnings(settings) {
        errln!("warning: {w}");
    }
    // What is signed, and what readers require (as comments: the output stays TOML).
    match &settings.signing {
        Some(sg) if sg.key_file.exists() => {
            let k = crate::trust::signing::Signer::load(&sg.key_file)?;
            outln!(
                "# signing: every set this node stores is signed with key {} ('{}')",
                k.fingerprint(),
                sg.key_file.display()
            );
        }
        Some(sg) => outln!(
            "# signing: every set this node stores is signed; its key '{}' is created on the daemon's first start (or the next backup)",
            sg.key_file.display()
        ),
        None => outln!("# signing: off: the sets this node stores are not signed"),
    }
    match crate::restore::Trust::of(settings)?.allowed {
        Some(a) => outln!(
            "# verify: fetch, verify and drills take only sets signed by one of the {} key(s) '{}' lists for {}",
            a.usable_keys(),
            a.path.display(),
            crate::trust::signing::PRINCIPAL
        ),
        None => outln!("# verify: verify.allowed_signers is not set: signatures are shown, not required"),
    }
    if !connect {
        return Ok(());
    }
    // Every check runs and reports, so one failure does not hide the others.
    let mut failed = Vec::new();
    match crate::etcd::connect_first(&settings.etcd).await {
        Ok((member, status)) => outln!(
            "ok: etcd {} answers: member {}, cluster {}, etcd {}, DB {}",
            member.shown(),
            crate::etcd::hex_id(status.member_id),
            crate::etcd::hex_id(status.cluster_id),
            status.version,
            human(status.db_size)
        ),
        // A usage error (a loose key file) is the configuration's fault: exit 2 at once.
        Err(e) if e.downcast_ref::<Stop>().is_some_and(|s| matches!(s, Stop::Usage(_))) => return Err(e),
        Err(e) => {
            outln!("FAILED: etcd: {}", crate::error::one_line(&e));
            failed.push("etcd".to_string());
        }
    }
    for t in &settings.targets {
        // One attempt each, as the daemon probes at start: the first failure, not the retry
        // budget waited out.
        let checked = async {
            outln!("target '{}': {}", t.name, crate::probe::route(t)?);
            crate::probe::target(settings, t).await
        }
        .await;
        match checked {
            Ok(sets) => outln!("ok: target '{}' answers and holds {sets} complete set(s)", t.name),
            Err(e) => {
                let line = crate::error::one_line(&e);
                let prefix = format!("target '{}': ", t.name);
                outln!("FAILED: {prefix}{}", line.strip_prefix(&prefix).unwrap_or(&line));
                failed.push(format!("target '{}'", t.name));
            }
        }
    }
    if !failed.is_empty() {
        bail!("check-config --connect: {} failed", failed.join(", "));
    }
    Ok(())
}

/// `check-config --json`: the merged settings, the warnings, the offline checks' verdict and
/// with `connect` what etcd and each target answered; `ok` only when nothing failed.
pub(super) async fn check_config_json(settings: &Settings, connect: bool) -> Result<()> {
    let mut v = serde_json::json!({
        "files": settings.files,
        "settings": settings,
        "warnings": warnings(settings),
    });
    if let Err(e) = offline_checks(settings) {
        v["error"] = crate::error::one_line(&e).into();
        super::report::print(v, false)?;
        return Err(e);
    }
    if !connect {
        return super::report::print(v, true);
    }
    let etcd = crate::probe::etcd(settings).await;
    let mut failed: Vec<String> = etcd.iter().map(|_| "etcd".to_string()).collect();
    let mut targets = Vec::new();
    for t in &settings.targets {
        match crate::probe::target(settings, t).await {
            Ok(sets) => targets.push(serde_json::json!({"name": t.name, "ok": true, "sets": sets})),
            Err(e) => {
                failed.push(format!("target '{}'", t.name));
                targets.push(serde_json::json!({"name": t.name, "ok": false, "error": crate::error::one_line(&e)}));
            }
        }
    }
    v["connect"] = serde_json::json!({"etcd": {"ok": etcd.is_none(), "error": etcd}, "targets": targets});
    super::report::print(v, failed.is_empty())?;
    if !failed.is_empty() {
        bail!("check-config --connect: {} failed", failed.join(", "));
    }
    Ok(())
}
