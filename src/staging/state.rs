//! The node's own record of its last runs, kept in `<staging_dir>/state.json` so `status`
//! works with the daemon stopped. Written atomically (temporary file, fsync, rename), and
//! changed only through [`State::update`], under `<staging_dir>/state.lock`: the daemon and a
//! manual `backup` beside it both write it, and neither may lose the other's change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::outcome::RunResult;

/// How many runs are kept.
const KEEP_RUNS: usize = 20;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// Newest first.
    pub runs: Vec<RunState>,
    /// The next scheduled run, RFC 3339 UTC, as the daemon last computed it.
    pub next_run: Option<String>,
    /// When that run really starts (its jitter added), RFC 3339 UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_start: Option<String>,
    /// The daemon's heartbeat, rewritten every minute while it runs: `status` tells a live
    /// daemon from a state file left behind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<DaemonBeat>,
    /// What the daemon's last probe of etcd and the targets found (at start, after a reload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<Probe>,
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
    /// Platform backup folders that cannot be imported, each reported once (log, `status`,
    /// `etcd_backupd_import_refused_sets`) instead of at every poll.
    #[serde(default)]
    pub import_refused: Vec<RefusedImport>,
    /// The newest set this node staged (its own or imported), for `status` and the metrics.
    #[serde(default)]
    pub newest_set: Option<SetState>,
    /// What each target held when this node last listed it (after retention), by target name.
    #[serde(default)]
    pub targets: BTreeMap<String, TargetCoverage>,
    /// The journal's writer on this node (see [`crate::journal::writer`]); absent on a node
    /// whose writer never wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal: Option<JournalState>,
}

/// What this node's journal writer last did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JournalState {
    /// Is this node's writer holding the lock and watching now?
    pub writing: bool,
    /// The first revision of the chain being written.
    pub chain_from: i64,
    /// The newest revision stored on every target holding snapshots, and the time it
    /// covers up to (RFC 3339, UTC): the newest moment a restore can reach.
    pub durable_revision: i64,
    pub durable_until: Option<String>,
    /// Chains ended by a break (a compaction past what was stored), since the state file
    /// was created, and the newest break's reason.
    pub breaks_total: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_break: Option<String>,
    /// Why the writer last stopped or a target last failed; cleared by a stored segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The daemon's heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonBeat {
    pub pid: u32,
    /// When this daemon started (RFC 3339, UTC).
    pub started: String,
    /// Its last heartbeat (RFC 3339, UTC).
    pub beat: String,
    /// Its version.
    pub version: String,
    /// When it stopped cleanly (RFC 3339, UTC): not running since, whatever the heartbeat's age.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

/// A probe of etcd and each target, and what it found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// When (RFC 3339, UTC).
    pub at: String,
    /// etcd's problem; `None`: it answered.
    #[serde(default)]
    pub etcd: Option<String>,
    /// Each target's problem (`None`: it answered), by name.
    #[serde(default)]
    pub targets: BTreeMap<String, Option<String>>,
}

impl Probe {
    /// Every problem, each naming what it is about.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self.etcd.iter().map(|e| format!("etcd: {e}")).collect();
        out.extend(
            self.targets
                .iter()
                .filter_map(|(name, p)| p.as_ref().map(|p| format!("target '{name}': {p}"))),
        );
        out
    }
}

/// A platform backup folder that cannot be imported, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefusedImport {
    /// The folder.
    pub path: String,
    /// What identifies this state of the folder: its snapshot's path and size, or the
    /// folder's path when it holds no single snapshot. A changed folder is looked at again.
    pub key: String,
    /// Why, in one line.
    pub reason: String,
    /// When it was first refused (RFC 3339, UTC).
    pub at: String,
}

/// A target's complete sets of this node's cluster, as this node last listed them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetCoverage {
    /// How many complete (not damaged) sets the target holds.
    pub sets: u64,
    /// The newest complete set's id and creation time (RFC 3339, UTC); none without one.
    #[serde(default)]
    pub newest_complete_id: Option<String>,
    #[serde(default)]
    pub newest_complete_time: Option<String>,
    /// When the target was listed (RFC 3339, UTC).
    #[serde(default)]
    pub listed_at: String,
}

