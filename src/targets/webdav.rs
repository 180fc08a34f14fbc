//! An HTTP/WebDAV server (`https://…` or `http://…`). A set is uploaded into the hidden
//! collection `<cluster>/.<id>.partial-<node>-<random>/` (files streamed from staging with
//! their `Content-Length`, `manifest.json` last), checked with `PROPFIND` (sizes, and with
//! `verify_upload = "read-back"` the SHA-256 of every file read back), then `MOVE`d to
//! `<cluster>/<id>/` with `Overwrite: F`, so an existing set is never replaced and a cut
//! upload never looks like a set.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt};
use reqwest::{Method, RequestBuilder, Response, StatusCode, header};
use sha2::{Digest, Sha256};
use url::Url;

use super::propfind::{self, DavEntry};
use super::proxy::{self, ProxyChoice};
use super::retry::{self, Backoff};
use super::{FileReader, ListedSet, MANIFEST_CAP, StagedSet, Target, is_removable_debris, is_set_name, partial_name};
use crate::config::{TargetSettings, VerifyUpload};
use crate::manifest::{MANIFEST, Manifest, SHA256SUMS};

/// The largest PROPFIND answer read; a server sending more is refused.
const PROPFIND_CAP: u64 = 16 << 20;
/// How much of an error answer's body goes into the error message.
const EXCERPT_LEN: usize = 200;

enum Auth {
    None,
    Basic { user: String, password: String },
    Bearer(String),
}

/// A WebDAV target. It holds secrets, so it has no `Debug`.
pub struct DavTarget {
    name: String,
    base: Url,
    client: reqwest::Client,
    auth: Auth,
    verify: VerifyUpload,
    idle: Duration,
    backoff: Backoff,
    proxy: ProxyChoice,
}

fn read_secret(path: &std::path::Path, key: &str, target: &str) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("target '{target}': {key} '{}'", path.display()))?;
    let secret = text.trim_end_matches(['\n', '\r']).to_string();
    if secret.is_empty() {
        bail!("target '{target}': {key} '{}' is empty", path.display());
    }
    Ok(secret)
}

/// One line of an error body, for messages: tags and runs of white space squeezed.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]);
    let mut out = String::new();
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                out.push(' ');
            }
            c if !in_tag => out.push(if c.is_control() { ' ' } else { c }),
            _ => {}
        }
    }
    let squeezed = out.split_whitespace().collect::<Vec<_>>().join(" ");
    squeezed.chars().take(EXCERPT_LEN).collect()
}

/// Reads a body, refusing one larger than `cap`.
async fn read_capped(resp: Response, cap: u64, what: &str) -> Result<Vec<u8>> {
    if resp.content_length().is_some_and(|n| n > cap) {
        bail!("{what}: the answer is larger than {cap} bytes; refusing it");
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| anyhow!("{what}: reading the answer: {}", flat(&e)))?;
        if body.len() as u64 + chunk.len() as u64 > cap {
            bail!("{what}: the answer is larger than {cap} bytes; refusing it");
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// An error and its sources on one line, without the URL reqwest repeats in each.
fn flat(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let mut s = err.to_string();
        if let Some(re) = err.downcast_ref::<reqwest::Error>() {
            // reqwest's Display includes the URL; ours already names it.
            s = re.without_url_ref_display();
        }
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    let mut line = parts.join(": ").replace('\n', " ");
    if line.contains("tunnel error") {
        // hyper does not pass on the proxy's status (often 407 or 403).
        line.push_str(" (the proxy refused the CONNECT tunnel: check proxy credentials and its allowed ports)");
    }
    line
}

trait WithoutUrl {
    fn without_url_ref_display(&self) -> String;
}

impl WithoutUrl for reqwest::Error {
    fn without_url_ref_display(&self) -> String {
        let kind = if self.is_connect() {
            "cannot connect"
        } else if self.is_timeout() {
            "timed out"
        } else if self.is_body() {
            "request body failed"
        } else if self.is_decode() {
            "cannot decode the answer"
        } else if self.is_redirect() {
            "redirect"
        } else {
            "request failed"
        };
        kind.to_string()
    }
}

/// The likely cause of a TLS error whose wording does not say it.
fn tls_hint(msg: &str) -> &'static str {
    if msg.contains("UnknownIssuer") {
        " (the server's certificate is not signed by a trusted CA: set ca_file to its CA bundle)"
    } else if msg.contains("CertificateRequired") {
        " (the server wants a client certificate: set client_cert_file and client_key_file)"
    } else if msg.contains("NotValidForName") {
        " (the certificate does not name this host: use the name it was issued for in url)"
    } else {
        ""
    }
}

/// A request body that counts what has been sent, for the idle watchdog.
fn counting_body(file: tokio::fs::File, sent: Arc<AtomicU64>) -> reqwest::Body {
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).inspect_ok(move |chunk| {
        sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    });
    reqwest::Body::wrap_stream(stream)
}

