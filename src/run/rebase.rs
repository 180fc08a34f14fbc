//! `rebase`: a new full set folded off the cluster, from a set and its journal, so a long
//! chain stays fast to restore without another snapshot of the cluster's etcd.
//!
//! On a drill host (it has etcd's binaries and the identities): the newest set a moment
//! starts from is fetched and checked as `fetch` does, rolled forward along the journal to the
//! moment ([`crate::restore::at::roll_forward`], which checks each replayed revision lands
//! where it did, then the snapshot taken of the result: etcd's SHA-256 trailer, and its
//! revision read back by etcd's own tools). It becomes a set of
//! its own: trigger `derived`, the manifest saying from which set and up to which revision
//! (`derived`), its creation time the moment's (the time the writer stamped the revision
//! reached) and its id that second or the next free one, the base set's static resources
//! archive under the new set's
//! timestamp, sealed to this host's recipients and signed with its key, committed to
//! staging as every set is and delivered to every target. A moment later in the chain then
//! replays only what follows it. Retention treats it as any set; the cluster's nodes keep
//! their own policy (this command applies none).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::journal::chain::Moment;
use crate::manifest::{self, Derived, Encryption, FileKind, Manifest, Trigger};
use crate::restore::at::{self, AtPlan, Reached};
use crate::run::context::RunContext;
use crate::trust::signing::Verdict;

/// What `rebase` was asked for.
pub struct Request<'a> {
    /// `None`: the newest revision the journal holds after the newest set.
    pub moment: Option<Moment>,
    pub target: Option<&'a str>,
    /// Texts of the identities that open the base set's files.
    pub identity: Vec<String>,
    pub allow_unsigned: bool,
}

/// A derived set made and delivered.
#[derive(Debug, Serialize)]
pub struct Rebased {
    pub id: String,
    pub reached: Reached,
    /// Targets that hold the new set now.
    pub delivered: usize,
    /// Targets it still waits for (in this host's staging).
    pub pending: usize,
}

/// Folds the journal up to the moment into a new set, then delivers it (no retention).
/// A derived set an earlier `rebase` could not deliver is delivered first. SIGINT or
/// SIGTERM (`abort`) stops it; before the commit, nothing of the new set is left.
pub async fn rebase(settings: &Settings, req: &Request<'_>, abort: &CancellationToken) -> Result<Rebased> {
    crate::delivery::deliver_staged(settings, abort).await?;
    let moment = match req.moment {
        Some(m) => m,
        None => at::newest(settings, req.target).await?,
    };
    let fold_once = async |plan: &AtPlan| {
        tokio::select! {
            r = fold(settings, req, plan) => r,
            _ = abort.cancelled() => bail!("stopped; nothing of the derived set is kept"),
        }
    };
    let (reached, id, cluster) = at::from_a_set_before(settings, req.target, moment, fold_once).await?;
    crate::delivery::deliver_staged(settings, abort).await?;
    // What the targets say, not what staging still holds (a set staging gave up on is gone
    // from it, but on no target).
    let mut delivered = 0;
    for t in &settings.targets {
        let held = match crate::targets::open(t, None) {
            Ok(target) => target
                .list_sets(Some(&cluster))
                .await
                .map(|sets| sets.iter().any(|s| s.manifest.id == id)),
            Err(e) => Err(e),
        };
        match held {
            Ok(true) => delivered += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(target_name = %t.name, error = %crate::error::one_line(&e), "rebase: cannot list the target")
            }
        }
    }
    let pending = settings.targets.len() - delivered;
    tracing::info!(backup_id = %id, delivered, pending, "rebase: the derived set is delivered");
    Ok(Rebased {
        id,
        reached,
        delivered,
        pending,
    })
}

/// Makes the derived set from `plan` and commits it to staging: what was reached, its id
/// and its cluster folder.
async fn fold(settings: &Settings, req: &Request<'_>, plan: &AtPlan) -> Result<(Reached, String, String)> {
    let base = &plan.plan.base;
    if plan.plan.segments.is_empty() || matches!(plan.moment, Moment::Revision(n) if n <= base.revision) {
        return Err(nothing_to_fold(base, plan.moment));
    }
    let Some(staging) = crate::staging::try_lock(&settings.snapshot.staging_dir)? else {
        bail!("staging is busy (a run or delivery pass of this host holds it); try again");
    };
    let mut located = crate::restore::locate(settings, req.target, &base.id).await?;
    located.identity = req.identity.clone();
    located.trust.allow_unsigned = req.allow_unsigned;
    let ctx = RunContext::for_cluster(settings, located.cluster.clone())?;
    let verdict = crate::restore::check_signature(&located).await?;
    refuse_weaker(&located, &verdict, &ctx)?;
    let work = staging.begin(&format!("rebase-{}", base.id))?;
    let mut files = crate::restore::download(&located, work.dir(), &[]).await?;
    let reached = at::roll_forward(settings, &located, plan, work.dir(), &mut files).await?;
    if reached.revisions_replayed == 0 {
        return Err(nothing_to_fold(base, plan.moment));
    }
    let created = reached
        .stamped
        .ok_or_else(|| anyhow!("the revision reached has no time"))?;
    let id = derived_id(&staging, &located, &reached, created).await?;
    let plain = lay_out_files(work.dir(), &files, &id)?;
    let snapshot = plain
        .iter()
        .find(|f| f.kind() == Some(FileKind::Snapshot))
        .cloned()
        .ok_or_else(|| anyhow!("no snapshot"))?;
    let restore = {
        let (dir, plain) = (work.dir().to_path_buf(), plain.clone());
        tokio::task::spawn_blocking(move || crate::trust::certs::facts_of_set(&dir, &plain)).await?
    };
    let names: Vec<String> = settings.targets.iter().map(|t| t.name.clone()).collect();
    let mut sealed = crate::run::pipeline::seal_files(&ctx, work.dir(), plain).await?;
    crate::run::pipeline::record_custody(settings, &names, &mut sealed);
    let base = &located.manifest;
    let m = Manifest {
        format_version: manifest::format_version_of(Trigger::Derived, &sealed),
        id: id.clone(),
        created: created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        cluster_name: ctx.cluster.clone(),
        trigger: Trigger::Derived,
        run: None,
        node: settings.node_name.clone(),
        etcd: manifest::EtcdInfo {
            revision: reached.revision,
            db_size: snapshot.size,
            ..base.etcd.clone()
        },
        openshift: base.openshift.clone(),
        files: sealed,
        tool: manifest::ToolInfo::this(),
        forced: base.forced.clone(),
        restore,
        derived: Some(Derived {
            from_set: base.id.clone(),
            from_revision: reached.base_revision,
            revisions_replayed: reached.revisions_replayed,
            segments: reached.segments,
        }),
    };
    crate::trust::signing::write_set_files(ctx.signer.as_ref(), work.dir(), &m)?;
    staging.commit(work, &id, &names)?;
    crate::staging::state::note_newest_set(staging.root(), &m);
    tracing::info!(
        backup_id = %id, base = %base.id, revision = reached.revision,
        revisions = reached.revisions_replayed, "rebase: derived set staged"
    );
    Ok((reached, id, located.cluster.clone()))
}

