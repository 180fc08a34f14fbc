//! One run as the daemon and `backup` both do it: guards, then the election, then the
//! backup pipeline while the lock is held, then the record in etcd and in the node's state.

pub mod context;
pub mod guards;
pub mod import;
pub mod pipeline;
pub mod rebase;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::etcd::election::{Claim, Election, Held, RunRecord};
use crate::manifest::Trigger;
use crate::outcome::RunResult;
use crate::outcome::{Skip, SkipKind};
use crate::staging::state::{RunState, State, TargetState};
use crate::{etcd, fsutil};
use pipeline::{BackupOptions, BackupReport, Force};

pub enum Outcome {
    /// The backup ran (whether every target took it is in the report).
    Ran(Box<BackupReport>),
    /// A guard said no, or this node does not compete.
    Skipped(Skip),
    /// Another node ran it.
    Elsewhere(RunRecord),
}

/// Free space for staging, measured on its nearest existing ancestor.
fn staging_free(staging: &Path) -> Result<u64> {
    let mut p = staging;
    while !p.exists() {
        p = p.parent().unwrap_or(Path::new("/"));
    }
    fsutil::free_space(p)
}

/// How a run competes with the other nodes' runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Through the election: one node takes the run. `wait_max` bounds how long this node
    /// waits for another holder of the lock (zero: give up at once, as a manual `backup`).
    Elected { wait_max: Duration },
    /// This node alone (`election.enabled = false`, `backup --no-election`).
    Alone,
}

/// What started a run, which names it: the name is its election key (the same on every
/// node for one slot or one upgrade) and the manifest's `run`. Made here and only here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunKind {
    /// The schedule's slot at this time: `20261208T023000Z`.
    Scheduled(chrono::DateTime<Utc>),
    /// After a completed upgrade to this version: `upgrade-4.15.3`.
    AfterUpgrade(String),
    /// `backup` on this node at this time: `manual-<node>-<ts>`.
    Manual { node: String, at: chrono::DateTime<Utc> },
    /// Asked for by the journal's writer at this time (a chain broke or ended with no set to
    /// start the next): `journal-20261208T031500Z`.
    ForJournal(chrono::DateTime<Utc>),
}

impl RunKind {
    pub fn trigger(&self) -> Trigger {
        match self {
            RunKind::Scheduled(_) => Trigger::Schedule,
            RunKind::AfterUpgrade(_) => Trigger::AfterUpgrade,
            RunKind::Manual { .. } => Trigger::Manual,
            RunKind::ForJournal(_) => Trigger::Journal,
        }
    }

    pub fn name(&self) -> String {
        match self {
            RunKind::Scheduled(at) => crate::etcd::election::run_key(*at),
            RunKind::AfterUpgrade(version) => format!("upgrade-{version}"),
            RunKind::Manual { node, at } => format!("manual-{node}-{}", crate::manifest::timestamp(*at)),
            RunKind::ForJournal(at) => format!("journal-{}", crate::etcd::election::run_key(*at)),
        }
    }
}

/// What was asked of a run.
#[derive(Debug, Clone)]
pub struct Request {
    pub trigger: Trigger,
    /// The run's name ([`RunKind::name`]).
    pub run: String,
    /// Store on this target only (`backup --target`).
    pub target: Option<String>,
    pub mode: Mode,
    /// `backup --force`: the cluster-state guards (cluster age, upgrade, operators) are
    /// overridden and named in the manifest; etcd's health, its alarms and free space still
    /// decide.
    pub force: Force,
    /// When the run's delivery pass yields (see [`BackupOptions::deliver_by`]).
    pub deliver_by: Option<tokio::time::Instant>,
}

impl Request {
    /// A run of `kind` on the whole cluster's behalf (nothing forced, every target).
    pub fn new(kind: &RunKind, mode: Mode) -> Request {
        Request {
            trigger: kind.trigger(),
            run: kind.name(),
            target: None,
            mode,
            force: Force::No,
            deliver_by: None,
        }
    }
}

/// The error of a run stopped by SIGTERM mid-backup.
const STOPPED: &str = "stopped while backing up; the incomplete set stays hidden and is removed by the next run";
/// The error of a run whose election lock may be lost.
const LOCK_LOST: &str = "the election lock may be lost mid-run; another node takes this run over";

