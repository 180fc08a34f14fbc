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

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::config::Settings;
use crate::error::Stop;
use crate::fsutil;
use crate::manifest::{FileEntry, MANIFEST, Manifest, SHA256SUMS, SIGNATURE};
use crate::source::static_resources::Restorability;
use crate::targets::{self, Target};
use crate::trust::signing::{AllowedSigners, Verdict};

/// Where `fetch` puts a set by default: the directory the platform's documentation uses.
pub const DEFAULT_FETCH_DIR: &str = "/home/core/assets/backup";

/// What tells an OpenShift control-plane node: the platform's restore script, or its static
/// pod resources.
const OPENSHIFT_NODE_MARKS: [&str; 2] = [
    "/usr/local/bin/cluster-restore.sh",
    "/etc/kubernetes/static-pod-resources",
];

/// `fetch`'s directory: `--to`, or [`DEFAULT_FETCH_DIR`] on an OpenShift control-plane node
/// only (elsewhere, an admin's machine or a drill host, creating `/home/core/...` surprises).
pub fn fetch_dir(to: Option<&Path>) -> Result<PathBuf> {
    if let Some(to) = to {
        return Ok(to.to_path_buf());
    }
    if OPENSHIFT_NODE_MARKS.iter().any(|p| Path::new(p).exists()) {
        return Ok(PathBuf::from(DEFAULT_FETCH_DIR));
    }
    bail!(Stop::Usage(format!(
        "--to DIR is required here: the default {DEFAULT_FETCH_DIR} is only used on an OpenShift control-plane node (none of {} exists)",
        OPENSHIFT_NODE_MARKS.join(", ")
    )))
}

/// The command that restores a set's snapshot into a data directory, for the etcd version
/// it came from: `etcdutl` from 3.5 (3.6 has no `etcdctl snapshot restore`), `etcdctl` with
/// API v3 before (3.4 has no `etcdutl`).
pub fn restore_command(etcd_version: &str, snapshot: &str) -> String {
    let (major, minor) = {
        let mut it = etcd_version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    };
    let args = format!(
        "snapshot restore {snapshot} --data-dir /var/lib/etcd-restored --name NAME --initial-cluster NAME=https://HOST:2380 --initial-advertise-peer-urls https://HOST:2380"
    );
    if (major, minor) >= (3, 5) {
        format!("etcdutl {args}")
    } else {
        format!("ETCDCTL_API=3 etcdctl {args}")
    }
}
const SUMS_CAP: u64 = 64 * 1024;

/// A set found on a target.
pub struct Located {
    pub target: Box<dyn Target>,
    pub cluster: String,
    pub manifest: Manifest,
    /// The text of an age identity file, for encrypted sets.
    pub identity: Option<String>,
    /// Set when the set was chosen as `latest`: what to name instead should it turn out
    /// damaged while it is read.
    pub latest: Option<LatestChoice>,
    /// What its signature must be.
    pub trust: Trust,
    /// `fetch --allow-unrestorable-archive`: take a static resources archive the platform's
    /// restore cannot use (warned about) instead of refusing the set.
    pub allow_unrestorable: bool,
}

/// What a reader requires of a set's signature: with `verify.allowed_signers`, a valid
/// `manifest.json.sig` by a key it lists; without, none (but an invalid one is refused).
#[derive(Debug, Default)]
pub struct Trust {
    pub allowed: Option<AllowedSigners>,
    /// `--allow-unsigned`: take the set whatever its signature is (warned about).
    pub allow_unsigned: bool,
    /// The verdict, once [`check_signature`] has read it.
    verdict: std::sync::OnceLock<Verdict>,
}

impl Trust {
    /// The trust `settings` asks for (`verify.allowed_signers`, read here).
    pub fn of(settings: &Settings) -> Result<Trust> {
        let allowed = match &settings.verify.allowed_signers {
            Some(p) => Some(AllowedSigners::load(p)?),
            None => None,
        };
        Ok(Trust {
            allowed,
            ..Trust::default()
        })
    }
}

