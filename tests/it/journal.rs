//! The continuous journal against real etcd (3.4 and 3.5): the daemon's writer stores every
//! revision after a full set, and `fetch --at` restores the state at a moment key for key
//! (value, create_revision, mod_revision, version, lease), checked against the live etcd's
//! own history (`get --rev`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};

use crate::common::{Etcd, Proc, Work, etcd35_dir, file_target, run};
use crate::support::{NO_RETENTION, daemon_config};

/// A key as etcd holds it: value, create_revision, mod_revision, version, lease.
type Held = BTreeMap<Vec<u8>, (Vec<u8>, i64, i64, i64, i64)>;

async fn state(c: &mut Client, rev: Option<i64>) -> (i64, Held) {
    let mut opts = GetOptions::new().with_all_keys();
    if let Some(r) = rev {
        opts = opts.with_revision(r);
    }
    let r = c.get(vec![0u8], Some(opts)).await.unwrap();
    let held = r
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key().to_vec(),
                (
                    kv.value().to_vec(),
                    kv.create_revision(),
                    kv.mod_revision(),
                    kv.version(),
                    kv.lease(),
                ),
            )
        })
        .collect();
    (r.header().unwrap().revision(), held)
}

async fn revision(c: &mut Client) -> i64 {
    state(c, None).await.0
}

/// The daemon's config: a file target, the journal on with 1 s segments, no scheduled run
/// in the test's time, `bin_dir` for the replay's etcd tools.
fn journal_config(w: &Work, node: &str, endpoint: &str, bin_dir: Option<&Path>) -> PathBuf {
    let mut extra = format!(
        "{}{NO_RETENTION}\n[journal]\nenabled = true\nsegment_max_age = \"1s\"\n",
        file_target(w)
    );
    if let Some(d) = bin_dir {
        extra.push_str(&format!("\n[verify]\nbin_dir = \"{}\"\n", d.display()));
    }
    daemon_config(w, node, endpoint, "0 0 0 1 1 *", "lease_ttl = \"3s\"", &extra)
}

/// The segments on the file target: (first, last) of each.
fn segments(w: &Work) -> Vec<(i64, i64)> {
    segments_under(&w.target_root())
}

/// The segments of cluster `test` under a target's root, by their names.
fn segments_under(root: &Path) -> Vec<(i64, i64)> {
    let dir = root.join("test").join("journal");
    let mut out: Vec<(i64, i64)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| etcd_backupd::journal::segment::parse_name(&e.file_name().to_string_lossy()))
        .map(|n| (n.first, n.last))
        .collect();
    out.sort();
    out
}

