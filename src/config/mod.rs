//! Configuration, loaded in three stages (the zincati pattern):
//! 1. [`load`]: the main file and `config.d/*.toml` drop-ins, parsed and merged key by key,
//!    each key remembering the file it came from;
//! 2. [`inputs`]: the merged table deserialized into typed inputs with every default filled
//!    in (unknown keys rejected, durations and sizes parsed);
//! 3. [`Settings`]: validated, cross-checked, `{node_name}` expanded, ready to use.
//!
//! Every error is one line naming the file, the key and what is wrong.

pub mod inputs;
pub mod load;
pub mod types;
mod validate;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use url::Url;

pub use inputs::{
    CompressionInputs, DeliveryInputs, ElectionInputs, EncryptionInputs, GuardsInputs, ImportInputs, Inputs, IoClass,
    JournalInputs, MetricsInputs, PriorityInputs, RetentionInputs, ScheduleInputs, SetFile, SigningInputs,
    SnapshotMethod, VerifyInputs, VerifyUpload,
};
use load::Merged;
use types::HumanDuration;

/// The default main configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/etcd-backupd/config.toml";

const OPENSHIFT_ETCD_CA: &str =
    "/etc/kubernetes/static-pod-resources/etcd-certs/configmaps/etcd-all-bundles/server-ca-bundle.crt";
const OPENSHIFT_ETCD_CERT: &str =
    "/etc/kubernetes/static-pod-resources/etcd-certs/secrets/etcd-all-certs/etcd-peer-{node_name}.crt";
const OPENSHIFT_ETCD_KEY: &str =
    "/etc/kubernetes/static-pod-resources/etcd-certs/secrets/etcd-all-certs/etcd-peer-{node_name}.key";

pub use crate::error::ConfigError;

/// The validated configuration the program runs on.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// The files read, in the order they were merged.
    #[serde(skip)]
    pub files: Vec<PathBuf>,
    /// Folder on the target; `None` means the etcd cluster ID, learnt at run time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
    pub node_name: String,
    pub etcd: EtcdSettings,
    pub snapshot: SnapshotSettings,
    pub schedule: ScheduleInputs,
    pub election: ElectionInputs,
    pub guards: GuardsInputs,
    pub priority: PriorityInputs,
    pub retention: RetentionInputs,
    pub delivery: DeliveryInputs,
    pub metrics: MetricsInputs,
    pub journal: JournalInputs,
    pub import: ImportInputs,
    pub compression: CompressionInputs,
    pub encryption: EncryptionInputs,
    pub verify: VerifyInputs,
    /// `None`: sets are not signed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing: Option<SigningSettings>,
    #[serde(rename = "target")]
    pub targets: Vec<TargetSettings>,
    /// `schedule.cron` in `schedule.timezone`, parsed once; `None` when the cron is empty
    /// (a host that takes no backups).
    #[serde(skip)]
    pub backup_schedule: Option<crate::schedule::Schedule>,
    /// `verify.schedule`, parsed once; `None`: no scheduled drills.
    #[serde(skip)]
    pub drill_schedule: Option<crate::schedule::Schedule>,
    /// Each secret file with where it was configured (`file: target[0].password_file`).
    #[serde(skip)]
    pub secret_files: Vec<(String, PathBuf)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EtcdSettings {
    pub endpoints: Vec<Url>,
    #[serde(flatten)]
    pub tls: Option<EtcdTls>,
    pub connect_timeout: HumanDuration,
    pub request_timeout: HumanDuration,
}

#[derive(Debug, Clone, Serialize)]
pub struct EtcdTls {
    pub ca_file: PathBuf,
    /// Client certificate and key; absent when the server does not ask for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

fn none_as_empty<S: serde::Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => p.serialize(s),
        None => s.serialize_str(""),
    }
}

/// The signing key's name in `snapshot.staging_dir` when `signing.key_file` is not set.
pub const DEFAULT_SIGNING_KEY: &str = "signing.key";

/// `[signing]` in effect.
#[derive(Debug, Clone, Serialize)]
pub struct SigningSettings {
    /// The node's private key; never rendered into a MachineConfig (each node has its own).
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotSettings {
    pub method: SnapshotMethod,
    pub script: PathBuf,
    /// `None`: a plain etcd cluster, no static resources archive (printed as `""`, as it is
    /// configured: left out, it would mean the default).
    #[serde(serialize_with = "none_as_empty")]
    pub static_resources_dir: Option<PathBuf>,
    pub staging_dir: PathBuf,
    pub script_timeout: HumanDuration,
    pub allow_dirty: bool,
}

/// One `[[target]]`: what every kind has, and its kind's own settings (printed flat, as
/// they are configured).
#[derive(Debug, Clone, Serialize)]
pub struct TargetSettings {
    pub name: String,
    pub url: Url,
    /// The files of each set it holds (`[[target]] files`).
    pub files: Vec<SetFile>,
    pub verify_upload: VerifyUpload,
    pub connect_timeout: HumanDuration,
    pub idle_timeout: HumanDuration,
    pub retry_budget: HumanDuration,
    #[serde(flatten)]
    pub kind: TargetKind,
}

/// The kinds of target, by URL scheme, each with only the settings that apply to it. A new
/// kind is a variant here, its settings built in `validate::target`, and an implementation
/// of `targets::Target` chosen in `targets::open`.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum TargetKind {
    /// `file://`: a directory on this host (or a mount); nothing more to configure.
    File(FileSettings),
    /// `http(s)://`: a WebDAV server.
    WebDav(WebDavSettings),
    /// `s3://BUCKET/PREFIX/`.
    S3(S3Settings),
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FileSettings {}

/// How a remote target (WebDAV, S3) is reached: TLS trust and client certificate, proxy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RemoteSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<PathBuf>,
    pub proxy: ProxyMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_password_file: Option<PathBuf>,
}

/// A WebDAV target: how it is reached, and its credentials (Basic or Bearer, or none).
#[derive(Debug, Clone, Serialize)]
pub struct WebDavSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    #[serde(flatten)]
    pub remote: RemoteSettings,
}

