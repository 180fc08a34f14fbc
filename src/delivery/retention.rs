//! Which backup sets to keep: restic's `forget` semantics as a pure function of (sets, policy,
//! now, time zone), plus applying it to one cluster folder of a target.
//!
//! Each `keep_*` rule walks the sets from the newest back and keeps the newest set of each
//! bucket (a set for `keep_last`, a calendar day, ISO week or month in the configured time
//! zone for the others) until it has kept its count; the union of all rules is kept. Then:
//! - `max_age` removes sets older than it even when a rule keeps them (a compliance cap);
//!   with every `keep_*` at 0 it instead keeps everything younger than it;
//! - `min_keep` keeps the newest sets until at least that many remain;
//! - the newest set is always kept.
//!
//! Only intact sets count: a damaged set (a file its manifest lists is missing or has another
//! size) is kept and reported, never deleted by retention and never counted, so that it can
//! neither take the newest intact set's place ("newest set", `keep_last`) nor push it out.
//!
//! With every `keep_*` at 0 and no `max_age`, nothing is deleted (as restic refuses an empty
//! policy rather than removing everything).

use anyhow::Result;
use chrono::{DateTime, Datelike, Utc};
use chrono_tz::Tz;
use serde::Serialize;

use crate::targets::{ListedSet, Target};

pub use crate::config::types::Policy;

impl Policy {
    fn has_keep_rules(&self) -> bool {
        self.keep_last + self.keep_daily + self.keep_weekly + self.keep_monthly > 0
    }

    /// Does this policy ever delete anything?
    pub fn is_active(&self) -> bool {
        self.has_keep_rules() || self.max_age.is_some()
    }
}

/// The verdict on one set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub id: String,
    pub created: DateTime<Utc>,
    pub keep: bool,
    /// Every rule that keeps the set, or why it goes.
    pub reasons: Vec<String>,
    /// Damaged on the target (kept, not counted, see [`DAMAGED`]).
    #[serde(skip)]
    pub damaged: bool,
}

impl Decision {
    /// `keep: daily 2026-11-24, weekly 2026-W48` or `delete: matches no keep rule`.
    pub fn summary(&self) -> String {
        format!(
            "{}: {}",
            if self.keep { "keep" } else { "delete" },
            self.reasons.join(", ")
        )
    }
}

/// The bucket a set falls into for one rule.
type BucketOf<'a> = dyn Fn(&Decision) -> String + 'a;

/// Decides every set; `sets` are (id, creation time) in any order. Returns newest first.
pub fn plan(sets: &[(String, DateTime<Utc>)], policy: &Policy, now: DateTime<Utc>, tz: Tz) -> Vec<Decision> {
    let mut out: Vec<Decision> = sets
        .iter()
        .map(|(id, created)| Decision {
            id: id.clone(),
            created: *created,
            keep: false,
            reasons: Vec::new(),
            damaged: false,
        })
        .collect();
    out.sort_by(|a, b| b.created.cmp(&a.created).then(b.id.cmp(&a.id)));
    if out.is_empty() {
        return out;
    }
    if !policy.is_active() {
        for d in &mut out {
            d.keep = true;
            d.reasons.push("no retention policy".into());
        }
        return out;
    }

    let local = |t: DateTime<Utc>| t.with_timezone(&tz).date_naive();
    let rules: [(u32, &str, &BucketOf); 4] = [
        (policy.keep_last, "last", &|d| d.id.clone()),
        (policy.keep_daily, "daily", &|d| {
            local(d.created).format("%F").to_string()
        }),
        (policy.keep_weekly, "weekly", &|d| {
            let w = local(d.created).iso_week();
            format!("{}-W{:02}", w.year(), w.week())
        }),
        (policy.keep_monthly, "monthly", &|d| {
            local(d.created).format("%Y-%m").to_string()
        }),
    ];
    for (count, label, bucket_of) in rules {
        let mut kept = 0;
        let mut last_bucket: Option<String> = None;
        for d in out.iter_mut() {
            if kept >= count {
                break;
            }
            let bucket = bucket_of(d);
            if last_bucket.as_deref() != Some(bucket.as_str()) {
                d.keep = true;
                d.reasons.push(if label == "last" {
                    format!("last {}", kept + 1)
                } else {
                    format!("{label} {bucket}")
                });
                kept += 1;
                last_bucket = Some(bucket);
            }
        }
    }

    if let Some(max_age) = policy.max_age {
        let max = chrono::TimeDelta::from_std(max_age).unwrap_or(chrono::TimeDelta::MAX);
        let shown = humantime::format_duration(max_age);
        for d in &mut out {
            let too_old = now.signed_duration_since(d.created) > max;
            if too_old {
                d.keep = false;
                d.reasons = vec![format!("older than max_age {shown}")];
            } else if !policy.has_keep_rules() {
                d.keep = true;
                d.reasons.push(format!("within max_age {shown}"));
            }
        }
    }

    let mut kept = out.iter().filter(|d| d.keep).count();
    for d in out.iter_mut() {
        if kept >= policy.min_keep as usize {
            break;
        }
        if !d.keep {
            d.keep = true;
            d.reasons = vec![format!("min_keep {}", policy.min_keep)];
            kept += 1;
        }
    }

    let newest = &mut out[0];
    if !newest.keep {
        newest.keep = true;
        newest.reasons.clear();
    }
    newest.reasons.push("newest set".into());

    for d in out.iter_mut().filter(|d| !d.keep && d.reasons.is_empty()) {
        d.reasons.push("matches no keep rule".into());
    }
    out
}

