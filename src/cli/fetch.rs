//! `fetch` and `verify`: a set from a target, checked before anything is laid out.

use std::io::Write;

use anyhow::{Result, bail};

use super::human;
use crate::config::Settings;
use crate::manifest::FileKind;

/// What `fetch` is told to accept despite its checks.
#[derive(Debug, Clone, Copy)]
pub(super) struct Allow {
    pub(super) version_mismatch: bool,
    pub(super) unsigned: bool,
    pub(super) expired_certificates: bool,
    pub(super) unrestorable_archive: bool,
}

/// What `fetch` was asked for.
pub(super) struct Request<'a> {
    pub(super) id: &'a str,
    /// `--at`: the set is rolled forward along the journal to this moment.
    pub(super) at: Option<&'a crate::restore::at::AtPlan>,
    pub(super) dir: &'a std::path::Path,
    pub(super) allow: Allow,
    /// `--force`: a non-empty DIR has its restore candidates removed first.
    pub(super) force: bool,
    pub(super) target: Option<&'a str>,
    pub(super) identity: Vec<String>,
    pub(super) json: bool,
}

pub(super) async fn fetch(settings: &Settings, req: Request<'_>) -> Result<()> {
    let Request {
        id,
        at,
        dir,
        allow,
        force,
        target,
        identity,
        json,
    } = req;
    use crate::restore;
    let mut located = restore::locate(settings, target, id).await?;
    located.identity = identity;
    located.trust.allow_unsigned = allow.unsigned;
    located.allow_unrestorable = allow.unrestorable_archive;
    // Before anything of the set is believed or written: its signature, then its certificates.
    let signature = restore::check_signature(&located).await?;
    let m = &located.manifest;
    let now = chrono::Utc::now();
    let expiry = crate::trust::certs::expiry(m, now);
    if let Some(why) = expiry.refusal() {
        if !allow.expired_certificates {
            bail!("refusing set {}: {why}", m.id);
        }
        tracing::warn!("set {}: {why}; fetching anyway (--allow-expired-certificates)", m.id);
    }
    if let Some(w) = expiry.warning(now) {
        tracing::warn!("set {}: {w}", m.id);
    }
    let set_version = m.openshift.as_ref().and_then(|o| o.version.clone());
    let version_rule = version_rule(settings, m, set_version.as_deref(), allow.version_mismatch).await?;
    let (files, replaced, reached) = lay_out(settings, &located, at, dir, force).await?;
    for p in &replaced {
        errln!("replaced {} (--force)", p.display());
    }
    if json {
        let mut v = fetched_json(
            &located,
            &files,
            dir,
            set_version.as_deref(),
            version_rule.as_deref(),
            &signature,
        );
        if let Some(r) = &reached {
            v["at"] = serde_json::to_value(r)?;
        }
        return super::report::print(v, true);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "fetched set {} of cluster {} (taken {} on {}, {}) from target '{}'",
        m.id,
        located.cluster,
        m.created,
        m.node,
        set_version
            .as_deref()
            .map(|v| format!("OpenShift {v}"))
            .unwrap_or_else(|| format!("etcd {}", m.etcd.version)),
        located.target.name()
    )?;
    if let Some(rule) = &version_rule {
        writeln!(out, "  version check: {rule}")?;
    }
    if let Some(r) = &reached {
        writeln!(out, "  {}", rolled_line(r))?;
    }
    writeln!(out, "  signature: {}", signature.describe())?;
    if let Some(line) = expiry.line() {
        writeln!(out, "  certificates: {line}")?;
    }
    for (c, path) in &files {
        writeln!(
            out,
            "  {}  {}  sha256 {}{}",
            path.display(),
            human(c.size),
            c.sha256,
            c.also.as_ref().map(|a| format!("; {a}")).unwrap_or_default()
        )?;
    }
    writeln!(out, "  restores: {}", restores(m, reached.as_ref()))?;
    writeln!(out, "next: {}", next_step(m, &files, dir))?;
    Ok(())
}

