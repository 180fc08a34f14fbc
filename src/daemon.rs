//! `etcd-backupd daemon`: wait for each scheduled run (and for a just-completed upgrade),
//! run it through [`crate::run`], report to systemd and the journal.
//!
//! Signals: SIGTERM/SIGINT stop the daemon; a backup in flight is abandoned at once (its
//! temporary set stays hidden and is removed by the next run), the election lease is
//! revoked, and the process exits within a second or two, well under the unit's
//! `TimeoutStopSec`. SIGHUP reloads the configuration; an invalid one is logged and the old
//! one kept.
//!
//! A run whose time passed while the node was down is not made up (the next slot is
//! computed from now), and runs never overlap: the loop waits for a run to finish before it
//! computes the next one.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use chrono::Utc;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::run::guards;
use crate::run::{self, Outcome, RunKind};
use crate::schedule::Schedule;
use crate::staging::state::State;
use crate::{etcd, notify};

/// How often the daemon looks at the ClusterVersion for a completed upgrade while idle.
const UPGRADE_POLL: Duration = Duration::from_secs(30);
/// How soon a skipped after-upgrade backup is tried again.
const UPGRADE_RETRY: Duration = Duration::from_secs(300);
/// How often the import directories are looked at.
const IMPORT_POLL: Duration = Duration::from_secs(60);
/// How long a node waits for another holder of the run lock before giving the run up.
const WAIT_FOR_HOLDER: Duration = Duration::from_secs(6 * 3600);

/// A token cancelled by SIGTERM or SIGINT.
pub fn cancel_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
        notify::stopping();
        t.cancel();
    });
    token
}

/// `STATUS=` while the daemon waits: the next run as it will start (jitter included), the
/// last run, pending deliveries, the probe's problems and a rejected reload.
fn idle_status(
    settings: &Settings,
    slot: Option<crate::schedule::Slot>,
    pending_sets: usize,
    rejected: Option<&str>,
) -> String {
    let staging = &settings.snapshot.staging_dir;
    let tz = crate::clock::zone(&settings.schedule.timezone);
    let mut parts = Vec::new();
    if let Some(why) = rejected {
        parts.push(format!("configuration rejected: {why}"));
    }
    parts.push(format!(
        "idle; next run {}",
        slot.map(|s| crate::clock::show(s.start, tz))
            .unwrap_or_else(|| "none".into())
    ));
    parts.push(last_summary(staging));
    if pending_sets > 0 {
        parts.push(format!("{pending_sets} set(s) pending delivery"));
    }
    if let Some(p) = State::load(staging).probe {
        parts.extend(p.problems().into_iter().map(|p| format!("problem: {p}")));
    }
    parts.join("; ")
}

fn last_summary(staging: &std::path::Path) -> String {
    match State::load(staging).runs.first() {
        Some(r) => match (r.result, &r.id) {
            (crate::outcome::RunResult::Ok, Some(id)) => format!(
                "last ok {id} ({}, {:.0} s)",
                crate::config::types::Size(r.bytes.unwrap_or(0)),
                r.duration_s
            ),
            (result, _) => format!(
                "last {result}{}",
                r.reason.as_ref().map(|x| format!(": {x}")).unwrap_or_default()
            ),
        },
        None => "no run yet".into(),
    }
}

/// Runs the daemon until `stop` fires (SIGTERM/SIGINT in production, see
/// [`cancel_on_signals`]; a test passes its own). Background tasks are tracked and awaited,
/// briefly, before it returns.
pub async fn run(config: PathBuf, initial: Settings, stop: CancellationToken) -> Result<()> {
    let tasks = tokio_util::task::TaskTracker::new();
    let staging = initial.snapshot.staging_dir.clone();
    // The journal's writer stores its open segment on stop: it gets longer.
    let grace = Duration::from_secs(if initial.journal.enabled { 10 } else { 2 });
    let result = serve(config, initial, &stop, &tasks).await;
    stop.cancel();
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            "background tasks did not stop within {}",
            humantime::format_duration(grace)
        );
    }
    // After the heartbeat task ended: `status` says at once that no daemon runs.
    crate::heartbeat::stopped(&staging);
    result
}

