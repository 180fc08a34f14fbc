//! What the stored journal covers, from segment names alone, and which set and segments a
//! moment needs. Pure: the tests are the documentation.
//!
//! A chain is a run of segments without a missing revision, starting at or before a full
//! set's revision + 1. Segments may overlap (a writer that lost its lock stored one more, or
//! two targets got different cuts): overlap is fine, the replay takes each revision once;
//! a missing revision is a gap, which ends a chain.

use chrono::{DateTime, Utc};

use super::segment::Named;

/// A stretch of the journal without a gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub first: i64,
    pub last: i64,
    /// Up to when it covers (the newest segment's `until`).
    pub until: DateTime<Utc>,
    /// Its segments in order, each adding revisions or time.
    pub segments: Vec<Named>,
}

impl Span {
    /// Whether a set at `revision` starts this span: it holds the revision after the set's
    /// (or the set's own, which stamps it in time).
    pub fn starts_from(&self, revision: i64) -> bool {
        self.first <= revision + 1 && self.last >= revision
    }
}

/// The spans of `segments` (from one target or several), oldest first.
pub fn spans(mut segments: Vec<Named>) -> Vec<Span> {
    segments.sort_by_key(|a| (a.first, a.last, a.until));
    segments.dedup_by(|a, b| a.name == b.name);
    let mut out: Vec<Span> = Vec::new();
    // The last span ended with its chain (a completed upgrade): the next starts anew.
    let mut closed = false;
    for s in segments {
        let ends = s.ends;
        match out.last_mut() {
            Some(span) if !closed && s.first <= span.last + 1 => {
                if s.last > span.last || (s.last == span.last && s.until > span.until) {
                    span.last = span.last.max(s.last);
                    span.until = span.until.max(s.until);
                    span.segments.push(s);
                }
            }
            // A segment reaching back over a chain's end (an overlap) could carry a set from
            // before the end past it: left out.
            Some(span) if closed && s.first <= span.last => continue,
            _ => out.push(Span {
                first: s.first,
                last: s.last,
                until: s.until,
                segments: vec![s],
            }),
        }
        closed = ends;
    }
    out
}

/// The segments no kept set can use: those wholly before the oldest kept set's revision (a
/// replay starts after its set's revision; the segment holding that revision stamps the set
/// in time, so it stays). None while no set is kept: a listing that found no set removes
/// nothing.
pub fn unusable(segments: &[Named], kept_revisions: &[i64]) -> Vec<Named> {
    let Some(oldest) = kept_revisions.iter().min() else {
        return Vec::new();
    };
    segments.iter().filter(|s| s.last < *oldest).cloned().collect()
}

/// The stretches of time a span covers: each segment's `(from, until]`, merged where they
/// touch. A writer catching up (after a start or a handover) leaves a hole: it does not know
/// when the revisions it catches up on were made.
pub fn times(span: &Span) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    let mut out: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    let mut covered: Vec<(DateTime<Utc>, DateTime<Utc>)> = span
        .segments
        .iter()
        .filter(|g| g.from < g.until)
        .map(|g| (g.from, g.until))
        .collect();
    covered.sort();
    for (from, until) in covered {
        match out.last_mut() {
            Some(last) if from <= last.1 => last.1 = last.1.max(until),
            _ => out.push((from, until)),
        }
    }
    out
}

/// A moment to restore to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    /// The last revision stamped at or before this time.
    Time(DateTime<Utc>),
    /// This revision, included.
    Revision(i64),
}

impl Moment {
    /// `rev:N`, or an RFC 3339 time with `Z` or an offset.
    pub fn parse(s: &str) -> Result<Moment, String> {
        if let Some(n) = s.strip_prefix("rev:") {
            return match n.parse::<i64>() {
                Ok(n) if n > 0 => Ok(Moment::Revision(n)),
                _ => Err(format!("--at {s:?}: rev:N needs a revision above 0")),
            };
        }
        DateTime::parse_from_rfc3339(s)
            .map(|t| Moment::Time(t.with_timezone(&Utc)))
            .map_err(|e| {
                format!("--at {s:?}: not an RFC 3339 time with Z or an offset (2026-12-08T01:30:00Z) nor rev:N ({e})")
            })
    }
}