/// The set's files laid out in `dir` (rolled forward to `at`'s moment when given), the
/// files `--force` replaced, and what the roll-forward reached. On failure nothing of the set
/// stays in `dir` (nor `dir`, when this made it).
async fn lay_out(
    settings: &Settings,
    located: &crate::restore::Located,
    at: Option<&crate::restore::at::AtPlan>,
    dir: &std::path::Path,
    force: bool,
) -> Result<(Files, Vec<std::path::PathBuf>, Option<crate::restore::at::Reached>)> {
    use crate::restore;
    let created = !dir.exists();
    let replaced = restore::prepare_fetch_dir(dir, force)?;
    let mut files = match restore::download(located, dir, &replaced).await {
        Ok(files) => files,
        Err(e) => {
            // download left no file; a directory this command made goes too.
            if created {
                let _ = std::fs::remove_dir(dir);
            }
            return Err(e);
        }
    };
    let Some(at) = at else {
        return Ok((files, replaced, None));
    };
    match restore::at::roll_forward(settings, located, at, dir, &mut files).await {
        Ok(r) => Ok((files, replaced, Some(r))),
        Err(e) => {
            // The set alone is not the moment asked for: nothing stays that looks restorable.
            for (_, p) in &files {
                let _ = std::fs::remove_file(p);
            }
            if created {
                let _ = std::fs::remove_dir(dir);
            }
            Err(e)
        }
    }
}

type Files = Vec<(crate::restore::CheckedFile, std::path::PathBuf)>;

/// What the restore brings back: etcd's version and revision (the moment's, once rolled
/// forward), and the static pod revisions the manifest recorded.
fn restores(m: &crate::manifest::Manifest, reached: Option<&crate::restore::at::Reached>) -> String {
    let revisions: Vec<String> = m
        .restore
        .static_pod_revisions
        .iter()
        .map(|(c, n)| format!("{c}-pod-{n}"))
        .collect();
    format!(
        "etcd {}{} at revision {}{}",
        m.etcd.version,
        m.etcd
            .storage_version
            .as_deref()
            .map(|v| format!(" (storage version {v})"))
            .unwrap_or_default(),
        reached.map(|r| r.revision).unwrap_or(m.etcd.revision),
        if revisions.is_empty() {
            String::new()
        } else {
            format!("; static pods {}", revisions.join(", "))
        }
    )
}

/// The z-stream rule between the set and the running cluster: the rule that passed, `None`
/// when nothing can be checked, a refusal (exit 1) unless `allow_mismatch`.
async fn version_rule(
    settings: &Settings,
    m: &crate::manifest::Manifest,
    set_version: Option<&str>,
    allow_mismatch: bool,
) -> Result<Option<String>> {
    match crate::restore::version_facts(settings).await {
        Ok(facts) => match crate::restore::check_versions(set_version, &facts.unwrap_or_default()) {
            Ok(rule) => Ok(rule),
            // A refusal of the set (not of the command line): exit 1, as for a damaged,
            // unsigned or expired set.
            Err(why) if !allow_mismatch => bail!(
                "refusing set {}: {why} (--allow-version-mismatch to fetch it anyway)",
                m.id
            ),
            Err(why) => {
                tracing::warn!("{why}; fetching anyway (--allow-version-mismatch)");
                Ok(None)
            }
        },
        Err(e) => {
            if let Some(v) = set_version {
                tracing::warn!(
                    "cannot read the running cluster's version ({}); restore this set only onto OpenShift {v}",
                    crate::error::one_line(&e)
                );
            }
            Ok(None)
        }
    }
}

