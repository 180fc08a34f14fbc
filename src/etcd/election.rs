//! One runner per run, chosen through etcd itself. Every daemon of the cluster competes for
//! the run lock under `<prefix>`; the winner holds it with a lease kept alive while it backs
//! up; the others wait, and if the winner dies or loses etcd, its lease expires and one of
//! them takes over the same run. A finished run leaves a small marker, so no node runs it
//! again, and a record of the last completed run that every node's `status` can show.
//!
//! Keys (all under `<prefix>`, all small):
//! - `<prefix>/lock`: `{node, run}` while a backup runs; bound to the runner's lease.
//! - `<prefix>/runs/<run>`: `{node, id, result, finished}` once a run is over; bound to a
//!   7-day lease, so old markers clean themselves up.
//! - `<prefix>/last`: the record of the last completed run.
//! - `<prefix>/publishing/<run>`: the set a runner is about to move into place, on a short
//!   lease (see [`publishing_key`]).
//! - `<prefix>/ids/<cluster>/<id>`: a set id reserved by one node's run for an hour, so two
//!   runs never store different sets under one id.
//!
//! The current raft leader is the busiest member, so a node whose member leads waits a
//! little before competing; a learner or an unhealthy member never competes.
//!
//! Safety margin: the runner treats its lock as lost once half the lease TTL has passed
//! without a confirmed renewal, well before etcd can expire it and a waiter can take over,
//! and the pipeline checks that before anything is moved into place on a target.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::etcd::MemberStatus;
use crate::outcome::{Skip, SkipKind};

/// How long a finished run's marker is kept.
const MARKER_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often a waiting node looks at the lock.
const WAIT_POLL: Duration = Duration::from_secs(1);

/// The record of a completed run, kept at `<prefix>/runs/<run>` and `<prefix>/last`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub run: String,
    pub node: String,
    /// The backup id, when a set was taken.
    pub id: Option<String>,
    /// What the run came to (one string, as every release writes it).
    pub result: crate::outcome::Recorded,
    /// RFC 3339, UTC.
    pub finished: String,
    /// For a partial run: the targets that hold the set, and those still owed it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stored: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LockValue {
    node: String,
    run: String,
}

pub struct Election {
    client: Client,
    prefix: String,
    node: String,
    ttl: Duration,
    /// Deadline of every single request: a partition must not hang the daemon.
    timeout: Duration,
    /// The lease of the run lock this process holds, if any (see [`Election::holding`]).
    holding: Option<i64>,
}

/// The outcome of competing for a run.
pub enum Claim {
    /// This node runs it; `lost` fires if the lock may no longer be ours.
    Won(Held),
    /// Another node already completed it.
    Done(RunRecord),
    /// This node does not compete (learner, unhealthy member), or gave up waiting.
    Skip(Skip),
}

/// The lock, held. Dropping it stops the keep-alive (the lease then expires); `release`
/// revokes it at once.
pub struct Held {
    lease: i64,
    run: String,
    pub lost: CancellationToken,
    keepalive: tokio::task::JoinHandle<()>,
}

