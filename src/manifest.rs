//! `manifest.json` and `SHA256SUMS`: what a backup set says about itself. The manifest is
//! written last; a set without one is incomplete.

use serde::{Deserialize, Serialize};

pub const MANIFEST: &str = "manifest.json";
pub const SHA256SUMS: &str = "SHA256SUMS";
/// The SSH signature of `manifest.json` (see [`crate::trust::signing`]), stored before it.
pub const SIGNATURE: &str = "manifest.json.sig";
pub const FORMAT_VERSION: u32 = 1;
/// The format of a set split between targets (`files[].targets`): a release from before split
/// custody skips it as a newer format, rather than take its absent half for damage, during a
/// rolling update. Every other set keeps [`FORMAT_VERSION`].
pub const SPLIT_FORMAT_VERSION: u32 = 2;

/// The format of a set started by a trigger a release before the journal does not know
/// (`journal`, `derived`): such a release skips it as a newer format rather than failing to
/// read its trigger.
pub const JOURNAL_FORMAT_VERSION: u32 = 3;

/// The format version a manifest of a set started by `trigger` listing `files` is written
/// with: the oldest format that says what it holds, so an older release skips rather than
/// misreads a set it cannot understand.
pub fn format_version_of(trigger: Trigger, files: &[FileEntry]) -> u32 {
    if matches!(trigger, Trigger::Journal | Trigger::Derived) {
        JOURNAL_FORMAT_VERSION
    } else if files.iter().any(|f| !f.targets.is_empty()) {
        SPLIT_FORMAT_VERSION
    } else {
        FORMAT_VERSION
    }
}

/// What started a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    Schedule,
    AfterUpgrade,
    Manual,
    /// A set the platform wrote on the node (e.g. before an upgrade), shipped as it is.
    Imported,
    /// A set the journal's writer asked for at once: its chain broke, or ended at a change
    /// of the static pod revisions, and no set started the next chain.
    Journal,
    /// Folded off the cluster from an earlier set and its journal (`rebase`): see
    /// [`Manifest::derived`].
    Derived,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub id: String,
    /// RFC 3339, UTC.
    pub created: String,
    pub cluster_name: String,
    pub trigger: Trigger,
    /// The elected run (the schedule slot's key) this set was taken for; none for a
    /// `--no-election` backup or an imported set. A node taking over a run looks for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    pub node: String,
    pub etcd: EtcdInfo,
    /// Present when the etcd holds an OpenShift ClusterVersion.
    pub openshift: Option<OpenShiftInfo>,
    pub files: Vec<FileEntry>,
    pub tool: ToolInfo,
    /// The guards `backup --force` overrode to take this set, in words (empty: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forced: Vec<String>,
    /// What a restore of this set depends on, read from its files at backup time.
    #[serde(flatten)]
    pub restore: RestoreFacts,
    /// A derived set's origin (trigger `derived`); none for a set taken from etcd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derived: Option<Derived>,
}

/// Where a derived set comes from: set `from_set` (at `from_revision`), with the journal's
/// revisions after it replayed up to the set's own `etcd.revision`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Derived {
    pub from_set: String,
    pub from_revision: i64,
    pub revisions_replayed: u64,
    pub segments: usize,
}

/// Facts about restoring a set, from its static resources archive (see [`crate::trust::certs`]).
/// Every field is optional: a set without an archive (plain etcd) records none.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RestoreFacts {
    /// The earliest notAfter (RFC 3339, UTC) of the leaf certificates in the archive's
    /// `secrets/`: past it, a restore needs the platform's certificate recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restorable_until: Option<String>,
    /// The archive member holding that certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restorable_until_source: Option<String>,
    /// The static pod revision of each component in the archive
    /// (`static-pod-resources/<component>-pod-<N>/`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub static_pod_revisions: std::collections::BTreeMap<String, u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EtcdInfo {
    /// The endpoint the snapshot was taken from.
    pub endpoint: String,
    /// Hex, as `etcdctl member list` prints them.
    pub member_id: String,
    pub cluster_id: String,
    pub version: String,
    /// The storage version etcd reported (from etcd 3.6; absent before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_version: Option<String>,
    /// The store revision the snapshot holds.
    pub revision: i64,
    /// The member's DB size when the backup started.
    pub db_size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenShiftInfo {
    pub version: Option<String>,
    pub cluster_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// The platform's name (`snapshot_<ts>.db`), which restore relies on.
    pub name: String,
    /// The name on the target (the same until compression or encryption append suffixes).
    pub stored_name: String,
    pub size: u64,
    pub sha256: String,
    pub stored_size: u64,
    pub stored_sha256: String,
    pub compression: Compression,
    pub encryption: Encryption,
    /// The targets that hold this file, when the set is split between targets (`[[target]]
    /// files`: the snapshot on some, the static resources, with etcd's encryption keys, on
    /// others); empty: every target the set is on, as in every set before split custody.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
}

