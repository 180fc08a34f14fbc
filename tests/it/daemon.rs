//! The daemon as systemd runs it: real processes against a real 3-member etcd cluster on
//! loopback, a fast schedule, SIGKILL of the winner, a stopped member, a test NOTIFY_SOCKET,
//! and guards fed with ClusterVersion/ClusterOperator JSON written into etcd.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::common::{Etcd, EtcdCluster, Proc, Work, file_target, run};
use crate::servers::{Fault, FaultProxy, Rclone};

fn node_config(w: &Work, i: usize, endpoint: &str, cron: &str, targets: &str) -> PathBuf {
    let cfg = w.path().join(format!("node-{i}.toml"));
    let text = format!(
        "cluster_name = \"test\"\nnode_name = \"node-{i}\"\n\n[etcd]\nendpoints = [\"{endpoint}\"]\nconnect_timeout = \"2s\"\nrequest_timeout = \"5s\"\n\n[snapshot]\nstatic_resources_dir = \"\"\nstaging_dir = \"{}\"\n\n[schedule]\ncron = \"{cron}\"\ntimezone = \"UTC\"\njitter = \"0s\"\n\n[election]\nlease_ttl = \"3s\"\n\n{targets}",
        w.path().join(format!("staging-{i}")).display()
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// The I/O scheduler the kernel chose for the disk holding `path` (or its nearest existing
/// ancestor), from /sys; `None` when /sys has no queue for it (as in some containers).
fn io_scheduler_of(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = path.ancestors().find_map(|p| std::fs::metadata(p).ok())?.dev();
    let sys = std::fs::canonicalize(format!(
        "/sys/dev/block/{}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    ))
    .ok()?;
    // A partition has no queue of its own: its disk's is the one.
    let text = std::fs::read_to_string(sys.join("queue/scheduler"))
        .or_else(|_| std::fs::read_to_string(sys.parent().unwrap().join("queue/scheduler")))
        .ok()?;
    let chosen = text.split_whitespace().find(|s| s.starts_with('['))?;
    Some(chosen.trim_matches(['[', ']']).to_string())
}

/// The run markers the election left in etcd: run -> JSON record.
fn markers(endpoints: &str) -> BTreeMap<String, serde_json::Value> {
    crate::support::etcd_prefix(endpoints, "/etcd-backupd/runs/")
}

/// How many keys an `etcdctl get -w fields` found; panics if etcdctl failed, so an error
/// never reads as "no such key".
fn lock_count(out: &std::process::Output) -> usize {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "etcdctl get: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| l.trim().strip_prefix("\"Count\" : "))
        .unwrap_or_else(|| panic!("no Count in {text}"))
        .parse()
        .unwrap()
}

fn set_ids(w: &Work) -> Vec<String> {
    w.sets()
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

#[test]
fn three_daemons_take_exactly_one_backup_per_run_even_with_a_member_down() {
    let mut cluster = EtcdCluster::start(3);
    let w = Work::new();
    let mut daemons: Vec<Proc> = (0..3)
        .map(|i| {
            let cfg = node_config(&w, i, &cluster.endpoints[i], "*/4 * * * * *", &file_target(&w));
            Proc::daemon(&cfg, w.path().join(format!("daemon-{i}.log")), &[])
        })
        .collect();
    std::thread::sleep(Duration::from_secs(13));
    let before_stop = markers(&cluster.all()).len();
    // One member goes away; its daemon cannot reach etcd, the other two carry on.
    cluster.stop(2);
    let stopped_at = chrono::Utc::now();
    std::thread::sleep(Duration::from_secs(10));
    for d in &mut daemons {
        assert_eq!(d.stop(Duration::from_secs(10)), Some(0), "{}", d.log());
    }

    let marks = markers(&format!("{},{}", cluster.endpoints[0], cluster.endpoints[1]));
    assert!(
        before_stop >= 2,
        "runs before the stop: {before_stop}; {}",
        daemons[0].log()
    );
    assert!(marks.len() >= before_stop + 2, "runs went on after the stop: {marks:?}");
    let ids = set_ids(&w);
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no duplicate ids");
    // Exactly one set per run: every marker names a set, and there are no other sets.
    let marked: HashSet<String> = marks
        .values()
        .filter_map(|m| m["id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(marked.len(), marks.len(), "one set per run: {marks:?}");
    assert_eq!(
        marked,
        ids.iter().cloned().collect::<HashSet<_>>(),
        "sets {ids:?} vs runs {marks:?}"
    );
    for m in marks.values() {
        assert_eq!(m["result"], "ok", "{m}");
    }
    // After the stop, node-2's daemon could not take part; the runs were still taken.
    let finished =
        |m: &serde_json::Value| chrono::DateTime::parse_from_rfc3339(m["finished"].as_str().unwrap()).unwrap();
    // Runs well after the stop (records have whole seconds).
    let after: Vec<_> = marks
        .values()
        .filter(|m| finished(m) > stopped_at + chrono::TimeDelta::seconds(1))
        .collect();
    assert!(
        !after.is_empty() && after.iter().all(|m| m["node"] != "node-2"),
        "{after:?}"
    );
    // The lock is free again (a fresh command: `ctl` already holds the markers' `get`).
    let out = cluster
        .etcdctl()
        .arg(format!("--endpoints={},{}", cluster.endpoints[0], cluster.endpoints[1]))
        .args(["get", "-w", "fields", "/etcd-backupd/lock"])
        .output()
        .unwrap();
    assert_eq!(lock_count(&out), 0, "the lock was not released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_winner_is_replaced_and_its_run_completed_by_another_node() {
    let cluster = EtcdCluster::start(3);
    let rclone = Rclone::start();
    // The first snapshot upload hangs: that node is killed mid-run.
    let (fault, stalled) = FaultProxy::stalling_first_snapshot(rclone.url()).await;
    let w = Work::new();
    let target = crate::common::dav_target(&fault.url(), "");
    let daemons: Vec<Proc> = (0..3)
        .map(|i| {
            let cfg = node_config(&w, i, &cluster.endpoints[i], "*/20 * * * * *", &target);
            Proc::daemon(&cfg, w.path().join(format!("daemon-{i}.log")), &[])
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(40);
    while !stalled.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "no upload started: {}", daemons[0].log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = cluster
        .etcdctl()
        .args(["get", "--print-value-only", "/etcd-backupd/lock"])
        .output()
        .unwrap();
    let lock: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the winner holds the lock");
    let winner = lock["node"].as_str().unwrap().to_string();
    let run = lock["run"].as_str().unwrap().to_string();
    let i: usize = winner.trim_start_matches("node-").parse().unwrap();
    // Killed once its set is staged (committed to sets/, owed to the target): the set a
    // restart would deliver, were it not checked against the run's record.
    let staged_sets = w.path().join(format!("staging-{i}")).join("sets");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&staged_sets).map_or(0, |d| d.count()) == 0 {
        assert!(
            Instant::now() < deadline,
            "the winner staged no set: {}",
            daemons[i].log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemons[i].signal(Signal::SIGKILL);
    let killed_at = Instant::now();

    // Another node completes the same run once the winner's 3 s lease expires.
    let deadline = Instant::now() + Duration::from_secs(20);
    let record = loop {
        let m = markers(&cluster.all());
        if let Some(r) = m.get(&run) {
            break r.clone();
        }
        assert!(Instant::now() < deadline, "nobody took over run {run}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        killed_at.elapsed() < Duration::from_secs(15),
        "took over in {:?}",
        killed_at.elapsed()
    );
    assert_ne!(record["node"], winner.as_str());
    assert_eq!(record["result"], "ok", "{record}");
    let id = record["id"].as_str().unwrap();
    let sets: Vec<String> = std::fs::read_dir(rclone.root().join("test"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(sets, vec![id.to_string()], "exactly one visible set for that run");

    // The killed runner comes back: its own set for that run is never delivered (another
    // node's set is the run's backup); it stays a local copy.
    let log = w.path().join(format!("daemon-{i}-again.log"));
    let again = Proc::daemon(&w.path().join(format!("node-{i}.toml")), log, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !again.log().contains("stays a local copy and is not delivered") {
        assert!(
            Instant::now() < deadline,
            "no decision on the staged set: {}",
            again.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // (Later runs may have stored sets of their own since.)
    let of_the_run: Vec<String> = std::fs::read_dir(rclone.root().join("test"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            std::fs::read(p.join("manifest.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|m| m["run"] == run.as_str())
        })
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        of_the_run,
        vec![id.to_string()],
        "still one set for that run:\n{}",
        again.log()
    );
}

#[test]
fn systemd_hears_ready_status_watchdog_and_stopping_and_sighup_reloads() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();
    let sock_path = w.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let cfg = node_config(&w, 0, &etcd.endpoint, "0 0 3 * * *", &file_target(&w));
    let mut d = Proc::daemon(
        &cfg,
        w.path().join("daemon.log"),
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let mut seen = String::new();
    let receive_until = |want: &str, seen: &mut String| {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut buf = [0u8; 4096];
        while !seen.contains(want) {
            assert!(Instant::now() < deadline, "no {want:?}; got {seen:?}");
            if let Ok(n) = sock.recv(&mut buf) {
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                seen.push('\n');
            }
        }
    };
    receive_until("READY=1", &mut seen);
    receive_until("STATUS=idle; next run", &mut seen);
    receive_until("WATCHDOG=1", &mut seen);
    assert!(seen.contains("03:00:00 UTC"), "{seen}");

    // [priority] defaults: I/O class idle and nice 10, on the daemon's threads.
    let pid = d.child.id().to_string();
    let out = Command::new("ionice").args(["-p", &pid]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "idle",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let nice: i32 = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(16)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(nice, 10, "{stat}");
    // The one line the staging disk's scheduler (read here from /sys) calls for.
    let want = match io_scheduler_of(&w.path().join("staging-0")) {
        Some(s) if s == "bfq" || s == "cfq" => format!("I/O scheduler honours priority.io_class scheduler={s}"),
        Some(s) => format!(
            "I/O scheduler ignores priority.io_class; the unit's IOWeight and bandwidth limits still apply scheduler={s}"
        ),
        None => "cannot tell the staging disk's I/O scheduler".to_string(),
    };
    let log = d.log();
    let said: Vec<&str> = log.lines().filter(|l| l.contains("I/O scheduler")).collect();
    assert!(said.len() == 1 && said[0].contains(&want), "want {want:?}:\n{log}");

    // SIGHUP with a broken config keeps the old one; with a good one, reloads.
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("bogus_key = 1\n{good}")).unwrap();
    d.signal(Signal::SIGHUP);
    receive_until("RELOADING=1", &mut seen);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.log().contains("new configuration rejected") {
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // systemd is told the reload ended, and why it changed nothing.
    receive_until("STATUS=configuration rejected: ", &mut seen);
    let rejected = seen
        .lines()
        .find(|l| l.starts_with("STATUS=configuration rejected: "))
        .unwrap();
    assert!(rejected.contains("bogus_key"), "{rejected}");
    std::fs::write(&cfg, good.replace("0 0 3 * * *", "0 15 4 * * *")).unwrap();
    d.signal(Signal::SIGHUP);
    receive_until("04:15:00 UTC", &mut seen);
    assert!(
        d.log().contains("new configuration rejected") && d.log().contains("bogus_key"),
        "{}",
        d.log()
    );
    assert!(d.log().contains("configuration reloaded"), "{}", d.log());

    let code = d.stop(Duration::from_secs(5));
    receive_until("STOPPING=1", &mut seen);
    assert_eq!(code, Some(0), "{}", d.log());

    // status works with the daemon stopped, and says it is stopped: no next run, not OK.
    let r = run(&["status", "--config", cfg.to_str().unwrap()]);
    assert_ne!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout.contains("next run    none: the daemon is not running") && r.stdout.contains("0 15 4 * * * (UTC)"),
        "{}\n{}\n{}",
        r.stdout,
        std::fs::read_to_string(w.path().join("staging-0/state.json")).unwrap_or_default(),
        d.log()
    );
    assert!(
        r.stdout.contains("daemon NOT running (stopped "),
        "{}\n{}",
        r.stdout,
        std::fs::read_to_string(w.path().join("staging-0/state.json")).unwrap_or_default()
    );
}

fn put_json(etcd: &Etcd, key: &str, v: serde_json::Value) {
    etcd.put(None, key, &v.to_string());
}

const CV: &str = "/kubernetes.io/config.openshift.io/clusterversions/version";

#[test]
fn guards_skip_with_reasons_and_a_completed_upgrade_is_backed_up_once() {
    use serde_json::json;
    let etcd = Etcd::start();
    let w = Work::new();
    let cfg = node_config(&w, 0, &etcd.endpoint, "0 0 3 1 1 *", &file_target(&w));
    crate::common::settle_operators(&etcd, None);
    let backup = || run(&["backup", "--config", cfg.to_str().unwrap()]);
    let two_hours_ago = (chrono::Utc::now() - chrono::TimeDelta::hours(2)).to_rfc3339();
    let cases = [
        (
            json!({"spec": {"clusterID": "c"}, "status": {"desired": {"version": "4.15.4"}, "history": [
                {"state": "Completed", "version": "4.15.4", "completionTime": two_hours_ago}]}}),
            "less than guards.min_cluster_age",
        ),
        (
            json!({"spec": {"clusterID": "c"}, "status": {"desired": {"version": "4.15.5"}, "history": [
                {"state": "Partial", "version": "4.15.5", "completionTime": null},
                {"state": "Completed", "version": "4.15.4", "completionTime": "2026-01-01T00:00:00Z"}]}}),
            "upgrade to 4.15.5 is in progress",
        ),
    ];
    for (cv, reason) in cases {
        put_json(&etcd, CV, cv);
        let r = backup();
        assert_eq!(r.code, 3, "{}", r.all());
        assert!(r.stderr.contains(reason), "{reason}: {}", r.stderr);
    }
    let done = json!({"spec": {"clusterID": "c"}, "status": {"desired": {"version": "4.15.5"}, "history": [
        {"state": "Completed", "version": "4.15.5", "completionTime": "2026-11-01T00:00:00Z"},
        {"state": "Completed", "version": "4.15.4", "completionTime": "2026-01-01T00:00:00Z"}]}});
    put_json(&etcd, CV, done);
    put_json(
        &etcd,
        "/kubernetes.io/config.openshift.io/clusteroperators/kube-apiserver",
        json!({"status": {"conditions": [{"type": "Progressing", "status": "True"}]}}),
    );
    let r = backup();
    assert_eq!(r.code, 3, "{}", r.all());
    assert!(
        r.stderr.contains("ClusterOperator kube-apiserver is Progressing=True"),
        "{}",
        r.stderr
    );
    put_json(
        &etcd,
        "/kubernetes.io/config.openshift.io/clusteroperators/kube-apiserver",
        json!({"status": {"conditions": [{"type": "Progressing", "status": "False"}]}}),
    );
    assert!(w.sets().is_empty());

    // Two daemons see the completed upgrade at start: one after-upgrade backup between them.
    let cfg1 = node_config(&w, 1, &etcd.endpoint, "0 0 3 1 1 *", &file_target(&w));
    let mut a = Proc::daemon(&cfg, w.path().join("a.log"), &[]);
    let mut b = Proc::daemon(&cfg1, w.path().join("b.log"), &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while w.sets().is_empty() {
        assert!(
            Instant::now() < deadline,
            "no after-upgrade backup: {}\n{}",
            a.log(),
            b.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(w.sets().len(), 1, "{:?}", w.sets());
    let first = w.sets()[0].clone();

    // The next upgrade completes while the daemons run: the watch on the ClusterVersion sees
    // it well before the 30 s poll would.
    put_json(
        &etcd,
        CV,
        json!({"spec": {"clusterID": "c"}, "status": {"desired": {"version": "4.15.6"}, "history": [
            {"state": "Completed", "version": "4.15.6", "completionTime": "2026-11-20T00:00:00Z"},
            {"state": "Completed", "version": "4.15.5", "completionTime": "2026-11-01T00:00:00Z"},
            {"state": "Completed", "version": "4.15.4", "completionTime": "2026-01-01T00:00:00Z"}]}}),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while w.sets().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the new upgrade was not noticed: {}\n{}",
            a.log(),
            b.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(a.stop(Duration::from_secs(5)), Some(0));
    assert_eq!(b.stop(Duration::from_secs(5)), Some(0));
    assert_eq!(w.sets().len(), 2, "{:?}", w.sets());
    let manifest = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
    };
    let m = manifest(&first);
    assert_eq!(m["trigger"], "after-upgrade");
    assert_eq!(m["openshift"]["version"], "4.15.5");
    assert_eq!(m["openshift"]["cluster_id"], "c");
    let second = w.sets().into_iter().find(|p| *p != first).unwrap();
    assert_eq!(manifest(&second)["trigger"], "after-upgrade");
    assert_eq!(manifest(&second)["openshift"]["version"], "4.15.6");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_backup_exits_fast_releases_the_lock_and_leaves_no_set() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let rclone = Rclone::start();
    let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stalled.clone();
    let fault = FaultProxy::start(rclone.url(), move |_, method, path, _| {
        if method == "PUT" && path.contains("snapshot_") {
            s.store(true, std::sync::atomic::Ordering::SeqCst);
            Fault::Stall
        } else {
            Fault::Forward
        }
    })
    .await;
    let w = Work::new();
    let target = crate::common::dav_target(&fault.url(), "");
    let cfg = node_config(&w, 0, &etcd.endpoint, "*/3 * * * * *", &target);
    let mut d = Proc::daemon(&cfg, w.path().join("daemon.log"), &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stalled.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "no upload started: {}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lock = etcd
        .etcdctl(None)
        .args(["get", "--print-value-only", "/etcd-backupd/lock"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&lock.stdout).contains("node-0"),
        "the runner holds the lock"
    );
    let t0 = Instant::now();
    let code = tokio::task::spawn_blocking(move || {
        let code = d.stop(Duration::from_secs(10));
        (code, d.log())
    })
    .await
    .unwrap();
    assert_eq!(code.0, Some(0), "{}", code.1);
    assert!(t0.elapsed() < Duration::from_secs(4), "stopped in {:?}", t0.elapsed());
    let lock = etcd
        .etcdctl(None)
        .args(["get", "-w", "fields", "/etcd-backupd/lock"])
        .output()
        .unwrap();
    assert_eq!(lock_count(&lock), 0, "the lease was not revoked");
    let visible: Vec<String> = std::fs::read_dir(rclone.root().join("test"))
        .map(|e| {
            e.map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    assert!(visible.is_empty(), "{visible:?}");
}

#[test]
fn a_restarted_daemon_delivers_what_a_down_target_left_pending() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();
    // The target is a mount point that is not mounted yet: the backup stays pending.
    let mount = w.path().join("mnt");
    let metrics_port = crate::common::free_port();
    let target = format!(
        "[[target]]\nname = \"nfs\"\nurl = \"file://{}\"\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
        mount.display()
    );
    let cfg = node_config(&w, 0, &etcd.endpoint, "0 0 3 1 1 *", &target);
    let r = run(&["backup", "--no-election", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.all());
    let staging = w.path().join("staging-0");
    let pending: Vec<_> = std::fs::read_dir(staging.join("sets")).unwrap().flatten().collect();
    assert_eq!(pending.len(), 1);
    let id = pending[0].file_name().into_string().unwrap();

    // The filesystem comes back; a daemon started now delivers the set without a new run.
    std::fs::create_dir(&mount).unwrap();
    let mut d = Proc::daemon(&cfg, w.path().join("daemon.log"), &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !mount.join("test").join(&id).join("manifest.json").exists() {
        assert!(Instant::now() < deadline, "not delivered: {}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.log().contains("every pending backup set is delivered") {
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Scraped over HTTP from the running daemon: nothing pending any more.
    let out = Command::new("curl")
        .args(["-fsS", &format!("http://127.0.0.1:{metrics_port}/metrics")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", d.log());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("\netcd_backupd_pending_sets 0\n"), "{text}");
    assert!(text.contains("# TYPE etcd_backupd_runs_total counter"), "{text}");
    assert_eq!(d.stop(Duration::from_secs(10)), Some(0), "{}", d.log());
    let status = run(&["status", "--json", "--config", cfg.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v["pending"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(v["local_copies"][0], id.as_str(), "{v}");
    // Only the one set: the daemon took no backup of its own.
    assert_eq!(std::fs::read_dir(mount.join("test")).unwrap().count(), 1);
}

#[test]
fn platform_backup_sets_are_imported_once_and_verified_first() {
    let etcd = Etcd::start();
    etcd.fill(None, 100, 100);
    let w = Work::new();
    let import = w.path().join("cluster-backup");
    // What the platform leaves before upgrades, made by the stand-in of its script on a host
    // of its own: one good set, one whose snapshot was corrupted in transit (a second later:
    // its own timestamp).
    let host = crate::common::ScriptHost::start(&w, 2);
    let take = |dir: &str, corrupt: bool| {
        let env: &[(&str, &str)] = if corrupt { &[("STANDIN_CORRUPT", "1")] } else { &[] };
        let out = host.run_script(&import.join(dir), false, env);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    };
    take("upgrade-backup-a", false);
    std::thread::sleep(Duration::from_millis(1100));
    take("upgrade-backup-b", true);
    let good: Vec<String> = std::fs::read_dir(import.join("upgrade-backup-a"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let snapshot = good.iter().find(|n| n.starts_with("snapshot_")).unwrap().clone();
    let id = snapshot
        .trim_start_matches("snapshot_")
        .trim_end_matches(".db")
        .to_string();

    let extra = format!("{}\n[import]\ndirs = [\"{}\"]\n", file_target(&w), import.display());
    let cfg = node_config(&w, 0, &etcd.endpoint, "0 0 3 1 1 *", &extra);
    let sets = w.target_root().join("test");
    let mut d = Proc::daemon(&cfg, w.path().join("daemon-1.log"), &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.log().contains("cannot import the platform backup folder")
        || !sets.join(&id).join("manifest.json").exists()
    {
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(d.log().contains("snapshot trailer mismatch"), "{}", d.log());
    assert_eq!(d.stop(Duration::from_secs(10)), Some(0), "{}", d.log());
    // Only the good set, under its original names and timestamp, marked imported.
    assert_eq!(std::fs::read_dir(&sets).unwrap().count(), 1);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sets.join(&id).join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["trigger"], "imported");
    for name in &good {
        assert_eq!(
            std::fs::read(sets.join(&id).join(name)).unwrap(),
            std::fs::read(import.join("upgrade-backup-a").join(name)).unwrap(),
            "{name}"
        );
    }
    crate::common::assert_sha256sums(&sets.join(&id));
    // The platform's own files stay where they were.
    assert!(import.join("upgrade-backup-a").join(&snapshot).is_file());

    // A restarted daemon imports nothing again.
    let mut d = Proc::daemon(&cfg, w.path().join("daemon-2.log"), &[]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !d.log().contains("waiting for the next run") {
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(d.stop(Duration::from_secs(10)), Some(0), "{}", d.log());
    assert!(!d.log().contains("import"), "{}", d.log());
    assert_eq!(std::fs::read_dir(&sets).unwrap().count(), 1);
}

/// The platform's upgrade backups as 4.14 and earlier wrote them (`cluster-backup.sh --force`
/// into `upgrade-backup-<version>-<ts>/`): imported with their dirty names and the folder's
/// version as the set's OpenShift version; folders that cannot be imported are reported once
/// (log, `status`, gauge), not at every poll or start.
#[test]
fn upgrade_backups_import_with_their_version_and_refusals_are_reported_once() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();
    let import = w.path().join("cluster-backup");
    let host = crate::common::ScriptHost::start(&w, 3);
    let made = import.join("made");
    let out = host.run_script(&made, true, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let names: Vec<String> = std::fs::read_dir(&made)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let snapshot = names.iter().find(|n| n.starts_with("snapshot_")).unwrap().clone();
    let ts = snapshot
        .trim_start_matches("snapshot_")
        .trim_end_matches(".db")
        .to_string();
    let id = ts.trim_end_matches("__POSSIBLY_DIRTY__").to_string();
    assert_ne!(ts, id, "the stand-in's --force names are dirty");
    let folder = import.join(format!("upgrade-backup-4.14.0-rc.2-{ts}"));
    std::fs::rename(&made, &folder).unwrap();
    // Two folders that cannot be imported: a name that is no timestamp, and an archive the
    // restore could not use (one component missing).
    let odd = import.join("upgrade-backup-4.13.1-2023-01-01_000000");
    std::fs::create_dir_all(&odd).unwrap();
    std::fs::copy(folder.join(&snapshot), odd.join("snapshot_yesterday.db")).unwrap();
    let partial = import.join("upgrade-backup-4.13.2-2023-02-02_000000");
    std::fs::create_dir_all(&partial).unwrap();
    let out = host.run_script(&partial, false, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let archive = std::fs::read_dir(&partial)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".tar.gz"))
        .unwrap();
    crate::seal::sh(&format!(
        "cd {d} && mkdir x && tar -xzf {a} -C x && rm -rf x/static-pod-resources/kube-scheduler-pod-* && tar -czf {a} -C x static-pod-resources && rm -rf x",
        d = partial.display(),
        a = archive.display()
    ));

    let extra = format!("{}\n[import]\ndirs = [\"{}\"]\n", file_target(&w), import.display());
    let cfg = node_config(&w, 0, &etcd.endpoint, "0 0 3 1 1 *", &extra);
    let sets = w.target_root().join("test");
    let mut d = Proc::daemon(&cfg, w.path().join("daemon-1.log"), &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.log().matches("cannot import the platform backup folder").count() < 2
        || !sets.join(&id).join("manifest.json").exists()
    {
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(d.stop(Duration::from_secs(10)), Some(0), "{}", d.log());
    let log = d.log();
    assert!(
        log.contains(&odd.display().to_string())
            && log.contains("\"yesterday\" in 'snapshot_yesterday.db' is not %F_%H%M%S"),
        "{log}"
    );
    assert!(log.contains("no kube-scheduler revision directory"), "{log}");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sets.join(&id).join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["trigger"], "imported");
    assert_eq!(m["openshift"]["version"], "4.14.0-rc.2", "{m}");
    for name in &names {
        assert!(sets.join(&id).join(name).is_file(), "{name} kept its dirty name");
    }
    // status and the gauge name both refusals.
    let st = run(&["status", "--json", "--config", cfg.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap_or_else(|_| panic!("{}", st.all()));
    let refused: Vec<&str> = v["import_refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(refused.len(), 2, "{v}");
    assert!(refused.contains(&odd.to_str().unwrap()) && refused.contains(&partial.to_str().unwrap()));
    let text = run(&["status", "--config", cfg.to_str().unwrap()]);
    assert!(text.stdout.contains("import      REFUSED"), "{}", text.stdout);
    let metrics = etcd_backupd::metrics::render(&w.path().join("staging-0"));
    assert!(metrics.contains("\netcd_backupd_import_refused_sets 2\n"), "{metrics}");

    // A restarted daemon polls again at start: nothing imported or reported twice; the
    // folder removed meanwhile has its report cleared.
    std::fs::remove_dir_all(&odd).unwrap();
    let mut d = Proc::daemon(&cfg, w.path().join("daemon-2.log"), &[]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !d.log().contains("its report is cleared") {
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(d.stop(Duration::from_secs(10)), Some(0), "{}", d.log());
    let log = d.log();
    assert!(
        !log.contains("cannot import") && !log.contains("imported a platform backup set"),
        "{log}"
    );
    assert_eq!(std::fs::read_dir(&sets).unwrap().count(), 1);
    let metrics = etcd_backupd::metrics::render(&w.path().join("staging-0"));
    assert!(metrics.contains("\netcd_backupd_import_refused_sets 1\n"), "{metrics}");
}

/// GET /metrics on `addr` with curl; the body on a 200.
fn scrape(addr: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-fsS", "--max-time", "2", &format!("http://{addr}/metrics")])
        .output()
        .unwrap();
    out.status.success().then(|| String::from_utf8(out.stdout).unwrap())
}

#[test]
fn a_taken_metrics_port_never_stops_backups_and_is_bound_once_free() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();
    // Another process holds the port of metrics.listen (as etcd's pod holds 9979 on a master).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let targets = format!(
        "{}\n[metrics]\nlisten = \"{addr}\"\nlisten_retry = \"1s\"\n",
        file_target(&w)
    );
    let cfg = node_config(&w, 0, &etcd.endpoint, "*/2 * * * * *", &targets);
    // The retry interval (30 s) shortened to 1 s for the test, through an internal variable.
    let mut d = Proc::daemon(&cfg, w.path().join("daemon.log"), &[]);

    // Backups go on, every 2 s, and the daemon keeps running.
    let deadline = Instant::now() + Duration::from_secs(40);
    while set_ids(&w).len() < 2 {
        assert!(d.child.try_wait().unwrap().is_none(), "the daemon exited: {}", d.log());
        assert!(Instant::now() < deadline, "fewer than 2 sets: {}", d.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon exited: {}", d.log());
    let log = d.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("cannot serve metrics")).collect();
    // Named once (address and error) although retried every second meanwhile.
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains(&addr) && warnings[0].contains("Address already in use"),
        "{log}"
    );
    assert!(!log.contains("metrics endpoint is up"), "{log}");

    // The port is freed: the next retry binds it, without a restart.
    drop(taken);
    let deadline = Instant::now() + Duration::from_secs(40);
    let text = loop {
        if let Some(text) = scrape(&addr) {
            break text;
        }
        assert!(Instant::now() < deadline, "no /metrics on {addr}: {}", d.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    let last_ok: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("etcd_backupd_last_success_timestamp_seconds "))
        .unwrap_or_else(|| panic!("{text}"))
        .parse()
        .unwrap();
    assert!(last_ok > 0, "{text}");
    let log = d.log();
    let up = log
        .lines()
        .find(|l| l.contains("metrics endpoint is up again"))
        .unwrap_or_else(|| panic!("{log}"));
    let attempts: u64 = up
        .split("failed_attempts=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{up}"));
    assert!(attempts >= 3, "{up}");
    assert_eq!(log.matches("cannot serve metrics").count(), 1, "{log}");
    assert_eq!(d.stop(Duration::from_secs(10)), Some(0), "{}", d.log());
    assert!(set_ids(&w).len() >= 2);
}

#[test]
fn imported_platform_sets_are_sealed_like_our_own() {
    let etcd = Etcd::start();
    etcd.fill(None, 100, 100);
    etcd.put(None, "/kubernetes.io/secrets/default/db", "imported-secret-value-98765");
    let w = Work::new();
    let import = w.path().join("cluster-backup");
    let host = crate::common::ScriptHost::start(&w, 2);
    host.put("/kubernetes.io/secrets/default/db", "imported-secret-value-98765");
    let out = host.run_script(&import.join("upgrade-backup-a"), false, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let originals: Vec<(String, Vec<u8>)> = std::fs::read_dir(import.join("upgrade-backup-a"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    assert_eq!(originals.len(), 2, "a snapshot and an archive");
    let key = w.path().join("age.key");
    crate::seal::sh(&format!("age-keygen -o {} 2>/dev/null", key.display()));
    let recipient = String::from_utf8(crate::seal::sh(&format!("age-keygen -y {}", key.display()))).unwrap();
    let extra = format!(
        "{}\n[import]\ndirs = [\"{}\"]\n\n[compression]\nzstd_level = 3\n\n[encryption]\nage_recipients = [\"{}\"]\n",
        file_target(&w),
        import.display(),
        recipient.trim()
    );
    let cfg = node_config(&w, 0, &etcd.endpoint, "0 0 3 1 1 *", &extra);
    let sets = w.target_root().join("test");
    let mut d = Proc::daemon(&cfg, w.path().join("daemon.log"), &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let set = loop {
        let found = std::fs::read_dir(&sets)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("manifest.json").exists());
        if let Some(s) = found {
            break s;
        }
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(d.stop(Duration::from_secs(10)), Some(0), "{}", d.log());
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(set.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["trigger"], "imported");
    for (name, bytes) in &originals {
        let stored = set.join(format!("{name}.zst.age"));
        assert!(
            stored.is_file(),
            "{name} is not stored sealed: {:?}",
            std::fs::read_dir(&set).unwrap().collect::<Vec<_>>()
        );
        assert!(!set.join(name).exists(), "{name} also stored in plaintext");
        // Nothing of the Secret in clear on the target.
        let raw = std::fs::read(&stored).unwrap();
        assert!(!raw.windows(27).any(|w| w == b"imported-secret-value-98765"));
        // The standard tools open it to the platform's exact bytes.
        let opened = crate::seal::sh(&format!("age -d -i {} {} | zstd -dc", key.display(), stored.display()));
        assert_eq!(&opened, bytes, "{name}");
        let f = m["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name.as_str())
            .unwrap();
        assert_eq!(f["compression"], "zstd", "{f}");
        assert_eq!(f["encryption"], "age", "{f}");
    }
}
