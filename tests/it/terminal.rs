//! What a person at a terminal sees: progress bars when stderr is a terminal (a real pty,
//! made by util-linux `script`), nothing of them into a pipe, and output cut short by a
//! reader that quit (`| head`) ending quietly.

use std::process::{Command, Stdio};

use crate::common::{CorruptingProxy, Etcd, Work};

const BIN: &str = env!("CARGO_BIN_EXE_etcd-backupd");

/// The percentages a bar labelled `label` showed, in the order drawn.
fn percentages(screen: &str, label: &str) -> Vec<u32> {
    screen
        .split(['\r', '\n'])
        .flat_map(|l| l.split("\x1b["))
        .filter_map(|l| {
            let rest = l.split(label).nth(1)?;
            let pct = rest.split('%').next()?.rsplit(' ').next()?;
            pct.trim().parse().ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_on_a_terminal_draws_moving_bars_and_into_a_pipe_none() {
    let etcd = Etcd::start();
    etcd.fill(None, 4000, 1000);
    let w = Work::new();
    // About 1 MiB/s: the snapshot takes a few seconds, so the bar is drawn many times.
    let slow = CorruptingProxy::start_with(&etcd.endpoint, None, Some(1 << 20)).await;
    let cfg = w.write_config(&format!("http://127.0.0.1:{}", slow.port), None, "");
    let typescript = w.path().join("typescript");
    let cmd = format!("{BIN} backup --no-election --config {}", cfg.display());
    let out = tokio::task::spawn_blocking({
        let typescript = typescript.clone();
        move || {
            Command::new("script")
                .args(["-qefc", &cmd])
                .arg(&typescript)
                .env("TERM", "dumb") // the terminal decides, not TERM
                .env("CI", "true")
                .stdin(Stdio::null())
                .output()
                .expect("script (util-linux)")
        }
    })
    .await
    .unwrap();
    let screen = String::from_utf8_lossy(&std::fs::read(&typescript).unwrap()).into_owned();
    assert!(out.status.success(), "{screen}");
    let seen = percentages(&screen, "snapshot");
    let distinct: std::collections::BTreeSet<u32> = seen.iter().copied().collect();
    assert!(
        distinct.len() >= 3 && distinct.iter().any(|p| *p > 0 && *p < 100),
        "the snapshot bar did not move: {seen:?}\n{screen}"
    );
    assert!(
        seen.windows(2).all(|p| p[0] <= p[1]),
        "the snapshot bar went backwards: {seen:?}"
    );
    assert!(screen.contains("upload to 'local'"), "no upload bar:\n{screen}");
    assert!(
        screen.contains("MiB/s") || screen.contains("KiB/s"),
        "no rate:\n{screen}"
    );
    // The summary follows, on stdout, as without a terminal.
    assert!(
        screen
            .lines()
            .any(|l| l.starts_with("backup 20") && l.contains(" of cluster test taken in ")),
        "{screen}"
    );

    // The same backup into a pipe (stderr and stdout): not one bar.
    let piped = Command::new(BIN)
        .args(["backup", "--no-election", "--config", cfg.to_str().unwrap()])
        .env_remove("ETCD_BACKUPD_LOG")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&piped.stdout),
        String::from_utf8_lossy(&piped.stderr)
    );
    assert!(piped.status.success(), "{text}");
    assert!(
        !text.contains('%') && !text.contains("ETA"),
        "progress into a pipe:\n{text}"
    );
    assert!(!text.contains('\x1b'), "escape codes into a pipe:\n{text}");
    assert_eq!(w.sets().len(), 2);
}

/// Runs `args` with stdout a pipe whose reader is already gone, as after `| head -1` quit.
fn run_into_closed_pipe(args: &[&str]) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(BIN)
        .args(args)
        .env_remove("ETCD_BACKUPD_LOG")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn output_cut_short_ends_quietly_with_141() {
    let etcd = Etcd::start();
    etcd.fill(None, 10, 10);
    let w = Work::new();
    let cfg = w.write_config(&etcd.endpoint, None, "");
    let out = crate::common::run(&["backup", "--no-election", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.all());
    for args in [
        vec!["check-config", "--config", cfg.to_str().unwrap()],
        vec!["list", "--config", cfg.to_str().unwrap()],
        vec!["list", "--json", "--config", cfg.to_str().unwrap()],
        vec!["status", "--config", cfg.to_str().unwrap()],
        vec!["render", "machineconfig", "--config", cfg.to_str().unwrap()],
    ] {
        let (code, stderr) = run_into_closed_pipe(&args);
        assert_eq!(code, Some(141), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("error") && !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?} wrote on stderr: {stderr}"
        );
    }
    // Through a real `head`: the status is 0 (all written before head quit) or 141.
    let sh = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; {BIN} check-config --config {} 2>{}/err | head -1 >/dev/null; echo ${{PIPESTATUS[0]}}",
            cfg.display(),
            w.path().display()
        ))
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&sh.stdout).trim().to_string();
    assert!(code == "0" || code == "141", "exit {code}");
    let err = std::fs::read_to_string(w.path().join("err")).unwrap();
    assert!(!err.contains("error"), "{err}");
}
