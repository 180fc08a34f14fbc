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
        // Messages that teach: the field and its range, the likely key, the missing scheme.
        (
            "[schedule]\ncron = \"0 30 * * *\"\n",
            "config.toml: schedule.cron: \"0 30 * * *\": field 2 (hour) is 30, must be 0-23",
        ),
        (
            "[verify]\nschedule = \"0 4 * * 8\"\n",
            "config.toml: verify.schedule: \"0 4 * * 8\": field 5 (day-of-week) is 8, must be 0-7",
        ),
        (
            "[etcd]\nendpionts = [\"http://a:1\"]\n",
            "config.toml: etcd.endpionts: unknown field `endpionts`: did you mean `endpoints`?",
        ),
        (
            "[etcd]\nendpoints = [\"127.0.0.1:2379\"]\n",
            "config.toml: etcd.endpoints[0]: \"127.0.0.1:2379\" has no scheme: did you mean \"http://127.0.0.1:2379\"",
        ),
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

/// `--version` names the commit (build.rs), `help --help` is help, and the man pages and
/// completions the RPM and the image install come from the command line definition.
#[test]
fn version_help_man_pages_and_completions() {
    let r = run(&["--version"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let line = r.stdout.trim();
    let commit = line
        .strip_prefix(&format!("etcd-backupd {} (commit ", env!("CARGO_PKG_VERSION")))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{line}"));
    let head = std::process::Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        Some(head) => assert_eq!(commit, head, "{line}"),
        None => assert_eq!(commit, "unknown", "{line}"),
    }

    for args in [
        &["help", "--help"][..],
        &["help"],
        &["help", "render", "machineconfig"],
        &["list", "--help"],
    ] {
        let r = run(args);
        assert_eq!(r.code, 0, "{args:?}: {}", r.all());
        assert!(r.stdout.contains("Usage: etcd-backupd"), "{args:?}: {}", r.stdout);
    }
    let r = run(&["help", "render", "machinecfg"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("no command 'machinecfg' of 'render'"), "{}", r.stderr);
    let r = run(&["--help"]);
    assert!(!r.stdout.contains("generate"), "hidden: {}", r.stdout);

    let w = Work::new();
    let dir = w.path().join("man1");
    let r = run(&["generate", "man", dir.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    for cmd in [
        "",
        "-daemon",
        "-backup",
        "-list",
        "-fetch",
        "-verify",
        "-prune",
        "-status",
        "-check-config",
        "-render-machineconfig",
        "-help",
    ] {
        let page = dir.join(format!("etcd-backupd{cmd}.1"));
        let text = std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(text.starts_with(".ie \\n(.g .ds Aq"), "{}: not roff", page.display());
        assert!(text.contains(".TH etcd-backupd"), "{}", page.display());
    }
    let list = std::fs::read_to_string(dir.join("etcd-backupd-list.1")).unwrap();
    assert!(
        list.contains("etcd\\-backupd list") && list.contains("\\-\\-json"),
        "{list}"
    );
    if std::process::Command::new("groff").arg("--version").output().is_ok() {
        let out = std::process::Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(dir.join("etcd-backupd.1"))
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    for (shell, check) in [("bash", Some(["bash", "-n"])), ("zsh", None), ("fish", None)] {
        let r = run(&["generate", "completions", shell]);
        assert_eq!(r.code, 0, "{shell}: {}", r.all());
        for word in ["check-config", "all-targets", "machineconfig"] {
            assert!(r.stdout.contains(word), "{shell}: no {word}");
        }
        assert!(!r.stdout.contains("generate"), "{shell}: the hidden command is offered");
        if let Some(check) = check {
            let file = w.path().join(format!("completion.{shell}"));
            std::fs::write(&file, &r.stdout).unwrap();
            let out = std::process::Command::new(check[0])
                .arg(check[1])
                .arg(&file)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{shell}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let r = run(&["generate", "completions", "tcsh"]);
    assert_eq!(r.code, 2, "{}", r.all());
}

/// The default `list` fits 120 columns whatever the node names and versions, marks what is
/// wrong and says it below; `--all-targets` lists every target, `--wide` every detail.
#[test]
fn list_fits_120_columns_and_shows_every_target_on_request() {
    use crate::restore::fake_set;
    let w = Work::new();
    let (local, offsite) = (w.target_root(), w.path().join("offsite"));
    let now = chrono::Utc::now();
    let ids: Vec<String> = (1..=3)
        .map(|d| fake_set(&local, "test", now - chrono::TimeDelta::days(d)))
        .collect();
    fake_set(&offsite, "test", now - chrono::TimeDelta::days(1));
    // The newest set: a long node name, an OpenShift version, forced; the oldest damaged.
    let manifest = local.join("test").join(&ids[0]).join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m["node"] = "ip-10-0-141-23.eu-west-1.compute.internal".into();
    m["trigger"] = "manual".into();
    m["forced"] = serde_json::json!(["an upgrade to 4.16.12 is in progress"]);
    m["openshift"] = serde_json::json!({"version": "4.16.0-0.nightly-2026-11-20-123456"});
    std::fs::write(&manifest, m.to_string()).unwrap();
    let snapshot = format!("snapshot_{}.db", ids[2]);
    std::fs::remove_file(local.join("test").join(&ids[2]).join(&snapshot)).unwrap();
    let cfg = w.write_config(
        "http://127.0.0.1:1",
        None,
        &format!(
            "\n[[target]]\nname = \"offsite\"\nurl = \"file://{}\"\n",
            offsite.display()
        ),
    );
    let list = |extra: &[&str]| {
        let mut args = vec!["list", "--config", cfg.to_str().unwrap()];
        args.extend(extra);
        let r = run(&args);
        assert_eq!(r.code, 0, "{extra:?}: {}", r.all());
        r.stdout
    };
    let widest = |text: &str| text.lines().map(|l| l.chars().count()).max().unwrap_or(0);

    let out = list(&[]);
    assert!(widest(&out) <= 120, "{out}");
    let mut lines = out.lines();
    let head: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        head,
        [
            "ID",
            "AGE",
            "TRIGGER",
            "VERSION",
            "REVISION",
            "SIZE",
            "NODE",
            "STATE",
            "RETENTION"
        ],
        "{out}"
    );
    let rows: Vec<&str> = lines.by_ref().take_while(|l| !l.is_empty()).collect();
    assert_eq!(rows.len(), 3, "the first target only: {out}");
    let cells = |row: &str| row.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    let newest = cells(rows[0]);
    assert_eq!(newest[..3], [ids[0].as_str(), "1d", "manual+forced"], "{out}");
    assert!(newest[3].starts_with("4.16.0-0.night"), "{out}");
    assert!(rows[0].contains("  37 B  ip-10-0-141-23"), "{out}");
    // STATE and RETENTION, the last two.
    assert_eq!(newest[newest.len() - 2], "ok", "{out}");
    assert!(newest[newest.len() - 1].starts_with("last,daily"), "{out}");
    assert!(cells(rows[2]).ends_with(&["DAMAGED".into(), "damaged".into()]), "{out}");
    let notes: Vec<&str> = lines.collect();
    assert_eq!(
        notes,
        [format!("{}: DAMAGED: '{snapshot}' is missing", ids[2])],
        "{out}"
    );

    let out = list(&["--all-targets"]);
    assert!(widest(&out) <= 120, "{out}");
    assert!(
        out.lines()
            .next()
            .unwrap()
            .split_whitespace()
            .take(2)
            .eq(["TARGET", "ID"]),
        "{out}"
    );
    let copies: Vec<&str> = out.lines().filter(|l| l.contains(&ids[0])).collect();
    assert_eq!(copies.len(), 2, "{out}");
    assert!(
        copies[0].starts_with("local ") && copies[1].starts_with("offsite "),
        "{out}"
    );
    assert!(out.contains(&format!("{} on 'local': DAMAGED", ids[2])), "{out}");

    let out = list(&["--wide"]);
    assert!(widest(&out) > 120, "{out}");
    let row = out.lines().find(|l| l.contains(&ids[0])).unwrap();
    assert!(row.contains("ip-10-0-141-23.eu-west-1.compute.internal"), "{row}");
    assert!(row.contains("4.16.0-0.nightly-2026-11-20-123456"), "{row}");
    assert!(
        row.contains(" UTC (1d ago)") && row.contains("  keep: last 1, daily ") && row.ends_with("newest set"),
        "{row}"
    );

    let out = list(&["--json", "--all-targets"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let targets: Vec<&str> = v["sets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["target"].as_str().unwrap())
        .collect();
    assert_eq!(targets, ["local", "offsite", "local", "local"], "{out}");

    let r = run(&[
        "list",
        "--all-targets",
        "--target",
        "local",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 2, "{}", r.all());
}

#[test]
fn cron_macros_are_accepted_wherever_a_cron_is() {
    let w = Work::new();
    let cfg = w.write_config(
        "http://127.0.0.1:2379",
        None,
        "[schedule]\ncron = \"@daily\"\n[verify]\nschedule = \"@weekly\"\n",
    );
    let r = run(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("cron = \"@daily\""), "{}", r.stdout);
    assert!(r.stdout.contains("schedule = \"@weekly\""), "{}", r.stdout);
}

/// `check-config` prints the merged configuration as TOML that loads back: fed to
/// `check-config` again it passes and prints the same settings.
#[test]
fn the_printed_configuration_loads_back() {
    let w = Work::new();
    std::fs::create_dir_all(w.target_root()).unwrap();
    let cfg = w.write_config(
        "http://127.0.0.1:2379",
        None,
        "[guards]\nmin_free_space = \"1500MB\"\n[priority]\nupload_rate_limit = \"1500KB/s\"\n",
    );
    let first = run(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(first.code, 0, "{}", first.all());
    assert!(first.stdout.contains("static_resources_dir = \"\""), "{}", first.stdout);
    let printed = w.path().join("printed/config.toml");
    write(&printed, &first.stdout);
    let again = run(&["check-config", "--config", printed.to_str().unwrap()]);
    assert_eq!(again.code, 0, "{}\n{}", again.all(), first.stdout);
    // The same settings: only the list of files read differs.
    let settings = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| !l.starts_with("#   "))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(settings(&first.stdout), settings(&again.stdout));
    for key in ["min_free_space = \"1500MB\"", "upload_rate_limit = \"1500KB/s\""] {
        assert!(again.stdout.contains(key), "{key}: {}", again.stdout);
    }
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
