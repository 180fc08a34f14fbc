//! kill -9 in each phase: while etcd's snapshot streams, during the upload, around the final
//! MOVE on WebDAV, and at pseudo-random moments of a whole run; SIGTERM during retention.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use crate::common::{Etcd, Proc, Work, argv, file_target, run, run_async};
use crate::servers::{Fault, FaultProxy, Rclone};
use crate::support::{
    NO_RETENTION, ThrottleProxy, assert_complete, daemon_config, entries, etcd_get, etcd_prefix, hidden, next_rand,
    visible,
};

/// Waits until the run lock is gone; fails if that takes longer than `within`.
async fn lock_released_within(endpoints: &str, within: Duration, since: Instant) {
    loop {
        if etcd_get(endpoints, "/etcd-backupd/lock").is_none() {
            return;
        }
        assert!(
            since.elapsed() < within,
            "the dead runner's lock outlived its lease: still there after {:?}",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The set ids the run records `marks` (`/etcd-backupd/runs/`) name.
fn recorded_ids(marks: &BTreeMap<String, serde_json::Value>) -> BTreeSet<String> {
    marks
        .values()
        .filter_map(|m| m["id"].as_str().map(String::from))
        .collect()
}

/// The visible sets on `root` are exactly `want` (`what` says which those are), each complete.
fn assert_exactly_these_sets(root: &Path, want: &BTreeSet<String>, what: &str) {
    let sets: BTreeSet<String> = visible(root).into_iter().collect();
    assert_eq!(&sets, want, "{what}");
    for id in &sets {
        assert_complete(&root.join(id));
    }
}

/// Starts node-a's daemon against `endpoint` with a run every 5 s, lease_ttl 6 s and `extra`
/// (targets, other tables), logging to `daemon-<n>.log`.
fn daemon_every_5_s(w: &Work, endpoint: &str, extra: &str, n: u32) -> Proc {
    let cfg = daemon_config(w, "node-a", endpoint, "*/5 * * * * *", "lease_ttl = \"6s\"", extra);
    Proc::daemon(&cfg, w.path().join(format!("daemon-{n}.log")), &[])
}

/// kill -9 of the daemon while etcd's snapshot streams (slowed by a throttling proxy): no set
/// anywhere, no unverified file in sets/, the dead runner's lock gone within its lease, and
/// the restarted daemon's next run completes (and cleans the debris). A single node does not
/// make the killed run up (docs/daemon.md: a missed run is not made up); with three nodes another
/// takes it over (daemon.rs covers that for the upload phase).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_the_snapshot_leaves_nothing_and_the_next_run_completes() {
    let etcd = Etcd::start();
    etcd.fill(None, 6000, 1000); // ~6+ MB: ~12 s at 512 KiB/s
    let slow = ThrottleProxy::start(&etcd.endpoint, 512 * 1024).await;
    let w = Work::new();
    let extra = format!("{}{NO_RETENTION}", file_target(&w));
    // lease_ttl 6 s: lock considered lost after 3 s without a renewal; the throttled stream
    // shares the connection with the keep-alives, and h2's 64 KiB window keeps them prompt.
    let mut d = daemon_every_5_s(&w, &slow.endpoint(), &extra, 1);
    let deadline = Instant::now() + Duration::from_secs(40);
    while slow.down.load(SeqCst) < 1 << 20 || w.staging_tmp_files().is_empty() {
        assert!(Instant::now() < deadline, "no snapshot started: {}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lock: serde_json::Value =
        serde_json::from_str(&etcd_get(&etcd.endpoint, "/etcd-backupd/lock").expect("the runner holds the lock"))
            .unwrap();
    assert_eq!(lock["node"], "node-a", "{lock}");
    let killed_run = lock["run"].as_str().unwrap().to_string();
    assert!(d.running(), "the run ended before the kill: {}", d.log());
    tokio::task::block_in_place(|| d.sigkill());
    let killed_at = Instant::now();

    let root = w.target_root().join("test");
    assert!(visible(&root).is_empty(), "{:?}", entries(&root));
    // At most this node's hidden upload (the pipelined path uploads while it streams).
    assert!(
        hidden(&root).iter().all(|n| n.contains(".partial-node-a-")),
        "{:?}",
        entries(&root)
    );
    // An unverified snapshot never becomes a staged set.
    assert!(w.staged().is_empty(), "{:?}", w.staged());

    lock_released_within(&etcd.endpoint, Duration::from_secs(6 + 3), killed_at).await;

    slow.rate.store(0, SeqCst);
    let mut d = daemon_every_5_s(&w, &slow.endpoint(), &extra, 2);
    let deadline = Instant::now() + Duration::from_secs(40);
    // A run is complete once recorded: its set is visible a moment before.
    let recorded = |root: &Path| {
        let sets: BTreeSet<String> = visible(root).into_iter().collect();
        !sets.is_empty() && sets.is_subset(&recorded_ids(&etcd_prefix(&etcd.endpoint, "/etcd-backupd/runs/")))
    };
    while !recorded(&root) {
        assert!(Instant::now() < deadline, "the next run did not complete: {}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let code = tokio::task::block_in_place(|| d.stop(Duration::from_secs(10)));
    assert_eq!(code, Some(0), "{}", d.log());

    let marks = etcd_prefix(&etcd.endpoint, "/etcd-backupd/runs/");
    assert!(
        !marks.contains_key(&killed_run),
        "the killed run was recorded: {marks:?}"
    );
    assert_exactly_these_sets(&root, &recorded_ids(&marks), "one set per completed run, no other");
    assert!(
        hidden(&root).is_empty(),
        "the next run removes this node's debris: {:?}",
        entries(&root)
    );
    assert!(w.staging_tmp_files().is_empty(), "{:?}", w.staging_tmp_files());
    assert!(w.staged().iter().all(|(_, p)| p.is_empty()), "{:?}", w.staged());
    assert!(etcd_get(&etcd.endpoint, "/etcd-backupd/lock").is_none());
}

/// kill -9 of the daemon while it copies a verified set to a file target (slowed with
/// `upload_rate_limit`): nothing visible, the verified set waits in staging, the lock goes
/// within its lease, and the restarted daemon delivers that set and then takes its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_the_upload_leaves_nothing_visible_and_the_set_is_delivered_once() {
    let etcd = Etcd::start();
    etcd.fill(None, 3000, 1000);
    let w = Work::new();
    let base = format!("{}{NO_RETENTION}", file_target(&w));
    let slow = format!("{base}\n[priority]\nupload_rate_limit = \"512KiB/s\"\n");
    let mut d = daemon_every_5_s(&w, &etcd.endpoint, &slow, 1);
    let root = w.target_root().join("test");
    let uploading = |root: &Path| {
        hidden(root).iter().any(|h| {
            std::fs::read_dir(root.join(h))
                .map(|es| {
                    es.flatten().any(|e| {
                        e.file_name().to_string_lossy().starts_with("snapshot_")
                            && e.metadata().map(|m| m.len() > 256 * 1024).unwrap_or(false)
                    })
                })
                .unwrap_or(false)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    while w.staged().is_empty() || !uploading(&root) {
        assert!(Instant::now() < deadline, "no upload started: {}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lock: serde_json::Value =
        serde_json::from_str(&etcd_get(&etcd.endpoint, "/etcd-backupd/lock").unwrap()).unwrap();
    let killed_run = lock["run"].as_str().unwrap().to_string();
    tokio::task::block_in_place(|| d.sigkill());
    let killed_at = Instant::now();

    assert!(visible(&root).is_empty(), "{:?}", entries(&root));
    assert!(
        hidden(&root).iter().all(|n| n.contains(".partial-node-a-")),
        "{:?}",
        entries(&root)
    );
    let staged = w.staged();
    assert_eq!(staged.len(), 1, "{staged:?}");
    assert_eq!(staged[0].1, ["shared"], "{staged:?}");
    let killed_id = staged[0].0.clone();
    lock_released_within(&etcd.endpoint, Duration::from_secs(6 + 3), killed_at).await;

    let mut d = daemon_every_5_s(&w, &etcd.endpoint, &base, 2);
    let deadline = Instant::now() + Duration::from_secs(40);
    // Two sets stored, and each recorded by its run: a run is stopped only after it recorded
    // its set (a SIGTERM between the two is another test's subject).
    let recorded = |root: &Path| {
        let ids = recorded_ids(&etcd_prefix(&etcd.endpoint, "/etcd-backupd/runs/"));
        let sets = visible(root);
        sets.len() >= 2 && sets.iter().all(|s| ids.contains(s))
    };
    while !recorded(&root) {
        assert!(Instant::now() < deadline, "{:?}: {}", entries(&root), d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let code = tokio::task::block_in_place(|| d.stop(Duration::from_secs(10)));
    assert_eq!(code, Some(0), "{}", d.log());

    // The restarted node recorded the killed run with its staged set before delivering it
    // (so no node could take that run over meanwhile), and settled it once delivered.
    let marks = etcd_prefix(&etcd.endpoint, "/etcd-backupd/runs/");
    let killed = &marks[&killed_run];
    assert_eq!(
        (
            killed["node"].as_str(),
            killed["id"].as_str(),
            killed["result"].as_str()
        ),
        (Some("node-a"), Some(killed_id.as_str()), Some("ok")),
        "{marks:?}"
    );
    assert_exactly_these_sets(
        &root,
        &recorded_ids(&marks),
        "the killed run's set once, plus one per completed run",
    );
    assert!(hidden(&root).is_empty(), "{:?}", entries(&root));
    assert!(w.staged().iter().all(|(_, p)| p.is_empty()), "{:?}", w.staged());
    assert!(w.staging_tmp_files().is_empty());
}

/// kill -9 of `backup` (elected, lease 3 s) around the final MOVE on WebDAV: "before" (the
/// MOVE never reached the server) leaves only hidden debris; "after" (the MOVE took effect,
/// its answer was lost, the retry hangs) leaves the complete set visible. Either way the
/// lock lapses within the lease and the next run stores the killed run's set exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_around_the_final_move_never_shows_a_partial_set_and_stores_nothing_twice() {
    for variant in ["before", "after"] {
        // Its own etcd: a manual run's key is time-based, and the first variant's record
        // of it must not make the second a run already done.
        let etcd = Etcd::start();
        etcd.fill(None, 300, 500);
        let rclone = Rclone::start();
        let (moves, stalled) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (m, s) = (moves.clone(), stalled.clone());
        let fault = FaultProxy::start(rclone.url(), move |_, method, _, _| {
            if method != "MOVE" {
                return Fault::Forward;
            }
            match (variant, m.fetch_add(1, SeqCst)) {
                ("after", 0) => Fault::ForwardThenCut,
                ("before", 0) | ("after", 1) => {
                    s.store(true, SeqCst);
                    Fault::Stall
                }
                _ => Fault::Forward,
            }
        })
        .await;
        let w = Work::new();
        let cfg = w.write_dav_config(
            &etcd.endpoint,
            &fault.url(),
            "retry_budget = \"30s\"\n\n[election]\nlease_ttl = \"3s\"\n",
        );
        let mut p = Proc::spawn(
            &["backup", "--config", cfg.to_str().unwrap()],
            w.path().join("backup.log"),
            &[],
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !stalled.load(SeqCst) {
            assert!(Instant::now() < deadline, "{variant}: no MOVE: {}", p.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        tokio::task::block_in_place(|| p.sigkill());
        let killed_at = Instant::now();

        let root = rclone.root().join("test");
        let staged = w.staged();
        assert_eq!(staged.len(), 1, "{variant}: {staged:?}");
        assert_eq!(staged[0].1, ["dav"], "{variant}: {staged:?}");
        let id = staged[0].0.clone();
        if variant == "before" {
            assert!(visible(&root).is_empty(), "{variant}: {:?}", entries(&root));
            let h = hidden(&root);
            assert!(h.len() == 1 && h[0].contains(".partial-node-a-"), "{variant}: {h:?}");
        } else {
            assert_eq!(visible(&root), vec![id.clone()], "{variant}");
            assert!(hidden(&root).is_empty(), "{variant}: {:?}", entries(&root));
            assert_complete(&root.join(&id));
        }
        lock_released_within(&etcd.endpoint, Duration::from_secs(3 + 3), killed_at).await;

        let r = run_async(argv(&["backup"], &cfg), vec![]).await;
        assert_eq!(r.code, 0, "{variant}: {}", r.all());
        if variant == "after" {
            assert!(r.stderr.contains("already holds this set"), "{variant}: {}", r.stderr);
        }
        let sets = visible(&root);
        assert_eq!(sets.len(), 2, "{variant}: {sets:?}");
        assert!(sets.contains(&id), "{variant}: {sets:?}");
        assert!(hidden(&root).is_empty(), "{variant}: {:?}", entries(&root));
        for s in &sets {
            assert_complete(&root.join(s));
        }
        assert!(
            w.staged().iter().all(|(_, p)| p.is_empty()),
            "{variant}: {:?}",
            w.staged()
        );
        assert!(etcd_get(&etcd.endpoint, "/etcd-backupd/lock").is_none());
    }
}

/// kill -9 of `backup` at pseudo-random moments spread over a whole run (snapshot, staging
/// rename, copy, fsync, the final rename, retention): after each kill every visible set is
/// complete and only this node's hidden debris may exist; a final run then delivers every
/// verified set left in staging exactly once and removes the debris.
#[test]
fn sigkill_at_random_moments_never_leaves_a_visible_partial_set() {
    let etcd = Etcd::start();
    etcd.fill(None, 1500, 1000);
    let w = Work::new();
    let cfg = w.write_config(&etcd.endpoint, None, NO_RETENTION);
    let root = w.target_root().join("test");
    let started = Instant::now();
    let r = run(&["backup", "--no-election", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let full = started.elapsed();
    let mut seed: u64 = std::env::var("ETCD_BACKUPD_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    eprintln!("seed {seed}, an undisturbed run takes {full:?}");
    // Kills that found the run still going: the test is about those.
    let mut mid_run = 0;
    for i in 0..20 {
        // Not only a new id: without it the run would wait in reserve_id for the killed
        // run's second to pass, and the kills (timed on an undisturbed run) would land there.
        std::thread::sleep(Duration::from_millis(1100));
        let frac = (next_rand(&mut seed) % 1000) as f64 / 1000.0 * 1.2;
        let mut p = Proc::spawn(
            &["backup", "--no-election", "--config", cfg.to_str().unwrap()],
            w.path().join(format!("kill-{i}.log")),
            &[],
        );
        std::thread::sleep(full.mul_f64(frac));
        mid_run += usize::from(p.child.try_wait().unwrap().is_none());
        p.sigkill();
        for id in visible(&root) {
            assert_complete(&root.join(&id));
        }
        for h in hidden(&root) {
            assert!(h.contains(".partial-node-a-"), "kill {i}: {h}");
        }
        let _ = w.staged(); // asserts every staged set has its manifest
    }
    assert!(mid_run >= 5, "only {mid_run} of 20 kills landed mid-run");
    let staged_before: Vec<String> = w
        .staged()
        .into_iter()
        .filter(|(_, p)| !p.is_empty())
        .map(|(id, _)| id)
        .collect();
    let r = run(&["backup", "--no-election", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let sets = visible(&root);
    for id in &staged_before {
        assert!(sets.contains(id), "{id} was left undelivered: {sets:?}");
    }
    for id in &sets {
        assert_complete(&root.join(id));
    }
    assert!(hidden(&root).is_empty(), "{:?}", entries(&root));
    assert!(w.staging_tmp_files().is_empty(), "{:?}", w.staging_tmp_files());
    assert!(w.staged().iter().all(|(_, p)| p.is_empty()), "{:?}", w.staged());
}

/// SIGTERM to `backup` (elected) once its set is stored, while retention removes an older one
/// (the target's DELETE hangs): the run still ends at once and records its set, and retention
/// is left to the next run (nothing removed, nothing half removed). Without this, a stop in
/// that window left a stored set without its run's record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_retention_records_the_stored_set_and_skips_retention() {
    let etcd = Etcd::start();
    etcd.fill(None, 300, 500);
    let rclone = Rclone::start();
    let deletes = Arc::new(AtomicUsize::new(0));
    let d = deletes.clone();
    let fault = FaultProxy::start(rclone.url(), move |_, method, _, _| {
        if method == "DELETE" {
            d.fetch_add(1, SeqCst);
            return Fault::Stall;
        }
        Fault::Forward
    })
    .await;
    let w = Work::new();
    let keep_one = "\n[retention]\nkeep_last = 1\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\nmin_keep = 1\n";
    let cfg = w.write_dav_config(&etcd.endpoint, &fault.url(), keep_one);
    let root = rclone.root().join("test");
    let r = run_async(argv(&["backup"], &cfg), vec![]).await;
    assert_eq!(r.code, 0, "{}", r.all());
    let first = visible(&root);
    assert_eq!(first.len(), 1, "{first:?}");
    // A new one-second set id for the second run.
    while etcd_backupd::manifest::timestamp(chrono::Utc::now()) == first[0] {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut p = Proc::spawn(
        &["backup", "--config", cfg.to_str().unwrap()],
        w.path().join("backup.log"),
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while deletes.load(SeqCst) == 0 {
        assert!(Instant::now() < deadline, "retention never began: {}", p.log());
        assert!(p.running(), "the run ended before retention: {}", p.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let code = tokio::task::block_in_place(|| p.stop(Duration::from_secs(5)));
    assert_eq!(code, Some(0), "a stored set is a backup made: {}", p.log());
    assert!(p.log().contains("retention is left to the next run"), "{}", p.log());

    let sets = visible(&root);
    assert_eq!(
        sets.len(),
        2,
        "retention skipped, nothing removed: {:?}",
        entries(&root)
    );
    for s in &sets {
        assert_complete(&root.join(s));
    }
    let second = sets.iter().find(|s| **s != first[0]).unwrap();
    let marks = etcd_prefix(&etcd.endpoint, "/etcd-backupd/runs/");
    let rec = marks
        .values()
        .find(|m| m["id"].as_str() == Some(second.as_str()))
        .unwrap_or_else(|| panic!("the stopped run's set has no record: {marks:?}"));
    assert_eq!(rec["result"], "ok", "{rec}");
    assert!(etcd_get(&etcd.endpoint, "/etcd-backupd/lock").is_none());
}
