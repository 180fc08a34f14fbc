//! `[import] dirs`: ship the platform's own local backups off the node. Up to 4.14, before a
//! minor upgrade OpenShift wrote a set with `cluster-backup.sh --force` on one control-plane
//! node, under `/etc/kubernetes/cluster-backup/upgrade-backup-<version>-<ts>/` (4.15 removed
//! that controller), and an admin's own `cluster-backup.sh` runs leave sets on the host too;
//! nothing copies them off. Each directory named here, and each directory directly inside it, holding
//! exactly one `snapshot_<ts>.db` (and at most one `static_kuberesources_<ts>.tar.gz` with
//! the same timestamp) is a set: its files are copied into staging (the originals stay),
//! verified (etcd's trailer, the archive readable), and delivered like a set of ours, with
//! trigger `imported`, their original names, and the timestamp as id. Each is imported once:
//! its path and size are remembered in `state.json`. A folder that cannot be imported (fails
//! verification, an archive the restore cannot use, names that are not a set) is reported
//! once while it stays as it is, and its report goes when it changes or goes away. They are sealed (zstd, age) as configured, through
//! the same step as every other set.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use chrono::Utc;

use crate::config::Settings;
use crate::manifest::{self, EtcdInfo, Manifest, OpenShiftInfo, ToolInfo, Trigger};
use crate::run::context::RunContext;
use crate::source::platform_set;
use crate::staging::state::{RefusedImport, State};
use crate::{delivery, fsutil};

/// A set whose files fail verification: remembered, so it is not tried again.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Unusable(String);

/// A platform set found on disk.
#[derive(Debug, Clone)]
pub struct Found {
    pub dir: PathBuf,
    /// The set's id: the files' timestamp without `__POSSIBLY_DIRTY__`.
    pub ts: String,
    /// Snapshot first, with their own names (dirty ones included).
    pub files: Vec<String>,
    /// The names end in `__POSSIBLY_DIRTY__` (`cluster-backup.sh --force`, as the platform's
    /// upgrade backups up to 4.14 were taken).
    pub dirty: bool,
    /// The OpenShift version the folder's name gives (`upgrade-backup-<version>-<ts>`).
    pub openshift_version: Option<String>,
    /// What identifies it in `state.imported` (the snapshot's path and size, as earlier
    /// releases recorded it).
    pub key: String,
    /// What identifies the folder's state in `state.import_refused`: every file's name, size
    /// and time, so a replaced archive is looked at again.
    pub refusal_key: String,
}

/// What a directory holds: nothing to import, a set, or something that cannot be one.
enum Scanned {
    Found(Found),
    Refused { key: String, reason: String },
}

/// What identifies a folder's present state: its path and each file's name, size and
/// modification time. A refusal stands while this stays the same.
fn folder_key(dir: &Path) -> String {
    use sha2::Digest;
    let mut entries: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let m = e.metadata().ok();
            let mtime = m
                .as_ref()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            format!(
                "{}:{}:{}",
                e.file_name().to_string_lossy(),
                m.map(|m| m.len()).unwrap_or(0),
                mtime.map(|d| d.as_nanos()).unwrap_or(0)
            )
        })
        .collect();
    entries.sort();
    let digest = sha2::Sha256::digest(entries.join("\n").as_bytes());
    format!("{}#{}", dir.display(), &hex::encode(digest)[..16])
}

fn set_in(dir: &Path) -> Option<Scanned> {
    // A configured directory that does not exist (4.15+ writes no upgrade backups) holds
    // nothing to import; it is not a refusal.
    if !dir.exists() {
        return None;
    }
    let set = match platform_set::read(dir) {
        Ok(Some(set)) => set,
        Ok(None) => return None,
        Err(e) => {
            return Some(Scanned::Refused {
                key: folder_key(dir),
                reason: crate::error::one_line(&e),
            });
        }
    };
    let snapshot = dir.join(&set.files[0]);
    let size = std::fs::metadata(&snapshot).ok()?.len();
    let folder = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Some(Scanned::Found(Found {
        key: format!("{}:{size}", snapshot.display()),
        refusal_key: folder_key(dir),
        dir: dir.to_path_buf(),
        ts: set.id,
        files: set.files,
        dirty: set.dirty,
        openshift_version: platform_set::upgrade_folder_version(&folder),
    }))
}

/// The platform sets under the configured directories that were not imported yet. Folders
/// that cannot be imported and were not reported yet are recorded (and logged) once here.
pub fn scan(settings: &Settings) -> Vec<Found> {
    let state = State::load(&settings.snapshot.staging_dir);
    let (done, refused) = (state.imported, state.import_refused);
    let mut found = Vec::new();
    // The key of every folder looked at now.
    let mut seen: Vec<String> = Vec::new();
    for root in &settings.import.dirs {
        let mut dirs = vec![root.clone()];
        if let Ok(entries) = std::fs::read_dir(root) {
            let mut subs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
            subs.sort();
            dirs.extend(subs);
        }
        for dir in dirs {
            match set_in(&dir) {
                None => {}
                Some(Scanned::Found(f)) => {
                    seen.push(f.refusal_key.clone());
                    found.push(f);
                }
                Some(Scanned::Refused { key, reason }) => {
                    if !refused.iter().any(|r| r.key == key) {
                        refuse(settings, &dir, &key, &reason);
                    }
                    seen.push(key);
                }
            }
        }
    }
    // A refusal is reported while its folder stays as it was: one that changed (another
    // key) or went away is forgotten, so status and the gauge clear.
    let stale: Vec<&RefusedImport> = refused.iter().filter(|r| !seen.contains(&r.key)).collect();
    if !stale.is_empty() {
        for r in &stale {
            tracing::info!(path = %r.path, "the import folder refused earlier changed or is gone; its report is cleared");
        }
        let keys: Vec<String> = stale.iter().map(|r| r.key.clone()).collect();
        State::update_or_log(&settings.snapshot.staging_dir, |s| {
            s.import_refused.retain(|r| !keys.contains(&r.key))
        });
    }
    found.retain(|f| !done.contains(&f.key) && !refused.iter().any(|r| r.key == f.refusal_key));
    found
}

