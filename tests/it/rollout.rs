//! The rollout under a real systemd: a Debian 12 root (built once by `scripts/nspawn-root.sh`,
//! copied for each run) gets what `render machineconfig` prints, applied as Ignition applies
//! files and units, and boots with systemd under `systemd-nspawn`. The node's etcd runs on
//! the host's loopback, which the container shares (no `--private-network`). The unit must
//! come up (`Type=notify`), take elected backups on schedule into a `file://` target, log its
//! outcomes to the journal with their `MESSAGE_ID`s and fields, reload, come back after
//! `kill -9`, and stop cleanly; then the same with `systemd/native-only.conf` added.
//!
//! Two changes to what is rendered, both as a MachineConfig could carry them: the install
//! unit is masked (it would pull the binary from the `--image` with podman; the freshly built
//! binary is copied in instead), and a drop-in sets `RestartSec=1s` (30 s shipped), so the
//! restart after `kill -9` comes quickly. Wall time: about 15-25 s once the root is cached
//! (its first build, debootstrap from the network, about a minute).
//!
//! The host's PID 1 need not be systemd: nspawn runs with `--register=no --keep-unit` (no
//! machined, no scope unit) and the test reaches into the container with `nsenter` on the
//! container's init. It fails, not skips, where systemd-nspawn is missing.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{BIN, Etcd, spawn_group};

const SUCCEEDED: &str = "4f2e7a6c1b9d4e0f8a3c5d7e9f1a2b3c";
const FAILED: &str = "9c1d3e5f7a9b4c2d8e0f1a3b5c7d9e1f";
const UNIT: &str = "etcd-backupd.service";
const INSTALL_UNIT: &str = "etcd-backupd-install.service";
/// The `file://` target inside the container: under `/var/backups`, one of the roots the
/// unit's `ReadWritePaths=` opens.
const TARGET: &str = "/var/backups/etcd-backupd";
/// `/etc/hostname` of the root `scripts/nspawn-root.sh` builds: the default `node_name`.
const NODE: &str = "node-rollout";

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// Fails (never skips) where systemd-nspawn is missing.
fn require_nspawn() {
    let version = Command::new("systemd-nspawn").arg("--version").output();
    assert!(
        version.is_ok_and(|o| o.status.success()),
        "systemd-nspawn (Debian package systemd-container) is missing: run scripts/install-deps.sh"
    );
}

/// The cached root, built by `scripts/nspawn-root.sh` when missing (a minute, once).
fn base_root() -> PathBuf {
    let out = Command::new("bash")
        .arg(repo("scripts/nspawn-root.sh"))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/nspawn-root.sh failed (debootstrap missing? run scripts/install-deps.sh)"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

// ---------------------------------------------------------------------------------------
// Ignition, as far as a MachineConfig from `render machineconfig` needs it.

/// The bytes of an Ignition `contents.source` data URL (`data:[<type>][;base64],<data>`),
/// gunzipped with `compression: gzip`.
fn data_url(source: &str, compression: Option<&str>) -> Vec<u8> {
    use base64::Engine;
    let rest = source
        .strip_prefix("data:")
        .unwrap_or_else(|| panic!("only data: URLs are applied here, not {source:.40}"));
    let (meta, data) = rest.split_once(',').expect("a data URL has a comma");
    let bytes = if meta.ends_with(";base64") {
        base64::engine::general_purpose::STANDARD.decode(data).unwrap()
    } else {
        percent_encoding::percent_decode_str(data).collect()
    };
    match compression {
        None | Some("") => bytes,
        Some("gzip") => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&bytes[..]).read_to_end(&mut out).unwrap();
            out
        }
        Some(other) => panic!("compression {other:?} is not Ignition's"),
    }
}

/// `path` (absolute, as on the node) inside `root`.
fn under(root: &Path, path: &str) -> PathBuf {
    assert!(path.starts_with('/') && !path.contains(".."), "{path}");
    root.join(path.trim_start_matches('/'))
}

