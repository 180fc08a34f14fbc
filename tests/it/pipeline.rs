//! The pipelined path against real servers: the upload follows the snapshot's staging file
//! while etcd still streams it, a failed verification abandons that upload with nothing left
//! on the server, and a slow upload never slows the pull.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{CorruptingProxy, Etcd, Work};
use crate::servers::Apache;
use crate::webdav::{apache_target, entries_on, sets_on};

/// The hidden temporary folders of cluster `test` on the server and the sizes of the files
/// in them (Apache writes a PUT body to a temporary file inside the collection).
fn partial_bytes(root: &Path) -> u64 {
    entries_on(root)
        .iter()
        .filter(|n| n.starts_with('.') && n.contains(".partial-"))
        .flat_map(|n| std::fs::read_dir(root.join("test").join(n)).into_iter().flatten())
        .map(|e| e.unwrap().metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

fn staged_sets(w: &Work) -> usize {
    std::fs::read_dir(w.staging().join("sets"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn spawn_backup(cfg: &Path, log: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_etcd-backupd"))
        .args(["backup", "--no-election", "--config", cfg.to_str().unwrap()])
        .env("HTTPS_PROXY", "")
        .env("https_proxy", "")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Seconds from a `key=<float>` field of the log line holding `marker`.
fn logged_seconds(log: &str, marker: &str) -> f64 {
    let line = log
        .lines()
        .find(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no {marker:?} in:\n{log}"));
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("seconds="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no seconds= in {line}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upload_follows_the_snapshot_while_etcd_still_streams_it() {
    let etcd = Etcd::start();
    etcd.fill(None, 3000, 1000);
    let apache = Apache::start();
    let w = Work::new();
    // A slow etcd (about 1 MiB/s): the snapshot takes a few seconds to arrive.
    let slow = CorruptingProxy::start_with(&etcd.endpoint, None, Some(1 << 20)).await;
    let cfg = w.write_config_targets(
        &format!("http://127.0.0.1:{}", slow.port),
        &apache_target(&apache, &w, ""),
    );
    let log = w.path().join("run.log");
    let mut child = spawn_backup(&cfg, &log);
    // Seen at least once: bytes of the snapshot on the server while the set was not yet
    // complete in staging (the stream was still coming in).
    let mut overlap = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the backup did not finish");
        let on_server = partial_bytes(&apache.root());
        if on_server > 0 && staged_sets(&w) == 0 {
            overlap = overlap.max(on_server);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(child.wait().unwrap().success(), "{text}");
    assert!(
        overlap > 256 * 1024,
        "no upload progress was seen on the server while the snapshot streamed (max {overlap} bytes):\n{text}"
    );
    assert!(text.contains("uploading while the snapshot streams"), "{text}");
    assert!(text.contains("uploaded while it was written"), "{text}");
    // The set is complete and checks out; nothing temporary is left.
    let sets = sets_on(&apache.root());
    assert_eq!(sets.len(), 1, "{:?}", entries_on(&apache.root()));
    crate::common::assert_sha256sums(&sets[0]);
    assert_eq!(entries_on(&apache.root()).len(), 1);
    let streamed = logged_seconds(&text, "snapshot streamed and its trailer verified");
    assert!(streamed > 1.0, "the slow etcd took {streamed}s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_fails_verification_abandons_its_upload_and_leaves_nothing() {
    let etcd = Etcd::start();
    etcd.fill(None, 3000, 1000);
    let apache = Apache::start();
    let w = Work::new();
    // A byte flipped in transit, late enough that the upload has sent a good part of the
    // file when the trailer fails; slow enough that it is under way.
    let proxy = CorruptingProxy::start_with(&etcd.endpoint, Some(2_500_000), Some(2 << 20)).await;
    let cfg = w.write_config_targets(
        &format!("http://127.0.0.1:{}", proxy.port),
        &apache_target(&apache, &w, ""),
    );
    let log = w.path().join("run.log");
    let mut seen_on_server = 0u64;
    let mut child = spawn_backup(&cfg, &log);
    while child.try_wait().unwrap().is_none() {
        seen_on_server = seen_on_server.max(partial_bytes(&apache.root()));
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{text}");
    // The failure is the trailer check, not some other error ("snapshot stream" alone would
    // match the always-logged "uploading while the snapshot streams").
    assert!(text.contains("snapshot trailer mismatch"), "{text}");
    assert!(seen_on_server > 0, "the upload never started:\n{text}");
    assert!(text.contains(etcd_backupd::growing::ABANDONED), "{text}");
    // Nothing on the server: no set, no temporary folder; nothing staged.
    assert_eq!(entries_on(&apache.root()), Vec::<String>::new());
    assert_eq!(staged_sets(&w), 0);
    assert!(w.staging_tmp_files().is_empty(), "{:?}", w.staging_tmp_files());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_upload_does_not_slow_the_pull() {
    let etcd = Etcd::start();
    etcd.fill(None, 2000, 1000);
    let apache = Apache::start();
    let w = Work::new();
    let cfg = w.write_config_targets(
        &etcd.endpoint,
        &format!(
            "{}\n[priority]\nupload_rate_limit = \"1MiB/s\"\n",
            apache_target(&apache, &w, "")
        ),
    );
    let log = w.path().join("run.log");
    let started = Instant::now();
    let mut child = spawn_backup(&cfg, &log);
    let status = child.wait().unwrap();
    let total = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    let streamed = logged_seconds(&text, "snapshot streamed and its trailer verified");
    let set: PathBuf = sets_on(&apache.root()).pop().expect("a set");
    let size = std::fs::metadata(
        set.join(
            std::fs::read_dir(&set)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .find(|n| n.starts_with("snapshot_"))
                .unwrap(),
        ),
    )
    .unwrap()
    .len();
    // The upload is paced to 1 MiB/s; the snapshot arrived at etcd's speed regardless.
    let paced = size as f64 / f64::from(1u32 << 20);
    assert!(paced > 1.5, "{size} bytes");
    assert!(total > paced * 0.9, "{size} bytes uploaded in {total}s");
    assert!(
        streamed < paced / 3.0,
        "the pull took {streamed}s beside an upload paced to {paced}s"
    );
}
