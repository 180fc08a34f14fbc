//! The set protocol, written once for every kind of target: [`SetStore`] turns an
//! [`ObjectStore`] into a [`Target`].
//!
//! A set is stored so that no reader ever sees part of one:
//! - [`Commit::Rename`]: every file goes into the hidden folder
//!   `<cluster>/.<id>.partial-<node>-<random>/`, then `SHA256SUMS` and the signature, the
//!   sizes are checked with a listing (and with `verify_upload = "read-back"` every file is
//!   read back), `manifest.json` goes last, and the folder is renamed to `<cluster>/<id>/`
//!   without replacing anything, then checked again where it landed (a server whose rename
//!   is a copy may have moved part of it).
//! - [`Commit::ManifestLast`]: the marker `<cluster>/<id>/.partial-<node>` goes first (it
//!   names the node writing), then the files under their final names with writes guarded,
//!   the same checks, `manifest.json`, and the marker is removed.
//!
//! Debris (a draft a crash left) is removed by the node that wrote it at its next set, and
//! by any node once nothing in it has changed for a day ([`FOREIGN_DEBRIS_AGE`]). A set is
//! removed manifest first, so that a removal cut short never leaves a set that looks
//! complete.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use super::objects::{Body, Commit, Entry, Guard, Kind, Moved, ObjectStore, Put};
use super::{Draft, FileReader, JOURNAL_FOLDER, ListedSet, MANIFEST_CAP, Sent, SetExists, StagedSet, Target};
use crate::growing::Follower;
use crate::manifest::{MANIFEST, Manifest, PARTIAL_MARK, is_set_name, safe_component};

/// How old another node's draft must be before this node removes it: that node may still be
/// uploading.
pub const FOREIGN_DEBRIS_AGE: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// A target: the set protocol over one kind's objects.
#[derive(Clone)]
pub struct SetStore<S> {
    store: S,
}

impl<S: ObjectStore> SetStore<S> {
    pub fn new(store: S) -> SetStore<S> {
        SetStore { store }
    }

    /// The objects underneath, for tests that look at them.
    pub fn objects(&self) -> &S {
        &self.store
    }

    fn name(&self) -> &str {
        self.store.name()
    }

    fn taken(&self, cluster: &str, id: &str) -> anyhow::Error {
        SetExists {
            target: self.name().to_string(),
            id: id.to_string(),
            at: self.store.describe(&[cluster, id]),
        }
        .into()
    }

    /// Writes `body` at `path` and returns what was sent; a guarded write that finds
    /// another file there means another set has this id.
    async fn put_checked(&self, path: &[&str], body: Body<'_>, guard: Guard) -> Result<Sent> {
        match self.store.put(path, body, guard).await? {
            Put::Stored { size, sha256 } => Ok(Sent {
                name: path.last().copied().unwrap_or_default().to_string(),
                size,
                sha256,
            }),
            Put::Taken => Err(self.taken(path[0], path[1])),
        }
    }

    /// The guard a set's files are written with: only where they go straight under their
    /// final names can another set's files be there.
    fn guard(&self) -> Guard {
        match self.store.commit() {
            Commit::Rename => Guard::Replace,
            Commit::ManifestLast => Guard::NoReplace,
        }
    }