async fn serve(
    config: PathBuf,
    initial: Settings,
    stop: &CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    let Some(mut daemon) = Daemon::start(config, initial, stop.clone(), tasks).await? else {
        notify::stopping();
        return Ok(());
    };
    loop {
        let slot = daemon.next_slot()?;
        daemon.announce_idle(slot);
        match daemon.sleep(slot, &mut hup).await {
            Wake::Stop => break,
            Wake::Reload => daemon.reload(),
            Wake::Import => daemon.import(slot).await,
            Wake::Drill => daemon.drill(slot).await,
            Wake::Deliver => daemon.deliver(slot).await,
            Wake::Upgrade(version) => {
                daemon.run(RunKind::AfterUpgrade(version), slot).await;
            }
            Wake::ForJournal => daemon.for_journal(slot).await,
            Wake::Slot => {
                if let Some(slot) = slot {
                    daemon.run(RunKind::Scheduled(slot.at), Some(slot)).await;
                }
            }
        }
        if daemon.stop.is_cancelled() {
            break;
        }
    }
    notify::stopping();
    tracing::info!("daemon stopped");
    Ok(())
}

/// The daemon between wake-ups: its settings and schedules (replaced by an accepted
/// reload), and its timers. Each kind of wake-up is one method.
struct Daemon<'a> {
    config: PathBuf,
    settings: Settings,
    schedule: Option<Schedule>,
    drills: Option<Schedule>,
    stop: CancellationToken,
    tasks: &'a tokio_util::task::TaskTracker,
    /// Stops the heartbeat of the current settings (restarted on each accepted reload).
    beat_stop: CancellationToken,
    /// A rejected reload, said in every STATUS= until a reload is accepted.
    rejected: Option<String>,
    /// The cluster folder, which seeds the jitter (and names imports without cluster_name).
    seed: String,
    cv_changed: std::sync::Arc<tokio::sync::Notify>,
    /// The journal's writer asks here for a set (see [`crate::journal::writer::SetWanted`]).
    journal_wants_set: std::sync::Arc<crate::journal::writer::SetWanted>,
    next_drill: Option<chrono::DateTime<Utc>>,
    next_import: tokio::time::Instant,
    delivery_backoff: Duration,
    next_delivery: Option<tokio::time::Instant>,
    /// The next slot is the first after this.
    after: chrono::DateTime<Utc>,
    next_upgrade_check: tokio::time::Instant,
}

