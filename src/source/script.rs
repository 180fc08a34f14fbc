//! `snapshot.method = "script"`: the platform's own `cluster-backup.sh` takes the set, and
//! etcd-backupd checks and ships it like one of its own.
//!
//! The script runs with the daemon's environment (so `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY`
//! from `/etc/mco/proxy.env` reach the `podman` pull it does), minus systemd's notify and
//! watchdog variables (the script is not the service), at the process's I/O and CPU priority
//! (children inherit both), into a fresh directory under staging, with
//! `snapshot.script_timeout`. Every line it prints goes to the journal. Afterwards exactly
//! one `snapshot_<ts>.db` and at most one `static_kuberesources_<ts>.tar.gz` must be there,
//! with one timestamp; `__POSSIBLY_DIRTY__` files (its `--force`) are refused unless
//! `backup --force` ran it with `--force`, or `snapshot.allow_dirty`. The snapshot's etcd
//! trailer and the archive (what a restore needs of it) are verified before anything is
//! shipped.

use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::AsyncBufReadExt;

use crate::config::Settings;
use crate::source::platform_set::{self, DIRTY, PlatformSet};

/// What the script produced, moved into the set's directory.
pub struct Produced {
    /// The timestamp in the script's file names (`%F_%H%M%S`, without `__POSSIBLY_DIRTY__`),
    /// which becomes the set's id.
    pub ts: String,
    /// The files are `__POSSIBLY_DIRTY__`: the script skipped its pre-checks.
    pub dirty: bool,
    /// (name, size, sha256), the snapshot first.
    pub files: Vec<(String, u64, String)>,
}

/// Runs the script into `work/script-out/`, checks what it left, and moves the files into
/// `work`. With `force` (`backup --force`) the script is run as `SCRIPT --force DIR`: its
/// own pre-checks (the ClusterOperators) are skipped as ours were, and its dirty files are
/// taken whatever `snapshot.allow_dirty` says.
pub async fn take(settings: &Settings, work: &Path, force: bool) -> Result<Produced> {
    let script = &settings.snapshot.script;
    let out_dir = work.join("script-out");
    let mut cmd = tokio::process::Command::new(script);
    // The script takes `--force` only as its first argument.
    if force {
        cmd.arg("--force");
    }
    cmd.arg(&out_dir)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        // Its `date` names the files; set ids are UTC (RHCOS runs in UTC anyway).
        .env("TZ", "UTC")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills what it started too (etcdctl, podman).
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("snapshot.script '{}': cannot run it", script.display()))?;
    // Whatever the script started dies with the run: on return, error, or a dropped future
    // (SIGTERM, a lost election lock).
    let _group = child.id().map(GroupKiller);
    let (stdout, stderr) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
    let last_line = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let relay = |stream: Box<dyn tokio::io::AsyncRead + Send + Unpin>, name: &'static str| {
        let last = last_line.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::info!(target: "cluster-backup.sh", stream = name, "{line}");
                if !line.trim().is_empty() {
                    *last.lock().unwrap() = line;
                }
            }
        })
    };
    let out_task = relay(Box::new(stdout), "stdout");
    let err_task = relay(Box::new(stderr), "stderr");
    let timeout = settings.snapshot.script_timeout.0;
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(s) => s.context("snapshot.script: waiting for it failed")?,
        Err(_) => {
            kill_group(child.id());
            let _ = child.kill().await;
            bail!(
                "snapshot.script '{}' did not finish within snapshot.script_timeout ({})",
                script.display(),
                humantime::format_duration(timeout)
            );
        }
    };
    // A child left behind may hold the pipes open: do not wait for it.
    kill_group(child.id());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let _ = tokio::join!(out_task, err_task);
    })
    .await;
    if !status.success() {
        let last = last_line.lock().unwrap().clone();
        bail!(
            "snapshot.script '{}' failed ({status}){}",
            script.display(),
            if last.is_empty() {
                String::new()
            } else {
                format!(": {last}")
            }
        );
    }
    let produced = collect(&out_dir, force || settings.snapshot.allow_dirty)?;
    // Checked before anything is shipped: etcdctl 3.4 saves a corrupted stream without
    // complaint.
    let mut files = Vec::new();
    for name in &produced.files {
        let from = out_dir.join(name);
        let to = work.join(name);
        let check = from.clone();
        let is_snapshot = name.starts_with("snapshot");
        tokio::task::spawn_blocking(move || -> Result<()> {
            if is_snapshot {
                crate::source::snapshot::verify_file(&check)?;
            } else {
                // What a restore needs of the archive, not only a readable tar.gz.
                let name = check.file_name().unwrap_or_default().to_string_lossy().into_owned();
                crate::source::static_resources::check_archive_file(&check)?.require(&name)?;
            }
            Ok(())
        })
        .await??;
        std::fs::rename(&from, &to).with_context(|| format!("cannot move '{}' into the set", from.display()))?;
        let (size, sha) = hash_file(&to)?;
        files.push((name.clone(), size, sha));
    }
    std::fs::set_permissions(work, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let _ = std::fs::remove_dir_all(&out_dir);
    Ok(Produced {
        ts: produced.id,
        dirty: produced.dirty,
        files,
    })
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Kills the script's process group when dropped.
struct GroupKiller(u32);

impl Drop for GroupKiller {
    fn drop(&mut self) {
        kill_group(Some(self.0));
    }
}

fn hash_file(p: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(p).with_context(|| format!("cannot open '{}'", p.display()))?;
    let mut h = crate::fsutil::HashingWriter::new(std::io::sink());
    std::io::copy(&mut f, &mut h)?;
    let (_, size, sha) = h.finish();
    // The script writes 0600 already; make sure, the set's files are private.
    std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok((size, sha))
}

/// The set the script left in `dir`. Dirty files (its `--force`) are taken when this run
/// passed `--force` itself, or `snapshot.allow_dirty` says so.
fn collect(dir: &Path, accept_dirty: bool) -> Result<PlatformSet> {
    let set = platform_set::read(dir)
        .with_context(|| "the script's output".to_string())?
        .ok_or_else(|| anyhow!("the script left no snapshot_*.db file in '{}'", dir.display()))?;
    for other in &set.others {
        tracing::warn!(file = %other, "ignoring an unexpected file the script left");
    }
    if set.dirty && !accept_dirty {
        bail!(
            "the script produced {DIRTY} files (its pre-checks were skipped); set snapshot.allow_dirty = true to accept them, or run backup --force"
        );
    }
    if set.dirty {
        tracing::warn!(backup_id = %set.id, "the script marked this backup {DIRTY} (its --force skipped its checks)");
    }
    Ok(set)
}
