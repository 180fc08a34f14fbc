//! A staging file that uploads read while it is still being written: the pipelined path.
//!
//! The writer ([`Publisher`]) publishes how many bytes are on disk after every write; each
//! [`Follower`] reads up to that point with `pread` and waits for more. A follower never
//! slows the writer: it reads the file (page cache), not a channel the writer would have to
//! feed, so a slow or rate-limited upload only falls behind.
//!
//! The end is published only once the writer has verified what it wrote ([`Publisher::complete`]);
//! a writer dropped before that publishes a failure, and followers end with an error, which
//! aborts the request that carries their bytes.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::Stream;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::fsutil;

/// How far the file has been written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Growth {
    /// Still being written; this many bytes are in the file.
    Writing(u64),
    /// Written, verified and fsynced: the file's final size.
    Done(u64),
    /// The writer failed (or its data did not verify): the file must not be stored.
    Failed,
}

/// Written data is handed to the kernel's writeback every this many bytes, so that the
/// fsync at the end finds little left to write instead of the whole file.
const WRITEBACK_STEP: u64 = 16 << 20;

/// What followers see when the writer fails.
pub const ABANDONED: &str =
    "the file being uploaded failed verification while it was written; the upload was abandoned";

/// The writer side of a growing file (a new 0600 file).
pub struct Publisher {
    file: File,
    written: u64,
    /// Bytes handed to the kernel's writeback so far (see [`WRITEBACK_STEP`]).
    flushed: u64,
    hash: Option<Sha256>,
    tx: watch::Sender<Growth>,
    reader: Arc<File>,
    done: bool,
}

impl Publisher {
    /// Creates `path`; with `hash`, the SHA-256 of what is written is computed on the way.
    pub fn create(path: &Path, hash: bool) -> Result<Publisher> {
        let file = fsutil::create_private_file(path)?;
        let reader = File::open(path).with_context(|| format!("cannot open '{}'", path.display()))?;
        let (tx, _) = watch::channel(Growth::Writing(0));
        Ok(Publisher {
            file,
            written: 0,
            flushed: 0,
            hash: hash.then(Sha256::new),
            tx,
            reader: Arc::new(reader),
            done: false,
        })
    }

    /// A reader of this file; it keeps its own descriptor, so a rename does not disturb it.
    pub fn follower(&self) -> Follower {
        Follower {
            file: self.reader.clone(),
            rx: self.tx.subscribe(),
            expected: None,
            progress: crate::progress::Phase::default(),
        }
    }

    /// Tells followers the file is complete, then fsyncs it. Returns its size and, if
    /// asked for at creation, its SHA-256.
    /// Followers may finish while the fsync runs: what they send is not stored anywhere
    /// until this returns and the caller moves the set on.
    pub fn complete(&mut self) -> io::Result<(u64, Option<String>)> {
        self.file.flush()?;
        self.done = true;
        self.tx.send_replace(Growth::Done(self.written));
        self.file.sync_all()?;
        Ok((self.written, self.hash.take().map(|h| hex::encode(h.finalize()))))
    }
}

impl Write for Publisher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        if let Some(h) = &mut self.hash {
            h.update(&buf[..n]);
        }
        self.written += n as u64;
        self.tx.send_replace(Growth::Writing(self.written));
        if self.written - self.flushed >= WRITEBACK_STEP {
            fsutil::start_writeback(&self.file, self.flushed, self.written - self.flushed);
            self.flushed = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if !self.done {
            self.tx.send_replace(Growth::Failed);
        }
    }
}

/// The reader side of a growing file.
#[derive(Clone)]
pub struct Follower {
    file: Arc<File>,
    rx: watch::Receiver<Growth>,
    /// The size the file is expected to reach, when known (for progress only).
    expected: Option<u64>,
    progress: crate::progress::Phase,
}

impl Follower {
    /// The same follower, telling progress reports the size the file should reach.
    pub fn expecting(mut self, bytes: Option<u64>) -> Follower {
        self.expected = bytes;
        self
    }

    /// The same follower, reporting what it reads as the phase `label`.
    pub fn with_progress(mut self, label: String) -> Follower {
        self.progress = crate::progress::Phase::start(label, self.expected);
        self
    }

