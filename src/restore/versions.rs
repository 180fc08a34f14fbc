//! The version rules of a restore: a set must come from the z-stream the cluster runs.

use anyhow::{Result, bail};

use crate::config::Settings;

/// What the ClusterVersion says about the cluster's version: the facts the z-stream rule
/// needs. All `None` when the etcd holds no ClusterVersion (not OpenShift).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionFacts {
    /// `status.desired.version`: what the cluster runs, or is moving to.
    pub desired: Option<String>,
    /// The newest `status.history` entry: its `state` (`Completed` | `Partial`) and version.
    pub newest: Option<(String, String)>,
    /// The newest history entry whose state is `Completed`.
    pub last_completed: Option<String>,
}

impl VersionFacts {
    /// Reads the facts out of the ClusterVersion JSON; missing fields stay `None`.
    pub fn of(cv: &serde_json::Value) -> VersionFacts {
        let text = |v: Option<&serde_json::Value>| {
            v.and_then(serde_json::Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let history = cv
            .pointer("/status/history")
            .and_then(serde_json::Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let newest = history
            .first()
            .and_then(|h| Some((text(h.get("state")).unwrap_or_default(), text(h.get("version"))?)));
        let last_completed = history
            .iter()
            .find(|h| h.get("state").and_then(serde_json::Value::as_str) == Some("Completed"))
            .and_then(|h| text(h.get("version")));
        VersionFacts {
            desired: text(cv.pointer("/status/desired/version")),
            newest,
            last_completed,
        }
    }
}

/// The running cluster's version facts, read from etcd when it answers in time; `None`
/// when it holds no (readable) ClusterVersion.
pub async fn version_facts(settings: &Settings) -> Result<Option<VersionFacts>> {
    let within = settings.etcd.connect_timeout.0 + settings.etcd.request_timeout.0;
    let read = async {
        let (mut member, _) = crate::etcd::connect_first(&settings.etcd).await?;
        let raw = member.get(crate::etcd::CLUSTER_VERSION_KEY).await?;
        Ok::<_, anyhow::Error>(raw.and_then(|b| match serde_json::from_slice(&b) {
            Ok(v) => Some(VersionFacts::of(&v)),
            Err(_) => {
                tracing::warn!("the ClusterVersion object in etcd is not JSON; ignoring it");
                None
            }
        }))
    };
    match tokio::time::timeout(within, read).await {
        Ok(r) => r,
        Err(_) => bail!("etcd did not answer within {}", humantime::format_duration(within)),
    }
}

/// The same-z-stream rule for a set taken on OpenShift `set`. `Ok` with the rule that
/// accepted it (none when either version is unknown), `Err` with the refusal, which always
/// names a version a set can exist for.
///
/// A cluster at a completed version (newest history entry `Completed` and the desired version
/// equal to it) takes a set of that version only. A cluster that is not (a failed or running
/// upgrade: newest entry `Partial`, or the desired version differs from it) takes a set of
/// its last `Completed` version, the one its control plane's static resources and data came
/// from (the way back from a failed upgrade), and one of the version being installed.
pub fn check_versions(set: Option<&str>, cluster: &VersionFacts) -> Result<Option<String>, String> {
    let Some(s) = set else { return Ok(None) };
    let newest = cluster.newest.as_ref();
    let Some(target) = cluster.desired.as_deref().or(newest.map(|(_, v)| v.as_str())) else {
        return Ok(None);
    };
    let settled = newest.is_none_or(|(state, version)| state != "Partial" && version == target);
    if settled {
        if s == target {
            return Ok(Some(format!(
                "the cluster runs {target}: a set of the same release is accepted"
            )));
        }
        return Err(format!(
            "the set was taken on OpenShift {s} but the cluster runs {target}; a restore needs a backup of the same release (use a set taken on {target}, or --allow-version-mismatch if you know why)"
        ));
    }
    let from = cluster.last_completed.as_deref();
    let state = match from {
        Some(f) if f != target => format!("the cluster is upgrading from {f} to {target} (not completed)"),
        Some(_) => format!("the cluster's update to {target}, its last completed version, is not completed"),
        None => format!("the cluster is moving to {target} and has no completed version yet"),
    };
    if Some(s) == from {
        return Ok(Some(format!(
            "{state}: a set of {s}, the last completed version, is accepted"
        )));
    }
    if s == target {
        return Ok(Some(format!(
            "{state}: a set of {s}, the version being installed, is accepted"
        )));
    }
    let wanted = match from {
        Some(f) if f != target => {
            format!("a set taken on {f}, the last completed version, or on {target}, the version being installed")
        }
        _ => format!("a set taken on {target}"),
    };
    Err(format!(
        "the set was taken on OpenShift {s} but {state}; a restore needs {wanted} (or --allow-version-mismatch if you know why)"
    ))
}

// ---- the restore drill ----
