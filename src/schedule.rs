//! When backups run: a cron pattern (6 fields with seconds, or a 5-field crontab line with
//! crontab's numbering, day-of-week 0 and 7 both Sunday; or a macro such as `@daily`, see
//! [`MACROS`]) evaluated in an IANA time zone, so
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
        let expanded = expand_macro(pattern)?;
        let fields = expanded.split_whitespace().count();
        if !(fields == 5 || fields == 6) {
            return Err(format!(
                "{pattern:?} has {fields} fields; write 5 as crontab does ({}), 6 with seconds first, or one of {MACROS}",
                FIELDS[1..].iter().map(|f| f.name).collect::<Vec<_>>().join(" ")
            ));
        }
        let cron = Cron::from_str(expanded).map_err(|e| match diagnose(expanded) {
            Some(why) => format!("{pattern:?}: {why}"),
            // Something the field check does not know (a misplaced L, W or #): croner's words.
            None => format!("{pattern:?}: {e}"),
        })?;
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

    /// The longest gap between consecutive runs over the next dozen: how old the newest
    /// set may get before the next one replaces it.
    pub fn interval(&self, from: DateTime<Utc>) -> Option<Duration> {
        let mut t = self.next_at(from)?;
        let mut longest = Duration::ZERO;
        for _ in 0..12 {
            let next = self.next_at(t)?;
            longest = longest.max((next - t).to_std().unwrap_or_default());
            t = next;
        }
        Some(longest)
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

/// The macros accepted for a whole pattern, as cron(8) has them.
const MACROS: &str = "@hourly, @daily (@midnight), @weekly, @monthly, @yearly (@annually)";

/// A macro's 6-field pattern, or the pattern itself when it is not a macro.
fn expand_macro(pattern: &str) -> Result<&str, String> {
    let p = pattern.trim();
    if !p.starts_with('@') {
        return Ok(pattern);
    }
    Ok(match p.to_ascii_lowercase().as_str() {
        "@hourly" => "0 0 * * * *",
        "@daily" | "@midnight" => "0 0 0 * * *",
        "@weekly" => "0 0 0 * * 0",
        "@monthly" => "0 0 0 1 * *",
        "@yearly" | "@annually" => "0 0 0 1 1 *",
        // `@reboot` and the like have no time to compute.
        _ => return Err(format!("{pattern:?} is not a cron macro; use {MACROS}, or a cron line")),
    })
}

/// One field of a 6-field pattern: its name, its range and the names it takes.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
    hint: &'static str,
}

