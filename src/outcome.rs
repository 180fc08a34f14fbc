//! What a run came to ([`RunResult`]) and why a run was skipped, typed: each kind carries its metric label (`skips_total{reason}`),
//! and each skip its words for the journal, `status` and the run record. Code that decides
//! on a skip builds one here; nothing downstream reads the words to learn the kind.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipKind {
    /// An upgrade is in progress (`guards.skip_during_upgrade`).
    Upgrade,
    /// The cluster is installing or younger than `guards.min_cluster_age`.
    ClusterAge,
    /// Staging has less room than `guards.min_free_space`.
    FreeSpace,
    /// A ClusterOperator is Progressing.
    OperatorProgressing,
    /// etcd raises an alarm (NOSPACE, CORRUPT).
    EtcdAlarm,
    /// This node's member is down, silent, unhealthy or a learner: another node takes the run.
    Member,
    /// Another backup holds the run lock or this node's staging.
    Busy,
    /// The daemon is stopping.
    Stopping,
    /// Another node ran it (`backup` exits 3; the record says done-elsewhere).
    Elsewhere,
}

impl SkipKind {
    /// The metrics' `reason` label; stable, alerts and dashboards use it.
    pub fn label(self) -> &'static str {
        match self {
            SkipKind::Upgrade => "upgrade",
            SkipKind::ClusterAge => "cluster_age",
            SkipKind::FreeSpace => "free_space",
            SkipKind::OperatorProgressing => "operator_progressing",
            SkipKind::EtcdAlarm => "etcd_alarm",
            SkipKind::Member => "member",
            SkipKind::Busy => "busy",
            SkipKind::Stopping => "stopping",
            SkipKind::Elsewhere => "done_elsewhere",
        }
    }
}

/// A skip: its kind and, in words, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub kind: SkipKind,
    pub reason: String,
}

impl Skip {
    pub fn new(kind: SkipKind, reason: impl Into<String>) -> Skip {
        Skip {
            kind,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// What a run came to, in `state.json`, in the run markers in etcd and as the metrics'
/// `result` label. A run that took a set is never `Failed`: where the set is is what counts.
/// Serialized as [`RunResult::as_str`] says (`state.json` keeps the words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
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

impl fmt::Display for RunResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_the_words_are_the_reason() {
        let all = [
            SkipKind::Upgrade,
            SkipKind::ClusterAge,
            SkipKind::FreeSpace,
            SkipKind::OperatorProgressing,
            SkipKind::EtcdAlarm,
            SkipKind::Member,
            SkipKind::Busy,
            SkipKind::Stopping,
            SkipKind::Elsewhere,
        ];
        let labels: std::collections::BTreeSet<_> = all.iter().map(|k| k.label()).collect();
        assert_eq!(labels.len(), all.len());
        assert_eq!(Skip::new(SkipKind::Busy, "held").to_string(), "held");
    }

    #[test]
    fn a_result_is_stored_as_its_words() {
        for r in RunResult::ALL {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<RunResult>(&json).unwrap(), r);
            assert_eq!(RunResult::parse(&format!("{r}: why")), Some(r));
        }
    }
}
