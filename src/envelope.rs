//! Compression and encryption of stored files: `snapshot_<ts>.db` becomes
//! `snapshot_<ts>.db.zst` (zstd), `.age` (age, to the configured public keys), or
//! `.zst.age` (compressed, then encrypted). The snapshot is sealed as it streams (see
//! [`crate::source::snapshot`]), other files in staging; a node keeps only public keys and a target
//! sees only ciphertext;
//! opening is streamed (`fetch`, `verify`), with the identity given on the command line.
//! Both tools' formats are standard: `age -d` and `zstd -d` open what is stored.

use std::io::{BufRead, Read, Write};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};

use crate::fsutil::{self, HashingWriter};
use crate::manifest::{Compression, Encryption};

/// How stored files are sealed.
#[derive(Debug, Clone, Default)]
pub struct Seal {
    /// zstd level; `None` = no compression.
    pub zstd_level: Option<i32>,
    /// age recipients (`age1...`, `ssh-ed25519 ...`, `ssh-rsa ...`); empty = no encryption.
    pub recipients: Vec<String>,
}

impl Seal {
    pub fn is_plain(&self) -> bool {
        self.zstd_level.is_none() && self.recipients.is_empty()
    }

    /// The manifest's `compression` value.
    pub fn compression(&self) -> Compression {
        if self.zstd_level.is_some() {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The manifest's `encryption` value.
    pub fn encryption(&self) -> Encryption {
        if self.recipients.is_empty() {
            Encryption::None
        } else {
            Encryption::Age
        }
    }

    /// `.zst`, `.age` or `.zst.age`.
    pub fn suffix(&self) -> String {
        let mut s = String::new();
        if self.zstd_level.is_some() {
            s.push_str(".zst");
        }
        if !self.recipients.is_empty() {
            s.push_str(".age");
        }
        s
    }
}

/// Parses one recipient, as the `age` tool accepts them.
pub fn parse_recipient(s: &str) -> Result<Box<dyn age::Recipient + Send>, String> {
    let s = s.trim();
    if s.starts_with("age1") {
        return s
            .parse::<age::x25519::Recipient>()
            .map(|r| Box::new(r) as _)
            .map_err(|e| format!("{s:?} is not an age recipient ({e})"));
    }
    if s.starts_with("ssh-") {
        return s.parse::<age::ssh::Recipient>().map(|r| Box::new(r) as _).map_err(|_| {
            format!(
                "{:?} is not a supported SSH public key (ssh-ed25519 or ssh-rsa)",
                s.chars().take(40).collect::<String>()
            )
        });
    }
    Err(format!(
        "{:?} is neither an age recipient (age1...) nor an SSH public key",
        s.chars().take(40).collect::<String>()
    ))
}

/// Recipients from a file: one per line, `#` comments and blank lines ignored.
pub fn read_recipients_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read '{}'", path.display()))?;
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    for l in &lines {
        parse_recipient(l).map_err(|e| anyhow!("'{}': {e}", path.display()))?;
    }
    if lines.is_empty() {
        bail!("'{}' names no recipient", path.display());
    }
    Ok(lines)
}

/// A writer that seals what goes through it: zstd, then age, as configured.
pub enum Sealer<W: Write> {
    Plain(W),
    Zstd(zstd::Encoder<'static, W>),
    Age(age::stream::StreamWriter<W>),
    ZstdAge(zstd::Encoder<'static, age::stream::StreamWriter<W>>),
}

impl<W: Write> Sealer<W> {
    pub fn new(out: W, seal: &Seal) -> Result<Self> {
        let encryptor = if seal.recipients.is_empty() {
            None
        } else {
            let parsed: Vec<Box<dyn age::Recipient + Send>> = seal
                .recipients
                .iter()
                .map(|r| parse_recipient(r).map_err(|e| anyhow!("encryption: {e}")))
                .collect::<Result<_>>()?;
            Some(
                age::Encryptor::with_recipients(parsed.iter().map(|r| r.as_ref() as &dyn age::Recipient))
                    .map_err(|e| anyhow!("encryption: {e}"))?,
            )
        };
        Ok(match (seal.zstd_level, encryptor) {
            (None, None) => Sealer::Plain(out),
            (Some(level), None) => Sealer::Zstd(zstd_encoder(out, level)?),
            (None, Some(e)) => Sealer::Age(e.wrap_output(out)?),
            (Some(level), Some(e)) => Sealer::ZstdAge(zstd_encoder(e.wrap_output(out)?, level)?),
        })
    }

    /// Writes the final frames and returns the inner writer.
    pub fn finish(self) -> std::io::Result<W> {
        match self {
            Sealer::Plain(w) => Ok(w),
            Sealer::Zstd(z) => z.finish(),
            Sealer::Age(a) => a.finish(),
            Sealer::ZstdAge(z) => z.finish()?.finish(),
        }
    }
}

impl<W: Write> Write for Sealer<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sealer::Plain(w) => w.write(buf),
            Sealer::Zstd(z) => z.write(buf),
            Sealer::Age(a) => a.write(buf),
            Sealer::ZstdAge(z) => z.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sealer::Plain(w) => w.flush(),
            Sealer::Zstd(z) => z.flush(),
            Sealer::Age(a) => a.flush(),
            Sealer::ZstdAge(z) => z.flush(),
        }
    }
}