/// How a stored file is compressed: `"none"` or `"zstd"` in the manifest. A word this
/// release does not know (a later one's) is kept as it is written: the set still lists, and
/// reading that file says why it cannot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
    Unknown(String),
}

/// How a stored file is encrypted: `"none"` or `"age"` in the manifest (see [`Compression`]
/// for a word this release does not know).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encryption {
    None,
    Age,
    Unknown(String),
}

/// The manifest's words for a seal: serialized as the word, a word not known kept as is.
macro_rules! seal_words {
    ($ty:ident, $($variant:ident => $word:literal),+) => {
        impl $ty {
            pub fn as_str(&self) -> &str {
                match self {
                    $($ty::$variant => $word,)+
                    $ty::Unknown(word) => word,
                }
            }
        }

        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
                let word = String::deserialize(d)?;
                Ok(match word.as_str() {
                    $($word => $ty::$variant,)+
                    _ => $ty::Unknown(word),
                })
            }
        }
    };
}

seal_words!(Compression, None => "none", Zstd => "zstd");
seal_words!(Encryption, None => "none", Age => "age");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolInfo {
    pub name: String,
    pub version: String,
}

impl ToolInfo {
    pub fn this() -> Self {
        ToolInfo {
            name: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

impl Manifest {
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a manifest always serializes");
        s.push('\n');
        s
    }

    /// Parses and checks a manifest, which may come from an untrusted server: file names
    /// must be plain names with the platform's prefixes, and no text may hold control
    /// characters (they would reach a terminal through `list`).
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| format!("invalid manifest.json: {e}"))?;
        if !(FORMAT_VERSION..=JOURNAL_FORMAT_VERSION).contains(&m.format_version) {
            return Err(format!(
                "manifest.json format_version {} is not supported",
                m.format_version
            ));
        }
        let plain = |s: &str| !s.is_empty() && !s.chars().any(char::is_control);
        let texts = [
            &m.id,
            &m.created,
            &m.cluster_name,
            &m.node,
            &m.etcd.endpoint,
            &m.etcd.version,
        ];
        let os = m
            .openshift
            .iter()
            .flat_map(|o| [o.version.as_deref(), o.cluster_id.as_deref()])
            .flatten();
        let facts = [
            m.restore.restorable_until.as_deref(),
            m.restore.restorable_until_source.as_deref(),
            m.etcd.storage_version.as_deref(),
        ]
        .into_iter()
        .flatten()
        .chain(m.restore.static_pod_revisions.keys().map(String::as_str));
        if !texts.iter().all(|t| plain(t)) || !os.into_iter().all(plain) || !facts.into_iter().all(plain) {
            return Err("invalid manifest.json: a text field is empty or holds control characters".into());
        }
        if !is_set_name(&m.id) {
            return Err(format!("invalid manifest.json: id {:?} is not a set name", m.id));
        }
        for f in &m.files {
            let named = |n: &str| safe_component(n) && FileKind::of(n).is_some();
            if let Some(bad) = [&f.name, &f.stored_name].into_iter().find(|n| !named(n)) {
                return Err(format!("invalid manifest.json: file name {bad:?} is not allowed"));
            }
        }
        if m.snapshot().is_none() {
            return Err("invalid manifest.json: no snapshot file".into());
        }
        if let Some(t) = &m.restore.restorable_until
            && chrono::DateTime::parse_from_rfc3339(t).is_err()
        {
            return Err(format!("invalid manifest.json: restorable_until {t:?} is not RFC 3339"));
        }
        Ok(m)
    }

    /// `sha256sum` format over the original files, which is what `sha256sum -c` checks
    /// after `fetch` restores the original names.
    pub fn sha256sums(&self) -> String {
        self.files
            .iter()
            .map(|f| format!("{}  {}\n", f.sha256, f.name))
            .collect()
    }

