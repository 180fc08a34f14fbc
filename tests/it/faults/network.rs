//! Hostile networks and servers in the way of an upload: a proxy that drops connections,
//! redirects, slow-loris answers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{Etcd, Run, Work, argv, run_async};
use crate::servers::{Apache, DAV_USER, Fault, FaultProxy, Rclone, Tinyproxy, multistatus};
use crate::support::{assert_complete, entries, visible};
use crate::webdav::backup_async;

/// A TCP relay in front of a real forward proxy that cuts the first `drops` connections once
/// more than `after` bytes went from the client through them: a proxy dropping connections
/// mid-request.
struct DropRelay {
    port: u16,
    dropped: Arc<AtomicUsize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl DropRelay {
    async fn start(upstream_port: u16, drops: usize, after: u64) -> DropRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let left = Arc::new(AtomicUsize::new(drops));
        let dropped = Arc::new(AtomicUsize::new(0));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let d = dropped.clone();
        tokio::spawn(async move {
            loop {
                let mut client = tokio::select! {
                    c = listener.accept() => match c { Ok((c, _)) => c, Err(_) => return },
                    _ = &mut stopped => return,
                };
                let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                    continue;
                };
                let (left, d) = (left.clone(), d.clone());
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.split();
                    let (mut sr, mut sw) = server.split();
                    let (mut up, mut b1, mut b2) = (0u64, vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
                    loop {
                        tokio::select! {
                            r = cr.read(&mut b1) => {
                                let n = match r { Ok(0) | Err(_) => break, Ok(n) => n };
                                up += n as u64;
                                if up > after && left.fetch_update(SeqCst, SeqCst, |x| x.checked_sub(1)).is_ok() {
                                    d.fetch_add(1, SeqCst);
                                    break; // both sockets close: the connection is cut mid-request
                                }
                                if sw.write_all(&b1[..n]).await.is_err() { break; }
                            }
                            r = sr.read(&mut b2) => {
                                let n = match r { Ok(0) | Err(_) => break, Ok(n) => n };
                                if cw.write_all(&b2[..n]).await.is_err() { break; }
                            }
                        }
                    }
                });
            }
        });
        DropRelay {
            port,
            dropped,
            _stop: stop,
        }
    }
}

/// A raw HTTP answer with its length, for [`Fault::Dribble`].
fn raw_answer(status: &str, body: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

/// Apache over HTTPS through the real tinyproxy, with a relay in front of the proxy that
/// cuts the first three connections after 256 KiB: each cut upload is retried from staging
/// and the set arrives complete, once, without debris.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_drops_connections_mid_upload_is_retried_to_a_complete_set() {
    let etcd = Etcd::start();
    etcd.fill(None, 2000, 500);
    let apache = Apache::start();
    let proxy = Tinyproxy::start();
    let relay = DropRelay::start(proxy.port, 3, 256 * 1024).await;
    let w = Work::new();
    let targets = format!(
        "[[target]]\nname = \"offsite\"\nurl = \"{}\"\nusername = \"{DAV_USER}\"\npassword_file = \"{}\"\nca_file = \"{}\"\nproxy = \"http://127.0.0.1:{}\"\nretry_budget = \"60s\"\nidle_timeout = \"5s\"\n",
        apache.url(),
        apache.password_file(w.path()).display(),
        apache.pki.ca.display(),
        relay.port
    );
    let cfg = w.write_config_targets(&etcd.endpoint, &targets);
    let r = backup_async(cfg).await;
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(relay.dropped.load(SeqCst), 3, "{}", r.stderr);
    assert!(r.stderr.matches("retrying").count() >= 3, "{}", r.stderr);
    assert!(proxy.requests() > 0);
    let root = apache.root().join("test");
    let sets = visible(&root);
    assert_eq!(entries(&root), sets, "no debris");
    assert_eq!(sets.len(), 1, "{sets:?}");
    assert_complete(&root.join(&sets[0]));
}

