//! `fetch --at`: the newest set the journal reaches a moment from, rolled forward to it.
//!
//! The set is fetched and checked as `fetch` does; its snapshot is restored into a
//! throwaway etcd on loopback (limits raised: one original revision may hold thousands of
//! ops), the journal's segments are read (each checked: size, SHA-256, signature) and
//! replayed up to the moment ([`crate::journal::replay`]), and etcd's snapshot API writes the
//! result, with its SHA-256 trailer, as `snapshot_<time reached>.db` in place of the set's
//! snapshot. The static resources archive stays the set's. It needs etcd's binaries
//! (`verify.bin_dir`), like a restore drill: run it on a drill host or an admin's machine.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::drill::{Tools, free_port};
use super::locate::Located;
use super::verify::CheckedFile;
use crate::config::{SetFile, Settings};
use crate::error::Stop;
use crate::journal::chain::{self, Base, Moment, Plan};
use crate::journal::replay::Replay;
use crate::journal::segment;
use crate::journal::writer::SEGMENT_CAP;
use crate::manifest::FileKind;
use crate::targets::{self, Target};

/// Flags of the throwaway etcd a replay runs on: one revision may hold a whole lease's keys
/// (thousands of ops) and megabytes of values.
const REPLAY_ETCD_FLAGS: &[&str] = &[
    "--max-txn-ops",
    "1000000",
    "--max-request-bytes",
    "536870912",
    "--quota-backend-bytes",
    "8589934592",
];

/// The set chosen for a moment holds a later revision (its manifest recorded a lower one),
/// or nothing in the journal shows its revision was made by the moment: an older set must
/// be used (see [`plan`]'s `excluded`).
#[derive(Debug, thiserror::Error)]
#[error("set {id} (revision {held}) may hold changes made after {moment}")]
pub struct PastMoment {
    pub id: String,
    pub held: i64,
    pub moment: String,
}

/// What a roll-forward reached.
#[derive(Debug, Clone, Serialize)]
pub struct Reached {
    /// The moment asked for, as given.
    pub moment: String,
    pub revision: i64,
    /// When the writer received that revision (`None`: the set's own state).
    pub stamped: Option<DateTime<Utc>>,
    pub base_id: String,
    pub base_revision: i64,
    pub revisions_replayed: u64,
    pub segments: usize,
    pub seconds: f64,
}

/// The journal of the configured cluster as the targets holding snapshots have it, and the
/// set and segments `moment` needs. Segments are read from `target` first (default: the
/// first), then from the others.
pub struct AtPlan {
    pub moment: Moment,
    pub plan: Plan,
    pub cluster: String,
    sources: Vec<Box<dyn Target>>,
}

/// What the targets holding snapshots have of the configured cluster: its sets (as bases)
/// and the journal's spans.
struct Survey {
    cluster: String,
    bases: Vec<Base>,
    spans: Vec<chain::Span>,
    sources: Vec<Box<dyn Target>>,
}