impl<'a> Daemon<'a> {
    /// Everything up to READY: priorities, staging, the signing key, the heartbeat, the
    /// metrics listener, then etcd awaited (when this host takes backups). `None`: stopped
    /// while waiting.
    async fn start(
        config: PathBuf,
        settings: Settings,
        stop: CancellationToken,
        tasks: &'a tokio_util::task::TaskTracker,
    ) -> Result<Option<Daemon<'a>>> {
        crate::priority::apply(&settings.priority);
        log_io_scheduler(&settings);
        let schedule = settings.backup_schedule.clone();
        let drills = settings.drill_schedule.clone();
        spawn_watchdog(tasks, &stop);
        crate::staging::prepare_staging(&settings.snapshot.staging_dir)?;
        // The node's signing key: created on the first start, its allowed_signers line logged.
        crate::trust::signing::announce(&settings)?;
        // A heartbeat (state.json, and etcd with the election on) every minute.
        let beat_stop = stop.child_token();
        crate::heartbeat::spawn(tasks, settings.clone(), beat_stop.clone());
        // In the background, from the start (also while etcd is awaited); a port that cannot
        // be bound is retried there and never stops backups.
        if let Some(addr) = &settings.metrics.listen {
            let listen = (addr.clone(), settings.metrics.listen_retry.0);
            crate::metrics::spawn(tasks, listen, settings.snapshot.staging_dir.clone(), stop.clone());
        }
        let Some(seed) = wait_for_etcd(&settings, schedule.is_some(), &stop).await? else {
            return Ok(None);
        };
        notify::ready("started");
        // What is wrong with etcd or a target, said now rather than at the first run (once
        // etcd answered: after a boot the daemon waits for the etcd static pod).
        crate::probe::spawn(tasks, settings.clone(), "at start", stop.clone());
        // The journal's writer runs beside the schedule, on whichever node wins its lock;
        // it keeps the settings it started with (a reload does not restart it).
        let journal_wants_set = std::sync::Arc::new(crate::journal::writer::SetWanted::default());
        if settings.journal.enabled {
            let wants = journal_wants_set.clone();
            tasks.spawn(crate::journal::writer::run(settings.clone(), stop.clone(), wants));
        }
        let cv_changed = if schedule.is_some() {
            watch_cluster_version(tasks, &settings, stop.clone())
        } else {
            std::sync::Arc::new(tokio::sync::Notify::new())
        };
        tracing::info!(
            schedule = %schedule.as_ref().map(|s| s.describe()).unwrap_or_else(|| "none".into()),
            drills = %drills.as_ref().map(|s| s.describe()).unwrap_or_else(|| "none".into()),
            node = %settings.node_name, "daemon started"
        );
        let now = tokio::time::Instant::now();
        Ok(Some(Daemon {
            next_drill: drills.as_ref().and_then(|d| d.next_at(Utc::now())),
            // Sets a previous daemon could not deliver are retried right away.
            next_delivery: (crate::staging::sets::pending(&settings.snapshot.staging_dir).0 > 0).then_some(now),
            delivery_backoff: settings.delivery.retry_interval.0,
            config,
            settings,
            schedule,
            drills,
            stop,
            tasks,
            beat_stop,
            rejected: None,
            seed,
            cv_changed,
            journal_wants_set,
            next_import: now,
            after: Utc::now(),
            // Checked at start (an upgrade may have completed while the daemon was down),
            // then every UPGRADE_POLL while idle.
            next_upgrade_check: now,
        }))
    }

    fn next_slot(&self) -> Result<Option<crate::schedule::Slot>> {
        match &self.schedule {
            Some(s) => {
                Ok(Some(s.next_slot(self.after, &self.seed).ok_or_else(|| {
                    anyhow::anyhow!("schedule {} has no next run", s.describe())
                })?))
            }
            None => Ok(None),
        }
    }

    /// The next run in the state file, STATUS= and the journal.
    fn announce_idle(&self, slot: Option<crate::schedule::Slot>) {
        let settings = &self.settings;
        let staging = &settings.snapshot.staging_dir;
        let next_run = slot.map(|s| s.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        let next_start = slot.map(|s| s.start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        if crate::staging::prepare_staging(staging).is_ok() {
            State::update_or_log(staging, |state| {
                state.next_run = next_run;
                state.next_start = next_start;
            });
        }
        let (pending_sets, _) = crate::staging::sets::pending(staging);
        notify::status(&idle_status(settings, slot, pending_sets, self.rejected.as_deref()));
        crate::metrics::refresh(settings);
        if let Some(slot) = slot {
            let tz = crate::clock::zone(&settings.schedule.timezone);
            tracing::info!(
                next_run = %crate::clock::show(slot.at, tz),
                start = %crate::clock::show(slot.start, tz),
                "waiting for the next run"
            );
        }
    }

    /// Sleeps until something is due, waking for SIGHUP, SIGTERM and upgrade checks.
    async fn sleep(&mut self, slot: Option<crate::schedule::Slot>, hup: &mut tokio::signal::unix::Signal) -> Wake {
        loop {
            if self.schedule.is_some()
                && self.settings.schedule.after_upgrade
                && tokio::time::Instant::now() >= self.next_upgrade_check
            {
                self.next_upgrade_check = tokio::time::Instant::now() + UPGRADE_POLL;
                if let Some(version) = pending_upgrade(&self.settings).await {
                    return Wake::Upgrade(version);
                }
            }
            let due = Due {
                slot: slot.map(|s| s.start),
                import: (!self.settings.import.dirs.is_empty()).then_some(self.next_import),
                drill: self.next_drill,
                delivery: self.next_delivery,
            };
            let sleep = match due.next(Utc::now(), tokio::time::Instant::now()) {
                Next::Now(w) => return w,
                Next::In(d) => d.min(UPGRADE_POLL),
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.cv_changed.notified() => {
                    // Checked right away on the next turn of this loop.
                    self.next_upgrade_check = tokio::time::Instant::now();
                }
                _ = self.journal_wants_set.asked.notified() => return Wake::ForJournal,
                _ = hup.recv() => return Wake::Reload,
                _ = self.stop.cancelled() => return Wake::Stop,
            }
        }
    }

    /// The journal's writer on this node needs a set to start its new chain from: one is
    /// taken now (elected, with the usual guards), unless this node takes no backups.
    async fn for_journal(&mut self, slot: Option<crate::schedule::Slot>) {
        // Met since it was asked (a set this daemon or another node took): nothing to do.
        let Some(after) = self.journal_wants_set.after() else {
            return;
        };
        if self.schedule.is_none() {
            tracing::warn!(
                "journal: the new chain needs a full set, but this node takes no backups (schedule.cron is empty); it starts with the next set taken elsewhere"
            );
            return;
        }
        tracing::info!(
            revision = after,
            "journal: taking a full set now to start the new chain"
        );
        if let Some(rev) = self.run(RunKind::ForJournal(Utc::now()), slot).await {
            self.journal_wants_set.met_by(rev);
        }
    }

    /// SIGHUP: the new configuration replaces the old one only if it is valid throughout.
    fn reload(&mut self) {
        notify::reloading();
        let loaded = (|| -> Result<_> {
            let s = Settings::load(&self.config)?;
            s.check_node_files()?;
            Ok((s.backup_schedule.clone(), s.drill_schedule.clone(), s))
        })();
        match loaded {
            Ok((schedule, drills, settings)) => {
                tracing::info!("configuration reloaded");
                self.settings = settings;
                self.schedule = schedule;
                self.next_drill = drills.as_ref().and_then(|d| d.next_at(Utc::now()));
                self.drills = drills;
                crate::priority::apply(&self.settings.priority);
                // A new schedule starts from now: no run in the past is made up.
                self.after = self.after.max(Utc::now());
                self.rejected = None;
                self.beat_stop.cancel();
                self.beat_stop = self.stop.child_token();
                crate::heartbeat::spawn(self.tasks, self.settings.clone(), self.beat_stop.clone());
                crate::probe::spawn(self.tasks, self.settings.clone(), "after the reload", self.stop.clone());
                notify::ready("configuration reloaded");
            }
            Err(e) => {
                let why = crate::error::one_line(&e);
                tracing::error!(error = %why, "new configuration rejected, keeping the old one: {why}");
                // READY=1 ends the reload systemd waits for; the unit's ExecReload validates
                // first, so `systemctl reload` itself fails on this.
                notify::ready(&format!("configuration rejected: {why}"));
                self.rejected = Some(why);
            }
        }
    }

    /// Imports the platform's new sets; what stays owed is retried by the delivery timer.
    async fn import(&mut self, slot: Option<crate::schedule::Slot>) {
        self.next_import = tokio::time::Instant::now() + IMPORT_POLL;
        let settings = &self.settings;
        let cluster = settings.cluster_name.clone().unwrap_or_else(|| self.seed.clone());
        if cluster.is_empty() {
            tracing::warn!("import.dirs needs cluster_name on a host that takes no backups");
        } else if let Err(e) =
            crate::run::import::run(settings, &cluster, &self.stop, slot.map(|s| yield_before(s.start))).await
        {
            tracing::error!(error = %crate::error::one_line(&e), "cannot import platform backup sets");
        }
        if crate::staging::sets::pending(&settings.snapshot.staging_dir).0 > 0 && self.next_delivery.is_none() {
            self.next_delivery = Some(tokio::time::Instant::now() + self.delivery_backoff);
        }
    }

    /// A restore drill of the newest set, cut short when the next backup is due.
    async fn drill(&mut self, slot: Option<crate::schedule::Slot>) {
        notify::status("restore drill of the newest set");
        let settings = &self.settings;
        let located =
            match crate::config::read_identity(settings.verify.identity_file.as_deref(), "verify.identity_file") {
                Ok(identity) => crate::restore::locate(settings, None, "latest").await.map(|mut l| {
                    l.identity = identity.into_iter().collect();
                    l
                }),
                Err(e) => Err(e),
            };
        let (id, result) = match located {
            Ok(l) => (
                l.manifest.id.clone(),
                // The next backup comes first: a drill still running then is cut short.
                tokio::select! {
                    r = crate::restore::drill(settings, &l, None) => r,
                    _ = self.stop.cancelled() => Err(anyhow::anyhow!("stopped during the drill")),
                    _ = until(slot.map(|s| yield_before(s.start))) => {
                        Err(anyhow::anyhow!("cut short: the next scheduled backup is due"))
                    }
                },
            ),
            Err(e) => ("latest".to_string(), Err(e)),
        };
        run::remember_drill(settings, &id, &result);
        self.next_drill = self.drills.as_ref().and_then(|d| d.next_at(Utc::now()));
    }

    /// A delivery pass of the sets still owed, backing off while targets keep failing.
    async fn deliver(&mut self, slot: Option<crate::schedule::Slot>) {
        notify::status("delivering pending backup sets");
        let settings = &self.settings;
        // Never past the next run's start: the snapshot comes first. A host that takes no
        // backups (a drill host delivering a derived set) leaves retention to the nodes that do.
        let retried = match slot {
            Some(slot) => crate::delivery::retry(settings, &self.stop, Some(yield_before(slot.start))).await,
            None => crate::delivery::deliver_staged(settings, &self.stop).await,
        };
        self.next_delivery = match retried {
            Ok(r) if r.pending == 0 => {
                tracing::info!(delivered = r.delivered, "every pending backup set is delivered");
                self.delivery_backoff = settings.delivery.retry_interval.0;
                None
            }
            Ok(r) => {
                if !r.busy {
                    self.delivery_backoff = (self.delivery_backoff * 2).min(settings.delivery.retry_max.0);
                }
                tracing::warn!(
                    delivered = r.delivered,
                    failed = r.failed,
                    pending = r.pending,
                    retry_in_s = self.delivery_backoff.as_secs(),
                    "backup sets still pending delivery"
                );
                Some(tokio::time::Instant::now() + self.delivery_backoff)
            }
            Err(e) => {
                tracing::error!(error = %crate::error::one_line(&e), "cannot retry pending deliveries");
                Some(tokio::time::Instant::now() + self.delivery_backoff)
            }
        };
    }

    /// A backup run: scheduled (at `slot`), after an upgrade, or for the journal; recorded in
    /// the node's state. The revision of the set it took, if it took one.
    async fn run(&mut self, kind: RunKind, slot: Option<crate::schedule::Slot>) -> Option<i64> {
        let (trigger, run) = (kind.trigger(), kind.name());
        let settings = &self.settings;
        let staging = settings.snapshot.staging_dir.clone();
        notify::status(&format!("running {run}: guards, election, backup"));
        State::update_or_log(&staging, |st| st.running = Some(run.clone()));
        crate::metrics::refresh(settings);
        let (started, t0) = (Utc::now(), Instant::now());
        // The run's delivery pass yields just before the run after it: a target that keeps
        // failing never costs a snapshot (its sets wait for the timer or the next run).
        let following = match &kind {
            RunKind::Scheduled(at) => self.schedule.as_ref().and_then(|s| s.next_slot(*at, &self.seed)),
            _ => slot,
        };
        let mode = if settings.election.enabled {
            run::Mode::Elected {
                wait_max: WAIT_FOR_HOLDER,
            }
        } else {
            run::Mode::Alone
        };
        let request = run::Request {
            deliver_by: following.map(|n| yield_before(n.start)),
            ..run::Request::new(&kind, mode)
        };
        let outcome = run::run_once(settings, &request, &self.stop).await;
        log_outcome(&run, &outcome, t0);
        let took = matches!(outcome, Ok(Outcome::Ran(_) | Outcome::Elsewhere(_)));
        match &kind {
            // A skipped after-upgrade attempt is logged, but kept out of the history of
            // runs; a skipped or failed one is tried again, but not every 30 s.
            // The journal's writer asks again in a minute, the same way.
            RunKind::AfterUpgrade(_) | RunKind::ForJournal(_) if !took => {
                if matches!(kind, RunKind::AfterUpgrade(_)) {
                    self.next_upgrade_check = tokio::time::Instant::now() + UPGRADE_RETRY;
                }
                if matches!(outcome, Ok(Outcome::Skipped(_))) {
                    State::update_or_log(&staging, |st| st.finished_running(&run));
                } else {
                    run::remember(&staging, run::record(trigger, &run, started, t0, &outcome));
                }
            }
            _ => run::remember(&staging, run::record(trigger, &run, started, t0, &outcome)),
        }
        crate::metrics::refresh(settings);
        if let RunKind::AfterUpgrade(version) = &kind
            && took
        {
            State::update_or_log(&staging, |state| {
                if !state.upgrades_done.iter().any(|v| v == version) {
                    state.upgrades_done.push(version.clone());
                }
            });
        }
        // A run's own delivery pass covered older pending sets too; what is left waits for
        // the timer, starting again from the shortest interval.
        self.delivery_backoff = settings.delivery.retry_interval.0;
        self.next_delivery = (crate::staging::sets::pending(&staging).0 > 0)
            .then(|| tokio::time::Instant::now() + self.delivery_backoff);
        if let RunKind::Scheduled(at) = kind {
            // The next slot is computed from now: a run is never made up twice, never overlaps.
            self.after = at.max(Utc::now());
        }
        match outcome {
            Ok(Outcome::Ran(r)) => Some(r.manifest.etcd.revision),
            _ => None,
        }
    }
}

/// Pets systemd's watchdog (when the unit has one) until `stop`.
fn spawn_watchdog(tasks: &tokio_util::task::TaskTracker, stop: &CancellationToken) {
    if let Some(every) = notify::watchdog_interval() {
        let stop = stop.clone();
        tasks.spawn(async move {
            loop {
                notify::watchdog();
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.cancelled() => return,
                }
            }
        });
    }
}

