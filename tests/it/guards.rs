//! The guards as an admin meets them: `backup --force` during a stuck upgrade (what it
//! overrides, what it records, what it never overrides), and a skip being recorded as a
//! skip wherever it comes from.

use std::path::Path;

use crate::common::{Etcd, Work, run};

const CV_KEY: &str = "/kubernetes.io/config.openshift.io/clusterversions/version";
/// An upgrade to 4.15.5 under way, the cluster installed long ago on 4.15.4.
const UPGRADING: &str = r#"{"spec":{"clusterID":"c0ffee-id"},"status":{"desired":{"version":"4.15.5"},"history":[{"state":"Partial","version":"4.15.5","startedTime":"2026-11-30T00:00:00Z","completionTime":null},{"state":"Completed","version":"4.15.4","startedTime":"2026-01-01T00:00:00Z","completionTime":"2026-01-01T01:00:00Z"}]}}"#;

fn backup(cfg: &Path, extra: &[&str]) -> crate::common::Run {
    let mut args = vec!["backup", "--no-election", "--config", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args)
}

fn newest_state_run(w: &Work) -> serde_json::Value {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.staging().join("state.json")).unwrap()).unwrap();
    state["runs"][0].clone()
}

#[test]
fn force_backs_up_during_an_upgrade_and_records_which_guard_it_overrode() {
    let etcd = Etcd::start();
    etcd.fill(None, 50, 100);
    etcd.put(None, CV_KEY, UPGRADING);
    crate::common::settle_operators(&etcd, None);
    let w = Work::new();
    let cfg = w.write_config(&etcd.endpoint, None, "");

    let r = backup(&cfg, &[]);
    assert_eq!(r.code, 3, "{}", r.all());
    assert!(r.stderr.contains("upgrade to 4.15.5 is in progress"), "{}", r.stderr);
    assert!(w.sets().is_empty());
    assert_eq!(newest_state_run(&w)["result"], "skipped");

    let r = backup(&cfg, &["--force"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout.contains("forced    an upgrade to 4.15.5 is in progress"),
        "{}",
        r.stdout
    );
    let sets = w.sets();
    assert_eq!(sets.len(), 1);
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(sets[0].join("manifest.json")).unwrap()).unwrap();
    let forced = m["forced"]
        .as_array()
        .expect("the manifest names the overridden guards");
    assert_eq!(forced.len(), 1, "{m}");
    assert!(
        forced[0]
            .as_str()
            .unwrap()
            .contains("an upgrade to 4.15.5 is in progress"),
        "{m}"
    );
    assert_eq!(m["format_version"], 1, "an optional field keeps the format");
    let list = run(&["list", "--config", cfg.to_str().unwrap()]);
    assert_eq!(list.code, 0, "{}", list.all());
    assert!(list.stdout.contains("manual+forced"), "{}", list.stdout);
    let json = run(&["list", "--json", "--config", cfg.to_str().unwrap()]);
    assert!(
        json.stdout.contains("an upgrade to 4.15.5 is in progress"),
        "{}",
        json.stdout
    );

    // Without a guard in the way, --force records nothing.
    etcd.put(
        None,
        CV_KEY,
        &UPGRADING
            .replace(r#""desired":{"version":"4.15.5"}"#, r#""desired":{"version":"4.15.4"}"#)
            .replace(
                r#"{"state":"Partial","version":"4.15.5","startedTime":"2026-11-30T00:00:00Z","completionTime":null},"#,
                "",
            ),
    );
    let r = backup(&cfg, &["--force"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(!r.stdout.contains("forced"), "{}", r.stdout);
}

#[test]
fn force_never_overrides_free_space_and_a_skip_exits_3() {
    let etcd = Etcd::start();
    etcd.fill(None, 50, 100);
    etcd.put(None, CV_KEY, UPGRADING);
    crate::common::settle_operators(&etcd, None);
    let w = Work::new();
    let cfg = w.write_config(&etcd.endpoint, None, "\n[guards]\nmin_free_space = \"1000TiB\"\n");
    let r = backup(&cfg, &["--force"]);
    assert_eq!(r.code, 3, "{}", r.all());
    assert!(r.stderr.contains("min_free_space"), "{}", r.stderr);
    assert!(w.sets().is_empty());
}

#[test]
fn a_backup_skipped_because_staging_is_busy_is_recorded_as_skipped_not_failed() {
    let etcd = Etcd::start();
    etcd.fill(None, 50, 100);
    let w = Work::new();
    let prom = w.path().join("etcd_backupd.prom");
    let cfg = w.write_config(
        &etcd.endpoint,
        None,
        &format!("\n[metrics]\ntextfile = \"{}\"\n", prom.display()),
    );
    // A first backup makes staging; then another holder takes its lock.
    assert_eq!(backup(&cfg, &[]).code, 0);
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(w.staging().join("lock"))
        .unwrap();
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
    let r = backup(&cfg, &[]);
    assert_eq!(r.code, 3, "{}", r.all());
    assert!(r.stderr.contains("another backup is running"), "{}", r.stderr);
    let newest = newest_state_run(&w);
    assert_eq!(newest["result"], "skipped", "{newest}");
    let text = std::fs::read_to_string(&prom).unwrap();
    assert!(text.contains("etcd_backupd_runs_total{result=\"skipped\"} 1"), "{text}");
    assert!(text.contains("etcd_backupd_runs_total{result=\"failed\"} 0"), "{text}");
    assert!(text.contains("etcd_backupd_last_attempt_success 1"), "{text}");
}

/// On OpenShift (a ClusterVersion exists) the native guard is as strict as
/// `cluster-backup.sh`: each of the four ClusterOperators present with Progressing=False;
/// `Unknown`, a missing condition or a missing object is a skip naming the operator and
/// what was found. `--force` overrides it, as it does the script's check.
#[test]
fn the_operator_guard_is_as_strict_as_the_script_on_openshift() {
    use crate::common::put_operator;
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let settled = UPGRADING
        .replace(r#""desired":{"version":"4.15.5"}"#, r#""desired":{"version":"4.15.4"}"#)
        .replace(
            r#"{"state":"Partial","version":"4.15.5","startedTime":"2026-11-30T00:00:00Z","completionTime":null},"#,
            "",
        );
    etcd.put(None, CV_KEY, &settled);
    crate::common::settle_operators(&etcd, None);
    let w = Work::new();
    let cfg = w.write_config(&etcd.endpoint, None, "");
    let cases: [(&dyn Fn(), &str); 3] = [
        (
            &|| put_operator(&etcd, None, "kube-apiserver", Some("Unknown")),
            "ClusterOperator kube-apiserver is Progressing=Unknown",
        ),
        (
            &|| put_operator(&etcd, None, "kube-scheduler", None),
            "ClusterOperator kube-scheduler has no Progressing condition",
        ),
        (
            &|| {
                let out = etcd
                    .etcdctl(None)
                    .args(["del", "/kubernetes.io/config.openshift.io/clusteroperators/etcd"])
                    .output()
                    .unwrap();
                assert!(out.status.success());
            },
            "ClusterOperator etcd is missing from etcd",
        ),
    ];
    for (break_it, reason) in cases {
        crate::common::settle_operators(&etcd, None);
        break_it();
        let r = backup(&cfg, &[]);
        assert_eq!(r.code, 3, "{reason}: {}", r.all());
        assert!(r.stderr.contains(reason), "{reason}: {}", r.stderr);
        assert_eq!(newest_state_run(&w)["result"], "skipped");
    }
    assert!(w.sets().is_empty());
    let r = backup(&cfg, &["--force"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout.contains("forced    ClusterOperator etcd is missing from etcd"),
        "{}",
        r.stdout
    );
    // Settled again: a backup without --force goes.
    crate::common::settle_operators(&etcd, None);
    let r = backup(&cfg, &[]);
    assert_eq!(r.code, 0, "{}", r.all());
}
