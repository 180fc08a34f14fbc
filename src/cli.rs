//! The command line (PRODUCT.md's table) and what each command does. `--config` and `-v` are
//! global, so they work before or after the subcommand.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use crate::config::{self, Settings};

/// `println!` that returns a failed write instead of panicking: a reader that quit early
/// (`| head`) ends the command quietly (see `error::is_closed_stdout`).
macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*)?
    };
}

/// `eprintln!` that never panics: stderr may be a pipe whose reader quit too.
macro_rules! errln {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}
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
        /// Back up despite the cluster-age, upgrade and operator guards (recorded in the
        /// manifest); etcd's health, its alarms, free space and the election still apply.
        #[arg(long)]
        force: bool,
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
        /// A set id (see `list`) or `latest`.
        id: String,
        /// Where to put the files; must be empty or missing.
        #[arg(long, value_name = "DIR", default_value = crate::restore::DEFAULT_FETCH_DIR)]
        to: PathBuf,
        /// Fetch even when the set's OpenShift version differs from the running cluster's.
        #[arg(long)]
        allow_version_mismatch: bool,
        /// Fetch even when verify.allowed_signers is set and the set is unsigned or not
        /// signed by a listed key.
        #[arg(long)]
        allow_unsigned: bool,
        /// Fetch even when the certificates in the set's static resources have expired.
        #[arg(long)]
        allow_expired_certificates: bool,
        /// Accept a non-empty DIR, removing the snapshot*.db and static_kuberesources*.tar.gz in it.
        #[arg(long)]
        force: bool,
        /// age identity file (private key) for an encrypted set; must not be group/other readable.
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
        /// The target to read (default: the first).
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
    },
    /// Verify a stored set without keeping it.
    Verify {
        /// A set id (see `list`) or `latest`.
        id: String,
        /// Also restore it into a throwaway etcd on loopback (a restore drill).
        #[arg(long)]
        deep: bool,
        /// Verify even when verify.allowed_signers is set and the set is unsigned or not
        /// signed by a listed key.
        #[arg(long)]
        allow_unsigned: bool,
        /// age identity file (private key) for an encrypted set; must not be group/other readable.
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
        /// The target to read (default: the first).
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Apply retention now.
    Prune {
        /// Print the plan, delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Prune even though this node's newest backup failed or was skipped.
        #[arg(long)]
        force: bool,
        /// Only this target (default: every target).
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
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
    Machineconfig {
        /// The image the install unit copies the binary from (best pinned by digest).
        #[arg(long, value_name = "REF")]
        image: Option<String>,
        /// Ignition spec version of the embedded config.
        #[arg(long, value_name = "X.Y.Z", default_value = crate::render::DEFAULT_IGNITION)]
        ignition_version: String,
        /// Also embed the secret files the configuration names (readable by cluster admins).
        #[arg(long)]
        include_secrets: bool,
        /// The MachineConfig's name.
        #[arg(long, default_value = "99-master-etcd-backupd")]
        name: String,
    },
}

fn load(cli: &Cli) -> Result<Settings> {
    let settings = Settings::load(&cli.config)?;
    settings.check_node_files()?;
    Ok(settings)
}

/// Runs the parsed command; the returned error carries its exit code (see [`crate::error`]).
pub async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Backup {
            no_election,
            target,
            force,
        } => {
            let settings = load(&cli)?;
            // A staging directory that is not ours is a configuration error, found before etcd.
            crate::staging::check_staging(&settings.snapshot.staging_dir)?;
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
                *force,
                std::time::Duration::ZERO,
                None,
                &cancel,
            )
            .await;
            runner::remember(
                &settings.snapshot.staging_dir,
                runner::record(Trigger::Manual, &run, started, t0, &outcome),
            );
            crate::metrics::refresh(&settings);
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
                runner::Outcome::Elsewhere(rec) => bail!(Stop::Skipped(crate::outcome::Skip::new(
                    crate::outcome::SkipKind::Elsewhere,
                    format!("node {} ran this backup", rec.node)
                ))),
            }
        }
        Command::List { json, target } => {
            let settings = load(&cli)?;
            list(&settings, target.as_deref(), *json).await
        }
        Command::CheckConfig { connect } => {
            let settings = load(&cli)?;
            // Checked here and by the daemon when drills are scheduled; a backup never reads it.
            read_identity(settings.verify.identity_file.as_deref(), "verify.identity_file")?;
            check_config(&settings, *connect).await
        }
        Command::Daemon => {
            let settings = load(&cli)?;
            if !settings.verify.schedule.is_empty() {
                read_identity(settings.verify.identity_file.as_deref(), "verify.identity_file")?;
            }
            crate::daemon::run(cli.config.clone(), settings, crate::daemon::cancel_on_signals()).await
        }
        Command::Fetch {
            id,
            to,
            allow_version_mismatch,
            allow_unsigned,
            allow_expired_certificates,
            force,
            target,
            identity,
        } => {
            let settings = load(&cli)?;
            let identity = read_identity(identity.as_deref(), "--identity")?;
            let allow = Allow {
                version_mismatch: *allow_version_mismatch,
                unsigned: *allow_unsigned,
                expired_certificates: *allow_expired_certificates,
            };
            fetch(&settings, id, to, allow, *force, target.as_deref(), identity).await
        }
        Command::Verify {
            id,
            deep,
            allow_unsigned,
            target,
            json,
            identity,
        } => {
            let settings = load(&cli)?;
            let identity = match identity {
                Some(p) => read_identity(Some(p), "--identity")?,
                None => read_identity(settings.verify.identity_file.as_deref(), "verify.identity_file")?,
            };
            verify(
                &settings,
                id,
                *deep,
                *allow_unsigned,
                target.as_deref(),
                *json,
                identity,
            )
            .await
        }
        Command::Prune { dry_run, force, target } => {
            let settings = load(&cli)?;
            prune(&settings, *dry_run, *force, target.as_deref()).await
        }
        Command::Status { json } => {
            let settings = Settings::load(&cli.config)?;
            status(&settings, *json).await
        }
        Command::Render {
            what:
                RenderWhat::Machineconfig {
                    image,
                    ignition_version,
                    include_secrets,
                    name,
                },
        } => {
            // Syntax and meaning only: the node-side paths it names need not exist here.
            let settings = Settings::load(&cli.config)?;
            let opts = crate::render::Options {
                ignition_version,
                image: image.as_deref(),
                include_secrets: *include_secrets,
                name,
            };
            let (yaml, warnings) = crate::render::machineconfig(&settings, &opts)?;
            for w in warnings {
                errln!("warning: {w}");
            }
            std::io::stdout().lock().write_all(yaml.as_bytes())?;
            Ok(())
        }
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
    for reason in &m.forced {
        writeln!(out, "  forced    {reason}")?;
    }
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
    // Damaged sets too, as rows marked DAMAGED.
    let sets = target.list_all_sets(settings.cluster_name.as_deref()).await?;
    // What retention would do with each set, per cluster folder, as of now.
    let mut reasons = std::collections::HashMap::new();
    let clusters: std::collections::BTreeSet<&str> = sets.iter().map(|s| s.cluster.as_str()).collect();
    for c in clusters {
        let policy = settings.retention_policy();
        for d in crate::retention::plan_listed(&sets, c, &policy, chrono::Utc::now(), settings.time_zone()) {
            reasons.insert((c.to_string(), d.id.clone()), d);
        }
    }
    // What each set's signature says (against verify.allowed_signers when set), a few sets
    // at a time.
    let allowed = crate::restore::Trust::of(settings)?.allowed;
    let verdicts: Vec<Option<crate::signing::Verdict>> = {
        use futures_util::StreamExt;
        let (target, allowed) = (target.as_ref(), allowed.as_ref());
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
    let now = chrono::Utc::now();
    let reason_of = |s: &targets::ListedSet| {
        let reason = reasons
            .get(&(s.cluster.clone(), s.manifest.id.clone()))
            .map(|d| d.summary())
            .unwrap_or_else(|| "keep: not counted (other cluster in its manifest)".into());
        match &s.damaged {
            Some(what) => format!("DAMAGED: {what}; {reason}"),
            None => reason,
        }
    };
    let mut out = std::io::stdout().lock();
    if json {
        let v: Vec<_> = sets
            .iter()
            .zip(&verdicts)
            .map(|(s, sig)| {
                let d = reasons.get(&(s.cluster.clone(), s.manifest.id.clone()));
                let sig = sig.as_ref().map(|v| serde_json::json!({"state": v.state(), "fingerprint": v.fingerprint()}));
                let expired = s.manifest.restorable_until().map(|t| t <= now);
                serde_json::json!({"cluster": s.cluster, "manifest": s.manifest, "damaged": s.damaged, "retention": d, "signature": sig, "certificates_expired": expired})
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<20} {:<18} {:<20} {:<12} {:>10} {:>10} {:<16} {:<13} {:<19} {:<58} RETENTION",
        "CLUSTER", "ID", "CREATED", "VERSION", "REVISION", "SIZE", "NODE", "TRIGGER", "RESTORABLE", "SIGNED"
    )?;
    for (s, sig) in sets.iter().zip(&verdicts) {
        let m = &s.manifest;
        let version = m
            .openshift
            .as_ref()
            .and_then(|o| o.version.clone())
            .unwrap_or_else(|| format!("etcd-{}", m.etcd.version));
        writeln!(
            out,
            "{:<20} {:<18} {:<20} {:<12} {:>10} {:>10} {:<16} {:<13} {:<19} {:<58} {}",
            s.cluster,
            m.id,
            m.created,
            version,
            m.etcd.revision,
            human(m.total_stored_size()),
            m.node,
            // A set taken despite a guard says so where the trigger is.
            format!(
                "{}{}",
                serde_json::to_value(m.trigger)?.as_str().unwrap_or_default(),
                if m.forced.is_empty() { "" } else { "+forced" }
            ),
            crate::certs::expiry(m, now).cell(),
            sig.as_ref()
                .map_or_else(|| "?".to_string(), crate::signing::Verdict::cell),
            reason_of(s)
        )?;
    }
    if sets.is_empty() {
        errln!("no complete backup sets on target '{}'", t.name);
    }
    Ok(())
}

use crate::config::read_identity;

/// What `fetch` is told to accept despite its checks.
#[derive(Debug, Clone, Copy)]
struct Allow {
    version_mismatch: bool,
    unsigned: bool,
    expired_certificates: bool,
}

async fn fetch(
    settings: &Settings,
    id: &str,
    dir: &std::path::Path,
    allow: Allow,
    force: bool,
    target: Option<&str>,
    identity: Option<String>,
) -> Result<()> {
    use crate::restore;
    let allow_version_mismatch = allow.version_mismatch;
    let mut located = restore::locate(settings, target, id).await?;
    located.identity = identity;
    located.trust.allow_unsigned = allow.unsigned;
    // Before anything of the set is believed or written: its signature, then its certificates.
    let signature = restore::check_signature(&located).await?;
    let m = &located.manifest;
    let now = chrono::Utc::now();
    let expiry = crate::certs::expiry(m, now);
    if let Some(why) = expiry.refusal() {
        if !allow.expired_certificates {
            bail!("refusing set {}: {why}", m.id);
        }
        tracing::warn!("set {}: {why}; fetching anyway (--allow-expired-certificates)", m.id);
    }
    if let Some(w) = expiry.warning(now) {
        tracing::warn!("set {}: {w}", m.id);
    }
    let set_version = m.openshift.as_ref().and_then(|o| o.version.clone());
    let mut version_rule = None;
    match restore::version_facts(settings).await {
        Ok(facts) => match restore::check_versions(set_version.as_deref(), &facts.unwrap_or_default()) {
            Ok(rule) => version_rule = rule,
            Err(why) => {
                if !allow_version_mismatch {
                    // A refusal of the set (not of the command line): exit 1, as for a damaged,
                    // unsigned or expired set.
                    bail!(
                        "refusing set {}: {why} (--allow-version-mismatch to fetch it anyway)",
                        m.id
                    );
                }
                tracing::warn!("{why}; fetching anyway (--allow-version-mismatch)");
            }
        },
        Err(e) => {
            if let Some(v) = &set_version {
                tracing::warn!(
                    "cannot read the running cluster's version ({}); restore this set only onto OpenShift {v}",
                    crate::error::one_line(&e)
                );
            }
        }
    }
    let removed = restore::prepare_fetch_dir(dir, force)?;
    for p in &removed {
        errln!("removed {} (--force)", p.display());
    }
    let files = restore::download(&located, dir).await?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "fetched set {} of cluster {} (taken {} on {}, {}) from target '{}'",
        m.id,
        located.cluster,
        m.created,
        m.node,
        set_version
            .as_deref()
            .map(|v| format!("OpenShift {v}"))
            .unwrap_or_else(|| format!("etcd {}", m.etcd.version)),
        located.target.name()
    )?;
    if let Some(rule) = &version_rule {
        writeln!(out, "  version check: {rule}")?;
    }
    writeln!(out, "  signature: {}", signature.describe())?;
    if let Some(line) = expiry.line() {
        writeln!(out, "  certificates: {line}")?;
    }
    for (c, path) in &files {
        writeln!(
            out,
            "  {}  {}  sha256 {}{}",
            path.display(),
            human(c.size),
            c.sha256,
            c.also.as_ref().map(|a| format!("; {a}")).unwrap_or_default()
        )?;
    }
    let snapshot = files
        .iter()
        .find(|(c, _)| c.name.starts_with("snapshot_"))
        .map(|(_, p)| p.display().to_string())
        .unwrap_or_default();
    // What the restore brings back, as the manifest recorded it.
    let revisions: Vec<String> = m
        .restore
        .static_pod_revisions
        .iter()
        .map(|(c, n)| format!("{c}-pod-{n}"))
        .collect();
    writeln!(
        out,
        "  restores: etcd {}{} at revision {}{}",
        m.etcd.version,
        m.etcd
            .storage_version
            .as_deref()
            .map(|v| format!(" (storage version {v})"))
            .unwrap_or_default(),
        m.etcd.revision,
        if revisions.is_empty() {
            String::new()
        } else {
            format!("; static pods {}", revisions.join(", "))
        }
    )?;
    if files.iter().any(|(c, _)| c.name.starts_with("static_kuberesources_")) {
        writeln!(
            out,
            "next: on the recovery control-plane host, as root, follow the platform's restore procedure:\n  sudo -E /usr/local/bin/cluster-restore.sh {}",
            dir.display()
        )?;
    } else {
        writeln!(
            out,
            "next: restore the snapshot into a new data directory for each member, e.g.\n  etcdutl snapshot restore {snapshot} --data-dir /var/lib/etcd-restored --name NAME --initial-cluster NAME=https://HOST:2380 --initial-advertise-peer-urls https://HOST:2380"
        )?;
    }
    Ok(())
}

