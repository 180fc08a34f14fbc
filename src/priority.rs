//! Low priority for backup work: the I/O class (`ioprio_set`, idle or best-effort 7) and
//! `nice` from `[priority]`, set on every thread of the process (both are per thread on
//! Linux, and threads started later inherit them). The snapshot pull is paced only by
//! etcd's latency ([`crate::source::pace`], bounded: a long read transaction makes etcd's
//! database grow); `upload_rate_limit` applies to what is written to targets.
//!
//! I/O priorities only take effect under the BFQ (or legacy CFQ) scheduler; RHCOS often uses
//! `none` or `mq-deadline` on NVMe and virtio disks, so the scheduler of the staging disk is
//! logged at start.

use std::path::Path;

use crate::config::{IoClass, PriorityInputs};

const IOPRIO_WHO_PROCESS: libc::c_int = 1;
const IOPRIO_CLASS_SHIFT: libc::c_int = 13;
const IOPRIO_CLASS_BE: libc::c_int = 2;
const IOPRIO_CLASS_IDLE: libc::c_int = 3;

fn threads() -> Vec<libc::c_int> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Applies `[priority]` to every thread; failures are logged (a container may forbid them).
pub fn apply(p: &PriorityInputs) {
    let ioprio = match p.io_class {
        IoClass::Idle => Some(IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT),
        IoClass::BestEffort => Some((IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | 7),
        IoClass::None => None,
    };
    let _ = CONFIGURED.set(ioprio);
    SNAPSHOT_NICE.store(p.snapshot_nice.unwrap_or(p.nice), std::sync::atomic::Ordering::Relaxed);
    for tid in threads() {
        if let Some(prio) = ioprio {
            // SAFETY: a plain syscall with integer arguments.
            let rc = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, tid, prio) };
            if rc != 0 {
                tracing::warn!(error = %std::io::Error::last_os_error(), "cannot set the I/O priority");
            }
        }
        // SAFETY: setpriority with integer arguments; `which` is PRIO_PROCESS.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, p.nice) };
        if rc != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), nice = p.nice, "cannot set the nice value");
        }
    }
}

/// The I/O priority `apply` set (`None`: leave I/O priorities alone).
static CONFIGURED: std::sync::OnceLock<Option<libc::c_int>> = std::sync::OnceLock::new();

/// `priority.snapshot_nice` (or `priority.nice`), as `apply` last set it; [`UNSET`] before.
static SNAPSHOT_NICE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(UNSET);
const UNSET: i32 = i32::MIN;

fn set_this_thread(prio: libc::c_int) {
    // SAFETY: a plain syscall with integer arguments; 0 is the calling thread.
    unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, prio) };
}

/// Sets the calling thread, the snapshot's own (it ends with the pull, so nothing is
/// restored), to normal I/O priority and `priority.snapshot_nice` (unset: `priority.nice`):
/// the pull writes to staging unthrottled by the idle I/O class (a starved writer would
/// hold etcd's read transaction open). A nice value the process may not lower to (no
/// `CAP_SYS_NICE`) stays as it was; before [`apply`], both are left alone.
pub fn for_the_snapshot_thread() {
    if CONFIGURED.get().copied().flatten().is_some() {
        set_this_thread((IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | 4);
    }
    let nice = SNAPSHOT_NICE.load(std::sync::atomic::Ordering::Relaxed);
    if nice != UNSET {
        // SAFETY: a plain syscall with integer arguments; `who` 0 is the calling thread.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    }
}

/// The I/O scheduler of the disk holding `path` (`[mq-deadline] none` -> `mq-deadline`).
pub fn io_scheduler(path: &Path) -> Option<String> {
    let mut p = path;
    while !p.exists() {
        p = p.parent()?;
    }
    let dev = nix::sys::stat::stat(p).ok()?.st_dev;
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    // A partition's queue is its parent disk's.
    let text = std::fs::read_to_string(sys.join("queue/scheduler"))
        .ok()
        .or_else(|| std::fs::read_to_string(sys.parent()?.join("queue/scheduler")).ok())?;
    let chosen = text.split_whitespace().find(|s| s.starts_with('['))?;
    Some(chosen.trim_matches(['[', ']']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::Pace;
    use std::time::Duration;

    #[test]
    fn pace_spreads_bytes_over_time() {
        let mut p = Pace::new(1000);
        assert!(p.delay_for(500) > Duration::from_millis(450));
        assert!(p.delay_for(500) > Duration::from_millis(950));
        let mut fast = Pace::new(u64::MAX);
        assert_eq!(fast.delay_for(1 << 20), Duration::ZERO);
    }

    #[test]
    fn the_scheduler_of_some_disk_is_found_or_none() {
        // Containers may have no /sys/dev/block entry; the answer is then None, not a panic.
        if let Some(s) = io_scheduler(Path::new("/")) {
            assert!(!s.is_empty() && !s.contains('['));
        }
    }
}