/// An `s3://BUCKET/PREFIX/` target's keys, defaults filled in.
#[derive(Debug, Clone, Serialize)]
pub struct S3Settings {
    #[serde(flatten)]
    pub remote: RemoteSettings,
    /// The S3 API's base URL (`https://s3.<region>.amazonaws.com` when not configured).
    pub endpoint: Url,
    pub region: String,
    pub access_key_file: PathBuf,
    pub secret_key_file: PathBuf,
    pub path_style: bool,
    /// Each part of a multipart upload (all but the last).
    pub part_size: types::Size,
}

/// `[[target]] proxy`: curl's rules over the environment's variables, no proxy, or this
/// proxy for this target alone. Printed as it was written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ProxyMode {
    #[default]
    Env,
    None,
    /// An `http(s)://[user@]host:port` URL (no password: see `proxy_password_file`), and
    /// the text it was written as.
    Url(Url, String),
}

impl ProxyMode {
    /// `env`, `none`, or an http(s) URL with a host and no password.
    pub fn parse(text: &str) -> Result<ProxyMode, String> {
        match text {
            "env" => Ok(ProxyMode::Env),
            "none" => Ok(ProxyMode::None),
            other => {
                let u = Url::parse(other).map_err(|e| format!("not env, none or a URL: {e}"))?;
                if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                    return Err("must be env, none, or http(s)://host:port".into());
                }
                if u.password().is_some() {
                    return Err("a password in the URL is not allowed; use proxy_password_file".into());
                }
                Ok(ProxyMode::Url(u, other.to_string()))
            }
        }
    }
}

impl std::fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProxyMode::Env => "env",
            ProxyMode::None => "none",
            ProxyMode::Url(_, text) => text,
        })
    }
}

impl Serialize for ProxyMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl TargetSettings {
    /// The same target without retries: a probe (preflight, `check-config --connect`) that
    /// reports the first failure instead of waiting out the retry budget.
    pub fn single_attempt(&self) -> TargetSettings {
        TargetSettings {
            retry_budget: HumanDuration(std::time::Duration::ZERO),
            ..self.clone()
        }
    }

    /// How a remote target is reached; `None` for `file://`.
    pub fn remote(&self) -> Option<&RemoteSettings> {
        match &self.kind {
            TargetKind::File(_) => None,
            TargetKind::WebDav(d) => Some(&d.remote),
            TargetKind::S3(s) => Some(&s.remote),
        }
    }

    pub fn s3(&self) -> Option<&S3Settings> {
        match &self.kind {
            TargetKind::S3(s) => Some(s),
            _ => None,
        }
    }

    /// The files holding this target's secrets, with their keys.
    pub fn secret_files(&self) -> impl Iterator<Item = (&'static str, &Path)> {
        let remote = self.remote();
        let dav = match &self.kind {
            TargetKind::WebDav(d) => Some(d),
            _ => None,
        };
        [
            ("password_file", dav.and_then(|d| d.password_file.as_deref())),
            ("token_file", dav.and_then(|d| d.token_file.as_deref())),
            ("client_key_file", remote.and_then(|r| r.client_key_file.as_deref())),
            (
                "proxy_password_file",
                remote.and_then(|r| r.proxy_password_file.as_deref()),
            ),
            ("access_key_file", self.s3().map(|s| s.access_key_file.as_path())),
            ("secret_key_file", self.s3().map(|s| s.secret_key_file.as_path())),
        ]
        .into_iter()
        .filter_map(|(k, p)| p.map(|p| (k, p)))
    }
}

impl Settings {
    /// The folder a cluster's sets go to on every target: `cluster_name`, or the etcd
    /// cluster ID (hex, as `etcdctl member list` prints it).
    pub fn cluster_folder(&self, cluster_id: u64) -> String {
        self.cluster_name.clone().unwrap_or_else(|| format!("{cluster_id:x}"))
    }

    /// How stored files (the snapshot's) are sealed; reads `encryption.age_recipients_file`.
    pub fn seal(&self) -> anyhow::Result<crate::envelope::Seal> {
        let e = &self.encryption;
        self.seal_to(
            &e.age_recipients,
            e.age_recipients_file.as_deref(),
            "encryption.age_recipients_file",
        )
    }

    /// The seal of the static resources archive when it has recipients of its own
    /// (`encryption.resources_recipients` and its file); `None`: the snapshot's
    /// ([`Settings::seal`]), which the caller already has.
    pub fn resources_seal(&self) -> anyhow::Result<Option<crate::envelope::Seal>> {
        let e = &self.encryption;
        if e.resources_recipients.is_empty() && e.resources_recipients_file.is_none() {
            return Ok(None);
        }
        self.seal_to(
            &e.resources_recipients,
            e.resources_recipients_file.as_deref(),
            "encryption.resources_recipients_file",
        )
        .map(Some)
    }

    /// Compression, and `listed` recipients with those of the recipients `file` (`key`).
    fn seal_to(&self, listed: &[String], file: Option<&Path>, key: &str) -> anyhow::Result<crate::envelope::Seal> {
        let mut recipients = listed.to_vec();
        if let Some(p) = file {
            recipients.extend(crate::envelope::read_recipients_file(p).map_err(|e| anyhow::anyhow!("{key}: {e:#}"))?);
        }
        Ok(crate::envelope::Seal {
            zstd_level: (self.compression.zstd_level > 0).then_some(self.compression.zstd_level),
            recipients,
        })
    }

    /// Of the targets `chosen` for a set, those that hold `file`; empty when every one does
    /// (the set is not split, and its manifest says nothing about custody). When none of
    /// them does (`backup --target` refuses that before a snapshot), every configured target
    /// that holds it: an empty list would claim the opposite.
    pub fn holders(&self, chosen: &[String], file: SetFile) -> Vec<String> {
        let holds = |n: &String| self.target(n).is_none_or(|t| t.files.contains(&file));
        let holding: Vec<String> = chosen.iter().filter(|n| holds(n)).cloned().collect();
        if holding.len() == chosen.len() {
            Vec::new()
        } else if holding.is_empty() {
            let all: Vec<String> = self.targets.iter().map(|t| t.name.clone()).collect();
            all.into_iter().filter(|n| holds(n)).collect()
        } else {
            holding
        }
    }

