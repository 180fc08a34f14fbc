//! Small filesystem helpers for the one rule every stored file follows: private (0600 files,
//! 0700 directories), written under a temporary name, fsynced, then renamed into place.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// Creates `path` and missing parents with mode 0700; an existing directory is made 0700.
pub fn create_private_dir(path: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| format!("cannot create directory '{}'", path.display()))?;
    let meta = std::fs::metadata(path).with_context(|| format!("cannot stat '{}'", path.display()))?;
    if meta.permissions().mode() & 0o777 != 0o700 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot chmod 0700 '{}'", path.display()))?;
    }
    Ok(())
}

/// Creates a new file with mode 0600; fails if it exists.
pub fn create_private_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create '{}'", path.display()))
}

/// Makes a rename or a new directory entry durable.
pub fn fsync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory '{}'", path.display()))
}

/// Renames `from` to `to`, failing with `AlreadyExists` instead of replacing anything: a plain
/// rename(2) would silently replace an empty directory.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    match nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        from,
        nix::fcntl::AT_FDCWD,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    ) {
        Ok(()) => Ok(()),
        // NFS, 9p and many FUSE filesystems take no rename flags: check, then rename(2),
        // which still refuses to replace a non-empty directory.
        Err(nix::errno::Errno::EINVAL) => {
            if std::fs::symlink_metadata(to).is_ok() {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, "destination exists"));
            }
            std::fs::rename(from, to).map_err(|e| {
                let clash = [nix::errno::Errno::ENOTEMPTY as i32, nix::errno::Errno::EEXIST as i32];
                if e.raw_os_error().is_some_and(|code| clash.contains(&code)) {
                    io::Error::new(io::ErrorKind::AlreadyExists, "destination exists")
                } else {
                    e
                }
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes `bytes` to a new private file and fsyncs it.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = create_private_file(path)?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write '{}'", path.display()))
}

/// Removes a directory tree, ignoring a missing one; for cleaning up after a failure.
pub fn remove_dir_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove temporary directory");
    }
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// The inner writer, the byte count and the hex SHA-256.
    pub fn finish(self) -> (W, u64, String) {
        (self.inner, self.bytes, hex::encode(self.hasher.finalize()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot open lock file '{}'", path.display()))
}

/// An exclusive lock on a file, held until dropped; waits while another process holds it.
pub fn lock(path: &Path) -> Result<nix::fcntl::Flock<File>> {
    nix::fcntl::Flock::lock(lock_file(path)?, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("cannot lock '{}': {e}", path.display()))
}

/// An exclusive lock on a file, held until dropped; `None` when another process holds it.
pub fn try_lock(path: &Path) -> Result<Option<nix::fcntl::Flock<File>>> {
    match nix::fcntl::Flock::lock(lock_file(path)?, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(anyhow::anyhow!("cannot lock '{}': {e}", path.display())),
    }
}

/// Starts writing `len` bytes of `file` from `offset` back to disk without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): a large file's final fsync then waits only
/// for its tail. Best effort; an error only means the fsync does it all.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a descriptor this function borrows; no memory is passed.
    let _ = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// Free bytes for an unprivileged writer on the filesystem holding `path`.
pub fn free_space(path: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).with_context(|| format!("cannot statvfs '{}'", path.display()))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Copies `from` to a new private file `to`, returning size and SHA-256 of what was written.
/// With `rate`, the copy is paced to that many bytes per second.
pub fn copy_private(from: &Path, to: &Path, rate: Option<u64>) -> Result<(u64, String)> {
    let mut src = File::open(from).with_context(|| format!("cannot open '{}'", from.display()))?;
    let dst = create_private_file(to)?;
    let mut w = HashingWriter::new(dst);
    let copied = match rate {
        None => io::copy(&mut src, &mut w).map(|_| ()),
        Some(rate) => {
            let mut pace = Pace::new(rate);
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = match io::Read::read(&mut src, &mut buf) {
                    Ok(0) => break Ok(()),
                    Ok(n) => n,
                    Err(e) => break Err(e),
                };
                std::thread::sleep(pace.delay_for(n));
                if let Err(e) = w.write_all(&buf[..n]) {
                    break Err(e);
                }
            }
        }
    };
    copied.with_context(|| format!("cannot copy '{}' to '{}'", from.display(), to.display()))?;
    let (dst, size, sha) = w.finish();
    dst.sync_all()
        .with_context(|| format!("cannot fsync '{}'", to.display()))?;
    Ok((size, sha))
}

/// Waits out a [`Pace`] delay. A zero delay returns at once: tokio's zero sleep still waits
/// for the timer's next tick (about 1 ms), which capped paced uploads near 250 MiB/s.
pub async fn pause(wait: std::time::Duration) {
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
}

/// Paces writes to at most `bytes_per_sec`, measured from the first byte.
#[derive(Debug, Clone)]
pub struct Pace {
    rate: u64,
    started: Option<Instant>,
    sent: u64,
}

impl Pace {
    pub fn new(bytes_per_sec: u64) -> Pace {
        Pace {
            rate: bytes_per_sec.max(1),
            started: None,
            sent: 0,
        }
    }

    /// The cap, bytes/s.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Records `n` more bytes and returns how long to wait before sending them.
    pub fn delay_for(&mut self, n: usize) -> Duration {
        let started = *self.started.get_or_insert_with(Instant::now);
        self.sent += n as u64;
        let due = Duration::from_secs_f64(self.sent as f64 / self.rate as f64);
        due.saturating_sub(started.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rename_noreplace_refuses_an_existing_empty_dir() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        let e = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(a.exists());
        std::fs::remove_dir(&b).unwrap();
        rename_noreplace(&a, &b).unwrap();
        assert!(b.exists() && !a.exists());
    }

    #[test]
    fn private_files_and_dirs() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("x/y");
        create_private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let f = dir.join("f");
        write_private_file(&f, b"abc").unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(write_private_file(&f, b"again").is_err(), "never overwrites");
        let (n, sha) = copy_private(&f, &dir.join("g"), None).unwrap();
        assert_eq!(n, 3);
        assert_eq!(sha, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
