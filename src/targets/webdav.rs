//! An HTTP/WebDAV server (`https://…` or `http://…`): files are `PUT` (streamed with their
//! `Content-Length`, or chunked while they are written), folders are collections made with
//! `MKCOL` and listed with `PROPFIND`, and the atomic step is `MOVE` with `Overwrite: F`, so
//! an existing set is never replaced.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use reqwest::{Method, RequestBuilder, Response, StatusCode, header};
use url::Url;

pub use super::http::install_crypto_provider;
use super::http::{Http, Refusal, counting_body, excerpt, is_loopback, read_capped, read_secret};
use super::objects::{Body, Commit, Entry, Guard, Kind, Moved, ObjectStore, Put};
use super::propfind::{self, DavEntry};
use super::retry;
use super::{FileReader, safe_component};
use crate::config::{TargetSettings, VerifyUpload};
use crate::growing::Follower;

/// The largest PROPFIND answer read; a server sending more is refused.
const PROPFIND_CAP: u64 = 16 << 20;
/// The answers to a PUT that mean it was stored.
const PUT_OK: [StatusCode; 3] = [StatusCode::CREATED, StatusCode::NO_CONTENT, StatusCode::OK];

enum Auth {
    None,
    Basic { user: String, password: String },
    Bearer(String),
}

/// A WebDAV target. It holds secrets, so it has no `Debug`.
pub struct DavStore {
    name: String,
    base: Url,
    /// The shared HTTP side: client, proxy, retries, idle timeout, rate, secrets.
    http: Http,
    auth: Auth,
    verify: VerifyUpload,
}