/// Reads a small file of a set whole, refusing more than `cap` bytes.
async fn read_small(target: &dyn Target, cluster: &str, id: &str, name: &str, cap: u64) -> Result<Vec<u8>> {
    let mut r = target.open_file(cluster, id, name).await?.take(cap + 1);
    let mut bytes = Vec::new();
    r.read_to_end(&mut bytes)
        .await
        .with_context(|| format!("cannot read {name}"))?;
    if bytes.len() as u64 > cap {
        bail!(Damage(format!("{name} is larger than {cap} bytes")));
    }
    Ok(bytes)
}

/// What the signature of set `m` on `target` says, judged against `allowed`: the exact
/// bytes of its `manifest.json` (which must say what `m` says) and its `manifest.json.sig`.
pub async fn signature_of(
    target: &dyn Target,
    cluster: &str,
    m: &Manifest,
    allowed: Option<&AllowedSigners>,
) -> Result<Verdict> {
    let sig = read_small(target, cluster, &m.id, SIGNATURE, crate::trust::signing::SIGNATURE_CAP)
        .await
        .map_err(|e| crate::error::one_line(&e));
    let sig = match sig {
        Ok(s) => s,
        Err(why) => return Ok(Verdict::Unsigned(why)),
    };
    let json = read_small(target, cluster, &m.id, MANIFEST, targets::MANIFEST_CAP).await?;
    if Manifest::parse(&json).ok().as_ref() != Some(m) {
        bail!(Damage(format!("{MANIFEST} changed while the set was being read")));
    }
    Ok(crate::trust::signing::judge(&json, Ok(&sig), allowed))
}

/// Checks the set's signature as [`Trust`] requires before anything of it is used: a set
/// refused fails with the reason, naming the signature, unless `--allow-unsigned`.
pub async fn check_signature(located: &Located) -> Result<Verdict> {
    if let Some(v) = located.trust.verdict.get() {
        return Ok(v.clone());
    }
    let (m, allowed) = (&located.manifest, located.trust.allowed.as_ref());
    let verdict = signature_of(located.target.as_ref(), &located.cluster, m, allowed)
        .await
        .map_err(|e| explain(located, e))?;
    // A signed manifest names its cluster: a set moved into another cluster's folder is not
    // that cluster's backup.
    let moved = (matches!(verdict, Verdict::Good { .. }) && m.cluster_name != located.cluster).then(|| {
        format!(
            "its signed manifest names cluster '{}', but it is in the folder of cluster '{}': it was moved there",
            m.cluster_name, located.cluster
        )
    });
    if let Some(why) = verdict.refusal(allowed).or(moved) {
        if !located.trust.allow_unsigned {
            bail!(
                "refusing set {} on target '{}': {why} (--allow-unsigned to take it anyway)",
                m.id,
                located.target.name()
            );
        }
        tracing::warn!("set {}: {why}; taking it anyway (--allow-unsigned)", m.id);
    }
    let _ = located.trust.verdict.set(verdict.clone());
    Ok(verdict)
}

/// How `latest` was resolved: the newest set with a manifest, whatever its state, so that
/// `latest` never silently means "the newest good one".
#[derive(Debug, Clone)]
pub struct LatestChoice {
    /// The newest older set whose files are all there at their recorded sizes.
    pub next_intact: Option<String>,
}

/// A set whose stored bytes are not what its manifest records (missing, shorter, longer,
/// another checksum), or that cannot be restored although they are. `verify` and `download`
/// tell it from transport and identity errors, to name the set and what to use instead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Damage(pub String);

/// The refusal of a damaged newest set, naming the newest intact one.
fn damaged_latest(target: &str, id: &str, what: &str, next: Option<&str>) -> String {
    let instead = match next {
        Some(n) => format!("the newest intact set is {n}: fetch it by id (not `latest`)"),
        None => format!("no older set on target '{target}' is intact"),
    };
    format!("the newest set {id} on target '{target}' is damaged: {what}; {instead}")
}

