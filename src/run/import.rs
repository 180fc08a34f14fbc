//! `[import] dirs`: ship the platform's own local backups off the node. Before a minor
//! upgrade OpenShift writes a set with `cluster-backup.sh` on one control-plane node, under
//! `/etc/kubernetes/cluster-backup/` (e.g. `upgrade-backup-<ts>/`), and nothing copies it off
//! the host. Each directory named here, and each directory directly inside it, holding
//! exactly one `snapshot_<ts>.db` (and at most one `static_kuberesources_<ts>.tar.gz` with
//! the same timestamp) is a set: its files are copied into staging (the originals stay),
//! verified (etcd's trailer, the archive readable), and delivered like a set of ours, with
//! trigger `imported`, their original names, and the timestamp as id. Each is imported once:
//! its path and size are remembered in `state.json`, as are sets that fail verification
//! (logged once, not retried every poll). They are sealed (zstd, age) as configured, through
//! the same step as every other set.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use chrono::Utc;

use crate::config::Settings;
use crate::manifest::{self, EtcdInfo, Manifest, ToolInfo, Trigger};
use crate::run::context::RunContext;
use crate::staging::state::State;
use crate::{delivery, fsutil};

/// A set whose files fail verification: remembered, so it is not tried again.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Unusable(String);

/// A platform set found on disk.
#[derive(Debug, Clone)]
pub struct Found {
    pub dir: PathBuf,
    pub ts: String,
    /// Snapshot first.
    pub files: Vec<String>,
    /// What identifies it in `state.imported`.
    pub key: String,
}

fn set_in(dir: &Path) -> Option<Found> {
    let mut snapshots = Vec::new();
    let mut archives = Vec::new();
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(ts) = name.strip_prefix("snapshot_").and_then(|r| r.strip_suffix(".db")) {
            snapshots.push((ts.to_string(), name));
        } else if let Some(ts) = name
            .strip_prefix("static_kuberesources_")
            .and_then(|r| r.strip_suffix(".tar.gz"))
        {
            archives.push((ts.to_string(), name));
        }
    }
    let [(ts, snapshot)] = <[_; 1]>::try_from(snapshots).ok()?;
    let mut files = vec![snapshot.clone()];
    match archives.as_slice() {
        [] => {}
        [(a_ts, a)] if *a_ts == ts => files.push(a.clone()),
        _ => return None,
    }
    let size = std::fs::metadata(dir.join(&snapshot)).ok()?.len();
    Some(Found {
        key: format!("{}:{size}", dir.join(&snapshot).display()),
        dir: dir.to_path_buf(),
        ts,
        files,
    })
}

/// The platform sets under the configured directories that were not imported yet.
pub fn scan(settings: &Settings) -> Vec<Found> {
    let done = State::load(&settings.snapshot.staging_dir).imported;
    let mut found = Vec::new();
    for root in &settings.import.dirs {
        let mut dirs = vec![root.clone()];
        if let Ok(entries) = std::fs::read_dir(root) {
            let mut subs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
            subs.sort();
            dirs.extend(subs);
        }
        found.extend(dirs.iter().filter_map(|d| set_in(d)));
    }
    found.retain(|f| !done.contains(&f.key));
    found
}

fn remember(settings: &Settings, key: &str) {
    let staging = &settings.snapshot.staging_dir;
    State::update_or_log(staging, |state| {
        if !state.imported.iter().any(|k| k == key) {
            state.imported.push(key.to_string());
        }
    });
}