/// A connection closed as the request arrives, with no answer (a keep-alive connection a
/// proxy or server dropped just then): `check-config --connect`, which never retries, sends
/// that request once more on a new connection and passes; a second such close is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_before_any_answer_is_sent_again_once_even_without_retries() {
    let etcd = Etcd::start();
    let rclone = Rclone::start();
    let w = Work::new();
    for (drops, code) in [(1, 0), (2, 1)] {
        let relay = DropRelay::start(rclone.port, drops, 0).await;
        let cfg = w.write_dav_config(&etcd.endpoint, &format!("http://127.0.0.1:{}/", relay.port), "");
        let r = run_async(argv(&["check-config", "--connect"], &cfg), vec![]).await;
        assert_eq!(r.code, code, "{drops} closed: {}", r.all());
        assert_eq!(relay.dropped.load(SeqCst), drops, "{}", r.all());
        if code != 0 {
            assert!(
                r.stdout
                    .contains("connection closed before message completed (not retried)"),
                "{}",
                r.all()
            );
        }
    }
}

/// 301, 302, 307 and 308 are never followed (a streamed PUT cannot be replayed): the error
/// names the status and the Location, the place redirected to is never contacted, the set
/// waits in staging, and a redirect in the middle of a set leaves nothing on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_reported_with_their_location_and_never_followed() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let rclone = Rclone::start();
    let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let location = format!("http://127.0.0.1:{}/moved/", elsewhere.local_addr().unwrap().port());
    let visits = Arc::new(AtomicUsize::new(0));
    let v = visits.clone();
    tokio::spawn(async move {
        while elsewhere.accept().await.is_ok() {
            v.fetch_add(1, SeqCst);
        }
    });
    for code in [301u16, 302, 307, 308] {
        // Everything redirected: the target is unusable from the start.
        let loc = location.clone();
        let all = FaultProxy::scripted(Some(rclone.url()), move |_, _| {
            Fault::Answer(code, vec![("Location".into(), loc.clone())], b"moved".to_vec())
        })
        .await;
        let w = Work::new();
        let cfg = w.write_dav_config(&etcd.endpoint, &all.url(), "retry_budget = \"1s\"\n");
        let r = backup_async(cfg.clone()).await;
        assert_eq!(r.code, 1, "{code}: {}", r.all());
        assert!(
            r.all().contains(&code.to_string()) && r.all().contains(&format!("Location: {location}")),
            "{code}: {}",
            r.all()
        );
        assert!(
            !r.stderr.contains("retrying"),
            "{code}: a redirect is not retried: {}",
            r.stderr
        );
        let staged = w.staged();
        assert_eq!(staged.len(), 1, "{staged:?}");
        assert_eq!(staged[0].1, ["dav"]);
        let r = run_async(argv(&["list"], &cfg), vec![]).await;
        assert_eq!(r.code, 1, "{code}: {}", r.all());
        assert!(
            r.stderr.contains(&format!("Location: {location}")),
            "{code}: {}",
            r.stderr
        );

        // Only the snapshot's PUT redirected, mid-set.
        let loc = location.clone();
        let put = FaultProxy::scripted(Some(rclone.url()), move |m, p| {
            if m == "PUT" && p.contains("snapshot_") {
                Fault::Answer(code, vec![("Location".into(), loc.clone())], Vec::new())
            } else {
                Fault::Forward
            }
        })
        .await;
        let w = Work::new();
        let cfg = w.write_dav_config(&etcd.endpoint, &put.url(), "retry_budget = \"1s\"\n");
        let r = backup_async(cfg).await;
        assert_eq!(r.code, 1, "{code}: {}", r.all());
        assert!(
            r.stderr.trim().lines().last().unwrap().contains(&code.to_string()),
            "{}",
            r.stderr
        );
        assert!(
            entries(&rclone.root().join("test")).is_empty(),
            "{code}: {:?}",
            entries(&rclone.root().join("test"))
        );
        assert_eq!(w.staged().len(), 1);
    }
    assert_eq!(visits.load(SeqCst), 0, "a redirect was followed");
}

