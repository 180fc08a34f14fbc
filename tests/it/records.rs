//! What a run's record says about its set (issue 19): `ok` only when the set is on every
//! target, `partial` (naming the targets) when it is on some, `pending` when it waits in
//! staging for all of them, `failed` only when no set was taken; and a record left partial or
//! pending is settled to `ok` once a later delivery brings the set to every target.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::{Etcd, Work, run};

/// Every run marker in etcd, oldest first.
fn markers(etcd: &Etcd) -> Vec<serde_json::Value> {
    crate::support::etcd_prefix(&etcd.endpoint, "/etcd-backupd/runs/")
        .into_values()
        .collect()
}

/// Makes a file target unable to take sets (even as root): its cluster folder is a file.
fn block_cluster_folder(root: &Path) {
    std::fs::create_dir_all(root).unwrap();
    std::fs::write(root.join("test"), b"not a folder").unwrap();
}

fn unblock_cluster_folder(root: &Path) {
    std::fs::remove_file(root.join("test")).unwrap();
}

fn backup(cfg: &Path) -> crate::common::Run {
    run(&["backup", "--config", cfg.to_str().unwrap()])
}

/// An etcd with 50 keys and a node configured for it with `extra`, whose first `backup` failed
/// (exit 1) because its target could not take the set (the cluster folder is a file, which
/// stops even root): the set waits in staging, and the target stays blocked until
/// [`unblock_cluster_folder`].
fn first_run_blocked(extra: &str) -> (Etcd, Work, PathBuf) {
    let etcd = Etcd::start();
    etcd.fill(None, 50, 100);
    let w = Work::new();
    let cfg = w.write_config(&etcd.endpoint, None, extra);
    block_cluster_folder(&w.target_root());
    let first = backup(&cfg);
    assert_eq!(first.code, 1, "{}", first.all());
    (etcd, w, cfg)
}

/// The ids of the sets on `w`'s file target, sorted.
fn set_ids(w: &Work) -> Vec<String> {
    w.sets()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

fn status_runs(cfg: &Path) -> Vec<serde_json::Value> {
    let out = run(&["status", "--json", "--config", cfg.to_str().unwrap()]);
    // The verdict's exit code (0, 4 or 1): the runs are read whatever it is.
    assert!(matches!(out.code, 0 | 1 | 4), "{}", out.all());
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    v["runs"].as_array().cloned().unwrap_or_default()
}

#[test]
fn a_set_owed_to_its_only_target_is_pending_then_settled_to_ok_when_delivered() {
    let (etcd, w, cfg) = first_run_blocked("");
    let m = markers(&etcd);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0]["result"], "pending", "a set was taken and waits in staging: {m:?}");
    assert_eq!(m[0]["missing"], serde_json::json!(["local"]), "{m:?}");
    let first_id = m[0]["id"].as_str().unwrap().to_string();
    assert_eq!(w.staged().len(), 1);
    assert_eq!(status_runs(&cfg)[0]["result"], "pending");

    // The target is back: the next run delivers the waiting set first, then its own.
    unblock_cluster_folder(&w.target_root());
    let second = backup(&cfg);
    assert_eq!(second.code, 0, "{}", second.all());
    let sets = set_ids(&w);
    assert!(sets.contains(&first_id), "{sets:?}");
    assert_eq!(sets.len(), 2, "{sets:?}");
    let m = markers(&etcd);
    assert_eq!(m.len(), 2, "{m:?}");
    for rec in &m {
        assert_eq!(rec["result"], "ok", "every set is on its target now: {m:?}");
        assert!(rec.get("missing").is_none(), "{rec}");
    }
    let runs = status_runs(&cfg);
    assert!(runs.len() >= 2, "{runs:?}");
    assert!(runs.iter().take(2).all(|r| r["result"] == "ok"), "{runs:?}");
}

#[test]
fn a_set_on_some_targets_is_partial_naming_them_never_failed() {
    let etcd = Etcd::start();
    etcd.fill(None, 50, 100);
    let w = Work::new();
    let second_root = w.path().join("second");
    block_cluster_folder(&second_root);
    let cfg = w.write_config(
        &etcd.endpoint,
        None,
        &format!(
            "\n[[target]]\nname = \"second\"\nurl = \"file://{}\"\n",
            second_root.display()
        ),
    );
    let r = backup(&cfg);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("second"), "{}", r.stderr);
    let m = markers(&etcd);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0]["result"], "partial", "{m:?}");
    assert_eq!(m[0]["stored"], serde_json::json!(["local"]), "{m:?}");
    assert_eq!(m[0]["missing"], serde_json::json!(["second"]), "{m:?}");
    assert_eq!(w.sets().len(), 1, "the set is on the target that took it");
    assert_eq!(status_runs(&cfg)[0]["result"], "partial");
}