/// Waits until etcd answers, when this host takes backups (`takes_backups`); the cluster
/// folder it names (the jitter's seed), or `""` on a host that takes none. `None`: stopped
/// while waiting. A configuration error (a missing TLS file) will not go away by waiting:
/// it ends the daemon (exit 2).
async fn wait_for_etcd(settings: &Settings, takes_backups: bool, stop: &CancellationToken) -> Result<Option<String>> {
    if !takes_backups {
        return Ok(Some(String::new()));
    }
    loop {
        match etcd::connect_first(&settings.etcd).await {
            Ok((_, status)) => return Ok(Some(settings.cluster_folder(status.cluster_id))),
            Err(e) if crate::error::exit_code(&e) == crate::error::EXIT_USAGE => return Err(e),
            Err(e) => {
                let msg = format!("waiting for etcd: {}", crate::error::one_line(&e));
                tracing::warn!("{msg}");
                notify::status(&msg);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = stop.cancelled() => return Ok(None),
                }
            }
        }
    }
}

/// I/O priorities only bite under BFQ/CFQ: say which scheduler staging is on.
pub fn log_io_scheduler(settings: &Settings) {
    let staging = &settings.snapshot.staging_dir;
    match crate::priority::io_scheduler(staging) {
        Some(s) if s == "bfq" || s == "cfq" => {
            tracing::info!(scheduler = %s, "staging disk's I/O scheduler honours priority.io_class")
        }
        Some(s) => tracing::info!(
            scheduler = %s,
            "staging disk's I/O scheduler ignores priority.io_class; the unit's IOWeight and bandwidth limits still apply"
        ),
        None => tracing::info!(path = %staging.display(), "cannot tell the staging disk's I/O scheduler"),
    }
}

