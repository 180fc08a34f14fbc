//! What gets shipped to a node: the systemd units (checked with `systemd-analyze verify`)
//! and the MachineConfig `render machineconfig` prints (parsed as YAML by Python, its
//! Ignition config checked with Debian's `ignition-validate`, its contents compared with the
//! repository's files byte for byte).

use std::path::Path;
use std::process::Command;

use crate::common::{Run, Work, run};

fn repo(p: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// YAML text (one document) to a JSON value, with a YAML parser that is not ours.
fn parse_yaml(text: &str) -> serde_json::Value {
    let mut docs = crate::monitoring::parse_yaml_docs(text);
    assert_eq!(docs.len(), 1, "not one YAML document:\n{text}");
    docs.remove(0)
}

fn ignition_validate(config: &serde_json::Value) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.ign");
    std::fs::write(&path, serde_json::to_vec(config).unwrap()).unwrap();
    let out = Command::new("ignition-validate")
        .arg(&path)
        .output()
        .expect("ignition-validate (Debian package ignition)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && text.trim().is_empty(), text)
}

fn decode(source: &str) -> Vec<u8> {
    use base64::Engine;
    let b64 = source.strip_prefix("data:;base64,").expect("a base64 data URL");
    base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
}

/// `render machineconfig --config cfg` with `extra` arguments after it.
fn render(cfg: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["render", "machineconfig", "--config", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args)
}

fn files_of(config: &serde_json::Value) -> Vec<(String, u64, Vec<u8>)> {
    config["storage"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                f["mode"].as_u64().unwrap(),
                decode(f["contents"]["source"].as_str().unwrap()),
            )
        })
        .collect()
}

