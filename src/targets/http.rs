//! The HTTP transport every remote target shares (WebDAV and S3): one reqwest client built
//! the same way (proxy rules, CA bundle, client certificate, connect timeout, no redirects,
//! HTTP/1.1, our resolver), the retry loop with its budget, the idle watchdog, paced and
//! counted request bodies, capped answers, and the scrubbing of secrets from what a server
//! says. The targets differ only in the requests they build and how they read the answers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{StreamExt, TryStreamExt};
use reqwest::{RequestBuilder, Response, StatusCode, header};
use url::Url;

use super::proxy::{self, ProxyChoice};
use super::retry::{self, Backoff, TransportError};
use crate::config::TargetSettings;
use crate::fsutil::Pace;

/// Methods whose request may arrive twice with the same effect as once.
const RESENDABLE: [&str; 5] = ["GET", "HEAD", "OPTIONS", "PROPFIND", "PUT"];

/// How much of an error answer's body goes into the error message.
pub const EXCERPT_LEN: usize = 200;
/// How much of an error answer is read.
pub const ERROR_CAP: u64 = 64 * 1024;

/// reqwest is built without a default crypto provider (aws-lc is slow to build): use ring,
/// as tonic does. Idempotent; every HTTP client in the process needs it first.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads a secret file; one readable by group or others is refused (exit 2), whichever
/// command reads it.
pub fn read_secret(path: &std::path::Path, key: &str, target: &str) -> Result<String> {
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
pub fn excerpt(body: &[u8]) -> String {
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
pub fn flat(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = match err.downcast_ref::<reqwest::Error>() {
            // reqwest's Display includes the URL; our messages already name it.
            Some(re) => reqwest_kind(re).to_string(),
            None => err.to_string(),
        };
        // hyper's wrappers repeat what the kind and the cause say ("client error (Connect)",
        // "tcp connect error"): the chain is said once.
        if !parts.iter().any(|p| p.contains(&s)) && !is_wrapper(&s) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ").replace('\n', " ")
}

/// A layer of hyper's error chain that names no cause of its own.
fn is_wrapper(s: &str) -> bool {
    s.starts_with("client error (") || s == "tcp connect error" || s == "error trying to connect"
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

/// One `upload_rate_limit` shared by the bodies that draw on it: the parts of one S3
/// multipart upload in flight together are paced as one stream.
#[derive(Clone, Debug)]
pub struct Pacer(Arc<Mutex<Pace>>);

impl Pacer {
    pub fn new(bytes_per_sec: u64) -> Pacer {
        Pacer(Arc::new(Mutex::new(Pace::new(bytes_per_sec))))
    }

    fn delay_for(&self, n: usize) -> Duration {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).delay_for(n)
    }
}

/// A request body that counts what has been sent, for the idle watchdog.
/// With `rate`, the body is paced to that many bytes per second (`upload_rate_limit`).
/// `phase` shows the body's progress (a retry starts it again).
pub fn counting_body<S>(
    chunks: S,
    sent: Arc<AtomicU64>,
    rate: Option<u64>,
    phase: crate::progress::Phase,
) -> reqwest::Body
where
    S: futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
{
    paced_body(chunks, sent, rate.map(Pacer::new), phase)
}

/// [`counting_body`] drawing on a [`Pacer`] that other bodies may share.
pub fn paced_body<S>(
    chunks: S,
    sent: Arc<AtomicU64>,
    pace: Option<Pacer>,
    phase: crate::progress::Phase,
) -> reqwest::Body
where
    S: futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
{
    phase.set(0);
    let stream = chunks
        .inspect_ok(move |chunk| {
            sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            phase.add(chunk.len() as u64);
        })
        .then(move |chunk| {
            let wait = match (&chunk, pace.as_ref()) {
                (Ok(c), Some(p)) => p.delay_for(c.len()),
                _ => Duration::ZERO,
            };
            async move {
                crate::fsutil::pause(wait).await;
                chunk
            }
        });
    reqwest::Body::wrap_stream(stream)
}

/// Runs `fut` (a request, until the answer's headers), failing it when `progress` has not
/// moved for `idle`: the body being sent moves it; waiting for the answer after the body is
/// sent may take `idle` too. There is no total limit, so a multi-GiB upload over a slow link
/// is never cut while it moves.
pub async fn watch_idle<T>(
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
pub async fn next_chunk<S>(stream: &mut S, idle: Duration, what: &str) -> Result<Option<bytes::Bytes>>
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
pub async fn read_capped(resp: Response, cap: u64, idle: Duration, what: &str) -> Result<Vec<u8>> {
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

/// Reads a body through (a file read back) and returns its size and SHA-256.
pub async fn size_and_sha256(resp: Response, idle: Duration, what: &str) -> Result<(u64, String)> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = next_chunk(&mut stream, idle, what).await? {
        size += chunk.len() as u64;
        hasher.update(&chunk);
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// A body read as a stream that fails after `idle` without data, as an `AsyncRead` (what
/// `Target::open_file` hands out).
pub fn reader(resp: Response, target: String, idle: Duration) -> super::FileReader {
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
    Box::pin(tokio_util::io::StreamReader::new(stream))
}

/// Is `host` this machine? Credentials may cross plain http only there.
pub fn is_loopback(host: &str) -> bool {
    let h = host.trim_matches(['[', ']']);
    h.eq_ignore_ascii_case("localhost") || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// One target's HTTP side: the client, the route it takes, the retry budget, the idle
/// timeout, the rate limit, and the secrets no message may show. It holds secrets, so it
/// has no `Debug`.
pub struct Http {
    pub name: String,
    pub client: reqwest::Client,
    pub proxy: ProxyChoice,
    /// Secret values that must never reach a log or an error, even echoed by a server.
    secrets: Vec<String>,
    pub idle: Duration,
    pub backoff: Backoff,
    pub rate: Option<u64>,
}

impl Http {
    /// The client for `settings`, whose requests go to `url` (which chooses the proxy).
    pub fn new(settings: &TargetSettings, url: &Url, rate: Option<u64>) -> Result<Http> {
        install_crypto_provider();
        let name = settings.name.clone();
        let remote = settings
            .remote()
            .ok_or_else(|| anyhow!("target '{name}': {} is not a remote target", settings.url))?;
        let proxy =
            proxy::choose(&remote.proxy, url, &proxy::ProcessEnv).map_err(|e| anyhow!("target '{name}': {e}"))?;
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
                if let Some(file) = &remote.proxy_password_file {
                    let password = read_secret(file, "proxy_password_file", &name)?;
                    p = p.basic_auth(url.username(), &password);
                    secrets.push(password);
                }
                builder.proxy(p)
            }
        };
        if let Some(ca) = &remote.ca_file {
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
        if let (Some(cert), Some(key)) = (&remote.client_cert_file, &remote.client_key_file) {
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
        Ok(Http {
            name,
            client,
            proxy,
            secrets,
            idle: settings.idle_timeout.0,
            backoff: Backoff::new(settings.retry_budget.0),
            rate,
        })
    }

    /// Adds a secret that [`Http::scrub`] removes.
    pub fn add_secret(&mut self, secret: String) {
        self.secrets.push(secret);
    }

    /// Removes every known secret from text that came from a server, which might echo our
    /// request headers back.
    pub fn scrub(&self, text: String) -> String {
        self.secrets.iter().fold(text, |t, s| {
            if s.len() >= 4 {
                t.replace(s.as_str(), "[redacted]")
            } else {
                t
            }
        })
    }

    /// A new [`Pacer`] for `upload_rate_limit`, if there is one.
    pub fn pacer(&self) -> Option<Pacer> {
        self.rate.map(Pacer::new)
    }

    /// Sends the request `make` builds, retrying what is worth retrying within the budget.
    /// Returns the first final answer, whatever its status, and whether it came after a
    /// retry (a non-idempotent request may then have taken effect already). `url` is what
    /// messages show.
    pub async fn send_counted(
        &self,
        what: &str,
        url: &str,
        make: impl Fn(Arc<AtomicU64>) -> Result<RequestBuilder>,
    ) -> Result<(Response, bool)> {
        let mut attempt = 0u32;
        let mut stale_retried = false;
        loop {
            attempt += 1;
            let progress = Arc::new(AtomicU64::new(0));
            let (client, request) = make(progress.clone())?.build_split();
            // A streamed body (an upload) is never resent outside the budget.
            let resendable = request.as_ref().is_ok_and(|r| {
                RESENDABLE.contains(&r.method().as_str()) && r.body().is_none_or(|b| b.as_bytes().is_some())
            });
            let send = async move { client.execute(request?).await };
            let outcome = watch_idle(send, &progress, self.idle).await;
            let (why, server_asks, closed) = match outcome {
                Ok(resp) if retry::retryable_status(resp.status()) => {
                    let status = resp.status();
                    let asks = retry::retry_after(resp.headers(), chrono::Utc::now());
                    let body = read_capped(resp, ERROR_CAP, self.idle, what).await.unwrap_or_default();
                    (format!("{status}: {}", self.scrub(excerpt(&body))), asks, false)
                }
                Ok(resp) => return Ok((resp, attempt > 1)),
                // No retry changes it: this target fails now, and the run goes on.
                Err(e @ TransportError::Permanent { .. }) => {
                    return Err(anyhow::Error::new(e).context(format!("target '{}': {what} '{url}'", self.name)));
                }
                Err(TransportError::Transient(e)) => (e, None, false),
                Err(TransportError::Closed(e)) => (e, None, true),
            };
            // Typed: a caller probing the target (preflight) tells "not now" from "never".
            let not_now = |why: String| {
                Err(anyhow::Error::new(TransportError::Transient(why))
                    .context(format!("target '{}': {what} '{url}'", self.name)))
            };
            // A pooled keep-alive connection the server (or a proxy such as tinyproxy) closed
            // just as a request went out: one immediate resend on a new connection is not a
            // retry in the budget's sense, for a request that may safely arrive twice and
            // has no streamed body. A cut upload, a MOVE or a POST takes the budget's path.
            if closed && resendable && !stale_retried {
                stale_retried = true;
                tracing::debug!(target_name = %self.name, error = %why, "{what} '{url}' met a closed keep-alive connection; sending it again");
                continue;
            }
            if self.backoff.budget().is_zero() {
                return not_now(format!("{why} (not retried)"));
            }
            match self.backoff.next_delay(attempt, server_asks) {
                Some(delay) if retry::past_retry_deadline(delay) => {
                    return not_now(format!(
                        "{why} (not retried now: past this pass's retry deadline; the set is delivered later)"
                    ));
                }
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

    /// Reads an answer's body, refusing one larger than `cap`.
    pub async fn read_capped(&self, resp: Response, cap: u64, what: &str) -> Result<Vec<u8>> {
        read_capped(resp, cap, self.idle, what).await
    }

    /// `resp` if `ok` accepts its status; else what the server said, for the target to
    /// word its error.
    pub async fn accept(&self, resp: Response, ok: &[StatusCode], what: &str) -> Result<Response, Refusal> {
        let status = resp.status();
        if ok.contains(&status) {
            return Ok(resp);
        }
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(str::to_string);
        // The body only explains the status: one that cannot be read explains nothing.
        let body = self.read_capped(resp, ERROR_CAP, what).await.unwrap_or_default();
        Err(Refusal { status, location, body })
    }
}

/// An answer whose status the request did not accept: the status, its `Location` header
/// and (up to [`ERROR_CAP`] bytes of) its body.
pub struct Refusal {
    pub status: StatusCode,
    pub location: Option<String>,
    pub body: Vec<u8>,
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

    #[test]
    fn a_shared_pacer_paces_bodies_together() {
        // Two bodies of 1000 bytes each on one 1000 B/s pacer: the second waits for both.
        let p = Pacer::new(1000);
        let (a, b) = (p.clone(), p);
        assert!(a.delay_for(1000) <= Duration::from_secs(1));
        let last = b.delay_for(1000);
        assert!(last >= Duration::from_millis(1900), "{last:?}");
    }

    #[tokio::test]
    async fn a_refused_connection_is_said_once() {
        // A port nothing listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        install_crypto_provider();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let e = client
            .get(format!("http://127.0.0.1:{port}/"))
            .send()
            .await
            .unwrap_err();
        let text = flat(&e);
        assert!(text.starts_with("cannot connect: "), "{text}");
        assert!(text.contains("Connection refused"), "{text}");
        assert!(
            !text.contains("client error") && !text.contains("tcp connect error"),
            "{text}"
        );
    }
}