/// The creation time of a listed set: the manifest's, or failing that the id's.
pub fn created_of(m: &crate::manifest::Manifest) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(&m.created)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            chrono::NaiveDateTime::parse_from_str(&m.id, crate::manifest::TS_FORMAT)
                .ok()
                .map(|t| t.and_utc())
        })
}

/// Why retention leaves a damaged set alone.
pub const DAMAGED: &str = "damaged, not counted by retention";

/// The plan for the sets of `cluster` among `listed` (as [`Target::list_all_sets`] returns
/// them): only sets whose manifest names that cluster count (a folder shared by mistake is
/// never pruned across clusters), and only intact ones; each damaged set is kept with the
/// reason [`DAMAGED`]. Sets with an unreadable creation time are left out. Newest first.
pub fn plan_listed(listed: &[ListedSet], cluster: &str, policy: &Policy, now: DateTime<Utc>, tz: Tz) -> Vec<Decision> {
    let mut intact = Vec::new();
    let mut damaged = Vec::new();
    for s in listed
        .iter()
        .filter(|s| s.cluster == cluster && s.manifest.cluster_name == cluster)
    {
        let Some(created) = created_of(&s.manifest) else {
            continue;
        };
        match s.damaged {
            None => intact.push((s.manifest.id.clone(), created)),
            Some(_) => damaged.push(Decision {
                id: s.manifest.id.clone(),
                created,
                keep: true,
                reasons: vec![DAMAGED.into()],
                damaged: true,
            }),
        }
    }
    let mut out = plan(&intact, policy, now, tz);
    out.extend(damaged);
    out.sort_by(|a, b| b.created.cmp(&a.created).then(b.id.cmp(&a.id)));
    out
}

/// What applying the policy to one cluster folder of a target did (or, dry, would do).
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    pub target: String,
    pub cluster: String,
    pub decisions: Vec<Decision>,
    pub deleted: Vec<String>,
    pub errors: Vec<String>,
    pub debris_removed: usize,
    /// Journal segments no kept set can use, removed (or, in a dry run, to remove).
    pub segments_removed: usize,
}

impl PruneReport {
    /// The complete (not damaged) sets left on the target after this prune: (id, created).
    pub fn complete_left(&self) -> Vec<(String, DateTime<Utc>)> {
        self.decisions
            .iter()
            .filter(|d| !d.damaged && !self.deleted.contains(&d.id))
            .map(|d| (d.id.clone(), d.created))
            .collect()
    }
}

/// The plan for the sets of `cluster` on `target` ([`plan_listed`]).
pub async fn plan_target(
    target: &dyn Target,
    cluster: &str,
    policy: &Policy,
    now: DateTime<Utc>,
    tz: Tz,
) -> Result<Vec<Decision>> {
    let listed = target.list_all_sets(Some(cluster)).await?;
    for s in listed.iter().filter(|s| created_of(&s.manifest).is_none()) {
        tracing::warn!(target_name = target.name(), backup_id = %s.manifest.id, "set with an unreadable creation time; retention leaves it alone");
    }
    Ok(plan_listed(&listed, cluster, policy, now, tz))
}