/// Waits until the journal holds revision `rev` (a stored segment reaches it).
async fn durable(w: &Work, rev: i64, d: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !segments(w).iter().any(|(_, last)| *last >= rev) {
        assert!(
            Instant::now() < deadline,
            "revision {rev} never stored: {:?}\n{}",
            segments(w),
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `fetch --at moment` into a fresh folder; the snapshot laid out, restored and read.
async fn restored_at(cfg: &Path, w: &Work, moment: &str, bin_dir: Option<&Path>) -> (i64, Held) {
    restored_at_with(cfg, w, moment, bin_dir, &[]).await
}

/// [`restored_at`] with more `fetch` options.
async fn restored_at_with(cfg: &Path, w: &Work, moment: &str, bin_dir: Option<&Path>, extra: &[&str]) -> (i64, Held) {
    let dir = w.path().join(format!("at-{}", moment.replace([':', '+', '.'], "_")));
    let mut args = vec![
        "fetch",
        "--at",
        moment,
        "--to",
        dir.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let r = run(&args);
    assert_eq!(r.code, 0, "fetch --at {moment}: {}", r.all());
    assert!(r.stdout.contains("rolled forward to"), "{}", r.stdout);
    let snaps: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "db"))
        .collect();
    assert_eq!(snaps.len(), 1, "exactly one snapshot for the restore script: {snaps:?}");
    let data = w.path().join(format!("data-{}", moment.replace([':', '+', '.'], "_")));
    let etcd = Etcd::from_snapshot(bin_dir, &snaps[0], &data);
    let mut c = Client::connect([etcd.endpoint.as_str()], None).await.unwrap();
    state(&mut c, None).await
}

/// `fetch --at moment --to to` with `cfg`.
fn fetch_at(cfg: &Path, to: &Path, moment: &str) -> crate::common::Run {
    run(&[
        "fetch",
        "--at",
        moment,
        "--to",
        to.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ])
}

/// What the live etcd held at each moment the test will ask for.
struct Moments {
    /// (as given to --at, the revision it must reach).
    asked: Vec<(String, i64)>,
}

/// Writes the cases the journal must carry, noting moments: plain puts and puts on a lease, a
/// multi-op txn, a lease revoked with 300 keys in one revision, a delete (a moment on it),
/// and times between segments (after a revision is stored, before the next is written).
async fn workload(c: &mut Client, w: &Work, d: &Proc, m: &mut Moments) {
    let lease = c.lease_grant(120, None).await.unwrap().id();
    for i in 0..20 {
        let opts = (i % 2 == 0).then(|| PutOptions::new().with_lease(lease));
        c.put(format!("/app/k{i}"), format!("v{i}"), opts).await.unwrap();
    }
    c.put("/app/k3", "v3-again", None).await.unwrap();
    let r = revision(c).await;
    m.asked.push((format!("rev:{r}"), r));

    // One revision, several ops.
    let txn = Txn::new()
        .when([Compare::version("/app/k1", CompareOp::Greater, 0)])
        .and_then([
            TxnOp::put("/app/t1", "a", None),
            TxnOp::put("/app/k5", "changed in a txn", Some(PutOptions::new().with_lease(lease))),
            TxnOp::delete("/app/k7", None),
        ]);
    assert!(c.txn(txn).await.unwrap().succeeded());
    let r = revision(c).await;
    durable(w, r, d).await;
    // A time between segments: after `r` is stored, before anything later is written.
    let t = Utc::now();
    m.asked
        .push((t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), r));
    tokio::time::sleep(Duration::from_millis(50)).await;

    // A lease with 300 keys, revoked: one revision deletes them all.
    let many = c.lease_grant(300, None).await.unwrap().id();
    for i in 0..300 {
        c.put(
            format!("/events/e{i:03}"),
            vec![b'x'; 200],
            Some(PutOptions::new().with_lease(many)),
        )
        .await
        .unwrap();
    }
    let before_revoke = revision(c).await;
    m.asked.push((format!("rev:{before_revoke}"), before_revoke));
    c.lease_revoke(many).await.unwrap();
    let r = revision(c).await;
    assert_eq!(r, before_revoke + 1, "the revoke is one revision");
    m.asked.push((format!("rev:{r}"), r));

    // A moment that falls on a delete, given as a time with an offset.
    c.put("/app/late", "1", None).await.unwrap();
    c.delete("/app/k2", None).await.unwrap();
    let r = revision(c).await;
    durable(w, r, d).await;
    let t = Utc::now().with_timezone(&chrono::FixedOffset::east_opt(3600).unwrap());
    m.asked
        .push((t.to_rfc3339_opts(chrono::SecondsFormat::Millis, false), r));
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.put("/app/after", "not in the moment before", None).await.unwrap();
}

async fn journal_case(bin_dir: Option<PathBuf>) {
    let bin = bin_dir.as_deref();
    let etcd = match bin {
        Some(d) => Etcd::start_in(d),
        None => Etcd::start(),
    };
    let mut c = Client::connect([etcd.endpoint.as_str()], None).await.unwrap();
    for i in 0..50 {
        c.put(format!("/base/{i}"), "before the set", None).await.unwrap();
    }
    let w = Work::new();
    let cfg = journal_config(&w, "node-a", &etcd.endpoint, bin);
    let r = run(&["backup", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let mut d = Proc::daemon(&cfg, w.path().join("daemon.log"), &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.log().contains("journal: writing") {
        assert!(Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut m = Moments { asked: Vec::new() };
    workload(&mut c, &w, &d, &mut m).await;
    let last = revision(&mut c).await;
    durable(&w, last, &d).await;
    // SIGTERM stores the open segment; the rest is read from the target.
    let code = tokio::task::block_in_place(|| d.stop(Duration::from_secs(15)));
    assert_eq!(code, Some(0), "{}", d.log());

    for (moment, rev) in &m.asked {
        let (_, live) = state(&mut c, Some(*rev)).await;
        let (got_rev, got) = restored_at(&cfg, &w, moment, bin).await;
        assert_eq!(got_rev, *rev, "{moment}: the restored store's revision");
        assert_eq!(got.len(), live.len(), "{moment}: key count");
        let differ: Vec<String> = live
            .iter()
            .filter(|(k, v)| got.get(*k) != Some(*v))
            .take(3)
            .map(|(k, v)| format!("{}: live {v:?}, restored {:?}", String::from_utf8_lossy(k), got.get(k)))
            .collect();
        assert!(
            differ.is_empty(),
            "{moment} (revision {rev}): the restored state differs: {differ:?}"
        );
    }
}

/// etcd 3.4 (Debian's): every kind of change, each moment restored key for key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moment_restores_key_for_key_on_etcd_3_4() {
    journal_case(None).await;
}

/// etcd 3.5: the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moment_restores_key_for_key_on_etcd_3_5() {
    journal_case(Some(etcd35_dir())).await;
}

/// Moments the journal does not cover are refused (exit 1) naming what it covers; a
/// malformed one is a usage error (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncovered_moments_are_refused_naming_the_coverage() {
    let etcd = Etcd::start();
    let mut c = Client::connect([etcd.endpoint.as_str()], None).await.unwrap();
    c.put("/a", "1", None).await.unwrap();
    let w = Work::new();
    let cfg = journal_config(&w, "node-a", &etcd.endpoint, None);
    let r = run(&["backup", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let d = Proc::daemon(&cfg, w.path().join("daemon.log"), &[]);
    c.put("/b", "2", None).await.unwrap();
    let last = revision(&mut c).await;
    durable(&w, last, &d).await;
    let to = w.path().join("out");
    let at = |m: &str| fetch_at(&cfg, &to, m);
    let future: DateTime<Utc> = Utc::now() + chrono::TimeDelta::hours(1);
    for m in [
        format!("rev:{}", last + 100),
        future.to_rfc3339(),
        "2001-01-01T00:00:00Z".into(),
    ] {
        let r = at(&m);
        assert_eq!(r.code, 1, "{m}: {}", r.all());
        assert!(
            r.stderr.contains("is not covered by the journal; covered: revisions"),
            "{m}: {}",
            r.stderr
        );
        assert!(!to.exists(), "nothing laid out for a refused moment");
    }
    let r = at("yesterday");
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("--at \"yesterday\""), "{}", r.stderr);
    drop(d);
}

/// Every revision from `from` on is in exactly one segment: no gap, no duplicate.
fn assert_contiguous(segs: &[(i64, i64)], from: i64, to: i64) {
    let mut next: Option<i64> = None;
    for (first, last) in segs.iter().filter(|(_, last)| *last >= from) {
        match next {
            None => assert!(*first <= from, "revision {from} stored: {segs:?}"),
            Some(n) => assert_eq!(*first, n, "a gap or a duplicate at revision {n}: {segs:?}"),
        }
        next = Some(last + 1);
    }
    assert!(next.is_some_and(|n| n > to), "revisions up to {to} stored: {segs:?}");
}

/// A test's start: an etcd holding 10 keys, a client of it, the test's folders and node-a's
/// journal configuration ([`journal_config`]).
async fn started() -> (Etcd, Client, Work, PathBuf) {
    let etcd = Etcd::start();
    let mut c = Client::connect([etcd.endpoint.as_str()], None).await.unwrap();
    put_many(&mut c, "/base", 10).await;
    let w = Work::new();
    let cfg = journal_config(&w, "node-a", &etcd.endpoint, None);
    (etcd, c, w, cfg)
}

async fn put_many(c: &mut Client, prefix: &str, n: usize) -> i64 {
    for i in 0..n {
        c.put(format!("{prefix}/{i}"), format!("{i}"), None).await.unwrap();
    }
    revision(c).await
}

/// kill -9 of the writing node's daemon: the other node's writer takes the lock once its
/// lease lapses and goes on after the newest stored segment; the revisions written while no
/// one wrote are caught up. Every revision is stored exactly once, and moments on both sides
/// of the handover restore key for key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_writer_is_replaced_without_a_gap_or_a_duplicate() {
    let etcd = Etcd::start();
    let mut c = Client::connect([etcd.endpoint.as_str()], None).await.unwrap();
    put_many(&mut c, "/base", 20).await;
    let w = Work::new();
    let (cfg_a, cfg_b) = (
        journal_config(&w, "node-a", &etcd.endpoint, None),
        journal_config(&w, "node-b", &etcd.endpoint, None),
    );
    let r = run(&["backup", "--config", cfg_a.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let set_rev = revision(&mut c).await;
    let mut a = Proc::daemon(&cfg_a, w.path().join("a.log"), &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !a.log().contains("journal: writing") {
        assert!(Instant::now() < deadline, "{}", a.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b = Proc::daemon(&cfg_b, w.path().join("b.log"), &[]);
    let before = put_many(&mut c, "/one", 40).await;
    durable(&w, before, &a).await;
    tokio::task::block_in_place(|| a.sigkill());
    // Written while no node writes the journal: their times are not known.
    let unwritten = put_many(&mut c, "/two", 40).await;
    let in_the_hole = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !b.log().contains("journal: writing") {
        assert!(Instant::now() < deadline, "node-b never took over: {}", b.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = put_many(&mut c, "/three", 40).await;
    durable(&w, after, &b).await;
    assert_contiguous(&segments(&w), set_rev + 1, after);

    let st = run(&["status", "--config", cfg_b.to_str().unwrap()]);
    assert!(
        st.stdout.contains("journal     written by this node; durable up to"),
        "{}",
        st.all()
    );
    for rev in [before, unwritten - 10, after] {
        let (_, live) = state(&mut c, Some(rev)).await;
        let (got_rev, got) = restored_at(&cfg_b, &w, &format!("rev:{rev}"), None).await;
        assert_eq!(got_rev, rev);
        assert!(got == live, "rev:{rev}: the restored state differs");
    }
    // A time while no node wrote is a hole: refused, naming the times covered.
    let to = w.path().join("hole");
    let r = fetch_at(&cfg_b, &to, &in_the_hole);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("(times "), "{}", r.stderr);
    // A time once node-b keeps up restores what etcd held then (idle: stored within 3
    // segment ages).
    let at = Utc::now();
    let now = at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let dir = w.target_root().join("test").join("journal");
    let deadline = Instant::now() + Duration::from_secs(30);
    let covers = || {
        std::fs::read_dir(&dir).unwrap().flatten().any(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            etcd_backupd::journal::segment::parse_name(&n).is_some_and(|n| n.from < at && at <= n.until)
        })
    };
    while !covers() {
        assert!(Instant::now() < deadline, "{now} never covered: {}", b.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (got_rev, got) = restored_at(&cfg_b, &w, &now, None).await;
    assert!(got_rev >= after, "{got_rev} < {after}");
    assert!(
        got == state(&mut c, Some(got_rev)).await.1,
        "{now}: the restored state differs"
    );
}

/// The daemon stopped while etcd compacts past what the journal stored: at its start the
/// chain ends (logged as an error, counted in status), a new chain starts at once, and, no set
/// being as new as its start, the daemon takes one by itself (trigger `journal`); a moment in
/// the lost stretch is refused naming both stretches, one on the new chain restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_past_the_stored_revisions_ends_the_chain() {
    let (_etcd, mut c, w, cfg) = started().await;
    assert_eq!(run(&["backup", "--config", cfg.to_str().unwrap()]).code, 0);
    let mut d = Proc::daemon(&cfg, w.path().join("d1.log"), &[]);
    let stored = put_many(&mut c, "/one", 10).await;
    durable(&w, stored, &d).await;
    assert_eq!(
        tokio::task::block_in_place(|| d.stop(Duration::from_secs(15))),
        Some(0),
        "{}",
        d.log()
    );
    let lost = put_many(&mut c, "/lost", 10).await;
    c.compact(lost, None).await.unwrap();

    let d = Proc::daemon(&cfg, w.path().join("d2.log"), &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d
        .log()
        .contains("a new one starts at the oldest revision etcd still has")
    {
        assert!(Instant::now() < deadline, "no chain break said: {}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = run(&["status", "--config", cfg.to_str().unwrap()]);
    assert!(st.stdout.contains("1 chain break(s)"), "{}", st.all());
    // No set is as new as the new chain: the daemon takes one at once, by itself.
    let fresh = journal_set(&cfg, &d, Duration::from_secs(60)).await;
    assert!(
        fresh["manifest"]["etcd"]["revision"].as_i64().unwrap() >= lost,
        "the set starts the new chain: {fresh}"
    );
    assert!(d.log().contains("asking for one now"), "{}", d.log());
    let again = put_many(&mut c, "/again", 10).await;
    durable(&w, again, &d).await;

    let to = w.path().join("refused");
    let r = fetch_at(&cfg, &to, &format!("rev:{}", lost - 3));
    assert_eq!(r.code, 1, "{}", r.all());
    // Both stretches named: the old chain (up to at least what was stored) and the new one.
    let spans: Vec<&str> = r.stderr.split("revisions ").skip(1).collect();
    assert_eq!(spans.len(), 2, "{}", r.stderr);
    let old_end: i64 = spans[0]
        .split("..=")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!((stored..lost - 3).contains(&old_end), "{}", r.stderr);
    let (_, live) = state(&mut c, Some(again)).await;
    let (got_rev, got) = restored_at(&cfg, &w, &format!("rev:{again}"), None).await;
    assert_eq!(got_rev, again);
    assert!(got == live, "the new chain restores");
}

/// Waits (up to `within`) for the set the daemon takes at the journal writer's request
/// (trigger `journal`), as `list --json` shows it.
async fn journal_set(cfg: &Path, d: &Proc, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let listed: serde_json::Value =
            serde_json::from_str(&run(&["list", "--json", "--config", cfg.to_str().unwrap()]).stdout)
                .unwrap_or_default();
        let found = listed["sets"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["manifest"]["trigger"] == "journal").cloned());
        if let Some(set) = found {
            return set;
        }
        assert!(Instant::now() < deadline, "no set taken for the journal: {}", d.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The names of the segments ending a chain on the file target.
fn chain_ends(w: &Work) -> Vec<String> {
    let dir = w.target_root().join("test").join("journal");
    std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with("-end.seg"))
        .collect()
}

/// A new static pod revision on the writer's node (an operator rolled one out) ends the chain
/// (a set's archive must match every moment restored with it) and the daemon is asked for a
/// set: while the operator still rolls it out the guard skips that run, and the writer asks
/// again a minute later, when it goes. A moment before the change restores with the old set
/// and its archive, one between the change and the new set is refused, one after restores
/// with the new archive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_static_pod_revision_ends_the_chain_and_a_set_starts_the_next() {
    let etcd = Etcd::start();
    let mut c = Client::connect([etcd.endpoint.as_str()], None).await.unwrap();
    put_many(&mut c, "/base", 10).await;
    let w = Work::new();
    let kube = w.path().join("kubernetes");
    crate::common::static_pod_fixture(&kube, 3);
    let cfg = journal_config(&w, "node-a", &etcd.endpoint, None);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "static_resources_dir = \"\"",
        &format!("static_resources_dir = \"{}\"", kube.display()),
    );
    assert!(text.contains(&kube.display().to_string()), "{text}");
    std::fs::write(&cfg, text).unwrap();
    let r = run(&["backup", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let d = Proc::daemon(&cfg, w.path().join("d.log"), &[]);
    let before = put_many(&mut c, "/before", 10).await;
    durable(&w, before, &d).await;
    assert!(chain_ends(&w).is_empty(), "{:?}", chain_ends(&w));

    // The installer writes revision 4's manifests while the operator says it progresses.
    crate::common::put_operator(&etcd, None, "kube-apiserver", Some("True"));
    crate::common::static_pod_fixture(&kube, 4);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.log().contains("ClusterOperator kube-apiserver") {
        assert!(
            Instant::now() < deadline,
            "the journal's run was not skipped: {}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    crate::common::put_operator(&etcd, None, "kube-apiserver", Some("False"));
    let fresh = journal_set(&cfg, &d, Duration::from_secs(100)).await;
    assert!(d.log().contains("asking again"), "{}", d.log());
    let fresh_rev = fresh["manifest"]["etcd"]["revision"].as_i64().unwrap();
    let after = put_many(&mut c, "/after", 10).await;
    durable(&w, after, &d).await;
    let ends = chain_ends(&w);
    assert_eq!(ends.len(), 1, "{ends:?}");
    let end = etcd_backupd::journal::segment::parse_name(&ends[0]).unwrap().last;
    assert!(
        (before..fresh_rev).contains(&end),
        "the chain ends at {end}, between {before} and the set at {fresh_rev}"
    );
    assert!(d.log().contains("static pod revisions changed"), "{}", d.log());

    for (rev, pod) in [(before, "kube-apiserver-pod-3/"), (after, "kube-apiserver-pod-4/")] {
        let (_, live) = state(&mut c, Some(rev)).await;
        let (_, got) = restored_at(&cfg, &w, &format!("rev:{rev}"), None).await;
        assert!(got == live, "rev:{rev}");
        let dir = w.path().join(format!("at-rev_{rev}"));
        let archive = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(".tar.gz"))
            .expect("the archive laid out beside the snapshot");
        let listing = std::process::Command::new("tar")
            .arg("tzf")
            .arg(&archive)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&listing.stdout);
        assert!(listing.contains(pod), "rev:{rev} pairs with {pod}: {listing}");
    }
    // Between the end and the new set: no set pairs with it.
    let r = fetch_at(&cfg, &w.path().join("between"), &format!("rev:{}", end + 1));
    assert_eq!(r.code, 1, "{}", r.all());
}

/// Retention keeps the chain of every kept set and removes the segments no kept set can use;
/// `list` shows what the journal covers from which set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_kept_sets_chains_and_list_shows_the_coverage() {
    let (_etcd, mut c, w, cfg) = started().await;
    assert_eq!(run(&["backup", "--config", cfg.to_str().unwrap()]).code, 0);
    let listed: serde_json::Value =
        serde_json::from_str(&run(&["list", "--json", "--config", cfg.to_str().unwrap()]).stdout).unwrap();
    let first_set = listed["sets"][0]["manifest"]["etcd"]["revision"].as_i64().unwrap();
    let d = Proc::daemon(&cfg, w.path().join("d.log"), &[]);
    let first_stretch = put_many(&mut c, "/one", 20).await;
    durable(&w, first_stretch, &d).await;
    let list = run(&["list", "--config", cfg.to_str().unwrap()]);
    assert_eq!(list.code, 0, "{}", list.all());
    assert!(
        list.stdout.contains("journal on target 'shared' (cluster test):"),
        "{}",
        list.stdout
    );
    assert!(list.stdout.contains("  from set "), "{}", list.stdout);

    // keep_last = 1: the second set's backup removes the first set and the segments only it
    // could use.
    let keep_one = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("keep_last = 0", "keep_last = 1")
        .replace("min_keep = 0", "min_keep = 1");
    std::fs::write(&cfg, keep_one).unwrap();
    let r = run(&["backup", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let set_rev = revision(&mut c).await;
    let after = put_many(&mut c, "/two", 20).await;
    durable(&w, after, &d).await;
    let r = run(&["prune", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let segs = segments(&w);
    assert!(
        segs.iter().all(|(first, _)| *first > first_set + 1),
        "segments only the removed set could use remain (its chain began at {}): {segs:?}",
        first_set + 1
    );
    assert!(
        segs.iter().any(|(first, last)| *first <= set_rev && *last >= set_rev),
        "{segs:?}"
    );
    let (_, live) = state(&mut c, Some(after)).await;
    let (_, got) = restored_at(&cfg, &w, &format!("rev:{after}"), None).await;
    assert!(got == live, "the kept set's chain restores");
    let to = w.path().join("gone");
    let r = fetch_at(&cfg, &to, &format!("rev:{}", first_stretch - 5));
    assert_eq!(r.code, 1, "a moment only the removed set reached: {}", r.all());
}

/// A WebDAV target refuses journal segments for a while (503): the writer keeps them,
/// `status` says so, and once the target answers every segment is stored in order, without a
/// gap; `verify --at` then drills a moment from inside the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_outage_delays_segments_and_loses_none() {
    use crate::servers::{Fault, FaultProxy, Rclone};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let etcd = Etcd::start();
    let mut c = Client::connect([etcd.endpoint.as_str()], None).await.unwrap();
    put_many(&mut c, "/base", 10).await;
    let rclone = Rclone::start();
    let down = Arc::new(AtomicBool::new(false));
    let d = down.clone();
    let proxy = FaultProxy::start(rclone.url(), move |_, method, path, _| {
        if d.load(SeqCst) && method == "PUT" && path.contains("/journal/") {
            return Fault::Respond(503, "down for maintenance".into());
        }
        Fault::Forward
    })
    .await;
    let w = Work::new();
    let extra = format!(
        "{}{NO_RETENTION}\n[journal]\nenabled = true\nsegment_max_age = \"1s\"\n",
        crate::common::dav_target(&proxy.url(), "retry_budget = \"2s\"\n")
    );
    let cfg = daemon_config(
        &w,
        "node-a",
        &etcd.endpoint,
        "0 0 0 1 1 *",
        "lease_ttl = \"3s\"",
        &extra,
    );
    assert_eq!(run(&["backup", "--config", cfg.to_str().unwrap()]).code, 0);
    let set_rev = {
        let listed: serde_json::Value =
            serde_json::from_str(&run(&["list", "--json", "--config", cfg.to_str().unwrap()]).stdout).unwrap();
        listed["sets"][0]["manifest"]["etcd"]["revision"].as_i64().unwrap()
    };
    let dav_segments = || segments_under(&rclone.root());
    let daemon = Proc::daemon(&cfg, w.path().join("d.log"), &[]);
    let before = put_many(&mut c, "/one", 10).await;
    let wait_for = |rev: i64| {
        let deadline = Instant::now() + Duration::from_secs(40);
        let segs = &dav_segments;
        let log = || daemon.log();
        async move {
            while !segs().iter().any(|(_, last)| *last >= rev) {
                assert!(
                    Instant::now() < deadline,
                    "revision {rev} never stored: {:?}\n{}",
                    segs(),
                    log()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for(before).await;
    down.store(true, SeqCst);
    let during = put_many(&mut c, "/during", 30).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon.log().contains("journal: the target cannot take a segment") {
        assert!(Instant::now() < deadline, "{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = run(&["status", "--config", cfg.to_str().unwrap()]);
    assert!(
        st.stdout.contains("error: a target cannot take journal segments"),
        "{}",
        st.all()
    );
    assert!(
        !dav_segments().iter().any(|(_, last)| *last >= during),
        "stored while down?"
    );
    down.store(false, SeqCst);
    let after = put_many(&mut c, "/after", 10).await;
    wait_for(after).await;
    assert_contiguous(&dav_segments(), set_rev + 1, after);
    let r = run(&[
        "verify",
        "--at",
        &format!("rev:{}", during - 5),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout.contains(&format!(
            "rolled forward to rev:{}: revision {}",
            during - 5,
            during - 5
        )),
        "{}",
        r.stdout
    );
}

/// An OpenShift upgrade completing ends the chain at its revision (a set from before it
/// pairs with the old static resources): a moment before it restores from the old set, one
/// after it but before the after-upgrade set is refused, and one after that set restores
/// from it (the daemon takes it by itself when the upgrade completes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_upgrade_ends_the_chain() {
    use serde_json::json;
    const CV: &str = "/kubernetes.io/config.openshift.io/clusterversions/version";
    let cv = |desired: &str, history: serde_json::Value| {
        json!({"spec": {"clusterID": "c"}, "status": {"desired": {"version": desired}, "history": history}}).to_string()
    };
    let etcd = Etcd::start();
    crate::common::settle_operators(&etcd, None);
    let mut c = Client::connect([etcd.endpoint.as_str()], None).await.unwrap();
    let old = json!([{"state": "Completed", "version": "4.15.4", "completionTime": "2026-02-01T00:00:00Z"},
                     {"state": "Completed", "version": "4.15.3", "completionTime": "2026-01-01T00:00:00Z"}]);
    c.put(CV, cv("4.15.4", old.clone()), None).await.unwrap();
    put_many(&mut c, "/base", 10).await;
    let w = Work::new();
    let cfg = journal_config(&w, "node-a", &etcd.endpoint, None);
    let r = run(&["backup", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let d = Proc::daemon(&cfg, w.path().join("d.log"), &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.log().contains("journal: writing") {
        assert!(Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut partial = vec![json!({"state": "Partial", "version": "4.15.5", "completionTime": null})];
    partial.extend(old.as_array().unwrap().iter().cloned());
    c.put(CV, cv("4.15.5", json!(partial)), None).await.unwrap();
    let during = put_many(&mut c, "/during", 10).await;
    let mut done = vec![json!({"state": "Completed", "version": "4.15.5", "completionTime": "2026-11-01T00:00:00Z"})];
    done.extend(old.as_array().unwrap().iter().cloned());
    c.put(CV, cv("4.15.5", json!(done)), None).await.unwrap();
    let upgraded = revision(&mut c).await;
    // The daemon's after-upgrade run (a node new to the cluster also backs up after the
    // upgrade it finds completed at its start, 4.15.4: that set is not this one).
    let deadline = Instant::now() + Duration::from_secs(60);
    let upgraded_set = || {
        let listed: serde_json::Value =
            serde_json::from_str(&run(&["list", "--json", "--config", cfg.to_str().unwrap()]).stdout)
                .unwrap_or_default();
        listed["sets"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["manifest"]["openshift"]["version"] == "4.15.5"))
    };
    while !upgraded_set() {
        assert!(Instant::now() < deadline, "no after-upgrade set: {}", d.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = put_many(&mut c, "/after", 10).await;
    durable(&w, after, &d).await;

    let ends = chain_ends(&w);
    assert_eq!(ends.len(), 1, "{ends:?}");
    assert!(
        ends[0].contains(&format!("-{upgraded:016}-")),
        "the chain ends at the upgrade's revision {upgraded}: {ends:?}"
    );
    // Before the upgrade: the old set (of the old release: the version check is overridden).
    for (rev, extra) in [(during, &["--allow-version-mismatch"][..]), (after, &[][..])] {
        let (_, live) = state(&mut c, Some(rev)).await;
        let (_, got) = restored_at_with(&cfg, &w, &format!("rev:{rev}"), None, extra).await;
        assert!(got == live, "rev:{rev}");
    }
    // After the upgrade: only from the after-upgrade set, at its revision or later; a moment
    // between the upgrade and that set (when the run wrote before its snapshot) pairs with no
    // set.
    let listed: serde_json::Value =
        serde_json::from_str(&run(&["list", "--json", "--config", cfg.to_str().unwrap()]).stdout).unwrap();
    let new_set = listed["sets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["manifest"]["openshift"]["version"] == "4.15.5")
        .unwrap()["manifest"]
        .clone();
    let new_rev = new_set["etcd"]["revision"].as_i64().unwrap();
    assert!(new_rev > upgraded, "{new_set}");
    for n in upgraded + 1..new_rev {
        let r = fetch_at(&cfg, &w.path().join(format!("between-{n}")), &format!("rev:{n}"));
        assert_eq!(r.code, 1, "rev:{n}: {}", r.all());
    }
    let r = fetch_at(&cfg, &w.path().join("from-new"), &format!("rev:{new_rev}"));
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout
            .contains(&format!("fetched set {} ", new_set["id"].as_str().unwrap())),
        "{}",
        r.stdout
    );
}

/// An etcd 3.4 set records the revision read just before its snapshot, which can be lower
/// than what the snapshot holds: a moment between the two is restored from the set before
/// it (the first one tried holds a later revision and is passed over), never from a store
/// already past the moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_past_the_moment_is_passed_over_for_an_older_one() {
    let (_etcd, mut c, w, cfg) = started().await;
    assert_eq!(run(&["backup", "--config", cfg.to_str().unwrap()]).code, 0);
    let d = Proc::daemon(&cfg, w.path().join("d.log"), &[]);
    put_many(&mut c, "/one", 20).await;
    let r = run(&["backup", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let after = put_many(&mut c, "/two", 10).await;
    durable(&w, after, &d).await;
    // The newer set's manifest says 3 revisions less than it holds.
    let listed: serde_json::Value =
        serde_json::from_str(&run(&["list", "--json", "--config", cfg.to_str().unwrap()]).stdout).unwrap();
    let newest = &listed["sets"][0]["manifest"];
    let (id, rev) = (
        newest["id"].as_str().unwrap(),
        newest["etcd"]["revision"].as_i64().unwrap(),
    );
    let path = w.target_root().join("test").join(id).join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    m["etcd"]["revision"] = (rev - 3).into();
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();

    let moment = rev - 2;
    let (_, live) = state(&mut c, Some(moment)).await;
    let (got_rev, got) = restored_at(&cfg, &w, &format!("rev:{moment}"), None).await;
    assert_eq!(got_rev, moment);
    assert!(got == live, "rev:{moment} restored from the older set");
}

/// `rebase` on a drill host (its own staging and signing key, no etcd of its own needed)
/// folds the journal into a derived set: refused while the host would store it weaker than
/// its base (unsigned), then stored on the target, marked `derived` with its base, at the
/// newest revision the journal held; fetched alone it restores that state key for key
/// (leases too), and a later moment is rolled forward from it, not from the base.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebase_folds_the_journal_into_a_derived_set() {
    let (etcd, mut c, w, cfg) = started().await;
    let text = std::fs::read_to_string(&cfg).unwrap() + "\n[signing]\nenabled = true\n";
    std::fs::write(&cfg, text).unwrap();
    let r = run(&["backup", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let d = Proc::daemon(&cfg, w.path().join("d.log"), &[]);
    put_many(&mut c, "/one", 30).await;
    let lease = c.lease_grant(600, None).await.unwrap().id();
    for i in 0..5 {
        c.put(format!("/leased/{i}"), "x", Some(PutOptions::new().with_lease(lease)))
            .await
            .unwrap();
    }
    c.delete("/one/3", None).await.unwrap();
    let folded = revision(&mut c).await;
    durable(&w, folded, &d).await;

    let drill = |signing: &str| {
        let extra = format!("{}{NO_RETENTION}{signing}", file_target(&w));
        daemon_config(&w, "drill", &etcd.endpoint, "", "enabled = false", &extra)
    };
    let unsigned = drill("");
    let r = run(&["rebase", "--config", unsigned.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("is signed; a set derived from it must be too"),
        "{}",
        r.stderr
    );
    let host = drill("\n[signing]\nenabled = true\n");
    // Nothing after the set up to its own revision: refused before anything is fetched.
    let base_rev = {
        let listed: serde_json::Value =
            serde_json::from_str(&run(&["list", "--json", "--config", cfg.to_str().unwrap()]).stdout).unwrap();
        listed["sets"][0]["manifest"]["etcd"]["revision"].as_i64().unwrap()
    };
    let r = run(&[
        "rebase",
        "--at",
        &format!("rev:{base_rev}"),
        "--config",
        host.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("nothing to fold"), "{}", r.stderr);
    let r = run(&["rebase", "--json", "--config", host.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let done: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let id = done["id"].as_str().unwrap().to_string();
    let reached = done["reached"]["revision"].as_i64().unwrap();
    assert!(reached >= folded, "the newest revision held: {done}");
    assert_eq!(done["pending"], 0, "{done}");

    let listed: serde_json::Value =
        serde_json::from_str(&run(&["list", "--json", "--config", cfg.to_str().unwrap()]).stdout).unwrap();
    let sets = listed["sets"].as_array().unwrap();
    let derived = sets
        .iter()
        .find(|s| s["manifest"]["id"] == id.as_str())
        .expect("the derived set is listed");
    let m = &derived["manifest"];
    assert_eq!(m["trigger"], "derived", "{m}");
    assert_eq!(m["node"], "drill", "{m}");
    assert_eq!(m["etcd"]["revision"], reached, "{m}");
    let base = sets.iter().find(|s| s["manifest"]["trigger"] == "manual").unwrap();
    assert_eq!(m["derived"]["from_set"], base["manifest"]["id"], "{m}");

    // Fetched as any set, with no journal: the state at the revision it was folded to.
    let to = w.path().join("derived");
    let r = run(&[
        "fetch",
        &id,
        "--to",
        to.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.all());
    let snap = to.join(format!("snapshot_{id}.db"));
    let restored = Etcd::from_snapshot(None, &snap, &w.path().join("data-derived"));
    let mut rc = Client::connect([restored.endpoint.as_str()], None).await.unwrap();
    let (got_rev, got) = state(&mut rc, None).await;
    let (_, live) = state(&mut c, Some(reached)).await;
    assert_eq!(got_rev, reached);
    assert!(got == live, "the derived set holds the state at revision {reached}");
    assert!(got.keys().any(|k| k.starts_with(b"/leased/")), "leased keys kept");

    // A later moment starts from the derived set.
    let later = put_many(&mut c, "/two", 10).await;
    durable(&w, later, &d).await;
    let dir = w.path().join("later");
    let r = fetch_at(&cfg, &dir, &format!("rev:{later}"));
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains(&format!("fetched set {id} ")), "{}", r.stdout);
}
