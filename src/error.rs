//! Error policy: functions return `anyhow::Result` with context naming the file, key, endpoint
//! or target at every I/O and network boundary; the top level prints the chain on one line
//! and maps it to an exit code. The typed errors here exist only for what changes that code.

/// Errors whose exit code is not 1.
#[derive(Debug, thiserror::Error)]
pub enum Stop {
    /// Bad command line or configuration: exit 2.
    #[error("{0}")]
    Usage(String),
    /// A command or option this version does not have yet: exit 2.
    #[error("{0} is not implemented yet")]
    NotImplemented(String),
    /// Skipped on purpose (a guard not met, not the elected runner): exit 3.
    #[error("skipped: {0}")]
    Skipped(String),
}

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_SKIPPED: u8 = 3;

/// The exit code for an error, from the first typed cause in its chain.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(stop) = cause.downcast_ref::<Stop>() {
            return match stop {
                Stop::Usage(_) | Stop::NotImplemented(_) => EXIT_USAGE,
                Stop::Skipped(_) => EXIT_SKIPPED,
            };
        }
        if cause.downcast_ref::<crate::config::ConfigError>().is_some() {
            return EXIT_USAGE;
        }
    }
    EXIT_FAILED
}

/// The error chain on one line.
pub fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace(['\n', '\r'], " ")
}