/// Runs `fut`, failing it when `progress` has not moved for `idle`: a per-phase timeout
/// instead of a total one, so a multi-GiB upload on a slow link is never cut.
async fn watch_idle<T>(
    fut: impl std::future::Future<Output = reqwest::Result<T>>,
    progress: &AtomicU64,
    idle: Duration,
) -> std::result::Result<T, String> {
    tokio::pin!(fut);
    let mut last = progress.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(50)));
    loop {
        tokio::select! {
            out = &mut fut => return out.map_err(|e| flat(&e)),
            _ = tick.tick() => {
                let now = progress.load(Ordering::Relaxed);
                if now != last {
                    last = now;
                    last_change = Instant::now();
                } else if last_change.elapsed() >= idle {
                    return Err(format!("no progress for {}", humantime::format_duration(idle)));
                }
            }
        }
    }
}

/// reqwest is built without a default crypto provider (aws-lc is slow to build): use ring,
/// as tonic does. Idempotent; every HTTP client in the process needs it first.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl DavTarget {
    pub fn new(settings: &TargetSettings) -> Result<DavTarget> {
        install_crypto_provider();
        let name = settings.name.clone();
        let proxy = proxy::choose(&settings.proxy, &settings.url, &proxy::ProcessEnv)
            .map_err(|e| anyhow!("target '{name}': {e}"))?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout.0)
            .read_timeout(settings.idle_timeout.0)
            // A redirect cannot replay a streamed PUT; a moved server is a configuration
            // matter, reported with its Location.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("etcd-backupd/", env!("CARGO_PKG_VERSION")))
            .http1_only()
            .tls_backend_rustls();
        builder = match &proxy {
            ProxyChoice::Direct { .. } => builder.no_proxy(),
            ProxyChoice::Via { url, .. } => {
                let mut p = reqwest::Proxy::all(url.as_str()).map_err(|e| anyhow!("target '{name}': proxy: {e}"))?;
                if let Some(file) = &settings.proxy_password_file {
                    let password = read_secret(file, "proxy_password_file", &name)?;
                    p = p.basic_auth(url.username(), &password);
                }
                builder.proxy(p)
            }
        };
        if let Some(ca) = &settings.ca_file {
            let pem = std::fs::read(ca).with_context(|| format!("target '{name}': ca_file '{}'", ca.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| anyhow!("target '{name}': ca_file '{}': {e}", ca.display()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let (Some(cert), Some(key)) = (&settings.client_cert_file, &settings.client_key_file) {
            let mut pem = std::fs::read(cert)
                .with_context(|| format!("target '{name}': client_cert_file '{}'", cert.display()))?;
            pem.push(b'\n');
            pem.extend(read_secret(key, "client_key_file", &name)?.into_bytes());
            let id = reqwest::Identity::from_pem(&pem).map_err(|_| {
                anyhow!("target '{name}': client_cert_file/client_key_file: not a PEM certificate and key")
            })?;
            builder = builder.identity(id);
        }
        let client = builder
            .build()
            .map_err(|e| anyhow!("target '{name}': cannot set up HTTP: {}", flat(&e)))?;
        let auth = match (&settings.username, &settings.password_file, &settings.token_file) {
            (Some(user), Some(pw), _) => Auth::Basic {
                user: user.clone(),
                password: read_secret(pw, "password_file", &name)?,
            },
            (_, _, Some(token)) => Auth::Bearer(read_secret(token, "token_file", &name)?),
            _ => Auth::None,
        };
        Ok(DavTarget {
            name,
            base: settings.url.clone(),
            client,
            auth,
            verify: settings.verify_upload,
            idle: settings.idle_timeout.0,
            backoff: Backoff::new(settings.retry_budget.0),
            proxy,
        })
    }

    /// `base/seg1/seg2[/]`, each segment percent-encoded.
    fn url(&self, segments: &[&str], collection: bool) -> Url {
        let mut u = self.base.clone();
        {
            let mut path = u.path_segments_mut().expect("http(s) URLs have a path");
            path.pop_if_empty();
            for s in segments {
                path.push(s);
            }
            if collection {
                path.push("");
            }
        }
        u
    }

    fn request(&self, method: Method, url: &Url) -> RequestBuilder {
        let rb = self.client.request(method, url.clone());
        match &self.auth {
            Auth::None => rb,
            Auth::Basic { user, password } => rb.basic_auth(user, Some(password)),
            Auth::Bearer(token) => rb.bearer_auth(token),
        }
    }

    /// Sends the request `make` builds, retrying what is worth retrying within the budget.
    /// Returns the first final answer, whatever its status; the caller judges it.
    async fn send(
        &self,
        what: &str,
        url: &Url,
        make: impl Fn(Arc<AtomicU64>) -> Result<RequestBuilder>,
    ) -> Result<Response> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let progress = Arc::new(AtomicU64::new(0));
            let rb = make(progress.clone())?;
            let outcome = watch_idle(rb.send(), &progress, self.idle).await;
            let (why, server_asks) = match outcome {
                Ok(resp) if retry::retryable_status(resp.status()) => {
                    let status = resp.status();
                    let asks = retry::retry_after(resp.headers());
                    let body = read_capped(resp, 64 * 1024, what).await.unwrap_or_default();
                    (format!("{status}: {}", excerpt(&body)), asks)
                }
                Ok(resp) => return Ok(resp),
                // A certificate the other side rejects will not change by retrying.
                Err(e) if e.contains("invalid peer certificate") || e.contains("fatal alert") => {
                    bail!("target '{}': {what} '{url}': {e}{}", self.name, tls_hint(&e))
                }
                Err(e) => (e, None),
            };
            match self.backoff.next_delay(attempt, server_asks) {
                Some(delay) => {
                    tracing::warn!(
                        target = %self.name, attempt, delay_ms = delay.as_millis() as u64, error = %why,
                        "{what} '{url}' failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
                None => bail!(
                    "target '{}': {what} '{url}': {why} (gave up after {attempt} attempts; retry_budget {} spent)",
                    self.name,
                    humantime::format_duration(self.backoff.budget())
                ),
            }
        }
    }

    /// Fails with the server's status and an excerpt of its body unless `ok` accepts it.
    async fn expect(&self, what: &str, url: &Url, resp: Response, ok: &[StatusCode]) -> Result<Response> {
        let status = resp.status();
        if ok.contains(&status) {
            return Ok(resp);
        }
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(str::to_string);
        let body = read_capped(resp, 64 * 1024, what).await.unwrap_or_default();
        let mut msg = format!("target '{}': {what} '{url}': {status}", self.name);
        if let Some(loc) = location {
            msg.push_str(&format!(" (Location: {loc}; point the target url there)"));
        }
        let ex = excerpt(&body);
        if !ex.is_empty() {
            msg.push_str(&format!(": {ex}"));
        }
        Err(anyhow!(msg))
    }

    async fn propfind(&self, url: &Url, depth: &str) -> Result<Option<Vec<DavEntry>>> {
        let method = Method::from_bytes(b"PROPFIND").expect("valid method");
        let resp = self
            .send("PROPFIND", url, |_| {
                Ok(self
                    .request(method.clone(), url)
                    .header("Depth", depth)
                    .header(header::CONTENT_TYPE, "application/xml; charset=utf-8")
                    .body(propfind::PROPFIND_BODY))
            })
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = self.expect("PROPFIND", url, resp, &[StatusCode::MULTI_STATUS]).await?;
        let body = read_capped(resp, PROPFIND_CAP, &format!("target '{}': PROPFIND '{url}'", self.name)).await?;
        let entries = propfind::parse(&body).with_context(|| format!("target '{}': PROPFIND '{url}'", self.name))?;
        Ok(Some(entries))
    }

    /// The entries of a collection, without the collection itself.
    async fn children(&self, url: &Url) -> Result<Option<Vec<DavEntry>>> {
        let own = percent_encoding::percent_decode_str(url.path())
            .decode_utf8_lossy()
            .trim_end_matches('/')
            .to_string();
        Ok(self
            .propfind(url, "1")
            .await?
            .map(|entries| entries.into_iter().filter(|e| e.path != own).collect()))
    }

    async fn mkcol(&self, url: &Url, may_exist: bool) -> Result<()> {
        let method = Method::from_bytes(b"MKCOL").expect("valid method");
        let resp = self
            .send("MKCOL", url, |_| Ok(self.request(method.clone(), url)))
            .await?;
        let ok: &[StatusCode] = if may_exist {
            &[StatusCode::CREATED, StatusCode::METHOD_NOT_ALLOWED]
        } else {
            &[StatusCode::CREATED]
        };
        self.expect("MKCOL", url, resp, ok).await.map(|_| ())
    }

    async fn put_file(&self, url: &Url, path: &std::path::Path, size: u64) -> Result<()> {
        let resp = self
            .send("PUT", url, |progress| {
                // Reopened for every attempt: a retry starts the stream again.
                let file = std::fs::File::open(path).with_context(|| format!("cannot open '{}'", path.display()))?;
                Ok(self
                    .request(Method::PUT, url)
                    .header(header::CONTENT_LENGTH, size)
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .body(counting_body(tokio::fs::File::from_std(file), progress)))
            })
            .await?;
        self.expect(
            "PUT",
            url,
            resp,
            &[StatusCode::CREATED, StatusCode::NO_CONTENT, StatusCode::OK],
        )
        .await
        .map(|_| ())
    }

    async fn put_bytes(&self, url: &Url, bytes: &[u8]) -> Result<()> {
        let resp = self
            .send("PUT", url, |_| {
                Ok(self
                    .request(Method::PUT, url)
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .body(bytes.to_vec()))
            })
            .await?;
        self.expect(
            "PUT",
            url,
            resp,
            &[StatusCode::CREATED, StatusCode::NO_CONTENT, StatusCode::OK],
        )
        .await
        .map(|_| ())
    }

    async fn delete(&self, url: &Url) -> Result<()> {
        let resp = self
            .send("DELETE", url, |_| Ok(self.request(Method::DELETE, url)))
            .await?;
        self.expect(
            "DELETE",
            url,
            resp,
            &[StatusCode::NO_CONTENT, StatusCode::OK, StatusCode::NOT_FOUND],
        )
        .await
        .map(|_| ())
    }

    async fn get(&self, url: &Url) -> Result<Response> {
        let resp = self.send("GET", url, |_| Ok(self.request(Method::GET, url))).await?;
        self.expect("GET", url, resp, &[StatusCode::OK]).await
    }

    /// Streams a file back and returns its size and SHA-256.
    async fn read_back(&self, url: &Url) -> Result<(u64, String)> {
        let resp = self.get(url).await?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| anyhow!("target '{}': GET '{url}': {}", self.name, flat(&e)))?;
            size += chunk.len() as u64;
            hasher.update(&chunk);
        }
        Ok((size, hex::encode(hasher.finalize())))
    }

    /// Removes this node's leftover temporary sets, and other nodes' once a day old.
    async fn remove_debris(&self, cluster_url: &Url, entries: &[DavEntry], node: &str) {
        let now = chrono::Utc::now();
        for e in entries
            .iter()
            .filter(|e| is_removable_debris(&e.name, node, e.modified, now))
        {
            let url = cluster_url
                .join(&format!("{}/", percent_encode(&e.name)))
                .unwrap_or_else(|_| cluster_url.clone());
            match self.delete(&url).await {
                Ok(()) => {
                    tracing::info!(target = %self.name, name = %e.name, "removed an incomplete set left by an earlier run")
                }
                Err(err) => {
                    tracing::warn!(target = %self.name, error = %crate::error::one_line(&err), "cannot remove an incomplete set")
                }
            }
        }
    }

    async fn upload(&self, tmp: &Url, set: &StagedSet) -> Result<()> {
        self.mkcol(tmp, false).await?;
        for f in &set.manifest.files {
            let started = Instant::now();
            self.put_file(
                &self.join(tmp, &f.stored_name),
                &set.dir.join(&f.stored_name),
                f.stored_size,
            )
            .await?;
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            tracing::info!(
                target = %self.name, file = %f.stored_name, bytes = f.stored_size,
                mib_per_s = format!("{:.1}", f.stored_size as f64 / secs / 1048576.0), "uploaded"
            );
        }
        self.put_bytes(&self.join(tmp, SHA256SUMS), set.manifest.sha256sums().as_bytes())
            .await?;
        // Checked before the manifest goes up: the manifest is the last thing written.
        let landed = self
            .children(tmp)
            .await?
            .ok_or_else(|| anyhow!("target '{}': '{tmp}' vanished", self.name))?;
        for f in &set.manifest.files {
            let size = landed.iter().find(|e| e.name == f.stored_name).and_then(|e| e.size);
            if size != Some(f.stored_size) {
                bail!(
                    "target '{}': '{}' landed with size {} but {} bytes were sent",
                    self.name,
                    f.stored_name,
                    size.map_or("unknown".to_string(), |s| s.to_string()),
                    f.stored_size
                );
            }
            if self.verify == VerifyUpload::ReadBack {
                let (n, sha) = self.read_back(&self.join(tmp, &f.stored_name)).await?;
                if n != f.stored_size || sha != f.stored_sha256 {
                    bail!(
                        "target '{}': '{}' reads back as {n} bytes with SHA-256 {sha}, not what was sent",
                        self.name,
                        f.stored_name
                    );
                }
            }
        }
        self.put_bytes(&self.join(tmp, MANIFEST), set.manifest.to_json().as_bytes())
            .await
    }

    fn join(&self, collection: &Url, name: &str) -> Url {
        collection
            .join(&percent_encode(name))
            .unwrap_or_else(|_| collection.clone())
    }

    async fn move_no_overwrite(&self, from: &Url, to: &Url) -> Result<()> {
        let method = Method::from_bytes(b"MOVE").expect("valid method");
        let resp = self
            .send("MOVE", from, |_| {
                Ok(self
                    .request(method.clone(), from)
                    .header("Destination", to.as_str())
                    .header("Overwrite", "F"))
            })
            .await?;
        if resp.status() == StatusCode::PRECONDITION_FAILED {
            bail!("target '{}': a set already exists at '{to}'", self.name);
        }
        self.expect("MOVE", from, resp, &[StatusCode::CREATED, StatusCode::NO_CONTENT])
            .await
            .map(|_| ())
    }
}

