//! `list`: the sets on the targets, newest first, with what each says about itself.
//!
//! The default table fits 120 columns: the set id (its UTC time, as the platform names its
//! files), its age, trigger, version, revision, size, node, a state (`ok`, or what is wrong)
//! and retention's verdict in a word or a few; what is wrong is spelt out below the table.
//! `--wide` shows every detail (time in the configured zone, certificate expiry, signing key,
//! retention's reasons in full), `--all-targets` the sets of every configured target.

use std::io::Write;

use anyhow::{Result, bail};
use chrono::{DateTime, Utc};

use super::human;
use crate::config::{Settings, TargetSettings};
use crate::delivery::retention::{self, Decision};
use crate::error::Stop;
use crate::targets;
use crate::trust::certs::{self, Expiry};
use crate::trust::signing::Verdict;

/// The widest the default table gets (more with `--wide`).
pub const WIDTH: usize = 120;

/// What `list` shows.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Options<'a> {
    /// One target by name; `None`: the first, or all with `all_targets`.
    pub target: Option<&'a str>,
    pub all_targets: bool,
    pub wide: bool,
    pub json: bool,
}

/// One set on one target, with what retention, its signature and its certificates say.
struct Row {
    target: String,
    set: targets::ListedSet,
    created: Option<DateTime<Utc>>,
    decision: Option<Decision>,
    verdict: Option<Verdict>,
    expiry: Expiry,
}

pub(super) async fn list(settings: &Settings, opts: Options<'_>) -> Result<()> {
    let chosen: Vec<&TargetSettings> = match (opts.target, opts.all_targets) {
        (Some(name), _) => vec![
            settings
                .target(name)
                .ok_or_else(|| Stop::Usage(format!("--target {name:?}: no such target")))?,
        ],
        (None, true) => settings.targets.iter().collect(),
        (None, false) => vec![&settings.targets[0]],
    };
    let now = Utc::now();
    let allowed = crate::restore::Trust::of(settings)?.allowed;
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for t in &chosen {
        match rows_of(settings, t, allowed.as_ref(), now).await {
            Ok(r) if r.is_empty() => errln!("no complete backup sets on target '{}'", t.name),
            Ok(r) => rows.extend(r),
            // One target alone: its error is the command's. Of several, the others still show.
            Err(e) if chosen.len() == 1 => return Err(e),
            Err(e) => {
                errln!("target '{}': {}", t.name, crate::error::one_line(&e));
                failed.push(format!("'{}'", t.name));
            }
        }
    }
    // Newest first; the copies of one set together, in the targets' order.
    rows.sort_by(|a, b| {
        (b.created, &b.set.manifest.id)
            .cmp(&(a.created, &a.set.manifest.id))
            .then_with(|| position(settings, &a.target).cmp(&position(settings, &b.target)))
    });
    let journal = journals(&chosen, &rows).await;
    let mut out = std::io::stdout().lock();
    if opts.json {
        drop(out);
        let doc = ListDoc {
            schema_version: super::report::SCHEMA_VERSION,
            ok: failed.is_empty(),
            sets: rows.iter().map(|r| JsonRow::of(r, now)).collect(),
            failed_targets: &failed,
            journal: &journal,
        };
        super::report::print_typed(&doc)?;
        if !failed.is_empty() {
            bail!("cannot list target(s) {}", failed.join(", "));
        }
        return Ok(());
    } else if !rows.is_empty() {
        let show_target = chosen.len() > 1;
        let text = if opts.wide {
            wide(&rows, show_target, settings.time_zone(), now)?
        } else {
            compact(&rows, show_target, allowed.is_some(), now)?
        };
        out.write_all(text.as_bytes())?;
    }
    for j in &journal {
        out.write_all(journal_text(j, settings.time_zone()).as_bytes())?;
    }
    drop(out);
    if !failed.is_empty() {
        bail!("cannot list target(s) {}", failed.join(", "));
    }
    Ok(())
}

/// One target's journal, for `list`.
#[derive(serde::Serialize)]
struct TargetJournal {
    target: String,
    cluster: String,
    coverage: Vec<crate::journal::chain::Coverage>,
}