/// Sets are read from `target` (default: the first holding snapshots), segments from every
/// target holding snapshots.
async fn survey(settings: &Settings, target: Option<&str>, excluded: &[String]) -> Result<Survey> {
    let mut chosen: Vec<&crate::config::TargetSettings> = settings
        .targets
        .iter()
        .filter(|t| t.files.contains(&SetFile::Snapshot))
        .collect();
    if let Some(name) = target {
        let pos = chosen
            .iter()
            .position(|t| t.name == name)
            .ok_or_else(|| Stop::Usage(format!("--target {name:?}: no such target holding snapshots")))?;
        let first = chosen.remove(pos);
        chosen.insert(0, first);
    }
    let sources: Vec<Box<dyn Target>> = chosen
        .into_iter()
        .map(|t| targets::open(t, None))
        .collect::<Result<_>>()?;
    let first = sources.first().ok_or_else(|| anyhow!("no target holds snapshots"))?;
    let sets = first.list_sets(settings.cluster_name.as_deref()).await?;
    let clusters: std::collections::BTreeSet<&str> = sets.iter().map(|s| s.cluster.as_str()).collect();
    let cluster = match clusters.len() {
        0 => bail!("target '{}' holds no complete backup set", first.name()),
        1 => clusters.into_iter().next().expect("one").to_string(),
        _ => bail!(Stop::Usage(format!(
            "target '{}' holds sets of several clusters; set cluster_name to choose one",
            first.name()
        ))),
    };
    let bases: Vec<Base> = sets
        .iter()
        .filter(|s| !excluded.contains(&s.manifest.id))
        .filter_map(|s| {
            Some(Base {
                id: s.manifest.id.clone(),
                revision: s.manifest.etcd.revision,
                created: crate::delivery::retention::created_of(&s.manifest)?,
            })
        })
        .collect();
    let mut named = Vec::new();
    for t in &sources {
        match t.list_journal(&cluster).await {
            Ok(names) => named.extend(names.iter().filter_map(|(n, _)| segment::parse_name(n))),
            Err(e) => {
                tracing::warn!(target_name = %t.name(), error = %crate::error::one_line(&e), "cannot list the journal")
            }
        }
    }
    Ok(Survey {
        cluster,
        bases,
        spans: chain::spans(named),
        sources,
    })
}

/// Plans `fetch --at`: refused (exit 1) when the journal does not cover `moment`. Sets in
/// `excluded` are not considered (one found past the moment: [`PastMoment`]).
pub async fn plan(settings: &Settings, target: Option<&str>, moment: Moment, excluded: &[String]) -> Result<AtPlan> {
    let Survey {
        cluster,
        bases,
        spans,
        sources,
    } = survey(settings, target, excluded).await?;
    let plan = chain::plan(&bases, &spans, moment).map_err(|e| anyhow!("refusing --at: {e}"))?;
    Ok(AtPlan {
        moment,
        plan,
        cluster,
        sources,
    })
}

/// Runs `attempt` on the plan for `moment`, and again on a plan from an older set each time
/// the set chosen turns out to hold changes made after the moment ([`PastMoment`]): the one
/// loop `fetch --at`, `verify --at` and `rebase` share.
pub async fn from_a_set_before<T>(
    settings: &Settings,
    target: Option<&str>,
    moment: Moment,
    mut attempt: impl AsyncFnMut(&AtPlan) -> Result<T>,
) -> Result<T> {
    let mut excluded = Vec::new();
    loop {
        let at = plan(settings, target, moment, &excluded).await?;
        match attempt(&at).await {
            Err(ref e) if let Some(past) = e.downcast_ref::<PastMoment>() => {
                tracing::info!("{past}; trying an older set");
                excluded.push(past.id.clone());
            }
            done => return done,
        }
    }
}

/// The newest moment the journal reaches from the newest set it starts from: the last
/// revision of that set's chain.
pub async fn newest(settings: &Settings, target: Option<&str>) -> Result<Moment> {
    let s = survey(settings, target, &[]).await?;
    chain::newest_revision(&s.bases, &s.spans)
        .map(Moment::Revision)
        .ok_or_else(|| {
            anyhow!(
                "no set of cluster {} starts a chain of the journal; covered: {}",
                s.cluster,
                chain::coverage(&s.spans)
            )
        })
}

/// The rolled-forward snapshot checked as a set's is before anything uses it: etcd's SHA-256
/// trailer, and the revision etcd's own tools read from it, the one replayed to.
async fn check_rolled(tools: &Tools, path: &Path, revision: i64) -> Result<()> {
    let trailer = path.to_path_buf();
    tokio::task::spawn_blocking(move || crate::source::snapshot::verify_file(&trailer))
        .await?
        .context("the rolled-forward snapshot")?;
    let held = tools.snapshot_revision(path).await?;
    if held != revision {
        bail!("the rolled-forward snapshot holds revision {held}, not the {revision} replayed to");
    }
    Ok(())
}

