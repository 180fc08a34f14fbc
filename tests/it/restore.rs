//! The second half of a backup's life: retention on a month of sets, delivery to a target
//! that was down, and the restore side (`fetch`, `verify`, `verify --deep`) against a real
//! etcd, Apache mod_dav and the etcd tools.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use etcd_backupd::manifest::{Manifest, Trigger};

use crate::common::{Etcd, Run, Work, argv, made_up_manifest, plain_file, run, run_async_plain, static_pod_fixture};
use crate::servers::{Apache, DAV_USER, Fault, FaultProxy, Rclone};
use crate::webdav::backup_async;

/// Writes a complete set of `cluster` straight onto a file target, as if taken at `created`.
pub(crate) fn fake_set(root: &Path, cluster: &str, created: chrono::DateTime<chrono::Utc>) -> String {
    let id = etcd_backupd::manifest::timestamp(created);
    let dir = root.join(cluster).join(&id);
    std::fs::create_dir_all(&dir).unwrap();
    let name = format!("snapshot_{id}.db");
    let data = format!("not a real snapshot {id}");
    std::fs::write(dir.join(&name), &data).unwrap();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(data.as_bytes()));
    let m = made_up_manifest(
        cluster,
        &id,
        &created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        Trigger::Schedule,
        "node-a",
        vec![plain_file(&name, data.len() as u64, &sha)],
    );
    std::fs::write(dir.join("SHA256SUMS"), m.sha256sums()).unwrap();
    std::fs::write(dir.join("manifest.json"), m.to_json()).unwrap();
    id
}

