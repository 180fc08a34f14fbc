//! The journal writer: on the one node that holds `<prefix>/journal/writer`, a whole-keyspace
//! watch from the revision after what the targets already hold, cut into segments by age and
//! size, each stored on every target that holds snapshots.
//!
//! A term (one holding of the lock):
//! 1. where to start: after the newest whole segment on any target (a torn newest one, left by
//!    a writer killed mid-write, is removed first), else after the newest full set's revision;
//!    with neither, the writer waits for the first set;
//! 2. the watch, from that revision, no `prev_kv`, with progress requests each second so an
//!    idle cluster's coverage moves on in time; each revision is stamped when received;
//! 3. segments cut at `segment_max_age` after their first revision or at `segment_max_bytes`,
//!    and, idle, every [`IDLE_CUTS`] × `segment_max_age` (the covered time moves on); stored by a separate task so that storing never stops
//!    the watch from being drained; a target that fails keeps its segments in a bounded
//!    backlog, retried at each cut;
//! 4. SIGTERM seals and stores the open segment, then gives the lock up; a lost lock drops it
//!    (the next writer starts after what is stored: no gap, and no revision written twice
//!    except in an overlap the replay takes once).
//!
//! A compaction past the next revision to store (an outage longer than the compaction window)
//! ends the chain: the writer says so and starts a new chain at once at the oldest revision
//! etcd still has; when no set is as new as that, it asks the daemon for a full set at once
//! (`journal-<time>` run). A completed upgrade ends the chain too (the after-upgrade set
//! starts the next), and so does a change of the static pod revision directories, checked
//! every 10 s on the writer's node (a set is asked for, so the next chain pairs with the new
//! archive).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use chrono::{DateTime, Utc};
use etcd_client::{EventType, WatchOptions};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::segment::{self, Op, Record};
use crate::config::{SetFile, Settings};
use crate::error::one_line;
use crate::etcd::election::Election;
use crate::staging::state::JournalState;
use crate::targets::{self, Target};

/// An idle writer stores an empty segment (moving the covered time on) every this many
/// `segment_max_age`s: 30 s by default, within the RPO goal, 2,880 objects a day.
pub const IDLE_CUTS: u32 = 3;
/// How long a writer with no set to start from waits before looking again (unless a run
/// records one first).
const NO_SET_POLL: Duration = Duration::from_secs(60);
/// How often the writer looks for a set it asked for (and asks again).
const NEED_CHECK: Duration = Duration::from_secs(60);
/// How often the writer looks at the static pod revision directories.
const PODS_CHECK: Duration = Duration::from_secs(10);
/// How long a failed term waits before the next.
const RETRY: Duration = Duration::from_secs(5);
/// The largest watch response the writer takes (a catching-up batch of up to 1000 large
/// revisions): far above the client's 4 MiB default.
const DECODE_LIMIT: usize = 512 << 20;
/// The most a target that fails may have waiting; past it, its oldest segments are dropped
/// (a gap on that target, said in the journal).
const BACKLOG_MAX: usize = 256 << 20;
/// The largest segment a reader takes (a segment's records are bounded by
/// `segment_max_bytes`, at most 256 MiB, plus one revision).
pub const SEGMENT_CAP: u64 = 1 << 30;

/// A full set the journal needs: one at or after revision `after` starts its current chain
/// (after a break, or after a chain ended at a static pod change). The writer sets it and
/// asks the daemon ([`SetWanted::asked`]) until such a set exists, once a minute (a run
/// the guards skip, say while the operators roll the new revision out, is asked again).
#[derive(Default)]
pub struct SetWanted {
    after: std::sync::Mutex<Option<i64>>,
    /// Signalled each time the writer asks.
    pub asked: Notify,
}

impl SetWanted {
    /// The revision a set must be at or after, while one is wanted.
    pub fn after(&self) -> Option<i64> {
        *self.after.lock().expect("not poisoned")
    }

    /// A set at or after `rev` is needed: ask for it now.
    fn want(&self, rev: i64) {
        let mut after = self.after.lock().expect("not poisoned");
        *after = Some(after.map_or(rev, |a| a.max(rev)));
        drop(after);
        self.asked.notify_one();
    }

