//! Thousands of sets: listed and pruned in bounded time and memory.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};

use crate::common::{Work, run_rss};
use crate::restore::fake_set;
use crate::servers::Rclone;
use crate::support::entries;

/// `n` made-up sets of cluster `test` under `root`, the newest an hour old and each `hours`
/// older than the one before, with the times they were taken.
fn made_up_sets(root: &Path, n: i64, hours: i64) -> Vec<(String, DateTime<Utc>)> {
    let newest = DateTime::from_timestamp(Utc::now().timestamp() - 3600, 0).unwrap();
    (0..n)
        .map(|k| {
            let t = newest - TimeDelta::hours(hours * k);
            (fake_set(root, "test", t), t)
        })
        .collect()
}

/// Keep rules without max_age, `[keep_last, keep_daily, keep_weekly, keep_monthly, min_keep]`:
/// the `[retention]` table that says them, and the ids of `sets` that `retention::plan` keeps
/// under them now.
fn retention(sets: &[(String, DateTime<Utc>)], rules: [u32; 5]) -> (String, BTreeSet<String>) {
    let [keep_last, keep_daily, keep_weekly, keep_monthly, min_keep] = rules;
    let table = format!(
        "\n[retention]\nkeep_last = {keep_last}\nkeep_daily = {keep_daily}\nkeep_weekly = {keep_weekly}\nkeep_monthly = {keep_monthly}\nmin_keep = {min_keep}\n"
    );
    let policy = etcd_backupd::delivery::retention::Policy {
        keep_last,
        keep_daily,
        keep_weekly,
        keep_monthly,
        max_age: None,
        min_keep,
    };
    let tz: chrono_tz::Tz = "UTC".parse().unwrap();
    let keep = etcd_backupd::delivery::retention::plan(sets, &policy, Utc::now(), tz)
        .into_iter()
        .filter(|d| d.keep)
        .map(|d| d.id)
        .collect();
    (table, keep)
}

/// 5000 sets on a file target: `list --json`, `prune --dry-run` and `prune` finish with the
/// exact plan `retention::plan` computes, in bounded time and under 100 MiB peak RSS each.
#[test]
fn thousands_of_sets_are_listed_and_pruned_in_bounded_memory() {
    const N: i64 = 5000;
    let w = Work::new();
    let sets = made_up_sets(&w.target_root(), N, 3);
    let (table, keep) = retention(&sets, [5, 14, 8, 12, 3]);
    let cfg = w.write_config("http://127.0.0.1:1", None, &table);
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
    let sets = made_up_sets(&rclone.root(), N, 5);
    let (table, keep) = retention(&sets, [3, 7, 4, 6, 3]);
    let cfg = w.write_dav_config("http://127.0.0.1:1", &rclone.url(), &table);
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