async fn verify(
    settings: &Settings,
    id: &str,
    deep: bool,
    allow_unsigned: bool,
    target: Option<&str>,
    json: bool,
    identity: Option<String>,
) -> Result<()> {
    use crate::restore;
    let mut located = restore::locate(settings, target, id).await?;
    located.identity = identity;
    located.trust.allow_unsigned = allow_unsigned;
    let signature = restore::check_signature(&located).await?;
    let checked = restore::verify(&located).await?;
    let drill = if deep {
        let result = restore::drill(settings, &located).await;
        crate::runner::remember_drill(settings, &located.manifest.id, &result);
        Some(result?)
    } else {
        None
    };
    let m = &located.manifest;
    if json {
        let sig = serde_json::json!({"state": signature.state(), "fingerprint": signature.fingerprint()});
        let v = serde_json::json!({"id": m.id, "cluster": located.cluster, "target": located.target.name(), "files": checked, "drill": drill, "signature": sig, "restorable_until": m.restore.restorable_until});
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "set {} of cluster {} on target '{}': OK",
        m.id,
        located.cluster,
        located.target.name()
    )?;
    for c in &checked {
        writeln!(
            out,
            "  {}  {}  sha256 matches manifest and SHA256SUMS{}",
            c.name,
            human(c.size),
            c.also.as_ref().map(|a| format!("; {a}")).unwrap_or_default()
        )?;
    }
    writeln!(out, "  signature: {}", signature.describe())?;
    if let Some(line) = crate::certs::expiry(m, chrono::Utc::now()).line() {
        writeln!(out, "  certificates: {line}")?;
    }
    if let Some(d) = drill {
        writeln!(
            out,
            "  restore drill: etcd {} opened the restored snapshot in {:.1}s: revision {}, {} keys ({} under /kubernetes.io/, {} namespaces){}",
            d.etcd_version,
            d.seconds,
            d.revision,
            d.keys,
            d.kubernetes_keys,
            d.namespaces,
            d.cluster_version
                .as_ref()
                .map(|v| format!(", ClusterVersion {v}"))
                .unwrap_or_default()
        )?;
    }
    Ok(())
}

