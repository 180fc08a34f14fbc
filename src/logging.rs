//! Where log lines go: the journal, natively, when systemd connected stderr to it; stderr
//! otherwise. One rendering for both: the message followed by its fields as `key=value`, so
//! a journal entry reads alone in `journalctl -u etcd-backupd` (which run, which set, which
//! target, what went wrong), exactly as the same line reads on a terminal. Under journald
//! every field is also sent on its own (`BACKUP_ID=`, `TARGET_NAME=`, `MESSAGE_ID=`...) for
//! `journalctl FIELD=value` and alerts' runbooks.
//!
//! Written here rather than with `tracing-journald`: that layer sends only the bare message
//! as `MESSAGE=` (every detail lands in fields `journalctl` does not show) and maps INFO to
//! priority 5 (notice). The native protocol is small: `KEY=value` lines, or `KEY\n`, a
//! little-endian u64 length and the bytes for a value with a newline, in one datagram to
//! `/run/systemd/journal/socket` (systemd.journal-fields(7), "Native Journal Protocol").

use std::fmt::Write as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;

/// journald's socket for the native protocol.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// systemd sets `JOURNAL_STREAM=<dev>:<inode>` of the stream it connected; it is ours only if
/// stderr is still that stream (a child of a journald-logged shell inherits the variable).
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr()) {
        Ok(st) => dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino),
        Err(_) => false,
    }
}

/// Sets up the global subscriber: `-v` for debug, `-vv` for trace, `ETCD_BACKUPD_LOG` for an
/// `EnvFilter` of one's own.
pub fn init(verbose: u8) {
    use tracing_subscriber::prelude::*;
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    // rustls logs every failed handshake itself; our error line already says it, once.
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("ETCD_BACKUPD_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},rustls=off")))
    };
    if stderr_is_journal()
        && let Ok(journal) = JournalLayer::connect(Path::new(JOURNAL_SOCKET))
    {
        tracing_subscriber::registry().with(filter()).with(journal).init();
        return;
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(|| crate::progress::LogWriter)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}

/// A `tracing` layer writing each event to journald as one entry.
pub struct JournalLayer {
    socket: UnixDatagram,
    path: PathBuf,
}

impl JournalLayer {
    /// Connects to the journal's socket at `path` (an error when there is none).
    pub fn connect(path: &Path) -> std::io::Result<JournalLayer> {
        let socket = UnixDatagram::unbound()?;
        socket.connect(path)?;
        Ok(JournalLayer {
            socket,
            path: path.to_path_buf(),
        })
    }
}

