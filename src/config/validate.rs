//! The third stage: typed inputs to [`Settings`], one function per domain (the zincati
//! pattern), each building its part from its own inputs. Every error names its key, and the
//! file it came from, through [`Merged::error_at`].

use std::path::{Path, PathBuf};
use std::str::FromStr;

use url::Url;

use crate::schedule::Schedule;

use super::inputs::TargetInputs;
use super::load::Merged;
use super::{
    DEFAULT_SIGNING_KEY, EtcdSettings, EtcdTls, FileSettings, Inputs, OPENSHIFT_ETCD_CA, OPENSHIFT_ETCD_CERT,
    OPENSHIFT_ETCD_KEY, ProxyMode, RemoteSettings, S3Settings, SetFile, Settings, SigningSettings, SnapshotSettings,
    TargetKind, TargetSettings, WebDavSettings, check_name, expand, host_name, missing_scheme, parse_target_url,
    s3_settings,
};

/// What every domain's check needs: the merged files (for the key's location) and the node
/// name (for `{node_name}`).
struct At<'a> {
    m: &'a Merged,
    node_name: &'a str,
}

impl At<'_> {
    fn err(&self, key: &str, msg: impl std::fmt::Display) -> String {
        self.m.error_at(key, msg)
    }

    fn path(&self, key: &str, p: &Path) -> Result<PathBuf, String> {
        expand(p, self.node_name).map_err(|e| self.err(key, e))
    }

    /// Unset or `""`: `None`.
    fn opt_path(&self, key: &str, p: &Option<PathBuf>) -> Result<Option<PathBuf>, String> {
        match p {
            Some(p) if !p.as_os_str().is_empty() => Ok(Some(self.path(key, p)?)),
            _ => Ok(None),
        }
    }

    fn absolute(&self, key: &str, p: Option<&Path>) -> Result<(), String> {
        match p {
            Some(p) if !p.is_absolute() => Err(self.err(key, "must be an absolute path")),
            _ => Ok(()),
        }
    }
}

pub(super) fn validate(inputs: Inputs, m: &Merged) -> Result<Settings, String> {
    let node_name = node_name(&inputs, m)?;
    let at = At {
        m,
        node_name: &node_name,
    };
    let etcd = etcd_settings(&at, &inputs)?;
    let snapshot = snapshot_settings(&at, &inputs)?;
    check_seal(&at, &inputs)?;
    let drill_schedule = check_operations(&at, &inputs)?;
    let signing = signing_settings(&at, &inputs, &snapshot.staging_dir)?;
    let backup_schedule = check_schedule_and_election(&at, &inputs)?;
    let (targets, secret_files) = targets(&at, &inputs)?;
    Ok(Settings {
        files: m.files.clone(),
        cluster_name: inputs.cluster_name,
        node_name,
        etcd,
        snapshot,
        schedule: inputs.schedule,
        election: inputs.election,
        guards: inputs.guards,
        priority: inputs.priority,
        retention: inputs.retention,
        delivery: inputs.delivery,
        metrics: inputs.metrics,
        journal: inputs.journal,
        import: inputs.import,
        compression: inputs.compression,
        encryption: inputs.encryption,
        verify: inputs.verify,
        signing,
        targets,
        secret_files,
        backup_schedule,
        drill_schedule,
    })
}

/// `node_name`, or the host name; and `cluster_name`, checked.
fn node_name(inputs: &Inputs, m: &Merged) -> Result<String, String> {
    let node_name = match &inputs.node_name {
        Some(n) => {
            check_name(n).map_err(|e| m.error_at("node_name", e))?;
            n.clone()
        }
        None => {
            let h = host_name()?;
            check_name(&h).map_err(|e| format!("node_name: the host name is not usable ({e}); set node_name"))?;
            h
        }
    };
    if let Some(c) = &inputs.cluster_name {
        check_name(c).map_err(|e| m.error_at("cluster_name", e))?;
    }
    Ok(node_name)
}