#[test]
fn shipped_units_pass_systemd_analyze_verify() {
    let out = Command::new("bash")
        .arg(repo("scripts/check-unit.sh"))
        .arg(env!("CARGO_BIN_EXE_etcd-backupd"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_rendered_machineconfig_carries_the_repository_files_and_validates() {
    let cfg = repo("examples/openshift/config.toml");
    let image = "registry.example.com/etcd/etcd-backupd@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let r = render(&cfg, &["--image", image]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.len() < 100 * 1024, "{} bytes", r.stdout.len());
    // The secret it names is left out, and the operator is told.
    assert!(r.stderr.contains("/etc/etcd-backupd/offsite.password"), "{}", r.stderr);
    let mc = parse_yaml(&r.stdout);
    assert_eq!(mc["apiVersion"], "machineconfiguration.openshift.io/v1");
    assert_eq!(mc["kind"], "MachineConfig");
    assert_eq!(mc["metadata"]["name"], "99-master-etcd-backupd");
    assert_eq!(
        mc["metadata"]["labels"]["machineconfiguration.openshift.io/role"],
        "master"
    );
    let config = &mc["spec"]["config"];
    assert_eq!(config["ignition"]["version"], "3.2.0");
    let (ok, text) = ignition_validate(config);
    assert!(ok, "{text}");

    let units = config["systemd"]["units"].as_array().unwrap();
    let unit = |name: &str| {
        units
            .iter()
            .find(|u| u["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    for (name, path) in [
        ("etcd-backupd.service", "systemd/etcd-backupd.service"),
        ("etcd-backupd-install.service", "packaging/etcd-backupd-install.service"),
    ] {
        assert_eq!(
            unit(name)["contents"].as_str().unwrap(),
            std::fs::read_to_string(repo(path)).unwrap()
        );
        assert_eq!(unit(name)["enabled"], true);
    }
    let files = files_of(config);
    let want = [
        ("/etc/etcd-backupd/config.toml", 0o600, std::fs::read(&cfg).unwrap()),
        (
            "/etc/etcd-backupd/config.d/10-nfs.toml",
            0o600,
            std::fs::read(repo("examples/openshift/config.d/10-nfs.toml")).unwrap(),
        ),
        ("/etc/etcd-backupd/image", 0o644, format!("{image}\n").into_bytes()),
    ];
    assert_eq!(
        files.len(),
        want.len(),
        "{:?}",
        files.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    for ((path, mode, bytes), (wpath, wmode, wbytes)) in files.iter().zip(want.iter()) {
        assert_eq!(path, wpath);
        assert_eq!(*mode, *wmode as u64, "{path}");
        assert_eq!(bytes, wbytes, "{path}");
    }

    // Every Ignition version Debian's validator knows is accepted; an unknown one is refused.
    for v in ["3.1.0", "3.3.0"] {
        let r = render(&cfg, &["--ignition-version", v]);
        assert_eq!(r.code, 0, "{}", r.all());
        let mc = parse_yaml(&r.stdout);
        assert_eq!(mc["spec"]["config"]["ignition"]["version"], v);
        let (ok, text) = ignition_validate(&mc["spec"]["config"]);
        assert!(ok, "{v}: {text}");
    }
    let r = render(&cfg, &["--ignition-version", "9.9.9"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("--ignition-version 9.9.9"), "{}", r.stderr);
}

#[test]
fn secrets_ride_along_only_when_asked() {
    let w = Work::new();
    let secret = w.path().join("offsite.password");
    std::fs::write(&secret, "s3cr3t-dav-password\n").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cfg = w.write_config(
        "https://localhost:2379",
        None,
        &format!(
            "\n[[target]]\nname = \"dav\"\nurl = \"https://dav.example.com/etcd/\"\nusername = \"backup\"\npassword_file = \"{}\"\n",
            secret.display()
        ),
    );
    let r = render(&cfg, &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    let files = files_of(&parse_yaml(&r.stdout)["spec"]["config"]);
    assert!(files.iter().all(|(p, _, _)| Path::new(p) != secret), "{files:?}");
    assert!(!r.stdout.contains("s3cr3t") && !r.stderr.contains("s3cr3t"));
    // The contents are base64, where the text would not show: look inside each file.
    assert!(!files.is_empty());
    for (path, _, bytes) in &files {
        assert!(!bytes.windows(6).any(|w| w == b"s3cr3t"), "{path} carries the secret");
    }
    assert!(r.stderr.contains("no --image"), "{}", r.stderr);

    let r = render(&cfg, &["--include-secrets"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stderr.contains("readable by every cluster admin"), "{}", r.stderr);
    let mc = parse_yaml(&r.stdout);
    let files = files_of(&mc["spec"]["config"]);
    let (_, mode, bytes) = files.iter().find(|(p, _, _)| Path::new(p) == secret).unwrap();
    assert_eq!(*mode, 0o600);
    assert_eq!(bytes, b"s3cr3t-dav-password\n");
    let (ok, text) = ignition_validate(&mc["spec"]["config"]);
    assert!(ok, "{text}");
}

#[test]
fn render_role_targets_the_arbiter_pool_and_validates() {
    let cfg = repo("examples/openshift/config.toml");
    for (role, name) in [
        (None, "99-master-etcd-backupd"),
        (Some("master"), "99-master-etcd-backupd"),
        (Some("arbiter"), "99-arbiter-etcd-backupd"),
    ] {
        let role_args: Vec<&str> = role.map_or(Vec::new(), |r| vec!["--role", r]);
        let r = render(&cfg, &role_args);
        assert_eq!(r.code, 0, "{}", r.all());
        let mc = parse_yaml(&r.stdout);
        assert_eq!(mc["metadata"]["name"], name);
        assert_eq!(
            mc["metadata"]["labels"]["machineconfiguration.openshift.io/role"],
            role.unwrap_or("master")
        );
        let (ok, text) = ignition_validate(&mc["spec"]["config"]);
        assert!(ok, "{role:?}: {text}");
    }
    // --name still wins over the role's default.
    let r = render(&cfg, &["--role", "arbiter", "--name", "50-arbiter-backups"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(parse_yaml(&r.stdout)["metadata"]["name"], "50-arbiter-backups");
    // Workers run no etcd member: not a role it renders for.
    let r = render(&cfg, &["--role", "worker"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("worker"), "{}", r.stderr);
}
