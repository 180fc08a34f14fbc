//! The native snapshot: etcd's `Maintenance.Snapshot` stream written to staging at full speed
//! (a throttled reader would hold etcd's bbolt read transaction open longer), hashed while it
//! streams, and stored only if etcd's appended SHA-256 trailer matches.
//!
//! Memory stays flat: one thread of its own receives each chunk, hashes, seals (zstd, age)
//! and writes it before asking for the next; HTTP/2 flow control bounds what is in flight. Uploads
//! may follow the file as it grows (see [`crate::growing`]); it is completed for them only
//! after the trailer verified.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

use super::pace::{PaceReport, Pacer};
use crate::envelope::{Seal, Sealer};
use crate::etcd::Member;
use crate::fsutil;
use crate::growing::{Follower, Publisher};

/// Length of the SHA-256 etcd appends to every snapshot.
pub const TRAILER_LEN: usize = 32;

/// Verifies etcd's trailer while the snapshot streams: everything but the last 32 bytes is
/// hashed; those 32 bytes must equal that hash.
#[derive(Clone, Default)]
pub struct TrailerCheck {
    body: Sha256,
    tail: Vec<u8>,
    len: u64,
}

/// A verified snapshot's size and the SHA-256 of the whole file (trailer included).
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub size: u64,
    pub sha256: String,
}

impl TrailerCheck {
    pub fn update(&mut self, chunk: &[u8]) {
        self.len += chunk.len() as u64;
        let held = self.tail.len() + chunk.len();
        if held <= TRAILER_LEN {
            self.tail.extend_from_slice(chunk);
            return;
        }
        let spill = held - TRAILER_LEN;
        let from_tail = spill.min(self.tail.len());
        self.body.update(&self.tail[..from_tail]);
        let from_chunk = spill - from_tail;
        self.body.update(&chunk[..from_chunk]);
        let mut tail = Vec::with_capacity(TRAILER_LEN);
        tail.extend_from_slice(&self.tail[from_tail..]);
        tail.extend_from_slice(&chunk[from_chunk..]);
        self.tail = tail;
    }

    pub fn finish(self) -> Result<Verified> {
        if self.tail.len() < TRAILER_LEN {
            bail!(
                "snapshot is {} bytes, too short to hold etcd's SHA-256 trailer",
                self.len
            );
        }
        let body = self.body.clone().finalize();
        if body.as_slice() != self.tail.as_slice() {
            bail!(
                "snapshot trailer mismatch: etcd's appended SHA-256 is {} but the data hashes to {} (corrupted in transit?)",
                hex::encode(&self.tail),
                hex::encode(body)
            );
        }
        let mut full = self.body;
        full.update(&self.tail);
        Ok(Verified {
            size: self.len,
            sha256: hex::encode(full.finalize()),
        })
    }
}

/// Checks the trailer of a snapshot file on disk (streamed, constant memory).
pub fn verify_file(path: &Path) -> Result<Verified> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open '{}'", path.display()))?;
    let mut check = TrailerCheck::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf).with_context(|| format!("cannot read '{}'", path.display()))?;
        if n == 0 {
            break;
        }
        check.update(&buf[..n]);
    }
    check.finish().with_context(|| format!("'{}'", path.display()))
}

/// What a snapshot run produced.
#[derive(Debug, Clone)]
pub struct Taken {
    pub path: PathBuf,
    /// The snapshot as etcd sent it (its trailer verified).
    pub verified: Verified,
    /// What was stored: the same as `verified` unless sealed.
    pub stored: Verified,
    /// The store revision the snapshot holds, from the stream's header.
    pub revision: Option<i64>,
    /// What pacing did, when the pull was paced ([`super::pace`]).
    pub pace: Option<PaceReport>,
}

/// A snapshot about to be streamed into `dest` (sealed as configured); its file can be
/// followed by uploads while it is written (see [`crate::growing`]).
pub struct Pending {
    part: PathBuf,
    dest: PathBuf,
    publisher: Publisher,
    seal: Seal,
    /// The database size etcd reported, the stream's expected length (for progress).
    expected: Option<u64>,
    /// `priority.etcd_latency_budget`'s multiple; `None`: full speed.
    budget: Option<f64>,
}

impl Pending {
    /// Creates the temporary file (`<dest>.part`, 0600).
    pub fn create(dest: &Path, seal: &Seal) -> Result<Pending> {
        let part = PathBuf::from(format!("{}.part", dest.display()));
        // A sealed file's hash differs from the stream's: it is computed as it is written.
        let publisher = Publisher::create(&part, !seal.is_plain())?;
        Ok(Pending {
            part,
            dest: dest.to_path_buf(),
            publisher,
            seal: seal.clone(),
            expected: None,
            budget: None,
        })
    }

