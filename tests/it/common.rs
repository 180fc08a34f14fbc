//! Test harness: real etcd processes on free loopback ports, TLS material made per test,
//! the real binary run as a child process, and a corrupting TCP proxy for the one fault a
//! real etcd does not produce on demand.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use etcd_backupd::manifest::{
    Compression, Encryption, EtcdInfo, FORMAT_VERSION, FileEntry, Manifest, ToolInfo, Trigger,
};
use tempfile::TempDir;

/// Starts `cmd` in a process group of its own, so that [`stop_group`] reaches whatever it
/// forks (Apache's workers, a script's children), also when the test panics.
pub fn spawn_group(cmd: &mut Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0).spawn()
}

/// Stops a child started by [`spawn_group`] with everything in its group, and reaps it.
/// `graceful` sends SIGTERM to the child first and waits up to 5 s (Apache stops its workers
/// that way); whatever is left of the group then gets SIGKILL.
pub fn stop_group(child: &mut Child, graceful: bool) {
    use nix::sys::signal::{Signal, kill, killpg};
    use nix::unistd::Pid;
    let pid = Pid::from_raw(child.id() as i32);
    if graceful && matches!(child.try_wait(), Ok(None)) {
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // The group outlives its leader while any member lives: kill it even when the leader is gone.
    let _ = killpg(pid, Signal::SIGKILL);
    let _ = child.wait();
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// TLS material for one test: a CA, a server certificate for 127.0.0.1/localhost and a
/// client certificate, all written as PEM files.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path, tag: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("test-ca-{tag}"));
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let mut server = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        server
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        server.distinguished_name.push(DnType::CommonName, "etcd-server");
        let server_key = KeyPair::generate().unwrap();
        let server_cert = server.signed_by(&server_key, &ca).unwrap();

        let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
        client.distinguished_name.push(DnType::CommonName, "etcd-peer-node-a");
        let client_key = KeyPair::generate().unwrap();
        let client_cert = client.signed_by(&client_key, &ca).unwrap();

        let write = |name: &str, text: &str, mode: u32| {
            let p = dir.join(format!("{tag}-{name}"));
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        Pki {
            ca: write("ca.crt", &ca.pem(), 0o644),
            server_cert: write("server.crt", &server_cert.pem(), 0o644),
            server_key: write("server.key", &server_key.serialize_pem(), 0o600),
            client_cert: write("client.crt", &client_cert.pem(), 0o644),
            client_key: write("client.key", &client_key.serialize_pem(), 0o600),
        }
    }
}

/// Where `scripts/install-deps.sh` installs etcd 3.5 (`etcd`, `etcdctl`, `etcdutl`):
/// `$ETCD35_BIN_DIR`, by default `/usr/local/lib/etcd-3.5`. Panics when a binary is missing
/// there: the 3.5 tests fail rather than skip, since CI installs it.
pub fn etcd35_dir() -> PathBuf {
    let dir = std::env::var_os("ETCD35_BIN_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/local/lib/etcd-3.5"));
    for tool in ["etcd", "etcdctl", "etcdutl"] {
        assert!(
            dir.join(tool).is_file(),
            "etcd 3.5's {tool} is not in {} ($ETCD35_BIN_DIR): run scripts/install-deps.sh",
            dir.display()
        );
    }
    dir
}

/// `name` in `bin_dir`, or `name` alone (found in `PATH`, Debian's etcd 3.4) without one.
/// The real etcdctl (of `bin_dir`, else the one on PATH) for `endpoints` (comma-separated),
/// with the test's client certificate when `pki`: every test reaches etcd through this.
pub fn etcdctl_at(bin_dir: Option<&Path>, endpoints: &str, pki: Option<&Pki>) -> Command {
    let mut cmd = Command::new(etcd_tool(bin_dir, "etcdctl"));
    cmd.env("ETCDCTL_API", "3").arg(format!("--endpoints={endpoints}"));
    if let Some(p) = pki {
        cmd.arg(format!("--cacert={}", p.ca.display()))
            .arg(format!("--cert={}", p.client_cert.display()))
            .arg(format!("--key={}", p.client_key.display()));
    }
    cmd
}

pub fn etcd_tool(bin_dir: Option<&Path>, name: &str) -> PathBuf {
    bin_dir.map_or_else(|| PathBuf::from(name), |d| d.join(name))
}

