//! Trust in what is restored (issue 16): signed sets checked by OpenSSH's own `ssh-keygen`,
//! forged, unsigned and foreign-signed sets refused by `fetch` and `verify`, and the
//! "restorable until" date read from the certificates of a real backup's static resources.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::common::{Etcd, Run, Work, run, static_pod_fixture};

fn cli(args: &[&str], cfg: &Path) -> Run {
    let mut all = args.to_vec();
    all.extend(["--config", cfg.to_str().unwrap()]);
    run(&all)
}

fn backup(cfg: &Path) -> String {
    let r = cli(&["backup", "--no-election"], cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    r.stdout
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("backup "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no set id in {}", r.stdout))
        .to_string()
}

/// Files (not directories) under `dir`, which must exist.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    Work::files_under(dir).into_iter().filter(|p| p.is_file()).collect()
}

/// The manifest of the set in `set`.
fn manifest_of(set: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(set.join("manifest.json")).unwrap()).unwrap()
}

/// The manifest `m` gives `at` as the time its set is restorable until.
fn assert_restorable_until(m: &serde_json::Value, at: chrono::DateTime<chrono::Utc>) {
    assert_eq!(
        m["restorable_until"],
        at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        "{m}"
    );
}

/// The metrics textfile gives `at` as the time the newest set is restorable until.
fn assert_restorable_until_metric(textfile: &Path, at: chrono::DateTime<chrono::Utc>) {
    let metrics = std::fs::read_to_string(textfile).unwrap();
    assert!(
        metrics.contains(&format!(
            "etcd_backupd_newest_set_restorable_until_timestamp_seconds {}",
            at.timestamp()
        )),
        "{metrics}"
    );
}

/// Writes `allowed_signers` in `w` with the line for the node's key that `status` shows, and
/// returns its path.
fn allow_the_key_status_shows(w: &Work, cfg: &Path) -> PathBuf {
    let st = cli(&["status"], cfg);
    let line = st
        .stdout
        .lines()
        .find(|l| l.trim().starts_with("etcd-backupd ssh-ed25519 "))
        .unwrap_or_else(|| panic!("{}", st.stdout));
    let allowed = w.path().join("allowed_signers");
    std::fs::write(&allowed, format!("{}\n", line.trim())).unwrap();
    allowed
}

/// A configuration in `w` (for an etcd nothing listens for) with `extra`, then
/// `signing.key_file` naming `key`.
fn key_file_config(w: &Work, key: &Path, extra: &str) -> PathBuf {
    w.write_config(
        "http://127.0.0.1:1",
        None,
        &format!("{extra}\n[signing]\nkey_file = \"{}\"\n", key.display()),
    )
}

