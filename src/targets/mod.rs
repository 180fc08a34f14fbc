//! Where backup sets are stored. A kind of target ([`file`], [`webdav`], [`s3`]) implements
//! only [`objects::ObjectStore`]: files in folders, and its one atomic step. [`sets`] writes
//! the set protocol over it once ([`SetStore`]), and the rest of the program sees a
//! [`Target`]: sets put, listed, read and removed whole. [`open`] picks the kind by URL scheme
//! (`file://`, `http(s)://`, `s3://`); the remote two share one HTTP transport, [`http`].

pub mod dns;
pub mod file;
pub mod http;
#[cfg(test)]
pub mod memory;
pub mod objects;
pub mod propfind;
pub mod proxy;
pub mod retry;
pub mod s3;
pub mod sets;
pub mod webdav;

use std::path::PathBuf;
use std::pin::Pin;

use anyhow::{Result, bail};
use async_trait::async_trait;
use tokio::io::AsyncRead;
use tokio_util::sync::CancellationToken;

pub use crate::manifest::{PARTIAL_MARK, is_set_name, safe_component};

use crate::config::TargetSettings;
use crate::growing::Follower;
use crate::manifest::Manifest;
pub use sets::SetStore;

/// A complete set waiting in staging: its directory holds every file the manifest lists
/// (under their stored names).
#[derive(Debug, Clone)]
pub struct StagedSet {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl StagedSet {
    /// `manifest.json` exactly as staged: the bytes its signature covers (the manifest
    /// serialized anew only when the staged file does not say the same).
    pub fn manifest_json(&self) -> Vec<u8> {
        match std::fs::read(self.dir.join(crate::manifest::MANIFEST)) {
            Ok(b) if Manifest::parse(&b).is_ok_and(|m| m == self.manifest) => b,
            _ => self.manifest.to_json().into_bytes(),
        }
    }