/// The journal each chosen target holds for the clusters listed (nothing where it has none).
async fn journals(chosen: &[&TargetSettings], rows: &[Row]) -> Vec<TargetJournal> {
    use crate::journal::{chain, segment};
    let mut out = Vec::new();
    for t in chosen {
        let Ok(target) = targets::open(t, None) else { continue };
        let clusters: std::collections::BTreeSet<&str> = rows
            .iter()
            .filter(|r| r.target == t.name)
            .map(|r| r.set.cluster.as_str())
            .collect();
        for c in clusters {
            let named: Vec<segment::Named> = match target.list_journal(c).await {
                Ok(n) => n.iter().filter_map(|(n, _)| segment::parse_name(n)).collect(),
                Err(e) => {
                    errln!(
                        "target '{}': cannot list the journal: {}",
                        t.name,
                        crate::error::one_line(&e)
                    );
                    continue;
                }
            };
            if named.is_empty() {
                continue;
            }
            let bases: Vec<chain::Base> = rows
                .iter()
                .filter(|r| r.target == t.name && r.set.cluster == c && r.set.damaged.is_none())
                .filter_map(|r| {
                    Some(chain::Base {
                        id: r.set.manifest.id.clone(),
                        revision: r.set.manifest.etcd.revision,
                        created: r.created?,
                    })
                })
                .collect();
            out.push(TargetJournal {
                target: t.name.clone(),
                cluster: c.to_string(),
                coverage: chain::coverage_of(&chain::spans(named), &bases),
            });
        }
    }
    out
}

/// `journal on 'nfs' (cluster prod): from set X: revisions A..=B, to <time>` per stretch, gaps
/// between them named.
fn journal_text(j: &TargetJournal, tz: chrono_tz::Tz) -> String {
    let mut text = format!("journal on target '{}' (cluster {}):\n", j.target, j.cluster);
    let mut prev: Option<i64> = None;
    for c in &j.coverage {
        match prev {
            Some(p) if c.first > p + 1 => text.push_str(&format!(
                "  gap: revisions {}..={} are not stored\n",
                p + 1,
                c.first - 1
            )),
            Some(_) => text.push_str(
                "  the chain ends here (an upgrade completed, or the static pod revisions changed): later moments restore from a set taken since\n",
            ),
            None => {}
        }
        let from = match c.sets.first() {
            Some(id) => format!("from set {id}"),
            None => "from no set (cannot be restored)".into(),
        };
        text.push_str(&format!(
            "  {from}: revisions {}..={}, any moment up to {}\n",
            c.first,
            c.last,
            c.until.with_timezone(&tz).format("%Y-%m-%d %H:%M:%S %Z")
        ));
        prev = Some(c.last);
    }
    text
}

fn position(settings: &Settings, name: &str) -> usize {
    settings
        .targets
        .iter()
        .position(|t| t.name == name)
        .unwrap_or(usize::MAX)
}

/// The sets on one target (damaged ones too, marked), each with retention's verdict as of
/// `now` and its signature, read a few sets at a time.
async fn rows_of(
    settings: &Settings,
    t: &TargetSettings,
    allowed: Option<&crate::trust::signing::AllowedSigners>,
    now: DateTime<Utc>,
) -> Result<Vec<Row>> {
    let target = targets::open(t, None)?;
    let sets = target.list_all_sets(settings.cluster_name.as_deref()).await?;
    let mut decisions = std::collections::HashMap::new();
    let clusters: std::collections::BTreeSet<&str> = sets.iter().map(|s| s.cluster.as_str()).collect();
    let policy = settings.retention_policy();
    for c in clusters {
        for d in retention::plan_listed(&sets, c, &policy, now, settings.time_zone()) {
            decisions.insert((c.to_string(), d.id.clone()), d);
        }
    }
    let verdicts: Vec<Option<Verdict>> = {
        use futures_util::StreamExt;
        let target = target.as_ref();
        futures_util::stream::iter(&sets)
            .map(|s| async move {
                match crate::restore::signature_of(target, &s.cluster, &s.manifest, allowed).await {
                    Ok(v) => Some(v),
                    Err(e) => {
                        tracing::warn!(backup_id = %s.manifest.id, error = %crate::error::one_line(&e), "cannot read the set's signature");
                        None
                    }
                }
            })
            .buffered(8)
            .collect()
            .await
    };
    Ok(sets
        .into_iter()
        .zip(verdicts)
        .map(|(set, verdict)| Row {
            target: t.name.clone(),
            created: retention::created_of(&set.manifest),
            decision: decisions.remove(&(set.cluster.clone(), set.manifest.id.clone())),
            expiry: certs::expiry(&set.manifest, now),
            verdict,
            set,
        })
        .collect())
}

/// `list --json`: the report's document, serialized as it is written.
#[derive(serde::Serialize)]
struct ListDoc<'a> {
    schema_version: u32,
    ok: bool,
    /// One object per set and target.
    sets: Vec<JsonRow<'a>>,
    failed_targets: &'a [String],
    /// What each target's journal covers (targets without one are left out).
    journal: &'a [TargetJournal],
}

