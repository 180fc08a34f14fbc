//! Wall-clock jumps around a scheduled time (libfaketime, Debian package faketime).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};

use crate::common::{Etcd, Proc, Work, file_target};
use crate::support::{NO_RETENTION, assert_complete, daemon_config, visible};

/// The daemon's wall clock, moved by libfaketime (the machine's clock is left alone; the
/// monotonic clock, which timers and leases use, is not faked, as after a real NTP step).
struct FakeClock {
    file: PathBuf,
    offset: i64,
}

impl FakeClock {
    fn lib() -> PathBuf {
        for p in [
            "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
            "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
            "/usr/lib/faketime/libfaketimeMT.so.1",
        ] {
            if Path::new(p).exists() {
                return p.into();
            }
        }
        panic!("libfaketime is needed (Debian package faketime)");
    }

    fn new(dir: &Path, at: DateTime<Utc>) -> FakeClock {
        let c = FakeClock {
            file: dir.join("faketime.rc"),
            offset: (at - Utc::now()).num_seconds(),
        };
        c.write();
        c
    }

    fn jump(&mut self, secs: i64) {
        self.offset += secs;
        self.write();
    }

    fn write(&self) {
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{:+}\n", self.offset)).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".into(), Self::lib().to_str().unwrap().into()),
            ("FAKETIME_TIMESTAMP_FILE".into(), self.file.to_str().unwrap().into()),
            ("FAKETIME_NO_CACHE".into(), "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ]
    }
}

fn wait_log(p: &Proc, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !p.log().contains(want) {
        assert!(Instant::now() < deadline, "no {want:?} in: {}", p.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A daily 02:30 schedule, no election (so the schedule alone must not repeat a run; the
/// election's run markers would hide a repeat). The clock jumps forward over the slot (run
/// once, late, within the daemon's 30 s re-check), back to before the slot just run (no
/// second run), then forward over two slots at once (one late run; the other not made up).
#[test]
fn clock_jumps_around_a_scheduled_time_run_it_once_and_never_twice() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();
    let day = (Utc::now() + TimeDelta::days(400)).date_naive();
    let slot = day.and_hms_opt(2, 30, 0).unwrap().and_utc();
    let ymd = |d: chrono::NaiveDate| d.format("%Y-%m-%d").to_string();
    let mut clock = FakeClock::new(w.path(), slot - TimeDelta::seconds(20));
    let extra = format!("{}{NO_RETENTION}", file_target(&w));
    let cfg = daemon_config(&w, "node-a", &etcd.endpoint, "0 30 2 * * *", "enabled = false", &extra);
    let env = clock.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut d = Proc::daemon(&cfg, w.path().join("daemon.log"), &env);
    wait_log(
        &d,
        &format!("next_run={} 02:30:00 UTC", ymd(day)),
        Duration::from_secs(20),
    );
    let root = w.target_root().join("test");

    // Forward one hour, over the slot.
    clock.jump(3600);
    let deadline = Instant::now() + Duration::from_secs(45);
    while visible(&root).is_empty() {
        assert!(Instant::now() < deadline, "the passed slot did not run: {}", d.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let first = visible(&root)[0].clone();
    assert!(
        first.starts_with(&format!("{}_03", ymd(day))),
        "taken at the new time: {first}"
    );
    let tomorrow = day.succ_opt().unwrap();
    wait_log(
        &d,
        &format!("next_run={} 02:30:00 UTC", ymd(tomorrow)),
        Duration::from_secs(10),
    );

    // Back to 02:20 of the same day, before the slot it just ran: nothing runs again.
    clock.jump(-3600 - 600);
    std::thread::sleep(Duration::from_secs(40));
    assert_eq!(visible(&root), vec![first.clone()], "{}", d.log());

    // Forward two days: the slots of day+1 and day+2 both passed; one late run, not two.
    clock.jump(2 * 86400 + 3600);
    let deadline = Instant::now() + Duration::from_secs(45);
    while visible(&root).len() < 2 {
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(40));
    assert_eq!(visible(&root).len(), 2, "{:?}: {}", visible(&root), d.log());
    let day3 = day + TimeDelta::days(3);
    wait_log(
        &d,
        &format!("next_run={} 02:30:00 UTC", ymd(day3)),
        Duration::from_secs(5),
    );
    assert_eq!(d.stop(Duration::from_secs(10)), Some(0), "{}", d.log());

    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.staging().join("state.json")).unwrap()).unwrap();
    let runs: Vec<(String, String)> = state["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["run"].as_str().unwrap().into(), r["result"].as_str().unwrap().into()))
        .collect();
    let key = |d: chrono::NaiveDate| etcd_backupd::etcd::election::run_key(d.and_hms_opt(2, 30, 0).unwrap().and_utc());
    assert_eq!(
        runs,
        vec![(key(tomorrow), "ok".to_string()), (key(day), "ok".to_string())],
        "newest first"
    );
    for id in visible(&root) {
        assert_complete(&root.join(id));
    }
}
