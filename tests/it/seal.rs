//! Compressed and encrypted sets: what lands on the target opens with the standard `age` and
//! `zstd` tools to the bytes `SHA256SUMS` names, and `fetch` restores the originals.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::common::{Etcd, Work, run, static_pod_fixture};

pub(crate) fn sh(cmd: &str) -> Vec<u8> {
    let out = Command::new("bash")
        .args(["-c", cmd])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// name -> sha256 from a SHA256SUMS file.
fn sums(set: &Path) -> std::collections::BTreeMap<String, String> {
    std::fs::read_to_string(set.join("SHA256SUMS"))
        .unwrap()
        .lines()
        .map(|l| {
            let (h, n) = l.split_once("  ").unwrap();
            (n.to_string(), h.to_string())
        })
        .collect()
}

fn only_set(w: &Work) -> (PathBuf, String) {
    let sets = w.sets();
    assert_eq!(sets.len(), 1, "{sets:?}");
    let id = sets[0].file_name().unwrap().to_str().unwrap().to_string();
    (sets[0].clone(), id)
}

#[test]
fn sealed_sets_open_with_age_and_zstd_and_fetch_restores_the_originals() {
    let etcd = Etcd::start();
    etcd.fill(None, 2000, 300);
    etcd.put(None, "/kubernetes.io/secrets/default/db", "super-secret-value-1234");
    let w = Work::new();
    let k8s = w.path().join("etc-kubernetes");
    static_pod_fixture(&k8s, 5);
    let key = w.path().join("age.key");
    sh(&format!("age-keygen -o {} 2>/dev/null", key.display()));
    let recipient = String::from_utf8(sh(&format!("age-keygen -y {}", key.display()))).unwrap();
    let ssh_key = w.path().join("id_ed25519");
    sh(&format!("ssh-keygen -q -t ed25519 -N '' -f {}", ssh_key.display()));
    let ssh_pub = std::fs::read_to_string(ssh_key.with_extension("pub")).unwrap();
    let cfg = w.write_config(
        &etcd.endpoint,
        None,
        &format!(
            "\n[compression]\nzstd_level = 3\n\n[encryption]\nage_recipients = [\"{}\", \"{}\"]\n",
            recipient.trim(),
            ssh_pub.trim()
        ),
    );
    w.set_static_resources_dir(&k8s);
    let r = run(&["backup", "--no-election", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let (set, id) = only_set(&w);
    let snap = format!("snapshot_{id}.db");
    let archive = format!("static_kuberesources_{id}.tar.gz");
    let stored_snap = set.join(format!("{snap}.zst.age"));
    let stored_archive = set.join(format!("{archive}.zst.age"));
    assert!(stored_snap.is_file() && stored_archive.is_file());
    assert!(!set.join(&snap).exists());
    // The target sees ciphertext only.
    let bytes = std::fs::read(&stored_snap).unwrap();
    assert!(bytes.starts_with(b"age-encryption.org/v1\n"));
    assert!(!bytes.windows(23).any(|w| w == b"super-secret-value-1234"));
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(set.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["files"][0]["compression"], "zstd");
    assert_eq!(m["files"][0]["encryption"], "age");
    assert_eq!(m["files"][0]["stored_sha256"], hex::encode(Sha256::digest(&bytes)));

    // The standard tools open it, with either identity, to the bytes SHA256SUMS names.
    let want = sums(&set);
    for identity in [&key, &ssh_key] {
        for (stored, name) in [(&stored_snap, &snap), (&stored_archive, &archive)] {
            let plain = sh(&format!(
                "age -d -i {} {} | zstd -d -c",
                identity.display(),
                stored.display()
            ));
            assert_eq!(hex::encode(Sha256::digest(&plain)), want[name.as_str()], "{name}");
        }
    }
    let ratio = std::fs::metadata(&stored_snap).unwrap().len() as f64 / m["files"][0]["size"].as_f64().unwrap();
    assert!(ratio < 0.9, "a snapshot of repetitive values compresses: {ratio}");

    // fetch: without the identity it says what is missing; with a readable-by-all one it refuses.
    let dir = w.path().join("restore");
    let fetch = |identities: &[&Path]| {
        let mut args = vec!["fetch", id.as_str(), "--to", dir.to_str().unwrap()];
        for i in identities {
            args.extend(["--identity", i.to_str().unwrap()]);
        }
        args.extend(["--config", cfg.to_str().unwrap()]);
        run(&args)
    };
    let r = fetch(&[]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("--identity"), "{}", r.stderr);
    assert!(!dir.exists() || std::fs::read_dir(&dir).unwrap().count() == 0);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = fetch(&[&key]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("readable by group or others"), "{}", r.stderr);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = fetch(&[&key]);
    assert_eq!(r.code, 0, "{}", r.all());
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut expected = vec![snap.clone(), archive.clone()];
    expected.sort();
    assert_eq!(names, expected);
    for name in &names {
        let got = hex::encode(Sha256::digest(std::fs::read(dir.join(name)).unwrap()));
        assert_eq!(got, want[name.as_str()], "{name}");
    }
    let verify_with = |identity: &Path| {
        let (i, c) = (identity.to_str().unwrap(), cfg.to_str().unwrap());
        run(&["verify", id.as_str(), "--identity", i, "--config", c])
    };
    let r = verify_with(&ssh_key);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("etcd's snapshot trailer verified"), "{}", r.stdout);
    // The private key appears in no output and no file etcd-backupd wrote.
    let secret_key = std::fs::read_to_string(&key).unwrap();
    let secret_line = secret_key
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .unwrap()
        .to_string();
    for out in [&r.stdout, &r.stderr] {
        assert!(!out.contains(&secret_line));
    }
    for f in Work::files_under(w.path())
        .into_iter()
        .filter(|p| p.is_file() && *p != key && !p.starts_with(w.path().join("restore")))
    {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(secret_line.len()).any(|x| x == secret_line.as_bytes()),
            "{}",
            f.display()
        );
    }
    // A wrong identity is told apart from a damaged file.
    let other = w.path().join("other.key");
    sh(&format!(
        "age-keygen -o {} 2>/dev/null && chmod 600 {}",
        other.display(),
        other.display()
    ));
    let r = verify_with(&other);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("cannot decrypt"), "{}", r.stderr);
}