/// Rolls the set laid out in `files` (fetched and checked) forward to the plan's moment:
/// its snapshot is replaced by one at the moment. On failure the set's files stay as they
/// were; the caller removes them (a directory must never hold a set that is not the moment
/// asked for).
pub async fn roll_forward(
    settings: &Settings,
    located: &Located,
    at: &AtPlan,
    dir: &Path,
    files: &mut Vec<(CheckedFile, PathBuf)>,
) -> Result<Reached> {
    let started = Instant::now();
    let tools = Tools::find(settings)?;
    let pos = files
        .iter()
        .position(|(c, _)| c.kind() == Some(FileKind::Snapshot))
        .ok_or_else(|| anyhow!("the set has no snapshot"))?;
    let scratch_parent = settings.verify.scratch_dir.clone().unwrap_or_else(std::env::temp_dir);
    let scratch = tempfile::Builder::new()
        .prefix("etcd-backupd-at-")
        .tempdir_in(&scratch_parent)
        .with_context(|| format!("verify.scratch_dir '{}'", scratch_parent.display()))?;
    let data = scratch.path().join("data");
    let (peer, client) = (
        format!("http://127.0.0.1:{}", free_port()?),
        format!("http://127.0.0.1:{}", free_port()?),
    );
    tools.restore(&files[pos].1, &data, &peer).await?;
    // A throwaway store needs no fsync (etcd 3.5+ can skip it): one fsync per replayed
    // revision is what bounds the replay's speed otherwise.
    let mut flags = REPLAY_ETCD_FLAGS.to_vec();
    if tools.etcd_takes("--unsafe-no-fsync") {
        flags.push("--unsafe-no-fsync");
    }
    let (etcd, conn) = tools.serve(scratch.path(), &data, (&peer, &client), &flags).await?;
    let snapshot_revision = tools.snapshot_revision(&files[pos].1).await?;
    let mut replay = Replay::start(conn.clone()).await?;
    let base_revision = replay.revision();
    if base_revision != snapshot_revision {
        // Something changed the throwaway store before the replay began (a lease that
        // expired as it started): every revision after would land one off.
        bail!(
            "the throwaway etcd is at revision {base_revision}, not the snapshot's {snapshot_revision}: it changed the store before the replay; try again"
        );
    }
    replay_to_moment(located, at, &mut replay, base_revision).await?;
    let reached_at = replay.at;
    let name = format!(
        "snapshot_{}.db",
        crate::manifest::timestamp(reached_at.unwrap_or(at.plan.base.created))
    );
    let (size, sha256) = save_snapshot(conn, &dir.join(&name)).await?;
    drop(etcd);
    if let Err(e) = check_rolled(&tools, &dir.join(&name), replay.revision()).await {
        let _ = std::fs::remove_file(dir.join(&name));
        return Err(e);
    }
    let old = files.remove(pos);
    if old.1 != dir.join(&name) {
        std::fs::remove_file(&old.1).with_context(|| format!("cannot remove '{}'", old.1.display()))?;
    }
    let reached = Reached {
        moment: at.moment.to_string(),
        revision: replay.revision(),
        stamped: reached_at,
        base_id: at.plan.base.id.clone(),
        base_revision,
        revisions_replayed: replay.applied,
        segments: at.plan.segments.len(),
        seconds: started.elapsed().as_secs_f64(),
    };
    files.insert(
        pos,
        (
            CheckedFile {
                name: name.clone(),
                size,
                sha256,
                also: Some(format!(
                    "set {}'s snapshot rolled forward from revision {base_revision} to {} by etcd, with its SHA-256 trailer",
                    at.plan.base.id, reached.revision
                )),
            },
            dir.join(&name),
        ),
    );
    Ok(reached)
}