/// Writes `src` sealed to `dst` (0600). Returns the stored size and SHA-256.
pub fn seal_file(src: &Path, dst: &Path, seal: &Seal) -> Result<(u64, String)> {
    if seal.is_plain() {
        bail!("nothing to seal");
    }
    let mut input = std::io::BufReader::with_capacity(
        1 << 20,
        std::fs::File::open(src).with_context(|| format!("cannot open '{}'", src.display()))?,
    );
    let out = HashingWriter::new(std::io::BufWriter::with_capacity(
        1 << 20,
        fsutil::create_private_file(dst)?,
    ));
    let mut sealer = Sealer::new(out, seal)?;
    std::io::copy(&mut input, &mut sealer)?;
    let (buffered, size, sha) = sealer.finish()?.finish();
    let file = buffered.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok((size, sha))
}

fn zstd_encoder<W: Write>(w: W, level: i32) -> Result<zstd::Encoder<'static, W>> {
    let mut z = zstd::Encoder::new(w, level)?;
    // Multi-threaded when there is more than one core; the output is the same format.
    let threads = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    if threads > 1 {
        z.multithread(threads)?;
        // zstd's default job (4 windows, 8 MiB at level 3) buffers several jobs per worker:
        // about 60 MiB. 2 MiB jobs keep the whole process under 64 MiB at a ratio within
        // a percent (see docs/performance.md).
        z.set_parameter(zstd::zstd_safe::CParameter::JobSize(2 << 20))?;
    }
    Ok(z)
}

/// Opens a stored stream: decrypts (with the identities in `identities`, each the text of
/// an age identity file or an SSH private key, when the file is encrypted) and decompresses.
/// Returns the original bytes.
pub fn open_reader<'a>(
    stored: Box<dyn Read + Send + 'a>,
    compression: &Compression,
    encryption: &Encryption,
    identities: &[String],
) -> Result<Box<dyn Read + Send + 'a>> {
    let decrypted: Box<dyn Read + Send + 'a> = match encryption {
        Encryption::None => stored,
        Encryption::Age => {
            if identities.is_empty() {
                bail!(crate::error::Stop::Usage(
                    "the set is encrypted with age: give --identity FILE".into()
                ));
            }
            let mut keys: Vec<Box<dyn age::Identity>> = Vec::new();
            for text in identities {
                keys.extend(parse_identities(text)?);
            }
            let reader: Box<dyn BufRead + Send + 'a> = Box::new(std::io::BufReader::new(stored));
            let d = age::Decryptor::new_buffered(reader).map_err(|e| anyhow!("not an age file: {e}"))?;
            let r = d
                .decrypt(keys.iter().map(|i| i.as_ref() as &dyn age::Identity))
                .map_err(|e| anyhow!("cannot decrypt ({e}): wrong --identity?"))?;
            Box::new(r)
        }
        Encryption::Unknown(word) => {
            bail!("the file's encryption {word:?} is one this release does not know; use a newer etcd-backupd")
        }
    };
    match compression {
        Compression::None => Ok(decrypted),
        Compression::Zstd => Ok(Box::new(zstd::Decoder::new(decrypted)?)),
        Compression::Unknown(word) => {
            bail!("the file's compression {word:?} is one this release does not know; use a newer etcd-backupd")
        }
    }
}

/// The identities in `text`: an SSH private key (ed25519 or RSA, as `age -i` takes), or an
/// age identity file (one or more `AGE-SECRET-KEY-1...` lines).
fn parse_identities(text: &str) -> Result<Vec<Box<dyn age::Identity>>> {
    Ok(if text.trim_start().starts_with("-----BEGIN") {
        // An SSH private key (ed25519 or RSA), as `age -i` accepts.
        match age::ssh::Identity::from_buffer(text.as_bytes(), None)
            .map_err(|e| anyhow!("--identity: not a usable SSH private key ({e})"))?
        {
            age::ssh::Identity::Unencrypted(k) => vec![Box::new(age::ssh::Identity::from(k))],
            age::ssh::Identity::Encrypted(_) => bail!(crate::error::Stop::Usage(
                "--identity: the SSH key has a passphrase; use an unencrypted copy or an age identity".into()
            )),
            age::ssh::Identity::Unsupported(_) => bail!("--identity: unsupported SSH key type"),
        }
    } else {
        age::IdentityFile::from_buffer(text.as_bytes())
            .map_err(|e| anyhow!("--identity: not an age identity file ({e})"))?
            .into_identities()
            .map_err(|e| anyhow!("--identity: {e}"))?
    })
}