/// The id of the derived set: its moment's second (`%F_%H%M%S`), or the first free second
/// after it when a set has that id (ids name sets one a second; the base set itself when
/// the moment follows it closely). Refused when this moment is folded already, on the
/// target or waiting in staging.
async fn derived_id(
    staging: &crate::staging::Locked,
    located: &crate::restore::Located,
    reached: &Reached,
    created: chrono::DateTime<chrono::Utc>,
) -> Result<String> {
    let stored = located.target.list_sets(Some(&located.cluster)).await?;
    let staged = crate::staging::sets::scan(staging.root());
    let folded = |m: &Manifest| m.derived.is_some() && m.etcd.revision == reached.revision;
    if let Some(s) = stored.iter().find(|s| folded(&s.manifest)) {
        bail!(
            "set {} holds this moment (revision {}) folded already",
            s.manifest.id,
            reached.revision
        );
    }
    if let Some(s) = staged.iter().find(|s| folded(&s.set.manifest)) {
        bail!(
            "set {} holds this moment (revision {}) folded already and still waits in this host's staging for a target; run rebase again once the targets answer",
            s.id(),
            reached.revision
        );
    }
    let taken = |id: &str| staging.holds(id) || stored.iter().any(|s| s.manifest.id == id);
    (0..3600)
        .map(|s| manifest::timestamp(created + chrono::TimeDelta::seconds(s)))
        .find(|id| !taken(id))
        .ok_or_else(|| anyhow!("no free set id in the hour after {created}"))
}

/// The journal holds no revision after `base` up to `moment` (a time moment can find that
/// only once replayed).
fn nothing_to_fold(base: &crate::journal::chain::Base, moment: Moment) -> anyhow::Error {
    anyhow!(
        "nothing to fold: the journal holds no revision after set {} (revision {}) up to {moment}",
        base.id,
        base.revision
    )
}

/// A derived set is never weaker than its base: sealed if the base was, signed if the base
/// was (a silent downgrade would store the cluster's Secrets in the clear).
fn refuse_weaker(located: &crate::restore::Located, verdict: &Verdict, ctx: &RunContext) -> Result<()> {
    let base = &located.manifest;
    let encrypted = base.files.iter().any(|f| f.encryption != Encryption::None);
    if encrypted && (ctx.seal.is_plain() || ctx.resources_seal.is_plain()) {
        bail!(
            "set {} is encrypted; a set derived from it must be too: set encryption.recipients (and resources_recipients where used) on this host",
            base.id
        );
    }
    if ctx.signer.is_none() && !matches!(verdict, Verdict::Unsigned(_)) {
        bail!(
            "set {} is signed; a set derived from it must be too: turn [signing] on for this host and add its key to allowed_signers",
            base.id
        );
    }
    Ok(())
}

/// The rolled-forward files under the derived set's names (`snapshot_<id>.db`,
/// `static_kuberesources_<id>.tar.gz`, as `cluster-backup.sh` pairs them), as plain entries.
fn lay_out_files(
    dir: &Path,
    files: &[(crate::restore::CheckedFile, PathBuf)],
    id: &str,
) -> Result<Vec<manifest::FileEntry>> {
    let mut plain = Vec::new();
    for (c, path) in files {
        let name = match c.kind() {
            Some(FileKind::Snapshot) => format!("snapshot_{id}.db"),
            Some(FileKind::Resources) => format!("static_kuberesources_{id}.tar.gz"),
            None => c.name.clone(),
        };
        let to = dir.join(&name);
        if *path != to {
            std::fs::rename(path, &to).with_context(|| format!("cannot rename '{}'", path.display()))?;
        }
        plain.push(crate::run::pipeline::plain_entry(name, c.size, c.sha256.clone()));
    }
    crate::fsutil::fsync_dir(dir)?;
    Ok(plain)
}
