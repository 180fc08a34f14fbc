//! A staging file that uploads read while it is still being written: the pipelined path.
//!
//! The writer ([`Publisher`]) fills 1 MiB blocks and writes each one to disk with `O_DIRECT`
//! where the filesystem allows it: the bytes go from this process's reused buffers to the
//! device, without a page-cache copy (measured: about 40% of the whole backup's CPU on the
//! benchmark machine went to that copy) and without evicting etcd's hot pages. Each written
//! block stays in a small in-memory window, and every [`Follower`] takes its bytes from
//! there without copying them; a follower that fell behind the window reads the file back
//! (again with `O_DIRECT` where it can). A follower never slows the writer.
//!
//! The end is published only once the writer has verified what it wrote ([`Publisher::complete`]);
//! a writer dropped before that publishes a failure, and followers end with an error, which
//! aborts the request that carries their bytes.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

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

/// The unit of writing, of the in-memory window and of reading back.
const BLOCK: usize = 1 << 20;

/// Written blocks kept in memory for followers (8 MiB): enough for an upload that keeps
/// pace; one that falls further behind reads the file.
const WINDOW_BLOCKS: usize = 8;

/// Spare blocks kept for reuse: a reused buffer costs no page faults (on a VM whose freed
/// pages go back to the host, a fresh page costs a host fault too).
const POOL_BLOCKS: usize = 4;

/// `O_DIRECT` wants buffers, offsets and lengths aligned to the device's logical block;
/// 4 KiB covers 512-byte and 4Kn devices.
const ALIGN: usize = 4096;

/// Without `O_DIRECT`, written data is handed to the kernel's writeback every this many
/// bytes, so that the fsync at the end finds little left to write instead of the whole file.
const WRITEBACK_STEP: u64 = 16 << 20;

/// What followers see when the writer fails.
pub const ABANDONED: &str =
    "the file being uploaded failed verification while it was written; the upload was abandoned";

/// A `BLOCK`-sized buffer aligned for `O_DIRECT` (a plain `Vec`, over-allocated by `ALIGN`).
struct Block {
    buf: Vec<u8>,
    start: usize,
}

impl Block {
    fn new() -> Block {
        let buf = vec![0u8; BLOCK + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        Block { buf, start }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.start + BLOCK]
    }

    fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + BLOCK]
    }
}

type Pool = Arc<Mutex<Vec<Block>>>;

fn take_block(pool: &Pool) -> Block {
    pool.lock().ok().and_then(|mut p| p.pop()).unwrap_or_else(Block::new)
}

/// The first `len` bytes of a block, shared as [`Bytes`]; the block goes back to the pool
/// when the last clone is dropped.
struct Filled {
    /// Taken back by `drop`.
    block: Option<Block>,
    len: usize,
    pool: Weak<Mutex<Vec<Block>>>,
}

impl AsRef<[u8]> for Filled {
    fn as_ref(&self) -> &[u8] {
        self.block.as_ref().map_or(&[][..], |b| &b.data()[..self.len])
    }
}

impl Drop for Filled {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade()
            && let Ok(mut p) = pool.lock()
            && p.len() < POOL_BLOCKS
            && let Some(block) = self.block.take()
        {
            p.push(block);
        }
    }
}

fn shared(block: Block, len: usize, pool: &Pool) -> Bytes {
    Bytes::from_owner(Filled {
        block: Some(block),
        len,
        pool: Arc::downgrade(pool),
    })
}

/// Opens `path` for `O_DIRECT` access, or says why not (tmpfs and some overlays refuse it).
fn open_direct(options: &mut OpenOptions, path: &Path) -> io::Result<File> {
    options.custom_flags(libc::O_DIRECT).open(path)
}

/// What the writer and its followers share.
struct Shared {
    /// The newest written blocks: (offset, bytes).
    window: Mutex<VecDeque<(u64, Bytes)>>,
    pool: Pool,
    /// Reads back what fell out of the window; `O_DIRECT` when the file was opened so.
    direct_reader: Option<File>,
    reader: File,
}

impl Shared {
    /// The window's block holding byte `offset`, if still there.
    fn windowed(&self, offset: u64) -> Option<(u64, Bytes)> {
        let w = self.window.lock().ok()?;
        w.iter()
            .find(|(at, b)| *at <= offset && offset < at + b.len() as u64)
            .cloned()
    }