/// Runs `req` once: guards, then the election (or not), then the backup while the lock is
/// held, then the record. `cancel` stops the run (SIGTERM).
pub async fn run_once(settings: &Settings, req: &Request, cancel: &CancellationToken) -> Result<Outcome> {
    let mut run = match Run::connect(settings, req).await? {
        Ok(run) => run,
        Err(skip) => return Ok(Outcome::Skipped(skip)),
    };
    // A run another node finished needs no guard check (nor a skip record).
    if run.elected()
        && let Some(rec) = run.election.done(&req.run).await?
    {
        return Ok(Outcome::Elsewhere(rec));
    }
    let forced = match run.guards().await? {
        Verdict::Skip(reason) => return Ok(Outcome::Skipped(reason)),
        Verdict::Go { forced } => forced,
    };
    for reason in &forced {
        tracing::warn!(reason = %reason, "backing up despite a guard (--force)");
    }
    match req.mode {
        Mode::Alone => run.alone(forced, cancel).await,
        Mode::Elected { wait_max } => run.contended(forced, wait_max, cancel).await,
    }
}

/// Runs `backup` until `opts.abort` fires. Until its delivery pass has ended it is dropped at
/// once (`stopped` is the error: the set stays hidden or owed in staging); after that, the
/// set's fate is known, so the backup ends by itself (it skips retention when stopped) and the
/// run is recorded rather than leaving a stored set without a record.
async fn until_stopped(
    backup: impl std::future::Future<Output = Result<BackupReport>>,
    opts: &BackupOptions,
    stopped: impl FnOnce() -> anyhow::Error,
) -> Result<BackupReport> {
    tokio::pin!(backup);
    tokio::select! {
        r = &mut backup => r,
        _ = opts.abort.cancelled() => {
            if opts.delivered.load(std::sync::atomic::Ordering::SeqCst) {
                backup.await
            } else {
                Err(stopped())
            }
        }
    }
}

/// One run, once connected to this node's member.
struct Run<'a> {
    settings: &'a Settings,
    req: &'a Request,
    member: etcd::Member,
    status: etcd::MemberStatus,
    election: Election,
}

