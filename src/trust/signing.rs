//! Signed sets. With `[signing]`, each node signs the `manifest.json` of every set it stores
//! with its own Ed25519 key, in OpenSSH's sshsig format (namespace `etcd-backupd`), as
//! `manifest.json.sig`, written before the manifest: every visible set is signed. The manifest
//! lists every file's SHA-256, so the signature covers the whole set. Admins check it with
//! OpenSSH itself:
//!
//! ```text
//! ssh-keygen -Y verify -f allowed_signers -I etcd-backupd -n etcd-backupd -s manifest.json.sig < manifest.json
//! ```
//!
//! Readers ([`crate::restore`]) judge a set's signature against an OpenSSH allowed_signers
//! file (`verify.allowed_signers`, principal `etcd-backupd`): see [`judge`].
//!
//! The key is the node's own: it is created on first use, never leaves the node and is never
//! rendered into a MachineConfig, which is stored in etcd and so inside every snapshot.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey, SshSig};

use crate::config::Settings;
use crate::error::Stop;
use crate::fsutil;
use crate::manifest::{MANIFEST, Manifest, SHA256SUMS, SIGNATURE};

/// The sshsig namespace of a set's signature (`ssh-keygen -n`).
pub const NAMESPACE: &str = "etcd-backupd";
/// The principal allowed_signers lists the nodes' keys under (`ssh-keygen -I`).
pub const PRINCIPAL: &str = "etcd-backupd";
/// The largest `manifest.json.sig` a reader takes from a target.
pub const SIGNATURE_CAP: u64 = 64 * 1024;

/// A node's signing key.
pub struct Signer {
    key: PrivateKey,
    path: PathBuf,
}

impl Signer {
    /// Reads the key at `path`: a private (0600), unencrypted OpenSSH Ed25519 key.
    pub fn load(path: &Path) -> Result<Signer> {
        let usage = |why: String| anyhow!(Stop::Usage(format!("signing.key_file: {why}")));
        crate::config::check_secret_file(path).map_err(usage)?;
        let text =
            std::fs::read_to_string(path).map_err(|e| usage(format!("cannot read '{}': {e}", path.display())))?;
        let key = PrivateKey::from_openssh(text.trim())
            .map_err(|e| usage(format!("'{}' is not an OpenSSH private key: {e}", path.display())))?;
        if key.is_encrypted() {
            return Err(usage(format!(
                "'{}' is protected by a passphrase, which an unattended node cannot enter",
                path.display()
            )));
        }
        if key.algorithm() != Algorithm::Ed25519 {
            return Err(usage(format!(
                "'{}' is a {} key; etcd-backupd signs with Ed25519 (ssh-keygen -t ed25519)",
                path.display(),
                key.algorithm()
            )));
        }
        Ok(Signer {
            key,
            path: path.to_path_buf(),
        })
    }

