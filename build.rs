//! Records the commit the binary is built from, for `etcd-backupd --version`
//! (`etcd-backupd 0.1.0 (commit 0123456789ab)`): `git rev-parse --short=12 HEAD` of this
//! source tree; where there is no git (an RPM built from a tarball), the environment variable
//! `ETCD_BACKUPD_COMMIT`; else `unknown`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").arg("-C").arg(dir).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_string())
}

/// The commit of HEAD, if `dir` is the top of a git work tree (not a tarball unpacked inside
/// some other repository), with the files whose change means a new HEAD.
fn from_git(dir: &Path) -> Option<(String, Vec<PathBuf>)> {
    let top = PathBuf::from(git(dir, &["rev-parse", "--show-toplevel"])?);
    if top.canonicalize().ok()? != dir.canonicalize().ok()? {
        return None;
    }
    let commit = git(dir, &["rev-parse", "--short=12", "HEAD"])?;
    // `--git-path` finds each file in a linked work tree too (refs live in the common dir).
    let path = |name: &str| git(dir, &["rev-parse", "--git-path", name]).map(|p| dir.join(p));
    let mut watch = vec![path("HEAD")?];
    // The branch's ref file, and packed-refs where `git gc` packs it; only files that exist
    // (a missing one would rerun this script on every build).
    if let Some(r) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        watch.extend(path(&r));
    }
    watch.extend(path("packed-refs"));
    watch.retain(|p| p.exists());
    Some((commit, watch))
}

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    println!("cargo:rerun-if-env-changed=ETCD_BACKUPD_COMMIT");
    println!("cargo:rerun-if-changed=build.rs");
    let commit = match from_git(&dir) {
        Some((commit, watch)) => {
            for p in watch {
                println!("cargo:rerun-if-changed={}", p.display());
            }
            commit
        }
        None => std::env::var("ETCD_BACKUPD_COMMIT")
            .ok()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch)))
            .unwrap_or_else(|| "unknown".into()),
    };
    println!("cargo:rustc-env=ETCD_BACKUPD_COMMIT={commit}");
}
