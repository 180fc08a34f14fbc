//! `static_kuberesources_<ts>.tar.gz`, built the way `cluster-backup.sh` builds it: for each
//! control-plane component, the static-pod revision directory that its *running* manifest
//! names (not the highest revision on disk), archived relative to the resources root.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::fsutil;

/// Checks a tar.gz stream to its end (every member readable, gzip CRC and length correct)
/// and what `cluster-restore.sh` needs of it ([`Restorability`]). An unreadable archive is
/// an error; a readable one that a restore cannot use is a verdict the caller decides on.
pub fn check_archive(reader: impl Read) -> Result<Restorability> {
    let mut gz = flate2::read::GzDecoder::new(reader);
    let mut seen = Members::default();
    {
        let mut archive = tar::Archive::new(&mut gz);
        for entry in archive.entries().context("not a tar archive")? {
            let mut entry = entry.context("corrupt tar archive")?;
            let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let is_file = entry.header().entry_type().is_file();
            std::io::copy(&mut entry, &mut std::io::sink()).context("corrupt tar archive")?;
            seen.add(&path, is_file);
        }
    }
    // Reading to the end makes the decoder check the gzip trailer (CRC and length).
    std::io::copy(&mut gz, &mut std::io::sink()).context("corrupt gzip stream")?;
    if seen.count == 0 {
        bail!("the archive holds no files");
    }
    Ok(seen.verdict())
}

/// [`check_archive`] on a file, named in its errors.
pub fn check_archive_file(path: &Path) -> Result<Restorability> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open '{}'", path.display()))?;
    check_archive(std::io::BufReader::new(f)).with_context(|| format!("'{}'", path.display()))
}

/// Why `cluster-restore.sh` could not use an archive. The script extracts it with
/// `tar -xzf ARCHIVE static-pod-resources` only after it has stopped etcd and moved its data
/// aside, and (4.12-4.17) copies each component's pod manifest out of its revision directory:
/// so every member must be under `static-pod-resources/` exactly, and each of the four
/// components needs one revision directory holding `<c>-pod.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum ArchiveProblem {
    /// A member outside `static-pod-resources/` (`./static-pod-resources/...`, an absolute
    /// path, `..`, another folder): `tar -xzf ARCHIVE static-pod-resources` misses it.
    OutsideResources { member: String, count: usize },
    /// No `static-pod-resources/<c>-pod-<N>/` for a component.
    NoRevision { component: &'static str },
    /// More than one revision directory for a component: which one is running is unknown.
    SeveralRevisions {
        component: &'static str,
        revisions: Vec<String>,
    },
    /// The revision directory lacks the component's pod manifest.
    NoPodManifest { component: &'static str, revision: String },
}

impl std::fmt::Display for ArchiveProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArchiveProblem::OutsideResources { member, count: 1 } => {
                write!(f, "member '{member}' is not under static-pod-resources/")
            }
            ArchiveProblem::OutsideResources { member, count } => write!(
                f,
                "{count} members are not under static-pod-resources/ (the first: '{member}')"
            ),
            ArchiveProblem::NoRevision { component } => {
                write!(
                    f,
                    "no {component} revision directory (static-pod-resources/{component}-pod-<N>/)"
                )
            }
            ArchiveProblem::SeveralRevisions { component, revisions } => write!(
                f,
                "{} {component} revision directories ({}), expected the one the running manifest names",
                revisions.len(),
                revisions.join(", ")
            ),
            ArchiveProblem::NoPodManifest { component, revision } => write!(
                f,
                "no {component} pod manifest (static-pod-resources/{revision}/{component}-pod.yaml)"
            ),
        }
    }
}

/// What the restore script would find in an archive.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Restorability {
    /// How many members the archive holds.
    pub members: usize,
    /// Empty: the platform's restore can use it.
    pub problems: Vec<ArchiveProblem>,
}

impl Restorability {
    pub fn is_restorable(&self) -> bool {
        self.problems.is_empty()
    }