/// A single-member etcd on loopback, killed and removed on drop.
pub struct Etcd {
    pub endpoint: String,
    pub dir: TempDir,
    child: Child,
    /// Where its `etcd` and `etcdctl` are; `None` = `PATH`.
    bin_dir: Option<PathBuf>,
}

impl Etcd {
    pub fn start() -> Etcd {
        Etcd::start_with(None)
    }

    /// With `pki`, the client port speaks TLS and requires a client certificate.
    pub fn start_with(pki: Option<&Pki>) -> Etcd {
        Etcd::spawn(pki, None, free_port())
    }

    /// An etcd from the binaries in `bin_dir` (e.g. [`etcd35_dir`]); its [`Etcd::etcdctl`]
    /// is the one in `bin_dir` too.
    pub fn start_in(bin_dir: &Path) -> Etcd {
        Etcd::spawn_in(Some(bin_dir), None, None, free_port())
    }

    /// An etcd from the binaries in `bin_dir` serving a data directory made by `snapshot
    /// restore --name test0 --initial-cluster test0=http://127.0.0.1:<peer>`.
    pub fn start_restored_in(bin_dir: &Path, data: &Path, peer: u16) -> Etcd {
        Etcd::spawn_in(Some(bin_dir), None, Some(data), peer)
    }

    /// `snapshot` restored into `data` (with `etcdutl` of `bin_dir`, else etcd 3.4's
    /// `etcdctl` from `PATH`) and served by the etcd of the same place.
    pub fn from_snapshot(bin_dir: Option<&Path>, snapshot: &Path, data: &Path) -> Etcd {
        let peer = free_port();
        let restorer = if bin_dir.is_some() { "etcdutl" } else { "etcdctl" };
        let out = Command::new(etcd_tool(bin_dir, restorer))
            .env("ETCDCTL_API", "3")
            .args(["snapshot", "restore"])
            .arg(snapshot)
            .arg(format!("--data-dir={}", data.display()))
            .args([
                "--name=test0",
                &format!("--initial-cluster=test0=http://127.0.0.1:{peer}"),
            ])
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Etcd::spawn_in(bin_dir, None, Some(data), peer)
    }

    /// The path of `name` (`etcd`, `etcdctl`, `etcdutl`) of this etcd's version.
    pub fn tool(&self, name: &str) -> PathBuf {
        etcd_tool(self.bin_dir.as_deref(), name)
    }

    fn spawn(pki: Option<&Pki>, data: Option<&Path>, peer: u16) -> Etcd {
        Etcd::spawn_in(None, pki, data, peer)
    }

    /// Starts etcd and waits until it serves. A port that another test took between
    /// [`free_port`] and etcd's bind is the one failure worth another try (the suite runs
    /// dozens of servers at once): etcd exits naming it, and it is started again on fresh
    /// ports (the peer port too, unless a restored data directory fixed it).
    fn spawn_in(bin_dir: Option<&Path>, pki: Option<&Pki>, data: Option<&Path>, peer: u16) -> Etcd {
        let mut peer = peer;
        for attempt in 1.. {
            let mut etcd = Etcd::launch(bin_dir, pki, data, peer);
            match etcd.wait_ready() {
                Ok(()) => return etcd,
                Err(log) if attempt < 5 && log.contains("address already in use") => {
                    stop_group(&mut etcd.child, false);
                    if data.is_none() {
                        peer = free_port();
                    }
                }
                Err(log) => {
                    let tail: Vec<&str> = log.lines().rev().take(20).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    panic!(
                        "etcd did not start (attempt {attempt}); its log ends:\n{}",
                        tail.join("\n")
                    );
                }
            }
        }
        unreachable!()
    }