/// `e`, reworded when it is damage of the set (see [`Damage`]).
fn explain(located: &Located, e: anyhow::Error) -> anyhow::Error {
    let Some(damage) = e.chain().find_map(|c| c.downcast_ref::<Damage>()) else {
        return e;
    };
    let (target, id) = (located.target.name(), &located.manifest.id);
    match &located.latest {
        Some(l) => anyhow!(Damage(damaged_latest(target, id, &damage.0, l.next_intact.as_deref()))),
        None => anyhow!(Damage(format!(
            "set {id} on target '{target}' is damaged: {}",
            damage.0
        ))),
    }
}

/// Finds set `id` (or the newest, for `latest`) on the target named `target` (default: the
/// first configured), in the configured cluster's folder, or in any when none is configured.
pub async fn locate(settings: &Settings, target: Option<&str>, id: &str) -> Result<Located> {
    let trust = Trust::of(settings)?;
    let ts = match target {
        Some(name) => settings
            .target(name)
            .ok_or_else(|| Stop::Usage(format!("--target {name:?}: no such target")))?,
        None => &settings.targets[0],
    };
    let t = targets::open(ts, None)?;
    // Damaged sets too: the newest set is `latest` whatever its state (a damaged one is
    // refused below, naming the newest intact one), never silently the one before it.
    let sets = t.list_all_sets(settings.cluster_name.as_deref()).await?;
    let next_intact = |after: &str| {
        sets.iter()
            .find(|s| s.damaged.is_none() && s.manifest.id.as_str() < after)
            .map(|s| s.manifest.id.clone())
    };
    let chosen: Vec<_> = if id == "latest" {
        let clusters: std::collections::BTreeSet<&str> = sets.iter().map(|s| s.cluster.as_str()).collect();
        if clusters.len() > 1 {
            bail!(Stop::Usage(format!(
                "target '{}' holds sets of several clusters ({}); set cluster_name to choose one",
                ts.name,
                clusters.into_iter().collect::<Vec<_>>().join(", ")
            )));
        }
        sets.iter().take(1).cloned().collect()
    } else {
        sets.iter().filter(|s| s.manifest.id == id).cloned().collect()
    };
    match chosen.len() {
        0 if id == "latest" => bail!("target '{}' holds no complete backup set", ts.name),
        0 => bail!(
            "target '{}' holds no complete backup set '{id}' (see `etcd-backupd list`)",
            ts.name
        ),
        1 => {}
        _ => bail!(Stop::Usage(format!(
            "set '{id}' exists for several clusters on target '{}'; set cluster_name to choose one",
            ts.name
        ))),
    }
    let s = chosen.into_iter().next().expect("one set");
    let next = next_intact(&s.manifest.id);
    if let Some(what) = &s.damaged {
        if id == "latest" {
            bail!(Damage(damaged_latest(&ts.name, &s.manifest.id, what, next.as_deref())));
        }
        let instead = sets
            .iter()
            .find(|s| s.damaged.is_none())
            .map(|s| format!("; the newest intact set is {}", s.manifest.id))
            .unwrap_or_default();
        bail!(Damage(format!(
            "set {id} on target '{}' is damaged: {what}{instead}",
            ts.name
        )));
    }
    Ok(Located {
        target: t,
        cluster: s.cluster,
        manifest: s.manifest,
        identity: None,
        latest: (id == "latest").then_some(LatestChoice { next_intact: next }),
        trust,
        allow_unrestorable: false,
    })
}

/// What checking one file found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckedFile {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    /// What was proven beyond size and hash.
    pub also: Option<String>,
}

