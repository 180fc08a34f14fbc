//! Is a backup safe and useful now? Each guard that fails gives a reason, and the run is
//! skipped (exit code 3, result "skipped"), not failed. The cluster-wide facts come straight
//! from etcd: the ClusterVersion and ClusterOperator objects the API server stores as JSON.

use anyhow::Result;
use chrono::{DateTime, Utc};
use etcd_client::{AlarmAction, AlarmType};
use serde_json::Value;

use crate::config::Settings;
use crate::config::types::Size;
use crate::etcd::{CLUSTER_VERSION_KEY, Member, MemberStatus};
use crate::outcome::{Skip, SkipKind};

/// The ClusterOperators whose `Progressing=True` makes the platform's own script refuse.
pub const OPERATORS: [&str; 4] = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"];

pub fn operator_key(name: &str) -> String {
    format!("/kubernetes.io/config.openshift.io/clusteroperators/{name}")
}

/// When the cluster finished installing: the oldest history entry's completion time.
pub fn install_time(cv: &Value) -> Option<DateTime<Utc>> {
    let history = cv.pointer("/status/history")?.as_array()?;
    let oldest = history.last()?;
    let t = oldest.get("completionTime")?.as_str()?;
    DateTime::parse_from_rfc3339(t).ok().map(|t| t.to_utc())
}

/// Why an upgrade counts as in progress, if it does.
pub fn upgrade_in_progress(cv: &Value) -> Option<String> {
    let newest = cv.pointer("/status/history/0")?;
    let state = newest.get("state").and_then(Value::as_str).unwrap_or("");
    let version = newest.get("version").and_then(Value::as_str).unwrap_or("");
    let desired = cv
        .pointer("/status/desired/version")
        .and_then(Value::as_str)
        .unwrap_or(version);
    if state == "Partial" {
        return Some(format!(
            "an upgrade to {version} is in progress (ClusterVersion history state Partial)"
        ));
    }
    if desired != version {
        return Some(format!("an upgrade from {version} to {desired} is starting"));
    }
    None
}

pub use crate::etcd::completed_upgrade;

/// What a ClusterOperator's `Progressing` condition says, as `cluster-backup.sh` reads it:
/// only exactly `False` lets it back up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorState {
    /// `Progressing=False`.
    Settled,
    /// `Progressing=True`.
    Progressing,
    /// `Progressing` with another status (`Unknown`, or anything else), as found.
    Unsettled(String),
    /// The object has no `Progressing` condition.
    ConditionMissing,
    /// No such object in etcd (or not JSON).
    ObjectMissing,
}

impl OperatorState {
    pub fn of(co: Option<&Value>) -> OperatorState {
        let Some(co) = co else {
            return OperatorState::ObjectMissing;
        };
        let condition = co
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.get("type").and_then(Value::as_str) == Some("Progressing"))
            });
        match condition.map(|c| c.get("status").and_then(Value::as_str).unwrap_or("")) {
            None => OperatorState::ConditionMissing,
            Some("False") => OperatorState::Settled,
            Some("True") => OperatorState::Progressing,
            Some(other) => OperatorState::Unsettled(other.to_string()),
        }
    }

    /// The state in words, for a skip reason: `Progressing=Unknown`, `condition Progressing
    /// missing`...
    pub fn describe(&self) -> String {
        match self {
            OperatorState::Settled => "is Progressing=False".into(),
            OperatorState::Progressing => "is Progressing=True".into(),
            OperatorState::Unsettled(s) if s.is_empty() => "has Progressing with no status".into(),
            OperatorState::Unsettled(s) => format!("is Progressing={s}"),
            OperatorState::ConditionMissing => "has no Progressing condition".into(),
            OperatorState::ObjectMissing => "is missing from etcd".into(),
        }
    }
}

/// The cluster-wide facts the guards look at.
#[derive(Debug, Default)]
pub struct Facts {
    pub cluster_version: Option<Value>,
    /// Each of [`OPERATORS`], with its object when etcd holds one (as JSON).
    pub operators: Vec<(String, Option<Value>)>,
    pub alarms: Vec<String>,
}

