//! Talking to etcd: one connection to one configured endpoint at a time. There is no member
//! discovery, so a snapshot always comes from the member the operator named.

pub mod election;

use std::future::Future;
use std::time::Duration;

use anyhow::{Result, anyhow};
use etcd_client::{Certificate, Client, Identity, TlsOptions};
use url::Url;

use crate::config::EtcdSettings;
use crate::error::Stop;

/// A client bound to exactly one member.
pub struct Member {
    pub client: Client,
    pub endpoint: Url,
    pub request_timeout: Duration,
    /// How `client` was reached, for the snapshot's own connection.
    reach: tonic::transport::Endpoint,
    connect_timeout: Duration,
}

/// The HTTP/2 receive window of the snapshot's own connection: the default 64 KiB made etcd
/// wait for a window update every two 32 KiB chunks, each a scheduling round trip through
/// this process when the CPU is busy. Its own connection, because a window this wide
/// queues that much snapshot in front of anything else on the connection (the election's
/// lease renewals missed their deadline over a 512 KiB/s link).
const SNAPSHOT_WINDOW: u32 = 4 << 20;

/// What `Status` says about the member we are connected to.
#[derive(Debug, Clone)]
pub struct MemberStatus {
    pub member_id: u64,
    pub cluster_id: u64,
    pub version: String,
    /// The storage version etcd reports from 3.6 on (`None` before, when it is empty).
    pub storage_version: Option<String>,
    pub db_size: u64,
    pub leader: u64,
    pub revision: i64,
    pub is_learner: bool,
    pub errors: Vec<String>,
}

/// The OpenShift facts read from the ClusterVersion object, when the etcd holds one.
#[derive(Debug, Clone, Default)]
pub struct ClusterVersion {
    pub version: Option<String>,
    pub cluster_id: Option<String>,
}

pub const CLUSTER_VERSION_KEY: &str = "/kubernetes.io/config.openshift.io/clusterversions/version";

/// The member did not answer: unreachable, the connection closed or reset, or silent past a
/// deadline. Not a TLS, auth or usage problem (those are the same on every node and fail a
/// run). Typed so that `connect_first` can tell [`MemberDown`] from other failures.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unanswered(String);

/// Every configured endpoint of this node's member failed to answer ([`Unanswered`]): in an
/// elected run the node steps aside and another takes the run.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MemberDown(String);

/// Does a transport error's chain hold a TLS failure (handshake, certificate, or TLS bytes
/// that do not parse, as from a plain-HTTP endpoint)?
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && (io.kind() == std::io::ErrorKind::InvalidData || io.get_ref().is_some_and(|i| i.is::<rustls::Error>()))
        {
            return true;
        }
        cur = c.source();
    }
    false
}

/// Did a connection fail because nothing answered: refused, unreachable, reset or timed
/// out, with no TLS failure on the way? Anything else (a TLS alert, a handshake cut short as
/// by a plain-HTTP endpoint, HTTP/2 not negotiated, a name that does not resolve) is the
/// same on every node and fails the run.
fn nothing_answers(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::*;
    if tls_failure(e) {
        return false;
    }
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.is::<tonic::TimeoutExpired>() {
            return true;
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | TimedOut
                    | HostUnreachable
                    | NetworkUnreachable
                    | NetworkDown
                    | AddrNotAvailable
                    | NotConnected
            )
        {
            return true;
        }
        cur = c.source();
    }
    false
}

/// Runs `fut` with a deadline, naming `what` when it runs out.
pub async fn within<T>(d: Duration, what: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(d, fut).await {
        Ok(r) => r,
        Err(_) => Err(Unanswered(format!("{what}: no answer within {}", humantime::format_duration(d))).into()),
    }
}

/// One line out of a transport error and its sources (tonic's errors nest several deep).
fn flatten(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        // tonic's and hyper's layers that name no cause of their own: the chain said once.
        let wrapper = t == "tcp connect error" || t.starts_with("client error (");
        if !wrapper && !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        src = s.source();
    }
    parts.join(": ").replace('\n', " ")
}

/// The TLS files, read once per run: a missing or unreadable one is a configuration error
/// (exit 2), not a failure of each endpoint in turn.
#[derive(Clone)]
pub struct TlsMaterial {
    ca: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsMaterial {
    pub fn load(settings: &EtcdSettings) -> Result<Option<TlsMaterial>> {
        let Some(tls) = &settings.tls else { return Ok(None) };
        let read = |key: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| Stop::Usage(format!("etcd.{key} '{}': {e}", path.display())))
        };
        let ca = read("ca_file", &tls.ca_file)?;
        let identity = match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => {
                let cert = read("cert_file", cert)?;
                crate::config::check_secret_file(key).map_err(|e| Stop::Usage(format!("etcd.key_file: {e}")))?;
                Some((cert, read("key_file", key)?))
            }
            _ => None,
        };
        Ok(Some(TlsMaterial { ca, identity }))
    }

    fn options(&self, host: &str) -> TlsOptions {
        let mut opts = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .domain_name(host);
        if let Some((cert, key)) = &self.identity {
            opts = opts.identity(Identity::from_pem(cert, key));
        }
        opts
    }
}

