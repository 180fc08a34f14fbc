//! Property tests of the pure parts that meet untrusted or hand-written input: whatever
//! bytes a server or a file holds, the parsers answer with a value or an error, never a
//! panic; and retention's plan keeps its promises for any set of sets and any clock.

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;

use etcd_backupd::retention::{Policy, plan};

fn config() -> ProptestConfig {
    // Bounded, so the suite stays fast in CI.
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn propfind_never_panics(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = etcd_backupd::targets::propfind::parse(&body);
    }

    #[test]
    fn propfind_never_panics_on_xmlish_text(body in "(<[a-zA-Z:]{0,12}( [a-z:]{1,8}=\"[^\"]{0,12}\")?/?>|[^<]{0,16}|</[a-zA-Z:]{0,12}>|<!\\[CDATA\\[x\\]\\]>|&[a-z#0-9]{0,6};){0,40}") {
        let _ = etcd_backupd::targets::propfind::parse(body.as_bytes());
    }

    #[test]
    fn manifest_parse_never_panics_and_accepts_only_safe_names(body in proptest::collection::vec(any::<u8>(), 0..1024)) {
        if let Ok(m) = etcd_backupd::manifest::Manifest::parse(&body) {
            prop_assert!(m.files.iter().all(|f| !f.stored_name.contains('/') && !f.name.contains("..")));
        }
    }

    #[test]
    fn manifest_file_names_with_traversal_are_refused(name in "(\\.\\./|/|[a-z_]{0,8}/){1,3}snapshot_[a-z0-9]{0,8}\\.db") {
        let json = format!(
            r#"{{"format_version":1,"id":"2026-11-25_023012","created":"2026-11-25T02:30:12Z","cluster_name":"c","trigger":"manual","node":"n","etcd":{{"endpoint":"e","member_id":"1","cluster_id":"2","version":"3.4","revision":1,"db_size":1}},"openshift":null,"files":[{{"name":"{name}","stored_name":"{name}","size":1,"sha256":"ab","stored_size":1,"stored_sha256":"ab","compression":"none","encryption":"none"}}],"tool":{{"name":"t","version":"1"}}}}"#
        );
        prop_assert!(etcd_backupd::manifest::Manifest::parse(json.as_bytes()).is_err());
    }

    #[test]
    fn config_loader_answers_every_text_with_a_value_or_a_one_line_error(text in "([a-z_\\[\\]\\.]{1,20}( = (\"[^\"\\n]{0,20}\"|[0-9]{1,5}|true|\\[\\]))?\n){0,12}") {
        if let Err(e) = etcd_backupd::config::Settings::from_str_named("config.toml", &text) {
            let msg = e.to_string();
            prop_assert!(!msg.contains('\n'), "{msg}");
            prop_assert!(msg.starts_with("config.toml"), "{msg}");
        }
    }

    #[test]
    fn retention_always_keeps_the_newest_and_is_stable(
        ages in proptest::collection::vec(0i64..(400 * 24 * 3600), 1..60),
        last in 0u32..5, daily in 0u32..10, weekly in 0u32..6, monthly in 0u32..8,
        max_age_days in proptest::option::of(1u64..400), min_keep in 0u32..5,
        tz in prop_oneof![Just("UTC"), Just("Europe/Berlin"), Just("America/New_York"), Just("Asia/Kolkata")],
    ) {
        let now: DateTime<Utc> = Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap();
        let mut sets: Vec<(String, DateTime<Utc>)> = ages
            .iter()
            .map(|a| now - chrono::TimeDelta::seconds(*a))
            .map(|t| (etcd_backupd::manifest::timestamp(t), t))
            .collect();
        sets.sort();
        sets.dedup_by(|a, b| a.0 == b.0);
        let policy = Policy {
            keep_last: last, keep_daily: daily, keep_weekly: weekly, keep_monthly: monthly,
            max_age: max_age_days.map(|d| std::time::Duration::from_secs(d * 86400)),
            min_keep,
        };
        let tz: chrono_tz::Tz = tz.parse().unwrap();
        let decisions = plan(&sets, &policy, now, tz);
        prop_assert_eq!(decisions.len(), sets.len());
        // The newest set is always kept, and every decision says why.
        prop_assert!(decisions[0].keep);
        prop_assert!(decisions.iter().all(|d| !d.reasons.is_empty()));
        let kept: Vec<(String, DateTime<Utc>)> = decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| (d.id.clone(), d.created))
            .collect();
        // At least min_keep sets remain (when there are that many).
        prop_assert!(kept.len() >= (min_keep as usize).min(sets.len()));
        // Without max_age, pruning what was kept again deletes nothing more.
        if policy.max_age.is_none() {
            let again = plan(&kept, &policy, now, tz);
            prop_assert!(again.iter().all(|d| d.keep), "{:?}", again);
        }
        // An empty policy deletes nothing.
        if !policy.is_active() {
            prop_assert!(decisions.iter().all(|d| d.keep));
        }
    }
}
