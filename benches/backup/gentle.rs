//! `cargo bench --bench backup -- --gentle [--rounds 3] [--size-gib 1] [--load gateway|grpc]`:
//! what a backup costs etcd, round by round (issue 29's goals are per round, not a median).
//!
//! Each round, under the same put load (by default issue 29's: 4 closed-loop clients of
//! 1 KiB puts through etcd's JSON gateway), runs `etcdctl snapshot save`, then the load alone
//! for as long as etcdctl took (no backup), then `etcd-backupd backup` with its defaults
//! (the adaptive pace) and with `priority.etcd_latency_budget = "off"` (full speed), and
//! prints one row each: wall time, etcd's put latency and rate over the whole operation, and
//! the ratios the goals are stated in. Then each way once on a quiet etcd.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{Bench, Load, MIB, pct};

/// The put load.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LoadKind {
    /// 4 closed-loop clients of 1 KiB puts through etcd's JSON gateway (`/v3/kv/put`).
    Gateway,
    /// 8 closed-loop gRPC clients of 1 KiB puts (the benchmark's own).
    Grpc,
}

/// One way's run under the load.
struct Ran {
    wall: f64,
    load: Load,
    /// etcd-backupd's pace report (`backup --json`'s `pace`), when paced.
    pace: Option<serde_json::Value>,
}

impl Bench {
    /// The gateway load: 4 clients, each putting 1 KiB values in a closed loop.
    pub(super) async fn gateway_load(
        endpoint: String,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Vec<f64> {
        use base64::Engine;
        const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
        let client = reqwest::Client::new();
        let url = format!("{endpoint}/v3/kv/put");
        let tasks: Vec<_> = (0..4)
            .map(|w| {
                let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
                let value = B64.encode(vec![b'x'; 1024]);
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut i = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let key = B64.encode(format!("/bench/gw/{w}/{}", i % 1000));
                        let body = format!("{{\"key\":\"{key}\",\"value\":\"{value}\"}}");
                        let t = Instant::now();
                        let resp = client.post(&url).body(body).send().await.unwrap();
                        assert!(resp.status().is_success(), "{}", resp.status());
                        resp.bytes().await.unwrap();
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                        i += 1;
                    }
                    lat
                })
            })
            .collect();
        super::gather(tasks).await
    }

    /// `cmd` under the load; its stdout kept (for `--json`).
    fn ran_under_load(&self, cmd: &mut Command) -> (f64, Load, String) {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        std::thread::scope(|scope| {
            let d = done.clone();
            let load = scope.spawn(move || self.load(|| d.load(std::sync::atomic::Ordering::Relaxed), Duration::ZERO));
            let started = Instant::now();
            let out = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).output().unwrap();
            let wall = started.elapsed().as_secs_f64();
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            assert!(out.status.success(), "{cmd:?} failed");
            let load = load.join().unwrap();
            self.shed_load_history();
            (wall, load, String::from_utf8_lossy(&out.stdout).into_owned())
        })
    }

    fn backupd_json(&self, cfg: &Path) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_etcd-backupd"));
        c.args(["backup", "--json", "--no-election", "--config"])
            .arg(cfg)
            .env("HTTPS_PROXY", "")
            .env("https_proxy", "")
            .env_remove("NOTIFY_SOCKET");
        c
    }

    fn backupd_ran(&self, cfg: &Path) -> Ran {
        let (wall, load, out) = self.ran_under_load(&mut self.backupd_json(cfg));
        self.clear_server();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        Ran {
            wall,
            load,
            pace: v.get("pace").filter(|p| !p.is_null()).cloned(),
        }
    }

    pub(super) fn gentle(&self, rounds: usize) {
        let fill = self.fill();
        self.shed_load_history();
        println!(
            "etcd: {:.2} GiB database ({} keys); load: {:?}; machine: {} cores, {}\n",
            self.db_size() as f64 / MIB / 1024.0,
            fill.keys,
            self.load_kind,
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            super::cpu_model()
        );
        let adaptive = self.config("gentle-default", "");
        let off = self.config("gentle-off", "[priority]\netcd_latency_budget = \"off\"\n");
        let local = self.w().join("gentle-etcdctl.db");
        println!(
            "| round | way | wall s | vs etcdctl | put p50 ms | put p99 ms | put max ms | puts/s | p99 vs etcdctl | p99 vs no backup | puts/s vs etcdctl | slowed s | probe p50 ms (before) |"
        );
        println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for round in 1..=rounds {
            let _ = std::fs::remove_file(&local);
            let mut save = self.etcdctl();
            save.arg("snapshot").arg("save").arg(&local);
            let (wall, load, _) = self.ran_under_load(&mut save);
            let etcdctl = Ran { wall, load, pace: None };
            let alone = self.load(|| true, Duration::from_secs_f64(etcdctl.wall));
            self.shed_load_history();
            let none = Ran {
                wall: etcdctl.wall,
                load: alone,
                pace: None,
            };
            let default = self.backupd_ran(&adaptive);
            let full = self.backupd_ran(&off);
            for (way, r) in [
                ("no backup (the load alone)", &none),
                ("etcdctl snapshot save", &etcdctl),
                ("etcd-backupd, defaults (adaptive pace)", &default),
                ("etcd-backupd, etcd_latency_budget = \"off\"", &full),
            ] {
                print_round(round, way, r, &etcdctl, &none);
            }
        }
        let _ = std::fs::remove_file(&local);
        // On a quiet etcd: as fast as before?
        let quiet = |cmd: &mut Command| {
            let t = Instant::now();
            let ok = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap()
                .success();
            assert!(ok, "{cmd:?} failed");
            t.elapsed().as_secs_f64()
        };
        let mut save = self.etcdctl();
        save.arg("snapshot").arg("save").arg(&local);
        let e = quiet(&mut save);
        let d = quiet(&mut self.backupd_json(&adaptive));
        self.clear_server();
        let f = quiet(&mut self.backupd_json(&off));
        self.clear_server();
        let _ = std::fs::remove_file(&local);
        println!(
            "\nquiet etcd: etcdctl snapshot save {e:.2} s; etcd-backupd defaults {d:.2} s ({:.2}×); budget \"off\" {f:.2} s ({:.2}×)",
            d / e,
            f / e
        );
    }
}

fn print_round(round: usize, way: &str, r: &Ran, etcdctl: &Ran, none: &Ran) {
    let p99 = |l: &Load| pct(&l.sorted_ms, 0.99);
    let pace = |key: &str| {
        r.pace
            .as_ref()
            .and_then(|p| p[key].as_f64())
            .map_or("–".to_string(), |v| format!("{v:.2}"))
    };
    println!(
        "| {round} | {way} | {:.2} | {:.2}× | {:.2} | {:.2} | {:.2} | {:.0} | {:.2}× | {:.2}× | {:.2}× | {} | {} |",
        r.wall,
        r.wall / etcdctl.wall,
        pct(&r.load.sorted_ms, 0.5),
        p99(&r.load),
        r.load.sorted_ms.last().copied().unwrap_or(0.0),
        r.load.rate(),
        p99(&r.load) / p99(&etcdctl.load).max(1e-9),
        p99(&r.load) / p99(&none.load).max(1e-9),
        r.load.rate() / etcdctl.load.rate().max(1e-9),
        pace("slowed_s"),
        pace("baseline_ms"),
    );
}
