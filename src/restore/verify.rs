//! Streaming a set's files back with every check (`verify`): sizes and hashes against
//! the manifest, the manifest against `SHA256SUMS`, the snapshot's trailer, the archive's
//! restorability.

use std::collections::BTreeMap;
use std::io::Read;

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::manifest::FileKind;
use crate::manifest::{FileEntry, SHA256SUMS};
use crate::source::static_resources::Restorability;

use super::locate::{Damage, Located, SUMS_CAP, check_signature, explain, read_small};

/// What checking one file found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckedFile {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    /// What was proven beyond size and hash.
    pub also: Option<String>,
}

impl CheckedFile {
    pub fn kind(&self) -> Option<FileKind> {
        FileKind::of(&self.name)
    }
}

/// Reads `SHA256SUMS` from the target and checks it says what the manifest says.
pub(super) async fn check_sums(located: &Located) -> Result<()> {
    let m = &located.manifest;
    let bytes = read_small(located.target.as_ref(), &located.cluster, &m.id, SHA256SUMS, SUMS_CAP).await?;
    let text = String::from_utf8(bytes).map_err(|_| Damage(format!("{SHA256SUMS} is not UTF-8 text")))?;
    let mut listed = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (hash, name) = line.split_once("  ").ok_or_else(|| {
            Damage(format!(
                "{SHA256SUMS}: malformed line {:?}",
                line.chars().take(80).collect::<String>()
            ))
        })?;
        listed.insert(name.to_string(), hash.to_ascii_lowercase());
    }
    let expected: BTreeMap<String, String> = m.files.iter().map(|f| (f.name.clone(), f.sha256.clone())).collect();
    if listed != expected {
        bail!(Damage(format!(
            "{SHA256SUMS} does not agree with manifest.json: the set was altered"
        )));
    }
    Ok(())
}

/// Streams one file from the target, checking it; writes the original bytes to `out` when
/// given.
pub(super) async fn check_file(
    located: &Located,
    f: &FileEntry,
    out: Option<&mut tokio::fs::File>,
) -> Result<CheckedFile> {
    let std_out = match out {
        Some(o) => Some(o.try_clone().await?.into_std().await),
        None => None,
    };
    check_stream(located, f, std_out).await
}

/// Counts and hashes what is read through it, failing past `cap` bytes.
pub(super) struct Tee<R> {
    inner: R,
    hash: Sha256,
    size: u64,
    cap: u64,
    trailer: Option<crate::source::snapshot::TrailerCheck>,
    out: Option<std::fs::File>,
    phase: crate::progress::Phase,
    /// More than `cap` bytes arrived.
    overlong: bool,
}

impl<R: Read> Tee<R> {
    fn new(inner: R, cap: u64) -> Self {
        Tee {
            inner,
            hash: Sha256::new(),
            size: 0,
            cap,
            trailer: None,
            out: None,
            phase: crate::progress::Phase::default(),
            overlong: false,
        }
    }
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let chunk = &buf[..n];
        self.size += n as u64;
        self.phase.add(n as u64);
        if self.size > self.cap {
            self.overlong = true;
            return Err(std::io::Error::other(format!(
                "longer than the {} bytes the manifest records",
                self.cap
            )));
        }
        self.hash.update(chunk);
        if let Some(t) = &mut self.trailer {
            t.update(chunk);
        }
        if let Some(o) = &mut self.out {
            std::io::Write::write_all(o, chunk)?;
        }
        Ok(n)
    }
}