#[test]
fn an_id_taken_on_the_target_by_another_set_does_not_hold_back_newer_sets() {
    // A first set, then the same id taken on the target by a different set (another node's
    // set under that id, as when two nodes once stored different sets in one second).
    let (etcd, w, cfg) = first_run_blocked("");
    let staged = w.staged();
    assert_eq!(staged.len(), 1, "{staged:?}");
    let stuck_id = staged[0].0.clone();
    unblock_cluster_folder(&w.target_root());
    let squatter = w.target_root().join("test").join(&stuck_id);
    std::fs::create_dir_all(&squatter).unwrap();
    std::fs::write(squatter.join("manifest.json"), b"{}").unwrap();
    // The stuck set cannot go; the new one still does, in the same pass.
    let r = backup(&cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    let m = markers(&etcd);
    let newest = m.iter().find(|x| x["id"] != stuck_id.as_str()).unwrap();
    assert_eq!(newest["result"], "ok", "{m:?}");
    assert!(
        w.target_root()
            .join("test")
            .join(newest["id"].as_str().unwrap())
            .join("manifest.json")
            .exists()
    );
    assert!(r.all().contains("already exists"), "{}", r.all());
}

#[test]
fn a_set_staged_for_a_run_another_node_recorded_is_never_delivered() {
    // This node takes a run's set but cannot deliver it (as a runner killed after staging).
    let (etcd, w, cfg) = first_run_blocked("");
    let m = markers(&etcd);
    assert_eq!(m.len(), 1, "{m:?}");
    let run1 = m[0]["run"].as_str().unwrap().to_string();
    let id1 = m[0]["id"].as_str().unwrap().to_string();
    // Meanwhile another node completed that run with a set of its own.
    let other = serde_json::json!({"run": run1, "node": "node-b", "id": "2026-01-01_000000", "result": "ok", "finished": "2026-01-01T00:00:00Z"});
    etcd.put(None, &format!("/etcd-backupd/runs/{run1}"), &other.to_string());
    unblock_cluster_folder(&w.target_root());
    let r = backup(&cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stderr.contains("another set is this run's backup"), "{}", r.stderr);
    let on_target = set_ids(&w);
    assert_eq!(on_target.len(), 1, "{on_target:?}");
    assert!(
        !on_target.contains(&id1),
        "a second set for {run1} was stored: {on_target:?}"
    );
    // It stays a local copy owed to no one (or is dropped as an older copy): never delivered.
    let staged = w.staged();
    assert!(
        staged.iter().all(|(id, pending)| *id != id1 || pending.is_empty()),
        "{staged:?}"
    );
}

#[test]
fn a_set_of_an_elected_run_waits_while_etcd_cannot_be_asked() {
    let (etcd, w, cfg) = first_run_blocked("\n[schedule]\ncron = \"\"\n");
    unblock_cluster_folder(&w.target_root());
    drop(etcd);
    // The daemon's delivery pass at start: etcd is gone, so the set is not delivered unchecked.
    let d = crate::common::Proc::daemon(&cfg, w.path().join("daemon.log"), &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = d.log();
        if text.contains("sets of elected runs wait") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(d);
    assert!(text.contains("sets of elected runs wait"), "{text}");
    assert!(w.sets().is_empty(), "delivered unchecked: {:?}", w.sets());
    assert_eq!(w.staged()[0].1, vec!["local".to_string()], "still owed");
}

/// Sets complete on the rclone root, by id (cluster `test`).
fn sets_on(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join("test"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("manifest.json").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_down_for_20_s_misses_no_snapshot_and_gets_the_sets_oldest_first_when_back() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let etcd = Etcd::start();
    etcd.fill(None, 50, 100);
    let rclone = crate::servers::Rclone::start();
    let down = Arc::new(AtomicBool::new(true));
    let d = down.clone();
    // Every request answered 503 while the target is down: transient, retried within the
    // default retry budget (3 minutes), which must never hold the next snapshot back. Up to
    // 4 runs fall in the outage: max_pending above them, so none is dropped by design.
    let fault = crate::servers::FaultProxy::start(rclone.url(), move |_, _, _, _| {
        if d.load(Ordering::SeqCst) {
            crate::servers::Fault::Respond(503, "down for maintenance".into())
        } else {
            crate::servers::Fault::Forward
        }
    })
    .await;
    let w = Work::new();
    let cfg = w.write_config_targets(
        &etcd.endpoint,
        &format!(
            "[schedule]\ncron = \"*/6 * * * * *\"\njitter = \"0s\"\n\n[delivery]\nmax_pending = 10\n\n[[target]]\nname = \"dav\"\nurl = \"{}\"\n",
            fault.url()
        ),
    );
    let log = w.path().join("daemon.log");
    let daemon = crate::common::Proc::daemon(&cfg, log.clone(), &[]);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let staged_during = w.staged();
    // Nothing got through while it was down (checked before it is back: a retry in flight
    // may store a set the moment it is).
    assert!(sets_on(&rclone.root()).is_empty());
    down.store(false, Ordering::SeqCst);
    let back = std::time::Instant::now();
    let outage: Vec<String> = staged_during.iter().map(|(id, _)| id.clone()).collect();
    // Every 6 s for 20 s: at least 3 snapshots taken while the target was down.
    assert!(
        outage.len() >= 3,
        "{outage:?}\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    // Visible on the target comes a moment before the daemon logs it stored (it checks the
    // set where it landed first): wait for both.
    let logged = |id: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("backup set stored") && l.contains(id))
    };
    loop {
        let on = sets_on(&rclone.root());
        if outage.iter().all(|id| on.contains(id) && logged(id)) {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(60),
            "not delivered within a minute of the target's return: {on:?} of {outage:?}\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(daemon);
    // Oldest first: the "backup set stored" lines of the outage's sets come in id order.
    let text = std::fs::read_to_string(&log).unwrap();
    let stored: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("backup set stored"))
        .filter_map(|l| outage.iter().find(|id| l.contains(id.as_str())).map(String::as_str))
        .collect();
    assert_eq!(stored.len(), outage.len(), "each outage set stored once:\n{text}");
    let mut sorted = stored.clone();
    sorted.sort();
    assert_eq!(stored, sorted, "{text}");
}

/// A manual `backup` beside a running daemon (both write the node's state file): no run of
/// either is lost from `status`, whichever writes last.
#[test]
fn a_manual_backup_beside_a_running_daemon_loses_no_run_from_status() {
    let etcd = Etcd::start();
    etcd.fill(None, 20, 100);
    let w = Work::new();
    let cfg = w.write_config(
        &etcd.endpoint,
        None,
        "\n[schedule]\ncron = \"* * * * * *\"\njitter = \"0s\"\n",
    );
    let log = w.path().join("daemon.log");
    let mut daemon = crate::common::Proc::daemon(&cfg, log.clone(), &[]);
    std::thread::sleep(Duration::from_secs(2));
    let manual = 6;
    for _ in 0..manual {
        // Each either runs (0) or finds the daemon's run holding staging (3): both are runs.
        let out = backup(&cfg);
        assert!(out.code == 0 || out.code == 3, "{}", out.all());
    }
    assert_eq!(daemon.stop(Duration::from_secs(10)), Some(0), "{}", daemon.log());
    let runs = status_runs(&cfg);
    let by = |trigger: &str| runs.iter().filter(|r| r["trigger"] == trigger).count();
    assert!(
        runs.len() < 20,
        "the history keeps 20 runs; this test needs fewer: {runs:?}"
    );
    assert_eq!(by("manual"), manual, "{runs:?}");
    // Every daemon run that ended is in the history too: as many as it logged.
    let text = std::fs::read_to_string(&log).unwrap();
    let ended = text
        .lines()
        .filter(|l| {
            [
                "backup succeeded",
                "backup skipped",
                "backup failed",
                "another node ran this backup",
                "not stored on every target",
            ]
            .iter()
            .any(|m| l.contains(m))
        })
        .count();
    assert!(ended >= 2, "{text}");
    assert_eq!(by("schedule"), ended, "{runs:?}\n{text}");
}

/// Copies a folder tree (the previous release's sets into a target).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// A rolling update: nodes of the previous release and of this one share the election's
/// records and the targets. Records and sets the previous release wrote
/// (`tests/fixtures/previous-release`, made with its binary) are read by this one as they
/// mean, and this release's run beside them changes none of them and deletes no set of theirs.
#[test]
fn records_and_sets_the_previous_release_wrote_are_read_and_kept() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/previous-release");
    let records: BTreeMap<String, String> =
        serde_json::from_slice(&std::fs::read(fixtures.join("records.json")).unwrap()).unwrap();
    let etcd = Etcd::start();
    etcd.fill(None, 20, 100);
    for (key, value) in &records {
        let out = crate::support::etcdctl(&etcd.endpoint)
            .args(["put", key, value])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let w = Work::new();
    copy_tree(&fixtures.join("target"), &w.target_root());
    let old_ids = set_ids(&w);
    assert_eq!(old_ids.len(), 2, "{old_ids:?}");
    let cfg = w.write_config(
        &etcd.endpoint,
        None,
        "\n[election]\nenabled = true\n[retention]\nkeep_last = 5\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\nmin_keep = 1\n",
    );
    let c = cfg.to_str().unwrap();

    // The previous release's sets: listed whole, verified.
    let r = run(&["list", "--json", "--config", c]);
    assert_eq!(r.code, 0, "{}", r.all());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let listed: Vec<&str> = v["sets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["manifest"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 2, "{v}");
    assert!(
        v["sets"].as_array().unwrap().iter().all(|s| s["damaged"].is_null()),
        "{v}"
    );
    for id in &old_ids {
        let r = run(&["verify", id, "--config", c]);
        assert_eq!(r.code, 0, "{id}: {}", r.all());
    }
    // Its records: the cluster's last elected run, node-b's, read as the success it was.
    let out = run(&["status", "--json", "--config", c]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let last = &v["cluster_last_run"];
    assert_eq!(
        (last["run"].as_str(), last["result"].as_str()),
        (Some("manual-node-b-2026-12-07_215848"), Some("ok")),
        "{v}"
    );

    // This release's run beside them: elected, stored, and nothing of theirs changed.
    let r = backup(&cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    let ids = set_ids(&w);
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(old_ids.iter().all(|id| ids.contains(id)), "{ids:?}");
    for (key, value) in &records {
        if key == "/etcd-backupd/last" {
            continue; // the newest run's, now this one's
        }
        let now = crate::support::etcd_get(&etcd.endpoint, key);
        // A note of a set being published may have expired with its lease: never rewritten.
        if key.contains("/publishing/") && now.is_none() {
            continue;
        }
        assert_eq!(now.as_deref(), Some(value.as_str()), "{key} was changed");
    }
    let last: serde_json::Value =
        serde_json::from_str(&crate::support::etcd_get(&etcd.endpoint, "/etcd-backupd/last").unwrap()).unwrap();
    assert_eq!(last["result"], "ok", "{last}");
    assert_eq!(last["node"], "node-a", "{last}");
    // Retention by this release keeps what the policy keeps, theirs included.
    let r = run(&["prune", "--config", c]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(set_ids(&w), ids);
}

/// A daemon that takes no backups (an empty `schedule.cron`: a drill host delivering a set
/// `rebase` derived) delivers what its staging owes and applies no retention, whatever its
/// `[retention]` says: pruning stays with the nodes that back up.
#[test]
fn a_daemon_without_a_schedule_delivers_but_never_prunes() {
    let etcd = Etcd::start();
    etcd.fill(None, 50, 100);
    let w = Work::new();
    let cfg = w.write_config(&etcd.endpoint, None, crate::support::NO_RETENTION);
    for _ in 0..2 {
        let r = backup(&cfg);
        assert_eq!(r.code, 0, "{}", r.all());
    }
    // The target's root gone for a while (an unmounted share): the third set waits in staging.
    let away = w.path().join("target-away");
    std::fs::rename(w.target_root(), &away).unwrap();
    let blocked = backup(&cfg);
    assert_eq!(blocked.code, 1, "{}", blocked.all());
    std::fs::rename(&away, w.target_root()).unwrap();
    let before = set_ids(&w);
    assert_eq!(before.len(), 2, "{before:?}");
    // Retention that would keep only the newest set, were it applied.
    let keep_one = "[schedule]\ncron = \"\"\n[retention]\nkeep_last = 1\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\nmin_keep = 1\n";
    let cfg = w.write_config(&etcd.endpoint, None, keep_one);
    let mut d = crate::common::Proc::daemon(&cfg, w.path().join("daemon.log"), &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !d.log().contains("every pending backup set is delivered") {
        assert!(std::time::Instant::now() < deadline, "not delivered: {}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = set_ids(&w);
    assert_eq!(
        after.len(),
        3,
        "the pending set delivered, none pruned: {after:?}\n{}",
        d.log()
    );
    assert!(before.iter().all(|id| after.contains(id)), "{before:?} {after:?}");
    assert_eq!(d.stop(Duration::from_secs(10)), Some(0), "{}", d.log());
}
