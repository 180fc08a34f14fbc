//! An HTTP/WebDAV server (`https://…` or `http://…`). A set is uploaded into the hidden
//! collection `<cluster>/.<id>.partial-<node>-<random>/` (files streamed from staging with
//! their `Content-Length`, `manifest.json` last), checked with `PROPFIND` (sizes, and with
//! `verify_upload = "read-back"` the SHA-256 of every file read back), then `MOVE`d to
//! `<cluster>/<id>/` with `Overwrite: F` and checked again there, so an existing set is never
//! replaced and a cut upload never looks like a set.

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
use super::retry::{self, Backoff, TransportError};
use super::{
    Draft, FileReader, ListedSet, MANIFEST_CAP, Sent, StagedSet, Target, is_removable_debris, is_set_name,
    partial_name, safe_component,
};
use crate::config::{TargetSettings, VerifyUpload};
use crate::growing::Follower;
use crate::manifest::{MANIFEST, Manifest, SHA256SUMS};
use tokio_util::sync::CancellationToken;

/// The largest PROPFIND answer read; a server sending more is refused.
const PROPFIND_CAP: u64 = 16 << 20;
/// The answers to a PUT that mean it was stored.
const PUT_OK: [StatusCode; 3] = [StatusCode::CREATED, StatusCode::NO_CONTENT, StatusCode::OK];
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
    /// Secret values that must never reach a log or an error, even echoed by a server.
    secrets: Vec<String>,
    verify: VerifyUpload,
    idle: Duration,
    backoff: Backoff,
    proxy: ProxyChoice,
    rate: Option<u64>,
}