/// One file, plain or sealed, on a blocking thread: the stored bytes are counted and hashed
/// as they arrive; then (decrypted and decompressed when sealed) the original bytes are
/// counted, hashed, checked for etcd's trailer or as a tar.gz, and written to `out`.
pub(super) async fn check_stream(located: &Located, f: &FileEntry, out: Option<std::fs::File>) -> Result<CheckedFile> {
    let m = &located.manifest;
    let reader = located
        .source_of(f)?
        .open_file(&located.cluster, &m.id, &f.stored_name)
        .await?;
    let (f2, identity) = (f.clone(), located.identity.clone());
    let allow_unrestorable = located.allow_unrestorable;
    let phase = crate::progress::Phase::start(f.stored_name.clone(), Some(f.stored_size));
    let checked = tokio::task::spawn_blocking(move || -> Result<CheckedFile> {
        let f = f2;
        let mut stored = Tee::new(tokio_util::io::SyncIoBridge::new(reader), f.stored_size);
        stored.phase = phase;
        // An error opening the envelope (a wrong identity) ends the check at once.
        let plain = crate::envelope::open_reader(Box::new(&mut stored), &f.compression, &f.encryption, &identity)?;
        type Opened = (u64, String, Option<Restorability>, Option<crate::source::snapshot::TrailerCheck>);
        let opened = (|| -> Result<Opened> {
            let mut plain = Tee::new(plain, f.size);
            plain.out = out;
            if f.kind() == Some(FileKind::Snapshot) {
                plain.trailer = Some(crate::source::snapshot::TrailerCheck::default());
            }
            let archive = if f.kind() == Some(FileKind::Resources) {
                let found = crate::source::static_resources::check_archive(&mut plain)?;
                std::io::copy(&mut plain, &mut std::io::sink())?;
                Some(found)
            } else {
                std::io::copy(&mut plain, &mut std::io::sink())?;
                None
            };
            if let Some(o) = plain.out.take() {
                o.sync_all()?;
            }
            let trailer = plain.trailer.take();
            Ok((plain.size, hex::encode(plain.hash.clone().finalize()), archive, trailer))
        })();
        // Whatever follows the end of the compressed or encrypted stream is read too; after
        // a failure, the rest of the file, so that its checksum tells damage on the target
        // (the same report as a truncation) from a fault of the transfer.
        let drained = std::io::copy(&mut stored, &mut std::io::sink());
        if stored.overlong {
            bail!(Damage(format!(
                "'{}' is longer than the {} bytes the manifest records",
                f.stored_name, f.stored_size
            )));
        }
        if let Err(e) = drained {
            return Err(opened.err().unwrap_or_else(|| e.into()));
        }
        let stored_sha = hex::encode(stored.hash.finalize());
        if stored.size != f.stored_size || stored_sha != f.stored_sha256 {
            bail!(Damage(format!(
                "'{}' is {} bytes with SHA-256 {stored_sha}, the manifest records {} bytes with {}: the file was altered or corrupted",
                f.stored_name, stored.size, f.stored_size, f.stored_sha256
            )));
        }
        // The stored bytes are what was stored: what is wrong now was wrong from the start.
        let damaged = |e: anyhow::Error| anyhow!(Damage(format!("'{}': {}", f.stored_name, crate::error::one_line(&e))));
        let (size, sha, archive, trailer) = opened.map_err(damaged)?;
        if size != f.size || sha != f.sha256 {
            bail!(Damage(format!(
                "'{}' opens to {size} bytes with SHA-256 {sha}, the manifest records {} bytes with {}",
                f.stored_name, f.size, f.sha256
            )));
        }
        // Checked after the hashes: a file altered on the target is reported as such.
        let also = match (trailer, archive) {
            (Some(t), _) => {
                t.finish().map_err(damaged)?;
                Some("etcd's snapshot trailer verified".to_string())
            }
            (None, Some(r)) if r.is_restorable() => Some(format!(
                "readable tar.gz, {} entries, each component's revision and pod manifest under static-pod-resources/",
                r.members
            )),
            // Intact, as stored, but the platform's restore would fail on it after it has
            // stopped etcd: refused unless the reader takes it on purpose.
            (None, Some(r)) if allow_unrestorable => Some(format!(
                "readable tar.gz, {} entries, NOT restorable by cluster-restore.sh: {}",
                r.members,
                r.problems_line()
            )),
            (None, Some(r)) => {
                return Err(crate::source::static_resources::Unrestorable {
                    file: f.name.clone(),
                    problems: r.problems,
                }
                .into());
            }
            (None, None) => None,
        };
        Ok(CheckedFile {
            name: f.name.clone(),
            size,
            sha256: sha,
            also,
        })
    })
    .await?;
    checked.with_context(|| format!("'{}'", f.stored_name))
}

/// `verify`: streams the whole set and checks it, writing nothing.
pub async fn verify(located: &Located) -> Result<Vec<CheckedFile>> {
    check_signature(located).await?;
    let result = async {
        check_sums(located).await?;
        let mut checked = Vec::new();
        for f in &located.manifest.files {
            crate::notify::status(&format!("verifying {}", f.stored_name));
            checked.push(check_file(located, f, None).await?);
        }
        Ok(checked)
    }
    .await;
    result.map_err(|e| explain(located, e))
}
