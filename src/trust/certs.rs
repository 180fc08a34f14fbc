//! What a set's static resources archive says about restoring it, read at backup time from
//! the archive as written (`static-pod-resources/<component>-pod-<N>/...`):
//! - **restorable until**: the earliest notAfter of the leaf certificates under a
//!   `secrets/` directory (`secrets/*/tls.crt`, the etcd peer and serving certificates...).
//!   Restored past it, the static pods start with expired certificates and the cluster needs
//!   the platform's certificate-recovery procedure. CA certificates (basicConstraints
//!   `CA:TRUE`) are left out: bundles carry older CAs, expired or not, on purpose;
//! - each component's static pod revision, from the directory names.
//!
//! Nothing here fails a backup: a member that is no certificate, or one that does not
//! parse, is passed over (with a warning for the latter).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};

use crate::manifest::RestoreFacts;

/// Archive members larger than this are not read for certificates.
const MEMBER_CAP: u64 = 4 << 20;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveFacts {
    /// The earliest leaf notAfter and the member it is in.
    pub restorable_until: Option<(DateTime<Utc>, String)>,
    /// Components whose archived revision is unambiguous (one `<c>-pod-<N>` directory).
    pub static_pod_revisions: BTreeMap<String, u32>,
}

impl ArchiveFacts {
    pub fn restore_facts(&self) -> RestoreFacts {
        RestoreFacts {
            restorable_until: self
                .restorable_until
                .as_ref()
                .map(|(t, _)| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            restorable_until_source: self.restorable_until.as_ref().map(|(_, s)| s.clone()),
            static_pod_revisions: self.static_pod_revisions.clone(),
        }
    }
}

/// Reads the facts of the tar.gz at `path`.
pub fn read_archive(path: &Path) -> Result<ArchiveFacts> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open '{}'", path.display()))?;
    read_archive_from(std::io::BufReader::new(f)).with_context(|| format!("'{}'", path.display()))
}

/// The facts of the set's archive among `files` (by platform name) in `dir`, if it has one;
/// logged, and `RestoreFacts::default()` when it cannot be read.
pub fn facts_of_set(dir: &Path, files: &[crate::manifest::FileEntry]) -> RestoreFacts {
    let Some(archive) = files
        .iter()
        .find(|f| f.kind() == Some(crate::manifest::FileKind::Resources))
    else {
        return RestoreFacts::default();
    };
    match read_archive(&dir.join(&archive.stored_name)) {
        Ok(facts) => {
            if let Some((t, source)) = &facts.restorable_until {
                let left = *t - Utc::now();
                if left <= chrono::TimeDelta::zero() {
                    tracing::warn!(restorable_until = %t, source = %source, "the set's certificates have expired: a restore of it needs the platform's certificate recovery");
                } else if left < chrono::TimeDelta::days(7) {
                    tracing::warn!(restorable_until = %t, source = %source, "the set's certificates expire within 7 days");
                } else {
                    tracing::info!(restorable_until = %t, source = %source, "the set is restorable until its first certificate expires");
                }
            }
            facts.restore_facts()
        }
        Err(e) => {
            tracing::warn!(error = %crate::error::one_line(&e), "cannot read the certificates of the static resources archive; the manifest records no restorable_until");
            RestoreFacts::default()
        }
    }
}

pub fn read_archive_from(r: impl Read) -> Result<ArchiveFacts> {
    let mut facts = ArchiveFacts::default();
    let mut revisions: BTreeMap<String, std::collections::BTreeSet<u32>> = BTreeMap::new();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(r));
    for entry in archive.entries().context("not a tar archive")? {
        let mut entry = entry.context("corrupt tar archive")?;
        let name = entry
            .path()
            .context("corrupt tar archive")?
            .to_string_lossy()
            .into_owned();
        if let Some((component, rev)) = revision_of(&name) {
            revisions.entry(component).or_default().insert(rev);
        }
        if !entry.header().entry_type().is_file() || !in_secrets(&name) || entry.size() > MEMBER_CAP {
            continue;
        }
        let mut bytes = Vec::new();
        (&mut entry)
            .take(MEMBER_CAP)
            .read_to_end(&mut bytes)
            .context("corrupt tar archive")?;
        if let Some(t) = earliest_leaf_not_after(&bytes, &name)
            && facts.restorable_until.as_ref().is_none_or(|(e, _)| t < *e)
        {
            facts.restorable_until = Some((t, name.trim_start_matches("./").to_string()));
        }
    }
    // A component archived at several revisions (not the platform's script) has none.
    facts.static_pod_revisions = revisions
        .into_iter()
        .filter_map(|(c, revs)| {
            <[u32; 1]>::try_from(revs.into_iter().collect::<Vec<_>>())
                .ok()
                .map(|[r]| (c, r))
        })
        .collect();
    Ok(facts)
}