impl<'a> Run<'a> {
    /// Connects to this node's member; `Err(skip)` when it is down and the run is elected.
    async fn connect(settings: &'a Settings, req: &'a Request) -> Result<std::result::Result<Run<'a>, Skip>> {
        let (member, status) = match etcd::connect_first(&settings.etcd).await {
            Ok(c) => c,
            // In an elected run a node whose member is down steps aside: it cannot take a
            // snapshot, and the other nodes (whose members answer) take the run. A manual
            // `--no-election` run fails instead: the operator asked for this node, and so
            // does a manual `backup` (the admin at this node's console learns that its member
            // is down, exit 1, rather than that "another node" takes a run no other node was
            // asked for). Only a member that is unreachable or silent is a skip; TLS, auth
            // and usage errors (the same on every node) fail the run.
            Err(e)
                if matches!(req.mode, Mode::Elected { .. })
                    && req.trigger != Trigger::Manual
                    && e.is::<etcd::MemberDown>() =>
            {
                // The journal's set is asked of the writer's node alone, again each minute.
                let who = if req.trigger == Trigger::Journal {
                    "the journal's writer asks again in a minute"
                } else {
                    "another node takes the run"
                };
                return Ok(Err(Skip::new(
                    SkipKind::Member,
                    format!(
                        "this node's etcd member does not answer; {who} ({})",
                        crate::error::one_line(&e)
                    ),
                )));
            }
            Err(e) => return Err(e),
        };
        let election = Election::of(member.client.clone(), settings);
        Ok(Ok(Run {
            settings,
            req,
            member,
            status,
            election,
        }))
    }

    fn elected(&self) -> bool {
        matches!(self.req.mode, Mode::Elected { .. })
    }

    async fn guards(&mut self) -> Result<Verdict> {
        check_guards(self.settings, &mut self.member, &self.status, self.req.force).await
    }

    /// The pipeline's options for this run; `held` is the lock of an elected run.
    fn options(&self, forced: Vec<String>, held: Option<&Held>, abort: CancellationToken) -> BackupOptions {
        BackupOptions {
            trigger: self.req.trigger,
            run: held.map(|_| self.req.run.clone()),
            lease: held.map(Held::lease),
            target: self.req.target.clone(),
            forced,
            force: self.req.force,
            deliver_by: self.req.deliver_by,
            abort,
            delivered: Default::default(),
        }
    }

    /// A run of this node alone: the backup, stopped by `cancel`.
    async fn alone(mut self, forced: Vec<String>, cancel: &CancellationToken) -> Result<Outcome> {
        let abort = cancel.child_token();
        let opts = self.options(forced, None, abort.clone());
        let backup = pipeline::run_backup(self.settings, &opts, &mut self.member);
        until_stopped(backup, &opts, || anyhow!(STOPPED))
            .await
            .map(|r| Outcome::Ran(Box::new(r)))
    }

    /// An elected run: the lock won (or the run found done or skipped), a second look at
    /// the guards after a long wait, the backup while the lock is held, then the record.
    async fn contended(
        mut self,
        forced: Vec<String>,
        wait_max: Duration,
        cancel: &CancellationToken,
    ) -> Result<Outcome> {
        let (settings, run) = (self.settings, self.req.run.as_str());
        let waited = Instant::now();
        let held = match self.election.contend(run, &self.status, wait_max, cancel).await? {
            Claim::Won(held) => held,
            Claim::Done(rec) => return Ok(Outcome::Elsewhere(rec)),
            Claim::Skip(reason) => return Ok(Outcome::Skipped(reason)),
        };
        // After a long wait (a dead runner), the cluster may have changed: look again.
        if waited.elapsed() > settings.election.lease_ttl.0
            && let Some(reason) = self.recheck().await
        {
            let rec = self.record(crate::outcome::Recorded::Skipped(reason.reason.clone()), None);
            if let Err(e) = self.election.finish(held, &rec).await {
                tracing::warn!(error = %crate::error::one_line(&e), "cannot record the skipped run");
            }
            return Ok(Outcome::Skipped(reason));
        }
        // A runner that lost its lock after storing its set, before recording the run, noted
        // which set it was publishing: if that set is on a target, it is this run's backup.
        let cluster = settings.cluster_folder(self.status.cluster_id);
        if let Some(rec) = already_published(settings, &mut self.election, run, &cluster).await {
            tracing::info!(run = %run, node = %rec.node, backup_id = ?rec.id, "the run's set was stored by a runner that could not record it; recording it");
            let done = RunRecord {
                result: RunResult::Ok.into(),
                finished: now(),
                ..rec
            };
            if let Err(e) = self.election.finish(held, &done).await {
                tracing::warn!(error = %crate::error::one_line(&e), "cannot record the run");
            }
            return Ok(Outcome::Elsewhere(done));
        }
        let result = self.backup_held(forced, &held, cancel).await;
        self.finish(held, result).await
    }

    /// The guards again, on a fresh connection; `Some` when they now refuse.
    async fn recheck(&self) -> Option<Skip> {
        let (mut m, st) = etcd::connect_first(&self.settings.etcd).await.ok()?;
        match check_guards(self.settings, &mut m, &st, self.req.force).await {
            Ok(Verdict::Skip(reason)) => Some(reason),
            _ => None,
        }
    }

    /// The backup while `held`: it stops publishing as soon as the lock may be lost or the
    /// run is stopped.
    async fn backup_held(
        &mut self,
        forced: Vec<String>,
        held: &Held,
        cancel: &CancellationToken,
    ) -> Result<BackupReport> {
        let abort = CancellationToken::new();
        let watcher = {
            let (abort, lost, stop) = (abort.clone(), held.lost.clone(), cancel.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = lost.cancelled() => {}
                    _ = stop.cancelled() => {}
                }
                abort.cancel();
            })
        };
        let opts = self.options(forced, Some(held), abort.clone());
        let backup = pipeline::run_backup(self.settings, &opts, &mut self.member);
        let result = until_stopped(backup, &opts, || {
            anyhow!(if held.lost.is_cancelled() { LOCK_LOST } else { STOPPED })
        })
        .await;
        watcher.abort();
        result
    }

    /// Records an elected run's result and lets the lock go.
    async fn finish(mut self, held: Held, result: Result<BackupReport>) -> Result<Outcome> {
        let (staging, run) = (&self.settings.snapshot.staging_dir, self.req.run.as_str());
        let lost = held.lost.is_cancelled();
        match result {
            // The lock may have been lost as the run ended, before its set reached every
            // target: the set then waits for no one, and the run is left to another node,
            // not recorded as failed (which would keep everyone from taking it over).
            Ok(report) if lost && !report.all_stored() => {
                self.election.release(held).await;
                crate::staging::sets::abandon_run(staging, run);
                Err(anyhow!(LOCK_LOST))
            }
            Ok(report) => {
                // What happened to the set: on every target (ok), on some (partial, naming
                // them), or on none yet (pending: it waits in staging). Never "failed": a set
                // exists. A later delivery settles the marker (see `Election::settle_all`).
                let (stored, missing) = report.stored_and_missing();
                let result = report.result();
                let rec = RunRecord {
                    stored: if result == RunResult::Partial {
                        stored
                    } else {
                        Vec::new()
                    },
                    missing,
                    ..self.record(result.into(), Some(report.manifest.id.clone()))
                };
                if let Err(e) = self.election.finish(held, &rec).await {
                    tracing::error!(error = %crate::error::one_line(&e), "cannot record the run in etcd");
                }
                self.election.settle_all(&report.settled, Some(run)).await;
                Ok(Outcome::Ran(Box::new(report)))
            }
            Err(e) => {
                // The lock goes at once, so another node can take the run over without
                // waiting for the lease to expire. If the lock may be lost, a set this run
                // staged is not delivered by this node: the node that takes the run over
                // stores its own.
                self.election.release(held).await;
                if lost {
                    crate::staging::sets::abandon_run(staging, run);
                }
                Err(e)
            }
        }
    }

    /// This run's record in etcd.
    fn record(&self, result: crate::outcome::Recorded, id: Option<String>) -> RunRecord {
        RunRecord {
            run: self.req.run.clone(),
            node: self.settings.node_name.clone(),
            id,
            result,
            finished: now(),
            stored: Vec::new(),
            missing: Vec::new(),
        }
    }
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The set another runner noted it was publishing for `run`, if a target holds it.
async fn already_published(
    settings: &Settings,
    election: &mut Election,
    run: &str,
    cluster: &str,
) -> Option<RunRecord> {
    let rec = election.published(run).await.ok()??;
    // Also this node's own earlier attempt: a runner that lost its lock does not deliver
    // its staged set (`abandon_run`), so only what is on a target counts.
    let id = rec.id.clone()?;
    for t in &settings.targets {
        let Ok(target) = crate::targets::open(t, None) else {
            continue;
        };
        if let Ok(sets) = target.list_sets(Some(cluster)).await
            && sets
                .iter()
                .any(|s| s.manifest.id == id && s.manifest.run.as_deref() == Some(run))
        {
            return Some(rec);
        }
    }
    None
}