/// Reads `SHA256SUMS` from the target and checks it says what the manifest says.
async fn check_sums(located: &Located) -> Result<()> {
    let m = &located.manifest;
    let mut r = located
        .target
        .open_file(&located.cluster, &m.id, SHA256SUMS)
        .await?
        .take(SUMS_CAP + 1);
    let mut text = String::new();
    r.read_to_string(&mut text)
        .await
        .with_context(|| format!("cannot read {SHA256SUMS}"))?;
    if text.len() as u64 > SUMS_CAP {
        bail!(Damage(format!("{SHA256SUMS} is larger than {SUMS_CAP} bytes")));
    }
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
async fn check_file(located: &Located, f: &FileEntry, out: Option<&mut tokio::fs::File>) -> Result<CheckedFile> {
    let std_out = match out {
        Some(o) => Some(o.try_clone().await?.into_std().await),
        None => None,
    };
    check_stream(located, f, std_out).await
}

/// Counts and hashes what is read through it, failing past `cap` bytes.
struct Tee<R> {
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
async fn check_stream(located: &Located, f: &FileEntry, out: Option<std::fs::File>) -> Result<CheckedFile> {
    let m = &located.manifest;
    let reader = located
        .target
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
        let plain = crate::envelope::open_reader(Box::new(&mut stored), &f.compression, &f.encryption, identity.as_deref())?;
        type Opened = (u64, String, Option<Restorability>, Option<crate::source::snapshot::TrailerCheck>);
        let opened = (|| -> Result<Opened> {
            let mut plain = Tee::new(plain, f.size);
            plain.out = out;
            if f.name.starts_with("snapshot_") {
                plain.trailer = Some(crate::source::snapshot::TrailerCheck::default());
            }
            let archive = if f.name.starts_with("static_kuberesources_") {
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

/// Downloads and checks the set into `dir` under temporary names (0600), then, once all of
/// them passed, removes `replaced` (the set `fetch --force` replaces) and renames each file
/// to its original name. On failure nothing is left and `replaced` is untouched.
pub async fn download(located: &Located, dir: &Path, replaced: &[PathBuf]) -> Result<Vec<(CheckedFile, PathBuf)>> {
    check_signature(located).await?;
    check_sums(located).await.map_err(|e| explain(located, e))?;
    let mut temps: Vec<PathBuf> = Vec::new();
    let mut renamed: Vec<PathBuf> = Vec::new();
    let result = async {
        let mut checked = Vec::new();
        // The archive first: it is small, and an archive the restore cannot use refuses the
        // set before the snapshot is downloaded.
        let mut files: Vec<&FileEntry> = located.manifest.files.iter().collect();
        files.sort_by_key(|f| f.name.starts_with("snapshot_"));
        for f in files {
            let tmp = dir.join(format!(".{}.partial-{:08x}", f.name, rand::random::<u32>()));
            let std_file = fsutil::create_private_file(&tmp)?;
            temps.push(tmp.clone());
            let mut file = tokio::fs::File::from_std(std_file);
            crate::notify::status(&format!("fetching {}", f.stored_name));
            // Written and fsynced by the check itself.
            let c = check_file(located, f, Some(&mut file)).await?;
            checked.push((c, dir.join(&f.name)));
        }
        for p in replaced {
            std::fs::remove_file(p).with_context(|| format!("cannot remove '{}'", p.display()))?;
        }
        for (tmp, (_, dest)) in temps.iter().zip(&checked) {
            fsutil::rename_noreplace(tmp, dest).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    anyhow!("'{}' already exists", dest.display())
                } else {
                    anyhow!("cannot rename '{}' to '{}': {e}", tmp.display(), dest.display())
                }
            })?;
            renamed.push(dest.clone());
        }
        fsutil::fsync_dir(dir)?;
        Ok(checked)
    }
    .await;
    if result.is_err() {
        // Half a set under final names would look complete to the restore script.
        for p in temps.iter().chain(&renamed) {
            let _ = std::fs::remove_file(p);
        }
    }
    result.map_err(|e| explain(located, e))
}

/// Files `cluster-restore.sh` would pick up from `dir`.
fn restore_candidates(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read '{}'", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if (name.starts_with("snapshot") && name.ends_with(".db"))
            || (name.starts_with("static_kuberesources") && name.ends_with(".tar.gz"))
        {
            found.push(e.path());
        }
    }
    Ok(found)
}

/// Makes `dir` ready to receive one set: created (0700) when missing; refused when not empty,
/// unless `force`. Returns the files the restore script would pick up, which `force` replaces:
/// [`download`] removes them only once the new set passed every check, so a refused fetch
/// leaves the set that was there.
pub fn prepare_fetch_dir(dir: &Path, force: bool) -> Result<Vec<PathBuf>> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_none() {
                return Ok(Vec::new());
            }
            if !force {
                bail!(Stop::Usage(format!(
                    "'{}' is not empty; the restore script picks the newest snapshot*.db and static_kuberesources*.tar.gz in it, so it must hold exactly one set: use an empty directory, or --force to replace those files",
                    dir.display()
                )));
            }
            restore_candidates(dir)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create '{}'", dir.display()))?;
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .with_context(|| format!("cannot set the mode of '{}'", dir.display()))?;
            Ok(Vec::new())
        }
        Err(e) => Err(anyhow!("cannot read '{}': {e}", dir.display())),
    }
}

