//! Property tests of the pure parts that meet untrusted or hand-written input: whatever
//! bytes a server or a file holds, the parsers answer with a value or an error, never a
//! panic; and retention's plan keeps its promises for any set of sets and any clock.

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;

use etcd_backupd::delivery::retention::{Policy, plan};
use etcd_backupd::manifest::{Manifest, Trigger};

use crate::common::{made_up_manifest, plain_file};

fn config() -> ProptestConfig {
    // Bounded, so the suite stays fast in CI.
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

/// A manifest that `Manifest::parse` accepts, with a snapshot and an archive; `names` puts a
/// file name into a slot: 0/1 the snapshot's `name`/`stored_name`, 2/3 the archive's.
fn manifest_naming(names: &[(usize, String)]) -> Manifest {
    let entry = |name: &str| plain_file(name, 3, &"ab".repeat(32));
    let mut m = made_up_manifest(
        "c",
        "2026-11-25_023012",
        "2026-11-25T02:30:12Z",
        Trigger::Manual,
        "n",
        vec![
            entry("snapshot_2026-11-25_023012.db"),
            entry("static_kuberesources_2026-11-25_023012.tar.gz"),
        ],
    );
    for (slot, name) in names {
        let f = &mut m.files[slot / 2];
        *(if slot % 2 == 0 { &mut f.name } else { &mut f.stored_name }) = name.clone();
    }
    m
}

/// The rule, stated independently of the code: a plain file name (no separator, no control
/// character) with one of the platform's prefixes.
fn allowed(name: &str) -> bool {
    (name.starts_with("snapshot_") || name.starts_with("static_kuberesources_"))
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control)
}

const PREFIXES: [&str; 3] = ["snapshot_", "static_kuberesources_", ""];

/// Names that must never be accepted: traversal, separators, control characters, the
/// special names, and names without a platform prefix.
fn hostile_file_name() -> impl Strategy<Value = String> {
    let bad = prop_oneof![
        Just("/"),
        Just("\\"),
        Just("\0"),
        Just("\n"),
        Just("\r"),
        Just("\t"),
        Just("\u{1b}[31m"),
        Just("\u{7f}"),
        Just("\u{85}"),
        Just("/../"),
        Just("../"),
        Just("..\\"),
    ];
    prop_oneof![
        (
            proptest::sample::select(&PREFIXES[..]),
            "[a-z0-9_.-]{0,8}",
            bad,
            "[a-z0-9_.-]{0,8}"
        )
            .prop_map(|(p, l, b, r)| format!("{p}{l}{b}{r}")),
        proptest::sample::select(vec![
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/etc/passwd",
            "evil.db",
            "snapshot",
            "Snapshot_x.db",
            " snapshot_x.db",
        ])
        .prop_map(str::to_string),
        "[a-z0-9_.-]{0,12}".prop_filter("no platform prefix", |n| {
            !n.starts_with("snapshot_") && !n.starts_with("static_kuberesources_")
        }),
    ]
}

/// Good and bad names mixed: a prefix (or none) and text that may hold anything.
fn any_file_name() -> impl Strategy<Value = String> {
    prop_oneof![
        hostile_file_name(),
        (proptest::sample::select(&PREFIXES[..]), r"[a-zA-Z0-9_.~ é-]{0,16}").prop_map(|(p, r)| format!("{p}{r}")),
        (
            proptest::sample::select(&PREFIXES[..]),
            r"[a-z./\\\x00-\x1f\x7f\u{80}-\u{9f}\u{2028}é]{0,12}"
        )
            .prop_map(|(p, r)| format!("{p}{r}")),
    ]
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
    fn manifest_parse_never_panics(body in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let _ = Manifest::parse(&body);
    }

    #[test]
    fn manifest_file_names_are_accepted_exactly_when_plain_and_prefixed(
        name in any_file_name(), slot in 0usize..4,
    ) {
        // A manifest valid in every other respect, so only the name decides.
        let good = manifest_naming(&[]);
        prop_assert_eq!(Manifest::parse(good.to_json().as_bytes()), Ok(good.clone()));
        let m = manifest_naming(&[(slot, name.clone())]);
        // The snapshot's `name` must also keep its prefix, or the set has no snapshot.
        let want = allowed(&name) && (slot != 0 || name.starts_with("snapshot_"));
        let got = Manifest::parse(m.to_json().as_bytes());
        prop_assert_eq!(got.is_ok(), want, "{:?} in slot {}: {:?}", name, slot, got);
        if let Ok(parsed) = got {
            prop_assert_eq!(parsed, m);
        }
    }

    #[test]
    fn manifests_naming_a_hostile_file_are_refused_and_the_same_with_plain_names_accepted(
        bad in hostile_file_name(), slot in 0usize..4,
    ) {
        let good = manifest_naming(&[]);
        prop_assert!(Manifest::parse(good.to_json().as_bytes()).is_ok());
        let got = Manifest::parse(manifest_naming(&[(slot, bad.clone())]).to_json().as_bytes());
        prop_assert!(
            matches!(&got, Err(e) if e.contains("file name") && e.contains("is not allowed")),
            "{:?} in slot {}: {:?}", bad, slot, got
        );
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
