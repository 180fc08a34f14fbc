//! Retries for remote targets: what is worth retrying, and how long to wait. Refused, reset
//! or cut connections, timeouts, 5xx, 408 and 429 are retried with capped exponential backoff
//! and full jitter (honouring `Retry-After`); any other answer is final, and so are the
//! transport errors no retry can change ([`TransportError::Permanent`]: a host name that
//! does not exist, a failed TLS handshake, a proxy refusing the tunnel). Each target has a
//! budget of time per run for retrying, so one dead target cannot hold a run for long.

use std::error::Error as StdError;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use super::dns::ResolveError;

tokio::task_local! {
    /// No retry is started past this instant in the current task: a delivery pass in the
    /// daemon yields to the next run this way. A request already under way is never cut
    /// (a slow but moving upload finishes); only the waiting and trying again stops.
    static RETRY_DEADLINE: tokio::time::Instant;
}

/// Runs `fut` with retries bounded by `deadline` (see [`RETRY_DEADLINE`]); unbounded with `None`.
pub async fn retries_until<F: std::future::Future>(deadline: Option<tokio::time::Instant>, fut: F) -> F::Output {
    match deadline {
        Some(d) => RETRY_DEADLINE.scope(d, fut).await,
        None => fut.await,
    }
}

/// Would a retry after `delay` start past the current task's retry deadline?
pub fn past_retry_deadline(delay: std::time::Duration) -> bool {
    RETRY_DEADLINE
        .try_with(|d| tokio::time::Instant::now() + delay > *d)
        .unwrap_or(false)
}

/// Why an attempt got no answer, sorted by whether another attempt can change that.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransportError {
    /// Every attempt would fail the same way: the target fails at once, naming the cause.
    #[error("{cause}{hint}")]
    Permanent { cause: String, hint: &'static str },
    /// Worth another attempt within the retry budget.
    #[error("{0}")]
    Transient(String),
    /// A pooled keep-alive connection the server closed just as the request went out
    /// (hyper's "incomplete message"): transient, and a request that may arrive twice is
    /// sent again at once, outside the budget.
    #[error("{0}")]
    Closed(String),
}

impl TransportError {
    /// Sorts a failed request; `message` is its one-line description.
    ///
    /// Permanent causes are typed ones found in the source chain: our resolver's
    /// [`ResolveError`] (unless the resolver merely did not answer), and a `rustls::Error`
    /// while connecting (the handshake failed: a rejected certificate, an alert, an answer
    /// that is not TLS) or a TLS alert or certificate rejection later (TLS 1.3 servers
    /// refuse a client certificate after the client's side of the handshake is done). The
    /// proxy tunnel's error type is private to hyper-util, so its outcome is told by its
    /// fixed wording: refused (407, 403, any non-2xx) is permanent, while a proxy that cannot
    /// be reached, or cuts the connection, is not. Everything else (refused, reset or cut
    /// connections, timeouts) is transient.
    ///
    /// A typed cause is described by itself (`cannot resolve host name 'x': ...`), without
    /// the layers of wrapping around it; other errors keep `message`.
    pub fn classify(e: &reqwest::Error, message: String) -> TransportError {
        if find_in_chain::<hyper::Error>(e).is_some_and(hyper::Error::is_incomplete_message) {
            return TransportError::Closed(message);
        }
        if let Some(r) = find_in_chain::<ResolveError>(e) {
            return if r.transient {
                TransportError::Transient(message)
            } else {
                TransportError::Permanent {
                    cause: r.to_string(),
                    hint: "",
                }
            };
        }
        if let Some(tls) = find_in_chain::<rustls::Error>(e)
            && (e.is_connect()
                || matches!(
                    tls,
                    rustls::Error::AlertReceived(_) | rustls::Error::InvalidCertificate(_)
                ))
        {
            let stage = if e.is_connect() {
                "TLS handshake failed"
            } else {
                "TLS error"
            };
            return TransportError::Permanent {
                cause: format!("{stage}: {tls}"),
                hint: tls_hint(tls),
            };
        }
        if !e.is_connect() {
            return TransportError::Transient(message);
        }
        let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
        while let Some(err) = cur {
            let text = err.to_string();
            if PERMANENT_TUNNEL_ERRORS.contains(&text.as_str()) {
                // hyper-util does not pass on the proxy's status (often 407 or 403).
                return TransportError::Permanent {
                    cause: message,
                    hint: " (the proxy refused the CONNECT tunnel: check proxy credentials and its allowed ports)",
                };
            }
            cur = err.source();
        }
        TransportError::Transient(message)
    }

    pub fn is_permanent(&self) -> bool {
        matches!(self, TransportError::Permanent { .. })
    }
}

