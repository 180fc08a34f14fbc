//! The command line (PRODUCT.md's table) and what each command does. `--config` and `-v` are
//! global, so they work before or after the subcommand.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use crate::config::{self, Settings};
use crate::error::Stop;
use crate::manifest::Trigger;
use crate::pipeline::BackupReport;
use crate::runner;
use crate::targets;

#[derive(Debug, Parser)]
#[command(
    name = "etcd-backupd",
    version,
    about = "Scheduled, verified, off-cluster etcd backups"
)]
pub struct Cli {
    /// Main configuration file; drop-ins are read from config.d/ beside it.
    #[arg(long, global = true, value_name = "PATH", default_value = config::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run as the systemd service.
    Daemon,
    /// Take one backup now.
    Backup {
        /// Skip the election (an operator at the console).
        #[arg(long)]
        no_election: bool,
        /// Store on this target only.
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
    },
    /// List the backup sets on a target.
    List {
        #[arg(long)]
        json: bool,
        /// The target to list (default: the first).
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
    },
    /// Download and verify one set, ready for the restore script.
    Fetch {
        id: String,
        #[arg(long, value_name = "DIR")]
        to: Option<PathBuf>,
        #[arg(long)]
        allow_version_mismatch: bool,
        #[arg(long)]
        force: bool,
    },
    /// Verify a stored set without keeping it.
    Verify {
        id: String,
        #[arg(long)]
        deep: bool,
    },
    /// Apply retention now.
    Prune {
        #[arg(long)]
        dry_run: bool,
    },
    /// Last run, next run, current runner, pending uploads.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration and print the merged result.
    CheckConfig {
        /// Also connect to etcd and check each target.
        #[arg(long)]
        connect: bool,
    },
    /// Print deployment objects.
    Render {
        #[command(subcommand)]
        what: RenderWhat,
    },
}

#[derive(Debug, Subcommand)]
pub enum RenderWhat {
    /// A MachineConfig rolling the daemon out to control-plane nodes.
    Machineconfig,
}

fn load(cli: &Cli) -> Result<Settings> {
    let settings = Settings::load(&cli.config)?;
    settings.check_node_files()?;
    Ok(settings)
}

/// Runs the parsed command; the returned error carries its exit code (see [`crate::error`]).
pub async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Backup { no_election, target } => {
            let settings = load(&cli)?;
            crate::priority::apply(&settings.priority);
            let cancel = crate::daemon::cancel_on_signals();
            // A manual run competes like a scheduled one, but does not wait: if another node
            // holds the lock, this one is skipped.
            let run = format!(
                "manual-{}-{}",
                settings.node_name,
                crate::manifest::timestamp(chrono::Utc::now())
            );
            let elect = settings.election.enabled && !no_election;
            let (started, t0) = (chrono::Utc::now(), std::time::Instant::now());
            let outcome = runner::run_once(
                &settings,
                Trigger::Manual,
                target.clone(),
                &run,
                elect,
                std::time::Duration::ZERO,
                &cancel,
            )
            .await;
            runner::remember(
                &settings.snapshot.staging_dir,
                runner::record(Trigger::Manual, &run, started, t0, &outcome),
            );
            match outcome? {
                runner::Outcome::Ran(report) => {
                    print_backup_summary(&report)?;
                    if !report.all_stored() {
                        let failed: Vec<String> = report
                            .targets
                            .iter()
                            .filter_map(|t| t.result.as_ref().err().map(|e| format!("{} ({e})", t.name)))
                            .collect();
                        bail!(
                            "backup {} was not stored on: {} (it stays in staging and is delivered by the next run or the daemon)",
                            report.manifest.id,
                            failed.join("; ")
                        );
                    }
                    Ok(())
                }
                runner::Outcome::Skipped(reason) => bail!(Stop::Skipped(reason)),
                runner::Outcome::Elsewhere(rec) => bail!(Stop::Skipped(format!("node {} ran this backup", rec.node))),
            }
        }
        Command::List { json, target } => {
            let settings = load(&cli)?;
            list(&settings, target.as_deref(), *json).await
        }
        Command::CheckConfig { connect } => {
            let settings = load(&cli)?;
            check_config(&settings, *connect).await
        }
        Command::Daemon => {
            let settings = load(&cli)?;
            crate::daemon::run(cli.config.clone(), settings).await
        }
        Command::Fetch { .. } => bail!(Stop::NotImplemented("fetch".into())),
        Command::Verify { .. } => bail!(Stop::NotImplemented("verify".into())),
        Command::Prune { .. } => bail!(Stop::NotImplemented("prune".into())),
        Command::Status { json } => {
            let settings = Settings::load(&cli.config)?;
            status(&settings, *json).await
        }
        Command::Render { .. } => bail!(Stop::NotImplemented("render machineconfig".into())),
    }
}

