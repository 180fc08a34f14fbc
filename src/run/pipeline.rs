//! One backup, the same for `backup` and the daemon, on the member the caller checked the
//! guards on: probe the targets side by side (briefly), make room in staging, build the
//! static resources archive, stream and verify the snapshot into staging, seal and sign
//! the set with the run's context, commit it to `sets/`, then deliver, retain and bound
//! staging (`crate::delivery`), all on one scan of staging.
//!
//! Pipelined: the snapshot's upload to each target that owes nothing older starts with the
//! stream and follows its staging file as it grows ([`crate::growing`]), so a run takes
//! about as long as the slower of the two. The set is still moved into place only after the
//! trailer and every hash verified; a failed verification aborts those uploads.
//!
//! In staging (`snapshot.staging_dir`, see [`crate::staging`]), a set is assembled in
//! `tmp/<id>-<random>/` (leftovers are removed at the next run) and committed by one rename
//! to `sets/<id>/`, where it waits for (or is done with) delivery.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use chrono::Utc;

use crate::config::{SetFile, Settings, SnapshotMethod};
use crate::delivery::{self, Opened};
use crate::error::Stop;
use crate::etcd::{self, hex_id};
use crate::fsutil;
use crate::growing::Follower;
use crate::manifest::{self, EtcdInfo, FileEntry, FileKind, Manifest, OpenShiftInfo, ToolInfo, Trigger};
use crate::outcome::{Skip, SkipKind};
use crate::run::context::RunContext;
use crate::source::snapshot;
use crate::source::static_resources;
use crate::staging::{Locked, Work, sets};
use crate::targets::{self, Draft, Sent, Target};