fn etcd_settings(at: &At, inputs: &Inputs) -> Result<EtcdSettings, String> {
    let e = &inputs.etcd;
    if e.endpoints.is_empty() {
        return Err(at.err("etcd.endpoints", "at least one endpoint is needed"));
    }
    let tls_files_set = [&e.ca_file, &e.cert_file, &e.key_file]
        .iter()
        .any(|p| p.as_ref().is_some_and(|p| !p.as_os_str().is_empty()));
    let endpoints = e
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, raw)| etcd_endpoint(at, &format!("etcd.endpoints[{i}]"), raw, tls_files_set))
        .collect::<Result<Vec<Url>, String>>()?;
    let https = endpoints[0].scheme() == "https";
    if endpoints.iter().any(|u| (u.scheme() == "https") != https) {
        return Err(at.err("etcd.endpoints", "mixes http:// and https:// endpoints"));
    }
    let tls = etcd_tls(at, inputs, https)?;
    if e.connect_timeout.0.is_zero() || e.request_timeout.0.is_zero() {
        return Err(at.err("etcd", "connect_timeout and request_timeout must be above zero"));
    }
    Ok(EtcdSettings {
        endpoints,
        tls,
        connect_timeout: e.connect_timeout,
        request_timeout: e.request_timeout,
    })
}

