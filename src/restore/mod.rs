//! The restore side: find a set on a target, stream it back with every check (`verify`),
//! lay it out for the platform's restore script (`fetch`), and prove it opens in a
//! throwaway etcd (`verify --deep`, the restore drill).
//!
//! Checks on every file, while it streams: its size and SHA-256 against the manifest, the
//! manifest against `SHA256SUMS`, etcd's SHA-256 trailer of the snapshot, and that the
//! static resources archive is a complete, readable tar.gz. Nothing is written under its
//! final name before every check passed. These checks catch corruption and truncation.
//! A server that rewrites a set consistently (manifest, sums and data) is caught by the
//! signature ([`crate::trust::signing`]): with `verify.allowed_signers`, only a set whose
//! `manifest.json.sig` is by a listed key is read at all ([`check_signature`]).
//!
//! One file per step: [`locate`] (find the set), [`verify`] (stream it back checked),
//! [`fetch`] (lay it out), [`versions`] (which set a cluster may take), [`drill`] (restore
//! it into a throwaway etcd).

pub mod at;
pub mod drill;
pub mod fetch;
pub mod locate;
pub mod verify;
pub mod versions;

pub use drill::*;
pub use fetch::*;
pub use locate::*;
pub use verify::*;
pub use versions::*;

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(desired: &str, history: &[(&str, &str)]) -> VersionFacts {
        let history: Vec<_> = history
            .iter()
            .map(|(state, version)| serde_json::json!({"state": state, "version": version}))
            .collect();
        VersionFacts::of(&serde_json::json!({"status": {"desired": {"version": desired}, "history": history}}))
    }

    #[test]
    fn versions_must_match_when_both_are_known() {
        let at = facts("4.15.4", &[("Completed", "4.15.4")]);
        assert!(
            check_versions(Some("4.15.4"), &at)
                .unwrap()
                .unwrap()
                .contains("runs 4.15.4")
        );
        let e = check_versions(Some("4.15.4"), &facts("4.15.5", &[("Completed", "4.15.5")])).unwrap_err();
        assert!(e.contains("4.15.4") && e.contains("4.15.5") && e.contains("--allow-version-mismatch"));
        assert_eq!(check_versions(None, &at), Ok(None));
        assert_eq!(check_versions(Some("4.15.4"), &VersionFacts::default()), Ok(None));
    }

    #[test]
    fn version_facts_from_a_cluster_version() {
        let f = facts(
            "4.15.5",
            &[("Partial", "4.15.5"), ("Completed", "4.15.4"), ("Completed", "4.15.3")],
        );
        assert_eq!(
            f,
            VersionFacts {
                desired: Some("4.15.5".into()),
                newest: Some(("Partial".into(), "4.15.5".into())),
                last_completed: Some("4.15.4".into()),
            }
        );
        assert_eq!(VersionFacts::of(&serde_json::json!({})), VersionFacts::default());
    }

    /// The z-stream rule as a table: (case, desired, history newest first, set version,
    /// accepted, words the rule or the refusal must contain, words it must not).
    #[test]
    fn version_rule_table() {
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a [(&'a str, &'a str)],
            &'a str,
            bool,
            &'a [&'a str],
            &'a [&'a str],
        );
        let failed: &[(&str, &str)] = &[("Partial", "4.15.5"), ("Completed", "4.15.4")];
        let done: &[(&str, &str)] = &[("Completed", "4.15.5"), ("Completed", "4.15.4")];
        let starting: &[(&str, &str)] = &[("Completed", "4.15.4")];
        let installing: &[(&str, &str)] = &[("Partial", "4.15.4")];
        let cases: &[Case] = &[
            (
                "failed upgrade: the last completed version is accepted",
                "4.15.5",
                failed,
                "4.15.4",
                true,
                &[
                    "upgrading from 4.15.4 to 4.15.5 (not completed)",
                    "a set of 4.15.4, the last completed version, is accepted",
                ],
                &[],
            ),
            (
                "failed upgrade: the version being installed is accepted",
                "4.15.5",
                failed,
                "4.15.5",
                true,
                &["upgrading from 4.15.4 to 4.15.5", "the version being installed"],
                &[],
            ),
            (
                "failed upgrade: another version is refused naming both that can exist",
                "4.15.5",
                failed,
                "4.15.3",
                false,
                &[
                    "4.15.3",
                    "on 4.15.4, the last completed version",
                    "on 4.15.5, the version being installed",
                    "--allow-version-mismatch",
                ],
                &[],
            ),
            (
                "upgrade starting (desired differs from the newest entry) counts as not completed",
                "4.15.5",
                starting,
                "4.15.4",
                true,
                &["upgrading from 4.15.4 to 4.15.5", "last completed version"],
                &[],
            ),
            (
                "completed upgrade: only the new version",
                "4.15.5",
                done,
                "4.15.4",
                false,
                &["the cluster runs 4.15.5", "use a set taken on 4.15.5"],
                &["last completed"],
            ),
            (
                "completed upgrade: the new version is accepted",
                "4.15.5",
                done,
                "4.15.5",
                true,
                &["the cluster runs 4.15.5"],
                &[],
            ),
            (
                "no completed version yet: only the target can exist",
                "4.15.4",
                installing,
                "4.15.3",
                false,
                &["no completed version yet", "a set taken on 4.15.4"],
                &["last completed version,"],
            ),
            (
                "no history: the desired version",
                "4.15.4",
                &[],
                "4.15.4",
                true,
                &["runs 4.15.4"],
                &[],
            ),
        ];
        for (name, desired, history, set, ok, has, lacks) in cases {
            let got = check_versions(Some(set), &facts(desired, history));
            assert_eq!(got.is_ok(), *ok, "{name}: {got:?}");
            let text = match got {
                Ok(rule) => rule.expect("a rule is named"),
                Err(why) => why,
            };
            for w in *has {
                assert!(text.contains(w), "{name}: {text:?} lacks {w:?}");
            }
            for w in *lacks {
                assert!(!text.contains(w), "{name}: {text:?} has {w:?}");
            }
        }
    }

    #[test]
    fn archive_check_needs_a_complete_tar_gz() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"hello").unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        {
            let mut t = tar::Builder::new(&mut gz);
            t.append_path_with_name(dir.path().join("a"), "a").unwrap();
            t.finish().unwrap();
        }
        let bytes = gz.finish().unwrap();
        assert_eq!(
            crate::source::static_resources::check_archive(&bytes[..])
                .unwrap()
                .members,
            1
        );
        assert!(crate::source::static_resources::check_archive(&bytes[..bytes.len() - 4]).is_err());
        let mut flipped = bytes.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        assert!(crate::source::static_resources::check_archive(&flipped[..]).is_err());
        assert!(crate::source::static_resources::check_archive(&b"not gzip"[..]).is_err());
    }
}