/// Reads a secret file; one readable by group or others is refused (exit 2), whichever
/// command reads it.
fn read_secret(path: &std::path::Path, key: &str, target: &str) -> Result<String> {
    crate::config::check_secret_file(path)
        .map_err(|e| crate::error::Stop::Usage(format!("target '{target}': {key}: {e}")))?;
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

/// An error and its sources on one line, without the URL reqwest repeats in each.
fn flat(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = match err.downcast_ref::<reqwest::Error>() {
            // reqwest's Display includes the URL; our messages already name it.
            Some(re) => reqwest_kind(re).to_string(),
            None => err.to_string(),
        };
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ").replace('\n', " ")
}

fn reqwest_kind(e: &reqwest::Error) -> &'static str {
    if e.is_connect() {
        "cannot connect"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_body() {
        "request body failed"
    } else if e.is_decode() {
        "cannot decode the answer"
    } else if e.is_redirect() {
        "redirect"
    } else {
        "request failed"
    }
}

/// A request body that counts what has been sent, for the idle watchdog.
/// With `rate`, the body is paced to that many bytes per second (`upload_rate_limit`).
/// `phase` shows the body's progress (a retry starts it again).
fn counting_body<S>(chunks: S, sent: Arc<AtomicU64>, rate: Option<u64>, phase: crate::progress::Phase) -> reqwest::Body
where
    S: futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
{
    let mut pace = rate.map(crate::priority::Pace::new);
    phase.set(0);
    let stream = chunks
        .inspect_ok(move |chunk| {
            sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            phase.add(chunk.len() as u64);
        })
        .then(move |chunk| {
            let wait = match (&chunk, pace.as_mut()) {
                (Ok(c), Some(p)) => p.delay_for(c.len()),
                _ => Duration::ZERO,
            };
            async move {
                tokio::time::sleep(wait).await;
                chunk
            }
        });
    reqwest::Body::wrap_stream(stream)
}

/// Runs `fut` (a request, until the answer's headers), failing it when `progress` has not
/// moved for `idle`: the body being sent moves it; waiting for the answer after the body is
/// sent may take `idle` too. There is no total limit, so a multi-GiB upload over a slow link
/// is never cut while it moves.
async fn watch_idle<T>(
    fut: impl std::future::Future<Output = reqwest::Result<T>>,
    progress: &AtomicU64,
    idle: Duration,
) -> std::result::Result<T, TransportError> {
    tokio::pin!(fut);
    let mut last = progress.load(Ordering::Relaxed);
    let mut last_change = tokio::time::Instant::now();
    let mut tick = tokio::time::interval((idle / 8).max(Duration::from_millis(20)));
    loop {
        tokio::select! {
            out = &mut fut => return out.map_err(|e| TransportError::classify(&e, flat(&e))),
            _ = tick.tick() => {
                let now = progress.load(Ordering::Relaxed);
                if now != last {
                    last = now;
                    last_change = tokio::time::Instant::now();
                } else if last_change.elapsed() >= idle {
                    return Err(TransportError::Transient(format!(
                        "no progress for {}",
                        humantime::format_duration(idle)
                    )));
                }
            }
        }
    }
}

/// The next chunk of an answer's body, or an error after `idle` without one.
async fn next_chunk<S>(stream: &mut S, idle: Duration, what: &str) -> Result<Option<bytes::Bytes>>
where
    S: futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
{
    match tokio::time::timeout(idle, stream.next()).await {
        Err(_) => bail!("{what}: no data for {}", humantime::format_duration(idle)),
        Ok(None) => Ok(None),
        Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
        Ok(Some(Err(e))) => bail!("{what}: reading the answer: {}", flat(&e)),
    }
}

/// Reads a body, refusing one larger than `cap`.
async fn read_capped(resp: Response, cap: u64, idle: Duration, what: &str) -> Result<Vec<u8>> {
    if resp.content_length().is_some_and(|n| n > cap) {
        bail!("{what}: the answer is larger than {cap} bytes; refusing it");
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = next_chunk(&mut stream, idle, what).await? {
        if body.len() as u64 + chunk.len() as u64 > cap {
            bail!("{what}: the answer is larger than {cap} bytes; refusing it");
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Is `host` this machine? Credentials may cross plain http only there.
fn is_loopback(host: &str) -> bool {
    let h = host.trim_matches(['[', ']']);
    h.eq_ignore_ascii_case("localhost") || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// reqwest is built without a default crypto provider (aws-lc is slow to build): use ring,
/// as tonic does. Idempotent; every HTTP client in the process needs it first.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl DavTarget {
    pub fn new(settings: &TargetSettings, rate: Option<u64>) -> Result<DavTarget> {
        install_crypto_provider();
        let name = settings.name.clone();
        let proxy = proxy::choose(&settings.proxy, &settings.url, &proxy::ProcessEnv)
            .map_err(|e| anyhow!("target '{name}': {e}"))?;
        let mut secrets = Vec::new();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout.0)
            // A redirect cannot replay a streamed PUT; a moved server is a configuration
            // matter, reported with its Location.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("etcd-backupd/", env!("CARGO_PKG_VERSION")))
            .http1_only()
            // Keeps getaddrinfo's error code: a host name that does not exist fails at once.
            .dns_resolver(std::sync::Arc::new(super::dns::Resolver))
            .tls_backend_rustls();
        builder = match &proxy {
            ProxyChoice::Direct { .. } => builder.no_proxy(),
            ProxyChoice::Via { url, .. } => {
                let mut p = reqwest::Proxy::all(url.as_str()).map_err(|e| anyhow!("target '{name}': proxy: {e}"))?;
                if let Some(pw) = url.password() {
                    secrets.push(pw.to_string());
                }
                if let Some(file) = &settings.proxy_password_file {
                    let password = read_secret(file, "proxy_password_file", &name)?;
                    p = p.basic_auth(url.username(), &password);
                    secrets.push(password);
                }
                builder.proxy(p)
            }
        };
        if let Some(ca) = &settings.ca_file {
            let pem = std::fs::read(ca).with_context(|| format!("target '{name}': ca_file '{}'", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| anyhow!("target '{name}': ca_file '{}': {e}", ca.display()))?;
            if certs.is_empty() {
                bail!("target '{name}': ca_file '{}' holds no PEM certificate", ca.display());
            }
            for cert in certs {
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
            (Some(user), Some(pw), _) => {
                let password = read_secret(pw, "password_file", &name)?;
                secrets.push(password.clone());
                Auth::Basic {
                    user: user.clone(),
                    password,
                }
            }
            (_, _, Some(token)) => {
                let token = read_secret(token, "token_file", &name)?;
                secrets.push(token.clone());
                Auth::Bearer(token)
            }
            _ => Auth::None,
        };
        if !matches!(auth, Auth::None)
            && settings.url.scheme() == "http"
            && !is_loopback(settings.url.host_str().unwrap_or_default())
        {
            bail!("target '{name}': credentials over plain http:// would cross the network in clear; use https://");
        }
        Ok(DavTarget {
            name,
            base: settings.url.clone(),
            client,
            auth,
            secrets,
            verify: settings.verify_upload,
            idle: settings.idle_timeout.0,
            backoff: Backoff::new(settings.retry_budget.0),
            proxy,
            rate,
        })
    }

    /// Removes every known secret from text that came from a server, which might echo our
    /// request headers back.
    fn scrub(&self, text: String) -> String {
        self.secrets.iter().fold(text, |t, s| {
            if s.len() >= 4 {
                t.replace(s.as_str(), "[redacted]")
            } else {
                t
            }
        })
    }

    /// `base/seg1/seg2[/]`, each segment percent-encoded; every segment must be a plain name.
    fn url(&self, segments: &[&str], collection: bool) -> Result<Url> {
        if let Some(bad) = segments.iter().find(|s| !safe_component(s)) {
            bail!("target '{}': {bad:?} is not a usable name", self.name);
        }
        let mut u = self.base.clone();
        {
            let mut path = u
                .path_segments_mut()
                .map_err(|_| anyhow!("target '{}': URL has no path", self.name))?;
            path.pop_if_empty();
            for s in segments {
                path.push(s);
            }
            if collection {
                path.push("");
            }
        }
        Ok(u)
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
    /// Returns the first final answer, whatever its status, and whether it came after a
    /// retry (a non-idempotent request may then have taken effect already).
    async fn send_counted(
        &self,
        what: &str,
        url: &Url,
        make: impl Fn(Arc<AtomicU64>) -> Result<RequestBuilder>,
    ) -> Result<(Response, bool)> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let progress = Arc::new(AtomicU64::new(0));
            let rb = make(progress.clone())?;
            let outcome = watch_idle(rb.send(), &progress, self.idle).await;
            let (why, server_asks) = match outcome {
                Ok(resp) if retry::retryable_status(resp.status()) => {
                    let status = resp.status();
                    let asks = retry::retry_after(resp.headers(), chrono::Utc::now());
                    let body = read_capped(resp, 64 * 1024, self.idle, what).await.unwrap_or_default();
                    (format!("{status}: {}", self.scrub(excerpt(&body))), asks)
                }
                Ok(resp) => return Ok((resp, attempt > 1)),
                // No retry changes it: this target fails now, and the run goes on.
                Err(e @ TransportError::Permanent { .. }) => {
                    return Err(anyhow::Error::new(e).context(format!("target '{}': {what} '{url}'", self.name)));
                }
                Err(TransportError::Transient(e)) => (e, None),
            };
            if false && self.backoff.budget().is_zero() {
                bail!("target '{}': {what} '{url}': {why} (not retried)", self.name);
            }
            match self.backoff.next_delay(attempt, server_asks) {
                Some(delay) => {
                    tracing::warn!(
                        target_name = %self.name, attempt, delay_ms = delay.as_millis() as u64, error = %why,
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

    async fn send(
        &self,
        what: &str,
        url: &Url,
        make: impl Fn(Arc<AtomicU64>) -> Result<RequestBuilder>,
    ) -> Result<Response> {
        Ok(self.send_counted(what, url, make).await?.0)
    }

    /// `send`, then `expect`: the answer, if its status is one of `ok`.
    async fn call(
        &self,
        what: &str,
        url: &Url,
        ok: &[StatusCode],
        make: impl Fn(Arc<AtomicU64>) -> Result<RequestBuilder>,
    ) -> Result<Response> {
        let resp = self.send(what, url, make).await?;
        self.expect(what, url, resp, ok).await
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
        let body = read_capped(resp, 64 * 1024, self.idle, what).await.unwrap_or_default();
        let mut msg = format!("target '{}': {what} '{url}': {status}", self.name);
        if let Some(loc) = location {
            msg.push_str(&format!(" (Location: {}; point the target url there)", self.scrub(loc)));
        }
        let ex = self.scrub(excerpt(&body));
        if !ex.is_empty() {
            msg.push_str(&format!(": {ex}"));
        }
        msg.push_str(&retry::status_hint(what, status));
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
        let what = format!("target '{}': PROPFIND '{url}'", self.name);
        let body = read_capped(resp, PROPFIND_CAP, self.idle, &what).await?;
        let entries = propfind::parse(&body).with_context(|| what.clone())?;
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

    /// Creates a collection. `405` means it exists: fine for the cluster folder, and for a
    /// temporary one (random name) it can only be our own earlier attempt whose answer was lost.
    async fn mkcol(&self, url: &Url) -> Result<()> {
        let method = Method::from_bytes(b"MKCOL").expect("valid method");
        let ok = [StatusCode::CREATED, StatusCode::METHOD_NOT_ALLOWED];
        self.call("MKCOL", url, &ok, |_| Ok(self.request(method.clone(), url)))
            .await
            .map(|_| ())
    }

    async fn put_file(&self, url: &Url, path: &std::path::Path, size: u64) -> Result<()> {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let phase = crate::progress::Phase::start(format!("upload to '{}': {name}", self.name), Some(size));
        self.call("PUT", url, &PUT_OK, |progress| {
            // Reopened for every attempt: a retry streams the file again.
            let file = std::fs::File::open(path).with_context(|| format!("cannot open '{}'", path.display()))?;
            Ok(self
                .request(Method::PUT, url)
                .header(header::CONTENT_LENGTH, size)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(counting_body(
                    tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), 256 * 1024),
                    progress,
                    self.rate,
                    phase.clone(),
                )))
        })
        .await
        .map(|_| ())
    }

    async fn put_bytes(&self, url: &Url, bytes: &[u8]) -> Result<()> {
        self.call("PUT", url, &PUT_OK, |_| {
            Ok(self
                .request(Method::PUT, url)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(bytes.to_vec()))
        })
        .await
        .map(|_| ())
    }

    async fn delete(&self, url: &Url) -> Result<()> {
        let ok = [StatusCode::NO_CONTENT, StatusCode::OK, StatusCode::NOT_FOUND];
        self.call("DELETE", url, &ok, |_| Ok(self.request(Method::DELETE, url)))
            .await
            .map(|_| ())
    }

    /// Removes a set folder so that it never looks complete while going: manifest first.
    async fn delete_collection(&self, collection: &Url) -> Result<()> {
        self.delete(&join(collection, MANIFEST)?).await?;
        self.delete(collection).await
    }

    async fn get(&self, url: &Url) -> Result<Response> {
        self.call("GET", url, &[StatusCode::OK], |_| Ok(self.request(Method::GET, url)))
            .await
    }

    /// Streams a file back and returns its size and SHA-256.
    async fn read_back(&self, url: &Url) -> Result<(u64, String)> {
        let resp = self.get(url).await?;
        let what = format!("target '{}': GET '{url}'", self.name);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = next_chunk(&mut stream, self.idle, &what).await? {
            size += chunk.len() as u64;
            hasher.update(&chunk);
        }
        Ok((size, hex::encode(hasher.finalize())))
    }

    /// Removes this node's leftover temporary sets, and other nodes' once a day old.
    async fn remove_debris_among(&self, cluster: &str, entries: &[DavEntry], node: &str) -> usize {
        let now = chrono::Utc::now();
        let mut count = 0;
        for e in entries
            .iter()
            .filter(|e| is_removable_debris(&e.name, node, e.modified, now))
        {
            let removed = match self.url(&[cluster, &e.name], true) {
                Ok(url) => self.delete(&url).await,
                Err(err) => Err(err),
            };
            match removed {
                Ok(()) => {
                    count += 1;
                    tracing::info!(target_name = %self.name, name = %e.name, "removed an incomplete set left by an earlier run")
                }
                Err(err) => {
                    tracing::warn!(target_name = %self.name, error = %crate::error::one_line(&err), "cannot remove an incomplete set")
                }
            }
        }
        count
    }

    /// Checks that every file of `manifest` is in `collection` with its stored size (and,
    /// with `read_back`, its SHA-256); `extra` names more files that must be there.
    async fn check_landed(
        &self,
        collection: &Url,
        manifest: &Manifest,
        extra: &[(&str, usize)],
        read_back: bool,
    ) -> Result<()> {
        let landed = self
            .children(collection)
            .await?
            .ok_or_else(|| anyhow!("target '{}': '{collection}' vanished", self.name))?;
        let expected = manifest
            .files
            .iter()
            .map(|f| (f.stored_name.as_str(), f.stored_size))
            .chain(extra.iter().map(|(n, s)| (*n, *s as u64)));
        for (name, want) in expected {
            let size = landed.iter().find(|e| e.name == name).and_then(|e| e.size);
            if size != Some(want) {
                bail!(
                    "target '{}': '{name}' in '{collection}' has size {} but {want} bytes were sent",
                    self.name,
                    size.map_or("unknown".to_string(), |s| s.to_string())
                );
            }
        }
        if read_back {
            for f in &manifest.files {
                let (n, sha) = self.read_back(&join(collection, &f.stored_name)?).await?;
                if n != f.stored_size || sha != f.stored_sha256 {
                    bail!(
                        "target '{}': '{}' reads back as {n} bytes with SHA-256 {sha}, not what was sent",
                        self.name,
                        f.stored_name
                    );
                }
            }
        }
        Ok(())
    }

    async fn upload(&self, tmp: &Url, set: &StagedSet, draft: &Draft) -> Result<()> {
        for f in &set.manifest.files {
            if draft.has(f) {
                continue;
            }
            let started = Instant::now();
            self.put_file(
                &join(tmp, &f.stored_name)?,
                &set.dir.join(&f.stored_name),
                f.stored_size,
            )
            .await?;
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            tracing::info!(
                target_name = %self.name, file = %f.stored_name, bytes = f.stored_size,
                mib_per_s = format!("{:.1}", f.stored_size as f64 / secs / 1048576.0), "uploaded"
            );
        }
        let sums = set.manifest.sha256sums();
        self.put_bytes(&join(tmp, SHA256SUMS)?, sums.as_bytes()).await?;
        // Checked before the manifest goes up: the manifest is the last thing written.
        self.check_landed(
            tmp,
            &set.manifest,
            &[(SHA256SUMS, sums.len())],
            self.verify == VerifyUpload::ReadBack,
        )
        .await?;
        self.put_bytes(&join(tmp, MANIFEST)?, set.manifest.to_json().as_bytes())
            .await
    }

    /// `MOVE` without overwriting. When the answer to an earlier attempt was lost, the move
    /// may have happened already: a 404/412 after a retry is success if the destination holds
    /// exactly our manifest.
    async fn move_no_overwrite(&self, from: &Url, to: &Url, manifest: &Manifest) -> Result<()> {
        let method = Method::from_bytes(b"MOVE").expect("valid method");
        let (resp, retried) = self
            .send_counted("MOVE", from, |_| {
                Ok(self
                    .request(method.clone(), from)
                    .header("Destination", to.as_str())
                    .header("Overwrite", "F"))
            })
            .await?;
        let status = resp.status();
        if retried && (status == StatusCode::NOT_FOUND || status == StatusCode::PRECONDITION_FAILED) {
            let url = join(to, MANIFEST)?;
            let resp = self.send("GET", &url, |_| Ok(self.request(Method::GET, &url))).await?;
            if resp.status() == StatusCode::OK {
                let body = read_capped(resp, MANIFEST_CAP, self.idle, "GET manifest").await?;
                if Manifest::parse(&body).ok().as_ref() == Some(manifest) {
                    return Ok(());
                }
            }
        }
        if status == StatusCode::PRECONDITION_FAILED {
            return Err(super::SetExists {
                target: self.name.clone(),
                id: manifest.id.clone(),
                at: to.to_string(),
            }
            .into());
        }
        self.expect("MOVE", from, resp, &[StatusCode::CREATED, StatusCode::NO_CONTENT])
            .await
            .map(|_| ())
    }
}

/// A file in a collection; the name must be a plain path component.
fn join(collection: &Url, name: &str) -> Result<Url> {
    if !safe_component(name) {
        bail!("{name:?} is not a usable file name");
    }
    collection
        .join(&percent_encode(name))
        .map_err(|e| anyhow!("cannot build a URL for {name:?}: {e}"))
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
        self.url(&[cluster, id], true)
            .map(|u| u.to_string())
            .unwrap_or_else(|_| format!("{}{cluster}/{id}/", self.base))
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

    async fn begin_set(&self, cluster: &str, node: &str, id: &str) -> Result<Draft> {
        let cluster_url = self.url(&[cluster], true)?;
        self.mkcol(&cluster_url).await?;
        let entries = self.children(&cluster_url).await?.unwrap_or_default();
        self.remove_debris_among(cluster, &entries, node).await;
        if entries.iter().any(|e| e.name == *id) {
            return Err(super::SetExists {
                target: self.name.clone(),
                id: id.to_string(),
                at: self.url(&[cluster, id], true)?.to_string(),
            }
            .into());
        }
        let folder = partial_name(id, node);
        self.mkcol(&self.url(&[cluster, &folder], true)?).await?;
        Ok(Draft {
            cluster: cluster.to_string(),
            id: id.to_string(),
            folder,
            sent: Vec::new(),
        })
    }

    async fn put_growing(&self, draft: &Draft, name: &str, file: Follower) -> Result<Sent> {
        let url = join(&self.url(&[&draft.cluster, &draft.folder], true)?, name)?;
        let started = Instant::now();
        // The length is not known yet: the body goes chunked, and ends only once the writer
        // has verified the file.
        let put = self.call("PUT", &url, &PUT_OK, |progress| {
            Ok(self
                .request(Method::PUT, &url)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(counting_body(
                    file.stream(256 * 1024),
                    progress.clone(),
                    self.rate,
                    crate::progress::Phase::none(),
                )))
        });
        tokio::select! {
            r = put => { r?; }
            _ = file.failed() => bail!("target '{}': PUT '{url}': {}", self.name, crate::growing::ABANDONED),
        }
        let size = file
            .finished()
            .await
            .ok_or_else(|| anyhow!("target '{}': PUT '{url}': {}", self.name, crate::growing::ABANDONED))?;
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        tracing::info!(
            target_name = %self.name, file = %name, bytes = size,
            mib_per_s = format!("{:.1}", size as f64 / secs / 1048576.0), "uploaded while it was written"
        );
        Ok(Sent {
            name: name.to_string(),
            size,
            sha256: None,
        })
    }

    async fn finish_set(&self, draft: Draft, set: &StagedSet, abort: &CancellationToken) -> Result<()> {
        let (cluster, id) = (&draft.cluster, &set.manifest.id);
        let final_url = self.url(&[cluster, id], true)?;
        let tmp = self.url(&[cluster, &draft.folder], true)?;
        let uploaded = async {
            self.upload(&tmp, set, &draft).await?;
            if abort.is_cancelled() {
                bail!("the run was stopped before the set was moved into place");
            }
            self.move_no_overwrite(&tmp, &final_url, &set.manifest).await
        }
        .await;
        if let Err(e) = uploaded {
            if let Err(d) = self.delete(&tmp).await {
                tracing::warn!(target_name = %self.name, error = %crate::error::one_line(&d), "cannot remove the incomplete upload");
            }
            return Err(e);
        }
        // A server whose MOVE is a copy (across devices, or an object store) may have moved
        // part of it: check the set where it landed, and take it down if it is incomplete.
        let sums_len = set.manifest.sha256sums().len();
        let json_len = set.manifest.to_json().len();
        if let Err(e) = self
            .check_landed(
                &final_url,
                &set.manifest,
                &[(SHA256SUMS, sums_len), (MANIFEST, json_len)],
                false,
            )
            .await
        {
            if let Err(d) = self.delete_collection(&final_url).await {
                tracing::warn!(target_name = %self.name, error = %crate::error::one_line(&d), "cannot remove an incomplete set");
            }
            return Err(e.context("the set was incomplete after MOVE and has been removed"));
        }
        Ok(())
    }

    async fn discard(&self, draft: Draft) -> Result<()> {
        self.delete(&self.url(&[&draft.cluster, &draft.folder], true)?).await
    }

    async fn list_all_sets(&self, cluster: Option<&str>) -> Result<Vec<ListedSet>> {
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
            let Some(entries) = self.children(&self.url(&[&c], true)?).await? else {
                continue;
            };
            for e in entries.into_iter().filter(|e| e.is_collection && is_set_name(&e.name)) {
                let set_url = self.url(&[&c, &e.name], true)?;
                let url = join(&set_url, MANIFEST)?;
                let resp = self.send("GET", &url, |_| Ok(self.request(Method::GET, &url))).await?;
                if resp.status() == StatusCode::NOT_FOUND {
                    continue; // not a complete set
                }
                let resp = self.expect("GET", &url, resp, &[StatusCode::OK]).await?;
                let what = format!("target '{}': GET '{url}'", self.name);
                let body = read_capped(resp, MANIFEST_CAP, self.idle, &what).await?;
                let m = match Manifest::parse(&body) {
                    Ok(m) if m.id == e.name => m,
                    Ok(_) => {
                        tracing::warn!(target_name = %self.name, url = %url, "manifest id does not match its folder; skipping it");
                        continue;
                    }
                    Err(err) => {
                        tracing::warn!(target_name = %self.name, url = %url, error = %err, "skipping a set with an unreadable manifest");
                        continue;
                    }
                };
                // The manifest goes last, so a set missing a file or with one of another size
                // was damaged after it was stored: listed, marked.
                let landed = self.children(&set_url).await?.unwrap_or_default();
                let damaged = super::size_damage(&m, |name| landed.iter().find(|e| e.name == name).map(|e| e.size));
                if let Some(d) = &damaged {
                    tracing::warn!(target_name = %self.name, url = %set_url, damage = %d, "a damaged set");
                }
                sets.push(ListedSet {
                    cluster: c.clone(),
                    manifest: m,
                    damaged,
                });
            }
        }
        sets.sort_by(|a, b| b.manifest.id.cmp(&a.manifest.id).then(a.cluster.cmp(&b.cluster)));
        Ok(sets)
    }

    async fn open_file(&self, cluster: &str, id: &str, name: &str) -> Result<FileReader> {
        let url = self.url(&[cluster, id, name], false)?;
        let resp = self.get(&url).await?;
        let (target, idle) = (self.name.clone(), self.idle);
        let stream = resp
            .bytes_stream()
            .map_err(move |e| std::io::Error::other(format!("target '{target}': {}", flat(&e))));
        // A stalled body fails after `idle` rather than hanging a reader forever.
        let stream = futures_util::stream::unfold(Box::pin(stream), move |mut s| async move {
            match tokio::time::timeout(idle, s.next()).await {
                Ok(Some(item)) => Some((item, s)),
                Ok(None) => None,
                Err(_) => Some((
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no data from the server",
                    )),
                    s,
                )),
            }
        });
        Ok(Box::pin(tokio_util::io::StreamReader::new(stream)))
    }

    async fn delete_set(&self, cluster: &str, id: &str) -> Result<()> {
        if !is_set_name(id) {
            bail!("target '{}': {id:?} is not a set name", self.name);
        }
        self.delete_collection(&self.url(&[cluster, id], true)?).await
    }

    async fn remove_debris(&self, cluster: &str, node: &str) -> Result<usize> {
        let entries = self.children(&self.url(&[cluster], true)?).await?.unwrap_or_default();
        Ok(self.remove_debris_among(cluster, &entries, node).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_one_short_line() {
        let e = excerpt(b"<html>\n<body><h1>507</h1>\n<p>quota\texceeded</p></body></html>");
        assert_eq!(e, "507 quota exceeded");
        assert!(excerpt(&vec![b'a'; 10_000]).len() <= EXCERPT_LEN);
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_watch_fires_only_without_progress() {
        let idle = Duration::from_secs(60);
        let stuck = AtomicU64::new(0);
        let started = tokio::time::Instant::now();
        let e = watch_idle(std::future::pending::<reqwest::Result<()>>(), &stuck, idle)
            .await
            .unwrap_err();
        assert_eq!(e, TransportError::Transient("no progress for 1m".into()));
        assert!(started.elapsed() >= idle && started.elapsed() < idle * 2);

        // A slow but moving request may take far longer than `idle` in all.
        let moving = Arc::new(AtomicU64::new(0));
        let m = moving.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                m.fetch_add(1, Ordering::Relaxed);
            }
        });
        let long = async {
            tokio::time::sleep(Duration::from_secs(600)).await;
            Ok::<_, reqwest::Error>("done")
        };
        assert_eq!(watch_idle(long, &moving, idle).await.unwrap(), "done");
    }

    #[test]
    fn only_loopback_may_see_credentials_in_clear() {
        assert!(is_loopback("127.0.0.1") && is_loopback("localhost") && is_loopback("[::1]"));
        assert!(!is_loopback("dav.example.com") && !is_loopback("10.0.0.1"));
    }
}
