//! Issue 14: proxy variables as OpenShift's `/etc/mco/proxy.env` sets them (upper case
//! only), and targets failing at once on errors no retry can change.

use std::time::{Duration, Instant};

use crate::common::{Etcd, Run, Work, free_port};
use crate::servers::{Fault, FaultProxy, Rclone, Tinyproxy};
use crate::webdav::{backup_env, entries_on, sets_on};

fn check_config(cfg: &std::path::Path, env: &[(&str, &str)]) -> Run {
    crate::common::run_env(&["check-config", "--connect", "--config", cfg.to_str().unwrap()], env)
}

/// The summary line of one target (`target    NAME: ...`).
fn summary_line(r: &Run, name: &str) -> String {
    r.stdout
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("target    {name}: ")))
        .unwrap_or_else(|| panic!("no summary line for {name}: {}", r.all()))
        .to_string()
}

/// The `check-config --connect` verdict line of one target.
fn verdict_line(r: &Run, name: &str) -> String {
    r.stdout
        .lines()
        .find(|l| {
            l.starts_with(&format!("ok: target '{name}' ")) || l.starts_with(&format!("FAILED: target '{name}': "))
        })
        .unwrap_or_else(|| panic!("no verdict for {name}: {}", r.all()))
        .to_string()
}

#[test]
fn upper_case_http_proxy_routes_http_targets_unless_no_proxy_names_them() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let rclone = Rclone::start();
    let proxy = Tinyproxy::start();
    let w = Work::new();
    let cfg = w.write_dav_config(&etcd.endpoint, &rclone.url(), "");
    let purl = proxy.url();
    let dead = format!("http://127.0.0.1:{}", free_port());
    type Case<'a> = (Vec<(&'a str, &'a str)>, String, bool);
    let cases: Vec<Case> = vec![
        // proxy.env as the machine-config operator writes it: upper case only.
        (
            vec![("HTTP_PROXY", purl.as_str())],
            format!("via {purl} (from HTTP_PROXY)"),
            true,
        ),
        // NO_PROXY naming the target's address: direct.
        (
            vec![("HTTP_PROXY", purl.as_str()), ("NO_PROXY", ".cluster.local,127.0.0.1")],
            "direct (NO_PROXY entry \"127.0.0.1\" matches 127.0.0.1)".into(),
            false,
        ),
        // Both cases set: the lower-case one wins (upper case points at a dead port, so
        // using it would fail the backup).
        (
            vec![("http_proxy", purl.as_str()), ("HTTP_PROXY", dead.as_str())],
            format!("via {purl} (from http_proxy)"),
            true,
        ),
        // HTTPS_PROXY is for https:// targets only.
        (
            vec![("HTTPS_PROXY", purl.as_str())],
            "direct (no proxy variable set)".into(),
            false,
        ),
    ];
    for (i, (env, route, via)) in cases.into_iter().enumerate() {
        let r = check_config(&cfg, &env);
        assert_eq!(r.code, 0, "case {i}: {}", r.all());
        let shown = format!("target 'dav': {}, {route}", rclone.url());
        assert!(
            r.stdout.lines().any(|l| l == shown),
            "case {i}: want {shown:?}: {}",
            r.stdout
        );

        let before = proxy.requests();
        let r = backup_env(&cfg, &env);
        assert_eq!(r.code, 0, "case {i} {env:?}: {}", r.all());
        let used = proxy.requests() > before;
        assert_eq!(used, via, "case {i} {env:?}: proxy used = {used}");
        assert_eq!(sets_on(&rclone.root()).len(), i + 1, "{:?}", entries_on(&rclone.root()));
    }
}