/// What the guards say about backing up now.
enum Verdict {
    /// Go on; with `--force`, these refusals were overridden.
    Go {
        forced: Vec<String>,
    },
    Skip(Skip),
}

/// The guards, with the facts read from this node's member. With `force`, the refusals a
/// guard allows to override become the run's `forced` list; any other refusal skips.
async fn check_guards(
    settings: &Settings,
    member: &mut etcd::Member,
    status: &etcd::MemberStatus,
    force: Force,
) -> Result<Verdict> {
    let facts = guards::gather(member).await?;
    // Staged sets must never be what stops the next backup: the space they hold counts as
    // free here; the runner drops them (see `crate::staging::sets::make_room`) only once it has won.
    let staging = &settings.snapshot.staging_dir;
    let free = staging_free(staging)? + crate::staging::sets::staged_bytes(staging);
    let refused = guards::check_all(settings, &facts, status, free, Utc::now());
    let (may, must): (Vec<_>, Vec<_>) = refused
        .into_iter()
        .partition(|r| force == Force::Yes && r.guard.overridable());
    Ok(match must.into_iter().next() {
        Some(r) => Verdict::Skip(r.skip()),
        None => Verdict::Go {
            forced: may.into_iter().map(|r| r.reason).collect(),
        },
    })
}