/// Just before `at` (wall clock) as a monotonic instant: when delivery yields to a run.
/// Sleeps until `at`; forever when `None`.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn yield_before(at: chrono::DateTime<Utc>) -> tokio::time::Instant {
    let left = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
    tokio::time::Instant::now() + left.saturating_sub(Duration::from_secs(1))
}

/// When each kind of work falls due; `None`: never. Wall-clock times for what the schedule
/// names (slots, drills), monotonic ones for the daemon's own timers.
struct Due {
    slot: Option<chrono::DateTime<Utc>>,
    import: Option<tokio::time::Instant>,
    drill: Option<chrono::DateTime<Utc>>,
    delivery: Option<tokio::time::Instant>,
}

/// What the daemon does next: something due now, or sleep this long.
#[derive(Debug, PartialEq)]
enum Next {
    Now(Wake),
    In(Duration),
}

impl Due {
    /// The daemon's next wake-up, a pure function of the timers and the clocks. A backup
    /// slot comes first, then imports, drills and deliveries: none of those ever delays a
    /// snapshot.
    fn next(&self, now: chrono::DateTime<Utc>, mono: tokio::time::Instant) -> Next {
        let wall = |at: Option<chrono::DateTime<Utc>>| at.map(|t| (t - now).to_std().unwrap_or(Duration::ZERO));
        let mono_in = |at: Option<tokio::time::Instant>| at.map(|t| t.saturating_duration_since(mono));
        let waits = [
            (Wake::Slot, wall(self.slot)),
            (Wake::Import, mono_in(self.import)),
            (Wake::Drill, wall(self.drill)),
            (Wake::Deliver, mono_in(self.delivery)),
        ];
        let mut soonest = Duration::MAX;
        for (wake, wait) in waits {
            match wait {
                Some(d) if d.is_zero() => return Next::Now(wake),
                Some(d) => soonest = soonest.min(d),
                None => {}
            }
        }
        Next::In(soonest)
    }
}

