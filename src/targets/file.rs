//! A directory on this host (`file:///path`), e.g. an NFS mount. Its atomic step is a
//! rename with `RENAME_NOREPLACE`; every file is fsynced, and so is each folder before and
//! after the rename.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::objects::{Body, Commit, Entry, Guard, Moved, ObjectStore, Put};
use super::{FileReader, safe_component};
use crate::config::{TargetSettings, VerifyUpload};
use crate::fsutil;
use crate::growing::Follower;

#[derive(Clone)]
pub struct FileStore {
    name: String,
    root: PathBuf,
    rate: Option<u64>,
    verify: VerifyUpload,
}

impl FileStore {
    pub fn new(settings: &TargetSettings, rate: Option<u64>) -> Result<Self> {
        let root = settings
            .url
            .to_file_path()
            .map_err(|_| anyhow!("target '{}': the file:// URL is not a local path", settings.name))?;
        Ok(FileStore {
            name: settings.name.clone(),
            root,
            rate,
            verify: settings.verify_upload,
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

    /// `<root>/<seg>/…`, refusing segments that are not plain path components.
    fn path(&self, segments: &[&str]) -> Result<PathBuf> {
        if let Some(bad) = segments.iter().find(|s| !safe_component(s)) {
            bail!("target '{}': {bad:?} is not a usable name", self.name);
        }
        Ok(segments.iter().fold(self.root.clone(), |p, s| p.join(s)))
    }

    /// Runs blocking filesystem work off the async threads, naming the target in its errors.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&FileStore) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let this = self.clone();
        let name = self.name.clone();
        tokio::task::spawn_blocking(move || work(&this))
            .await?
            .with_context(|| format!("target '{name}'"))
    }

    /// Copies a growing file to `path` as it is written (async: it waits on the writer).
    async fn copy_growing(&self, path: &Path, file: Follower) -> Result<Put> {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let mut out = tokio::fs::File::from_std(fsutil::create_private_file(path)?);
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
        Ok(Put::Stored {
            size,
            sha256: Some(hex::encode(hash.finalize())),
        })
    }
}

/// The entries of `dir` with usable names; `None` when it does not exist.
fn read_entries(dir: &Path) -> Result<Option<Vec<Entry>>> {
    let read = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => bail!("cannot read '{}': {e}", dir.display()),
    };
    let mut entries = Vec::new();
    for entry in read {
        let entry = entry.with_context(|| format!("cannot read '{}'", dir.display()))?;
        let Ok(name) = entry.file_name().into_string() else {
            tracing::debug!(dir = %dir.display(), "skipping an entry with an unusable name");
            continue;
        };
        if !safe_component(&name) {
            continue;
        }
        // Followed: a cluster or set folder may be a symbolic link.
        let Ok(meta) = std::fs::metadata(entry.path()).or_else(|_| entry.metadata()) else {
            continue;
        };
        let modified = meta.modified().ok().map(DateTime::<Utc>::from);
        entries.push(if meta.is_dir() {
            Entry::folder(&name, modified)
        } else {
            Entry::file(&name, Some(meta.len()), modified)
        });
    }
    Ok(Some(entries))
}

#[async_trait]
impl ObjectStore for FileStore {
    fn name(&self) -> &str {
        &self.name
    }

    fn describe(&self, path: &[&str]) -> String {
        let joined = path.iter().fold(self.root.clone(), |p, s| p.join(s));
        // Folders are the root, clusters and sets; files are in sets.
        format!("file://{}{}", joined.display(), if path.len() < 3 { "/" } else { "" })
    }

    fn route(&self) -> String {
        format!("local directory '{}'", self.root.display())
    }

    fn commit(&self) -> Commit {
        Commit::Rename
    }

    fn reads_back(&self) -> bool {
        self.verify == VerifyUpload::ReadBack
    }

    async fn preflight(&self) -> Result<()> {
        self.blocking(|s| s.check_root()).await
    }

    // Every filesystem call runs off the async threads: a hung NFS mount must not stop the
    // timeouts around it from firing.
    async fn list(&self, folder: &[&str]) -> Result<Option<Vec<Entry>>> {
        let dir = self.path(folder)?;
        self.blocking(move |s| {
            s.check_root()?;
            read_entries(&dir)
        })
        .await
    }

    async fn make_folder(&self, folder: &[&str]) -> Result<()> {
        let dir = self.path(folder)?;
        self.blocking(move |s| {
            s.check_root()?;
            fsutil::create_private_dir(&dir)
        })
        .await
    }

    async fn put(&self, path: &[&str], body: Body<'_>, _guard: Guard) -> Result<Put> {
        let to = self.path(path)?;
        match body {
            Body::File { path: from, .. } => {
                let from = from.to_path_buf();
                self.blocking(move |s| {
                    let (size, sha) = fsutil::copy_private(&from, &to, s.rate)?;
                    Ok(Put::Stored {
                        size,
                        sha256: Some(sha),
                    })
                })
                .await
            }
            Body::Bytes(bytes) => {
                let bytes = bytes.to_vec();
                self.blocking(move |_| {
                    fsutil::write_private_file(&to, &bytes)?;
                    Ok(Put::Stored {
                        size: bytes.len() as u64,
                        sha256: None,
                    })
                })
                .await
            }
            Body::Growing(file) => {
                let copied = self.copy_growing(&to, file).await;
                if copied.is_err() {
                    // A later copy from staging creates the file anew.
                    let _ = std::fs::remove_file(&to);
                }
                copied.with_context(|| format!("target '{}'", self.name))
            }
        }
    }

    async fn get(&self, path: &[&str]) -> Result<Option<FileReader>> {
        let p = self.path(path)?;
        match tokio::fs::File::open(&p).await {
            Ok(f) => Ok(Some(Box::pin(f))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => bail!("target '{}': cannot open '{}': {e}", self.name, p.display()),
        }
    }

    async fn delete(&self, path: &[&str]) -> Result<()> {
        let p = self.path(path)?;
        self.blocking(move |_| match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => bail!("cannot remove '{}': {e}", p.display()),
        })
        .await
    }

    async fn delete_folder(&self, folder: &[&str]) -> Result<()> {
        let dir = self.path(folder)?;
        self.blocking(move |_| match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => bail!("cannot remove '{}': {e}", dir.display()),
        })
        .await
    }

    async fn rename_folder(&self, from: &[&str], to: &[&str]) -> Result<Moved> {
        let (from, to) = (self.path(from)?, self.path(to)?);
        self.blocking(move |_| {
            // Every file in it is on disk (each was fsynced); now its entries are, and after
            // the rename the parent's.
            fsutil::fsync_dir(&from)?;
            match fsutil::rename_noreplace(&from, &to) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(Moved::Exists),
                Err(e) => bail!("cannot rename '{}' to '{}': {e}", from.display(), to.display()),
            }
            if let Some(parent) = to.parent() {
                fsutil::fsync_dir(parent)?;
            }
            Ok(Moved::Done)
        })
        .await
    }
}
