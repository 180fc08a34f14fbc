//! Delivery of verified sets from staging to the targets, surviving targets that are down.
//!
//! Every set taken waits in `<staging_dir>/sets/<id>/` with a `.delivery.json` naming the
//! targets still owed a copy. A delivery pass walks the staged sets oldest first and stores
//! each on the targets it is owed to; a target that fails is given up for the rest of the
//! pass (it is down: later sets would only spend its retry budget again). A set the target
//! already holds with the same manifest (an answer lost after the final move) counts as
//! delivered, so nothing is stored twice. Passes run after each backup and each import, on
//! the daemon's backoff timer, and when the daemon starts; each works on one scan of
//! staging.
//!
//! Staging stays bounded: at most `delivery.max_pending` sets wait (the oldest beyond are
//! dropped, with an error), delivered sets are kept for a fast local restore up to
//! `delivery.keep_local`, and before a snapshot, staged sets are dropped (delivered ones
//! first, then the oldest pending) until `guards.min_free_space` holds again.

pub mod retention;

use std::collections::BTreeMap;

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::manifest::{MANIFEST, Manifest};
use crate::staging::sets::{Staged, owe, pending, pending_of, scan, tidy};
use crate::targets::{self, Draft, Sent, StagedSet, Target};

/// The outcome of storing one set on one target in a pass.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub id: String,
    pub cluster: String,
    pub target: String,
    pub location: String,
    pub result: Result<(), String>,
    /// This delivery left the set owed to no target, and the set names its elected run: that
    /// run's record can be settled (see [`crate::etcd::election::Election::settle_all`]).
    pub completes_run: Option<String>,
}

/// The (run, id) of every set a pass brought to its last target.
pub fn settled(results: &[Delivered]) -> Vec<(String, String)> {
    // One entry per set: only its last delivery carries the run.
    results
        .iter()
        .filter_map(|d| d.completes_run.clone().map(|run| (run, d.id.clone())))
        .collect()
}

/// Does `target` already hold exactly this set? (An earlier attempt's final answer was lost.)
async fn already_there(target: &dyn Target, set: &StagedSet) -> bool {
    use tokio::io::AsyncReadExt;
    let m = &set.manifest;
    let Ok(reader) = target.open_file(&m.cluster_name, &m.id, MANIFEST).await else {
        return false;
    };
    let mut bytes = Vec::new();
    if reader
        .take(targets::MANIFEST_CAP)
        .read_to_end(&mut bytes)
        .await
        .is_err()
    {
        return false;
    }
    Manifest::parse(&bytes).is_ok_and(|theirs| theirs == *m)
}

/// Applies retention on each target that took a set in this pass and owes nothing more
/// (a target still missing a newer set is not pruned: its newest backup failed).
pub async fn apply_retention(settings: &Settings, staged: &[Staged], opened: &Opened, results: &[Delivered]) {
    let policy = settings.retention_policy();
    // What each target holds once pruned, for the coverage metrics: written once.
    let mut coverage = BTreeMap::new();
    for (name, target) in opened {
        let Ok(target) = target else { continue };
        if staged.iter().any(|s| s.pending.contains(name)) {
            continue;
        }
        let clusters: std::collections::BTreeSet<&str> = results
            .iter()
            .filter(|d| &d.target == name && d.result.is_ok())
            .map(|d| d.cluster.as_str())
            .collect();
        // What the target holds once pruned, for the coverage metrics.
        let mut complete = Vec::new();
        let mut listed = false;
        for cluster in clusters {
            crate::notify::status(&format!("applying retention on target '{name}'"));
            match crate::delivery::retention::prune_target(
                target.as_ref(),
                cluster,
                &settings.node_name,
                &policy,
                settings.time_zone(),
                false,
            )
            .await
            {
                Ok(r) => {
                    tracing::info!(
                        target_name = %name, cluster = %cluster, kept = r.decisions.iter().filter(|d| d.keep).count(),
                        deleted = r.deleted.len(), debris_removed = r.debris_removed, errors = r.errors.len(),
                        "retention applied"
                    );
                    complete.extend(r.complete_left());
                    listed = true;
                }
                Err(e) => {
                    tracing::error!(target_name = %name, error = %crate::error::one_line(&e), "cannot apply retention")
                }
            }
        }
        if listed {
            coverage.insert(name.clone(), crate::staging::state::TargetCoverage::of(&complete));
        }
    }
    crate::staging::state::note_coverage(&settings.snapshot.staging_dir, coverage, |n| {
        settings.target(n).is_some()
    });
}

