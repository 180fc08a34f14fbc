//! `static_kuberesources_<ts>.tar.gz`, built the way `cluster-backup.sh` builds it: for each
//! control-plane component, the static-pod revision directory that its *running* manifest
//! names (not the highest revision on disk), archived relative to the resources root.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::fsutil;

/// Checks a tar.gz stream to its end: every member readable, gzip CRC
/// and length correct.
pub fn check_archive(reader: impl Read) -> Result<usize> {
    let mut gz = flate2::read::GzDecoder::new(reader);
    let mut count = 0;
    {
        let mut archive = tar::Archive::new(&mut gz);
        for entry in archive.entries().context("not a tar archive")? {
            let mut entry = entry.context("corrupt tar archive")?;
            std::io::copy(&mut entry, &mut std::io::sink()).context("corrupt tar archive")?;
            count += 1;
        }
    }
    // Reading to the end makes the decoder check the gzip trailer (CRC and length).
    std::io::copy(&mut gz, &mut std::io::sink()).context("corrupt gzip stream")?;
    if count == 0 {
        bail!("the archive holds no files");
    }
    Ok(count)
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
