//! `status`: a verdict first ([`crate::health`]: OK, AT RISK or FAILING, and why), then what
//! it rests on: each target's newest good set and its age, whether the daemon runs (its
//! heartbeat), the next run as it will really start, the last run and its reason, pending
//! deliveries, and the cluster's runner. `--cluster` adds every node's heartbeat from etcd.
//! Exit 0 only for OK, 4 for AT RISK, 1 for FAILING, so a check can feed on it.

use std::io::Write;

use anyhow::Result;
use chrono::Utc;

use super::human;
use crate::clock;
use crate::config::Settings;
use crate::error::Stop;
use crate::etcd::election::RunRecord;
use crate::health::{self, Level, Verdict};
use crate::heartbeat::{self, NodeBeat};
use crate::staging::state::State;

/// What etcd says, when it answers.
#[derive(Default)]
struct FromEtcd {
    last: Option<RunRecord>,
    runner: Option<String>,
    /// The node whose journal writer holds the lock.
    journal_writer: Option<String>,
    beats: Vec<NodeBeat>,
    /// The cluster folder, the jitter's seed.
    cluster: Option<String>,
    problem: Option<String>,
}

async fn from_etcd(settings: &Settings) -> FromEtcd {
    let ask = async {
        let (mut member, st) = crate::etcd::connect_first(&settings.etcd).await?;
        let mut e = crate::etcd::election::Election::of(member.client.clone(), settings);
        let (last, runner) = (e.last().await?, e.runner().await?);
        let journal_writer = if settings.journal.enabled {
            e.journal_writer().await?
        } else {
            None
        };
        let beats = heartbeat::read_all(&mut member, &settings.election.prefix).await?;
        Ok::<_, anyhow::Error>((
            (last, runner, journal_writer),
            beats,
            settings.cluster_folder(st.cluster_id),
        ))
    };
    match tokio::time::timeout(settings.etcd.connect_timeout.0 + settings.etcd.request_timeout.0, ask).await {
        Ok(Ok(((last, runner, journal_writer), beats, cluster))) => FromEtcd {
            last,
            runner,
            journal_writer,
            beats,
            cluster: Some(cluster),
            problem: None,
        },
        Ok(Err(e)) => FromEtcd {
            problem: Some(crate::error::one_line(&e)),
            ..FromEtcd::default()
        },
        Err(_) => FromEtcd {
            problem: Some("etcd did not answer in time".into()),
            ..FromEtcd::default()
        },
    }
}

pub(super) async fn status(settings: &Settings, json: bool, cluster: bool) -> Result<()> {
    let now = Utc::now();
    let staging = &settings.snapshot.staging_dir;
    let state = State::load(staging);
    let schedule = settings.backup_schedule.clone();
    let etcd = from_etcd(settings).await;
    let staged = crate::staging::sets::scan(staging);
    let pending_sets = staged.iter().filter(|s| !s.pending.is_empty()).count();
    let daemon_alive = state.daemon.as_ref().is_some_and(|d| heartbeat::daemon_alive(d, now));
    let others = etcd
        .beats
        .iter()
        .filter(|b| b.node != settings.node_name)
        .map(|b| (b.node.clone(), b.targets.clone()))
        .collect();
    let verdict = health::judge(&health::Facts {
        state: &state,
        targets: settings.targets.iter().map(|t| t.name.clone()).collect(),
        custody: custody(settings),
        others,
        interval: schedule.as_ref().and_then(|s| s.interval(now)),
        daemon_alive,
        pending_sets,
        etcd_problem: etcd.problem.clone(),
        cluster_last: etcd
            .last
            .as_ref()
            .filter(|_| settings.election.enabled)
            .map(|r| health::ClusterRun {
                run: r.run.clone(),
                node: r.node.clone(),
                result: r.result.clone(),
                finished: r.finished.clone(),
            }),
        now,
    });
    // The next run as it will start: the daemon's own reckoning (jitter included) while it
    // runs; none when it does not, whatever the schedule says.
    let next = match (&schedule, daemon_alive) {
        (None, _) => Next::NoSchedule,
        (Some(_), false) => Next::DaemonDown,
        (Some(s), true) => match state.next_start.as_deref().and_then(clock::parse) {
            Some(t) => Next::At(t),
            None => match &etcd.cluster {
                Some(seed) => s
                    .next_slot(now, seed)
                    .map(|sl| Next::At(sl.start))
                    .unwrap_or(Next::NoSchedule),
                None => Next::Unknown,
            },
        },
    };
    let view = View {
        settings,
        state: &state,
        etcd: &etcd,
        verdict: &verdict,
        next: &next,
        staged: &staged,
        daemon_alive,
        now,
    };
    if json {
        print_json(&view, cluster)?;
    } else {
        print_text(&view)?;
        if cluster {
            print_cluster(settings, &etcd, now)?;
        }
    }
    match verdict.level {
        Level::Ok => Ok(()),
        level => Err(Stop::Verdict {
            code: level.exit_code(),
            summary: format!("{}: {}", level.as_str(), verdict.reasons.join("; ")),
        }
        .into()),
    }
}