/// `cli` with `--config cfg` appended.
fn cli_cfg(list: &[&str], cfg: &Path) -> Run {
    run(&argv(list, cfg).iter().map(String::as_str).collect::<Vec<_>>())
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|e| e.map(|e| e.unwrap().file_name().into_string().unwrap()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_simulated_month_is_pruned_to_exactly_the_policy() {
    let w = Work::new();
    let root = w.target_root();
    // 35 nightly sets, 02:30 UTC, ending Wednesday 2026-11-25; plus another cluster's sets.
    let last = chrono::DateTime::parse_from_rfc3339("2026-11-25T02:30:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    for day in 0..35 {
        fake_set(&root, "test", last - chrono::TimeDelta::days(day));
    }
    let other: Vec<String> = (0..10)
        .map(|d| fake_set(&root, "other", last - chrono::TimeDelta::days(d)))
        .collect();
    // Debris: this node's, another node's fresh one, another node's day-old one.
    for name in [
        ".2026-11-25_023000.partial-node-a-0000abcd",
        ".2026-11-25_023000.partial-node-b-0000abcd",
    ] {
        std::fs::create_dir_all(root.join("test").join(name)).unwrap();
    }
    let old_debris = root.join("test").join(".2026-11-20_023000.partial-node-b-00001234");
    std::fs::create_dir_all(&old_debris).unwrap();
    let status = Command::new("touch")
        .args(["-d", "3 days ago"])
        .arg(&old_debris)
        .status()
        .unwrap();
    assert!(status.success());

    // Retention counts in the schedule's zone; "now" is the real clock, so no max_age here.
    let cfg = w.write_config(
        "http://127.0.0.1:1",
        None,
        "\n[retention]\nkeep_last = 3\nkeep_daily = 7\nkeep_weekly = 4\nkeep_monthly = 2\nmin_keep = 0\n",
    );
    let before = names_in(&root.join("test"));

    // The plan, with reasons, changes nothing.
    let r = run(&argv(&["prune", "--dry-run"], &cfg)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("35 set(s), keep 10, would delete 25"), "{}", r.stdout);
    assert!(
        r.stdout.contains(
            "2026-11-25_023000  keep: last 1, daily 2026-11-25, weekly 2026-W48, monthly 2026-11, newest set"
        ),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("2026-10-31_023000  keep: monthly 2026-10"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("2026-11-01_023000  delete: matches no keep rule"),
        "{}",
        r.stdout
    );
    assert_eq!(names_in(&root.join("test")), before);

    // `list --wide` shows the same reasons (the default table says them in a word each).
    let r = cli_cfg(&["list", "--wide"], &cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    let line = r.stdout.lines().find(|l| l.contains("2026-11-15_023000")).unwrap();
    assert!(line.ends_with("keep: weekly 2026-W46"), "{line}");

    let r = cli_cfg(&["prune"], &cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    let want = [
        ".2026-11-25_023000.partial-node-b-0000abcd", // another node's, still fresh
        "2026-10-31_023000",
        "2026-11-08_023000",
        "2026-11-15_023000",
        "2026-11-19_023000",
        "2026-11-20_023000",
        "2026-11-21_023000",
        "2026-11-22_023000",
        "2026-11-23_023000",
        "2026-11-24_023000",
        "2026-11-25_023000",
    ];
    assert_eq!(names_in(&root.join("test")), want);
    assert!(r.stdout.contains("removed 2 incomplete upload(s)"), "{}", r.stdout);
    // Another cluster's folder is never touched.
    let mut other_sorted = other.clone();
    other_sorted.sort();
    assert_eq!(names_in(&root.join("other")), other_sorted);
    // Pruning again is a no-op.
    let r = cli_cfg(&["prune"], &cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(names_in(&root.join("test")), want);

    // After a failed backup on this node, prune deletes nothing unless forced.
    let r = run(&argv(&["backup", "--no-election"], &cfg)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert_eq!(r.code, 1, "{}", r.all());
    let strict = w.write_config(
        "http://127.0.0.1:1",
        None,
        "\n[retention]\nkeep_last = 1\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\nmin_keep = 0\n",
    );
    let r = cli_cfg(&["prune"], &strict);
    // A refusal on purpose: exit 3, as the product contract has it.
    assert_eq!(r.code, 3, "{}", r.all());
    assert!(
        r.stderr.contains("newest backup") && r.stderr.contains("failed"),
        "{}",
        r.stderr
    );
    assert_eq!(names_in(&root.join("test")), want);
    let r = run(&argv(&["prune", "--force"], &strict)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(
        names_in(&root.join("test")),
        [".2026-11-25_023000.partial-node-b-0000abcd", "2026-11-25_023000"]
    );
}

fn dav_sets(root: &Path) -> Vec<String> {
    names_in(&root.join("test"))
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_down_for_three_runs_gets_every_set_once_when_back() {
    let etcd = Etcd::start();
    etcd.fill(None, 200, 300);
    let rclone = Rclone::start();
    let down = Arc::new(AtomicBool::new(true));
    let d = down.clone();
    let fault = FaultProxy::start(rclone.url(), move |_, _, _, _| {
        if d.load(Ordering::SeqCst) {
            Fault::Respond(503, "<p>maintenance</p>".into())
        } else {
            Fault::Forward
        }
    })
    .await;
    let w = Work::new();
    let cfg = w.write_dav_config(&etcd.endpoint, &fault.url(), "retry_budget = \"1s\"\n");
    let mut taken = Vec::new();
    for run in 1..=3 {
        let r = backup_async(cfg.clone()).await;
        assert_eq!(r.code, 1, "{}", r.all());
        assert!(r.stderr.contains("503 Service Unavailable"), "{}", r.stderr);
        assert!(r.stderr.contains("stays in staging"), "{}", r.stderr);
        let staged = w.staged();
        assert_eq!(staged.len(), run, "{staged:?}");
        assert!(staged.iter().all(|(_, p)| p == &["dav".to_string()]), "{staged:?}");
        taken.push(staged.last().unwrap().0.clone());
        etcd.put(None, &format!("run-{run}"), "x");
    }
    assert!(dav_sets(&rclone.root()).is_empty());
    let r = run_async_plain(argv(&["status", "--json"], &cfg)).await;
    let status: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(status["pending"].as_array().unwrap().len(), 3, "{status}");

    down.store(false, Ordering::SeqCst);
    let r = backup_async(cfg.clone()).await;
    assert_eq!(r.code, 0, "{}", r.all());
    let new_id = w.staged().last().unwrap().0.clone();
    taken.push(new_id);
    let mut want = taken.clone();
    want.sort();
    assert_eq!(dav_sets(&rclone.root()), want, "every set delivered, each once");
    // Oldest first: the log shows them stored in id order.
    let stored: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains("backup set stored"))
        .map(|l| {
            let i = l.find("backup_id=").unwrap() + "backup_id=".len();
            &l[i..i + 17]
        })
        .collect();
    assert_eq!(stored, want.iter().map(String::as_str).collect::<Vec<_>>());
    for id in &want {
        crate::common::assert_sha256sums(&rclone.root().join("test").join(id));
    }
    // Nothing is owed any more; staging keeps one local copy, the newest.
    assert_eq!(w.staged(), vec![(want.last().unwrap().clone(), vec![])]);
    assert!(
        names_in(&rclone.root().join("test"))
            .iter()
            .all(|n| !n.starts_with('.'))
    );

    // max_pending bounds what waits: with 1, a second failed run drops the older set.
    down.store(true, Ordering::SeqCst);
    let text = std::fs::read_to_string(&cfg).unwrap() + "\n[delivery]\nmax_pending = 1\n";
    std::fs::write(&cfg, text).unwrap();
    let r1 = backup_async(cfg.clone()).await;
    assert_eq!(r1.code, 1, "{}", r1.all());
    let r2 = backup_async(cfg.clone()).await;
    assert_eq!(r2.code, 1, "{}", r2.all());
    assert!(r2.stderr.contains("delivery.max_pending (1)"), "{}", r2.stderr);
    let staged = w.staged();
    assert_eq!(staged.iter().filter(|(_, p)| !p.is_empty()).count(), 1, "{staged:?}");
}

/// Puts a ClusterVersion for `version` into `etcd`.
fn cluster_version(etcd: &Etcd, version: &str) {
    etcd.put(
        None,
        "/kubernetes.io/config.openshift.io/clusterversions/version",
        &format!(
            r#"{{"spec":{{"clusterID":"c0ffee"}},"status":{{"desired":{{"version":"{version}"}},"history":[{{"state":"Completed","version":"{version}","completionTime":"2026-01-01T00:00:00Z"}}]}}}}"#
        ),
    );
    crate::common::settle_operators(etcd, None);
}

/// Which files `cluster-restore.sh` would take from `dir`: the version-sorted last
/// `snapshot*.db` and `static_kuberesources*.tar.gz`, each picked on its own.
fn restore_script_picks(dir: &Path) -> (String, String) {
    let pick = |pattern: &str| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("ls -1 {pattern} 2>/dev/null | sort -V | tail -n 1"))
            .current_dir(dir)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    (pick("snapshot*.db"), pick("static_kuberesources*.tar.gz"))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_from_webdav_restores_and_tampering_or_a_version_mismatch_is_refused() {
    let etcd = Etcd::start();
    etcd.fill(None, 500, 200);
    for i in 0..5 {
        etcd.put(None, &format!("/kubernetes.io/namespaces/ns-{i}"), "{}");
    }
    cluster_version(&etcd, "4.15.4");
    let apache = Apache::start();
    let w = Work::new();
    let resources = w.path().join("etc-kubernetes");
    static_pod_fixture(&resources, 3);
    let target = format!(
        "[[target]]\nname = \"offsite\"\nurl = \"{}\"\nusername = \"{DAV_USER}\"\npassword_file = \"{}\"\nca_file = \"{}\"\n",
        apache.url(),
        apache.password_file(w.path()).display(),
        apache.pki.ca.display()
    );
    let cfg = w.write_config_targets(&etcd.endpoint, &target);
    w.set_static_resources_dir(&resources);
    let r = backup_async(cfg.clone()).await;
    assert_eq!(r.code, 0, "{}", r.all());
    let id = dav_sets(&apache.root()).pop().unwrap();

    // Into a directory that does not exist yet.
    let dir = w.path().join("assets/backup");
    let r = run_async_plain(argv(&["fetch", "latest", "--to", dir.to_str().unwrap()], &cfg)).await;
    assert_eq!(r.code, 0, "{}", r.all());
    let snapshot = format!("snapshot_{id}.db");
    let archive = format!("static_kuberesources_{id}.tar.gz");
    let mut want = vec![snapshot.clone(), archive.clone()];
    want.sort();
    assert_eq!(names_in(&dir), want);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(&snapshot)), 0o600);
    assert_eq!(mode(&dir.join(&archive)), 0o600);
    assert_eq!(restore_script_picks(&dir), (snapshot.clone(), archive.clone()));
    assert!(r.stdout.contains("cluster-restore.sh"), "{}", r.stdout);
    assert!(r.stdout.contains("etcd's snapshot trailer verified"), "{}", r.stdout);
    // The fetched files are byte for byte what the target holds.
    for f in [&snapshot, &archive] {
        assert_eq!(
            std::fs::read(dir.join(f)).unwrap(),
            std::fs::read(apache.root().join("test").join(&id).join(f)).unwrap()
        );
    }

    // Restored with etcdctl into a new etcd, the original keys are served.
    let data = w.path().join("restored");
    let restored = Etcd::from_snapshot(None, &dir.join(&snapshot), &data);
    let out = restored
        .etcdctl(None)
        .args(["get", "--prefix", "/kubernetes.io/namespaces/", "--keys-only"])
        .output()
        .unwrap();
    let keys = String::from_utf8(out.stdout).unwrap();
    assert_eq!(keys.lines().filter(|l| !l.is_empty()).count(), 5, "{keys}");
    drop(restored);

    // A non-empty directory is refused and left alone; --force replaces the set in it.
    let r = run_async_plain(argv(&["fetch", &id, "--to", dir.to_str().unwrap()], &cfg)).await;
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("is not empty"), "{}", r.stderr);
    assert_eq!(names_in(&dir), want);
    std::fs::write(dir.join("snapshot_2020-01-01_000000.db"), "old").unwrap();
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    let r = run_async_plain(argv(&["fetch", &id, "--to", dir.to_str().unwrap(), "--force"], &cfg)).await;
    assert_eq!(r.code, 0, "{}", r.all());
    let mut with_notes = want.clone();
    with_notes.push("notes.txt".into());
    with_notes.sort();
    assert_eq!(names_in(&dir), with_notes);

    // `verify` and the restore drill (etcdctl 3.4's snapshot restore + a throwaway etcd).
    let r = run_async_plain(argv(&["verify", "latest", "--deep"], &cfg)).await;
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains(": OK"), "{}", r.stdout);
    assert!(r.stdout.contains("5 namespaces"), "{}", r.stdout);
    assert!(r.stdout.contains("ClusterVersion 4.15.4"), "{}", r.stdout);
    let r = run_async_plain(argv(&["status", "--json"], &cfg)).await;
    let status: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(status["last_drill"]["ok"], true, "{status}");

    // The running cluster moved on to 4.15.5: the 4.15.4 set is refused.
    cluster_version(&etcd, "4.15.5");
    let other = w.path().join("other");
    let r = run_async_plain(argv(&["fetch", &id, "--to", other.to_str().unwrap()], &cfg)).await;
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("4.15.4") && r.stderr.contains("4.15.5"),
        "{}",
        r.stderr
    );
    assert!(!other.exists() || names_in(&other).is_empty());
    let r = run_async_plain(argv(
        &[
            "fetch",
            &id,
            "--to",
            other.to_str().unwrap(),
            "--allow-version-mismatch",
        ],
        &cfg,
    ))
    .await;
    assert_eq!(r.code, 0, "{}", r.all());

    // One byte changed on the server: verify and fetch both catch it, fetch leaves nothing.
    let stored = apache.root().join("test").join(&id).join(&snapshot);
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes[4096] ^= 0x01;
    std::fs::write(&stored, &bytes).unwrap();
    let r = run_async_plain(argv(&["verify", &id], &cfg)).await;
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains(&snapshot) && r.stderr.contains("altered or corrupted"),
        "{}",
        r.stderr
    );
    let third = w.path().join("third");
    let r = run_async_plain(argv(
        &[
            "fetch",
            &id,
            "--to",
            third.to_str().unwrap(),
            "--allow-version-mismatch",
        ],
        &cfg,
    ))
    .await;
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains(&snapshot) && r.stderr.contains("altered or corrupted"),
        "{}",
        r.stderr
    );
    assert!(names_in(&third).is_empty(), "{:?}", names_in(&third));
}

/// A truncated archive is caught even though its manifest and sums were rewritten to match
/// (a consistent server-side truncation): the tar.gz check still fails.
#[test]
fn verify_catches_a_truncated_archive_with_matching_sums() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();
    let resources = w.path().join("etc-kubernetes");
    static_pod_fixture(&resources, 3);
    let cfg = w.write_config(&etcd.endpoint, None, "");
    w.set_static_resources_dir(&resources);
    let r = run(&argv(&["backup", "--no-election"], &cfg)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert_eq!(r.code, 0, "{}", r.all());
    let set: PathBuf = w.sets().pop().unwrap();
    let id = set.file_name().unwrap().to_str().unwrap().to_string();
    let archive = set.join(format!("static_kuberesources_{id}.tar.gz"));
    let bytes = std::fs::read(&archive).unwrap();
    let cut = &bytes[..bytes.len() / 2];
    std::fs::write(&archive, cut).unwrap();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(cut));
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(set.join("manifest.json")).unwrap()).unwrap();
    for f in m["files"].as_array_mut().unwrap() {
        if f["name"].as_str().unwrap().starts_with("static_") {
            f["size"] = cut.len().into();
            f["stored_size"] = cut.len().into();
            f["sha256"] = sha.clone().into();
            f["stored_sha256"] = sha.clone().into();
        }
    }
    let m: Manifest = serde_json::from_value(m).unwrap();
    std::fs::write(set.join("manifest.json"), m.to_json()).unwrap();
    std::fs::write(set.join("SHA256SUMS"), m.sha256sums()).unwrap();
    let r = run(&argv(&["verify", &id], &cfg)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("static_kuberesources") && r.stderr.contains("corrupt"),
        "{}",
        r.stderr
    );
}