#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub trigger: Trigger,
    /// The elected run this backup is for (recorded in the manifest).
    pub run: Option<String>,
    /// The lease of that run's lock, held by this process.
    pub lease: Option<i64>,
    /// Store on this target only.
    pub target: Option<String>,
    /// The guards `backup --force` overrode, recorded in the manifest.
    pub forced: Vec<String>,
    /// `backup --force`: also passed on to the script method's script.
    pub force: Force,
    /// When this run's delivery pass must give up (the daemon: just before the next run),
    /// so that no target's retries delay the next snapshot; what is left is delivered later.
    pub deliver_by: Option<tokio::time::Instant>,
    /// Fired when the run must not publish any more sets (stopped, or the election lock
    /// may be lost): no set is moved into place after it.
    pub abort: tokio_util::sync::CancellationToken,
    /// Set when the delivery pass has ended: from then on the set's fate is known, and a run
    /// stopped after it still ends (retention skipped) so that it is recorded; dropping it
    /// there would leave a stored set without its run's record.
    pub delivered: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Whether the operator asked to back up despite the cluster-state checks (`backup --force`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Force {
    #[default]
    No,
    Yes,
}

#[derive(Debug)]
pub struct TargetOutcome {
    pub name: String,
    pub location: String,
    pub result: Result<(), String>,
}

/// How the snapshot was taken: how long it took, and what pacing did.
#[derive(Debug, Clone, Default)]
pub struct Streamed {
    pub duration: Duration,
    pub pace: Option<crate::source::pace::PaceReport>,
}

#[derive(Debug)]
pub struct BackupReport {
    pub manifest: Manifest,
    pub duration: Duration,
    /// How the snapshot was taken (its pacing: `priority.etcd_latency_budget`).
    pub snapshot: Streamed,
    pub targets: Vec<TargetOutcome>,
    /// (run, id) of the sets this run's delivery pass brought to their last target,
    /// earlier runs' included.
    pub settled: Vec<(String, String)>,
}

impl BackupReport {
    pub fn all_stored(&self) -> bool {
        self.targets.iter().all(|t| t.result.is_ok())
    }

    /// What the run came to, by how many of its targets hold the set.
    pub fn result(&self) -> crate::outcome::RunResult {
        let stored = self.targets.iter().filter(|t| t.result.is_ok()).count();
        crate::outcome::RunResult::of_stored(stored, self.targets.len())
    }

    /// The targets that hold the set, and those that do not (yet).
    pub fn stored_and_missing(&self) -> (Vec<String>, Vec<String>) {
        let (ok, not): (Vec<_>, Vec<_>) = self.targets.iter().partition(|t| t.result.is_ok());
        (
            ok.into_iter().map(|t| t.name.clone()).collect(),
            not.into_iter().map(|t| t.name.clone()).collect(),
        )
    }
}

/// A target chosen for this run: opened, or the reason it could not be (a bad CA file, an
/// unreadable secret...), which fails that target alone.
struct Selected {
    name: String,
    target: std::result::Result<Box<dyn Target>, String>,
}

fn selected_targets(settings: &Settings, only: Option<&str>) -> Result<Vec<Selected>> {
    let chosen: Vec<_> = match only {
        Some(name) => {
            let t = settings.target(name).ok_or_else(|| {
                let names: Vec<_> = settings.targets.iter().map(|t| t.name.as_str()).collect();
                Stop::Usage(format!(
                    "--target {name:?}: no such target (configured: {})",
                    names.join(", ")
                ))
            })?;
            // A set split between targets cannot go to one of them alone: the other part
            // would be stored nowhere.
            let archive =
                settings.snapshot.static_resources_dir.is_some() || settings.snapshot.method == SnapshotMethod::Script;
            for (file, needed) in [(SetFile::Snapshot, true), (SetFile::Resources, archive)] {
                if needed && !t.files.contains(&file) {
                    let word = serde_json::to_string(&file).unwrap_or_default();
                    bail!(Stop::Usage(format!(
                        "--target {name:?} does not hold {word} (its files); the set's {word} would be stored nowhere: back up to every target"
                    )));
                }
            }
            vec![t]
        }
        None => settings.targets.iter().collect(),
    };
    for t in chosen
        .iter()
        .filter(|t| t.url.scheme() != "file" && !settings.encrypts() && t.files.contains(&SetFile::Snapshot))
    {
        // Said on every run: the target sees every Secret.
        tracing::warn!(
            target_name = %t.name,
            "uploading the snapshot unencrypted to a remote target: it holds every Secret of the cluster; set [encryption] age_recipients"
        );
    }
    Ok(chosen
        .into_iter()
        .map(|t| Selected {
            name: t.name.clone(),
            target: targets::open(t, settings.priority.upload_rate_limit.0).map_err(|e| crate::error::one_line(&e)),
        })
        .collect())
}

/// What the targets' preflight found: those that cannot take a set (with why), and those
/// that did not answer in time (they get the set after the snapshot, from staging).
struct Preflight {
    unusable: BTreeMap<String, String>,
    late: BTreeSet<String>,
}

impl Preflight {
    /// Checks the targets side by side, each for a short while only ([`preflight_deadline`]),
    /// one attempt each (no retry budget): an answer worth retrying ("not now", a 503)
    /// makes the target late, not unusable; only a permanent answer rules it out.
    async fn check(settings: &Settings, targets: &[Selected]) -> Preflight {
        let checks = targets.iter().map(|sel| async move {
            let t = match &sel.target {
                Ok(t) => t,
                Err(e) => return Some(Err(e.clone())),
            };
            let probe = crate::targets::retry::retries_until(Some(tokio::time::Instant::now()), t.preflight());
            match tokio::time::timeout(preflight_deadline(settings, &sel.name), probe).await {
                Err(_) => None,
                Ok(Ok(())) => Some(Ok(())),
                Ok(Err(e)) if is_transient(&e) => {
                    tracing::warn!(target_name = %sel.name, error = %crate::error::one_line(&e), "target not ready now");
                    None
                }
                Ok(Err(e)) => Some(Err(crate::error::one_line(&e))),
            }
        });
        let mut found = Preflight {
            unusable: BTreeMap::new(),
            late: BTreeSet::new(),
        };
        for (sel, check) in targets.iter().zip(futures_util::future::join_all(checks).await) {
            match check {
                Some(Err(e)) => {
                    tracing::error!(target_name = %sel.name, error = %e, "target cannot take a backup set");
                    found.unusable.insert(sel.name.clone(), e);
                }
                Some(Ok(())) => {}
                None => {
                    tracing::warn!(
                        target_name = %sel.name,
                        "the target was not ready within {}; the set is stored on it after the snapshot",
                        humantime::format_duration(preflight_deadline(settings, &sel.name))
                    );
                    found.late.insert(sel.name.clone());
                }
            }
        }
        if found.unusable.len() == targets.len() {
            // The snapshot is still taken: it waits in staging and is delivered once a
            // target is back (see `delivery`).
            tracing::error!("no target can take a backup set now; the set will wait in staging");
        }
        found
    }

    /// The run's targets by name: opened, or why each cannot be used.
    fn open(&self, targets: Vec<Selected>) -> Opened {
        let mut opened = BTreeMap::new();
        for sel in targets {
            let usable = match (sel.target, self.unusable.get(&sel.name)) {
                (Ok(t), None) => Ok(t),
                (Err(e), _) => Err(e),
                (Ok(_), Some(e)) => Err(e.clone()),
            };
            opened.insert(sel.name, usable);
        }
        opened
    }
}

/// Takes staging's lock for the run: another backup of this node holding it skips this one.
fn lock_staging(settings: &Settings) -> Result<Locked> {
    let staging = &settings.snapshot.staging_dir;
    crate::staging::try_lock(staging)?.ok_or_else(|| {
        Stop::Skipped(Skip::new(
            SkipKind::Busy,
            format!(
                "another backup is running on this node (it holds '{}')",
                crate::staging::lock_file(staging).display()
            ),
        ))
        .into()
    })
}

/// Reserves the set's id: ids have one-second resolution and name the set on every target,
/// so a second already used by a set staged here (a run killed a moment ago), or reserved
/// in etcd by another node's run of another slot (or a manual backup), makes this run wait
/// for the next second and take that one.
async fn reserve_id(
    settings: &Settings,
    member: &mut etcd::Member,
    cluster: &str,
    staging: &Locked,
) -> Result<chrono::DateTime<Utc>> {
    let started = Instant::now();
    loop {
        let created = Utc::now();
        let id = manifest::timestamp(created);
        if !staging.holds(&id) {
            let key = format!("{}/ids/{cluster}/{id}", settings.election.prefix);
            match member.reserve(&key, &settings.node_name, 3600).await {
                Ok(true) => return Ok(created),
                Ok(false) => {
                    tracing::info!(backup_id = %id, "another node's run took this second's id; waiting for the next")
                }
                // Without the reservation two nodes could store different sets under one id
                // (the later one then never delivered): try again, within the request
                // timeout, then give the run up.
                Err(e) if started.elapsed() < settings.etcd.request_timeout.0 => {
                    tracing::warn!(error = %crate::error::one_line(&e), "cannot reserve the set id in etcd yet; retrying");
                }
                Err(e) => return Err(e.context("cannot reserve the set id in etcd")),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The ClusterVersion for the manifest; a failure to read it is logged, not fatal.
async fn openshift_of(member: &mut etcd::Member) -> Option<etcd::ClusterVersion> {
    match member.cluster_version().await {
        Ok(cv) => cv,
        Err(e) => {
            tracing::warn!(error = %crate::error::one_line(&e), "cannot read the ClusterVersion; the manifest will not record the OpenShift version");
            None
        }
    }
}

/// Runs one backup. Returns the report even when some targets failed; the caller decides
/// the exit code from it.
/// `member` is the connection the caller checked the guards (and won the election) on: the
/// same member serves the whole run.
pub async fn run_backup(settings: &Settings, opts: &BackupOptions, member: &mut etcd::Member) -> Result<BackupReport> {
    let started = Instant::now();
    let targets = selected_targets(settings, opts.target.as_deref())?;
    let staging = lock_staging(settings)?;
    staging.clean_tmp();
    // Targets that cannot take a set are known before a snapshot is taken; the others go on.
    let preflight = Preflight::check(settings, &targets).await;

    // Fresh: the revision and DB size just before the snapshot, not from before a wait.
    let status = member.status().await?;
    tracing::info!(
        endpoint = member.shown(),
        member_id = %hex_id(status.member_id),
        cluster_id = %hex_id(status.cluster_id),
        version = %status.version,
        db_size = status.db_size,
        "connected to etcd"
    );
    // The recipients and the signing key (created on first use) are read once, before the
    // snapshot: the whole set is sealed and signed with what was read here.
    let ctx = RunContext::resolve(settings, status.cluster_id)?;
    let needed = settings.guards.min_free_space.required(status.db_size);
    // Staging scanned once for the run: room, early uploads, delivery, retention, bounds.
    let mut sets = sets::scan(staging.root());
    sets::make_room(&mut sets, needed, || fsutil::free_space(staging.root()))?;
    let openshift = openshift_of(member).await;
    let created = reserve_id(settings, member, &ctx.cluster, &staging).await?;
    let id = manifest::timestamp(created);
    let work = staging.begin(&id)?;
    let names: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
    let opened = preflight.open(targets);
    // The snapshot's uploads run beside the rest of the run: they follow its staging file
    // while it streams, and the delivery pass waits for each before it finishes that set.
    let owed: BTreeSet<&str> = sets.iter().flat_map(|s| s.pending.iter().map(String::as_str)).collect();
    let drafts = begin_early(settings, &opened, &preflight.late, &owed, &ctx.cluster, &id).await;
    let (follow_tx, follow_rx) = tokio::sync::oneshot::channel();
    let mut uploads = BTreeMap::new();
    let mut early = BTreeMap::new();
    for (name, draft) in drafts {
        let (tx, rx) = tokio::sync::oneshot::channel();
        uploads.insert(name.clone(), (draft.clone(), tx));
        early.insert(name, delivery::Early { draft, sent: rx });
    }
    let backup = Backup {
        settings,
        opts,
        ctx: &ctx,
        status: &status,
        staging: &staging,
        opened: &opened,
        names,
        started,
    };
    let new = NewSet { id, created, openshift };
    let run = backup.publish(member, new, work, sets, early, follow_tx);
    let ((), report) = tokio::join!(follow_snapshot(&opened, uploads, follow_rx), run);
    report
}

/// One backup once its targets are chosen, staging is locked and its id reserved.
struct Backup<'a> {
    settings: &'a Settings,
    opts: &'a BackupOptions,
    ctx: &'a RunContext,
    /// The member's status read just before the snapshot.
    status: &'a etcd::MemberStatus,
    staging: &'a Locked,
    opened: &'a Opened,
    /// The targets chosen for the run, usable or not: the set is owed to each.
    names: Vec<String>,
    started: Instant,
}

/// What names the set about to be taken, and what its manifest records of the cluster.
struct NewSet {
    id: String,
    created: chrono::DateTime<Utc>,
    openshift: Option<etcd::ClusterVersion>,
}

impl Backup<'_> {
    /// Assembles the set in `work`, commits it to staging, delivers it (and what older sets
    /// are owed), applies retention and bounds staging.
    async fn publish(
        &self,
        member: &mut etcd::Member,
        new: NewSet,
        work: Work,
        mut sets: Vec<sets::Staged>,
        early: BTreeMap<String, delivery::Early>,
        follow: FollowTx,
    ) -> Result<BackupReport> {
        let (manifest, streamed) = match self.assemble(member, new, work.dir(), Some(follow)).await {
            Ok(r) => r,
            Err(e) => {
                delivery::discard_drafts(self.opened, early).await;
                return Err(e);
            }
        };
        // The script method names the set after the script's own timestamp. Owed to every
        // target chosen for this run; a delivery pass then stores the sets still waiting in
        // staging, oldest first, this one last.
        let staged_dir = match self.staging.commit(work, &manifest.id, &self.names) {
            Ok(dir) => dir,
            Err(e) => {
                delivery::discard_drafts(self.opened, early).await;
                return Err(e);
            }
        };
        crate::staging::state::note_newest_set(self.staging.root(), &manifest);
        sets.push(sets::Staged {
            set: targets::StagedSet {
                dir: staged_dir,
                manifest: manifest.clone(),
            },
            pending: self.names.clone(),
        });
        let (settings, opts) = (self.settings, self.opts);
        if let Some(run) = &opts.run {
            note_publishing(settings, member, run, &manifest).await;
        }
        let mut records = crate::etcd::election::Election::of(member.client.clone(), settings).holding(opts.lease);
        let results = delivery::pass(
            settings,
            &mut sets,
            self.opened,
            &opts.abort,
            early,
            Some(&mut records),
            opts.deliver_by,
        )
        .await;
        opts.delivered.store(true, std::sync::atomic::Ordering::SeqCst);
        // Bounded like the deliveries: retention never holds the next run back either, and a
        // stop skips it (the next run applies it).
        let retain = crate::targets::retry::retries_until(
            opts.deliver_by,
            delivery::apply_retention(settings, &sets, self.opened, &results),
        );
        tokio::select! {
            biased;
            _ = opts.abort.cancelled() => tracing::info!(backup_id = %manifest.id, "stopped after storing the set: retention is left to the next run"),
            _ = retain => {}
        }
        sets::tidy(settings, &mut sets);
        Ok(BackupReport {
            targets: self.outcomes(&manifest.id, &results),
            manifest,
            duration: self.started.elapsed(),
            snapshot: streamed,
            settled: delivery::settled(&results),
        })
    }

    /// What became of set `id` on each of the run's targets.
    fn outcomes(&self, id: &str, results: &[delivery::Delivered]) -> Vec<TargetOutcome> {
        self.names
            .iter()
            .map(|name| {
                let mine = results.iter().find(|d| d.id == id && &d.target == name);
                TargetOutcome {
                    name: name.clone(),
                    location: mine.map(|d| d.location.clone()).unwrap_or_default(),
                    result: mine
                        .map(|d| d.result.clone())
                        .unwrap_or_else(|| Err("not attempted".into())),
                }
            })
            .collect()
    }

    /// Takes the files by the configured method, seals them, and writes the manifest,
    /// checksums and signature into `work`.
    async fn assemble(
        &self,
        member: &mut etcd::Member,
        new: NewSet,
        work: &Path,
        follow: Option<FollowTx>,
    ) -> Result<(Manifest, Streamed)> {
        let (settings, opts, status) = (self.settings, self.opts, self.status);
        let snap_started = Instant::now();
        let mut forced = opts.forced.clone();
        // The native method's own stream time (its uploads may take longer).
        let mut streamed = None;
        let (id, created, files, stream_revision) = match settings.snapshot.method {
            SnapshotMethod::Native => {
                let (files, revision, pulled) = self.take_native(member, &new.id, work, follow).await?;
                streamed = Some(pulled);
                (new.id, new.created, files, revision)
            }
            SnapshotMethod::Script => {
                let produced = self.take_script(work, &mut forced).await?;
                // The script's own timestamp names the set, as its file names do.
                let created = chrono::NaiveDateTime::parse_from_str(&produced.ts, manifest::TS_FORMAT)
                    .map(|t| t.and_utc())
                    .unwrap_or(new.created);
                let files = produced
                    .files
                    .into_iter()
                    .map(|(name, size, sha)| plain_entry(name, size, sha))
                    .collect();
                (produced.ts, created, files, None)
            }
        };
        let streamed = streamed.unwrap_or_else(|| Streamed {
            duration: snap_started.elapsed(),
            pace: None,
        });
        // Read from the archive as written, before it is sealed.
        let restore = {
            let (dir, plain) = (work.to_path_buf(), files.clone());
            tokio::task::spawn_blocking(move || crate::trust::certs::facts_of_set(&dir, &plain)).await?
        };
        let mut files = seal_files(self.ctx, work, files).await?;
        record_custody(self.settings, &self.names, &mut files);
        let manifest = Manifest {
            format_version: manifest::format_version_of(opts.trigger, &files),
            id,
            created: created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            cluster_name: self.ctx.cluster.clone(),
            trigger: opts.trigger,
            run: opts.run.clone(),
            node: settings.node_name.clone(),
            etcd: EtcdInfo {
                endpoint: member.shown().to_string(),
                member_id: hex_id(status.member_id),
                cluster_id: hex_id(status.cluster_id),
                version: status.version.clone(),
                storage_version: status.storage_version.clone(),
                // etcd 3.5+ stamps the stream with the snapshot's revision; 3.4 does not, and
                // then the revision seen just before the snapshot started is recorded.
                revision: stream_revision.filter(|r| *r > 0).unwrap_or(status.revision),
                db_size: status.db_size,
            },
            openshift: new.openshift.map(|cv| OpenShiftInfo {
                version: cv.version,
                cluster_id: cv.cluster_id,
            }),
            files,
            tool: ToolInfo::this(),
            forced,
            restore,
            derived: None,
        };
        // SHA256SUMS, the signature ([signing]), then manifest.json; flushed by the commit.
        crate::trust::signing::write_set_files(self.ctx.signer.as_ref(), work, &manifest)?;
        Ok((manifest, streamed))
    }

    /// The script method: the platform's script writes the set's files into `work`; a run
    /// with `--force` passes it on, and what the script then skipped joins `forced`.
    async fn take_script(&self, work: &Path, forced: &mut Vec<String>) -> Result<crate::source::script::Produced> {
        let script = &self.settings.snapshot.script;
        crate::notify::status(&format!("backing up: running {}", script.display()));
        let produced = crate::source::script::take(self.settings, work, self.opts.force == Force::Yes).await?;
        if produced.dirty {
            forced.push(format!(
                "{} ran with --force: its own pre-checks were skipped (files marked __POSSIBLY_DIRTY__)",
                script.display()
            ));
        }
        Ok(produced)
    }
}

/// Notes in etcd which set this run is about to publish (see
/// [`crate::etcd::election::publishing_key`]); best effort: without it a node that takes the run
/// over takes its own backup.
async fn note_publishing(settings: &Settings, member: &mut etcd::Member, run: &str, manifest: &Manifest) {
    let record = crate::etcd::election::RunRecord {
        run: run.to_string(),
        node: settings.node_name.clone(),
        id: Some(manifest.id.clone()),
        result: crate::outcome::Recorded::Publishing,
        finished: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        stored: Vec::new(),
        missing: Vec::new(),
    };
    let key = crate::etcd::election::publishing_key(&settings.election.prefix, run);
    let value = serde_json::to_string(&record).unwrap_or_default();
    let ttl = crate::etcd::election::PUBLISHING_TTL.as_secs() as i64;
    if let Err(e) = member.put_with_lease(&key, &value, ttl).await {
        tracing::warn!(error = %crate::error::one_line(&e), "cannot note the set about to be published in etcd");
    }
}

/// Records, on each file, which of the `chosen` targets hold it (`[[target]] files`; nothing
/// when they all hold every file). Every set's manifest goes through here (native, script,
/// imported).
pub(crate) fn record_custody(settings: &Settings, chosen: &[String], files: &mut [FileEntry]) {
    for f in files {
        let file = match f.kind() {
            Some(FileKind::Resources) => SetFile::Resources,
            _ => SetFile::Snapshot,
        };
        f.targets = settings.holders(chosen, file);
    }
}

/// Compresses and/or encrypts each verified file in `work` not sealed yet (see
/// [`crate::envelope`]), the archive to its own recipients; the originals go, the manifest
/// keeps their names, sizes and hashes. Every set goes through here (native, script,
/// imported): one set, one seal per kind of file.
pub(crate) async fn seal_files(ctx: &RunContext, work: &Path, files: Vec<FileEntry>) -> Result<Vec<FileEntry>> {
    let mut sealed = Vec::new();
    for mut f in files {
        let seal = match f.kind() {
            Some(FileKind::Resources) => &ctx.resources_seal,
            _ => &ctx.seal,
        };
        if f.stored_name != f.name || seal.is_plain() {
            // Sealed as it streamed (the snapshot), or not to be sealed.
            sealed.push(f);
            continue;
        }
        let src = work.join(&f.stored_name);
        let stored_name = format!("{}{}", f.name, seal.suffix());
        let dst = work.join(&stored_name);
        let (s2, started) = (seal.clone(), Instant::now());
        crate::notify::status(&format!("sealing {stored_name}"));
        let (size, sha) = tokio::task::spawn_blocking(move || {
            let r = crate::envelope::seal_file(&src, &dst, &s2);
            if r.is_ok() {
                let _ = std::fs::remove_file(&src);
            }
            r
        })
        .await??;
        tracing::info!(
            file = %stored_name, original_bytes = f.size, stored_bytes = size,
            seconds = started.elapsed().as_secs_f64(), "sealed"
        );
        f.stored_name = stored_name;
        f.stored_size = size;
        f.stored_sha256 = sha;
        f.compression = seal.compression();
        f.encryption = seal.encryption();
        sealed.push(f);
    }
    Ok(sealed)
}

/// Is this a failure worth trying again later (a transport hiccup, a 5xx), not a refusal?
fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<crate::targets::retry::TransportError>(),
            Some(
                crate::targets::retry::TransportError::Transient(_) | crate::targets::retry::TransportError::Closed(_)
            )
        )
    })
}

