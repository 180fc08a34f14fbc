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
//!
//! The current raft leader is the busiest member, so a node whose member leads waits a
//! little before competing; a learner or an unhealthy member never competes.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::etcd::MemberStatus;

/// How long a finished run's marker is kept.
const MARKER_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The record of a completed run, kept at `<prefix>/runs/<run>` and `<prefix>/last`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub run: String,
    pub node: String,
    /// The backup id, when a set was taken.
    pub id: Option<String>,
    /// `ok`, `failed` or `skipped: <reason>`.
    pub result: String,
    /// RFC 3339, UTC.
    pub finished: String,
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
}

/// The outcome of competing for a run.
pub enum Claim {
    /// This node runs it; `lost` fires if the lease cannot be kept alive.
    Won(Held),
    /// Another node already completed it.
    Done(RunRecord),
    /// This node does not compete (learner, unhealthy member) or gave up waiting.
    Skip(String),
}

/// The lock, held. Dropping it stops the keep-alive (the lease then expires); `release`
/// revokes it at once.
pub struct Held {
    lease: i64,
    run: String,
    pub lost: CancellationToken,
    keepalive: tokio::task::JoinHandle<()>,
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

impl Election {
    pub fn new(client: Client, prefix: &str, node: &str, ttl: Duration) -> Election {
        Election {
            client,
            prefix: prefix.to_string(),
            node: node.to_string(),
            ttl,
        }
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.prefix)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>> {
        let resp = self
            .client
            .get(key, None)
            .await
            .with_context(|| format!("etcd get '{key}'"))?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => Ok(serde_json::from_slice(kv.value()).ok()),
        }
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

    /// Competes for `run` until this node wins it, another completes it, or `wait_max`
    /// passes. `members` is the number of voting members, for the leader's head start.
    pub async fn contend(
        &mut self,
        run: &str,
        status: &MemberStatus,
        wait_max: Duration,
        cancel: &CancellationToken,
    ) -> Result<Claim> {
        if status.is_learner {
            return Ok(Claim::Skip("this node's etcd member is a learner".into()));
        }
        if !status.errors.is_empty() {
            return Ok(Claim::Skip(format!(
                "this node's etcd member reports errors: {}",
                status.errors.join("; ")
            )));
        }
        if status.leader == status.member_id {
            // Let a follower take it; the leader competes after a head start.
            let head_start = (self.ttl / 3).clamp(Duration::from_secs(1), Duration::from_secs(10));
            tracing::info!(
                run,
                seconds = head_start.as_secs(),
                "this node's member is the raft leader; giving followers a head start"
            );
            tokio::select! {
                _ = tokio::time::sleep(head_start) => {}
                _ = cancel.cancelled() => return Ok(Claim::Skip("stopping".into())),
            }
        }
        let deadline = tokio::time::Instant::now() + wait_max;
        let lock_key = self.key("lock");
        let done_key = self.key(&format!("runs/{run}"));
        let mut holder = String::from("none");
        let mut announced = false;
        loop {
            if let Some(rec) = self.get_json::<RunRecord>(&done_key).await? {
                return Ok(Claim::Done(rec));
            }
            let lease = self
                .client
                .lease_grant(self.ttl.as_secs().max(2) as i64, None)
                .await
                .context("etcd lease grant")?
                .id();
            let value = serde_json::to_vec(&LockValue {
                node: self.node.clone(),
                run: run.to_string(),
            })?;
            let txn = Txn::new()
                .when([
                    Compare::create_revision(lock_key.clone(), CompareOp::Equal, 0),
                    Compare::create_revision(done_key.clone(), CompareOp::Equal, 0),
                ])
                .and_then([TxnOp::put(
                    lock_key.clone(),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            let won = self
                .client
                .txn(txn)
                .await
                .context("etcd txn on the run lock")?
                .succeeded();
            if won {
                tracing::info!(run, node = %self.node, "won the election for this run");
                return Ok(Claim::Won(self.hold(lease, run).await?));
            }
            let _ = self.client.lease_revoke(lease).await;
            if !announced {
                if let Some(l) = self.get_json::<LockValue>(&lock_key).await? {
                    holder = format!("node {} (run {})", l.node, l.run);
                }
                tracing::info!(run, holder = %holder, "another node holds the run lock; waiting");
                announced = true;
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Claim::Skip(format!("another backup holds the run lock: {holder}")));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = cancel.cancelled() => return Ok(Claim::Skip("stopping".into())),
            }
        }
    }

    async fn hold(&mut self, lease: i64, run: &str) -> Result<Held> {
        let (mut keeper, mut stream) = self
            .client
            .lease_keep_alive(lease)
            .await
            .context("etcd lease keep-alive")?;
        let lost = CancellationToken::new();
        let lost_signal = lost.clone();
        let every = (self.ttl / 3).max(Duration::from_millis(500));
        let ttl = self.ttl;
        let keepalive = tokio::spawn(async move {
            let mut last_ok = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(every).await;
                let renewed = async {
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                match tokio::time::timeout(every, renewed).await {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => last_ok = tokio::time::Instant::now(),
                    Ok(Ok(Some(_))) | Ok(Ok(None)) => {
                        tracing::error!("the election lease expired; another node may take over this run");
                        lost_signal.cancel();
                        return;
                    }
                    _ if last_ok.elapsed() >= ttl => {
                        tracing::error!("cannot keep the election lease alive; another node may take over this run");
                        lost_signal.cancel();
                        return;
                    }
                    _ => tracing::warn!("an election lease keep-alive failed; retrying"),
                }
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
    /// and releases the lock.
    pub async fn finish(&mut self, held: Held, record: &RunRecord) -> Result<()> {
        let marker_lease = self
            .client
            .lease_grant(MARKER_TTL.as_secs() as i64, None)
            .await
            .context("etcd lease grant")?
            .id();
        let rec = serde_json::to_vec(record)?;
        let lock_key = self.key("lock");
        let txn = Txn::new()
            .when([Compare::lease(lock_key.clone(), CompareOp::Equal, held.lease)])
            .and_then([
                TxnOp::put(
                    self.key(&format!("runs/{}", held.run)),
                    rec.clone(),
                    Some(PutOptions::new().with_lease(marker_lease)),
                ),
                TxnOp::put(self.key("last"), rec, None),
                TxnOp::delete(lock_key, None),
            ]);
        let done = self
            .client
            .txn(txn)
            .await
            .context("etcd txn to record the run")?
            .succeeded();
        self.release(held).await;
        if !done {
            return Err(anyhow!("lost the run lock before the run was recorded"));
        }
        Ok(())
    }

    /// Gives the lock up at once (on failure or shutdown) so another node can take over.
    pub async fn release(&mut self, held: Held) {
        held.keepalive.abort();
        if let Err(e) = self.client.lease_revoke(held.lease).await {
            tracing::warn!(error = %e, "cannot revoke the election lease; it expires by itself");
        }
    }
}
