//! Remote targets against real servers: Apache mod_dav over HTTPS with Basic auth, rclone's
//! WebDAV server, tinyproxy in between, and injected faults.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{Etcd, Run, Work, run_env};
use crate::servers::{Apache, DAV_USER, Fault, FaultProxy, Rclone, Tinyproxy};

pub(crate) fn backup_env(cfg: &Path, env: &[(&str, &str)]) -> Run {
    run_env(&["backup", "--no-election", "--config", cfg.to_str().unwrap()], env)
}

/// `backup_env` from an async test, off the runtime's threads.
pub(crate) async fn backup_async(cfg: PathBuf) -> Run {
    tokio::task::spawn_blocking(move || backup_env(&cfg, &[]))
        .await
        .unwrap()
}

pub(crate) fn apache_target(apache: &Apache, w: &Work, extra: &str) -> String {
    format!(
        "[[target]]\nname = \"offsite\"\nurl = \"{}\"\nusername = \"{DAV_USER}\"\npassword_file = \"{}\"\nca_file = \"{}\"\n{extra}\n",
        apache.url(),
        apache.password_file(w.path()).display(),
        apache.pki.ca.display()
    )
}

/// Complete sets (folders with a manifest) of cluster `test` under a server's root.
pub(crate) fn sets_on(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root.join("test"))
        .map(|e| {
            e.map(|e| e.unwrap().path())
                .filter(|p| {
                    p.join("manifest.json").exists() && !p.file_name().unwrap().to_str().unwrap().starts_with('.')
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub(crate) fn entries_on(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join("test"))
        .map(|e| e.map(|e| e.unwrap().file_name().into_string().unwrap()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn curl(args: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "--fail"])
        .args(args)
        .output()
        .expect("curl")
}

#[test]
fn https_mod_dav_through_a_forward_proxy_arrives_complete() {
    let etcd = Etcd::start();
    etcd.fill(None, 2000, 300);
    let apache = Apache::start();
    let proxy = Tinyproxy::start();
    let w = Work::new();
    let cfg = w.write_config_targets(&etcd.endpoint, &apache_target(&apache, &w, ""));
    let env = [("HTTPS_PROXY", proxy.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let r = backup_env(&cfg, &env);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stderr.contains("unencrypted"),
        "the plaintext warning is missing: {}",
        r.stderr
    );
    assert!(proxy.requests() > 0, "nothing went through the proxy");
    let sets = sets_on(&apache.root());
    assert_eq!(sets.len(), 1, "{:?}", entries_on(&apache.root()));
    let id = sets[0].file_name().unwrap().to_str().unwrap().to_string();
    assert_eq!(entries_on(&apache.root()), vec![id.clone()], "no debris may stay");

    // Download with curl, through the proxy, and check with sha256sum -c.
    let dl = tempfile::tempdir().unwrap();
    let auth = format!("{DAV_USER}:{}", apache.password);
    for name in ["SHA256SUMS".to_string(), format!("snapshot_{id}.db")] {
        let out = curl(&[
            "--cacert",
            apache.pki.ca.to_str().unwrap(),
            "-u",
            &auth,
            "-x",
            &proxy.url(),
            "-o",
            dl.path().join(&name).to_str().unwrap(),
            &format!("{}test/{id}/{name}", apache.url()),
        ]);
        assert!(
            out.status.success(),
            "curl {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    crate::common::assert_sha256sums(dl.path());

    // list reads the set back through the same path.
    let r = run_env(
        &["list", "--target", "offsite", "--config", cfg.to_str().unwrap()],
        &env,
    );
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains(&id), "{}", r.stdout);

    // check-config --connect names the proxy in effect.
    let r = run_env(&["check-config", "--connect", "--config", cfg.to_str().unwrap()], &env);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout.contains(&format!("via {} (from HTTPS_PROXY)", proxy.url())),
        "{}",
        r.stdout
    );

    // A second backup: a new id (the run waits for the next second if need be).
    let r = backup_env(&cfg, &env);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(sets_on(&apache.root()).len(), 2);
}

#[test]
fn proxy_modes_route_as_configured() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let apache = Apache::start();
    let proxy = Tinyproxy::start();
    let w = Work::new();
    let purl = proxy.url();
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, bool);
    let cases: Vec<Case> = vec![
        // env, with NO_PROXY naming the server's address: direct
        (
            "env",
            vec![("HTTPS_PROXY", purl.as_str()), ("NO_PROXY", "localhost,127.0.0.1")],
            false,
        ),
        // env, with a CIDR covering it: direct
        (
            "env",
            vec![("https_proxy", purl.as_str()), ("no_proxy", "10.0.0.0/8,127.0.0.0/8")],
            false,
        ),
        // none ignores the variables
        ("none", vec![("HTTPS_PROXY", purl.as_str())], false),
        // an explicit proxy applies with no variables at all
        (purl.as_str(), vec![], true),
        // env with the variable: via the proxy
        ("env", vec![("HTTPS_PROXY", purl.as_str())], true),
    ];
    for (i, (mode, env, via)) in cases.into_iter().enumerate() {
        let cfg = w.write_config_targets(
            &etcd.endpoint,
            &apache_target(&apache, &w, &format!("proxy = \"{mode}\"")),
        );
        let before = proxy.requests();
        let r = run_env(&["check-config", "--connect", "--config", cfg.to_str().unwrap()], &env);
        assert_eq!(r.code, 0, "case {i}: {}", r.all());
        let shown = if via { "via " } else { "direct (" };
        assert!(r.stdout.contains(shown), "case {i}: {}", r.stdout);
        let r = backup_env(&cfg, &env);
        assert_eq!(r.code, 0, "case {i}: {}", r.all());
        let used = proxy.requests() > before;
        assert_eq!(used, via, "case {i} ({mode}, {env:?}): proxy used = {used}");
    }
    assert_eq!(sets_on(&apache.root()).len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_target_does_not_stop_the_others_and_rclone_works_too() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let rclone = Rclone::start();
    // A server answering 500 to everything, and a port where nothing listens.
    let broken = FaultProxy::start(rclone.url(), |_, _, _, _| Fault::Respond(500, "<h1>boom</h1>".into())).await;
    let dead = format!("http://127.0.0.1:{}/", crate::common::free_port());
    let w = Work::new();
    let targets = format!(
        "[[target]]\nname = \"broken\"\nurl = \"{}\"\nretry_budget = \"1s\"\n\n[[target]]\nname = \"dead\"\nurl = \"{dead}\"\nretry_budget = \"1s\"\nconnect_timeout = \"1s\"\n\n[[target]]\nname = \"rclone\"\nurl = \"{}\"\nverify_upload = \"read-back\"\n",
        broken.url(),
        rclone.url()
    );
    let bad_ca = w.path().join("not-a-ca.pem");
    std::fs::write(&bad_ca, "this is not PEM\n").unwrap();
    let targets = format!(
        "{targets}\n[[target]]\nname = \"badca\"\nurl = \"https://127.0.0.1:9/\"\nca_file = \"{}\"\nretry_budget = \"1s\"\n",
        bad_ca.display()
    );
    let cfg = w.write_config_targets(&etcd.endpoint, &targets);
    let r = backup_async(cfg).await;
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stdout.contains("rclone: stored at"), "{}", r.stdout);
    // Each target's own summary line says why it failed (the whole output also holds ports
    // and hashes, in which "500" may appear by chance).
    let line = |prefix: &str| {
        r.stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("target    {prefix}")))
            .unwrap_or_else(|| panic!("no line for {prefix}: {}", r.stdout))
            .to_string()
    };
    assert!(line("badca: FAILED").contains("ca_file"), "{}", r.stdout);
    assert!(
        line("broken: FAILED").contains("500 Internal Server Error"),
        "{}",
        r.stdout
    );
    assert!(line("dead: FAILED").contains("Connection refused"), "{}", r.stdout);
    assert!(
        r.stderr
            .lines()
            .any(|l| l.contains("failed; retrying") && l.contains("500 Internal Server Error")),
        "retries are logged: {}",
        r.stderr
    );
    let sets = sets_on(&rclone.root());
    assert_eq!(sets.len(), 1, "{:?}", entries_on(&rclone.root()));
    crate::common::assert_sha256sums(&sets[0]);
}

fn rclone_behind(fault: &FaultProxy, extra: &str) -> String {
    format!("[[target]]\nname = \"faulty\"\nurl = \"{}\"\n{extra}\n", fault.url())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_5xx_cut_bodies_and_stalls_are_retried_to_success() {
    let etcd = Etcd::start();
    etcd.fill(None, 300, 500);
    let rclone = Rclone::start();
    let w = Work::new();
    let puts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let p = puts.clone();
    // The first three PUTs fail in three ways, then everything passes.
    let fault = FaultProxy::start(rclone.url(), move |_, method, _, _| {
        if method != "PUT" {
            return Fault::Forward;
        }
        match p.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            0 => Fault::Respond(503, "busy".into()),
            1 => Fault::CutBody,
            2 => Fault::Stall,
            _ => Fault::Forward,
        }
    })
    .await;
    let cfg = w.write_config_targets(
        &etcd.endpoint,
        &rclone_behind(&fault, "idle_timeout = \"1s\"\nretry_budget = \"30s\""),
    );
    let r = backup_async(cfg).await;
    assert_eq!(r.code, 0, "{}", r.all());
    // One retry per fault, each logged with its own cause.
    let retries: Vec<&str> = r.stderr.lines().filter(|l| l.contains("failed; retrying")).collect();
    assert_eq!(retries.len(), 3, "{}", r.stderr);
    assert!(
        retries.iter().any(|l| l.contains("503 Service Unavailable: busy")),
        "{}",
        r.stderr
    );
    assert!(
        retries
            .iter()
            .any(|l| l.contains("timed out") || l.contains("no progress for 1s")),
        "{}",
        r.stderr
    );
    let sets = sets_on(&rclone.root());
    assert_eq!(sets.len(), 1, "{:?}", entries_on(&rclone.root()));
    assert_eq!(
        entries_on(&rclone.root()).len(),
        1,
        "no debris: {:?}",
        entries_on(&rclone.root())
    );
    crate::common::assert_sha256sums(&sets[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_errors_name_the_server_answer_and_leave_nothing_visible() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let rclone = Rclone::start();
    let w = Work::new();
    for (status, body, retried) in [
        (
            507u16,
            "<html><body><h1>Insufficient Storage</h1><p>quota of 10 GiB exceeded</p></body></html>",
            true,
        ),
        (403, "<html><p>forbidden by policy</p></html>", false),
    ] {
        let fault = FaultProxy::start(rclone.url(), move |_, method, _, _| {
            if method == "PUT" {
                Fault::Respond(status, body.to_string())
            } else {
                Fault::Forward
            }
        })
        .await;
        let cfg = w.write_config_targets(&etcd.endpoint, &rclone_behind(&fault, "retry_budget = \"2s\""));
        let r = backup_async(cfg).await;
        assert_eq!(r.code, 1, "{}", r.all());
        let line = r.stderr.trim().lines().last().unwrap();
        let reason = if status == 507 {
            "507 Insufficient Storage"
        } else {
            "403 Forbidden"
        };
        assert!(line.contains(reason), "{line}");
        let excerpt = if status == 507 {
            "quota of 10 GiB exceeded"
        } else {
            "forbidden by policy"
        };
        assert!(r.stdout.contains(excerpt), "{}", r.stdout);
        assert_eq!(r.stderr.contains("retrying"), retried, "{}", r.stderr);
        assert!(sets_on(&rclone.root()).is_empty());
        // The incomplete upload was removed.
        assert!(
            entries_on(&rclone.root()).is_empty(),
            "{:?}",
            entries_on(&rclone.root())
        );
        // Every set taken waits in staging for the target, none half-assembled.
        assert!(w.staging_tmp_files().is_empty(), "{:?}", w.staging_tmp_files());
        assert!(
            w.staged().iter().all(|(_, pending)| pending == &["faulty".to_string()]),
            "{:?}",
            w.staged()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_propfind_answers_are_refused() {
    let rclone = Rclone::start();
    let w = Work::new();
    let traversal = r#"<?xml version="1.0"?><D:multistatus xmlns:D="DAV:"><D:response><D:href>/test/</D:href></D:response><D:response><D:href>/test/..%2F..%2Fetc/</D:href><D:propstat><D:prop><D:resourcetype><D:collection/></D:resourcetype></D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response></D:multistatus>"#;
    let laughs = r#"<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><D:multistatus xmlns:D="DAV:"><D:response><D:href>/test/&c;</D:href></D:response></D:multistatus>"#;
    let cases: Vec<(Fault, &str)> = vec![
        (Fault::Respond(207, traversal.to_string()), "unsafe name"),
        (Fault::Respond(207, laughs.to_string()), "DOCTYPE"),
        (Fault::Endless, "larger than"),
    ];
    for (fault, expect) in cases {
        let f = fault.clone();
        let proxy = FaultProxy::start(rclone.url(), move |_, method, _, _| {
            if method == "PROPFIND" {
                f.clone()
            } else {
                Fault::Forward
            }
        })
        .await;
        let cfg = w.write_config_targets("http://127.0.0.1:1", &rclone_behind(&proxy, "retry_budget = \"1s\""));
        let r = tokio::task::spawn_blocking(move || run_env(&["list", "--config", cfg.to_str().unwrap()], &[]))
            .await
            .unwrap();
        assert_eq!(r.code, 1, "{fault:?}: {}", r.all());
        assert!(r.stderr.contains(expect), "{fault:?}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_uploader_mid_transfer_leaves_no_set_and_the_next_run_cleans_up() {
    let etcd = Etcd::start();
    etcd.fill(None, 500, 1000);
    let rclone = Rclone::start();
    let w = Work::new();
    let (fault, stalled) = FaultProxy::stalling_first_snapshot(rclone.url()).await;
    let cfg = w.write_config_targets(&etcd.endpoint, &rclone_behind(&fault, ""));
    let mut child = Command::new(env!("CARGO_BIN_EXE_etcd-backupd"))
        .args(["backup", "--no-election", "--config", cfg.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !stalled.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(std::time::Instant::now() < deadline, "the upload never started");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    child.kill().unwrap(); // SIGKILL, mid-upload
    child.wait().unwrap();

    assert!(sets_on(&rclone.root()).is_empty());
    let left = entries_on(&rclone.root());
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(
        left[0].starts_with('.') && left[0].contains(".partial-node-a-"),
        "{left:?}"
    );
    let cfg2 = cfg.clone();
    let r = tokio::task::spawn_blocking(move || run_env(&["list", "--config", cfg2.to_str().unwrap()], &[]))
        .await
        .unwrap();
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stderr.contains("no complete backup sets"), "{}", r.all());

    // The killed run's verified set waits in staging. The next run of the same node removes
    // its own debris, delivers that set first, then its own.
    let staged = w.staged();
    assert_eq!(staged.len(), 1, "{staged:?}");
    let r = backup_async(cfg).await;
    assert_eq!(r.code, 0, "{}", r.all());
    let left = entries_on(&rclone.root());
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|n| !n.starts_with('.')), "{left:?}");
    assert_eq!(sets_on(&rclone.root()).len(), 2);
    assert!(left.contains(&staged[0].0), "{left:?}");
    assert!(w.staged().iter().all(|(_, pending)| pending.is_empty()));
}

pub(crate) fn secret_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_tokens_and_proxy_credentials_work_and_never_show() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let apache = Apache::start_with(true);
    let proxy_password = "proxy-Pa55-never-printed";
    let proxy = Tinyproxy::start_with(Some(("puser", proxy_password)));
    let rclone = Rclone::start();
    let token = "tok-9f8e7d6c5b4a-never-printed";
    let expected = format!("Bearer {token}");
    let bearer = FaultProxy::start(rclone.url(), move |_, _, _, auth| {
        if auth == Some(expected.as_str()) {
            Fault::Forward
        } else {
            Fault::Respond(401, "bad token".into())
        }
    })
    .await;
    let w = Work::new();
    let key_text = std::fs::read_to_string(&apache.pki.client_key).unwrap();
    let key_line = key_text.lines().nth(1).unwrap().to_string();
    let secrets = [
        apache.password.clone(),
        token.to_string(),
        proxy_password.to_string(),
        key_line,
    ];
    let mut outputs = Vec::new();
    let check = |r: &Run, outputs: &mut Vec<String>| outputs.push(r.all());

    let client_tls = format!(
        "client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
        apache.pki.client_cert.display(),
        apache.pki.client_key.display()
    );
    let proxy_pw = secret_file(w.path(), "proxy.password", proxy_password);
    let token_file = secret_file(w.path(), "token", token);
    let targets = format!(
        "{}proxy = \"http://puser@127.0.0.1:{}\"\nproxy_password_file = \"{}\"\n\n[[target]]\nname = \"bearer\"\nurl = \"{}\"\ntoken_file = \"{}\"\nretry_budget = \"1s\"\n",
        apache_target(&apache, &w, &client_tls),
        proxy.port,
        proxy_pw.display(),
        bearer.url(),
        token_file.display()
    );
    let cfg = w.write_config_targets(&etcd.endpoint, &targets);
    let c = cfg.clone();
    let r = backup_async(c).await;
    assert_eq!(r.code, 0, "{}", r.all());
    check(&r, &mut outputs);
    assert_eq!(sets_on(&apache.root()).len(), 1);
    assert_eq!(sets_on(&rclone.root()).len(), 1);
    assert!(proxy.requests() > 0);
    for args in [
        vec!["check-config"],
        vec!["check-config", "--connect"],
        vec!["list", "--target", "offsite"],
        vec!["list", "--json", "--target", "bearer"],
    ] {
        let mut a = args.clone();
        a.extend(["-vv", "--config", cfg.to_str().unwrap()]);
        let a: Vec<String> = a.iter().map(|s| s.to_string()).collect();
        let r = tokio::task::spawn_blocking(move || run_env(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]))
            .await
            .unwrap();
        assert_eq!(r.code, 0, "{args:?}: {}", r.all());
        check(&r, &mut outputs);
    }

    // Without the client certificate, or with a wrong token, or without the proxy
    // password, the server or proxy refuses: exit 1, and still no secret in the output.
    let no_client_cert = apache_target(&apache, &w, "proxy = \"none\"\nretry_budget = \"1s\"");
    let wrong_token = secret_file(w.path(), "wrong-token", "not-the-token");
    let cases = [
        (no_client_cert, "the server wants a client certificate"),
        (
            format!(
                "[[target]]\nname = \"bearer\"\nurl = \"{}\"\ntoken_file = \"{}\"\nretry_budget = \"1s\"\n",
                bearer.url(),
                wrong_token.display()
            ),
            "401 Unauthorized: bad token",
        ),
        (
            apache_target(
                &apache,
                &w,
                &format!(
                    "{client_tls}proxy = \"http://puser@127.0.0.1:{}\"\nretry_budget = \"1s\"",
                    proxy.port
                ),
            ),
            "the proxy refused",
        ),
    ];
    for (targets, expect) in cases {
        let cfg = w.write_config_targets(&etcd.endpoint, &targets);
        let r = backup_async(cfg).await;
        assert_eq!(r.code, 1, "{}", r.all());
        eprintln!("{}", r.stderr.trim().lines().last().unwrap_or_default());
        assert!(r.stderr.contains(expect), "{expect}: {}", r.stderr);
        check(&r, &mut outputs);
    }
    assert_eq!(sets_on(&apache.root()).len(), 1);
    assert_eq!(sets_on(&rclone.root()).len(), 1);

    // TLS verification is always on: without the extra CA, the server is not trusted.
    let untrusted = format!(
        "[[target]]\nname = \"untrusted\"\nurl = \"{}\"\nusername = \"{DAV_USER}\"\npassword_file = \"{}\"\nretry_budget = \"1s\"\n",
        apache.url(),
        apache.password_file(w.path()).display()
    );
    let cfg = w.write_config_targets(&etcd.endpoint, &untrusted);
    let r = backup_async(cfg).await;
    assert_eq!(r.code, 1, "{}", r.all());
    eprintln!("{}", r.stderr.trim().lines().last().unwrap_or_default());
    assert!(
        r.stderr.contains("UnknownIssuer") && r.stderr.contains("not signed by a trusted CA"),
        "{}",
        r.stderr
    );
    check(&r, &mut outputs);

    for out in &outputs {
        for s in &secrets {
            assert!(!out.contains(s.as_str()), "a secret leaked: {out}");
        }
    }
    // Nor in any file the runs left in staging or on the targets.
    for dir in [w.staging(), apache.root(), rclone.root()] {
        for f in Work::files_under(&dir).into_iter().filter(|p| p.is_file()) {
            let bytes = std::fs::read(&f).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            for s in &secrets {
                assert!(!text.contains(s.as_str()), "a secret is in {}", f.display());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answers_and_429_still_succeed() {
    let etcd = Etcd::start();
    etcd.fill(None, 300, 1000);
    let rclone = Rclone::start();
    let w = Work::new();
    let (mkcols, moves) = (
        std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    );
    let (mk, mv) = (mkcols.clone(), moves.clone());
    let puts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let p = puts.clone();
    let fault = FaultProxy::start(rclone.url(), move |_, method, path, _| {
        use std::sync::atomic::Ordering::SeqCst;
        match method {
            // The temporary collection is made, but the answer is lost.
            "MKCOL" if path.contains(".partial-") && mk.fetch_add(1, SeqCst) == 0 => Fault::ForwardThenCut,
            // The first snapshot PUT is told to come back in a second.
            "PUT" if path.contains("snapshot_") && p.fetch_add(1, SeqCst) == 0 => Fault::TooMany(1),
            // The set is moved, but the answer is lost: the retry finds it moved.
            "MOVE" if mv.fetch_add(1, SeqCst) == 0 => Fault::ForwardThenCut,
            _ => Fault::Forward,
        }
    })
    .await;
    let cfg = w.write_config_targets(
        &etcd.endpoint,
        &rclone_behind(&fault, "idle_timeout = \"1s\"\nretry_budget = \"30s\""),
    );
    let started = std::time::Instant::now();
    let r = backup_async(cfg).await;
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(1),
        "Retry-After was not honoured"
    );
    assert_eq!(puts.load(std::sync::atomic::Ordering::SeqCst), 2, "{}", r.stderr);
    assert!(
        r.stderr
            .lines()
            .any(|l| l.contains("failed; retrying") && l.contains("429 Too Many Requests")),
        "{}",
        r.stderr
    );
    assert_eq!(mkcols.load(std::sync::atomic::Ordering::SeqCst), 2, "{}", r.stderr);
    assert_eq!(moves.load(std::sync::atomic::Ordering::SeqCst), 2, "{}", r.stderr);
    let sets = sets_on(&rclone.root());
    assert_eq!(sets.len(), 1, "{:?}", entries_on(&rclone.root()));
    assert_eq!(entries_on(&rclone.root()).len(), 1, "{:?}", entries_on(&rclone.root()));
    crate::common::assert_sha256sums(&sets[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_listings_and_incomplete_sets_are_not_taken_for_sets() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let rclone = Rclone::start();
    let w = Work::new();
    let cfg = w.write_config_targets(
        &etcd.endpoint,
        &format!("[[target]]\nname = \"r\"\nurl = \"{}\"\n", rclone.url()),
    );
    let c = cfg.clone();
    let r = backup_async(c).await;
    assert_eq!(r.code, 0, "{}", r.all());
    let set = sets_on(&rclone.root()).pop().unwrap();
    // A set whose snapshot went missing (a MOVE that copied only part of it) is listed as
    // damaged, naming the file: never as a good set, never silently left out.
    let snapshot = std::fs::read_dir(&set)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_str().unwrap().contains("snapshot_"))
        .unwrap();
    let kept = std::fs::read(&snapshot).unwrap();
    std::fs::remove_file(&snapshot).unwrap();
    let c = cfg.clone();
    let r = tokio::task::spawn_blocking(move || run_env(&["list", "--config", c.to_str().unwrap()], &[]))
        .await
        .unwrap();
    assert_eq!(r.code, 0, "{}", r.all());
    let name = snapshot.file_name().unwrap().to_string_lossy().into_owned();
    let row = r
        .stdout
        .lines()
        .find(|l| l.contains("DAMAGED"))
        .unwrap_or_else(|| panic!("{}", r.all()));
    assert!(
        !row.contains("is missing"),
        "the row is marked, the note says why: {}",
        r.all()
    );
    assert!(
        r.stdout.contains(&format!(": DAMAGED: '{name}' is missing")),
        "{}",
        r.all()
    );
    let (c, to) = (cfg.clone(), w.path().join("fetched"));
    let f = tokio::task::spawn_blocking(move || {
        run_env(
            &[
                "fetch",
                "latest",
                "--to",
                to.to_str().unwrap(),
                "--config",
                c.to_str().unwrap(),
            ],
            &[],
        )
    })
    .await
    .unwrap();
    assert_eq!(f.code, 1, "{}", f.all());
    assert!(f.stderr.contains("damaged"), "{}", f.all());
    std::fs::write(&snapshot, &kept).unwrap();

    // A listing cut short is an error, not a shorter list.
    let truncated = r#"<?xml version="1.0"?><D:multistatus xmlns:D="DAV:"><D:response><D:href>/test/</D:href>"#;
    let proxy = FaultProxy::start(rclone.url(), move |_, m, _, _| {
        if m == "PROPFIND" {
            Fault::Respond(207, truncated.into())
        } else {
            Fault::Forward
        }
    })
    .await;
    let cfg = w.write_config_targets("http://127.0.0.1:1", &rclone_behind(&proxy, ""));
    let r = tokio::task::spawn_blocking(move || run_env(&["list", "--config", cfg.to_str().unwrap()], &[]))
        .await
        .unwrap();
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("not a complete <multistatus> document"),
        "{}",
        r.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_longer_than_idle_timeout_is_never_cut_while_it_moves() {
    let etcd = Etcd::start();
    etcd.fill(None, 6000, 1000);
    let rclone = Rclone::start();
    let w = Work::new();
    // The server reads 16 KiB every 20 ms (~800 KB/s): the ~6 MB snapshot takes ~8 s, longer
    // than idle_timeout, but never stops moving for that long (6 s also covers the client's
    // socket buffer draining at the end, which the client cannot see).
    let fault = FaultProxy::start(rclone.url(), |_, method, path, _| {
        if method == "PUT" && path.contains("snapshot_") {
            Fault::Slow(std::time::Duration::from_millis(20))
        } else {
            Fault::Forward
        }
    })
    .await;
    let cfg = w.write_config_targets(
        &etcd.endpoint,
        &rclone_behind(&fault, "idle_timeout = \"6s\"\nretry_budget = \"1s\""),
    );
    let started = std::time::Instant::now();
    let r = backup_async(cfg).await;
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        started.elapsed() > std::time::Duration::from_secs(6),
        "the upload was not slow: {:?}",
        started.elapsed()
    );
    assert!(!r.stderr.contains("retrying"), "{}", r.stderr);
    assert_eq!(sets_on(&rclone.root()).len(), 1);
}

/// The target abstraction's read and delete, for both kinds of target, through the library.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_a_file_and_delete_a_set_on_both_kinds_of_target() {
    use etcd_backupd::config::Settings;
    use sha2::{Digest, Sha256};
    use tokio::io::AsyncReadExt;

    let etcd = Etcd::start();
    etcd.fill(None, 200, 500);
    let rclone = Rclone::start();
    let w = Work::new();
    let targets = format!(
        "[[target]]\nname = \"local\"\nurl = \"file://{}\"\n\n[[target]]\nname = \"dav\"\nurl = \"{}\"\n",
        w.target_root().display(),
        rclone.url()
    );
    let cfg = w.write_config_targets(&etcd.endpoint, &targets);
    let c = cfg.clone();
    let r = backup_async(c).await;
    assert_eq!(r.code, 0, "{}", r.all());
    let settings = Settings::load(&cfg).unwrap();
    for t in &settings.targets {
        let target = etcd_backupd::targets::open(t, None).unwrap();
        let sets = target.list_sets(Some("test")).await.unwrap();
        assert_eq!(sets.len(), 1, "{}", t.name);
        let m = &sets[0].manifest;
        let snap = m.snapshot().unwrap();
        let mut reader = target.open_file("test", &m.id, &snap.stored_name).await.unwrap();
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes).await.unwrap();
        assert_eq!(hex::encode(Sha256::digest(&bytes)), snap.stored_sha256, "{}", t.name);
        // Names that are not plain file names are refused, not resolved.
        assert!(
            target.open_file("test", &m.id, "../manifest.json").await.is_err(),
            "{}",
            t.name
        );
        assert!(target.delete_set("test", "..").await.is_err(), "{}", t.name);
        target.delete_set("test", &m.id).await.unwrap();
        assert!(target.list_sets(Some("test")).await.unwrap().is_empty(), "{}", t.name);
    }
    assert!(sets_on(&rclone.root()).is_empty());
    assert!(w.sets().is_empty());
}
