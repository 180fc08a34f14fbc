//! The backup benchmark: `cargo bench --bench backup [-- --size-gib 4] [--idle-secs 180]
//! [--only plain,zstd] [--server-nice 19] [--runs 3] [--load grpc|gateway]`, or with
//! `--gentle [--rounds 3]` only the comparison of issue 29 (see `backup/gentle.rs`), or with
//! `--journal [--rounds 3] [--secs 30]` the journal's cost and replay speed (`backup/journal.rs`).
//!
//! Starts a real etcd and Apache mod_dav (HTTPS, Basic auth; at nice 19, standing in for a
//! remote server) on loopback, fills etcd with Kubernetes-like objects until its database
//! holds about `--size-gib` GiB, then runs each way of taking an off-host backup twice (each
//! `--runs` times, showing the median run) and prints one table: on a quiet etcd, wall
//! time, CPU seconds (from `wait4`, children included), peak RSS (the largest process's
//! VmHWM, polled) and the ratios to the naive pipeline and to the raw snapshot stream; then
//! under a put load (8 writers of 1 KiB values), wall time and etcd's put latency and rate
//! over the whole operation, against `etcdctl snapshot save`'s. Then the idle daemon's RSS
//! and CPU. Nothing here asserts: it reports (see docs/performance.md).
//!
//! Each etcd-backupd run's log is kept in `target/bench-logs/<way>-quiet-<n>.log` and
//! `-loaded-<n>.log`.
//!
//! Needs what the tests need (`scripts/install-deps.sh`: etcd, etcdctl, apache2, curl) and
//! about 4× the database size free under `$TMPDIR`.

#[path = "../tests/it/common.rs"]
#[allow(dead_code)]
mod common;
#[path = "backup/gentle.rs"]
mod gentle;
#[path = "backup/journal.rs"]
mod journal;
#[path = "../tests/it/servers.rs"]
#[allow(dead_code)]
mod servers;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Etcd;
use servers::{Apache, DAV_USER};

const MIB: f64 = 1048576.0;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--raw-stream") {
        raw_stream(&args[2]);
        return;
    }
    // `cargo test --all-targets` runs bench targets too, without `--bench`: do nothing then.
    if !args.iter().any(|a| a == "--bench") {
        println!("the backup benchmark runs with: cargo bench --bench backup");
        return;
    }
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse::<f64>().unwrap_or_else(|_| panic!("{name} takes a number")))
    };
    let size_gib = flag("--size-gib").unwrap_or(1.0);
    let idle_secs = flag("--idle-secs").unwrap_or(180.0) as u64;
    // `--only plain,zstd`: just these etcd-backupd ways (by their log names), beside the
    // references every ratio needs (the load alone, etcdctl, naive, raw stream, curl).
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_string).collect());
    let server_nice = flag("--server-nice").unwrap_or(19.0) as i32;
    // Put p99 over a few seconds varies by a third from run to run: each way runs this many
    // times and shows its median run.
    let runs = (flag("--runs").unwrap_or(3.0) as usize).max(1);
    let load_kind = match args.iter().position(|a| a == "--load").and_then(|i| args.get(i + 1)) {
        Some(k) if k == "gateway" => gentle::LoadKind::Gateway,
        Some(k) if k == "grpc" => gentle::LoadKind::Grpc,
        Some(k) => panic!("--load takes gateway or grpc, not {k}"),
        // Issue 29's load for its own comparison (and the journal's); the benchmark's own for
        // the full table.
        None if args.iter().any(|a| a == "--gentle" || a == "--journal") => gentle::LoadKind::Gateway,
        None => gentle::LoadKind::Grpc,
    };
    let mut bench = Bench::new(size_gib, only, server_nice, runs);
    bench.load_kind = load_kind;
    if args.iter().any(|a| a == "--gentle") {
        let rounds = (flag("--rounds").unwrap_or(3.0) as usize).max(1);
        bench.gentle(rounds);
        return;
    }
    if args.iter().any(|a| a == "--journal") {
        let rounds = (flag("--rounds").unwrap_or(3.0) as usize).max(1);
        bench.journal(rounds, flag("--secs").unwrap_or(30.0));
        return;
    }
    bench.run(idle_secs);
}

/// The snapshot stream read and thrown away: the source's limit (run as a child process so
/// that it is measured like the others).
fn raw_stream(endpoint: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client = etcd_client::Client::connect([endpoint], None).await.unwrap();
        let mut stream = client.snapshot().await.unwrap();
        let mut n = 0usize;
        while let Some(msg) = stream.message().await.unwrap() {
            n += msg.blob().len();
        }
        assert!(n > 0);
    });
}