/// The syslog priority of a level: info is 6 (informational), not 5 (notice).
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// An event's message and fields, in the order written.
#[derive(Default)]
pub struct Fields {
    pub message: String,
    pub fields: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.fields.push((field.name().to_string(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields.push((field.name().to_string(), format!("{value:?}")));
        }
    }
}

impl Fields {
    /// The text an admin reads: the message, then every field but `message_id` as
    /// `key=value` (quoted when it holds a space), as the stderr lines show them.
    pub fn text(&self) -> String {
        let mut out = self.message.clone();
        for (k, v) in self.fields.iter().filter(|(k, _)| k != "message_id") {
            let v = v.replace(['\n', '\r'], " ");
            if v.is_empty() || v.contains([' ', '"', '=']) {
                let _ = write!(out, " {k}={v:?}");
            } else {
                let _ = write!(out, " {k}={v}");
            }
        }
        out
    }
}

/// A field name journald accepts: upper case, `A-Z0-9_`, not starting with `_` or a digit.
pub fn journal_key(name: &str) -> String {
    let key: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    if key.starts_with(|c: char| c == '_' || c.is_ascii_digit()) || key.is_empty() {
        format!("F{key}")
    } else {
        key
    }
}

/// Appends one field in the native protocol's form.
fn put(buf: &mut Vec<u8>, key: &str, value: &str) {
    buf.extend_from_slice(key.as_bytes());
    if value.contains('\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value.as_bytes());
    buf.push(b'\n');
}

/// One journal entry for an event: `MESSAGE` (the text an admin reads), `PRIORITY`,
/// `SYSLOG_IDENTIFIER`, `TRACING_TARGET`, the code location, and each field under its own name.
pub fn entry(level: &Level, target: &str, file: Option<&str>, line: Option<u32>, f: &Fields) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256);
    put(&mut buf, "MESSAGE", &f.text());
    put(&mut buf, "PRIORITY", &priority(level).to_string());
    put(&mut buf, "SYSLOG_IDENTIFIER", "etcd-backupd");
    // The Rust module that logged it (`TARGET_NAME` is a backup target's name).
    put(&mut buf, "TRACING_TARGET", target);
    if let Some(file) = file {
        put(&mut buf, "CODE_FILE", file);
    }
    if let Some(line) = line {
        put(&mut buf, "CODE_LINE", &line.to_string());
    }
    for (k, v) in &f.fields {
        let key = journal_key(k);
        // Our own fields never overwrite the ones above.
        if !matches!(
            key.as_str(),
            "MESSAGE" | "PRIORITY" | "SYSLOG_IDENTIFIER" | "TRACING_TARGET" | "CODE_FILE" | "CODE_LINE"
        ) {
            put(&mut buf, &key, v);
        }
    }
    buf
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for JournalLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut f = Fields::default();
        event.record(&mut f);
        let buf = entry(meta.level(), meta.target(), meta.file(), meta.line(), &f);
        if self.socket.send(&buf).is_err() {
            // Too large for one datagram (or journald restarting): the text alone, cut to a
            // size a datagram takes, rather than nothing.
            // MESSAGE_ID stays: it is what an alert's runbook looks the entry up by.
            let short = Fields {
                message: f.text().chars().take(32 * 1024).collect(),
                fields: f.fields.iter().filter(|(k, _)| k == "message_id").cloned().collect(),
            };
            let buf = entry(meta.level(), meta.target(), meta.file(), meta.line(), &short);
            if self.socket.send(&buf).is_err() {
                let _ = self.socket.connect(&self.path);
                let _ = self.socket.send(&buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes datagrams of the native protocol into (key, value) pairs.
    fn decode(mut b: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let nl = b.iter().position(|&c| c == b'\n').unwrap();
            let line = &b[..nl];
            if let Some(eq) = line.iter().position(|&c| c == b'=') {
                out.push((
                    String::from_utf8(line[..eq].to_vec()).unwrap(),
                    String::from_utf8(line[eq + 1..].to_vec()).unwrap(),
                ));
                b = &b[nl + 1..];
            } else {
                let key = String::from_utf8(line.to_vec()).unwrap();
                let len = u64::from_le_bytes(b[nl + 1..nl + 9].try_into().unwrap()) as usize;
                let v = String::from_utf8(b[nl + 9..nl + 9 + len].to_vec()).unwrap();
                out.push((key, v));
                b = &b[nl + 9 + len + 1..];
            }
        }
        out
    }

    #[test]
    fn an_entry_reads_alone_and_keeps_its_fields() {
        let f = Fields {
            message: "cannot store the backup set; it stays pending in staging".into(),
            fields: vec![
                ("message_id".into(), "9c1d3e5f7a9b4c2d8e0f1a3b5c7d9e1f".into()),
                ("run".into(), "2026-12-07T0230".into()),
                ("backup_id".into(), "2026-12-07_023012".into()),
                ("target_name".into(), "dav".into()),
                ("error".into(), "connection refused\nat 127.0.0.1".into()),
            ],
        };
        let e = decode(&entry(
            &Level::ERROR,
            "etcd_backupd::delivery",
            Some("src/x.rs"),
            Some(7),
            &f,
        ));
        let get = |k: &str| e.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.as_str());
        assert_eq!(
            get("MESSAGE"),
            Some(
                "cannot store the backup set; it stays pending in staging run=2026-12-07T0230 backup_id=2026-12-07_023012 target_name=dav error=\"connection refused at 127.0.0.1\""
            )
        );
        assert_eq!(get("PRIORITY"), Some("3"));
        assert_eq!(get("MESSAGE_ID"), Some("9c1d3e5f7a9b4c2d8e0f1a3b5c7d9e1f"));
        assert_eq!(get("TARGET_NAME"), Some("dav"));
        // A value with a newline travels in the length-prefixed form, whole.
        assert_eq!(get("ERROR"), Some("connection refused\nat 127.0.0.1"));
        assert_eq!(get("SYSLOG_IDENTIFIER"), Some("etcd-backupd"));
    }

    #[test]
    fn priorities_and_keys() {
        assert_eq!(priority(&Level::INFO), 6, "info is informational, not notice");
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(journal_key("backup_id"), "BACKUP_ID");
        assert_eq!(journal_key("target.name"), "TARGET_NAME");
        assert_eq!(journal_key("_hidden"), "F_HIDDEN");
        assert_eq!(journal_key("2x"), "F2X");
    }

    #[test]
    fn the_layer_sends_one_datagram_per_event() {
        use tracing_subscriber::prelude::*;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let server = UnixDatagram::bind(&path).unwrap();
        let layer = JournalLayer::connect(&path).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(backup_id = "2026-12-07_023012", bytes = 42u64, "backup succeeded");
        });
        let mut buf = vec![0u8; 65536];
        let n = server.recv(&mut buf).unwrap();
        let e = decode(&buf[..n]);
        let get = |k: &str| e.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.as_str());
        assert_eq!(
            get("MESSAGE"),
            Some("backup succeeded backup_id=2026-12-07_023012 bytes=42")
        );
        assert_eq!(get("PRIORITY"), Some("6"));
        assert_eq!(get("BYTES"), Some("42"));
    }
}