/// Applies `policy` to `cluster` on `target`: removes the sets it does not keep and the
/// debris of incomplete uploads (this node's at once, others' once a day old). With
/// `dry_run` only the plan is returned.
pub async fn prune_target(
    target: &dyn Target,
    cluster: &str,
    node: &str,
    policy: &Policy,
    tz: Tz,
    dry_run: bool,
) -> Result<PruneReport> {
    let decisions = plan_target(target, cluster, policy, Utc::now(), tz).await?;
    let mut report = PruneReport {
        target: target.name().to_string(),
        cluster: cluster.to_string(),
        decisions,
        deleted: Vec::new(),
        errors: Vec::new(),
        debris_removed: 0,
        segments_removed: 0,
    };
    if dry_run {
        let kept: Vec<&str> = report
            .decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.id.as_str())
            .collect();
        report.segments_removed = prune_journal(target, cluster, Some(&kept), true).await.unwrap_or(0);
        return Ok(report);
    }
    // Oldest first: a prune cut short leaves the newer sets.
    for d in report.decisions.iter().rev().filter(|d| !d.keep) {
        match target.delete_set(cluster, &d.id).await {
            Ok(()) => {
                tracing::info!(target_name = target.name(), backup_id = %d.id, reason = %d.reasons.join(", "), "retention removed a backup set");
                report.deleted.push(d.id.clone());
            }
            Err(e) => {
                let e = crate::error::one_line(&e);
                tracing::error!(target_name = target.name(), backup_id = %d.id, error = %e, "cannot remove a backup set");
                report.errors.push(format!("{}: {e}", d.id));
            }
        }
    }
    match target.remove_debris(cluster, node).await {
        Ok(n) => report.debris_removed = n,
        Err(e) => report.errors.push(format!("debris: {}", crate::error::one_line(&e))),
    }
    match prune_journal(target, cluster, None, false).await {
        Ok(n) => report.segments_removed = n,
        Err(e) => report.errors.push(format!("journal: {}", crate::error::one_line(&e))),
    }
    Ok(report)
}