/// hyper-util's `TunnelError` texts for a proxy that answered `CONNECT` with a refusal (or
/// nonsense); its other kinds (the proxy unreachable, an I/O error, an early EOF) are worth
/// retrying. The one decision here made on an error's text: hyper-util 0.1 keeps
/// `TunnelError` in a private module, so its kind cannot be matched as a type; the suite's
/// proxy tests (a tinyproxy that refuses the tunnel) fail if these words change.
const PERMANENT_TUNNEL_ERRORS: [&str; 4] = [
    "tunnel error: unsuccessful",
    "tunnel error: proxy authorization required",
    "tunnel error: missing destination host",
    "tunnel error: proxy response headers too long",
];

/// The first `T` in `e`'s source chain. An `io::Error` wrapping another error hides it from
/// `source()` (rustls errors reach hyper inside two of them), so those are opened too.
pub fn find_in_chain<'a, T: StdError + 'static>(e: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut cur: Option<&'a (dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        if let Some(inner) = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            let inner: &'a (dyn StdError + 'static) = inner;
            if let Some(t) = find_in_chain::<T>(inner) {
                return Some(t);
            }
        }
        cur = err.source();
    }
    None
}

/// The likely cause of a TLS handshake failure, where rustls's wording does not say it.
fn tls_hint(e: &rustls::Error) -> &'static str {
    use rustls::{AlertDescription, CertificateError, InvalidMessage};
    match e {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            " (the server's certificate is not signed by a trusted CA: set ca_file to its CA bundle)"
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => " (the certificate does not name this host: use the name it was issued for in url)",
        rustls::Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            " (the server's certificate has expired)"
        }
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
            " (the server wants a client certificate: set client_cert_file and client_key_file)"
        }
        // A TLS record starts with a content type byte (20..=24) and version 3.x; "HTTP/1.1
        // 400 ..." starts with 'H'.
        rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType | InvalidMessage::UnknownProtocolVersion) => {
            " (the server did not answer in TLS; it seems to speak plain HTTP on this port: use http:// in url, or the server's HTTPS port)"
        }
        _ => "",
    }
}

/// Should an answer with this status be retried? 5xx, but not those that say the server
/// cannot do this at all (501, 505).
pub fn retryable_status(s: StatusCode) -> bool {
    (s.is_server_error() && s != StatusCode::NOT_IMPLEMENTED && s != StatusCode::HTTP_VERSION_NOT_SUPPORTED)
        || s == StatusCode::REQUEST_TIMEOUT
        || s == StatusCode::TOO_MANY_REQUESTS
}

/// What a final answer most likely means, for the error message ("" when the status says it).
pub fn status_hint(method: &str, s: StatusCode) -> String {
    match s {
        StatusCode::UNAUTHORIZED => {
            " (the server refused the credentials: check username and password_file, or token_file)".into()
        }
        StatusCode::FORBIDDEN => " (the server refuses this account here: check its permissions on this path)".into(),
        StatusCode::PROXY_AUTHENTICATION_REQUIRED => {
            " (the proxy wants credentials: give them in the proxy URL and proxy_password_file)".into()
        }
        StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED if method != "PUT" && method != "GET" => {
            format!(" (the server does not accept {method} here: is WebDAV enabled at this URL?)")
        }
        _ => String::new(),
    }
}

/// `Retry-After`, as seconds or as an HTTP date.
pub fn retry_after(headers: &reqwest::header::HeaderMap, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?.to_utc();
    Some((when - now).to_std().unwrap_or(Duration::ZERO))
}

/// Backoff with a budget: the time from a target's first failure in a run until it is given
/// up, attempts and waits together.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    budget: Duration,
    first_failure: Mutex<Option<Instant>>,
}

impl Backoff {
    pub fn new(budget: Duration) -> Self {
        Backoff::with(Duration::from_millis(500), Duration::from_secs(30), budget)
    }

    fn with(base: Duration, cap: Duration, budget: Duration) -> Self {
        Backoff {
            base,
            cap,
            budget,
            first_failure: Mutex::new(None),
        }
    }

    /// The wait before retry number `attempt` (1-based), or `None` when the wait would end
    /// past the budget. Full jitter: uniform in [0, min(cap, base * 2^(attempt-1))], and at
    /// least what the server asked for with `Retry-After`.
    pub fn next_delay(&self, attempt: u32, server_asks: Option<Duration>) -> Option<Duration> {
        let exp = self
            .base
            .saturating_mul(1u32 << (attempt.saturating_sub(1)).min(16))
            .min(self.cap);
        let jittered = exp.mul_f64(rand::random::<f64>());
        let delay = server_asks.map_or(jittered, |d| d.max(jittered));
        let mut first = self.first_failure.lock().unwrap_or_else(|e| e.into_inner());
        let since = first.get_or_insert_with(Instant::now).elapsed();
        if since + delay > self.budget {
            return None;
        }
        Some(delay)
    }