pub async fn gather(member: &mut Member) -> Result<Facts> {
    let parse = |raw: Option<Vec<u8>>| raw.and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    let cluster_version = parse(member.get(CLUSTER_VERSION_KEY).await?);
    let mut operators = Vec::new();
    for name in OPERATORS {
        operators.push((name.to_string(), parse(member.get(&operator_key(name)).await?)));
    }
    let d = member.request_timeout;
    let resp = crate::etcd::within(d, "etcd alarm list", async {
        member
            .client
            .alarm(AlarmAction::Get, AlarmType::None, None)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    })
    .await?;
    let alarms = resp
        .alarms()
        .iter()
        .map(|a| format!("{:?} on member {:x}", a.alarm(), a.member_id()))
        .collect();
    Ok(Facts {
        cluster_version,
        operators,
        alarms,
    })
}

/// Which guard refused a backup. The cluster-state guards can be overridden by
/// `backup --force` (as `cluster-backup.sh --force` does); those about etcd's health and the
/// node's disk cannot: a snapshot then fails or harms etcd whatever the operator wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    MemberUnhealthy,
    Alarm,
    Installing,
    ClusterAge,
    Upgrade,
    OperatorProgressing,
    FreeSpace,
}

impl Guard {
    /// The kind of skip a refusal by this guard is.
    pub fn skip_kind(self) -> SkipKind {
        match self {
            Guard::MemberUnhealthy => SkipKind::Member,
            Guard::Alarm => SkipKind::EtcdAlarm,
            Guard::Installing | Guard::ClusterAge => SkipKind::ClusterAge,
            Guard::Upgrade => SkipKind::Upgrade,
            Guard::OperatorProgressing => SkipKind::OperatorProgressing,
            Guard::FreeSpace => SkipKind::FreeSpace,
        }
    }

    pub fn overridable(self) -> bool {
        matches!(
            self,
            Guard::Installing | Guard::ClusterAge | Guard::Upgrade | Guard::OperatorProgressing
        )
    }
}

/// A guard not met, and why, in words for the log and the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub guard: Guard,
    pub reason: String,
}

impl Refusal {
    pub fn skip(self) -> Skip {
        Skip::new(self.guard.skip_kind(), self.reason)
    }
}

