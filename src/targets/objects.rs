//! What a kind of target must do: store, read, list and remove files in folders, and its one
//! atomic step. [`super::sets`] builds the set protocol on it once; a new kind of target
//! implements [`ObjectStore`] and nothing else.
//!
//! Paths are slices of plain names (`["prod", "2026-11-25_023012", "manifest.json"]`), the
//! empty slice being the target's root; every implementation refuses a segment that is not a
//! plain path component.

use std::path::Path;

use anyhow::Result;
use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::FileReader;
use crate::growing::Follower;

/// Which subfolders a listing wants, by name.
pub type Want = dyn Fn(&str) -> bool + Sync;

/// How a kind of target makes a set appear all at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// A set is assembled in a hidden folder and renamed into place without replacing
    /// anything ([`ObjectStore::rename_folder`]): a local directory, WebDAV's `MOVE`.
    Rename,
    /// No rename: a set is written under its final names, `manifest.json` last, with a
    /// marker naming the node writing it; a folder without a manifest is not a set. Writes
    /// are guarded ([`Guard::NoReplace`]) where the server can.
    ManifestLast,
}

/// Whether a write may replace what is at its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    Replace,
    /// Refuse ([`Put::Taken`]) if something is there, where the kind can tell.
    NoReplace,
}

/// What an entry of a folder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Folder,
    /// A write begun and not finished (an S3 multipart upload): it counts for a folder's age,
    /// and goes with the folder.
    Upload,
}

/// An entry of a folder.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub kind: Kind,
    /// The size the target reports, for files.
    pub size: Option<u64>,
    /// When it was last changed (an upload: when it began).
    pub modified: Option<DateTime<Utc>>,
}

impl Entry {
    pub fn file(name: &str, size: Option<u64>, modified: Option<DateTime<Utc>>) -> Entry {
        Entry {
            name: name.to_string(),
            kind: Kind::File,
            size,
            modified,
        }
    }

    pub fn folder(name: &str, modified: Option<DateTime<Utc>>) -> Entry {
        Entry {
            name: name.to_string(),
            kind: Kind::Folder,
            size: None,
            modified,
        }
    }
}

/// What a file is written from.
pub enum Body<'a> {
    /// A file in staging, `size` bytes long; read again for a retry.
    File {
        path: &'a Path,
        size: u64,
    },
    Bytes(&'a [u8]),
    /// A file still being written ([`crate::growing`]); the write must fail, leaving nothing
    /// at its path, if its writer fails.
    Growing(Follower),
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Put {
    /// Stored: its size, and its SHA-256 where the kind computed it while sending.
    Stored { size: u64, sha256: Option<String> },
    /// Something else is at the path ([`Guard::NoReplace`]).
    Taken,
}

/// What a rename did.
#[derive(Debug)]
pub enum Moved {
    Done,
    /// Something is already at the destination; nothing moved.
    Exists,
    /// The answer to an earlier attempt was lost and the retry failed with this error: the
    /// folder may have moved all the same (the protocol looks at the destination).
    Unsure(anyhow::Error),
}

#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// The target's name, from the configuration.
    fn name(&self) -> &str;
    /// Where `path` is, for humans (a folder ends with `/`).
    fn describe(&self, path: &[&str]) -> String;
    /// How the target is reached (the proxy in effect, for remote ones).
    fn route(&self) -> String;
    fn commit(&self) -> Commit;
    /// Whether each file is read back after the upload (`verify_upload = "read-back"`).
    fn reads_back(&self) -> bool {
        false
    }
    /// Cheap checks that the target can take a set.
    async fn preflight(&self) -> Result<()>;
    /// The entries of `folder`, or `None` when there is no such folder. Names that are not
    /// plain path components are left out.
    async fn list(&self, folder: &[&str]) -> Result<Option<Vec<Entry>>>;
    /// The entries of every subfolder of `folder` whose name `want` accepts, by subfolder.
    /// A kind that can list a whole tree at once overrides this.
    async fn list_subfolders(&self, folder: &[&str], want: &Want) -> Result<Vec<(String, Vec<Entry>)>> {
        let mut out = Vec::new();
        for e in self.list(folder).await?.unwrap_or_default() {
            if e.kind != Kind::Folder || !want(&e.name) {
                continue;
            }
            let mut path = folder.to_vec();
            path.push(&e.name);
            if let Some(entries) = self.list(&path).await? {
                out.push((e.name.clone(), entries));
            }
        }
        Ok(out)
    }
    /// Creates `folder` (its parent exists); fine if it exists. A kind without folders does
    /// nothing.
    async fn make_folder(&self, folder: &[&str]) -> Result<()>;
    /// Writes the file at `path` from `body`.
    async fn put(&self, path: &[&str], body: Body<'_>, guard: Guard) -> Result<Put>;
    /// Opens the file at `path`; `None` when there is none.
    async fn get(&self, path: &[&str]) -> Result<Option<FileReader>>;
    /// Removes the file at `path`; fine if it is gone.
    async fn delete(&self, path: &[&str]) -> Result<()>;
    /// Removes `folder` and everything in it (unfinished uploads too); fine if it is gone.
    async fn delete_folder(&self, folder: &[&str]) -> Result<()>;
    /// Moves `from` to `to` without replacing anything ([`Commit::Rename`] kinds).
    async fn rename_folder(&self, from: &[&str], to: &[&str]) -> Result<Moved>;
    /// The unfinished uploads in the subfolders of `folder`, by subfolder (kinds that have
    /// them).
    async fn uploads(&self, _folder: &[&str]) -> Result<Vec<(String, Entry)>> {
        Ok(Vec::new())
    }
    /// Cancels the unfinished uploads in `folder` that began before `before` (all when
    /// `None`).
    async fn abort_uploads(&self, _folder: &[&str], _before: Option<DateTime<Utc>>) -> Result<()> {
        Ok(())
    }
}