impl std::fmt::Display for Moment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Moment::Time(t) => write!(f, "{}", t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            Moment::Revision(n) => write!(f, "rev:{n}"),
        }
    }
}

/// A full set, as far as choosing one goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    pub id: String,
    pub revision: i64,
    pub created: DateTime<Utc>,
}

/// The set a moment starts from and the segments to replay on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub base: Base,
    pub segments: Vec<Named>,
}

/// The newest set that, with one span, reaches `moment`; `Err` names what is covered.
/// For a time, the segments run up to the first whose coverage reaches it (the replay then
/// stops at the last revision stamped at or before it).
pub fn plan(bases: &[Base], spans: &[Span], moment: Moment) -> Result<Plan, String> {
    let mut bases: Vec<&Base> = bases.iter().collect();
    bases.sort_by_key(|b| std::cmp::Reverse((b.revision, b.created)));
    for base in bases {
        let starts = |s: &&Span| s.starts_from(base.revision);
        match moment {
            Moment::Revision(n) if base.revision == n => {
                return Ok(Plan {
                    base: base.clone(),
                    segments: Vec::new(),
                });
            }
            Moment::Revision(n) if base.revision < n => {
                if let Some(span) = spans.iter().find(|s| starts(s) && s.last >= n) {
                    let segments = span
                        .segments
                        .iter()
                        .filter(|g| g.last > base.revision && g.first <= n)
                        .cloned()
                        .collect();
                    return Ok(Plan {
                        base: base.clone(),
                        segments,
                    });
                }
            }
            Moment::Time(t) if base.created <= t => {
                // The segment whose time holds the moment, and every one before it from the
                // set's revision on (that revision's own, to prove the set is not after t).
                let found = spans.iter().filter(starts).find_map(|span| {
                    let at = span.segments.iter().position(|g| g.from < t && t <= g.until)?;
                    Some(&span.segments[..=at])
                });
                if let Some(upto) = found {
                    let segments = upto.iter().filter(|g| g.last >= base.revision).cloned().collect();
                    return Ok(Plan {
                        base: base.clone(),
                        segments,
                    });
                }
            }
            _ => {}
        }
    }
    Err(format!(
        "{moment} is not covered by the journal; covered: {}",
        coverage(spans)
    ))
}

/// The last revision of the chain the newest set starts (what `rebase` folds by default):
/// none when the newest set starts none.
pub fn newest_revision(bases: &[Base], spans: &[Span]) -> Option<i64> {
    let newest = bases.iter().max_by_key(|b| (b.revision, b.created))?;
    spans.iter().find(|s| s.starts_from(newest.revision)).map(|s| s.last)
}

/// What a span covers for `list`: its range and end, and the sets it starts from (a moment
/// in it restores from the newest of them at or before it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Coverage {
    pub first: i64,
    pub last: i64,
    pub until: DateTime<Utc>,
    pub sets: Vec<String>,
}

/// Each span with the sets it can start from; a span no set starts is listed too (its
/// moments cannot be restored: `sets` is empty).
pub fn coverage_of(spans: &[Span], bases: &[Base]) -> Vec<Coverage> {
    spans
        .iter()
        .map(|s| {
            let mut sets: Vec<&Base> = bases.iter().filter(|b| s.starts_from(b.revision)).collect();
            sets.sort_by_key(|b| b.revision);
            Coverage {
                first: s.first,
                last: s.last,
                until: s.until,
                sets: sets.into_iter().map(|b| b.id.clone()).collect(),
            }
        })
        .collect()
}