fn human(bytes: u64) -> String {
    config::types::Size(bytes).to_string()
}

fn print_backup_summary(r: &BackupReport) -> Result<()> {
    let m = &r.manifest;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "backup {} of cluster {} taken in {:.1}s",
        m.id,
        m.cluster_name,
        r.duration.as_secs_f64()
    )?;
    writeln!(
        out,
        "  etcd      {} (member {}, etcd {}, revision {})",
        m.etcd.endpoint, m.etcd.member_id, m.etcd.version, m.etcd.revision
    )?;
    for f in &m.files {
        writeln!(
            out,
            "  file      {}  {}  sha256 {}",
            f.stored_name,
            human(f.stored_size),
            f.sha256
        )?;
    }
    let secs = r.snapshot_duration.as_secs_f64().max(1e-3);
    if let Some(s) = m.snapshot() {
        writeln!(
            out,
            "  snapshot  {:.1}s, {}/s, trailer verified",
            secs,
            human((s.size as f64 / secs) as u64)
        )?;
    }
    for t in &r.targets {
        match &t.result {
            Ok(()) => writeln!(out, "  target    {}: stored at {}", t.name, t.location)?,
            Err(e) => writeln!(out, "  target    {}: FAILED: {e}", t.name)?,
        }
    }
    Ok(())
}

async fn list(settings: &Settings, target: Option<&str>, json: bool) -> Result<()> {
    let t = match target {
        Some(name) => settings
            .target(name)
            .ok_or_else(|| Stop::Usage(format!("--target {name:?}: no such target")))?,
        None => &settings.targets[0],
    };
    let target = targets::open(t, None)?;
    let sets = target.list_sets(settings.cluster_name.as_deref()).await?;
    let mut out = std::io::stdout().lock();
    if json {
        let v: Vec<_> = sets
            .iter()
            .map(|s| serde_json::json!({"cluster": s.cluster, "manifest": s.manifest}))
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<20} {:<18} {:<20} {:<12} {:>10} {:>10} {:<16} TRIGGER",
        "CLUSTER", "ID", "CREATED", "VERSION", "REVISION", "SIZE", "NODE"
    )?;
    for s in &sets {
        let m = &s.manifest;
        let version = m
            .openshift
            .as_ref()
            .and_then(|o| o.version.clone())
            .unwrap_or_else(|| format!("etcd-{}", m.etcd.version));
        writeln!(
            out,
            "{:<20} {:<18} {:<20} {:<12} {:>10} {:>10} {:<16} {}",
            s.cluster,
            m.id,
            m.created,
            version,
            m.etcd.revision,
            human(m.total_stored_size()),
            m.node,
            serde_json::to_value(m.trigger)?.as_str().unwrap_or_default()
        )?;
    }
    if sets.is_empty() {
        eprintln!("no complete backup sets on target '{}'", t.name);
    }
    Ok(())
}

async fn check_config(settings: &Settings, connect: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "# etcd-backupd configuration, merged from:")?;
    for f in &settings.files {
        writeln!(out, "#   {}", f.display())?;
    }
    writeln!(out, "# secrets are read from the *_file paths below and never printed")?;
    writeln!(out, "{}", toml::to_string(settings)?)?;
    drop(out);
    if !connect {
        return Ok(());
    }
    // Every check runs and reports, so one failure does not hide the others.
    let mut failed = Vec::new();
    match crate::etcd::connect_first(&settings.etcd).await {
        Ok((member, status)) => println!(
            "ok: etcd {} answers: member {}, cluster {}, etcd {}, DB {}",
            member.shown(),
            crate::etcd::hex_id(status.member_id),
            crate::etcd::hex_id(status.cluster_id),
            status.version,
            human(status.db_size)
        ),
        Err(e) => {
            println!("FAILED: etcd: {}", crate::error::one_line(&e));
            failed.push("etcd".to_string());
        }
    }
    for t in &settings.targets {
        let checked = async {
            let target = targets::open(t, None)?;
            println!("target '{}': {}", t.name, target.route());
            target.preflight().await?;
            target.list_sets(settings.cluster_name.as_deref()).await
        }
        .await;
        match checked {
            Ok(sets) => println!(
                "ok: target '{}' answers and holds {} complete set(s)",
                t.name,
                sets.len()
            ),
            Err(e) => {
                println!("FAILED: target '{}': {}", t.name, crate::error::one_line(&e));
                failed.push(format!("target '{}'", t.name));
            }
        }
    }
    if !failed.is_empty() {
        bail!("check-config --connect: {} failed", failed.join(", "));
    }
    Ok(())
}