/// Wall time, CPU seconds (user + system) and peak RSS of one child and what it waited for.
#[derive(Clone, Copy)]
struct Measured {
    wall: f64,
    cpu: f64,
    rss_mib: f64,
}

// The child is reaped by wait4 (for its rusage), which clippy does not see.
#[allow(clippy::zombie_processes)]
fn measure(cmd: &mut Command) -> Measured {
    let started = Instant::now();
    let child = cmd.stdout(Stdio::null()).spawn().expect("spawn");
    let root = child.id();
    // Peak RSS is each process's own high-water mark (VmHWM), polled while it runs:
    // wait4's ru_maxrss would also count the memory the child shared with this process
    // between spawn and exec.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poll = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                for pid in tree(root) {
                    peak = peak.max(vm_kib(pid, "VmHWM:"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        })
    };
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid out-parameter for wait4.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, with valid pointers.
    let pid = unsafe { libc::wait4(root as i32, &mut status, 0, &mut ru) };
    let wall = started.elapsed().as_secs_f64();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak_kib = poll.join().unwrap();
    assert_eq!(pid, root as i32);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed (status {status})"
    );
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Measured {
        wall,
        cpu: secs(ru.ru_utime) + secs(ru.ru_stime),
        rss_mib: peak_kib as f64 / 1024.0,
    }
}

/// `root` and its descendants, from each thread's `/proc/<pid>/task/<tid>/children`: polled
/// every 10 ms, so it reads a few files rather than all of /proc (which cost a tenth of a
/// core, taken from whatever was measured).
fn tree(root: u32) -> Vec<u32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let pid = out[i];
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            out.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
        i += 1;
    }
    out
}

/// A `Vm...:` line of /proc/<pid>/status, in KiB (0 once the process is gone).
fn vm_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

struct Bench {
    etcd: Etcd,
    apache: Apache,
    work: tempfile::TempDir,
    size_gib: f64,
    only: Option<Vec<String>>,
    /// How many times each way runs (see [`Bench::both`]).
    runs: usize,
    rt: tokio::runtime::Runtime,
    load_kind: gentle::LoadKind,
}

struct Row {
    name: &'static str,
    /// On a quiet etcd; `None`: the load alone, nothing measured.
    quiet: Option<Measured>,
    /// Under the put load.
    loaded: Option<Measured>,
    /// Bytes that went to the server (or to disk, for etcdctl alone).
    stored: Option<u64>,
    /// etcd's put latencies (sorted, ms) and their rate, over the whole operation.
    load: Load,
    /// Each round's put p99 (ms) and rate under the load.
    rounds: Vec<(f64, f64)>,
}

/// The put load's latencies while one way ran.
#[derive(Clone, Default)]
struct Load {
    sorted_ms: Vec<f64>,
    secs: f64,
}

impl Load {
    fn rate(&self) -> f64 {
        self.sorted_ms.len() as f64 / self.secs.max(1e-9)
    }
}

impl Bench {
    fn new(size_gib: f64, only: Option<Vec<String>>, server_nice: i32, runs: usize) -> Bench {
        let rt = tokio::runtime::Runtime::new().unwrap();
        etcd_backupd::targets::webdav::install_crypto_provider();
        // The server stands in for a remote one: at nice 19 its decrypting and writing do
        // not compete with etcd for the CPU as they would not on a real control plane (the
        // method of issue 17's own measurements).
        let apache = Apache::start();
        apache.renice(server_nice);
        Bench {
            etcd: Etcd::start(),
            apache,
            work: tempfile::tempdir().unwrap(),
            size_gib,
            only,
            runs,
            rt,
            load_kind: gentle::LoadKind::Grpc,
        }
    }

