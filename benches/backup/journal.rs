//! `cargo bench --bench backup -- --journal [--rounds 3] [--secs 30] [--load gateway|grpc]`:
//! what the continuous journal costs etcd, round by round, and what it gives.
//!
//! Each round, under the same put load (by default 4 closed-loop clients of 1 KiB puts through
//! etcd's JSON gateway), runs the load alone (A1), then with the daemon's journal writer on
//! (defaults: 10 s segments, to the WebDAV server at nice 19), then alone again (A2): the
//! A/A spread is what the load varies by itself, the goal is the journal within it + 5 % on
//! put p99 and rate. Before each journal round the target is emptied and a fresh set taken,
//! so the writer starts after it (no catch-up inside the measurement). During the round the
//! journal's lag (now minus the newest moment stored) is sampled every 0.5 s: the RPO. After
//! the last round: bytes per revision stored, and `fetch --at` of the round's last revision,
//! timed: replay speed, and what a day's chain at the measured write rate would take.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Bench, Load, pct};

/// One journal round's measurements.
struct Journaled {
    load: Load,
    /// Lag samples (s) once the first segment was stored.
    lag: Vec<f64>,
    /// Revisions stored in the round and the bytes they took on the target.
    revisions: i64,
    bytes: u64,
    last: i64,
}

impl Bench {
    fn journal_config(&self) -> std::path::PathBuf {
        // The replay with etcd 3.5's tools when installed (as OpenShift runs; it skips
        // fsync in the throwaway store), else 3.4's from PATH.
        let dir = std::path::Path::new("/usr/local/lib/etcd-3.5");
        let bin = if dir.join("etcdutl").is_file() {
            format!("\n[verify]\nbin_dir = \"{}\"\n", dir.display())
        } else {
            String::new()
        };
        self.config("journal", &format!("[journal]\nenabled = true\n{bin}"))
    }

    fn journal_daemon(&self, cfg: &Path) -> Child {
        let log = std::fs::File::create(super::logs_dir().join("journal-daemon.log")).unwrap();
        Command::new(env!("CARGO_BIN_EXE_etcd-backupd"))
            .args(["daemon", "--config"])
            .arg(cfg)
            .env("HTTPS_PROXY", "")
            .env("https_proxy", "")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// The staging state's journal: (durable revision, durable until as unix seconds).
    fn durable(&self) -> Option<(i64, f64)> {
        let state = std::fs::read(self.w().join("staging-journal").join("state.json")).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&state).ok()?;
        let j = &v["journal"];
        let until = chrono::DateTime::parse_from_rfc3339(j["durable_until"].as_str()?).ok()?;
        Some((
            j["durable_revision"].as_i64()?,
            until.timestamp_millis() as f64 / 1000.0,
        ))
    }

