//! `etcd-backupd`: parse the command line, set up logging, run, map errors to exit codes.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use etcd_backupd::cli::Command;
use etcd_backupd::cli::{self, Cli};
use etcd_backupd::{error, progress};

/// systemd sets `JOURNAL_STREAM=<dev>:<inode>` of the stream it connected; it is ours only if
/// stderr is still that stream (a child of a journald-logged shell inherits the variable).
fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr()) {
        Ok(st) => dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino),
        Err(_) => false,
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::prelude::*;
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    // rustls logs every failed handshake itself; our error line already says it, once.
    let filter = tracing_subscriber::EnvFilter::try_from_env("ETCD_BACKUPD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},rustls=off")));
    // Under systemd (stderr connected to the journal), log to the journal natively, so
    // fields such as BACKUP_ID, BYTES, TARGET and MESSAGE_ID can be queried with journalctl.
    if stderr_is_journal()
        && let Ok(journal) = tracing_journald::layer()
    {
        let journal = journal
            .with_field_prefix(None)
            .with_syslog_identifier("etcd-backupd".into());
        tracing_subscriber::registry().with(filter).with(journal).init();
        return;
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| progress::LogWriter)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::from(error::EXIT_OK);
        }
        Err(e) => {
            // One line, as every other error: clap's text up to its usage block.
            let text = e.render().to_string();
            let parts: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let _ = writeln!(std::io::stderr(), "{} (see 'etcd-backupd --help')", parts.join(" "));
            return ExitCode::from(error::EXIT_USAGE);
        }
    };
    progress::init(match cli.command {
        Command::Daemon => progress::Mode::Log,
        Command::Backup { .. } | Command::Fetch { .. } | Command::Verify { .. } => progress::bars_if_terminal(),
        _ => progress::Mode::Off,
    });
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: cannot start the async runtime: {e}");
            return ExitCode::from(error::EXIT_FAILED);
        }
    };
    let result = runtime.block_on(cli::run(cli));
    // Blocking work abandoned on SIGTERM (a copy to a target, which will not be moved into
    // place) must not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::from(error::EXIT_OK),
        // `| head` quit reading: end quietly, as coreutils do.
        Err(e) if error::is_closed_stdout(&e) => ExitCode::from(error::EXIT_OUTPUT_CLOSED),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {}", error::one_line(&e));
            ExitCode::from(error::exit_code(&e))
        }
    }
}