enum Next {
    At(chrono::DateTime<Utc>),
    NoSchedule,
    DaemonDown,
    Unknown,
}

impl Next {
    fn text(&self, tz: chrono_tz::Tz, now: chrono::DateTime<Utc>) -> String {
        match self {
            Next::At(t) => format!("{} (jitter included)", clock::show_with_age(*t, tz, now)),
            Next::NoSchedule => "none: schedule.cron is empty on this host".into(),
            Next::DaemonDown => "none: the daemon is not running".into(),
            Next::Unknown => "unknown until the daemon or etcd answers".into(),
        }
    }

    fn rfc3339(&self) -> Option<String> {
        match self {
            Next::At(t) => Some(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            _ => None,
        }
    }
}

fn signing_json(settings: &Settings) -> serde_json::Value {
    let Some(sg) = &settings.signing else {
        return serde_json::Value::Null;
    };
    let key = sg.key_file.display().to_string();
    if !sg.key_file.exists() {
        return serde_json::json!({"key_file": key, "error": "not created yet"});
    }
    match crate::trust::signing::Signer::load(&sg.key_file) {
        Ok(k) => {
            serde_json::json!({"key_file": key, "fingerprint": k.fingerprint(), "allowed_signers": k.allowed_signers_line(&settings.node_name)})
        }
        Err(e) => serde_json::json!({"key_file": key, "error": crate::error::one_line(&e)}),
    }
}

/// What `status` found, for printing.
struct View<'a> {
    settings: &'a Settings,
    state: &'a State,
    etcd: &'a FromEtcd,
    verdict: &'a Verdict,
    next: &'a Next,
    staged: &'a [crate::staging::sets::Staged],
    daemon_alive: bool,
    now: chrono::DateTime<Utc>,
}

fn print_json(view: &View, cluster: bool) -> Result<()> {
    let (settings, state, etcd, verdict) = (view.settings, view.state, view.etcd, view.verdict);
    let (next, staged, daemon_alive) = (view.next, view.staged, view.daemon_alive);
    let pending: Vec<_> = staged
        .iter()
        .filter(|s| !s.pending.is_empty())
        .map(|s| serde_json::json!({"id": s.id(), "targets": s.pending, "bytes": s.set.manifest.total_stored_size()}))
        .collect();
    let local: Vec<&str> = staged.iter().filter(|s| s.pending.is_empty()).map(|s| s.id()).collect();
    let mut v = serde_json::json!({
        "verdict": verdict.level,
        "reasons": verdict.reasons,
        "node": settings.node_name,
        "daemon": {"alive": daemon_alive, "heartbeat": state.daemon},
        "coverage": verdict.coverage,
        "signing": signing_json(settings),
        "newest_set": state.newest_set,
        "next_run": state.next_run,
        "next_start": next.rfc3339(),
        "pending": pending,
        "local_copies": local,
        "last_drill": state.last_drill,
        "import_refused": state.import_refused,
        "probe": state.probe,
        "runs": state.runs,
        "etcd_error": etcd.problem,
    });
    // The election's view only where there is an election.
    if settings.election.enabled {
        v["cluster_last_run"] = serde_json::to_value(&etcd.last)?;
        v["current_runner"] = serde_json::to_value(&etcd.runner)?;
    }
    if cluster {
        v["nodes"] = serde_json::to_value(&etcd.beats)?;
    }
    if settings.journal.enabled {
        v["journal"] = serde_json::json!({"writer": etcd.journal_writer, "this_node": state.journal});
    }
    super::report::print(v, verdict.level == Level::Ok)
}