    /// Every problem, on one line.
    pub fn problems_line(&self) -> String {
        self.problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// `Err(Unrestorable)` when the restore cannot use the archive named `name`.
    pub fn require(self, name: &str) -> std::result::Result<Restorability, Unrestorable> {
        if self.is_restorable() {
            Ok(self)
        } else {
            Err(Unrestorable {
                file: name.to_string(),
                problems: self.problems,
            })
        }
    }
}

/// A readable static resources archive that `cluster-restore.sh` cannot use: the set must
/// not be handed over as restorable.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "'{file}' cannot be restored by the platform's cluster-restore.sh: {}",
    problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
)]
pub struct Unrestorable {
    pub file: String,
    pub problems: Vec<ArchiveProblem>,
}

/// The members seen so far, reduced to what the verdict needs.
#[derive(Default)]
struct Members {
    count: usize,
    outside: Option<(String, usize)>,
    /// (component index, revision directory name).
    revisions: std::collections::BTreeSet<(usize, String)>,
    /// (component index, revision directory name) that hold `<c>-pod.yaml` as a file.
    manifests: std::collections::BTreeSet<(usize, String)>,
}

impl Members {
    fn add(&mut self, path: &str, is_file: bool) {
        self.count += 1;
        let mut parts = path.split('/').filter(|p| !p.is_empty());
        let under = path.starts_with("static-pod-resources/") || path == "static-pod-resources";
        if !under || path.split('/').any(|p| p == ".." || p == ".") {
            let o = self.outside.get_or_insert_with(|| (path.to_string(), 0));
            o.1 += 1;
            return;
        }
        parts.next(); // static-pod-resources
        let Some(dir) = parts.next() else { return };
        let Some(i) = COMPONENTS.iter().position(|c| is_revision_dir(c, dir)) else {
            return;
        };
        self.revisions.insert((i, dir.to_string()));
        let file = parts.next();
        if is_file && parts.next().is_none() && file == Some(format!("{}-pod.yaml", COMPONENTS[i]).as_str()) {
            self.manifests.insert((i, dir.to_string()));
        }
    }

    fn verdict(self) -> Restorability {
        let mut problems = Vec::new();
        if let Some((member, count)) = self.outside {
            problems.push(ArchiveProblem::OutsideResources { member, count });
        }
        for (i, component) in COMPONENTS.iter().enumerate() {
            let revisions: Vec<String> = self
                .revisions
                .iter()
                .filter(|(c, _)| *c == i)
                .map(|(_, r)| r.clone())
                .collect();
            match revisions.as_slice() {
                [] => problems.push(ArchiveProblem::NoRevision { component }),
                [one] if !self.manifests.contains(&(i, one.clone())) => problems.push(ArchiveProblem::NoPodManifest {
                    component,
                    revision: one.clone(),
                }),
                [_] => {}
                _ => problems.push(ArchiveProblem::SeveralRevisions { component, revisions }),
            }
        }
        Restorability {
            members: self.count,
            problems,
        }
    }
}

