//! A target in memory, for unit tests of what sits above [`Target`]: delivery, retention,
//! restore. It keeps the contract the real kinds keep (a set is visible only once complete,
//! never replaced, debris hidden) and fails on demand, for the faults no real server
//! produces when asked: a refusal, a target that is down, an answer lost after the set
//! landed, a delete refused. Built for `cargo test` only.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow, bail};
use async_trait::async_trait;

use super::{
    Draft, FileReader, ListedSet, MANIFEST_CAP, Sent, SetExists, StagedSet, Target, listed_manifest, listed_set,
    sort_newest_first,
};
use crate::growing::Follower;
use crate::manifest::{MANIFEST, Manifest};
use tokio_util::sync::CancellationToken;

/// A fault the next calls meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Every write fails with this transport error (transient: worth a retry later).
    Down,
    /// The next `finish_set` stores the set, then fails as if its answer were lost.
    LoseAnswer,
    /// Every `delete_set` fails.
    RefuseDelete,
}

#[derive(Default)]
struct Store {
    /// `(cluster, folder)` → files by name. A folder named by a set id holds a complete set.
    folders: BTreeMap<(String, String), BTreeMap<String, Vec<u8>>>,
    faults: Vec<Fault>,
    /// Every call, in order, for tests that look at what was asked.
    calls: Vec<String>,
}

/// Clones share one store: a test keeps one, and hands another to the code under test.
#[derive(Clone)]
pub struct MemoryTarget {
    name: String,
    store: Arc<Mutex<Store>>,
}

impl MemoryTarget {
    pub fn new(name: &str) -> MemoryTarget {
        MemoryTarget {
            name: name.to_string(),
            store: Arc::new(Mutex::new(Store::default())),
        }
    }

    pub fn fail(&self, fault: Fault) {
        self.store.lock().unwrap().faults.push(fault);
    }

    pub fn heal(&self) {
        self.store.lock().unwrap().faults.clear();
    }

    /// The ids of the complete sets of `cluster`, oldest first.
    pub fn ids(&self, cluster: &str) -> Vec<String> {
        let store = self.store.lock().unwrap();
        store
            .folders
            .iter()
            .filter(|((c, folder), files)| c == cluster && !folder.starts_with('.') && files.contains_key(MANIFEST))
            .map(|((_, folder), _)| folder.clone())
            .collect()
    }

    /// Folders that are not complete sets (drafts, debris).
    pub fn hidden(&self) -> Vec<String> {
        let store = self.store.lock().unwrap();
        store
            .folders
            .keys()
            .filter(|(_, f)| f.starts_with('.'))
            .map(|(_, f)| f.clone())
            .collect()
    }

    pub fn calls(&self) -> Vec<String> {
        self.store.lock().unwrap().calls.clone()
    }

    /// Puts a set there directly (another node's, an earlier run's).
    pub fn insert(&self, cluster: &str, manifest: &Manifest) {
        let mut files: BTreeMap<String, Vec<u8>> = manifest
            .files
            .iter()
            .map(|f| (f.stored_name.clone(), vec![0u8; f.stored_size as usize]))
            .collect();
        files.insert(MANIFEST.to_string(), manifest.to_json().into_bytes());
        let mut store = self.store.lock().unwrap();
        store.folders.insert((cluster.to_string(), manifest.id.clone()), files);
    }

    /// Records the call; fails if `fault` is set (`Down` fails every write).
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
}

#[async_trait]
impl Target for MemoryTarget {
    fn name(&self) -> &str {
        &self.name
    }

    fn describe(&self, cluster: &str, id: &str) -> String {
        format!("memory://{}/{cluster}/{id}/", self.name)
    }

    fn route(&self) -> String {
        "in memory".into()
    }

    async fn preflight(&self) -> Result<()> {
        self.enter("preflight".into(), true)
    }

    async fn begin_set(&self, cluster: &str, node: &str, id: &str) -> Result<Draft> {
        self.enter(format!("begin {id}"), true)?;
        self.remove_debris(cluster, node).await?;
        let mut store = self.store.lock().unwrap();
        if store.folders.contains_key(&(cluster.to_string(), id.to_string())) {
            bail!(SetExists {
                target: self.name.clone(),
                id: id.to_string(),
                at: self.describe(cluster, id),
            });
        }
        let folder = super::partial_name(id, node);
        store
            .folders
            .insert((cluster.to_string(), folder.clone()), BTreeMap::new());
        Ok(Draft::new(cluster, id, folder))
    }

