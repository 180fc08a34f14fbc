//! `help`, and `generate`: man pages and shell completions made from the clap definition
//! itself, so they always match the options the binary takes.
//!
//! `etcd-backupd generate man DIR | completions SHELL` is for packaging (the RPM spec and the
//! Containerfile run it). It is not a command of [`Cli`]: clap_complete offers hidden
//! commands too, and users need not see it in the help, the man pages or their shell.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};

use super::Cli;
use crate::error::Stop;

#[derive(Debug, Parser)]
#[command(
    name = "generate",
    bin_name = "etcd-backupd generate",
    about = "Man pages and shell completions, for packaging"
)]
struct Generate {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// Write etcd-backupd.1 and a page per command (etcd-backupd-backup.1, ...) into DIR.
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Print the completion script for SHELL.
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
}

/// Is this command line `etcd-backupd generate ...`?
pub fn is_generate(args: &[OsString]) -> bool {
    args.get(1).is_some_and(|a| a == "generate")
}

/// Runs `etcd-backupd generate ...` (`args` as the program got them); clap's own usage
/// errors exit 2 as every other.
pub fn run(args: &[OsString]) -> Result<()> {
    let parsed = match Generate::try_parse_from(&args[1..]) {
        Ok(p) => p,
        Err(e) => e.exit(),
    };
    match parsed.what {
        What::Man { dir } => man(&dir),
        What::Completions { shell } => completions(shell),
    }
}

/// `help [COMMAND...]`: the help of the program or of a (nested) command.
pub(super) fn help(path: &[String]) -> Result<()> {
    let mut cmd = Cli::command();
    cmd.build();
    let mut at = &mut cmd;
    for name in path {
        let known: Vec<String> = at
            .get_subcommands()
            .filter(|c| !c.is_hide_set())
            .map(|c| c.get_name().to_string())
            .collect();
        at = match at.find_subcommand_mut(name) {
            Some(sub) => sub,
            None => {
                let whose = match path.iter().position(|p| p == name) {
                    Some(0) | None => String::new(),
                    Some(i) => format!(" of '{}'", path[..i].join(" ")),
                };
                return Err(Stop::Usage(format!(
                    "help: no command '{name}'{whose}; the commands are: {}",
                    known.join(", ")
                ))
                .into());
            }
        };
    }
    let text = at.render_long_help().to_string();
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(())
}

/// The man pages: `etcd-backupd.1`, and `etcd-backupd-<command>.1` (and
/// `etcd-backupd-render-machineconfig.1`) for every visible command, written into `dir`.
fn man(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create '{}'", dir.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    let mut written = Vec::new();
    write_pages(&cmd, "etcd-backupd", "etcd-backupd", dir, &mut written)?;
    for name in written {
        outln!("{}", dir.join(name).display());
    }
    Ok(())
}

/// `name` is the page's (`etcd-backupd-render-machineconfig`), `usage` how it is typed
/// (`etcd-backupd render machineconfig`).
fn write_pages(cmd: &clap::Command, name: &str, usage: &str, dir: &Path, written: &mut Vec<String>) -> Result<()> {
    // clap takes only 'static names without its "string" feature; a few bytes, once.
    let title: &'static str = Box::leak(name.to_string().into_boxed_str());
    let page = cmd.clone().name(title).bin_name(usage);
    let mut out = Vec::new();
    clap_mangen::Man::new(page).render(&mut out)?;
    let file = format!("{name}.1");
    std::fs::write(dir.join(&file), out).with_context(|| format!("cannot write '{}'", dir.join(&file).display()))?;
    written.push(file);
    // Every page the one above lists under SUBCOMMANDS (`help` too).
    for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
        let sub_name = sub.get_name();
        write_pages(
            sub,
            &format!("{name}-{sub_name}"),
            &format!("{usage} {sub_name}"),
            dir,
            written,
        )?;
    }
    Ok(())
}

/// The completion script for `shell` on stdout.
fn completions(shell: clap_complete::Shell) -> Result<()> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "etcd-backupd", &mut out);
    std::io::stdout().lock().write_all(&out)?;
    Ok(())
}
