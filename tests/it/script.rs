//! `snapshot.method = "script"` with a stand-in for the platform's `cluster-backup.sh`
//! (`tests/fixtures/cluster-backup.sh`) that saves a real snapshot with etcdctl.

use std::path::{Path, PathBuf};

use crate::common::{Etcd, Run, Work, run_env, static_pod_fixture};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cluster-backup.sh")
}

fn script_config(w: &Work, etcd: &Etcd, script: &Path, extra: &str) -> PathBuf {
    let cfg = w.write_config(&etcd.endpoint, None, "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "[snapshot]\n",
        &format!(
            "[snapshot]\nmethod = \"script\"\nscript = \"{}\"\n{extra}",
            script.display()
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn backup(cfg: &Path, etcd: &Etcd, k8s: &Path, env: &[(&str, &str)]) -> Run {
    let k8s = k8s.to_str().unwrap().to_string();
    let mut all = vec![
        ("STANDIN_ENDPOINT", etcd.endpoint.as_str()),
        ("STANDIN_K8S_DIR", k8s.as_str()),
    ];
    all.extend_from_slice(env);
    run_env(&["backup", "--no-election", "--config", cfg.to_str().unwrap()], &all)
}

/// Nothing visible anywhere: no set, no half-assembled or staged set.
fn assert_nothing_left(w: &Work) {
    assert!(w.sets().is_empty(), "{:?}", w.sets());
    assert!(w.staging_tmp_files().is_empty(), "{:?}", w.staging_tmp_files());
    assert!(w.staged().is_empty(), "{:?}", w.staged());
}

#[test]
fn the_platform_script_produces_a_complete_verified_set() {
    let etcd = Etcd::start();
    etcd.fill(None, 300, 200);
    let w = Work::new();
    let k8s = w.path().join("etc-kubernetes");
    static_pod_fixture(&k8s, 4);
    let cfg = script_config(&w, &etcd, &fixture(), "");
    // The script's timestamp is a second or more after the run started, and the node's zone
    // is not UTC: the set is still named and staged by the script's UTC timestamp.
    let started = chrono::Utc::now();
    let r = backup(
        &cfg,
        &etcd,
        &k8s,
        &[("STANDIN_DELAY_START", "1.2"), ("TZ", "America/New_York")],
    );
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(w.staged().iter().all(|(_, p)| p.is_empty()), "{:?}", w.staged());
    // The script's output reached the log line by line.
    assert!(
        r.stderr
            .contains("snapshot db and kube resources are successfully saved"),
        "{}",
        r.stderr
    );
    let sets = w.sets();
    assert_eq!(sets.len(), 1);
    let id = sets[0].file_name().unwrap().to_str().unwrap().to_string();
    let mut names: Vec<String> = std::fs::read_dir(&sets[0])
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    // The script's own names, its timestamp as the set's id.
    assert_eq!(
        names,
        [
            "SHA256SUMS".to_string(),
            "manifest.json".into(),
            format!("snapshot_{id}.db"),
            format!("static_kuberesources_{id}.tar.gz"),
        ]
    );
    crate::common::assert_sha256sums(&sets[0]);
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(sets[0].join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["id"], id.as_str());
    let at = chrono::NaiveDateTime::parse_from_str(&id, "%F_%H%M%S")
        .unwrap()
        .and_utc();
    assert!(
        at > started && at < started + chrono::TimeDelta::seconds(60),
        "{id} vs {started}"
    );
    assert_eq!(w.staged(), vec![(id.clone(), vec![])]);
    assert!(m["etcd"]["revision"].as_i64().unwrap() > 0);
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status"])
        .arg(sets[0].join(format!("snapshot_{id}.db")))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn script_failures_leave_nothing_and_say_why() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();
    let k8s = w.path().join("etc-kubernetes");
    static_pod_fixture(&k8s, 4);
    let cfg = script_config(&w, &etcd, &fixture(), "");

    // Its own pre-check: exit 1 and its last line.
    let r = backup(&cfg, &etcd, &k8s, &[("STANDIN_PROGRESSING", "kube-apiserver")]);
    assert_eq!(r.code, 1, "{}", r.all());
    let last = r.stderr.trim().lines().last().unwrap();
    assert!(
        last.contains("failed (exit status: 1)") && last.contains("kube-apiserver operator is progressing"),
        "{last}"
    );
    assert_nothing_left(&w);

    // etcdctl cannot reach the member: the script removes both files and fails.
    let r = backup(
        &cfg,
        &etcd,
        &k8s,
        &[
            ("STANDIN_ENDPOINT", "http://127.0.0.1:1"),
            ("STANDIN_COMMAND_TIMEOUT", "3s"),
        ],
    );
    assert_eq!(r.code, 1, "{}", r.all());
    // The run's error is the script's failure with etcdctl's own last words (the script's
    // name alone is in every log line the run writes).
    let last = r.stderr.trim().lines().last().unwrap();
    assert!(
        last.contains(&format!(
            "snapshot.script '{}' failed (exit status: ",
            fixture().display()
        )) && last.contains("deadline exceeded"),
        "{last}"
    );
    assert_nothing_left(&w);

    // A snapshot corrupted in transit that the script saved happily: the trailer check stops it.
    let r = backup(&cfg, &etcd, &k8s, &[("STANDIN_CORRUPT", "1")]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("snapshot trailer mismatch"), "{}", r.stderr);
    assert_nothing_left(&w);

    // A script that hangs is killed at snapshot.script_timeout.
    let cfg = script_config(&w, &etcd, &fixture(), "script_timeout = \"2s\"\n");
    let t0 = std::time::Instant::now();
    let r = backup(&cfg, &etcd, &k8s, &[("STANDIN_SLEEP", "60")]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(t0.elapsed() < std::time::Duration::from_secs(30));
    assert!(r.stderr.contains("snapshot.script_timeout (2s)"), "{}", r.stderr);
    assert_nothing_left(&w);

    // A script path that does not exist.
    let cfg = script_config(&w, &etcd, Path::new("/nonexistent/cluster-backup.sh"), "");
    let r = backup(&cfg, &etcd, &k8s, &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("/nonexistent/cluster-backup.sh"), "{}", r.stderr);
    assert_nothing_left(&w);
}

#[test]
fn possibly_dirty_sets_need_allow_dirty() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();
    let k8s = w.path().join("etc-kubernetes");
    static_pod_fixture(&k8s, 4);
    // What an admin's `cluster-backup.sh --force` produces.
    let forced = w.path().join("forced.sh");
    std::fs::write(
        &forced,
        format!("#!/bin/sh\nexec {} --force \"$@\"\n", fixture().display()),
    )
    .unwrap();
    std::fs::set_permissions(&forced, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cfg = script_config(&w, &etcd, &forced, "");
    let r = backup(&cfg, &etcd, &k8s, &[("STANDIN_PROGRESSING", "etcd")]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("__POSSIBLY_DIRTY__") && r.stderr.contains("snapshot.allow_dirty"),
        "{}",
        r.stderr
    );
    assert_nothing_left(&w);

    let cfg = script_config(&w, &etcd, &forced, "allow_dirty = true\n");
    let r = backup(&cfg, &etcd, &k8s, &[("STANDIN_PROGRESSING", "etcd")]);
    assert_eq!(r.code, 0, "{}", r.all());
    let set = w.sets().pop().unwrap();
    let id = set.file_name().unwrap().to_str().unwrap().to_string();
    assert!(set.join(format!("snapshot_{id}__POSSIBLY_DIRTY__.db")).is_file());
    crate::common::assert_sha256sums(&set);
}
