//! The command line (PRODUCT.md's table) and what each command does. `--config` and `-v` are
//! global, so they work before or after the subcommand.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
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
mod backup;
mod check_config;
mod fetch;
pub mod generate;
mod list;
mod prune;
mod rebase;
pub mod render;
pub mod report;
mod status;

use crate::config::read_identity;

/// The texts of the `--identity` files, each checked as `read_identity` does.
/// The identities `--identity` gave (repeatable), else `verify.identity_file`'s, if set.
fn identities_or_configured(settings: &Settings, given: &[PathBuf]) -> Result<Vec<String>> {
    if given.is_empty() {
        return Ok(
            read_identity(settings.verify.identity_file.as_deref(), "verify.identity_file")?
                .into_iter()
                .collect(),
        );
    }
    read_identities(given)
}

fn read_identities(paths: &[PathBuf]) -> Result<Vec<String>> {
    let mut texts = Vec::new();
    for p in paths {
        texts.extend(read_identity(Some(p), "--identity")?);
    }
    Ok(texts)
}

/// `0.1.0 (commit 0123456789ab)`: the package version and the commit `build.rs` found.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("ETCD_BACKUPD_COMMIT"), ")");

#[derive(Debug, Parser)]
#[command(
    name = "etcd-backupd",
    version = VERSION,
    about = "Scheduled, verified, off-cluster etcd backups",
    // Our own `help`, so that `help --help` is that command's help instead of an error.
    disable_help_subcommand = true
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
        /// One JSON document on stdout (schema_version, ok, the set and each target's result).
        #[arg(long)]
        json: bool,
    },
    /// List the backup sets on a target.
    List {
        #[arg(long)]
        json: bool,
        /// The target to list (default: the first).
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
        /// List the sets of every configured target (a TARGET column says whose).
        #[arg(long, conflicts_with = "target")]
        all_targets: bool,
        /// Every detail: the time in schedule.timezone, certificate expiry, signing key,
        /// retention's reasons in full (wider than 120 columns).
        #[arg(long)]
        wide: bool,
    },
    /// Download and verify one set, ready for the restore script.
    Fetch(FetchArgs),
    /// Verify a stored set without keeping it.
    Verify {
        /// A set id (see `list`) or `latest`; not with --at.
        #[arg(required_unless_present = "at", conflicts_with = "at")]
        id: Option<String>,
        /// Also restore it into a throwaway etcd on loopback (a restore drill).
        #[arg(long)]
        deep: bool,
        /// Drill a restore to this moment (as `fetch --at`: an RFC 3339 time or rev:N): the
        /// set the journal reaches it from, rolled forward, restored and opened. Implies --deep.
        #[arg(long, value_name = "TIME|rev:N")]
        at: Option<String>,
        #[command(flatten)]
        reading: Reading,
        #[arg(long)]
        json: bool,
    },
    /// Fold the journal into a new full set off the cluster (a drill host): the newest set
    /// the moment starts from, rolled forward, verified, sealed, signed and stored as a set
    /// marked `derived`.
    Rebase(RebaseArgs),
    /// Apply retention now.
    Prune {
        /// Print the plan, delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Prune even though this node's newest backup failed, was skipped, or is not on
        /// every target yet.
        #[arg(long)]
        force: bool,
        /// Only this target (default: every target).
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
        /// One JSON document on stdout (schema_version, ok, each target's decisions).
        #[arg(long)]
        json: bool,
    },
    /// Last run, next run, current runner, pending uploads.
    Status {
        #[arg(long)]
        json: bool,
        /// Also every node's heartbeat from etcd (last run, targets, problems, next run).
        #[arg(long)]
        cluster: bool,
    },
    /// Validate the configuration and print the merged result.
    CheckConfig {
        /// Also connect to etcd and check each target.
        #[arg(long)]
        connect: bool,
        /// One JSON document on stdout (schema_version, ok, the merged settings, warnings,
        /// and with --connect what etcd and each target answered).
        #[arg(long)]
        json: bool,
    },
    /// Print deployment objects.
    Render {
        #[command(subcommand)]
        what: RenderWhat,
    },
    /// Print this help, or the help of a command (`help render machineconfig`).
    Help {
        #[arg(value_name = "COMMAND")]
        command: Vec<String>,
    },
}