    fn launch(bin_dir: Option<&Path>, pki: Option<&Pki>, data: Option<&Path>, peer: u16) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let client = free_port();
        let data = data.map(Path::to_path_buf).unwrap_or_else(|| dir.path().join("data"));
        let scheme = if pki.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let mut cmd = Command::new(etcd_tool(bin_dir, "etcd"));
        cmd.arg("--name=test0")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!("--initial-cluster=test0=http://127.0.0.1:{peer}"))
            .arg("--quota-backend-bytes=8589934592")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(p) = pki {
            cmd.arg(format!("--cert-file={}", p.server_cert.display()))
                .arg(format!("--key-file={}", p.server_key.display()))
                .arg(format!("--trusted-ca-file={}", p.ca.display()))
                .arg("--client-cert-auth");
        }
        let child = spawn_group(&mut cmd).expect("etcd must be installed (Debian package etcd-server)");
        Etcd {
            endpoint,
            dir,
            child,
            bin_dir: bin_dir.map(Path::to_path_buf),
        }
    }

    /// Waits (up to 60 s: a loaded CI machine) for etcd's "ready" line; `Err` carries its
    /// log when it exited or never got there.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let log = self.dir.path().join("etcd.log");
        let read = || std::fs::read_to_string(&log).unwrap_or_default();
        while Instant::now() < deadline {
            if read().contains("ready to serve client requests") {
                return Ok(());
            }
            if !matches!(self.child.try_wait(), Ok(None)) {
                return Err(read());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(read())
    }

    /// Writes `count` keys of `value_len` bytes each with `etcdctl` (the real client).
    pub fn fill(&self, pki: Option<&Pki>, count: usize, value_len: usize) {
        fill_keys(|| self.etcdctl(pki), count, value_len);
    }

    pub fn etcdctl(&self, pki: Option<&Pki>) -> Command {
        etcdctl_at(self.bin_dir.as_deref(), &self.endpoint, pki)
    }

    pub fn put(&self, pki: Option<&Pki>, key: &str, value: &str) {
        let out = self.etcdctl(pki).args(["put", key, value]).output().unwrap();
        assert!(
            out.status.success(),
            "etcdctl put: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        stop_group(&mut self.child, false);
    }
}

/// Writes `count` keys `/registry/test/key-NNNNNN` of `value_len` bytes each through the
/// `etcdctl` that `ctl` makes, in transactions of 100 puts: fast enough for thousands of keys.
fn fill_keys(ctl: impl Fn() -> Command, count: usize, value_len: usize) {
    let value: String = (0..value_len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    let mut start = 0;
    while start < count {
        let end = (start + 100).min(count);
        let mut cmd = ctl();
        cmd.arg("txn")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        {
            let stdin = child.stdin.as_mut().unwrap();
            writeln!(stdin).unwrap(); // no compares
            for i in start..end {
                writeln!(stdin, "put /registry/test/key-{i:06} {value}").unwrap();
            }
            writeln!(stdin).unwrap();
            writeln!(stdin).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "etcdctl txn: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        start = end;
    }
}

/// `sha256sum -c SHA256SUMS` (the real tool) passes in `dir`.
pub fn assert_sha256sums(dir: &Path) {
    let out = Command::new("sha256sum")
        .arg("-c")
        .arg("SHA256SUMS")
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sha256sum -c in {}: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The manifest of a set a test makes up rather than takes: set `id` of cluster `cluster` with
/// `files`, taken at `created` (RFC 3339) by `node` for `trigger`, of a made-up etcd 3.4.23 at
/// revision 1; no elected run, no OpenShift facts, nothing forced.
pub fn made_up_manifest(
    cluster: &str,
    id: &str,
    created: &str,
    trigger: Trigger,
    node: &str,
    files: Vec<FileEntry>,
) -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        id: id.into(),
        created: created.into(),
        cluster_name: cluster.into(),
        trigger,
        run: None,
        node: node.into(),
        etcd: EtcdInfo {
            endpoint: "http://127.0.0.1:2379".into(),
            member_id: "1".into(),
            cluster_id: "2".into(),
            version: "3.4.23".into(),
            storage_version: None,
            revision: 1,
            db_size: 1,
        },
        openshift: None,
        files,
        tool: ToolInfo::this(),
        forced: Vec::new(),
        restore: Default::default(),
        derived: None,
    }
}

/// A manifest's entry for file `name` stored as it is (neither compressed nor encrypted), of
/// `size` bytes with SHA-256 `sha256`, on every target the set is on.
pub fn plain_file(name: &str, size: u64, sha256: &str) -> FileEntry {
    FileEntry {
        name: name.into(),
        stored_name: name.into(),
        size,
        sha256: sha256.into(),
        stored_size: size,
        stored_sha256: sha256.into(),
        compression: Compression::None,
        encryption: Encryption::None,
        targets: Vec::new(),
    }
}

/// `snapshot status -w json` of the snapshot file `snap` by `tool` (an `etcdctl`, or the
/// `etcdutl` with which 3.5 reads snapshot files), which must pass; what it says.
pub fn snapshot_status(mut tool: Command, snap: &Path) -> serde_json::Value {
    let out = tool
        .args(["snapshot", "status", "-w", "json"])
        .arg(snap)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} snapshot status: {}",
        Path::new(tool.get_program()).display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The result of running the binary.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_etcd-backupd");

/// The proxy variables the binary reads. Its runs never inherit them (one set where the
/// tests run would send loopback targets through that proxy); a test that wants one passes it.
pub const PROXY_VARS: [&str; 8] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// The binary with `args`, without the caller's `ETCD_BACKUPD_LOG` or proxy variables.
pub fn bin(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("ETCD_BACKUPD_LOG");
    for k in PROXY_VARS {
        cmd.env_remove(k);
    }
    cmd
}

pub fn run(args: &[&str]) -> Run {
    run_env(args, &[])
}

/// Runs the binary to its end; returns what it printed and its peak RSS in KiB: its VmHWM,
/// polled while it runs (wait4's ru_maxrss would also count this large, multi-threaded test
/// process, whose memory the child shares between spawn and exec).
pub fn run_rss(args: &[&str]) -> (Run, u64) {
    let mut child = bin(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let drain = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let hwm = |pid: u32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
        line.split_whitespace().next()?.parse::<u64>().ok()
    };
    let (mut peak, mut samples) = (0, 0);
    let status = loop {
        if let Some(kib) = hwm(child.id()) {
            peak = peak.max(kib);
            samples += 1;
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let run = Run {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    // A sampler that read nothing would pass any bound.
    assert!(
        samples > 0 && peak > 0,
        "{args:?}: {samples} VmHWM samples, peak {peak} KiB"
    );
    (run, peak)
}

/// Runs the binary to its end, with `env` added to a clean environment (see [`bin`]).
pub fn run_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = bin(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out: Output = cmd.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// [`run_env`] from an async test, off the runtime's threads.
pub async fn run_async(args: Vec<String>, env: Vec<(String, String)>) -> Run {
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run_env(&a, &e)
    })
    .await
    .unwrap()
}

/// [`run_async`] with nothing added to the environment.
pub async fn run_async_plain(args: Vec<String>) -> Run {
    run_async(args, Vec::new()).await
}

/// `list`, then `--config cfg`.
pub fn argv(list: &[&str], cfg: &Path) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    v.push("--config".into());
    v.push(cfg.to_str().unwrap().into());
    v
}

/// A long-running child of the binary (the daemon, or a `backup` to be killed) outside
/// systemd, logging to a file at `ETCD_BACKUPD_LOG=info` unless `env` says otherwise; its
/// process group is killed on drop.
pub struct Proc {
    pub child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(args: &[&str], log: PathBuf, env: &[(&str, &str)]) -> Proc {
        let mut cmd = bin(args);
        cmd.env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env("ETCD_BACKUPD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc {
            child: spawn_group(&mut cmd).unwrap(),
            log,
        }
    }

    /// `daemon --config cfg`.
    pub fn daemon(cfg: &Path, log: PathBuf, env: &[(&str, &str)]) -> Proc {
        Proc::spawn(&["daemon", "--config", cfg.to_str().unwrap()], log, env)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }

    /// kill -9, and reap it.
    pub fn sigkill(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The exit code once it exits within `within`.
    pub fn wait(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGTERM, then the exit code (within `within`).
    pub fn stop(&mut self, within: Duration) -> Option<i32> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait(within)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        stop_group(&mut self.child, false);
    }
}

/// A workspace for one test: a config file, staging and a file target.
pub struct Work {
    pub dir: TempDir,
}

impl Work {
    pub fn new() -> Work {
        let w = Work {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir(w.target_root()).unwrap();
        w
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> PathBuf {
        self.path().join("config.toml")
    }

    pub fn staging(&self) -> PathBuf {
        self.path().join("staging")
    }

    pub fn target_root(&self) -> PathBuf {
        self.path().join("target")
    }

    /// Writes a config for a plain or TLS etcd and a local target; `extra` is appended.
    pub fn write_config(&self, endpoint: &str, pki: Option<&Pki>, extra: &str) -> PathBuf {
        let mut c = Config::node("node-a", endpoint, &self.staging());
        if let Some(p) = pki {
            c = c.tls(p);
        }
        let url = format!("file://{}", self.target_root().display());
        c.target("local", &url).tail(extra).write(&self.config())
    }

    /// Points `snapshot.static_resources_dir` of the written config at `dir`.
    pub fn set_static_resources_dir(&self, dir: &Path) {
        let text = std::fs::read_to_string(self.config()).unwrap().replace(
            "static_resources_dir = \"\"",
            &format!("static_resources_dir = \"{}\"", dir.display()),
        );
        std::fs::write(self.config(), text).unwrap();
    }

    /// Writes a config for a plain etcd with the given `[[target]]` blocks (and any other
    /// keys after them).
    pub fn write_config_targets(&self, endpoint: &str, targets: &str) -> PathBuf {
        Config::node("node-a", endpoint, &self.staging())
            .tail(targets)
            .write(&self.config())
    }

    /// [`Work::write_config_targets`] with one target: [`dav_target`] at `url`, `extra` after it.
    pub fn write_dav_config(&self, endpoint: &str, url: &str, extra: &str) -> PathBuf {
        self.write_config_targets(endpoint, &dav_target(url, extra))
    }

    /// Complete set directories of cluster `test` on the target.
    pub fn sets(&self) -> Vec<PathBuf> {
        let dir = self.target_root().join("test");
        let mut v: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(e) => e.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        };
        v.sort();
        v
    }

    /// Every path under the target and staging, for "nothing was left behind" checks.
    pub fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return out;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(Work::files_under(&p));
            }
            out.push(p);
        }
        out.sort();
        out
    }

    /// Files (not directories) left in staging, but for the run lock, the marker and the node's
    /// state file, which stay.
    /// Files of half-assembled sets: there must never be any once a run has ended.
    pub fn staging_tmp_files(&self) -> Vec<PathBuf> {
        Work::files_under(&self.staging().join("tmp"))
            .into_iter()
            .filter(|p| p.is_file())
            .collect()
    }

    /// The complete sets in staging, oldest first, each with the targets still owed it.
    pub fn staged(&self) -> Vec<(String, Vec<String>)> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.staging().join("sets")) else {
            return out;
        };
        for e in entries.flatten() {
            let id = e.file_name().into_string().unwrap();
            assert!(
                e.path().join("manifest.json").is_file(),
                "staged set {id} has no manifest"
            );
            let pending = std::fs::read(e.path().join(".delivery.json"))
                .map(|b| {
                    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
                    v["pending"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_str().unwrap().to_string())
                        .collect()
                })
                .unwrap_or_default();
            out.push((id, pending));
        }
        out.sort();
        out
    }

    pub fn staging_files(&self) -> Vec<PathBuf> {
        let keep = [
            self.staging().join("lock"),
            self.staging().join(".etcd-backupd-staging"),
            self.staging().join("state.json"),
            self.staging().join("state.lock"),
        ];
        Work::files_under(&self.staging())
            .into_iter()
            .filter(|p| p.is_file() && !keep.contains(p))
            .collect()
    }
}