#[derive(Debug, PartialEq)]
enum Wake {
    Slot,
    Import,
    Deliver,
    Drill,
    Upgrade(String),
    /// The journal's writer asked for a set.
    ForJournal,
    Reload,
    Stop,
}

/// Watches the ClusterVersion key and signals each change, reconnecting as needed; the
/// 30-second poll stays as the fallback.
fn watch_cluster_version(
    tasks: &tokio_util::task::TaskTracker,
    settings: &Settings,
    stop: CancellationToken,
) -> std::sync::Arc<tokio::sync::Notify> {
    let changed = std::sync::Arc::new(tokio::sync::Notify::new());
    let signal = changed.clone();
    let etcd_settings = settings.etcd.clone();
    tasks.spawn(async move {
        while !stop.is_cancelled() {
            let watched = async {
                let (mut member, _) = etcd::connect_first(&etcd_settings).await?;
                let mut stream = member.client.watch(etcd::CLUSTER_VERSION_KEY, None).await?;
                while let Some(resp) = stream.message().await? {
                    if !resp.events().is_empty() {
                        signal.notify_one();
                    }
                }
                Ok::<_, anyhow::Error>(())
            };
            tokio::select! {
                r = watched => if let Err(e) = r {
                    tracing::debug!(error = %crate::error::one_line(&e), "ClusterVersion watch ended; restarting");
                },
                _ = stop.cancelled() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = stop.cancelled() => return,
            }
        }
    });
    changed
}