/// Parses Prometheus text into name{labels} -> value.
fn metrics_of(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

#[test]
fn metrics_after_a_successful_and_a_failed_run() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();
    let prom = w.path().join("etcd-backupd.prom");
    let cfg = w.write_config(
        &etcd.endpoint,
        None,
        &format!("\n[metrics]\ntextfile = \"{}\"\n", prom.display()),
    );
    let started = chrono::Utc::now().timestamp() as f64;
    let r = run(&argv(&["backup", "--no-election"], &cfg)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert_eq!(r.code, 0, "{}", r.all());
    let m = metrics_of(&std::fs::read_to_string(&prom).unwrap());
    assert_eq!(m["etcd_backupd_last_attempt_success"], 1.0, "{m:?}");
    assert!(m["etcd_backupd_last_success_timestamp_seconds"] >= started, "{m:?}");
    assert!(m["etcd_backupd_last_bytes"] > 0.0, "{m:?}");
    assert_eq!(m["etcd_backupd_pending_sets"], 0.0);
    assert_eq!(m["etcd_backupd_runs_total{result=\"ok\"}"], 1.0);
    assert_eq!(m["etcd_backupd_is_runner"], 0.0);
    let success_at = m["etcd_backupd_last_success_timestamp_seconds"];

    // The target's filesystem goes away: the set waits in staging (the run is pending, not
    // failed: a set was taken) and the attempt counts as unsuccessful.
    let target = w.target_root();
    std::fs::rename(&target, w.path().join("unmounted")).unwrap();
    let r = run(&argv(&["backup", "--no-election"], &cfg)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert_eq!(r.code, 1, "{}", r.all());
    let m = metrics_of(&std::fs::read_to_string(&prom).unwrap());
    assert_eq!(m["etcd_backupd_last_attempt_success"], 0.0, "{m:?}");
    assert_eq!(m["etcd_backupd_last_success_timestamp_seconds"], success_at);
    assert_eq!(m["etcd_backupd_pending_sets"], 1.0);
    assert_eq!(m["etcd_backupd_runs_total{result=\"pending\"}"], 1.0);
    assert_eq!(m["etcd_backupd_runs_total{result=\"failed\"}"], 0.0);
    assert_eq!(m["etcd_backupd_runs_total{result=\"ok\"}"], 1.0);
}

/// Puts a ClusterVersion into `etcd` desiring `desired`, with `history` (state, version)
/// newest first; the oldest entry completed long ago (the install).
fn cluster_version_history(etcd: &Etcd, desired: &str, history: &[(&str, &str)]) {
    let entries: Vec<serde_json::Value> = history
        .iter()
        .map(|(state, version)| {
            let done = (*state == "Completed").then_some("2026-01-01T00:00:00Z");
            serde_json::json!({"state": state, "version": version, "startedTime": "2026-01-01T00:00:00Z", "completionTime": done})
        })
        .collect();
    let cv = serde_json::json!({"spec": {"clusterID": "c0ffee"}, "status": {"desired": {"version": desired}, "history": entries}});
    etcd.put(
        None,
        "/kubernetes.io/config.openshift.io/clusterversions/version",
        &cv.to_string(),
    );
    crate::common::settle_operators(etcd, None);
}

/// Takes a backup with `cfg`; returns the new set's id (the newest on the file target).
fn backup_now(w: &Work, cfg: &Path) -> String {
    let r = cli_cfg(&["backup", "--no-election"], cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    let set = w.sets().pop().unwrap();
    set.file_name().unwrap().to_str().unwrap().to_string()
}

/// Issue 14, point 3: during a failed upgrade (history `Partial` 4.15.5, before it
/// `Completed` 4.15.4) a set of 4.15.4, taken before the upgrade, is what can be restored.
#[test]
fn fetch_during_a_failed_upgrade_accepts_the_last_completed_version() {
    let etcd = Etcd::start();
    etcd.fill(None, 50, 100);
    etcd.put(None, "/kubernetes.io/namespaces/default", "{}");
    let w = Work::new();
    let cfg = w.write_config(&etcd.endpoint, None, "");
    cluster_version_history(&etcd, "4.15.3", &[("Completed", "4.15.3")]);
    let old = backup_now(&w, &cfg);
    cluster_version_history(&etcd, "4.15.4", &[("Completed", "4.15.4"), ("Completed", "4.15.3")]);
    let before = backup_now(&w, &cfg);
    assert_ne!(old, before);

    // The upgrade to 4.15.5 failed.
    cluster_version_history(
        &etcd,
        "4.15.5",
        &[("Partial", "4.15.5"), ("Completed", "4.15.4"), ("Completed", "4.15.3")],
    );
    let dir = w.path().join("fetched");
    let r = cli_cfg(&["fetch", &before, "--to", dir.to_str().unwrap()], &cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout.contains(
            "the cluster is upgrading from 4.15.4 to 4.15.5 (not completed): a set of 4.15.4, the last completed version, is accepted"
        ),
        "{}",
        r.stdout
    );
    assert_eq!(names_in(&dir), [format!("snapshot_{before}.db")]);

    // A set of neither version is refused, naming both a set can exist for.
    let refused = w.path().join("refused");
    let r = cli_cfg(&["fetch", &old, "--to", refused.to_str().unwrap()], &cfg);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("taken on OpenShift 4.15.3")
            && r.stderr.contains("on 4.15.4, the last completed version")
            && r.stderr.contains("on 4.15.5, the version being installed"),
        "{}",
        r.stderr
    );
    assert!(names_in(&refused).is_empty());
    // --allow-version-mismatch still overrides.
    let r = cli_cfg(
        &[
            "fetch",
            &old,
            "--to",
            refused.to_str().unwrap(),
            "--allow-version-mismatch",
        ],
        &cfg,
    );
    assert_eq!(r.code, 0, "{}", r.all());

    // Once 4.15.5 completed, only a 4.15.5 set will do.
    cluster_version_history(
        &etcd,
        "4.15.5",
        &[
            ("Completed", "4.15.5"),
            ("Completed", "4.15.4"),
            ("Completed", "4.15.3"),
        ],
    );
    let third = w.path().join("third");
    let r = cli_cfg(&["fetch", &before, "--to", third.to_str().unwrap()], &cfg);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("taken on OpenShift 4.15.4") && r.stderr.contains("use a set taken on 4.15.5"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("last completed"), "{}", r.stderr);
    assert!(names_in(&third).is_empty());
}

/// The stored name of the snapshot in the set at `dir` (a set folder on a target).
fn stored_snapshot(dir: &Path) -> (String, u64) {
    let m: Manifest = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let f = m.files.iter().find(|f| f.name.starts_with("snapshot_")).unwrap();
    (f.stored_name.clone(), f.stored_size)
}

/// Issue 14, point 4: `latest` never silently means "the newest good one". The newest set
/// damaged on a file:// target and on Apache WebDAV (truncated, then the right size with a
/// byte flipped): `fetch latest` and `verify latest` fail naming it, what is wrong and the
/// newest intact set; `list` shows it marked; retention keeps the newest intact set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_newest_set_is_named_never_skipped() {
    let etcd = Etcd::start();
    etcd.fill(None, 200, 300);
    let apache = Apache::start();
    let w = Work::new();
    let targets = format!(
        "[[target]]\nname = \"local\"\nurl = \"file://{}\"\n\n[[target]]\nname = \"offsite\"\nurl = \"{}\"\nusername = \"{DAV_USER}\"\npassword_file = \"{}\"\nca_file = \"{}\"\n",
        w.target_root().display(),
        apache.url(),
        apache.password_file(w.path()).display(),
        apache.pki.ca.display()
    );
    let cfg = w.write_config_targets(&etcd.endpoint, &targets);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = backup_async(cfg.clone()).await;
        assert_eq!(r.code, 0, "{}", r.all());
        ids.push(
            w.sets()
                .pop()
                .unwrap()
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_string(),
        );
    }
    let (oldest, intact, newest) = (ids[0].clone(), ids[1].clone(), ids[2].clone());
    assert!(oldest < intact && intact < newest, "{ids:?}");
    let roots = [
        ("local", w.target_root().join("test")),
        ("offsite", apache.root().join("test")),
    ];
    for (_, root) in &roots {
        assert_eq!(names_in(root), ids, "every set on every target");
    }
    // A newer folder without a manifest (an upload in progress, or debris): never listed,
    // never `latest`.
    std::fs::create_dir(w.target_root().join("test/2099-01-01_000000")).unwrap();
    std::fs::write(
        w.target_root()
            .join("test/2099-01-01_000000/snapshot_2099-01-01_000000.db"),
        "x",
    )
    .unwrap();

    let (snapshot, size) = stored_snapshot(&roots[0].1.join(&newest));
    let original = std::fs::read(roots[0].1.join(&newest).join(&snapshot)).unwrap();
    let short = size / 2;
    for (_, root) in &roots {
        std::fs::write(root.join(&newest).join(&snapshot), &original[..short as usize]).unwrap();
    }
    let problem = format!("'{snapshot}' is {short} bytes, the manifest records {size}");

    for (name, _) in &roots {
        let dir = w.path().join(format!("fetch-{name}"));
        let r = run_async_plain(argv(
            &["fetch", "latest", "--target", name, "--to", dir.to_str().unwrap()],
            &cfg,
        ))
        .await;
        assert_eq!(r.code, 1, "{name}: {}", r.all());
        let want = format!(
            "the newest set {newest} on target '{name}' is damaged: {problem}; the newest intact set is {intact}"
        );
        assert!(r.stderr.contains(&want), "{name}: want {want:?} in {}", r.stderr);
        assert!(names_in(&dir).is_empty(), "{name}: {:?}", names_in(&dir));

        let r = run_async_plain(argv(&["verify", "latest", "--target", name], &cfg)).await;
        assert_eq!(r.code, 1, "{name}: {}", r.all());
        assert!(r.stderr.contains(&want), "{name}: want {want:?} in {}", r.stderr);

        // Named by id, the damaged set is refused the same way.
        let r = run_async_plain(argv(
            &["fetch", &newest, "--target", name, "--to", dir.to_str().unwrap()],
            &cfg,
        ))
        .await;
        assert_eq!(r.code, 1, "{name}: {}", r.all());
        let want = format!("set {newest} on target '{name}' is damaged: {problem}; the newest intact set is {intact}");
        assert!(r.stderr.contains(&want), "{name}: want {want:?} in {}", r.stderr);
        assert!(names_in(&dir).is_empty(), "{name}: {:?}", names_in(&dir));

        // The intact set, by id, is fetched.
        let r = run_async_plain(argv(
            &["fetch", &intact, "--target", name, "--to", dir.to_str().unwrap()],
            &cfg,
        ))
        .await;
        assert_eq!(r.code, 0, "{name}: {}", r.all());
        assert_eq!(names_in(&dir), [format!("snapshot_{intact}.db")], "{name}");

        // `list --wide` shows the damaged set as a row, marked, with what is wrong.
        let r = run_async_plain(argv(&["list", "--wide", "--target", name], &cfg)).await;
        assert_eq!(r.code, 0, "{name}: {}", r.all());
        let row = r
            .stdout
            .lines()
            .find(|l| l.contains(&newest))
            .expect("a row for the damaged set");
        assert!(row.contains(&format!("DAMAGED: {problem}")), "{name}: {row}");
        let row = r.stdout.lines().find(|l| l.contains(&intact)).unwrap();
        assert!(!row.contains("DAMAGED") && row.contains("newest set"), "{name}: {row}");
        assert!(!r.stdout.contains("2099-01-01_000000"), "{name}: {}", r.stdout);
        let r = run_async_plain(argv(&["list", "--json", "--target", name], &cfg)).await;
        assert_eq!(r.code, 0, "{name}: {}", r.all());
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let of = |id: &str| {
            v["sets"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["manifest"]["id"] == id)
                .unwrap_or_else(|| panic!("{name}: no {id} in {v}"))
                .clone()
        };
        assert_eq!(of(&newest)["damaged"], problem.as_str(), "{name}");
        assert!(of(&intact)["damaged"].is_null(), "{name}");
        assert_eq!(v["sets"].as_array().unwrap().len(), 3, "{name}: {v}");
    }

    // Retention (keep_last 1) keeps the newest intact set, not only the damaged one.
    let text = std::fs::read_to_string(&cfg).unwrap()
        + "\n[retention]\nkeep_last = 1\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\nmin_keep = 0\n";
    std::fs::write(&cfg, text).unwrap();
    let r = run_async_plain(argv(&["prune"], &cfg)).await;
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout
            .contains(&format!("{newest}  keep: damaged, not counted by retention")),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(&format!("{intact}  keep: last 1, newest set")),
        "{}",
        r.stdout
    );
    for (name, root) in &roots {
        let left: Vec<String> = names_in(root).into_iter().filter(|n| n.starts_with("20")).collect();
        let mut want = vec![intact.clone(), newest.clone()];
        if *name == "local" {
            want.push("2099-01-01_000000".into());
        }
        assert_eq!(left, want, "{name}");
    }

    // The right size with one byte flipped: only a full read finds it, and `latest` fails
    // the same way (checksum) instead of falling back.
    let mut flipped = original.clone();
    flipped[4096] ^= 0x01;
    for (_, root) in &roots {
        std::fs::write(root.join(&newest).join(&snapshot), &flipped).unwrap();
    }
    for (name, _) in &roots {
        let r = run_async_plain(argv(&["list", "--wide", "--target", name], &cfg)).await;
        let row = r.stdout.lines().find(|l| l.contains(&newest)).unwrap();
        assert!(!row.contains("DAMAGED"), "{name}: sizes match, list cannot tell: {row}");
        let dir = w.path().join(format!("flipped-{name}"));
        let r = run_async_plain(argv(
            &["fetch", "latest", "--target", name, "--to", dir.to_str().unwrap()],
            &cfg,
        ))
        .await;
        assert_eq!(r.code, 1, "{name}: {}", r.all());
        for want in [
            format!("the newest set {newest} on target '{name}' is damaged: '{snapshot}' is {size} bytes with SHA-256"),
            "altered or corrupted".to_string(),
            format!("the newest intact set is {intact}"),
        ] {
            assert!(r.stderr.contains(&want), "{name}: want {want:?} in {}", r.stderr);
        }
        assert!(names_in(&dir).is_empty(), "{name}: {:?}", names_in(&dir));
        let r = run_async_plain(argv(&["verify", "latest", "--target", name], &cfg)).await;
        assert_eq!(r.code, 1, "{name}: {}", r.all());
        assert!(
            r.stderr
                .contains(&format!("the newest set {newest} on target '{name}' is damaged")),
            "{name}: {}",
            r.stderr
        );
    }
}