/// A `[[target]]` named `dav` at `url` (WebDAV), with `extra` lines after it.
pub fn dav_target(url: &str, extra: &str) -> String {
    format!("[[target]]\nname = \"dav\"\nurl = \"{url}\"\n{extra}")
}

/// A test node's configuration, built as data and rendered by the `toml` crate: the one
/// place that knows what every test config holds (cluster `test`, the node, its etcd with
/// short timeouts, staging, no static resources). Tables are set key by key ([`Config::set`])
/// or from a fragment ([`Config::merge`]); [`Config::tail`] appends TOML text after
/// everything (its bare keys apply to the last table rendered: the last `[[target]]` when
/// there is one).
pub struct Config {
    doc: toml::Table,
    tail: String,
}

impl Config {
    pub fn node(node: &str, endpoint: &str, staging: &Path) -> Config {
        let mut c = Config {
            doc: toml::Table::new(),
            tail: String::new(),
        };
        c.doc.insert("cluster_name".into(), "test".into());
        c.doc.insert("node_name".into(), node.into());
        c.set("etcd", "endpoints", toml::Value::Array(vec![endpoint.into()]))
            .set("etcd", "connect_timeout", "3s")
            .set("etcd", "request_timeout", "10s")
            .set("snapshot", "static_resources_dir", "")
            .set("snapshot", "staging_dir", staging.display().to_string())
    }