/// `ssh-keygen -Y verify` (the real OpenSSH) of `set`'s manifest against `allowed`.
fn ssh_keygen_verify(allowed: &Path, set: &Path) -> (bool, String) {
    let out = Command::new("ssh-keygen")
        .args(["-Y", "verify", "-f"])
        .arg(allowed)
        .args(["-I", "etcd-backupd", "-n", "etcd-backupd", "-s"])
        .arg(set.join("manifest.json.sig"))
        .stdin(std::fs::File::open(set.join("manifest.json")).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("ssh-keygen (Debian package openssh-client)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Rewrites `set` consistently, as someone with write access to the target could: one byte of
/// the snapshot changed, etcd's SHA-256 trailer, SHA256SUMS and the manifest's hashes made to
/// match. Keeps or drops the signature.
fn forge(set: &Path, keep_signature: bool) {
    let mut m = manifest_of(set);
    let files = m["files"].as_array_mut().unwrap();
    let f = files
        .iter_mut()
        .find(|f| f["name"].as_str().unwrap().starts_with("snapshot_"))
        .unwrap();
    assert_eq!(f["encryption"], "none");
    assert_eq!(f["compression"], "none");
    let path = set.join(f["stored_name"].as_str().unwrap());
    let mut bytes = std::fs::read(&path).unwrap();
    let body = bytes.len() - 32;
    bytes[body / 2] ^= 0x5a;
    let trailer = Sha256::digest(&bytes[..body]);
    bytes[body..].copy_from_slice(&trailer);
    let sha = hex::encode(Sha256::digest(&bytes));
    std::fs::write(&path, &bytes).unwrap();
    f["sha256"] = sha.clone().into();
    f["stored_sha256"] = sha.into();
    let sums: String = files
        .iter()
        .map(|f| format!("{}  {}\n", f["sha256"].as_str().unwrap(), f["name"].as_str().unwrap()))
        .collect();
    std::fs::write(set.join("SHA256SUMS"), sums).unwrap();
    let mut text = serde_json::to_string_pretty(&m).unwrap();
    text.push('\n');
    std::fs::write(set.join("manifest.json"), text).unwrap();
    if !keep_signature {
        std::fs::remove_file(set.join("manifest.json.sig")).unwrap();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// `fetch` and `verify` of `id` are both refused (exit 1) with `why` in the message, and the
/// fetch directory holds nothing afterwards.
fn assert_refused(cfg: &Path, id: &str, fetch_dir: &Path, why: &[&str]) {
    let to = fetch_dir.to_str().unwrap();
    for args in [vec!["fetch", id, "--to", to], vec!["verify", id]] {
        let r = cli(&args, cfg);
        assert_eq!(r.code, 1, "{args:?}: {}", r.all());
        for w in why {
            assert!(r.stderr.contains(w), "{args:?}: no {w:?} in {}", r.stderr);
        }
        assert!(
            !fetch_dir.exists() || files_in(fetch_dir).is_empty(),
            "{args:?} left {:?}",
            files_in(fetch_dir)
        );
    }
}

#[test]
fn signed_sets_verify_with_openssh_and_forged_unsigned_or_foreign_sets_are_refused() {
    let etcd = Etcd::start();
    etcd.fill(None, 200, 100);
    let w = Work::new();
    let allowed = w.path().join("allowed_signers");
    let fetch_dir = w.path().join("restore");
    let config = |extra: &str| w.write_config(&etcd.endpoint, None, extra);

    // Signing with the default key place: created 0600 in the staging directory by the first
    // start, and shown by `status` as the line for allowed_signers.
    let cfg = config("\n[signing]\nenabled = true\n");
    let key = w.staging().join("signing.key");
    assert!(!key.exists());
    let signed = backup(&cfg);
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let public = Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(&key)
        .output()
        .unwrap();
    assert!(public.status.success(), "{}", String::from_utf8_lossy(&public.stderr));
    let public = String::from_utf8(public.stdout).unwrap();
    let public = public.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    let line = format!("etcd-backupd {public} node-a");
    let st = cli(&["status"], &cfg);
    // Not OK (no daemon runs here), but the signing line is there whatever the verdict.
    assert!(matches!(st.code, 0 | 1 | 4), "{}", st.all());
    assert!(
        st.stdout.lines().any(|l| l.trim() == line),
        "no {line:?} in {}",
        st.stdout
    );
    std::fs::write(&allowed, format!("{line}\n")).unwrap();

    // The set on the target carries manifest.json.sig, which OpenSSH verifies; and which it
    // refuses for a manifest changed by one byte.
    let set = w.target_root().join("test").join(&signed);
    let (ok, text) = ssh_keygen_verify(&allowed, &set);
    assert!(ok, "ssh-keygen -Y verify: {text}");
    assert!(
        text.contains("Good \"etcd-backupd\" signature for etcd-backupd"),
        "{text}"
    );
    let scratch = w.path().join("scratch");
    copy_dir(&set, &scratch);
    let mut json = std::fs::read(scratch.join("manifest.json")).unwrap();
    let at = json.len() - 3;
    json[at] = b' ';
    std::fs::write(scratch.join("manifest.json"), json).unwrap();
    assert!(!ssh_keygen_verify(&allowed, &scratch).0);

    // A set without signing, and one signed by another node's key, which allowed_signers
    // does not list.
    let unsigned = backup(&config(""));
    let other_key = w.path().join("keys/other.key");
    let foreign = backup(&config(&format!(
        "\n[signing]\nkey_file = \"{}\"\n",
        other_key.display()
    )));
    assert!(other_key.is_file());
    assert!(
        !w.target_root()
            .join("test")
            .join(&unsigned)
            .join("manifest.json.sig")
            .exists()
    );

    let cfg = config(&format!("\n[verify]\nallowed_signers = \"{}\"\n", allowed.display()));
    // check-config and list say what is signed by which key.
    let fp = {
        let out = Command::new("ssh-keygen")
            .args(["-l", "-f"])
            .arg(&key)
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    let r = cli(&["check-config"], &cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("signed by one of the 1 key(s)"), "{}", r.stdout);
    let r = cli(&["list", "--wide"], &cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    let row = |id: &str| r.stdout.lines().find(|l| l.contains(id)).unwrap().to_string();
    assert!(row(&signed).contains(&format!("{fp} (listed)")), "{}", r.stdout);
    assert!(row(&unsigned).contains("unsigned"), "{}", r.stdout);
    assert!(row(&foreign).contains("(UNLISTED)"), "{}", r.stdout);

    // The signed set passes fetch and verify, saying by which key.
    let r = cli(&["fetch", &signed, "--to", fetch_dir.to_str().unwrap()], &cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout.contains(&format!("signature: signed by {fp}, listed")),
        "{}",
        r.stdout
    );
    std::fs::remove_dir_all(&fetch_dir).unwrap();
    let r = cli(&["verify", &signed], &cfg);
    assert_eq!(r.code, 0, "{}", r.all());

    // Unsigned, and signed by an unlisted key: refused, naming the signature.
    assert_refused(
        &cfg,
        &unsigned,
        &fetch_dir,
        &["unsigned", "manifest.json.sig", "--allow-unsigned"],
    );
    assert_refused(
        &cfg,
        &foreign,
        &fetch_dir,
        &["manifest.json.sig is by key", "does not list"],
    );
    // --allow-unsigned takes the unsigned one.
    let r = cli(
        &[
            "fetch",
            &unsigned,
            "--allow-unsigned",
            "--to",
            fetch_dir.to_str().unwrap(),
        ],
        &cfg,
    );
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(files_in(&fetch_dir).len(), 1, "{:?}", files_in(&fetch_dir));
    std::fs::remove_dir_all(&fetch_dir).unwrap();

    // The signed set rewritten consistently, its signature kept: the signature no longer
    // verifies.
    let original = w.path().join("original");
    copy_dir(&set, &original);
    forge(&set, true);
    assert_refused(
        &cfg,
        &signed,
        &fetch_dir,
        &["signature is invalid", "manifest.json.sig", "does not verify"],
    );
    assert!(!ssh_keygen_verify(&allowed, &set).0);
    // ... and without one: then it is unsigned.
    forge(&set, false);
    assert_refused(&cfg, &signed, &fetch_dir, &["unsigned", "manifest.json.sig"]);
    // The forgery is consistent: where no signature is required, it is fetched as genuine.
    let lax = config("");
    let r = cli(&["fetch", &signed, "--to", fetch_dir.to_str().unwrap()], &lax);
    assert_eq!(r.code, 0, "the forgery is not consistent: {}", r.all());
    std::fs::remove_dir_all(&fetch_dir).unwrap();
    std::fs::remove_dir_all(&set).unwrap();
    copy_dir(&original, &set);
    // (One config file: it requires the signature again.)
    let cfg = config(&format!("\n[verify]\nallowed_signers = \"{}\"\n", allowed.display()));
    let r = cli(&["verify", &signed], &cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains(", listed in allowed_signers"), "{}", r.stdout);

    // The genuine signed set moved into another cluster's folder is not that cluster's.
    copy_dir(&set, &w.target_root().join("other").join(&signed));
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("cluster_name = \"test\"", "cluster_name = \"other\"");
    std::fs::write(&cfg, text).unwrap();
    assert_refused(
        &cfg,
        &signed,
        &fetch_dir,
        &["names cluster 'test'", "folder of cluster 'other'"],
    );
}

/// Midnight (UTC) of today moved by `days`, and that date for rcgen.
type Ymd = (i32, u8, u8);

fn day(days: i64) -> (chrono::DateTime<chrono::Utc>, Ymd) {
    use chrono::Datelike;
    let d = (chrono::Utc::now() + chrono::TimeDelta::days(days)).date_naive();
    let at = d.and_hms_opt(0, 0, 0).unwrap().and_utc();
    (at, (d.year(), d.month() as u8, d.day() as u8))
}

fn cert_pem(ca: bool, (y, m, d): Ymd) -> String {
    let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(y, m, d);
    if ca {
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    p.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem()
}

/// Puts a leaf certificate expiring at `leaf` into the running kube-apiserver revision's
/// serving-cert, and into etcd's a CA bundle whose CA expired before it (which must not count);
/// with `older`, an older leaf into the revision before, which the native method does not
/// archive.
fn certificates(k8s: &Path, rev: u32, leaf: Ymd, older: bool) {
    let (_, ca_day) = day(-30);
    let api = k8s.join(format!(
        "static-pod-resources/kube-apiserver-pod-{rev}/secrets/serving-cert"
    ));
    std::fs::write(api.join("tls.crt"), cert_pem(false, leaf)).unwrap();
    let etcd = k8s.join(format!("static-pod-resources/etcd-pod-{rev}/secrets/etcd-all-certs"));
    std::fs::create_dir_all(&etcd).unwrap();
    std::fs::write(etcd.join("ca-bundle.crt"), cert_pem(true, ca_day)).unwrap();
    if !older {
        return;
    }
    // Not archived (not the running revision): never read.
    let old = k8s.join(format!(
        "static-pod-resources/kube-apiserver-pod-{}/secrets/serving-cert",
        rev - 1
    ));
    std::fs::write(old.join("tls.crt"), cert_pem(false, ca_day)).unwrap();
}

#[test]
fn an_archive_with_an_expired_leaf_certificate_is_marked_by_list_and_refused_by_fetch() {
    let etcd = Etcd::start();
    etcd.fill(None, 100, 100);
    let w = Work::new();
    let k8s = w.path().join("etc-kubernetes");
    static_pod_fixture(&k8s, 3);
    let (expired_at, expired_day) = day(-2);
    certificates(&k8s, 3, expired_day, true);
    let textfile = w.path().join("metrics.prom");
    let cfg = w.write_config(
        &etcd.endpoint,
        None,
        &format!("\n[metrics]\ntextfile = \"{}\"\n", textfile.display()),
    );
    w.set_static_resources_dir(&k8s);
    let expired = backup(&cfg);

    // The manifest records the leaf's notAfter and its file, not the CA's earlier one.
    let m = manifest_of(&w.target_root().join("test").join(&expired));
    let source = "static-pod-resources/kube-apiserver-pod-3/secrets/serving-cert/tls.crt";
    assert_restorable_until(&m, expired_at);
    assert_eq!(m["restorable_until_source"], source, "{m}");
    assert_eq!(m["static_pod_revisions"]["kube-apiserver"], 3, "{m}");
    assert_eq!(m["format_version"], 1);

    let date = expired_at.format("%Y-%m-%d").to_string();
    let r = cli(&["list", "--wide"], &cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    let row = r.stdout.lines().find(|l| l.contains(&expired)).unwrap();
    assert!(row.contains(&format!("{date}(EXPIRED)")), "{}", r.stdout);
    // The default table marks it, and says why below.
    let r = cli(&["list"], &cfg);
    let row = r.stdout.lines().find(|l| l.contains(&expired)).unwrap();
    assert!(row.contains("CERTS-EXPIRED"), "{}", r.stdout);
    assert!(
        r.stdout.contains(&format!("{expired}: certificates EXPIRED on {date}")),
        "{}",
        r.stdout
    );
    let st = cli(&["status"], &cfg);
    assert!(
        st.stdout.contains(&format!(
            "newest set  {expired}: certificates EXPIRED on {date} 00:00:00 UTC ("
        )) && st.stdout.contains(&format!(" ago) ({source})")),
        "{}",
        st.stdout
    );
    assert_restorable_until_metric(&textfile, expired_at);

    let fetch_dir = w.path().join("restore");
    let to = fetch_dir.to_str().unwrap();
    let r = cli(&["fetch", &expired, "--to", to], &cfg);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr
            .contains(&format!("its certificates expired on {date} 00:00 UTC ({source})")),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("--allow-expired-certificates"), "{}", r.stderr);
    assert!(!fetch_dir.exists() || files_in(&fetch_dir).is_empty());
    let r = cli(&["fetch", &expired, "--allow-expired-certificates", "--to", to], &cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout.contains(&format!("certificates: EXPIRED on {date}")),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(
            "static pods etcd-pod-3, kube-apiserver-pod-3, kube-controller-manager-pod-3, kube-scheduler-pod-3"
        ),
        "{}",
        r.stdout
    );
    assert_eq!(files_in(&fetch_dir).len(), 2);
    std::fs::remove_dir_all(&fetch_dir).unwrap();

    // Certificates that expire in under 7 days: fetched, with a warning.
    let (soon_at, soon_day) = day(3);
    certificates(&k8s, 3, soon_day, true);
    let soon = backup(&cfg);
    let r = cli(&["fetch", &soon, "--to", to], &cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    let soon_date = soon_at.format("%Y-%m-%d").to_string();
    assert!(
        r.stderr
            .contains(&format!("its certificates expire on {soon_date} 00:00 UTC ({source})")),
        "{}",
        r.stderr
    );
    assert_restorable_until_metric(&textfile, soon_at);
    std::fs::remove_dir_all(&fetch_dir).unwrap();

    // A set without an archive records none, and is never refused for it.
    let plain = w.write_config(&etcd.endpoint, None, "");
    let none = backup(&plain);
    let m = manifest_of(&w.target_root().join("test").join(&none));
    assert!(
        m.get("restorable_until").is_none() && m.get("restorable_until_source").is_none(),
        "{m}"
    );
    let r = cli(&["fetch", &none, "--to", to], &plain);
    assert_eq!(r.code, 0, "{}", r.all());
}

/// The script method reads the platform's archive too, and signs its sets.
#[test]
fn script_sets_record_restorable_until_and_are_signed() {
    let w = Work::new();
    let host = crate::common::ScriptHost::start(&w, 5);
    host.etcd.fill(Some(&host.pki), 50, 100);
    let (at, leaf) = day(40);
    // The script archives the running revisions: their certificates count.
    certificates(&host.k8s, 5, leaf, false);
    let cfg = host.config(
        &w,
        &crate::common::standin_script(),
        "",
        "\n[signing]\nenabled = true\n",
    );
    let env = host.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = crate::common::run_env(&["backup", "--no-election", "--config", cfg.to_str().unwrap()], &env);
    assert_eq!(r.code, 0, "{}", r.all());
    let set = w.sets().pop().unwrap();
    let m = manifest_of(&set);
    assert_restorable_until(&m, at);
    assert_eq!(
        m["restorable_until_source"], "static-pod-resources/kube-apiserver-pod-5/secrets/serving-cert/tls.crt",
        "{m}"
    );
    let allowed = allow_the_key_status_shows(&w, &cfg);
    let (ok, text) = ssh_keygen_verify(&allowed, &set);
    assert!(ok, "{text}");
}

/// `render --include-secrets` never carries the node's private signing key.
#[test]
fn render_never_embeds_the_signing_key() {
    let w = Work::new();
    let key = w.path().join("node.key");
    let cfg = key_file_config(&w, &key, "");
    // A key as the node would have it, and a secret file that is embedded.
    etcd_backupd::trust::signing::Signer::load_or_create(&key, "node-a").unwrap();
    let r = cli(
        &[
            "render",
            "machineconfig",
            "--include-secrets",
            "--image",
            "quay.io/x/y:1",
        ],
        &cfg,
    );
    assert_eq!(r.code, 0, "{}", r.all());
    use base64::Engine;
    let embedded: Vec<String> = r
        .stdout
        .split("data:;base64,")
        .skip(1)
        .map(|rest| {
            let b64: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '='))
                .collect();
            String::from_utf8_lossy(&base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).into_owned()
        })
        .collect();
    assert!(
        embedded.iter().any(|f| f.contains("[signing]")),
        "the config is embedded: {embedded:?}"
    );
    assert!(!embedded.iter().any(|f| f.contains("PRIVATE KEY")), "{embedded:?}");
    assert!(!r.stdout.contains(&format!("path: {}", key.display())), "{}", r.stdout);
    assert!(r.stderr.contains("signing.key_file"), "{}", r.stderr);
}

/// On a WebDAV target (Apache mod_dav over HTTPS) the signature goes up with the set, and
/// the manifest lands byte for byte as it was signed: OpenSSH verifies it where it landed,
/// and `fetch` from the server takes the set only as signed by the listed key; a set
/// stored unsigned there is refused.
#[test]
fn sets_on_webdav_carry_their_signature() {
    use crate::servers::Apache;
    use crate::webdav::{apache_target, sets_on};
    let etcd = Etcd::start();
    etcd.fill(None, 100, 100);
    let apache = Apache::start();
    let w = Work::new();
    let target = apache_target(&apache, &w, "");
    let config = |extra: &str| w.write_config_targets(&etcd.endpoint, &format!("{target}{extra}"));
    let cfg = config("\n[signing]\nenabled = true\n");
    let r = cli(&["backup", "--no-election"], &cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    let allowed = allow_the_key_status_shows(&w, &cfg);
    let set = sets_on(&apache.root()).pop().unwrap();
    let signed = set.file_name().unwrap().to_str().unwrap().to_string();
    let (ok, text) = ssh_keygen_verify(&allowed, &set);
    assert!(ok, "ssh-keygen -Y verify on the server's copy: {text}");

    // One more set, unsigned.
    let r = cli(&["backup", "--no-election"], &config(""));
    assert_eq!(r.code, 0, "{}", r.all());
    let unsigned = sets_on(&apache.root())
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .find(|id| *id != signed)
        .unwrap();

    let cfg = config(&format!("\n[verify]\nallowed_signers = \"{}\"\n", allowed.display()));
    let fetch_dir = w.path().join("restore");
    let to = fetch_dir.to_str().unwrap();
    let r = cli(&["fetch", &signed, "--to", to], &cfg);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains(", listed in allowed_signers"), "{}", r.stdout);
    std::fs::remove_dir_all(&fetch_dir).unwrap();
    let r = cli(&["fetch", &unsigned, "--to", to], &cfg);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("unsigned") && r.stderr.contains("manifest.json.sig"),
        "{}",
        r.stderr
    );
    assert!(!fetch_dir.exists() || files_in(&fetch_dir).is_empty());
    let r = cli(&["list", "--wide"], &cfg);
    let row = |id: &str| r.stdout.lines().find(|l| l.contains(id)).unwrap().to_string();
    assert!(
        row(&signed).contains("(listed)") && row(&unsigned).contains("unsigned"),
        "{}",
        r.stdout
    );
}

/// The daemon's first start creates the key where `signing.key_file` names it (its folder
/// too), 0600, and logs the line for allowed_signers; a later start keeps it.
#[test]
fn the_daemon_creates_the_signing_key_on_its_first_start() {
    use crate::common::Proc;
    use std::time::{Duration, Instant};
    let w = Work::new();
    let key = w.path().join("keys/node.key");
    let cfg = key_file_config(&w, &key, "\n[schedule]\ncron = \"\"\n");
    let start = |n: usize| {
        let mut d = Proc::daemon(&cfg, w.path().join(format!("daemon-{n}.log")), &[]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !d.log().contains("signing every set with this node's key") {
            assert!(Instant::now() < deadline && d.running(), "{}", d.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(d.stop(Duration::from_secs(10)), Some(0), "{}", d.log());
        d.log()
    };
    let log = start(1);
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(log.contains("created this node's signing key"), "{log}");
    let public = Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(&key)
        .output()
        .unwrap();
    let public = String::from_utf8(public.stdout).unwrap();
    let public = public.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    assert!(log.contains(&format!("etcd-backupd {public} node-a")), "{log}");
    let before = std::fs::read(&key).unwrap();
    let log = start(2);
    assert!(!log.contains("created this node's signing key"), "{log}");
    assert_eq!(std::fs::read(&key).unwrap(), before);
}

/// A platform set imported by the daemon gets the same facts and signature as its own.
#[test]
fn imported_platform_sets_record_restorable_until_and_are_signed() {
    use crate::common::Proc;
    use std::time::{Duration, Instant};
    let etcd = Etcd::start();
    etcd.fill(None, 50, 100);
    let w = Work::new();
    // The platform's set, made by the stand-in of its script on a host of its own.
    let host = crate::common::ScriptHost::start(&w, 2);
    let (at, leaf) = day(-1);
    certificates(&host.k8s, 2, leaf, false);
    let import = w.path().join("cluster-backup");
    let out = host.run_script(&import.join("upgrade-backup-a"), false, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let cfg = w.write_config(
        &etcd.endpoint,
        None,
        &format!(
            "\n[schedule]\ncron = \"0 0 3 1 1 *\"\n\n[import]\ndirs = [\"{}\"]\n\n[signing]\nenabled = true\n",
            import.display()
        ),
    );
    let mut d = Proc::daemon(&cfg, w.path().join("daemon.log"), &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while w.sets().is_empty() {
        assert!(Instant::now() < deadline && d.running(), "{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(d.stop(Duration::from_secs(10)), Some(0), "{}", d.log());
    let set = w.sets().pop().unwrap();
    let m = manifest_of(&set);
    assert_eq!(m["trigger"], "imported", "{m}");
    assert_restorable_until(&m, at);
    let allowed = allow_the_key_status_shows(&w, &cfg);
    let (ok, text) = ssh_keygen_verify(&allowed, &set);
    assert!(ok, "{text}");
    // Its certificates expired yesterday: fetch refuses it.
    let r = cli(
        &["fetch", "latest", "--to", w.path().join("restore").to_str().unwrap()],
        &cfg,
    );
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("its certificates expired on"), "{}", r.stderr);
}
