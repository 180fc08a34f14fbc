//! Where backup sets are stored. Each kind implements [`Target`]; [`open`] picks the kind by
//! URL scheme. Every implementation stores a set atomically: under a temporary name first,
//! `manifest.json` last, then moved into place without replacing anything.

pub mod file;

use std::path::PathBuf;

use anyhow::{Result, bail};
use async_trait::async_trait;

use crate::config::TargetSettings;
use crate::manifest::Manifest;

/// A complete set waiting in staging: its directory holds every file the manifest lists
/// (under their stored names).
#[derive(Debug, Clone)]
pub struct StagedSet {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// A complete set found on a target.
#[derive(Debug, Clone)]
pub struct ListedSet {
    pub cluster: String,
    pub manifest: Manifest,
}

#[async_trait]
pub trait Target: Send + Sync {
    fn name(&self) -> &str;
    /// Where a set lands, for humans: `file:///srv/backup/prod/2026-11-25_023012/`.
    fn describe(&self, cluster: &str, id: &str) -> String;
    /// Cheap checks that the target can take a set, run before the snapshot.
    async fn preflight(&self) -> Result<()>;
    /// Stores `set` under `<cluster>/<id>/`; fails, leaving nothing visible, if a set with
    /// that id exists or anything goes wrong.
    async fn put_set(&self, cluster: &str, node: &str, set: &StagedSet) -> Result<()>;
    /// Complete sets, newest first; of one cluster folder, or of all when `cluster` is None.
    async fn list_sets(&self, cluster: Option<&str>) -> Result<Vec<ListedSet>>;
}

/// The target for `settings`, by URL scheme.
pub fn open(settings: &TargetSettings) -> Result<Box<dyn Target>> {
    match settings.url.scheme() {
        "file" => Ok(Box::new(file::FileTarget::new(settings)?)),
        "http" | "https" => bail!(
            "target '{}': http(s)/WebDAV targets are not implemented yet in this version",
            settings.name
        ),
        other => bail!("target '{}': unsupported scheme '{other}'", settings.name),
    }
}

/// Is `name` safe to use as one path component received from a target?
pub fn safe_component(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control)
}