/// A completed upgrade this node has not seen backed up: its version.
async fn pending_upgrade(settings: &Settings) -> Option<String> {
    let (mut member, _) = etcd::connect_first(&settings.etcd).await.ok()?;
    let raw = member.get(etcd::CLUSTER_VERSION_KEY).await.ok()??;
    let cv: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    let version = guards::completed_upgrade(&cv)?;
    let run = RunKind::AfterUpgrade(version.clone()).name();
    let state = State::load(&settings.snapshot.staging_dir);
    // Once per cluster and version: the election marker covers the cluster for 7 days, the
    // node's list of done upgrades for ever.
    if state.upgrades_done.contains(&version) || state.runs.iter().any(|r| r.run == run && r.result.took_a_set()) {
        return None;
    }
    Some(version)
}

/// One line per run, with fields journald can index.
fn log_outcome(run: &str, outcome: &Result<Outcome>, t0: Instant) {
    let seconds = t0.elapsed().as_secs_f64();
    match outcome {
        Ok(Outcome::Ran(r)) if r.all_stored() => tracing::info!(
            message_id = crate::notify::MESSAGE_ID_SUCCEEDED, run, backup_id = %r.manifest.id,
            bytes = r.manifest.total_stored_size(), seconds, "backup succeeded"
        ),
        Ok(Outcome::Ran(r)) => {
            let (stored, missing) = r.stored_and_missing();
            // What each target that lacks the set answered: the reason the alert sends the
            // admin here for.
            let reasons: Vec<String> = r
                .targets
                .iter()
                .filter_map(|t| t.result.as_ref().err().map(|e| format!("'{}': {e}", t.name)))
                .collect();
            tracing::error!(
                message_id = crate::notify::MESSAGE_ID_FAILED, run, backup_id = %r.manifest.id, seconds,
                stored_targets = %stored.join(","), failed_targets = %missing.join(","),
                error = %reasons.join("; "),
                "backup not stored on every target; it waits in staging for the others"
            )
        }
        Ok(Outcome::Skipped(skip)) => {
            tracing::warn!(message_id = crate::notify::MESSAGE_ID_SKIPPED, run, reason = %skip, kind = skip.kind.label(), "backup skipped")
        }
        Ok(Outcome::Elsewhere(rec)) => {
            tracing::info!(run, node = %rec.node, result = %rec.result, "another node ran this backup")
        }
        Err(e) => match crate::error::skip_of(e) {
            Some(skip) => {
                tracing::warn!(message_id = crate::notify::MESSAGE_ID_SKIPPED, run, reason = %skip, kind = skip.kind.label(), "backup skipped")
            }
            None => tracing::error!(
                message_id = crate::notify::MESSAGE_ID_FAILED, run, seconds, error = %crate::error::one_line(e), "backup failed"
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> chrono::DateTime<Utc> {
        chrono::DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_wake_up_is_the_soonest_due_work_and_a_slot_comes_first() {
        let now = at("2026-12-01T02:00:00Z");
        let mono = tokio::time::Instant::now();
        let idle = Due {
            slot: None,
            import: None,
            drill: None,
            delivery: None,
        };
        assert_eq!(idle.next(now, mono), Next::In(Duration::MAX), "nothing to do: sleep");
        let due = Due {
            slot: Some(at("2026-12-01T02:30:00Z")),
            import: Some(mono + Duration::from_secs(60)),
            drill: Some(at("2026-12-01T03:00:00Z")),
            delivery: Some(mono + Duration::from_secs(10)),
        };
        assert_eq!(due.next(now, mono), Next::In(Duration::from_secs(10)));
        // Time passes (paused clock): the delivery falls due first.
        tokio::time::advance(Duration::from_secs(10)).await;
        let mono = tokio::time::Instant::now();
        let now = now + chrono::TimeDelta::seconds(10);
        assert_eq!(due.next(now, mono), Next::Now(Wake::Deliver));
        // Everything due at once: the backup slot goes first, whatever else waits.
        let late = at("2026-12-01T04:00:00Z");
        assert_eq!(due.next(late, mono + Duration::from_secs(3600)), Next::Now(Wake::Slot));
        let no_slot = Due { slot: None, ..due };
        assert_eq!(
            no_slot.next(late, mono + Duration::from_secs(3600)),
            Next::Now(Wake::Import)
        );
        // A slot in the past is due now, never a negative sleep.
        let past = Due {
            slot: Some(at("2026-12-01T01:59:00Z")),
            import: None,
            drill: None,
            delivery: None,
        };
        assert_eq!(past.next(now, mono), Next::Now(Wake::Slot));
    }

    #[tokio::test]
    async fn the_daemon_stops_when_the_shutdown_it_was_given_fires() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "node_name = \"n\"\n[etcd]\nendpoints = [\"http://127.0.0.1:1\"]\n[snapshot]\nstatic_resources_dir = \"\"\nstaging_dir = \"{}\"\n[schedule]\ncron = \"\"\n[[target]]\nname = \"local\"\nurl = \"file://{}\"\n",
            dir.path().join("staging").display(),
            dir.path().join("target").display()
        );
        let settings = Settings::from_str_named("test.toml", &text).unwrap();
        let stop = CancellationToken::new();
        let daemon = tokio::spawn(run(dir.path().join("test.toml"), settings, stop.clone()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!daemon.is_finished(), "the daemon ended by itself");
        stop.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(5), daemon).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    }
}
