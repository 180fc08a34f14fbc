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
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::fsutil;
use crate::manifest::{MANIFEST, Manifest};
use crate::targets::{self, Draft, Sent, StagedSet, Target};

const DELIVERY_FILE: &str = ".delivery.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct DeliveryState {
    /// Targets still owed this set.
    pending: Vec<String>,
}

/// A complete set in staging.
#[derive(Debug, Clone)]
pub struct Staged {
    pub set: StagedSet,
    pub pending: Vec<String>,
}

impl Staged {
    pub fn id(&self) -> &str {
        &self.set.manifest.id
    }

    fn bytes(&self) -> u64 {
        self.set.manifest.total_stored_size()
    }
}

/// Records which targets are still owed the set in `dir` (atomically).
pub fn mark(dir: &Path, pending: &[String]) -> Result<()> {
    let tmp = dir.join(format!("{DELIVERY_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let state = DeliveryState {
        pending: pending.to_vec(),
    };
    fsutil::write_private_file(&tmp, &serde_json::to_vec(&state)?)?;
    std::fs::rename(&tmp, dir.join(DELIVERY_FILE)).with_context(|| format!("cannot update '{}'", dir.display()))
}

/// The complete sets in staging, oldest first. A directory without a readable manifest (or
/// of a newer format) is not a set: it is skipped with a warning and left alone.
pub fn scan(staging: &Path) -> Vec<Staged> {
    let root = crate::staging::sets_dir(staging);
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Vec::new();
    };
    let mut sets = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let manifest = std::fs::read(dir.join(MANIFEST))
            .map_err(|e| e.to_string())
            .and_then(|b| Manifest::parse(&b));
        let manifest = match manifest {
            Ok(m) if entry.file_name().to_str() == Some(m.id.as_str()) => m,
            // Left alone (a newer format, or damage): readers must never delete, and a
            // set is only ever moved here complete.
            _ => {
                tracing::warn!(path = %dir.display(), "skipping an unreadable set in staging");
                continue;
            }
        };
        // No delivery file: the set was staged by a run that stopped before recording
        // anything; it is owed to nobody it can name, so it is a local copy only.
        let pending = std::fs::read(dir.join(DELIVERY_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<DeliveryState>(&b).ok())
            .map(|d| d.pending)
            .unwrap_or_default();
        sets.push(Staged {
            set: StagedSet { dir, manifest },
            pending,
        });
    }
    sets.sort_by(|a, b| a.set.manifest.id.cmp(&b.set.manifest.id));
    sets
}

/// Bytes of every complete set in staging (delivered or not).
pub fn staged_bytes(staging: &Path) -> u64 {
    scan(staging).iter().map(Staged::bytes).sum()
}

/// How many staged sets still wait for a target, and their bytes.
pub fn pending(staging: &Path) -> (usize, u64) {
    pending_of(&scan(staging))
}

