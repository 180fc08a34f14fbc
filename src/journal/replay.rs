//! Applying journal records to a store restored from a full set (a throwaway etcd started
//! with limits raised: see [`crate::restore::at`]).
//!
//! Each original revision becomes one transaction, in order, and the transaction must land
//! on that very revision: the store then holds the same `mod_revision`, `create_revision` and
//! `version` for every key as the original did. A lease a put names is granted with its ID
//! and recorded TTL before its first use, and every lease is kept alive for the whole replay
//! (a lease expiring mid-replay would delete keys in a revision of its own and shift every
//! revision after it).

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use chrono::{DateTime, Utc};
use etcd_client::{Client, GetOptions, LeaseGrantOptions, PutOptions, Txn, TxnOp};
use tokio::sync::mpsc;

use super::segment::{Op, Record};

/// The TTL given to a lease whose TTL the writer could not learn (it had expired when first
/// seen, so its keys were about to go): short, so the restored cluster drops them soon.
pub const UNKNOWN_TTL: i64 = 60;
/// How often every lease is renewed during a replay.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(1);

/// A replay in progress.
pub struct Replay {
    client: Client,
    revision: i64,
    leases: HashSet<i64>,
    keep: mpsc::UnboundedSender<i64>,
    keeper: tokio::task::JoinHandle<()>,
    /// The stamp of the last revision applied.
    pub at: Option<DateTime<Utc>>,
    pub applied: u64,
}

impl Drop for Replay {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

impl Replay {
    /// Starts on `client`'s store: its revision, and its leases kept alive from now on.
    pub async fn start(mut client: Client) -> Result<Replay> {
        let r = client
            .get(vec![0u8], Some(GetOptions::new().with_all_keys().with_count_only()))
            .await?;
        let revision = r
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| anyhow!("no revision in etcd's answer"))?;
        let (keep, rx) = mpsc::unbounded_channel();
        let keeper = tokio::spawn(keep_alive(client.clone(), rx));
        let mut leases = HashSet::new();
        for l in client.leases().await?.leases() {
            leases.insert(l.id());
            let _ = keep.send(l.id());
        }
        Ok(Replay {
            client,
            revision,
            leases,
            keep,
            keeper,
            at: None,
            applied: 0,
        })
    }

    /// The store's revision.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Applies `rec` as one transaction if it is the next revision; `false` when the store
    /// already holds it (a set taken after the chain began, or a segment overlap).
    pub async fn apply(&mut self, rec: &Record) -> Result<bool> {
        if rec.rev <= self.revision {
            return Ok(false);
        }
        if rec.rev != self.revision + 1 {
            bail!(
                "the journal misses revisions {}..={}: the store is at {}",
                self.revision + 1,
                rec.rev - 1,
                self.revision
            );
        }
        let mut ops = Vec::with_capacity(rec.ops.len());
        for op in &rec.ops {
            match op {
                Op::Put { key, value, lease, .. } => {
                    let mut opts = PutOptions::new();
                    if *lease != 0 {
                        self.grant(*lease, rec.leases.get(lease).copied()).await?;
                        opts = opts.with_lease(*lease);
                    }
                    ops.push(TxnOp::put(key.clone(), value.clone(), Some(opts)));
                }
                Op::Delete { key } => ops.push(TxnOp::delete(key.clone(), None)),
            }
        }
        let resp = self
            .client
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(|e| anyhow!("replaying revision {}: {e}", rec.rev))?;
        let landed = resp.header().map(|h| h.revision()).unwrap_or(0);
        if landed != rec.rev {
            bail!(
                "replaying revision {} landed on revision {landed}: the store diverged",
                rec.rev
            );
        }
        self.revision = landed;
        self.at = Some(rec.at);
        self.applied += 1;
        Ok(true)
    }

    /// Grants lease `id` (its recorded TTL, else [`UNKNOWN_TTL`]) unless the store has it.
    async fn grant(&mut self, id: i64, ttl: Option<i64>) -> Result<()> {
        if self.leases.contains(&id) {
            return Ok(());
        }
        let ttl = ttl.filter(|t| *t > 0).unwrap_or(UNKNOWN_TTL);
        self.client
            .lease_grant(ttl, Some(LeaseGrantOptions::new().with_id(id)))
            .await
            .map_err(|e| anyhow!("granting lease {id:x} (TTL {ttl} s): {e}"))?;
        self.leases.insert(id);
        let _ = self.keep.send(id);
        Ok(())
    }
}

/// Renews every lease sent to it, each [`KEEP_ALIVE_EVERY`], until dropped.
async fn keep_alive(mut client: Client, mut rx: mpsc::UnboundedReceiver<i64>) {
    let mut keepers = Vec::new();
    let mut tick = tokio::time::interval(KEEP_ALIVE_EVERY);
    loop {
        tokio::select! {
            id = rx.recv() => {
                let Some(id) = id else { return };
                if let Ok((keeper, mut stream)) = client.lease_keep_alive(id).await {
                    // Answers are read so the stream never stalls.
                    tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
                    keepers.push(keeper);
                }
            }
            _ = tick.tick() => {
                for k in &mut keepers {
                    let _ = k.keep_alive().await;
                }
            }
        }
    }
}
