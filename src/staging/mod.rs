//! The staging directory: whether a folder is ours (new, empty, or carrying the marker
//! file; anything else is refused, so a mistyped `staging_dir` never has someone else's
//! files cleaned up), and its layout:
//! - `tmp/`: sets being assembled, and sets being removed; leftovers go at the next run;
//! - `sets/<id>/`: complete, verified sets, waiting for or done with delivery
//!   ([`crate::delivery`]);
//! - `lock`: held by the one run or delivery pass working on `tmp/` and `sets/`;
//! - `state.json` and `state.lock`: the node's record of its runs ([`state`]).

pub mod sets;
pub mod state;

use std::path::{Path, PathBuf};

/// Where sets are assembled (and removed from).
pub fn tmp_dir(staging: &Path) -> PathBuf {
    staging.join("tmp")
}

/// Where complete sets wait.
pub fn sets_dir(staging: &Path) -> PathBuf {
    staging.join("sets")
}

/// The lock one run or delivery pass at a time holds.
pub fn lock_file(staging: &Path) -> PathBuf {
    staging.join("lock")
}

use anyhow::{Context, Result, anyhow, bail};

use crate::error::Stop;
use crate::fsutil;

/// Staging, locked by the one run, import or delivery pass that works on `tmp/` and `sets/`
/// (a second one would clean files from under the first). The lock goes with it.
pub struct Locked {
    root: PathBuf,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Makes sure `staging` is ours, lays it out, and takes its lock: `None` when another run or
/// pass of this node holds it.
pub fn try_lock(staging: &Path) -> Result<Option<Locked>> {
    prepare_staging(staging)?;
    fsutil::create_private_dir(&tmp_dir(staging)).context("snapshot.staging_dir")?;
    fsutil::create_private_dir(&sets_dir(staging)).context("snapshot.staging_dir")?;
    Ok(fsutil::try_lock(&lock_file(staging))?.map(|lock| Locked {
        root: staging.to_path_buf(),
        _lock: lock,
    }))
}

impl Locked {
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Removes what an interrupted run of this node left in `tmp/` (half-assembled sets,
    /// sets half removed).
    pub fn clean_tmp(&self) {
        let Ok(entries) = std::fs::read_dir(tmp_dir(&self.root)) else {
            return;
        };
        for entry in entries.flatten() {
            tracing::info!(path = %entry.path().display(), "removing a leftover from an interrupted run");
            fsutil::remove_dir_quietly(&entry.path());
        }
    }

    /// Whether `sets/` holds a set named `id` already.
    pub fn holds(&self, id: &str) -> bool {
        sets_dir(&self.root).join(id).exists()
    }

    /// A new private folder in `tmp/` to assemble a set in, named after `label`.
    pub fn begin(&self, label: &str) -> Result<Work> {
        let dir = tmp_dir(&self.root).join(format!("{label}-{:08x}", rand::random::<u32>()));
        fsutil::create_private_dir(&dir)?;
        Ok(Work { dir, committed: false })
    }

    /// Commits the set assembled in `work` as `sets/<id>/`, owed to `owed`: the delivery
    /// record first (a set in `sets/` without one would count as delivered), everything
    /// flushed, one rename, then the rename flushed. The same sequence for every source
    /// (native, script, import). On failure the folder is removed.
    pub fn commit(&self, mut work: Work, id: &str, owed: &[String]) -> Result<PathBuf> {
        let sets = sets_dir(&self.root);
        let to = sets.join(id);
        sets::owe(work.dir(), owed)?;
        fsutil::fsync_dir(work.dir())?;
        fsutil::rename_noreplace(work.dir(), &to)
            .map_err(|e| anyhow!("cannot move the set into '{}': {e}", to.display()))?;
        work.committed = true;
        fsutil::fsync_dir(&sets)?;
        Ok(to)
    }
}

/// A set being assembled in `tmp/`: removed when dropped before [`Locked::commit`] took it
/// (any error on the way), so a failed run leaves nothing behind but what a kill leaves,
/// which the next run's [`Locked::clean_tmp`] removes.
pub struct Work {
    dir: PathBuf,
    /// Moved into `sets/`: no longer ours to remove.
    committed: bool,
}

impl Work {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        if !self.committed {
            fsutil::remove_dir_quietly(&self.dir);
        }
    }
}

/// Marks a directory as ours, so that a mistyped `staging_dir` (say `/var`) is refused
/// instead of having its contents cleaned and its mode changed.
const STAGING_MARKER: &str = ".etcd-backupd-staging";

/// Would `staging` be accepted as ours (new, empty, or marked), and could it be created or
/// written? Changes nothing: `check-config` asks the same question `backup` does.
pub fn check_staging(staging: &Path) -> Result<()> {
    let marker = staging.join(STAGING_MARKER);
    match std::fs::read_dir(staging) {
        Ok(mut entries) => {
            if !marker.exists() && entries.next().is_some() {
                bail!(Stop::Usage(format!(
                    "snapshot.staging_dir '{}' is not empty and has no {STAGING_MARKER} marker, so it does not look like etcd-backupd's staging directory; use a new or empty one",
                    staging.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow!("snapshot.staging_dir '{}': {e}", staging.display())),
    }
    // The nearest existing folder must take writes (the directory itself, or where it is made).
    let mut at = staging;
    while !at.exists() {
        at = at.parent().unwrap_or(Path::new("/"));
    }
    if !at.is_dir() {
        bail!(Stop::Usage(format!(
            "snapshot.staging_dir '{}': '{}' is not a directory",
            staging.display(),
            at.display()
        )));
    }
    nix::unistd::access(at, nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK).map_err(|e| {
        Stop::Usage(format!(
            "snapshot.staging_dir '{}': '{}': {e}",
            staging.display(),
            at.display()
        ))
    })?;
    Ok(())
}

/// Makes sure `staging` is ours (new, empty, or marked), then creates it.
pub fn prepare_staging(staging: &Path) -> Result<()> {
    check_staging(staging)?;
    let marker = staging.join(STAGING_MARKER);
    fsutil::create_private_dir(staging).context("snapshot.staging_dir")?;
    if !marker.exists() {
        fsutil::write_private_file(
            &marker,
            b"staging directory of etcd-backupd; its contents are managed\n",
        )
        .context("snapshot.staging_dir")?;
    }
    Ok(())
}
