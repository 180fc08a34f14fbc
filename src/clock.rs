//! Times as people read them, one way in every command: `2026-12-07 15:39:00 CET` in the
//! configured `schedule.timezone` (so "02:30" in the output is the 02:30 of the schedule),
//! with a relative age where a table or a verdict needs one (`3h ago`, `in 21h`). Set ids stay
//! UTC `%F_%H%M%S` (the platform's file names) and JSON keeps RFC 3339 UTC: those are for
//! machines and for the files.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

/// The zone times are shown in: `schedule.timezone`, UTC when it does not parse (it is
/// validated with the configuration, so only a hand-made caller gets UTC).
pub fn zone(name: &str) -> Tz {
    name.parse().unwrap_or(Tz::UTC)
}

/// `2026-12-07 15:39:00 CET`.
pub fn show(t: DateTime<Utc>, tz: Tz) -> String {
    t.with_timezone(&tz).format("%Y-%m-%d %H:%M:%S %Z").to_string()
}

/// `3h ago`, `in 21h`, `just now`: two units at most, the larger first.
pub fn relative(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - t).num_seconds();
    let (n, future) = (secs.unsigned_abs(), secs < 0);
    if n < 5 {
        return "just now".into();
    }
    let span = span(n);
    if future {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// `2026-12-07 15:39:00 CET (3h ago)`.
pub fn show_with_age(t: DateTime<Utc>, tz: Tz, now: DateTime<Utc>) -> String {
    format!("{} ({})", show(t, tz), relative(t, now))
}

/// A length of time in the largest two adjacent units: `45s`, `12m`, `3h 20m`, `2d 4h`.
pub fn span(secs: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let i = UNITS.iter().position(|(size, _)| secs >= *size).unwrap_or(3);
    let (size, name) = UNITS[i];
    let first = format!("{}{name}", secs / size);
    match UNITS.get(i + 1) {
        Some((next, next_name)) if (secs % size) / next > 0 => {
            format!("{first} {}{next_name}", (secs % size) / next)
        }
        _ => first,
    }
}

/// An RFC 3339 time from a record, parsed.
pub fn parse(t: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(t).ok().map(|t| t.to_utc())
}

/// A set id (`%F_%H%M%S`, UTC) as a time.
pub fn of_id(id: &str) -> Option<DateTime<Utc>> {
    chrono::NaiveDateTime::parse_from_str(id, crate::manifest::TS_FORMAT)
        .ok()
        .map(|t| t.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_format_in_the_configured_zone_with_ages() {
        let t = parse("2026-12-07T14:39:00Z").unwrap();
        assert_eq!(show(t, zone("UTC")), "2026-12-07 14:39:00 UTC");
        assert_eq!(show(t, zone("Europe/Berlin")), "2026-12-07 15:39:00 CET");
        assert_eq!(show(t, zone("not/a-zone")), "2026-12-07 14:39:00 UTC");
        let now = parse("2026-12-07T17:59:00Z").unwrap();
        assert_eq!(relative(t, now), "3h 20m ago");
        assert_eq!(relative(now, t), "in 3h 20m");
        assert_eq!(relative(t, t), "just now");
        assert_eq!(
            show_with_age(t, zone("UTC"), now),
            "2026-12-07 14:39:00 UTC (3h 20m ago)"
        );
        assert_eq!(span(45), "45s");
        assert_eq!(span(60), "1m");
        assert_eq!(span(3 * 3600), "3h");
        assert_eq!(span(3 * 3600 + 59), "3h");
        assert_eq!(span(2 * 86_400 + 4 * 3600 + 60), "2d 4h");
        assert_eq!(of_id("2026-12-07_143900"), Some(t));
        assert_eq!(of_id("2026-12-07"), None);
    }
}