    /// etcd over TLS with the test's client certificate.
    pub fn tls(self, pki: &Pki) -> Config {
        self.set("etcd", "ca_file", pki.ca.display().to_string())
            .set("etcd", "cert_file", pki.client_cert.display().to_string())
            .set("etcd", "key_file", pki.client_key.display().to_string())
    }

    pub fn set(mut self, table: &str, key: &str, value: impl Into<toml::Value>) -> Config {
        let t = self
            .doc
            .entry(table)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t.as_table_mut().expect("a table").insert(key.into(), value.into());
        self
    }

    /// The keys of `fragment` (TOML text) into `[table]`.
    pub fn merge(mut self, table: &str, fragment: &str) -> Config {
        let keys: toml::Table = toml::from_str(fragment).unwrap_or_else(|e| panic!("{fragment:?}: {e}"));
        for (k, v) in keys {
            self = self.set(table, &k, v);
        }
        self
    }

    /// A `[[target]]` with its name and URL.
    pub fn target(mut self, name: &str, url: &str) -> Config {
        let mut t = toml::Table::new();
        t.insert("name".into(), name.into());
        t.insert("url".into(), url.into());
        let targets = self
            .doc
            .entry("target")
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        targets.as_array_mut().expect("an array").push(toml::Value::Table(t));
        self
    }