/// The node-local record of a run's outcome.
pub fn record(
    trigger: Trigger,
    run: &str,
    started: chrono::DateTime<Utc>,
    t0: Instant,
    outcome: &Result<Outcome>,
) -> RunState {
    let trigger = serde_json::to_value(trigger)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let mut s = RunState {
        run: run.to_string(),
        trigger,
        started: started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        finished: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        result: RunResult::Failed,
        reason: None,
        skip: None,
        id: None,
        bytes: None,
        duration_s: t0.elapsed().as_secs_f64(),
        targets: Vec::new(),
        pace: None,
    };
    match outcome {
        Ok(Outcome::Ran(r)) => {
            s.result = r.result();
            s.id = Some(r.manifest.id.clone());
            s.bytes = Some(r.manifest.total_stored_size());
            s.pace = r.snapshot.pace.clone();
            s.targets = r
                .targets
                .iter()
                .map(|t| TargetState {
                    name: t.name.clone(),
                    ok: t.result.is_ok(),
                    error: t.result.clone().err(),
                })
                .collect();
        }
        Ok(Outcome::Skipped(skip)) => s.skipped(skip),
        Ok(Outcome::Elsewhere(rec)) => {
            s.result = RunResult::DoneElsewhere;
            s.reason = Some(format!("node {} ran it ({})", rec.node, rec.result));
            s.id = rec.id.clone();
        }
        // A skip on the way (another backup holds staging) is a skip, not a failure.
        Err(e) => match crate::error::skip_of(e) {
            Some(skip) => s.skipped(&skip),
            None => {
                s.result = RunResult::Failed;
                s.reason = Some(crate::error::one_line(e));
            }
        },
    }
    s
}

/// Adds a run to the node's state file; a failure to write it is logged, not fatal.
pub fn remember(staging: &Path, run: RunState) {
    if let Err(e) = crate::staging::prepare_staging(staging) {
        tracing::warn!(error = %crate::error::one_line(&e), "cannot write the state file");
        return;
    }
    State::update_or_log(staging, |state| {
        state.finished_running(&run.run);
        state.push(run);
    });
}

/// Records a restore drill's result in the state file and the journal.
pub fn remember_drill(settings: &Settings, id: &str, result: &Result<crate::restore::Drill>) {
    let summary = match result {
        Ok(d) => {
            tracing::info!(
                message_id = crate::notify::MESSAGE_ID_DRILL_OK, backup_id = %id, revision = d.revision, keys = d.keys,
                namespaces = d.namespaces, seconds = d.seconds, "restore drill succeeded"
            );
            format!(
                "revision {}, {} keys, {} namespaces{}",
                d.revision,
                d.keys,
                d.namespaces,
                d.cluster_version
                    .as_ref()
                    .map(|v| format!(", ClusterVersion {v}"))
                    .unwrap_or_default()
            )
        }
        Err(e) => {
            let e = crate::error::one_line(e);
            tracing::error!(message_id = crate::notify::MESSAGE_ID_DRILL_FAILED, backup_id = %id, error = %e, "restore drill failed");
            e
        }
    };
    let staging = &settings.snapshot.staging_dir;
    if crate::staging::prepare_staging(staging).is_err() {
        return;
    }
    State::update_or_log(staging, |state| {
        state.last_drill = Some(crate::staging::state::DrillState {
            id: id.to_string(),
            finished: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ok: result.is_ok(),
            summary,
            target: result.as_ref().ok().map(|d| d.target.clone()),
            set_time: result.as_ref().ok().map(|d| d.set_created.clone()),
            restore_seconds: result.as_ref().ok().map(|d| d.restore_seconds),
            drilled: crate::staging::state::drilled_after(
                state.last_drill.take(),
                result
                    .as_ref()
                    .ok()
                    .map(|d| (d.target.as_str(), d.set_created.as_str())),
            ),
        });
    });
    crate::metrics::refresh(settings);
}