    async fn put_growing(&self, draft: &Draft, name: &str, file: Follower) -> Result<Sent> {
        self.enter(format!("put_growing {name}"), true)?;
        let mut bytes = Vec::new();
        let mut chunks = std::pin::pin!(file.range(0, u64::MAX, 64 * 1024));
        use futures_util::StreamExt;
        while let Some(chunk) = chunks.next().await {
            bytes.extend_from_slice(&chunk?);
        }
        let sent = Sent {
            name: name.to_string(),
            size: bytes.len() as u64,
            sha256: None,
        };
        let mut store = self.store.lock().unwrap();
        let key = (draft.cluster.clone(), draft.folder.clone());
        store
            .folders
            .get_mut(&key)
            .ok_or_else(|| anyhow!("target '{}': the draft is gone", self.name))?
            .insert(name.to_string(), bytes);
        Ok(sent)
    }

    async fn finish_set(&self, draft: Draft, set: &StagedSet, abort: &CancellationToken) -> Result<()> {
        self.enter(format!("finish {}", draft.id), true)?;
        let mut files = BTreeMap::new();
        for f in set.manifest.files_on(&self.name) {
            files.insert(f.stored_name.clone(), std::fs::read(set.dir.join(&f.stored_name))?);
        }
        for (name, bytes) in set.closing_files()? {
            files.insert(name.to_string(), bytes);
        }
        files.insert(MANIFEST.to_string(), set.manifest_json());
        let mut store = self.store.lock().unwrap();
        store.folders.remove(&(draft.cluster.clone(), draft.folder.clone()));
        if abort.is_cancelled() {
            bail!(
                "target '{}': the run was stopped; the set was not moved into place",
                self.name
            );
        }
        let key = (draft.cluster.clone(), draft.id.clone());
        if store.folders.contains_key(&key) {
            bail!(SetExists {
                target: self.name.clone(),
                id: draft.id.clone(),
                at: self.describe(&draft.cluster, &draft.id),
            });
        }
        store.folders.insert(key, files);
        drop(store);
        if self.take_fault(&Fault::LoseAnswer) {
            bail!(crate::targets::retry::TransportError::Transient(format!(
                "target '{}': the answer to the final move was lost",
                self.name
            )));
        }
        Ok(())
    }

    async fn discard(&self, draft: Draft) -> Result<()> {
        self.enter(format!("discard {}", draft.id), false)?;
        let mut store = self.store.lock().unwrap();
        store.folders.remove(&(draft.cluster, draft.folder));
        Ok(())
    }

    async fn list_all_sets(&self, cluster: Option<&str>) -> Result<Vec<ListedSet>> {
        self.enter("list".into(), false)?;
        let store = self.store.lock().unwrap();
        let mut sets = Vec::new();
        for ((c, folder), files) in &store.folders {
            if cluster.is_some_and(|want| want != c) || folder.starts_with('.') {
                continue;
            }
            let Some(body) = files.get(MANIFEST).filter(|b| b.len() as u64 <= MANIFEST_CAP) else {
                continue;
            };
            let at = self.describe(c, folder);
            let Some(m) = listed_manifest(&self.name, &at, folder, body) else {
                continue;
            };
            sets.push(listed_set(&self.name, c, &at, m, |name| {
                files.get(name).map(|b| Some(b.len() as u64))
            }));
        }
        sort_newest_first(&mut sets);
        Ok(sets)
    }

    async fn open_file(&self, cluster: &str, id: &str, name: &str) -> Result<FileReader> {
        self.enter(format!("open {id}/{name}"), false)?;
        let store = self.store.lock().unwrap();
        let bytes = store
            .folders
            .get(&(cluster.to_string(), id.to_string()))
            .and_then(|files| files.get(name))
            .cloned()
            .ok_or_else(|| anyhow!("target '{}': {id}/{name} not found", self.name))?;
        Ok(Box::pin(std::io::Cursor::new(bytes)))
    }

    async fn delete_set(&self, cluster: &str, id: &str) -> Result<()> {
        self.enter(format!("delete {id}"), true)?;
        if self.store.lock().unwrap().faults.contains(&Fault::RefuseDelete) {
            bail!("target '{}': DELETE '{id}': 403 Forbidden", self.name);
        }
        let mut store = self.store.lock().unwrap();
        store.folders.remove(&(cluster.to_string(), id.to_string()));
        Ok(())
    }

    async fn remove_debris(&self, cluster: &str, node: &str) -> Result<usize> {
        let mut store = self.store.lock().unwrap();
        let now = chrono::Utc::now();
        let debris: Vec<_> = store
            .folders
            .keys()
            .filter(|(c, f)| c == cluster && super::is_removable_debris(f, node, Some(now), now))
            .cloned()
            .collect();
        for key in &debris {
            store.folders.remove(key);
        }
        Ok(debris.len())
    }
}
