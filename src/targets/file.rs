//! A directory on this host (`file:///path`), e.g. an NFS mount. Sets are assembled in
//! `<cluster>/.<id>.partial-<node>-<random>/` and renamed to `<cluster>/<id>/` with
//! `RENAME_NOREPLACE` once every file is copied, checked against the manifest and fsynced.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;

use super::{
    Draft, FileReader, ListedSet, Sent, StagedSet, Target, is_removable_debris, is_set_name, partial_name,
    safe_component,
};
use crate::config::TargetSettings;
use crate::fsutil;
use crate::growing::Follower;
use crate::manifest::{MANIFEST, Manifest};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct FileTarget {
    name: String,
    root: PathBuf,
    rate: Option<u64>,
}

impl FileTarget {
    pub fn new(settings: &TargetSettings, rate: Option<u64>) -> Result<Self> {
        let root = settings
            .url
            .to_file_path()
            .map_err(|_| anyhow!("target '{}': the file:// URL is not a local path", settings.name))?;
        Ok(FileTarget {
            name: settings.name.clone(),
            root,
            rate,
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

    fn begin_blocking(&self, cluster: &str, node: &str, id: &str) -> Result<Draft> {
        self.check_root()?;
        let cluster_dir = self.root.join(cluster);
        fsutil::create_private_dir(&cluster_dir).with_context(|| format!("target '{}'", self.name))?;
        let final_dir = cluster_dir.join(id);
        if final_dir.exists() {
            return Err(super::SetExists {
                target: self.name.clone(),
                id: id.to_string(),
                at: final_dir.display().to_string(),
            }
            .into());
        }
        // Hidden, and named so that no reader takes it for a set even though it holds a
        // manifest.json just before the rename.
        self.remove_debris_in(&cluster_dir, node);
        let folder = partial_name(id, node);
        fsutil::create_private_dir(&cluster_dir.join(&folder)).with_context(|| format!("target '{}'", self.name))?;
        Ok(Draft {
            cluster: cluster.to_string(),
            id: id.to_string(),
            folder,
            sent: Vec::new(),
        })
    }

    fn finish_blocking(&self, draft: &Draft, set: &StagedSet, abort: &CancellationToken) -> Result<()> {
        let id = &set.manifest.id;
        let cluster_dir = self.root.join(&draft.cluster);
        let final_dir = cluster_dir.join(id);
        let tmp = cluster_dir.join(&draft.folder);
        let result = (|| -> Result<()> {
            for f in set.manifest.files_on(&self.name) {
                if draft.has(f) {
                    continue;
                }
                let (size, sha) =
                    fsutil::copy_private(&set.dir.join(&f.stored_name), &tmp.join(&f.stored_name), self.rate)?;
                if size != f.stored_size || sha != f.stored_sha256 {
                    bail!(
                        "'{}' landed as {size} bytes with SHA-256 {sha}, expected {} bytes with {}",
                        f.stored_name,
                        f.stored_size,
                        f.stored_sha256
                    );
                }
            }
            // SHA256SUMS and the signature (stored before the manifest: every visible set is
            // signed), then the manifest, last: a directory holding one is a complete set.
            for (name, bytes) in set.closing_files()? {
                fsutil::write_private_file(&tmp.join(name), &bytes)?;
            }
            fsutil::write_private_file(&tmp.join(MANIFEST), &set.manifest_json())?;
            fsutil::fsync_dir(&tmp)?;
            if abort.is_cancelled() {
                bail!("the run was stopped before the set was moved into place");
            }
            fsutil::rename_noreplace(&tmp, &final_dir).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    anyhow::Error::from(super::SetExists {
                        target: self.name.clone(),
                        id: id.clone(),
                        at: final_dir.display().to_string(),
                    })
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

    /// Copies a growing file into the draft as it is written (async: it waits on the writer).
    async fn copy_growing(&self, draft: &Draft, name: &str, file: Follower) -> Result<Sent> {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        if !safe_component(name) {
            bail!("{name:?} is not a valid file name");
        }
        let path = self.root.join(&draft.cluster).join(&draft.folder).join(name);
        let mut out = tokio::fs::File::from_std(fsutil::create_private_file(&path)?);
        let mut hash = Sha256::new();
        let mut pace = self.rate.map(crate::fsutil::Pace::new);
        let mut size = 0u64;
        let mut chunks = std::pin::pin!(file.stream(1 << 20));
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            if let Some(p) = pace.as_mut() {
                fsutil::pause(p.delay_for(chunk.len())).await;
            }
            out.write_all(&chunk)
                .await
                .with_context(|| format!("cannot write '{}'", path.display()))?;
            hash.update(&chunk);
            size += chunk.len() as u64;
        }
        // flush first: tokio reports a failed last write there, not from sync_all.
        out.flush()
            .await
            .with_context(|| format!("cannot write '{}'", path.display()))?;
        out.sync_all()
            .await
            .with_context(|| format!("cannot fsync '{}'", path.display()))?;
        Ok(Sent {
            name: name.to_string(),
            size,
            sha256: Some(hex::encode(hash.finalize())),
        })
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
                if !is_set_name(&id) {
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
                    // The manifest goes last, so a set missing a file or with one of another
                    // size was damaged after it was stored: listed, marked.
                    Ok(m) if m.id == id => {
                        let damaged = super::size_damage(&m, &self.name, |name| {
                            std::fs::metadata(dir.join(&id).join(name))
                                .ok()
                                .map(|md| Some(md.len()))
                        });
                        if let Some(d) = &damaged {
                            tracing::warn!(target_name = %self.name, path = %path.display(), damage = %d, "a damaged set");
                        }
                        sets.push(ListedSet {
                            cluster: c.clone(),
                            manifest: m,
                            damaged,
                        })
                    }
                    Ok(m) => {
                        tracing::warn!(target_name = %self.name, path = %path.display(), manifest_id = %m.id, "manifest id does not match its folder; skipping it")
                    }
                    Err(e) => {
                        tracing::warn!(target_name = %self.name, path = %path.display(), error = %e, "skipping a set with an unreadable manifest")
                    }
                }
            }
        }
        sets.sort_by(|a, b| b.manifest.id.cmp(&a.manifest.id).then(a.cluster.cmp(&b.cluster)));
        Ok(sets)
    }
}

impl FileTarget {
    /// Removes this node's leftover temporary sets, and other nodes' once a day old.
    fn remove_debris_in(&self, cluster_dir: &Path, node: &str) -> usize {
        let Ok(entries) = std::fs::read_dir(cluster_dir) else {
            return 0;
        };
        let mut removed = 0;
        let now = chrono::Utc::now();
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .map(chrono::DateTime::<chrono::Utc>::from);
            if is_removable_debris(&name, node, modified, now) {
                tracing::info!(target_name = %self.name, name = %name, "removing an incomplete set left by an earlier run");
                fsutil::remove_dir_quietly(&entry.path());
                removed += 1;
            }
        }
        removed
    }

    /// `<root>/<cluster>/<id>`, refusing names that are not plain path components.
    fn set_dir(&self, cluster: &str, id: &str) -> Result<PathBuf> {
        if !safe_component(cluster) || !is_set_name(id) {
            bail!("target '{}': {cluster:?}/{id:?} is not a valid set name", self.name);
        }
        Ok(self.root.join(cluster).join(id))
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

    fn route(&self) -> String {
        format!("local directory '{}'", self.root.display())
    }

    async fn preflight(&self) -> Result<()> {
        self.check_root()
    }

    fn describe(&self, cluster: &str, id: &str) -> String {
        format!("file://{}/", self.root.join(cluster).join(id).display())
    }

    async fn begin_set(&self, cluster: &str, node: &str, id: &str) -> Result<Draft> {
        let (this, cluster, node, id) = (self.clone(), cluster.to_string(), node.to_string(), id.to_string());
        tokio::task::spawn_blocking(move || this.begin_blocking(&cluster, &node, &id)).await?
    }

    async fn put_growing(&self, draft: &Draft, name: &str, file: Follower) -> Result<Sent> {
        let copied = self.copy_growing(draft, name, file).await;
        if copied.is_err() && safe_component(name) {
            // The copy from staging in `finish_set` creates the file anew.
            let _ = std::fs::remove_file(self.root.join(&draft.cluster).join(&draft.folder).join(name));
        }
        copied.with_context(|| format!("target '{}'", self.name))
    }

    async fn finish_set(&self, draft: Draft, set: &StagedSet, abort: &CancellationToken) -> Result<()> {
        let (this, set, abort) = (self.clone(), set.clone(), abort.clone());
        tokio::task::spawn_blocking(move || this.finish_blocking(&draft, &set, &abort)).await?
    }

    async fn discard(&self, draft: Draft) -> Result<()> {
        let dir = self.root.join(&draft.cluster).join(&draft.folder);
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("target '{}': cannot remove '{}'", self.name, dir.display()))
    }

    async fn open_file(&self, cluster: &str, id: &str, name: &str) -> Result<FileReader> {
        if !safe_component(name) {
            bail!("target '{}': {name:?} is not a valid file name", self.name);
        }
        let path = self.set_dir(cluster, id)?.join(name);
        let f = tokio::fs::File::open(&path)
            .await
            .with_context(|| format!("target '{}': cannot open '{}'", self.name, path.display()))?;
        Ok(Box::pin(f))
    }

    async fn delete_set(&self, cluster: &str, id: &str) -> Result<()> {
        let dir = self.set_dir(cluster, id)?;
        // The manifest goes first, so that a deletion cut short never leaves a set that
        // looks complete but lacks files.
        match std::fs::remove_file(dir.join(MANIFEST)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!(
                "target '{}': cannot remove '{}': {e}",
                self.name,
                dir.join(MANIFEST).display()
            ),
        }
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("target '{}': cannot remove '{}'", self.name, dir.display()))
    }

    async fn list_all_sets(&self, cluster: Option<&str>) -> Result<Vec<ListedSet>> {
        let (this, cluster) = (self.clone(), cluster.map(str::to_string));
        tokio::task::spawn_blocking(move || this.list_blocking(cluster.as_deref())).await?
    }

    async fn remove_debris(&self, cluster: &str, node: &str) -> Result<usize> {
        if !safe_component(cluster) {
            bail!("target '{}': {cluster:?} is not a valid cluster folder name", self.name);
        }
        self.check_root()?;
        let (this, dir, node) = (self.clone(), self.root.join(cluster), node.to_string());
        Ok(tokio::task::spawn_blocking(move || this.remove_debris_in(&dir, &node)).await?)
    }
}
