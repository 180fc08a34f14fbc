//! Laying a set out for the platform's restore script (`fetch`): where, under which names,
//! replacing what, and the command that restores it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use crate::error::Stop;
use crate::fsutil;
use crate::manifest::FileEntry;
use crate::manifest::FileKind;

use super::locate::{Located, check_signature, explain};
use super::verify::{CheckedFile, check_file, check_sums};

/// Where `fetch` puts a set by default: the directory the platform's documentation uses.
pub const DEFAULT_FETCH_DIR: &str = "/home/core/assets/backup";

/// What tells an OpenShift control-plane node: the platform's restore script, or its static
/// pod resources.
pub(super) const OPENSHIFT_NODE_MARKS: [&str; 2] = [
    "/usr/local/bin/cluster-restore.sh",
    "/etc/kubernetes/static-pod-resources",
];

/// `fetch`'s directory: `--to`, or [`DEFAULT_FETCH_DIR`] on an OpenShift control-plane node
/// only (elsewhere, an admin's machine or a drill host, creating `/home/core/...` surprises).
pub fn fetch_dir(to: Option<&Path>) -> Result<PathBuf> {
    if let Some(to) = to {
        return Ok(to.to_path_buf());
    }
    if OPENSHIFT_NODE_MARKS.iter().any(|p| Path::new(p).exists()) {
        return Ok(PathBuf::from(DEFAULT_FETCH_DIR));
    }
    bail!(Stop::Usage(format!(
        "--to DIR is required here: the default {DEFAULT_FETCH_DIR} is only used on an OpenShift control-plane node (none of {} exists)",
        OPENSHIFT_NODE_MARKS.join(", ")
    )))
}

/// The command that restores a set's snapshot into a data directory, for the etcd version
/// it came from: `etcdutl` from 3.5 (3.6 has no `etcdctl snapshot restore`), `etcdctl` with
/// API v3 before (3.4 has no `etcdutl`).
pub fn restore_command(etcd_version: &str, snapshot: &str) -> String {
    let (major, minor) = {
        let mut it = etcd_version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    };
    let args = format!(
        "snapshot restore {snapshot} --data-dir /var/lib/etcd-restored --name NAME --initial-cluster NAME=https://HOST:2380 --initial-advertise-peer-urls https://HOST:2380"
    );
    if (major, minor) >= (3, 5) {
        format!("etcdutl {args}")
    } else {
        format!("ETCDCTL_API=3 etcdctl {args}")
    }
}

/// Downloads and checks the set into `dir` under temporary names (0600), then, once all of
/// them passed, removes `replaced` (the set `fetch --force` replaces) and renames each file
/// to its original name. On failure nothing is left and `replaced` is untouched.
pub async fn download(located: &Located, dir: &Path, replaced: &[PathBuf]) -> Result<Vec<(CheckedFile, PathBuf)>> {
    check_signature(located).await?;
    check_sums(located).await.map_err(|e| explain(located, e))?;
    let mut temps: Vec<PathBuf> = Vec::new();
    let mut renamed: Vec<PathBuf> = Vec::new();
    let result = async {
        let mut checked = Vec::new();
        // The archive first: it is small, and an archive the restore cannot use refuses the
        // set before the snapshot is downloaded.
        let mut files: Vec<&FileEntry> = located.manifest.files.iter().collect();
        files.sort_by_key(|f| f.kind() == Some(FileKind::Snapshot));
        for f in files {
            let tmp = dir.join(format!(".{}.partial-{:08x}", f.name, rand::random::<u32>()));
            let std_file = fsutil::create_private_file(&tmp)?;
            temps.push(tmp.clone());
            let mut file = tokio::fs::File::from_std(std_file);
            crate::notify::status(&format!("fetching {}", f.stored_name));
            // Written and fsynced by the check itself.
            let c = check_file(located, f, Some(&mut file)).await?;
            checked.push((c, dir.join(&f.name)));
        }
        for p in replaced {
            std::fs::remove_file(p).with_context(|| format!("cannot remove '{}'", p.display()))?;
        }
        for (tmp, (_, dest)) in temps.iter().zip(&checked) {
            fsutil::rename_noreplace(tmp, dest).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    anyhow!("'{}' already exists", dest.display())
                } else {
                    anyhow!("cannot rename '{}' to '{}': {e}", tmp.display(), dest.display())
                }
            })?;
            renamed.push(dest.clone());
        }
        fsutil::fsync_dir(dir)?;
        Ok(checked)
    }
    .await;
    if result.is_err() {
        // Half a set under final names would look complete to the restore script.
        for p in temps.iter().chain(&renamed) {
            let _ = std::fs::remove_file(p);
        }
    }
    result.map_err(|e| explain(located, e))
}

/// Files `cluster-restore.sh` would pick up from `dir`.
pub(super) fn restore_candidates(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read '{}'", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if (name.starts_with("snapshot") && name.ends_with(".db"))
            || (name.starts_with("static_kuberesources") && name.ends_with(".tar.gz"))
        {
            found.push(e.path());
        }
    }
    Ok(found)
}

/// Makes `dir` ready to receive one set: created (0700) when missing; refused when not empty,
/// unless `force`. Returns the files the restore script would pick up, which `force` replaces:
/// [`download`] removes them only once the new set passed every check, so a refused fetch
/// leaves the set that was there.
pub fn prepare_fetch_dir(dir: &Path, force: bool) -> Result<Vec<PathBuf>> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_none() {
                return Ok(Vec::new());
            }
            if !force {
                bail!(Stop::Usage(format!(
                    "'{}' is not empty; the restore script picks the newest snapshot*.db and static_kuberesources*.tar.gz in it, so it must hold exactly one set: use an empty directory, or --force to replace those files",
                    dir.display()
                )));
            }
            restore_candidates(dir)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create '{}'", dir.display()))?;
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .with_context(|| format!("cannot set the mode of '{}'", dir.display()))?;
            Ok(Vec::new())
        }
        Err(e) => Err(anyhow!("cannot read '{}': {e}", dir.display())),
    }
}