/// `<component>-pod-<digits>`.
fn is_revision_dir(component: &str, name: &str) -> bool {
    name.strip_prefix(component)
        .and_then(|r| r.strip_prefix("-pod-"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The components whose revision directories a restore needs, in the script's order.
pub const COMPONENTS: [&str; 4] = ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd"];

/// Real manifests name revision directories by this absolute path, whatever directory the
/// resources are read from here.
const MANIFEST_PREFIX: &str = "/etc/kubernetes/static-pod-resources/";

/// The revision directory (`<c>-pod-<N>`) that the manifest text of component `c` names:
/// the first mention, as the script takes it.
pub fn revision_in_manifest(component: &str, manifest: &str) -> Option<String> {
    let needle = format!("{MANIFEST_PREFIX}{component}-pod-");
    let mut rest = manifest;
    while let Some(pos) = rest.find(&needle) {
        let after = &rest[pos + needle.len()..];
        let digits: String = after.chars().take_while(|c| c.is_ascii_digit()).collect();
        let next = after[digits.len()..].chars().next();
        // `etcd-pod-3` but not `etcd-pod-3x`: the name must end at a path or quote boundary.
        if !digits.is_empty() && next.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_')) {
            return Some(format!("{component}-pod-{digits}"));
        }
        rest = &rest[pos + needle.len()..];
    }
    None
}

/// The revision directories to archive, as paths relative to `root`.
pub fn revision_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for c in COMPONENTS {
        let manifest = root.join("manifests").join(format!("{c}-pod.yaml"));
        let text = std::fs::read_to_string(&manifest).with_context(|| {
            format!(
                "snapshot.static_resources_dir: cannot read the {c} manifest '{}' (set static_resources_dir = \"\" on a cluster without static pods)",
                manifest.display()
            )
        })?;
        let Some(rev) = revision_in_manifest(c, &text) else {
            bail!(
                "'{}' names no {MANIFEST_PREFIX}{c}-pod-<N> revision directory",
                manifest.display()
            );
        };
        let rel = Path::new("static-pod-resources").join(&rev);
        let abs = root.join(&rel);
        if !abs.is_dir() {
            bail!(
                "'{}' names revision '{rev}', but '{}' is not a directory",
                manifest.display(),
                abs.display()
            );
        }
        dirs.push(rel);
    }
    Ok(dirs)
}

/// Writes the gzip tarball of the revision directories under `root` to `dest` (a new 0600
/// file), fsynced. Returns size and SHA-256. Symlinks are stored as links, like `tar`.
pub fn write_archive(root: &Path, dest: &Path) -> Result<(u64, String)> {
    let dirs = revision_dirs(root)?;
    let file = fsutil::create_private_file(dest)?;
    let result = (|| -> Result<(u64, String)> {
        let hashing = fsutil::HashingWriter::new(std::io::BufWriter::new(file));
        let gz = flate2::write::GzEncoder::new(hashing, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        tar.follow_symlinks(false);
        for rel in &dirs {
            tar.append_dir_all(rel, root.join(rel))
                .with_context(|| format!("cannot archive '{}'", root.join(rel).display()))?;
        }
        let gz = tar.into_inner().context("cannot finish the tar archive")?;
        let hashing = gz.finish().context("cannot finish the gzip stream")?;
        let (buf, size, sha) = hashing.finish();
        let file = buf
            .into_inner()
            .map_err(|e| e.into_error())
            .context("cannot write the archive")?;
        file.sync_all()
            .with_context(|| format!("cannot fsync '{}'", dest.display()))?;
        Ok((size, sha))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    result.with_context(|| format!("cannot write '{}'", dest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_named_revision_wins_not_the_highest() {
        let m = "spec:\n  volumes:\n  - hostPath:\n      path: /etc/kubernetes/static-pod-resources/etcd-pod-7\n    name: resource-dir\n  - hostPath:\n      path: /etc/kubernetes/static-pod-resources/etcd-certs\n  - path: /etc/kubernetes/static-pod-resources/etcd-pod-9\n";
        assert_eq!(revision_in_manifest("etcd", m).as_deref(), Some("etcd-pod-7"));
        assert_eq!(revision_in_manifest("kube-apiserver", m), None);
        let m = "x: \"/etc/kubernetes/static-pod-resources/kube-apiserver-pod-12/configmaps\"";
        assert_eq!(
            revision_in_manifest("kube-apiserver", m).as_deref(),
            Some("kube-apiserver-pod-12")
        );
        assert_eq!(
            revision_in_manifest("etcd", "/etc/kubernetes/static-pod-resources/etcd-pod-3x"),
            None
        );
        assert_eq!(
            revision_in_manifest("etcd", "/var/x/static-pod-resources/etcd-pod-3"),
            None
        );
    }
}