impl Held {
    /// The lease the lock is bound to.
    pub fn lease(&self) -> i64 {
        self.lease
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

/// The key of a run: its scheduled time, the same on every node.
pub fn run_key(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%Y%m%dT%H%M%SZ").to_string()
}

async fn within<T>(d: Duration, what: &str, fut: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T> {
    match tokio::time::timeout(d, fut).await {
        Ok(r) => r.map_err(|e| anyhow!("etcd {what}: {e}")),
        Err(_) => Err(anyhow!(
            "etcd {what}: no answer within {}",
            humantime::format_duration(d)
        )),
    }
}

impl Election {
    pub fn new(client: Client, prefix: &str, node: &str, ttl: Duration, timeout: Duration) -> Election {
        Election {
            client,
            prefix: prefix.to_string(),
            node: node.to_string(),
            ttl,
            timeout,
            holding: None,
        }
    }

    /// The same election, for a process that holds the run lock under `lease`: a lock on a
    /// run under any other lease, even with this node's name (an earlier process of this
    /// node that crashed, its lease not expired yet), is someone else's run in progress.
    pub fn holding(mut self, lease: Option<i64>) -> Election {
        self.holding = lease;
        self
    }

    /// The election as `settings` configure it (prefix, node, lease TTL, request timeout),
    /// over `client`.
    pub fn of(client: Client, settings: &crate::config::Settings) -> Election {
        Election::new(
            client,
            &settings.election.prefix,
            &settings.node_name,
            settings.election.lease_ttl.0,
            settings.etcd.request_timeout.0,
        )
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.prefix)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>> {
        let resp = within(self.timeout, &format!("get '{key}'"), self.client.get(key, None)).await?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok()))
    }

    /// The last completed run, for `status`.
    pub async fn last(&mut self) -> Result<Option<RunRecord>> {
        let key = self.key("last");
        self.get_json(&key).await
    }

    /// Who holds the run lock now, as `node (run)`.
    pub async fn runner(&mut self) -> Result<Option<String>> {
        let key = self.key("lock");
        Ok(self
            .get_json::<LockValue>(&key)
            .await?
            .map(|l| format!("{} (run {})", l.node, l.run)))
    }

    async fn voting_members(&mut self) -> Result<usize> {
        let list = within(self.timeout, "member list", self.client.member_list()).await?;
        Ok(list.members().iter().filter(|m| !m.is_learner()).count())
    }

    /// The set another node was about to publish for `run` (see [`publishing_key`]).
    pub async fn published(&mut self, run: &str) -> Result<Option<RunRecord>> {
        let key = publishing_key(&self.prefix, run);
        self.get_json(&key).await
    }

    /// The record of `run`, if some node completed it.
    pub async fn done(&mut self, run: &str) -> Result<Option<RunRecord>> {
        let key = self.key(&format!("runs/{run}"));
        self.get_json(&key).await
    }

    /// Competes for `run` until this node wins it, another completes it, or `wait_max`
    /// passes. Transient etcd errors while waiting (a leader change, a member going away)
    /// are logged and waited out, so a dead runner's run is still taken over.
    pub async fn contend(
        &mut self,
        run: &str,
        status: &MemberStatus,
        wait_max: Duration,
        cancel: &CancellationToken,
    ) -> Result<Claim> {
        if status.is_learner {
            return Ok(Claim::Skip(Skip::new(
                SkipKind::Member,
                "this node's etcd member is a learner",
            )));
        }
        if !status.errors.is_empty() {
            return Ok(Claim::Skip(Skip::new(
                SkipKind::Member,
                format!("this node's etcd member reports errors: {}", status.errors.join("; ")),
            )));
        }
        // For a scheduled run, let a follower take it: the leader competes after a head start.
        // A manual run (no waiting) or a single-member cluster has no one to wait for.
        if status.leader == status.member_id && !wait_max.is_zero() && self.voting_members().await.unwrap_or(1) > 1 {
            let head_start = (self.ttl / 3).clamp(Duration::from_secs(1), Duration::from_secs(10));
            tracing::info!(
                run,
                seconds = head_start.as_secs(),
                "this node's member is the raft leader; giving followers a head start"
            );
            tokio::select! {
                _ = tokio::time::sleep(head_start) => {}
                _ = cancel.cancelled() => return Ok(Claim::Skip(Skip::new(SkipKind::Stopping, "stopping"))),
            }
        }
        let deadline = tokio::time::Instant::now() + wait_max;
        let mut holder = String::from("none");
        let mut announced = false;
        // Errors are ridden out (a leader change takes a second or two); errors for a whole
        // lease TTL mean this node's member is gone: step aside, the others take the run.
        let mut failing_since: Option<tokio::time::Instant> = None;
        loop {
            let attempt = self.try_claim(run).await;
            if attempt.is_ok() {
                failing_since = None;
            }
            match attempt {
                Ok(Attempt::Won(held)) => return Ok(Claim::Won(held)),
                Ok(Attempt::Done(rec)) => return Ok(Claim::Done(rec)),
                Ok(Attempt::Taken(by)) => {
                    holder = by;
                    if !announced {
                        tracing::info!(run, holder = %holder, "another node holds the run lock; waiting");
                        announced = true;
                    }
                }
                Err(e) if wait_max.is_zero() => return Err(e),
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= self.ttl.max(Duration::from_secs(3)) {
                        return Ok(Claim::Skip(Skip::new(
                            SkipKind::Member,
                            format!(
                                "this node's etcd member does not answer; another node takes the run ({})",
                                crate::error::one_line(&e)
                            ),
                        )));
                    }
                    tracing::warn!(run, error = %crate::error::one_line(&e), "election: etcd error; retrying")
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Claim::Skip(Skip::new(
                    SkipKind::Busy,
                    format!("another backup holds the run lock: {holder}"),
                )));
            }
            tokio::select! {
                _ = tokio::time::sleep(WAIT_POLL) => {}
                _ = cancel.cancelled() => return Ok(Claim::Skip(Skip::new(SkipKind::Stopping, "stopping"))),
            }
        }
    }