    /// Uploads what the draft lacks of `set` into `folder`, then the closing files, checks
    /// what landed, and writes the manifest, last. Returns the sizes of the files it wrote
    /// besides the manifest's list (the closing files and the manifest itself).
    async fn upload(
        &self,
        folder: &[&str],
        draft: &Draft,
        set: &StagedSet,
        abort: &CancellationToken,
    ) -> Result<Vec<(&'static str, usize)>> {
        let guard = self.guard();
        for f in set.manifest.files_on(self.name()) {
            if draft.has(f) {
                continue;
            }
            let started = Instant::now();
            let path = [folder, &[f.stored_name.as_str()]].concat();
            let staged = set.dir.join(&f.stored_name);
            let body = Body::File {
                path: &staged,
                size: f.stored_size,
            };
            let sent = self.put_checked(&path, body, guard).await?;
            if sent.size != f.stored_size || sent.sha256.as_ref().is_some_and(|h| *h != f.stored_sha256) {
                bail!(
                    "target '{}': '{}' was sent as {} bytes with SHA-256 {}, but the manifest records {} bytes with {}",
                    self.name(),
                    f.stored_name,
                    sent.size,
                    sent.sha256.as_deref().unwrap_or("unknown"),
                    f.stored_size,
                    f.stored_sha256
                );
            }
            log_upload(self.name(), &f.stored_name, f.stored_size, started, "uploaded");
        }
        // SHA256SUMS and the signature before the manifest: every visible set is signed.
        let closing = set.closing_files()?;
        for (name, bytes) in &closing {
            self.put_checked(&[folder, &[*name]].concat(), Body::Bytes(bytes), guard)
                .await?;
        }
        let mut sizes: Vec<(&'static str, usize)> = closing.iter().map(|(n, b)| (*n, b.len())).collect();
        // Checked before the manifest goes: it is the last thing written.
        self.check_landed(folder, &set.manifest, &sizes, self.store.reads_back())
            .await?;
        if abort.is_cancelled() {
            bail!(
                "target '{}': the run was stopped before the set's manifest was written",
                self.name()
            );
        }
        let json = set.manifest_json();
        self.put_checked(&[folder, &[MANIFEST]].concat(), Body::Bytes(&json), guard)
            .await?;
        sizes.push((MANIFEST, json.len()));
        Ok(sizes)
    }

    /// Checks that every file of `manifest` this target holds, and each of `extra` (name,
    /// size), is in `folder` at its size (and, with `read_back`, the SHA-256 of every file).
    async fn check_landed(
        &self,
        folder: &[&str],
        manifest: &Manifest,
        extra: &[(&str, usize)],
        read_back: bool,
    ) -> Result<()> {
        let shown = self.store.describe(folder);
        let landed = self
            .store
            .list(folder)
            .await?
            .ok_or_else(|| anyhow!("target '{}': '{shown}' vanished", self.name()))?;
        let expected = manifest
            .files_on(self.name())
            .map(|f| (f.stored_name.as_str(), f.stored_size))
            .chain(extra.iter().map(|(n, s)| (*n, *s as u64)));
        for (name, want) in expected {
            let size = landed
                .iter()
                .find(|e| e.kind == Kind::File && e.name == name)
                .and_then(|e| e.size);
            if size != Some(want) {
                bail!(
                    "target '{}': '{name}' in '{shown}' has size {} but {want} bytes were sent",
                    self.name(),
                    size.map_or("unknown".to_string(), |s| s.to_string())
                );
            }
        }
        if read_back {
            for f in manifest.files_on(self.name()) {
                let path = [folder, &[f.stored_name.as_str()]].concat();
                let (n, sha) = self.read_back(&path).await?;
                if n != f.stored_size || sha != f.stored_sha256 {
                    bail!(
                        "target '{}': '{}' reads back as {n} bytes with SHA-256 {sha}, not what was sent",
                        self.name(),
                        f.stored_name
                    );
                }
            }
        }
        Ok(())
    }

    /// The size and SHA-256 of the file at `path`, read back.
    async fn read_back(&self, path: &[&str]) -> Result<(u64, String)> {
        let mut reader = self.open(path).await?;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0u64;
        loop {
            let got = reader
                .read(&mut buf)
                .await
                .with_context(|| format!("target '{}': reading '{}'", self.name(), self.store.describe(path)))?;
            if got == 0 {
                return Ok((n, hex::encode(hash.finalize())));
            }
            hash.update(&buf[..got]);
            n += got as u64;
        }
    }

    async fn open(&self, path: &[&str]) -> Result<FileReader> {
        self.store
            .get(path)
            .await?
            .ok_or_else(|| anyhow!("target '{}': '{}' not found", self.name(), self.store.describe(path)))
    }

    /// The manifest at `path`, at most [`MANIFEST_CAP`] bytes; `None` when there is none.
    async fn read_manifest(&self, path: &[&str]) -> Result<Option<Vec<u8>>> {
        let Some(reader) = self.store.get(path).await? else {
            return Ok(None);
        };
        let mut body = Vec::new();
        reader
            .take(MANIFEST_CAP + 1)
            .read_to_end(&mut body)
            .await
            .with_context(|| format!("target '{}': reading '{}'", self.name(), self.store.describe(path)))?;
        if body.len() as u64 > MANIFEST_CAP {
            bail!(
                "target '{}': '{}' is larger than {MANIFEST_CAP} bytes",
                self.name(),
                self.store.describe(path)
            );
        }
        Ok(Some(body))
    }

    /// Removes a set, manifest first.
    async fn remove_set(&self, cluster: &str, id: &str) -> Result<()> {
        self.store.delete(&[cluster, id, MANIFEST]).await?;
        self.store.delete_folder(&[cluster, id]).await
    }
}

/// What a cluster folder holds under one id, on a [`Commit::ManifestLast`] target.
#[derive(Debug, Default)]
struct InPlace {
    /// Files but the markers (`manifest.json` included).
    files: Vec<Entry>,
    /// `.partial-<node>` markers: the node, and when it was written.
    markers: Vec<(String, Entry)>,
    uploads: Vec<Entry>,
}

impl InPlace {
    fn of(entries: Vec<Entry>) -> InPlace {
        let mut set = InPlace::default();
        for e in entries {
            match (e.kind, e.name.strip_prefix(PARTIAL_MARK)) {
                (Kind::File, Some(node)) => set.markers.push((node.to_string(), e)),
                (Kind::File, None) => set.files.push(e),
                (Kind::Upload, _) => set.uploads.push(e),
                (Kind::Folder, _) => {}
            }
        }
        set
    }