    /// Reads the key at `path`, first creating it (a new Ed25519 key, 0600, its comment
    /// `comment`) when there is none. Returns whether it was created.
    pub fn load_or_create(path: &Path, comment: &str) -> Result<(Signer, bool)> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => return Ok((Signer::load(path)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!(Stop::Usage(format!("signing.key_file: '{}': {e}", path.display()))),
        }
        let mut key = PrivateKey::random(&mut ssh_key::rand_core::OsRng, Algorithm::Ed25519)
            .map_err(|e| anyhow!("cannot generate a signing key: {e}"))?;
        key.set_comment(comment);
        let text = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| anyhow!("cannot encode the signing key: {e}"))?;
        let dir = path.parent().unwrap_or(Path::new("/"));
        if !dir.exists() {
            fsutil::create_private_dir(dir).context("signing.key_file")?;
        }
        // Written whole under a temporary name, then moved into place without replacing a
        // key another process created meanwhile (that one is used).
        let tmp = dir.join(format!(".signing-key.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        fsutil::write_private_file(&tmp, text.as_bytes()).context("signing.key_file")?;
        let placed = fsutil::rename_noreplace(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match placed {
            Ok(()) => {
                fsutil::fsync_dir(dir)?;
                Ok((Signer::load(path)?, true))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok((Signer::load(path)?, false)),
            Err(e) => Err(anyhow!("signing.key_file: cannot create '{}': {e}", path.display())),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn public_key(&self) -> &PublicKey {
        self.key.public_key()
    }

    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.key.public_key())
    }

    /// This key's line for an allowed_signers file: `etcd-backupd ssh-ed25519 AAAA... node`.
    pub fn allowed_signers_line(&self, node: &str) -> String {
        let mut public = self.key.public_key().clone();
        public.set_comment(node);
        let text = public.to_openssh().unwrap_or_default();
        format!("{PRINCIPAL} {text}")
    }

    /// The sshsig signature of `msg` in namespace [`NAMESPACE`], PEM armoured as
    /// `ssh-keygen -Y sign` writes it.
    pub fn sign(&self, msg: &[u8]) -> Result<String> {
        let sig = self
            .key
            .sign(NAMESPACE, HashAlg::Sha512, msg)
            .map_err(|e| anyhow!("cannot sign: {e}"))?;
        let mut pem = sig
            .to_pem(LineEnding::LF)
            .map_err(|e| anyhow!("cannot encode the signature: {e}"))?;
        if !pem.ends_with('\n') {
            pem.push('\n');
        }
        Ok(pem)
    }
}

pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// This node's signer when `[signing]` is on, its key created on first use (logged with
/// the line for allowed_signers).
pub fn signer(settings: &Settings) -> Result<Option<Signer>> {
    let Some(signing) = &settings.signing else {
        return Ok(None);
    };
    let (signer, created) = Signer::load_or_create(&signing.key_file, &settings.node_name)?;
    if created {
        tracing::info!(
            key_file = %signer.path().display(),
            fingerprint = %signer.fingerprint(),
            allowed_signers = %signer.allowed_signers_line(&settings.node_name),
            "created this node's signing key; add its line to the allowed_signers file of every host that restores"
        );
    }
    Ok(Some(signer))
}

/// Logs the node's signing key and its allowed_signers line (at the daemon's start),
/// creating the key if it does not exist yet.
pub fn announce(settings: &Settings) -> Result<()> {
    if let Some(s) = signer(settings)? {
        tracing::info!(
            key_file = %s.path().display(),
            fingerprint = %s.fingerprint(),
            allowed_signers = %s.allowed_signers_line(&settings.node_name),
            "signing every set with this node's key"
        );
    }
    Ok(())
}

/// Writes a set's closing files into `work`: `SHA256SUMS`, `manifest.json.sig` when
/// `signer` is given (the signature of the exact bytes written next), and `manifest.json`,
/// last. Every kind of set (native, script, imported) is closed here.
pub fn write_set_files(signer: Option<&Signer>, work: &Path, manifest: &Manifest) -> Result<()> {
    fsutil::write_private_file(&work.join(SHA256SUMS), manifest.sha256sums().as_bytes())?;
    let json = manifest.to_json();
    if let Some(signer) = signer {
        let sig = signer.sign(json.as_bytes())?;
        fsutil::write_private_file(&work.join(SIGNATURE), sig.as_bytes())?;
    }
    fsutil::write_private_file(&work.join(MANIFEST), json.as_bytes())?;
    Ok(())
}

// ---- the reading side ----

/// An OpenSSH allowed_signers file (`ssh-keygen(1)`, ALLOWED SIGNERS): one key a line,
/// `principals [options] keytype base64 [comment]`. Options understood: `namespaces`,
/// `valid-after`, `valid-before` (times without `Z` are taken as UTC) and `cert-authority`
/// (such lines never match: sets are signed with plain keys).
#[derive(Debug, Clone)]
pub struct AllowedSigners {
    pub path: PathBuf,
    entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    principals: String,
    namespaces: Option<String>,
    valid_after: Option<i64>,
    valid_before: Option<i64>,
    cert_authority: bool,
    key: PublicKey,
}

impl AllowedSigners {
    /// Reads `verify.allowed_signers`; a missing or malformed file is a configuration error.
    pub fn load(path: &Path) -> Result<AllowedSigners> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Stop::Usage(format!("verify.allowed_signers: cannot read '{}': {e}", path.display())))?;
        AllowedSigners::parse(path, &text).map_err(|e| {
            anyhow!(Stop::Usage(format!(
                "verify.allowed_signers: '{}': {e}",
                path.display()
            )))
        })
    }

    pub fn parse(path: &Path, text: &str) -> Result<AllowedSigners, String> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            entries.push(parse_entry(line).map_err(|e| format!("line {}: {e}", i + 1))?);
        }
        Ok(AllowedSigners {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// How many keys may sign sets now (principal `etcd-backupd`, namespace `etcd-backupd`).
    pub fn usable_keys(&self) -> usize {
        let now = chrono::Utc::now().timestamp();
        self.entries.iter().filter(|e| e.admits(now)).count()
    }

    /// Does the file list `key` for principal `etcd-backupd` and namespace `etcd-backupd` now?
    pub fn lists(&self, key: &PublicKey) -> bool {
        let now = chrono::Utc::now().timestamp();
        self.entries
            .iter()
            .any(|e| e.admits(now) && e.key.key_data() == key.key_data())
    }
}

impl Entry {
    fn admits(&self, now: i64) -> bool {
        !self.cert_authority
            && pattern_list_matches(&self.principals, PRINCIPAL)
            && self
                .namespaces
                .as_deref()
                .is_none_or(|n| pattern_list_matches(n, NAMESPACE))
            && self.valid_after.is_none_or(|t| now >= t)
            && self.valid_before.is_none_or(|t| now < t)
    }
}

/// Splits at whitespace outside double quotes.
fn tokens(line: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn parse_entry(line: &str) -> Result<Entry, String> {
    let t = tokens(line);
    let is_key_type = |s: &str| s.parse::<Algorithm>().is_ok();
    let (options, key_at) = match t.get(1) {
        Some(s) if is_key_type(s) => (None, 1),
        Some(s) => (Some(s.as_str()), 2),
        None => return Err("a principal and a key are needed".into()),
    };
    let (Some(kind), Some(data)) = (t.get(key_at), t.get(key_at + 1)) else {
        return Err("no key after the principals".into());
    };
    let key = PublicKey::from_openssh(&format!("{kind} {data}")).map_err(|e| format!("not a public key: {e}"))?;
    let mut entry = Entry {
        principals: t[0].trim_matches('"').to_string(),
        namespaces: None,
        valid_after: None,
        valid_before: None,
        cert_authority: false,
        key,
    };
    for opt in options.map(split_options).unwrap_or_default() {
        let (name, value) = match opt.split_once('=') {
            Some((n, v)) => (n.to_ascii_lowercase(), Some(v.trim_matches('"').to_string())),
            None => (opt.to_ascii_lowercase(), None),
        };
        match (name.as_str(), value) {
            ("cert-authority", None) => entry.cert_authority = true,
            ("namespaces", Some(v)) => entry.namespaces = Some(v),
            ("valid-after", Some(v)) => entry.valid_after = Some(parse_time(&v)?),
            ("valid-before", Some(v)) => entry.valid_before = Some(parse_time(&v)?),
            (other, _) => return Err(format!("unknown or malformed option {other:?}")),
        }
    }
    Ok(entry)
}

/// Options are separated by commas outside double quotes.
fn split_options(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter().filter(|o| !o.is_empty()).collect()
}

/// `YYYYMMDD[HHMM[SS]][Z]`, as unix time (UTC).
fn parse_time(s: &str) -> Result<i64, String> {
    let digits = s.strip_suffix(['Z', 'z']).unwrap_or(s);
    if ![8, 12, 14].contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{s:?} is not a time (YYYYMMDD[HHMM[SS]][Z])"));
    }
    let full = format!("{digits:0<14}");
    chrono::NaiveDateTime::parse_from_str(&full, "%Y%m%d%H%M%S")
        .map(|t| t.and_utc().timestamp())
        .map_err(|_| format!("{s:?} is not a time (YYYYMMDD[HHMM[SS]][Z])"))
}

/// OpenSSH's pattern lists: comma-separated `*`/`?` patterns; a matching `!pattern` denies.
fn pattern_list_matches(list: &str, name: &str) -> bool {
    let mut matched = false;
    for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match p.strip_prefix('!') {
            Some(neg) if glob(neg.as_bytes(), name.as_bytes()) => return false,
            Some(_) => {}
            None => matched |= glob(p.as_bytes(), name.as_bytes()),
        }
    }
    matched
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
        _ => false,
    }
}

