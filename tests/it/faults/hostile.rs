//! A malicious server for `fetch`, and properties of the names a server or a configuration
//! may give.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{Etcd, Work, argv, run_async};
use crate::servers::{Fault, FaultProxy, multistatus};
use crate::support::mode;

/// `code` with `body`.
fn answer(code: u16, body: impl Into<Vec<u8>>) -> Fault {
    Fault::Answer(code, Vec::new(), body.into())
}

/// How the scripted server answers `(method, path)`.
type RouteFn = Arc<dyn Fn(&str, &str) -> Fault + Send + Sync>;

/// One set, served from memory as a WebDAV server would at `/test/<id>/`.
#[derive(Clone)]
struct Served {
    id: String,
    files: BTreeMap<String, Vec<u8>>,
}

impl Served {
    fn from_dir(dir: &Path) -> Served {
        let id = dir.file_name().unwrap().to_str().unwrap().to_string();
        let files = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                (
                    p.file_name().unwrap().to_str().unwrap().to_string(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        Served { id, files }
    }

    fn set_path(&self) -> String {
        format!("/test/{}/", self.id)
    }

    fn snapshot_name(&self) -> String {
        self.files.keys().find(|n| n.starts_with("snapshot_")).unwrap().clone()
    }

    /// What an honest server answers.
    fn honest(&self, method: &str, path: &str) -> Fault {
        let set = self.set_path();
        match method {
            "PROPFIND" if path == "/" => answer(207, multistatus(&[("/".into(), None), ("/test/".into(), None)])),
            "PROPFIND" if path == "/test/" => answer(207, multistatus(&[("/test/".into(), None), (set.clone(), None)])),
            "PROPFIND" if path == set => {
                let mut e = vec![(set.clone(), None)];
                for (n, b) in &self.files {
                    e.push((format!("{set}{n}"), Some(b.len() as u64)));
                }
                answer(207, multistatus(&e))
            }
            "GET" if path.starts_with(&set) => match self.files.get(&path[set.len()..]) {
                Some(b) => answer(200, b.clone()),
                None => answer(404, "not here"),
            },
            _ => answer(404, "not here"),
        }
    }

    fn manifest(&self) -> serde_json::Value {
        serde_json::from_slice(&self.files["manifest.json"]).unwrap()
    }

    /// The same set with its manifest edited (SHA256SUMS left alone).
    fn with_manifest(mut self, edit: impl FnOnce(&mut serde_json::Value)) -> Served {
        let mut v = self.manifest();
        edit(&mut v);
        self.files
            .insert("manifest.json".into(), serde_json::to_vec_pretty(&v).unwrap());
        self
    }

    fn route(self) -> RouteFn {
        Arc::new(move |m: &str, p: &str| self.honest(m, p))
    }

    /// Honest but where `f` answers otherwise.
    fn route_with(self, f: impl Fn(&Served, &str, &str) -> Option<Fault> + Send + Sync + 'static) -> RouteFn {
        Arc::new(move |m: &str, p: &str| f(&self, m, p).unwrap_or_else(|| self.honest(m, p)))
    }
}

/// `fetch` from a malicious server: traversal hrefs, manifests naming "../x", absolute paths
/// or foreign names, a manifest for another id, bodies longer or shorter than recorded, a
/// body cut short of its Content-Length, endless bodies (file, SHA256SUMS, manifest), a
/// SHA256SUMS naming another file, a flipped byte, and a consistently rewritten set whose
/// etcd trailer no longer matches. Each fails (exit 1, with the expected reason), leaves no
/// file in DIR (nothing unverified), and writes nothing outside DIR. The honest server
/// first, so the failures are the faults' doing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_from_a_malicious_server_writes_nothing_outside_dir_and_nothing_unverified() {
    use sha2::{Digest, Sha256};
    let etcd = Etcd::start();
    etcd.fill(None, 300, 300);
    let w = Work::new();
    let cfg = w.write_config(&etcd.endpoint, None, "");
    let r = run_async(argv(&["backup", "--no-election"], &cfg), vec![]).await;
    assert_eq!(r.code, 0, "{}", r.all());
    let set = Served::from_dir(&w.sets()[0]);
    let snap = set.snapshot_name();
    let snap_len = set.files[&snap].len();
    let evil_abs = format!("/tmp/etcd-backupd-evil-{}", std::process::id());

    // A consistent rewrite: one byte of the snapshot flipped, manifest and sums updated.
    let rewritten = {
        let mut s = set.clone();
        let bytes = s.files.get_mut(&snap).unwrap();
        bytes[snap_len / 2] ^= 0x01;
        let sha = hex::encode(Sha256::digest(&bytes[..]));
        let old = hex::encode(Sha256::digest(&set.files[&snap]));
        let sums = String::from_utf8(s.files["SHA256SUMS"].clone())
            .unwrap()
            .replace(&old, &sha);
        s.files.insert("SHA256SUMS".into(), sums.into_bytes());
        s.with_manifest(|m| {
            m["files"][0]["sha256"] = sha.clone().into();
            m["files"][0]["stored_sha256"] = sha.clone().into();
        })
    };
    let flipped = {
        let mut s = set.clone();
        s.files.get_mut(&snap).unwrap()[snap_len / 3] ^= 0x40;
        s
    };
    let rename = |to: String| {
        set.clone().with_manifest(move |m| {
            m["files"][0]["name"] = to.clone().into();
            m["files"][0]["stored_name"] = to.into();
        })
    };
    let s_ = snap.clone();
    let cases: Vec<(&str, RouteFn, i32, &str)> = vec![
        ("honest", set.clone().route(), 0, ""),
        (
            "encoded traversal href",
            set.clone().route_with(|s, m, p| {
                (m == "PROPFIND" && p == "/test/").then(|| {
                    answer(
                        207,
                        multistatus(&[
                            ("/test/".into(), None),
                            (s.set_path(), None),
                            ("/test/..%2F..%2Fevil/".into(), None),
                        ]),
                    )
                })
            }),
            1,
            "unsafe name",
        ),
        (
            "dot-dot href",
            set.clone().route_with(|_, m, p| {
                (m == "PROPFIND" && p == "/test/").then(|| {
                    answer(
                        207,
                        multistatus(&[("/test/".into(), None), ("/test/../../etc/".into(), None)]),
                    )
                })
            }),
            1,
            "'..'",
        ),
        (
            "manifest names ../../x",
            rename("../../x".into()).route(),
            1,
            "holds no complete backup set",
        ),
        (
            "manifest names an absolute path",
            rename(format!("{evil_abs}/snapshot_x.db")).route(),
            1,
            "holds no complete backup set",
        ),
        (
            "manifest names a foreign file",
            rename("notes.txt".into()).route(),
            1,
            "holds no complete backup set",
        ),
        (
            "manifest of another id",
            set.clone()
                .with_manifest(|m| m["id"] = "2001-01-01_000000".into())
                .route(),
            1,
            "holds no complete backup set",
        ),
        (
            "longer body than recorded",
            set.clone().route_with(move |s, m, p| {
                (m == "GET" && p.ends_with(&s_)).then(|| {
                    let mut b = s.files[&s_].clone();
                    b.extend(vec![0u8; 1 << 20]);
                    answer(200, b)
                })
            }),
            1,
            "longer than",
        ),
        (
            "shorter body than recorded",
            set.clone().route_with({
                let sn = snap.clone();
                move |s: &Served, m: &str, p: &str| {
                    (m == "GET" && p.ends_with(&sn)).then(|| answer(200, s.files[&sn][..snap_len / 2].to_vec()))
                }
            }),
            1,
            "altered or corrupted",
        ),
        (
            "body cut short of its Content-Length",
            set.clone().route_with({
                let sn = snap.clone();
                move |s: &Served, m: &str, p: &str| {
                    (m == "GET" && p.ends_with(&sn)).then(|| Fault::Short {
                        declared: snap_len,
                        body: s.files[&sn][..snap_len / 2].to_vec(),
                    })
                }
            }),
            1,
            "is damaged: 'snapshot_",
        ),
        (
            "endless snapshot body",
            set.clone().route_with({
                let sn = snap.clone();
                move |_: &Served, m: &str, p: &str| (m == "GET" && p.ends_with(&sn)).then_some(Fault::EndlessFile)
            }),
            1,
            "longer than",
        ),
        (
            "endless SHA256SUMS",
            set.clone()
                .route_with(|_, m, p| (m == "GET" && p.ends_with("/SHA256SUMS")).then_some(Fault::EndlessFile)),
            1,
            "larger than",
        ),
        (
            "endless manifest",
            set.clone()
                .route_with(|_, m, p| (m == "GET" && p.ends_with("/manifest.json")).then_some(Fault::EndlessFile)),
            1,
            "larger than",
        ),
        (
            "SHA256SUMS naming another file",
            {
                let mut s = set.clone();
                let mut sums = s.files["SHA256SUMS"].clone();
                sums.extend_from_slice(format!("{}  ../../x\n", "0".repeat(64)).as_bytes());
                s.files.insert("SHA256SUMS".into(), sums);
                s.route()
            },
            1,
            "does not agree with manifest.json",
        ),
        ("a flipped byte", flipped.route(), 1, "altered or corrupted"),
        (
            "consistently rewritten, trailer broken",
            rewritten.route(),
            1,
            "trailer",
        ),
    ];
    for (what, route, code, expect) in cases {
        let rt = route.clone();
        let srv = FaultProxy::scripted(None, move |m, p| rt(m, p)).await;
        let hostile_cfg = w.path().join("hostile.toml");
        std::fs::write(
            &hostile_cfg,
            std::fs::read_to_string(&cfg).unwrap().replace(
                &format!("url = \"file://{}\"", w.target_root().display()),
                &format!("url = \"{}\"\nidle_timeout = \"2s\"\nretry_budget = \"1s\"", srv.url()),
            ),
        )
        .unwrap();
        let sandbox = tempfile::tempdir().unwrap();
        let dir = sandbox.path().join("a/b/fetch");
        let t = Instant::now();
        let r = run_async(
            argv(&["fetch", "latest", "--to", dir.to_str().unwrap()], &hostile_cfg),
            vec![],
        )
        .await;
        assert_eq!(r.code, code, "{what}: {}", r.all());
        assert!(r.stderr.contains(expect), "{what}: {}", r.stderr);
        assert!(t.elapsed() < Duration::from_secs(60), "{what}: {:?}", t.elapsed());
        let files: Vec<PathBuf> = Work::files_under(sandbox.path())
            .into_iter()
            .filter(|p| !p.is_dir())
            .collect();
        if code == 0 {
            assert_eq!(files, vec![dir.join(&snap)], "{what}");
            assert_eq!(mode(&dir), 0o700);
            assert_eq!(mode(&dir.join(&snap)), 0o600);
            assert_eq!(std::fs::read(dir.join(&snap)).unwrap(), set.files[&snap]);
        } else {
            assert!(files.is_empty(), "{what}: {files:?}");
        }
        for p in [
            sandbox.path().join("a/b/x"),
            sandbox.path().join("a/x"),
            sandbox.path().join("x"),
            PathBuf::from(&evil_abs),
        ] {
            assert!(!p.exists(), "{what}: {} was written", p.display());
        }
    }
}

/// Properties of name validation (bounded: 256 cases each).
mod names {
    use proptest::prelude::*;
    use std::path::{Component, Path};

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 256,
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(config())]