/// A workspace whose one target is the WebDAV server at `url`, with idle_timeout 1 s and
/// retry_budget 3 s; its config.
fn impatient_dav(endpoint: &str, url: &str) -> (Work, PathBuf) {
    let w = Work::new();
    let cfg = w.write_dav_config(endpoint, url, "idle_timeout = \"1s\"\nretry_budget = \"3s\"\n");
    (w, cfg)
}

/// `backup` with `cfg` fails (exit 1) within 30 s (`what`: the case); what it said.
async fn backup_fails_within_30_s(cfg: &Path, what: &str) -> Run {
    let t = Instant::now();
    let r = backup_async(cfg.to_path_buf()).await;
    assert_eq!(r.code, 1, "{what}: {}", r.all());
    assert!(t.elapsed() < Duration::from_secs(30), "{what}: took {:?}", t.elapsed());
    r
}

/// Slow-loris answers: a PROPFIND whose head arrives one byte every 300 ms, one whose body
/// arrives one byte every 1.5 s, and a PUT answered one byte every 500 ms. With
/// idle_timeout 1 s and retry_budget 3 s each command fails within bounded time, names the
/// stall, and leaves nothing on the server; the set waits in staging. (A server dribbling
/// faster than idle_timeout is not cut: see "Known limits".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_answers_fail_within_bounded_time_and_leave_nothing() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let rclone = Rclone::start();
    let listing = raw_answer("207 Multi-Status", &multistatus(&[("/test/".into(), None)]));
    let head_len = listing.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let cases: Vec<(&str, Fault)> = vec![
        (
            "head",
            Fault::Dribble {
                raw: listing.clone(),
                at_once: 0,
                pause: Duration::from_millis(300),
            },
        ),
        (
            "body",
            Fault::Dribble {
                raw: listing.clone(),
                at_once: head_len,
                pause: Duration::from_millis(1500),
            },
        ),
    ];
    for (what, reply) in cases {
        let rp = reply.clone();
        let srv = FaultProxy::scripted(Some(rclone.url()), move |m, _| {
            if m == "PROPFIND" { rp.clone() } else { Fault::Forward }
        })
        .await;
        let (w, cfg) = impatient_dav(&etcd.endpoint, &srv.url());
        let t = Instant::now();
        let r = run_async(argv(&["list"], &cfg), vec![]).await;
        assert_eq!(r.code, 1, "{what}: {}", r.all());
        assert!(t.elapsed() < Duration::from_secs(20), "{what}: took {:?}", t.elapsed());
        assert!(
            r.stderr.contains("no progress for 1s") || r.stderr.contains("no data for 1s"),
            "{what}: {}",
            r.stderr
        );
        backup_fails_within_30_s(&cfg, what).await;
        assert_eq!(w.staged().len(), 1, "{what}: {:?}", w.staged());
    }
    // The PUT's answer dribbled: retried (each attempt cut after 1 s), then given up.
    let created = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec();
    let srv = FaultProxy::scripted(Some(rclone.url()), move |m, p| {
        if m == "PUT" && p.contains("snapshot_") {
            Fault::Dribble {
                raw: created.clone(),
                at_once: 0,
                pause: Duration::from_millis(500),
            }
        } else {
            Fault::Forward
        }
    })
    .await;
    let (w, cfg) = impatient_dav(&etcd.endpoint, &srv.url());
    let r = backup_fails_within_30_s(&cfg, "PUT").await;
    assert!(r.stderr.contains("retrying"), "{}", r.stderr);
    assert!(
        entries(&rclone.root().join("test")).is_empty(),
        "{:?}",
        entries(&rclone.root().join("test"))
    );
    assert_eq!(w.staged()[0].1, ["dav"]);
}
