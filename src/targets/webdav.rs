//! An HTTP/WebDAV server (`https://…` or `http://…`). A set is uploaded into the hidden
//! collection `<cluster>/.<id>.partial-<node>-<random>/` (files streamed from staging with
//! their `Content-Length`, `manifest.json` last), checked with `PROPFIND` (sizes, and with
//! `verify_upload = "read-back"` the SHA-256 of every file read back), then `MOVE`d to
//! `<cluster>/<id>/` with `Overwrite: F` and checked again there, so an existing set is never
//! replaced and a cut upload never looks like a set.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use reqwest::{Method, RequestBuilder, Response, StatusCode, header};
use url::Url;

pub use super::http::install_crypto_provider;
use super::http::{Http, Refusal, counting_body, excerpt, is_loopback, read_capped, read_secret, size_and_sha256};
use super::propfind::{self, DavEntry};
use super::retry;
use super::{
    Draft, FileReader, ListedSet, MANIFEST_CAP, Sent, StagedSet, Target, is_removable_debris, is_set_name,
    partial_name, safe_component,
};
use crate::config::{TargetSettings, VerifyUpload};
use crate::growing::Follower;
use crate::manifest::{MANIFEST, Manifest};
use tokio_util::sync::CancellationToken;

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
pub struct DavTarget {
    name: String,
    base: Url,
    /// The shared HTTP side: client, proxy, retries, idle timeout, rate, secrets.
    http: Http,
    auth: Auth,
    verify: VerifyUpload,
}

impl DavTarget {
    pub fn new(settings: &TargetSettings, rate: Option<u64>) -> Result<DavTarget> {
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
        Ok(DavTarget {
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
        size_and_sha256(resp, self.http.idle, &what).await
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
        super::check_sizes(
            &self.name,
            manifest,
            extra,
            |name| landed.iter().find(|e| e.name == name).and_then(|e| e.size),
            |name| format!("'{name}' in '{collection}'"),
        )?;
        if read_back {
            for f in manifest.files_on(&self.name) {
                let got = self.read_back(&join(collection, &f.stored_name)?).await?;
                super::check_read_back(&self.name, f, got)?;
            }
        }
        Ok(())
    }

    async fn upload(&self, tmp: &Url, set: &StagedSet, draft: &Draft) -> Result<()> {
        for f in set.manifest.files_on(&self.name) {
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
            super::log_upload(&self.name, &f.stored_name, f.stored_size, started, "uploaded");
        }
        // SHA256SUMS and the signature before the manifest: every visible set is signed.
        let closing = set.closing_files()?;
        for (name, bytes) in &closing {
            self.put_bytes(&join(tmp, name)?, bytes).await?;
        }
        let sizes: Vec<(&str, usize)> = closing.iter().map(|(n, b)| (*n, b.len())).collect();
        // Checked before the manifest goes up: the manifest is the last thing written.
        self.check_landed(tmp, &set.manifest, &sizes, self.verify == VerifyUpload::ReadBack)
            .await?;
        self.put_bytes(&join(tmp, MANIFEST)?, &set.manifest_json()).await
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
                let body = read_capped(resp, MANIFEST_CAP, self.http.idle, "GET manifest").await?;
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
        format!("{}, {}", self.base, self.http.proxy.describe())
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
        Ok(Draft::new(cluster, id, folder))
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
        super::log_upload(&self.name, name, size, started, "uploaded while it was written");
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
        let json_len = set.manifest_json().len();
        let closing = set.closing_files()?;
        let mut sizes: Vec<(&str, usize)> = closing.iter().map(|(n, b)| (*n, b.len())).collect();
        sizes.push((MANIFEST, json_len));
        if let Err(e) = self.check_landed(&final_url, &set.manifest, &sizes, false).await {
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
                let body = read_capped(resp, MANIFEST_CAP, self.http.idle, &what).await?;
                let Some(m) = super::listed_manifest(&self.name, url.as_str(), &e.name, &body) else {
                    continue;
                };
                let landed = self.children(&set_url).await?.unwrap_or_default();
                sets.push(super::listed_set(&self.name, &c, set_url.as_str(), m, |name| {
                    landed.iter().find(|e| e.name == name).map(|e| e.size)
                }));
            }
        }
        super::sort_newest_first(&mut sets);
        Ok(sets)
    }

    async fn open_file(&self, cluster: &str, id: &str, name: &str) -> Result<FileReader> {
        let url = self.url(&[cluster, id, name], false)?;
        let resp = self.get(&url).await?;
        Ok(super::http::reader(resp, self.name.clone(), self.http.idle))
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
