//! The on-call view: `status` as a verdict with its exit code, the daemon's heartbeat (on
//! the node and in etcd for `status --cluster`), broken setups said at start, and the exit
//! codes the product contract gives.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{Etcd, Proc, Work, run};

fn status_json(cfg: &Path) -> (i32, serde_json::Value) {
    let r = run(&["status", "--json", "--config", cfg.to_str().unwrap()]);
    let v = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.all()));
    (r.code, v)
}

/// A config with the `local` file target, election on, a schedule that does not fire during
/// the test, and `extra` at the end.
fn config(w: &Work, endpoint: &str, extra: &str) -> PathBuf {
    w.write_config(
        endpoint,
        None,
        &format!("\n[schedule]\ncron = \"0 0 3 * * *\"\ntimezone = \"Europe/Berlin\"\njitter = \"10m\"\n{extra}"),
    )
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "no {what}: {}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn status_gives_a_verdict_and_the_exit_code_a_check_feeds_on() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();
    let cfg = config(&w, &etcd.endpoint, "");

    // A fresh node: nothing anywhere. Not protected, and it says so.
    let r = run(&["status", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stdout.starts_with("FAILING: no target holds a good set newer than 1d 2h"), "{}", r.stdout);
    assert!(r.stdout.contains("this node never ran a backup"), "{}", r.stdout);
    // From a pipe, the verdict is on stderr too (one line).
    assert!(r.stderr.trim().starts_with("FAILING: "), "{}", r.stderr);

    // A good backup, but no daemon runs: AT RISK.
    let b = run(&["backup", "--no-election", "--config", cfg.to_str().unwrap()]);
    assert_eq!(b.code, 0, "{}", b.all());
    let (code, v) = status_json(&cfg);
    assert_eq!(code, 4, "{v}");
    assert_eq!((v["schema_version"].as_u64(), v["ok"].as_bool()), (Some(1), Some(false)), "{v}");
    assert_eq!(v["verdict"], "AT RISK", "{v}");
    assert!(v["reasons"][0].as_str().unwrap().contains("the daemon is not running"), "{v}");
    assert_eq!(v["coverage"][0]["target"], "local", "{v}");
    assert_eq!(v["coverage"][0]["fresh"], true, "{v}");

    // The daemon beats: OK, exit 0; the next run as it will start (jitter included).
    let mut d = Proc::daemon(&cfg, w.path().join("daemon.log"), &[]);
    wait_for("OK", || status_json(&cfg).0 == 0, || d.log());
    let (_, v) = status_json(&cfg);
    assert_eq!((v["ok"].as_bool(), &v["verdict"]), (Some(true), &serde_json::json!("OK")), "{v}");
    let (at, start) = (v["next_run"].as_str().unwrap(), v["next_start"].as_str().unwrap());
    assert!(start >= at, "{v}");
    let r = run(&["status", "--cluster", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.starts_with("OK: "), "{}", r.stdout);
    // One time format, in the schedule's zone, with an age.
    assert!(r.stdout.contains(" CET (") || r.stdout.contains(" CEST ("), "{}", r.stdout);
    assert!(r.stdout.contains("(jitter included)"), "{}", r.stdout);
    // The node's heartbeat is in etcd, read without ssh.
    assert!(r.stdout.contains("node        node-a alive (heartbeat"), "{}", r.stdout);
    assert!(r.stdout.contains("local: 1 set(s), newest "), "{}", r.stdout);

    // etcd stops answering: AT RISK, naming it.
    drop(etcd);
    let (code, v) = status_json(&cfg);
    assert_eq!(code, 4, "{v}");
    assert!(
        v["reasons"].as_array().unwrap().iter().any(|r| r.as_str().unwrap().starts_with("etcd does not answer")),
        "{v}"
    );
    // And a run that fails: FAILING, with its reason, exit 1.
    let b = run(&["backup", "--no-election", "--config", cfg.to_str().unwrap()]);
    assert_eq!(b.code, 1, "{}", b.all());
    let r = run(&["status", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stdout.starts_with("FAILING: the last run ("), "{}", r.stdout);
    assert_eq!(d.stop(Duration::from_secs(10)), Some(0), "{}", d.log());
}

#[test]
fn broken_targets_are_said_at_start_and_the_daemon_keeps_running() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();
    // A file:// root that is not mounted, and a WebDAV port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let unmounted = w.path().join("not-mounted");
    let targets = format!(
        "\n[[target]]\nname = \"share\"\nurl = \"file://{}\"\n\n[[target]]\nname = \"dav\"\nurl = \"http://127.0.0.1:{dead}/backups/\"\n",
        unmounted.display()
    );
    let cfg = config(&w, &etcd.endpoint, &targets);

    // check-config: a warning, not a configuration error.
    let r = run(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stderr.contains("warning: target 'share': its file:// root") && r.stderr.contains("does not exist"),
        "{}",
        r.stderr
    );

    let sock_path = w.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut d = Proc::daemon(
        &cfg,
        w.path().join("daemon.log"),
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    // Said at once (not at the first run): log, STATUS=, status.
    wait_for(
        "probe problems",
        || d.log().matches("probe at start found a problem").count() >= 2,
        || d.log(),
    );
    let log = d.log();
    assert!(log.contains("found a problem: target 'share': "), "{log}");
    assert!(log.contains("found a problem: target 'dav': PROPFIND") && log.contains("cannot connect: Connection refused"), "{log}");
    // Said once: hyper's wrappers are not repeated.
    assert!(!log.contains("client error (Connect)") && !log.contains("tcp connect error"), "{log}");
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(15);
    while !seen.contains("problem: target 'dav'") {
        assert!(Instant::now() < deadline, "{seen}");
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    }
    let r = run(&["status", "--config", cfg.to_str().unwrap()]);
    assert!(r.stdout.contains("probe       target 'dav': PROPFIND"), "{}", r.stdout);
    assert_ne!(r.code, 0, "not OK while a target does not answer: {}", r.stdout);
    assert!(r.stdout.contains("also: the daemon's probe found target 'dav'"), "{}", r.stdout);
    let metrics = etcd_backupd::metrics::render(&w.staging());
    assert!(metrics.contains("\netcd_backupd_probe_problems 2\n"), "{metrics}");
    assert!(d.running(), "the daemon keeps running: {}", d.log());
    assert_eq!(d.stop(Duration::from_secs(10)), Some(0), "{}", d.log());
}

/// The product contract's exit codes: 0 done, 1 failed, 2 bad usage or configuration, 3
/// skipped or refused on purpose.
#[test]
fn exit_codes_follow_the_contract() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();
    // A failed run on record: prune refuses on purpose, exit 3 (not 2: nothing is wrong
    // with the command line).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let down = config(&w, &format!("http://127.0.0.1:{dead}"), "");
    let r = run(&["backup", "--config", down.to_str().unwrap()]);
    // A manual backup whose own member is down fails (1): no other node was asked.
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(!r.all().contains("another node takes the run"), "{}", r.all());
    // The error chain said once.
    assert!(
        r.stderr.contains("cannot connect: transport error: Connection refused") && !r.stderr.contains("tcp connect error"),
        "{}",
        r.stderr
    );
    let c = down.to_str().unwrap();
    let r = run(&["prune", "--config", c]);
    assert_eq!(r.code, 3, "{}", r.all());
    assert!(r.stderr.contains("retention deletes nothing until a backup succeeds"), "{}", r.stderr);
    // check-config --connect: a target that does not answer is a failure (1), not a
    // configuration error.
    let r = run(&["check-config", "--connect", "--config", c]);
    assert_eq!(r.code, 1, "{}", r.all());
    // Bad usage: 2.
    let r = run(&["backup", "--no-such-flag", "--config", c]);
    assert_eq!(r.code, 2, "{}", r.all());
    // etcd back: done, 0.
    let cfg = config(&w, &etcd.endpoint, "");
    let r = run(&["backup", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
}
