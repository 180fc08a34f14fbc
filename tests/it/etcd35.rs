//! etcd 3.5 (what OpenShift 4 runs; Debian ships 3.4): `backup`, `verify --deep` and fetch +
//! restore against a real etcd 3.5 from `$ETCD35_BIN_DIR`, and the places where 3.4 and 3.5
//! differ (3.5 restores and reads snapshots with `etcdutl`; 3.4 with `etcdctl`) on both.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{Etcd, EtcdCluster, Run, Work, assert_sha256sums, etcd35_dir, free_port, run_env, snapshot_status};

/// Runs the binary with `--config cfg` appended and debug logs for the crate, so the drill's
/// steps (which restore tool it ran) show on stderr.
fn cli(list: &[&str], cfg: &Path) -> Run {
    let mut a = list.to_vec();
    a.extend(["--config", cfg.to_str().unwrap()]);
    run_env(&a, &[("ETCD_BACKUPD_LOG", "etcd_backupd=debug")])
}

/// `etcd --version` of the binary at `etcd`: "3.5.1".
fn version_of(etcd: &Path) -> String {
    let out = Command::new(etcd).arg("--version").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("etcd Version: ").map(str::to_string))
        .unwrap_or_else(|| panic!("{} --version: {}", etcd.display(), String::from_utf8_lossy(&out.stdout)))
}

/// The store's revision and its number of keys, as the etcdctl in `ctl` reads them.
fn revision_and_keys(mut ctl: Command) -> (i64, i64) {
    let out = ctl
        .args(["get", "", "--prefix", "--keys-only", "-w", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["header"]["revision"].as_i64().unwrap(),
        v["count"].as_i64().unwrap_or(0),
    )
}

fn manifest(set: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(set.join("manifest.json")).unwrap()).unwrap()
}

fn id_of(set: &Path) -> String {
    set.file_name().unwrap().to_str().unwrap().to_string()
}

/// An etcd (3.5 from `bin_dir`, or Debian's 3.4 from `PATH` with `None`) holding 500 keys,
/// 3 namespaces and `/before-backup`, backed up once with `backup --no-election` to a file
/// target: the etcd, its workspace, the config, the set's directory, and the revision and
/// key count the snapshot holds.
struct BackedUp {
    etcd: Etcd,
    w: Work,
    cfg: PathBuf,
    set: PathBuf,
    /// etcd's revision just before `backup` ran.
    revision_before: i64,
    revision: i64,
    keys: i64,
}