    /// The block holding byte `offset` read back from the file, up to `end` (the bytes known
    /// to be written). Blocking.
    fn read_back(&self, offset: u64, end: u64) -> io::Result<(u64, Bytes)> {
        let at = offset - offset % BLOCK as u64;
        let want = (end - at).min(BLOCK as u64) as usize;
        let mut block = take_block(&self.pool);
        let direct = self
            .direct_reader
            .as_ref()
            .map(|f| read_full_at(f, block.data_mut(), at))
            .filter(|r| !matches!(r, Err(e) if e.raw_os_error() == Some(libc::EINVAL)));
        let got = match direct {
            Some(r) => r?,
            None => read_full_at(&self.reader, &mut block.data_mut()[..want], at)?,
        };
        if got < want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the staged file ended at {} bytes, before {end}", at + got as u64),
            ));
        }
        Ok((at, shared(block, want, &self.pool)))
    }
}

/// Reads into `buf` from `at` until it is full or the file ends; the bytes read.
fn read_full_at(f: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The writer side of a growing file (a new 0600 file).
pub struct Publisher {
    file: File,
    /// Whether `file` is written with `O_DIRECT` (else through the page cache).
    direct: bool,
    current: Block,
    fill: usize,
    /// Bytes in whole blocks written to the file (what followers may read).
    on_disk: u64,
    /// Bytes handed to the kernel's writeback so far (buffered mode, see [`WRITEBACK_STEP`]).
    flushed: u64,
    hash: Option<Sha256>,
    tx: watch::Sender<Growth>,
    shared: Arc<Shared>,
    done: bool,
}

impl Publisher {
    /// Creates `path`; with `hash`, the SHA-256 of what is written is computed on the way.
    pub fn create(path: &Path, hash: bool) -> Result<Publisher> {
        Publisher::create_as(path, hash, true)
    }

    /// [`Publisher::create`], trying `O_DIRECT` only if `direct` (tests take the page-cache
    /// path this way: tmpfs accepts `O_DIRECT` on recent kernels).
    fn create_as(path: &Path, hash: bool, direct: bool) -> Result<Publisher> {
        let opened = if direct {
            open_direct(OpenOptions::new().write(true).create_new(true).mode(0o600), path)
        } else {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        };
        let (file, direct) = match opened {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (fsutil::create_private_file(path)?, false),
            Err(e) => return Err(e).with_context(|| format!("cannot create '{}'", path.display())),
        };
        let reader = File::open(path).with_context(|| format!("cannot open '{}'", path.display()))?;
        let direct_reader = direct
            .then(|| open_direct(OpenOptions::new().read(true), path).ok())
            .flatten();
        let (tx, _) = watch::channel(Growth::Writing(0));
        Ok(Publisher {
            file,
            direct,
            current: Block::new(),
            fill: 0,
            on_disk: 0,
            flushed: 0,
            hash: hash.then(Sha256::new),
            tx,
            shared: Arc::new(Shared {
                window: Mutex::new(VecDeque::with_capacity(WINDOW_BLOCKS + 1)),
                pool: Arc::new(Mutex::new(Vec::new())),
                direct_reader,
                reader,
            }),
            done: false,
        })
    }

    /// Whether the file is written with `O_DIRECT` (for the log).
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// A reader of this file; it keeps its own descriptor, so a rename does not disturb it.
    pub fn follower(&self) -> Follower {
        Follower {
            shared: self.shared.clone(),
            rx: self.tx.subscribe(),
            expected: None,
            progress: crate::progress::Phase::default(),
        }
    }

    /// Writes the current block (`len` of its bytes; the last one may be short) at
    /// `on_disk`, then hands it to the window and publishes it.
    fn write_block(&mut self, len: usize) -> io::Result<()> {
        let padded = if self.direct { len.next_multiple_of(ALIGN) } else { len };
        if padded > len {
            // The tail: O_DIRECT writes whole aligned blocks; the file is cut to size after.
            self.current.data_mut()[len..padded].fill(0);
        }
        match self.file.write_all_at(&self.current.data()[..padded], self.on_disk) {
            // A device with larger sectors than ALIGN refuses: go on through the page cache.
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                self.buffered()?;
                self.file.write_all_at(&self.current.data()[..len], self.on_disk)?;
            }
            r => r?,
        }
        if padded > len && self.direct {
            self.file.set_len(self.on_disk + len as u64)?;
        }
        let block = std::mem::replace(&mut self.current, take_block(&self.shared.pool));
        let bytes = shared(block, len, &self.shared.pool);
        if let Ok(mut w) = self.shared.window.lock() {
            w.push_back((self.on_disk, bytes));
            while w.len() > WINDOW_BLOCKS {
                w.pop_front();
            }
        }
        self.on_disk += len as u64;
        self.fill = 0;
        if !self.direct && self.on_disk - self.flushed >= WRITEBACK_STEP {
            fsutil::start_writeback(&self.file, self.flushed, self.on_disk - self.flushed);
            self.flushed = self.on_disk;
        }
        Ok(())
    }

    /// Turns `O_DIRECT` off for the rest of the file.
    fn buffered(&mut self) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        // SAFETY: plain fcntl calls on a descriptor this Publisher owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.direct = false;
        Ok(())
    }

    /// Tells followers the file is complete, then fsyncs it. Returns its size and, if
    /// asked for at creation, its SHA-256.
    /// Followers may finish while the fsync runs: what they send is not stored anywhere
    /// until this returns and the caller moves the set on.
    pub fn complete(&mut self) -> io::Result<(u64, Option<String>)> {
        if self.fill > 0 {
            self.write_block(self.fill)?;
        }
        self.done = true;
        self.tx.send_replace(Growth::Done(self.on_disk));
        self.file.sync_all()?;
        Ok((self.on_disk, self.hash.take().map(|h| hex::encode(h.finalize()))))
    }
}