/// One delivery pass over the staged sets `sets` (as scanned once for the pass, oldest
/// first; their `pending` lists are kept up to date here). `opened` are the targets usable in
/// this pass by name; a name mapped to an error fails at once with that error. Targets no
/// longer configured are dropped from the sets owed to them. `early` are sets already
/// begun on a target (the pipelined upload of a run), by target name: they are finished
/// when their set comes up, and removed if it is not delivered in this pass.
///
/// A set staged for an elected run is delivered only once `records` (the election, through
/// etcd) says it is that run's set; without `records` (etcd cannot be asked) it waits. See
/// [`crate::etcd::election::Election::may_deliver`].
pub async fn pass(
    settings: &Settings,
    sets: &mut [Staged],
    opened: &Opened,
    abort: &CancellationToken,
    early: BTreeMap<String, Early>,
    mut records: Option<&mut crate::etcd::election::Election>,
    retry_until: Option<tokio::time::Instant>,
) -> Vec<Delivered> {
    let mut pass = Pass {
        settings,
        opened,
        abort,
        early,
        retry_until,
        down: BTreeMap::new(),
        results: Vec::new(),
    };
    let mut completed: Vec<String> = Vec::new();
    for staged in sets.iter_mut() {
        if staged.pending.is_empty() || !cleared(settings, staged, records.as_deref_mut()).await {
            continue;
        }
        if pass.deliver(staged).await {
            completed.push(staged.id().to_string());
        }
    }
    let Pass { early, results, .. } = pass;
    discard_drafts(opened, early).await;
    // This node's entries for those sets, once per pass.
    if !completed.is_empty() {
        crate::staging::state::State::update_or_log(&settings.snapshot.staging_dir, |state| {
            for id in &completed {
                state.settle(id);
            }
        });
    }
    results
}

/// The targets of a pass by name: opened, or why each cannot be used.
pub type Opened = BTreeMap<String, std::result::Result<Box<dyn Target>, String>>;

/// Whether a staged set may go out: a set of an elected run only once the election says it
/// is that run's set (one that is not becomes a local copy).
async fn cleared(
    settings: &Settings,
    staged: &mut Staged,
    records: Option<&mut crate::etcd::election::Election>,
) -> bool {
    use crate::etcd::election::MayDeliver;
    let Some(run) = staged.set.manifest.run.clone().filter(|_| settings.election.enabled) else {
        return true;
    };
    let id = staged.id().to_string();
    let verdict = match records {
        Some(e) => e
            .may_deliver(&run, &id)
            .await
            .unwrap_or_else(|e| MayDeliver::Wait(crate::error::one_line(&e))),
        None => MayDeliver::Wait("etcd cannot be asked whether it is the run's set".into()),
    };
    match verdict {
        MayDeliver::Yes => true,
        MayDeliver::NotOurs(why) => {
            tracing::warn!(backup_id = %id, run = %run, reason = %why, "another set is this run's backup; this node's set stays a local copy and is not delivered");
            staged.pending.clear();
            if let Err(e) = owe(&staged.set.dir, &[]) {
                tracing::error!(error = %crate::error::one_line(&e), "cannot record the delivery state");
            }
            false
        }
        MayDeliver::Wait(why) => {
            tracing::info!(backup_id = %id, run = %run, reason = %why, "the set waits: not known yet whether it is the run's backup");
            false
        }
    }
}

