//! `backup` against real etcd: the stored set, its verification by the platform's own tools,
//! and every bad input leaving nothing behind.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::common::{CorruptingProxy, Etcd, Pki, Work, run, snapshot_status, static_pod_fixture};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn backup(cfg: &Path) -> crate::common::Run {
    run(&["backup", "--no-election", "--config", cfg.to_str().unwrap()])
}

fn only_set(w: &Work) -> PathBuf {
    let sets = w.sets();
    assert_eq!(sets.len(), 1, "{sets:?}");
    sets[0].clone()
}

/// Asserts a failed run left no set, no debris on the target and nothing in staging.
fn assert_nothing_left(w: &Work) {
    assert!(w.sets().is_empty(), "sets: {:?}", w.sets());
    assert!(w.staging_files().is_empty(), "staging: {:?}", w.staging_files());
}

#[test]
fn backup_of_a_real_etcd_is_complete_and_verifiable() {
    let etcd = Etcd::start();
    etcd.fill(None, 3000, 200);
    etcd.put(
        None,
        "/kubernetes.io/config.openshift.io/clusterversions/version",
        r#"{"spec":{"clusterID":"c0ffee-id"},"status":{"desired":{"version":"4.15.4"},"history":[{"state":"Completed","version":"4.15.4","completionTime":"2026-01-01T00:00:00Z"}]}}"#,
    );
    crate::common::settle_operators(&etcd, None);
    let w = Work::new();
    let resources = w.path().join("etc-kubernetes");
    static_pod_fixture(&resources, 7);
    let cfg = w.write_config(&etcd.endpoint, None, "");
    w.set_static_resources_dir(&resources);

    let r = backup(&cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    let set = only_set(&w);
    let id = set.file_name().unwrap().to_str().unwrap().to_string();
    assert_eq!(id.len(), "2026-11-25_023012".len(), "{id}");
    assert!(
        r.stdout.contains(&format!("backup {id} of cluster test")),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("local: stored at file://"), "{}", r.stdout);

    let snap = set.join(format!("snapshot_{id}.db"));
    let archive = set.join(format!("static_kuberesources_{id}.tar.gz"));
    let mut names: Vec<_> = std::fs::read_dir(&set)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "SHA256SUMS".to_string(),
            "manifest.json".into(),
            format!("snapshot_{id}.db"),
            format!("static_kuberesources_{id}.tar.gz")
        ]
    );
    for p in [&snap, &archive, &set.join("SHA256SUMS"), &set.join("manifest.json")] {
        assert_eq!(mode(p), 0o600, "{}", p.display());
    }
    assert_eq!(mode(&set), 0o700);
    assert_eq!(mode(set.parent().unwrap()), 0o700);

    // The platform's tools accept it.
    crate::common::assert_sha256sums(&set);
    let status = snapshot_status(etcd.etcdctl(None), &snap);
    assert!(status["totalKey"].as_u64().unwrap() >= 3001, "{status}");

    // etcd's trailer is kept and verifies.
    let bytes = std::fs::read(&snap).unwrap();
    let (body, trailer) = bytes.split_at(bytes.len() - 32);
    assert_eq!(Sha256::digest(body).as_slice(), trailer);

    // The archive holds exactly the four revision directories the manifests name.
    let out = Command::new("tar").arg("-tzf").arg(&archive).output().unwrap();
    assert!(out.status.success());
    let listing = String::from_utf8(out.stdout).unwrap();
    let mut tops: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split('/').nth(1))
        .filter(|s| !s.is_empty())
        .collect();
    tops.sort();
    tops.dedup();
    assert_eq!(
        tops,
        vec![
            "etcd-pod-7",
            "kube-apiserver-pod-7",
            "kube-controller-manager-pod-7",
            "kube-scheduler-pod-7"
        ]
    );
    assert!(
        listing.lines().all(|l| l.starts_with("static-pod-resources/")),
        "{listing}"
    );
    assert!(
        listing.contains("static-pod-resources/etcd-pod-7/secrets/serving-cert/tls.key"),
        "{listing}"
    );

    // The manifest describes what is there.
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(set.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["id"], id.as_str());
    assert_eq!(m["trigger"], "manual");
    assert_eq!(m["node"], "node-a");
    assert_eq!(m["cluster_name"], "test");
    let out = Command::new("etcd").arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("etcd Version: ").map(str::to_string))
        .unwrap();
    assert_eq!(m["etcd"]["version"], version.as_str());
    assert!(m["etcd"]["revision"].as_i64().unwrap() >= 31, "{m}");
    assert_eq!(m["openshift"]["version"], "4.15.4");
    assert_eq!(m["openshift"]["cluster_id"], "c0ffee-id");
    assert_eq!(m["files"][0]["name"], format!("snapshot_{id}.db"));
    assert_eq!(m["files"][0]["size"], bytes.len() as u64);
    assert_eq!(m["files"][0]["sha256"], hex::encode(Sha256::digest(&bytes)));
    assert_eq!(m["tool"]["name"], "etcd-backupd");

    // Staging keeps the delivered set as the local copy (delivery.keep_local = 1), owed to
    // no target, and nothing half-assembled.
    assert!(w.staging_tmp_files().is_empty(), "{:?}", w.staging_tmp_files());
    assert_eq!(w.staged(), vec![(id.clone(), vec![])]);

    let r = run(&["list", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains(&id) && r.stdout.contains("4.15.4"), "{}", r.stdout);
    let r = run(&["list", "--json", "--config", cfg.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        (v["schema_version"].as_u64(), v["ok"].as_bool()),
        (Some(1), Some(true)),
        "{v}"
    );
    assert_eq!(v["sets"][0]["manifest"]["id"], id.as_str());
}

#[test]
fn backup_over_tls_with_a_client_certificate() {
    let w = Work::new();
    let pki = Pki::new(w.path(), "good");
    let etcd = Etcd::start_with(Some(&pki));
    etcd.fill(Some(&pki), 200, 100);
    let cfg = w.write_config(&etcd.endpoint, Some(&pki), "");
    let r = backup(&cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    let set = only_set(&w);
    crate::common::assert_sha256sums(&set);
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(set.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["etcd"]["endpoint"], etcd.endpoint.as_str());
}

#[test]
fn tls_mistakes_fail_with_one_clear_line_and_leave_nothing() {
    let w = Work::new();
    let pki = Pki::new(w.path(), "good");
    let other = Pki::new(w.path(), "other");
    let tls_etcd = Etcd::start_with(Some(&pki));
    let plain_etcd = Etcd::start();
    let plain_port = plain_etcd.endpoint.rsplit(':').next().unwrap().to_string();

    let cases: Vec<(String, String, &str, i32)> = vec![
        // wrong CA: the server's certificate does not chain to it
        (
            tls_etcd.endpoint.clone(),
            format!(
                "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                other.ca.display(),
                pki.client_cert.display(),
                pki.client_key.display()
            ),
            "etcd.ca_file does not hold the CA",
            1,
        ),
        // no client certificate where the server requires one
        (
            tls_etcd.endpoint.clone(),
            format!("ca_file = \"{}\"\n", pki.ca.display()),
            "no client certificate is configured",
            1,
        ),
        // a client certificate file that does not exist
        (
            tls_etcd.endpoint.clone(),
            format!(
                "ca_file = \"{}\"\ncert_file = \"/nonexistent/etcd-peer.crt\"\nkey_file = \"{}\"\n",
                pki.ca.display(),
                pki.client_key.display()
            ),
            "etcd.cert_file '/nonexistent/etcd-peer.crt'",
            2,
        ),
        // TLS to a plain-http server
        (
            format!("https://127.0.0.1:{plain_port}"),
            format!("ca_file = \"{}\"\n", pki.ca.display()),
            "is the endpoint plain http://",
            1,
        ),
        // nothing listening
        (
            format!("http://127.0.0.1:{}", crate::common::free_port()),
            String::new(),
            "Connection refused",
            1,
        ),
    ];
    for (endpoint, tls, expect, code) in cases {
        let cfg = w.write_config(&endpoint, None, "");
        let text = std::fs::read_to_string(&cfg).unwrap().replace(
            "request_timeout = \"10s\"\n",
            &format!("request_timeout = \"5s\"\n{tls}"),
        );
        std::fs::write(&cfg, text).unwrap();
        let r = backup(&cfg);
        assert_eq!(r.code, code, "{endpoint} {tls}: {}", r.all());
        let last = r.stderr.trim().lines().last().unwrap();
        eprintln!("{last}");
        assert!(
            last.starts_with("error: ") && last.contains(expect),
            "{endpoint} {tls}: {last}"
        );
        assert_nothing_left(&w);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_corrupted_in_transit_never_becomes_a_set() {
    let etcd = Etcd::start();
    etcd.fill(None, 2000, 1000);
    let w = Work::new();
    for flip_at in [300_000u64, 1_500_000] {
        let proxy = CorruptingProxy::start(&etcd.endpoint, flip_at).await;
        let cfg = w.write_config(&format!("http://127.0.0.1:{}", proxy.port), None, "");
        let r = tokio::task::spawn_blocking(move || backup(&cfg)).await.unwrap();
        assert_eq!(r.code, 1, "flip at {flip_at}: {}", r.all());
        // Both offsets fall in a chunk's payload (framing is a few dozen bytes per 32 KiB), so
        // the run's error is the trailer check itself.
        let last = r.stderr.trim().lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ") && last.contains("snapshot trailer mismatch"),
            "flip at {flip_at}: {}",
            r.stderr
        );
        assert_nothing_left(&w);
    }
    // The same etcd through an honest path works, so the failure above was the corruption.
    let cfg = w.write_config(&etcd.endpoint, None, "");
    let r = backup(&cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(w.sets().len(), 1);
}

pub(crate) fn mount_tmpfs(dir: &Path, opts: &str) -> TmpfsMount {
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "these tests mount a small tmpfs and need root: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    TmpfsMount(dir.to_path_buf())
}

pub(crate) struct TmpfsMount(PathBuf);

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn no_space_left_in_staging_fails_cleanly() {
    let etcd = Etcd::start();
    etcd.fill(None, 2000, 1000);
    let w = Work::new();
    let _m = mount_tmpfs(&w.staging(), "size=1m,mode=0700");
    // The free-space guard would skip the run; switch it off to hit ENOSPC mid-stream.
    let cfg = w.write_config(&etcd.endpoint, None, "[guards]\nmin_free_space = \"0x\"\n");
    let r = backup(&cfg);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("No space left on device"), "{}", r.stderr);
    assert_nothing_left(&w);

    // With the guard on, the same run is skipped up front, with exit code 3.
    let cfg = w.write_config(&etcd.endpoint, None, "");
    let r = backup(&cfg);
    assert_eq!(r.code, 3, "{}", r.all());
    assert!(r.stderr.contains("guards.min_free_space"), "{}", r.stderr);
    assert_nothing_left(&w);
}

#[test]
fn unusable_staging_or_target_fails_cleanly() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();

    // staging_dir below a regular file
    std::fs::write(w.path().join("plainfile"), "x").unwrap();
    let cfg = w.write_config(&etcd.endpoint, None, "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("staging_dir = \"{}\"", w.staging().display()),
        &format!("staging_dir = \"{}/plainfile/staging\"", w.path().display()),
    );
    std::fs::write(&cfg, text).unwrap();
    let r = backup(&cfg);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("snapshot.staging_dir") && r.stderr.contains("plainfile/staging"),
        "{}",
        r.stderr
    );

    // a target on a read-only filesystem
    let _ro = mount_tmpfs(&w.target_root(), "size=1m,ro");
    let cfg = w.write_config(&etcd.endpoint, None, "");
    let r = backup(&cfg);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("target 'local'") || r.stdout.contains("local: FAILED"),
        "{}",
        r.all()
    );
    assert!(r.all().contains("Read-only file system"), "{}", r.all());
    // The verified set waits in staging for the target.
    assert!(w.staging_tmp_files().is_empty(), "{:?}", w.staging_tmp_files());
    let staged = w.staged();
    assert_eq!(staged.len(), 1, "{staged:?}");
    assert_eq!(staged[0].1, ["local"]);

    // a target directory that does not exist (an unmounted mount point) is not created
    let cfg = w.write_config(&etcd.endpoint, None, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("/target\"", "/not-mounted\"");
    std::fs::write(&cfg, text).unwrap();
    let r = backup(&cfg);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.all().contains("not-mounted") && r.all().contains("No such file"),
        "{}",
        r.all()
    );
    assert!(!w.path().join("not-mounted").exists());
}