const MONTHS: &[&str] = &[
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAYS: &[&str] = &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

const FIELDS: [Field; 6] = [
    Field {
        name: "second",
        min: 0,
        max: 59,
        names: &[],
        hint: "",
    },
    Field {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
        hint: "",
    },
    Field {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
        hint: "",
    },
    Field {
        name: "day-of-month",
        min: 1,
        max: 31,
        names: &[],
        hint: "",
    },
    Field {
        name: "month",
        min: 1,
        max: 12,
        names: MONTHS,
        hint: " or JAN-DEC",
    },
    Field {
        name: "day-of-week",
        min: 0,
        max: 7,
        names: DAYS,
        hint: " (0 and 7 are Sunday) or SUN-SAT",
    },
];

/// Why a 5- or 6-field pattern that croner refused is wrong, naming the field as written
/// (`field 2 (hour) is 30, must be 0-23`); `None` when the numbers and steps look right.
fn diagnose(pattern: &str) -> Option<String> {
    let parts: Vec<&str> = pattern.split_whitespace().collect();
    let fields = &FIELDS[FIELDS.len() - parts.len()..];
    for (i, (text, f)) in parts.iter().zip(fields).enumerate() {
        if let Err(why) = check_field(text, f) {
            return Some(format!("field {} ({}) {why}", i + 1, f.name));
        }
    }
    None
}

fn check_field(text: &str, f: &Field) -> Result<(), String> {
    let range = format!("{}-{}{}", f.min, f.max, f.hint);
    for item in text.split(',') {
        if item.is_empty() {
            continue; // croner takes "1,,2"
        }
        let (base, step) = match item.split_once('/') {
            Some((b, s)) => (b, Some(s)),
            None => (item, None),
        };
        if let Some(step) = step {
            match step.parse::<u32>() {
                Ok(0) => return Err(format!("{item:?} has step 0, must be at least 1")),
                Ok(_) => {}
                Err(_) => return Err(format!("{item:?} has step {step:?}, must be a number")),
            }
        }
        if matches!(base, "*" | "?") {
            continue;
        }
        let value = |v: &str| -> Result<Option<u32>, String> {
            if let Some(n) = f.names.iter().position(|n| n.eq_ignore_ascii_case(v)) {
                return Ok(Some(n as u32 + f.min));
            }
            match v.parse::<u32>() {
                Ok(n) if (f.min..=f.max).contains(&n) => Ok(Some(n)),
                Ok(n) => Err(format!("is {n}, must be {range}")),
                // L, W, # and the like: croner's to judge.
                Err(_)
                    if !v.is_empty()
                        && v.chars()
                            .all(|c| c.is_ascii_digit() || matches!(c.to_ascii_uppercase(), 'L' | 'W' | '#')) =>
                {
                    Ok(None)
                }
                Err(_) => Err(format!("has {v:?}, must be {range}")),
            }
        };
        match base.split_once('-') {
            Some((a, b)) => {
                if let (Some(a), Some(b)) = (value(a)?, value(b)?)
                    && a > b
                {
                    return Err(format!("has the range {base:?}, which runs backwards"));
                }
            }
            None => {
                value(base)?;
            }
        }
    }
    Ok(())
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
    fn errors_name_the_field_and_its_range() {
        let e = |p: &str| Schedule::new(p, "UTC", Duration::ZERO).unwrap_err();
        assert_eq!(e("0 30 * * *"), "\"0 30 * * *\": field 2 (hour) is 30, must be 0-23");
        assert_eq!(e("61 2 * * *"), "\"61 2 * * *\": field 1 (minute) is 61, must be 0-59");
        assert_eq!(
            e("0 0 2 * * *x"),
            "\"0 0 2 * * *x\": field 6 (day-of-week) has \"*x\", must be 0-7 (0 and 7 are Sunday) or SUN-SAT"
        );
        // Six fields: the second comes first, so the hour is field 3.
        assert_eq!(
            e("0 0 24 * * *"),
            "\"0 0 24 * * *\": field 3 (hour) is 24, must be 0-23"
        );
        assert_eq!(
            e("0 2 0 * *"),
            "\"0 2 0 * *\": field 3 (day-of-month) is 0, must be 1-31"
        );
        assert_eq!(
            e("0 2 * 13 *"),
            "\"0 2 * 13 *\": field 4 (month) is 13, must be 1-12 or JAN-DEC"
        );
        assert!(
            e("0 2 * * 8").starts_with("\"0 2 * * 8\": field 5 (day-of-week) is 8"),
            "{}",
            e("0 2 * * 8")
        );
        assert!(
            e("*/0 2 * * *").contains("field 1 (minute) \"*/0\" has step 0"),
            "{}",
            e("*/0 2 * * *")
        );
        assert!(
            e("0 5-60 * * *").contains("field 2 (hour) is 60"),
            "{}",
            e("0 5-60 * * *")
        );
        let count = e("* * *");
        assert!(count.contains("has 3 fields") && count.contains("@daily"), "{count}");
        assert!(e("@reboot").contains("is not a cron macro"), "{}", e("@reboot"));
    }

    #[test]
    fn macros_are_accepted() {
        let after = t("2026-11-25T10:20:30Z"); // a Wednesday
        for (m, next) in [
            ("@hourly", "2026-11-25T11:00:00Z"),
            ("@daily", "2026-11-26T00:00:00Z"),
            ("@midnight", "2026-11-26T00:00:00Z"),
            ("@WEEKLY", "2026-11-29T00:00:00Z"),
            ("@monthly", "2026-12-01T00:00:00Z"),
            ("@yearly", "2027-01-01T00:00:00Z"),
            ("@annually", "2027-01-01T00:00:00Z"),
        ] {
            let s = Schedule::new(m, "UTC", Duration::ZERO).unwrap_or_else(|e| panic!("{m}: {e}"));
            assert_eq!(s.next_at(after).unwrap(), t(next), "{m}");
            assert_eq!(s.describe(), format!("{m} (UTC)"), "the pattern as written");
        }
        // In the configured zone, as any pattern: midnight in Berlin is 23:00 UTC in winter.
        let s = Schedule::new("@daily", "Europe/Berlin", Duration::ZERO).unwrap();
        assert_eq!(s.next_at(after).unwrap(), t("2026-11-25T23:00:00Z"));
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