impl DavStore {
    pub fn new(settings: &TargetSettings, rate: Option<u64>) -> Result<DavStore> {
        let mut http = Http::new(settings, &settings.url, rate)?;
        let name = settings.name.clone();
        let crate::config::TargetKind::WebDav(dav) = &settings.kind else {
            bail!("target '{name}': {} is not a WebDAV target", settings.url);
        };
        let auth = match (&dav.username, &dav.password_file, &dav.token_file) {
            (Some(user), Some(pw), _) => {
                let password = read_secret(pw, "password_file", &name)?;
                http.add_secret(password.clone());
                Auth::Basic {
                    user: user.clone(),
                    password,
                }
            }
            (_, _, Some(token)) => {
                let token = read_secret(token, "token_file", &name)?;
                http.add_secret(token.clone());
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
        Ok(DavStore {
            name,
            base: settings.url.clone(),
            http,
            auth,
            verify: settings.verify_upload,
        })
    }

    /// Removes every known secret from text that came from a server, which might echo our
    /// request headers back.
    fn scrub(&self, text: String) -> String {
        self.http.scrub(text)
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
        let rb = self.http.client.request(method, url.clone());
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
        self.http.send_counted(what, url.as_str(), make).await
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
        let Refusal { status, location, body } = match self.http.accept(resp, ok, what).await {
            Ok(resp) => return Ok(resp),
            Err(refusal) => refusal,
        };
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
        let body = read_capped(resp, PROPFIND_CAP, self.http.idle, &what).await?;
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
                    self.http.rate,
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

    async fn delete_url(&self, url: &Url) -> Result<()> {
        let ok = [StatusCode::NO_CONTENT, StatusCode::OK, StatusCode::NOT_FOUND];
        self.call("DELETE", url, &ok, |_| Ok(self.request(Method::DELETE, url)))
            .await
            .map(|_| ())
    }

    /// `MOVE` without overwriting. When the answer to an earlier attempt was lost, a 404 or
    /// 412 may mean the move happened: the set protocol looks at the destination.
    async fn move_no_overwrite(&self, from: &Url, to: &Url) -> Result<Moved> {
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
        let lost = retried && (status == StatusCode::NOT_FOUND || status == StatusCode::PRECONDITION_FAILED);
        let outcome = if status == StatusCode::PRECONDITION_FAILED {
            Ok(Moved::Exists)
        } else {
            self.expect("MOVE", from, resp, &[StatusCode::CREATED, StatusCode::NO_CONTENT])
                .await
                .map(|_| Moved::Done)
        };
        match (lost, outcome) {
            (false, outcome) => outcome,
            (true, Ok(_)) => Ok(Moved::Unsure(anyhow!(
                "target '{}': MOVE '{from}' to '{to}': {status} after a retry, and the destination is not this set",
                self.name
            ))),
            (true, Err(e)) => Ok(Moved::Unsure(e)),
        }
    }

    /// `PUT` of a file still being written: the length is not known yet, so the body goes
    /// chunked, and ends only once the writer has verified the file.
    async fn put_growing(&self, url: &Url, file: Follower) -> Result<Put> {
        let put = self.call("PUT", url, &PUT_OK, |progress| {
            Ok(self
                .request(Method::PUT, url)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(counting_body(
                    file.stream(1 << 20), // a staging block: one chunk header per MiB
                    progress.clone(),
                    self.http.rate,
                    crate::progress::Phase::default(),
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
        Ok(Put::Stored { size, sha256: None })
    }
}

#[async_trait]
impl ObjectStore for DavStore {
    fn name(&self) -> &str {
        &self.name
    }

    fn describe(&self, path: &[&str]) -> String {
        // Folders are the root, clusters and sets; files are in sets.
        self.url(path, path.len() < 3)
            .map(|u| u.to_string())
            .unwrap_or_else(|_| format!("{}{}", self.base, path.join("/")))
    }

    fn route(&self) -> String {
        format!("{}, {}", self.base, self.http.proxy.describe())
    }

    fn commit(&self) -> Commit {
        Commit::Rename
    }

    fn reads_back(&self) -> bool {
        self.verify == VerifyUpload::ReadBack
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

    async fn list(&self, folder: &[&str]) -> Result<Option<Vec<Entry>>> {
        let entries = self.children(&self.url(folder, true)?).await?;
        Ok(entries.map(|entries| {
            entries
                .into_iter()
                .map(|e| Entry {
                    name: e.name,
                    kind: if e.is_collection { Kind::Folder } else { Kind::File },
                    size: e.size,
                    modified: e.modified,
                })
                .collect()
        }))
    }

    async fn make_folder(&self, folder: &[&str]) -> Result<()> {
        self.mkcol(&self.url(folder, true)?).await
    }

    async fn put(&self, path: &[&str], body: Body<'_>, _guard: Guard) -> Result<Put> {
        let url = self.url(path, false)?;
        match body {
            Body::File { path, size } => {
                self.put_file(&url, path, size).await?;
                Ok(Put::Stored { size, sha256: None })
            }
            Body::Bytes(bytes) => {
                self.put_bytes(&url, bytes).await?;
                Ok(Put::Stored {
                    size: bytes.len() as u64,
                    sha256: None,
                })
            }
            Body::Growing(file) => self.put_growing(&url, file).await,
        }
    }

    async fn get(&self, path: &[&str]) -> Result<Option<FileReader>> {
        let url = self.url(path, false)?;
        let resp = self.send("GET", &url, |_| Ok(self.request(Method::GET, &url))).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = self.expect("GET", &url, resp, &[StatusCode::OK]).await?;
        Ok(Some(super::http::reader(resp, self.name.clone(), self.http.idle)))
    }

    async fn delete(&self, path: &[&str]) -> Result<()> {
        self.delete_url(&self.url(path, false)?).await
    }

    async fn delete_folder(&self, folder: &[&str]) -> Result<()> {
        self.delete_url(&self.url(folder, true)?).await
    }

    async fn rename_folder(&self, from: &[&str], to: &[&str]) -> Result<Moved> {
        self.move_no_overwrite(&self.url(from, true)?, &self.url(to, true)?)
            .await
    }
}