/// The likely cause of a TLS error whose wording does not say it.
fn tls_hint(msg: &str) -> &'static str {
    if msg.contains("InvalidContentType") || msg.contains("corrupt message") || msg.contains("tls handshake eof") {
        " (is the endpoint plain http:// rather than https://?)"
    } else if msg.contains("UnknownIssuer") {
        " (etcd.ca_file does not hold the CA that signed the server's certificate)"
    } else if msg.contains("CertificateRequired")
        || msg.contains("certificate required")
        || msg.contains("BadCertificate")
    {
        " (the server wants a client certificate it trusts: check etcd.cert_file and etcd.key_file)"
    } else {
        ""
    }
}

/// A member's address for the snapshot's own connection; it can move to another thread.
#[derive(Clone)]
pub struct SnapshotReach {
    ep: tonic::transport::Endpoint,
    pub shown: String,
    connect_timeout: Duration,
    /// How long the stream may go without a message.
    pub request_timeout: Duration,
}

impl SnapshotReach {
    /// Connects; the connection's task runs on the calling runtime.
    pub async fn connect(&self) -> Result<Client> {
        open(&self.ep, &self.shown, self.connect_timeout).await
    }
}

/// Whether an error's text says the peer dropped a connection it had accepted (as opposed
/// to refusing it or never answering): the wording is all that survives tonic's errors.
fn cut_off(msg: &str) -> bool {
    let msg = msg.to_ascii_lowercase();
    ["connection reset", "broken pipe", "connection closed"]
        .iter()
        .any(|w| msg.contains(w))
}

/// Connects through `ep`; connection and TLS errors surface here, not later.
async fn open(ep: &tonic::transport::Endpoint, shown: &str, connect_timeout: Duration) -> Result<Client> {
    let channel = within(
        connect_timeout + Duration::from_secs(1),
        &format!("etcd endpoint '{shown}'"),
        async {
            ep.connect().await.map_err(|e| {
                let msg = flatten(&e);
                let msg = format!("etcd endpoint '{shown}': cannot connect: {msg}{}", tls_hint(&msg));
                if nothing_answers(&e) {
                    Unanswered(msg).into()
                } else {
                    anyhow!(msg)
                }
            })
        },
    )
    .await?;
    Client::from_channel(etcd_client::Channel::Tonic(channel), None)
        .await
        .map_err(|e| anyhow!("etcd endpoint '{shown}': {}", flatten(&e)))
}