/// What a set's signature says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No readable `manifest.json.sig`.
    Unsigned(String),
    /// A signature that is not one of `manifest.json` (altered, forged or malformed).
    Invalid(String),
    /// A valid signature by a key allowed_signers does not list.
    Unlisted { fingerprint: String },
    /// A valid signature; `listed` when allowed_signers lists its key, `false` when there
    /// was no allowed_signers to ask.
    Good { fingerprint: String, listed: bool },
}

/// Judges `sig` (the bytes of `manifest.json.sig`, `Err` with why there is none) over the
/// exact bytes of `manifest.json`, against `allowed` when given.
pub fn judge(manifest_json: &[u8], sig: Result<&[u8], String>, allowed: Option<&AllowedSigners>) -> Verdict {
    let sig = match sig {
        Ok(s) => s,
        Err(why) => return Verdict::Unsigned(why),
    };
    let parsed = std::str::from_utf8(sig)
        .map_err(|_| "not text".to_string())
        .and_then(|t| SshSig::from_pem(t.trim()).map_err(|e| e.to_string()));
    let sig = match parsed {
        Ok(s) => s,
        Err(e) => return Verdict::Invalid(format!("{SIGNATURE} is not an SSH signature ({e})")),
    };
    if sig.namespace() != NAMESPACE {
        return Verdict::Invalid(format!(
            "{SIGNATURE} is for namespace {:?}, not {NAMESPACE:?}",
            sig.namespace()
        ));
    }
    let key = PublicKey::from(sig.public_key().clone());
    let fp = fingerprint(&key);
    if let Err(e) = key.verify(NAMESPACE, manifest_json, &sig) {
        return Verdict::Invalid(format!("{SIGNATURE} (key {fp}) does not verify over {MANIFEST} ({e})"));
    }
    match allowed {
        Some(a) if !a.lists(&key) => Verdict::Unlisted { fingerprint: fp },
        Some(_) => Verdict::Good {
            fingerprint: fp,
            listed: true,
        },
        None => Verdict::Good {
            fingerprint: fp,
            listed: false,
        },
    }
}