/// Copies and verifies one platform set into `sets/<ts>/`, owed to every target.
async fn stage(settings: &Settings, ctx: &RunContext, found: &Found, etcd: EtcdInfo) -> Result<()> {
    let staging = &settings.snapshot.staging_dir;
    let id = found.ts.clone();
    if chrono::NaiveDateTime::parse_from_str(&id, manifest::TS_FORMAT).is_err() {
        bail!("timestamp {id:?} is not %F_%H%M%S");
    }
    let sets_root = crate::staging::sets_dir(staging);
    if sets_root.join(&id).exists() {
        bail!("a set with id {id} is already in staging");
    }
    let work = crate::staging::tmp_dir(staging).join(format!("import-{id}-{:08x}", rand::random::<u32>()));
    fsutil::create_private_dir(&work)?;
    let result = async {
        let mut files = Vec::new();
        for name in &found.files {
            let (from, to) = (found.dir.join(name), work.join(name));
            let is_snapshot = name.starts_with("snapshot_");
            let entry = tokio::task::spawn_blocking(move || -> Result<_> {
                let (size, sha) = fsutil::copy_private(&from, &to, None)?;
                let verified = if is_snapshot {
                    crate::source::snapshot::verify_file(&to).map(|_| ())
                } else {
                    std::fs::File::open(&to)
                        .map_err(anyhow::Error::from)
                        .and_then(|f| {
                            crate::source::static_resources::check_archive(std::io::BufReader::new(f)).map(|_| ())
                        })
                        .with_context(|| format!("'{}'", from.display()))
                };
                verified.map_err(|e| anyhow::Error::new(Unusable(crate::error::one_line(&e))))?;
                Ok((size, sha))
            })
            .await??;
            files.push(crate::run::pipeline::plain_entry(name.clone(), entry.0, entry.1));
        }
        // Read from the platform's archive, before it is sealed.
        let restore = {
            let (dir, plain) = (work.clone(), files.clone());
            tokio::task::spawn_blocking(move || crate::trust::certs::facts_of_set(&dir, &plain)).await?
        };
        // Compressed and encrypted as our own sets are: an imported set holds every Secret.
        let files = crate::run::pipeline::seal_files(&ctx.seal, &work, files).await?;
        let created = chrono::NaiveDateTime::parse_from_str(&id, manifest::TS_FORMAT)
            .map(|t| t.and_utc())
            .unwrap_or_else(|_| Utc::now());
        let m = Manifest {
            format_version: manifest::FORMAT_VERSION,
            id: id.clone(),
            created: created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            cluster_name: ctx.cluster.clone(),
            trigger: Trigger::Imported,
            run: None,
            node: settings.node_name.clone(),
            etcd,
            // The platform's set does not say which release it was taken on.
            openshift: None,
            files,
            tool: ToolInfo::this(),
            forced: Vec::new(),
            restore,
        };
        // Signed as our own sets are ([signing]).
        crate::trust::signing::write_set_files(ctx.signer.as_ref(), &work, &m)?;
        let names: Vec<String> = settings.targets.iter().map(|t| t.name.clone()).collect();
        delivery::mark(&work, &names)?;
        fsutil::fsync_dir(&work)?;
        fsutil::rename_noreplace(&work, &sets_root.join(&id))
            .with_context(|| format!("cannot move the set into '{}'", sets_root.join(&id).display()))?;
        crate::staging::state::note_newest_set(staging, &m);
        Ok(())
    }
    .await;
    if result.is_err() {
        fsutil::remove_dir_quietly(&work);
    }
    result
}

/// Imports every new platform set, then runs a delivery pass. Returns how many were staged.
/// The delivery of what was imported yields at `deliver_by` (the daemon: just before its next
/// run); what is left is delivered later.
pub async fn run(
    settings: &Settings,
    cluster: &str,
    abort: &tokio_util::sync::CancellationToken,
    deliver_by: Option<tokio::time::Instant>,
) -> Result<usize> {
    let found = scan(settings);
    if found.is_empty() {
        return Ok(0);
    }
    let staging = &settings.snapshot.staging_dir;
    crate::staging::prepare_staging(staging)?;
    fsutil::create_private_dir(&crate::staging::tmp_dir(staging))?;
    fsutil::create_private_dir(&crate::staging::sets_dir(staging))?;
    let Some(lock) = fsutil::try_lock(&crate::staging::lock_file(staging))? else {
        return Ok(0); // a backup runs; the next poll imports
    };
    // The member's identity for the manifest, when etcd answers; the revision is unknown.
    let etcd = match tokio::time::timeout(
        settings.etcd.connect_timeout.0 + settings.etcd.request_timeout.0,
        crate::etcd::connect_first(&settings.etcd),
    )
    .await
    {
        Ok(Ok((member, status))) => EtcdInfo {
            endpoint: member.shown().to_string(),
            member_id: crate::etcd::hex_id(status.member_id),
            cluster_id: crate::etcd::hex_id(status.cluster_id),
            version: status.version.clone(),
            storage_version: status.storage_version.clone(),
            revision: 0,
            db_size: status.db_size,
        },
        _ => EtcdInfo {
            endpoint: "unknown".into(),
            member_id: "unknown".into(),
            cluster_id: "unknown".into(),
            version: "unknown".into(),
            storage_version: None,
            revision: 0,
            db_size: 0,
        },
    };
    // Once per pass: every set of it sealed to the same recipients and signed by one key.
    let ctx = RunContext::for_cluster(settings, cluster.to_string())?;
    let mut staged = 0;
    for f in &found {
        match stage(settings, &ctx, f, etcd.clone()).await {
            Ok(()) => {
                tracing::info!(path = %f.dir.display(), backup_id = %f.ts, "imported a platform backup set; delivering it");
                staged += 1;
            }
            Err(e) if e.downcast_ref::<Unusable>().is_some() => {
                tracing::error!(
                    path = %f.dir.display(), error = %crate::error::one_line(&e),
                    "cannot import a platform backup set: it fails verification; it is not tried again"
                );
                remember(settings, &f.key);
                continue;
            }
            // Disk full, an id already staged...: tried again at the next poll.
            Err(e) => {
                tracing::error!(path = %f.dir.display(), error = %crate::error::one_line(&e), "cannot import a platform backup set now");
                continue;
            }
        }
        remember(settings, &f.key);
    }
    drop(lock);
    if staged > 0 {
        let retried = delivery::retry(settings, abort, deliver_by).await?;
        tracing::info!(
            delivered = retried.delivered,
            pending = retried.pending,
            "imported sets delivered"
        );
    }
    Ok(staged)
}
