//! "Am I protected?": the verdict `status` opens with, as a pure function of what this node
//! knows (its state file, the other nodes' heartbeats, whether etcd answered), so it is the
//! same in `status`, `status --json` and a check that feeds on its exit code.
//!
//! - FAILING (exit 1): the last run failed, or no target holds a good set newer than the
//!   schedule's interval + 2 h.
//! - AT RISK (exit 4): some target lacks such a set, sets wait in staging for delivery, the
//!   daemon is not running, this node never ran, or etcd or a target does not answer.
//! - OK (exit 0): none of those.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::outcome::RunResult;
use crate::staging::state::{State, TargetCoverage};

/// How much older than the schedule's interval the newest good set may be.
pub const GRACE: Duration = Duration::from_secs(2 * 3600);
/// The interval assumed where this host has no schedule: daily.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Level {
    #[serde(rename = "OK")]
    Ok,
    #[serde(rename = "AT RISK")]
    AtRisk,
    #[serde(rename = "FAILING")]
    Failing,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::AtRisk => "AT RISK",
            Level::Failing => "FAILING",
        }
    }

    /// `status`'s exit code: 0, 4 or 1.
    pub fn exit_code(self) -> u8 {
        match self {
            Level::Ok => 0,
            Level::AtRisk => 4,
            Level::Failing => 1,
        }
    }
}

/// The newest good set a target holds, as the freshest report of any node says.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Coverage {
    pub target: String,
    pub newest_id: Option<String>,
    /// RFC 3339, UTC.
    pub newest_time: Option<String>,
    pub sets: u64,
    /// Which node's listing this is.
    pub seen_by: Option<String>,
    /// Newer than the interval + 2 h.
    pub fresh: bool,
}

/// The verdict and its reasons, worst first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub level: Level,
    pub reasons: Vec<String>,
    pub coverage: Vec<Coverage>,
}

/// What the verdict is made of.
pub struct Facts<'a> {
    pub state: &'a State,
    /// The configured targets, by name.
    pub targets: Vec<String>,
    /// When sets are split between targets (`[[target]] files`): each file of a set, and
    /// the targets that hold it. Empty: every target holds every file.
    pub custody: Vec<(String, Vec<String>)>,
    /// (node, what it last listed per target) of the other nodes' heartbeats.
    pub others: Vec<(String, BTreeMap<String, TargetCoverage>)>,
    /// The schedule's interval (the longest gap between its runs); `None`: this host has no
    /// schedule.
    pub interval: Option<Duration>,
    /// Is the daemon alive on this node (its heartbeat)?
    pub daemon_alive: bool,
    /// Sets in staging owed to a target.
    pub pending_sets: usize,
    /// etcd's problem when `status` asked it; `None`: it answered (or was not asked).
    pub etcd_problem: Option<String>,
    /// The election's record of the cluster's last run, whichever node ran it.
    pub cluster_last: Option<ClusterRun>,
    pub now: DateTime<Utc>,
}

/// The cluster's last elected run, as the election recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterRun {
    pub run: String,
    pub node: String,
    pub result: crate::outcome::Recorded,
    /// RFC 3339, UTC.
    pub finished: String,
}

/// Per target, the newest complete set any node's listing reports.
fn coverage(f: &Facts, limit: chrono::TimeDelta) -> Vec<Coverage> {
    let me = (String::from("this node"), f.state.targets.clone());
    let listings: Vec<&(String, BTreeMap<String, TargetCoverage>)> = std::iter::once(&me).chain(&f.others).collect();
    f.targets
        .iter()
        .map(|t| {
            let best = listings
                .iter()
                .filter_map(|(node, cov)| cov.get(t).map(|c| (node, c)))
                .max_by_key(|(_, c)| c.newest_complete_time.as_deref().and_then(crate::clock::parse));
            let time = best.and_then(|(_, c)| c.newest_complete_time.clone());
            let fresh = time
                .as_deref()
                .and_then(crate::clock::parse)
                .is_some_and(|t| f.now - t <= limit);
            Coverage {
                target: t.clone(),
                newest_id: best.and_then(|(_, c)| c.newest_complete_id.clone()),
                newest_time: time,
                sets: best.map(|(_, c)| c.sets).unwrap_or(0),
                seen_by: best.map(|(n, _)| n.to_string()),
                fresh,
            }
        })
        .collect()
}