    /// The file from its first byte, in chunks of at most `chunk` bytes, as it is written;
    /// ends after the last byte once the writer completed, or with an error if it failed.
    /// Every call starts again from the first byte (a retried request sends it all again).
    pub fn stream(&self, chunk: usize) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        self.progress.set(0);
        self.read(0, u64::MAX, chunk, self.progress.clone())
    }

    /// Bytes `from..from + len` of the file (fewer if it ends sooner), in chunks of at most
    /// `chunk` bytes, as they are written: one part of a multipart upload. Like
    /// [`Follower::stream`], it fails once the writer has failed, even for bytes already
    /// read. Progress is not reported.
    pub fn range(&self, from: u64, len: u64, chunk: usize) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        self.read(from, len, chunk, crate::progress::Phase::default())
    }

    /// What [`Follower::with_progress`] set up, for an upload that reports progress its own way.
    pub fn progress(&self) -> crate::progress::Phase {
        self.progress.clone()
    }

    fn read(
        &self,
        from: u64,
        len: u64,
        chunk: usize,
        progress: crate::progress::Phase,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let limit = from.saturating_add(len);
        let state = (self.file.clone(), self.rx.clone(), from);
        futures_util::stream::try_unfold(state, move |(file, mut rx, offset)| {
            let progress = progress.clone();
            async move {
                loop {
                    let growth = *rx.borrow_and_update();
                    let end = match growth {
                        Growth::Failed => return Err(io::Error::other(ABANDONED)),
                        Growth::Writing(n) | Growth::Done(n) => n.min(limit),
                    };
                    if offset < end {
                        let len = (end - offset).min(chunk as u64) as usize;
                        let f = file.clone();
                        let buf = tokio::task::spawn_blocking(move || {
                            let mut b = vec![0u8; len];
                            f.read_exact_at(&mut b, offset).map(|_| b)
                        })
                        .await
                        .map_err(io::Error::other)??;
                        progress.set(offset + len as u64);
                        return Ok(Some((Bytes::from(buf), (file, rx, offset + len as u64))));
                    }
                    if offset >= limit || matches!(growth, Growth::Done(_)) {
                        return Ok(None);
                    }
                    // The writer is gone once `changed` fails; its last word is then final.
                    if rx.changed().await.is_err() && *rx.borrow() == growth {
                        return Err(io::Error::other(ABANDONED));
                    }
                }
            }
        })
    }

    /// Resolves once the writer has failed; never if it completes.
    pub async fn failed(&self) {
        let mut rx = self.rx.clone();
        loop {
            if *rx.borrow_and_update() == Growth::Failed {
                return;
            }
            if rx.changed().await.is_err() {
                if *rx.borrow() == Growth::Failed {
                    return;
                }
                std::future::pending::<()>().await;
            }
        }
    }

    /// The file's final size once the writer completed; `None` if it failed.
    pub async fn finished(&self) -> Option<u64> {
        let mut rx = self.rx.clone();
        loop {
            match *rx.borrow_and_update() {
                Growth::Done(n) => return Some(n),
                Growth::Failed => return None,
                Growth::Writing(_) => {}
            }
            if rx.changed().await.is_err() {
                return match *rx.borrow() {
                    Growth::Done(n) => Some(n),
                    _ => None,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    async fn collect(f: &Follower) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut s = std::pin::pin!(f.stream(7));
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_follower_reads_bytes_before_the_writer_finishes_and_ends_at_completion() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.part");
        let mut p = Publisher::create(&path, true).unwrap();
        let f = p.follower();
        p.write_all(b"first part;").unwrap();
        // The follower sees what is written while the writer is still open.
        let mut s = std::pin::pin!(f.stream(1 << 20));
        let early = s.next().await.unwrap().unwrap();
        assert_eq!(&early[..], b"first part;");
        // A rename does not disturb it (the staged file is renamed into place).
        std::fs::rename(&path, dir.path().join("f")).unwrap();
        let reader = tokio::spawn({
            let f = f.clone();
            async move { collect(&f).await }
        });
        p.write_all(b" second part").unwrap();
        let (size, sha) = p.complete().unwrap();
        drop(p);
        let all = reader.await.unwrap().unwrap();
        assert_eq!(all, b"first part; second part");
        assert_eq!(size, all.len() as u64);
        assert_eq!(sha.unwrap(), hex::encode(Sha256::digest(&all)));
        assert_eq!(f.finished().await, Some(size));
    }

    #[tokio::test]
    async fn a_range_waits_for_its_bytes_and_ends_at_its_length_or_the_file_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Publisher::create(&dir.path().join("f"), false).unwrap();
        let f = p.follower();
        let read = |from: u64, len: u64| {
            let f = f.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                let mut s = std::pin::pin!(f.range(from, len, 3));
                while let Some(chunk) = s.next().await {
                    out.extend_from_slice(&chunk?);
                }
                io::Result::Ok(out)
            })
        };
        p.write_all(b"0123").unwrap();
        let (middle, tail, past) = (read(2, 5), read(6, 100), read(50, 10));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!middle.is_finished(), "a range waits for bytes not written yet");
        p.write_all(b"456789").unwrap();
        assert_eq!(middle.await.unwrap().unwrap(), b"23456", "ends at its length");
        p.complete().unwrap();
        assert_eq!(tail.await.unwrap().unwrap(), b"6789", "ends at the file's end");
        assert_eq!(past.await.unwrap().unwrap(), b"", "past the end: nothing");
    }

    #[tokio::test]
    async fn a_writer_dropped_before_completion_fails_every_follower() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Publisher::create(&dir.path().join("f"), false).unwrap();
        let f = p.follower();
        p.write_all(&[1u8; 100]).unwrap();
        let reader = tokio::spawn({
            let f = f.clone();
            async move { collect(&f).await }
        });
        let watcher = tokio::spawn({
            let f = f.clone();
            async move { f.failed().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        drop(p);
        let err = reader.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("abandoned"), "{err}");
        watcher.await.unwrap();
        assert_eq!(f.finished().await, None);
        // A new stream after the failure fails at once too.
        assert!(collect(&f).await.is_err());
    }
}
