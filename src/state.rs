//! The node's own record of its last runs, kept in `<staging_dir>/state.json` so `status`
//! works with the daemon stopped. Written atomically (temporary file, fsync, rename).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::fsutil;

/// How many runs are kept.
const KEEP_RUNS: usize = 20;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// Newest first.
    pub runs: Vec<RunState>,
    /// The next scheduled run, RFC 3339 UTC, as the daemon last computed it.
    pub next_run: Option<String>,
    /// Is a backup running on this node right now?
    pub running: Option<String>,
    /// Versions whose after-upgrade backup is done (here or by another node); kept whole,
    /// so an upgrade is backed up once however old its run record gets.
    #[serde(default)]
    pub upgrades_done: Vec<String>,
    /// The newest restore drill run on this host.
    #[serde(default)]
    pub last_drill: Option<DrillState>,
    /// Runs by result since the state file was created (Prometheus counters).
    #[serde(default)]
    pub runs_total: BTreeMap<String, u64>,
    /// Skipped runs by kind of reason.
    #[serde(default)]
    pub skips_total: BTreeMap<String, u64>,
    /// Platform backup sets already imported (or found unusable), by path and size: each
    /// is shipped once.
    #[serde(default)]
    pub imported: Vec<String>,
    /// The newest set this node staged (its own or imported), for `status` and the metrics.
    #[serde(default)]
    pub newest_set: Option<SetState>,
}

/// What `status` and the metrics show of a set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SetState {
    pub id: String,
    /// Its manifest's `restorable_until` (RFC 3339, UTC), when its archive held certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restorable_until: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restorable_until_source: Option<String>,
}

/// Records `m` as the newest set staged here, unless a newer one already is. Best effort:
/// a state file that cannot be written is logged.
pub fn note_newest_set(staging: &Path, m: &crate::manifest::Manifest) {
    let mut state = State::load(staging);
    if state.newest_set.as_ref().is_some_and(|s| s.id > m.id) {
        return;
    }
    state.newest_set = Some(SetState {
        id: m.id.clone(),
        restorable_until: m.restore.restorable_until.clone(),
        restorable_until_source: m.restore.restorable_until_source.clone(),
    });
    if let Err(e) = state.save(staging) {
        tracing::warn!(error = %crate::error::one_line(&e), "cannot write the state file");
    }
}

/// What a run came to, in `state.json`, in the run markers in etcd and as the metrics'
/// `result` label. A run that took a set is never `Failed`: where the set is is what counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunResult {
    /// The set is on every target chosen for the run.
    Ok,
    /// The set is on some of the targets; the others are owed it (it waits in staging).
    Partial,
    /// The set was taken and waits in staging; no target has it yet.
    Pending,
    /// No set was taken.
    Failed,
    /// A guard said no, or the node did not compete.
    Skipped,
    /// Another node ran it.
    DoneElsewhere,
}

impl RunResult {
    pub const ALL: [RunResult; 6] = [
        RunResult::Ok,
        RunResult::Partial,
        RunResult::Pending,
        RunResult::Failed,
        RunResult::Skipped,
        RunResult::DoneElsewhere,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunResult::Ok => "ok",
            RunResult::Partial => "partial",
            RunResult::Pending => "pending",
            RunResult::Failed => "failed",
            RunResult::Skipped => "skipped",
            RunResult::DoneElsewhere => "done-elsewhere",
        }
    }

    /// The result of a run that took a set, by how many of the `chosen` targets hold it.
    pub fn of_stored(stored: usize, chosen: usize) -> RunResult {
        if stored >= chosen {
            RunResult::Ok
        } else if stored > 0 {
            RunResult::Partial
        } else {
            RunResult::Pending
        }
    }

    /// Did the run take a set (whether or not every target has it yet)?
    pub fn took_a_set(self) -> bool {
        matches!(self, RunResult::Ok | RunResult::Partial | RunResult::Pending)
    }

    /// The result a recorded text names (`skipped: <reason>` in etcd markers).
    pub fn parse(text: &str) -> Option<RunResult> {
        let head = text.split(':').next().unwrap_or_default();
        RunResult::ALL.into_iter().find(|r| r.as_str() == head)
    }
}

/// A short, stable label for a skip reason (the metrics' `reason`).
pub fn skip_kind(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.contains("upgrade") {
        "upgrade"
    } else if r.contains("install") || r.contains("min_cluster_age") {
        "cluster_age"
    } else if r.contains("free") {
        "free_space"
    } else if r.contains("progressing") {
        "operator_progressing"
    } else if r.contains("alarm") {
        "etcd_alarm"
    } else if r.contains("learner") || r.contains("member") {
        "member"
    } else if r.contains("another backup") || r.contains("holds the run lock") || r.contains("lock") {
        "busy"
    } else {
        "other"
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillState {
    pub id: String,
    pub finished: String,
    pub ok: bool,
    /// What the restored etcd served, or why the drill failed.
    pub summary: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    pub run: String,
    pub trigger: String,
    pub started: String,
    pub finished: String,
    /// A [`RunResult`]: `ok`, `partial`, `pending`, `failed`, `skipped` or `done-elsewhere`.
    pub result: String,
    pub reason: Option<String>,
    pub id: Option<String>,
    pub bytes: Option<u64>,
    pub duration_s: f64,
    pub targets: Vec<TargetState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetState {
    pub name: String,
    pub ok: bool,
    pub error: Option<String>,
}

pub fn path(staging: &Path) -> PathBuf {
    staging.join("state.json")
}

impl State {
    pub fn load(staging: &Path) -> State {
        std::fs::read(path(staging))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save(&self, staging: &Path) -> Result<()> {
        let tmp = staging.join(format!(".state.json.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        fsutil::write_private_file(&tmp, &serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path(staging)).with_context(|| format!("cannot write '{}'", path(staging).display()))
    }

    pub fn push(&mut self, run: RunState) {
        *self.runs_total.entry(run.result.clone()).or_default() += 1;
        if run.result == RunResult::Skipped.as_str() {
            let kind = skip_kind(run.reason.as_deref().unwrap_or_default());
            *self.skips_total.entry(kind.to_string()).or_default() += 1;
        }
        self.runs.insert(0, run);
        self.runs.truncate(KEEP_RUNS);
    }

    /// A set a run left partial or pending has reached every target since: the run's entry
    /// says so now (the counters keep what the run itself came to).
    pub fn settle(&mut self, id: &str) -> bool {
        let mut changed = false;
        for r in self.runs.iter_mut().filter(|r| r.id.as_deref() == Some(id)) {
            if matches!(
                RunResult::parse(&r.result),
                Some(RunResult::Partial | RunResult::Pending)
            ) {
                r.result = RunResult::Ok.as_str().to_string();
                r.reason = Some("delivered to every target after the run".into());
                for t in &mut r.targets {
                    t.ok = true;
                    t.error = None;
                }
                changed = true;
            }
        }
        changed
    }
}
