//! `rebase`: the journal folded into a derived set on a drill host ([`crate::run::rebase`]).

use std::io::Write;

use anyhow::{Result, bail};

use crate::config::Settings;
use crate::run::rebase::{Rebased, Request};

/// `rebase`, as asked on the command line: the derived set, what it folded and where it is
/// stored; exit 1 while a target still waits for it.
pub(super) async fn run(settings: &Settings, args: &super::RebaseArgs) -> Result<()> {
    let identity = super::identities_or_configured(settings, &args.reading.identity)?;
    let moment = super::fetch::moment_of(args.at.as_deref())?;
    let req = Request {
        moment,
        target: args.reading.target.as_deref(),
        identity,
        allow_unsigned: args.reading.allow_unsigned,
    };
    let abort = crate::daemon::cancel_on_signals();
    let done = crate::run::rebase::rebase(settings, &req, &abort).await?;
    if args.json {
        super::report::print(serde_json::to_value(&done)?, done.pending == 0)?;
    } else {
        print(&done)?;
    }
    if done.pending > 0 {
        bail!(
            "derived set {} is not on every target yet: it waits in this host's staging; run rebase again to deliver it once the targets answer",
            done.id
        );
    }
    Ok(())
}

fn print(done: &Rebased) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "derived set {} from set {}", done.id, done.reached.base_id)?;
    writeln!(out, "  {}", super::fetch::rolled_line(&done.reached))?;
    writeln!(
        out,
        "stored on {} of {} target(s)",
        done.delivered,
        done.delivered + done.pending
    )?;
    Ok(())
}