/// The cluster folder retention works on: `cluster_name`, or the etcd cluster ID.
async fn cluster_folder(settings: &Settings) -> Result<String> {
    if let Some(c) = &settings.cluster_name {
        return Ok(c.clone());
    }
    let within = settings.etcd.connect_timeout.0 + settings.etcd.request_timeout.0;
    match tokio::time::timeout(within, crate::etcd::connect_first(&settings.etcd)).await {
        Ok(Ok((_, status))) => Ok(crate::etcd::hex_id(status.cluster_id)),
        Ok(Err(e)) => bail!(Stop::Usage(format!(
            "cluster_name is not set and etcd cannot tell the cluster ID ({}); set cluster_name",
            crate::error::one_line(&e)
        ))),
        Err(_) => bail!(Stop::Usage(
            "cluster_name is not set and etcd did not answer in time; set cluster_name".into()
        )),
    }
}

async fn prune(settings: &Settings, dry_run: bool, force: bool, only: Option<&str>) -> Result<()> {
    let state = crate::state::State::load(&settings.snapshot.staging_dir);
    if let Some(r) = state.runs.first()
        && crate::state::RunResult::parse(&r.result).is_some_and(|x| {
            use crate::state::RunResult::*;
            matches!(x, Failed | Skipped | Partial | Pending)
        })
        && !force
        && !dry_run
    {
        bail!(Stop::Usage(format!(
            "this node's newest backup ({}) {}; retention deletes nothing until a backup succeeds (--force to prune anyway)",
            r.run, r.result
        )));
    }
    let cluster = cluster_folder(settings).await?;
    let policy = settings.retention_policy();
    let chosen: Vec<_> = match only {
        Some(name) => vec![
            settings
                .target(name)
                .ok_or_else(|| Stop::Usage(format!("--target {name:?}: no such target")))?,
        ],
        None => settings.targets.iter().collect(),
    };
    let mut failed = Vec::new();
    for t in chosen {
        let report = async {
            let target = targets::open(t, None)?;
            crate::retention::prune_target(
                target.as_ref(),
                &cluster,
                &settings.node_name,
                &policy,
                settings.time_zone(),
                dry_run,
            )
            .await
        }
        .await;
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                outln!("target '{}': FAILED: {}", t.name, crate::error::one_line(&e));
                failed.push(t.name.clone());
                continue;
            }
        };
        let verb = if dry_run { "would delete" } else { "deleted" };
        outln!(
            "target '{}', cluster {}: {} set(s), keep {}, {verb} {}",
            t.name,
            cluster,
            report.decisions.len(),
            report.decisions.iter().filter(|d| d.keep).count(),
            report.decisions.iter().filter(|d| !d.keep).count()
        );
        for d in &report.decisions {
            outln!("  {}  {}", d.id, d.summary());
        }
        if report.debris_removed > 0 {
            outln!("  removed {} incomplete upload(s)", report.debris_removed);
        }
        for e in &report.errors {
            outln!("  FAILED: {e}");
        }
        if !report.errors.is_empty() {
            failed.push(t.name.clone());
        }
    }
    if !failed.is_empty() {
        bail!("prune failed on: {}", failed.join(", "));
    }
    Ok(())
}