#[test]
fn compression_alone_opens_with_zstd() {
    let etcd = Etcd::start();
    etcd.fill(None, 500, 300);
    let w = Work::new();
    let cfg = w.write_config(&etcd.endpoint, None, "\n[compression]\nzstd_level = 3\n");
    let r = run(&["backup", "--no-election", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let (set, id) = only_set(&w);
    let stored = set.join(format!("snapshot_{id}.db.zst"));
    let plain = sh(&format!("zstd -d -c {}", stored.display()));
    assert_eq!(
        hex::encode(Sha256::digest(&plain)),
        sums(&set)[&format!("snapshot_{id}.db")]
    );
    let dir = w.path().join("restore");
    let r = run(&[
        "fetch",
        "latest",
        "--to",
        dir.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(std::fs::read(dir.join(format!("snapshot_{id}.db"))).unwrap(), plain);
    // One flipped byte of the compressed file is caught.
    let mut bytes = std::fs::read(&stored).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&stored, &bytes).unwrap();
    let r = run(&["verify", &id, "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains(&format!("'snapshot_{id}.db.zst'")) && r.stderr.to_lowercase().contains("corrupt"),
        "{}",
        r.stderr
    );
}

/// Split custody: the snapshot on one target sealed to one key, the static resources archive
/// (etcd's encryption keys) on another sealed to another key. Each target holds its half
/// and lists the set as intact; neither key opens the other half; `fetch` takes both
/// identities and lays the whole set out in one command; `verify --deep` drills it; prune
/// keeps both halves.
#[test]
fn the_archive_kept_apart_from_the_snapshot_restores_in_one_command() {
    let etcd = Etcd::start();
    etcd.fill(None, 500, 300);
    let w = Work::new();
    let k8s = w.path().join("etc-kubernetes");
    static_pod_fixture(&k8s, 5);
    let keygen = |name: &str| {
        let key = w.path().join(name);
        sh(&format!("age-keygen -o {} 2>/dev/null", key.display()));
        let recipient = String::from_utf8(sh(&format!("age-keygen -y {}", key.display()))).unwrap();
        (key, recipient.trim().to_string())
    };
    let (snap_key, snap_recipient) = keygen("snapshot.key");
    let (keys_key, keys_recipient) = keygen("keys.key");
    let (store, vault) = (w.path().join("store"), w.path().join("vault"));
    std::fs::create_dir_all(&store).unwrap();
    std::fs::create_dir_all(&vault).unwrap();
    let targets = format!(
        "[[target]]\nname = \"store\"\nurl = \"file://{}\"\nfiles = [\"snapshot\"]\n\n[[target]]\nname = \"vault\"\nurl = \"file://{}\"\nfiles = [\"resources\"]\n\n[encryption]\nage_recipients = [\"{snap_recipient}\"]\nresources_recipients = [\"{keys_recipient}\"]\n",
        store.display(),
        vault.display()
    );
    let cfg = w.write_config_targets(&etcd.endpoint, &targets);
    w.set_static_resources_dir(&k8s);
    let c = cfg.to_str().unwrap();
    let r = run(&["backup", "--no-election", "--config", c]);
    assert_eq!(r.code, 0, "{}", r.all());
    let id = std::fs::read_dir(store.join("test"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| !n.starts_with('.'))
        .expect("a set on store");
    let names = |root: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(root.join("test").join(&id))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let (snap, archive) = (
        format!("snapshot_{id}.db.age"),
        format!("static_kuberesources_{id}.tar.gz.age"),
    );
    assert_eq!(names(&store), ["SHA256SUMS", "manifest.json", snap.as_str()]);
    assert_eq!(names(&vault), ["SHA256SUMS", "manifest.json", archive.as_str()]);
    // The manifest, the same on both, says which target holds which file.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("test").join(&id).join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        m["format_version"], 2,
        "a release before split custody skips it as newer"
    );
    let holders: Vec<(String, serde_json::Value)> = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["name"].as_str().unwrap().to_string(), f["targets"].clone()))
        .collect();
    assert_eq!(
        holders,
        [
            (format!("snapshot_{id}.db"), serde_json::json!(["store"])),
            (
                format!("static_kuberesources_{id}.tar.gz"),
                serde_json::json!(["vault"])
            ),
        ]
    );
    // Whoever holds the snapshot's key cannot open the archive, and the other way round.
    let archive_path = vault.join("test").join(&id).join(&archive);
    let snap_path = store.join("test").join(&id).join(&snap);
    let opens = |key: &Path, file: &Path| {
        Command::new("age")
            .args(["-d", "-i"])
            .arg(key)
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(!opens(&snap_key, &archive_path) && opens(&keys_key, &archive_path));
    assert!(!opens(&keys_key, &snap_path) && opens(&snap_key, &snap_path));

    // list: intact on both (a half held on purpose is not damage).
    let r = run(&["list", "--all-targets", "--config", c]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(!r.all().contains("damaged"), "{}", r.all());
    assert!(
        r.stdout.contains(&format!(
            "{id} on 'vault': holds static_kuberesources_{id}.tar.gz; snapshot_{id}.db on store"
        )),
        "{}",
        r.stdout
    );

    // fetch from either target, both identities: the whole set, one command.
    let (sk, kk) = (snap_key.to_str().unwrap(), keys_key.to_str().unwrap());
    // A command with these `--identity` keys and the configuration.
    let keyed = |args: &[&str], keys: &[&str]| {
        let mut all = args.to_vec();
        for k in keys {
            all.extend(["--identity", k]);
        }
        all.extend(["--config", c]);
        run(&all)
    };
    for from in ["store", "vault"] {
        let dir = w.path().join(format!("restore-{from}"));
        let d = dir.to_str().unwrap();
        let r = keyed(&["fetch", "latest", "--target", from, "--to", d], &[sk, kk]);
        assert_eq!(r.code, 0, "{}", r.all());
        let mut got: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        got.sort();
        assert_eq!(
            got,
            [format!("snapshot_{id}.db"), format!("static_kuberesources_{id}.tar.gz")]
        );
    }
    // One key alone does not open the set.
    let dir = w.path().join("restore-one-key");
    let r = keyed(&["fetch", "latest", "--to", dir.to_str().unwrap()], &[sk]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("static_kuberesources") && r.stderr.contains("cannot decrypt"),
        "{}",
        r.stderr
    );
    assert!(!dir.exists() || std::fs::read_dir(&dir).unwrap().count() == 0);

    // The drill, and retention: both halves stay.
    let r = keyed(&["verify", "latest", "--deep"], &[sk, kk]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("restore drill"), "{}", r.stdout);
    let r = run(&["prune", "--config", c]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(names(&vault).len(), 3);
    assert_eq!(names(&store).len(), 3);
    // A split set whose other half is gone is not restorable: named as such, not fetched.
    std::fs::remove_dir_all(vault.join("test").join(&id)).unwrap();
    let dir = w.path().join("restore-half");
    let d = dir.to_str().unwrap();
    let r = keyed(&["fetch", "latest", "--target", "store", "--to", d], &[sk, kk]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("is not intact on vault"), "{}", r.stderr);
    assert!(!dir.exists() || std::fs::read_dir(&dir).unwrap().count() == 0);
    // One half alone cannot be asked for: the other would be stored nowhere.
    let r = run(&["backup", "--no-election", "--target", "vault", "--config", c]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("--target \"vault\" does not hold \"snapshot\""),
        "{}",
        r.stderr
    );
}