/// One delivery pass in progress: the targets found down so far (not tried again in it),
/// and what each attempt came to.
struct Pass<'a> {
    settings: &'a Settings,
    opened: &'a Opened,
    abort: &'a CancellationToken,
    early: BTreeMap<String, Early>,
    retry_until: Option<tokio::time::Instant>,
    down: BTreeMap<String, String>,
    results: Vec<Delivered>,
}

impl Pass<'_> {
    /// Stores `staged` on each target still owed it and records what is still owed. True
    /// when the set reached its last target in this pass (the run that took it is settled).
    async fn deliver(&mut self, staged: &mut Staged) -> bool {
        let before = staged.pending.clone();
        let m = staged.set.manifest.clone();
        let mut still = Vec::new();
        for name in &before {
            if self.settings.target(name).is_none() {
                // The only configured holder of a file of a split set: dropping it would
                // leave that file stored nowhere, so the set stays owed (and says so).
                let orphaned: Vec<&str> = m
                    .files
                    .iter()
                    .filter(|f| f.targets.iter().any(|t| t == name))
                    .filter(|f| f.targets.iter().all(|t| self.settings.target(t).is_none()))
                    .map(|f| f.name.as_str())
                    .collect();
                if !orphaned.is_empty() {
                    tracing::error!(
                        backup_id = %m.id, target_name = %name, files = %orphaned.join(", "),
                        "target no longer configured, but it alone holds these files of the set; it stays owed: configure the target again"
                    );
                    still.push(name.clone());
                    continue;
                }
                tracing::warn!(backup_id = %m.id, target_name = %name, "target no longer configured; the set is not delivered to it");
                continue;
            }
            let Some(opened) = self.opened.get(name) else {
                // Not part of this pass (`backup --target` chose another).
                still.push(name.clone());
                continue;
            };
            // A target that cannot be opened, or failed earlier in this pass, is not tried.
            let (location, result, tried) = match (opened, self.down.get(name)) {
                (Err(e), _) => (String::new(), Err(e.clone()), false),
                (Ok(_), Some(why)) => (
                    String::new(),
                    Err(format!("not tried: the target failed earlier in this pass ({why})")),
                    false,
                ),
                (Ok(target), None) => {
                    let location = target.describe(&m.cluster_name, &m.id);
                    (location, self.store(name, target.as_ref(), staged).await, true)
                }
            };
            match &result {
                Ok(()) => {
                    tracing::info!(target_name = %name, backup_id = %m.id, location = %location, "backup set stored")
                }
                Err(e) if !tried => {
                    self.down.entry(name.clone()).or_insert_with(|| e.clone());
                    still.push(name.clone());
                }
                Err(e) => {
                    tracing::error!(target_name = %name, backup_id = %m.id, error = %e, "cannot store the backup set; it stays pending in staging");
                    still.push(name.clone());
                }
            }
            self.results.push(Delivered {
                id: m.id.clone(),
                cluster: m.cluster_name.clone(),
                target: name.clone(),
                location,
                result,
                completes_run: None,
            });
        }
        let mut completes = false;
        if still.is_empty()
            && let Some(d) = self.results.iter_mut().rev().find(|d| d.id == m.id && d.result.is_ok())
        {
            d.completes_run = m.run.clone();
            completes = true;
        }
        if still != before {
            staged.pending = still;
            if let Err(e) = owe(&staged.set.dir, &staged.pending) {
                tracing::error!(backup_id = %m.id, error = %crate::error::one_line(&e), "cannot record the delivery state");
            }
        }
        completes
    }

    /// One set on one target: finishing the draft begun while the snapshot streamed, or the
    /// whole set from staging. Retries stop at the pass's deadline (the next run); a moving
    /// upload is not cut. A failure marks the target down for the rest of the pass.
    async fn store(&mut self, name: &str, target: &dyn Target, staged: &Staged) -> Result<(), String> {
        let (m, abort) = (&staged.set.manifest, self.abort);
        crate::notify::status(&format!("storing {} on target '{name}'", m.id));
        // After an abort the draft stays in `early`, and is removed at the end.
        let begun = match self.early.get(name) {
            Some(e) if e.draft.id == m.id && !abort.is_cancelled() => self.early.remove(name),
            _ => None,
        };
        let node = &self.settings.node_name;
        let put = async {
            match begun {
                _ if abort.is_cancelled() => Err(anyhow::anyhow!("the run was stopped before this target was written")),
                Some(e) => {
                    let draft = e.settle(name).await;
                    target.finish_set(draft, &staged.set, abort).await
                }
                None => target.put_set(&m.cluster_name, node, &staged.set, abort).await,
            }
        };
        let Err(e) = crate::targets::retry::retries_until(self.retry_until, put).await else {
            return Ok(());
        };
        if !abort.is_cancelled()
            && crate::targets::retry::retries_until(self.retry_until, already_there(target, &staged.set)).await
        {
            tracing::info!(target_name = %name, backup_id = %m.id, "the target already holds this set (an earlier answer was lost)");
            return Ok(());
        }
        // Another set holds this id there: only this set is stuck, not the target.
        if e.downcast_ref::<crate::targets::SetExists>().is_none() {
            self.down.insert(name.to_string(), crate::error::one_line(&e));
        }
        Err(crate::error::one_line(&e))
    }
}