#[derive(serde::Serialize)]
struct JsonRow<'a> {
    target: &'a str,
    cluster: &'a str,
    manifest: &'a crate::manifest::Manifest,
    damaged: &'a Option<String>,
    retention: &'a Option<Decision>,
    signature: Option<serde_json::Value>,
    certificates_expired: Option<bool>,
}

impl<'a> JsonRow<'a> {
    fn of(r: &'a Row, now: DateTime<Utc>) -> JsonRow<'a> {
        let s = &r.set;
        JsonRow {
            target: &r.target,
            cluster: &s.cluster,
            manifest: &s.manifest,
            damaged: &s.damaged,
            retention: &r.decision,
            signature: r
                .verdict
                .as_ref()
                .map(|v| serde_json::json!({"state": v.state(), "fingerprint": v.fingerprint()})),
            certificates_expired: s.manifest.restorable_until().map(|t| t <= now),
        }
    }
}

/// `schedule`, `manual+forced` (a set taken despite a guard says so where the trigger is).
fn trigger(m: &crate::manifest::Manifest) -> Result<String> {
    Ok(format!(
        "{}{}",
        serde_json::to_value(m.trigger)?.as_str().unwrap_or_default(),
        if m.forced.is_empty() { "" } else { "+forced" }
    ))
}

/// The OpenShift version, else the etcd version.
fn version(m: &crate::manifest::Manifest) -> String {
    m.openshift
        .as_ref()
        .and_then(|o| o.version.clone())
        .unwrap_or_else(|| format!("etcd-{}", m.etcd.version))
}

/// Retention's verdict in a few words: the rules that keep the set (`newest,last,daily`), or
/// `DELETE` and why.
fn retention_cell(d: Option<&Decision>) -> String {
    let Some(d) = d else {
        return "not counted".into(); // another cluster's name in its manifest
    };
    let word = |r: &String| -> String {
        match r.as_str() {
            retention::DAMAGED => "damaged".into(),
            "newest set" => "newest".into(),
            "no retention policy" => "no policy".into(),
            "matches no keep rule" => "no rule".into(),
            r if r.contains("max_age") => "max_age".into(),
            r => r.split_whitespace().next().unwrap_or(r).to_string(),
        }
    };
    let words: Vec<String> = d.reasons.iter().map(word).collect();
    if d.keep {
        words.join(",")
    } else {
        format!("DELETE ({})", words.join(","))
    }
}

/// What is wrong with a set, in short words for the table and in full below it.
fn problems(r: &Row, signatures_required: bool) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(what) = &r.set.damaged {
        out.push(("DAMAGED", format!("DAMAGED: {what}")));
    }
    match &r.expiry {
        Expiry::Expired { .. } => out.push((
            "CERTS-EXPIRED",
            format!("certificates {}", r.expiry.line().unwrap_or_default()),
        )),
        Expiry::Soon { .. } => out.push((
            "certs-soon",
            format!("certificates {}", r.expiry.line().unwrap_or_default()),
        )),
        Expiry::Valid { .. } | Expiry::Unknown => {}
    }
    match &r.verdict {
        Some(v @ Verdict::Invalid(_)) => out.push(("SIG-INVALID", format!("signature {}", v.describe()))),
        Some(v @ Verdict::Unlisted { .. }) if signatures_required => out.push(("SIG-UNLISTED", v.describe())),
        Some(v @ Verdict::Unsigned(_)) if signatures_required => out.push(("UNSIGNED", v.describe())),
        None => out.push(("sig-unread", "its signature could not be read".into())),
        Some(_) => {}
    }
    out
}