    /// Whether the etcd-backupd way logged as `tag` runs (see `--only`).
    fn wanted(&self, tag: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.iter().any(|t| t == tag))
    }

    fn w(&self) -> &Path {
        self.work.path()
    }

    fn etcdctl(&self) -> Command {
        let mut c = Command::new("etcdctl");
        c.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.etcd.endpoint))
            .stderr(Stdio::null());
        c
    }

    fn curl_put(&self, file: &Path, name: &str) -> String {
        format!(
            "curl -sS --fail --cacert {} -u {DAV_USER}:{} -T {} {}{name}",
            self.apache.pki.ca.display(),
            self.apache.password,
            file.display(),
            self.apache.url()
        )
    }

    /// The shell `script` as a way that stores on the server (emptied after each run).
    fn to_server(&self, name: &'static str, script: &str) -> Row {
        self.both(
            name,
            || {
                let mut c = Command::new("sh");
                c.args(["-c", script]).stderr(Stdio::null());
                c
            },
            || self.clear_server(),
        )
    }

    /// Empties the server between cases.
    fn clear_server(&self) -> u64 {
        let root = self.apache.root();
        let bytes = du(&root);
        for e in std::fs::read_dir(&root).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
        bytes
    }

    fn config(&self, tag: &str, extra: &str) -> PathBuf {
        let pw = self.apache.password_file(self.w());
        let text = format!(
            "cluster_name = \"bench\"\nnode_name = \"bench-0\"\n\n[etcd]\nendpoints = [\"{}\"]\n\n[snapshot]\nstatic_resources_dir = \"\"\nstaging_dir = \"{}\"\n\n[delivery]\nkeep_local = 0\n\n[[target]]\nname = \"dav\"\nurl = \"{}\"\nusername = \"{DAV_USER}\"\npassword_file = \"{}\"\nca_file = \"{}\"\n\n{extra}\n",
            self.etcd.endpoint,
            self.w().join(format!("staging-{tag}")).display(),
            self.apache.url(),
            pw.display(),
            self.apache.pki.ca.display()
        );
        let p = self.w().join(format!("{tag}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    }

    fn backupd(&self, cfg: &Path) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_etcd-backupd"));
        c.args(["backup", "--no-election", "--config"])
            .arg(cfg)
            .env("HTTPS_PROXY", "")
            .env("https_proxy", "")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }

    /// `backup` with `cfg`, its log in `target/bench-logs/<tag>-quiet-<n>.log` on odd calls
    /// (the quiet runs) and `<tag>-loaded-<n>.log` on even ones.
    fn logged_backupd<'a>(&'a self, cfg: &'a Path, tag: &'a str) -> impl Fn() -> Command + 'a {
        let runs = std::cell::Cell::new(0);
        move || {
            let n = runs.replace(runs.get() + 1);
            let when = if n % 2 == 0 { "quiet" } else { "loaded" };
            let log = std::fs::File::create(logs_dir().join(format!("{tag}-{when}-{}.log", n / 2 + 1))).unwrap();
            let mut c = self.backupd(cfg);
            c.stderr(log);
            c
        }
    }

    fn run(self, idle_secs: u64) {
        let fill = self.fill();
        let db = self.db_size();
        println!(
            "etcd: {:.2} GiB database ({} keys, {:.0} MiB of values, filled at {:.0} MiB/s)\n",
            db as f64 / MIB / 1024.0,
            fill.keys,
            fill.bytes as f64 / MIB,
            fill.bytes as f64 / MIB / fill.secs
        );
        // Every way runs twice: on a quiet etcd (its speed), then under the same put load (8
        // writers of 1 KiB values, measured over the whole operation: what it costs etcd).
        let mut rows = Vec::new();
        let quiet = self.load(|| true, Duration::from_secs(10));
        self.shed_load_history();
        rows.push(Row {
            name: "no backup (the put load alone, 10 s)",
            quiet: None,
            loaded: None,
            stored: None,
            load: quiet,
            rounds: Vec::new(),
        });

        let local = self.w().join("etcdctl.db");
        rows.push(self.both(
            "etcdctl snapshot save (local disk)",
            || {
                let _ = std::fs::remove_file(&local);
                let mut c = self.etcdctl();
                c.arg("snapshot").arg("save").arg(&local);
                c
            },
            || std::fs::metadata(&local).unwrap().len(),
        ));

        let naive = self.w().join("naive.db");
        let script = format!(
            "set -e; rm -f {f}; ETCDCTL_API=3 etcdctl --endpoints={e} snapshot save {f} >/dev/null; cd {d} && sha256sum naive.db > naive.db.sha256; {put1}; {put2}",
            e = self.etcd.endpoint,
            f = naive.display(),
            d = self.w().display(),
            put1 = self.curl_put(&naive, "naive.db"),
            put2 = self.curl_put(&self.w().join("naive.db.sha256"), "naive.db.sha256"),
        );
        rows.push(self.to_server("naive: etcdctl save + sha256sum + curl -T", &script));
        let _ = std::fs::remove_file(&naive);

        let recipient = age::x25519::Identity::generate().to_public().to_string();
        let shm = Path::new("/dev/shm").join(format!("etcd-backupd-bench-{}", std::process::id()));
        for (name, tag, extra) in [
            (
                "etcd-backupd backup, plain (adaptive pace, the default)",
                "plain",
                String::new(),
            ),
            (
                "etcd-backupd backup, plain, full speed (priority.etcd_latency_budget = \"off\")",
                "plain-off",
                "[priority]\netcd_latency_budget = \"off\"\n".to_string(),
            ),
            (
                "etcd-backupd backup, plain, nice 0 (no low priority)",
                "plain-nice0",
                "[priority]\nnice = 0\nio_class = \"none\"\n".to_string(),
            ),
            (
                "etcd-backupd backup, plain, snapshot thread at nice 0 (priority.snapshot_nice = 0, as etcdctl runs)",
                "plain-snap0",
                "[priority]\nsnapshot_nice = 0\n".to_string(),
            ),
            (
                "etcd-backupd backup, plain, staging on tmpfs (another disk than the server's)",
                "plain-tmpfs",
                String::new(),
            ),
            (
                "etcd-backupd backup, zstd 3",
                "zstd",
                "[compression]\nzstd_level = 3\n".to_string(),
            ),
            (
                "etcd-backupd backup, zstd 3 + age",
                "zstd-age",
                format!("[compression]\nzstd_level = 3\n\n[encryption]\nage_recipients = [\"{recipient}\"]\n"),
            ),
        ] {
            if !self.wanted(tag) {
                continue;
            }
            let cfg = self.config(tag, &extra);
            if tag == "plain-tmpfs" {
                // The same machine has one disk: staging there competes with the server's
                // writes. /dev/shm stands in for a second disk.
                let text = std::fs::read_to_string(&cfg).unwrap().replace(
                    &format!("staging_dir = \"{}\"", self.w().join("staging-plain-tmpfs").display()),
                    &format!("staging_dir = \"{}\"", shm.display()),
                );
                std::fs::write(&cfg, text).unwrap();
            }
            let row = self.both(name, self.logged_backupd(&cfg, tag), || {
                let stored = self.clear_server();
                assert!(stored > 0, "{name}: nothing stored");
                stored
            });
            let _ = std::fs::remove_dir_all(&shm);
            rows.push(row);
        }

        // The same, to a local directory on the same disk (twice the writes, no network).
        if self.wanted("file") {
            rows.push(self.file_target());
        }

        let me = std::env::current_exe().unwrap();
        rows.push(self.both(
            "raw snapshot stream to /dev/null",
            || {
                let mut c = Command::new(&me);
                c.args(["--raw-stream", &self.etcd.endpoint]);
                c
            },
            || 0,
        ));
        rows.last_mut().unwrap().stored = None;
        rows.push(self.to_server("curl -T of the same bytes", &self.curl_put(&local, "raw.db")));
        // Our upload's length is not known while the snapshot streams: it goes chunked.
        let chunked = format!("{} < {}", self.curl_put(Path::new("-"), "raw.db"), local.display());
        rows.push(self.to_server("curl -T of the same bytes, chunked (from a pipe)", &chunked));
        print_table(&rows, std::fs::metadata(&local).unwrap().len());
        std::fs::remove_file(&local).unwrap();

        self.idle(idle_secs);
    }

    /// Runs the way `make` builds on a quiet etcd, then under the put load; `stored` says
    /// (and cleans up) what each run left on the server.
    /// Each is done `--runs` times; the row shows the median run (by wall time on the quiet
    /// etcd, by put p99 under the load) and the largest peak RSS of all runs.
    fn both(&self, name: &'static str, make: impl Fn() -> Command, stored: impl Fn() -> u64) -> Row {
        let mut quiet = Vec::new();
        let mut loaded = Vec::new();
        let mut bytes = 0;
        for _ in 0..self.runs {
            quiet.push(measure(&mut make()));
            bytes = stored();
            loaded.push(self.loaded(&mut make()));
            stored();
        }
        let peak = quiet
            .iter()
            .chain(loaded.iter().map(|(m, _)| m))
            .map(|m| m.rss_mib)
            .fold(0.0, f64::max);
        quiet.sort_by(|a, b| a.wall.total_cmp(&b.wall));
        let mut quiet = quiet.swap_remove(quiet.len() / 2);
        quiet.rss_mib = peak;
        let rounds = loaded
            .iter()
            .map(|(_, l)| (pct(&l.sorted_ms, 0.99), l.rate()))
            .collect();
        loaded.sort_by(|a, b| pct(&a.1.sorted_ms, 0.99).total_cmp(&pct(&b.1.sorted_ms, 0.99)));
        let (loaded, load) = loaded.swap_remove(loaded.len() / 2);
        Row {
            name,
            quiet: Some(quiet),
            loaded: Some(loaded),
            stored: Some(bytes),
            load,
            rounds,
        }
    }

    /// A plain backup to a local directory on the same disk as staging.
    fn file_target(&self) -> Row {
        let dir = self.w().join("file-target");
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = self.w().join("file.toml");
        std::fs::write(
            &cfg,
            format!(
                "cluster_name = \"bench\"\nnode_name = \"bench-0\"\n\n[etcd]\nendpoints = [\"{}\"]\n\n[snapshot]\nstatic_resources_dir = \"\"\nstaging_dir = \"{}\"\n\n[delivery]\nkeep_local = 0\n\n[[target]]\nname = \"dir\"\nurl = \"file://{}\"\n",
                self.etcd.endpoint,
                self.w().join("staging-file").display(),
                dir.display()
            ),
        )
        .unwrap();
        self.both(
            "etcd-backupd backup, plain, to file:// (staging and target on one disk)",
            self.logged_backupd(&cfg, "file"),
            || {
                let stored = du(&dir);
                std::fs::remove_dir_all(&dir).unwrap();
                std::fs::create_dir_all(&dir).unwrap();
                stored
            },
        )
    }

    fn db_size(&self) -> u64 {
        self.rt.block_on(async {
            let mut c = etcd_client::Client::connect([self.etcd.endpoint.as_str()], None)
                .await
                .unwrap();
            c.status().await.unwrap().db_size() as u64
        })
    }

    /// Puts Kubernetes-like objects (see [`object`]) from 16 concurrent writers until the
    /// database reaches the size asked for.
    fn fill(&self) -> Filled {
        let target = (self.size_gib * 1024.0 * MIB) as u64;
        let started = Instant::now();
        let (keys, bytes) = self.rt.block_on(async {
            let client = etcd_client::Client::connect([self.etcd.endpoint.as_str()], None)
                .await
                .unwrap();
            let mut total = (0u64, 0u64);
            loop {
                let mut tasks = Vec::new();
                for w in 0..16u64 {
                    let mut kv = client.kv_client();
                    let seed = total.0 * 31 + w + 1;
                    tasks.push(tokio::spawn(async move {
                        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
                        let (mut k, mut b) = (0u64, 0u64);
                        for i in 0..200 {
                            let (key, value) = object(&mut rng, seed * 1000 + i);
                            b += value.len() as u64;
                            kv.put(key, value, None).await.unwrap();
                            k += 1;
                        }
                        (k, b)
                    }));
                }
                for t in tasks {
                    let (k, b) = t.await.unwrap();
                    total.0 += k;
                    total.1 += b;
                }
                let mut c = client.clone();
                if c.status().await.unwrap().db_size() as u64 >= target {
                    return total;
                }
            }
        });
        Filled {
            keys,
            bytes,
            secs: started.elapsed().as_secs_f64(),
        }
    }

    /// The daemon between runs: RSS sampled every second, CPU from /proc.
    fn idle(&self, secs: u64) {
        let cfg = self.config("idle", "[schedule]\ncron = \"0 0 3 1 1 *\"\n");
        let mut child = Command::new(env!("CARGO_BIN_EXE_etcd-backupd"))
            .args(["daemon", "--config"])
            .arg(&cfg)
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        std::thread::sleep(Duration::from_secs(5)); // started, connected, settled
        let cpu0 = proc_cpu(pid);
        let mut rss: Vec<f64> = Vec::new();
        for _ in 0..secs {
            std::thread::sleep(Duration::from_secs(1));
            rss.push(proc_rss_mib(pid));
        }
        let cpu = proc_cpu(pid) - cpu0;
        child.kill().unwrap();
        child.wait().unwrap();
        let max = rss.iter().cloned().fold(0.0, f64::max);
        println!(
            "\nidle daemon over {secs} s: RSS {:.1} MiB (max {max:.1}), CPU {cpu:.2} s in /proc's 10 ms ticks ({:.3}% of one core)",
            rss.iter().sum::<f64>() / rss.len().max(1) as f64,
            cpu / secs as f64 * 100.0
        );
    }

    /// `measure(cmd)` with the put load running beside it.
    fn loaded(&self, cmd: &mut Command) -> (Measured, Load) {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        std::thread::scope(|scope| {
            let d = done.clone();
            let load = scope.spawn(move || self.load(|| d.load(std::sync::atomic::Ordering::Relaxed), Duration::ZERO));
            let m = measure(cmd);
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            let load = load.join().unwrap();
            self.shed_load_history();
            (m, load)
        })
    }

    /// The load's puts leave old revisions behind: compacted and defragmented away after
    /// each way, so every way snapshots the same database.
    fn shed_load_history(&self) {
        self.rt.block_on(async {
            let mut c = etcd_client::Client::connect([self.etcd.endpoint.as_str()], None)
                .await
                .unwrap();
            let rev = c.get("/bench/none", None).await.unwrap().header().unwrap().revision();
            c.compact(rev, Some(etcd_client::CompactionOptions::new().with_physical()))
                .await
                .unwrap();
            c.defragment().await.unwrap();
        });
    }

    /// Runs the load until `done` says so (and at least `min`): its sorted latencies in ms,
    /// over the time it ran.
    fn load(&self, mut done: impl FnMut() -> bool, min: Duration) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let endpoint = self.etcd.endpoint.clone();
        let s = stop.clone();
        let kind = self.load_kind;
        let handle = self.rt.spawn(async move {
            if kind == gentle::LoadKind::Gateway {
                return Bench::gateway_load(endpoint, s).await;
            }
            let client = etcd_client::Client::connect([endpoint.as_str()], None).await.unwrap();
            let tasks: Vec<_> = (0..8)
                .map(|w| {
                    let mut kv = client.kv_client();
                    let s = s.clone();
                    tokio::spawn(async move {
                        let mut lat = Vec::new();
                        let value = vec![b'x'; 1024];
                        let mut i = 0u64;
                        while !s.load(std::sync::atomic::Ordering::Relaxed) {
                            let t = Instant::now();
                            kv.put(format!("/bench/load/{w}/{}", i % 1000), value.clone(), None)
                                .await
                                .unwrap();
                            lat.push(t.elapsed().as_secs_f64() * 1000.0);
                            i += 1;
                        }
                        lat
                    })
                })
                .collect();
            gather(tasks).await
        });
        let started = Instant::now();
        while !(done() && started.elapsed() >= min) {
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let secs = started.elapsed().as_secs_f64();
        let mut l = self.rt.block_on(handle).unwrap();
        l.sort_by(f64::total_cmp);
        Load { sorted_ms: l, secs }
    }
}