/// A set begun on a target before its snapshot was taken, and the upload that follows the
/// snapshot into it.
pub struct Early {
    pub draft: Draft,
    pub sent: tokio::sync::oneshot::Receiver<Result<Sent>>,
}

impl Early {
    /// Waits for the upload that follows the snapshot; the draft then lists it if it
    /// succeeded (otherwise the file is stored from staging like any other).
    async fn settle(self, target_name: &str) -> Draft {
        let mut draft = self.draft;
        match self.sent.await {
            Ok(Ok(sent)) => draft.sent.push(sent),
            Ok(Err(e)) => tracing::warn!(
                target_name = %target_name, error = %crate::error::one_line(&e),
                "the upload that followed the snapshot failed; the file is stored from staging"
            ),
            // No snapshot file was handed over.
            Err(_) => {}
        }
        draft
    }
}

/// Removes drafts that will not be finished, once their uploads have ended (best effort:
/// a leftover is debris the next run removes).
pub async fn discard_drafts(opened: &Opened, early: BTreeMap<String, Early>) {
    for (name, e) in early {
        let draft = e.settle(&name).await;
        if let Some(Ok(target)) = opened.get(&name)
            && let Err(e) = target.discard(draft).await
        {
            tracing::warn!(target_name = %name, error = %crate::error::one_line(&e), "cannot remove an unfinished upload");
        }
    }
}

/// Opens the named targets for a pass.
pub fn open_targets<'a>(settings: &Settings, names: impl IntoIterator<Item = &'a str>) -> Opened {
    names
        .into_iter()
        .filter_map(|n| settings.target(n))
        .map(|t| {
            (
                t.name.clone(),
                targets::open(t, settings.priority.upload_rate_limit.0).map_err(|e| crate::error::one_line(&e)),
            )
        })
        .collect()
}

/// What a retry pass did.
#[derive(Debug, Default)]
pub struct Retried {
    pub delivered: usize,
    pub failed: usize,
    /// Sets still waiting afterwards.
    pub pending: usize,
    /// A backup holds staging; nothing was tried.
    pub busy: bool,
}

/// A delivery pass outside a backup run (the daemon's timer, its start): takes the staging
/// lock so it never races a run, then applies retention and bounds staging as a run does.
/// Retries stop at `retry_until` (the daemon: just before its next run).
pub async fn retry(
    settings: &Settings,
    abort: &CancellationToken,
    retry_until: Option<tokio::time::Instant>,
) -> Result<Retried> {
    retry_with(settings, abort, retry_until, Retention::Apply).await
}

/// A delivery pass of what staging owes, with no retention: a host that stores sets it did
/// not take from etcd (`rebase` on a drill host) leaves retention to the cluster's nodes.
pub async fn deliver_staged(settings: &Settings, abort: &CancellationToken) -> Result<Retried> {
    retry_with(settings, abort, None, Retention::Leave).await
}

