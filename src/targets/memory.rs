//! Objects in memory, for unit tests of the set protocol ([`super::sets`]) and of what sits
//! above [`super::Target`]: delivery, retention, restore. Either atomic step can be asked for
//! ([`MemoryStore::renaming`], [`MemoryStore::in_place`]), and it fails on demand, for the
//! faults no real server produces when asked: a target that is down, an answer lost after
//! the commit, a delete refused. Built for `cargo test` only.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use anyhow::{Result, bail};
use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::objects::{Body, Commit, Entry, Guard, Moved, ObjectStore, Put};
use super::{FileReader, SetStore};
use crate::manifest::{MANIFEST, Manifest};

/// A fault the next calls meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Every write fails with this transport error (transient: worth a retry later).
    Down,
    /// The next commit (rename, or the manifest written in place) takes effect, then fails
    /// as if its answer were lost.
    LoseAnswer,
    /// Every delete fails.
    RefuseDelete,
    /// The next rename answers as one whose first answer was lost and whose retry failed
    /// ([`Moved::Unsure`]): having moved the folder if it could.
    Unsure,
}

type Path = Vec<String>;

#[derive(Default)]
struct Store {
    files: BTreeMap<Path, (Vec<u8>, DateTime<Utc>)>,
    folders: BTreeSet<Path>,
    faults: Vec<Fault>,
    /// Every call, in order, for tests that look at what was asked.
    calls: Vec<String>,
}

impl Store {
    fn exists(&self, folder: &[String]) -> bool {
        folder.is_empty()
            || self.folders.contains(folder)
            || self
                .files
                .keys()
                .any(|k| k.len() > folder.len() && k.starts_with(folder))
    }
}

/// Clones share one store: a test keeps one, and hands another to the code under test.
#[derive(Clone)]
pub struct MemoryStore {
    name: String,
    commit: Commit,
    store: Arc<Mutex<Store>>,
}

/// A target in memory.
pub type MemoryTarget = SetStore<MemoryStore>;

fn owned(path: &[&str]) -> Path {
    path.iter().map(|s| s.to_string()).collect()
}

impl MemoryStore {
    /// A store whose sets are renamed into place, as on a directory or WebDAV.
    pub fn renaming(name: &str) -> MemoryStore {
        MemoryStore {
            name: name.to_string(),
            commit: Commit::Rename,
            store: Arc::default(),
        }
    }

    /// A store without rename, as S3: sets are written in place, manifest last, and guarded
    /// writes refuse a taken name.
    pub fn in_place(name: &str) -> MemoryStore {
        MemoryStore {
            commit: Commit::ManifestLast,
            ..MemoryStore::renaming(name)
        }
    }

    /// Every path, files and folders, for tests that look at what is left.
    pub fn paths(&self) -> Vec<String> {
        let store = self.store.lock().unwrap();
        let folders = store.folders.iter().map(|f| format!("{}/", f.join("/")));
        folders.chain(store.files.keys().map(|k| k.join("/"))).collect()
    }

    /// Makes a file older by `hours`, as if written then.
    pub fn age(&self, path: &[&str], hours: i64) {
        let mut store = self.store.lock().unwrap();
        if let Some((_, t)) = store.files.get_mut(&owned(path)) {
            *t -= chrono::TimeDelta::hours(hours);
        }
    }

    /// Records the call; fails if the target is down and this is a write.
    fn enter(&self, call: String, write: bool) -> Result<()> {
        let mut store = self.store.lock().unwrap();
        store.calls.push(call);
        if write && store.faults.contains(&Fault::Down) {
            bail!(crate::targets::retry::TransportError::Transient(format!(
                "target '{}': connection refused",
                self.name
            )));
        }
        Ok(())
    }

    fn take_fault(&self, fault: &Fault) -> bool {
        let mut store = self.store.lock().unwrap();
        match store.faults.iter().position(|f| f == fault) {
            Some(i) => {
                store.faults.remove(i);
                true
            }
            None => false,
        }
    }