    pub fn tail(mut self, text: &str) -> Config {
        self.tail.push_str(text);
        self
    }

    pub fn render(&self) -> String {
        format!("{}\n{}", toml::to_string(&self.doc).unwrap(), self.tail)
    }

    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.render()).unwrap();
        path.to_path_buf()
    }
}

/// A `[[target]]` named `shared` on `w`'s file target: the one several nodes deliver to.
pub fn file_target(w: &Work) -> String {
    format!(
        "[[target]]\nname = \"shared\"\nurl = \"file://{}\"\n",
        w.target_root().display()
    )
}

/// A fixture of `/etc/kubernetes`: running manifests naming revision `rev` of each
/// component, with an older and a newer revision also on disk.
pub fn static_pod_fixture(root: &Path, rev: u32) {
    let components = ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd"];
    std::fs::create_dir_all(root.join("manifests")).unwrap();
    for c in components {
        let manifest = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {c}\nspec:\n  volumes:\n  - hostPath:\n      path: /etc/kubernetes/static-pod-resources/{c}-pod-{rev}\n    name: resource-dir\n  - hostPath:\n      path: /etc/kubernetes/static-pod-resources/{c}-certs\n    name: cert-dir\n"
        );
        std::fs::write(root.join("manifests").join(format!("{c}-pod.yaml")), manifest).unwrap();
        for r in [rev - 1, rev, rev + 1] {
            let d = root.join("static-pod-resources").join(format!("{c}-pod-{r}"));
            std::fs::create_dir_all(d.join("configmaps/config")).unwrap();
            std::fs::create_dir_all(d.join("secrets/serving-cert")).unwrap();
            std::fs::write(d.join("configmaps/config/config.yaml"), format!("{c} revision {r}\n")).unwrap();
            // What the platform's restore (4.12-4.17) copies back into /etc/kubernetes/manifests.
            std::fs::write(
                d.join(format!("{c}-pod.yaml")),
                format!("kind: Pod\n# {c} revision {r}\n"),
            )
            .unwrap();
            std::fs::write(d.join("secrets/serving-cert/tls.key"), "key material\n").unwrap();
            std::fs::set_permissions(
                d.join("secrets/serving-cert/tls.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
        }
        std::fs::create_dir_all(root.join("static-pod-resources").join(format!("{c}-certs"))).unwrap();
    }
}

/// The ClusterOperators `cluster-backup.sh` checks (and the native guard with it, on
/// OpenShift).
pub const OPERATORS: [&str; 4] = ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd"];

/// Puts ClusterOperator `name` with `Progressing=<status>` (`None`: no such condition).
pub fn put_operator(etcd: &Etcd, pki: Option<&Pki>, name: &str, progressing: Option<&str>) {
    let conditions: Vec<serde_json::Value> =
        std::iter::once(serde_json::json!({"type": "Available", "status": "True"}))
            .chain(progressing.map(|s| serde_json::json!({"type": "Progressing", "status": s})))
            .collect();
    etcd.put(
        pki,
        &format!("/kubernetes.io/config.openshift.io/clusteroperators/{name}"),
        &serde_json::json!({"metadata": {"name": name}, "status": {"conditions": conditions}}).to_string(),
    );
}

/// Each of the four ClusterOperators `Progressing=False`: a settled control plane, which
/// every test that puts a ClusterVersion (an OpenShift cluster) needs for a backup to go.
pub fn settle_operators(etcd: &Etcd, pki: Option<&Pki>) {
    for name in OPERATORS {
        put_operator(etcd, pki, name, Some("False"));
    }
}

/// A simulated control-plane host for `cluster-backup.sh` (the stand-in in
/// `tests/fixtures/`): a TLS etcd that requires client certificates, `/etc/kubernetes`
/// with static pod revisions (the manifests name `rev`) and the node's etcd client
/// certificate where the script looks for it, and the four ClusterOperators settled.
pub struct ScriptHost {
    pub etcd: Etcd,
    pub pki: Pki,
    /// The host's `/etc/kubernetes`.
    pub k8s: PathBuf,
}

impl ScriptHost {
    pub fn start(w: &Work, rev: u32) -> ScriptHost {
        let pki = Pki::new(w.path(), "script-host");
        let etcd = Etcd::start_with(Some(&pki));
        let k8s = w.path().join("etc-kubernetes");
        static_pod_fixture(&k8s, rev);
        let certs = k8s.join("static-pod-resources/etcd-certs");
        let bundle = certs.join("configmaps/etcd-all-bundles");
        let secrets = certs.join("secrets/etcd-all-certs");
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::create_dir_all(&secrets).unwrap();
        std::fs::copy(&pki.ca, bundle.join("server-ca-bundle.crt")).unwrap();
        std::fs::copy(&pki.client_cert, secrets.join("etcd-peer-node-a.crt")).unwrap();
        std::fs::copy(&pki.client_key, secrets.join("etcd-peer-node-a.key")).unwrap();
        settle_operators(&etcd, Some(&pki));
        ScriptHost { etcd, pki, k8s }
    }

    /// What the stand-in reads from the host, as environment.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("STANDIN_ENDPOINT", self.etcd.endpoint.clone()),
            ("STANDIN_K8S_DIR", self.k8s.display().to_string()),
            ("STANDIN_NODE", "node-a".to_string()),
        ]
    }

    /// A configuration of `w` for this host's etcd (TLS) with `snapshot.method = "script"`
    /// running `script`, with `snapshot_extra` in `[snapshot]` and `extra` at the end.
    pub fn config(&self, w: &Work, script: &Path, snapshot_extra: &str, extra: &str) -> PathBuf {
        let url = format!("file://{}", w.target_root().display());
        Config::node("node-a", &self.etcd.endpoint, &w.staging())
            .tls(&self.pki)
            .set("snapshot", "method", "script")
            .set("snapshot", "script", script.display().to_string())
            .merge("snapshot", snapshot_extra)
            .target("local", &url)
            .tail(extra)
            .write(&w.config())
    }

    /// Puts a key through the TLS client port.
    pub fn put(&self, key: &str, value: &str) {
        self.etcd.put(Some(&self.pki), key, value);
    }

    /// Runs the stand-in itself into `dir` (with `--force` first when `force`), with
    /// `extra` environment; returns its output.
    pub fn run_script(&self, dir: &Path, force: bool, extra: &[(&str, &str)]) -> std::process::Output {
        let mut cmd = Command::new(standin_script());
        if force {
            cmd.arg("--force");
        }
        cmd.arg(dir);
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }
}