    /// A set at `rev` exists: the need is met if it was for `rev` or earlier.
    pub fn met_by(&self, rev: i64) {
        let mut after = self.after.lock().expect("not poisoned");
        if after.is_some_and(|a| rev >= a) {
            *after = None;
        }
    }
}

/// What one term leaves the next.
#[derive(Default)]
struct Carry {
    /// The lowest revision a chain may start at: above a compaction that broke the last one.
    floor: i64,
    /// The static pod revision directories last seen: a change between terms (an etcd
    /// rollout restarts this node's member and so the watch) still ends the chain.
    pods: Option<Vec<std::path::PathBuf>>,
}

/// Runs journal terms until `stop`; each term holds the writer's lock. `wanted` asks the
/// daemon for a full set when a new chain has none to start from.
pub async fn run(settings: Settings, stop: CancellationToken, wanted: Arc<SetWanted>) {
    let wait = settings.election.lease_ttl.0.max(RETRY);
    let mut carry = Carry::default();
    while !stop.is_cancelled() {
        let ended = term(&settings, &mut carry, &stop, &wanted).await;
        note(&settings, |j| j.writing = false);
        let pause = match ended {
            Ok(Ended::Stopped) => return,
            Ok(Ended::NotWriter) => wait,
            Ok(Ended::NoSet) => {
                // Until a run records a set (or a minute passes: a set stored by hand).
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = next_set_recorded(&settings) => {}
                    _ = tokio::time::sleep(NO_SET_POLL) => {}
                }
                continue;
            }
            Err(e) => {
                let why = one_line(&e);
                if let Some(b) = e.downcast_ref::<Broken>() {
                    carry.floor = b.compacted + 1;
                    note(&settings, |j| {
                        j.breaks_total += 1;
                        j.last_break = Some(format!("{}: {why}", now_text()));
                    });
                } else {
                    note(&settings, |j| j.error = Some(why.clone()));
                }
                tracing::error!(error = %why, "journal: the writer stopped; retrying");
                RETRY
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// The version of the newest completed upgrade the ClusterVersion records at `revision`
/// (none on plain etcd); the current one when that revision is compacted.
async fn completed_version(member: &mut crate::etcd::Member, revision: i64) -> Result<Option<String>> {
    let key = crate::etcd::CLUSTER_VERSION_KEY;
    let at = etcd_client::GetOptions::new().with_revision(revision.max(1));
    let resp = match member.client.get(key, Some(at)).await {
        Ok(r) => r,
        // etcd answers a read below its compaction with OUT_OF_RANGE (mvcc's ErrCompacted).
        Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::OutOfRange => {
            member.client.get(key, None).await?
        }
        Err(e) => return Err(anyhow!("etcd: reading the ClusterVersion: {e}")),
    };
    Ok(resp
        .kvs()
        .first()
        .and_then(|kv| crate::etcd::completed_upgrade(&serde_json::from_slice(kv.value()).ok()?)))
}

/// Returns when an elected run next records its result (`<prefix>/last` changes); never,
/// when etcd cannot be watched.
async fn next_set_recorded(settings: &Settings) {
    let watched = async {
        let (member, _) = crate::etcd::connect_first(&settings.etcd).await?;
        let key = format!("{}/last", settings.election.prefix);
        let mut stream = member.client.watch_client().watch(key, None).await?;
        while let Some(resp) = stream.message().await? {
            if !resp.events().is_empty() {
                return Ok(());
            }
        }
        Ok::<(), anyhow::Error>(())
    };
    if watched.await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// A chain broken by a compaction of revisions not yet stored.
#[derive(Debug, thiserror::Error)]
#[error(
    "etcd compacted revision {next} before the journal stored it (compacted up to {compacted}): the chain ends at revision {}; a new one starts at the oldest revision etcd still has, from a full set taken at once if none is as new",
    next - 1
)]
pub struct Broken {
    pub next: i64,
    pub compacted: i64,
}

/// Changes this node's journal state (in `state.json`, logging a failure) and rewrites the
/// metrics textfile, if configured.
fn note(settings: &Settings, change: impl FnOnce(&mut JournalState)) {
    crate::staging::state::State::update_or_log(&settings.snapshot.staging_dir, |s| {
        change(s.journal.get_or_insert_with(Default::default))
    });
    crate::metrics::refresh(settings);
}

fn now_text() -> String {
    Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// How a term ended without an error.
enum Ended {
    Stopped,
    /// Another node's writer holds the lock.
    NotWriter,
    /// No full set yet: nothing to start a chain from.
    NoSet,
}

/// The static pod revision directories a set taken now would archive; none without
/// `snapshot.static_resources_dir` or when they cannot be read (the run says why).
fn static_pod_revisions(settings: &Settings) -> Option<Vec<std::path::PathBuf>> {
    let root = settings.snapshot.static_resources_dir.as_deref()?;
    crate::source::static_resources::revision_dirs(root).ok()
}

/// The targets segments go to: those that hold the snapshot.
fn holders(settings: &Settings) -> Vec<Box<dyn Target>> {
    settings
        .targets
        .iter()
        .filter(|t| t.files.contains(&SetFile::Snapshot))
        .filter_map(|t| match targets::open(t, settings.priority.upload_rate_limit.0) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(target_name = %t.name, error = %one_line(&e), "journal: cannot open the target");
                None
            }
        })
        .collect()
}

async fn term(
    settings: &Settings,
    carry: &mut Carry,
    stop: &CancellationToken,
    wanted: &Arc<SetWanted>,
) -> Result<Ended> {
    let (mut member, status) = crate::etcd::connect_first(&settings.etcd).await?;
    let mut election = Election::of(member.client.clone(), settings);
    let Some(held) = election.claim_journal().await? else {
        return Ok(Ended::NotWriter);
    };
    // Sealed and signed as the snapshot is: a segment holds every Secret it changes. Always
    // compressed (zstd level 1 when `compression.zstd_level` is off): records of Kubernetes
    // objects shrink several times for little CPU, and a segment is small.
    let (mut seal, signer) = (settings.seal()?, crate::trust::signing::signer(settings)?);
    seal.zstd_level = Some(seal.zstd_level.unwrap_or(1));
    let cluster = settings.cluster_folder(status.cluster_id);
    let targets = holders(settings);
    if targets.is_empty() {
        election.release(held).await;
        bail!("no target holding snapshots can be opened");
    }
    let start = match start_point(&targets, &cluster, carry.floor).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            tracing::info!("journal: no full set on any target yet; the journal starts after the first");
            election.release(held).await;
            return Ok(Ended::NoSet);
        }
        Err(e) => {
            election.release(held).await;
            return Err(e);
        }
    };
    tracing::info!(revision = start.next, after = %start.after, "journal: writing");
    if !start.has_set {
        // A new chain after a break: no moment on it is restorable until a set at or after
        // its first revision exists.
        tracing::warn!(
            revision = start.next,
            "journal: no full set is as new as the new chain's start; asking for one now"
        );
        wanted.want(start.next);
    }
    note(settings, |j| {
        j.writing = true;
        if start.new_chain {
            j.chain_from = start.next;
        }
    });
    let cluster_id = crate::etcd::hex_id(status.cluster_id);
    // The upgrade known at the revision before the first one written, so an upgrade that
    // completed in what this term catches up on still ends the chain.
    let completed = completed_version(&mut member, start.next - 1).await?;
    let (tx, rx) = mpsc::channel(16);
    let store = tokio::spawn(store_segments(targets, cluster.clone(), rx, settings.clone()));
    let mut w = Watching {
        settings,
        client: member.client.clone(),
        seal,
        signer,
        cluster_id,
        cluster,
        next: start.next,
        // No time is covered until the watch has caught up (see `take`).
        from: Utc::now(),
        covered: Utc::now(),
        synced: false,
        records: Vec::new(),
        weight: 0,
        ttls: HashMap::new(),
        completed,
        end_at: None,
        // Compared with what the last term saw at this term's first check, at once.
        pods: carry.pods.take().or_else(|| static_pod_revisions(settings)),
        pods_checked: None,
        need_checked: std::time::Instant::now(),
        wanted: wanted.clone(),
        tx,
    };
    let ended = tokio::select! {
        r = w.watch(stop) => r,
        _ = held.lost.cancelled() => Err(anyhow!("the journal lock may be lost; another node's writer takes over")),
    };
    carry.pods = w.pods.take();
    drop(w);
    // The store task ends once every segment sent is stored (or kept, failing).
    let _ = store.await;
    election.release(held).await;
    ended.map(|()| Ended::Stopped)
}