/// [`pending`] of sets already scanned.
pub fn pending_of(sets: &[Staged]) -> (usize, u64) {
    let waiting = sets.iter().filter(|s| !s.pending.is_empty());
    waiting.fold((0, 0), |(n, b), s| (n + 1, b + s.bytes()))
}

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
pub async fn apply_retention(
    settings: &Settings,
    staged: &[Staged],
    opened: &BTreeMap<String, std::result::Result<Box<dyn Target>, String>>,
    results: &[Delivered],
) {
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
    opened: &BTreeMap<String, std::result::Result<Box<dyn Target>, String>>,
    abort: &CancellationToken,
    mut early: BTreeMap<String, Early>,
    mut records: Option<&mut crate::etcd::election::Election>,
    retry_until: Option<tokio::time::Instant>,
) -> Vec<Delivered> {
    use crate::etcd::election::MayDeliver;
    let staging = &settings.snapshot.staging_dir;
    let mut down: BTreeMap<String, String> = BTreeMap::new();
    let mut results = Vec::new();
    let mut completed: Vec<String> = Vec::new();
    for staged in sets.iter_mut() {
        if staged.pending.is_empty() {
            continue;
        }
        if let Some(run) = staged.set.manifest.run.clone().filter(|_| settings.election.enabled) {
            let id = staged.set.manifest.id.clone();
            let verdict = match records.as_deref_mut() {
                Some(e) => e
                    .may_deliver(&run, &id)
                    .await
                    .unwrap_or_else(|e| MayDeliver::Wait(crate::error::one_line(&e))),
                None => MayDeliver::Wait("etcd cannot be asked whether it is the run's set".into()),
            };
            match verdict {
                MayDeliver::Yes => {}
                MayDeliver::NotOurs(why) => {
                    tracing::warn!(backup_id = %id, run = %run, reason = %why, "another set is this run's backup; this node's set stays a local copy and is not delivered");
                    staged.pending.clear();
                    if let Err(e) = mark(&staged.set.dir, &[]) {
                        tracing::error!(error = %crate::error::one_line(&e), "cannot record the delivery state");
                    }
                    continue;
                }
                MayDeliver::Wait(why) => {
                    tracing::info!(backup_id = %id, run = %run, reason = %why, "the set waits: not known yet whether it is the run's backup");
                    continue;
                }
            }
        }
        let before = staged.pending.clone();
        let m = staged.set.manifest.clone();
        let mut still = Vec::new();
        for name in &before {
            if settings.target(name).is_none() {
                tracing::warn!(backup_id = %m.id, target_name = %name, "target no longer configured; the set is not delivered to it");
                continue;
            }
            let Some(opened) = opened.get(name) else {
                // Not part of this pass (`backup --target` chose another).
                still.push(name.clone());
                continue;
            };
            // A target that cannot be opened, or failed earlier in this pass, is not tried.
            let skipped = match (opened, down.get(name)) {
                (Err(e), _) => Some(e.clone()),
                (Ok(_), Some(why)) => Some(format!("not tried: the target failed earlier in this pass ({why})")),
                (Ok(_), None) => None,
            };
            if let Some(why) = skipped {
                down.entry(name.clone()).or_insert_with(|| why.clone());
                still.push(name.clone());
                results.push(Delivered {
                    id: m.id.clone(),
                    cluster: m.cluster_name.clone(),
                    target: name.clone(),
                    location: String::new(),
                    result: Err(why),
                    completes_run: None,
                });
                continue;
            }
            let Ok(target) = opened else { continue };
            let location = target.describe(&m.cluster_name, &m.id);
            crate::notify::status(&format!("storing {} on target '{name}'", m.id));
            // After an abort the draft stays in `early`, and is removed at the end.
            let begun = match early.get(name) {
                Some(e) if e.draft.id == m.id && !abort.is_cancelled() => early.remove(name),
                _ => None,
            };
            let put = async {
                match begun {
                    _ if abort.is_cancelled() => {
                        Err(anyhow::anyhow!("the run was stopped before this target was written"))
                    }
                    Some(e) => {
                        let draft = e.settle(name).await;
                        target.finish_set(draft, &staged.set, abort).await
                    }
                    None => {
                        target
                            .put_set(&m.cluster_name, &settings.node_name, &staged.set, abort)
                            .await
                    }
                }
            };
            // Retries stop at the pass's deadline (the next run); a moving upload is not cut.
            let result = crate::targets::retry::retries_until(retry_until, put).await;
            let result = match result {
                Err(e)
                    if !abort.is_cancelled()
                        && crate::targets::retry::retries_until(
                            retry_until,
                            already_there(target.as_ref(), &staged.set),
                        )
                        .await =>
                {
                    tracing::info!(target_name = %name, backup_id = %m.id, "the target already holds this set (an earlier answer was lost)");
                    let _ = e;
                    Ok(())
                }
                Err(e) => {
                    // Another set holds this id there: only this set is stuck, not the target.
                    if e.downcast_ref::<crate::targets::SetExists>().is_none() {
                        down.insert(name.clone(), crate::error::one_line(&e));
                    }
                    Err(crate::error::one_line(&e))
                }
                Ok(()) => Ok(()),
            };
            match &result {
                Ok(()) => {
                    tracing::info!(target_name = %name, backup_id = %m.id, location = %location, "backup set stored")
                }
                Err(e) => {
                    tracing::error!(target_name = %name, backup_id = %m.id, error = %e, "cannot store the backup set; it stays pending in staging");
                    still.push(name.clone());
                }
            }
            results.push(Delivered {
                id: m.id.clone(),
                cluster: m.cluster_name.clone(),
                target: name.clone(),
                location,
                result,
                completes_run: None,
            });
        }
        // The set reached its last target in this pass: the run that took it is settled.
        if still.is_empty()
            && let Some(d) = results.iter_mut().rev().find(|d| d.id == m.id && d.result.is_ok())
        {
            d.completes_run = m.run.clone();
            completed.push(m.id.clone());
        }
        if still != before {
            staged.pending = still;
            if let Err(e) = mark(&staged.set.dir, &staged.pending) {
                tracing::error!(backup_id = %m.id, error = %crate::error::one_line(&e), "cannot record the delivery state");
            }
        }
    }
    discard_drafts(opened, early).await;
    // This node's entries for those sets, once per pass.
    if !completed.is_empty() {
        crate::staging::state::State::update_or_log(staging, |state| {
            for id in &completed {
                state.settle(id);
            }
        });
    }
    results
}

