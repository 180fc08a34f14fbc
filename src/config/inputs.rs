//! Stage 2: the merged configuration with every default filled in, deserialized from the
//! merged TOML table. Field names are the configuration keys; unknown keys are rejected.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::types::{FreeSpace, HumanDuration, LatencyBudget, Rate, Size};

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Inputs {
    /// Folder on the target; unset means the etcd cluster ID.
    pub cluster_name: Option<String>,
    /// This node in logs, manifests and the election; unset means the host name.
    pub node_name: Option<String>,
    pub etcd: EtcdInputs,
    pub snapshot: SnapshotInputs,
    pub schedule: ScheduleInputs,
    pub election: ElectionInputs,
    pub guards: GuardsInputs,
    pub priority: PriorityInputs,
    pub compression: CompressionInputs,
    pub encryption: EncryptionInputs,
    pub verify: VerifyInputs,
    pub signing: SigningInputs,
    pub import: ImportInputs,
    pub retention: RetentionInputs,
    pub delivery: DeliveryInputs,
    pub metrics: MetricsInputs,
    pub journal: JournalInputs,
    #[serde(rename = "target")]
    pub targets: Vec<TargetInputs>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdInputs {
    pub endpoints: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// How long to wait for a TCP+TLS connection to an endpoint.
    pub connect_timeout: HumanDuration,
    /// Deadline for each small request (status, get); also the longest pause allowed
    /// between two chunks of a snapshot stream.
    pub request_timeout: HumanDuration,
}

impl Default for EtcdInputs {
    fn default() -> Self {
        EtcdInputs {
            endpoints: vec!["https://localhost:2379".into()],
            // Unset: the OpenShift host's own files when the endpoints are https
            // (see `config::validate`); nothing for plain http.
            ca_file: None,
            cert_file: None,
            key_file: None,
            connect_timeout: HumanDuration(std::time::Duration::from_secs(10)),
            request_timeout: HumanDuration(std::time::Duration::from_secs(30)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotMethod {
    /// etcd's snapshot API, streamed by this process.
    Native,
    /// The platform's `cluster-backup.sh`.
    Script,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotInputs {
    pub method: SnapshotMethod,
    pub script: PathBuf,
    /// Source of `static_kuberesources_<ts>.tar.gz`; empty means none (plain etcd).
    pub static_resources_dir: PathBuf,
    pub staging_dir: PathBuf,
    /// `method = "script"`: how long the script may run before it is killed.
    pub script_timeout: HumanDuration,
    /// `method = "script"`: accept `__POSSIBLY_DIRTY__` files (`cluster-backup.sh --force`).
    pub allow_dirty: bool,
}

impl Default for SnapshotInputs {
    fn default() -> Self {
        SnapshotInputs {
            method: SnapshotMethod::Native,
            script: "/usr/local/bin/cluster-backup.sh".into(),
            static_resources_dir: "/etc/kubernetes".into(),
            staging_dir: "/var/lib/etcd-backupd".into(),
            script_timeout: HumanDuration(std::time::Duration::from_secs(30 * 60)),
            allow_dirty: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleInputs {
    pub cron: String,
    pub timezone: String,
    pub jitter: HumanDuration,
    pub after_upgrade: bool,
}

impl Default for ScheduleInputs {
    fn default() -> Self {
        ScheduleInputs {
            cron: "0 30 2 * * *".into(),
            timezone: "UTC".into(),
            jitter: HumanDuration(std::time::Duration::from_secs(600)),
            after_upgrade: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ElectionInputs {
    pub enabled: bool,
    pub prefix: String,
    pub lease_ttl: HumanDuration,
}

impl Default for ElectionInputs {
    fn default() -> Self {
        ElectionInputs {
            enabled: true,
            prefix: "/etcd-backupd".into(),
            lease_ttl: HumanDuration(std::time::Duration::from_secs(30)),
        }
    }
}

/// `[journal]`: the continuous journal of every revision between full sets (see
/// [`crate::journal`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalInputs {
    pub enabled: bool,
    /// A segment is cut and stored once its first revision is this old: the journal's RPO.
    pub segment_max_age: HumanDuration,
    /// ... or once its records reach this size (before compression).
    pub segment_max_bytes: Size,
}

impl Default for JournalInputs {
    fn default() -> Self {
        JournalInputs {
            enabled: false,
            // 10 s: the RPO goal is under 30 s, and a busy OpenShift cluster writes a
            // few hundred revisions per second, so a segment holds a few thousand revisions;
            // 8640 segments a day at most, each one object per target.
            segment_max_age: HumanDuration(std::time::Duration::from_secs(10)),
            // 16 MiB: a catching-up writer cuts here; well under every target's single-PUT
            // limit and quick to read back.
            segment_max_bytes: Size(16 << 20),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardsInputs {
    pub min_cluster_age: HumanDuration,
    pub skip_during_upgrade: bool,
    pub min_free_space: FreeSpace,
    /// When the cluster was installed (RFC 3339), for clusters without a ClusterVersion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub installed_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Default for GuardsInputs {
    fn default() -> Self {
        GuardsInputs {
            min_cluster_age: HumanDuration(std::time::Duration::from_secs(24 * 3600)),
            skip_during_upgrade: true,
            min_free_space: FreeSpace::TimesDbSize(2.0),
            installed_at: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoClass {
    Idle,
    BestEffort,
    None,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PriorityInputs {
    pub io_class: IoClass,
    pub nice: i32,
    /// The snapshot thread's nice value while the stream lasts; unset: `nice`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_nice: Option<i32>,
    pub upload_rate_limit: Rate,
    /// How much slower etcd may answer while the snapshot is pulled (`source::pace`).
    pub etcd_latency_budget: LatencyBudget,
}

impl Default for PriorityInputs {
    fn default() -> Self {
        PriorityInputs {
            io_class: IoClass::Idle,
            nice: 10,
            snapshot_nice: None,
            upload_rate_limit: Rate(None),
            etcd_latency_budget: LatencyBudget::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionInputs {
    pub zstd_level: i32,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionInputs {
    pub age_recipients: Vec<String>,
    pub age_recipients_file: Option<PathBuf>,
    /// Recipients of the static resources archive alone (it holds etcd's encryption keys
    /// when etcd encryption is on); unset with no file: the snapshot's recipients.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resources_recipients: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources_recipients_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifyInputs {
    /// Cron for a periodic restore drill of the newest set; empty = never.
    pub schedule: String,
    /// Where `etcd` and `etcdutl` (or, for etcd 3.4, `etcdctl`) are; empty = `PATH`.
    pub bin_dir: Option<PathBuf>,
    /// Where a drill restores the snapshot; empty = the system's temporary directory.
    pub scratch_dir: Option<PathBuf>,
    /// age identity for drills of encrypted sets (a secret: 0600).
    pub identity_file: Option<PathBuf>,
    /// An OpenSSH allowed_signers file: when set, `fetch`, `verify` and drills take only
    /// sets whose `manifest.json.sig` is by a key it lists for principal `etcd-backupd`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_signers: Option<PathBuf>,
}

/// `[signing]`: each node signs the sets it stores with its own Ed25519 key.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SigningInputs {
    /// Sign every set; unset means on exactly when `key_file` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// The node's OpenSSH Ed25519 private key (0600), created when missing; unset means
    /// `signing.key` in `snapshot.staging_dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImportInputs {
    pub dirs: Vec<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionInputs {
    pub keep_last: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    /// Sets older than this go even when a keep rule matches; unset = no cap.
    pub max_age: Option<HumanDuration>,
    /// Never fewer sets than this on a target (the newest ones).
    pub min_keep: u32,
}

impl Default for RetentionInputs {
    fn default() -> Self {
        RetentionInputs {
            keep_last: 7,
            keep_daily: 7,
            keep_weekly: 4,
            keep_monthly: 6,
            max_age: None,
            min_keep: 3,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsInputs {
    /// A node_exporter textfile-collector file (`.../etcd-backupd.prom`), rewritten
    /// atomically on every change; unset = none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub textfile: Option<PathBuf>,
    /// `ADDRESS:PORT` where the daemon answers `GET /metrics`; unset = none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// How soon a `listen` address that cannot be bound (the port taken, the address not on
    /// this host yet) is tried again.
    pub listen_retry: HumanDuration,
}

impl Default for MetricsInputs {
    fn default() -> Self {
        MetricsInputs {
            textfile: None,
            listen: None,
            listen_retry: HumanDuration(std::time::Duration::from_secs(30)),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryInputs {
    /// Verified sets kept in staging for targets that could not take them; the oldest
    /// beyond this are dropped (with an error in the journal).
    pub max_pending: u32,
    /// Delivered sets kept in staging for a fast local restore.
    pub keep_local: u32,
    /// First wait before retrying pending deliveries; doubles up to `retry_max`.
    pub retry_interval: HumanDuration,
    pub retry_max: HumanDuration,
}

impl Default for DeliveryInputs {
    fn default() -> Self {
        DeliveryInputs {
            max_pending: 3,
            keep_local: 1,
            retry_interval: HumanDuration(std::time::Duration::from_secs(5 * 60)),
            retry_max: HumanDuration(std::time::Duration::from_secs(2 * 3600)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyUpload {
    #[default]
    Size,
    ReadBack,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetInputs {
    /// Defaults to `target-<n>` (1-based, in merged order).
    pub name: Option<String>,
    pub url: String,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    #[serde(default = "default_proxy")]
    pub proxy: String,
    /// Password for a `proxy = "http://user@host:port"`.
    pub proxy_password_file: Option<PathBuf>,
    #[serde(default)]
    pub verify_upload: VerifyUpload,
    /// TCP + TLS connect, per attempt.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// The longest time without progress in either direction before an attempt is abandoned;
    /// there is no total limit, so a big upload over a slow link is never cut.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// Time this target may spend on retries within one run before it is given up.
    #[serde(default = "default_retry_budget")]
    pub retry_budget: HumanDuration,
    /// `s3://`: the S3 API's base URL; unset means AWS's regional endpoint.
    pub endpoint: Option<String>,
    /// `s3://`: the bucket's region (SigV4 signs it), required.
    pub region: Option<String>,
    /// `s3://`: the access key id, from a 0600 file.
    pub access_key_file: Option<PathBuf>,
    /// `s3://`: the secret access key, from a 0600 file.
    pub secret_key_file: Option<PathBuf>,
    /// `s3://`: `https://endpoint/bucket/` rather than `https://bucket.endpoint/`; unset
    /// means true with an `endpoint`, false without (AWS).
    pub path_style: Option<bool>,
    /// `s3://`: the size of each part of a multipart upload (files larger than one part).
    pub part_size: Option<Size>,
    /// The files of each set this target holds (default both): `snapshot`, `resources`.
    #[serde(default = "both_files")]
    pub files: Vec<SetFile>,
}

/// A file of a set, as `[[target]] files` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SetFile {
    /// `snapshot_<ts>.db`.
    Snapshot,
    /// `static_kuberesources_<ts>.tar.gz` (with etcd's encryption keys when etcd encryption
    /// is on).
    Resources,
}

fn both_files() -> Vec<SetFile> {
    vec![SetFile::Snapshot, SetFile::Resources]
}

fn default_proxy() -> String {
    "env".into()
}

fn default_connect_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(30))
}

fn default_idle_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(60))
}

fn default_retry_budget() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(180))
}