/// Where a term starts.
struct Start {
    next: i64,
    after: String,
    /// After a set, not after stored segments.
    new_chain: bool,
    /// Some set can start this chain (false: a chain after a break, older than every set).
    has_set: bool,
}

/// After the newest whole segment on any target (targets behind get the newer segments
/// copied from one that has them), else after the newest full set; never below `floor`.
async fn start_point(targets: &[Box<dyn Target>], cluster: &str, floor: i64) -> Result<Option<Start>> {
    let mut newest: Vec<Option<i64>> = Vec::new();
    for t in targets {
        newest.push(match newest_whole_segment(t.as_ref(), cluster).await {
            Ok(last) => last,
            Err(e) => {
                tracing::warn!(target_name = %t.name(), error = %one_line(&e), "journal: cannot list the target's journal");
                None
            }
        });
    }
    if let Some((i, last)) = newest
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.map(|l| (i, l)))
        .max_by_key(|(_, l)| *l)
        && last + 1 >= floor
    {
        catch_up(targets, cluster, i, &newest).await;
        return Ok(Some(Start {
            next: last + 1,
            after: format!("the newest segment on target '{}'", targets[i].name()),
            new_chain: false,
            has_set: true,
        }));
    }
    let best = newest_set(targets, cluster).await;
    if floor > 0 {
        // After a break: at once from the oldest revision etcd still has, so a set taken
        // from now on (or one already there past the break) restores any moment after it.
        return Ok(Some(Start {
            next: floor,
            after: "a compaction that ended the last chain (a new chain)".into(),
            new_chain: true,
            has_set: best.is_some_and(|(rev, _)| rev + 1 >= floor),
        }));
    }
    Ok(best.map(|(rev, after)| Start {
        next: rev + 1,
        after,
        new_chain: true,
        has_set: true,
    }))
}