/// The stand-in of the platform's `cluster-backup.sh`.
pub fn standin_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cluster-backup.sh")
}

/// A TCP proxy that forwards both ways and flips one bit of the server's bytes at
/// `flip_at`: corruption in transit, which a real etcd never produces on demand.
pub struct CorruptingProxy {
    pub port: u16,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl CorruptingProxy {
    pub async fn start(upstream: &str, flip_at: u64) -> CorruptingProxy {
        Self::start_with(upstream, Some(flip_at), None).await
    }

    /// Flips the byte at `flip_at` (if any) of what etcd sends, and paces what etcd sends
    /// to `rate` bytes per second (if set): a slow etcd.
    pub async fn start_with(upstream: &str, flip_at: Option<u64>, rate: Option<u64>) -> CorruptingProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let flip_at = flip_at.unwrap_or(u64::MAX);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = upstream.trim_start_matches("http://").to_string();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    c = listener.accept() => c.unwrap(),
                    _ = &mut stopped => return,
                };
                let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                tokio::spawn(async move {
                    let mut seen = 0u64;
                    let mut buf = vec![0u8; 16384];
                    let started = std::time::Instant::now();
                    loop {
                        if let Some(rate) = rate {
                            let due = std::time::Duration::from_secs_f64(seen as f64 / rate as f64);
                            tokio::time::sleep(due.saturating_sub(started.elapsed())).await;
                        }
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if seen <= flip_at && flip_at < seen + n as u64 {
                            buf[(flip_at - seen) as usize] ^= 0x10;
                        }
                        seen += n as u64;
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        CorruptingProxy { port, _stop: stop }
    }
}

/// An n-member etcd cluster on loopback (member `i` named `m<i>`, its data and `m<i>.log` in
/// `dir`); a member can be stopped and started again on its own data; each killed on drop.
pub struct EtcdCluster {
    pub endpoints: Vec<String>,
    pub dir: TempDir,
    /// Each member's `etcd` arguments, to start it again as it was.
    args: Vec<Vec<String>>,
    children: Vec<Option<Child>>,
    /// Where its `etcd` and `etcdctl` are; `None` = `PATH`.
    bin_dir: Option<PathBuf>,
}

impl EtcdCluster {
    pub fn start(n: usize) -> EtcdCluster {
        EtcdCluster::spawn_in(n, None)
    }

    /// A cluster of the binaries in `bin_dir` (e.g. [`etcd35_dir`]), whose
    /// [`EtcdCluster::etcdctl`] is the one in `bin_dir` too.
    pub fn start_in(n: usize, bin_dir: &Path) -> EtcdCluster {
        EtcdCluster::spawn_in(n, Some(bin_dir))
    }

    fn spawn_in(n: usize, bin_dir: Option<&Path>) -> EtcdCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect();
        let mut endpoints = Vec::new();
        let mut args = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let endpoint = format!("http://127.0.0.1:{client}");
            args.push(vec![
                format!("--name=m{i}"),
                format!("--data-dir={}", dir.path().join(format!("m{i}")).display()),
                format!("--listen-client-urls={endpoint}"),
                format!("--advertise-client-urls={endpoint}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-cluster={}", initial.join(",")),
                "--initial-cluster-state=new".into(),
                "--heartbeat-interval=50".into(),
                "--election-timeout=500".into(),
            ]);
            endpoints.push(endpoint);
        }
        let mut cluster = EtcdCluster {
            endpoints,
            dir,
            args,
            children: (0..n).map(|_| None).collect(),
            bin_dir: bin_dir.map(Path::to_path_buf),
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..n {
            cluster.wait_healthy(i, deadline);
        }
        cluster
    }

    /// Starts member `i` (its log appended to).
    fn spawn(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("m{i}.log")))
            .unwrap();
        let child = spawn_group(
            Command::new(etcd_tool(self.bin_dir.as_deref(), "etcd"))
                .args(&self.args[i])
                .stdout(Stdio::null())
                .stderr(log),
        )
        .expect("etcd");
        self.children[i] = Some(child);
    }

    fn wait_healthy(&self, i: usize, deadline: Instant) {
        loop {
            let ok = Command::new(etcd_tool(self.bin_dir.as_deref(), "etcdctl"))
                .env("ETCDCTL_API", "3")
                .args([&format!("--endpoints={}", self.endpoints[i]), "endpoint", "health"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "member {i} is not healthy: {}",
                std::fs::read_to_string(self.dir.path().join(format!("m{i}.log"))).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every member's endpoint, comma-separated (as `--endpoints` takes them).
    pub fn all(&self) -> String {
        self.endpoints.join(",")
    }

    pub fn etcdctl(&self) -> Command {
        etcdctl_at(self.bin_dir.as_deref(), &self.all(), None)
    }

    /// [`Etcd::fill`] through the whole cluster.
    pub fn fill(&self, count: usize, value_len: usize) {
        fill_keys(|| self.etcdctl(), count, value_len);
    }

    /// Stops member `i` (SIGKILL).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            stop_group(&mut c, false);
        }
    }

    /// Starts stopped member `i` again on its data, and waits (30 s at most) until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_healthy(i, Instant::now() + Duration::from_secs(30));
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            stop_group(c, false);
        }
    }
}
