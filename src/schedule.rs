//! When backups run: a cron pattern (6 fields with seconds, or a 5-field crontab line with
//! crontab's numbering, day-of-week 0 and 7 both Sunday) evaluated in an IANA time zone, so
//! "02:30 Europe/Berlin" stays 02:30 local across DST changes, plus a jitter so that a fleet
//! of clusters does not hit one WebDAV server at the same second.
//!
//! The jitter is derived from the cluster and the scheduled time, not drawn at random by
//! each node: every daemon of one cluster wakes at the same moment for a run, so the
//! election (which prefers followers) sees all of them, while different clusters spread out.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    pattern: String,
    tz: Tz,
    jitter: Duration,
}

/// One scheduled run: `at` names it (the same on every node); `start` adds the jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub at: DateTime<Utc>,
    pub start: DateTime<Utc>,
}

impl Schedule {
    pub fn new(pattern: &str, timezone: &str, jitter: Duration) -> Result<Schedule, String> {
        let fields = pattern.split_whitespace().count();
        if !(fields == 5 || fields == 6) {
            return Err(format!(
                "{pattern:?} has {fields} fields; write 6 (with seconds) or 5 (crontab)"
            ));
        }
        let cron = Cron::from_str(pattern).map_err(|e| format!("{pattern:?}: {e}"))?;
        let tz = Tz::from_str(timezone).map_err(|_| format!("{timezone:?} is not an IANA time zone name"))?;
        let s = Schedule {
            cron,
            pattern: pattern.to_string(),
            tz,
            jitter,
        };
        if s.next_at(Utc::now()).is_none() {
            return Err(format!("{pattern:?} never matches"));
        }
        Ok(s)
    }

    /// The first scheduled time strictly after `after`.
    pub fn next_at(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The next run after `after` for the cluster `seed`.
    pub fn next_slot(&self, after: DateTime<Utc>, seed: &str) -> Option<Slot> {
        let at = self.next_at(after)?;
        Some(Slot {
            at,
            start: at + self.jitter_for(seed, at),
        })
    }

    /// The delay for the run at `at`: below `jitter`, and below half the gap to the run after
    /// it, so a frequent schedule is never pushed past its next run.
    fn jitter_for(&self, seed: &str, at: DateTime<Utc>) -> chrono::TimeDelta {
        let gap = self
            .next_at(at)
            .map(|n| (n - at).num_milliseconds().max(0) as u64 / 2)
            .unwrap_or(u64::MAX);
        let millis = (self.jitter.as_millis() as u64).min(gap);
        if millis == 0 {
            return chrono::TimeDelta::zero();
        }
        let h = Sha256::digest(format!("{seed}/{}", at.timestamp()).as_bytes());
        let n = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
        chrono::TimeDelta::milliseconds((n % millis) as i64)
    }

    pub fn describe(&self) -> String {
        format!("{} ({})", self.pattern, self.tz)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    #[test]
    fn five_and_six_fields_with_crontab_sundays() {
        let s = Schedule::new("30 2 * * 0", "UTC", Duration::ZERO).unwrap();
        // 2026-11-25 is a Wednesday; the next Sunday is the 29th.
        assert_eq!(s.next_at(t("2026-11-25T00:00:00Z")).unwrap(), t("2026-11-29T02:30:00Z"));
        let s7 = Schedule::new("30 2 * * 7", "UTC", Duration::ZERO).unwrap();
        assert_eq!(
            s7.next_at(t("2026-11-25T00:00:00Z")).unwrap(),
            t("2026-11-29T02:30:00Z")
        );
        let s6 = Schedule::new("15 30 2 * * *", "UTC", Duration::ZERO).unwrap();
        assert_eq!(
            s6.next_at(t("2026-11-25T02:30:15Z")).unwrap(),
            t("2026-11-26T02:30:15Z")
        );
        assert!(Schedule::new("* * *", "UTC", Duration::ZERO).is_err());
        assert!(Schedule::new("0 0 0 * * * 2030", "UTC", Duration::ZERO).is_err());
        assert!(Schedule::new("0 61 * * *", "UTC", Duration::ZERO).is_err());
        assert!(Schedule::new("0 2 * * *", "Mars/Base", Duration::ZERO).is_err());
        assert!(
            Schedule::new("0 0 0 30 2 *", "UTC", Duration::ZERO)
                .unwrap_err()
                .contains("never matches")
        );
    }

    #[test]
    fn local_time_survives_dst() {
        let s = Schedule::new("0 30 2 * * *", "Europe/Berlin", Duration::ZERO).unwrap();
        // Winter: 02:30 CET is 01:30 UTC; summer: 02:30 CEST is 00:30 UTC.
        assert_eq!(s.next_at(t("2026-01-10T00:00:00Z")).unwrap(), t("2026-01-10T01:30:00Z"));
        assert_eq!(s.next_at(t("2026-07-10T00:00:00Z")).unwrap(), t("2026-07-10T00:30:00Z"));
        // 2026-03-29: 02:30 does not exist in Berlin; the run is not doubled the day after.
        let after_gap = s.next_at(t("2026-03-28T23:00:00Z")).unwrap();
        assert!(
            after_gap >= t("2026-03-29T00:00:00Z") && after_gap <= t("2026-03-30T00:30:00Z"),
            "{after_gap}"
        );
        assert_eq!(s.next_at(after_gap).unwrap(), t("2026-03-30T00:30:00Z"));
    }

    #[test]
    fn jitter_is_shared_by_a_cluster_and_bounded() {
        let s = Schedule::new("0 30 2 * * *", "UTC", Duration::from_secs(600)).unwrap();
        let after = t("2026-11-25T00:00:00Z");
        let a = s.next_slot(after, "cluster-a").unwrap();
        assert_eq!(a, s.next_slot(after, "cluster-a").unwrap(), "same cluster, same start");
        assert_eq!(a.at, t("2026-11-25T02:30:00Z"));
        assert!(a.start >= a.at && a.start < a.at + chrono::TimeDelta::seconds(600));
        // A schedule every 10 s never waits past half of that, whatever `jitter` says.
        let fast = Schedule::new("*/10 * * * * *", "UTC", Duration::from_secs(600)).unwrap();
        for i in 0..20 {
            let slot = fast.next_slot(after, &format!("c{i}")).unwrap();
            assert!(slot.start - slot.at < chrono::TimeDelta::seconds(5), "{slot:?}");
        }
        let starts: std::collections::HashSet<_> = (0..20)
            .map(|i| s.next_slot(after, &format!("c{i}")).unwrap().start)
            .collect();
        assert!(starts.len() > 10, "clusters spread out");
    }
}