/// The newest full set's revision on any target, and its name.
async fn newest_set(targets: &[Box<dyn Target>], cluster: &str) -> Option<(i64, String)> {
    let mut best: Option<(i64, String)> = None;
    for t in targets {
        match t.list_sets(Some(cluster)).await {
            Ok(sets) => {
                for s in &sets {
                    if best.as_ref().is_none_or(|(r, _)| s.manifest.etcd.revision > *r) {
                        best = Some((s.manifest.etcd.revision, format!("set {}", s.manifest.id)));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(target_name = %t.name(), error = %one_line(&e), "journal: cannot list the target's sets")
            }
        }
    }
    best
}

/// Copies to each target behind (an outage outlived the writer that kept its backlog) the
/// segments target `from` has past that target's newest, so no target keeps a gap.
async fn catch_up(targets: &[Box<dyn Target>], cluster: &str, from: usize, newest: &[Option<i64>]) {
    let Ok(names) = targets[from].list_journal(cluster).await else {
        return;
    };
    let mut named: Vec<segment::Named> = names.iter().filter_map(|(n, _)| segment::parse_name(n)).collect();
    named.sort_by_key(|n| (n.first, n.last));
    for (t, behind) in targets.iter().zip(newest) {
        let Some(behind) = *behind else { continue };
        for n in named.iter().filter(|n| n.last > behind) {
            let copied = async {
                let raw = targets[from]
                    .read_journal(cluster, &n.name, SEGMENT_CAP)
                    .await?
                    .ok_or_else(|| anyhow!("gone"))?;
                t.put_journal(cluster, &n.name, &raw).await
            };
            if let Err(e) = copied.await {
                tracing::warn!(target_name = %t.name(), segment = %n.name, error = %one_line(&e), "journal: cannot copy a segment the target missed");
                break;
            }
        }
    }
}

/// The last revision of `t`'s newest whole segment; a torn newest one is removed (a writer
/// killed while writing it; its revisions are written again).
async fn newest_whole_segment(t: &dyn Target, cluster: &str) -> Result<Option<i64>> {
    let mut named: Vec<segment::Named> = t
        .list_journal(cluster)
        .await?
        .into_iter()
        .filter_map(|(n, _)| segment::parse_name(&n))
        .collect();
    named.sort_by_key(|n| (n.last, n.until));
    while let Some(n) = named.pop() {
        let Some(raw) = t.read_journal(cluster, &n.name, SEGMENT_CAP).await? else {
            continue;
        };
        match segment::decode(&n.name, raw) {
            Ok(_) => return Ok(Some(n.last)),
            Err(e) => {
                tracing::warn!(target_name = %t.name(), error = %one_line(&e), "journal: removing a broken segment; its revisions are written again");
                t.delete_journal(cluster, &n.name).await?;
            }
        }
    }
    Ok(None)
}

/// The open segment and what the watch has given.
struct Watching<'a> {
    settings: &'a Settings,
    client: etcd_client::Client,
    seal: crate::envelope::Seal,
    signer: Option<crate::trust::signing::Signer>,
    cluster_id: String,
    /// The cluster folder on the targets.
    cluster: String,
    /// The first revision of the open segment.
    next: i64,
    /// When the open segment's coverage begins.
    from: DateTime<Utc>,
    /// Up to when etcd is known to have no revision beyond the last received.
    covered: DateTime<Utc>,
    /// Whether the watch has caught up once this term: before, revisions arrive later than
    /// they were made, so no time is claimed for them.
    synced: bool,
    records: Vec<Record>,
    weight: usize,
    /// Granted TTLs of the leases seen (-1: expired when first asked).
    ttls: HashMap<i64, i64>,
    /// The newest completed OpenShift upgrade known (from the ClusterVersion object).
    completed: Option<String>,
    /// Why the chain ends at the revision just received (an upgrade completed in it): the
    /// segment is cut right after it.
    end_at: Option<String>,
    /// This node's static pod revision directories (the archive a set would hold), when
    /// `snapshot.static_resources_dir` is set and readable.
    pods: Option<Vec<std::path::PathBuf>>,
    /// When they were last read (`None`: not yet this term).
    pods_checked: Option<std::time::Instant>,
    /// When a wanted set was last looked for.
    need_checked: std::time::Instant,
    wanted: Arc<SetWanted>,
    tx: mpsc::Sender<(String, Vec<u8>)>,
}

impl Watching<'_> {
    async fn watch(&mut self, stop: &CancellationToken) -> Result<()> {
        let opts = WatchOptions::new()
            .with_all_keys()
            .with_start_revision(self.next)
            .with_progress_notify();
        let mut wc = self.client.watch_client().max_decoding_message_size(DECODE_LIMIT);
        let mut stream = wc.watch(vec![0u8], Some(opts)).await?;
        // A change since the last term (its member restarted by an etcd rollout) ends the
        // chain where that term stopped, before anything of this term is written.
        self.check_static_pods().await?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (age, max_bytes) = (
            self.settings.journal.segment_max_age.0,
            self.settings.journal.segment_max_bytes.0 as usize,
        );
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    self.cut().await?;
                    return Ok(());
                }
                msg = stream.message() => {
                    let resp = msg?.ok_or_else(|| anyhow!("etcd closed the watch"))?;
                    if resp.canceled() {
                        if resp.compact_revision() > 0 {
                            // Not stored and gone from etcd's history: the chain ends here.
                            self.cut().await?;
                            return Err(Broken {
                                next: self.next_revision(),
                                compacted: resp.compact_revision(),
                            }
                            .into());
                        }
                        bail!("etcd cancelled the watch: {}", resp.cancel_reason());
                    }
                    self.take(&resp).await?;
                    if self.weight >= max_bytes {
                        self.cut().await?;
                    }
                }
                _ = tick.tick() => {
                    // The answer (a response without events) moves `covered` on.
                    let _ = stream.request_progress().await;
                    let old = self.records.first().is_some_and(|r| Utc::now() - r.at >= chrono::TimeDelta::from_std(age).unwrap_or_default());
                    let idle = self.records.is_empty() && Utc::now() - self.from >= chrono::TimeDelta::from_std(age * IDLE_CUTS).unwrap_or_default();
                    if old || idle {
                        self.cut().await?;
                    }
                    self.check_static_pods().await?;
                    self.check_wanted_set().await;
                }
            }
        }
    }

    /// The revision after the last received.
    fn next_revision(&self) -> i64 {
        self.records.last().map(|r| r.rev + 1).unwrap_or(self.next)
    }

    /// Adds a watch response's revisions (each whole: no fragments were asked for).
    async fn take(&mut self, resp: &etcd_client::WatchResponse) -> Result<()> {
        let now = Utc::now();
        let mut seen: HashSet<i64> = self.records.iter().flat_map(|r| r.leases.keys().copied()).collect();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let rev = kv.mod_revision();
            let expected = self.next_revision();
            if self.records.last().is_none_or(|r| r.rev != rev) {
                if let Some(why) = self.end_at.take() {
                    self.cut_with(Some(why)).await?;
                }
                if rev != expected {
                    bail!("the watch skipped from revision {} to {rev}", expected - 1);
                }
                self.records.push(Record {
                    rev,
                    at: now,
                    ops: Vec::new(),
                    leases: BTreeMap::new(),
                });
                self.weight += segment::RECORD_WEIGHT;
            }
            let op = match ev.event_type() {
                EventType::Put => {
                    if kv.key() == crate::etcd::CLUSTER_VERSION_KEY.as_bytes() {
                        self.upgrade_completed(rev, kv.value());
                    }
                    let lease = kv.lease();
                    if lease != 0 && seen.insert(lease) {
                        let ttl = self.lease_ttl(lease).await;
                        if ttl > 0 {
                            self.records.last_mut().expect("pushed").leases.insert(lease, ttl);
                        }
                    }
                    Op::Put {
                        key: kv.key().to_vec(),
                        value: kv.value().to_vec(),
                        lease,
                        create: kv.create_revision(),
                        version: kv.version(),
                    }
                }
                EventType::Delete => Op::Delete { key: kv.key().to_vec() },
            };
            self.weight += op.weight();
            self.records.last_mut().expect("pushed").ops.push(op);
        }
        // Every revision up to the header's has been sent: the coverage reaches now. The
        // first time in a term, coverage in time starts here: what was caught up on before
        // happened at unknown times before now.
        if resp.header().is_some_and(|h| h.revision() < self.next_revision()) {
            if !self.synced {
                self.synced = true;
                self.from = now;
            }
            self.covered = now;
        }
        if let Some(why) = self.end_at.take() {
            self.cut_with(Some(why)).await?;
        }
        Ok(())
    }

    /// Notes a completed upgrade in the ClusterVersion written at `rev`: the chain ends
    /// there, since the static resources of every set before it belong to the old version
    /// (the after-upgrade set starts the next).
    fn upgrade_completed(&mut self, rev: i64, raw: &[u8]) {
        let Ok(cv) = serde_json::from_slice::<serde_json::Value>(raw) else {
            return;
        };
        let Some(version) = crate::etcd::completed_upgrade(&cv) else {
            return;
        };
        if self.completed.as_deref() == Some(version.as_str()) {
            return;
        }
        tracing::info!(revision = rev, version = %version, "journal: an upgrade completed; the chain ends at its revision and the next starts after the after-upgrade set");
        self.end_at = Some(format!("upgrade to {version} completed at revision {rev}"));
        self.completed = Some(version);
    }

    /// Every [`PODS_CHECK`]: a change of the static pod revision directories ends the chain at
    /// the last revision received (a set's archive must match every moment restored with it)
    /// and asks for a set at once, which starts the next chain with the new archive.
    async fn check_static_pods(&mut self) -> Result<()> {
        if self.pods_checked.is_some_and(|t| t.elapsed() < PODS_CHECK) {
            return Ok(());
        }
        self.pods_checked = Some(std::time::Instant::now());
        let Some(now) = static_pod_revisions(self.settings) else {
            return Ok(());
        };
        let Some(before) = self.pods.replace(now.clone()) else {
            return Ok(());
        };
        if before == now {
            return Ok(());
        }
        let show = |dirs: &[std::path::PathBuf]| {
            dirs.iter()
                .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let rev = self.next_revision() - 1;
        let why = format!(
            "static pod revisions changed at revision {rev} (from {} to {})",
            show(&before),
            show(&now)
        );
        tracing::info!(revision = rev, change = %why, "journal: the static pod revisions changed; the chain ends and a full set with the new archive starts the next");
        self.cut_with(Some(why)).await?;
        self.wanted.want(rev + 1);
        Ok(())
    }

    /// Every [`NEED_CHECK`] while a set is wanted: met once the targets hold a set at or after
    /// the revision wanted; asked for again otherwise.
    async fn check_wanted_set(&mut self) {
        let Some(after) = self.wanted.after() else { return };
        if self.need_checked.elapsed() < NEED_CHECK {
            return;
        }
        self.need_checked = std::time::Instant::now();
        match newest_set(&holders(self.settings), &self.cluster).await {
            Some((rev, _)) if rev >= after => self.wanted.met_by(rev),
            _ => {
                tracing::info!(
                    revision = after,
                    "journal: still no full set as new as the chain's start; asking again"
                );
                self.wanted.want(after);
            }
        }
    }

    /// A lease's granted TTL, asked once per lease (-1 once it had expired).
    async fn lease_ttl(&mut self, lease: i64) -> i64 {
        if let Some(t) = self.ttls.get(&lease) {
            return *t;
        }
        let asked = tokio::time::timeout(
            self.settings.etcd.request_timeout.0,
            self.client.lease_time_to_live(lease, None),
        )
        .await;
        let ttl = match asked {
            Ok(Ok(r)) if r.ttl() > 0 => r.granted_ttl(),
            _ => -1,
        };
        self.ttls.insert(lease, ttl);
        ttl
    }

    /// Seals the open segment and hands it to the store task; the next begins after it.
    async fn cut(&mut self) -> Result<()> {
        self.cut_with(None).await
    }

    /// [`Watching::cut`], the segment ending its chain when `ends` says why.
    async fn cut_with(&mut self, ends: Option<String>) -> Result<()> {
        let until = self.covered.max(self.from);
        if self.records.is_empty() && until <= self.from && ends.is_none() {
            return Ok(());
        }
        let records = std::mem::take(&mut self.records);
        let draft = segment::Draft {
            cluster_id: self.cluster_id.clone(),
            node: self.settings.node_name.clone(),
            first: self.next,
            from: self.from,
            until,
            records: &records,
            ends_chain: ends,
        };
        let encoded = segment::encode(&draft, &self.seal, self.signer.as_ref())?;
        self.next = records.last().map(|r| r.rev + 1).unwrap_or(self.next);
        self.from = until;
        self.weight = 0;
        self.tx
            .send(encoded)
            .await
            .map_err(|_| anyhow!("the journal's store task ended"))
    }
}

