//! `snapshot.method = "script"` with a stand-in for the platform's `cluster-backup.sh`
//! (`tests/fixtures/cluster-backup.sh`) that behaves as the real one does: the four
//! ClusterOperators checked, only the running revisions archived, the snapshot over TLS with
//! the node's client certificate.

use std::path::{Path, PathBuf};

use crate::common::{Run, ScriptHost, Work, put_operator, run, run_env, snapshot_status, standin_script};

fn fixture() -> PathBuf {
    standin_script()
}

fn backup_args(cfg: &Path, host: &ScriptHost, args: &[&str], env: &[(&str, &str)]) -> Run {
    let base = host.env();
    let mut all: Vec<(&str, &str)> = base.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(env);
    let mut argv = vec!["backup", "--no-election", "--config", cfg.to_str().unwrap()];
    argv.extend_from_slice(args);
    run_env(&argv, &all)
}

fn backup(cfg: &Path, host: &ScriptHost, env: &[(&str, &str)]) -> Run {
    backup_args(cfg, host, &[], env)
}

/// `etcd-backupd ARGS --config CFG`.
fn cli(cfg: &Path, args: &[&str]) -> Run {
    let mut a = args.to_vec();
    a.extend(["--config", cfg.to_str().unwrap()]);
    run(&a)
}

/// Nothing visible anywhere: no set, no half-assembled or staged set.
fn assert_nothing_left(w: &Work) {
    assert!(w.sets().is_empty(), "{:?}", w.sets());
    assert!(w.staging_tmp_files().is_empty(), "{:?}", w.staging_tmp_files());
    assert!(w.staged().is_empty(), "{:?}", w.staged());
}

/// The file names `cluster-restore.sh` would take from `dir`: the version-sorted last
/// `snapshot*.db` and `static_kuberesources*.tar.gz`, each picked on its own.
fn restore_picks(dir: &Path) -> (Option<String>, Option<String>) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let last = |pre: &str, suf: &str| names.iter().rfind(|n| n.starts_with(pre) && n.ends_with(suf)).cloned();
    (last("snapshot", ".db"), last("static_kuberesources", ".tar.gz"))
}

