//! Finding a set on the targets (`latest` or an id), with its manifest, sums and signature
//! read and judged before any file of it is.

use std::collections::BTreeMap;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::AsyncReadExt;

use crate::config::Settings;
use crate::error::Stop;
use crate::manifest::{FileEntry, MANIFEST, Manifest, SIGNATURE};
use crate::targets::{self, ListedSet, Target};
use crate::trust::signing::{AllowedSigners, Verdict};

pub(super) const SUMS_CAP: u64 = 64 * 1024;

/// The configured targets that hold the files of `m` that target `found_on` does not: one
/// per such file (the first configured of the file's holders). A holder this configuration
/// does not name is a usage error naming it.
fn holders_of(settings: &Settings, found_on: &str, m: &Manifest) -> Result<BTreeMap<String, Box<dyn Target>>> {
    let mut holders = BTreeMap::new();
    for f in m.files.iter().filter(|f| !f.held_by(found_on)) {
        if f.targets.iter().any(|n| holders.contains_key(n)) {
            continue;
        }
        let Some(t) = f.targets.iter().find_map(|n| settings.target(n)) else {
            bail!(Stop::Usage(format!(
                "set {}: '{}' is on target(s) {} only (the set is split between targets), which this configuration does not name; add one as a [[target]]",
                m.id,
                f.name,
                f.targets.join(", ")
            )));
        };
        let opened =
            targets::open(t, None).map_err(|e| anyhow!("target '{}': {}", t.name, crate::error::one_line(&e)))?;
        holders.insert(t.name.clone(), opened);
    }
    Ok(holders)
}

/// A set split between targets is whole only with its other part: a set whose file is on
/// none of its holders (never delivered there, dropped, damaged there) is marked damaged
/// here, so that `latest` names the newest set that can be restored. Each holder is listed
/// once; one that is not configured is left to [`holders_of`] to name.
async fn mark_missing_parts(settings: &Settings, found_on: &str, sets: &mut [ListedSet]) {
    let mut listed: BTreeMap<String, Option<Vec<ListedSet>>> = BTreeMap::new();
    for s in sets.iter_mut().filter(|s| s.damaged.is_none()) {
        let mut missing = Vec::new();
        for f in s.manifest.files.iter().filter(|f| !f.held_by(found_on)) {
            let mut found = false;
            for name in &f.targets {
                if !listed.contains_key(name) {
                    let sets = match settings.target(name).map(|ts| targets::open(ts, None)) {
                        Some(Ok(t)) => t.list_all_sets(Some(&s.cluster)).await.ok(),
                        _ => None,
                    };
                    listed.insert(name.clone(), sets);
                }
                let there = listed[name].as_ref().and_then(|l| {
                    l.iter()
                        .find(|o| o.cluster == s.cluster && o.manifest.id == s.manifest.id)
                });
                found |= there.is_some_and(|o| o.damaged.is_none() && o.manifest == s.manifest);
                // A holder that could not be listed (not configured, down): not judged here.
                found |= listed[name].is_none();
            }
            if !found {
                missing.push(format!("its '{}' is not intact on {}", f.name, f.targets.join(", ")));
            }
        }
        if !missing.is_empty() {
            s.damaged = Some(missing.join("; "));
        }
    }
}

impl Located {
    /// The target to read file `f` from: where the set was found, or a holder of `f`.
    pub fn source_of(&self, f: &FileEntry) -> Result<&dyn Target> {
        if f.held_by(self.target.name()) {
            return Ok(self.target.as_ref());
        }
        f.targets
            .iter()
            .find_map(|n| self.holders.get(n))
            .map(|t| t.as_ref())
            .ok_or_else(|| anyhow!("'{}' is on target(s) {} only", f.name, f.targets.join(", ")))
    }
}

/// A set found on a target.
pub struct Located {
    pub target: Box<dyn Target>,
    pub cluster: String,
    pub manifest: Manifest,
    /// The texts of the identity files given (age identities or SSH keys), for encrypted
    /// sets: one per key holder when the archive is sealed to its own recipients.
    pub identity: Vec<String>,
    /// The other targets this set's files are on, by name, when it is split between
    /// targets (`[[target]] files`): each file is read from a target that holds it.
    pub holders: BTreeMap<String, Box<dyn Target>>,
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
pub(super) async fn read_small(target: &dyn Target, cluster: &str, id: &str, name: &str, cap: u64) -> Result<Vec<u8>> {
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
pub(super) fn damaged_latest(target: &str, id: &str, what: &str, next: Option<&str>) -> String {
    let instead = match next {
        Some(n) => format!("the newest intact set is {n}: fetch it by id (not `latest`)"),
        None => format!("no older set on target '{target}' is intact"),
    };
    format!("the newest set {id} on target '{target}' is damaged: {what}; {instead}")
}

/// `e`, reworded when it is damage of the set (see [`Damage`]).
pub(super) fn explain(located: &Located, e: anyhow::Error) -> anyhow::Error {
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
    let mut sets = t.list_all_sets(settings.cluster_name.as_deref()).await?;
    mark_missing_parts(settings, t.name(), &mut sets).await;
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
    let holders = holders_of(settings, t.name(), &s.manifest)?;
    Ok(Located {
        target: t,
        cluster: s.cluster,
        manifest: s.manifest,
        identity: Vec::new(),
        holders,
        latest: (id == "latest").then_some(LatestChoice { next_intact: next }),
        trust,
        allow_unrestorable: false,
    })
}