/// Every client's latencies, once each has stopped.
async fn gather(tasks: Vec<tokio::task::JoinHandle<Vec<f64>>>) -> Vec<f64> {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Where each etcd-backupd run's log goes: `target/bench-logs/<way>-quiet-<n>.log` and `-loaded-<n>.log`.
fn logs_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-logs");
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Filled {
    keys: u64,
    bytes: u64,
    secs: f64,
}

fn print_table(rows: &[Row], snapshot_bytes: u64) {
    let find = |prefix: &str| rows.iter().find(|r| r.name.starts_with(prefix)).unwrap();
    let (naive, raw, etcdctl, alone) = (find("naive"), find("raw"), find("etcdctl"), find("no backup"));
    let wall = |m: Option<Measured>| m.map_or(0.0, |m| m.wall);
    println!(
        "snapshot: {:.0} MiB; machine: {} cores, {}\n",
        snapshot_bytes as f64 / MIB,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        cpu_model()
    );
    println!(
        "| way | quiet: wall s | vs naive | vs raw stream | CPU s | peak RSS MiB | stored MiB | under load: wall s | vs naive | put p50 ms | put p99 ms | put max ms | puts/s | p99 vs etcdctl | p99 vs no backup | puts/s vs etcdctl |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let p99 = |l: &Load| pct(&l.sorted_ms, 0.99);
    let dash = || "–".to_string();
    for r in rows {
        let q = |f: &dyn Fn(&Measured) -> String| r.quiet.as_ref().map_or_else(dash, f);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2}× | {:.2}× | {:.2}× |",
            r.name,
            q(&|m| format!("{:.2}", m.wall)),
            q(&|m| format!("{:.2}×", m.wall / wall(naive.quiet))),
            q(&|m| format!("{:.2}×", m.wall / wall(raw.quiet))),
            q(&|m| format!("{:.2}", m.cpu)),
            q(&|m| format!("{:.1}", m.rss_mib)),
            r.stored.map_or_else(dash, |b| format!("{:.0}", b as f64 / MIB)),
            r.loaded.map_or(r.load.secs, |m| m.wall),
            r.loaded
                .map_or_else(dash, |m| format!("{:.2}×", m.wall / wall(naive.loaded))),
            pct(&r.load.sorted_ms, 0.50),
            p99(&r.load),
            r.load.sorted_ms.last().copied().unwrap_or(0.0),
            r.load.rate(),
            p99(&r.load) / p99(&etcdctl.load).max(1e-9),
            p99(&r.load) / p99(&alone.load).max(1e-9),
            r.load.rate() / etcdctl.load.rate().max(1e-9),
        );
    }
    // Every round, not only the median: p99 varies by a third from run to run.
    println!("\nevery round under the load (put p99 ms, puts/s):\n");
    for r in rows.iter().filter(|r| !r.rounds.is_empty()) {
        let rounds: Vec<String> = r.rounds.iter().map(|(p, n)| format!("{p:.2} ms, {n:.0}/s")).collect();
        println!("- {}: {}", r.name, rounds.join("; "));
    }
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn du(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| {
                    let e = e.unwrap();
                    let m = e.metadata().unwrap();
                    if m.is_dir() { du(&e.path()) } else { m.len() }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn proc_rss_mib(pid: u32) -> f64 {
    vm_kib(pid, "VmRSS:") as f64 / 1024.0
}

fn proc_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / tick
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default()
}

/// A small deterministic generator (xorshift64*): the data is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn hex(&mut self, len: usize) -> String {
        (0..len)
            .map(|_| char::from(b"0123456789abcdef"[self.below(16) as usize]))
            .collect()
    }

    fn uid(&mut self) -> String {
        format!(
            "{}-{}-{}-{}-{}",
            self.hex(8),
            self.hex(4),
            self.hex(4),
            self.hex(4),
            self.hex(12)
        )
    }

    /// Random bytes as base64 (Secret data: incompressible beyond base64's own 4/3).
    fn b64(&mut self, len: usize) -> String {
        use base64::Engine;
        let bytes: Vec<u8> = (0..len).map(|_| self.next() as u8).collect();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }
}