/// Whether a delivery pass applies retention afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retention {
    Apply,
    Leave,
}

async fn retry_with(
    settings: &Settings,
    abort: &CancellationToken,
    retry_until: Option<tokio::time::Instant>,
    retention: Retention,
) -> Result<Retried> {
    let staging = &settings.snapshot.staging_dir;
    let Some(_lock) = crate::staging::try_lock(staging)? else {
        return Ok(Retried {
            busy: true,
            pending: pending(staging).0,
            ..Retried::default()
        });
    };
    // One scan for the whole pass: delivery, retention and the bounds all work on it.
    let mut staged = scan(staging);
    let names: std::collections::BTreeSet<&str> = staged
        .iter()
        .flat_map(|s| s.pending.iter().map(String::as_str))
        .collect();
    let opened = open_targets(settings, names);
    // Sets of elected runs are checked against the runs' records before they go out.
    let needs_etcd = settings.election.enabled
        && staged
            .iter()
            .any(|s| !s.pending.is_empty() && s.set.manifest.run.is_some());
    let mut records = match needs_etcd {
        true => match crate::etcd::connect_first(&settings.etcd).await {
            Ok((member, _)) => Some(crate::etcd::election::Election::of(member.client.clone(), settings)),
            Err(e) => {
                tracing::warn!(error = %crate::error::one_line(&e), "etcd does not answer: sets of elected runs wait");
                None
            }
        },
        false => None,
    };
    let results = pass(
        settings,
        &mut staged,
        &opened,
        abort,
        BTreeMap::new(),
        records.as_mut(),
        retry_until,
    )
    .await;
    // The connection that checked the sets also settles the records of those now delivered.
    if let Some(e) = records.as_mut() {
        e.settle_all(&settled(&results), None).await;
    }
    if !abort.is_cancelled() && retention == Retention::Apply {
        crate::targets::retry::retries_until(retry_until, apply_retention(settings, &staged, &opened, &results)).await;
    }
    tidy(settings, &mut staged);
    Ok(Retried {
        delivered: results.iter().filter(|d| d.result.is_ok()).count(),
        failed: results.iter().filter(|d| d.result.is_err()).count(),
        pending: pending_of(&staged).0,
        busy: false,
    })
}