    /// The files every target stores after those the manifest lists and before
    /// `manifest.json` (which goes last), in this order, with their contents: `SHA256SUMS`,
    /// and `manifest.json.sig` when the set is signed.
    pub fn closing_files(&self) -> Result<Vec<(&'static str, Vec<u8>)>> {
        use crate::manifest::{SHA256SUMS, SIGNATURE};
        let mut files = vec![(SHA256SUMS, self.manifest.sha256sums().into_bytes())];
        let sig = self.dir.join(SIGNATURE);
        match std::fs::read(&sig) {
            Ok(b) => files.push((SIGNATURE, b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("cannot read '{}': {e}", sig.display()),
        }
        Ok(files)
    }
}

/// A set found on a target: a folder holding a readable `manifest.json` (a folder without one
/// is an upload in progress or debris, never listed).
#[derive(Debug, Clone)]
pub struct ListedSet {
    pub cluster: String,
    pub manifest: Manifest,
    /// What is wrong with it, when a file the manifest lists is missing or has another size
    /// ([`sets::size_damage`]); `None` for an intact set (as far as sizes tell: checksums need a
    /// full read, which `fetch` and `verify` do).
    pub damaged: Option<String>,
}

/// A set being assembled on a target, under its hidden temporary name.
#[derive(Debug, Clone)]
pub struct Draft {
    pub cluster: String,
    pub id: String,
    /// The folder its files go to in the cluster folder: a hidden temporary name
    /// ([`sets::partial_name`]), or the set's id where files go under their final names.
    pub folder: String,
    /// The marker naming the node writing, where files go under their final names.
    pub marker: Option<String>,
    /// Files already uploaded into it.
    pub sent: Vec<Sent>,
}

/// A file uploaded into a draft: its size, and its SHA-256 where the target computed it.
#[derive(Debug, Clone)]
pub struct Sent {
    pub name: String,
    pub size: u64,
    pub sha256: Option<String>,
}

impl Draft {
    /// A draft of set `id` in `cluster`, assembled in `folder`, nothing uploaded yet.
    pub fn new(cluster: &str, id: &str, folder: String) -> Draft {
        Draft {
            cluster: cluster.to_string(),
            id: id.to_string(),
            folder,
            marker: None,
            sent: Vec::new(),
        }
    }

    /// Was `f` already uploaded, exactly?
    pub fn has(&self, f: &crate::manifest::FileEntry) -> bool {
        self.sent.iter().any(|s| {
            s.name == f.stored_name
                && s.size == f.stored_size
                && s.sha256.as_ref().is_none_or(|h| *h == f.stored_sha256)
        })
    }
}

/// The target already holds a different set under this id (another node's, or one this node
/// stored before a crash). Only that set cannot go there: the target itself is fine, so a
/// delivery pass goes on with the next set.
#[derive(Debug, thiserror::Error)]
#[error("target '{target}': a set with id '{id}' already exists at '{at}'")]
pub struct SetExists {
    pub target: String,
    pub id: String,
    pub at: String,
}

/// A file being read from a target.
pub type FileReader = Pin<Box<dyn AsyncRead + Send>>;

/// The largest `manifest.json` a target may hand us.
pub const MANIFEST_CAP: u64 = 1 << 20;

#[async_trait]
pub trait Target: Send + Sync {
    fn name(&self) -> &str;
    /// Where a set lands, for humans: `file:///srv/backup/prod/2026-11-25_023012/`.
    fn describe(&self, cluster: &str, id: &str) -> String;
    /// How the target is reached (the proxy in effect, for remote ones).
    fn route(&self) -> String;
    /// Cheap checks that the target can take a set, run before the snapshot.
    async fn preflight(&self) -> Result<()>;
    /// Stores `set` under `<cluster>/<id>/`; fails, leaving nothing visible, if a set with
    /// that id exists or anything goes wrong. Removes debris of earlier runs first. Once
    /// `abort` fires (the run was stopped, or its election lock may be lost), the set is
    /// not moved into place.
    async fn put_set(&self, cluster: &str, node: &str, set: &StagedSet, abort: &CancellationToken) -> Result<()> {
        let draft = self.begin_set(cluster, node, &set.manifest.id).await?;
        self.finish_set(draft, set, abort).await
    }
    /// The first half of `put_set`: removes debris, checks that no set `id` exists, and
    /// creates the hidden temporary folder the set is assembled in.
    async fn begin_set(&self, cluster: &str, node: &str, id: &str) -> Result<Draft>;
    /// Uploads `file` into the draft while it is still being written (the pipelined path);
    /// fails, sending nothing more, if its writer fails. Returns what was sent.
    async fn put_growing(&self, draft: &Draft, name: &str, file: Follower) -> Result<Sent>;
    /// The second half of `put_set`: uploads what the draft lacks, checks it, writes the
    /// manifest and moves the set into place. On failure the draft is removed.
    async fn finish_set(&self, draft: Draft, set: &StagedSet, abort: &CancellationToken) -> Result<()>;
    /// Removes a draft that will not be finished.
    async fn discard(&self, draft: Draft) -> Result<()>;
    /// Every set with a manifest, newest first, damaged ones marked
    /// ([`ListedSet::damaged`]); of one cluster folder, or of all when `cluster` is None.
    async fn list_all_sets(&self, cluster: Option<&str>) -> Result<Vec<ListedSet>>;
    /// The intact sets of [`Target::list_all_sets`] (every file there at its size).
    async fn list_sets(&self, cluster: Option<&str>) -> Result<Vec<ListedSet>> {
        let all = self.list_all_sets(cluster).await?;
        Ok(all.into_iter().filter(|s| s.damaged.is_none()).collect())
    }
    /// Opens one file of a complete set for reading.
    async fn open_file(&self, cluster: &str, id: &str, name: &str) -> Result<FileReader>;
    /// Removes a complete set.
    async fn delete_set(&self, cluster: &str, id: &str) -> Result<()>;
    /// Removes incomplete temporary sets in `cluster` (see [`sets::is_removable_debris`]); returns
    /// how many went.
    async fn remove_debris(&self, cluster: &str, node: &str) -> Result<usize>;
    /// Writes the journal object `name` to `<cluster>/journal/` (see [`crate::journal`]),
    /// replacing one of the same name; its content checks itself, so a torn write is found.
    async fn put_journal(&self, cluster: &str, name: &str, bytes: &[u8]) -> Result<()>;
    /// The files in `<cluster>/journal/` with the sizes the target reports; empty when
    /// there is no journal.
    async fn list_journal(&self, cluster: &str) -> Result<Vec<(String, Option<u64>)>>;
    /// A journal object, at most `cap` bytes; `None` when it is gone.
    async fn read_journal(&self, cluster: &str, name: &str, cap: u64) -> Result<Option<Vec<u8>>>;
    /// Removes a journal object; fine if it is gone.
    async fn delete_journal(&self, cluster: &str, name: &str) -> Result<()>;
}

/// The folder of a cluster's journal on a target (beside its sets; not a set name).
pub const JOURNAL_FOLDER: &str = "journal";

/// The target for `settings`, by its kind; `rate` caps what is written to it (bytes/s).
pub fn open(settings: &TargetSettings, rate: Option<u64>) -> Result<Box<dyn Target>> {
    use crate::config::TargetKind;
    Ok(match &settings.kind {
        TargetKind::File(_) => Box::new(SetStore::new(file::FileStore::new(settings, rate)?)),
        TargetKind::WebDav(_) => Box::new(SetStore::new(webdav::DavStore::new(settings, rate)?)),
        TargetKind::S3(_) => Box::new(SetStore::new(s3::S3Store::new(settings, rate)?)),
    })
}