/// The longest a target's preflight may hold the snapshot back: its `connect_timeout`, at
/// most `PREFLIGHT_MAX`.
fn preflight_deadline(settings: &Settings, name: &str) -> Duration {
    settings
        .target(name)
        .map_or(PREFLIGHT_MAX, |t| t.connect_timeout.0.min(PREFLIGHT_MAX))
}

const PREFLIGHT_MAX: Duration = Duration::from_secs(10);

/// How long a target may take to create a set's folder before the snapshot starts without
/// it (a folder made later is this node's debris, removed by its next run).
const BEGIN_EARLY_MAX: Duration = Duration::from_secs(10);

/// Begins the set on every target that can take the snapshot while it streams: the
/// native method only (the script writes its own files), usable targets only, and only
/// those owing no older set (delivery stays oldest first; those get it after the snapshot).
async fn begin_early(
    settings: &Settings,
    opened: &Opened,
    late: &std::collections::BTreeSet<String>,
    owed: &std::collections::BTreeSet<&str>,
    cluster: &str,
    id: &str,
) -> BTreeMap<String, Draft> {
    let mut drafts = BTreeMap::new();
    if settings.snapshot.method != SnapshotMethod::Native {
        return drafts;
    }
    // Bounded: a slow target must not hold the snapshot (and the election lock) back; it
    // gets the set after the snapshot instead.
    let begun = opened.iter().filter_map(|(name, target)| {
        let Ok(target) = target else { return None };
        // A target that does not hold the snapshot (`[[target]] files`) has nothing to follow.
        if late.contains(name)
            || settings
                .target(name)
                .is_some_and(|t| !t.files.contains(&SetFile::Snapshot))
        {
            return None;
        }
        if owed.contains(name.as_str()) {
            tracing::info!(target_name = %name, "the target owes older sets; this one is stored after the snapshot");
            return None;
        }
        Some(async move {
            let r = tokio::time::timeout(BEGIN_EARLY_MAX, target.begin_set(cluster, &settings.node_name, id)).await;
            (name, r)
        })
    });
    for (name, r) in futures_util::future::join_all(begun).await {
        match r {
            Ok(Ok(d)) => {
                drafts.insert(name.clone(), d);
            }
            Ok(Err(e)) => tracing::warn!(
                target_name = %name, error = %crate::error::one_line(&e),
                "cannot begin the upload now; the set is stored after the snapshot"
            ),
            Err(_) => tracing::warn!(
                target_name = %name,
                "the target did not create the set's folder within {}; the set is stored after the snapshot",
                humantime::format_duration(BEGIN_EARLY_MAX)
            ),
        }
    }
    drafts
}