    fn has_manifest(&self) -> bool {
        self.files.iter().any(|e| e.name == MANIFEST)
    }

    /// When anything in it last changed.
    fn newest(&self) -> Option<DateTime<Utc>> {
        let files = self.files.iter().chain(self.markers.iter().map(|(_, e)| e));
        files.chain(&self.uploads).filter_map(|e| e.modified).max()
    }

    /// An incomplete set this node may remove: its own, or anyone's a day old.
    fn is_debris(&self, node: &str, now: DateTime<Utc>) -> bool {
        !self.has_manifest()
            && (self.markers.iter().any(|(n, _)| n == node)
                || self.newest().is_some_and(|t| now - t >= FOREIGN_DEBRIS_AGE))
    }
}

impl<S: ObjectStore> SetStore<S> {
    /// What each id of `cluster` holds (a [`Commit::ManifestLast`] target).
    async fn in_place(&self, cluster: &str) -> Result<BTreeMap<String, InPlace>> {
        // The journal's folder beside the sets is not a set (nor debris, however old).
        let listed = self
            .store
            .list_subfolders(&[cluster], &|name| name != JOURNAL_FOLDER)
            .await?;
        let mut sets: BTreeMap<String, Vec<Entry>> = listed.into_iter().collect();
        for (id, upload) in self.store.uploads(&[cluster]).await? {
            if id != JOURNAL_FOLDER {
                sets.entry(id).or_default().push(upload);
            }
        }
        Ok(sets.into_iter().map(|(id, e)| (id, InPlace::of(e))).collect())
    }

    /// Removes this node's drafts in `cluster`, and other nodes' a day old; in complete sets,
    /// markers and uploads left over the same way. Returns how many drafts went.
    async fn remove_debris_in(&self, cluster: &str, node: &str) -> Result<usize> {
        match self.store.commit() {
            Commit::Rename => {
                let entries = self.store.list(&[cluster]).await?.unwrap_or_default();
                Ok(self.remove_hidden_drafts(cluster, &entries, node).await)
            }
            Commit::ManifestLast => {
                let sets = self.in_place(cluster).await?;
                Ok(self.remove_in_place_debris(cluster, &sets, node).await)
            }
        }
    }

    async fn remove_hidden_drafts(&self, cluster: &str, entries: &[Entry], node: &str) -> usize {
        let now = Utc::now();
        let mut count = 0;
        for e in entries
            .iter()
            .filter(|e| is_removable_debris(&e.name, node, e.modified, now))
        {
            match self.store.delete_folder(&[cluster, &e.name]).await {
                Ok(()) => {
                    count += 1;
                    tracing::info!(target_name = %self.name(), name = %e.name, "removed an incomplete set left by an earlier run")
                }
                Err(err) => {
                    tracing::warn!(target_name = %self.name(), name = %e.name, error = %crate::error::one_line(&err), "cannot remove an incomplete set")
                }
            }
        }
        count
    }

    async fn remove_in_place_debris(&self, cluster: &str, sets: &BTreeMap<String, InPlace>, node: &str) -> usize {
        let now = Utc::now();
        let old = |t: Option<DateTime<Utc>>| t.is_some_and(|t| now - t >= FOREIGN_DEBRIS_AGE);
        let mut count = 0;
        for (id, set) in sets {
            let outcome = if set.is_debris(node, now) {
                let r = self.clear_in_place(cluster, id, set).await;
                if r.is_ok() {
                    count += 1;
                    tracing::info!(target_name = %self.name(), name = %id, "removed an incomplete set left by an earlier run");
                }
                r
            } else if set.has_manifest() {
                self.remove_leftovers(cluster, id, set, node, &old).await
            } else {
                Ok(())
            };
            if let Err(e) = outcome {
                tracing::warn!(target_name = %self.name(), name = %id, error = %crate::error::one_line(&e), "cannot remove an incomplete set");
            }
        }
        count
    }