    /// One look at the lock: reads first, and only asks for a lease (a raft write) when the
    /// lock is free, so waiting nodes cost etcd only reads.
    async fn try_claim(&mut self, run: &str) -> Result<Attempt> {
        if let Some(rec) = self.done(run).await? {
            return Ok(Attempt::Done(rec));
        }
        let lock_key = self.key("lock");
        if let Some(l) = self.get_json::<LockValue>(&lock_key).await? {
            return Ok(Attempt::Taken(format!("node {} (run {})", l.node, l.run)));
        }
        let done_key = self.key(&format!("runs/{run}"));
        let unfinished = Compare::create_revision(done_key, CompareOp::Equal, 0);
        match self.claim_key(&lock_key, run, Some(unfinished)).await? {
            Some(held) => {
                tracing::info!(run, node = %self.node, "won the election for this run");
                Ok(Attempt::Won(held))
            }
            None => Ok(Attempt::Taken("another node, just now".into())),
        }
    }

    /// Puts a lock at `key` (naming this node and `run`) on a new lease if the key is free
    /// (and `also` holds), and holds it: `None` when another got there first. The lease is
    /// revoked on every way out but a held lock.
    async fn claim_key(&mut self, key: &str, run: &str, also: Option<Compare>) -> Result<Option<Held>> {
        let ttl = self.ttl.as_secs().max(2) as i64;
        let lease = within(self.timeout, "lease grant", self.client.lease_grant(ttl, None))
            .await?
            .id();
        let value = serde_json::to_vec(&LockValue {
            node: self.node.clone(),
            run: run.to_string(),
        })?;
        let mut when = vec![Compare::create_revision(key, CompareOp::Equal, 0)];
        when.extend(also);
        let txn = Txn::new()
            .when(when)
            .and_then([TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)))]);
        let won = within(self.timeout, "txn on a lock", self.client.txn(txn)).await;
        let held = match won {
            Ok(r) if r.succeeded() => self.hold(lease, run).await.map(Some),
            Ok(_) => Ok(None),
            Err(e) => Err(e),
        };
        if !matches!(held, Ok(Some(_))) {
            let _ = within(self.timeout, "lease revoke", self.client.lease_revoke(lease)).await;
        }
        held
    }

    async fn hold(&mut self, lease: i64, run: &str) -> Result<Held> {
        let (mut keeper, mut stream) =
            within(self.timeout, "lease keep-alive", self.client.lease_keep_alive(lease)).await?;
        let lost = CancellationToken::new();
        let lost_signal = lost.clone();
        // Renew often; give up the lock at half the TTL without a confirmed renewal, long
        // before etcd can expire the lease and let another node in.
        let every = (self.ttl / 5).max(Duration::from_millis(200));
        let margin = self.ttl / 2;
        let keepalive = tokio::spawn(async move {
            let mut confirmed = tokio::time::Instant::now();
            loop {
                let renewed = async {
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                match tokio::time::timeout(every, renewed).await {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => confirmed = tokio::time::Instant::now(),
                    Ok(Ok(_)) => {
                        tracing::error!("the election lease is gone; abandoning this run to another node");
                        lost_signal.cancel();
                        return;
                    }
                    _ => tracing::warn!("an election lease renewal failed; retrying"),
                }
                if confirmed.elapsed() >= margin {
                    tracing::error!("cannot renew the election lease; abandoning this run to another node");
                    lost_signal.cancel();
                    return;
                }
                tokio::time::sleep(every).await;
            }
        });
        Ok(Held {
            lease,
            run: run.to_string(),
            lost,
            keepalive,
        })
    }

    /// Marks the run done (if this node still holds the lock), records it as the last run,
    /// and releases the lock. Retried while the lock is still ours: a run recorded late is
    /// better than a run backed up twice.
    pub async fn finish(&mut self, held: Held, record: &RunRecord) -> Result<()> {
        let mut last_error = None;
        while !held.lost.is_cancelled() {
            match self.record_txn(&held, record).await {
                Ok(true) => {
                    self.release(held).await;
                    return Ok(());
                }
                Ok(false) => {
                    self.release(held).await;
                    return Err(anyhow!("lost the run lock before the run was recorded"));
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error::one_line(&e), "cannot record the run yet; retrying");
                    last_error = Some(e);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        self.release(held).await;
        Err(last_error.unwrap_or_else(|| anyhow!("lost the run lock before the run was recorded")))
    }

    async fn record_txn(&mut self, held: &Held, record: &RunRecord) -> Result<bool> {
        let rec = serde_json::to_vec(record)?;
        let lock_key = self.key("lock");
        self.put_marker(
            &held.run,
            &rec,
            vec![Compare::lease(lock_key.clone(), CompareOp::Equal, held.lease)],
            vec![
                TxnOp::put(self.key("last"), rec.clone(), None),
                TxnOp::delete(lock_key, None),
            ],
        )
        .await
    }

    /// Writes the marker `runs/<run>` (on a fresh 7-day lease) with `extra` operations, if
    /// `when` holds. The lease goes again when the transaction does not succeed, so retries
    /// leave none behind.
    async fn put_marker(&mut self, run: &str, rec: &[u8], when: Vec<Compare>, extra: Vec<TxnOp>) -> Result<bool> {
        let marker_lease = within(
            self.timeout,
            "lease grant",
            self.client.lease_grant(MARKER_TTL.as_secs() as i64, None),
        )
        .await?
        .id();
        let mut ops = vec![TxnOp::put(
            self.key(&format!("runs/{run}")),
            rec.to_vec(),
            Some(PutOptions::new().with_lease(marker_lease)),
        )];
        ops.extend(extra);
        let txn = Txn::new().when(when).and_then(ops);
        let done = within(self.timeout, "txn to record the run", self.client.txn(txn))
            .await
            .context("recording");
        if !done.as_ref().is_ok_and(|d| d.succeeded()) {
            let _ = within(self.timeout, "lease revoke", self.client.lease_revoke(marker_lease)).await;
        }
        Ok(done?.succeeded())
    }

    /// May this node deliver the set `id` it staged for `run`? Yes if the run's record names
    /// this set, or if this process holds the run's lock (the run itself delivering). A
    /// record naming another set: never. With no record and the lock free (the runner died or
    /// gave the run up before recording it, or the 7-day marker expired), this node takes
    /// the run's lock and records the run with this set (`pending`, settled once delivered)
    /// before saying yes, so no node can take the run over while the set goes out. Anything
    /// else (another holder of the lock, this process's lock lost): the set waits. A node
    /// that restarts after a crash mid-run thus never stores a second set for a run.
    pub async fn may_deliver(&mut self, run: &str, id: &str) -> Result<MayDeliver> {
        if let Some(rec) = self.done(run).await? {
            return Ok(self.judge(run, id, rec));
        }
        let key = self.key("lock");
        let resp = within(
            self.timeout,
            &format!("get '{key}'"),
            self.client.get(key.as_str(), None),
        )
        .await?;
        let lock = resp
            .kvs()
            .first()
            .and_then(|kv| Some((serde_json::from_slice::<LockValue>(kv.value()).ok()?, kv.lease())));
        let node = self.node.clone();
        let pending = || RunRecord {
            run: run.to_string(),
            node: node.clone(),
            id: Some(id.to_string()),
            result: crate::outcome::RunResult::Pending.into(),
            finished: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            stored: Vec::new(),
            missing: Vec::new(),
        };
        match lock {
            Some((l, lease)) if l.run == run && Some(lease) == self.holding => Ok(MayDeliver::Yes),
            // This process holds the lock (for a later run): nobody can take `run` over
            // meanwhile; recorded with this set, nobody will afterwards either.
            Some((_, lease)) if Some(lease) == self.holding => {
                let rec = pending();
                if self.record_orphan(&rec, lease).await? {
                    tracing::info!(run, backup_id = %id, "no node recorded this run; recorded it with this node's staged set");
                    Ok(MayDeliver::Yes)
                } else {
                    match self.done(run).await? {
                        Some(rec) => Ok(self.judge(run, id, rec)),
                        None => Ok(MayDeliver::Wait("the run lock changed hands".into())),
                    }
                }
            }
            Some((l, _)) if l.node == self.node && l.run == run => Ok(MayDeliver::Wait(format!(
                "an earlier process of this node still holds the lock of {run} (its lease has not expired)"
            ))),
            Some((l, _)) => Ok(MayDeliver::Wait(format!(
                "node {} holds the run lock ({})",
                l.node, l.run
            ))),
            None if self.holding.is_some() => Ok(MayDeliver::Wait(format!(
                "this run's lock of {run} may be lost; a later pass decides"
            ))),
            None => match self.try_claim(run).await? {
                Attempt::Done(rec) => Ok(self.judge(run, id, rec)),
                Attempt::Taken(by) => Ok(MayDeliver::Wait(format!("{by} holds the run lock"))),
                Attempt::Won(held) => {
                    self.finish(held, &pending()).await?;
                    tracing::info!(run, backup_id = %id, "no node recorded this run; recorded it with this node's staged set");
                    Ok(MayDeliver::Yes)
                }
            },
        }
    }

    /// Records a run no node recorded, while this process holds the lock under `lease` (for
    /// another run): only if the lock is still ours and the run still unrecorded.
    async fn record_orphan(&mut self, rec: &RunRecord, lease: i64) -> Result<bool> {
        let when = vec![
            Compare::lease(self.key("lock"), CompareOp::Equal, lease),
            Compare::create_revision(self.key(&format!("runs/{}", rec.run)), CompareOp::Equal, 0),
        ];
        self.put_marker(&rec.run, &serde_json::to_vec(rec)?, when, Vec::new())
            .await
    }

    /// Whether a recorded run's set is `id`, this node's.
    fn judge(&self, run: &str, id: &str, rec: RunRecord) -> MayDeliver {
        if rec.node == self.node && rec.id.as_deref() == Some(id) {
            MayDeliver::Yes
        } else {
            MayDeliver::NotOurs(format!(
                "node {} recorded run {run} with {}",
                rec.node,
                rec.id
                    .map_or_else(|| format!("result {}", rec.result), |i| format!("set {i}"))
            ))
        }
    }

    /// A set this node recorded as partial or pending for `run` has since reached every
    /// target: its marker (and `last`, if it is that run's) now says `ok`. Compare-and-swap
    /// on the exact record, keeping the marker's lease; returns whether it changed.
    pub async fn settle(&mut self, run: &str, id: &str) -> Result<bool> {
        use crate::outcome::RunResult;
        let key = self.key(&format!("runs/{run}"));
        let got = within(self.timeout, "get", self.client.get(key.clone(), None)).await?;
        let Some(kv) = got.kvs().first() else {
            return Ok(false); // expired, or never recorded
        };
        let Ok(rec) = serde_json::from_slice::<RunRecord>(kv.value()) else {
            return Ok(false);
        };
        let unsettled = matches!(rec.result.result(), Some(RunResult::Partial | RunResult::Pending));
        if rec.node != self.node || rec.id.as_deref() != Some(id) || !unsettled {
            return Ok(false);
        }
        let done = RunRecord {
            result: RunResult::Ok.into(),
            stored: Vec::new(),
            missing: Vec::new(),
            ..rec.clone()
        };
        let new = serde_json::to_vec(&done)?;
        let mut txn_ops = vec![TxnOp::put(
            key.clone(),
            new.clone(),
            Some(PutOptions::new().with_ignore_lease()),
        )];
        let last = within(self.timeout, "get", self.client.get(self.key("last"), None)).await?;
        if last
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<RunRecord>(kv.value()).ok())
            .is_some_and(|l| l == rec)
        {
            txn_ops.push(TxnOp::put(self.key("last"), new, None));
        }
        let txn = Txn::new()
            .when([Compare::value(key, CompareOp::Equal, kv.value().to_vec())])
            .and_then(txn_ops);
        let r = within(self.timeout, "txn to settle a run", self.client.txn(txn)).await?;
        Ok(r.succeeded())
    }

    /// [`Election::settle`] for every (run, id) a delivery pass brought to its last target,
    /// but `except` (the run being recorded now). Best effort: a marker left unsettled only
    /// understates what is stored.
    pub async fn settle_all(&mut self, settled: &[(String, String)], except: Option<&str>) {
        for (run, id) in settled.iter().filter(|(run, _)| Some(run.as_str()) != except) {
            match self.settle(run, id).await {
                Ok(true) => {
                    tracing::info!(run = %run, backup_id = %id, "the run's set reached every target; its record says ok")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(run = %run, backup_id = %id, error = %crate::error::one_line(&e), "cannot update the run's record")
                }
            }
        }
    }

    /// Takes the journal writer's lock (`<prefix>/journal/writer`) if no one holds it:
    /// `Ok(None)` while another node's writer does. Held like a run's lock (renewed, `lost`
    /// fires well before the lease can expire), so two writers never overlap for long.
    pub async fn claim_journal(&mut self) -> Result<Option<Held>> {
        // Read first: a node waiting for the lock costs etcd a read, not a lease grant.
        if self.journal_writer().await?.is_some() {
            return Ok(None);
        }
        let key = self.key("journal/writer");
        self.claim_key(&key, "journal", None).await
    }

    /// The node whose journal writer holds the lock, if any.
    pub async fn journal_writer(&mut self) -> Result<Option<String>> {
        let key = self.key("journal/writer");
        Ok(self.get_json::<LockValue>(&key).await?.map(|l| l.node))
    }

    /// Gives the lock up at once (on failure or shutdown) so another node can take over.
    pub async fn release(&mut self, held: Held) {
        held.keepalive.abort();
        // Bounded tightly: this runs on SIGTERM, and the lease expires by itself anyway.
        let d = self.timeout.min(Duration::from_secs(2));
        if let Err(e) = within(d, "lease revoke", self.client.lease_revoke(held.lease)).await {
            tracing::warn!(error = %crate::error::one_line(&e), "cannot revoke the election lease; it expires by itself");
        }
    }
}

/// Where a runner notes, just before it stores its set, which set it is about to publish
/// for a run (on a lease as long as the run markers'). A node that later takes the run over
/// (the first runner lost its lock after storing, before it could record the run) looks for
/// that set on the targets and records it instead of taking a second backup.
pub fn publishing_key(prefix: &str, run: &str) -> String {
    format!("{prefix}/publishing/{run}")
}

/// How long the publishing note lives: as long as the run markers.
pub const PUBLISHING_TTL: Duration = MARKER_TTL;

/// See [`Election::may_deliver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MayDeliver {
    Yes,
    /// Another set is the run's backup: this one stays a local copy.
    NotOurs(String),
    /// Not known yet: the set waits.
    Wait(String),
}

enum Attempt {
    Won(Held),
    Done(RunRecord),
    Taken(String),
}