/// One of `etcd.endpoints`: `scheme://host:port`, nothing more.
fn etcd_endpoint(at: &At, key: &str, raw: &str, tls_files_set: bool) -> Result<Url, String> {
    // `host:port` as etcdctl takes it parses as no URL, or as one whose scheme is the host.
    if let Some(hint) = missing_scheme(raw, tls_files_set) {
        return Err(at.err(key, hint));
    }
    let u = Url::parse(raw).map_err(|err| at.err(key, err))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(at.err(
            key,
            format!("scheme '{}' is not supported; use https:// or http://", u.scheme()),
        ));
    }
    if u.host_str().is_none() || u.port_or_known_default().is_none() {
        return Err(at.err(key, "needs a host and port, e.g. https://localhost:2379"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(at.err(key, "credentials in the URL are not allowed"));
    }
    if !matches!(u.path(), "" | "/") || u.query().is_some() {
        return Err(at.err(key, "must be scheme://host:port only, without a path"));
    }
    Ok(u)
}

/// The TLS files of https:// endpoints (OpenShift's own when none is set); none with http://.
fn etcd_tls(at: &At, inputs: &Inputs, https: bool) -> Result<Option<EtcdTls>, String> {
    let e = &inputs.etcd;
    let ca = at.opt_path("etcd.ca_file", &e.ca_file)?;
    let cert = at.opt_path("etcd.cert_file", &e.cert_file)?;
    let key = at.opt_path("etcd.key_file", &e.key_file)?;
    if !https {
        for (k, v) in [
            ("etcd.ca_file", &ca),
            ("etcd.cert_file", &cert),
            ("etcd.key_file", &key),
        ] {
            if v.is_some() {
                return Err(at.err(
                    k,
                    "set, but the endpoints are plain http://; use https:// endpoints or remove it",
                ));
            }
        }
        return Ok(None);
    }
    // Unset or "" alike: the defaults apply only when none of the three is given.
    let (ca, cert, key) = if ca.is_none() && cert.is_none() && key.is_none() {
        // Nothing configured: the OpenShift control-plane host's own files.
        (
            Some(at.path("etcd.ca_file", Path::new(OPENSHIFT_ETCD_CA))?),
            Some(at.path("etcd.cert_file", Path::new(OPENSHIFT_ETCD_CERT))?),
            Some(at.path("etcd.key_file", Path::new(OPENSHIFT_ETCD_KEY))?),
        )
    } else {
        (ca, cert, key)
    };
    let ca_file = ca.ok_or_else(|| at.err("etcd.ca_file", "required with https:// endpoints"))?;
    if cert.is_some() != key.is_some() {
        let missing = if cert.is_none() {
            "etcd.cert_file"
        } else {
            "etcd.key_file"
        };
        return Err(at.err(missing, "cert_file and key_file go together; set both or neither"));
    }
    Ok(Some(EtcdTls {
        ca_file,
        cert_file: cert,
        key_file: key,
    }))
}

fn snapshot_settings(at: &At, inputs: &Inputs) -> Result<SnapshotSettings, String> {
    let s = &inputs.snapshot;
    let staging_dir = at.path("snapshot.staging_dir", &s.staging_dir)?;
    if !staging_dir.is_absolute() {
        return Err(at.err("snapshot.staging_dir", "must be an absolute path"));
    }
    let static_resources_dir = at.opt_path("snapshot.static_resources_dir", &Some(s.static_resources_dir.clone()))?;
    if static_resources_dir.as_ref().is_some_and(|p| !p.is_absolute()) {
        return Err(at.err(
            "snapshot.static_resources_dir",
            "must be an absolute path, or \"\" for none",
        ));
    }
    if s.script_timeout.0.is_zero() {
        return Err(at.err("snapshot.script_timeout", "must be above zero"));
    }
    Ok(SnapshotSettings {
        method: s.method,
        script: at.path("snapshot.script", &s.script)?,
        static_resources_dir,
        staging_dir,
        script_timeout: s.script_timeout,
        allow_dirty: s.allow_dirty,
    })
}

/// `[compression]` and `[encryption]`.
fn check_seal(at: &At, inputs: &Inputs) -> Result<(), String> {
    let level = inputs.compression.zstd_level;
    if !(0..=22).contains(&level) {
        return Err(at.err(
            "compression.zstd_level",
            format!("{level} is not a zstd level: 0 (off) or 1 to 22"),
        ));
    }
    for (i, r) in inputs.encryption.age_recipients.iter().enumerate() {
        crate::envelope::parse_recipient(r).map_err(|e| at.err(&format!("encryption.age_recipients[{i}]"), e))?;
    }
    for (i, r) in inputs.encryption.resources_recipients.iter().enumerate() {
        crate::envelope::parse_recipient(r).map_err(|e| at.err(&format!("encryption.resources_recipients[{i}]"), e))?;
    }
    at.absolute(
        "encryption.resources_recipients_file",
        inputs.encryption.resources_recipients_file.as_deref(),
    )?;
    at.absolute(
        "encryption.age_recipients_file",
        inputs.encryption.age_recipients_file.as_deref(),
    )
}

/// `[verify]` (its drill schedule, returned), `[metrics]`, `[retention]`, `[delivery]` and
/// `[import]`.
fn check_operations(at: &At, inputs: &Inputs) -> Result<Option<Schedule>, String> {
    let drills = match inputs.verify.schedule.as_str() {
        "" => None,
        cron => Some(
            Schedule::new(cron, &inputs.schedule.timezone, std::time::Duration::ZERO)
                .map_err(|e| at.err("verify.schedule", e))?,
        ),
    };
    at.absolute("verify.allowed_signers", inputs.verify.allowed_signers.as_deref())?;
    if let Some(listen) = &inputs.metrics.listen
        && listen.parse::<std::net::SocketAddr>().is_err()
    {
        return Err(at.err(
            "metrics.listen",
            format!("{listen:?} is not ADDRESS:PORT (e.g. \"127.0.0.1:9983\")"),
        ));
    }
    at.absolute("metrics.textfile", inputs.metrics.textfile.as_deref())?;
    if inputs.metrics.listen_retry.0 < std::time::Duration::from_secs(1) {
        return Err(at.err("metrics.listen_retry", "must be at least 1s"));
    }
    if inputs.retention.max_age.is_some_and(|d| d.0.is_zero()) {
        return Err(at.err("retention.max_age", "must be above zero (leave it out for no cap)"));
    }
    if inputs.delivery.max_pending == 0 {
        return Err(at.err(
            "delivery.max_pending",
            "must be at least 1 (the set just taken waits there when a target is down)",
        ));
    }
    for (k, d) in [
        ("delivery.retry_interval", inputs.delivery.retry_interval),
        ("delivery.retry_max", inputs.delivery.retry_max),
    ] {
        if d.0.is_zero() {
            return Err(at.err(k, "must be above zero"));
        }
    }
    if let Some(bad) = inputs.import.dirs.iter().find(|d| !d.is_absolute()) {
        return Err(at.err("import.dirs", format!("'{}' must be an absolute path", bad.display())));
    }
    Ok(drills)
}

/// `[signing]`: on when a key file is set or `enabled = true` (then in staging).
fn signing_settings(at: &At, inputs: &Inputs, staging_dir: &Path) -> Result<Option<SigningSettings>, String> {
    let signing_key = at.opt_path("signing.key_file", &inputs.signing.key_file)?;
    at.absolute("signing.key_file", signing_key.as_deref())?;
    Ok(match (inputs.signing.enabled, signing_key) {
        (Some(false), _) | (None, None) => None,
        (_, Some(key_file)) => Some(SigningSettings { key_file }),
        (Some(true), None) => Some(SigningSettings {
            key_file: staging_dir.join(DEFAULT_SIGNING_KEY),
        }),
    })
}

/// `[schedule]` (the backup schedule, returned), `[election]` and `[priority]`: checked
/// here so check-config catches them before the daemon.
/// `[journal]`: one writer per cluster, elected through etcd; segment bounds in range.
fn check_journal(at: &At, inputs: &Inputs) -> Result<(), String> {
    let j = &inputs.journal;
    if !j.enabled {
        return Ok(());
    }
    if !inputs.election.enabled {
        return Err(at.err(
            "journal.enabled",
            "needs election.enabled = true: the journal's one writer is elected through etcd",
        ));
    }
    let age = j.segment_max_age.0;
    if age < std::time::Duration::from_secs(1) || age > std::time::Duration::from_secs(600) {
        return Err(at.err(
            "journal.segment_max_age",
            format!("{} is outside 1s..10m", j.segment_max_age),
        ));
    }
    if !(64 << 10..=256 << 20).contains(&j.segment_max_bytes.0) {
        return Err(at.err(
            "journal.segment_max_bytes",
            format!("{} is outside 64KiB..256MiB", j.segment_max_bytes),
        ));
    }
    Ok(())
}

fn check_schedule_and_election(at: &At, inputs: &Inputs) -> Result<Option<Schedule>, String> {
    if chrono_tz::Tz::from_str(&inputs.schedule.timezone).is_err() {
        return Err(at.err(
            "schedule.timezone",
            format!(
                "{:?} is not an IANA time zone name (e.g. \"UTC\", \"Europe/Berlin\")",
                inputs.schedule.timezone
            ),
        ));
    }
    // Empty: this host takes no backups (a drill host with only a target configured).
    let schedule = match inputs.schedule.cron.as_str() {
        "" => None,
        cron => Some(
            Schedule::new(cron, &inputs.schedule.timezone, inputs.schedule.jitter.0)
                .map_err(|e| at.err("schedule.cron", e))?,
        ),
    };
    let prefix = &inputs.election.prefix;
    if !prefix.starts_with('/') || prefix.len() < 2 || prefix.ends_with('/') || prefix.starts_with("/kubernetes.io") {
        return Err(at.err(
            "election.prefix",
            format!("{prefix:?} must start with '/', not end with '/', and stay out of /kubernetes.io"),
        ));
    }
    if inputs.election.lease_ttl.0.as_secs() < 2 {
        return Err(at.err("election.lease_ttl", "must be at least 2s"));
    }
    check_journal(at, inputs)?;
    if !(-20..=19).contains(&inputs.priority.nice) {
        return Err(at.err("priority.nice", format!("{} is outside -20..19", inputs.priority.nice)));
    }
    if let Some(n) = inputs.priority.snapshot_nice
        && !(-20..=19).contains(&n)
    {
        return Err(at.err("priority.snapshot_nice", format!("{n} is outside -20..19")));
    }
    Ok(schedule)
}

/// Every `[[target]]`, and each secret file with where it was configured.
type Targets = (Vec<TargetSettings>, Vec<(String, PathBuf)>);

fn targets(at: &At, inputs: &Inputs) -> Result<Targets, String> {
    if inputs.targets.is_empty() {
        return Err(match at.m.files.first() {
            Some(f) => format!(
                "{}: no [[target]]: add one with a url (https://... or file:///...)",
                f.display()
            ),
            None => "no [[target]]: add one with a url".into(),
        });
    }
    let mut targets: Vec<TargetSettings> = Vec::new();
    let mut secret_files = Vec::new();
    for (i, t) in inputs.targets.iter().enumerate() {
        let key = |k: &str| format!("target[{i}].{k}");
        let target = target(at, i, t)?;
        if targets.iter().any(|o| o.name == target.name) {
            return Err(at.err(&key("name"), format!("{:?} is used by two targets", target.name)));
        }
        check_timeouts(at, i, &target)?;
        for (k, path) in target.secret_files() {
            secret_files.push((at.m.locate(&key(k)), path.to_path_buf()));
        }
        targets.push(target);
    }
    // A file no target holds would never be stored: every set would lack it. The archive
    // exists only with static resources, the script method or imports.
    let archive = !inputs.snapshot.static_resources_dir.as_os_str().is_empty()
        || inputs.snapshot.method == super::SnapshotMethod::Script
        || !inputs.import.dirs.is_empty();
    for (file, needed) in [(SetFile::Snapshot, true), (SetFile::Resources, archive)] {
        if needed && !targets.iter().any(|t| t.files.contains(&file)) {
            let word = serde_json::to_string(&file).unwrap_or_default();
            return Err(at.err(
                "target",
                format!("no [[target]] holds {word}: add it to some target's files"),
            ));
        }
    }
    Ok((targets, secret_files))
}

/// One `[[target]]` (`target[i]`), built from its inputs: the settings of its kind only.
fn target(at: &At, i: usize, t: &TargetInputs) -> Result<TargetSettings, String> {
    let key = |k: &str| format!("target[{i}].{k}");
    let name = t.name.clone().unwrap_or_else(|| format!("target-{}", i + 1));
    check_name(&name).map_err(|e| at.err(&key("name"), e))?;
    let raw_url = t.url.replace("{node_name}", at.node_name);
    let url = parse_target_url(&raw_url).map_err(|e| at.err(&key("url"), e))?;
    let p = |k: &str, v: &Option<PathBuf>| at.opt_path(&key(k), v);
    let keys = (
        p("access_key_file", &t.access_key_file)?,
        p("secret_key_file", &t.secret_key_file)?,
    );
    let s3 = s3_settings(t, &url, keys).map_err(|(k, e)| at.err(&key(k), e))?;
    let (user, password, token) = (
        t.username.as_ref().is_some_and(|u| !u.is_empty()),
        p("password_file", &t.password_file)?.is_some(),
        p("token_file", &t.token_file)?.is_some(),
    );
    let kind = match (url.scheme(), s3) {
        ("file", _) => {
            let remote_only = [
                ("proxy", t.proxy != "env"),
                ("username", user),
                ("password_file", password),
                ("token_file", token),
                ("ca_file", p("ca_file", &t.ca_file)?.is_some()),
                (
                    "client_cert_file",
                    p("client_cert_file", &t.client_cert_file)?.is_some(),
                ),
                ("client_key_file", p("client_key_file", &t.client_key_file)?.is_some()),
                (
                    "proxy_password_file",
                    p("proxy_password_file", &t.proxy_password_file)?.is_some(),
                ),
            ];
            if let Some((k, _)) = remote_only.iter().find(|(_, set)| *set) {
                return Err(at.err(&key(k), "does not apply to a file:// target"));
            }
            TargetKind::File(FileSettings::default())
        }
        (_, Some(s3)) => {
            let webdav_only = [("username", user), ("password_file", password), ("token_file", token)];
            if let Some((k, _)) = webdav_only.iter().find(|(_, set)| *set) {
                return Err(at.err(
                    &key(k),
                    "does not apply to an s3:// target; use access_key_file and secret_key_file",
                ));
            }
            TargetKind::S3(S3Settings {
                remote: remote(at, i, t)?,
                ..s3
            })
        }
        (_, None) => TargetKind::WebDav(webdav(at, i, t)?),
    };
    let mut files = t.files.clone();
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(at.err(
            &key("files"),
            "names no file; use [\"snapshot\", \"resources\"] or one of them",
        ));
    }
    Ok(TargetSettings {
        name,
        url,
        files,
        verify_upload: t.verify_upload,
        connect_timeout: t.connect_timeout,
        idle_timeout: t.idle_timeout,
        retry_budget: t.retry_budget,
        kind,
    })
}

