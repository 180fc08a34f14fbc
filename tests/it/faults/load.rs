//! Thousands of sets: listed and pruned in bounded time and memory.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};

use crate::common::{Work, run_rss};
use crate::restore::fake_set;
use crate::servers::Rclone;
use crate::support::entries;

/// 5000 sets on a file target: `list --json`, `prune --dry-run` and `prune` finish with the
/// exact plan `retention::plan` computes, in bounded time and under 100 MiB peak RSS each.
#[test]
fn thousands_of_sets_are_listed_and_pruned_in_bounded_memory() {
    const N: i64 = 5000;
    let w = Work::new();
    let newest = DateTime::from_timestamp(Utc::now().timestamp() - 3600, 0).unwrap();
    let sets: Vec<(String, DateTime<Utc>)> = (0..N)
        .map(|k| {
            let t = newest - TimeDelta::hours(3 * k);
            (fake_set(&w.target_root(), "test", t), t)
        })
        .collect();
    let cfg = w.write_config(
        "http://127.0.0.1:1",
        None,
        "\n[retention]\nkeep_last = 5\nkeep_daily = 14\nkeep_weekly = 8\nkeep_monthly = 12\nmin_keep = 3\n",
    );
    let policy = etcd_backupd::delivery::retention::Policy {
        keep_last: 5,
        keep_daily: 14,
        keep_weekly: 8,
        keep_monthly: 12,
        max_age: None,
        min_keep: 3,
    };
    let tz: chrono_tz::Tz = "UTC".parse().unwrap();
    let keep: BTreeSet<String> = etcd_backupd::delivery::retention::plan(&sets, &policy, Utc::now(), tz)
        .into_iter()
        .filter(|d| d.keep)
        .map(|d| d.id)
        .collect();
    let c = cfg.to_str().unwrap();

    let t = Instant::now();
    let (r, rss_list) = run_rss(&["list", "--json", "--config", c]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["sets"].as_array().unwrap().len(), N as usize);
    let list_time = t.elapsed();

    let (r, rss_dry) = run_rss(&["prune", "--dry-run", "--config", c]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains(&format!(
            "{N} set(s), keep {}, would delete {}",
            keep.len(),
            N as usize - keep.len()
        )),
        "{}",
        r.stdout.lines().take(3).collect::<Vec<_>>().join("\n")
    );
    let t = Instant::now();
    let (r, rss_prune) = run_rss(&["prune", "--config", c]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let prune_time = t.elapsed();
    let left: BTreeSet<String> = entries(&w.target_root().join("test")).into_iter().collect();
    assert_eq!(left, keep);
    eprintln!(
        "{N} sets: list {list_time:?} peak {rss_list} KiB; prune --dry-run peak {rss_dry} KiB; prune {prune_time:?} peak {rss_prune} KiB"
    );
    for (what, kib) in [("list", rss_list), ("prune --dry-run", rss_dry), ("prune", rss_prune)] {
        assert!(kib < 100 * 1024, "{what}: peak RSS {kib} KiB");
    }
    assert!(list_time < Duration::from_secs(60) && prune_time < Duration::from_secs(120));
}

/// The same on WebDAV (rclone), 1000 sets: one PROPFIND of the folder, a GET and a
/// PROPFIND per set, about two DELETEs per pruned set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sets_on_webdav_are_listed_and_pruned_in_bounded_memory() {
    const N: i64 = 1000;
    let rclone = Rclone::start();
    let w = Work::new();
    let newest = DateTime::from_timestamp(Utc::now().timestamp() - 3600, 0).unwrap();
    let sets: Vec<(String, DateTime<Utc>)> = (0..N)
        .map(|k| {
            let t = newest - TimeDelta::hours(5 * k);
            (fake_set(&rclone.root(), "test", t), t)
        })
        .collect();
    let cfg = w.write_config_targets(
        "http://127.0.0.1:1",
        &crate::common::dav_target(
            &rclone.url(),
            "\n[retention]\nkeep_last = 3\nkeep_daily = 7\nkeep_weekly = 4\nkeep_monthly = 6\nmin_keep = 3\n",
        ),
    );
    let policy = etcd_backupd::delivery::retention::Policy {
        keep_last: 3,
        keep_daily: 7,
        keep_weekly: 4,
        keep_monthly: 6,
        max_age: None,
        min_keep: 3,
    };
    let tz: chrono_tz::Tz = "UTC".parse().unwrap();
    let keep: BTreeSet<String> = etcd_backupd::delivery::retention::plan(&sets, &policy, Utc::now(), tz)
        .into_iter()
        .filter(|d| d.keep)
        .map(|d| d.id)
        .collect();
    let c = cfg.to_str().unwrap().to_string();
    let (list, prune) = tokio::task::spawn_blocking(move || {
        (
            run_rss(&["list", "--json", "--config", c.as_str()]),
            run_rss(&["prune", "--config", c.as_str()]),
        )
    })
    .await
    .unwrap();
    assert_eq!(list.0.code, 0, "{}", list.0.stderr);
    let v: serde_json::Value = serde_json::from_str(&list.0.stdout).unwrap();
    assert_eq!(v["sets"].as_array().unwrap().len(), N as usize);
    assert_eq!(prune.0.code, 0, "{}", prune.0.stderr);
    let left: BTreeSet<String> = entries(&rclone.root().join("test")).into_iter().collect();
    assert_eq!(left, keep);
    eprintln!("WebDAV {N} sets: list peak {} KiB, prune peak {} KiB", list.1, prune.1);
    assert!(list.1 < 100 * 1024 && prune.1 < 100 * 1024);
}