    /// Tells progress reports how long the stream should be (etcd's reported DB size).
    pub fn expecting(mut self, db_size: u64) -> Pending {
        self.expected = Some(db_size);
        self
    }

    /// Paces the pull to keep etcd's latency within `budget` (a multiple of its latency
    /// before the pull); `None`: full speed.
    pub fn paced(mut self, budget: Option<f64>) -> Pending {
        self.budget = budget;
        self
    }

    /// A follower of the file; it expects the DB size when the file is stored plain.
    pub fn follower(&self) -> Follower {
        let expected = self.expected.filter(|_| self.seal.is_plain());
        self.publisher.follower().expecting(expected)
    }

    /// Streams the snapshot from `member`, verifying the trailer. On any failure nothing is
    /// left at `dest` or at its temporary name, and followers fail.
    pub async fn stream(self, member: &Member) -> Result<Taken> {
        let Pending {
            part,
            dest,
            publisher,
            seal,
            expected,
            budget,
        } = self;
        let phase = crate::progress::Phase::start("snapshot", expected);
        match stream_to(member, publisher, &part, (seal, budget), phase).await {
            Ok((verified, stored, revision, pace)) => {
                std::fs::rename(&part, &dest)
                    .with_context(|| format!("cannot rename '{}' into place", part.display()))
                    .inspect_err(|_| {
                        let _ = std::fs::remove_file(&part);
                    })?;
                if let Some(dir) = dest.parent() {
                    fsutil::fsync_dir(dir)?;
                }
                Ok(Taken {
                    path: dest,
                    verified,
                    stored,
                    revision,
                    pace,
                })
            }
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                Err(e)
            }
        }
    }
}

/// Streams a plain snapshot from `member` into `dest` (a new 0600 file).
pub async fn take(member: &Member, dest: &Path) -> Result<Taken> {
    Pending::create(dest, &Seal::default())?.stream(member).await
}

/// What a pull produced: the stream as sent, the file as stored, the revision, the pacing.
type Pulled = (Verified, Verified, Option<i64>, Option<PaceReport>);

async fn stream_to(
    member: &Member,
    publisher: Publisher,
    part: &Path,
    (seal, budget): (Seal, Option<f64>),
    phase: crate::progress::Phase,
) -> Result<Pulled> {
    let reach = member.snapshot_reach();
    // The probe runs on the caller's runtime, not on the pull's thread.
    let probe_rt = tokio::runtime::Handle::try_current().ok();
    let part = part.to_path_buf();
    let (done, result) = tokio::sync::oneshot::channel();
    let span = tracing::Span::current();
    // The whole pull runs on a thread of its own with a runtime of its own: the stream's
    // connection, the hashing, sealing and writing, at `priority.snapshot_nice`. Handing
    // each 32 KiB message from the daemon's runtime to a writer thread cost two futex calls
    // and a context switch per message, and the h2 connection task woke the reading task
    // across workers; the daemon's runtime (uploads, the election's renewals) never waits
    // for this thread.
    std::thread::Builder::new()
        .name("etcd-snapshot".into())
        .spawn(move || {
            let _span = span.enter();
            let mut done = done;
            let pulled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                crate::priority::for_the_snapshot_thread();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| anyhow!("cannot start the snapshot thread's runtime: {e}"))?;
                let pulled = rt.block_on(async {
                    tokio::select! {
                        pulled = paced_pull(&reach, publisher, &part, &seal, (budget, probe_rt), &phase) => pulled,
                        // The run was given up (its future dropped): stop pulling.
                        () = done.closed() => Err(anyhow!("snapshot abandoned")),
                    }
                });
                // A blocking task still running (a hung DNS lookup) must not hold the answer back.
                rt.shutdown_background();
                pulled
            }))
            .unwrap_or_else(|panic| {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(anyhow!("the snapshot thread panicked: {why}"))
            });
            let _ = done.send(pulled);
        })
        .map_err(|e| anyhow!("cannot start the snapshot thread: {e}"))?;
    result.await.map_err(|_| anyhow!("the snapshot thread failed"))?
}

/// [`pull`], paced by a probe of the same member when there is a budget and a runtime to
/// probe from (`rt`, the daemon's): the probe's baseline is measured before the stream
/// begins, and it paces until the stream ends.
async fn paced_pull(
    reach: &crate::etcd::SnapshotReach,
    publisher: Publisher,
    part: &Path,
    seal: &Seal,
    (budget, rt): (Option<f64>, Option<tokio::runtime::Handle>),
    phase: &crate::progress::Phase,
) -> Result<Pulled> {
    let pacer = Pacer::default();
    let done = tokio_util::sync::CancellationToken::new();
    // An abandoned pull (this future dropped) stops its probe too.
    let _stop_probe = done.clone().drop_guard();
    let probe = match (budget, rt) {
        (Some(b), Some(rt)) => super::pace::start_on(&rt, reach.clone(), b, pacer.clone(), done.clone()).await,
        _ => None,
    };
    let pulled = pull(reach, publisher, part, seal, phase, &pacer).await;
    done.cancel();
    let report = match probe {
        Some(task) => task.await.ok().flatten(),
        None => None,
    };
    let (verified, stored, revision) = pulled?;
    if let Some(r) = report.as_ref().filter(|r| r.slowed_s > 0.0) {
        tracing::info!(
            slowed_s = format!("{:.1}", r.slowed_s),
            baseline_ms = format!("{:.2}", r.baseline_ms),
            during_p50_ms = format!("{:.2}", r.during_p50_ms),
            "snapshot pull {}",
            r.describe()
        );
    }
    Ok((verified, stored, revision, report))
}