/// A WebDAV target's credentials: Basic (`username` and `password_file`), Bearer
/// (`token_file`) or none.
fn webdav(at: &At, i: usize, t: &TargetInputs) -> Result<WebDavSettings, String> {
    let key = |k: &str| format!("target[{i}].{k}");
    let dav = WebDavSettings {
        username: t.username.clone().filter(|u| !u.is_empty()),
        password_file: at.opt_path(&key("password_file"), &t.password_file)?,
        token_file: at.opt_path(&key("token_file"), &t.token_file)?,
        remote: remote(at, i, t)?,
    };
    let (user, password, token) = (
        dav.username.is_some(),
        dav.password_file.is_some(),
        dav.token_file.is_some(),
    );
    if password && !user {
        return Err(at.err(&key("password_file"), "needs username"));
    }
    if token && user {
        return Err(at.err(
            &key("username"),
            "does not go with token_file (Bearer auth has no user name)",
        ));
    }
    if password && token {
        return Err(at.err(&key("token_file"), "use either password_file or token_file, not both"));
    }
    Ok(dav)
}

/// How a remote target is reached: its CA, client certificate and proxy.
fn remote(at: &At, i: usize, t: &TargetInputs) -> Result<RemoteSettings, String> {
    let key = |k: &str| format!("target[{i}].{k}");
    let p = |k: &str, v: &Option<PathBuf>| at.opt_path(&key(k), v);
    let remote = RemoteSettings {
        ca_file: p("ca_file", &t.ca_file)?,
        client_cert_file: p("client_cert_file", &t.client_cert_file)?,
        client_key_file: p("client_key_file", &t.client_key_file)?,
        proxy: ProxyMode::parse(&t.proxy).map_err(|e| at.err(&key("proxy"), e))?,
        proxy_password_file: p("proxy_password_file", &t.proxy_password_file)?,
    };
    if remote.client_cert_file.is_some() != remote.client_key_file.is_some() {
        return Err(at.err(
            &key("client_cert_file"),
            "client_cert_file and client_key_file go together",
        ));
    }
    match (&remote.proxy, remote.proxy_password_file.is_some()) {
        (ProxyMode::Env | ProxyMode::None, true) => {
            Err(at.err(&key("proxy_password_file"), "needs an explicit proxy URL"))
        }
        (ProxyMode::Url(u, _), true) if u.username().is_empty() => Err(at.err(
            &key("proxy_password_file"),
            "needs a user name in proxy (http://user@host:port)",
        )),
        _ => Ok(remote),
    }
}

/// The timeouts of `target[i]`.
fn check_timeouts(at: &At, i: usize, target: &TargetSettings) -> Result<(), String> {
    for (k, d) in [
        ("connect_timeout", target.connect_timeout),
        ("idle_timeout", target.idle_timeout),
    ] {
        if d.0.is_zero() {
            return Err(at.err(&format!("target[{i}].{k}"), "must be above zero"));
        }
    }
    Ok(())
}