/// One target's segments waiting to be stored, oldest first, and the newest it stored.
#[derive(Default)]
struct Queue {
    waiting: std::sync::Mutex<VecDeque<(String, Arc<Vec<u8>>)>>,
    wake: tokio::sync::Notify,
    stored: std::sync::Mutex<Option<segment::Named>>,
    failing: std::sync::atomic::AtomicBool,
}

/// Stores each segment on every target, each target from its own queue and task, so that a
/// slow or failing target holds neither the others nor the watch. A target that fails keeps
/// its segments (bounded by [`BACKLOG_MAX`]: past it the oldest are dropped, a gap on that
/// target) and retries every few seconds. The journal is durable up to the newest segment
/// every target holds.
async fn store_segments(
    targets: Vec<Box<dyn Target>>,
    cluster: String,
    mut rx: mpsc::Receiver<(String, Vec<u8>)>,
    settings: Settings,
) {
    let queues: Vec<Arc<Queue>> = targets.iter().map(|_| Arc::new(Queue::default())).collect();
    let (changed_tx, mut changed) = mpsc::unbounded_channel::<()>();
    let closed = CancellationToken::new();
    let feeders: Vec<_> = targets
        .into_iter()
        .zip(queues.iter().cloned())
        .map(|(t, q)| tokio::spawn(feed(t, cluster.clone(), q, closed.clone(), changed_tx.clone())))
        .collect();
    drop(changed_tx);
    // What was last written to `state.json`: each target's stored segment signals, but the
    // durable point moves only when the slowest target stores one.
    let mut noted = None;
    loop {
        tokio::select! {
            segment = rx.recv() => {
                let Some((name, bytes)) = segment else { break };
                let bytes = Arc::new(bytes);
                for q in &queues {
                    enqueue(q, &name, &bytes);
                }
            }
            Some(()) = changed.recv() => note_durable(&settings, &queues, &mut noted),
        }
    }
    // The term ended: each target stores what it can of what waits, then stops.
    closed.cancel();
    for f in feeders {
        let _ = f.await;
    }
    note_durable(&settings, &queues, &mut noted);
}

