//! `etcd-backupd daemon`: wait for each scheduled run (and for a just-completed upgrade),
//! run it through [`runner`](crate::runner), report to systemd and the journal.
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
use crate::manifest::Trigger;
use crate::runner::{self, Outcome};
use crate::schedule::Schedule;
use crate::state::State;
use crate::{etcd, guards, notify};

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

/// The backup schedule; `None` when `schedule.cron` is empty (a host that takes no backups).
pub fn schedule_of(s: &Settings) -> Result<Option<Schedule>> {
    if s.schedule.cron.is_empty() {
        return Ok(None);
    }
    Schedule::new(&s.schedule.cron, &s.schedule.timezone, s.schedule.jitter.0)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("schedule: {e}"))
}

fn drill_schedule_of(s: &Settings) -> Result<Option<Schedule>> {
    if s.verify.schedule.is_empty() {
        return Ok(None);
    }
    Schedule::new(&s.verify.schedule, &s.schedule.timezone, Duration::ZERO)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("verify.schedule: {e}"))
}

fn last_summary(staging: &std::path::Path) -> String {
    match State::load(staging).runs.first() {
        Some(r) => match (&r.result[..], &r.id) {
            ("ok", Some(id)) => format!(
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

/// Runs the daemon until SIGTERM.
pub async fn run(config: PathBuf, initial: Settings) -> Result<()> {
    let stop = cancel_on_signals();
    let mut hup = signal(SignalKind::hangup())?;
    let mut settings = initial;
    crate::priority::apply(&settings.priority);
    log_io_scheduler(&settings);
    let mut schedule = schedule_of(&settings)?;
    let mut drills = drill_schedule_of(&settings)?;

    if let Some(every) = notify::watchdog_interval() {
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                notify::watchdog();
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.cancelled() => return,
                }
            }
        });
    }

    crate::staging::prepare_staging(&settings.snapshot.staging_dir)?;
    // The node's signing key: created on the first start, its allowed_signers line logged.
    crate::signing::announce(&settings)?;
    // In the background, from the start (also while etcd is awaited); a port that cannot be
    // bound is retried there and never stops backups.
    if let Some(addr) = &settings.metrics.listen {
        crate::metrics::spawn(addr.clone(), settings.snapshot.staging_dir.clone(), stop.clone());
    }
    // READY once the configuration is valid and etcd answers (when this host takes backups).
    let seed = loop {
        if schedule.is_none() {
            break String::new();
        }
        match etcd::connect_first(&settings.etcd).await {
            Ok((_, status)) => {
                break settings
                    .cluster_name
                    .clone()
                    .unwrap_or_else(|| etcd::hex_id(status.cluster_id));
            }
            // A missing TLS file will not appear by waiting: a configuration error, exit 2.
            Err(e) if crate::error::exit_code(&e) == crate::error::EXIT_USAGE => return Err(e),
            Err(e) => {
                let msg = format!("waiting for etcd: {}", crate::error::one_line(&e));
                tracing::warn!("{msg}");
                notify::status(&msg);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = stop.cancelled() => { notify::stopping(); return Ok(()); }
                }
            }
        }
    };
    notify::ready("started");
    let cv_changed = if schedule.is_some() {
        watch_cluster_version(&settings, stop.clone())
    } else {
        std::sync::Arc::new(tokio::sync::Notify::new())
    };
    tracing::info!(
        schedule = %schedule.as_ref().map(|s| s.describe()).unwrap_or_else(|| "none".into()),
        drills = %drills.as_ref().map(|s| s.describe()).unwrap_or_else(|| "none".into()),
        node = %settings.node_name, "daemon started"
    );
    let mut next_drill = drills.as_ref().and_then(|d| d.next_at(Utc::now()));
    let mut next_import = tokio::time::Instant::now();

    // Sets a previous daemon could not deliver are retried right away.
    let mut delivery_backoff = settings.delivery.retry_interval.0;
    let mut next_delivery =
        (crate::delivery::pending(&settings.snapshot.staging_dir).0 > 0).then(tokio::time::Instant::now);
    let mut after = Utc::now();
    // Checked at start (an upgrade may have completed while the daemon was down), then every
    // UPGRADE_POLL while idle.
    let mut next_upgrade_check = tokio::time::Instant::now();
    loop {
        let slot = match &schedule {
            Some(s) => Some(
                s.next_slot(after, &seed)
                    .ok_or_else(|| anyhow::anyhow!("schedule {} has no next run", s.describe()))?,
            ),
            None => None,
        };
        let staging = settings.snapshot.staging_dir.clone();
        let mut state = State::load(&staging);
        state.next_run = slot.map(|s| s.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        let _ = crate::staging::prepare_staging(&staging).and_then(|_| state.save(&staging));
        let (pending_sets, _) = crate::delivery::pending(&staging);
        let idle = format!(
            "idle; next run {}; {}{}",
            slot.map(|s| format!("{} UTC", s.at.format("%Y-%m-%d %H:%M:%S")))
                .unwrap_or_else(|| "none".into()),
            last_summary(&staging),
            if pending_sets > 0 {
                format!("; {pending_sets} set(s) pending delivery")
            } else {
                String::new()
            }
        );
        notify::status(&idle);
        crate::metrics::refresh(&settings);
        if let Some(slot) = slot {
            tracing::info!(next_run = %slot.at, start = %slot.start, "waiting for the next run");
        }

        // Sleep until the slot, waking for SIGHUP, SIGTERM and upgrade checks.
        let wake = loop {
            if schedule.is_some()
                && settings.schedule.after_upgrade
                && tokio::time::Instant::now() >= next_upgrade_check
            {
                next_upgrade_check = tokio::time::Instant::now() + UPGRADE_POLL;
                if let Some(version) = pending_upgrade(&settings).await {
                    break Wake::Upgrade(version);
                }
            }
            let until = match slot {
                Some(slot) => (slot.start - Utc::now()).to_std().unwrap_or(Duration::ZERO),
                None => Duration::MAX,
            };
            if until.is_zero() {
                break Wake::Slot;
            }
            let to_import = if settings.import.dirs.is_empty() {
                Duration::MAX
            } else if tokio::time::Instant::now() >= next_import {
                break Wake::Import;
            } else {
                next_import.saturating_duration_since(tokio::time::Instant::now())
            };
            let to_drill = match next_drill {
                Some(at) if at <= Utc::now() => break Wake::Drill,
                Some(at) => (at - Utc::now()).to_std().unwrap_or(Duration::ZERO),
                None => Duration::MAX,
            };
            let to_delivery = match next_delivery {
                Some(at) if tokio::time::Instant::now() >= at => break Wake::Deliver,
                Some(at) => at.saturating_duration_since(tokio::time::Instant::now()),
                None => Duration::MAX,
            };
            tokio::select! {
                _ = tokio::time::sleep(until.min(UPGRADE_POLL).min(to_delivery).min(to_drill).min(to_import)) => {}
                _ = cv_changed.notified() => {
                    // Checked right away on the next turn of this loop.
                    next_upgrade_check = tokio::time::Instant::now();
                }
                _ = hup.recv() => break Wake::Reload,
                _ = stop.cancelled() => break Wake::Stop,
            }
        };
        let (trigger, run) = match wake {
            Wake::Stop => break,
            Wake::Reload => {
                notify::reloading();
                match Settings::load(&config).and_then(|s| s.check_node_files().map(|_| s)) {
                    Ok(s) => match schedule_of(&s).and_then(|sch| Ok((sch, drill_schedule_of(&s)?))) {
                        Ok((sch, dr)) => {
                            tracing::info!("configuration reloaded");
                            settings = s;
                            schedule = sch;
                            next_drill = dr.as_ref().and_then(|d| d.next_at(Utc::now()));
                            drills = dr;
                            crate::priority::apply(&settings.priority);
                            // A new schedule starts from now: no run in the past is made up.
                            after = after.max(Utc::now());
                        }
                        Err(e) => {
                            tracing::error!(error = %crate::error::one_line(&e), "new configuration rejected; keeping the old one")
                        }
                    },
                    Err(e) => tracing::error!(error = %e, "new configuration rejected; keeping the old one"),
                }
                notify::ready("reloaded");
                continue;
            }
            Wake::Import => {
                next_import = tokio::time::Instant::now() + IMPORT_POLL;
                let cluster = settings.cluster_name.clone().unwrap_or_else(|| seed.clone());
                if cluster.is_empty() {
                    tracing::warn!("import.dirs needs cluster_name on a host that takes no backups");
                } else if let Err(e) = crate::import::run(&settings, &cluster, &stop).await {
                    tracing::error!(error = %crate::error::one_line(&e), "cannot import platform backup sets");
                }
                // Sets still owed to a target are retried by the delivery timer.
                if crate::delivery::pending(&settings.snapshot.staging_dir).0 > 0 && next_delivery.is_none() {
                    next_delivery = Some(tokio::time::Instant::now() + delivery_backoff);
                }
                if stop.is_cancelled() {
                    break;
                }
                continue;
            }
            Wake::Drill => {
                notify::status("restore drill of the newest set");
                let located = match crate::config::read_identity(
                    settings.verify.identity_file.as_deref(),
                    "verify.identity_file",
                ) {
                    Ok(identity) => crate::restore::locate(&settings, None, "latest").await.map(|mut l| {
                        l.identity = identity;
                        l
                    }),
                    Err(e) => Err(e),
                };
                let (id, result) = match located {
                    Ok(l) => (
                        l.manifest.id.clone(),
                        tokio::select! {
                            r = crate::restore::drill(&settings, &l) => r,
                            _ = stop.cancelled() => Err(anyhow::anyhow!("stopped during the drill")),
                        },
                    ),
                    Err(e) => ("latest".to_string(), Err(e)),
                };
                runner::remember_drill(&settings, &id, &result);
                next_drill = drills.as_ref().and_then(|d| d.next_at(Utc::now()));
                if stop.is_cancelled() {
                    break;
                }
                continue;
            }
            Wake::Deliver => {
                notify::status("delivering pending backup sets");
                let retried = crate::delivery::retry(&settings, &stop).await;
                if let Ok(r) = &retried {
                    runner::settle_after_retry(&settings, &r.settled).await;
                }
                next_delivery = match retried {
                    Ok(r) if r.pending == 0 => {
                        tracing::info!(delivered = r.delivered, "every pending backup set is delivered");
                        delivery_backoff = settings.delivery.retry_interval.0;
                        None
                    }
                    Ok(r) => {
                        if !r.busy {
                            delivery_backoff = (delivery_backoff * 2).min(settings.delivery.retry_max.0);
                        }
                        tracing::warn!(
                            delivered = r.delivered,
                            failed = r.failed,
                            pending = r.pending,
                            retry_in_s = delivery_backoff.as_secs(),
                            "backup sets still pending delivery"
                        );
                        Some(tokio::time::Instant::now() + delivery_backoff)
                    }
                    Err(e) => {
                        tracing::error!(error = %crate::error::one_line(&e), "cannot retry pending deliveries");
                        Some(tokio::time::Instant::now() + delivery_backoff)
                    }
                };
                if stop.is_cancelled() {
                    break;
                }
                continue;
            }
            Wake::Upgrade(version) => (Trigger::AfterUpgrade, format!("upgrade-{version}")),
            Wake::Slot => match slot {
                Some(slot) => (Trigger::Schedule, crate::election::run_key(slot.at)),
                None => continue,
            },
        };

        notify::status(&format!("running {run}: guards, election, backup"));
        let mut st = State::load(&staging);
        st.running = Some(run.clone());
        let _ = st.save(&staging);
        crate::metrics::refresh(&settings);
        let (started, t0) = (Utc::now(), Instant::now());
        let outcome = runner::run_once(
            &settings,
            trigger,
            None,
            &run,
            settings.election.enabled,
            false,
            WAIT_FOR_HOLDER,
            &stop,
        )
        .await;
        log_outcome(&run, &outcome, t0);
        if trigger == Trigger::AfterUpgrade && !matches!(outcome, Ok(Outcome::Ran(_) | Outcome::Elsewhere(_))) {
            // A skipped or failed after-upgrade backup is tried again, but not every 30 s.
            next_upgrade_check = tokio::time::Instant::now() + UPGRADE_RETRY;
        }
        let upgrade_skipped = trigger == Trigger::AfterUpgrade && matches!(outcome, Ok(Outcome::Skipped(_)));
        // A skipped after-upgrade attempt is logged, but kept out of the history of runs.
        if !upgrade_skipped {
            runner::remember(&staging, runner::record(trigger, &run, started, t0, &outcome));
            crate::metrics::refresh(&settings);
        }
        if let Some(version) = run.strip_prefix("upgrade-")
            && matches!(outcome, Ok(Outcome::Ran(_) | Outcome::Elsewhere(_)))
        {
            let mut state = State::load(&staging);
            if !state.upgrades_done.iter().any(|v| v == version) {
                state.upgrades_done.push(version.to_string());
                let _ = state.save(&staging);
            }
        }
        // A run's own delivery pass covered older pending sets too; what is left waits for
        // the timer, starting again from the shortest interval.
        delivery_backoff = settings.delivery.retry_interval.0;
        next_delivery =
            (crate::delivery::pending(&staging).0 > 0).then(|| tokio::time::Instant::now() + delivery_backoff);
        if trigger == Trigger::Schedule
            && let Some(slot) = slot
        {
            // The next slot is computed from now: a run is never made up twice, never overlaps.
            after = slot.at.max(Utc::now());
        }
        if stop.is_cancelled() {
            break;
        }
    }
    notify::stopping();
    tracing::info!("daemon stopped");
    Ok(())
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

enum Wake {
    Slot,
    Import,
    Deliver,
    Drill,
    Upgrade(String),
    Reload,
    Stop,
}

/// Watches the ClusterVersion key and signals each change, reconnecting as needed; the
/// 30-second poll stays as the fallback.
fn watch_cluster_version(settings: &Settings, stop: CancellationToken) -> std::sync::Arc<tokio::sync::Notify> {
    let changed = std::sync::Arc::new(tokio::sync::Notify::new());
    let signal = changed.clone();
    let etcd_settings = settings.etcd.clone();
    tokio::spawn(async move {
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
    let run = format!("upgrade-{version}");
    let state = State::load(&settings.snapshot.staging_dir);
    // Once per cluster and version: the election marker covers the cluster for 7 days, the
    // node's list of done upgrades for ever.
    if state.upgrades_done.contains(&version)
        || state
            .runs
            .iter()
            .any(|r| r.run == run && crate::state::RunResult::parse(&r.result).is_some_and(|x| x.took_a_set()))
    {
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
            tracing::error!(
                message_id = crate::notify::MESSAGE_ID_FAILED, run, backup_id = %r.manifest.id, seconds,
                stored_targets = %stored.join(","), failed_targets = %missing.join(","),
                "backup not stored on every target; it waits in staging for the others"
            )
        }
        Ok(Outcome::Skipped(reason)) => {
            tracing::warn!(message_id = crate::notify::MESSAGE_ID_SKIPPED, run, reason = %reason, "backup skipped")
        }
        Ok(Outcome::Elsewhere(rec)) => {
            tracing::info!(run, node = %rec.node, result = %rec.result, "another node ran this backup")
        }
        Err(e) => match crate::error::skip_reason(e) {
            Some(reason) => {
                tracing::warn!(message_id = crate::notify::MESSAGE_ID_SKIPPED, run, reason = %reason, "backup skipped")
            }
            None => tracing::error!(
                message_id = crate::notify::MESSAGE_ID_FAILED, run, seconds, error = %crate::error::one_line(e), "backup failed"
            ),
        },
    }
}