    /// In a complete set: this node's markers and uploads, and others' a day old.
    async fn remove_leftovers(
        &self,
        cluster: &str,
        id: &str,
        set: &InPlace,
        node: &str,
        old: &(dyn Fn(Option<DateTime<Utc>>) -> bool + Sync),
    ) -> Result<()> {
        let own = set.markers.iter().any(|(n, _)| n == node);
        if own {
            self.store.abort_uploads(&[cluster, id], None).await?;
        } else if set.uploads.iter().any(|u| old(u.modified)) {
            let before = Utc::now() - FOREIGN_DEBRIS_AGE;
            self.store.abort_uploads(&[cluster, id], Some(before)).await?;
        }
        for (n, e) in &set.markers {
            if n == node || old(e.modified) {
                self.store.delete(&[cluster, id, &e.name]).await?;
            }
        }
        Ok(())
    }

    /// Removes an incomplete set written in place: its uploads, its files, its markers last
    /// (so that a removal cut short still says whose set it was).
    async fn clear_in_place(&self, cluster: &str, id: &str, set: &InPlace) -> Result<()> {
        if !set.uploads.is_empty() {
            self.store.abort_uploads(&[cluster, id], None).await?;
        }
        for e in &set.files {
            self.store.delete(&[cluster, id, &e.name]).await?;
        }
        for (_, e) in &set.markers {
            self.store.delete(&[cluster, id, &e.name]).await?;
        }
        Ok(())
    }

    /// Takes away what this node wrote of set `id`: every file when it has no manifest,
    /// else only its marker.
    async fn clear_draft(&self, cluster: &str, id: &str, marker: &str) -> Result<()> {
        let entries = self.store.list(&[cluster, id]).await?.unwrap_or_default();
        let mut set = InPlace::of(entries);
        set.uploads = self
            .store
            .uploads(&[cluster])
            .await?
            .into_iter()
            .filter(|(i, _)| i == id)
            .map(|(_, u)| u)
            .collect();
        if set.has_manifest() {
            self.store.delete(&[cluster, id, marker]).await
        } else {
            self.clear_in_place(cluster, id, &set).await
        }
    }

    async fn begin_renamed(&self, cluster: &str, node: &str, id: &str) -> Result<Draft> {
        self.store.make_folder(&[cluster]).await?;
        let entries = self.store.list(&[cluster]).await?.unwrap_or_default();
        self.remove_hidden_drafts(cluster, &entries, node).await;
        if entries.iter().any(|e| e.name == id) {
            return Err(self.taken(cluster, id));
        }
        let folder = partial_name(id, node);
        self.store.make_folder(&[cluster, &folder]).await?;
        Ok(Draft::new(cluster, id, folder))
    }

    async fn begin_in_place(&self, cluster: &str, node: &str, id: &str) -> Result<Draft> {
        let sets = self.in_place(cluster).await?;
        self.remove_in_place_debris(cluster, &sets, node).await;
        if let Some(set) = sets.get(id)
            && !set.is_debris(node, Utc::now())
        {
            // A complete set, or another node's upload of this id still in progress.
            return Err(self.taken(cluster, id));
        }
        let marker = format!("{PARTIAL_MARK}{node}");
        let note = format!(
            "etcd-backupd: set {id} is being stored by {node} since {}\n",
            Utc::now().to_rfc3339()
        );
        // Not guarded: this node's own marker is the only one that may be there.
        self.store
            .put(&[cluster, id, &marker], Body::Bytes(note.as_bytes()), Guard::Replace)
            .await?;
        // Another node that began the same id at the same moment: neither goes on.
        let now = self.store.list(&[cluster, id]).await?.unwrap_or_default();
        let set = InPlace::of(now);
        if set.has_manifest() || set.markers.iter().any(|(n, _)| n != node) {
            if let Err(e) = self.store.delete(&[cluster, id, &marker]).await {
                tracing::warn!(target_name = %self.name(), error = %crate::error::one_line(&e), "cannot remove the upload marker");
            }
            return Err(self.taken(cluster, id));
        }
        let mut draft = Draft::new(cluster, id, id.to_string());
        draft.marker = Some(marker);
        Ok(draft)
    }