/// `status`: this node's runs from its state file (works with the daemon stopped), the next
/// scheduled run, and, when etcd answers, the cluster's current runner and last run.
async fn status(settings: &Settings, json: bool) -> Result<()> {
    let state = crate::state::State::load(&settings.snapshot.staging_dir);
    let schedule = crate::schedule::Schedule::new(
        &settings.schedule.cron,
        &settings.schedule.timezone,
        settings.schedule.jitter.0,
    )
    .map_err(|e| Stop::Usage(format!("schedule: {e}")))?;
    let next = schedule
        .next_at(chrono::Utc::now())
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    let cluster = async {
        let (member, _) = crate::etcd::connect_first(&settings.etcd).await?;
        let mut e = crate::election::Election::new(
            member.client.clone(),
            &settings.election.prefix,
            &settings.node_name,
            settings.election.lease_ttl.0,
            settings.etcd.request_timeout.0,
        );
        Ok::<_, anyhow::Error>((e.last().await?, e.runner().await?))
    };
    let (last, runner, etcd_error) = match tokio::time::timeout(
        settings.etcd.connect_timeout.0 + settings.etcd.request_timeout.0,
        cluster,
    )
    .await
    {
        Ok(Ok((last, runner))) => (last, runner, None),
        Ok(Err(e)) => (None, None, Some(crate::error::one_line(&e))),
        Err(_) => (None, None, Some("etcd did not answer in time".to_string())),
    };
    let staged = crate::delivery::scan(&settings.snapshot.staging_dir);
    let pending: Vec<_> = staged
        .iter()
        .filter(|s| !s.pending.is_empty())
        .map(|s| serde_json::json!({"id": s.id(), "targets": s.pending, "bytes": s.set.manifest.total_stored_size()}))
        .collect();
    let local: Vec<&str> = staged.iter().filter(|s| s.pending.is_empty()).map(|s| s.id()).collect();
    if json {
        let v = serde_json::json!({
            "node": settings.node_name,
            "next_run": next,
            "pending": pending,
            "local_copies": local,
            "runs": state.runs,
            "cluster_last_run": last,
            "current_runner": runner,
            "etcd_error": etcd_error,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("node        {}", settings.node_name);
    println!(
        "schedule    {}; next run {}",
        schedule.describe(),
        next.as_deref().unwrap_or("none")
    );
    match &runner {
        Some(r) => println!("running     {r}"),
        None if etcd_error.is_none() => println!("running     nothing"),
        None => {}
    }
    match &last {
        Some(r) => println!(
            "cluster     last run {} by {}: {}{}",
            r.run,
            r.node,
            r.result,
            r.id.as_ref().map(|i| format!(", set {i}")).unwrap_or_default()
        ),
        None if etcd_error.is_none() => println!("cluster     no run recorded yet"),
        None => {}
    }
    if let Some(e) = &etcd_error {
        println!("cluster     unknown: {e}");
    }
    if let Some(r) = &state.running {
        println!("this node   running {r}");
    }
    if pending.is_empty() {
        println!("pending     none");
    }
    for s in staged.iter().filter(|s| !s.pending.is_empty()) {
        println!(
            "pending     {} ({}) for {}",
            s.id(),
            human(s.set.manifest.total_stored_size()),
            s.pending.join(", ")
        );
    }
    if !local.is_empty() {
        println!("local copy  {}", local.join(", "));
    }
    if state.runs.is_empty() {
        println!("this node   no run yet");
    }
    for r in state.runs.iter().take(5) {
        let size = r.bytes.map(|b| format!(", {}", human(b))).unwrap_or_default();
        let why = r.reason.as_ref().map(|x| format!(": {x}")).unwrap_or_default();
        println!(
            "this node   {} {} {}{}{} ({:.1} s){}",
            r.started,
            r.trigger,
            r.result,
            r.id.as_ref().map(|i| format!(" {i}")).unwrap_or_default(),
            size,
            r.duration_s,
            why
        );
    }
    Ok(())
}