    pub fn budget(&self) -> Duration {
        self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback server that answers every connection with `answer` (after reading what
    /// the client sent first), then closes it.
    fn fake_server(answer: &'static [u8]) -> u16 {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(answer);
            }
        });
        port
    }

    async fn classified(url: &str) -> TransportError {
        super::super::webdav::install_crypto_provider();
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(std::sync::Arc::new(super::super::dns::Resolver))
            .connect_timeout(Duration::from_secs(5))
            .tls_backend_rustls()
            .build()
            .unwrap();
        let e = client.get(url).send().await.unwrap_err();
        TransportError::classify(&e, format!("{e:?}"))
    }

    #[tokio::test]
    async fn transport_errors_are_sorted_by_their_typed_cause() {
        // A name that does not exist fails for good, described by itself, one short line.
        // (Only where this machine's resolver answers: one that does not is worth a retry.)
        let lookup = super::super::dns::lookup("no-such-host.invalid").unwrap_err();
        match classified("https://no-such-host.invalid/dav/").await {
            TransportError::Permanent { cause, hint } => {
                assert!(!lookup.transient);
                assert_eq!(cause, lookup.to_string());
                assert_eq!(hint, "");
            }
            TransportError::Transient(m) => assert!(lookup.transient, "{m}"),
            TransportError::Closed(m) => panic!("a lookup is not a closed connection: {m}"),
        }
        // TLS to a plain-HTTP server: for good, with the hint.
        let plain = fake_server(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        match classified(&format!("https://127.0.0.1:{plain}/")).await {
            TransportError::Permanent { cause, hint } => {
                assert!(cause.starts_with("TLS handshake failed: "), "{cause}");
                assert!(hint.contains("plain HTTP") && hint.contains("http://"), "{hint}");
            }
            other => panic!("{other:?}"),
        }
        // Refused, or cut during the handshake: worth retrying.
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = classified(&format!("http://127.0.0.1:{refused}/")).await;
        assert!(
            matches!(&e, TransportError::Transient(m) if m.contains("ConnectionRefused")),
            "{e:?}"
        );
        let cut = fake_server(b"");
        let e = classified(&format!("https://127.0.0.1:{cut}/")).await;
        assert!(matches!(e, TransportError::Transient(_)), "{e:?}");
        // A plain-HTTP server that closes the connection without answering: hyper's
        // incomplete message, typed (a request that may arrive twice is sent again at once).
        let closed = fake_server(b"");
        let e = classified(&format!("http://127.0.0.1:{closed}/")).await;
        assert!(matches!(e, TransportError::Closed(_)), "{e:?}");
        // An answer cut short is not a connect error at all.
        let short = fake_server(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let resp = client.get(format!("http://127.0.0.1:{short}/")).send().await.unwrap();
        let e = resp.bytes().await.unwrap_err();
        assert!(!TransportError::classify(&e, String::new()).is_permanent());
    }

    #[test]
    fn final_answers_say_what_to_check() {
        assert!(status_hint("PUT", StatusCode::UNAUTHORIZED).contains("password_file"));
        assert!(status_hint("PROPFIND", StatusCode::FORBIDDEN).contains("permissions"));
        assert!(status_hint("PROPFIND", StatusCode::METHOD_NOT_ALLOWED).contains("is WebDAV enabled"));
        assert!(status_hint("PROPFIND", StatusCode::NOT_IMPLEMENTED).contains("PROPFIND"));
        assert_eq!(status_hint("PUT", StatusCode::METHOD_NOT_ALLOWED), "");
        assert_eq!(status_hint("PUT", StatusCode::CONFLICT), "");
    }

    #[test]
    fn delays_grow_capped_and_stop_at_the_budget() {
        let b = Backoff::with(
            Duration::from_millis(100),
            Duration::from_millis(400),
            Duration::from_secs(2),
        );
        for attempt in 1..=10 {
            let cap = Duration::from_millis(100 * (1 << (attempt - 1))).min(Duration::from_millis(400));
            if let Some(d) = b.next_delay(attempt, None) {
                assert!(d <= cap, "attempt {attempt}: {d:?} > {cap:?}");
            }
        }
        let b = Backoff::with(
            Duration::from_millis(100),
            Duration::from_secs(1),
            Duration::from_secs(3),
        );
        assert_eq!(
            b.next_delay(1, Some(Duration::from_secs(2))),
            Some(Duration::from_secs(2))
        );
        assert_eq!(b.next_delay(2, Some(Duration::from_secs(4))), None, "past the budget");
        std::thread::sleep(Duration::from_millis(200));
        // The budget counts the time since the first failure, not only the waits.
        assert_eq!(b.next_delay(3, Some(Duration::from_millis(2850))), None);
        assert!(b.next_delay(3, Some(Duration::from_millis(2500))).is_some());
    }

    #[test]
    fn what_is_retried() {
        assert!(retryable_status(StatusCode::BAD_GATEWAY));
        assert!(retryable_status(StatusCode::INSUFFICIENT_STORAGE));
        assert!(retryable_status(StatusCode::TOO_MANY_REQUESTS));
        assert!(retryable_status(StatusCode::REQUEST_TIMEOUT));
        assert!(!retryable_status(StatusCode::FORBIDDEN));
        assert!(!retryable_status(StatusCode::CONFLICT));
        assert!(!retryable_status(StatusCode::NOT_IMPLEMENTED));
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .to_utc();
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        h.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:30 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(30)));
        h.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h, now), None);
    }
}