fn print_text(view: &View) -> Result<()> {
    let View {
        settings,
        state,
        etcd,
        verdict,
        next,
        staged,
        daemon_alive,
        now,
    } = *view;
    let tz = clock::zone(&settings.schedule.timezone);
    let mut out = std::io::stdout().lock();
    match verdict.reasons.split_first() {
        None => writeln!(
            out,
            "OK: every target holds a good set within the schedule's interval + 2h"
        )?,
        Some((first, rest)) => {
            writeln!(out, "{}: {first}", verdict.level.as_str())?;
            for r in rest {
                writeln!(out, "  also: {r}")?;
            }
        }
    }
    let daemon = match (&state.daemon, daemon_alive) {
        (Some(d), true) => format!(
            "daemon running (pid {}, heartbeat {})",
            d.pid,
            clock::parse(&d.beat)
                .map(|t| clock::relative(t, now))
                .unwrap_or_default()
        ),
        (Some(d), false) => match d.stopped.as_deref().and_then(clock::parse) {
            Some(t) => format!("daemon NOT running (stopped {})", clock::show_with_age(t, tz, now)),
            None => format!(
                "daemon NOT running (last heartbeat {})",
                clock::parse(&d.beat)
                    .map(|t| clock::show_with_age(t, tz, now))
                    .unwrap_or_default()
            ),
        },
        (None, _) => "daemon NOT running (never seen on this node)".into(),
    };
    writeln!(out, "node        {}: {daemon}", settings.node_name)?;
    for c in &verdict.coverage {
        let when = c
            .newest_time
            .as_deref()
            .and_then(clock::parse)
            .map(|t| clock::show_with_age(t, tz, now));
        let by = match c.seen_by.as_deref() {
            Some("this node") | None => String::new(),
            Some(n) => format!(", as {n} listed it"),
        };
        match (&c.newest_id, when) {
            (Some(id), Some(when)) => writeln!(
                out,
                "target      {}: newest good set {id}, {when}, {} set(s){by}{}",
                c.target,
                c.sets,
                if c.fresh { "" } else { "  STALE" }
            )?,
            _ => writeln!(out, "target      {}: no good set known{by}", c.target)?,
        }
    }
    if let Some(r) = state.runs.first() {
        let when = clock::parse(&r.finished)
            .map(|t| clock::show_with_age(t, tz, now))
            .unwrap_or_else(|| r.finished.clone());
        let why = r.reason.as_ref().map(|x| format!(": {x}")).unwrap_or_default();
        let failed: Vec<String> = r
            .targets
            .iter()
            .filter(|t| !t.ok)
            .map(|t| format!("'{}': {}", t.name, t.error.as_deref().unwrap_or("not stored")))
            .collect();
        writeln!(
            out,
            "last run    {} ({}) {}{}{}{}",
            r.run,
            when,
            r.result,
            r.id.as_ref().map(|i| format!(" {i}")).unwrap_or_default(),
            why,
            if failed.is_empty() {
                String::new()
            } else {
                format!("; not stored on {}", failed.join("; "))
            }
        )?;
    } else {
        writeln!(out, "last run    none on this node yet")?;
    }
    writeln!(out, "next run    {}", next.text(tz, now))?;
    if let Some(s) = &settings.backup_schedule {
        writeln!(out, "schedule    {}", s.describe())?;
    }
    if settings.journal.enabled {
        writeln!(out, "journal     {}", journal_line(settings, state, etcd, tz, now))?;
    }
    drop(out);
    print_details(settings, state, etcd, staged, tz, now)
}