/// What must be escaped in one path segment (RFC 3986 pchar), and `%` itself.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

fn percent_encode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, SEGMENT).to_string()
}

#[async_trait]
impl Target for DavTarget {
    fn name(&self) -> &str {
        &self.name
    }

    fn describe(&self, cluster: &str, id: &str) -> String {
        self.url(&[cluster, id], true).to_string()
    }

    fn route(&self) -> String {
        format!("{}, {}", self.base, self.proxy.describe())
    }

    async fn preflight(&self) -> Result<()> {
        match self.propfind(&self.base, "0").await? {
            Some(_) => Ok(()),
            None => bail!(
                "target '{}': '{}' does not exist on the server (404)",
                self.name,
                self.base
            ),
        }
    }

    async fn put_set(&self, cluster: &str, node: &str, set: &StagedSet) -> Result<()> {
        let id = &set.manifest.id;
        let cluster_url = self.url(&[cluster], true);
        self.mkcol(&cluster_url, true).await?;
        let entries = self.children(&cluster_url).await?.unwrap_or_default();
        self.remove_debris(&cluster_url, &entries, node).await;
        let final_url = self.url(&[cluster, id], true);
        if entries.iter().any(|e| e.name == *id) {
            bail!(
                "target '{}': a set with id '{id}' already exists at '{final_url}'",
                self.name
            );
        }
        let tmp = self.url(&[cluster, &partial_name(id, node)], true);
        let result = async {
            self.upload(&tmp, set).await?;
            self.move_no_overwrite(&tmp, &final_url).await
        }
        .await;
        if result.is_err()
            && let Err(e) = self.delete(&tmp).await
        {
            tracing::warn!(target = %self.name, error = %crate::error::one_line(&e), "cannot remove the incomplete upload");
        }
        result
    }

