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
}

/// The result a run record in etcd holds (`<prefix>/runs/<run>`, `last`, the note of a set
/// about to be published). Its serialized form is the one string earlier releases wrote and
/// read, so nodes of both releases share the records during a rolling update: `ok`,
/// `partial`, `pending`, `failed`, `done-elsewhere`, `skipped: <reason>` and `publishing`.
/// A form this release does not know (a later release's) is kept as written and never taken
/// for one it knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// A run's result; a skip has its reason in [`Recorded::Skipped`].
    Run(RunResult),
    Skipped(String),
    /// The runner is about to publish the set (not a result yet).
    Publishing,
    Unknown(String),
}

impl Recorded {
    pub fn parse(text: &str) -> Recorded {
        if text == "publishing" {
            return Recorded::Publishing;
        }
        if let Some(reason) = text.strip_prefix("skipped") {
            if reason.is_empty() {
                return Recorded::Skipped(String::new());
            }
            if let Some(reason) = reason.strip_prefix(": ") {
                return Recorded::Skipped(reason.to_string());
            }
        }
        match RunResult::ALL.into_iter().find(|r| r.as_str() == text) {
            Some(RunResult::Skipped) => Recorded::Skipped(String::new()),
            Some(r) => Recorded::Run(r),
            None => Recorded::Unknown(text.to_string()),
        }
    }

    /// The run's result, when the record holds one this release knows.
    pub fn result(&self) -> Option<RunResult> {
        match self {
            Recorded::Run(r) => Some(*r),
            Recorded::Skipped(_) => Some(RunResult::Skipped),
            Recorded::Publishing | Recorded::Unknown(_) => None,
        }
    }
}

impl From<RunResult> for Recorded {
    fn from(r: RunResult) -> Recorded {
        match r {
            RunResult::Skipped => Recorded::Skipped(String::new()),
            r => Recorded::Run(r),
        }
    }
}

impl fmt::Display for Recorded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recorded::Run(r) => f.write_str(r.as_str()),
            Recorded::Skipped(reason) if reason.is_empty() => f.write_str("skipped"),
            Recorded::Skipped(reason) => write!(f, "skipped: {reason}"),
            Recorded::Publishing => f.write_str("publishing"),
            Recorded::Unknown(text) => f.write_str(text),
        }
    }
}

impl serde::Serialize for Recorded {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Recorded {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Recorded, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        Ok(Recorded::parse(&text))
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
            let recorded = Recorded::from(r);
            assert_eq!(serde_json::to_string(&recorded).unwrap(), json);
            assert_eq!(Recorded::parse(r.as_str()).result(), Some(r));
        }
    }

    /// The strings earlier releases wrote into etcd's run records read back as what they
    /// meant, and write back byte for byte; a form a later release might write is kept as
    /// it is and never taken for a result.
    #[test]
    fn records_read_the_strings_earlier_releases_wrote() {
        let cases = [
            ("ok", Recorded::Run(RunResult::Ok)),
            ("partial", Recorded::Run(RunResult::Partial)),
            ("pending", Recorded::Run(RunResult::Pending)),
            ("failed", Recorded::Run(RunResult::Failed)),
            ("done-elsewhere", Recorded::Run(RunResult::DoneElsewhere)),
            ("publishing", Recorded::Publishing),
            (
                "skipped: cluster is upgrading: Progressing=True",
                Recorded::Skipped("cluster is upgrading: Progressing=True".into()),
            ),
            ("skipped", Recorded::Skipped(String::new())),
            ("superseded", Recorded::Unknown("superseded".into())),
            ("skippedX", Recorded::Unknown("skippedX".into())),
        ];
        for (text, want) in cases {
            let json = format!("\"{text}\"");
            let got: Recorded = serde_json::from_str(&json).unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(serde_json::to_string(&got).unwrap(), json, "{text}");
        }
        assert_eq!(Recorded::Unknown("superseded".into()).result(), None);
        assert_eq!(Recorded::Publishing.result(), None);
        assert_eq!(Recorded::Skipped("x".into()).result(), Some(RunResult::Skipped));
    }
}