/// Removes a staged set: first moved out of `sets/` (into `tmp/`, cleaned by the next run),
/// so that a removal cut short never leaves a set without its manifest in `sets/`.
fn remove_staged(dir: &Path) {
    let gone = dir
        .parent()
        .and_then(Path::parent)
        .map(|staging| crate::staging::tmp_dir(staging).join(format!(".gone-{:08x}", rand::random::<u32>())));
    match gone {
        Some(to) if std::fs::rename(dir, &to).is_ok() => fsutil::remove_dir_quietly(&to),
        _ => fsutil::remove_dir_quietly(dir),
    }
}

/// Stops delivering the staged sets of `run` (its runner lost the lock; the node that takes
/// the run over stores its own set): they stay as local copies.
pub fn abandon_run(staging: &Path, run: &str) {
    for staged in scan(staging) {
        if staged.set.manifest.run.as_deref() == Some(run) && !staged.pending.is_empty() {
            tracing::warn!(backup_id = %staged.set.manifest.id, run = %run, "the run was given up to another node; this node's set stays a local copy and is not delivered");
            if let Err(e) = mark(&staged.set.dir, &[]) {
                tracing::error!(error = %crate::error::one_line(&e), "cannot record the delivery state");
            }
        }
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
pub async fn discard_drafts(
    opened: &BTreeMap<String, std::result::Result<Box<dyn Target>, String>>,
    early: BTreeMap<String, Early>,
) {
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
pub fn open_targets<'a>(
    settings: &Settings,
    names: impl IntoIterator<Item = &'a str>,
) -> BTreeMap<String, std::result::Result<Box<dyn Target>, String>> {
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

/// Bounds staging after a pass: pending sets beyond `max_pending` go (oldest first, each
/// with an error), delivered sets beyond `keep_local` go (oldest first).
pub fn tidy(settings: &Settings, sets: &mut Vec<Staged>) {
    let (mut pending, mut delivered): (Vec<_>, Vec<_>) =
        std::mem::take(sets).into_iter().partition(|s| !s.pending.is_empty());
    let max_pending = settings.delivery.max_pending as usize;
    if pending.len() > max_pending {
        for s in pending.drain(..pending.len() - max_pending) {
            tracing::error!(
                backup_id = %s.id(), targets = %s.pending.join(", "),
                "dropping an undelivered backup set from staging: more than delivery.max_pending ({max_pending}) sets wait; these targets never got it"
            );
            remove_staged(&s.set.dir);
        }
    }
    let keep_local = settings.delivery.keep_local as usize;
    if delivered.len() > keep_local {
        for s in delivered.drain(..delivered.len() - keep_local) {
            tracing::debug!(backup_id = %s.id(), "removing a delivered set from staging");
            remove_staged(&s.set.dir);
        }
    }
    *sets = pending.into_iter().chain(delivered).collect();
    sets.sort_by(|a, b| a.id().cmp(b.id()));
}

/// Frees staging for a snapshot that needs `needed` bytes: drops delivered local copies
/// first, then pending sets oldest first (with an error), until `free()` reports enough or
/// nothing staged is left. `sets` (as scanned for this run) loses what is dropped.
pub fn make_room(sets: &mut Vec<Staged>, needed: u64, free: impl Fn() -> Result<u64>) -> Result<u64> {
    let mut available = free()?;
    // Nothing is dropped when dropping everything would still not be enough.
    if available >= needed || available + sets.iter().map(Staged::bytes).sum::<u64>() < needed {
        return Ok(available);
    }
    let (pending, delivered): (Vec<_>, Vec<_>) = std::mem::take(sets).into_iter().partition(|s| !s.pending.is_empty());
    for s in delivered.into_iter().chain(pending) {
        if available >= needed {
            sets.push(s);
            continue;
        }
        if s.pending.is_empty() {
            tracing::info!(backup_id = %s.id(), "removing a local copy from staging to make room for the next snapshot");
        } else {
            tracing::error!(
                backup_id = %s.id(), targets = %s.pending.join(", "),
                "dropping an undelivered backup set from staging: the staging filesystem is below guards.min_free_space; these targets never got it"
            );
        }
        remove_staged(&s.set.dir);
        available = free()?;
    }
    sets.sort_by(|a, b| a.id().cmp(b.id()));
    Ok(available)
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
    let staging = &settings.snapshot.staging_dir;
    crate::staging::prepare_staging(staging)?;
    let Some(_lock) = fsutil::try_lock(&crate::staging::lock_file(staging))? else {
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
    if !abort.is_cancelled() {
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
