//! Remote targets against real servers: Apache mod_dav over HTTPS with Basic auth, rclone's
//! WebDAV server, tinyproxy in between, and injected faults.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{Etcd, Run, Work, run_env};
use crate::servers::{Apache, DAV_USER, Fault, FaultProxy, Rclone, Tinyproxy};

/// Runs the binary with a clean proxy environment plus `env`.
fn run_with(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut all: Vec<(&str, &str)> = [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ]
    .iter()
    .map(|k| (*k, ""))
    .collect();
    all.extend_from_slice(env);
    run_env(args, &all)
}

fn backup_env(cfg: &Path, env: &[(&str, &str)]) -> Run {
    run_with(&["backup", "--no-election", "--config", cfg.to_str().unwrap()], env)
}

fn apache_target(apache: &Apache, w: &Work, extra: &str) -> String {
    format!(
        "[[target]]\nname = \"offsite\"\nurl = \"{}\"\nusername = \"{DAV_USER}\"\npassword_file = \"{}\"\nca_file = \"{}\"\n{extra}\n",
        apache.url(),
        apache.password_file(w.path()).display(),
        apache.pki.ca.display()
    )
}

/// Complete sets (folders with a manifest) of cluster `test` under a server's root.
fn sets_on(root: &Path) -> Vec<PathBuf> {
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

fn entries_on(root: &Path) -> Vec<String> {
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
    let out = Command::new("sha256sum")
        .arg("-c")
        .arg("SHA256SUMS")
        .current_dir(dl.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    // list reads the set back through the same path.
    let r = run_with(
        &["list", "--target", "offsite", "--config", cfg.to_str().unwrap()],
        &env,
    );
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains(&id), "{}", r.stdout);

    // check-config --connect names the proxy in effect.
    let r = run_with(&["check-config", "--connect", "--config", cfg.to_str().unwrap()], &env);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout.contains(&format!("via {} (from HTTPS_PROXY)", proxy.url())),
        "{}",
        r.stdout
    );

    // A second backup in the same second would clash; a new id is taken a second later.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let r = backup_env(&cfg, &env);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(sets_on(&apache.root()).len(), 2);
}