fn write_mode(path: &Path, bytes: &[u8], mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(path);
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The values of `key=` in the `[Install]` section of a unit file.
fn install_targets(contents: &str, key: &str) -> Vec<String> {
    let mut section = "";
    let mut out = Vec::new();
    for line in contents.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[Install]"
            && let Some(v) = line.strip_prefix(key).and_then(|r| r.strip_prefix('='))
        {
            out.extend(v.split_whitespace().map(str::to_string));
        }
    }
    out
}

/// Applies an Ignition config to `root` as Ignition does on first boot: `storage.files`
/// (data URLs, optionally gzip, with their mode; parents created 0755), `storage.directories`
/// and `storage.links`, and `systemd.units` into `/etc/systemd/system` (contents, drop-ins in
/// `NAME.d/`, `mask` = a link to /dev/null, `enabled` = a link in each `WantedBy=`/`RequiredBy=`
/// unit's `.wants/`/`.requires/`, which is what the preset Ignition writes does at first boot).
/// Anything else in the config fails the test: this applier would not apply it.
fn apply_ignition(root: &Path, config: &Value) {
    for key in config.as_object().unwrap().keys() {
        assert!(
            ["ignition", "storage", "systemd"].contains(&key.as_str()),
            "the test's Ignition applier does not know `{key}`"
        );
    }
    let storage = &config["storage"];
    for key in storage.as_object().into_iter().flat_map(|o| o.keys()) {
        assert!(
            ["files", "directories", "links"].contains(&key.as_str()),
            "the test's Ignition applier does not know storage.{key}"
        );
    }
    for d in storage["directories"].as_array().into_iter().flatten() {
        let p = under(root, d["path"].as_str().unwrap());
        std::fs::create_dir_all(&p).unwrap();
        let mode = d["mode"].as_u64().unwrap_or(0o755) as u32;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    for f in storage["files"].as_array().into_iter().flatten() {
        assert!(f.get("append").is_none(), "append is not applied here: {f}");
        let path = f["path"].as_str().unwrap();
        let contents = &f["contents"];
        let bytes = match contents["source"].as_str() {
            Some(src) => data_url(src, contents["compression"].as_str()),
            None => Vec::new(),
        };
        write_mode(&under(root, path), &bytes, f["mode"].as_u64().unwrap_or(0o644) as u32);
    }
    for l in storage["links"].as_array().into_iter().flatten() {
        let p = under(root, l["path"].as_str().unwrap());
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(&p);
        std::os::unix::fs::symlink(l["target"].as_str().unwrap(), &p).unwrap();
    }
    let sys = root.join("etc/systemd/system");
    for u in config["systemd"]["units"].as_array().into_iter().flatten() {
        for key in u.as_object().unwrap().keys() {
            assert!(
                ["name", "enabled", "mask", "contents", "dropins"].contains(&key.as_str()),
                "the test's Ignition applier does not know systemd.units[].{key}"
            );
        }
        let name = u["name"].as_str().unwrap();
        let path = sys.join(name);
        let masked = u["mask"].as_bool() == Some(true);
        if masked {
            let _ = std::fs::remove_file(&path);
            std::os::unix::fs::symlink("/dev/null", &path).unwrap();
        } else if let Some(text) = u["contents"].as_str() {
            write_mode(&path, text.as_bytes(), 0o644);
        }
        for d in u["dropins"].as_array().into_iter().flatten() {
            let dropin = sys.join(format!("{name}.d")).join(d["name"].as_str().unwrap());
            write_mode(&dropin, d["contents"].as_str().unwrap_or("").as_bytes(), 0o644);
        }
        if u["enabled"].as_bool() == Some(true) {
            assert!(!masked, "{name} is both masked and enabled");
            let text = u["contents"].as_str().expect("an enabled unit has contents here");
            let mut linked = 0;
            for (key, dir) in [("WantedBy", "wants"), ("RequiredBy", "requires")] {
                for target in install_targets(text, key) {
                    let link = sys.join(format!("{target}.{dir}")).join(name);
                    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
                    std::os::unix::fs::symlink(format!("/etc/systemd/system/{name}"), &link).unwrap();
                    linked += 1;
                }
            }
            assert!(
                linked > 0,
                "{name} is enabled but has no [Install] WantedBy=/RequiredBy="
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// The container.

/// A copy of the cached root, booted with systemd under systemd-nspawn. Dropping it powers
/// the container off (SIGTERM to nspawn: a clean shutdown), kills what is left after 10 s,
/// and removes the copy, also when the test failed.
struct Machine {
    /// `root/` (the copy) and `console.log` (nspawn's output: the boot messages).
    dir: Option<tempfile::TempDir>,
    nspawn: Option<Child>,
    /// The container's init (systemd), as a host PID.
    init: Option<i32>,
}

impl Machine {
    /// A fresh copy of `base` (nothing booted yet).
    fn copy_of(base: &Path) -> Machine {
        // In the suite's temporary directory (scripts/test.sh's leftover check then finds an
        // nspawn left running by its -D argument, and its cleanup removes a copy a killed run
        // left), unless that file system is noexec: beside the base then.
        let tmp = std::env::temp_dir();
        let noexec =
            nix::sys::statvfs::statvfs(&tmp).is_ok_and(|v| v.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC));
        let runs = if noexec {
            base.parent().unwrap().to_path_buf()
        } else {
            tmp
        };
        let dir = tempfile::Builder::new()
            .prefix("etcd-backupd-rollout-")
            .tempdir_in(runs)
            .unwrap();
        let out = Command::new("cp")
            .arg("-a")
            .arg(base)
            .arg(dir.path().join("root"))
            .output()
            .unwrap();
        assert!(out.status.success(), "cp -a: {}", String::from_utf8_lossy(&out.stderr));
        // Not the base's stamp: this copy is a run, never a base.
        let _ = std::fs::remove_file(dir.path().join("root/.etcd-backupd-nspawn-root"));
        Machine {
            dir: Some(dir),
            nspawn: None,
            init: None,
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.as_ref().unwrap().path().join("root")
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.as_ref().unwrap().path().join("console.log")).unwrap_or_default()
    }

    /// Boots the copy and waits (30 s at most) until systemd reports the boot finished.
    fn boot(&mut self) {
        require_nspawn();
        let console = std::fs::File::create(self.dir.as_ref().unwrap().path().join("console.log")).unwrap();
        // The directory's random name is not a valid machine name: name it.
        let name = format!("etcd-backupd-rollout-{}", std::process::id());
        let mut cmd = Command::new("systemd-nspawn");
        cmd.args(["--boot", "--register=no", "--keep-unit", "--quiet"])
            .arg(format!("--machine={name}"))
            .arg("--directory")
            .arg(self.root())
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console);
        let child = spawn_group(&mut cmd).unwrap();
        let nspawn = child.id() as i32;
        self.nspawn = Some(child);

        // The container's init is the one child nspawn keeps (it reaps the intermediate one).
        let deadline = Instant::now() + Duration::from_secs(20);
        let init = loop {
            if let Some(pid) = children(nspawn).into_iter().find(|&p| is_container_init(p)) {
                break pid;
            }
            if let Some(Ok(Some(status))) = self.nspawn.as_mut().map(Child::try_wait) {
                panic!("systemd-nspawn exited ({status}) before booting:\n{}", self.console());
            }
            assert!(Instant::now() < deadline, "no container init:\n{}", self.console());
            std::thread::sleep(Duration::from_millis(50));
        };
        self.init = Some(init);

        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let state = self.exec(&["systemctl", "is-system-running"]);
            let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
            match state.as_str() {
                "running" => return,
                "degraded" => panic!(
                    "the container booted degraded:\n{}\n{}",
                    self.text(&["systemctl", "--failed", "--no-pager"]),
                    self.diagnostics()
                ),
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "the container did not finish booting ({state}):\n{}\n{}",
                self.text(&["systemctl", "list-jobs", "--no-pager"]),
                self.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `args` inside the container (all its namespaces, a clean environment), killed
    /// after 60 s by `timeout` in there.
    fn exec(&self, args: &[&str]) -> Output {
        let init = self.init.expect("booted").to_string();
        Command::new("nsenter")
            .args(["-t", &init, "-a", "--", "/usr/bin/timeout", "60", "/usr/bin/env", "-i"])
            .args([
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
                "SYSTEMD_COLORS=0",
                "SYSTEMD_PAGER=",
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `args`' stdout, asserting they succeed.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{args:?} in the container: {}\n{}{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.diagnostics()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// stdout and stderr of `args`, whatever their status.
    fn text(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `systemctl show -p ...` of the daemon's unit.
    fn show(&self) -> BTreeMap<String, String> {
        let props = "ActiveState,SubState,StatusText,MainPID,NRestarts,Result,ExecMainStatus,RestartUSec";
        self.ok(&["systemctl", "show", "-p", props, UNIT])
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Every journal entry of the daemon's unit (its own and systemd's about it).
    fn journal(&self) -> Vec<Value> {
        self.ok(&["journalctl", "--no-pager", "-o", "json", "-u", UNIT])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// What a failure message needs: the unit's status and its journal's end.
    fn diagnostics(&self) -> String {
        if self.init.is_none() {
            return self.console();
        }
        format!(
            "--- systemctl status\n{}--- journal\n{}",
            self.text(&["systemctl", "status", "--no-pager", "-l", UNIT]),
            self.text(&["journalctl", "--no-pager", "-n", "80", "-u", UNIT])
        )
    }

    /// Polls `cond` on [`Machine::show`] until it holds, or fails with `what` after `within`.
    fn wait_show(
        &self,
        within: Duration,
        what: &str,
        cond: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> BTreeMap<String, String> {
        let deadline = Instant::now() + within;
        loop {
            let s = self.show();
            if cond(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}; last {s:?}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls the journal until `cond` holds for it.
    fn wait_journal(&self, within: Duration, what: &str, cond: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let j = self.journal();
            if cond(&j) {
                return j;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if std::thread::panicking() && self.init.is_some() {
            eprintln!("rollout: the container at failure:\n{}", self.diagnostics());
        }
        if let Some(mut nspawn) = self.nspawn.take() {
            use nix::sys::signal::{Signal, kill, killpg};
            use nix::unistd::Pid;
            // SIGTERM to nspawn asks the container's systemd to power off.
            let _ = kill(Pid::from_raw(nspawn.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(nspawn.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            // Killing the init of a PID namespace kills everything in it.
            if let Some(init) = self.init {
                let _ = kill(Pid::from_raw(init), Signal::SIGKILL);
            }
            let _ = killpg(Pid::from_raw(nspawn.id() as i32), Signal::SIGKILL);
            let _ = nspawn.wait();
            if let Some(init) = self.init {
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline
                    && Path::new(&format!("/proc/{init}")).exists()
                    && is_container_init(init)
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        // The copy goes (TempDir's drop), its state directory and target included.
        if let Some(dir) = self.dir.take()
            && let Err(e) = dir.close()
        {
            eprintln!("rollout: cannot remove the container's copy: {e}");
        }
    }
}

/// The processes whose parent is `pid` (from /proc/*/stat).
fn children(pid: i32) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses.
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|st| {
                st.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// `pid` runs systemd in a PID namespace other than ours.
fn is_container_init(pid: i32) -> bool {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    comm.trim() == "systemd" && ns.is_some() && ns != std::fs::read_link("/proc/self/ns/pid").ok()
}

// ---------------------------------------------------------------------------------------

/// The node's configuration: the host's etcd, a `file://` target in the container, a run
/// every 3 s, the election on (a short lease, so the run a killed daemon held is free again
/// soon), and everything else at its default (staging in the unit's StateDirectory).
fn node_config(endpoint: &str) -> String {
    format!(
        "cluster_name = \"rollout\"\n\n[etcd]\nendpoints = [\"{endpoint}\"]\nconnect_timeout = \"2s\"\nrequest_timeout = \"10s\"\n\n[snapshot]\nstatic_resources_dir = \"\"\n\n[schedule]\ncron = \"*/3 * * * * *\"\ntimezone = \"UTC\"\njitter = \"0s\"\n\n[election]\nenabled = true\nlease_ttl = \"3s\"\n\n[[target]]\nname = \"local\"\nurl = \"file://{TARGET}\"\n"
    )
}

/// Sets on the container's target: (id, manifest).
fn sets(root: &Path) -> Vec<(String, Value)> {
    let dir = under(root, TARGET).join("rollout");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .filter_map(|e| {
                    let m = std::fs::read(e.path().join("manifest.json")).ok()?;
                    Some((
                        e.file_name().into_string().unwrap(),
                        serde_json::from_slice(&m).unwrap(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The daemon's journal entries (not systemd's about the unit) with `MESSAGE_ID` `id`.
fn with_id<'a>(journal: &'a [Value], id: &str) -> Vec<&'a Value> {
    journal.iter().filter(|e| e["MESSAGE_ID"] == id).collect()
}

/// An entry's syslog priority (3 error, 4 warning, 5 notice, ...).
fn priority(entry: &Value) -> u8 {
    entry["PRIORITY"].as_str().and_then(|p| p.parse().ok()).unwrap_or(7)
}

/// The entries of process `pid` whose `MESSAGE` contains `text`.
fn messages<'a>(journal: &'a [Value], pid: &str, text: &str) -> Vec<&'a Value> {
    journal
        .iter()
        .filter(|e| e["_PID"] == pid && e["MESSAGE"].as_str().is_some_and(|m| m.contains(text)))
        .collect()
}

#[test]
fn the_rendered_machineconfig_runs_under_systemd_in_a_booted_root() {
    let started = Instant::now();
    require_nspawn();
    let base = base_root();
    let etcd = Etcd::start();
    let host = tempfile::tempdir().unwrap();
    let cfg = host.path().join("config.toml");
    std::fs::write(&cfg, node_config(&etcd.endpoint)).unwrap();

    // What an operator applies.
    let render = crate::common::run(&[
        "render",
        "machineconfig",
        "--config",
        cfg.to_str().unwrap(),
        "--image",
        "registry.example.com/etcd/etcd-backupd:rollout-test",
    ]);
    assert_eq!(render.code, 0, "{}", render.all());
    let mc = crate::monitoring::parse_yaml_docs(&render.stdout).remove(0);
    assert_eq!(mc["kind"], "MachineConfig");
    assert_eq!(
        mc["spec"].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["config"],
        "only an Ignition config is applied here"
    );
    let mut config = mc["spec"]["config"].clone();
    let units = config["systemd"]["units"].as_array_mut().unwrap();
    for u in units.iter_mut() {
        match u["name"].as_str().unwrap() {
            // The install unit copies the binary out of the --image with podman: there is no
            // image (nor podman) here, and the test installs the freshly built binary itself
            // (below). Masked, as Ignition masks a unit (`mask: true`: a link to /dev/null).
            INSTALL_UNIT => {
                let o = u.as_object_mut().unwrap();
                o.remove("enabled");
                o.insert("mask".into(), true.into());
            }
            // A drop-in as a MachineConfig carries one: RestartSec=30s shortened, so the
            // restart after kill -9 below comes in a second; everything else as shipped.
            UNIT => {
                u.as_object_mut().unwrap().insert(
                    "dropins".into(),
                    serde_json::json!([{"name": "90-rollout-test.conf", "contents": "[Service]\nRestartSec=1s\n"}]),
                );
            }
            other => panic!("an unexpected unit in the MachineConfig: {other}"),
        }
    }

    let mut machine = Machine::copy_of(&base);
    let root = machine.root();
    apply_ignition(&root, &config);
    // What the install unit would have put there.
    write_mode(
        &root.join("usr/local/bin/etcd-backupd"),
        &std::fs::read(BIN).unwrap(),
        0o755,
    );
    // A file:// target root must exist (it is never created).
    std::fs::create_dir_all(under(&root, TARGET)).unwrap();
    // Applied as rendered: the configuration 0600, the units and the enablement.
    assert_eq!(crate::support::mode(&root.join("etc/etcd-backupd/config.toml")), 0o600);
    assert_eq!(
        std::fs::read_to_string(root.join("etc/etcd-backupd/config.toml")).unwrap(),
        node_config(&etcd.endpoint)
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/systemd/system").join(UNIT)).unwrap(),
        std::fs::read_to_string(repo("systemd/etcd-backupd.service")).unwrap()
    );
    assert_eq!(
        std::fs::read_link(root.join("etc/systemd/system/multi-user.target.wants").join(UNIT)).unwrap(),
        Path::new("/etc/systemd/system").join(UNIT),
        "enabled"
    );

    let prepared = started.elapsed();
    machine.boot();
    let booted = started.elapsed() - prepared;

    // Up: READY=1 came (active/running, not activating) and STATUS= says what it does.
    let s = machine.wait_show(Duration::from_secs(20), "the unit is active", |s| {
        s["ActiveState"] == "active" && s["SubState"] == "running" && !s["StatusText"].is_empty()
    });
    assert_eq!(s["RestartUSec"], "1s", "the MachineConfig's drop-in applies");
    assert_eq!(s["NRestarts"], "0", "{s:?}");
    let masked = machine.text(&["systemctl", "is-enabled", INSTALL_UNIT]);
    assert_eq!(masked.trim(), "masked");
    let pid1 = s["MainPID"].clone();

    // Elected backups on schedule: every run recorded in etcd by this node, one set each.
    let journal = machine.wait_journal(Duration::from_secs(30), "two backups succeeded", |j| {
        with_id(j, SUCCEEDED).len() >= 2
    });
    let ok = with_id(&journal, SUCCEEDED);
    let root_sets = sets(&root);
    for e in &ok {
        // Natively logged (not through the stderr stream), with the fields docs/daemon.md "The journal" names.
        assert_eq!(e["_TRANSPORT"], "journal", "{e}");
        assert_eq!(e["SYSLOG_IDENTIFIER"], "etcd-backupd", "{e}");
        assert_eq!(e["_SYSTEMD_UNIT"], UNIT, "{e}");
        // info (6), not notice.
        assert_eq!(e["PRIORITY"], "6", "{e}");
        assert_eq!(e["_PID"], pid1.as_str(), "{e}");
        let id = e["BACKUP_ID"].as_str().unwrap_or_else(|| panic!("no BACKUP_ID: {e}"));
        let run = e["RUN"].as_str().unwrap_or_else(|| panic!("no RUN: {e}"));
        let bytes: u64 = e["BYTES"]
            .as_str()
            .and_then(|b| b.parse().ok())
            .unwrap_or_else(|| panic!("BYTES: {e}"));
        assert!(bytes > 0, "{e}");
        // The line reads alone in `journalctl -u` (which shows MESSAGE only): it names the set.
        let message = e["MESSAGE"].as_str().unwrap();
        assert!(
            message.starts_with("backup succeeded") && message.contains(id) && message.contains(run),
            "{e}"
        );
        assert!(e["SECONDS"].as_str().is_some_and(|s| s.parse::<f64>().is_ok()), "{e}");
        // The set is on the target, complete, taken by this node for that run.
        let (_, m) = root_sets
            .iter()
            .find(|(sid, _)| sid == id)
            .unwrap_or_else(|| panic!("set {id} is not on the target: {root_sets:?}"));
        assert_eq!(m["node"], NODE, "{m}");
        assert_eq!(m["trigger"], "schedule", "{m}");
        assert_eq!(m["run"], run, "{m}");
        crate::support::assert_complete(&under(&root, TARGET).join("rollout").join(id));
        // Elected: the run's marker in the host's etcd names this node and the set.
        let marker = crate::support::etcd_get(&etcd.endpoint, &format!("/etcd-backupd/runs/{run}"))
            .unwrap_or_else(|| panic!("no marker for run {run}"));
        let marker: Value = serde_json::from_str(&marker).unwrap();
        assert_eq!(marker["node"], NODE, "{marker}");
        assert_eq!(marker["id"], id, "{marker}");
        assert_eq!(marker["result"], "ok", "{marker}");
    }
    assert!(with_id(&journal, FAILED).is_empty(), "a run failed: {journal:?}");
    // Until now nothing was meant to go wrong: no warning or worse, from systemd about the unit
    // (a sandbox setting it could not apply, say) or from the daemon, and nothing of the
    // daemon's through its stderr stream instead of natively.
    let noisy: Vec<_> = journal.iter().filter(|e| priority(e) <= 4).collect();
    assert!(noisy.is_empty(), "warnings in the journal: {noisy:?}");
    let streamed: Vec<_> = journal
        .iter()
        .filter(|e| e["_PID"] == pid1.as_str() && e["_TRANSPORT"] != "journal")
        .collect();
    assert!(streamed.is_empty(), "not logged natively: {streamed:?}");
    let state: Value =
        serde_json::from_slice(&std::fs::read(root.join("var/lib/etcd-backupd/state.json")).unwrap()).unwrap();
    let state_ok = state["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["result"] == "ok" && r["trigger"] == "schedule")
        .count();
    assert!(state_ok >= 2, "state.json: {state}");
    // STATUS= reaches systemd from the main process (NotifyAccess=main) and follows the runs.
    machine.wait_show(Duration::from_secs(10), "STATUS= names the last run", |s| {
        s["StatusText"].contains("last ok")
    });
    assert_eq!(crate::support::mode(&root.join("var/lib/etcd-backupd")), 0o700);

    // Reload: a bad configuration is refused and the old one kept; a good one is taken.
    let good = std::fs::read(root.join("etc/etcd-backupd/config.toml")).unwrap();
    write_mode(
        &root.join("etc/etcd-backupd/config.toml"),
        b"[schedule]\ncron = \"not a cron\"\n",
        0o600,
    );
    // `systemctl reload` fails: the unit's ExecReload checks the configuration before the
    // daemon is told, and the journal says why.
    let out = machine.exec(&["systemctl", "reload", UNIT]);
    assert!(
        !out.status.success(),
        "systemctl reload of a bad configuration succeeded"
    );
    machine.wait_journal(Duration::from_secs(10), "check-config's reason", |j| {
        j.iter().any(|e| {
            e["_SYSTEMD_UNIT"] == UNIT
                && e["_PID"] != pid1
                && e["MESSAGE"].as_str().is_some_and(|m| m.contains("schedule.cron"))
        })
    });
    // A SIGHUP that reaches the daemon anyway (`systemctl kill -s HUP`): it keeps the old
    // configuration, logs why, and says so in STATUS=.
    machine.ok(&["systemctl", "kill", "-s", "HUP", "--kill-whom=main", UNIT]);
    let journal = machine.wait_journal(Duration::from_secs(10), "the bad configuration refused", |j| {
        !messages(j, &pid1, "new configuration rejected").is_empty()
    });
    // ... saying why, in the line itself.
    let rejected = messages(&journal, &pid1, "new configuration rejected")[0];
    assert!(
        rejected["MESSAGE"].as_str().unwrap().contains("schedule.cron"),
        "{rejected}"
    );
    assert_eq!(rejected["PRIORITY"], "3", "{rejected}");
    machine.wait_show(
        Duration::from_secs(10),
        "STATUS= says the configuration was rejected",
        |s| s["StatusText"].starts_with("configuration rejected: ") && s["StatusText"].contains("schedule.cron"),
    );
    write_mode(&root.join("etc/etcd-backupd/config.toml"), &good, 0o600);
    machine.ok(&["systemctl", "reload", UNIT]);
    let journal = machine.wait_journal(Duration::from_secs(10), "the reload logged", |j| {
        !messages(j, &pid1, "configuration reloaded").is_empty()
    });
    let s = machine.wait_show(Duration::from_secs(10), "running after the reloads", |s| {
        s["ActiveState"] == "active" && s["SubState"] == "running"
    });
    assert_eq!(s["MainPID"], pid1, "a reload is not a restart");
    // Backups go on after the reloads.
    let before = with_id(&journal, SUCCEEDED).len();
    machine.wait_journal(Duration::from_secs(15), "a backup after the reload", |j| {
        with_id(j, SUCCEEDED).len() > before
    });

    // kill -9 of the main process: Restart=on-failure brings it back (the drop-in's 1 s).
    machine.ok(&["kill", "-9", &pid1]);
    let s = machine.wait_show(Duration::from_secs(20), "restarted after kill -9", |s| {
        s["NRestarts"] == "1" && s["ActiveState"] == "active" && s["SubState"] == "running" && s["MainPID"] != pid1
    });
    let pid2 = s["MainPID"].clone();
    // ... and backs up again (a run the killed daemon held is free once its 3 s lease ends).
    machine.wait_journal(Duration::from_secs(20), "a backup after the restart", |j| {
        j.iter()
            .any(|e| e["MESSAGE_ID"] == SUCCEEDED && e["_PID"] == pid2.as_str())
    });

    // Stop: SIGTERM, exit 0 well within TimeoutStopSec.
    let t0 = Instant::now();
    machine.ok(&["systemctl", "stop", UNIT]);
    let stop_took = t0.elapsed();
    let s = machine.show();
    assert!(stop_took < Duration::from_secs(10), "stop took {stop_took:?}");
    assert_eq!(s["Result"], "success", "{s:?}\n{}", machine.diagnostics());
    assert_eq!(s["ExecMainStatus"], "0", "{s:?}");
    assert_eq!(s["ActiveState"], "inactive", "{s:?}");
    // The lock is not left held in etcd.
    assert_eq!(crate::support::etcd_get(&etcd.endpoint, "/etcd-backupd/lock"), None);
    // No half-assembled set stays behind.
    let tmp = root.join("var/lib/etcd-backupd/tmp");
    let leftovers: Vec<_> = crate::common::Work::files_under(&tmp)
        .into_iter()
        .filter(|p| p.is_file())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The tighter sandbox systemd/README.md offers for native-only hosts, as its drop-in,
    // under the same systemd: the daemon comes up and backs up under it too.
    write_mode(
        &root
            .join("etc/systemd/system")
            .join(format!("{UNIT}.d/50-native-only.conf")),
        &std::fs::read(repo("systemd/native-only.conf")).unwrap(),
        0o644,
    );
    machine.ok(&["systemctl", "daemon-reload"]);
    machine.ok(&["systemctl", "start", UNIT]);
    let s = machine.wait_show(Duration::from_secs(20), "active with native-only.conf", |s| {
        s["ActiveState"] == "active" && s["SubState"] == "running" && !s["StatusText"].is_empty()
    });
    let pid3 = s["MainPID"].clone();
    let journal = machine.wait_journal(Duration::from_secs(20), "a backup with native-only.conf", |j| {
        j.iter()
            .any(|e| e["MESSAGE_ID"] == SUCCEEDED && e["_PID"] == pid3.as_str())
    });
    let noisy: Vec<_> = journal
        .iter()
        .filter(|e| e["_PID"] == pid3.as_str() && priority(e) <= 4)
        .collect();
    assert!(noisy.is_empty(), "warnings with native-only.conf: {noisy:?}");
    machine.ok(&["systemctl", "stop", UNIT]);
    assert_eq!(machine.show()["Result"], "success");

    eprintln!(
        "rollout: prepared (etcd, render, copy, apply) in {prepared:?}, booted in {booted:?}; {} sets; stop took {stop_took:?}; whole test {:?}",
        sets(&root).len(),
        started.elapsed()
    );
}

/// The applier's own decoding, on the forms Ignition accepts that `render` does not emit today.
#[test]
fn ignition_data_urls_decode_as_ignition_reads_them() {
    use base64::Engine;
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(b"[Service]\nNice=5\n").unwrap();
    let gz = base64::engine::general_purpose::STANDARD.encode(gz.finish().unwrap());
    assert_eq!(
        data_url(&format!("data:;base64,{gz}"), Some("gzip")),
        b"[Service]\nNice=5\n"
    );
    assert_eq!(data_url("data:,a%20b%0A", None), b"a b\n");
    assert_eq!(data_url("data:text/plain;base64,aGk=", Some("")), b"hi");
    assert_eq!(
        install_targets(
            "[Unit]\nWantedBy=no.target\n[Install]\nWantedBy=a.target b.target\nRequiredBy=c.service\n",
            "WantedBy"
        ),
        ["a.target", "b.target"]
    );
}