    async fn finish_renamed(&self, draft: &Draft, set: &StagedSet, abort: &CancellationToken) -> Result<()> {
        let (cluster, id) = (draft.cluster.as_str(), set.manifest.id.as_str());
        let tmp = [cluster, draft.folder.as_str()];
        let moved = async {
            let sizes = self.upload(&tmp, draft, set, abort).await?;
            if abort.is_cancelled() {
                bail!(
                    "target '{}': the run was stopped before the set was moved into place",
                    self.name()
                );
            }
            match self.store.rename_folder(&tmp, &[cluster, id]).await? {
                Moved::Done => Ok(sizes),
                Moved::Exists => Err(self.taken(cluster, id)),
                // Ours landed, or another set holds the id, or nothing says which.
                Moved::Unsure(e) => match self.read_manifest(&[cluster, id, MANIFEST]).await.ok().flatten() {
                    Some(b) if Manifest::parse(&b).ok().as_ref() == Some(&set.manifest) => Ok(sizes),
                    Some(_) => Err(self.taken(cluster, id)),
                    None => Err(e),
                },
            }
        }
        .await;
        let sizes = match moved {
            Ok(sizes) => sizes,
            Err(e) => {
                if let Err(d) = self.store.delete_folder(&tmp).await {
                    tracing::warn!(target_name = %self.name(), error = %crate::error::one_line(&d), "cannot remove the incomplete upload");
                }
                return Err(e);
            }
        };
        // A server whose rename is a copy (across devices, or an object store behind WebDAV)
        // may have moved part of it: check the set where it landed, and take it down if it
        // is incomplete.
        if let Err(e) = self.check_landed(&[cluster, id], &set.manifest, &sizes, false).await {
            if let Err(d) = self.remove_set(cluster, id).await {
                tracing::warn!(target_name = %self.name(), error = %crate::error::one_line(&d), "cannot remove an incomplete set");
            }
            return Err(e.context("the set was incomplete after it was moved into place and has been removed"));
        }
        Ok(())
    }

    async fn finish_in_place(&self, draft: &Draft, set: &StagedSet, abort: &CancellationToken) -> Result<()> {
        let (cluster, id) = (draft.cluster.as_str(), set.manifest.id.as_str());
        let marker = draft.marker.as_deref().unwrap_or_default();
        if let Err(e) = self.upload(&[cluster, id], draft, set, abort).await {
            // Another set is there: only the marker is ours to take away.
            let cleared = if e.downcast_ref::<SetExists>().is_some() {
                self.store.delete(&[cluster, id, marker]).await
            } else {
                self.clear_draft(cluster, id, marker).await
            };
            if let Err(d) = cleared {
                tracing::warn!(target_name = %self.name(), error = %crate::error::one_line(&d), "cannot remove the incomplete upload");
            }
            return Err(e);
        }
        // The set is complete with its manifest; a marker left behind is removed later.
        if let Err(e) = self.store.delete(&[cluster, id, marker]).await {
            tracing::warn!(target_name = %self.name(), error = %crate::error::one_line(&e), "cannot remove the upload marker of a stored set");
        }
        Ok(())
    }