/// The default table, within [`WIDTH`] columns, and the problems spelt out below it.
fn compact(rows: &[Row], show_target: bool, signatures_required: bool, now: DateTime<Utc>) -> Result<String> {
    let show_cluster = rows.iter().any(|r| r.set.cluster != rows[0].set.cluster);
    let mut t = Table::default();
    if show_target {
        t.column("TARGET", Align::Left, 8);
    }
    if show_cluster {
        t.column("CLUSTER", Align::Left, 10);
    }
    t.column("ID", Align::Left, 0);
    t.column("AGE", Align::Right, 0);
    t.column("TRIGGER", Align::Left, 0);
    t.column("VERSION", Align::Left, 8);
    t.column("REVISION", Align::Right, 0);
    t.column("SIZE", Align::Right, 0);
    t.column("NODE", Align::Left, 10);
    t.column("STATE", Align::Left, 8);
    t.column("RETENTION", Align::Left, 12);
    let mut notes = Vec::new();
    for r in rows {
        let m = &r.set.manifest;
        let found = problems(r, signatures_required);
        let mut cells = Vec::new();
        if show_target {
            cells.push(r.target.clone());
        }
        if show_cluster {
            cells.push(r.set.cluster.clone());
        }
        let state = match found.is_empty() {
            true => "ok".to_string(),
            false => found.iter().map(|(w, _)| *w).collect::<Vec<_>>().join(","),
        };
        let whose = if show_target {
            format!(" on '{}'", r.target)
        } else {
            String::new()
        };
        for (_, line) in found {
            notes.push(format!("{}{whose}: {line}", m.id));
        }
        // A set split between targets on purpose: what this one holds, where the rest is.
        if let Some(custody) = m.custody_on(&r.target) {
            notes.push(format!("{} on '{}': {custody}", m.id, r.target));
        }
        cells.extend([
            m.id.clone(),
            r.created.map_or_else(|| "?".into(), |c| age(c, now)),
            trigger(m)?,
            version(m),
            m.etcd.revision.to_string(),
            human(m.stored_size_on(&r.target)),
            m.node.clone(),
            state,
            retention_cell(r.decision.as_ref()),
        ]);
        t.row(cells);
    }
    let mut text = t.render(Some(WIDTH));
    if !notes.is_empty() {
        text.push('\n');
        for n in notes {
            text.push_str(&n);
            text.push('\n');
        }
    }
    Ok(text)
}

/// `3h 20m`; a set from the future (a clock that was ahead) says `in 2d`.
fn age(created: DateTime<Utc>, now: DateTime<Utc>) -> String {
    match created > now {
        true => crate::clock::relative(created, now),
        false => crate::clock::span((now - created).num_seconds().unsigned_abs()),
    }
}