    /// The segments on the server: (revisions, bytes).
    fn stored_segments(&self) -> (i64, u64) {
        let dir = self.apache.root().join("bench").join("journal");
        let mut revisions = 0;
        let mut bytes = 0;
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(n) = etcd_backupd::journal::segment::parse_name(&name) {
                revisions += n.last - n.first + 1;
                bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
        (revisions, bytes)
    }

    fn journal_round(&self, cfg: &Path, secs: f64) -> Journaled {
        self.clear_server();
        let _ = std::fs::remove_dir_all(self.w().join("staging-journal"));
        let ok = self.backupd(cfg).status().unwrap().success();
        assert!(ok, "the set before the journal round failed");
        let mut daemon = self.journal_daemon(cfg);
        let started = Instant::now();
        while self.durable().is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the journal never stored a segment"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut lag = Vec::new();
        let mut next_sample = Instant::now();
        let t0 = Instant::now();
        let load = self.load(
            || {
                if Instant::now() >= next_sample {
                    next_sample += Duration::from_millis(500);
                    if let Some((_, until)) = self.durable() {
                        let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
                        lag.push(now - until);
                    }
                }
                t0.elapsed().as_secs_f64() >= secs
            },
            Duration::ZERO,
        );
        // SIGTERM: the open segment is stored.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(daemon.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = daemon.wait();
        let (revisions, bytes) = self.stored_segments();
        let last = self.durable().map(|(r, _)| r).unwrap_or(0);
        Journaled {
            load,
            lag,
            revisions,
            bytes,
            last,
        }
    }

    pub(super) fn journal(&self, rounds: usize, secs: f64) {
        let cfg = self.journal_config();
        println!(
            "load: {:?} for {secs} s per row; machine: {} cores, {}\n",
            self.load_kind,
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            super::cpu_model()
        );
        println!(
            "| round | way | put p50 ms | put p99 ms | puts/s | p99 vs A mean | puts/s vs A mean | A/A spread p99 | A/A spread puts/s | lag p50 s | lag max s |"
        );
        println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut last_round = None;
        for round in 1..=rounds {
            let a1 = self.load(|| true, Duration::from_secs_f64(secs));
            self.shed_load_history();
            let j = self.journal_round(&cfg, secs);
            self.shed_load_history();
            let a2 = self.load(|| true, Duration::from_secs_f64(secs));
            self.shed_load_history();
            let p99 = |l: &Load| pct(&l.sorted_ms, 0.99);
            let mean_p99 = (p99(&a1) + p99(&a2)) / 2.0;
            let mean_rate = (a1.rate() + a2.rate()) / 2.0;
            let spread_p99 = (p99(&a1) - p99(&a2)).abs() / p99(&a1).min(p99(&a2)).max(1e-9);
            let spread_rate = (a1.rate() - a2.rate()).abs() / a1.rate().min(a2.rate()).max(1e-9);
            for (way, l) in [
                ("A1: the load alone", &a1),
                ("journal on", &j.load),
                ("A2: the load alone", &a2),
            ] {
                let is_j = way == "journal on";
                let mut lag = j.lag.clone();
                lag.sort_by(f64::total_cmp);
                println!(
                    "| {round} | {way} | {:.2} | {:.2} | {:.0} | {:.2}× | {:.2}× | {} | {} | {} | {} |",
                    pct(&l.sorted_ms, 0.5),
                    p99(l),
                    l.rate(),
                    p99(l) / mean_p99.max(1e-9),
                    l.rate() / mean_rate.max(1e-9),
                    if is_j {
                        format!("{:.0} %", spread_p99 * 100.0)
                    } else {
                        "–".into()
                    },
                    if is_j {
                        format!("{:.0} %", spread_rate * 100.0)
                    } else {
                        "–".into()
                    },
                    if is_j {
                        format!("{:.1}", pct(&lag, 0.5))
                    } else {
                        "–".into()
                    },
                    if is_j {
                        format!("{:.1}", lag.last().copied().unwrap_or(f64::NAN))
                    } else {
                        "–".into()
                    },
                );
            }
            last_round = Some(j);
        }
        let Some(j) = last_round else { return };
        println!(
            "\nstored: {} revisions in {} bytes: {:.0} bytes per revision (the load's 1 KiB values of one repeated byte, zstd level 1); a segment at most every 10 s: up to 8640 a day per target",
            j.revisions,
            j.bytes,
            j.bytes as f64 / j.revisions.max(1) as f64
        );
        let dir = self.w().join("at");
        let _ = std::fs::remove_dir_all(&dir);
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_etcd-backupd"))
            .args(["fetch", "--json", "--at", &format!("rev:{}", j.last), "--to"])
            .arg(&dir)
            .arg("--config")
            .arg(&cfg)
            .env_remove("NOTIFY_SOCKET")
            .stderr(Stdio::null())
            .output()
            .unwrap();
        let wall = t.elapsed().as_secs_f64();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let replayed = v["at"]["revisions_replayed"].as_f64().unwrap_or(0.0);
        let secs_replay = v["at"]["seconds"].as_f64().unwrap_or(f64::NAN);
        let speed = replayed / secs_replay;
        let rate = j.load.rate();
        println!(
            "replay: fetch --at rev:{} replayed {replayed:.0} revisions in {secs_replay:.1} s ({speed:.0} revisions/s; the whole fetch {wall:.1} s); a day at {rate:.0} puts/s ({:.1} M revisions) would replay in {:.0} min",
            j.last,
            rate * 86400.0 / 1e6,
            rate * 86400.0 / speed / 60.0
        );
        let _ = std::fs::remove_dir_all(&dir);
        self.sizing(&cfg);
    }

    /// Bytes per revision for Kubernetes-like objects (the benchmark's own generator: pods,
    /// events, configmaps, secrets, CRD schemas), each written once then updated once.
    fn sizing(&self, cfg: &Path) {
        self.clear_server();
        let _ = std::fs::remove_dir_all(self.w().join("staging-journal"));
        assert!(self.backupd(cfg).status().unwrap().success());
        let mut daemon = self.journal_daemon(cfg);
        let endpoint = self.etcd.endpoint.clone();
        let (last, value_bytes) = self.rt.block_on(async move {
            let mut c = etcd_client::Client::connect([endpoint.as_str()], None).await.unwrap();
            let mut rng = super::Rng(0x5eed | 1);
            let mut bytes = 0usize;
            let mut rev = 0;
            for n in 0..20_000u64 {
                let (key, value) = super::object(&mut rng, n % 10_000);
                bytes += value.len();
                rev = c.put(key, value, None).await.unwrap().header().unwrap().revision();
            }
            (rev, bytes)
        });
        let started = Instant::now();
        while self.durable().is_none_or(|(r, _)| r < last) {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the sizing pass never became durable"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(daemon.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = daemon.wait();
        let (revisions, bytes) = self.stored_segments();
        println!(
            "stored, Kubernetes-like objects (mean value {:.0} bytes): {revisions} revisions in {bytes} bytes: {:.0} bytes per revision",
            value_bytes as f64 / 20_000.0,
            bytes as f64 / revisions.max(1) as f64
        );
        self.shed_load_history();
    }
}