    /// The complete sets of `cluster`, damaged ones marked.
    async fn sets_of(&self, cluster: &str, out: &mut Vec<ListedSet>) -> Result<()> {
        let listed = self.store.list_subfolders(&[cluster], &is_set_name).await?;
        for (id, files) in listed {
            if !files.iter().any(|e| e.kind == Kind::File && e.name == MANIFEST) {
                continue; // not a complete set
            }
            let path = [cluster, id.as_str(), MANIFEST];
            let at = self.store.describe(&path);
            // Gone since the listing: removed meanwhile.
            let Some(body) = self.read_manifest(&path).await? else {
                continue;
            };
            let Some(m) = listed_manifest(self.name(), &at, &id, &body) else {
                continue;
            };
            let damaged = size_damage(&m, self.name(), |name| {
                files
                    .iter()
                    .find(|e| e.kind == Kind::File && e.name == name)
                    .map(|e| e.size)
            });
            if let Some(d) = &damaged {
                tracing::warn!(target_name = %self.name(), set = %self.store.describe(&[cluster, &id]), damage = %d, "a damaged set");
            }
            out.push(ListedSet {
                cluster: cluster.to_string(),
                manifest: m,
                damaged,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl<S: ObjectStore> Target for SetStore<S> {
    fn name(&self) -> &str {
        self.store.name()
    }

    fn describe(&self, cluster: &str, id: &str) -> String {
        self.store.describe(&[cluster, id])
    }

    fn route(&self) -> String {
        self.store.route()
    }

    async fn preflight(&self) -> Result<()> {
        self.store.preflight().await
    }

    async fn begin_set(&self, cluster: &str, node: &str, id: &str) -> Result<Draft> {
        if !safe_component(cluster) || !is_set_name(id) {
            bail!("target '{}': {cluster:?}/{id:?} is not a valid set name", self.name());
        }
        match self.store.commit() {
            Commit::Rename => self.begin_renamed(cluster, node, id).await,
            Commit::ManifestLast => self.begin_in_place(cluster, node, id).await,
        }
    }

    async fn put_growing(&self, draft: &Draft, name: &str, file: Follower) -> Result<Sent> {
        let started = Instant::now();
        let path = [draft.cluster.as_str(), draft.folder.as_str(), name];
        let sent = self.put_checked(&path, Body::Growing(file), self.guard()).await?;
        log_upload(self.name(), name, sent.size, started, "uploaded while it was written");
        Ok(sent)
    }

    async fn finish_set(&self, draft: Draft, set: &StagedSet, abort: &CancellationToken) -> Result<()> {
        match self.store.commit() {
            Commit::Rename => self.finish_renamed(&draft, set, abort).await,
            Commit::ManifestLast => self.finish_in_place(&draft, set, abort).await,
        }
    }

    async fn discard(&self, draft: Draft) -> Result<()> {
        match &draft.marker {
            None => self.store.delete_folder(&[&draft.cluster, &draft.folder]).await,
            Some(marker) => self.clear_draft(&draft.cluster, &draft.id, marker).await,
        }
    }

    async fn list_all_sets(&self, cluster: Option<&str>) -> Result<Vec<ListedSet>> {
        let clusters: Vec<String> = match cluster {
            Some(c) => vec![c.to_string()],
            None => self
                .store
                .list(&[])
                .await?
                .unwrap_or_default()
                .into_iter()
                .filter(|e| e.kind == Kind::Folder && is_set_name(&e.name))
                .map(|e| e.name)
                .collect(),
        };
        let mut sets = Vec::new();
        for c in clusters {
            self.sets_of(&c, &mut sets).await?;
        }
        sort_newest_first(&mut sets);
        Ok(sets)
    }

    async fn open_file(&self, cluster: &str, id: &str, name: &str) -> Result<FileReader> {
        if !is_set_name(id) {
            bail!("target '{}': {id:?} is not a set name", self.name());
        }
        self.open(&[cluster, id, name]).await
    }

    async fn delete_set(&self, cluster: &str, id: &str) -> Result<()> {
        if !is_set_name(id) {
            bail!("target '{}': {id:?} is not a set name", self.name());
        }
        self.remove_set(cluster, id).await
    }

    async fn remove_debris(&self, cluster: &str, node: &str) -> Result<usize> {
        if !safe_component(cluster) {
            bail!(
                "target '{}': {cluster:?} is not a valid cluster folder name",
                self.name()
            );
        }
        self.remove_debris_in(cluster, node).await
    }

    async fn put_journal(&self, cluster: &str, name: &str, bytes: &[u8]) -> Result<()> {
        self.journal_path(cluster, name)?;
        self.store.make_folder(&[cluster]).await?;
        self.store.make_folder(&[cluster, JOURNAL_FOLDER]).await?;
        self.store
            .put(&[cluster, JOURNAL_FOLDER, name], Body::Bytes(bytes), Guard::Replace)
            .await?;
        Ok(())
    }

    async fn list_journal(&self, cluster: &str) -> Result<Vec<(String, Option<u64>)>> {
        self.journal_path(cluster, "x")?;
        Ok(self
            .store
            .list(&[cluster, JOURNAL_FOLDER])
            .await?
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.kind == Kind::File)
            .map(|e| (e.name, e.size))
            .collect())
    }

    async fn read_journal(&self, cluster: &str, name: &str, cap: u64) -> Result<Option<Vec<u8>>> {
        self.journal_path(cluster, name)?;
        let Some(reader) = self.store.get(&[cluster, JOURNAL_FOLDER, name]).await? else {
            return Ok(None);
        };
        let mut body = Vec::new();
        reader.take(cap + 1).read_to_end(&mut body).await?;
        if body.len() as u64 > cap {
            bail!(
                "target '{}': journal object {name} is larger than {cap} bytes",
                self.name()
            );
        }
        Ok(Some(body))
    }

    async fn delete_journal(&self, cluster: &str, name: &str) -> Result<()> {
        self.journal_path(cluster, name)?;
        self.store.delete(&[cluster, JOURNAL_FOLDER, name]).await
    }
}

impl<S: ObjectStore> SetStore<S> {
    /// Refuses a cluster folder or journal object name that is not a plain name.
    fn journal_path(&self, cluster: &str, name: &str) -> Result<()> {
        if !safe_component(cluster) || !safe_component(name) {
            bail!("target '{}': {cluster:?}/{name:?} is not a journal path", self.name());
        }
        Ok(())
    }
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

/// The manifest of set `id` as read from `at` on target `target`; `None`, with a warning,
/// when it is unreadable or names another set (the set is then not listed).
fn listed_manifest(target: &str, at: &str, id: &str, body: &[u8]) -> Option<Manifest> {
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

/// Orders sets as [`Target::list_all_sets`] returns them: newest first (ids are times),
/// then by cluster.
fn sort_newest_first(sets: &mut [ListedSet]) {
    sets.sort_by(|a, b| b.manifest.id.cmp(&a.manifest.id).then(a.cluster.cmp(&b.cluster)));
}

/// Logs that `file` (`bytes` long) went to target `target`, and how fast since `started`;
/// `what` is the message: how it was uploaded.
fn log_upload(target: &str, file: &str, bytes: u64, started: Instant, what: &str) {
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
    use tokio::io::AsyncReadExt;

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

    use crate::targets::memory::{Fault, MemoryStore};
    use sha2::Digest;

    const ID: &str = "2026-11-25_023012";

    /// A set staged in `dir`: a snapshot of a few bytes and its manifest.
    fn staged(dir: &std::path::Path, id: &str) -> StagedSet {
        let name = crate::manifest::snapshot_name(id);
        let bytes = format!("snapshot of {id}").into_bytes();
        std::fs::write(dir.join(&name), &bytes).unwrap();
        let sha = hex::encode(Sha256::digest(&bytes));
        let manifest: Manifest = serde_json::from_value(serde_json::json!({
            "format_version": 1, "id": id, "created": "2026-11-25T02:30:12Z",
            "cluster_name": "c", "trigger": "manual", "node": "n1", "openshift": null,
            "etcd": {"endpoint": "http://127.0.0.1:2379", "member_id": "1", "cluster_id": "2",
                     "version": "3.5.0", "revision": 1, "db_size": 1},
            "files": [{"name": name, "stored_name": name, "size": bytes.len(), "sha256": sha,
                       "stored_size": bytes.len(), "stored_sha256": sha,
                       "compression": "none", "encryption": "none"}],
            "tool": {"name": "etcd-backupd", "version": "0"},
        }))
        .unwrap();
        std::fs::write(dir.join(MANIFEST), manifest.to_json()).unwrap();
        StagedSet {
            dir: dir.to_path_buf(),
            manifest,
        }
    }

    fn both() -> [SetStore<MemoryStore>; 2] {
        [
            SetStore::new(MemoryStore::renaming("t")),
            SetStore::new(MemoryStore::in_place("t")),
        ]
    }

    /// Nothing of set `id` is left on `t`: no file, no draft, no marker.
    fn assert_nothing_of(t: &SetStore<MemoryStore>, id: &str) {
        let paths = t.objects().paths();
        assert!(paths.iter().all(|p| !p.contains(id)), "{paths:?}");
    }

    async fn read_all(t: &SetStore<MemoryStore>, name: &str) -> Vec<u8> {
        let mut r = t.open_file("c", ID, name).await.unwrap();
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn a_set_is_stored_whole_listed_read_never_replaced_and_removed_on_either_commit() {
        let dir = tempfile::tempdir().unwrap();
        let set = staged(dir.path(), ID);
        let never = CancellationToken::new();
        for t in both() {
            t.put_set("c", "n1", &set, &never).await.unwrap();
            let listed = t.list_all_sets(None).await.unwrap();
            assert_eq!(listed.len(), 1, "{:?}", t.objects().paths());
            assert_eq!(listed[0].manifest, set.manifest);
            assert_eq!(listed[0].damaged, None);
            let name = &set.manifest.files[0].stored_name;
            assert_eq!(read_all(&t, name).await, std::fs::read(dir.path().join(name)).unwrap());
            assert_eq!(read_all(&t, MANIFEST).await, set.manifest_json());
            // No draft, no marker left.
            assert!(t.hidden().is_empty(), "{:?}", t.objects().paths());
            assert!(!t.objects().paths().iter().any(|p| p.contains(PARTIAL_MARK)));

            let again = t.put_set("c", "n2", &set, &never).await.unwrap_err();
            assert!(again.downcast_ref::<SetExists>().is_some(), "{again:#}");
            assert_eq!(t.list_sets(Some("c")).await.unwrap().len(), 1);

            t.delete_set("c", ID).await.unwrap();
            assert!(t.list_all_sets(None).await.unwrap().is_empty());
            assert_nothing_of(&t, ID);
        }
    }

    #[tokio::test]
    async fn a_stopped_run_leaves_no_set_and_no_draft() {
        let dir = tempfile::tempdir().unwrap();
        let set = staged(dir.path(), ID);
        let stopped = CancellationToken::new();
        stopped.cancel();
        for t in both() {
            let e = t.put_set("c", "n1", &set, &stopped).await.unwrap_err();
            assert!(format!("{e:#}").contains("stopped"), "{e:#}");
            assert!(t.list_all_sets(None).await.unwrap().is_empty());
            assert_nothing_of(&t, ID);
        }
    }

    #[tokio::test]
    async fn a_lost_answer_to_the_commit_fails_the_call_but_the_set_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let set = staged(dir.path(), ID);
        for t in both() {
            t.fail(Fault::LoseAnswer);
            assert!(t.put_set("c", "n1", &set, &CancellationToken::new()).await.is_err());
            let listed = t.list_sets(Some("c")).await.unwrap();
            assert_eq!(listed.len(), 1, "{:?}", t.objects().paths());
        }
    }

    #[tokio::test]
    async fn a_rename_whose_answer_was_lost_is_judged_by_the_manifest_at_the_destination() {
        let dir = tempfile::tempdir().unwrap();
        let set = staged(dir.path(), ID);
        // Ours landed: stored.
        let t = SetStore::memory("t");
        t.fail(Fault::Unsure);
        t.put_set("c", "n1", &set, &CancellationToken::new()).await.unwrap();
        assert_eq!(t.ids("c"), [ID]);
        // Another set holds the id: that set only cannot go there.
        let t = SetStore::memory("t");
        let mut other = set.manifest.clone();
        other.node = "n2".into();
        t.insert("c", &other);
        t.fail(Fault::Unsure);
        let e = t.put_set("c", "n1", &set, &CancellationToken::new()).await.unwrap_err();
        assert!(e.downcast_ref::<SetExists>().is_some(), "{e:#}");
    }

    #[tokio::test]
    async fn the_journal_beside_the_sets_is_never_debris() {
        for t in both() {
            t.put_journal(
                "c",
                "0000000000000002-0000000000000003-1700000000000-1700000010000.seg",
                b"x",
            )
            .await
            .unwrap();
            for p in t.objects().paths() {
                let segments: Vec<&str> = p.split('/').collect();
                t.objects().age(&segments, 48);
            }
            assert_eq!(t.remove_debris("c", "n2").await.unwrap(), 0);
            assert_eq!(t.list_journal("c").await.unwrap().len(), 1, "{:?}", t.objects().paths());
        }
    }

    #[tokio::test]
    async fn drafts_are_removed_by_their_node_at_once_and_by_others_after_a_day() {
        let dir = tempfile::tempdir().unwrap();
        let set = staged(dir.path(), ID);
        for t in both() {
            // n1 begins and dies: its draft stays, invisible.
            let draft = t.begin_set("c", "n1", ID).await.unwrap();
            let name = set.manifest.files[0].stored_name.clone();
            let path = ["c", draft.folder.as_str(), name.as_str()];
            let staged_file = dir.path().join(&name);
            let body = Body::File {
                path: &staged_file,
                size: set.manifest.files[0].stored_size,
            };
            t.objects().put(&path, body, Guard::Replace).await.unwrap();
            assert!(t.list_all_sets(None).await.unwrap().is_empty());
            // Another node leaves a fresh draft alone.
            assert_eq!(t.remove_debris("c", "n2").await.unwrap(), 0);
            assert!(t.objects().paths().iter().any(|p| p.ends_with(&name)));
            if t.objects().commit() == Commit::ManifestLast {
                // ... and the same id is taken while n1 may still be writing it.
                let e = t.begin_set("c", "n2", ID).await.unwrap_err();
                assert!(e.downcast_ref::<SetExists>().is_some(), "{e:#}");
                // A day without change, and it is anyone's to remove.
                for p in t.objects().paths() {
                    let segments: Vec<&str> = p.split('/').collect();
                    t.objects().age(&segments, 25);
                }
                assert_eq!(t.remove_debris("c", "n2").await.unwrap(), 1);
            } else {
                // n1's next set removes its own draft.
                assert_eq!(t.remove_debris("c", "n1").await.unwrap(), 1);
            }
            assert_nothing_of(&t, ID);
            t.put_set("c", "n2", &set, &CancellationToken::new()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_file_lost_after_the_set_was_stored_marks_it_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let set = staged(dir.path(), ID);
        for t in both() {
            t.put_set("c", "n1", &set, &CancellationToken::new()).await.unwrap();
            let name = set.manifest.files[0].stored_name.clone();
            t.objects().delete(&["c", ID, &name]).await.unwrap();
            let listed = t.list_all_sets(Some("c")).await.unwrap();
            assert_eq!(
                listed[0].damaged.as_deref(),
                Some(format!("'{name}' is missing").as_str())
            );
            assert!(t.list_sets(Some("c")).await.unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn a_target_that_is_down_stores_nothing_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let set = staged(dir.path(), ID);
        for t in both() {
            t.fail(Fault::Down);
            let e = t.put_set("c", "n1", &set, &CancellationToken::new()).await.unwrap_err();
            assert!(format!("{e:#}").contains("connection refused"), "{e:#}");
            t.heal();
            assert!(t.list_all_sets(None).await.unwrap().is_empty());
        }
    }
}