/// `fetch --json`: what was laid out where, what was checked, and what to do next.
fn fetched_json(
    located: &crate::restore::Located,
    files: &[(crate::restore::CheckedFile, std::path::PathBuf)],
    dir: &std::path::Path,
    set_version: Option<&str>,
    version_rule: Option<&str>,
    signature: &crate::trust::signing::Verdict,
) -> serde_json::Value {
    let m = &located.manifest;
    let laid_out: Vec<serde_json::Value> = files
        .iter()
        .map(|(c, path)| serde_json::json!({"path": path, "name": c.name, "size": c.size, "sha256": c.sha256, "checked": c.also}))
        .collect();
    serde_json::json!({
        "id": m.id,
        "cluster": located.cluster,
        "target": located.target.name(),
        "dir": dir,
        "files": laid_out,
        "openshift_version": set_version,
        "version_check": version_rule,
        "signature": {"state": signature.state(), "fingerprint": signature.fingerprint()},
        "etcd": m.etcd,
        "static_pod_revisions": m.restore.static_pod_revisions,
        "restorable_until": m.restore.restorable_until,
        "next": next_step(m, files, dir),
    })
}

/// What to do with the files: the platform's restore script when the set has its archive,
/// else etcd's own restore, with the tool of the set's etcd version.
fn next_step(
    m: &crate::manifest::Manifest,
    files: &[(crate::restore::CheckedFile, std::path::PathBuf)],
    dir: &std::path::Path,
) -> String {
    if files.iter().any(|(c, _)| c.kind() == Some(FileKind::Resources)) {
        return format!(
            "on the recovery control-plane host, as root, follow the platform's restore procedure:\n  sudo -E /usr/local/bin/cluster-restore.sh {}",
            dir.display()
        );
    }
    let snapshot = files
        .iter()
        .find(|(c, _)| c.kind() == Some(FileKind::Snapshot))
        .map(|(_, p)| p.display().to_string())
        .unwrap_or_default();
    format!(
        "restore the snapshot into a new data directory for each member, with etcd {}'s tools, e.g.\n  {}",
        m.etcd.version,
        crate::restore::restore_command(&m.etcd.version, &snapshot)
    )
}

/// What `verify` is asked.
pub(super) struct VerifyRequest<'a> {
    /// A set id or `latest`; `None` with `at`.
    pub(super) id: Option<&'a str>,
    pub(super) deep: bool,
    /// `--at`: the drill rolls the set forward to this moment first (implies a deep verify).
    pub(super) at: Option<&'a str>,
    pub(super) allow_unsigned: bool,
    pub(super) target: Option<&'a str>,
    pub(super) json: bool,
    pub(super) identity: Vec<String>,
}

pub(super) async fn verify(settings: &Settings, req: VerifyRequest<'_>) -> Result<()> {
    match moment_of(req.at)? {
        Some(m) => {
            let once = async |at: &crate::restore::at::AtPlan| verify_once(settings, &req, Some(at)).await;
            crate::restore::at::from_a_set_before(settings, req.target, m, once).await
        }
        None => verify_once(settings, &req, None).await,
    }
}

