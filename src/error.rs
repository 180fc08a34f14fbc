//! Error policy: functions return `anyhow::Result` with context naming the file, key, endpoint
//! or target at every I/O and network boundary; the top level prints the chain on one line
//! and maps it to an exit code. The typed errors here exist only for what changes that code.

/// A configuration problem; always reported as one line and exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Errors whose exit code is not 1.
#[derive(Debug, thiserror::Error)]
pub enum Stop {
    /// Bad command line or configuration: exit 2.
    #[error("{0}")]
    Usage(String),
    /// Skipped on purpose (a guard not met, not the elected runner): exit 3.
    #[error("skipped: {0}")]
    Skipped(crate::outcome::Skip),
    /// Refused on purpose, by a rule that protects the user (a prune that would delete the
    /// newest good backup): exit 3, as a skip.
    #[error("{0}")]
    Refused(String),
    /// A verdict with its own exit code (`status`: 4 AT RISK, 1 FAILING), already printed on
    /// stdout.
    #[error("{summary}")]
    Verdict { code: u8, summary: String },
}

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_SKIPPED: u8 = 3;
/// `status`: protected, but not fully (AT RISK).
pub const EXIT_AT_RISK: u8 = 4;

/// A verdict already printed on stdout: its stderr line adds nothing on a terminal.
pub fn is_verdict(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| matches!(c.downcast_ref::<Stop>(), Some(Stop::Verdict { .. })))
}

/// The exit code for an error, from the first typed cause in its chain.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(stop) = cause.downcast_ref::<Stop>() {
            return match stop {
                Stop::Usage(_) => EXIT_USAGE,
                Stop::Skipped(_) | Stop::Refused(_) => EXIT_SKIPPED,
                Stop::Verdict { code, .. } => *code,
            };
        }
        if cause.downcast_ref::<ConfigError>().is_some() {
            return EXIT_USAGE;
        }
    }
    EXIT_FAILED
}

/// Exit status of a command whose output was cut short (`| head`), as for a process killed by
/// SIGPIPE: what coreutils exit with there.
pub const EXIT_OUTPUT_CLOSED: u8 = 141;

/// Did the command fail only because the reader of its standard output went away? Then it
/// ends quietly with [`EXIT_OUTPUT_CLOSED`]. A broken pipe to anything else (a child process)
/// is a real error: the check asks the kernel whether stdout itself lost its reader.
pub fn is_closed_stdout(e: &anyhow::Error) -> bool {
    let broken = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    });
    broken && stdout_lost_its_reader()
}

fn stdout_lost_its_reader() -> bool {
    let mut fd = libc::pollfd {
        fd: libc::STDOUT_FILENO,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout. A pipe with no reader left polls as POLLERR.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) };
    ready == 1 && fd.revents & libc::POLLERR != 0
}

/// The skip, when an error is a deliberate one (exit 3) rather than a failure.
pub fn skip_of(e: &anyhow::Error) -> Option<crate::outcome::Skip> {
    e.chain().find_map(|c| match c.downcast_ref::<Stop>() {
        Some(Stop::Skipped(reason)) => Some(reason.clone()),
        _ => None,
    })
}

/// The error chain on one line.
pub fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace(['\n', '\r'], " ")
}