    async fn list_sets(&self, cluster: Option<&str>) -> Result<Vec<ListedSet>> {
        let clusters: Vec<String> = match cluster {
            Some(c) => vec![c.to_string()],
            None => self
                .children(&self.base)
                .await?
                .unwrap_or_default()
                .into_iter()
                .filter(|e| e.is_collection && is_set_name(&e.name))
                .map(|e| e.name)
                .collect(),
        };
        let mut sets = Vec::new();
        for c in clusters {
            let Some(entries) = self.children(&self.url(&[&c], true)).await? else {
                continue;
            };
            for e in entries.into_iter().filter(|e| e.is_collection && is_set_name(&e.name)) {
                let url = self.url(&[&c, &e.name, MANIFEST], false);
                let resp = self.send("GET", &url, |_| Ok(self.request(Method::GET, &url))).await?;
                if resp.status() == StatusCode::NOT_FOUND {
                    continue; // not a complete set
                }
                let resp = self.expect("GET", &url, resp, &[StatusCode::OK]).await?;
                let body = read_capped(resp, MANIFEST_CAP, &format!("target '{}': GET '{url}'", self.name)).await?;
                match Manifest::parse(&body) {
                    Ok(m) if m.id == e.name => sets.push(ListedSet {
                        cluster: c.clone(),
                        manifest: m,
                    }),
                    Ok(_) => {
                        tracing::warn!(target = %self.name, url = %url, "manifest id does not match its folder; skipping it")
                    }
                    Err(err) => {
                        tracing::warn!(target = %self.name, url = %url, error = %err, "skipping a set with an unreadable manifest")
                    }
                }
            }
        }
        sets.sort_by(|a, b| b.manifest.id.cmp(&a.manifest.id).then(a.cluster.cmp(&b.cluster)));
        Ok(sets)
    }

    async fn open_file(&self, cluster: &str, id: &str, name: &str) -> Result<FileReader> {
        let url = self.url(&[cluster, id, name], false);
        let resp = self.get(&url).await?;
        let target = self.name.clone();
        let stream = resp
            .bytes_stream()
            .map_err(move |e| std::io::Error::other(format!("target '{target}': {}", flat(&e))));
        Ok(Box::pin(tokio_util::io::StreamReader::new(stream)))
    }

    async fn delete_set(&self, cluster: &str, id: &str) -> Result<()> {
        self.delete(&self.url(&[cluster, id], true)).await
    }
}