const NAMESPACES: [&str; 12] = [
    "openshift-etcd",
    "openshift-kube-apiserver",
    "openshift-monitoring",
    "openshift-ingress",
    "openshift-console",
    "openshift-authentication",
    "openshift-machine-api",
    "openshift-image-registry",
    "payments",
    "checkout",
    "search",
    "default",
];

/// One Kubernetes-like object: a key under `/kubernetes.io/` and a JSON value shaped like
/// the API server's (metadata with uids, labels, managedFields; spec/data by kind). The mix
/// (by count): pods 30%, events 25%, configmaps 20%, secrets 15%, CRD-like schemas 10%.
fn object(rng: &mut Rng, n: u64) -> (String, String) {
    let ns = NAMESPACES[rng.below(NAMESPACES.len() as u64) as usize];
    let app = ["api", "web", "worker", "cache", "operator", "controller"][rng.below(6) as usize];
    let name = format!("{app}-{}-{}", rng.hex(10), rng.hex(5));
    let meta = format!(
        r#""metadata":{{"name":"{name}","namespace":"{ns}","uid":"{}","resourceVersion":"{}","creationTimestamp":"2026-11-{:02}T{:02}:{:02}:{:02}Z","labels":{{"app":"{app}","pod-template-hash":"{}","app.kubernetes.io/part-of":"{ns}"}},"annotations":{{"openshift.io/scc":"restricted-v2","k8s.ovn.org/pod-networks":"{{\"default\":{{\"ip_addresses\":[\"10.128.{}.{}/23\"],\"mac_address\":\"0a:58:0a:80:{:02x}:{:02x}\"}}}}"}},"managedFields":[{{"manager":"kube-controller-manager","operation":"Update","apiVersion":"v1","time":"2026-11-20T10:00:00Z","fieldsType":"FieldsV1","fieldsV1":{{"f:metadata":{{"f:labels":{{".":{{}},"f:app":{{}}}}}},"f:spec":{{"f:containers":{{}}}}}}}}]}}"#,
        rng.uid(),
        100000 + n,
        1 + rng.below(28),
        rng.below(24),
        rng.below(60),
        rng.below(60),
        rng.hex(10),
        rng.below(256),
        rng.below(256),
        rng.below(256),
        rng.below(256)
    );
    let kind = rng.below(100);
    if kind < 30 {
        let containers: Vec<String> = (0..1 + rng.below(4))
            .map(|i| {
                format!(
                    r#"{{"name":"c{i}","image":"quay.io/openshift-release-dev/ocp-v4.0-art-dev@sha256:{}","args":["--v=2","--port={}"],"env":[{{"name":"POD_NAME","valueFrom":{{"fieldRef":{{"fieldPath":"metadata.name"}}}}}},{{"name":"GOMAXPROCS","value":"{}"}}],"resources":{{"requests":{{"cpu":"{}m","memory":"{}Mi"}}}},"volumeMounts":[{{"name":"kube-api-access-{}","readOnly":true,"mountPath":"/var/run/secrets/kubernetes.io/serviceaccount"}}],"terminationMessagePolicy":"FallbackToLogsOnError","imagePullPolicy":"IfNotPresent"}}"#,
                    rng.hex(64),
                    8000 + rng.below(1000),
                    1 + rng.below(8),
                    10 + rng.below(500),
                    50 + rng.below(2000),
                    rng.hex(5)
                )
            })
            .collect();
        let v = format!(
            r#"{{"kind":"Pod","apiVersion":"v1",{meta},"spec":{{"containers":[{}],"nodeName":"master-{}","serviceAccountName":"{app}","priorityClassName":"system-cluster-critical"}},"status":{{"phase":"Running","podIP":"10.128.{}.{}","startTime":"2026-11-20T10:00:00Z"}}}}"#,
            containers.join(","),
            rng.below(3),
            rng.below(256),
            rng.below(256)
        );
        (format!("/kubernetes.io/pods/{ns}/{name}"), v)
    } else if kind < 55 {
        let v = format!(
            r#"{{"kind":"Event","apiVersion":"v1",{meta},"involvedObject":{{"kind":"Pod","namespace":"{ns}","name":"{name}","uid":"{}"}},"reason":"{}","message":"{} {}","source":{{"component":"kubelet","host":"master-{}"}},"count":{},"type":"Normal"}}"#,
            rng.uid(),
            ["Pulled", "Created", "Started", "Scheduled", "BackOff"][rng.below(5) as usize],
            "Container image already present on machine; pulled in",
            rng.below(10000),
            rng.below(3),
            1 + rng.below(50)
        );
        (format!("/kubernetes.io/events/{ns}/{name}.{}", rng.hex(16)), v)
    } else if kind < 75 {
        let lines: Vec<String> = (0..20 + rng.below(400))
            .map(|i| {
                let len = 1 + rng.below(24) as usize;
                format!("    setting_{i}: {}", rng.hex(len))
            })
            .collect();
        let v = format!(
            r#"{{"kind":"ConfigMap","apiVersion":"v1",{meta},"data":{{"config.yaml":"apiVersion: v1\nkind: Config\nsettings:\n{}\n"}}}}"#,
            lines.join("\\n")
        );
        (format!("/kubernetes.io/configmaps/{ns}/{name}"), v)
    } else if kind < 90 {
        let crt = 1200 + rng.below(2000) as usize;
        let v = format!(
            r#"{{"kind":"Secret","apiVersion":"v1",{meta},"type":"kubernetes.io/tls","data":{{"tls.crt":"{}","tls.key":"{}"}}}}"#,
            rng.b64(crt),
            rng.b64(1190)
        );
        (format!("/kubernetes.io/secrets/{ns}/{name}"), v)
    } else {
        let props: Vec<String> = (0..50 + rng.below(600))
            .map(|i| {
                format!(
                    r#""field{i}":{{"description":"{} controls how the operator reconciles the {} of this resource; see the documentation for details.","type":"{}"}}"#,
                    rng.hex(6),
                    ["replicas", "routes", "certificates", "storage"][rng.below(4) as usize],
                    ["string", "integer", "boolean", "object"][rng.below(4) as usize]
                )
            })
            .collect();
        let v = format!(
            r#"{{"kind":"CustomResourceDefinition","apiVersion":"apiextensions.k8s.io/v1",{meta},"spec":{{"group":"{app}.openshift.io","versions":[{{"name":"v1","served":true,"storage":true,"schema":{{"openAPIV3Schema":{{"type":"object","properties":{{{}}}}}}}}}]}}}}"#,
            props.join(",")
        );
        (
            format!("/kubernetes.io/apiextensions.k8s.io/customresourcedefinitions/{name}"),
            v,
        )
    }
}