    fn lost_answer(&self) -> Result<()> {
        if self.take_fault(&Fault::LoseAnswer) {
            bail!(crate::targets::retry::TransportError::Transient(format!(
                "target '{}': the answer to the commit was lost",
                self.name
            )));
        }
        Ok(())
    }

    fn refuse_delete(&self, path: &[&str]) -> Result<()> {
        if self.store.lock().unwrap().faults.contains(&Fault::RefuseDelete) {
            bail!("target '{}': DELETE '{}': 403 Forbidden", self.name, path.join("/"));
        }
        Ok(())
    }
}

/// The test handles on a target in memory.
impl SetStore<MemoryStore> {
    /// A target in memory whose sets are renamed into place.
    pub fn memory(name: &str) -> MemoryTarget {
        SetStore::new(MemoryStore::renaming(name))
    }

    pub fn fail(&self, fault: Fault) {
        self.objects().store.lock().unwrap().faults.push(fault);
    }

    pub fn heal(&self) {
        self.objects().store.lock().unwrap().faults.clear();
    }

    /// The ids of the complete sets of `cluster`, oldest first.
    pub fn ids(&self, cluster: &str) -> Vec<String> {
        let store = self.objects().store.lock().unwrap();
        store
            .files
            .keys()
            .filter(|k| k.len() == 3 && k[0] == cluster && k[2] == MANIFEST && !k[1].starts_with('.'))
            .map(|k| k[1].clone())
            .collect()
    }

    /// Folders that are not complete sets (drafts, debris).
    pub fn hidden(&self) -> Vec<String> {
        let store = self.objects().store.lock().unwrap();
        let folders = store.folders.iter().chain(store.files.keys());
        let hidden: BTreeSet<String> = folders
            .filter(|p| p.len() >= 2 && p[1].starts_with('.'))
            .map(|p| p[1].clone())
            .collect();
        hidden.into_iter().collect()
    }

    pub fn calls(&self) -> Vec<String> {
        self.objects().store.lock().unwrap().calls.clone()
    }