/// The spans for a human: `revisions 100..=2000 (times 2026-12-08T01:00:00Z..02:00:00Z);
/// ...`.
pub fn coverage(spans: &[Span]) -> String {
    if spans.is_empty() {
        return "nothing (no journal segments)".into();
    }
    let ts = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    spans
        .iter()
        .map(|s| {
            let times: Vec<String> = times(s)
                .into_iter()
                .map(|(a, b)| format!("{}..{}", ts(a), ts(b)))
                .collect();
            format!(
                "revisions {}..={} (times {})",
                s.first,
                s.last,
                if times.is_empty() {
                    "none".to_string()
                } else {
                    times.join(", ")
                }
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    /// A segment covering the 10 s before `until` (a writer that keeps up).
    fn seg(first: i64, last: i64, until: i64) -> Named {
        seg_from(first, last, until - 10, until)
    }

    fn seg_from(first: i64, last: i64, from: i64, until: i64) -> Named {
        Named {
            name: super::super::segment::name_of(first, last, t(from), t(until)),
            first,
            last,
            from: t(from),
            until: t(until),
            ends: false,
        }
    }

    fn base(revision: i64, created: i64) -> Base {
        Base {
            id: format!("set-{revision}"),
            revision,
            created: t(created),
        }
    }

    #[test]
    fn gaps_split_spans_and_overlaps_and_empty_segments_extend_them() {
        let got = spans(vec![
            seg(101, 110, 10),
            seg(111, 110, 20), // idle: time moves on
            seg(105, 112, 25), // a handover's overlap
            seg(101, 110, 10), // the same segment from another target
            seg(120, 130, 40), // after a gap
        ]);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!((got[0].first, got[0].last, got[0].until), (101, 112, t(25)));
        assert_eq!(
            got[0].segments.len(),
            2,
            "the idle segment adds nothing the overlap does not"
        );
        assert_eq!((got[1].first, got[1].last), (120, 130));
    }

    #[test]
    fn the_newest_revision_is_the_end_of_the_newest_set_s_chain() {
        let sp = spans(vec![seg(101, 150, 10), seg(151, 200, 20), seg(260, 280, 30)]);
        assert_eq!(newest_revision(&[base(100, 0), base(160, 12)], &sp), Some(200));
        assert_eq!(newest_revision(&[base(100, 0), base(259, 25)], &sp), Some(280));
        // The newest set starts no chain (after a gap): nothing, not an older set's chain.
        assert_eq!(newest_revision(&[base(100, 0), base(220, 25)], &sp), None);
        assert_eq!(newest_revision(&[], &sp), None);
    }

    #[test]
    fn a_moment_takes_the_newest_set_its_span_reaches() {
        let sp = spans(vec![seg(101, 150, 10), seg(151, 200, 20), seg(201, 250, 30)]);
        let bases = [base(100, 0), base(160, 12)];
        let p = plan(&bases, &sp, Moment::Revision(220)).unwrap();
        assert_eq!(p.base.revision, 160);
        assert_eq!(p.segments.iter().map(|g| g.first).collect::<Vec<_>>(), [151, 201]);
        let p = plan(&bases, &sp, Moment::Revision(155)).unwrap();
        assert_eq!(p.base.revision, 100);
        let p = plan(&bases, &sp, Moment::Revision(160)).unwrap();
        assert!(p.segments.is_empty());
        // A time: up to the first segment reaching it.
        let p = plan(&bases, &sp, Moment::Time(t(15))).unwrap();
        assert_eq!(p.base.revision, 160);
        assert_eq!(p.segments.iter().map(|g| g.first).collect::<Vec<_>>(), [151]);
        let p = plan(&bases, &sp, Moment::Time(t(5))).unwrap();
        assert_eq!(p.base.revision, 100);
        assert_eq!(p.segments.iter().map(|g| g.first).collect::<Vec<_>>(), [101]);
    }

    #[test]
    fn a_writer_catching_up_leaves_a_hole_in_time() {
        // 151..=200 were caught up on by a new writer (no time known), then it kept up.
        let sp = spans(vec![
            seg_from(101, 150, 0, 10),
            seg_from(151, 200, 25, 25),
            seg_from(201, 250, 25, 30),
        ]);
        assert_eq!(sp.len(), 1);
        assert_eq!(times(&sp[0]), [(t(0), t(10)), (t(25), t(30))]);
        let bases = [base(100, 0)];
        let e = plan(&bases, &sp, Moment::Time(t(20))).unwrap_err();
        assert!(e.contains("times"), "{e}");
        let p = plan(&bases, &sp, Moment::Time(t(28))).unwrap();
        assert_eq!(p.segments.iter().map(|g| g.first).collect::<Vec<_>>(), [101, 151, 201]);
        // Revisions need no time.
        assert!(plan(&bases, &sp, Moment::Revision(170)).is_ok());
    }

    #[test]
    fn moments_outside_the_coverage_or_in_a_gap_are_refused_naming_it() {
        let sp = spans(vec![seg(101, 150, 10), seg(170, 200, 20)]);
        let bases = [base(100, 0)];
        for m in [
            Moment::Revision(160),
            Moment::Revision(99),
            Moment::Revision(300),
            Moment::Time(t(30)),
        ] {
            let e = plan(&bases, &sp, m).unwrap_err();
            assert!(
                e.contains("revisions 101..=150") && e.contains("revisions 170..=200"),
                "{e}"
            );
        }
        // The second span starts at no set.
        assert!(plan(&bases, &sp, Moment::Revision(180)).is_err());
        assert!(plan(&[base(100, 11)], &sp, Moment::Time(t(5))).is_err());
    }

    #[test]
    fn a_chain_ended_by_an_upgrade_takes_no_set_from_before_it_past_it() {
        let mut end = seg(151, 200, 20);
        end.ends = true;
        end.name = end.name.replace(".seg", "-end.seg");
        let sp = spans(vec![seg(101, 150, 10), end, seg(201, 250, 30)]);
        assert_eq!(sp.len(), 2, "{sp:?}");
        let old = [base(100, 0)];
        assert_eq!(plan(&old, &sp, Moment::Revision(190)).unwrap().base.revision, 100);
        assert!(
            plan(&old, &sp, Moment::Revision(210)).is_err(),
            "past the upgrade from a set before it"
        );
        let after = [base(100, 0), base(205, 25)];
        assert_eq!(plan(&after, &sp, Moment::Revision(210)).unwrap().base.revision, 205);
    }

    #[test]
    fn coverage_names_the_sets_each_span_starts_from() {
        let sp = spans(vec![seg(101, 150, 10), seg(170, 200, 20)]);
        let c = coverage_of(&sp, &[base(100, 0), base(120, 5), base(300, 30)]);
        assert_eq!(c[0].sets, ["set-100", "set-120"]);
        assert!(c[1].sets.is_empty(), "a stretch after a gap with no set: {c:?}");
    }

    #[test]
    fn retention_drops_only_what_no_kept_set_can_use() {
        let segs = [seg(101, 150, 10), seg(151, 200, 20), seg(201, 250, 30)];
        let names = |v: Vec<Named>| v.into_iter().map(|n| n.first).collect::<Vec<_>>();
        assert_eq!(names(unusable(&segs, &[160, 230])), [101]);
        assert_eq!(
            names(unusable(&segs, &[200])),
            [101],
            "the segment holding the set's revision stays"
        );
        assert_eq!(names(unusable(&segs, &[201])), [101, 151]);
        assert_eq!(names(unusable(&segs, &[100])), Vec::<i64>::new());
        assert!(unusable(&segs, &[]).is_empty(), "no set listed: nothing removed");
    }

    #[test]
    fn moments_parse_from_rfc3339_or_a_revision() {
        assert_eq!(Moment::parse("rev:42"), Ok(Moment::Revision(42)));
        assert_eq!(
            Moment::parse("2023-11-14T23:13:25+01:00"),
            Ok(Moment::Time(DateTime::from_timestamp(1_700_000_005, 0).unwrap()))
        );
        for bad in ["rev:0", "rev:x", "2023-11-14 23:13:25", "yesterday"] {
            assert!(Moment::parse(bad).is_err(), "{bad}");
        }
    }
}