impl Member {
    /// Connects to `endpoint` only; connection and TLS errors surface here, not later.
    pub async fn connect(settings: &EtcdSettings, tls: Option<&TlsMaterial>, endpoint: &Url) -> Result<Member> {
        let shown = endpoint.as_str().trim_end_matches('/');
        let host = endpoint
            .host_str()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_string();
        let mut ep = tonic::transport::Endpoint::from_shared(shown.to_string())
            .map_err(|e| anyhow!("etcd endpoint '{shown}': {}", flatten(&e)))?
            .connect_timeout(settings.connect_timeout.0)
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            ep = ep
                .tls_config(tls.options(&host))
                .map_err(|e| anyhow!("etcd endpoint '{shown}': TLS configuration: {}", flatten(&e)))?;
        }
        let client = open(&ep, shown, settings.connect_timeout.0).await?;
        Ok(Member {
            client,
            endpoint: endpoint.clone(),
            request_timeout: settings.request_timeout.0,
            reach: ep,
            connect_timeout: settings.connect_timeout.0,
        })
    }

    /// How to reach this member for the snapshot stream alone: a new connection with wide
    /// HTTP/2 windows (see [`SNAPSHOT_WINDOW`]), opened by whichever runtime pulls it.
    pub fn snapshot_reach(&self) -> SnapshotReach {
        SnapshotReach {
            ep: self
                .reach
                .clone()
                .initial_stream_window_size(Some(SNAPSHOT_WINDOW))
                .initial_connection_window_size(Some(SNAPSHOT_WINDOW)),
            shown: self.shown().to_string(),
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
        }
    }

    pub fn shown(&self) -> &str {
        self.endpoint.as_str().trim_end_matches('/')
    }

    fn rpc_error(&self, what: &str, e: etcd_client::Error) -> anyhow::Error {
        let msg = match &e {
            // tonic's Status Display appends a Debug dump of its source; code and message do.
            etcd_client::Error::GRpcStatus(status) => format!("{:?}: {}", status.code(), status.message()),
            other => flatten(other),
        };
        let msg = msg.replace('\n', " ");
        let text = format!("etcd endpoint '{}': {what}: {msg}{}", self.shown(), tls_hint(&msg));
        let unanswered = match &e {
            etcd_client::Error::GRpcStatus(s) => {
                matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded) && !tls_failure(s)
            }
            etcd_client::Error::TransportError(t) => !tls_failure(t),
            _ => false,
        };
        if unanswered {
            Unanswered(text).into()
        } else {
            anyhow!(text)
        }
    }

    /// A new lease of `ttl_secs`; `what` names the request in errors.
    async fn grant_lease(&mut self, ttl_secs: i64, what: &str) -> Result<i64> {
        let d = self.request_timeout;
        let resp = within(d, what, async {
            self.client
                .lease_grant(ttl_secs, None)
                .await
                .map_err(|e| self.rpc_error("lease grant", e))
        })
        .await?;
        Ok(resp.id())
    }

    /// Puts `key` = `value` on a new lease of `ttl_secs`.
    pub async fn put_with_lease(&mut self, key: &str, value: &str, ttl_secs: i64) -> Result<()> {
        use etcd_client::PutOptions;
        let what = format!("etcd endpoint '{}': put '{key}'", self.shown());
        let d = self.request_timeout;
        let lease = self.grant_lease(ttl_secs, &what).await?;
        within(d, &what, async {
            self.client
                .put(key, value, Some(PutOptions::new().with_lease(lease)))
                .await
                .map_err(|e| self.rpc_error("put", e))
        })
        .await?;
        Ok(())
    }

    /// Puts `key` = `value`, with no lease: a record that outlives its writer.
    pub async fn put(&mut self, key: &str, value: &str) -> Result<()> {
        let what = format!("etcd endpoint '{}': put '{key}'", self.shown());
        let d = self.request_timeout;
        within(d, &what, async {
            self.client
                .put(key, value, None)
                .await
                .map_err(|e| self.rpc_error("put", e))
        })
        .await?;
        Ok(())
    }

    /// Every key under `prefix` with its value, in key order.
    pub async fn get_prefix(&mut self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        use etcd_client::GetOptions;
        let what = format!("etcd endpoint '{}': get '{prefix}*'", self.shown());
        let d = self.request_timeout;
        let resp = within(d, &what, async {
            self.client
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .map_err(|e| self.rpc_error("get", e))
        })
        .await?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec()))
            .collect())
    }

    /// Creates `key` (holding `value`, on a lease of `ttl_secs`) unless it exists: true if
    /// this call created it. A cluster-wide reservation, e.g. of a set id.
    pub async fn reserve(&mut self, key: &str, value: &str, ttl_secs: i64) -> Result<bool> {
        use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
        let what = format!("etcd endpoint '{}': reserve '{key}'", self.shown());
        let d = self.request_timeout;
        let lease = self.grant_lease(ttl_secs, &what).await?;
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)))]);
        let resp = within(d, &what, async {
            self.client.txn(txn).await.map_err(|e| self.rpc_error("txn", e))
        })
        .await?;
        if !resp.succeeded() {
            let _ = tokio::time::timeout(d, self.client.lease_revoke(lease)).await;
        }
        Ok(resp.succeeded())
    }

    pub async fn status(&mut self) -> Result<MemberStatus> {
        let what = format!("etcd endpoint '{}': status", self.shown());
        let d = self.request_timeout;
        let resp = within(d, &what, async {
            self.client.status().await.map_err(|e| self.rpc_error("status", e))
        })
        .await?;
        let header = resp
            .header()
            .ok_or_else(|| anyhow!("{what}: response without a header"))?;
        Ok(MemberStatus {
            member_id: header.member_id(),
            cluster_id: header.cluster_id(),
            version: resp.version().to_string(),
            storage_version: Some(resp.storage_version().to_string()).filter(|v| !v.is_empty()),
            db_size: resp.db_size().max(0) as u64,
            leader: resp.leader(),
            revision: header.revision(),
            is_learner: resp.is_learner(),
            errors: resp.errors().to_vec(),
        })
    }

    /// Reads a single key; `None` when absent.
    pub async fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>> {
        let what = format!("etcd endpoint '{}': get '{key}'", self.shown());
        let d = self.request_timeout;
        let resp = within(d, &what, async {
            self.client.get(key, None).await.map_err(|e| self.rpc_error("get", e))
        })
        .await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// The OpenShift version and cluster ID, if this etcd belongs to an OpenShift cluster.
    pub async fn cluster_version(&mut self) -> Result<Option<ClusterVersion>> {
        let Some(raw) = self.get(CLUSTER_VERSION_KEY).await? else {
            return Ok(None);
        };
        Ok(Some(parse_cluster_version(&raw)))
    }
}