impl Verdict {
    /// Why a reader must refuse the set (`None`: it may take it). `allowed` is the
    /// allowed_signers in force: with one, only a listed key's valid signature passes;
    /// without, only an invalid signature is refused (it proves an alteration).
    pub fn refusal(&self, allowed: Option<&AllowedSigners>) -> Option<String> {
        let file = |a: &AllowedSigners| a.path.display().to_string();
        match (self, allowed) {
            (Verdict::Good { .. }, _) => None,
            (Verdict::Invalid(why), _) => Some(format!(
                "its signature is invalid: {why}: the set was changed after it was signed, or the signature is not its own"
            )),
            (Verdict::Unsigned(why), Some(a)) => Some(format!(
                "it is unsigned: no readable {SIGNATURE} ({why}); verify.allowed_signers ('{}') requires one by a key it lists",
                file(a)
            )),
            (Verdict::Unlisted { fingerprint }, Some(a)) => Some(format!(
                "its {SIGNATURE} is by key {fingerprint}, which verify.allowed_signers ('{}') does not list for {PRINCIPAL}",
                file(a)
            )),
            (Verdict::Unsigned(_) | Verdict::Unlisted { .. }, None) => None,
        }
    }

    /// One line for `fetch` and `verify`.
    pub fn describe(&self) -> String {
        match self {
            Verdict::Unsigned(_) => format!("unsigned (no {SIGNATURE})"),
            Verdict::Invalid(why) => format!("INVALID: {why}"),
            Verdict::Unlisted { fingerprint } => {
                format!("signed by {fingerprint}, a key allowed_signers does not list")
            }
            Verdict::Good {
                fingerprint,
                listed: true,
            } => format!("signed by {fingerprint}, listed in allowed_signers"),
            Verdict::Good {
                fingerprint,
                listed: false,
            } => format!("signed by {fingerprint} (key not checked: verify.allowed_signers is not set)"),
        }
    }

    /// A short cell for `list`.
    pub fn cell(&self) -> String {
        match self {
            Verdict::Unsigned(_) => "unsigned".into(),
            Verdict::Invalid(_) => "INVALID".into(),
            Verdict::Unlisted { fingerprint } => format!("{fingerprint} (UNLISTED)"),
            Verdict::Good {
                fingerprint,
                listed: true,
            } => format!("{fingerprint} (listed)"),
            Verdict::Good { fingerprint, .. } => fingerprint.clone(),
        }
    }