/// Who writes the journal, and how far this node's writer has stored it.
fn journal_line(
    settings: &Settings,
    state: &State,
    etcd: &FromEtcd,
    tz: chrono_tz::Tz,
    now: chrono::DateTime<Utc>,
) -> String {
    let who = match (&etcd.journal_writer, &etcd.problem) {
        (Some(n), _) if *n == settings.node_name => "written by this node".to_string(),
        (Some(n), _) => format!("written by {n}"),
        (None, None) => "NO writer holds the journal lock".to_string(),
        (None, Some(_)) => "writer unknown (etcd did not answer)".to_string(),
    };
    let Some(j) = &state.journal else {
        return who;
    };
    let mut parts = vec![who];
    if let Some(t) = j.durable_until.as_deref().and_then(clock::parse) {
        let behind = (now - t).num_seconds();
        parts.push(format!(
            "durable up to {} (revision {}){}",
            clock::show_with_age(t, tz, now),
            j.durable_revision,
            if j.writing && behind > 120 { "  BEHIND" } else { "" }
        ));
    }
    if j.breaks_total > 0 {
        parts.push(format!(
            "{} chain break(s), last {}",
            j.breaks_total,
            j.last_break.as_deref().unwrap_or("unknown")
        ));
    }
    if let Some(e) = &j.error {
        parts.push(format!("error: {e}"));
    }
    parts.join("; ")
}

fn print_details(
    settings: &Settings,
    state: &State,
    etcd: &FromEtcd,
    staged: &[crate::staging::sets::Staged],
    tz: chrono_tz::Tz,
    now: chrono::DateTime<Utc>,
) -> Result<()> {
    if let Some(sg) = &settings.signing {
        let s = signing_json(settings);
        match (s["fingerprint"].as_str(), s["error"].as_str()) {
            (Some(fp), _) => {
                outln!(
                    "signing     key {fp} in '{}'; its allowed_signers line:",
                    sg.key_file.display()
                );
                outln!("            {}", s["allowed_signers"].as_str().unwrap_or_default());
            }
            (None, Some("not created yet")) => outln!(
                "signing     key '{}' not created yet (the daemon's start or the next backup creates it)",
                sg.key_file.display()
            ),
            (None, e) => outln!("signing     UNUSABLE: {}", e.unwrap_or_default()),
        }
    }
    if let Some(n) = &state.newest_set {
        match n.restorable_until.as_deref().and_then(clock::parse) {
            Some(t) => {
                let word = if t <= now {
                    "certificates EXPIRED on"
                } else {
                    "restorable until"
                };
                outln!(
                    "newest set  {}: {word} {} ({})",
                    n.id,
                    clock::show_with_age(t, tz, now),
                    n.restorable_until_source.as_deref().unwrap_or("?")
                );
            }
            None => outln!("newest set  {}: no certificates recorded", n.id),
        }
    }
    for s in staged.iter().filter(|s| !s.pending.is_empty()) {
        outln!(
            "pending     {} ({}) for {}",
            s.id(),
            human(s.set.manifest.total_stored_size()),
            s.pending.join(", ")
        );
    }
    let local: Vec<&str> = staged.iter().filter(|s| s.pending.is_empty()).map(|s| s.id()).collect();
    if !local.is_empty() {
        outln!("local copy  {}", local.join(", "));
    }
    if let Some(d) = &state.last_drill {
        let when = clock::parse(&d.finished)
            .map(|t| clock::show_with_age(t, tz, now))
            .unwrap_or_else(|| d.finished.clone());
        outln!(
            "drill       {when} of {}: {}: {}",
            d.id,
            if d.ok { "ok" } else { "FAILED" },
            d.summary
        );
    }
    if let Some(p) = &state.probe {
        for problem in p.problems() {
            outln!("probe       {problem}");
        }
    }
    for r in &state.import_refused {
        outln!("import      REFUSED '{}' (since {}): {}", r.path, r.at, r.reason);
    }
    if let Some(r) = &state.running {
        outln!("this node   running {r}");
    }
    if !settings.election.enabled {
        outln!("cluster     election off: this node backs up on its own");
        return Ok(());
    }
    match (&etcd.problem, &etcd.runner, &etcd.last) {
        (Some(e), _, _) => outln!("cluster     unknown: {e}"),
        (None, runner, last) => {
            outln!("running     {}", runner.as_deref().unwrap_or("nothing"));
            match last {
                Some(r) => outln!(
                    "cluster     last elected run {} by {}: {}{}",
                    r.run,
                    r.node,
                    r.result,
                    r.id.as_ref().map(|i| format!(", set {i}")).unwrap_or_default()
                ),
                None => outln!("cluster     no elected run recorded yet"),
            }
        }
    }
    Ok(())
}