async fn verify_once(
    settings: &Settings,
    req: &VerifyRequest<'_>,
    at: Option<&crate::restore::at::AtPlan>,
) -> Result<()> {
    use crate::restore;
    let id = match (at, req.id) {
        (Some(at), _) => at.plan.base.id.as_str(),
        (None, Some(id)) => id,
        (None, None) => unreachable!("clap requires an id or --at"),
    };
    let (target, json) = (req.target, req.json);
    let mut located = restore::locate(settings, target, id).await?;
    located.identity = req.identity.clone();
    located.trust.allow_unsigned = req.allow_unsigned;
    let signature = restore::check_signature(&located).await?;
    let checked = restore::verify(&located).await?;
    let drill = if req.deep || at.is_some() {
        let result = restore::drill(settings, &located, at).await;
        // A set found past the moment is no drill's result: an older set is tried.
        if result.as_ref().err().is_none_or(|e| !e.is::<restore::at::PastMoment>()) {
            crate::run::remember_drill(settings, &located.manifest.id, &result);
        }
        Some(result?)
    } else {
        None
    };
    let m = &located.manifest;
    if json {
        let sig = serde_json::json!({"state": signature.state(), "fingerprint": signature.fingerprint()});
        let v = serde_json::json!({"id": m.id, "cluster": located.cluster, "target": located.target.name(), "files": checked, "drill": drill, "signature": sig, "restorable_until": m.restore.restorable_until});
        return super::report::print(v, true);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "set {} of cluster {} on target '{}': OK",
        m.id,
        located.cluster,
        located.target.name()
    )?;
    for c in &checked {
        writeln!(
            out,
            "  {}  {}  sha256 matches manifest and SHA256SUMS{}",
            c.name,
            human(c.size),
            c.also.as_ref().map(|a| format!("; {a}")).unwrap_or_default()
        )?;
    }
    writeln!(out, "  signature: {}", signature.describe())?;
    if let Some(line) = crate::trust::certs::expiry(m, chrono::Utc::now()).line() {
        writeln!(out, "  certificates: {line}")?;
    }
    if let Some(d) = drill {
        writeln!(
            out,
            "  restore drill: etcd {} opened the restored snapshot in {:.1}s: revision {}, {} keys ({} under /kubernetes.io/, {} namespaces){}",
            d.etcd_version,
            d.seconds,
            d.revision,
            d.keys,
            d.kubernetes_keys,
            d.namespaces,
            d.cluster_version
                .as_ref()
                .map(|v| format!(", ClusterVersion {v}"))
                .unwrap_or_default()
        )?;
        if let Some(r) = &d.rolled_forward {
            writeln!(out, "  {}", rolled_line(r))?;
        }
    }
    Ok(())
}

/// What a roll-forward along the journal reached, in one line.
pub(super) fn rolled_line(r: &crate::restore::at::Reached) -> String {
    format!(
        "rolled forward to {}: revision {}{} ({} revisions from {} journal segments replayed on revision {} in {:.1} s)",
        r.moment,
        r.revision,
        r.stamped
            .map(|t| format!(", stamped {}", t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
            .unwrap_or_else(|| ", the set's own state".into()),
        r.revisions_replayed,
        r.segments,
        r.base_revision,
        r.seconds
    )
}

/// `fetch`, as asked on the command line.
pub(super) async fn run(settings: &Settings, args: &super::FetchArgs) -> Result<()> {
    let identity = super::read_identities(&args.identity)?;
    let allow = Allow {
        version_mismatch: args.allow_version_mismatch,
        unsigned: args.allow_unsigned,
        expired_certificates: args.allow_expired_certificates,
        unrestorable_archive: args.allow_unrestorable_archive,
    };
    let to = crate::restore::fetch_dir(args.to.as_deref())?;
    let once = async |at: Option<&crate::restore::at::AtPlan>| {
        let id = match (at, &args.id) {
            (Some(at), _) => at.plan.base.id.as_str(),
            (None, Some(id)) => id.as_str(),
            (None, None) => unreachable!("clap requires an id or --at"),
        };
        let req = Request {
            id,
            at,
            dir: &to,
            allow,
            force: args.force,
            target: args.target.as_deref(),
            identity: identity.clone(),
            json: args.json,
        };
        fetch(settings, req).await
    };
    match moment_of(args.at.as_deref())? {
        Some(m) => {
            let target = args.target.as_deref();
            crate::restore::at::from_a_set_before(settings, target, m, async |at| once(Some(at)).await).await
        }
        None => once(None).await,
    }
}

/// `--at`'s moment, a usage error (exit 2) when malformed.
pub(super) fn moment_of(at: Option<&str>) -> Result<Option<crate::journal::chain::Moment>> {
    at.map(|m| crate::journal::chain::Moment::parse(m).map_err(|e| crate::error::Stop::Usage(e).into()))
        .transpose()
}