/// A backup with a static pod fixture (revision 3) lacking `missing` fails (exit 1) with
/// `says` on stderr, and leaves nothing.
fn assert_fails_without(missing: &str, says: &str) {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();
    let resources = w.path().join("etc-kubernetes");
    static_pod_fixture(&resources, 3);
    std::fs::remove_file(resources.join(missing)).unwrap();
    let cfg = w.write_config(&etcd.endpoint, None, "");
    w.set_static_resources_dir(&resources);
    let r = backup(&cfg);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains(says), "{}", r.stderr);
    assert_nothing_left(&w);
}

#[test]
fn a_missing_static_pod_manifest_is_a_clear_error() {
    assert_fails_without("manifests/kube-scheduler-pod.yaml", "kube-scheduler-pod.yaml");
}

/// The native archive gets the same restorability check: a running revision without its
/// pod manifest fails the run, naming the file, and leaves nothing.
#[test]
fn a_revision_without_its_pod_manifest_fails_the_native_backup() {
    assert_fails_without(
        "static-pod-resources/kube-controller-manager-pod-3/kube-controller-manager-pod.yaml",
        "no kube-controller-manager pod manifest (static-pod-resources/kube-controller-manager-pod-3/kube-controller-manager-pod.yaml)",
    );
}

#[tokio::test]
async fn an_existing_set_is_never_overwritten() {
    use etcd_backupd::config::Settings;
    use etcd_backupd::manifest::Manifest;
    use etcd_backupd::targets::{self, StagedSet};

    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();
    let cfg = w.write_config(&etcd.endpoint, None, "");
    let r = backup(&cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    let set = only_set(&w);
    let before = std::fs::read(set.join("manifest.json")).unwrap();

    // Stage a different set with the same id and try to store it.
    let manifest = Manifest::parse(&before).unwrap();
    let staged_dir = w.path().join("restage");
    std::fs::create_dir(&staged_dir).unwrap();
    for f in &manifest.files {
        std::fs::copy(set.join(&f.stored_name), staged_dir.join(&f.stored_name)).unwrap();
    }
    let mut other = manifest.clone();
    other.node = "node-b".into();
    let settings = Settings::load(&cfg).unwrap();
    let target = targets::open(&settings.targets[0], None).unwrap();
    let e = target
        .put_set(
            "test",
            "node-b",
            &StagedSet {
                dir: staged_dir,
                manifest: other,
            },
            &tokio_util::sync::CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("already exists"), "{e:#}");
    assert_eq!(std::fs::read(set.join("manifest.json")).unwrap(), before);
    let debris: Vec<_> = std::fs::read_dir(w.target_root().join("test")).unwrap().collect();
    assert_eq!(debris.len(), 1, "no temporary directory may be left");
}

#[test]
fn a_second_run_on_the_same_node_is_skipped_while_one_holds_staging() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();
    let cfg = w.write_config(&etcd.endpoint, None, "");
    std::fs::create_dir_all(w.staging()).unwrap();
    std::fs::write(w.staging().join(".etcd-backupd-staging"), "").unwrap();
    // Stand in for a run in progress: hold the same lock a run takes.
    let held = etcd_backupd::fsutil::try_lock(&w.staging().join("lock"))
        .unwrap()
        .expect("free at first");
    let r = backup(&cfg);
    assert_eq!(r.code, 3, "{}", r.all());
    assert!(
        r.stderr.contains("another backup is running on this node"),
        "{}",
        r.stderr
    );
    assert!(w.sets().is_empty());
    drop(held);
    let r = backup(&cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(w.sets().len(), 1);
}

#[test]
fn a_staging_dir_that_is_not_ours_is_refused_untouched() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();
    // A mistyped staging_dir pointing at a directory with other contents, e.g. /var.
    std::fs::create_dir_all(w.staging().join("tmp")).unwrap();
    std::fs::write(w.staging().join("tmp/someone-elses-file"), "keep me").unwrap();
    std::fs::set_permissions(w.staging(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = w.write_config(&etcd.endpoint, None, "");
    let r = backup(&cfg);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("snapshot.staging_dir") && r.stderr.contains("marker"),
        "{}",
        r.stderr
    );
    assert_eq!(
        std::fs::read_to_string(w.staging().join("tmp/someone-elses-file")).unwrap(),
        "keep me"
    );
    assert_eq!(mode(&w.staging()), 0o755);
    assert!(w.sets().is_empty());
}

#[test]
fn upload_rate_limit_paces_what_is_written_to_a_target() {
    let etcd = Etcd::start();
    etcd.fill(None, 500, 1000);
    let w = Work::new();
    let cfg = w.write_config(&etcd.endpoint, None, "[priority]\nupload_rate_limit = \"256KiB/s\"\n");
    let started = std::time::Instant::now();
    let r = backup(&cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    let set = only_set(&w);
    let bytes: u64 = std::fs::read_dir(&set)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .filter(|n| *n > 4096)
        .sum();
    let floor = std::time::Duration::from_secs_f64(bytes as f64 / (256.0 * 1024.0) * 0.9);
    assert!(bytes > 300_000, "{bytes}");
    assert!(
        started.elapsed() >= floor,
        "{bytes} bytes in {:?}, expected at least {floor:?}",
        started.elapsed()
    );
}

/// The snapshot is pulled on a thread of its own (`etcd-snapshot`), at `priority.nice`
/// unless `priority.snapshot_nice` says otherwise; the process's other threads keep
/// `priority.nice`. The stream is slowed so the thread can be seen while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_thread_runs_at_snapshot_nice_else_at_nice() {
    let etcd = Etcd::start();
    etcd.fill(None, 300, 1000);
    let proxy = crate::support::ThrottleProxy::start(&etcd.endpoint, 150_000).await;
    let w = Work::new();
    let nice_of = |pid: u32, tid: &str| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
        stat.rsplit(')').next()?.split_whitespace().nth(16)?.parse().ok()
    };
    // Lowering a nice value needs CAP_SYS_NICE: without it, only the default case.
    let root = nix::unistd::geteuid().is_root();
    let cases = [("", 10), ("\n[priority]\nsnapshot_nice = 3\n", 3)];
    for (i, (extra, want)) in cases.into_iter().take(if root { 2 } else { 1 }).enumerate() {
        let cfg = w.write_config(&proxy.endpoint(), None, extra);
        let mut child = crate::common::bin(&["backup", "--no-election", "--config", cfg.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        // The thread is named before it sets its nice value: the last value seen counts.
        let mut seen = None;
        while child.try_wait().unwrap().is_none() {
            for task in std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let tid = task.file_name().to_string_lossy().to_string();
                let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
                if comm.trim() == "etcd-snapshot"
                    && let (Some(snap), Some(main)) = (nice_of(pid, &tid), nice_of(pid, &pid.to_string()))
                {
                    seen = Some((snap, main));
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(seen, Some((want, 10)), "{extra:?}: (snapshot thread, main thread) nice");
        assert_eq!(w.sets().len(), i + 1, "{:?}", w.sets());
    }
}
