//! Where backup sets are stored. Each kind implements [`Target`]; [`open`] picks the kind by
//! URL scheme (`file://` → [`file`], `http(s)://` → [`webdav`], `s3://` → [`s3`]; the remote
//! two share one HTTP transport, [`http`]). Every implementation stores a set atomically:
//! `file://` and WebDAV under a hidden temporary name first, `manifest.json` last, then moved
//! into place without replacing anything; S3, which cannot rename, under the final keys with
//! `manifest.json` last, a set without one being debris.

pub mod dns;
pub mod file;
pub mod http;
#[cfg(test)]
pub mod memory;
pub mod propfind;
pub mod proxy;
pub mod retry;
pub mod s3;
pub mod webdav;

use std::path::PathBuf;
use std::pin::Pin;

use anyhow::{Result, bail};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::io::AsyncRead;
use tokio_util::sync::CancellationToken;

pub use crate::manifest::{PARTIAL_MARK, is_set_name, safe_component};

use crate::config::TargetSettings;
use crate::growing::Follower;
use crate::manifest::Manifest;

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
    /// ([`size_damage`]); `None` for an intact set (as far as sizes tell: checksums need a
    /// full read, which `fetch` and `verify` do).
    pub damaged: Option<String>,
}

/// What is wrong with a set, judged by the sizes the target reports: `found(stored_name)` is
/// `None` when the file is absent, `Some(None)` when the target reports no size. `None` when
/// every file the manifest lists is there at its recorded size.
/// Only the files `target` holds count: a set split between targets on purpose is whole on
/// each with its part.
pub fn size_damage(manifest: &Manifest, target: &str, found: impl Fn(&str) -> Option<Option<u64>>) -> Option<String> {
    let problems: Vec<String> = manifest
        .files_on(target)
        .filter_map(|f| match found(&f.stored_name) {
            None => Some(format!("'{}' is missing", f.stored_name)),
            Some(None) => Some(format!("'{}' has no size on the target", f.stored_name)),
            Some(Some(n)) if n != f.stored_size => Some(format!(
                "'{}' is {n} bytes, the manifest records {}",
                f.stored_name, f.stored_size
            )),
            Some(Some(_)) => None,
        })
        .collect();
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// Checks, after an upload, that every file of `manifest` and each of `extra` (name, size)
/// landed at its size: `size_of(name)` is the size the target reports, `shown(name)` how a
/// message names the file there.
pub fn check_sizes(
    target: &str,
    manifest: &Manifest,
    extra: &[(&str, usize)],
    size_of: impl Fn(&str) -> Option<u64>,
    shown: impl Fn(&str) -> String,
) -> Result<()> {
    let expected = manifest
        .files_on(target)
        .map(|f| (f.stored_name.as_str(), f.stored_size))
        .chain(extra.iter().map(|(n, s)| (*n, *s as u64)));
    for (name, want) in expected {
        let size = size_of(name);
        if size != Some(want) {
            bail!(
                "target '{target}': {} has size {} but {want} bytes were sent",
                shown(name),
                size.map_or("unknown".to_string(), |s| s.to_string())
            );
        }
    }
    Ok(())
}

/// Checks that `f`, read back from target `target` as `(size, SHA-256)`, is what was sent.
pub fn check_read_back(target: &str, f: &crate::manifest::FileEntry, (n, sha): (u64, String)) -> Result<()> {
    if n != f.stored_size || sha != f.stored_sha256 {
        bail!(
            "target '{target}': '{}' reads back as {n} bytes with SHA-256 {sha}, not what was sent",
            f.stored_name
        );
    }
    Ok(())
}

/// The manifest of set `id` as read from `at` on target `target`; `None`, with a warning,
/// when it is unreadable or names another set (the set is then not listed).
pub fn listed_manifest(target: &str, at: &str, id: &str, body: &[u8]) -> Option<Manifest> {
    match Manifest::parse(body) {
        Ok(m) if m.id == id => Some(m),
        Ok(_) => {
            tracing::warn!(target_name = %target, manifest = %at, "manifest id does not match its folder; skipping it");
            None
        }
        Err(err) => {
            tracing::warn!(target_name = %target, manifest = %at, error = %err, "skipping a set with an unreadable manifest");
            None
        }
    }
}

/// A set of `cluster` found on target `target` at `at`, its damage judged by `found` (as
/// in [`size_damage`]). The manifest goes last, so a set missing a file or with one of
/// another size was damaged after it was stored: listed, marked, and warned about.
pub fn listed_set(
    target: &str,
    cluster: &str,
    at: &str,
    manifest: Manifest,
    found: impl Fn(&str) -> Option<Option<u64>>,
) -> ListedSet {
    let damaged = size_damage(&manifest, target, found);
    if let Some(d) = &damaged {
        tracing::warn!(target_name = %target, set = %at, damage = %d, "a damaged set");
    }
    ListedSet {
        cluster: cluster.to_string(),
        manifest,
        damaged,
    }
}

/// Orders sets as [`Target::list_all_sets`] returns them: newest first (ids are times),
/// then by cluster.
pub fn sort_newest_first(sets: &mut [ListedSet]) {
    sets.sort_by(|a, b| b.manifest.id.cmp(&a.manifest.id).then(a.cluster.cmp(&b.cluster)));
}

/// A set being assembled on a target, under its hidden temporary name.
#[derive(Debug, Clone)]
pub struct Draft {
    pub cluster: String,
    pub id: String,
    /// The temporary folder's name in the cluster folder ([`partial_name`]).
    pub folder: String,
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
    /// Removes incomplete temporary sets in `cluster` (see [`is_removable_debris`]); returns
    /// how many went.
    async fn remove_debris(&self, cluster: &str, node: &str) -> Result<usize>;
}

/// The target for `settings`, by its kind; `rate` caps what is written to it (bytes/s).
pub fn open(settings: &TargetSettings, rate: Option<u64>) -> Result<Box<dyn Target>> {
    use crate::config::TargetKind;
    Ok(match &settings.kind {
        TargetKind::File(_) => Box::new(file::FileTarget::new(settings, rate)?),
        TargetKind::WebDav(_) => Box::new(webdav::DavTarget::new(settings, rate)?),
        TargetKind::S3(_) => Box::new(s3::S3Target::new(settings, rate)?),
    })
}

/// Logs that `file` (`bytes` long) went to target `target`, and how fast since `started`;
/// `what` is the message: how it was uploaded.
pub fn log_upload(target: &str, file: &str, bytes: u64, started: std::time::Instant, what: &str) {
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    tracing::info!(
        target_name = %target, file = %file, bytes,
        mib_per_s = format!("{:.1}", bytes as f64 / secs / 1048576.0), "{what}"
    );
}

/// The hidden temporary name a set is assembled under: `.<id>.partial-<node>-<random>`.
pub fn partial_name(id: &str, node: &str) -> String {
    format!(".{id}{PARTIAL_MARK}{node}-{:08x}", rand::random::<u32>())
}

/// How old another node's temporary set must be before this node removes it: that node may
/// still be uploading.
pub const FOREIGN_DEBRIS_AGE: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// Should this node remove the entry `name` of a cluster folder as debris? Its own temporary
/// sets always (it runs one backup at a time), other nodes' once a day old.
pub fn is_removable_debris(name: &str, node: &str, modified: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    let Some(pos) = rest.find(PARTIAL_MARK) else {
        return false;
    };
    let tail = &rest[pos + PARTIAL_MARK.len()..];
    let Some((owner, _random)) = tail.rsplit_once('-') else {
        return false;
    };
    owner == node || modified.is_some_and(|m| now - m >= FOREIGN_DEBRIS_AGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debris_rules() {
        let now = Utc::now();
        let old = Some(now - chrono::TimeDelta::hours(25));
        let fresh = Some(now - chrono::TimeDelta::minutes(5));
        let mine = partial_name("2026-11-25_023012", "master-0");
        assert!(is_removable_debris(&mine, "master-0", fresh, now));
        assert!(!is_removable_debris(&mine, "master-1", fresh, now));
        assert!(!is_removable_debris(&mine, "master-1", None, now));
        assert!(is_removable_debris(&mine, "master-1", old, now));
        // Node names may contain '-'.
        let dashed = partial_name("x", "ip-10-0-1-2");
        assert!(is_removable_debris(&dashed, "ip-10-0-1-2", fresh, now));
        assert!(!is_removable_debris(&dashed, "ip-10-0-1", fresh, now));
        assert!(!is_removable_debris("2026-11-25_023012", "master-0", old, now));
        assert!(!is_removable_debris(".hidden", "master-0", old, now));
        assert!(is_set_name("2026-11-25_023012"));
        assert!(!is_set_name(&mine));
        assert!(!is_set_name(".."));
    }

    #[test]
    fn size_damage_names_each_file_and_what_is_wrong() {
        let m: Manifest = serde_json::from_value(serde_json::json!({
            "format_version": 1, "id": "2026-11-25_023012", "created": "2026-11-25T02:30:12Z",
            "cluster_name": "c", "trigger": "manual", "node": "n", "openshift": null,
            "etcd": {"endpoint": "http://127.0.0.1:2379", "member_id": "1", "cluster_id": "2",
                     "version": "3.5.0", "revision": 1, "db_size": 1},
            "files": [{"name": "snapshot_2026-11-25_023012.db", "stored_name": "snapshot_2026-11-25_023012.db",
                       "size": 2000, "sha256": "ab", "stored_size": 2000, "stored_sha256": "ab",
                       "compression": "none", "encryption": "none"}],
            "tool": {"name": "etcd-backupd", "version": "0"},
        }))
        .unwrap();
        let f = &m.files[0];
        let right = f.stored_size;
        assert_eq!(size_damage(&m, "t", |_| Some(Some(right))), None);
        assert_eq!(
            size_damage(&m, "t", |_| None).unwrap(),
            format!("'{}' is missing", f.stored_name)
        );
        assert_eq!(
            size_damage(&m, "t", |_| Some(Some(right + 1))).unwrap(),
            format!(
                "'{}' is {} bytes, the manifest records {right}",
                f.stored_name,
                right + 1
            )
        );
        assert!(size_damage(&m, "t", |_| Some(None)).unwrap().contains("no size"));
        // A file held by another target on purpose is not missing here.
        let mut split = m.clone();
        split.files[0].targets = vec!["vault".into()];
        assert_eq!(size_damage(&split, "t", |_| None), None);
        assert!(size_damage(&split, "vault", |_| None).is_some());
    }
}