/// Hands the growing snapshot file (and its stored name) to the uploads that follow it.
type FollowTx = tokio::sync::oneshot::Sender<(Follower, String)>;

/// The uploads that follow the snapshot: each begun draft gets the snapshot file as it is
/// written, and its result goes to the delivery pass. Ends at once if no snapshot file is
/// handed over (the run failed first, or the script method made the files).
async fn follow_snapshot(
    opened: &Opened,
    uploads: BTreeMap<String, (Draft, tokio::sync::oneshot::Sender<Result<Sent>>)>,
    follow: tokio::sync::oneshot::Receiver<(Follower, String)>,
) {
    if uploads.is_empty() {
        return;
    }
    let Ok((follower, stored_name)) = follow.await else {
        return;
    };
    let each = uploads.into_iter().filter_map(|(target_name, (draft, tx))| {
        let Some(Ok(target)) = opened.get(&target_name) else {
            return None;
        };
        let follower = follower.clone().with_progress(format!("upload to '{target_name}'"));
        let stored_name = stored_name.clone();
        Some(async move {
            tracing::info!(target_name = %target_name, file = %stored_name, "uploading while the snapshot streams");
            let _ = tx.send(target.put_growing(&draft, &stored_name, follower).await);
        })
    });
    futures_util::future::join_all(each).await;
}