/// Reports a folder that cannot be imported, once: the log line, `status` and the gauge
/// `etcd_backupd_import_refused_sets` read the record.
fn refuse(settings: &Settings, dir: &Path, key: &str, reason: &str) {
    tracing::error!(
        path = %dir.display(),
        error = %reason,
        "cannot import the platform backup folder '{}': {reason}; it is not tried again until it changes",
        dir.display()
    );
    let record = RefusedImport {
        path: dir.display().to_string(),
        key: key.to_string(),
        reason: reason.to_string(),
        at: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    State::update_or_log(&settings.snapshot.staging_dir, |state| {
        // A changed folder (another key for the same path) replaces its old record.
        state.import_refused.retain(|r| r.path != record.path);
        state.import_refused.push(record.clone());
    });
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
async fn stage(
    settings: &Settings,
    staging: &crate::staging::Locked,
    ctx: &RunContext,
    found: &Found,
    etcd: EtcdInfo,
) -> Result<()> {
    // Checked by `platform_set::read`: `%F_%H%M%S`.
    let id = found.ts.clone();
    // Reported once, as a refusal: it would not change by polling again.
    if staging.holds(&id) {
        bail!(Unusable(format!("a set with id {id} is already in staging")));
    }
    let work = staging.begin(&format!("import-{id}"))?;
    let work_dir = work.dir().to_path_buf();
    let m = {
        let work = work_dir.as_path();
        let mut files = Vec::new();
        for name in &found.files {
            let (from, to) = (found.dir.join(name), work.join(name));
            let (name, checked) = (name.clone(), name.clone());
            let is_snapshot = crate::manifest::FileKind::of(&name) == Some(crate::manifest::FileKind::Snapshot);
            let entry = tokio::task::spawn_blocking(move || -> Result<_> {
                let (size, sha) = fsutil::copy_private(&from, &to, None)?;
                let verified = if is_snapshot {
                    crate::source::snapshot::verify_file(&to).map(|_| ())
                } else {
                    // What a restore needs of the archive, not only a readable tar.gz.
                    crate::source::static_resources::check_archive_file(&to)
                        .and_then(|r| Ok(r.require(&checked)?))
                        .map(|_| ())
                        .with_context(|| format!("'{}'", from.display()))
                };
                verified.map_err(|e| anyhow::Error::new(Unusable(crate::error::one_line(&e))))?;
                Ok((size, sha))
            })
            .await??;
            files.push(crate::run::pipeline::plain_entry(name, entry.0, entry.1));
        }
        // Read from the platform's archive, before it is sealed.
        let restore = {
            let (dir, plain) = (work.to_path_buf(), files.clone());
            tokio::task::spawn_blocking(move || crate::trust::certs::facts_of_set(&dir, &plain)).await?
        };
        // Compressed and encrypted as our own sets are: an imported set holds every Secret.
        let chosen: Vec<String> = settings.targets.iter().map(|t| t.name.clone()).collect();
        let mut files = crate::run::pipeline::seal_files(ctx, work, files).await?;
        crate::run::pipeline::record_custody(settings, &chosen, &mut files);
        let created = chrono::NaiveDateTime::parse_from_str(&id, manifest::TS_FORMAT)
            .map(|t| t.and_utc())
            .unwrap_or_else(|_| Utc::now());
        let m = Manifest {
            format_version: manifest::format_version_of(Trigger::Imported, &files),
            id: id.clone(),
            created: created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            cluster_name: ctx.cluster.clone(),
            trigger: Trigger::Imported,
            run: None,
            node: settings.node_name.clone(),
            etcd,
            // The platform's set does not say which release it was taken on; an upgrade
            // backup's folder name does, and `fetch` applies the z-stream rule to it.
            openshift: found.openshift_version.clone().map(|v| OpenShiftInfo {
                version: Some(v),
                cluster_id: None,
            }),
            files,
            tool: ToolInfo::this(),
            forced: if found.dirty {
                vec!["imported __POSSIBLY_DIRTY__ files: cluster-backup.sh --force skipped its pre-checks".into()]
            } else {
                Vec::new()
            },
            restore,
            derived: None,
        };
        // Signed as our own sets are ([signing]).
        crate::trust::signing::write_set_files(ctx.signer.as_ref(), work, &m)?;
        m
    };
    let names: Vec<String> = settings.targets.iter().map(|t| t.name.clone()).collect();
    staging.commit(work, &id, &names)?;
    crate::staging::state::note_newest_set(staging.root(), &m);
    Ok(())
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
    let Some(staging) = crate::staging::try_lock(&settings.snapshot.staging_dir)? else {
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
        match stage(settings, &staging, &ctx, f, etcd.clone()).await {
            Ok(()) => {
                tracing::info!(path = %f.dir.display(), backup_id = %f.ts, "imported a platform backup set; delivering it");
                staged += 1;
            }
            Err(e) if e.downcast_ref::<Unusable>().is_some() => {
                let reason = format!("it fails verification: {}", crate::error::one_line(&e));
                refuse(settings, &f.dir, &f.refusal_key, &reason);
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
    drop(staging);
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