    /// The files target `target` holds of this set (all of them, unless the set is split).
    pub fn files_on<'a>(&'a self, target: &'a str) -> impl Iterator<Item = &'a FileEntry> + 'a {
        self.files.iter().filter(move |f| f.held_by(target))
    }

    /// What target `target` stores of this set, in bytes (the files it holds).
    pub fn stored_size_on(&self, target: &str) -> u64 {
        self.files_on(target).map(|f| f.stored_size).sum()
    }

    /// For a set split between targets: what `target` holds and where the rest is, in words
    /// (`holds snapshot_<ts>.db; static_kuberesources_<ts>.tar.gz on vault`); `None` when it
    /// holds every file.
    pub fn custody_on(&self, target: &str) -> Option<String> {
        let elsewhere: Vec<String> = self
            .files
            .iter()
            .filter(|f| !f.held_by(target))
            .map(|f| format!("{} on {}", f.name, f.targets.join(", ")))
            .collect();
        if elsewhere.is_empty() {
            return None;
        }
        let here: Vec<&str> = self.files_on(target).map(|f| f.name.as_str()).collect();
        Some(format!("holds {}; {}", here.join(", "), elsewhere.join("; ")))
    }

    pub fn total_stored_size(&self) -> u64 {
        self.files.iter().map(|f| f.stored_size).sum()
    }

    pub fn snapshot(&self) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.kind() == Some(FileKind::Snapshot))
    }

    /// [`RestoreFacts::restorable_until`] as a time (checked by [`Manifest::parse`]).
    pub fn restorable_until(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let t = self.restore.restorable_until.as_deref()?;
        chrono::DateTime::parse_from_rfc3339(t).ok().map(|t| t.to_utc())
    }
}

/// The timestamp format of `cluster-backup.sh` (`date +%F_%H%M%S`), always UTC here.
pub const TS_FORMAT: &str = "%F_%H%M%S";

pub fn timestamp(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format(TS_FORMAT).to_string()
}

/// What a file of a set is, read from its name (the platform's names: the restore script
/// finds its files by them). The one place a file's kind is read from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// `snapshot_<ts>.db` (and its sealed or `__POSSIBLY_DIRTY__` forms).
    Snapshot,
    /// `static_kuberesources_<ts>.tar.gz`: the static pod resources, with etcd's
    /// encryption keys when etcd encryption is on.
    Resources,
}

impl FileKind {
    /// The kind of `name`; `None` for a name that is neither.
    pub fn of(name: &str) -> Option<FileKind> {
        if name.starts_with("snapshot_") {
            Some(FileKind::Snapshot)
        } else if name.starts_with("static_kuberesources_") {
            Some(FileKind::Resources)
        } else {
            None
        }
    }
}

impl FileEntry {
    pub fn kind(&self) -> Option<FileKind> {
        FileKind::of(&self.name)
    }

    /// Does target `target` hold this file (when it holds the set)?
    pub fn held_by(&self, target: &str) -> bool {
        self.targets.is_empty() || self.targets.iter().any(|t| t == target)
    }
}

pub fn snapshot_name(ts: &str) -> String {
    format!("snapshot_{ts}.db")
}

pub fn archive_name(ts: &str) -> String {
    format!("static_kuberesources_{ts}.tar.gz")
}

/// Is `name` safe to use as one path component received from a target?
pub fn safe_component(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control)
}

/// Marks a temporary set directory; never part of a complete set's name.
pub const PARTIAL_MARK: &str = ".partial-";

