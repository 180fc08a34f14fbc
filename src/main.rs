//! `etcd-backupd`: parse the command line, set up logging, run, map errors to exit codes.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use etcd_backupd::cli::Command;
use etcd_backupd::cli::{self, Cli};
use etcd_backupd::{error, progress};

fn main() -> ExitCode {
    // `generate man|completions` (packaging) is not a command users see: see cli::generate.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if cli::generate::is_generate(&args) {
        return match cli::generate::run(&args) {
            Ok(()) => ExitCode::from(error::EXIT_OK),
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "error: {}", error::one_line(&e));
                ExitCode::from(error::exit_code(&e))
            }
        };
    }
    let cli = match Cli::try_parse_from(&args) {
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
            let line = format!("{} (see 'etcd-backupd --help')", parts.join(" "));
            let _ = writeln!(std::io::stderr(), "{line}");
            // `--json` asked for one document on stdout, a usage error's too.
            let args: Vec<String> = std::env::args().skip(1).collect();
            if args.iter().any(|a| a == "--json") {
                let command = args
                    .iter()
                    .find(|a| !a.starts_with('-'))
                    .map(String::as_str)
                    .unwrap_or("etcd-backupd");
                let e = anyhow::anyhow!(error::Stop::Usage(line));
                let doc = cli::report::error_document(command, &e);
                let _ = writeln!(
                    std::io::stdout(),
                    "{}",
                    serde_json::to_string_pretty(&doc).unwrap_or_default()
                );
            }
            return ExitCode::from(error::EXIT_USAGE);
        }
    };
    progress::init(match cli.command {
        Command::Daemon => progress::Mode::Log,
        Command::Backup { .. } | Command::Fetch(_) | Command::Verify { .. } => progress::bars_if_terminal(),
        _ => progress::Mode::Off,
    });
    etcd_backupd::logging::init(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: cannot start the async runtime: {e}");
            return ExitCode::from(error::EXIT_FAILED);
        }
    };
    let (json, command) = (cli.command.json(), cli.command.name());
    let result = runtime.block_on(cli::run(cli));
    // `--json`: stdout always carries one document, the failure's when the command printed
    // none (a verdict's document is printed by `status` itself).
    if let Err(e) = &result
        && json
        && !cli::report::printed()
        && !error::is_closed_stdout(e)
    {
        let doc = cli::report::error_document(command, e);
        let _ = writeln!(
            std::io::stdout(),
            "{}",
            serde_json::to_string_pretty(&doc).unwrap_or_default()
        );
    }
    // Blocking work abandoned on SIGTERM (a copy to a target, which will not be moved into
    // place) must not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::from(error::EXIT_OK),
        // `| head` quit reading: end quietly, as coreutils do.
        Err(e) if error::is_closed_stdout(&e) => ExitCode::from(error::EXIT_OUTPUT_CLOSED),
        // `status`'s verdict is its first line on stdout; a pipe or a check still gets it on
        // stderr, once.
        Err(e) if error::is_verdict(&e) => {
            if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                let _ = writeln!(std::io::stderr(), "{}", error::one_line(&e));
            }
            ExitCode::from(error::exit_code(&e))
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {}", error::one_line(&e));
            ExitCode::from(error::exit_code(&e))
        }
    }
}
