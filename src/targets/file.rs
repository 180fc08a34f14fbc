//! A directory on this host (`file:///path`), e.g. an NFS mount. Sets are assembled in
//! `<cluster>/.<id>.partial-<node>-<random>/` and renamed to `<cluster>/<id>/` with
//! `RENAME_NOREPLACE` once every file is copied, checked against the manifest and fsynced.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;

use super::{ListedSet, StagedSet, Target, safe_component};
use crate::config::TargetSettings;
use crate::fsutil;
use crate::manifest::{MANIFEST, Manifest, SHA256SUMS};

#[derive(Clone)]
pub struct FileTarget {
    name: String,
    root: PathBuf,
}

/// Marks a temporary set directory; never part of a complete set's name.
pub const PARTIAL_MARK: &str = ".partial-";

impl FileTarget {
    pub fn new(settings: &TargetSettings) -> Result<Self> {
        let root = settings
            .url
            .to_file_path()
            .map_err(|_| anyhow!("target '{}': the file:// URL is not a local path", settings.name))?;
        Ok(FileTarget {
            name: settings.name.clone(),
            root,
        })
    }

    fn check_root(&self) -> Result<()> {
        match std::fs::metadata(&self.root) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => bail!("target '{}': '{}' is not a directory", self.name, self.root.display()),
            // Never create the root: if it is a mount point that is not mounted, backups
            // would silently land on the node's own disk.
            Err(e) => bail!(
                "target '{}': '{}': {e} (create it, or mount the filesystem it should be)",
                self.name,
                self.root.display()
            ),
        }
    }

    fn put_blocking(&self, cluster: &str, node: &str, set: &StagedSet) -> Result<()> {
        self.check_root()?;
        let id = &set.manifest.id;
        let cluster_dir = self.root.join(cluster);
        fsutil::create_private_dir(&cluster_dir).with_context(|| format!("target '{}'", self.name))?;
        let final_dir = cluster_dir.join(id);
        if final_dir.exists() {
            bail!(
                "target '{}': a set with id '{id}' already exists at '{}'",
                self.name,
                final_dir.display()
            );
        }
        // Hidden, and named so that no reader takes it for a set even though it holds a
        // manifest.json just before the rename.
        let tmp = cluster_dir.join(format!(".{id}{PARTIAL_MARK}{node}-{:08x}", rand::random::<u32>()));
        fsutil::create_private_dir(&tmp).with_context(|| format!("target '{}'", self.name))?;
        let result = (|| -> Result<()> {
            for f in &set.manifest.files {
                let (size, sha) = fsutil::copy_private(&set.dir.join(&f.stored_name), &tmp.join(&f.stored_name))?;
                if size != f.stored_size || sha != f.stored_sha256 {
                    bail!(
                        "'{}' landed as {size} bytes with SHA-256 {sha}, expected {} bytes with {}",
                        f.stored_name,
                        f.stored_size,
                        f.stored_sha256
                    );
                }
            }
            fsutil::write_private_file(&tmp.join(SHA256SUMS), set.manifest.sha256sums().as_bytes())?;
            // The manifest goes last: a directory holding one is a complete set.
            fsutil::write_private_file(&tmp.join(MANIFEST), set.manifest.to_json().as_bytes())?;
            fsutil::fsync_dir(&tmp)?;
            fsutil::rename_noreplace(&tmp, &final_dir).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    anyhow!("a set with id '{id}' already exists at '{}'", final_dir.display())
                } else {
                    anyhow!("cannot rename '{}' to '{}': {e}", tmp.display(), final_dir.display())
                }
            })?;
            fsutil::fsync_dir(&cluster_dir)
        })();
        if result.is_err() {
            fsutil::remove_dir_quietly(&tmp);
        }
        result.with_context(|| format!("target '{}'", self.name))
    }

    fn list_blocking(&self, cluster: Option<&str>) -> Result<Vec<ListedSet>> {
        self.check_root()?;
        let clusters: Vec<String> = match cluster {
            Some(c) => vec![c.to_string()],
            None => read_names(&self.root)?
                .into_iter()
                .filter(|n| self.root.join(n).is_dir())
                .collect(),
        };
        let mut sets = Vec::new();
        for c in clusters {
            let dir = self.root.join(&c);
            if !dir.exists() {
                continue;
            }
            for id in read_names(&dir)? {
                if id.contains(PARTIAL_MARK) {
                    continue;
                }
                let path = dir.join(&id).join(MANIFEST);
                let bytes = match std::fs::read(&path) {
                    Ok(b) => b,
                    // No manifest: not a complete set.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => bail!("target '{}': cannot read '{}': {e}", self.name, path.display()),
                };
                match Manifest::parse(&bytes) {
                    Ok(m) if m.id == id => sets.push(ListedSet {
                        cluster: c.clone(),
                        manifest: m,
                    }),
                    Ok(m) => {
                        tracing::warn!(target = %self.name, path = %path.display(), manifest_id = %m.id, "manifest id does not match its folder; skipping it")
                    }
                    Err(e) => {
                        tracing::warn!(target = %self.name, path = %path.display(), error = %e, "skipping a set with an unreadable manifest")
                    }
                }
            }
        }
        sets.sort_by(|a, b| b.manifest.id.cmp(&a.manifest.id).then(a.cluster.cmp(&b.cluster)));
        Ok(sets)
    }
}

/// Directory entry names that are safe path components; others are skipped with a warning.
fn read_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read '{}'", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot read '{}'", dir.display()))?;
        match entry.file_name().into_string() {
            Ok(n) if safe_component(&n) && !n.starts_with('.') => names.push(n),
            _ => tracing::debug!(dir = %dir.display(), "skipping an entry with an unusable name"),
        }
    }
    Ok(names)
}

#[async_trait]
impl Target for FileTarget {
    fn name(&self) -> &str {
        &self.name
    }

    async fn preflight(&self) -> Result<()> {
        self.check_root()
    }

    fn describe(&self, cluster: &str, id: &str) -> String {
        format!("file://{}/", self.root.join(cluster).join(id).display())
    }

    async fn put_set(&self, cluster: &str, node: &str, set: &StagedSet) -> Result<()> {
        let (this, cluster, node, set) = (self.clone(), cluster.to_string(), node.to_string(), set.clone());
        tokio::task::spawn_blocking(move || this.put_blocking(&cluster, &node, &set)).await?
    }

    async fn list_sets(&self, cluster: Option<&str>) -> Result<Vec<ListedSet>> {
        let (this, cluster) = (self.clone(), cluster.map(str::to_string));
        tokio::task::spawn_blocking(move || this.list_blocking(cluster.as_deref())).await?
    }
}