pub fn judge(f: &Facts) -> Verdict {
    let interval = f.interval.unwrap_or(DEFAULT_INTERVAL) + GRACE;
    let limit = chrono::TimeDelta::from_std(interval).unwrap_or(chrono::TimeDelta::MAX);
    let window = crate::clock::span(interval.as_secs());
    let cov = coverage(f, limit);
    let mut failing = Vec::new();
    let mut at_risk = Vec::new();
    // The last run this node did something in (not a skip, not another node's run): a
    // skipped manual `backup` after a failed night hides nothing.
    let local_last = f
        .state
        .runs
        .iter()
        .find(|r| !matches!(r.result, RunResult::Skipped | RunResult::DoneElsewhere));
    if let Some(last) = local_last
        && last.result == RunResult::Failed
    {
        failing.push(format!(
            "the last run ({}) failed: {}",
            last.run,
            last.reason.as_deref().unwrap_or("no reason recorded")
        ));
    }
    // Another node's failed run counts on every node: the cluster is not backed up.
    if let Some(c) = &f.cluster_last
        && c.result.result() == Some(RunResult::Failed)
        && local_last.is_none_or(|l| l.run != c.run && l.finished < c.finished)
    {
        failing.push(format!("the cluster's last run ({}, on {}) failed", c.run, c.node));
    }
    // A restore needs every file of a set: with sets split between targets, the targets
    // holding one file all being stale is as bad as every target being stale.
    let stale_part = f.custody.iter().find(|(_, holders)| {
        let held: Vec<&Coverage> = cov.iter().filter(|c| holders.contains(&c.target)).collect();
        !held.is_empty() && held.iter().all(|c| !c.fresh)
    });
    if !cov.is_empty() && (cov.iter().all(|c| !c.fresh) || stale_part.is_some()) {
        let stale = match stale_part.filter(|_| cov.iter().any(|c| c.fresh)) {
            Some((file, holders)) => format!(
                "no target holding the {file} ({}) holds a good set newer than {window} (the schedule's interval + 2h)",
                holders.join(", ")
            ),
            None => format!("no target holds a good set newer than {window} (the schedule's interval + 2h)"),
        };
        if f.etcd_problem.is_some() {
            // The other nodes' newer reports are in etcd, which does not answer: unknown.
            at_risk.push(format!(
                "{stale} as far as this node knows (the other nodes' reports are unreadable)"
            ));
        } else {
            failing.push(stale);
        }
    } else {
        for c in cov.iter().filter(|c| !c.fresh) {
            at_risk.push(match &c.newest_id {
                Some(id) => format!("target '{}': its newest good set {id} is older than {window}", c.target),
                None => format!("target '{}' holds no good set", c.target),
            });
        }
    }
    if let Some(last) = local_last
        && matches!(last.result, RunResult::Partial | RunResult::Pending)
    {
        let missing: Vec<String> = last
            .targets
            .iter()
            .filter(|t| !t.ok)
            .map(|t| format!("'{}': {}", t.name, t.error.as_deref().unwrap_or("not stored")))
            .collect();
        at_risk.push(format!(
            "the last run ({}) did not store its set on every target: {}",
            last.run,
            missing.join("; ")
        ));
    }
    if f.pending_sets > 0 {
        at_risk.push(format!("{} set(s) wait in staging for delivery", f.pending_sets));
    }
    if !f.daemon_alive {
        at_risk.push(
            match f.state.daemon.as_ref().and_then(|d| crate::clock::parse(&d.beat)) {
                Some(t) => format!(
                    "the daemon is not running (last heartbeat {})",
                    crate::clock::relative(t, f.now)
                ),
                None => "the daemon is not running (no heartbeat recorded)".into(),
            },
        );
    }
    if f.state.runs.is_empty() {
        at_risk.push("this node never ran a backup".into());
    }
    if let Some(e) = &f.etcd_problem {
        at_risk.push(format!("etcd does not answer: {e}"));
    }
    if let Some(p) = &f.state.probe {
        at_risk.extend(
            p.problems()
                .into_iter()
                .map(|p| format!("the daemon's probe found {p}")),
        );
    }
    let level = if !failing.is_empty() {
        Level::Failing
    } else if !at_risk.is_empty() {
        Level::AtRisk
    } else {
        Level::Ok
    };
    failing.extend(at_risk);
    Verdict {
        level,
        reasons: failing,
        coverage: cov,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::state::{DaemonBeat, RunState, TargetState};

    fn run(result: RunResult, reason: Option<&str>) -> RunState {
        RunState {
            run: "2026-12-07T0230".into(),
            trigger: "schedule".into(),
            started: "2026-12-07T02:30:00Z".into(),
            finished: "2026-12-07T02:31:00Z".into(),
            result,
            reason: reason.map(Into::into),
            skip: None,
            id: Some("2026-12-07_023012".into()),
            bytes: Some(1),
            duration_s: 1.0,
            pace: None,
            targets: vec![
                TargetState {
                    name: "a".into(),
                    ok: true,
                    error: None,
                },
                TargetState {
                    name: "b".into(),
                    ok: result == RunResult::Ok,
                    error: (result != RunResult::Ok).then(|| "507 Insufficient Storage".into()),
                },
            ],
        }
    }

    fn cov(time: &str) -> TargetCoverage {
        TargetCoverage {
            sets: 3,
            newest_complete_id: Some(time.replace([':', 'Z'], "").replace('T', "_")),
            newest_complete_time: Some(time.into()),
            listed_at: time.into(),
        }
    }

    fn state(runs: Vec<RunState>, a: Option<&str>, b: Option<&str>) -> State {
        let mut s = State {
            runs,
            ..State::default()
        };
        if let Some(t) = a {
            s.targets.insert("a".into(), cov(t));
        }
        if let Some(t) = b {
            s.targets.insert("b".into(), cov(t));
        }
        s.daemon = Some(DaemonBeat {
            pid: 1,
            started: "2026-12-07T00:00:00Z".into(),
            beat: "2026-12-07T11:59:30Z".into(),
            version: "0".into(),
            stopped: None,
        });
        s
    }

    fn facts(state: &State) -> Facts<'_> {
        Facts {
            state,
            targets: vec!["a".into(), "b".into()],
            custody: Vec::new(),
            others: Vec::new(),
            interval: Some(Duration::from_secs(24 * 3600)),
            daemon_alive: true,
            pending_sets: 0,
            etcd_problem: None,
            cluster_last: None,
            now: crate::clock::parse("2026-12-07T12:00:00Z").unwrap(),
        }
    }

    /// Sets split between targets: every file needs a fresh holder.
    #[test]
    fn a_split_set_needs_a_fresh_holder_of_each_file() {
        let (recent, old) = ("2026-12-07T02:30:12Z", "2026-12-05T02:30:12Z");
        let s = state(vec![run(RunResult::Ok, None)], Some(old), Some(recent));
        // Without custody, one stale target of two: AT RISK.
        assert_eq!(judge(&facts(&s)).level, Level::AtRisk);
        // a alone holds the snapshot: FAILING, naming it.
        let mut f = facts(&s);
        f.custody = vec![
            ("snapshot".into(), vec!["a".into()]),
            ("static resources archive".into(), vec!["b".into()]),
        ];
        let v = judge(&f);
        assert_eq!(v.level, Level::Failing, "{v:?}");
        assert!(v.reasons[0].contains("no target holding the snapshot (a)"), "{v:?}");
        // Both fresh: OK.
        let s = state(vec![run(RunResult::Ok, None)], Some(recent), Some(recent));
        let mut f = facts(&s);
        f.custody = vec![("snapshot".into(), vec!["a".into()])];
        assert_eq!(judge(&f).level, Level::Ok);
    }

    #[test]
    fn verdicts_as_the_table_says() {
        let recent = "2026-12-07T02:30:12Z";
        let old = "2026-12-05T02:30:12Z";
        // Every target fresh, the last run ok, the daemon alive: OK.
        let s = state(vec![run(RunResult::Ok, None)], Some(recent), Some(recent));
        let v = judge(&facts(&s));
        assert_eq!((v.level, v.reasons.clone()), (Level::Ok, vec![]), "{v:?}");
        assert!(v.coverage.iter().all(|c| c.fresh));
        // The last run failed: FAILING, whatever the targets hold.
        let s = state(
            vec![run(RunResult::Failed, Some("etcd is down"))],
            Some(recent),
            Some(recent),
        );
        let v = judge(&facts(&s));
        assert_eq!(v.level, Level::Failing);
        assert!(v.reasons[0].contains("failed: etcd is down"), "{v:?}");
        // No target fresh: FAILING.
        let s = state(vec![run(RunResult::Ok, None)], Some(old), None);
        let v = judge(&facts(&s));
        assert_eq!(v.level, Level::Failing, "{v:?}");
        assert!(v.reasons[0].contains("newer than 1d 2h"), "{v:?}");
        // One target stale, the last run partial (with its reason): AT RISK.
        let s = state(vec![run(RunResult::Partial, None)], Some(recent), Some(old));
        let v = judge(&facts(&s));
        assert_eq!(v.level, Level::AtRisk, "{v:?}");
        assert!(
            v.reasons.iter().any(|r| r.contains("target 'b': its newest good set")),
            "{v:?}"
        );
        assert!(
            v.reasons.iter().any(|r| r.contains("'b': 507 Insufficient Storage")),
            "{v:?}"
        );
        // Another node's fresher listing counts.
        let mut f = facts(&s);
        f.others = vec![("master-1".into(), BTreeMap::from([("b".to_string(), cov(recent))]))];
        let v = judge(&f);
        assert_eq!(v.coverage[1].seen_by.as_deref(), Some("master-1"));
        assert!(v.coverage[1].fresh);
        // A dead daemon, pending sets, etcd down, a fresh node: AT RISK each.
        let s = state(vec![run(RunResult::Ok, None)], Some(recent), Some(recent));
        for change in [
            (|f: &mut Facts| f.daemon_alive = false) as fn(&mut Facts),
            |f| f.pending_sets = 2,
            |f| f.etcd_problem = Some("connection refused".into()),
        ] {
            let mut f = facts(&s);
            change(&mut f);
            assert_eq!(judge(&f).level, Level::AtRisk);
        }
        // Another node's failed run: FAILING here too; a skipped manual run after a failed
        // one hides nothing.
        let s = state(vec![run(RunResult::Ok, None)], Some(recent), Some(recent));
        let mut f = facts(&s);
        f.cluster_last = Some(ClusterRun {
            run: "2026-12-08T0230".into(),
            node: "master-1".into(),
            result: RunResult::Failed.into(),
            finished: "2026-12-08T02:31:00Z".into(),
        });
        assert_eq!(judge(&f).level, Level::Failing, "{:?}", judge(&f));
        let mut skipped = run(RunResult::Skipped, Some("an upgrade is in progress"));
        skipped.run = "manual".into();
        let s = state(
            vec![skipped, run(RunResult::Failed, Some("disk full"))],
            Some(recent),
            Some(recent),
        );
        let v = judge(&facts(&s));
        assert_eq!(v.level, Level::Failing, "{v:?}");
        assert!(v.reasons[0].contains("disk full"), "{v:?}");
        // Stale coverage while etcd does not answer: unknown, so AT RISK, not FAILING.
        let s = state(vec![run(RunResult::Ok, None)], Some(old), None);
        let mut f = facts(&s);
        f.etcd_problem = Some("connection refused".into());
        assert_eq!(judge(&f).level, Level::AtRisk, "{:?}", judge(&f));
        let empty = state(vec![], Some(recent), Some(recent));
        let v = judge(&facts(&empty));
        assert_eq!(v.level, Level::AtRisk);
        assert!(v.reasons.iter().any(|r| r.contains("never ran")), "{v:?}");
        assert_eq!(Level::AtRisk.exit_code(), 4);
        assert_eq!(Level::Failing.exit_code(), 1);
    }
}