/// What the ClusterVersion says about the cluster's version: the facts the z-stream rule
/// needs. All `None` when the etcd holds no ClusterVersion (not OpenShift).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionFacts {
    /// `status.desired.version`: what the cluster runs, or is moving to.
    pub desired: Option<String>,
    /// The newest `status.history` entry: its `state` (`Completed` | `Partial`) and version.
    pub newest: Option<(String, String)>,
    /// The newest history entry whose state is `Completed`.
    pub last_completed: Option<String>,
}

impl VersionFacts {
    /// Reads the facts out of the ClusterVersion JSON; missing fields stay `None`.
    pub fn of(cv: &serde_json::Value) -> VersionFacts {
        let text = |v: Option<&serde_json::Value>| {
            v.and_then(serde_json::Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let history = cv
            .pointer("/status/history")
            .and_then(serde_json::Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let newest = history
            .first()
            .and_then(|h| Some((text(h.get("state")).unwrap_or_default(), text(h.get("version"))?)));
        let last_completed = history
            .iter()
            .find(|h| h.get("state").and_then(serde_json::Value::as_str) == Some("Completed"))
            .and_then(|h| text(h.get("version")));
        VersionFacts {
            desired: text(cv.pointer("/status/desired/version")),
            newest,
            last_completed,
        }
    }
}

/// The running cluster's version facts, read from etcd when it answers in time; `None`
/// when it holds no (readable) ClusterVersion.
pub async fn version_facts(settings: &Settings) -> Result<Option<VersionFacts>> {
    let within = settings.etcd.connect_timeout.0 + settings.etcd.request_timeout.0;
    let read = async {
        let (mut member, _) = crate::etcd::connect_first(&settings.etcd).await?;
        let raw = member.get(crate::etcd::CLUSTER_VERSION_KEY).await?;
        Ok::<_, anyhow::Error>(raw.and_then(|b| match serde_json::from_slice(&b) {
            Ok(v) => Some(VersionFacts::of(&v)),
            Err(_) => {
                tracing::warn!("the ClusterVersion object in etcd is not JSON; ignoring it");
                None
            }
        }))
    };
    match tokio::time::timeout(within, read).await {
        Ok(r) => r,
        Err(_) => bail!("etcd did not answer within {}", humantime::format_duration(within)),
    }
}

/// The same-z-stream rule for a set taken on OpenShift `set`. `Ok` with the rule that
/// accepted it (none when either version is unknown), `Err` with the refusal, which always
/// names a version a set can exist for.
///
/// A cluster at a completed version (newest history entry `Completed` and the desired version
/// equal to it) takes a set of that version only. A cluster that is not (a failed or running
/// upgrade: newest entry `Partial`, or the desired version differs from it) takes a set of
/// its last `Completed` version, the one its control plane's static resources and data came
/// from (the way back from a failed upgrade), and one of the version being installed.
pub fn check_versions(set: Option<&str>, cluster: &VersionFacts) -> Result<Option<String>, String> {
    let Some(s) = set else { return Ok(None) };
    let newest = cluster.newest.as_ref();
    let Some(target) = cluster.desired.as_deref().or(newest.map(|(_, v)| v.as_str())) else {
        return Ok(None);
    };
    let settled = newest.is_none_or(|(state, version)| state != "Partial" && version == target);
    if settled {
        if s == target {
            return Ok(Some(format!(
                "the cluster runs {target}: a set of the same release is accepted"
            )));
        }
        return Err(format!(
            "the set was taken on OpenShift {s} but the cluster runs {target}; a restore needs a backup of the same release (use a set taken on {target}, or --allow-version-mismatch if you know why)"
        ));
    }
    let from = cluster.last_completed.as_deref();
    let state = match from {
        Some(f) if f != target => format!("the cluster is upgrading from {f} to {target} (not completed)"),
        Some(_) => format!("the cluster's update to {target}, its last completed version, is not completed"),
        None => format!("the cluster is moving to {target} and has no completed version yet"),
    };
    if Some(s) == from {
        return Ok(Some(format!(
            "{state}: a set of {s}, the last completed version, is accepted"
        )));
    }
    if s == target {
        return Ok(Some(format!(
            "{state}: a set of {s}, the version being installed, is accepted"
        )));
    }
    let wanted = match from {
        Some(f) if f != target => {
            format!("a set taken on {f}, the last completed version, or on {target}, the version being installed")
        }
        _ => format!("a set taken on {target}"),
    };
    Err(format!(
        "the set was taken on OpenShift {s} but {state}; a restore needs {wanted} (or --allow-version-mismatch if you know why)"
    ))
}

// ---- the restore drill ----

/// What a restore drill found.
#[derive(Debug, Clone, Serialize)]
pub struct Drill {
    pub id: String,
    pub etcd_version: String,
    pub revision: i64,
    pub keys: i64,
    pub kubernetes_keys: i64,
    pub namespaces: i64,
    pub cluster_version: Option<String>,
    /// The whole drill: fetch, checks, restore, start and the reads of the restored etcd.
    pub seconds: f64,
    /// From the drill's start until the restored etcd answered: fetching the set from its
    /// target and checking it (signature, checksums, decryption and decompression), `snapshot restore`, and
    /// starting etcd on the restored data (a measured RTO for one member).
    pub restore_seconds: f64,
    /// The target the set came from.
    pub target: String,
    /// The set's creation time (RFC 3339, UTC).
    pub set_created: String,
}

fn find_tool(settings: &Settings, name: &str) -> Option<PathBuf> {
    if let Some(dir) = &settings.verify.bin_dir {
        let p = dir.join(name);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A throwaway etcd: killed and waited for when dropped.
struct Throwaway(std::process::Child);

impl Drop for Throwaway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_tool(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        bail!("{what} failed ({}): {}", out.status, last.trim());
    }
    Ok(())
}

/// The restore drill: fetch the set into a scratch directory, restore the snapshot with
/// the etcd tooling, start a throwaway etcd on loopback, and read what it serves.
pub async fn drill(settings: &Settings, located: &Located) -> Result<Drill> {
    let started = Instant::now();
    let etcd_bin = find_tool(settings, "etcd")
        .ok_or_else(|| anyhow!("the restore drill needs the etcd binary (set verify.bin_dir, or put it in PATH)"))?;
    let (restorer, is_etcdutl) = match find_tool(settings, "etcdutl") {
        Some(p) => (p, true),
        None => (
            find_tool(settings, "etcdctl").ok_or_else(|| {
                anyhow!("the restore drill needs etcdutl (etcd 3.5+) or etcdctl (3.4) (set verify.bin_dir, or put it in PATH)")
            })?,
            false,
        ),
    };
    let scratch_parent = settings.verify.scratch_dir.clone().unwrap_or_else(std::env::temp_dir);
    let scratch = tempfile::Builder::new()
        .prefix("etcd-backupd-drill-")
        .tempdir_in(&scratch_parent)
        .with_context(|| format!("verify.scratch_dir '{}'", scratch_parent.display()))?;
    let files = download(located, scratch.path(), &[]).await?;
    let snapshot = files
        .iter()
        .find(|(c, _)| c.name.starts_with("snapshot_"))
        .map(|(_, p)| p.clone())
        .ok_or_else(|| anyhow!("the set has no snapshot"))?;
    let data = scratch.path().join("data");
    let (client_port, peer_port) = (free_port()?, free_port()?);
    let peer = format!("http://127.0.0.1:{peer_port}");
    let client = format!("http://127.0.0.1:{client_port}");
    let mut restore = Command::new(&restorer);
    if !is_etcdutl {
        restore.env("ETCDCTL_API", "3");
    }
    restore
        .arg("snapshot")
        .arg("restore")
        .arg(&snapshot)
        .arg("--data-dir")
        .arg(&data)
        .args(["--name", "drill", "--initial-cluster"])
        .arg(format!("drill={peer}"))
        .arg("--initial-advertise-peer-urls")
        .arg(&peer);
    let tool = restorer.file_name().unwrap_or_default().to_string_lossy().to_string();
    crate::notify::status(&format!("restore drill: {tool} snapshot restore"));
    // Ended when the drill returns: it covers the restore and the throwaway etcd's start.
    let _phase = crate::progress::Phase::start("restore drill", None);
    tokio::task::spawn_blocking(move || run_tool(&mut restore, &format!("{tool} snapshot restore"))).await??;

    let log = std::fs::File::create(scratch.path().join("etcd.log"))?;
    let child = Command::new(&etcd_bin)
        .args(["--name", "drill", "--data-dir"])
        .arg(&data)
        .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
        .arg("--initial-cluster")
        .arg(format!("drill={peer}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start '{}'", etcd_bin.display()))?;
    let mut etcd = Throwaway(child);
    crate::notify::status("restore drill: reading the restored etcd");
    let deadline = Instant::now() + Duration::from_secs(60);
    let serving;
    let mut client_conn = loop {
        if let Ok(Some(status)) = etcd.0.try_wait() {
            let log = std::fs::read_to_string(scratch.path().join("etcd.log")).unwrap_or_default();
            let last = log
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .to_string();
            bail!("the throwaway etcd exited ({status}) on the restored data: {last}");
        }
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(10));
        if let Ok(mut c) = etcd_client::Client::connect([client.as_str()], Some(opts)).await
            && c.status().await.is_ok()
        {
            serving = started.elapsed();
            break c;
        }
        if Instant::now() > deadline {
            bail!("the throwaway etcd did not answer within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let status = client_conn.status().await?;
    let count = |prefix: &str| {
        let mut c = client_conn.clone();
        let prefix = prefix.to_string();
        async move {
            let opts = if prefix.is_empty() {
                etcd_client::GetOptions::new().with_all_keys().with_count_only()
            } else {
                etcd_client::GetOptions::new().with_prefix().with_count_only()
            };
            let key = if prefix.is_empty() {
                vec![0u8]
            } else {
                prefix.into_bytes()
            };
            let r = c.get(key, Some(opts)).await?;
            Ok::<_, anyhow::Error>((r.count(), r.header().map(|h| h.revision()).unwrap_or(0)))
        }
    };
    let (keys, revision) = count("").await?;
    let (kubernetes_keys, _) = count("/kubernetes.io/").await?;
    let (namespaces, _) = count("/kubernetes.io/namespaces/").await?;
    let cv = client_conn.get(crate::etcd::CLUSTER_VERSION_KEY, None).await?;
    let cluster_version = cv.kvs().first().map(|kv| {
        crate::etcd::parse_cluster_version(kv.value())
            .version
            .unwrap_or_default()
    });
    drop(etcd);

    let m = &located.manifest;
    if revision < m.etcd.revision {
        bail!(
            "the restored etcd is at revision {revision}, below the {} the manifest records",
            m.etcd.revision
        );
    }
    if m.openshift.is_some() {
        if cluster_version.is_none() {
            bail!("the restored etcd holds no ClusterVersion, but the set was taken on OpenShift");
        }
        if namespaces == 0 {
            bail!("the restored etcd holds no /kubernetes.io/namespaces/ keys");
        }
    }
    Ok(Drill {
        id: m.id.clone(),
        etcd_version: status.version().to_string(),
        revision,
        keys,
        kubernetes_keys,
        namespaces,
        cluster_version,
        seconds: started.elapsed().as_secs_f64(),
        restore_seconds: serving.as_secs_f64(),
        target: located.target.name().to_string(),
        set_created: crate::delivery::retention::created_of(m)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| m.created.clone()),
    })
}

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