/// Replays the plan's segments on `replay` (at the set's `base_revision`) up to the moment:
/// [`PastMoment`] when the set turns out to hold a revision past it, or nothing shows the
/// set's revision was made by a time moment.
async fn replay_to_moment(located: &Located, at: &AtPlan, replay: &mut Replay, base_revision: i64) -> Result<()> {
    let past = || PastMoment {
        id: at.plan.base.id.clone(),
        held: base_revision,
        moment: at.moment.to_string(),
    };
    if let Moment::Revision(n) = at.moment
        && base_revision > n
    {
        return Err(past().into());
    }
    crate::notify::status("fetch --at: replaying the journal");
    // A time moment needs proof that the set's own revision was made by then: a revision at
    // or after it stamped at or before the moment.
    let mut proven = matches!(at.moment, Moment::Revision(_));
    'segments: for named in &at.plan.segments {
        for rec in read_segment(located, at, &named.name).await? {
            let within = match at.moment {
                Moment::Revision(n) => rec.rev <= n,
                Moment::Time(t) => rec.at <= t,
            };
            proven |= within && rec.rev >= base_revision;
            if !within {
                // The set's snapshot already holds a revision after the moment (an etcd 3.4
                // set records the revision read just before its snapshot, which may be lower).
                if rec.rev <= base_revision {
                    return Err(past().into());
                }
                break 'segments;
            }
            replay.apply(&rec).await?;
        }
    }
    if !proven {
        return Err(past().into());
    }
    if let Moment::Revision(n) = at.moment
        && replay.revision() != n
    {
        bail!("the journal ends at revision {} before {n}", replay.revision());
    }
    Ok(())
}

/// The records of segment `name`, from the set's target first, then the others holding
/// snapshots; its signature judged as the set's is.
async fn read_segment(located: &Located, at: &AtPlan, name: &str) -> Result<Vec<segment::Record>> {
    let mut errors = Vec::new();
    for t in &at.sources {
        let raw = match t.read_journal(&at.cluster, name, SEGMENT_CAP).await {
            Ok(Some(raw)) => raw,
            Ok(None) => {
                errors.push(format!("target '{}': missing", t.name()));
                continue;
            }
            Err(e) => {
                errors.push(crate::error::one_line(&e));
                continue;
            }
        };
        let stored = match segment::decode(name, raw) {
            Ok(s) => s,
            Err(e) => {
                errors.push(format!("target '{}': {}", t.name(), crate::error::one_line(&e)));
                continue;
            }
        };
        let verdict = stored.signature(located.trust.allowed.as_ref());
        // --allow-unsigned takes an unsigned or unlisted segment, never an altered one.
        let excused = located.trust.allow_unsigned && !matches!(verdict, crate::trust::signing::Verdict::Invalid(_));
        if let Some(why) = verdict.refusal(located.trust.allowed.as_ref())
            && !excused
        {
            bail!("refusing journal segment {name} on target '{}': {why}", t.name());
        }
        // A segment of another etcd cluster (a folder shared by mistake, a cluster restored
        // under the same cluster_name) never replays onto this set's store.
        let set_cluster = &located.manifest.etcd.cluster_id;
        if set_cluster != "unknown" && stored.header.cluster_id != *set_cluster {
            bail!(
                "refusing journal segment {name} on target '{}': it is of etcd cluster {}, set {} of cluster {set_cluster}",
                t.name(),
                stored.header.cluster_id,
                located.manifest.id
            );
        }
        return stored.records(&located.identity);
    }
    bail!("journal segment {name} cannot be read: {}", errors.join("; "))
}

/// Writes etcd's snapshot of `client`'s store to `path` (through a hidden temporary name,
/// synced, then renamed); its size and SHA-256.
async fn save_snapshot(mut client: etcd_client::Client, path: &Path) -> Result<(u64, String)> {
    let dir = path.parent().ok_or_else(|| anyhow!("no directory"))?;
    let tmp = dir.join(format!(
        ".{}.part",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let mut out = crate::fsutil::create_private_file(&tmp)?;
    let mut hash = Sha256::new();
    let mut size = 0u64;
    let mut stream = client.snapshot().await?;
    let written: Result<()> = async {
        while let Some(part) = stream.message().await? {
            out.write_all(part.blob())?;
            hash.update(part.blob());
            size += part.blob().len() as u64;
        }
        out.sync_all()?;
        Ok(())
    }
    .await;
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context("cannot take the rolled-forward snapshot"));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename to '{}'", path.display()))?;
    crate::fsutil::fsync_dir(dir)?;
    Ok((size, hex::encode(hash.finalize())))
}