impl Write for Publisher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(BLOCK - self.fill);
        self.current.data_mut()[self.fill..self.fill + n].copy_from_slice(&buf[..n]);
        if let Some(h) = &mut self.hash {
            h.update(&buf[..n]);
        }
        self.fill += n;
        if self.fill == BLOCK {
            self.write_block(BLOCK)?;
            self.tx.send_replace(Growth::Writing(self.on_disk));
        }
        Ok(n)
    }

    /// Blocks are written whole; a partial one waits for more bytes or [`Publisher::complete`].
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
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
    shared: Arc<Shared>,
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
        // The block the next bytes come from: (its offset, its bytes).
        let held: Option<(u64, Bytes)> = None;
        let state = (self.shared.clone(), self.rx.clone(), from, held);
        futures_util::stream::try_unfold(state, move |(shared, mut rx, offset, held)| {
            let progress = progress.clone();
            async move {
                loop {
                    let growth = *rx.borrow_and_update();
                    let end = match growth {
                        Growth::Failed => return Err(io::Error::other(ABANDONED)),
                        Growth::Writing(n) | Growth::Done(n) => n.min(limit),
                    };
                    if offset < end {
                        let from_held = held
                            .as_ref()
                            .filter(|(at, b)| *at <= offset && offset < at + b.len() as u64)
                            .cloned();
                        let (at, block) = match from_held {
                            Some(h) => h,
                            None => match shared.windowed(offset) {
                                Some(w) => w,
                                None => {
                                    let s = shared.clone();
                                    tokio::task::spawn_blocking(move || s.read_back(offset, end))
                                        .await
                                        .map_err(io::Error::other)??
                                }
                            },
                        };
                        let start = (offset - at) as usize;
                        let n = (block.len() - start).min(chunk).min((end - offset) as usize);
                        let out = block.slice(start..start + n);
                        progress.set(offset + n as u64);
                        return Ok(Some((out, (shared, rx, offset + n as u64, Some((at, block))))));
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
        // Bytes are published a whole block at a time; a block and a bit is written.
        let first = pattern(BLOCK + 11);
        p.write_all(&first).unwrap();
        // The follower sees the written block while the writer is still open.
        let mut s = std::pin::pin!(f.stream(1 << 20));
        let early = s.next().await.unwrap().unwrap();
        assert!(early[..] == first[..BLOCK]);
        // A rename does not disturb it (the staged file is renamed into place).
        std::fs::rename(&path, dir.path().join("f")).unwrap();
        let reader = tokio::spawn({
            let f = f.clone();
            async move { collect_in(&f, 65_537).await }
        });
        p.write_all(b" second part").unwrap();
        let (size, sha) = p.complete().unwrap();
        drop(p);
        let all = reader.await.unwrap().unwrap();
        let mut want = first.clone();
        want.extend_from_slice(b" second part");
        assert!(all == want);
        assert_eq!(size, all.len() as u64);
        assert_eq!(sha.unwrap(), hex::encode(Sha256::digest(&all)));
        assert_eq!(f.finished().await, Some(size));
        assert!(std::fs::read(dir.path().join("f")).unwrap() == want);
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
                let mut s = std::pin::pin!(f.range(from, len, 3000));
                while let Some(chunk) = s.next().await {
                    out.extend_from_slice(&chunk?);
                }
                io::Result::Ok(out)
            })
        };
        let data = pattern(2 * BLOCK + 100);
        let b = BLOCK as u64;
        p.write_all(&data[..BLOCK]).unwrap();
        let (middle, tail, past) = (read(b - 2, 5), read(2 * b + 6, 1000), read(3 * b, 10));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!middle.is_finished(), "a range waits for bytes not written yet");
        p.write_all(&data[BLOCK..2 * BLOCK + 100]).unwrap();
        assert!(
            middle.await.unwrap().unwrap() == data[BLOCK - 2..BLOCK + 3],
            "ends at its length"
        );
        p.complete().unwrap();
        assert!(
            tail.await.unwrap().unwrap() == data[2 * BLOCK + 6..],
            "ends at the file's end"
        );
        assert_eq!(past.await.unwrap().unwrap(), b"", "past the end: nothing");
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect()
    }

    async fn collect_in(f: &Follower, chunk: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut s = std::pin::pin!(f.stream(chunk));
        while let Some(c) = s.next().await {
            let c = c?;
            assert!(c.len() <= chunk && !c.is_empty());
            out.extend_from_slice(&c);
        }
        Ok(out)
    }

    /// Both ways of writing: `O_DIRECT` (where the filesystem allows it) and the page cache.
    fn modes() -> Vec<(tempfile::TempDir, bool)> {
        vec![
            (tempfile::tempdir().unwrap(), true),
            (tempfile::tempdir().unwrap(), false),
        ]
    }

    #[tokio::test]
    async fn a_follower_behind_the_window_reads_the_file_back_and_the_file_is_exact() {
        // Two windows' worth and an unaligned tail, all written before anyone reads: the
        // start has left the window and must come from the file.
        let data = pattern(2 * WINDOW_BLOCKS * BLOCK + 12_345);
        for (dir, direct) in modes() {
            let path = dir.path().join("f.part");
            let mut p = Publisher::create_as(&path, true, direct).unwrap();
            assert!(direct || !p.direct());
            let f = p.follower();
            for piece in data.chunks(100_003) {
                p.write_all(piece).unwrap();
            }
            let (size, sha) = p.complete().unwrap();
            let shown = format!("{} (O_DIRECT: {})", dir.path().display(), p.direct());
            assert_eq!(size, data.len() as u64, "{shown}");
            assert_eq!(sha.unwrap(), hex::encode(Sha256::digest(&data)), "{shown}");
            assert!(
                collect_in(&f, 300_000).await.unwrap() == data,
                "{shown}: what a follower read"
            );
            assert!(std::fs::read(&path).unwrap() == data, "{shown}: the file on disk");
            // A range across a block boundary, from the file's start region and the window.
            for (from, len) in [(BLOCK as u64 - 10, 20), (size - 5000, 10_000), (3, BLOCK as u64 * 3)] {
                let mut got = Vec::new();
                let mut s = std::pin::pin!(f.range(from, len, 4096));
                while let Some(c) = s.next().await {
                    got.extend_from_slice(&c.unwrap());
                }
                let end = (from + len).min(size) as usize;
                assert!(got == data[from as usize..end], "{shown}: range {from}+{len}");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_follower_gets_every_byte_while_the_writer_runs_ahead() {
        let data = Arc::new(pattern(3 * WINDOW_BLOCKS * BLOCK + 777));
        for (dir, direct) in modes() {
            let mut p = Publisher::create_as(&dir.path().join("f"), false, direct).unwrap();
            let f = p.follower();
            let reader = tokio::spawn({
                let f = f.clone();
                async move {
                    let mut out = Vec::new();
                    let mut s = std::pin::pin!(f.stream(256 * 1024));
                    while let Some(c) = s.next().await {
                        out.extend_from_slice(&c?);
                        // Slower than the writer: it falls out of the window.
                        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    }
                    io::Result::Ok(out)
                }
            });
            let d = data.clone();
            let writer = std::thread::spawn(move || {
                for piece in d.chunks(32 * 1024) {
                    p.write_all(piece).unwrap();
                }
                p.complete().unwrap()
            });
            let (size, _) = tokio::task::spawn_blocking(move || writer.join().unwrap())
                .await
                .unwrap();
            assert_eq!(size, data.len() as u64);
            assert!(reader.await.unwrap().unwrap() == *data, "O_DIRECT asked: {direct}");
        }
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
