//! The files of a set as the platform's `cluster-backup.sh` writes them into a directory:
//! `snapshot_<ts>.db` and at most one `static_kuberesources_<ts>.tar.gz` with the same
//! `<ts>` (`%F_%H%M%S`), where `<ts>` ends in `__POSSIBLY_DIRTY__` when the script ran with
//! `--force`. Read once here for the script method and for imports. The files keep their
//! names (the restore script's `snapshot*.db` and `static_kuberesources*.tar.gz` globs pick
//! the dirty ones too); the set's id is the timestamp without the marker.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};

/// What `cluster-backup.sh --force` appends to both names.
pub const DIRTY: &str = "__POSSIBLY_DIRTY__";

/// A platform set found in a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformSet {
    /// The timestamp without [`DIRTY`]: the set's id.
    pub id: String,
    /// The names end in [`DIRTY`]: the script skipped its pre-checks.
    pub dirty: bool,
    /// File names, the snapshot first.
    pub files: Vec<String>,
    /// Other files in the directory, not part of the set.
    pub others: Vec<String>,
}

/// `Ok(None)` when `dir` holds no `snapshot_*.db` at all (not a set); an error naming the
/// problem when it holds something a set cannot be made of.
pub fn read(dir: &Path) -> Result<Option<PlatformSet>> {
    let mut snapshots = Vec::new();
    let mut archives = Vec::new();
    let mut others = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read '{}'", dir.display()))? {
        let name = e?.file_name().to_string_lossy().to_string();
        if let Some(ts) = name.strip_prefix("snapshot_").and_then(|r| r.strip_suffix(".db")) {
            snapshots.push((ts.to_string(), name));
        } else if let Some(ts) = name
            .strip_prefix("static_kuberesources_")
            .and_then(|r| r.strip_suffix(".tar.gz"))
        {
            archives.push((ts.to_string(), name));
        } else {
            others.push(name);
        }
    }
    if snapshots.is_empty() {
        return Ok(None);
    }
    snapshots.sort();
    let [(ts, snapshot)] = <[_; 1]>::try_from(snapshots).map_err(|v: Vec<_>| {
        anyhow!(
            "{} snapshot_*.db files ({}), expected one",
            v.len(),
            v.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>().join(", ")
        )
    })?;
    if archives.len() > 1 {
        bail!("{} static_kuberesources_*.tar.gz files, expected one", archives.len());
    }
    if let Some((archive_ts, _)) = archives.first()
        && archive_ts != &ts
    {
        bail!("the files carry two timestamps ({ts} and {archive_ts})");
    }
    let (id, dirty) = match ts.strip_suffix(DIRTY) {
        Some(clean) => (clean.to_string(), true),
        None => (ts.clone(), false),
    };
    if chrono::NaiveDateTime::parse_from_str(&id, crate::manifest::TS_FORMAT).is_err() {
        bail!("the timestamp {id:?} in '{snapshot}' is not %F_%H%M%S");
    }
    let mut files = vec![snapshot];
    files.extend(archives.into_iter().map(|(_, n)| n));
    others.sort();
    Ok(Some(PlatformSet {
        id,
        dirty,
        files,
        others,
    }))
}

/// The OpenShift version in the name of a folder the platform's upgrade-backup controller
/// wrote before a minor upgrade (4.14 and earlier): `upgrade-backup-<version>-<ts>`, where the
/// version may itself hold `-` (`4.14.0-rc.2`), so the timestamp is cut off the end. `None`
/// for any other name.
pub fn upgrade_folder_version(folder: &str) -> Option<String> {
    let rest = folder.strip_prefix("upgrade-backup-")?;
    // The timestamp is everything after some `-`: try each, shortest version first, and take
    // the first split whose tail reads as a timestamp and whose head as a version.
    rest.match_indices('-').find_map(|(i, _)| {
        let (version, ts) = (&rest[..i], &rest[i + 1..]);
        (looks_like_version(version) && looks_like_timestamp(ts)).then(|| version.to_string())
    })
}

/// `4.14.0`, `4.14.0-rc.2`, `4.13.0-0.nightly-2023-06-01-120000`: digits and dots first.
fn looks_like_version(v: &str) -> bool {
    let core = v.split('-').next().unwrap_or("");
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() >= 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// `%F_%H%M%S` (with or without [`DIRTY`]), or a run of digits (a unix time).
fn looks_like_timestamp(ts: &str) -> bool {
    let ts = ts.strip_suffix(DIRTY).unwrap_or(ts);
    chrono::NaiveDateTime::parse_from_str(ts, crate::manifest::TS_FORMAT).is_ok()
        || (ts.len() >= 8 && ts.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_folder_versions() {
        let v = |f: &str| upgrade_folder_version(f);
        assert_eq!(v("upgrade-backup-4.13.4-2023-06-25_152335").as_deref(), Some("4.13.4"));
        assert_eq!(
            v("upgrade-backup-4.14.0-rc.2-2023-10-05_101010").as_deref(),
            Some("4.14.0-rc.2")
        );
        assert_eq!(
            v("upgrade-backup-4.12.0-0.nightly-2023-01-02-030405-2023-01-03_010203").as_deref(),
            Some("4.12.0-0.nightly-2023-01-02-030405")
        );
        assert_eq!(v("upgrade-backup-4.14.2-1696500000").as_deref(), Some("4.14.2"));
        assert_eq!(v("upgrade-backup-2023-06-25_152335"), None, "no version");
        assert_eq!(v("upgrade-backup-4.13.4"), None, "no timestamp");
        assert_eq!(v("backup-4.13.4-2023-06-25_152335"), None);
    }

    #[test]
    fn dirty_names_keep_their_names_and_give_a_clean_id() {
        let d = tempfile::tempdir().unwrap();
        let ts = "2023-06-25_152335__POSSIBLY_DIRTY__";
        std::fs::write(d.path().join(format!("snapshot_{ts}.db")), "x").unwrap();
        std::fs::write(d.path().join(format!("static_kuberesources_{ts}.tar.gz")), "x").unwrap();
        std::fs::write(d.path().join("notes.txt"), "x").unwrap();
        let s = read(d.path()).unwrap().unwrap();
        assert_eq!(s.id, "2023-06-25_152335");
        assert!(s.dirty);
        assert_eq!(
            s.files,
            [format!("snapshot_{ts}.db"), format!("static_kuberesources_{ts}.tar.gz")]
        );
        assert_eq!(s.others, ["notes.txt"]);
        // Two timestamps, a bad timestamp, nothing at all.
        std::fs::write(d.path().join("static_kuberesources_2023-06-25_152335.tar.gz"), "x").unwrap();
        assert!(read(d.path()).unwrap_err().to_string().contains("expected one"));
        let e = tempfile::tempdir().unwrap();
        std::fs::write(e.path().join("snapshot_yesterday.db"), "x").unwrap();
        assert!(read(e.path()).unwrap_err().to_string().contains("not %F_%H%M%S"));
        let f = tempfile::tempdir().unwrap();
        assert_eq!(read(f.path()).unwrap(), None);
    }
}
