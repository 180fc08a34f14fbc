//! The restore drill (`verify --deep`): the set restored into a throwaway etcd, which must
//! start and serve the keys the snapshot holds.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

use crate::config::Settings;
use crate::manifest::FileKind;

use super::fetch::download;
use super::locate::Located;

/// What a restore drill found.
#[derive(Debug, Clone, Serialize)]
pub struct Drill {
    pub id: String,
    pub etcd_version: String,
    pub revision: i64,
    pub keys: i64,
    pub kubernetes_keys: i64,
    pub namespaces: i64,
    pub cluster_version: Option<String>,
    /// The whole drill: fetch, checks, restore, start and the reads of the restored etcd.
    pub seconds: f64,
    /// From the drill's start until the restored etcd answered: fetching the set from its
    /// target and checking it (signature, checksums, decryption and decompression), `snapshot restore`, and
    /// starting etcd on the restored data (a measured RTO for one member).
    pub restore_seconds: f64,
    /// The target the set came from.
    pub target: String,
    /// The set's creation time (RFC 3339, UTC).
    pub set_created: String,
    /// `verify --at`: the set was rolled forward along the journal to this moment first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rolled_forward: Option<super::at::Reached>,
}

pub(super) fn find_tool(settings: &Settings, name: &str) -> Option<PathBuf> {
    if let Some(dir) = &settings.verify.bin_dir {
        let p = dir.join(name);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

pub(super) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A throwaway etcd: killed and waited for when dropped.
pub(super) struct Throwaway(std::process::Child);

impl Drop for Throwaway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(super) fn run_tool(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        bail!("{what} failed ({}): {}", out.status, last.trim());
    }
    Ok(())
}

/// The etcd tools a drill runs: `etcd`, and `etcdutl` (3.5+) or `etcdctl` (3.4) to restore.
pub(super) struct Tools {
    etcd: PathBuf,
    restorer: PathBuf,
    is_etcdutl: bool,
}

impl Tools {
    pub(super) fn find(settings: &Settings) -> Result<Tools> {
        let etcd = find_tool(settings, "etcd").ok_or_else(|| {
            anyhow!("the restore drill needs the etcd binary (set verify.bin_dir, or put it in PATH)")
        })?;
        let (restorer, is_etcdutl) = match find_tool(settings, "etcdutl") {
            Some(p) => (p, true),
            None => (
                find_tool(settings, "etcdctl").ok_or_else(|| {
                    anyhow!("the restore drill needs etcdutl (etcd 3.5+) or etcdctl (3.4) (set verify.bin_dir, or put it in PATH)")
                })?,
                false,
            ),
        };
        Ok(Tools {
            etcd,
            restorer,
            is_etcdutl,
        })
    }

    /// Whether this etcd takes `flag` (its `--help` names it).
    pub(super) fn etcd_takes(&self, flag: &str) -> bool {
        Command::new(&self.etcd)
            .arg("--help")
            .stdin(Stdio::null())
            .output()
            .map(|o| {
                let text = [o.stdout, o.stderr].concat();
                String::from_utf8_lossy(&text).contains(flag)
            })
            .unwrap_or(false)
    }

    /// The store revision `snapshot` holds, as `snapshot status` reads it.
    pub(super) async fn snapshot_revision(&self, snapshot: &Path) -> Result<i64> {
        let mut cmd = Command::new(&self.restorer);
        if !self.is_etcdutl {
            cmd.env("ETCDCTL_API", "3");
        }
        cmd.args(["snapshot", "status", "-w", "json"])
            .arg(snapshot)
            .stdin(Stdio::null());
        let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
        if !out.status.success() {
            bail!(
                "snapshot status failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("snapshot status: not JSON")?;
        v["revision"]
            .as_i64()
            .ok_or_else(|| anyhow!("snapshot status: no revision"))
    }

    /// `snapshot restore` of `snapshot` into `data`, as the one member `drill` at `peer`.
    pub(super) async fn restore(&self, snapshot: &Path, data: &Path, peer: &str) -> Result<()> {
        let mut restore = Command::new(&self.restorer);
        if !self.is_etcdutl {
            restore.env("ETCDCTL_API", "3");
        }
        restore
            .arg("snapshot")
            .arg("restore")
            .arg(snapshot)
            .arg("--data-dir")
            .arg(data)
            .args(["--name", "drill", "--initial-cluster"])
            .arg(format!("drill={peer}"))
            .arg("--initial-advertise-peer-urls")
            .arg(peer);
        let tool = self
            .restorer
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        crate::notify::status(&format!("restore drill: {tool} snapshot restore"));
        tokio::task::spawn_blocking(move || run_tool(&mut restore, &format!("{tool} snapshot restore"))).await?
    }

    /// Starts etcd on the restored `data` (its log in `scratch`, `extra` flags after the
    /// usual ones) and waits, up to 60 s, for it to answer.
    pub(super) async fn serve(
        &self,
        scratch: &Path,
        data: &Path,
        (peer, client): (&str, &str),
        extra: &[&str],
    ) -> Result<(Throwaway, etcd_client::Client)> {
        let log = std::fs::File::create(scratch.join("etcd.log"))?;
        let child = Command::new(&self.etcd)
            .args(["--name", "drill", "--data-dir"])
            .arg(data)
            .args(["--listen-client-urls", client, "--advertise-client-urls", client])
            .args(["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer])
            .arg("--initial-cluster")
            .arg(format!("drill={peer}"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start '{}'", self.etcd.display()))?;
        let mut etcd = Throwaway(child);
        crate::notify::status("restore drill: reading the restored etcd");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = etcd.0.try_wait() {
                let log = std::fs::read_to_string(scratch.join("etcd.log")).unwrap_or_default();
                let last = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
                bail!("the throwaway etcd exited ({status}) on the restored data: {last}");
            }
            let opts = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(2))
                .with_timeout(Duration::from_secs(10));
            if let Ok(mut c) = etcd_client::Client::connect([client], Some(opts)).await
                && c.status().await.is_ok()
            {
                return Ok((etcd, c));
            }
            if Instant::now() > deadline {
                bail!("the throwaway etcd did not answer within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// What the restored etcd serves.
struct Served {
    etcd_version: String,
    revision: i64,
    keys: i64,
    kubernetes_keys: i64,
    namespaces: i64,
    cluster_version: Option<String>,
}

impl Served {
    async fn read(client: &mut etcd_client::Client) -> Result<Served> {
        let status = client.status().await?;
        let count = |prefix: &str| {
            let mut c = client.clone();
            let prefix = prefix.to_string();
            async move {
                let (key, opts) = if prefix.is_empty() {
                    (
                        vec![0u8],
                        etcd_client::GetOptions::new().with_all_keys().with_count_only(),
                    )
                } else {
                    (
                        prefix.into_bytes(),
                        etcd_client::GetOptions::new().with_prefix().with_count_only(),
                    )
                };
                let r = c.get(key, Some(opts)).await?;
                Ok::<_, anyhow::Error>((r.count(), r.header().map(|h| h.revision()).unwrap_or(0)))
            }
        };
        let (keys, revision) = count("").await?;
        let (kubernetes_keys, _) = count("/kubernetes.io/").await?;
        let (namespaces, _) = count("/kubernetes.io/namespaces/").await?;
        let cv = client.get(crate::etcd::CLUSTER_VERSION_KEY, None).await?;
        let cluster_version = cv.kvs().first().map(|kv| {
            crate::etcd::parse_cluster_version(kv.value())
                .version
                .unwrap_or_default()
        });
        Ok(Served {
            etcd_version: status.version().to_string(),
            revision,
            keys,
            kubernetes_keys,
            namespaces,
            cluster_version,
        })
    }

    /// What the set's manifest says the restored etcd must hold.
    fn check(&self, m: &crate::manifest::Manifest) -> Result<()> {
        if self.revision < m.etcd.revision {
            bail!(
                "the restored etcd is at revision {}, below the {} the manifest records",
                self.revision,
                m.etcd.revision
            );
        }
        if m.openshift.is_some() {
            if self.cluster_version.is_none() {
                bail!("the restored etcd holds no ClusterVersion, but the set was taken on OpenShift");
            }
            if self.namespaces == 0 {
                bail!("the restored etcd holds no /kubernetes.io/namespaces/ keys");
            }
        }
        Ok(())
    }
}

/// The restore drill: fetch the set into a scratch directory, restore the snapshot with
/// the etcd tooling, start a throwaway etcd on loopback, and read what it serves.
pub async fn drill(settings: &Settings, located: &Located, at: Option<&super::at::AtPlan>) -> Result<Drill> {
    let started = Instant::now();
    let tools = Tools::find(settings)?;
    let scratch_parent = settings.verify.scratch_dir.clone().unwrap_or_else(std::env::temp_dir);
    let scratch = tempfile::Builder::new()
        .prefix("etcd-backupd-drill-")
        .tempdir_in(&scratch_parent)
        .with_context(|| format!("verify.scratch_dir '{}'", scratch_parent.display()))?;
    let mut files = download(located, scratch.path(), &[]).await?;
    let rolled_forward = match at {
        Some(at) => Some(super::at::roll_forward(settings, located, at, scratch.path(), &mut files).await?),
        None => None,
    };
    let snapshot = files
        .iter()
        .find(|(c, _)| c.kind() == Some(FileKind::Snapshot))
        .map(|(_, p)| p.clone())
        .ok_or_else(|| anyhow!("the set has no snapshot"))?;
    let data = scratch.path().join("data");
    let (client_port, peer_port) = (free_port()?, free_port()?);
    let peer = format!("http://127.0.0.1:{peer_port}");
    let client = format!("http://127.0.0.1:{client_port}");
    // Ended when the drill returns: it covers the restore and the throwaway etcd's start.
    let _phase = crate::progress::Phase::start("restore drill", None);
    tools.restore(&snapshot, &data, &peer).await?;
    let (etcd, mut conn) = tools.serve(scratch.path(), &data, (&peer, &client), &[]).await?;
    let serving = started.elapsed();
    let served = Served::read(&mut conn).await?;
    drop(etcd);
    let m = &located.manifest;
    served.check(m)?;
    if let Some(r) = &rolled_forward
        && served.revision != r.revision
    {
        bail!(
            "the rolled-forward snapshot opens at revision {}, not the {} replayed",
            served.revision,
            r.revision
        );
    }
    Ok(Drill {
        id: m.id.clone(),
        etcd_version: served.etcd_version,
        revision: served.revision,
        keys: served.keys,
        kubernetes_keys: served.kubernetes_keys,
        namespaces: served.namespaces,
        cluster_version: served.cluster_version,
        seconds: started.elapsed().as_secs_f64(),
        restore_seconds: serving.as_secs_f64(),
        target: located.target.name().to_string(),
        set_created: crate::delivery::retention::created_of(m)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| m.created.clone()),
        rolled_forward,
    })
}