/// The version of a just-completed upgrade: the newest history entry, when `Completed` and
/// not the install itself.
pub fn completed_upgrade(cv: &serde_json::Value) -> Option<String> {
    let history = cv.pointer("/status/history")?.as_array()?;
    let newest = history.first()?;
    if history.len() < 2 || newest.get("state").and_then(serde_json::Value::as_str) != Some("Completed") {
        return None;
    }
    newest
        .get("version")
        .and_then(serde_json::Value::as_str)
        .map(str::to_string)
}

/// Reads the fields we need out of the ClusterVersion JSON; tolerant of missing ones.
pub fn parse_cluster_version(raw: &[u8]) -> ClusterVersion {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(raw) else {
        tracing::warn!("the ClusterVersion object in etcd is not JSON; ignoring it");
        return ClusterVersion::default();
    };
    // Empty or odd values would make the manifest unreadable later: treat them as absent.
    let s = |p: &str| {
        v.pointer(p)
            .and_then(|x| x.as_str())
            .filter(|x| !x.is_empty() && !x.chars().any(char::is_control))
            .map(str::to_string)
    };
    ClusterVersion {
        version: s("/status/desired/version"),
        cluster_id: s("/spec/clusterID"),
    }
}

/// Connects to the configured endpoints in order and returns the first that answers
/// `Status`, with its status. Errors of every endpoint are reported together.
pub async fn connect_first(settings: &EtcdSettings) -> Result<(Member, MemberStatus)> {
    let tls = TlsMaterial::load(settings)?;
    let mut errors = Vec::new();
    // Down only if no endpoint gave a sign of anything but silence.
    let mut down = true;
    for ep in &settings.endpoints {
        match Member::connect(settings, tls.as_ref(), ep).await {
            Ok(mut m) => match m.status().await {
                Ok(st) => return Ok((m, st)),
                // TLS 1.3 servers reject a missing client certificate after the handshake, so
                // the client only sees the connection go away: say what is likely, and do not
                // take it for a member that is down.
                Err(e) if tls.as_ref().is_some_and(|t| t.identity.is_none()) => {
                    down = false;
                    errors.push(format!(
                        "{e:#} (no client certificate is configured; if the server requires one, set etcd.cert_file and etcd.key_file)"
                    ))
                }
                Err(e) => {
                    down &= e.is::<Unanswered>();
                    errors.push(format!("{e:#}"))
                }
            },
            // A TLS connection cut while it is set up has two likely causes that race each
            // other: a plain-http server dropping the ClientHello (its 400 can be lost to the
            // reset), or a TLS 1.3 server rejecting a missing client certificate (the client's
            // HTTP/2 preface meets the reset). Name both rather than guess.
            Err(e) if tls.is_some() && cut_off(&format!("{e:#}")) => {
                // A member restarting resets connections too: still "down" for the election.
                down &= e.is::<Unanswered>();
                let anonymous = tls.as_ref().is_some_and(|t| t.identity.is_none());
                errors.push(format!(
                    "{e:#} (the server dropped the TLS connection: is the endpoint plain http:// rather than https://?{})",
                    if anonymous {
                        " or does it require a client certificate? no client certificate is configured (etcd.cert_file, etcd.key_file)"
                    } else {
                        ""
                    }
                ))
            }
            Err(e) => {
                down &= e.is::<Unanswered>();
                errors.push(format!("{e:#}"))
            }
        }
    }
    let msg = format!("no etcd endpoint answered: {}", errors.join("; "));
    Err(if down { MemberDown(msg).into() } else { anyhow!(msg) })
}

pub fn hex_id(id: u64) -> String {
    format!("{id:x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_version_fields() {
        let cv = parse_cluster_version(
            br#"{"spec":{"clusterID":"abc-123"},"status":{"desired":{"version":"4.15.4"},"history":[]}}"#,
        );
        assert_eq!(cv.version.as_deref(), Some("4.15.4"));
        assert_eq!(cv.cluster_id.as_deref(), Some("abc-123"));
        let cv = parse_cluster_version(b"\x00binary");
        assert!(cv.version.is_none());
    }

    #[test]
    fn a_dropped_connection_is_told_from_a_refused_or_silent_one() {
        assert!(cut_off(
            "cannot connect: transport error: Connection reset by peer (os error 104)"
        ));
        assert!(cut_off("status: transport error: Broken pipe (os error 32)"));
        assert!(!cut_off(
            "cannot connect: transport error: Connection refused (os error 111)"
        ));
        assert!(!cut_off("etcd endpoint 'https://x:1': no answer within 5s"));
    }
}