/// `status --cluster`: one line per node that ever wrote a heartbeat.
fn print_cluster(settings: &Settings, etcd: &FromEtcd, now: chrono::DateTime<Utc>) -> Result<()> {
    let tz = clock::zone(&settings.schedule.timezone);
    if let Some(e) = &etcd.problem {
        outln!("nodes       unknown: {e}");
        return Ok(());
    }
    if etcd.beats.is_empty() {
        outln!(
            "nodes       no heartbeat under '{}' yet (daemons with the election on write one every minute)",
            heartbeat::nodes_prefix(&settings.election.prefix)
        );
        return Ok(());
    }
    for b in &etcd.beats {
        let alive = if heartbeat::alive(&b.beat, now) {
            "alive"
        } else {
            "SILENT"
        };
        let beat = clock::parse(&b.beat)
            .map(|t| clock::relative(t, now))
            .unwrap_or_default();
        let last = b
            .last_run
            .as_ref()
            .map(|r| {
                format!(
                    "last run {} {}{}",
                    r.run,
                    r.result,
                    r.id.as_ref().map(|i| format!(" {i}")).unwrap_or_default()
                )
            })
            .unwrap_or_else(|| "no run yet".into());
        let next = b
            .next_start
            .as_deref()
            .and_then(clock::parse)
            .map(|t| format!("; next {}", clock::show_with_age(t, tz, now)))
            .unwrap_or_default();
        outln!(
            "node        {} {alive} (heartbeat {beat}, {}): {last}{next}",
            b.node,
            b.version
        );
        for (target, c) in &b.targets {
            let age = c
                .newest_complete_time
                .as_deref()
                .and_then(clock::parse)
                .map(|t| clock::relative(t, now))
                .unwrap_or_else(|| "none".into());
            outln!(
                "              {target}: {} set(s), newest {} ({age})",
                c.sets,
                c.newest_complete_id.as_deref().unwrap_or("-")
            );
        }
        if b.pending_sets > 0 {
            outln!("              {} set(s) pending delivery", b.pending_sets);
        }
        for p in &b.problems {
            outln!("              problem: {p}");
        }
    }
    Ok(())
}

/// Each file of a set and the targets that hold it, when sets are split between targets
/// (see [`health::Facts::custody`]); empty when every target holds both.
fn custody(settings: &Settings) -> Vec<(String, Vec<String>)> {
    use crate::config::SetFile;
    let names: Vec<String> = settings.targets.iter().map(|t| t.name.clone()).collect();
    [
        (SetFile::Snapshot, "snapshot"),
        (SetFile::Resources, "static resources archive"),
    ]
    .into_iter()
    .map(|(file, word)| (word.to_string(), settings.holders(&names, file)))
    .filter(|(_, holders)| !holders.is_empty())
    .collect()
}