/// Adds a segment to a target's queue, dropping the oldest past [`BACKLOG_MAX`].
fn enqueue(q: &Queue, name: &str, bytes: &Arc<Vec<u8>>) {
    let mut waiting = q.waiting.lock().expect("queue lock");
    waiting.push_back((name.to_string(), bytes.clone()));
    let mut total: usize = waiting.iter().map(|(_, b)| b.len()).sum();
    while total > BACKLOG_MAX && waiting.len() > 1 {
        let (n, b) = waiting.pop_front().expect("more than one");
        total -= b.len();
        tracing::error!(segment = %n, "journal: dropped a segment a target could not take (backlog full): that target's chain has a gap");
    }
    drop(waiting);
    q.wake.notify_one();
}

/// Stores `q`'s segments on `t` in order until `closed` (then what is left, while it works).
async fn feed(
    t: Box<dyn Target>,
    cluster: String,
    q: Arc<Queue>,
    closed: CancellationToken,
    changed: mpsc::UnboundedSender<()>,
) {
    use std::sync::atomic::Ordering::SeqCst;
    loop {
        let next = q.waiting.lock().expect("queue lock").front().cloned();
        let Some((name, bytes)) = next else {
            if closed.is_cancelled() {
                return;
            }
            tokio::select! {
                _ = q.wake.notified() => {}
                _ = closed.cancelled() => {}
            }
            continue;
        };
        match t.put_journal(&cluster, &name, &bytes).await {
            Ok(()) => {
                tracing::debug!(target_name = %t.name(), segment = %name, "journal segment stored");
                q.waiting.lock().expect("queue lock").pop_front();
                *q.stored.lock().expect("stored lock") = segment::parse_name(&name);
                q.failing.store(false, SeqCst);
            }
            Err(e) => {
                let waiting = q.waiting.lock().expect("queue lock").len();
                if !q.failing.swap(true, SeqCst) {
                    tracing::warn!(target_name = %t.name(), segment = %name, waiting, error = %one_line(&e), "journal: the target cannot take a segment; kept to retry");
                }
                let _ = changed.send(());
                if closed.is_cancelled() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => {}
                    _ = closed.cancelled() => {}
                }
                continue;
            }
        }
        let _ = changed.send(());
    }
}

/// The journal's durable point and whether a target fails, as last written by
/// [`note_durable`].
type Durable = (Option<(i64, DateTime<Utc>)>, bool);

/// The journal's durable point in `state.json`: the newest segment every target holds.
/// Written only when it (or whether a target fails) changed since `noted`.
fn note_durable(settings: &Settings, queues: &[Arc<Queue>], noted: &mut Option<Durable>) {
    use std::sync::atomic::Ordering::SeqCst;
    let stored: Vec<Option<segment::Named>> = queues
        .iter()
        .map(|q| q.stored.lock().expect("stored lock").clone())
        .collect();
    let failing = queues.iter().any(|q| q.failing.load(SeqCst));
    let durable = if stored.iter().all(Option::is_some) {
        stored.into_iter().flatten().map(|n| (n.last, n.until)).min()
    } else {
        None
    };
    if noted.replace((durable, failing)) == Some((durable, failing)) {
        return;
    }
    note(settings, |j| {
        if let Some((last, until)) = durable.filter(|(last, _)| *last >= j.durable_revision) {
            j.durable_revision = last;
            j.durable_until = Some(until.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        }
        j.error = failing.then(|| "a target cannot take journal segments; they wait in memory".into());
    });
}