impl Backup<'_> {
    /// The native method: the archive (first, as cluster-backup.sh does: it is cheap and fails
    /// fast on a bad tree), then the snapshot stream, verified and sealed as it flows; `follow`
    /// gets its file for the uploads that follow it. Returns the files, the revision the stream
    /// was stamped with (etcd 3.5+) and how long the stream took.
    async fn take_native(
        &self,
        member: &mut etcd::Member,
        ts: &str,
        work: &Path,
        follow: Option<FollowTx>,
    ) -> Result<(Vec<FileEntry>, Option<i64>, Streamed)> {
        let (settings, seal, db_size) = (self.settings, &self.ctx.seal, self.status.db_size);
        let mut files = Vec::new();
        if let Some(root) = &settings.snapshot.static_resources_dir {
            let name = manifest::archive_name(ts);
            let dest = work.join(&name);
            let root = root.clone();
            let checked = name.clone();
            let (size, sha256) = tokio::task::spawn_blocking(move || -> Result<(u64, String)> {
                let written = static_resources::write_archive(&root, &dest)?;
                // The same check as every archive a set carries, on the bytes written.
                static_resources::check_archive_file(&dest)?.require(&checked)?;
                Ok(written)
            })
            .await??;
            files.push(plain_entry(name, size, sha256));
        }
        let name = manifest::snapshot_name(ts);
        let stored_name = format!("{name}{}", seal.suffix());
        let started = Instant::now();
        crate::notify::status(&format!(
            "backing up {ts}: streaming the snapshot from {}",
            member.shown()
        ));
        let pending = snapshot::Pending::create(&work.join(&stored_name), seal)?
            .expecting(db_size)
            .paced(settings.priority.etcd_latency_budget.multiple());
        if let Some(tx) = follow {
            let _ = tx.send((pending.follower(), stored_name.clone()));
        }
        // etcd 3.4 does not stamp the stream with its revision: the member's revision read just
        // before it starts (after this run's own writes: the lock, the id's reservation) is
        // the snapshot's on a quiet member, and what a restore drill then reports.
        let before = member.status().await.ok().map(|s| s.revision);
        let taken = pending.stream(member).await?;
        let streamed = started.elapsed();
        tracing::info!(
            bytes = taken.verified.size,
            sha256 = %taken.verified.sha256,
            stored_bytes = taken.stored.size,
            seconds = streamed.as_secs_f64(),
            "snapshot streamed and its trailer verified"
        );
        files.insert(
            0,
            FileEntry {
                name,
                size: taken.verified.size,
                sha256: taken.verified.sha256,
                stored_name,
                stored_size: taken.stored.size,
                stored_sha256: taken.stored.sha256,
                compression: seal.compression(),
                encryption: seal.encryption(),
                targets: Vec::new(),
            },
        );
        let streamed = Streamed {
            duration: streamed,
            pace: taken.pace,
        };
        Ok((files, taken.revision.filter(|r| *r > 0).or(before), streamed))
    }
}

pub(crate) fn plain_entry(name: String, size: u64, sha256: String) -> FileEntry {
    FileEntry {
        stored_name: name.clone(),
        name,
        size,
        stored_size: size,
        stored_sha256: sha256.clone(),
        sha256,
        compression: crate::manifest::Compression::None,
        encryption: crate::manifest::Encryption::None,
        targets: Vec::new(),
    }
}