/// Pulls the stream into `publisher` (sealed as asked), verifying the trailer; only then is
/// the file completed (fsync, and followers may finish). Returning an error drops the
/// publisher unfinished, which fails every follower.
async fn pull(
    reach: &crate::etcd::SnapshotReach,
    publisher: Publisher,
    part: &Path,
    seal: &Seal,
    phase: &crate::progress::Phase,
    pacer: &Pacer,
) -> Result<(Verified, Verified, Option<i64>)> {
    let shown = &reach.shown;
    let idle = reach.request_timeout;
    let cannot_write = |e: std::io::Error| anyhow!("cannot write '{}': {e}", part.display());
    let mut client = reach.connect().await?;
    let mut stream = crate::etcd::within(idle, &format!("etcd endpoint '{shown}': snapshot"), async {
        client
            .snapshot()
            .await
            .map_err(|e| anyhow!("etcd endpoint '{shown}': snapshot: {e}"))
    })
    .await?;
    // The publisher writes whole blocks itself: no buffer in front of it.
    let direct = publisher.direct();
    let mut out = Sealer::new(publisher, seal)?;
    let mut check = TrailerCheck::default();
    let mut revision = None;
    let mut last_remaining = None;
    loop {
        let msg = tokio::time::timeout(idle, stream.message())
            .await
            .map_err(|_| {
                anyhow!(
                    "etcd endpoint '{shown}': snapshot stream stalled for {}",
                    humantime::format_duration(idle)
                )
            })?
            // A broken stream would also fail the trailer check; the stream's error is the cause.
            .map_err(|e| {
                anyhow!(
                    "etcd endpoint '{shown}': snapshot stream broke: {}",
                    e.to_string().replace('\n', " ")
                )
            })?;
        let Some(msg) = msg else { break };
        if revision.is_none() {
            revision = msg.header().map(|h| h.revision());
        }
        last_remaining = Some(msg.remaining_bytes());
        phase.add(msg.blob().len() as u64);
        check.update(msg.blob());
        out.write_all(msg.blob()).map_err(cannot_write)?;
        pacer.pulled(msg.blob().len()).await;
    }
    match last_remaining {
        None => bail!("etcd endpoint '{shown}': snapshot stream ended without data"),
        Some(n) if n != 0 => bail!("etcd endpoint '{shown}': snapshot stream ended with {n} bytes still to come"),
        _ => {}
    }
    let verified = check.finish()?;
    let mut publisher = out.finish().map_err(cannot_write)?;
    let (size, sha) = publisher
        .complete()
        .with_context(|| format!("cannot write the end of '{}' or fsync it", part.display()))?;
    tracing::debug!(direct_io = direct, "snapshot written to staging");
    let stored = match sha {
        Some(sha256) => Verified { size, sha256 },
        None => verified.clone(),
    };
    Ok((verified, stored, revision))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_trailer(body: &[u8]) -> Vec<u8> {
        let mut v = body.to_vec();
        v.extend_from_slice(&Sha256::digest(body));
        v
    }

    #[test]
    fn trailer_verifies_across_any_chunking() {
        let body: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let snap = with_trailer(&body);
        for chunk in [1, 5, 31, 32, 33, 1000, 20_000] {
            let mut c = TrailerCheck::default();
            snap.chunks(chunk).for_each(|p| c.update(p));
            let v = c.finish().unwrap();
            assert_eq!(v.size, snap.len() as u64);
            assert_eq!(v.sha256, hex::encode(Sha256::digest(&snap)));
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_is_caught() {
        let body = vec![0x5au8; 4096];
        let snap = with_trailer(&body);
        for pos in [0, 100, 4095, 4096, snap.len() - 1] {
            let mut bad = snap.clone();
            bad[pos] ^= 1;
            let mut c = TrailerCheck::default();
            bad.chunks(100).for_each(|p| c.update(p));
            let e = c.finish().unwrap_err().to_string();
            assert!(e.contains("trailer mismatch"), "{e}");
        }
        let mut c = TrailerCheck::default();
        c.update(&[1, 2, 3]);
        assert!(c.finish().unwrap_err().to_string().contains("too short"));
    }
}