/// How close a set is to its restorable_until.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expiry {
    /// The set records none (no archive, or no certificates in it): never refused for it.
    Unknown,
    Valid {
        until: DateTime<Utc>,
        source: String,
    },
    /// Within [`SOON`].
    Soon {
        until: DateTime<Utc>,
        source: String,
    },
    Expired {
        until: DateTime<Utc>,
        source: String,
    },
}

/// A set whose certificates expire within this long is warned about.
pub const SOON: chrono::TimeDelta = chrono::TimeDelta::days(7);

pub fn expiry(m: &crate::manifest::Manifest, now: DateTime<Utc>) -> Expiry {
    let Some(until) = m.restorable_until() else {
        return Expiry::Unknown;
    };
    let source = m.restore.restorable_until_source.clone().unwrap_or_else(|| "?".into());
    if until <= now {
        Expiry::Expired { until, source }
    } else if until - now < SOON {
        Expiry::Soon { until, source }
    } else {
        Expiry::Valid { until, source }
    }
}

/// `2026-11-25 02:30 UTC`.
pub fn when(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

impl Expiry {
    /// Why `fetch` refuses the set, when its certificates have expired.
    pub fn refusal(&self) -> Option<String> {
        match self {
            Expiry::Expired { until, source } => Some(format!(
                "its certificates expired on {} ({source}): restored, the control plane would start with expired certificates and need the platform's certificate recovery procedure (--allow-expired-certificates to fetch it anyway)",
                when(until)
            )),
            _ => None,
        }
    }

    /// A warning when they expire soon.
    pub fn warning(&self, now: DateTime<Utc>) -> Option<String> {
        match self {
            Expiry::Soon { until, source } => Some(format!(
                "its certificates expire on {} ({source}), in {} hour(s): restore it before then, or use a newer set",
                when(until),
                (*until - now).num_hours()
            )),
            _ => None,
        }
    }

    /// What `fetch` and `verify` print about it.
    pub fn line(&self) -> Option<String> {
        match self {
            Expiry::Unknown => None,
            Expiry::Expired { until, source } => Some(format!("EXPIRED on {} ({source})", when(until))),
            Expiry::Valid { until, source } | Expiry::Soon { until, source } => {
                Some(format!("restorable until {} ({source})", when(until)))
            }
        }
    }

    /// The `list` cell: `YYYY-MM-DD`, marked when expired or soon; `-` when unknown.
    pub fn cell(&self) -> String {
        match self {
            Expiry::Unknown => "-".into(),
            Expiry::Valid { until, .. } => until.format("%Y-%m-%d").to_string(),
            Expiry::Soon { until, .. } => format!("{}(SOON)", until.format("%Y-%m-%d")),
            Expiry::Expired { until, .. } => format!("{}(EXPIRED)", until.format("%Y-%m-%d")),
        }
    }
}

/// `(component, N)` of a path under `static-pod-resources/<component>-pod-<N>/`.
fn revision_of(path: &str) -> Option<(String, u32)> {
    let mut parts = path.split('/').skip_while(|p| *p != "static-pod-resources");
    parts.next()?;
    let dir = parts.next()?;
    let (component, n) = dir.rsplit_once("-pod-")?;
    let n = n.parse().ok()?;
    (!component.is_empty()).then(|| (component.to_string(), n))
}

/// Is the member inside a revision directory's `secrets/`?
fn in_secrets(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    parts.len() > 1 && parts[..parts.len() - 1].contains(&"secrets")
}

/// The earliest notAfter of the non-CA certificates in a PEM text.
pub fn earliest_leaf_not_after(bytes: &[u8], name: &str) -> Option<DateTime<Utc>> {
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return None;
    }
    let mut earliest: Option<DateTime<Utc>> = None;
    for pem in x509_parser::pem::Pem::iter_from_buffer(bytes) {
        let Ok(pem) = pem else {
            tracing::warn!(member = %name, "a malformed PEM block; the rest of the file is passed over");
            break;
        };
        if pem.label != "CERTIFICATE" {
            continue;
        }
        let cert = match pem.parse_x509() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(member = %name, error = %e, "a certificate that does not parse is passed over");
                continue;
            }
        };
        match cert.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(member = %name, error = %e, "a certificate with malformed basic constraints is passed over");
                continue;
            }
        }
        let Some(t) = DateTime::from_timestamp(cert.validity().not_after.timestamp(), 0) else {
            continue;
        };
        if earliest.is_none_or(|e| t < e) {
            earliest = Some(t);
        }
    }
    earliest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(ca: bool, not_after: (i32, u8, u8)) -> String {
        let mut p = rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap();
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        if ca {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        p.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem()
    }

    fn tar_gz(members: &[(&str, &str)]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        {
            let mut t = tar::Builder::new(&mut gz);
            for (name, text) in members {
                let mut h = tar::Header::new_gnu();
                h.set_size(text.len() as u64);
                h.set_mode(0o600);
                h.set_cksum();
                t.append_data(&mut h, name, text.as_bytes()).unwrap();
            }
            t.finish().unwrap();
        }
        gz.finish().unwrap()
    }

    #[test]
    fn the_earliest_leaf_under_secrets_counts_not_cas_nor_configmaps() {
        let leaf_2030 = cert(false, (2030, 5, 1));
        let leaf_2031 = cert(false, (2031, 1, 1));
        let ca_2001 = cert(true, (2001, 1, 1));
        let chain = format!("{leaf_2031}{ca_2001}");
        let archive = tar_gz(&[
            (
                "static-pod-resources/etcd-pod-7/configmaps/ca/ca-bundle.crt",
                &cert(false, (2002, 1, 1)),
            ),
            (
                "static-pod-resources/etcd-pod-7/secrets/etcd-all-certs/peer.crt",
                &chain,
            ),
            (
                "static-pod-resources/kube-apiserver-pod-12/secrets/serving-cert/tls.crt",
                &leaf_2030,
            ),
            (
                "static-pod-resources/kube-apiserver-pod-12/secrets/serving-cert/tls.key",
                "not a cert",
            ),
            ("static-pod-resources/kube-apiserver-pod-12/secrets/ca/ca.crt", &ca_2001),
            (
                "static-pod-resources/kube-scheduler-pod-3/secrets/bad/tls.crt",
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            ),
            ("static-pod-resources/kube-controller-manager-pod-4/configmaps/x", "y"),
            ("static-pod-resources/kube-controller-manager-pod-5/configmaps/x", "y"),
        ]);
        let facts = read_archive_from(&archive[..]).unwrap();
        let (t, source) = facts.restorable_until.clone().unwrap();
        assert_eq!(t.to_rfc3339(), "2030-05-01T00:00:00+00:00");
        assert_eq!(
            source,
            "static-pod-resources/kube-apiserver-pod-12/secrets/serving-cert/tls.crt"
        );
        assert_eq!(
            facts.static_pod_revisions,
            BTreeMap::from([
                ("etcd".to_string(), 7),
                ("kube-apiserver".to_string(), 12),
                ("kube-scheduler".to_string(), 3)
            ])
        );
        let rf = facts.restore_facts();
        assert_eq!(rf.restorable_until.as_deref(), Some("2030-05-01T00:00:00Z"));

        // No certificates: nothing recorded.
        let plain = tar_gz(&[("static-pod-resources/etcd-pod-1/configmaps/x", "y")]);
        assert_eq!(read_archive_from(&plain[..]).unwrap().restorable_until, None);
        assert!(read_archive_from(&b"not gzip"[..]).is_err());
    }

    #[test]
    fn expiry_is_judged_against_now() {
        let mut m: crate::manifest::Manifest = serde_json::from_value(serde_json::json!({
            "format_version": 1, "id": "2026-11-25_023012", "created": "2026-11-25T02:30:12Z",
            "cluster_name": "c", "trigger": "manual", "node": "n", "openshift": null,
            "etcd": {"endpoint": "http://127.0.0.1:2379", "member_id": "1", "cluster_id": "2",
                     "version": "3.5.0", "revision": 1, "db_size": 1},
            "files": [], "tool": {"name": "etcd-backupd", "version": "0"},
        }))
        .unwrap();
        let now = DateTime::parse_from_rfc3339("2027-01-10T00:00:00Z").unwrap().to_utc();
        assert_eq!(expiry(&m, now), Expiry::Unknown);
        assert_eq!(expiry(&m, now).refusal(), None);
        m.restore.restorable_until_source = Some("s/tls.crt".into());
        let at = |t: &str, m: &mut crate::manifest::Manifest| {
            m.restore.restorable_until = Some(t.into());
            expiry(m, now)
        };
        let e = at("2027-01-09T00:00:00Z", &mut m);
        let why = e.refusal().unwrap();
        assert!(why.contains("expired on 2027-01-09 00:00 UTC (s/tls.crt)"), "{why}");
        assert_eq!(e.cell(), "2027-01-09(EXPIRED)");
        let e = at("2027-01-12T00:00:00Z", &mut m);
        assert_eq!(e.refusal(), None);
        assert!(e.warning(now).unwrap().contains("in 48 hour(s)"));
        let e = at("2027-03-01T00:00:00Z", &mut m);
        assert_eq!(
            (e.refusal(), e.warning(now), e.cell()),
            (None, None, "2027-03-01".to_string())
        );
    }
}