/// A target that can never work fails in seconds with its cause, though its retry_budget is
/// the default 3 minutes; the good target beside it gets the set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_target_errors_fail_at_once_and_the_others_go_on() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let rclone = Rclone::start();
    let nodav = FaultProxy::start(rclone.url(), |_, method, _, _| {
        if method == "PROPFIND" {
            Fault::Respond(405, "<h1>Method Not Allowed</h1>".into())
        } else {
            Fault::Forward
        }
    })
    .await;
    let w = Work::new();
    // .invalid never resolves (RFC 6761); where this machine's resolver does not answer at
    // all, the lookup is (rightly) worth retrying, and this case cannot be shown.
    let resolver_answers = etcd_backupd::targets::dns::lookup("no-such-host.invalid")
        .err()
        .is_some_and(|e| !e.transient);
    let nohost = if resolver_answers {
        "[[target]]\nname = \"nohost\"\nurl = \"https://no-such-host.invalid/dav/\"\n"
    } else {
        eprintln!("this machine's resolver does not answer: the unknown host case is left out");
        ""
    };
    // https:// to rclone's plain-HTTP port; a base collection that does not exist; a server
    // without WebDAV (PROPFIND refused with 405).
    let targets = format!(
        "[[target]]\nname = \"local\"\nurl = \"file://{}\"\n\n{nohost}\n[[target]]\nname = \"plain\"\nurl = \"https://127.0.0.1:{}/\"\n\n[[target]]\nname = \"missing\"\nurl = \"{}no/such/collection/\"\n\n[[target]]\nname = \"nodav\"\nurl = \"{}\"\n",
        w.target_root().display(),
        rclone.port,
        rclone.url(),
        nodav.url(),
    );
    let cfg = w.write_config_targets(&etcd.endpoint, &targets);
    let started = Instant::now();
    let c = cfg.clone();
    let r = tokio::task::spawn_blocking(move || backup_env(&c, &[])).await.unwrap();
    let took = started.elapsed();
    eprintln!("backup with permanent target errors took {took:?}");
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(took < Duration::from_secs(20), "took {took:?}: {}", r.all());
    assert!(summary_line(&r, "local").contains("stored at"), "{}", r.stdout);
    assert_eq!(w.sets().len(), 1);
    assert!(!r.stderr.contains("retrying"), "nothing is retried: {}", r.stderr);
    let mut expect = vec![
        ("plain", "TLS handshake failed"),
        ("plain", "seems to speak plain HTTP on this port: use http://"),
        ("missing", "does not exist on the server (404)"),
        ("nodav", "405 Method Not Allowed"),
        ("nodav", "is WebDAV enabled at this URL?"),
    ];
    if resolver_answers {
        expect.push(("nohost", "cannot resolve host name 'no-such-host.invalid'"));
    }
    for (name, cause) in &expect {
        let line = summary_line(&r, name);
        assert!(
            line.contains("FAILED") && line.contains(cause),
            "{name}: want {cause:?}: {line}"
        );
        assert!(!line.contains("gave up"), "{line}");
    }
    if resolver_answers {
        // One line says it all: the host, and the resolver's answer, not four layers of
        // wrapping.
        let line = summary_line(&r, "nohost");
        assert!(!line.contains("dns error") && !line.contains("client error"), "{line}");
    }

    // check-config --connect answers at once too, and exits 1; a target on a port where
    // nothing listens (worth retrying in a backup) is reported on the first try.
    let dead = format!(
        "\n[[target]]\nname = \"dead\"\nurl = \"http://127.0.0.1:{}/\"\nconnect_timeout = \"2s\"\n",
        free_port()
    );
    let cfg = w.write_config_targets(&etcd.endpoint, &format!("{targets}{dead}"));
    let started = Instant::now();
    let r = tokio::task::spawn_blocking(move || check_config(&cfg, &[]))
        .await
        .unwrap();
    let took = started.elapsed();
    eprintln!("check-config --connect took {took:?}");
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(took < Duration::from_secs(15), "took {took:?}: {}", r.all());
    assert!(verdict_line(&r, "local").starts_with("ok:"), "{}", r.stdout);
    expect.push(("dead", "Connection refused"));
    expect.push(("dead", "(not retried)"));
    for (name, cause) in &expect {
        let line = verdict_line(&r, name);
        assert!(
            line.starts_with("FAILED:") && line.contains(cause),
            "{name}: want {cause:?}: {line}"
        );
    }
}

/// check-config --connect on an unknown host alone: within connect_timeout and a few
/// seconds, exit 1, one line naming the host.
#[test]
fn check_config_on_an_unknown_host_answers_within_connect_timeout() {
    let resolver_answers = etcd_backupd::targets::dns::lookup("no-such-host.invalid")
        .err()
        .is_some_and(|e| !e.transient);
    if !resolver_answers {
        eprintln!("this machine's resolver does not answer: nothing to show");
        return;
    }
    let etcd = Etcd::start();
    let w = Work::new();
    let cfg = w.write_config_targets(
        &etcd.endpoint,
        "[[target]]\nname = \"nohost\"\nurl = \"https://no-such-host.invalid/dav/\"\nconnect_timeout = \"5s\"\n",
    );
    let started = Instant::now();
    let r = check_config(&cfg, &[]);
    let took = started.elapsed();
    eprintln!("check-config --connect on an unknown host took {took:?}");
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(took < Duration::from_secs(5 + 3), "took {took:?}");
    let failed: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with("FAILED")).collect();
    assert_eq!(failed.len(), 1, "{}", r.stdout);
    assert!(
        failed[0].starts_with(
            "FAILED: target 'nohost': PROPFIND 'https://no-such-host.invalid/dav/': cannot resolve host name 'no-such-host.invalid': "
        ),
        "{}",
        failed[0]
    );
}

/// A target still retrying holds the snapshot back for its connect_timeout at most (10 s at
/// most); it gets the set after the snapshot, within its retry budget.
#[test]
fn a_slow_preflight_does_not_hold_the_snapshot_back() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();
    let targets = format!(
        "[[target]]\nname = \"local\"\nurl = \"file://{}\"\n\n[[target]]\nname = \"dead\"\nurl = \"http://127.0.0.1:{}/\"\nconnect_timeout = \"2s\"\nretry_budget = \"12s\"\n",
        w.target_root().display(),
        free_port()
    );
    let cfg = w.write_config_targets(&etcd.endpoint, &targets);
    let started = chrono::Utc::now();
    let r = backup_env(&cfg, &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(summary_line(&r, "local").contains("stored at"), "{}", r.stdout);
    assert!(summary_line(&r, "dead").contains("Connection refused"), "{}", r.stdout);
    assert!(
        r.stderr
            .contains("the target was not ready within 2s; the set is stored on it after the snapshot"),
        "{}",
        r.stderr
    );
    // The set is named after the snapshot's start: 2 s of preflight (not the 12 s budget),
    // and the time etcd takes.
    let set = w.sets().pop().unwrap();
    let id = set.file_name().unwrap().to_str().unwrap();
    let created = chrono::NaiveDateTime::parse_from_str(id, "%Y-%m-%d_%H%M%S")
        .unwrap()
        .and_utc();
    let waited = created - started;
    assert!(
        waited < chrono::TimeDelta::seconds(7),
        "the snapshot started {waited} after the run"
    );
}