impl Command {
    /// Did the user ask for one JSON document on stdout (`--json`)?
    pub fn json(&self) -> bool {
        match self {
            Command::Backup { json, .. }
            | Command::List { json, .. }
            | Command::Fetch(FetchArgs { json, .. })
            | Command::Verify { json, .. }
            | Command::Rebase(RebaseArgs { json, .. })
            | Command::Prune { json, .. }
            | Command::Status { json, .. }
            | Command::CheckConfig { json, .. } => *json,
            _ => false,
        }
    }

    /// The command's name, as typed.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Daemon => "daemon",
            Command::Backup { .. } => "backup",
            Command::List { .. } => "list",
            Command::Fetch(_) => "fetch",
            Command::Verify { .. } => "verify",
            Command::Rebase(_) => "rebase",
            Command::Prune { .. } => "prune",
            Command::Status { .. } => "status",
            Command::CheckConfig { .. } => "check-config",
            Command::Render { .. } => "render",
            _ => "help",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum RenderWhat {
    /// A MachineConfig rolling the daemon out to control-plane nodes.
    Machineconfig {
        /// The image the install unit copies the binary from (best pinned by digest).
        #[arg(long, value_name = "REF")]
        image: Option<String>,
        /// Ignition spec version of the embedded config.
        #[arg(long, value_name = "X.Y.Z", default_value = crate::cli::render::DEFAULT_IGNITION)]
        ignition_version: String,
        /// Also embed the secret files the configuration names (readable by cluster admins).
        #[arg(long)]
        include_secrets: bool,
        /// The MachineConfig's name (default: 99-<role>-etcd-backupd).
        #[arg(long)]
        name: Option<String>,
        /// The pool it targets: master (control-plane nodes) or arbiter (the etcd member of a
        /// two-node cluster with an arbiter, 4.19+).
        #[arg(long, value_enum, default_value = "master")]
        role: crate::cli::render::Role,
    },
}

/// `render machineconfig`: the YAML on stdout, its warnings on stderr.
fn print_machineconfig(settings: &Settings, command: &Command) -> Result<()> {
    let Command::Render {
        what:
            RenderWhat::Machineconfig {
                image,
                ignition_version,
                include_secrets,
                name,
                role,
            },
    } = command
    else {
        return Ok(());
    };
    let opts = render::Options {
        ignition_version,
        image: image.as_deref(),
        include_secrets: *include_secrets,
        name: &name.clone().unwrap_or_else(|| role.default_name()),
        role: *role,
    };
    let (yaml, warnings) = render::machineconfig(settings, &opts)?;
    for w in warnings {
        errln!("warning: {w}");
    }
    std::io::stdout().lock().write_all(yaml.as_bytes())?;
    Ok(())
}

/// `fetch`'s arguments.
#[derive(Debug, clap::Args)]
pub struct FetchArgs {
    /// A set id (see `list`) or `latest`; not with --at.
    #[arg(required_unless_present = "at", conflicts_with = "at")]
    id: Option<String>,
    /// Restore the cluster as it was at this moment, from the journal (`[journal]`): an RFC
    /// 3339 time (`2026-12-08T01:30:00Z`, or with an offset; the last revision stamped at or
    /// before it) or `rev:N` (N included). Needs etcd's binaries (verify.bin_dir).
    #[arg(long, value_name = "TIME|rev:N")]
    at: Option<String>,
    /// Where to put the files; must be empty or missing. Default, on an OpenShift
    /// control-plane node only: /home/core/assets/backup (the platform's documented place).
    #[arg(long, value_name = "DIR")]
    to: Option<PathBuf>,
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
    /// Fetch even when the static resources archive is not one the platform's
    /// cluster-restore.sh can use (members outside static-pod-resources/, a component's
    /// revision directory or pod manifest missing).
    #[arg(long)]
    allow_unrestorable_archive: bool,
    /// Accept a non-empty DIR, removing the snapshot*.db and static_kuberesources*.tar.gz in it.
    #[arg(long)]
    force: bool,
    /// One JSON document on stdout (schema_version, ok, the files laid out, the next step).
    #[arg(long)]
    json: bool,
    /// age identity file (or SSH private key) for an encrypted set; must not be group/other
    /// readable. Repeat it for a set whose archive is sealed to other keys than its snapshot
    /// (`encryption.resources_recipients`).
    #[arg(long, value_name = "FILE")]
    identity: Vec<PathBuf>,
    /// The target to read (default: the first).
    #[arg(long, value_name = "NAME")]
    target: Option<String>,
}

/// How `verify` and `rebase` read a stored set: from which target, with which keys, and
/// whether they take one not signed as required.
#[derive(Debug, clap::Args)]
pub struct Reading {
    /// Take the set even when verify.allowed_signers is set and it is unsigned or not
    /// signed by a listed key.
    #[arg(long)]
    allow_unsigned: bool,
    /// age identity file (or SSH private key) for an encrypted set; must not be
    /// group/other readable. Repeat it for a set whose archive is sealed to other keys
    /// (default: verify.identity_file).
    #[arg(long, value_name = "FILE")]
    identity: Vec<PathBuf>,
    /// The target to read (default: the first; with the journal, the first holding
    /// snapshots).
    #[arg(long, value_name = "NAME")]
    target: Option<String>,
}

/// `rebase`'s arguments.
#[derive(Debug, clap::Args)]
pub struct RebaseArgs {
    /// The moment to fold up to (as `fetch --at`: an RFC 3339 time or rev:N); default: the
    /// newest revision the journal holds after the newest set.
    #[arg(long, value_name = "TIME|rev:N")]
    at: Option<String>,
    #[command(flatten)]
    reading: Reading,
    #[arg(long)]
    json: bool,
}

fn load(cli: &Cli) -> Result<Settings> {
    let settings = Settings::load(&cli.config)?;
    settings.check_node_files()?;
    Ok(settings)
}

/// Runs the parsed command; the returned error carries its exit code (see [`crate::error`]).
pub async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Help { command } => generate::help(command),
        Command::Backup {
            no_election,
            target,
            force,
            json,
        } => {
            let settings = load(&cli)?;
            let asked = backup::Asked {
                no_election: *no_election,
                target: target.clone(),
                force: *force,
                json: *json,
            };
            backup::run(&settings, asked).await
        }
        Command::List {
            json,
            target,
            all_targets,
            wide,
        } => {
            let settings = load(&cli)?;
            let opts = list::Options {
                target: target.as_deref(),
                all_targets: *all_targets,
                wide: *wide,
                json: *json,
            };
            list::list(&settings, opts).await
        }
        Command::CheckConfig { connect, json } => {
            let settings = load(&cli)?;
            // Checked here and by the daemon when drills are scheduled; a backup never reads it.
            read_identity(settings.verify.identity_file.as_deref(), "verify.identity_file")?;
            if *json {
                check_config::check_config_json(&settings, *connect).await
            } else {
                check_config::check_config(&settings, *connect).await
            }
        }
        Command::Daemon => {
            let settings = load(&cli)?;
            if !settings.verify.schedule.is_empty() {
                read_identity(settings.verify.identity_file.as_deref(), "verify.identity_file")?;
            }
            crate::daemon::run(cli.config.clone(), settings, crate::daemon::cancel_on_signals()).await
        }
        Command::Fetch(args) => fetch::run(&load(&cli)?, args).await,
        Command::Verify {
            id,
            deep,
            at,
            reading,
            json,
        } => {
            let settings = load(&cli)?;
            let identity = identities_or_configured(&settings, &reading.identity)?;
            let req = fetch::VerifyRequest {
                id: id.as_deref(),
                deep: *deep,
                at: at.as_deref(),
                allow_unsigned: reading.allow_unsigned,
                target: reading.target.as_deref(),
                json: *json,
                identity,
            };
            fetch::verify(&settings, req).await
        }
        Command::Rebase(args) => rebase::run(&load(&cli)?, args).await,
        Command::Prune {
            dry_run,
            force,
            target,
            json,
        } => {
            let settings = load(&cli)?;
            prune::prune(&settings, *dry_run, *force, target.as_deref(), *json).await
        }
        Command::Status { json, cluster } => {
            let settings = Settings::load(&cli.config)?;
            status::status(&settings, *json, *cluster).await
        }
        Command::Render {
            what: RenderWhat::Machineconfig { .. },
        } => {
            // Syntax and meaning only: the node-side paths it names need not exist here.
            let settings = Settings::load(&cli.config)?;
            print_machineconfig(&settings, &cli.command)
        }
    }
}

pub(super) fn human(bytes: u64) -> String {
    config::types::Size(bytes).to_string()
}