/// Every guard not met, in the order they are checked (empty: the run may go ahead).
/// `free` is the free space in staging, in bytes.
pub fn check_all(
    settings: &Settings,
    facts: &Facts,
    status: &MemberStatus,
    free: u64,
    now: DateTime<Utc>,
) -> Vec<Refusal> {
    let mut refused = Vec::new();
    let mut no = |guard: Guard, reason: String| refused.push(Refusal { guard, reason });
    let g = &settings.guards;
    if !status.errors.is_empty() {
        no(
            Guard::MemberUnhealthy,
            format!("this node's etcd member is unhealthy: {}", status.errors.join("; ")),
        );
    }
    if let Some(a) = facts.alarms.first() {
        no(Guard::Alarm, format!("etcd raises an alarm: {a}"));
    }
    let installing = facts
        .cluster_version
        .as_ref()
        .is_some_and(|cv| install_time(cv).is_none() && cv.pointer("/status/history/0").is_some());
    if installing {
        no(
            Guard::Installing,
            "the cluster is still installing (its first ClusterVersion history entry has no completionTime)".into(),
        );
    }
    let installed = facts.cluster_version.as_ref().and_then(install_time).or(g.installed_at);
    match installed {
        Some(t) if now - t < chrono::TimeDelta::from_std(g.min_cluster_age.0).unwrap_or(chrono::TimeDelta::MAX) => {
            no(
                Guard::ClusterAge,
                format!(
                    "the cluster was installed at {} ({} ago), less than guards.min_cluster_age ({})",
                    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    humantime::format_duration((now - t).to_std().unwrap_or_default()),
                    g.min_cluster_age
                ),
            );
        }
        Some(_) => {}
        None if installing => {}
        None => {
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!(
                    "no install time known (no ClusterVersion in etcd, no guards.installed_at): min_cluster_age does not apply"
                );
            }
        }
    }
    if g.skip_during_upgrade
        && let Some(reason) = facts.cluster_version.as_ref().and_then(upgrade_in_progress)
    {
        no(Guard::Upgrade, reason);
    }
    // On OpenShift (a ClusterVersion exists) as strict as cluster-backup.sh: each of the
    // four operators present with Progressing exactly False. Elsewhere only an operator
    // object that says Progressing=True refuses.
    let openshift = facts.cluster_version.is_some();
    let unsettled: Vec<String> = facts
        .operators
        .iter()
        .map(|(name, co)| (name, OperatorState::of(co.as_ref())))
        .filter(|(_, state)| match state {
            OperatorState::Settled => false,
            OperatorState::Progressing => true,
            _ => openshift,
        })
        .map(|(name, state)| format!("ClusterOperator {name} {}", state.describe()))
        .collect();
    if !unsettled.is_empty() {
        no(
            Guard::OperatorProgressing,
            format!(
                "{} (cluster-backup.sh needs Progressing=False on each of {})",
                unsettled.join(", "),
                OPERATORS.join(", ")
            ),
        );
    }
    let needed = g.min_free_space.required(status.db_size);
    if free < needed {
        no(
            Guard::FreeSpace,
            format!(
                "only {} free in snapshot.staging_dir, guards.min_free_space ({}) asks for {}",
                Size(free),
                g.min_free_space,
                Size(needed)
            ),
        );
    }
    refused
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cv(history: Value, desired: &str) -> Value {
        json!({"spec": {"clusterID": "id"}, "status": {"desired": {"version": desired}, "history": history}})
    }

    #[test]
    fn install_time_and_upgrades() {
        let installed = cv(
            json!([{"state": "Completed", "version": "4.15.4", "startedTime": "2026-11-25T00:00:00Z", "completionTime": "2026-11-25T01:00:00Z"}]),
            "4.15.4",
        );
        assert_eq!(
            install_time(&installed).unwrap().to_rfc3339(),
            "2026-11-25T01:00:00+00:00"
        );
        assert!(upgrade_in_progress(&installed).is_none());
        assert!(completed_upgrade(&installed).is_none(), "the install is not an upgrade");

        let upgrading = cv(
            json!([
                {"state": "Partial", "version": "4.15.5", "completionTime": null},
                {"state": "Completed", "version": "4.15.4", "completionTime": "2026-01-01T00:00:00Z"}
            ]),
            "4.15.5",
        );
        assert!(upgrade_in_progress(&upgrading).unwrap().contains("4.15.5"));
        assert_eq!(
            install_time(&upgrading).unwrap().to_rfc3339(),
            "2026-01-01T00:00:00+00:00"
        );
        assert!(completed_upgrade(&upgrading).is_none());

        let starting = cv(
            json!([{"state": "Completed", "version": "4.15.4", "completionTime": "2026-01-01T00:00:00Z"}]),
            "4.15.5",
        );
        assert!(upgrade_in_progress(&starting).unwrap().contains("starting"));

        let done = cv(
            json!([
                {"state": "Completed", "version": "4.15.5", "completionTime": "2026-11-25T03:00:00Z"},
                {"state": "Completed", "version": "4.15.4", "completionTime": "2026-01-01T00:00:00Z"}
            ]),
            "4.15.5",
        );
        assert_eq!(completed_upgrade(&done).as_deref(), Some("4.15.5"));
        assert!(upgrade_in_progress(&done).is_none());
    }

    #[test]
    fn operator_states_as_the_script_reads_them() {
        let of = |v: Value| OperatorState::of(Some(&v));
        let co = json!({"status": {"conditions": [{"type": "Available", "status": "True"}, {"type": "Progressing", "status": "True"}]}});
        assert_eq!(of(co), OperatorState::Progressing);
        let co = json!({"status": {"conditions": [{"type": "Progressing", "status": "False"}]}});
        assert_eq!(of(co), OperatorState::Settled);
        let co = json!({"status": {"conditions": [{"type": "Progressing", "status": "Unknown"}]}});
        assert_eq!(of(co), OperatorState::Unsettled("Unknown".into()));
        let co = json!({"status": {"conditions": [{"type": "Available", "status": "True"}]}});
        assert_eq!(of(co), OperatorState::ConditionMissing);
        assert_eq!(of(json!({})), OperatorState::ConditionMissing);
        assert_eq!(OperatorState::of(None), OperatorState::ObjectMissing);
    }
}