        /// A name accepted as a set name is exactly one plain component under any root.
        #[test]
        fn a_set_name_is_one_plain_path_component(name in "\\PC{0,24}|(\\.|\\./|\\.\\.|/|\\\\|[a-z0-9_-]){0,8}") {
            if etcd_backupd::targets::is_set_name(&name) {
                let p = Path::new("/root").join(&name);
                prop_assert_eq!(p.parent(), Some(Path::new("/root")));
                prop_assert!(matches!(p.components().next_back(), Some(Component::Normal(_))));
            }
        }

        /// A name the configuration accepts (node, cluster, target) is a safe set-level name.
        #[test]
        fn config_names_are_safe_path_components(name in "\\PC{0,40}|(\\.|/|\\.\\.|[a-zA-Z0-9._-]){0,10}") {
            if etcd_backupd::config::check_name(&name).is_ok() {
                prop_assert!(etcd_backupd::targets::safe_component(&name));
                prop_assert!(!name.starts_with('.'));
            }
        }

        /// Whatever hrefs a server sends, every entry the parser returns has a safe name and
        /// a path without `.` or `..` segments.
        #[test]
        fn propfind_entries_are_always_safe(hrefs in proptest::collection::vec("(/|%2[Ff]|%5[Cc]|%00|%2[Ee]|\\.|\\.\\.|[a-z0-9_-]{1,6}|\\\\|http://h){0,8}", 1..6)) {
            let entries: Vec<(String, Option<u64>)> = hrefs.into_iter().map(|h| (h, Some(1))).collect();
            let body = super::multistatus(&entries);
            match etcd_backupd::targets::propfind::parse(&body) {
                Ok(parsed) => {
                    prop_assert_eq!(parsed.len(), entries.len());
                    for e in parsed {
                        prop_assert!(e.name.is_empty() || etcd_backupd::targets::safe_component(&e.name), "{:?}", e);
                        prop_assert!(!e.path.split('/').any(|s| s == "." || s == ".."), "{:?}", e);
                    }
                }
                // Refused only for a dot segment or an unsafe name, and only when some href
                // holds a dot, a backslash or an encoded '/', '\', NUL or '.'.
                Err(err) => {
                    let err = format!("{err:#}");
                    prop_assert!(err.contains("'..' or '.'") || err.contains("unsafe name"), "{}", err);
                    let risky = ["%2F", "%2f", "%5C", "%5c", "%00", "%2E", "%2e", ".", "\\"];
                    prop_assert!(entries.iter().any(|(h, _)| risky.iter().any(|r| h.contains(r))), "{}: {:?}", err, entries);
                }
            }
        }
    }
}
