//! The staging directory: whether a folder is ours (new, empty, or carrying the marker
//! file; anything else is refused, so a mistyped `staging_dir` never has someone else's
//! files cleaned up), and its layout:
//! - `tmp/`: sets being assembled, and sets being removed; leftovers go at the next run;
//! - `sets/<id>/`: complete, verified sets, waiting for or done with delivery
//!   ([`crate::delivery`]);
//! - `lock`: held by the one run or delivery pass working on `tmp/` and `sets/`;
//! - `state.json` and `state.lock`: the node's record of its runs ([`state`]).

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