/// Everything `backup` checks before it touches the network, without changing anything, so
/// that a configuration `check-config` accepts is not refused by the first backup. Every
/// problem found is named; the exit code is 2.
fn offline_checks(settings: &Settings) -> Result<()> {
    let mut problems = Vec::new();
    let mut check = |r: Result<()>| {
        if let Err(e) = r {
            problems.push(crate::error::one_line(&e));
        }
    };
    check(crate::staging::check_staging(&settings.snapshot.staging_dir));
    check(crate::etcd::TlsMaterial::load(&settings.etcd).map(|_| ()));
    check(settings.seal().map(|_| ()));
    // A key not created yet is created by the daemon's first start or the next backup.
    if let Some(sg) = settings.signing.as_ref().filter(|s| s.key_file.exists()) {
        check(crate::signing::Signer::load(&sg.key_file).map(|_| ()));
    }
    check(crate::restore::Trust::of(settings).map(|_| ()));
    for t in &settings.targets {
        check(targets::open(t, None).map(|_| ()));
    }
    match settings.snapshot.method {
        config::SnapshotMethod::Native => {
            if let Some(dir) = &settings.snapshot.static_resources_dir
                && !dir.is_dir()
            {
                check(Err(anyhow::anyhow!(
                    "snapshot.static_resources_dir '{}' is not a directory (set it to \"\" on a cluster without static pods)",
                    dir.display()
                )));
            }
        }
        config::SnapshotMethod::Script => {
            let script = &settings.snapshot.script;
            let runnable = nix::unistd::access(script.as_path(), nix::unistd::AccessFlags::X_OK);
            if let Err(e) = runnable {
                check(Err(anyhow::anyhow!("snapshot.script '{}': {e}", script.display())));
            }
        }
    }
    match problems.len() {
        0 => Ok(()),
        _ => bail!(Stop::Usage(problems.join("; "))),
    }
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
    offline_checks(settings)?;
    // What is signed, and what readers require (as comments: the output stays TOML).
    match &settings.signing {
        Some(sg) if sg.key_file.exists() => {
            let k = crate::signing::Signer::load(&sg.key_file)?;
            outln!(
                "# signing: every set this node stores is signed with key {} ('{}')",
                k.fingerprint(),
                sg.key_file.display()
            );
        }
        Some(sg) => outln!(
            "# signing: every set this node stores is signed; its key '{}' is created on the daemon's first start (or the next backup)",
            sg.key_file.display()
        ),
        None => outln!("# signing: off: the sets this node stores are not signed"),
    }
    match crate::restore::Trust::of(settings)?.allowed {
        Some(a) => outln!(
            "# verify: fetch, verify and drills take only sets signed by one of the {} key(s) '{}' lists for {}",
            a.usable_keys(),
            a.path.display(),
            crate::signing::PRINCIPAL
        ),
        None => outln!("# verify: verify.allowed_signers is not set: signatures are shown, not required"),
    }
    if !connect {
        return Ok(());
    }
    // Every check runs and reports, so one failure does not hide the others.
    let mut failed = Vec::new();
    match crate::etcd::connect_first(&settings.etcd).await {
        Ok((member, status)) => outln!(
            "ok: etcd {} answers: member {}, cluster {}, etcd {}, DB {}",
            member.shown(),
            crate::etcd::hex_id(status.member_id),
            crate::etcd::hex_id(status.cluster_id),
            status.version,
            human(status.db_size)
        ),
        // A usage error (a loose key file) is the configuration's fault: exit 2 at once.
        Err(e) if e.downcast_ref::<Stop>().is_some_and(|s| matches!(s, Stop::Usage(_))) => return Err(e),
        Err(e) => {
            outln!("FAILED: etcd: {}", crate::error::one_line(&e));
            failed.push("etcd".to_string());
        }
    }
    for t in &settings.targets {
        let checked = async {
            // A check reports the first failure rather than waiting out the retry budget, and
            // gives the first answer connect_timeout and a few seconds.
            let once = t.single_attempt();
            let target = targets::open(&once, None)?;
            outln!("target '{}': {}", t.name, target.route());
            let within = t.connect_timeout.0 + std::time::Duration::from_secs(5);
            tokio::time::timeout(within, target.preflight())
                .await
                .map_err(|_| anyhow::anyhow!("no answer within {}", humantime::format_duration(within)))??;
            target.list_sets(settings.cluster_name.as_deref()).await
        }
        .await;
        match checked {
            Ok(sets) => outln!(
                "ok: target '{}' answers and holds {} complete set(s)",
                t.name,
                sets.len()
            ),
            Err(e) => {
                let line = crate::error::one_line(&e);
                let prefix = format!("target '{}': ", t.name);
                outln!("FAILED: {prefix}{}", line.strip_prefix(&prefix).unwrap_or(&line));
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
    let schedule = crate::daemon::schedule_of(settings).map_err(|e| Stop::Usage(e.to_string()))?;
    let next = schedule
        .as_ref()
        .and_then(|s| s.next_at(chrono::Utc::now()))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    let cluster = async {
        let (member, _) = crate::etcd::connect_first(&settings.etcd).await?;
        let mut e = crate::election::Election::of(member.client.clone(), settings);
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
    // Read only: the key is created by the daemon's start or the next backup.
    let signing = settings.signing.as_ref().map(|sg| match sg.key_file.exists() {
        true => crate::signing::Signer::load(&sg.key_file).map(Some),
        false => Ok(None),
    });
    if json {
        let signing = match &signing {
            None => serde_json::Value::Null,
            Some(r) => {
                let key = settings.signing.as_ref().map(|s| s.key_file.display().to_string());
                match r {
                    Ok(Some(k)) => {
                        serde_json::json!({"key_file": key, "fingerprint": k.fingerprint(), "allowed_signers": k.allowed_signers_line(&settings.node_name)})
                    }
                    Ok(None) => serde_json::json!({"key_file": key, "error": "not created yet"}),
                    Err(e) => serde_json::json!({"key_file": key, "error": crate::error::one_line(e)}),
                }
            }
        };
        let v = serde_json::json!({
            "node": settings.node_name,
            "signing": signing,
            "newest_set": state.newest_set,
            "next_run": next,
            "pending": pending,
            "local_copies": local,
            "last_drill": state.last_drill,
            "runs": state.runs,
            "cluster_last_run": last,
            "current_runner": runner,
            "etcd_error": etcd_error,
        });
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    outln!("node        {}", settings.node_name);
    if let (Some(sg), Some(r)) = (&settings.signing, &signing) {
        match r {
            Ok(Some(k)) => {
                outln!(
                    "signing     key {} in '{}'; its allowed_signers line:",
                    k.fingerprint(),
                    sg.key_file.display()
                );
                outln!("            {}", k.allowed_signers_line(&settings.node_name));
            }
            Ok(None) => outln!(
                "signing     key '{}' not created yet (the daemon's start or the next backup creates it)",
                sg.key_file.display()
            ),
            Err(e) => outln!("signing     UNUSABLE: {}", crate::error::one_line(e)),
        }
    }
    if let Some(n) = &state.newest_set {
        let until = n
            .restorable_until
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        match until {
            Some(t) => {
                let t = t.to_utc();
                let word = if t <= chrono::Utc::now() {
                    "certificates EXPIRED on"
                } else {
                    "restorable until"
                };
                outln!(
                    "newest set  {}: {word} {} ({})",
                    n.id,
                    crate::certs::when(&t),
                    n.restorable_until_source.as_deref().unwrap_or("?")
                );
            }
            None => outln!("newest set  {}: no certificates recorded", n.id),
        }
    }
    outln!(
        "schedule    {}; next run {}",
        schedule
            .as_ref()
            .map(|s| s.describe())
            .unwrap_or_else(|| "none (schedule.cron is empty)".into()),
        next.as_deref().unwrap_or("none")
    );
    match &runner {
        Some(r) => outln!("running     {r}"),
        None if etcd_error.is_none() => outln!("running     nothing"),
        None => {}
    }
    match &last {
        Some(r) => outln!(
            "cluster     last run {} by {}: {}{}",
            r.run,
            r.node,
            r.result,
            r.id.as_ref().map(|i| format!(", set {i}")).unwrap_or_default()
        ),
        None if etcd_error.is_none() => outln!("cluster     no run recorded yet"),
        None => {}
    }
    if let Some(e) = &etcd_error {
        outln!("cluster     unknown: {e}");
    }
    if let Some(r) = &state.running {
        outln!("this node   running {r}");
    }
    if pending.is_empty() {
        outln!("pending     none");
    }
    for s in staged.iter().filter(|s| !s.pending.is_empty()) {
        outln!(
            "pending     {} ({}) for {}",
            s.id(),
            human(s.set.manifest.total_stored_size()),
            s.pending.join(", ")
        );
    }
    if !local.is_empty() {
        outln!("local copy  {}", local.join(", "));
    }
    if let Some(d) = &state.last_drill {
        outln!(
            "drill       {} of {}: {}: {}",
            d.finished,
            d.id,
            if d.ok { "ok" } else { "FAILED" },
            d.summary
        );
    }
    if state.runs.is_empty() {
        outln!("this node   no run yet");
    }
    for r in state.runs.iter().take(5) {
        let size = r.bytes.map(|b| format!(", {}", human(b))).unwrap_or_default();
        let why = r.reason.as_ref().map(|x| format!(": {x}")).unwrap_or_default();
        outln!(
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