    /// Are stored sets encrypted?
    pub fn encrypts(&self) -> bool {
        !self.encryption.age_recipients.is_empty() || self.encryption.age_recipients_file.is_some()
    }

    /// The `[retention]` policy.
    pub fn retention_policy(&self) -> types::Policy {
        let r = &self.retention;
        types::Policy {
            keep_last: r.keep_last,
            keep_daily: r.keep_daily,
            keep_weekly: r.keep_weekly,
            keep_monthly: r.keep_monthly,
            max_age: r.max_age.map(|d| d.0),
            min_keep: r.min_keep,
        }
    }

    /// The time zone retention counts days, weeks and months in: the schedule's.
    pub fn time_zone(&self) -> chrono_tz::Tz {
        self.schedule.timezone.parse().unwrap_or(chrono_tz::Tz::UTC)
    }

    /// Loads `main` and its drop-ins and validates the result. This checks syntax and
    /// meaning only; [`Settings::check_node_files`] checks the files the config names.
    pub fn load(main: &Path) -> Result<Settings, ConfigError> {
        if let Err(e) = std::fs::metadata(main) {
            let why = if e.kind() == std::io::ErrorKind::NotFound {
                "no such configuration file (give another with --config PATH)".to_string()
            } else {
                e.to_string()
            };
            return Err(ConfigError(format!("{}: {why}", main.display())));
        }
        let merged = load::read_all(main).map_err(ConfigError)?;
        Settings::from_merged(merged)
    }

    /// Validates configuration text given directly (for tests and `render`).
    pub fn from_str_named(name: &str, text: &str) -> Result<Settings, ConfigError> {
        let mut merged = Merged::default();
        let table = text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError(format!("{name}: {}", e.message().replace('\n', " "))))?;
        load::merge_into(&mut merged, Path::new(name), table).map_err(ConfigError)?;
        merged.files.push(name.into());
        Settings::from_merged(merged)
    }

    fn from_merged(merged: Merged) -> Result<Settings, ConfigError> {
        let inputs: Inputs =
            serde_path_to_error::deserialize(toml::Value::Table(merged.table.clone())).map_err(|e| {
                let path = e.path().to_string();
                let path = if path == "." { String::new() } else { path };
                let msg = e.inner().to_string().replace('\n', " ");
                ConfigError(merged.error_at(&path, suggest_key(msg.trim_end())))
            })?;
        validate::validate(inputs, &merged).map_err(ConfigError)
    }

    /// The settings as TOML that loads back to the same settings: what `check-config`
    /// prints. Secrets are never in it: they live in the files the `*_file` keys name.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    /// Checks what only the node can: secret files exist and are private.
    pub fn check_node_files(&self) -> Result<(), ConfigError> {
        for (at, path) in &self.secret_files {
            check_secret_file(path).map_err(|e| ConfigError(format!("{at}: {e}")))?;
        }
        Ok(())
    }

    pub fn target(&self, name: &str) -> Option<&TargetSettings> {
        self.targets.iter().find(|t| t.name == name)
    }
}

/// Reads an age identity file (a private key), refused when group or others can read it;
/// `key` names where its path came from in errors (`--identity`, `verify.identity_file`).
pub fn read_identity(path: Option<&Path>, key: &str) -> anyhow::Result<Option<String>> {
    use crate::error::Stop;
    let Some(path) = path else { return Ok(None) };
    check_secret_file(path).map_err(|e| Stop::Usage(format!("{key}: {e}")))?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| Stop::Usage(format!("{key}: cannot read '{}': {e}", path.display())))?;
    Ok(Some(text))
}

/// A secret file must be a regular file that neither group nor others can read.
pub fn check_secret_file(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("'{}': {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("'{}' is not a regular file", path.display()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "'{}' is readable by group or others (mode {mode:04o}); run chmod 600 on it",
            path.display()
        ));
    }
    Ok(())
}

pub(super) fn host_name() -> Result<String, String> {
    nix::unistd::gethostname()
        .map_err(|e| format!("cannot read the host name: {e}"))?
        .into_string()
        .map_err(|_| "the host name is not UTF-8".to_string())
}