/// `--wide`: every detail, as wide as it takes.
fn wide(rows: &[Row], show_target: bool, tz: chrono_tz::Tz, now: DateTime<Utc>) -> Result<String> {
    let mut t = Table::default();
    if show_target {
        t.column("TARGET", Align::Left, 0);
    }
    for (h, a) in [
        ("CLUSTER", Align::Left),
        ("ID", Align::Left),
        ("CREATED", Align::Left),
        ("TRIGGER", Align::Left),
        ("VERSION", Align::Left),
        ("REVISION", Align::Right),
        ("SIZE", Align::Right),
        ("NODE", Align::Left),
        ("RESTORABLE", Align::Left),
        ("SIGNED", Align::Left),
        ("RETENTION", Align::Left),
    ] {
        t.column(h, a, 0);
    }
    for r in rows {
        let m = &r.set.manifest;
        let reason = r
            .decision
            .as_ref()
            .map(Decision::summary)
            .unwrap_or_else(|| "keep: not counted (other cluster in its manifest)".into());
        let mut cells = Vec::new();
        if show_target {
            cells.push(r.target.clone());
        }
        cells.extend([
            r.set.cluster.clone(),
            m.id.clone(),
            r.created
                .map_or_else(|| m.created.clone(), |c| crate::clock::show_with_age(c, tz, now)),
            trigger(m)?,
            version(m),
            m.etcd.revision.to_string(),
            human(m.stored_size_on(&r.target)),
            m.node.clone(),
            r.expiry.cell(),
            r.verdict.as_ref().map_or_else(|| "?".to_string(), Verdict::cell),
            match &r.set.damaged {
                Some(what) => format!("DAMAGED: {what}; {reason}"),
                None => reason,
            },
        ]);
        t.row(cells);
    }
    Ok(t.render(None))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// A plain-text table: columns as wide as their widest cell, two spaces apart, no trailing
/// blanks. Given a width, the columns that may shrink (a minimum above 0) are cut with `…`,
/// the one with the most to spare first, until the table fits.
#[derive(Debug, Default)]
struct Table {
    heads: Vec<(&'static str, Align, usize)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// `min` 0: never cut; else the narrowest it is cut to.
    fn column(&mut self, head: &'static str, align: Align, min: usize) {
        self.heads.push((head, align, min));
    }

    fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.heads.len());
        self.rows.push(cells);
    }

    fn render(&self, max: Option<usize>) -> String {
        let len = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self
            .heads
            .iter()
            .enumerate()
            .map(|(i, (h, ..))| self.rows.iter().map(|r| len(&r[i])).chain([len(h)]).max().unwrap_or(0))
            .collect();
        if let Some(max) = max {
            let total = |w: &[usize]| w.iter().sum::<usize>() + 2 * w.len().saturating_sub(1);
            let floor: Vec<Option<usize>> = self
                .heads
                .iter()
                .map(|(h, _, min)| (*min > 0).then(|| (*min).max(len(h))))
                .collect();
            // A column at a time from the one with the most to spare, so that one long
            // version string does not cost the node names their width.
            while total(&widths) > max {
                let spare = |i: usize| floor[i].map_or(0, |f| widths[i].saturating_sub(f));
                let Some(i) = (0..widths.len())
                    .filter(|&i| spare(i) > 0)
                    .max_by_key(|&i| (spare(i), i))
                else {
                    break;
                };
                widths[i] -= 1;
            }
        }
        let cut = |s: &str, w: usize| -> String {
            if len(s) <= w {
                s.to_string()
            } else {
                let mut t: String = s.chars().take(w.saturating_sub(1)).collect();
                t.push('…');
                t
            }
        };
        let line = |cells: Vec<&str>| -> String {
            let mut out = String::new();
            for (i, c) in cells.iter().enumerate() {
                let c = cut(c, widths[i]);
                let pad = " ".repeat(widths[i] - len(&c));
                if i > 0 {
                    out.push_str("  ");
                }
                match self.heads[i].1 {
                    Align::Right => out.push_str(&format!("{pad}{c}")),
                    Align::Left if i + 1 == cells.len() => out.push_str(&c),
                    Align::Left => out.push_str(&format!("{c}{pad}")),
                }
            }
            out.trim_end().to_string() + "\n"
        };
        let mut out = line(self.heads.iter().map(|(h, ..)| *h).collect());
        for r in &self.rows {
            out.push_str(&line(r.iter().map(String::as_str).collect()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn width(text: &str) -> usize {
        text.lines().map(|l| l.chars().count()).max().unwrap_or(0)
    }

    #[test]
    fn a_table_fits_by_cutting_the_columns_that_may_shrink() {
        let mut t = Table::default();
        t.column("ID", Align::Left, 0);
        t.column("SIZE", Align::Right, 0);
        t.column("NODE", Align::Left, 6);
        t.column("NOTE", Align::Left, 6);
        t.row(vec![
            "a".into(),
            "1 KiB".into(),
            "master-0.example.com".into(),
            "x".repeat(40),
        ]);
        t.row(vec!["bb".into(), "12 MiB".into(), "m1".into(), "short".into()]);
        let full = t.render(None);
        assert_eq!(
            full.lines().nth(2).unwrap(),
            "bb  12 MiB  m1                    short",
            "right-aligned sizes, no trailing blanks"
        );
        // The widest gives way first, then both alike; never below a minimum or the header.
        let cut = t.render(Some(50));
        assert!(width(&cut) <= 50, "{cut}");
        assert_eq!(
            cut.lines().nth(1).unwrap(),
            "a    1 KiB  master-0.example.…  xxxxxxxxxxxxxxxxx…",
            "{cut}"
        );
        let cut = t.render(Some(30));
        assert_eq!(cut.lines().nth(1).unwrap(), "a    1 KiB  master-…  xxxxxxx…", "{cut}");
        let cut = t.render(Some(10));
        assert_eq!(cut.lines().nth(1).unwrap(), "a    1 KiB  maste…  xxxxx…", "{cut}");
    }

    #[test]
    fn retention_in_a_few_words() {
        let d = |keep: bool, reasons: &[&str]| Decision {
            id: "x".into(),
            created: Utc::now(),
            keep,
            reasons: reasons.iter().map(|r| r.to_string()).collect(),
            damaged: false,
        };
        let cell = |keep, reasons: &[&str]| retention_cell(Some(&d(keep, reasons)));
        assert_eq!(
            cell(
                true,
                &[
                    "last 1",
                    "daily 2026-11-24",
                    "weekly 2026-W48",
                    "monthly 2026-11",
                    "newest set"
                ]
            ),
            "last,daily,weekly,monthly,newest"
        );
        assert_eq!(cell(true, &["within max_age 30days", "min_keep 3"]), "max_age,min_keep");
        assert_eq!(cell(true, &[retention::DAMAGED]), "damaged");
        assert_eq!(cell(false, &["matches no keep rule"]), "DELETE (no rule)");
        assert_eq!(cell(false, &["older than max_age 90days"]), "DELETE (max_age)");
        assert_eq!(retention_cell(None), "not counted");
    }
}