    /// Puts a set there directly (another node's, an earlier run's).
    pub fn insert(&self, cluster: &str, manifest: &Manifest) {
        let now = Utc::now();
        let mut store = self.objects().store.lock().unwrap();
        let at = |name: &str| owned(&[cluster, &manifest.id, name]);
        for f in &manifest.files {
            store
                .files
                .insert(at(&f.stored_name), (vec![0u8; f.stored_size as usize], now));
        }
        store.files.insert(at(MANIFEST), (manifest.to_json().into_bytes(), now));
        store.folders.insert(owned(&[cluster, &manifest.id]));
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    fn name(&self) -> &str {
        &self.name
    }

    fn describe(&self, path: &[&str]) -> String {
        format!("memory://{}/{}", self.name, path.join("/"))
    }

    fn route(&self) -> String {
        "in memory".into()
    }

    fn commit(&self) -> Commit {
        self.commit
    }

    async fn preflight(&self) -> Result<()> {
        self.enter("preflight".into(), true)
    }

    async fn list(&self, folder: &[&str]) -> Result<Option<Vec<Entry>>> {
        self.enter(format!("list {}", folder.join("/")), false)?;
        let store = self.store.lock().unwrap();
        let folder = owned(folder);
        if !store.exists(&folder) {
            return Ok(None);
        }
        let mut entries = BTreeMap::new();
        for f in &store.folders {
            if f.len() == folder.len() + 1 && f.starts_with(&folder) {
                entries.insert(f[folder.len()].clone(), Entry::folder(&f[folder.len()], None));
            }
        }
        for (k, (bytes, t)) in &store.files {
            if k.len() == folder.len() + 1 && k.starts_with(&folder) {
                let name = &k[folder.len()];
                entries.insert(name.clone(), Entry::file(name, Some(bytes.len() as u64), Some(*t)));
            } else if k.len() > folder.len() + 1 && k.starts_with(&folder) {
                let name = &k[folder.len()];
                entries.entry(name.clone()).or_insert_with(|| Entry::folder(name, None));
            }
        }
        Ok(Some(entries.into_values().collect()))
    }

    async fn make_folder(&self, folder: &[&str]) -> Result<()> {
        self.enter(format!("mkdir {}", folder.join("/")), true)?;
        if self.commit == Commit::Rename {
            self.store.lock().unwrap().folders.insert(owned(folder));
        }
        Ok(())
    }

    async fn put(&self, path: &[&str], body: Body<'_>, guard: Guard) -> Result<Put> {
        self.enter(format!("put {}", path.join("/")), true)?;
        let bytes = match body {
            Body::File { path, .. } => std::fs::read(path)?,
            Body::Bytes(b) => b.to_vec(),
            Body::Growing(file) => {
                use futures_util::StreamExt;
                let mut bytes = Vec::new();
                let mut chunks = std::pin::pin!(file.range(0, u64::MAX, 64 * 1024));
                while let Some(chunk) = chunks.next().await {
                    bytes.extend_from_slice(&chunk?);
                }
                bytes
            }
        };
        let size = bytes.len() as u64;
        {
            let mut store = self.store.lock().unwrap();
            let key = owned(path);
            if guard == Guard::NoReplace && store.files.contains_key(&key) {
                return Ok(Put::Taken);
            }
            store.files.insert(key, (bytes, Utc::now()));
        }
        if self.commit == Commit::ManifestLast && path.last() == Some(&MANIFEST) {
            self.lost_answer()?;
        }
        Ok(Put::Stored { size, sha256: None })
    }

    async fn get(&self, path: &[&str]) -> Result<Option<FileReader>> {
        self.enter(format!("get {}", path.join("/")), false)?;
        let store = self.store.lock().unwrap();
        Ok(store
            .files
            .get(&owned(path))
            .map(|(b, _)| Box::pin(std::io::Cursor::new(b.clone())) as FileReader))
    }

    async fn delete(&self, path: &[&str]) -> Result<()> {
        self.enter(format!("delete {}", path.join("/")), true)?;
        self.refuse_delete(path)?;
        self.store.lock().unwrap().files.remove(&owned(path));
        Ok(())
    }

    async fn delete_folder(&self, folder: &[&str]) -> Result<()> {
        self.enter(format!("rmdir {}", folder.join("/")), true)?;
        self.refuse_delete(folder)?;
        let folder = owned(folder);
        let mut store = self.store.lock().unwrap();
        store.files.retain(|k, _| !k.starts_with(&folder));
        store.folders.retain(|f| !f.starts_with(&folder));
        Ok(())
    }

    async fn rename_folder(&self, from: &[&str], to: &[&str]) -> Result<Moved> {
        self.enter(format!("rename {}", to.join("/")), true)?;
        {
            let (from, to) = (owned(from), owned(to));
            let unsure = {
                let mut store = self.store.lock().unwrap();
                let at = store.faults.iter().position(|f| *f == Fault::Unsure);
                at.map(|i| store.faults.remove(i)).is_some()
            };
            let mut store = self.store.lock().unwrap();
            if store.exists(&to) {
                return Ok(if unsure {
                    Moved::Unsure(anyhow::anyhow!("target '{}': MOVE: 412 after a retry", self.name))
                } else {
                    Moved::Exists
                });
            }
            let moving: Vec<Path> = store.files.keys().filter(|k| k.starts_with(&from)).cloned().collect();
            for k in moving {
                let v = store.files.remove(&k).expect("listed");
                let mut nk = to.clone();
                nk.extend_from_slice(&k[from.len()..]);
                store.files.insert(nk, v);
            }
            store.folders.retain(|f| !f.starts_with(&from));
            store.folders.insert(to);
            if unsure {
                return Ok(Moved::Unsure(anyhow::anyhow!(
                    "target '{}': MOVE: 404 after a retry",
                    self.name
                )));
            }
        }
        self.lost_answer()?;
        Ok(Moved::Done)
    }
}
