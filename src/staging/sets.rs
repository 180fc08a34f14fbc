//! The sets waiting in staging: `sets/<id>/` holds a complete, verified set, and its
//! `.delivery.json` the targets still owed a copy. This module owns reading them (one scan
//! per run or pass), owing and settling, and bounding staging (`delivery.max_pending`,
//! `delivery.keep_local`, `guards.min_free_space`); [`crate::delivery`] only delivers.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::fsutil;
use crate::manifest::{MANIFEST, Manifest};
use crate::targets::StagedSet;

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

    pub fn bytes(&self) -> u64 {
        self.set.manifest.total_stored_size()
    }
}

/// Records which targets are still owed the set in `dir` (atomically).
pub fn owe(dir: &Path, pending: &[String]) -> Result<()> {
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

/// Removes a staged set: first moved out of `sets/` (into `tmp/`, cleaned by the next run),
/// so that a removal cut short never leaves a set without its manifest in `sets/`.
pub(crate) fn remove_staged(dir: &Path) {
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
            if let Err(e) = owe(&staged.set.dir, &[]) {
                tracing::error!(error = %crate::error::one_line(&e), "cannot record the delivery state");
            }
        }
    }
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