/// Delivery and retention against targets in memory ([`crate::targets::memory`]), with the
/// faults real servers do not produce on demand.
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use sha2::Digest;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::staging::sets;
    use crate::targets::memory::{Fault, MemoryTarget};

    const CLUSTER: &str = "c";

    fn settings(staging: &Path, targets: &[&str], extra: &str) -> Settings {
        let mut text = format!(
            "node_name = \"n1\"\ncluster_name = \"{CLUSTER}\"\n[snapshot]\nstaging_dir = \"{}\"\n[election]\nenabled = false\n{extra}\n",
            staging.display()
        );
        for t in targets {
            text.push_str(&format!("[[target]]\nname = \"{t}\"\nurl = \"file:///srv/{t}\"\n"));
        }
        Settings::from_str_named("config.toml", &text).unwrap()
    }

    /// A set `id` in staging's `sets/`, owed to `owed`: a snapshot of a few bytes and its
    /// manifest, as a run commits it.
    fn stage(staging: &Path, id: &str, owed: &[&str]) {
        let dir = crate::staging::sets_dir(staging).join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let name = crate::manifest::snapshot_name(id);
        let bytes = format!("snapshot of {id}").into_bytes();
        std::fs::write(dir.join(&name), &bytes).unwrap();
        let sha = hex::encode(sha2::Sha256::digest(&bytes));
        let m = manifest(id, &name, bytes.len() as u64, &sha);
        std::fs::write(dir.join(crate::manifest::MANIFEST), m.to_json()).unwrap();
        let owed: Vec<String> = owed.iter().map(|s| s.to_string()).collect();
        sets::owe(&dir, &owed).unwrap();
    }

    fn manifest(id: &str, name: &str, size: u64, sha: &str) -> Manifest {
        serde_json::from_value(serde_json::json!({
            "format_version": 1, "id": id, "created": "2026-11-25T02:30:12Z",
            "cluster_name": CLUSTER, "trigger": "manual", "node": "n1", "openshift": null,
            "etcd": {"endpoint": "http://127.0.0.1:2379", "member_id": "1", "cluster_id": "2",
                     "version": "3.5.0", "revision": 1, "db_size": 1},
            "files": [{"name": name, "stored_name": name, "size": size, "sha256": sha,
                       "stored_size": size, "stored_sha256": sha,
                       "compression": "none", "encryption": "none"}],
            "tool": {"name": "etcd-backupd", "version": "0"},
        }))
        .unwrap()
    }

    /// The targets of a pass, and a handle on each (sharing its store).
    fn opened(names: &[&str]) -> (Opened, BTreeMap<String, MemoryTarget>) {
        let handles: BTreeMap<String, MemoryTarget> =
            names.iter().map(|n| (n.to_string(), MemoryTarget::memory(n))).collect();
        let opened = handles
            .iter()
            .map(|(n, t)| (n.clone(), Ok(Box::new(t.clone()) as Box<dyn Target>)))
            .collect();
        (opened, handles)
    }

    async fn run_pass(settings: &Settings, opened: &Opened) -> (Vec<Delivered>, Vec<Staged>) {
        let mut staged = scan(&settings.snapshot.staging_dir);
        let results = pass(
            settings,
            &mut staged,
            opened,
            &CancellationToken::new(),
            BTreeMap::new(),
            None,
            None,
        )
        .await;
        (results, staged)
    }

    #[tokio::test]
    async fn sets_go_oldest_first_and_a_target_that_fails_is_not_tried_again_in_the_pass() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), &["a", "b"], "");
        stage(dir.path(), "2026-11-25_010000", &["a", "b"]);
        stage(dir.path(), "2026-11-25_020000", &["a", "b"]);
        let (opened, t) = opened(&["a", "b"]);
        t["b"].fail(Fault::Down);

        let (results, staged) = run_pass(&s, &opened).await;
        assert_eq!(t["a"].ids(CLUSTER), ["2026-11-25_010000", "2026-11-25_020000"]);
        let a_calls: Vec<String> = t["a"].calls().into_iter().filter(|c| c.starts_with("rename")).collect();
        assert_eq!(
            a_calls,
            [
                format!("rename {CLUSTER}/2026-11-25_010000"),
                format!("rename {CLUSTER}/2026-11-25_020000")
            ],
            "oldest first"
        );
        // b failed on the first set; the second was not tried against it.
        let b: Vec<_> = results.iter().filter(|d| d.target == "b").collect();
        assert_eq!(b.len(), 2);
        assert!(
            b[0].result.as_ref().unwrap_err().contains("connection refused"),
            "{b:?}"
        );
        assert!(
            b[1].result
                .as_ref()
                .unwrap_err()
                .starts_with("not tried: the target failed earlier"),
            "{b:?}"
        );
        assert_eq!(t["b"].calls().iter().filter(|c| c.starts_with("mkdir")).count(), 1);
        // What is still owed is recorded, in memory and on disk.
        for st in [staged, scan(dir.path())] {
            assert!(st.iter().all(|x| x.pending == ["b"]), "{st:?}");
        }
        // b back: the next pass delivers both, and nothing is owed any more.
        t["b"].heal();
        let (results, staged) = run_pass(&s, &opened).await;
        assert!(
            results.iter().all(|d| d.result.is_ok() && d.target == "b"),
            "{results:?}"
        );
        assert_eq!(t["b"].ids(CLUSTER).len(), 2);
        assert!(staged.iter().all(|x| x.pending.is_empty()));
        assert!(t["a"].hidden().is_empty() && t["b"].hidden().is_empty());
    }

    #[tokio::test]
    async fn a_set_that_landed_but_whose_answer_was_lost_counts_as_delivered_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), &["a"], "");
        stage(dir.path(), "2026-11-25_010000", &["a"]);
        let (opened, t) = opened(&["a"]);
        t["a"].fail(Fault::LoseAnswer);
        let (results, staged) = run_pass(&s, &opened).await;
        assert!(results[0].result.is_ok(), "{results:?}");
        assert_eq!(t["a"].ids(CLUSTER), ["2026-11-25_010000"]);
        assert!(staged[0].pending.is_empty());
        assert_eq!(settled(&results), Vec::<(String, String)>::new(), "no run to settle");
    }

    #[tokio::test]
    async fn another_set_under_the_id_stops_that_set_only_and_a_removed_target_is_owed_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), &["a"], "");
        stage(dir.path(), "2026-11-25_010000", &["a", "gone"]);
        stage(dir.path(), "2026-11-25_020000", &["a"]);
        let (opened, t) = opened(&["a"]);
        // Another node's set of the same id, with other contents.
        t["a"].insert(
            CLUSTER,
            &manifest("2026-11-25_010000", "snapshot_2026-11-25_010000.db", 3, "00"),
        );
        let (results, staged) = run_pass(&s, &opened).await;
        assert!(
            results[0].result.as_ref().unwrap_err().contains("already exists"),
            "{results:?}"
        );
        assert!(results[1].result.is_ok(), "the target is not down: {results:?}");
        assert_eq!(staged[0].pending, ["a"], "{staged:?}");
        assert!(staged[1].pending.is_empty());
        assert!(!results.iter().any(|d| d.target == "gone"));
    }

    /// A removed target that alone holds a file of a split set keeps the set owed to it.
    #[tokio::test]
    async fn a_removed_target_that_alone_holds_a_file_keeps_the_set_owed() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), &["a"], "");
        stage(dir.path(), "2026-11-25_010000", &["a", "vault"]);
        let set_dir = crate::staging::sets_dir(dir.path()).join("2026-11-25_010000");
        let mut m = Manifest::parse(&std::fs::read(set_dir.join(MANIFEST)).unwrap()).unwrap();
        m.files[0].targets = vec!["vault".into()];
        std::fs::write(set_dir.join(MANIFEST), m.to_json()).unwrap();
        let (opened, _t) = opened(&["a"]);
        let (_, staged) = run_pass(&s, &opened).await;
        assert_eq!(staged[0].pending, ["vault"], "{staged:?}");
        // Held by every target (not split): a removed target is simply dropped.
        stage(dir.path(), "2026-11-25_020000", &["a", "gone"]);
        let (_, staged) = run_pass(&s, &opened).await;
        assert!(staged[1].pending.is_empty(), "{staged:?}");
    }

    #[tokio::test]
    async fn retention_keeps_what_the_policy_says_and_goes_on_past_a_refused_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(
            dir.path(),
            &["a"],
            "[retention]\nkeep_last = 1\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\nmin_keep = 1\n",
        );
        let t = MemoryTarget::memory("a");
        for id in ["2026-11-25_010000", "2026-11-25_020000", "2026-11-25_030000"] {
            t.insert(CLUSTER, &manifest(id, &crate::manifest::snapshot_name(id), 8, "00"));
        }
        let policy = s.retention_policy();
        let prune = |t| retention::prune_target(t, CLUSTER, "n1", &policy, s.time_zone(), false);
        t.fail(Fault::RefuseDelete);
        let r = prune(&t).await.unwrap();
        assert_eq!((r.deleted.len(), r.errors.len()), (0, 2), "{:?}", r.errors);
        assert!(r.errors.iter().all(|e| e.contains("403 Forbidden")), "{:?}", r.errors);
        assert_eq!(t.ids(CLUSTER).len(), 3);
        t.heal();
        let r = prune(&t).await.unwrap();
        assert_eq!(r.deleted, ["2026-11-25_010000", "2026-11-25_020000"], "oldest first");
        assert_eq!(t.ids(CLUSTER), ["2026-11-25_030000"]);
        let dry = retention::prune_target(&t, CLUSTER, "n1", &policy, s.time_zone(), true)
            .await
            .unwrap();
        assert!(dry.deleted.is_empty() && dry.decisions.iter().all(|d| d.keep));
    }
}