/// Removes the journal segments no set kept on `target` can use (see
/// [`crate::journal::chain::unusable`]): the sets listed now, or only `kept` of them (a dry
/// run's plan). Returns how many went (would go).
async fn prune_journal(target: &dyn Target, cluster: &str, kept: Option<&[&str]>, dry_run: bool) -> Result<usize> {
    let segments: Vec<_> = target
        .list_journal(cluster)
        .await?
        .iter()
        .filter_map(|(n, _)| crate::journal::segment::parse_name(n))
        .collect();
    if segments.is_empty() {
        return Ok(0);
    }
    let revisions: Vec<i64> = target
        .list_sets(Some(cluster))
        .await?
        .iter()
        .filter(|s| kept.is_none_or(|k| k.contains(&s.manifest.id.as_str())))
        .map(|s| s.manifest.etcd.revision)
        .collect();
    let unusable = crate::journal::chain::unusable(&segments, &revisions);
    if dry_run {
        return Ok(unusable.len());
    }
    for s in &unusable {
        target.delete_journal(cluster, &s.name).await?;
    }
    if !unusable.is_empty() {
        tracing::info!(
            target_name = target.name(),
            removed = unusable.len(),
            "retention removed journal segments no kept set can use"
        );
    }
    Ok(unusable.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::time::Duration;

    fn policy(last: u32, daily: u32, weekly: u32, monthly: u32) -> Policy {
        Policy {
            keep_last: last,
            keep_daily: daily,
            keep_weekly: weekly,
            keep_monthly: monthly,
            max_age: None,
            min_keep: 0,
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn sets(times: &[&str]) -> Vec<(String, DateTime<Utc>)> {
        times
            .iter()
            .map(|t| (crate::manifest::timestamp(at(t)), at(t)))
            .collect()
    }

    fn kept(d: &[Decision]) -> Vec<String> {
        d.iter().filter(|d| d.keep).map(|d| d.created.to_rfc3339()).collect()
    }

    fn kept_ids(d: &[Decision]) -> Vec<&str> {
        d.iter().filter(|d| d.keep).map(|d| d.id.as_str()).collect()
    }

    /// One set a day at 02:30 UTC for `days` days ending on `last`.
    fn daily_runs(last: DateTime<Utc>, days: i64) -> Vec<(String, DateTime<Utc>)> {
        (0..days)
            .map(|i| {
                let t = last - chrono::TimeDelta::days(i);
                (crate::manifest::timestamp(t), t)
            })
            .collect()
    }

    #[test]
    fn table() {
        let now = at("2026-11-25T12:00:00Z");
        struct Case {
            name: &'static str,
            times: Vec<&'static str>,
            policy: Policy,
            keep: Vec<&'static str>,
        }
        let cases = vec![
            Case {
                name: "keep_last keeps the newest n",
                times: vec!["2026-11-25T02:30:00Z", "2026-11-24T02:30:00Z", "2026-11-23T02:30:00Z"],
                policy: policy(2, 0, 0, 0),
                keep: vec!["2026-11-25T02:30:00+00:00", "2026-11-24T02:30:00+00:00"],
            },
            Case {
                name: "daily keeps the newest of each day",
                times: vec![
                    "2026-11-25T08:00:00Z",
                    "2026-11-25T02:30:00Z",
                    "2026-11-24T23:00:00Z",
                    "2026-11-24T02:30:00Z",
                    "2026-11-23T02:30:00Z",
                ],
                policy: policy(0, 2, 0, 0),
                keep: vec!["2026-11-25T08:00:00+00:00", "2026-11-24T23:00:00+00:00"],
            },
            Case {
                name: "weekly buckets are ISO weeks (Monday starts one)",
                times: vec![
                    "2026-11-23T02:30:00Z", // Monday, W48
                    "2026-11-22T02:30:00Z", // Sunday, W47
                    "2026-11-16T02:30:00Z", // Monday, W47
                    "2026-11-15T02:30:00Z", // Sunday, W46
                ],
                policy: policy(0, 0, 3, 0),
                keep: vec![
                    "2026-11-23T02:30:00+00:00",
                    "2026-11-22T02:30:00+00:00",
                    "2026-11-15T02:30:00+00:00",
                ],
            },
            Case {
                name: "monthly and the union of rules",
                times: vec![
                    "2026-11-25T02:30:00Z",
                    "2026-11-01T02:30:00Z",
                    "2026-10-31T02:30:00Z",
                    "2026-10-01T02:30:00Z",
                    "2026-09-30T02:30:00Z",
                ],
                policy: policy(1, 0, 0, 2),
                keep: vec!["2026-11-25T02:30:00+00:00", "2026-10-31T02:30:00+00:00"],
            },
            Case {
                name: "an empty policy deletes nothing",
                times: vec!["2026-11-25T02:30:00Z", "2020-01-01T00:00:00Z"],
                policy: policy(0, 0, 0, 0),
                keep: vec!["2026-11-25T02:30:00+00:00", "2020-01-01T00:00:00+00:00"],
            },
            Case {
                name: "the newest set survives even a policy that keeps nothing of it",
                times: vec!["2026-11-25T02:30:00Z", "2026-11-24T02:30:00Z"],
                policy: Policy {
                    max_age: Some(Duration::from_secs(60)),
                    ..policy(0, 0, 0, 0)
                },
                keep: vec!["2026-11-25T02:30:00+00:00"],
            },
        ];
        for c in cases {
            let got = plan(&sets(&c.times), &c.policy, now, Tz::UTC);
            let want: Vec<String> = c.keep.iter().map(|s| s.to_string()).collect();
            assert_eq!(kept(&got), want, "{}", c.name);
        }
    }

    #[test]
    fn a_simulated_month_keeps_exactly_the_policy() {
        // 35 nightly runs; keep_last 3, daily 7, weekly 4, monthly 2.
        let last = at("2026-11-25T02:30:00Z"); // a Wednesday
        let runs = daily_runs(last, 35);
        let got = plan(&runs, &policy(3, 7, 4, 2), at("2026-11-25T12:00:00Z"), Tz::UTC);
        // daily: Nov 25..19; weekly: newest of W48 (25), W47 (22), W46 (15), W45 (8);
        // monthly: Nov (25), Oct (31); last: 25, 24, 23.
        let want = [
            "2026-11-25_023000",
            "2026-11-24_023000",
            "2026-11-23_023000",
            "2026-11-22_023000",
            "2026-11-21_023000",
            "2026-11-20_023000",
            "2026-11-19_023000",
            "2026-11-15_023000",
            "2026-11-08_023000",
            "2026-10-31_023000",
        ];
        assert_eq!(kept_ids(&got), want);
        let reasons = |id: &str| got.iter().find(|d| d.id == id).unwrap().reasons.clone();
        assert_eq!(
            reasons("2026-11-25_023000"),
            [
                "last 1",
                "daily 2026-11-25",
                "weekly 2026-W48",
                "monthly 2026-11",
                "newest set"
            ]
        );
        assert_eq!(reasons("2026-10-31_023000"), ["monthly 2026-10"]);
        assert_eq!(reasons("2026-11-01_023000"), ["matches no keep rule"]);
        // Applying the plan again to what it kept changes nothing (idempotent).
        let survivors: Vec<_> = runs
            .iter()
            .filter(|(id, _)| want.contains(&id.as_str()))
            .cloned()
            .collect();
        let again = plan(&survivors, &policy(3, 7, 4, 2), at("2026-11-25T12:00:00Z"), Tz::UTC);
        assert!(again.iter().all(|d| d.keep));
    }

    #[test]
    fn days_are_local_days_across_dst_changes() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        // 23:30 UTC on 2026-10-24 is 01:30 on the 25th in Berlin (CEST, +2); DST ends at
        // 03:00 local on 2026-10-25, so 23:30 UTC on the 25th is 00:30 on the 26th (CET, +1).
        let times = [
            "2026-10-25T23:30:00Z", // Oct 26 local
            "2026-10-25T22:30:00Z", // Oct 25 23:30 local
            "2026-10-25T00:30:00Z", // Oct 25 02:30 CEST local
            "2026-10-24T23:30:00Z", // Oct 25 01:30 local
            "2026-10-24T21:30:00Z", // Oct 24 23:30 local
        ];
        let got = plan(&sets(&times), &policy(0, 3, 0, 0), at("2026-10-27T00:00:00Z"), tz);
        assert_eq!(
            kept(&got),
            [
                "2026-10-25T23:30:00+00:00",
                "2026-10-25T22:30:00+00:00",
                "2026-10-24T21:30:00+00:00"
            ]
        );
        // In UTC the same sets fall into two days only.
        let utc = plan(&sets(&times), &policy(0, 3, 0, 0), at("2026-10-27T00:00:00Z"), Tz::UTC);
        assert_eq!(kept(&utc), ["2026-10-25T23:30:00+00:00", "2026-10-24T23:30:00+00:00"]);
        // Spring forward: 2026-03-29 has 23 hours in Berlin; runs at 02:30 local do not
        // exist that day, the daemon runs at 03:00 instead: still one bucket per day.
        let spring = [
            "2026-03-30T00:30:00Z", // Mar 30 02:30 CEST
            "2026-03-29T01:00:00Z", // Mar 29 03:00 CEST
            "2026-03-28T01:30:00Z", // Mar 28 02:30 CET
        ];
        let got = plan(&sets(&spring), &policy(0, 2, 0, 0), at("2026-03-30T12:00:00Z"), tz);
        assert_eq!(kept(&got), ["2026-03-30T00:30:00+00:00", "2026-03-29T01:00:00+00:00"]);
    }

    #[test]
    fn max_age_caps_and_min_keep_floors_as_now_moves() {
        let runs = daily_runs(at("2026-11-25T02:30:00Z"), 10);
        let p = Policy {
            max_age: Some(Duration::from_secs(5 * 86400)),
            min_keep: 0,
            ..policy(10, 0, 0, 0)
        };
        let count = |now: &str, p: &Policy| plan(&runs, p, at(now), Tz::UTC).iter().filter(|d| d.keep).count();
        // Sets are 0..9 days old at 03:00 on the 25th: 0..5 days are within 5 days.
        assert_eq!(count("2026-11-25T03:00:00Z", &p), 5);
        // A day later one more has aged out; far later only the newest remains.
        assert_eq!(count("2026-11-26T03:00:00Z", &p), 4);
        assert_eq!(count("2027-06-01T00:00:00Z", &p), 1);
        // min_keep floors it.
        let floored = Policy {
            min_keep: 3,
            ..p.clone()
        };
        let got = plan(&runs, &floored, at("2027-06-01T00:00:00Z"), Tz::UTC);
        assert_eq!(
            kept_ids(&got),
            ["2026-11-25_023000", "2026-11-24_023000", "2026-11-23_023000"]
        );
        assert_eq!(got[2].reasons, ["min_keep 3"]);
        assert_eq!(got[3].reasons, ["older than max_age 5days"]);
        // max_age alone keeps what is younger than it.
        let alone = Policy {
            max_age: Some(Duration::from_secs(3 * 86400)),
            ..policy(0, 0, 0, 0)
        };
        assert_eq!(count("2026-11-25T03:00:00Z", &alone), 3);
        assert!(
            plan(&runs, &alone, at("2026-11-25T03:00:00Z"), Tz::UTC)[1]
                .reasons
                .contains(&"within max_age 3days".to_string())
        );
    }

    fn listed(cluster: &str, id_time: &str, damaged: Option<&str>) -> ListedSet {
        let t = at(id_time);
        ListedSet {
            cluster: cluster.into(),
            // From JSON, as a target reads it: fields added later take their defaults.
            manifest: serde_json::from_value(serde_json::json!({
                "format_version": crate::manifest::FORMAT_VERSION,
                "id": crate::manifest::timestamp(t),
                "created": t.to_rfc3339(),
                "cluster_name": cluster,
                "trigger": "schedule",
                "node": "node-a",
                "etcd": {"endpoint": "http://127.0.0.1:2379", "member_id": "1", "cluster_id": "2",
                         "version": "3.5.0", "revision": 1, "db_size": 1},
                "openshift": null,
                "files": [],
                "tool": {"name": "etcd-backupd", "version": "0"},
            }))
            .unwrap(),
            damaged: damaged.map(str::to_string),
        }
    }

    #[test]
    fn what_is_left_is_the_complete_sets_not_deleted() {
        let sets = vec![
            listed("c", "2026-11-25T02:30:00Z", Some("'snapshot_x.db' is missing")),
            listed("c", "2026-11-24T02:30:00Z", None),
            listed("c", "2026-11-23T02:30:00Z", None),
            listed("c", "2026-11-22T02:30:00Z", None),
        ];
        let now = at("2026-11-25T03:00:00Z");
        let decisions = plan_listed(&sets, "c", &policy(1, 0, 0, 0), now, Tz::UTC);
        let report = PruneReport {
            segments_removed: 0,
            target: "t".into(),
            cluster: "c".into(),
            decisions,
            // One of the two sets to delete could not be.
            deleted: vec![sets[3].manifest.id.clone()],
            errors: vec!["x".into()],
            debris_removed: 0,
        };
        let left: Vec<_> = report.complete_left().into_iter().map(|(_, t)| t).collect();
        assert_eq!(left, [at("2026-11-24T02:30:00Z"), at("2026-11-23T02:30:00Z")]);
    }

    #[test]
    fn a_damaged_set_is_never_counted_nor_deleted() {
        let sets = vec![
            listed("c", "2026-11-25T02:30:00Z", Some("'snapshot_x.db' is missing")),
            listed("c", "2026-11-24T02:30:00Z", None),
            listed("c", "2026-11-23T02:30:00Z", None),
            listed("c", "2026-11-01T02:30:00Z", Some("'snapshot_y.db' is 1 bytes")),
        ];
        let now = at("2026-11-25T12:00:00Z");
        // keep_last 1 with the newest set damaged: the newest intact set is what it keeps.
        let got = plan_listed(&sets, "c", &policy(1, 0, 0, 0), now, Tz::UTC);
        let ids: Vec<&str> = got.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "2026-11-25_023000",
                "2026-11-24_023000",
                "2026-11-23_023000",
                "2026-11-01_023000"
            ]
        );
        assert_eq!(got[0].reasons, [DAMAGED]);
        assert!(got[0].keep);
        assert_eq!(got[1].reasons, ["last 1", "newest set"]);
        assert!(got[1].keep);
        assert!(!got[2].keep, "{:?}", got[2]);
        // Old and damaged: still not retention's to delete, even past max_age.
        assert!(got[3].keep && got[3].reasons == [DAMAGED]);
        let capped = Policy {
            max_age: Some(Duration::from_secs(3600)),
            ..policy(1, 0, 0, 0)
        };
        let got = plan_listed(&sets, "c", &capped, now, Tz::UTC);
        assert_eq!(
            kept_ids(&got),
            ["2026-11-25_023000", "2026-11-24_023000", "2026-11-01_023000"]
        );
        // Another cluster's sets are not planned at all.
        assert!(plan_listed(&sets, "other", &policy(1, 0, 0, 0), now, Tz::UTC).is_empty());
    }

    #[test]
    fn the_newest_set_is_always_kept_and_input_order_does_not_matter() {
        let mut runs = daily_runs(at("2026-11-25T02:30:00Z"), 5);
        runs.reverse();
        let got = plan(&runs, &policy(0, 0, 0, 1), at("2030-01-01T00:00:00Z"), Tz::UTC);
        assert_eq!(kept_ids(&got), ["2026-11-25_023000"]);
        assert!(plan(&[], &policy(1, 0, 0, 0), Utc::now(), Tz::UTC).is_empty());
        let one = sets(&["2026-11-25T02:30:00Z"]);
        let got = plan(
            &one,
            &policy(0, 0, 0, 0),
            Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap(),
            Tz::UTC,
        );
        assert!(got[0].keep);
    }
}