impl TargetCoverage {
    /// The coverage of `complete`, the (id, creation time) of each complete set, listed now.
    pub fn of(complete: &[(String, chrono::DateTime<chrono::Utc>)]) -> TargetCoverage {
        let newest = complete.iter().max_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        TargetCoverage {
            sets: complete.len() as u64,
            newest_complete_id: newest.map(|(id, _)| id.clone()),
            newest_complete_time: newest.map(|(_, t)| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            listed_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }
    }
}

/// Records what each listed target holds (one write per pass), and forgets the targets
/// `configured` no longer names. Best effort: a state file that cannot be written is logged.
pub fn note_coverage(staging: &Path, listed: BTreeMap<String, TargetCoverage>, configured: impl Fn(&str) -> bool) {
    if listed.is_empty() {
        return;
    }
    State::update_or_log(staging, |state| {
        // A target listed now answers: what a probe found wrong with it earlier is over.
        if let Some(p) = state.probe.as_mut() {
            for name in listed.keys() {
                if let Some(problem) = p.targets.get_mut(name) {
                    *problem = None;
                }
            }
        }
        state.targets.extend(listed);
        state.targets.retain(|name, _| configured(name));
    });
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
    State::update_or_log(staging, |state| {
        if state.newest_set.as_ref().is_some_and(|s| s.id > m.id) {
            return;
        }
        state.newest_set = Some(SetState {
            id: m.id.clone(),
            restorable_until: m.restore.restorable_until.clone(),
            restorable_until_source: m.restore.restorable_until_source.clone(),
        });
    });
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillState {
    pub id: String,
    pub finished: String,
    pub ok: bool,
    /// What the restored etcd served, or why the drill failed.
    pub summary: String,
    /// The target the drilled set came from (a successful drill).
    #[serde(default)]
    pub target: Option<String>,
    /// The drilled set's creation time (RFC 3339, UTC).
    #[serde(default)]
    pub set_time: Option<String>,
    /// Seconds from the drill's start until the restored etcd answered: fetching and
    /// checking the set, `snapshot restore`, starting etcd on the restored data.
    #[serde(default)]
    pub restore_seconds: Option<f64>,
    /// By target, the creation time of the newest set a successful drill restored from it
    /// (kept across drills).
    #[serde(default)]
    pub drilled: BTreeMap<String, String>,
}

/// The `drilled` map of the drill after `previous`: the set a successful drill restored,
/// `(target, set creation time)`, counts when newer than the one known for its target.
pub fn drilled_after(previous: Option<DrillState>, drill: Option<(&str, &str)>) -> BTreeMap<String, String> {
    let mut drilled = previous.map(|d| d.drilled).unwrap_or_default();
    if let Some((target, created)) = drill {
        let t = |s: &str| chrono::DateTime::parse_from_rfc3339(s).ok();
        if drilled.get(target).is_none_or(|old| t(created) > t(old)) {
            drilled.insert(target.to_string(), created.to_string());
        }
    }
    drilled
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    pub run: String,
    pub trigger: String,
    pub started: String,
    pub finished: String,
    /// `ok`, `partial`, `pending`, `failed`, `skipped` or `done-elsewhere` in the file.
    pub result: RunResult,
    pub reason: Option<String>,
    /// A skip's kind, as its metric label ([`crate::outcome::SkipKind::label`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip: Option<String>,
    pub id: Option<String>,
    pub bytes: Option<u64>,
    pub duration_s: f64,
    pub targets: Vec<TargetState>,
    /// What pacing the snapshot pull did, when it was paced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pace: Option<crate::source::pace::PaceReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetState {
    pub name: String,
    pub ok: bool,
    pub error: Option<String>,
}

impl RunState {
    /// Marks the run skipped, with its reason and kind.
    pub fn skipped(&mut self, skip: &crate::outcome::Skip) {
        self.result = RunResult::Skipped;
        self.reason = Some(skip.reason.clone());
        self.skip = Some(skip.kind.label().into());
    }
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

    /// Reads, changes and writes the state file under its lock, so that concurrent writers
    /// (the daemon, a manual `backup`, a drill) each see the other's changes. The file is
    /// written only if `change` changed something.
    pub fn update<T>(staging: &Path, change: impl FnOnce(&mut State) -> T) -> Result<T> {
        let _lock = fsutil::lock(&staging.join("state.lock"))?;
        let mut state = State::load(staging);
        let before = serde_json::to_vec(&state)?;
        let out = change(&mut state);
        if serde_json::to_vec(&state)? != before {
            state.save(staging)?;
        }
        Ok(out)
    }

    /// [`State::update`] where a state file that cannot be written is logged, not fatal:
    /// the backups matter more than their record.
    pub fn update_or_log(staging: &Path, change: impl FnOnce(&mut State)) {
        if let Err(e) = State::update(staging, change) {
            tracing::warn!(error = %crate::error::one_line(&e), "cannot write the state file");
        }
    }

    /// Writes the whole file. Callers change state through [`State::update`]; tests use this
    /// to lay a state down.
    pub(crate) fn save(&self, staging: &Path) -> Result<()> {
        let tmp = staging.join(format!(".state.json.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        fsutil::write_private_file(&tmp, &serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path(staging)).with_context(|| format!("cannot write '{}'", path(staging).display()))
    }

    /// `run` is over: the running marker goes, if it is that run's (a manual `backup`
    /// beside the daemon's run leaves the daemon's marker alone).
    pub fn finished_running(&mut self, run: &str) {
        if self.running.as_deref() == Some(run) {
            self.running = None;
        }
    }

    pub fn push(&mut self, run: RunState) {
        *self.runs_total.entry(run.result.as_str().to_string()).or_default() += 1;
        if run.result == RunResult::Skipped {
            let kind = run.skip.clone().unwrap_or_else(|| "other".into());
            *self.skips_total.entry(kind).or_default() += 1;
        }
        self.runs.insert(0, run);
        self.runs.truncate(KEEP_RUNS);
    }

    /// A set a run left partial or pending has reached every target since: the run's entry
    /// says so now (the counters keep what the run itself came to).
    pub fn settle(&mut self, id: &str) {
        for r in self.runs.iter_mut().filter(|r| r.id.as_deref() == Some(id)) {
            if matches!(r.result, RunResult::Partial | RunResult::Pending) {
                r.result = RunResult::Ok;
                r.reason = Some("delivered to every target after the run".into());
                for t in &mut r.targets {
                    t.ok = true;
                    t.error = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writers that overlap (threads here; the daemon and a manual `backup` in life) never
    /// lose each other's changes: every increment is counted.
    #[test]
    fn concurrent_updates_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().to_path_buf();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let staging = staging.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        State::update(&staging, |s| *s.runs_total.entry("ok".into()).or_default() += 1).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(State::load(&staging).runs_total.get("ok"), Some(&200));
    }

    #[test]
    fn an_update_that_changes_nothing_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        State::update(dir.path(), |_| ()).unwrap();
        assert!(!path(dir.path()).exists());
    }

    #[test]
    fn drills_keep_the_newest_set_of_each_target() {
        let after = |prev: BTreeMap<String, String>, d: Option<(&str, &str)>| {
            let prev = DrillState {
                id: "p".into(),
                finished: String::new(),
                ok: true,
                summary: String::new(),
                target: None,
                set_time: None,
                restore_seconds: None,
                drilled: prev,
            };
            drilled_after(Some(prev), d)
        };
        let m = drilled_after(None, Some(("a", "2026-11-24T02:30:00Z")));
        assert_eq!(m["a"], "2026-11-24T02:30:00Z");
        // An older set drilled later does not move it back; a failed drill keeps the map.
        let m = after(m, Some(("a", "2026-11-20T00:00:00Z")));
        assert_eq!(m["a"], "2026-11-24T02:30:00Z");
        let m = after(m, None);
        assert_eq!(m.len(), 1);
        let m = after(m, Some(("b", "2026-11-25T00:00:00Z")));
        let m = after(m, Some(("a", "2026-11-25T02:30:00Z")));
        assert_eq!(
            (m["a"].as_str(), m["b"].as_str()),
            ("2026-11-25T02:30:00Z", "2026-11-25T00:00:00Z")
        );
    }
}
