//! The on-call view: `status` as a verdict with its exit code, the daemon's heartbeat (on
//! the node and in etcd for `status --cluster`), broken setups said at start, and the exit
//! codes the product contract gives.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{Etcd, Proc, Work, free_port, run};

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
    assert!(
        r.stdout
            .starts_with("FAILING: no target holds a good set newer than 1d 2h"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("this node never ran a backup"), "{}", r.stdout);
    // From a pipe, the verdict is on stderr too (one line).
    assert!(r.stderr.trim().starts_with("FAILING: "), "{}", r.stderr);

    // A good backup, but no daemon runs: AT RISK.
    let b = run(&["backup", "--no-election", "--config", cfg.to_str().unwrap()]);
    assert_eq!(b.code, 0, "{}", b.all());
    let (code, v) = status_json(&cfg);
    assert_eq!(code, 4, "{v}");
    assert_eq!(
        (v["schema_version"].as_u64(), v["ok"].as_bool()),
        (Some(1), Some(false)),
        "{v}"
    );
    assert_eq!(v["verdict"], "AT RISK", "{v}");
    assert!(
        v["reasons"][0].as_str().unwrap().contains("the daemon is not running"),
        "{v}"
    );
    assert_eq!(v["coverage"][0]["target"], "local", "{v}");
    assert_eq!(v["coverage"][0]["fresh"], true, "{v}");

    // The daemon beats: OK, exit 0; the next run as it will start (jitter included).
    let mut d = Proc::daemon(&cfg, w.path().join("daemon.log"), &[]);
    wait_for(
        "OK with the next run",
        || {
            let (code, v) = status_json(&cfg);
            code == 0 && v["next_run"].is_string()
        },
        || d.log(),
    );
    let (_, v) = status_json(&cfg);
    assert_eq!(
        (v["ok"].as_bool(), &v["verdict"]),
        (Some(true), &serde_json::json!("OK")),
        "{v}"
    );
    let (at, start) = (v["next_run"].as_str().unwrap(), v["next_start"].as_str().unwrap());
    assert!(start >= at, "{v}");
    let r = run(&["status", "--cluster", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.starts_with("OK: "), "{}", r.stdout);
    // One time format, in the schedule's zone, with an age.
    assert!(
        r.stdout.contains(" CET (") || r.stdout.contains(" CEST ("),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("(jitter included)"), "{}", r.stdout);
    // The node's heartbeat is in etcd, read without ssh.
    assert!(r.stdout.contains("node        node-a alive (heartbeat"), "{}", r.stdout);
    assert!(r.stdout.contains("local: 1 set(s), newest "), "{}", r.stdout);

    // etcd stops answering: AT RISK, naming it.
    drop(etcd);
    let (code, v) = status_json(&cfg);
    assert_eq!(code, 4, "{v}");
    assert!(
        v["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().starts_with("etcd does not answer")),
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
    let dead = free_port();
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
    assert!(
        log.contains("found a problem: target 'dav': PROPFIND") && log.contains("cannot connect: Connection refused"),
        "{log}"
    );
    // Said once: hyper's wrappers are not repeated.
    assert!(
        !log.contains("client error (Connect)") && !log.contains("tcp connect error"),
        "{log}"
    );
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
    assert!(
        r.stdout.contains("also: the daemon's probe found target 'dav'"),
        "{}",
        r.stdout
    );
    let metrics = etcd_backupd::metrics::render(&w.staging());
    assert!(metrics.contains("\netcd_backupd_probe_problems 2\n"), "{metrics}");
    assert!(d.running(), "the daemon keeps running: {}", d.log());
    assert_eq!(d.stop(Duration::from_secs(10)), Some(0), "{}", d.log());
    assert!(!d.log().contains("did not stop"), "{}", d.log());
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
    let dead = free_port();
    let down = config(&w, &format!("http://127.0.0.1:{dead}"), "");
    let r = run(&["backup", "--config", down.to_str().unwrap()]);
    // A manual backup whose own member is down fails (1): no other node was asked.
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(!r.all().contains("another node takes the run"), "{}", r.all());
    // The error chain said once.
    assert!(
        r.stderr.contains("cannot connect: transport error: Connection refused")
            && !r.stderr.contains("tcp connect error"),
        "{}",
        r.stderr
    );
    let c = down.to_str().unwrap();
    let r = run(&["prune", "--config", c]);
    assert_eq!(r.code, 3, "{}", r.all());
    assert!(
        r.stderr.contains("retention deletes nothing until a backup succeeds"),
        "{}",
        r.stderr
    );
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

/// `fetch` without surprises: no default directory off an OpenShift node (and nothing
/// created), the restore command of the set's own etcd version, one revision number (the
/// snapshot's) in `fetch` and in the restore drill.
#[test]
fn fetch_says_what_the_set_needs_and_creates_nothing_it_was_not_asked_for() {
    for bin_dir in [None, Some(crate::common::etcd35_dir())] {
        let etcd = match &bin_dir {
            Some(d) => Etcd::start_in(d),
            None => Etcd::start(),
        };
        etcd.fill(None, 20, 50);
        let w = Work::new();
        let extra = match &bin_dir {
            Some(d) => format!("\n[verify]\nbin_dir = \"{}\"\n", d.display()),
            None => String::new(),
        };
        let cfg = config(&w, &etcd.endpoint, &extra);
        let c = cfg.to_str().unwrap();
        let b = run(&["backup", "--config", c]);
        assert_eq!(b.code, 0, "{}", b.all());

        // This test host is no OpenShift node: --to is required, and nothing is made.
        assert!(!Path::new("/usr/local/bin/cluster-restore.sh").exists());
        let r = run(&["fetch", "latest", "--config", c]);
        assert_eq!(r.code, 2, "{}", r.all());
        assert!(r.stderr.contains("--to DIR is required here"), "{}", r.stderr);
        assert!(!Path::new("/home/core/assets/backup").exists());

        let dir = w.path().join("restore");
        let r = run(&["fetch", "latest", "--to", dir.to_str().unwrap(), "--config", c]);
        assert_eq!(r.code, 0, "{}", r.all());
        let tool = if bin_dir.is_some() {
            "  etcdutl snapshot restore "
        } else {
            "  ETCDCTL_API=3 etcdctl snapshot restore "
        };
        assert!(r.stdout.contains(tool), "{}", r.stdout);
        let revision = |text: &str, after: &str| -> u64 {
            let rest = &text[text.find(after).unwrap_or_else(|| panic!("no {after:?} in {text}")) + after.len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let fetched = revision(&r.stdout, " at revision ");
        let v = run(&["verify", "latest", "--deep", "--config", c]);
        assert_eq!(v.code, 0, "{}", v.all());
        let drilled = revision(&v.stdout, ": revision ");
        assert_eq!(fetched, drilled, "fetch: {}\nverify: {}", r.stdout, v.stdout);
    }
}

/// `--json` on every command that reports: one document on stdout with `schema_version` and
/// `ok`, on failure too (with the one-line reason and the exit code).
#[test]
fn every_reporting_command_prints_one_json_document_success_or_not() {
    let etcd = Etcd::start();
    etcd.fill(None, 10, 50);
    let w = Work::new();
    let cfg = config(&w, &etcd.endpoint, "");
    let c = cfg.to_str().unwrap();
    let doc = |args: &[&str]| -> (i32, serde_json::Value) {
        let mut a = args.to_vec();
        a.extend(["--json", "--config", c]);
        let r = run(&a);
        let v: serde_json::Value = serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not one JSON document ({e}): {}", r.all()));
        assert_eq!(v["schema_version"], 1, "{args:?}: {v}");
        assert!(v["ok"].is_boolean(), "{args:?}: {v}");
        (r.code, v)
    };
    let (code, v) = doc(&["backup", "--no-election"]);
    assert_eq!((code, v["ok"].as_bool()), (0, Some(true)), "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["targets"][0]["ok"], true, "{v}");
    let (code, v) = doc(&["list"]);
    assert_eq!(
        (code, v["sets"][0]["manifest"]["id"].as_str()),
        (0, Some(id.as_str())),
        "{v}"
    );
    let (code, v) = doc(&["verify", &id]);
    assert_eq!((code, v["ok"].as_bool()), (0, Some(true)), "{v}");
    let dir = w.path().join("restore");
    let (code, v) = doc(&["fetch", &id, "--to", dir.to_str().unwrap()]);
    assert_eq!((code, v["ok"].as_bool()), (0, Some(true)), "{v}");
    assert!(v["next"].as_str().unwrap().contains("snapshot restore"), "{v}");
    let (code, v) = doc(&["prune", "--dry-run"]);
    assert_eq!((code, v["ok"].as_bool()), (0, Some(true)), "{v}");
    assert_eq!(v["targets"][0]["decisions"][0]["id"], id.as_str(), "{v}");
    let (code, v) = doc(&["check-config"]);
    assert_eq!((code, v["ok"].as_bool()), (0, Some(true)), "{v}");
    assert_eq!(v["settings"]["target"][0]["name"], "local", "{v}");
    let (_, v) = doc(&["status"]);
    assert!(v["verdict"].is_string(), "{v}");

    // Failures print a document too: a damaged set, a set that does not exist.
    let set = w.sets().pop().unwrap();
    let snapshot = set.join(format!("snapshot_{id}.db"));
    let mut bytes = std::fs::read(&snapshot).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&snapshot, bytes).unwrap();
    let (code, v) = doc(&["verify", &id]);
    assert_eq!(
        (code, v["ok"].as_bool(), v["exit_code"].as_u64()),
        (1, Some(false), Some(1)),
        "{v}"
    );
    assert!(
        v["error"].as_str().unwrap().contains("damaged") || v["error"].as_str().unwrap().contains("altered"),
        "{v}"
    );
    assert_eq!(v["command"], "verify", "{v}");
    let (code, v) = doc(&[
        "fetch",
        "2000-01-01_000000",
        "--to",
        w.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!((code, v["ok"].as_bool()), (1, Some(false)), "{v}");
    // A usage error too.
    let (code, v) = doc(&["status", "--no-such-flag"]);
    assert_eq!(
        (code, v["ok"].as_bool(), v["exit_code"].as_u64()),
        (2, Some(false), Some(2)),
        "{v}"
    );
    assert_eq!(v["command"], "status", "{v}");
}