    /// `unsigned`, `invalid`, `unlisted`, `listed` or `signed` (not checked against a list).
    pub fn state(&self) -> &'static str {
        match self {
            Verdict::Unsigned(_) => "unsigned",
            Verdict::Invalid(_) => "invalid",
            Verdict::Unlisted { .. } => "unlisted",
            Verdict::Good { listed: true, .. } => "listed",
            Verdict::Good { .. } => "signed",
        }
    }

    pub fn fingerprint(&self) -> Option<&str> {
        match self {
            Verdict::Unlisted { fingerprint } | Verdict::Good { fingerprint, .. } => Some(fingerprint),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dir: &Path, name: &str) -> Signer {
        Signer::load_or_create(&dir.join(name), name).unwrap().0
    }

    #[test]
    fn keys_are_created_private_once_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/signing.key");
        let (a, created) = Signer::load_or_create(&path, "node-a").unwrap();
        assert!(created);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let (b, created) = Signer::load_or_create(&path, "node-b").unwrap();
        assert!(!created);
        assert_eq!(a.fingerprint(), b.fingerprint());
        let line = a.allowed_signers_line("node-a");
        assert!(
            line.starts_with("etcd-backupd ssh-ed25519 AAAA") && line.ends_with(" node-a"),
            "{line}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = Signer::load(&path).err().unwrap().to_string();
        assert!(e.contains("signing.key_file") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "not a key").unwrap();
        assert!(Signer::load(&path).is_err());
    }

    #[test]
    fn signatures_are_judged_against_allowed_signers() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (key(dir.path(), "a"), key(dir.path(), "b"));
        let msg = b"{\"id\": \"x\"}\n";
        let sig = a.sign(msg).unwrap();
        assert!(sig.starts_with("-----BEGIN SSH SIGNATURE-----\n"), "{sig}");
        let only_a = AllowedSigners::parse(
            Path::new("as"),
            &format!("# nodes\n\n{}\n", a.allowed_signers_line("n")),
        )
        .unwrap();
        let only_b = AllowedSigners::parse(Path::new("as"), &b.allowed_signers_line("n")).unwrap();
        let good = judge(msg, Ok(sig.as_bytes()), Some(&only_a));
        assert_eq!(
            good,
            Verdict::Good {
                fingerprint: a.fingerprint(),
                listed: true
            }
        );
        assert_eq!(good.refusal(Some(&only_a)), None);
        let unlisted = judge(msg, Ok(sig.as_bytes()), Some(&only_b));
        assert!(unlisted.refusal(Some(&only_b)).unwrap().contains(&a.fingerprint()));
        let altered = judge(b"{\"id\": \"y\"}\n", Ok(sig.as_bytes()), Some(&only_a));
        assert!(matches!(altered, Verdict::Invalid(_)), "{altered:?}");
        // An altered set is refused even where no allowed_signers is configured.
        assert!(altered.refusal(None).unwrap().contains("invalid"));
        let unsigned = judge(msg, Err("no file".into()), Some(&only_a));
        assert!(unsigned.refusal(Some(&only_a)).unwrap().contains("unsigned"));
        assert_eq!(unsigned.refusal(None), None);
        assert!(matches!(judge(msg, Ok(b"junk"), None), Verdict::Invalid(_)));
        // Another namespace is not ours, though its signature is valid.
        let other = a
            .key
            .sign("git", HashAlg::Sha512, msg)
            .unwrap()
            .to_pem(LineEnding::LF)
            .unwrap();
        assert!(matches!(judge(msg, Ok(other.as_bytes()), None), Verdict::Invalid(w) if w.contains("git")));
    }

    #[test]
    fn allowed_signers_lines_follow_openssh() {
        let dir = tempfile::tempdir().unwrap();
        let a = key(dir.path(), "a");
        let public = a.public_key().to_openssh().unwrap();
        let listed = |line: String| {
            AllowedSigners::parse(Path::new("as"), &line)
                .unwrap()
                .lists(a.public_key())
        };
        assert!(listed(format!("etcd-backupd {public}")));
        assert!(listed(format!("admin@x,etcd-* {public}")));
        assert!(listed(format!("etcd-backupd namespaces=\"git,etcd-backupd\" {public}")));
        assert!(listed(format!(
            "etcd-backupd valid-after=\"20200101\",valid-before=\"29990101Z\" {public}"
        )));
        assert!(!listed(format!("etcd-backupd,!etcd-* {public}")));
        assert!(!listed(format!("someone-else {public}")));
        assert!(!listed(format!("etcd-backupd namespaces=\"git\" {public}")));
        assert!(!listed(format!("etcd-backupd valid-before=\"20200101\" {public}")));
        assert!(!listed(format!("etcd-backupd cert-authority {public}")));
        let e = AllowedSigners::parse(Path::new("as"), &format!("\netcd-backupd bogus-option {public}")).unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
        assert!(AllowedSigners::parse(Path::new("as"), "etcd-backupd ssh-ed25519 AAAAnotbase64").is_err());
    }
}