/// A name used in paths and keys: letters, digits, `.`, `_`, `-`, not starting with a dot.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 128 {
        return Err("longer than 128 characters".into());
    }
    if name.starts_with('.') {
        return Err(format!("{name:?} must not start with '.'"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{name:?} contains {c:?}; use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Expands `{node_name}`; any other `{...}` is an error, as it is surely a typo.
pub(super) fn expand(path: &Path, node_name: &str) -> Result<PathBuf, String> {
    let s = path.to_str().ok_or_else(|| format!("{path:?} is not UTF-8"))?;
    let out = s.replace("{node_name}", node_name);
    if let Some(start) = out.find('{') {
        let end = out[start..].find('}').map(|e| start + e + 1).unwrap_or(out.len());
        return Err(format!(
            "unknown placeholder {:?} (only {{node_name}} is expanded)",
            &out[start..end]
        ));
    }
    Ok(PathBuf::from(out))
}

/// serde's `unknown field `x`, expected one of `a`, `b`` with the likely key named:
/// `unknown field `endpionts`: did you mean `endpoints`?`, and the valid keys when they
/// are few or none is close. Any other message is returned as it is.
fn suggest_key(msg: &str) -> String {
    let parsed = msg.strip_prefix("unknown field `").and_then(|rest| {
        let (field, tail) = rest.split_once('`')?;
        let expected = tail.strip_prefix(", expected ")?;
        // "one of `a`, `b`" or "`a` or `b`", then maybe more words (toml adds "in `etcd`").
        let mut valid = Vec::new();
        let mut parts = expected.split('`');
        let mut sep = parts.next()?;
        while let Some(name) = parts.next()
            && (valid.is_empty() || matches!(sep, ", " | " or " | ", or "))
        {
            valid.push(name);
            sep = parts.next().unwrap_or_default();
        }
        Some((field, valid))
    });
    let Some((field, valid)) = parsed else {
        return msg.to_string();
    };
    let keys = valid.join(", ");
    let lower = field.to_ascii_lowercase();
    let close = valid
        .iter()
        .map(|v| {
            let d = edit_distance(&lower, v);
            // `password` for `password_file`, `endpoint` for `endpoints`.
            let prefix = lower.len() >= 3 && (v.starts_with(&lower) || lower.starts_with(*v));
            (if prefix { d.min(1) } else { d }, *v)
        })
        .filter(|(d, _)| *d <= (lower.chars().count() / 3).max(1))
        .min_by_key(|(d, _)| *d);
    match close {
        Some((_, v)) if valid.len() <= 8 => format!("unknown field `{field}`: did you mean `{v}`? (keys here: {keys})"),
        Some((_, v)) => format!("unknown field `{field}`: did you mean `{v}`?"),
        None if valid.is_empty() => format!("unknown field `{field}`"),
        None => format!("unknown field `{field}`; keys here: {keys}"),
    }
}

/// Edits (insert, delete, replace, swap two neighbours) that turn `a` into `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// The fix for an etcd endpoint written without a scheme (`127.0.0.1:2379`, as etcdctl
/// takes it); `None` when it has one. https comes first when TLS files are configured.
pub(super) fn missing_scheme(raw: &str, tls_files_set: bool) -> Option<String> {
    if raw.contains("://") || raw.trim().is_empty() {
        return None;
    }
    let host = raw.trim();
    // Only when adding a scheme gives a usable endpoint: else the parser's own words.
    let usable = Url::parse(&format!("https://{host}"))
        .is_ok_and(|u| u.host_str().is_some() && matches!(u.path(), "" | "/") && u.query().is_none());
    if !usable {
        return None;
    }
    let https = format!("\"https://{host}\" (TLS, with etcd.ca_file, cert_file and key_file)");
    let http = format!("\"http://{host}\" (plain, no TLS)");
    let (first, second) = if tls_files_set {
        (https, http)
    } else {
        let https =
            format!("\"https://{host}\" (TLS; without ca_file, cert_file and key_file those of an OpenShift node)");
        (http, https)
    };
    Some(format!("{raw:?} has no scheme: did you mean {first} or {second}?"))
}

/// The S3 keys of target `t` with URL `url` and its (expanded) access and secret key files:
/// `Some` for `s3://`, where `region`, `access_key_file` and `secret_key_file` are required;
/// on any other scheme they must be unset. An error names the key.
pub(super) fn s3_settings(
    t: &inputs::TargetInputs,
    url: &Url,
    (access_key_file, secret_key_file): (Option<PathBuf>, Option<PathBuf>),
) -> Result<Option<S3Settings>, (&'static str, String)> {
    if url.scheme() != "s3" {
        let s3_only = [
            ("endpoint", t.endpoint.is_some()),
            ("region", t.region.is_some()),
            ("access_key_file", access_key_file.is_some()),
            ("secret_key_file", secret_key_file.is_some()),
            ("path_style", t.path_style.is_some()),
            ("part_size", t.part_size.is_some()),
        ];
        return match s3_only.iter().find(|(_, set)| *set) {
            Some((k, _)) => Err((k, "applies only to an s3:// target".into())),
            None => Ok(None),
        };
    }
    let region = match t.region.as_deref() {
        None | Some("") => return Err(("region", "required for an s3:// target, e.g. \"us-east-1\"".into())),
        Some(r) if !r.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => {
            return Err((
                "region",
                format!("{r:?} is not a region name (letters, digits and '-')"),
            ));
        }
        Some(r) => r.to_string(),
    };
    let endpoint = match t.endpoint.as_deref().filter(|e| !e.is_empty()) {
        Some(raw) => {
            let u = Url::parse(raw).map_err(|e| ("endpoint", e.to_string()))?;
            if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                return Err(("endpoint", "must be https://host[:port] (or http://)".into()));
            }
            if !u.username().is_empty() || u.password().is_some() {
                return Err((
                    "endpoint",
                    "credentials in the URL are not allowed; use access_key_file and secret_key_file".into(),
                ));
            }
            if !matches!(u.path(), "" | "/") || u.query().is_some() || u.fragment().is_some() {
                return Err(("endpoint", "must be scheme://host[:port] only, without a path".into()));
            }
            Some(u)
        }
        None => None,
    };
    let path_style = t.path_style.unwrap_or(endpoint.is_some());
    let endpoint = match endpoint {
        Some(u) => u,
        None => Url::parse(&format!("https://s3.{region}.amazonaws.com/")).map_err(|e| ("region", e.to_string()))?,
    };
    let bucket = url.host_str().unwrap_or_default();
    if !path_style && bucket.contains('.') && endpoint.scheme() == "https" {
        return Err((
            "path_style",
            format!(
                "bucket {bucket:?} has a '.', which no TLS certificate of a virtual-hosted endpoint covers; set path_style = true"
            ),
        ));
    }
    let part_size = t.part_size.map_or(DEFAULT_PART_SIZE, |s| s.0);
    // S3 itself, MinIO and Ceph refuse parts under 5 MiB (but the last) at completion;
    // smaller parts are for servers that take them. At most 5 GiB, S3's own cap.
    if !(MIN_PART_SIZE..=5 << 30).contains(&part_size) {
        return Err((
            "part_size",
            format!(
                "{} is outside 64 KiB..5 GiB (S3 needs at least 5 MiB)",
                types::Size(part_size)
            ),
        ));
    }
    let required = |k: &'static str, v: Option<PathBuf>| v.ok_or((k, "required for an s3:// target".to_string()));
    Ok(Some(S3Settings {
        remote: RemoteSettings::default(),
        endpoint,
        region,
        access_key_file: required("access_key_file", access_key_file)?,
        secret_key_file: required("secret_key_file", secret_key_file)?,
        path_style,
        part_size: types::Size(part_size),
    }))
}

/// `part_size` when unset: 16 MiB, few requests and S3's 10,000 parts reach 156 GiB.
pub const DEFAULT_PART_SIZE: u64 = 16 << 20;

/// The smallest `part_size` taken.
const MIN_PART_SIZE: u64 = 64 << 10;

/// An S3 bucket name: 3 to 63 lower-case letters, digits, '.' and '-', starting and ending
/// with a letter or digit.
fn check_bucket(b: &str) -> Result<(), String> {
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !(3..=63).contains(&b.len())
        || !b
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        || !edge_ok(b.chars().next())
        || !edge_ok(b.chars().last())
    {
        return Err(format!(
            "{b:?} is not an S3 bucket name (3 to 63 lower-case letters, digits, '.' and '-')"
        ));
    }
    Ok(())
}

/// Parses a target URL without ever echoing it: it might hold a password.
pub(super) fn parse_target_url(raw: &str) -> Result<Url, String> {
    let url = Url::parse(raw).map_err(|e| e.to_string())?;
    if url.password().is_some() {
        return Err("a password in the URL is not allowed; use username and password_file".into());
    }
    match url.scheme() {
        "http" | "https" => {
            if url.host_str().is_none() {
                return Err("needs a host".into());
            }
            if !url.username().is_empty() {
                return Err("a user name in the URL is not allowed; use username".into());
            }
        }
        "file" => {
            if url.host_str().is_some_and(|h| !h.is_empty() && h != "localhost") {
                return Err("a file:// URL must name a local path (file:///path)".into());
            }
            if url.path() == "/" {
                return Err("a file:// target must not be the root directory".into());
            }
        }
        "s3" => {
            if !url.username().is_empty() {
                return Err("credentials in the URL are not allowed; use access_key_file and secret_key_file".into());
            }
            check_bucket(url.host_str().unwrap_or_default())?;
            if url.port().is_some() {
                return Err("s3://BUCKET/PREFIX/ takes no port; set endpoint".into());
            }
            let prefix = url.path().trim_matches('/');
            if !prefix.is_empty()
                && let Some(bad) = prefix.split('/').find(|seg| check_name(seg).is_err())
            {
                return Err(format!(
                    "prefix segment {bad:?} is not usable: use letters, digits, '.', '_' and '-', not starting with '.'"
                ));
            }
        }
        other => {
            return Err(format!(
                "scheme '{other}' is not supported; use https://, http://, s3:// or file:///"
            ));
        }
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    // A trailing slash makes relative joins keep the last segment.
    let mut url = url;
    if !url.path().ends_with('/') {
        let p = format!("{}/", url.path());
        url.set_path(&p);
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Settings, String> {
        Settings::from_str_named("config.toml", text).map_err(|e| e.0)
    }

    const MIN: &str = "node_name = \"n1\"\n[[target]]\nurl = \"file:///srv/backup\"\n";

    #[test]
    fn defaults_follow_the_contract() {
        let s = load(MIN).unwrap();
        assert_eq!(s.etcd.endpoints[0].as_str(), "https://localhost:2379/");
        let tls = s.etcd.tls.unwrap();
        assert!(tls.cert_file.unwrap().ends_with("etcd-peer-n1.crt"));
        assert_eq!(s.snapshot.staging_dir, Path::new("/var/lib/etcd-backupd"));
        assert_eq!(
            s.snapshot.static_resources_dir.as_deref(),
            Some(Path::new("/etc/kubernetes"))
        );
        assert_eq!(s.targets[0].name, "target-1");
        assert_eq!(s.targets[0].url.as_str(), "file:///srv/backup/");
        assert_eq!(s.retention.keep_last, 7);
        assert_eq!(s.election.lease_ttl.0.as_secs(), 30);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_path() {
        let e = load(&format!("{MIN}[etcd]\nendpoint = [\"http://a:1\"]\n")).unwrap_err();
        assert!(
            e.starts_with("config.toml: etcd.endpoint: unknown field `endpoint`"),
            "{e}"
        );
        let e = load("node_name = \"n\"\nbogus = 1\n[[target]]\nurl = \"file:///x\"\n").unwrap_err();
        assert!(e.contains("bogus") && e.starts_with("config.toml: "), "{e}");
    }

    #[test]
    fn unknown_keys_name_the_likely_one() {
        let e = load(&format!("{MIN}[etcd]\nendpionts = [\"http://a:1\"]\n")).unwrap_err();
        assert_eq!(
            e,
            "config.toml: etcd.endpionts: unknown field `endpionts`: did you mean `endpoints`? \
             (keys here: endpoints, ca_file, cert_file, key_file, connect_timeout, request_timeout)"
        );
        // Many keys: only the likely one.
        let e = load("[[target]]\nurl = \"https://dav/\"\npassword = \"x\"\n").unwrap_err();
        assert_eq!(
            e,
            "config.toml: target[0].password: unknown field `password`: did you mean `password_file`?"
        );
        let e = load(&format!("{MIN}[schedul]\ncron = \"@daily\"\n")).unwrap_err();
        assert!(e.ends_with("unknown field `schedul`: did you mean `schedule`?"), "{e}");
        // Nothing close: every key, so the reader still learns what is there.
        let e = load(&format!("{MIN}[compression]\nalgorithm = \"zstd\"\n")).unwrap_err();
        assert_eq!(
            e,
            "config.toml: compression.algorithm: unknown field `algorithm`; keys here: zstd_level"
        );
        assert_eq!(edit_distance("endpionts", "endpoints"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(suggest_key("invalid type: string"), "invalid type: string");
    }

    #[test]
    fn endpoints_without_a_scheme_get_the_fix() {
        let e = load(&format!("{MIN}[etcd]\nendpoints = [\"127.0.0.1:2379\"]\n")).unwrap_err();
        assert_eq!(
            e,
            "config.toml: etcd.endpoints[0]: \"127.0.0.1:2379\" has no scheme: did you mean \
             \"http://127.0.0.1:2379\" (plain, no TLS) or \"https://127.0.0.1:2379\" (TLS; without \
             ca_file, cert_file and key_file those of an OpenShift node)?"
        );
        // With TLS files configured, https first; a host name (which parses as a scheme) too.
        let e = load(&format!(
            "{MIN}[etcd]\nendpoints = [\"https://a:2379\", \"localhost:2379\"]\nca_file = \"/ca\"\n"
        ))
        .unwrap_err();
        assert_eq!(
            e,
            "config.toml: etcd.endpoints[1]: \"localhost:2379\" has no scheme: did you mean \
             \"https://localhost:2379\" (TLS, with etcd.ca_file, cert_file and key_file) or \
             \"http://localhost:2379\" (plain, no TLS)?"
        );
        let e = load(&format!("{MIN}[etcd]\nendpoints = [\"ftp://a:1\"]\n")).unwrap_err();
        assert!(e.contains("scheme 'ftp' is not supported"), "{e}");
    }

    #[test]
    fn the_printed_configuration_loads_back_the_same() {
        let full = r#"
cluster_name = "prod-east"
node_name = "m0"
[etcd]
endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
ca_file = "/etc/etcd/ca.crt"
connect_timeout = "7s"
request_timeout = "1m 30s"
[snapshot]
method = "script"
static_resources_dir = ""
staging_dir = "/var/lib/x/{node_name}"
script_timeout = "45m"
allow_dirty = true
[schedule]
cron = "@daily"
timezone = "Europe/Berlin"
jitter = "0s"
after_upgrade = false
[election]
enabled = false
prefix = "/backups"
lease_ttl = "12s"
[guards]
min_cluster_age = "36h"
skip_during_upgrade = false
min_free_space = "1500MB"
installed_at = "2026-01-02T03:04:05Z"
[priority]
io_class = "best-effort"
nice = -3
snapshot_nice = 5
upload_rate_limit = "1500KB/s"
[compression]
zstd_level = 3
[encryption]
age_recipients_file = "/etc/etcd-backupd/recipients"
[verify]
schedule = "0 4 * * SUN"
bin_dir = "/opt/etcd"
scratch_dir = "/var/tmp"
identity_file = "/etc/etcd-backupd/age.key"
allowed_signers = "/etc/etcd-backupd/allowed_signers"
[signing]
key_file = "/etc/etcd-backupd/{node_name}.key"
[import]
dirs = ["/etc/kubernetes/cluster-backup"]
[retention]
keep_last = 2
keep_daily = 0
max_age = "90days"
min_keep = 1
[delivery]
max_pending = 5
keep_local = 0
retry_interval = "1m"
retry_max = "1h"
[metrics]
textfile = "/var/lib/node_exporter/textfile/etcd-backupd.prom"
listen = "127.0.0.1:9983"
[[target]]
name = "dav"
url = "https://dav.example.com/etcd"
username = "backup"
password_file = "/etc/etcd-backupd/dav.password"
ca_file = "/etc/etcd-backupd/dav-ca.crt"
client_cert_file = "/etc/etcd-backupd/c.crt"
client_key_file = "/etc/etcd-backupd/c.key"
proxy = "http://user@proxy:3128"
proxy_password_file = "/etc/etcd-backupd/proxy.password"
verify_upload = "read-back"
connect_timeout = "5s"
idle_timeout = "2m"
retry_budget = "10m"
[[target]]
name = "s3"
url = "s3://etcd-backups/prod"
region = "eu-west-1"
endpoint = "https://minio:9000"
access_key_file = "/etc/ak"
secret_key_file = "/etc/sk"
proxy = "none"
[[target]]
url = "file:///srv/{node_name}"
"#;
        for text in [
            MIN,
            full,
            "node_name = \"n\"\n[[target]]\nurl = \"https://dav/\"\ntoken_file = \"/t\"\n",
        ] {
            let first = load(text).unwrap();
            let printed = first.to_toml().unwrap();
            let again = load(&printed).unwrap_or_else(|e| panic!("{e}\n{printed}"));
            assert_eq!(format!("{first:?}"), format!("{again:?}"), "{printed}");
            assert_eq!(printed, again.to_toml().unwrap());
        }
        let printed = load(full).unwrap().to_toml().unwrap();
        assert!(printed.contains("static_resources_dir = \"\""), "{printed}");
        assert!(printed.contains("min_free_space = \"1500MB\""), "{printed}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = load(&format!("{MIN}[election]\nlease_ttl = \"soon\"\n")).unwrap_err();
        assert!(
            e.starts_with("config.toml: election.lease_ttl: invalid duration \"soon\""),
            "{e}"
        );
        let e = load("[[target]]\nurl = \"backups/here\"\n").unwrap_err();
        assert_eq!(e, "config.toml: target[0].url: relative URL without a base");
        let e = load("[[target]]\nname = \"x\"\n").unwrap_err();
        assert!(e.starts_with("config.toml: target[0]: missing field `url`"), "{e}");
        for key in ["nice", "snapshot_nice"] {
            let e = load(&format!("{MIN}[priority]\n{key} = 20\n")).unwrap_err();
            assert_eq!(e, format!("config.toml: priority.{key}: 20 is outside -20..19"));
        }
        let s = load(MIN).unwrap();
        assert_eq!((s.priority.nice, s.priority.snapshot_nice), (10, None));
        let s = load(&format!("{MIN}[priority]\nsnapshot_nice = 0\n")).unwrap();
        assert_eq!((s.priority.nice, s.priority.snapshot_nice), (10, Some(0)));
    }

    #[test]
    fn the_latency_budget_is_a_multiple_or_off() {
        let budget = |v: &str| load(&format!("{MIN}[priority]\netcd_latency_budget = {v}\n"));
        assert_eq!(load(MIN).unwrap().priority.etcd_latency_budget.multiple(), Some(1.25));
        assert_eq!(budget("2").unwrap().priority.etcd_latency_budget.multiple(), Some(2.0));
        assert_eq!(budget("\"off\"").unwrap().priority.etcd_latency_budget.multiple(), None);
        assert_eq!(budget("\"OFF\"").unwrap().priority.etcd_latency_budget.multiple(), None);
        for bad in ["1.0", "0.5", "1001", "\"fast\"", "\"1.5\"", "true", "[]"] {
            let e = budget(bad).unwrap_err();
            assert!(
                e.starts_with("config.toml: priority.etcd_latency_budget: invalid latency budget"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn passwords_in_urls_are_refused_without_echo() {
        let e = load("[[target]]\nurl = \"https://u:hunter2@dav.example/\"\n").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("target[0].url"), "{e}");
    }

    #[test]
    fn plain_http_etcd_needs_no_tls_files() {
        let s = load(&format!("{MIN}[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n")).unwrap();
        assert!(s.etcd.tls.is_none());
        let e = load(&format!(
            "{MIN}[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nca_file = \"/ca\"\n"
        ))
        .unwrap_err();
        assert!(
            e.starts_with("config.toml: etcd.ca_file: set, but the endpoints are plain http"),
            "{e}"
        );
        let e = load(&format!("{MIN}[etcd]\nca_file = \"/ca\"\ncert_file = \"/c\"\n")).unwrap_err();
        assert!(e.contains("etcd.key_file"), "{e}");
    }

    #[test]
    fn node_name_is_expanded_and_other_placeholders_refused() {
        let s = load(&format!(
            "{MIN}[snapshot]\nstaging_dir = \"/var/lib/x-{{node_name}}\"\n"
        ))
        .unwrap();
        assert_eq!(s.snapshot.staging_dir, Path::new("/var/lib/x-n1"));
        let e = load(&format!("{MIN}[snapshot]\nstaging_dir = \"/var/lib/{{node}}\"\n")).unwrap_err();
        assert!(
            e.starts_with("config.toml: snapshot.staging_dir: unknown placeholder \"{node}\""),
            "{e}"
        );
    }

    #[test]
    fn script_method_settings_and_empty_tls_paths_mean_unset() {
        let s = load(&format!(
            "{MIN}[snapshot]\nmethod = \"script\"\nscript_timeout = \"5m\"\n"
        ))
        .unwrap();
        assert_eq!(s.snapshot.method, SnapshotMethod::Script);
        assert_eq!(s.snapshot.script_timeout.0, std::time::Duration::from_secs(300));
        let e = load(&format!("{MIN}[snapshot]\nmethod = \"bash\"\n")).unwrap_err();
        assert!(e.starts_with("config.toml: snapshot.method: "), "{e}");
        let s = load(&format!(
            "{MIN}[etcd]\nca_file = \"\"\ncert_file = \"\"\nkey_file = \"\"\n"
        ))
        .unwrap();
        assert_eq!(s.etcd.tls.unwrap().ca_file, Path::new(OPENSHIFT_ETCD_CA));
    }

    #[test]
    fn empty_static_resources_dir_means_none() {
        let s = load(&format!("{MIN}[snapshot]\nstatic_resources_dir = \"\"\n")).unwrap();
        assert!(s.snapshot.static_resources_dir.is_none());
    }

    #[test]
    fn delivery_metrics_and_drill_keys_are_checked() {
        for (text, key) in [
            ("[delivery]\nmax_pending = 0\n", "delivery.max_pending"),
            ("[delivery]\nretry_interval = \"0s\"\n", "delivery.retry_interval"),
            ("[metrics]\nlisten = \"localhost\"\n", "metrics.listen"),
            ("[metrics]\ntextfile = \"rel.prom\"\n", "metrics.textfile"),
            ("[retention]\nmax_age = \"0s\"\n", "retention.max_age"),
            ("[verify]\nschedule = \"every night\"\n", "verify.schedule"),
            ("[import]\ndirs = [\"rel\"]\n", "import.dirs"),
        ] {
            let e = load(&format!("{MIN}{text}")).unwrap_err();
            assert!(e.starts_with(&format!("config.toml: {key}:")), "{text}: {e}");
        }
    }

    #[test]
    fn signing_is_on_with_a_key_file_or_enabled() {
        let key = |text: &str| load(&format!("{MIN}{text}")).map(|s| s.signing.map(|s| s.key_file));
        assert_eq!(key(""), Ok(None));
        assert_eq!(
            key("[signing]\nenabled = true\n"),
            Ok(Some(PathBuf::from("/var/lib/etcd-backupd/signing.key")))
        );
        assert_eq!(
            key("[signing]\nkey_file = \"/etc/etcd-backupd/{node_name}.key\"\n"),
            Ok(Some(PathBuf::from("/etc/etcd-backupd/n1.key")))
        );
        assert_eq!(key("[signing]\nenabled = false\nkey_file = \"/k\"\n"), Ok(None));
        for (text, key) in [
            ("[signing]\nkey_file = \"rel.key\"\n", "signing.key_file"),
            ("[signing]\nenabled = \"yes\"\n", "signing.enabled"),
            ("[signing]\nkey = \"/k\"\n", "signing"),
            ("[verify]\nallowed_signers = \"rel\"\n", "verify.allowed_signers"),
        ] {
            let e = load(&format!("{MIN}{text}")).unwrap_err();
            assert!(e.starts_with(&format!("config.toml: {key}")), "{text}: {e}");
        }
    }

    #[test]
    fn bad_recipients_and_levels_are_refused() {
        let e = load(&format!("{MIN}[encryption]\nage_recipients = [\"age1x\"]\n")).unwrap_err();
        assert!(e.starts_with("config.toml: encryption.age_recipients[0]:"), "{e}");
        assert!(e.contains("not an age recipient"), "{e}");
        let e = load(&format!("{MIN}[compression]\nzstd_level = 23\n")).unwrap_err();
        assert!(e.starts_with("config.toml: compression.zstd_level:"), "{e}");
    }

    #[test]
    fn target_rules() {
        let e = load("[[target]]\nurl = \"file:///a\"\nusername = \"u\"\n").unwrap_err();
        assert!(
            e.contains("target[0].username: does not apply to a file:// target"),
            "{e}"
        );
        let e = load("[[target]]\nname=\"a\"\nurl = \"file:///a\"\n[[target]]\nname=\"a\"\nurl = \"file:///b\"\n");
        assert_eq!(
            e.unwrap_err(),
            "config.toml: target[1].name: \"a\" is already used by target[0] in this file"
        );
        let s = load("node_name = \"m1\"\n[[target]]\nurl = \"file:///srv/{node_name}/x\"\n").unwrap();
        assert_eq!(s.targets[0].url.as_str(), "file:///srv/m1/x/");
        let e = load("[[target]]\nurl = \"ftp://x/\"\n").unwrap_err();
        assert!(e.contains("scheme 'ftp' is not supported"), "{e}");
        let e = load("[[target]]\nurl = \"https://x/\"\npassword_file = \"/p\"\n").unwrap_err();
        assert!(e.contains("target[0].password_file: needs username"), "{e}");
        let e = load("[[target]]\nurl = \"https://x/\"\nproxy = \"sometimes\"\n").unwrap_err();
        assert!(e.contains("target[0].proxy"), "{e}");
        let e = load("node_name = \"n\"\n").unwrap_err();
        assert!(e.contains("no [[target]]"), "{e}");
    }

    /// Split custody: which files each target holds, and the archive's own recipients.
    #[test]
    fn split_custody_is_checked() {
        let two = |a: &str, b: &str| {
            format!(
                "node_name = \"n1\"\n[[target]]\nname = \"a\"\nurl = \"file:///a\"\nfiles = {a}\n[[target]]\nname = \"b\"\nurl = \"file:///b\"\nfiles = {b}\n"
            )
        };
        let s = load(&two(r#"["snapshot"]"#, r#"["resources"]"#)).unwrap();
        let chosen = ["a".to_string(), "b".to_string()];
        assert_eq!(s.holders(&chosen, SetFile::Snapshot), ["a"]);
        assert_eq!(s.holders(&chosen, SetFile::Resources), ["b"]);
        let both = load(MIN).unwrap();
        assert!(
            both.holders(&["target-1".into()], SetFile::Resources).is_empty(),
            "not split: nothing recorded"
        );
        let e = load(&two(r#"["snapshot"]"#, r#"["snapshot"]"#)).unwrap_err();
        assert!(e.contains("no [[target]] holds \"resources\""), "{e}");
        let e = load(&two("[]", r#"["snapshot", "resources"]"#)).unwrap_err();
        assert!(e.contains("target[0].files: names no file"), "{e}");
        let e = load(&two(r#"["keys"]"#, r#"["snapshot"]"#)).unwrap_err();
        assert!(e.contains("files"), "{e}");
        let e = load(&format!("{MIN}[encryption]\nresources_recipients = [\"nope\"]\n")).unwrap_err();
        assert!(e.contains("encryption.resources_recipients[0]"), "{e}");
    }

    #[test]
    fn s3_targets_are_checked_key_by_key() {
        const S3: &str = "[[target]]\nurl = \"s3://etcd-backups/prod/{node_name}\"\nregion = \"eu-west-1\"\naccess_key_file = \"/etc/ak\"\nsecret_key_file = \"/etc/sk\"\n";
        let s = load(&format!("node_name = \"m0\"\n{S3}")).unwrap();
        let t = &s.targets[0];
        assert_eq!(t.url.as_str(), "s3://etcd-backups/prod/m0/");
        let s3 = t.s3().unwrap();
        assert_eq!(s3.endpoint.as_str(), "https://s3.eu-west-1.amazonaws.com/");
        assert!(!s3.path_style, "AWS: virtual-hosted by default");
        let names: Vec<&str> = t.secret_files().map(|(k, _)| k).collect();
        assert_eq!(names, ["access_key_file", "secret_key_file"]);
        let s = load(&format!("{S3}endpoint = \"http://10.0.0.5:9000\"\n")).unwrap();
        let s3 = s.targets[0].s3().unwrap();
        assert!(s3.path_style, "an endpoint: path style by default");
        assert_eq!(s3.endpoint.as_str(), "http://10.0.0.5:9000/");
        let s = load(&format!("{S3}endpoint = \"https://minio:9000\"\npath_style = false\n")).unwrap();
        assert!(!s.targets[0].s3().unwrap().path_style);

        let without = |key: &str| {
            S3.lines()
                .filter(|l| !l.starts_with(key))
                .collect::<Vec<_>>()
                .join("\n")
                + "\n"
        };
        for (text, key, why) in [
            (without("region"), "region", "required for an s3:// target"),
            (without("access_key_file"), "access_key_file", "required"),
            (without("secret_key_file"), "secret_key_file", "required"),
            (format!("{S3}endpoint = \"ftp://x\"\n"), "endpoint", "https://host"),
            (format!("{S3}endpoint = \"https://u:p@x\"\n"), "endpoint", "credentials"),
            (
                format!("{S3}endpoint = \"https://x/s3\"\n"),
                "endpoint",
                "without a path",
            ),
            (S3.replace("eu-west-1", "eu west"), "region", "not a region"),
            (
                format!("{S3}username = \"u\"\n"),
                "username",
                "does not apply to an s3:// target",
            ),
            (
                format!("{S3}password_file = \"/p\"\n"),
                "password_file",
                "does not apply",
            ),
            (format!("{S3}path_style = \"yes\"\n"), "path_style", ""),
            (
                S3.replace("etcd-backups", "Etcd_Backups"),
                "url",
                "not an S3 bucket name",
            ),
            (
                S3.replace("etcd-backups/", "etcd-backups:9000/"),
                "url",
                "takes no port",
            ),
            (S3.replace("prod/", ".prod/"), "url", "prefix segment"),
            (S3.replace("s3://", "s3://ak:sk@"), "url", "not allowed"),
            (S3.replace("etcd-backups", "etcd.backups"), "path_style", "has a '.'"),
            (
                "[[target]]\nurl = \"https://dav/\"\nregion = \"x\"\n".into(),
                "region",
                "applies only to an s3:// target",
            ),
            (
                "[[target]]\nurl = \"file:///srv\"\nsecret_key_file = \"/s\"\n".into(),
                "secret_key_file",
                "applies only",
            ),
            (
                "[[target]]\nurl = \"https://dav/\"\npath_style = true\n".into(),
                "path_style",
                "applies only",
            ),
        ] {
            let e = load(&format!("node_name = \"m0\"\n{text}")).unwrap_err();
            assert!(e.starts_with(&format!("config.toml: target[0].{key}")), "{text}: {e}");
            assert!(e.contains(why), "{text}: {e}");
            assert!(!e.contains('\n'), "{e}");
            assert!(!e.contains("sk@"), "the URL's secret is echoed: {e}");
        }
    }

    #[test]
    fn secret_files_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "secret").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = check_secret_file(&p).unwrap_err();
        assert!(e.contains("mode 0644") && !e.contains("secret\""), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_secret_file(&p).unwrap();
        assert!(check_secret_file(&dir.path().join("missing")).is_err());
    }
}