fn backed_up(bin_dir: Option<&Path>) -> BackedUp {
    let etcd = match bin_dir {
        Some(d) => Etcd::start_in(d),
        None => Etcd::start(),
    };
    etcd.fill(None, 500, 200);
    for i in 0..3 {
        etcd.put(None, &format!("/kubernetes.io/namespaces/ns-{i}"), "{}");
    }
    etcd.put(None, "/before-backup", "kept");
    let (revision_before, keys_before) = revision_and_keys(etcd.etcdctl(None));
    assert_eq!(keys_before, 504);
    let w = Work::new();
    let cfg = w.write_config(&etcd.endpoint, None, "");
    let r = cli(&["backup", "--no-election"], &cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    // Read after the run: it reserves the set's id in etcd before the snapshot (one more key
    // and revision) and writes nothing after it, so this is exactly what the snapshot holds.
    let (revision, keys) = revision_and_keys(etcd.etcdctl(None));
    let sets = w.sets();
    assert_eq!(sets.len(), 1, "{sets:?}");
    let set = sets[0].clone();
    BackedUp {
        etcd,
        w,
        cfg,
        set,
        revision_before,
        revision,
        keys,
    }
}

/// Appends `[verify] bin_dir = dir` to the config.
fn set_verify_bin_dir(cfg: &Path, dir: &Path) {
    let text = std::fs::read_to_string(cfg).unwrap() + &format!("\n[verify]\nbin_dir = \"{}\"\n", dir.display());
    std::fs::write(cfg, text).unwrap();
}

/// Runs `verify latest --deep` and checks the drill restored the snapshot with `restorer`
/// (`etcdutl` or `etcdctl`), served it with etcd `version`, and read exactly what `b`'s etcd
/// held when the set was taken.
fn assert_deep_verify(b: &BackedUp, restorer: &str, version: &str) {
    let r = cli(&["verify", "latest", "--deep"], &b.cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    let id = id_of(&b.set);
    assert!(
        r.stdout
            .contains(&format!("set {id} of cluster test on target 'local': OK")),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(&format!(
            "restore drill: etcd {version} opened the restored snapshot in"
        )),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(&format!(
            "revision {}, {} keys (3 under /kubernetes.io/, 3 namespaces)",
            b.revision, b.keys
        )),
        "{}",
        r.stdout
    );
    assert!(
        r.stderr
            .contains(&format!("restore drill: {restorer} snapshot restore")),
        "{}",
        r.stderr
    );
    let r = cli(&["status", "--json"], &b.cfg);
    let status: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(status["last_drill"]["ok"], true, "{status}");
}

#[test]
fn backup_of_etcd35_passes_etcdutl_snapshot_status_and_records_its_version() {
    let dir = etcd35_dir();
    let b = backed_up(Some(&dir));
    let id = id_of(&b.set);
    assert_sha256sums(&b.set);
    let snap = b.set.join(format!("snapshot_{id}.db"));
    // 3.5 reads snapshot files with etcdutl (etcdctl's `snapshot status` is deprecated there).
    let status = snapshot_status(Command::new(b.etcd.tool("etcdutl")), &snap);
    assert_eq!(status["revision"].as_i64(), Some(b.revision), "{status}");
    assert!(status["totalKey"].as_i64().unwrap() >= b.keys, "{status}");

    let m = manifest(&b.set);
    let version = version_of(&b.etcd.tool("etcd"));
    assert!(version.starts_with("3.5."), "{version}");
    assert_eq!(m["etcd"]["version"], version.as_str(), "{m}");
    // The manifest records the revision etcd reported as the run started, before it reserved
    // the set's id: at most the snapshot's.
    let recorded = m["etcd"]["revision"].as_i64().unwrap();
    assert!((b.revision_before..=b.revision).contains(&recorded), "{m}");
    assert_eq!(m["etcd"]["endpoint"], b.etcd.endpoint.as_str(), "{m}");
}

#[test]
fn verify_deep_with_etcd35_tools_restores_with_etcdutl_and_reads_what_was_written() {
    let dir = etcd35_dir();
    let b = backed_up(Some(&dir));
    set_verify_bin_dir(&b.cfg, &dir);
    assert_deep_verify(&b, "etcdutl", &version_of(&dir.join("etcd")));
}

/// The 3.4 path, pinned to 3.4's own tools whatever `PATH` holds: a `verify.bin_dir` with
/// Debian's etcd and etcdctl and no etcdutl restores with `etcdctl snapshot restore`; with
/// neither restore tool there the drill fails and says what it needs.
#[test]
fn verify_deep_with_etcd34_tools_falls_back_to_etcdctl() {
    let b = backed_up(None);
    let tools = b.w.path().join("etcd-3.4");
    std::fs::create_dir(&tools).unwrap();
    for name in ["etcd", "etcdctl"] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap())
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{name} (Debian's etcd 3.4) must be in PATH"));
        std::os::unix::fs::symlink(found, tools.join(name)).unwrap();
    }
    let version = version_of(&tools.join("etcd"));
    assert!(version.starts_with("3.4."), "{version}");
    set_verify_bin_dir(&b.cfg, &tools);
    assert_deep_verify(&b, "etcdctl", &version);

    std::fs::remove_file(tools.join("etcdctl")).unwrap();
    let r = cli(&["verify", "latest", "--deep"], &b.cfg);
    assert_ne!(r.code, 0, "{}", r.all());
    assert!(
        r.stderr.contains("needs etcdutl (etcd 3.5+) or etcdctl (3.4)"),
        "{}",
        r.stderr
    );
    let r = cli(&["status", "--json"], &b.cfg);
    let status: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(status["last_drill"]["ok"], false, "{status}");
}

/// What an operator does on 3.5: `fetch latest --to DIR`, `etcdutl snapshot restore` into a
/// new data directory (with `--mark-compacted --bump-revision`, as the platform restores, where
/// the installed etcdutl has them: they came in a later 3.5 patch release than 3.5.1), then a
/// 3.5 etcd on it serves the keys written before the backup and takes new writes.
#[test]
fn fetch_then_etcdutl_restore_serves_the_keys_on_etcd35() {
    let dir = etcd35_dir();
    let b = backed_up(Some(&dir));
    let id = id_of(&b.set);
    let fetched = b.w.path().join("assets/backup");
    let r = cli(&["fetch", "latest", "--to", fetched.to_str().unwrap()], &b.cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    let snap = fetched.join(format!("snapshot_{id}.db"));
    assert_eq!(
        std::fs::read(&snap).unwrap(),
        std::fs::read(b.set.join(format!("snapshot_{id}.db"))).unwrap()
    );
    drop(b.etcd);

    let etcdutl = dir.join("etcdutl");
    let help = Command::new(&etcdutl)
        .args(["snapshot", "restore", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned() + &String::from_utf8_lossy(&help.stderr);
    let bump = help.contains("--bump-revision") && help.contains("--mark-compacted");
    const BUMP: i64 = 1_000_000;
    let data = b.w.path().join("restored");
    let peer = free_port();
    let mut restore = Command::new(&etcdutl);
    restore
        .args(["snapshot", "restore"])
        .arg(&snap)
        .arg(format!("--data-dir={}", data.display()))
        .args([
            "--name=test0",
            &format!("--initial-cluster=test0=http://127.0.0.1:{peer}"),
            &format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
        ]);
    if bump {
        restore.args(["--mark-compacted", &format!("--bump-revision={BUMP}")]);
    }
    let out = restore.output().unwrap();
    assert!(
        out.status.success(),
        "etcdutl snapshot restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let restored = Etcd::start_restored_in(&dir, &data, peer);
    let out = restored
        .etcdctl(None)
        .args(["get", "/before-backup", "--print-value-only"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "kept");
    let (revision, keys) = revision_and_keys(restored.etcdctl(None));
    assert_eq!(keys, b.keys);
    if bump {
        assert!(revision >= b.revision + BUMP, "{revision}");
    } else {
        assert_eq!(revision, b.revision);
    }
    restored.put(None, "/after-restore", "new");
    assert_eq!(revision_and_keys(restored.etcdctl(None)), (revision + 1, b.keys + 1));
}

/// Three etcd 3.5 members on loopback; an elected `backup` (no `--no-election`) takes the set
/// through the run lock, stores it, records the run in etcd 3.5 and releases the lock.
#[test]
fn elected_backup_on_a_three_member_etcd35_cluster() {
    let dir = etcd35_dir();
    let cluster = EtcdCluster::start_in(3, &dir);
    let out = cluster
        .etcdctl()
        .args(["put", "/before-backup", "kept"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let w = Work::new();
    let cfg = w.write_config(&cluster.endpoints[0], None, "\n[election]\nlease_ttl = \"5s\"\n");
    let r = cli(&["backup"], &cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    let sets = w.sets();
    assert_eq!(sets.len(), 1, "{sets:?}");
    let set = &sets[0];
    assert_sha256sums(set);
    let m = manifest(set);
    assert_eq!(m["etcd"]["version"], version_of(&dir.join("etcd")).as_str(), "{m}");
    assert_eq!(m["etcd"]["endpoint"], cluster.endpoints[0].as_str(), "{m}");
    assert_eq!(m["trigger"], "manual", "{m}");

    // The run's marker and the last-run record, read back with etcdctl 3.5; no lock is left.
    let get = |key: &str, prefix: bool| {
        let mut ctl = cluster.etcdctl();
        ctl.args(["get", key]);
        if prefix {
            ctl.arg("--prefix");
        }
        let out = ctl.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let runs = get("/etcd-backupd/runs/", true);
    let lines: Vec<&str> = runs.lines().collect();
    assert_eq!(lines.len(), 2, "{runs}");
    assert!(lines[0].starts_with("/etcd-backupd/runs/manual-node-a-"), "{runs}");
    let marker: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(marker["node"], "node-a", "{marker}");
    assert_eq!(marker["result"], "ok", "{marker}");
    assert_eq!(marker["id"], id_of(set).as_str(), "{marker}");
    let last = get("/etcd-backupd/last", false);
    assert!(last.contains(&id_of(set)), "{last}");
    assert_eq!(get("/etcd-backupd/lock", false), "", "the run lock is released");
}