#[test]
fn the_platform_script_produces_a_complete_verified_set() {
    let w = Work::new();
    let host = ScriptHost::start(&w, 4);
    host.etcd.fill(Some(&host.pki), 300, 200);
    let cfg = host.config(&w, &fixture(), "", "");
    // The script's timestamp is a second or more after the run started, and the node's zone
    // is not UTC: the set is still named and staged by the script's UTC timestamp.
    let started = chrono::Utc::now();
    let r = backup(
        &cfg,
        &host,
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
    let mut etcdctl = std::process::Command::new("etcdctl");
    etcdctl.env("ETCDCTL_API", "3");
    snapshot_status(etcdctl, &sets[0].join(format!("snapshot_{id}.db")));
}

#[test]
fn script_failures_leave_nothing_and_say_why() {
    let w = Work::new();
    let host = ScriptHost::start(&w, 4);
    host.put("k", "v");
    let cfg = host.config(&w, &fixture(), "", "");

    // Its own pre-check, stricter than "not True": exit 1 and its last line. (No
    // ClusterVersion here, so etcd-backupd's own guard refuses only Progressing=True.)
    put_operator(&host.etcd, Some(&host.pki), "kube-apiserver", Some("Unknown"));
    let r = backup(&cfg, &host, &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    let last = r.stderr.trim().lines().last().unwrap();
    assert!(
        last.contains("failed (exit status: 1)")
            && last.contains("kube-apiserver operator is progressing (Progressing: Unknown)"),
        "{last}"
    );
    assert_nothing_left(&w);
    put_operator(&host.etcd, Some(&host.pki), "kube-apiserver", Some("False"));

    // An API that does not answer refuses too.
    let r = backup(&cfg, &host, &[("STANDIN_API_DOWN", "1")]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("Could not get the kube-apiserver ClusterOperator"),
        "{}",
        r.stderr
    );
    assert_nothing_left(&w);

    // etcdctl cannot reach the member: the script removes both files and fails.
    let r = backup(
        &cfg,
        &host,
        &[
            ("STANDIN_ENDPOINT", "https://127.0.0.1:1"),
            ("STANDIN_COMMAND_TIMEOUT", "3s"),
            ("STANDIN_API_ENDPOINT", host.etcd.endpoint.as_str()),
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
    let r = backup(&cfg, &host, &[("STANDIN_CORRUPT", "1")]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("snapshot trailer mismatch"), "{}", r.stderr);
    assert_nothing_left(&w);

    // A script that hangs is killed at snapshot.script_timeout.
    let cfg = host.config(&w, &fixture(), "script_timeout = \"2s\"\n", "");
    let t0 = std::time::Instant::now();
    let r = backup(&cfg, &host, &[("STANDIN_SLEEP", "60")]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(t0.elapsed() < std::time::Duration::from_secs(30));
    assert!(r.stderr.contains("snapshot.script_timeout (2s)"), "{}", r.stderr);
    assert_nothing_left(&w);

    // A script path that does not exist.
    let cfg = host.config(&w, Path::new("/nonexistent/cluster-backup.sh"), "", "");
    let r = backup(&cfg, &host, &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("/nonexistent/cluster-backup.sh"), "{}", r.stderr);
    assert_nothing_left(&w);
}

#[test]
fn possibly_dirty_sets_need_allow_dirty() {
    let w = Work::new();
    let host = ScriptHost::start(&w, 4);
    host.put("k", "v");
    // A site's wrapper that always runs `cluster-backup.sh --force`.
    let forced = w.path().join("forced.sh");
    std::fs::write(
        &forced,
        format!("#!/bin/sh\nexec {} --force \"$@\"\n", fixture().display()),
    )
    .unwrap();
    std::fs::set_permissions(&forced, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cfg = host.config(&w, &forced, "", "");
    let r = backup(&cfg, &host, &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("__POSSIBLY_DIRTY__") && r.stderr.contains("snapshot.allow_dirty"),
        "{}",
        r.stderr
    );
    assert_nothing_left(&w);

    let cfg = host.config(&w, &forced, "allow_dirty = true\n", "");
    let r = backup(&cfg, &host, &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    let set = w.sets().pop().unwrap();
    let id = set.file_name().unwrap().to_str().unwrap().to_string();
    assert!(set.join(format!("snapshot_{id}__POSSIBLY_DIRTY__.db")).is_file());
    crate::common::assert_sha256sums(&set);
}

/// `backup --force` reaches the script as its first argument: the script's own
/// ClusterOperator check is skipped as etcd-backupd's guards were, and its dirty files are
/// taken (whatever snapshot.allow_dirty says), stored, listed and fetched under names the
/// restore script's globs pick.
#[test]
fn backup_force_reaches_the_script_and_its_dirty_set_goes_end_to_end() {
    let w = Work::new();
    let host = ScriptHost::start(&w, 4);
    host.etcd.fill(Some(&host.pki), 50, 100);
    let cfg = host.config(&w, &fixture(), "", "");
    // A stuck upgrade as the script sees it: the operator is not settled.
    put_operator(&host.etcd, Some(&host.pki), "etcd", Some("Unknown"));
    let r = backup(&cfg, &host, &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("etcd operator is progressing"), "{}", r.stderr);
    assert_nothing_left(&w);

    let r = backup_args(&cfg, &host, &["--force"], &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    let set = w.sets().pop().unwrap();
    let id = set.file_name().unwrap().to_str().unwrap().to_string();
    let snapshot = format!("snapshot_{id}__POSSIBLY_DIRTY__.db");
    let archive = format!("static_kuberesources_{id}__POSSIBLY_DIRTY__.tar.gz");
    assert!(set.join(&snapshot).is_file() && set.join(&archive).is_file(), "{id}");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(set.join("manifest.json")).unwrap()).unwrap();
    assert!(
        m["forced"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().contains("--force")),
        "{m}"
    );
    // Listed, verified and fetched under the script's names.
    let list = cli(&cfg, &["list"]);
    assert_eq!(list.code, 0, "{}", list.all());
    assert!(
        list.stdout.contains(&id) && list.stdout.contains("+forced"),
        "{}",
        list.stdout
    );
    let verify = cli(&cfg, &["verify", &id]);
    assert_eq!(verify.code, 0, "{}", verify.all());
    let dir = w.path().join("restore");
    let fetch = cli(&cfg, &["fetch", &id, "--to", dir.to_str().unwrap()]);
    assert_eq!(fetch.code, 0, "{}", fetch.all());
    assert_eq!(restore_picks(&dir), (Some(snapshot), Some(archive)));
}

/// An archive the platform's restore cannot use (made by a site's own script: `tar -C dir .`
/// gives `./static-pod-resources/...`; or a component missing) fails the backup: exit 1,
/// nothing stored, the reason named.
#[test]
fn a_script_archive_the_restore_cannot_use_fails_the_backup() {
    let w = Work::new();
    let host = ScriptHost::start(&w, 4);
    host.put("k", "v");
    let site = w.path().join("site-backup.sh");
    // Runs the stand-in, then repacks its archive as `$HOW` says.
    std::fs::write(
        &site,
        format!(
            r#"#!/bin/bash
set -e
{standin} "$@"
dir="${{@: -1}}"
archive=$(ls "$dir"/static_kuberesources_*.tar.gz)
tmp=$(mktemp -d)
tar -xzf "$archive" -C "$tmp"
case "$HOW" in
  dot) tar -czf "$archive" -C "$tmp" . ;;
  no-scheduler) rm -rf "$tmp"/static-pod-resources/kube-scheduler-pod-*; tar -czf "$archive" -C "$tmp" static-pod-resources ;;
  no-pod-yaml) rm -f "$tmp"/static-pod-resources/etcd-pod-*/etcd-pod.yaml; tar -czf "$archive" -C "$tmp" static-pod-resources ;;
esac
rm -rf "$tmp"
"#,
            standin = fixture().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&site, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cfg = host.config(&w, &site, "", "");
    for (how, said) in [
        ("dot", "are not under static-pod-resources/ (the first: './')"),
        ("no-scheduler", "no kube-scheduler revision directory"),
        (
            "no-pod-yaml",
            "no etcd pod manifest (static-pod-resources/etcd-pod-4/etcd-pod.yaml)",
        ),
    ] {
        let r = backup(&cfg, &host, &[("HOW", how)]);
        assert_eq!(r.code, 1, "{how}: {}", r.all());
        let last = r.stderr.trim().lines().last().unwrap();
        assert!(
            last.contains("cannot be restored by the platform's cluster-restore.sh") && last.contains(said),
            "{how}: {last}"
        );
        assert_nothing_left(&w);
    }
    // The same script untouched: a restorable set.
    let r = backup(&cfg, &host, &[("HOW", "keep")]);
    assert_eq!(r.code, 0, "{}", r.all());
}

/// A stored set whose archive the platform's restore cannot use (as a site's script or an
/// earlier release could have stored it): `verify` names what is missing (exit 1); `fetch`
/// refuses before writing anything (exit 1) unless `--allow-unrestorable-archive`.
#[test]
fn verify_and_fetch_refuse_a_stored_archive_the_restore_cannot_use() {
    use sha2::Digest;
    let etcd = crate::common::Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();
    let k8s = w.path().join("etc-kubernetes");
    crate::common::static_pod_fixture(&k8s, 4);
    let cfg = w.write_config(&etcd.endpoint, None, "");
    w.set_static_resources_dir(&k8s);
    let r = cli(&cfg, &["backup", "--no-election"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let set = w.sets().pop().unwrap();
    let id = set.file_name().unwrap().to_str().unwrap().to_string();
    let archive = set.join(format!("static_kuberesources_{id}.tar.gz"));
    // Repack it without kube-scheduler, and make manifest and SHA256SUMS agree: intact as
    // stored, only not restorable.
    crate::seal::sh(&format!(
        "cd {d} && mkdir x && tar -xzf {a} -C x && rm -rf x/static-pod-resources/kube-scheduler-pod-* && tar -czf {a} -C x static-pod-resources && rm -rf x",
        d = w.path().display(),
        a = archive.display()
    ));
    let bytes = std::fs::read(&archive).unwrap();
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(set.join("manifest.json")).unwrap()).unwrap();
    let old_sha = {
        let f = m["files"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|f| f["name"].as_str().unwrap().starts_with("static_kuberesources_"))
            .unwrap();
        let old = f["sha256"].as_str().unwrap().to_string();
        for (k, v) in [("size", bytes.len().into()), ("stored_size", bytes.len().into())] {
            f[k] = v;
        }
        for k in ["sha256", "stored_sha256"] {
            f[k] = sha.clone().into();
        }
        old
    };
    std::fs::write(set.join("manifest.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let sums = std::fs::read_to_string(set.join("SHA256SUMS"))
        .unwrap()
        .replace(&old_sha, &sha);
    std::fs::write(set.join("SHA256SUMS"), sums).unwrap();

    let v = cli(&cfg, &["verify", &id]);
    assert_eq!(v.code, 1, "{}", v.all());
    assert!(
        v.stderr
            .contains("cannot be restored by the platform's cluster-restore.sh")
            && v.stderr.contains("no kube-scheduler revision directory"),
        "{}",
        v.stderr
    );
    let dir = w.path().join("restore");
    let f = cli(&cfg, &["fetch", &id, "--to", dir.to_str().unwrap()]);
    assert_eq!(f.code, 1, "{}", f.all());
    assert!(
        f.stderr.contains("no kube-scheduler revision directory"),
        "{}",
        f.stderr
    );
    assert!(
        !dir.exists(),
        "a refused fetch leaves nothing, not even the directory it made"
    );
    let f = cli(
        &cfg,
        &[
            "fetch",
            &id,
            "--to",
            dir.to_str().unwrap(),
            "--allow-unrestorable-archive",
        ],
    );
    assert_eq!(f.code, 0, "{}", f.all());
    assert!(
        f.stdout.contains("NOT restorable by cluster-restore.sh"),
        "{}",
        f.stdout
    );
    assert!(dir.join(format!("static_kuberesources_{id}.tar.gz")).is_file());
    // `--force` over it, refused again: the set already there stays, byte for byte.
    let before = std::fs::read(dir.join(format!("snapshot_{id}.db"))).unwrap();
    let f = cli(&cfg, &["fetch", &id, "--to", dir.to_str().unwrap(), "--force"]);
    assert_eq!(f.code, 1, "{}", f.all());
    assert_eq!(std::fs::read(dir.join(format!("snapshot_{id}.db"))).unwrap(), before);
    assert!(dir.join(format!("static_kuberesources_{id}.tar.gz")).is_file());
}
