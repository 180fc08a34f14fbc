//! The command line and the configuration, through the real binary.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use etcd_backupd::config::Settings;

use crate::common::{Work, run};

fn write(p: &Path, text: &str) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(p, text).unwrap();
}

#[test]
fn every_example_config_parses() {
    fn tomls(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                tomls(&p, out);
            } else if p.extension().is_some_and(|x| x == "toml") {
                out.push(p);
            }
        }
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut all = Vec::new();
    tomls(&dir, &mut all);
    let mut covered = Vec::new();
    for main in all.iter().filter(|p| p.file_name().unwrap() == "config.toml") {
        // The same loader as the daemon: the main file plus the config.d/ drop-ins beside it.
        let s = Settings::load(main).unwrap_or_else(|e| panic!("{}: {e}", main.display()));
        covered.extend(s.files);
    }
    all.sort();
    covered.sort();
    assert_eq!(all, covered, "every example file is read by some example config");
    assert!(all.len() >= 3, "{all:?}");
}

#[test]
fn dropins_merge_in_lexical_order_and_errors_name_the_file() {
    let w = Work::new();
    let main = w.path().join("etc/config.toml");
    write(
        &main,
        "node_name = \"n1\"\n[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n[snapshot]\nstatic_resources_dir = \"\"\n[[target]]\nname = \"local\"\nurl = \"file:///srv/a\"\n",
    );
    write(
        &w.path().join("etc/config.d/20-b.toml"),
        "[election]\nlease_ttl = \"45s\"\n",
    );
    write(
        &w.path().join("etc/config.d/10-a.toml"),
        "[election]\nlease_ttl = \"40s\"\nprefix = \"/x\"\n",
    );
    write(&w.path().join("etc/config.d/README"), "not toml, ignored\n");
    let cfg = main.to_str().unwrap();
    // --config after the subcommand, -v before it.
    let r = run(&["-v", "check-config", "--config", cfg]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("lease_ttl = \"45s\""), "{}", r.stdout);
    assert!(r.stdout.contains("prefix = \"/x\""), "{}", r.stdout);
    assert!(r.stdout.contains("config.d/10-a.toml") && r.stdout.contains("config.d/20-b.toml"));

    write(
        &w.path().join("etc/config.d/30-target.toml"),
        "[[target]]\nname = \"remote\"\nurl = \"backups/here\"\n",
    );
    let r = run(&["--config", cfg, "check-config"]);
    assert_eq!(r.code, 2, "{}", r.all());
    let line = r.stderr.trim();
    assert!(
        line.ends_with("config.d/30-target.toml: target[0].url: relative URL without a base"),
        "{line}"
    );
    assert_eq!(line.lines().count(), 1);
}

#[test]
fn unknown_keys_and_bad_values_exit_2_with_one_line() {
    let w = Work::new();
    let cfg = w.config();
    for (text, expect) in [
        (
            "[etcd]\nendpionts = [\"http://a:1\"]\n",
            "config.toml: etcd.endpionts: unknown field `endpionts`",
        ),
        (
            "[guards]\nmin_cluster_age = \"a day\"\n",
            "config.toml: guards.min_cluster_age: invalid duration",
        ),
        (
            "[priority]\nupload_rate_limit = \"fast\"\n",
            "config.toml: priority.upload_rate_limit: invalid rate",
        ),
        (
            "[guards]\nmin_free_space = \"lots\"\n",
            "config.toml: guards.min_free_space: invalid free space",
        ),
        (
            "[snapshot]\nmethod = \"magic\"\n",
            "config.toml: snapshot.method: unknown variant `magic`",
        ),
        ("[schedule]\ncron = \"* * *\"\n", "config.toml: schedule.cron:"),
        ("[etcd\n", "config.toml: line 2:"),
    ] {
        write(
            &cfg,
            &format!("node_name = \"n\"\n{text}\n[[target]]\nurl = \"file:///srv/x\"\n"),
        );
        let r = run(&["check-config", "--config", cfg.to_str().unwrap()]);
        assert_eq!(r.code, 2, "{text}: {}", r.all());
        assert!(r.stderr.contains(expect), "{text}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    }
    let r = run(&[
        "check-config",
        "--config",
        w.path().join("missing.toml").to_str().unwrap(),
    ]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("missing.toml: no such configuration file"),
        "{}",
        r.stderr
    );
}

#[test]
fn secrets_come_from_private_files_and_are_never_printed() {
    let w = Work::new();
    let secret = "s3cr3t-Pa55w0rd-do-not-print";
    let pw = w.path().join("offsite.password");
    std::fs::write(&pw, secret).unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o640)).unwrap();
    let cfg = w.config();
    write(
        &cfg,
        &format!(
            "node_name = \"n\"\n[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n[snapshot]\nstatic_resources_dir = \"\"\n[[target]]\nname = \"offsite\"\nurl = \"https://dav.example.com/etcd/\"\nusername = \"backup\"\npassword_file = \"{}\"\n",
            pw.display()
        ),
    );
    let r = run(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("config.toml: target[0].password_file: ") && r.stderr.contains("mode 0640"),
        "{}",
        r.stderr
    );
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = run(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("password_file"), "{}", r.stdout);
    assert!(!r.all().contains(secret), "the secret leaked: {}", r.all());
}