/// Is `name` a complete set's folder name (not debris, not hidden)?
pub fn is_set_name(name: &str) -> bool {
    safe_component(name) && !name.starts_with('.') && !name.contains(PARTIAL_MARK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            id: "2026-11-25_023012".into(),
            created: "2026-11-25T02:30:12Z".into(),
            cluster_name: "c".into(),
            trigger: Trigger::Manual,
            run: None,
            node: "n".into(),
            etcd: EtcdInfo {
                endpoint: "http://127.0.0.1:2379/".into(),
                member_id: "8e9e05c52164694d".into(),
                cluster_id: "cdf818194e3a8c32".into(),
                version: "3.4.23".into(),
                storage_version: None,
                revision: 42,
                db_size: 20480,
            },
            openshift: None,
            files: vec![FileEntry {
                name: "snapshot_2026-11-25_023012.db".into(),
                stored_name: "snapshot_2026-11-25_023012.db".into(),
                size: 3,
                sha256: "ab".repeat(32),
                stored_size: 3,
                stored_sha256: "ab".repeat(32),
                compression: Compression::None,
                encryption: Encryption::None,
                targets: Vec::new(),
            }],
            tool: ToolInfo::this(),
            forced: Vec::new(),
            restore: RestoreFacts::default(),
            derived: None,
        }
    }

    #[test]
    fn round_trips_and_sums() {
        let m = sample();
        assert_eq!(Manifest::parse(m.to_json().as_bytes()).unwrap(), m);
        // The restore facts are optional: absent from a set without them, kept when present.
        assert!(!m.to_json().contains("restorable_until") && !m.to_json().contains("static_pod"));
        let mut with = m.clone();
        with.restore.restorable_until = Some("2027-01-01T00:00:00Z".into());
        with.restore.restorable_until_source = Some("static-pod-resources/etcd-pod-3/secrets/a/tls.crt".into());
        with.restore.static_pod_revisions.insert("etcd".into(), 3);
        assert_eq!(Manifest::parse(with.to_json().as_bytes()).unwrap(), with);
        assert_eq!(with.restorable_until().unwrap().timestamp(), 1798761600);
        assert_eq!(
            m.sha256sums(),
            format!("{}  snapshot_2026-11-25_023012.db\n", "ab".repeat(32))
        );
        let mut v: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
        v["format_version"] = 99.into();
        assert!(Manifest::parse(v.to_string().as_bytes()).unwrap_err().contains("99"));
        for (path, bad) in [
            ("/files/0/stored_name", "../../etc/passwd"),
            ("/files/0/name", "snapshot_/x"),
            ("/files/0/name", "evil.db"),
            ("/node", "n\u{1b}[31m"),
            ("/id", ".."),
            ("/restorable_until", "next week"),
            ("/restorable_until_source", "a\u{7}"),
        ] {
            let mut v: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
            match v.pointer_mut(path) {
                Some(at) => *at = bad.into(),
                None => v[path.trim_start_matches('/')] = bad.into(),
            }
            assert!(
                Manifest::parse(v.to_string().as_bytes()).is_err(),
                "{path} = {bad:?} accepted"
            );
        }
    }

    /// Sets of the triggers a release before the journal does not know take format 3, which
    /// that release skips as newer; every other set keeps the format it had, and a derived
    /// set's origin reads back.
    #[test]
    fn new_triggers_take_a_format_older_releases_skip() {
        let m = sample();
        assert_eq!(format_version_of(Trigger::Manual, &m.files), FORMAT_VERSION);
        assert_eq!(format_version_of(Trigger::Schedule, &m.files), FORMAT_VERSION);
        assert_eq!(format_version_of(Trigger::Journal, &m.files), 3);
        assert_eq!(format_version_of(Trigger::Derived, &m.files), 3);
        assert!(
            !m.to_json().contains("derived"),
            "no derived key on a set taken from etcd"
        );
        let mut d = m.clone();
        d.trigger = Trigger::Derived;
        d.format_version = format_version_of(d.trigger, &d.files);
        d.derived = Some(Derived {
            from_set: "2026-11-24_023012".into(),
            from_revision: 100,
            revisions_replayed: 50,
            segments: 2,
        });
        let json = d.to_json();
        assert!(json.contains(r#""trigger": "derived""#), "{json}");
        assert_eq!(Manifest::parse(json.as_bytes()).unwrap(), d);
    }

    /// The words manifests already on targets hold read back as the same words; a word
    /// of a later release keeps the manifest readable and marks only that file.
    #[test]
    fn file_seals_read_the_words_manifests_hold() {
        let mut m = sample();
        m.files[0].compression = Compression::Zstd;
        m.files[0].encryption = Encryption::Age;
        let json = m.to_json();
        assert!(
            json.contains(r#""compression": "zstd""#) && json.contains(r#""encryption": "age""#),
            "{json}"
        );
        let mut plain = m.clone();
        plain.files[0].compression = Compression::None;
        plain.files[0].encryption = Encryption::None;
        let plain_json = plain.to_json();
        assert!(
            plain_json.contains(r#""compression": "none""#) && plain_json.contains(r#""encryption": "none""#),
            "{plain_json}"
        );
        assert_eq!(Manifest::parse(json.as_bytes()).unwrap(), m);
        let later = json.replace(r#""compression": "zstd""#, r#""compression": "xz""#);
        let read = Manifest::parse(later.as_bytes()).unwrap();
        assert_eq!(read.files[0].compression, Compression::Unknown("xz".into()));
        assert_eq!(read.files[0].encryption, Encryption::Age);
        // Written back, the word is the one read.
        assert!(read.to_json().contains(r#""compression": "xz""#));
    }

    #[test]
    fn storage_version_is_kept_only_when_known() {
        let m = sample();
        // etcd before 3.6 reports none: the key is absent, as in older manifests.
        assert!(!m.to_json().contains("storage_version"));
        let mut with = m.clone();
        with.etcd.storage_version = Some("3.6.0".into());
        assert!(with.to_json().contains("\"storage_version\": \"3.6.0\""));
        assert_eq!(Manifest::parse(with.to_json().as_bytes()).unwrap(), with);
        let mut v: serde_json::Value = serde_json::from_str(&with.to_json()).unwrap();
        v["etcd"]["storage_version"] = "3.6\u{1b}[2J".into();
        assert!(Manifest::parse(v.to_string().as_bytes()).is_err());
    }

    #[test]
    fn timestamps_use_the_platform_format() {
        let t = chrono::DateTime::parse_from_rfc3339("2021-06-25T19:00:35Z")
            .unwrap()
            .to_utc();
        assert_eq!(timestamp(t), "2021-06-25_190035");
        assert_eq!(snapshot_name("x"), "snapshot_x.db");
        assert_eq!(archive_name("x"), "static_kuberesources_x.tar.gz");
    }
}