#[test]
fn node_name_expands_in_paths() {
    let w = Work::new();
    let cfg = w.config();
    write(
        &cfg,
        "node_name = \"master-2\"\n[etcd]\nendpoints = [\"https://localhost:2379\"]\n[snapshot]\nstaging_dir = \"/var/lib/etcd-backupd/{node_name}\"\n[[target]]\nurl = \"file:///srv/x\"\n",
    );
    // Off a node the node-side files are missing: check-config says so (exit 2), as `backup`
    // would refuse, after printing the merged, expanded configuration.
    let r = run(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("etcd.ca_file") && r.stderr.contains("snapshot.static_resources_dir '/etc/kubernetes'"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stdout.contains("staging_dir = \"/var/lib/etcd-backupd/master-2\""),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("etcd-peer-master-2.crt") && r.stdout.contains("etcd-peer-master-2.key"),
        "{}",
        r.stdout
    );
}

#[test]
fn restore_commands_on_an_empty_target_and_bad_usage_say_why_in_one_line() {
    let w = Work::new();
    let cfg = w.write_config("http://127.0.0.1:1", None, "");
    // With nothing on the target, the restore commands say so in one line and fail.
    for args in [vec!["fetch", "latest", "--to", "/tmp/x"], vec!["verify", "latest"]] {
        let mut a = args.clone();
        a.extend(["--config", cfg.to_str().unwrap()]);
        let r = run(&a);
        assert_eq!(r.code, 1, "{args:?}: {}", r.all());
        assert_eq!(
            r.stderr.trim().lines().last().unwrap(),
            "error: target 'local' holds no complete backup set"
        );
    }
    for args in [vec!["frobnicate"], vec!["fetch"], vec!["backup", "--bogus"]] {
        let r = run(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.all());
        assert_eq!(r.stderr.trim().lines().count(), 1, "{args:?}: {}", r.stderr);
        assert!(r.stderr.starts_with("error: "), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn check_config_refuses_what_backup_refuses_without_touching_the_network() {
    let w = Work::new();
    // A staging directory that is not ours: not empty, no marker.
    let staging = w.path().join("not-ours");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("precious.txt"), "someone else's file").unwrap();
    let cfg = w.config();
    write(
        &cfg,
        &format!(
            "node_name = \"n\"\n[etcd]\nendpoints = [\"http://127.0.0.1:1\"]\n[snapshot]\nstatic_resources_dir = \"\"\nstaging_dir = \"{}\"\n[[target]]\nname = \"local\"\nurl = \"file://{}\"\n",
            staging.display(),
            w.target_root().display()
        ),
    );
    let r = run(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("snapshot.staging_dir") && r.stderr.contains("marker"),
        "{}",
        r.stderr
    );
    let b = run(&["backup", "--no-election", "--config", cfg.to_str().unwrap()]);
    assert_eq!(b.code, 2, "{}", b.all());
    assert!(b.stderr.contains("snapshot.staging_dir"), "{}", b.stderr);
    // Nothing was created or changed by either.
    let names: Vec<_> = std::fs::read_dir(&staging)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("precious.txt")]);

    // An unreadable recipients file and a missing script are named too, in one line.
    let script_cfg = w.path().join("script.toml");
    write(
        &script_cfg,
        &format!(
            "node_name = \"n\"\n[etcd]\nendpoints = [\"http://127.0.0.1:1\"]\n[snapshot]\nmethod = \"script\"\nscript = \"{}\"\nstaging_dir = \"{}\"\n[encryption]\nage_recipients_file = \"{}\"\n[[target]]\nname = \"local\"\nurl = \"file://{}\"\n",
            w.path().join("no-such-script.sh").display(),
            w.path().join("fresh-staging").display(),
            w.path().join("no-recipients.txt").display(),
            w.target_root().display()
        ),
    );
    let r = run(&["check-config", "--config", script_cfg.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("snapshot.script") && r.stderr.contains("age_recipients_file"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(!w.path().join("fresh-staging").exists(), "check-config created staging");
}
