//! An S3-compatible object store (`s3://BUCKET/PREFIX/`): AWS S3, OpenShift Data Foundation,
//! MinIO, Ceph RGW. Requests are signed with AWS Signature Version 4 in the `Authorization`
//! header (aws-sigv4) and sent on the same HTTP transport as WebDAV ([`super::http`]), so
//! proxy rules, retries, idle timeouts and the rate limit are one implementation.
//!
//! S3 has no rename, so a set is written under its final keys `PREFIX/<cluster>/<id>/<file>`
//! and is complete only once `manifest.json` exists, written last:
//! 1. the marker object `<cluster>/<id>/.partial-<node>` goes up first: it names the node
//!    assembling the set, so that debris (objects of a set without a manifest, and multipart
//!    uploads under it) is removed like a WebDAV target's hidden folders: this node's at once,
//!    another node's once nothing under the set has changed for a day;
//! 2. every file, with `Content-MD5` (which buckets with Object Lock require) and
//!    `If-None-Match: *` (where the server honours it, nothing is ever replaced); a file of
//!    more than [`PART_SIZE`] goes as a multipart upload, [`PARTS_IN_FLIGHT`] parts at once,
//!    each part read from its file twice (once for its MD5, once to send it: memory stays a
//!    few chunks whatever the part size) and retried on its own; an upload that fails is
//!    aborted;
//! 3. `SHA256SUMS` (and the signature), the sizes checked with a listing (and with
//!    `verify_upload = "read-back"` every file read back), then `manifest.json`, then the
//!    marker is removed.

use std::collections::BTreeMap;
use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings, UriPathNormalizationMode,
    sign,
};
use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use futures_util::stream::{BoxStream, FuturesUnordered};
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use md5::Md5;
use reqwest::{Method, RequestBuilder, Response, StatusCode, header};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use url::Url;

use super::http::{ERROR_CAP, Http, Pacer, Refusal, is_loopback, paced_body, read_secret, size_and_sha256};
use super::{
    Draft, FOREIGN_DEBRIS_AGE, FileReader, ListedSet, MANIFEST_CAP, PARTIAL_MARK, Sent, StagedSet, Target, is_set_name,
    safe_component,
};
use crate::config::{TargetSettings, VerifyUpload};
use crate::growing::Follower;
use crate::manifest::{MANIFEST, Manifest};
use tokio_util::sync::CancellationToken;

/// The size of each part of a multipart upload (all but the last). 16 MiB: few requests
/// for a multi-GiB snapshot, up to 160 GiB within S3's 10,000 parts, and no memory cost,
/// since a part is streamed from its file rather than held.
pub const PART_SIZE: u64 = 16 << 20;
/// Parts of one upload sent at once.
pub const PARTS_IN_FLIGHT: usize = 3;
/// S3's limit on the parts of one upload.
const MAX_PARTS: u32 = 10_000;
/// The chunks a body is streamed in.
const CHUNK: usize = 256 * 1024;
/// The largest listing page read (S3 sends at most 1000 keys a page).
const LIST_CAP: u64 = 16 << 20;
/// The test suite's knob for a small part size (moto then needs `S3_UPLOAD_PART_MIN_SIZE`).
const PART_SIZE_ENV: &str = "ETCD_BACKUPD_S3_PART_SIZE";

/// An S3 target. It holds secrets, so it has no `Debug`.
pub struct S3Target {
    name: String,
    bucket: String,
    /// The key prefix: `""` or `a/b/`.
    prefix: String,
    /// The bucket's URL: `https://endpoint/bucket/` (path style) or `https://bucket.endpoint/`.
    base: Url,
    region: String,
    credentials: Credentials,
    http: Http,
    verify: VerifyUpload,
    part_size: u64,
    /// Cleared once the server refuses `If-None-Match` (501): it cannot guard a key then.
    conditional: AtomicBool,
    /// Cleared once the server answers `ListMultipartUploads` with 501.
    lists_uploads: AtomicBool,
}

/// An object in a listing.
#[derive(Debug, Clone)]
struct Object {
    key: String,
    size: Option<u64>,
    modified: Option<DateTime<Utc>>,
}

/// A multipart upload in progress.
#[derive(Debug, Clone)]
struct Upload {
    key: String,
    id: String,
    initiated: Option<DateTime<Utc>>,
}

/// What the bucket holds under one `<cluster>/<id>/`.
#[derive(Debug, Default)]
struct SetObjects {
    /// Objects but the markers (`manifest.json` included).
    files: Vec<Object>,
    /// `.partial-<node>` markers: the node, and when it was written.
    markers: Vec<(String, Object)>,
    uploads: Vec<Upload>,
}

impl SetObjects {
    fn has_manifest(&self) -> bool {
        self.files.iter().any(|o| o.key.ends_with(&format!("/{MANIFEST}")))
    }

    /// When anything under the set last changed.
    fn newest(&self) -> Option<DateTime<Utc>> {
        let objects = self.files.iter().chain(self.markers.iter().map(|(_, o)| o));
        objects
            .map(|o| o.modified)
            .chain(self.uploads.iter().map(|u| u.initiated))
            .max()
            .flatten()
    }

    /// Is this an incomplete set this node may remove: its own (it runs one backup at a
    /// time), or anyone's once nothing under it has changed for a day?
    fn is_debris(&self, node: &str, now: DateTime<Utc>) -> bool {
        !self.has_manifest()
            && (self.markers.iter().any(|(n, _)| n == node)
                || self.newest().is_some_and(|t| now - t >= FOREIGN_DEBRIS_AGE))
    }
}

/// Where the bytes of an upload come from.
#[derive(Clone)]
enum Source {
    /// A complete file in staging.
    File(PathBuf),
    /// The snapshot file while it is written (the pipelined path).
    Growing(Follower),
}

impl Source {
    /// Bytes `from..from + len` (fewer if the file ends sooner).
    fn range(&self, from: u64, len: u64) -> BoxStream<'static, std::io::Result<Bytes>> {
        match self {
            Source::Growing(f) => f.range(from, len, CHUNK).boxed(),
            Source::File(path) => {
                let path = path.clone();
                futures_util::stream::once(async move {
                    let mut f = tokio::fs::File::open(&path)
                        .await
                        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot open '{}': {e}", path.display())))?;
                    f.seek(SeekFrom::Start(from)).await?;
                    Ok::<_, std::io::Error>(tokio_util::io::ReaderStream::with_capacity(f.take(len), CHUNK))
                })
                .try_flatten()
                .boxed()
            }
        }
    }

    /// The length and MD5 of bytes `from..from + len`, fed to `whole` too. For a growing
    /// file this waits until they are written (or the file ends).
    async fn digest(&self, from: u64, len: u64, whole: &mut Sha256) -> Result<(u64, [u8; 16])> {
        let mut md5 = Md5::new();
        let mut n = 0u64;
        let mut chunks = self.range(from, len);
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            md5.update(&chunk);
            whole.update(&chunk);
            n += chunk.len() as u64;
        }
        Ok((n, md5.finalize().into()))
    }
}

/// An S3 XML answer, flattened: the text of every element by its path of local names
/// (`ListBucketResult/Contents/Key`), in document order; a container appears after its
/// children, with empty text. Only the predefined entities and character references are
/// resolved; a DOCTYPE is refused.
struct Xml(Vec<(String, String)>);

impl Xml {
    fn parse(body: &[u8]) -> Result<Xml> {
        use quick_xml::events::Event;
        let mut reader = quick_xml::Reader::from_reader(body);
        let mut buf = Vec::new();
        let mut stack: Vec<String> = Vec::new();
        let mut text = String::new();
        let mut out = Vec::new();
        let bad = |e: &dyn std::fmt::Display| anyhow!("invalid XML answer: {e}");
        loop {
            match reader.read_event_into(&mut buf).map_err(|e| bad(&e))? {
                Event::Start(e) => {
                    stack.push(String::from_utf8_lossy(e.local_name().as_ref()).into_owned());
                    text.clear();
                }
                Event::Empty(e) => {
                    let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                    let path = stack.iter().chain([&name]).cloned().collect::<Vec<_>>().join("/");
                    out.push((path, String::new()));
                }
                Event::Text(t) => text.push_str(&t.decode().map_err(|e| bad(&e))?),
                Event::CData(t) => text.push_str(&t.decode().map_err(|e| bad(&e))?),
                Event::GeneralRef(r) => match r.resolve_char_ref().map_err(|e| bad(&e))? {
                    Some(c) => text.push(c),
                    None => text.push(match r.decode().map_err(|e| bad(&e))?.as_ref() {
                        "amp" => '&',
                        "lt" => '<',
                        "gt" => '>',
                        "quot" => '"',
                        "apos" => '\'',
                        other => bail!("invalid XML answer: entity '&{other};' is not allowed"),
                    }),
                },
                Event::DocType(_) => bail!("invalid XML answer: a DOCTYPE is not allowed"),
                Event::End(_) => {
                    let path = stack.join("/");
                    stack.pop();
                    out.push((path, std::mem::take(&mut text).trim().to_string()));
                }
                Event::Eof => break,
                _ => {}
            }
            buf.clear();
        }
        if !stack.is_empty() || out.is_empty() {
            bail!("invalid XML answer: the document is incomplete");
        }
        Ok(Xml(out))
    }

    /// The root element's name (it closes last).
    fn root(&self) -> &str {
        self.0.last().map(|(p, _)| p.as_str()).unwrap_or_default()
    }

    fn field(&self, path: &str) -> Option<&str> {
        self.0.iter().find(|(p, _)| p == path).map(|(_, t)| t.as_str())
    }

    /// Each element at `path`, as its children's texts by name.
    fn records(&self, path: &str) -> Vec<BTreeMap<String, String>> {
        let inner = format!("{path}/");
        let mut out = Vec::new();
        let mut current = BTreeMap::new();
        for (p, t) in &self.0 {
            if let Some(child) = p.strip_prefix(&inner) {
                if !child.contains('/') {
                    current.insert(child.to_string(), t.clone());
                }
            } else if p == path {
                out.push(std::mem::take(&mut current));
            }
        }
        out
    }
}

/// The `Code` and `Message` of an S3 error answer, when it is one.
fn error_fields(body: &[u8]) -> (Option<String>, Option<String>) {
    match Xml::parse(body) {
        Ok(x) if x.root() == "Error" => (
            x.field("Error/Code").map(str::to_string),
            x.field("Error/Message").map(str::to_string),
        ),
        _ => (None, None),
    }
}

/// What an S3 error code most likely means, for the message.
fn code_hint(code: Option<&str>, status: StatusCode) -> &'static str {
    match code {
        Some("SignatureDoesNotMatch" | "InvalidAccessKeyId" | "InvalidSecurity") => {
            " (the server refused the key: check access_key_file and secret_key_file)"
        }
        Some("AccessDenied" | "AllAccessDisabled") => {
            " (the key may not do this in this bucket: check its policy, and for a delete the bucket's Object Lock)"
        }
        Some("NoSuchBucket") => " (no such bucket: create it, or fix the bucket in url)",
        Some("RequestTimeTooSkewed") => " (this host's clock is off by more than 15 minutes: check NTP)",
        Some("AuthorizationHeaderMalformed" | "PermanentRedirect" | "IllegalLocationConstraintException") => {
            " (the bucket is elsewhere: check region and endpoint)"
        }
        _ if status == StatusCode::MOVED_PERMANENTLY || status == StatusCode::TEMPORARY_REDIRECT => {
            " (the bucket is elsewhere: check region and endpoint)"
        }
        _ if status == StatusCode::FORBIDDEN => {
            " (the server refused the request: check access_key_file, secret_key_file and the key's policy)"
        }
        _ => "",
    }
}

fn parse_time(s: Option<&String>) -> Option<DateTime<Utc>> {
    s.and_then(|t| DateTime::parse_from_rfc3339(t).ok()).map(|t| t.to_utc())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The request body of `CompleteMultipartUpload`.
fn complete_body(parts: &[(u32, String)]) -> String {
    let mut xml = String::from("<CompleteMultipartUpload>");
    for (n, etag) in parts {
        xml.push_str(&format!(
            "<Part><PartNumber>{n}</PartNumber><ETag>{}</ETag></Part>",
            quick_xml::escape::escape(etag.as_str())
        ));
    }
    xml.push_str("</CompleteMultipartUpload>");
    xml
}

/// The parts of one multipart upload being sent.
struct Parts<'a> {
    inflight: FuturesUnordered<BoxFuture<'a, Result<(u32, String, u64)>>>,
    /// Part numbers and ETags of the parts stored.
    done: Vec<(u32, String)>,
    /// Bytes stored.
    stored: u64,
    phase: &'a crate::progress::Phase,
}

impl Parts<'_> {
    fn record(&mut self, (number, etag, len): (u32, String, u64)) {
        self.done.push((number, etag));
        self.stored += len;
        self.phase.set(self.stored);
    }

    /// Waits for the next part in flight to be stored; a failed part ends it all.
    async fn wait_one(&mut self) -> Result<()> {
        if let Some(r) = self.inflight.next().await {
            self.record(r?);
        }
        Ok(())
    }

    /// Runs `fut` while the parts in flight go on.
    async fn drive<T>(&mut self, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return out,
                Some(r) = self.inflight.next(), if !self.inflight.is_empty() => self.record(r?),
            }
        }
    }
}

/// One of S3's paged listings, for [`S3Target::list_paged`].
struct Listing {
    op: &'static str,
    /// The root element of its answer.
    root: &'static str,
    /// What an answer with another root is not, for the error.
    kind: &'static str,
    /// Where the next page starts: the fields of a truncated answer, and the query
    /// parameters that carry them to the next request.
    next: &'static [(&'static str, &'static str)],
    /// What a truncated answer lacking them is without, for the error.
    no_next: &'static str,
    /// Optional to a set: a server that answers `501 Not Implemented` lacks it, and the
    /// listing is then empty ([`Listed::NotImplemented`]).
    optional: bool,
}

/// How a paged listing ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listed {
    Complete,
    /// An optional listing the server answered with `501 Not Implemented`.
    NotImplemented,
}

const LIST_OBJECTS: Listing = Listing {
    op: "ListObjectsV2",
    root: "ListBucketResult",
    kind: "a listing",
    next: &[("NextContinuationToken", "continuation-token")],
    no_next: "a new continuation token",
    optional: false,
};

const LIST_UPLOADS: Listing = Listing {
    op: "ListMultipartUploads",
    root: "ListMultipartUploadsResult",
    kind: "a listing of uploads",
    next: &[
        ("NextKeyMarker", "key-marker"),
        ("NextUploadIdMarker", "upload-id-marker"),
    ],
    no_next: "new markers",
    // Used only to find uploads a crash left behind; s3s-fs, for one, does not implement it.
    optional: true,
};

/// What a guarded write found.
enum Put {
    Stored,
    /// Another object is at the key (`If-None-Match` refused it).
    Taken,
}

impl S3Target {
    pub fn new(settings: &TargetSettings, rate: Option<u64>) -> Result<S3Target> {
        let name = settings.name.clone();
        let s3 = settings
            .s3
            .as_ref()
            .ok_or_else(|| anyhow!("target '{name}': an s3:// target needs its s3 settings"))?;
        let bucket = settings.url.host_str().unwrap_or_default().to_string();
        let prefix = settings.url.path().trim_start_matches('/').to_string();
        let mut base = s3.endpoint.clone();
        if s3.path_style {
            base.set_path(&format!("/{bucket}/"));
        } else {
            let host = format!("{bucket}.{}", base.host_str().unwrap_or_default());
            base.set_host(Some(&host))
                .map_err(|e| anyhow!("target '{name}': endpoint with bucket {bucket:?}: {e}"))?;
            base.set_path("/");
        }
        let mut http = Http::new(settings, &base, rate)?;
        let access = read_secret(&s3.access_key_file, "access_key_file", &name)?;
        let secret = read_secret(&s3.secret_key_file, "secret_key_file", &name)?;
        http.add_secret(secret.clone());
        let part_size = std::env::var(PART_SIZE_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|n| *n >= 1024)
            .unwrap_or(PART_SIZE);
        Ok(S3Target {
            name,
            bucket,
            prefix,
            base,
            region: s3.region.clone(),
            credentials: Credentials::new(access, secret, None, None, "etcd-backupd"),
            http,
            verify: settings.verify_upload,
            part_size,
            conditional: AtomicBool::new(true),
            lists_uploads: AtomicBool::new(true),
        })
    }

    /// `PREFIX/seg1/seg2`; every segment must be a plain name.
    fn key(&self, segments: &[&str]) -> Result<String> {
        if let Some(bad) = segments.iter().find(|s| !safe_component(s)) {
            bail!("target '{}': {bad:?} is not a usable name", self.name);
        }
        Ok(format!("{}{}", self.prefix, segments.join("/")))
    }

    /// `s3://bucket/key`, for messages.
    fn shown(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// The URL of `key` (or of the bucket, for `""`) with `query`.
    fn url(&self, key: &str, query: &[(&str, &str)]) -> Url {
        let mut u = self.base.clone();
        if !key.is_empty()
            && let Ok(mut path) = u.path_segments_mut()
        {
            path.pop_if_empty();
            path.extend(key.split('/'));
        }
        if !query.is_empty() {
            let mut q = u.query_pairs_mut();
            for (k, v) in query {
                if v.is_empty() && matches!(*k, "uploads" | "delete") {
                    q.append_key_only(k);
                } else {
                    q.append_pair(k, v);
                }
            }
        }
        u
    }

    /// A request to `url` without a body, signed with SigV4 (in the `Authorization`
    /// header); `headers` are sent and signed.
    fn signed(&self, method: Method, url: &Url, headers: &[(&str, String)]) -> Result<RequestBuilder> {
        self.sign(method, url, headers, SignableBody::Bytes(&[]))
    }

    /// [`S3Target::signed`] for a body streamed from a file: its hash is not signed
    /// (`UNSIGNED-PAYLOAD`), its `Content-MD5` (in `headers`) is, and the server checks that.
    fn signed_stream(&self, method: Method, url: &Url, headers: &[(&str, String)]) -> Result<RequestBuilder> {
        self.sign(method, url, headers, SignableBody::UnsignedPayload)
    }

    /// [`S3Target::signed`] with `body`, whose SHA-256 is signed too.
    fn signed_with(
        &self,
        method: Method,
        url: &Url,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> Result<RequestBuilder> {
        Ok(self
            .sign(method, url, headers, SignableBody::Bytes(body))?
            .body(body.to_vec()))
    }

    fn sign(
        &self,
        method: Method,
        url: &Url,
        headers: &[(&str, String)],
        body: SignableBody,
    ) -> Result<RequestBuilder> {
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        let identity = self.credentials.clone().into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| anyhow!("target '{}': cannot sign a request: {e}", self.name))?
            .into();
        let signable = SignableRequest::new(
            method.as_str(),
            url.as_str(),
            headers.iter().map(|(k, v)| (*k, v.as_str())),
            body,
        )
        .map_err(|e| anyhow!("target '{}': cannot sign a request: {e}", self.name))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| anyhow!("target '{}': cannot sign a request: {e}", self.name))?
            .into_parts();
        let mut rb = self.http.client.request(method, url.clone());
        for (k, v) in headers {
            rb = rb.header(*k, v);
        }
        for (k, v) in instructions.headers() {
            rb = rb.header(k, v);
        }
        Ok(rb)
    }

    async fn send(
        &self,
        what: &str,
        shown: &str,
        make: impl Fn(Arc<AtomicU64>) -> Result<RequestBuilder>,
    ) -> Result<(Response, bool)> {
        self.http.send_counted(what, shown, make).await
    }

    /// Fails with the server's status, S3 error code and message unless `ok` accepts it.
    async fn expect(&self, what: &str, shown: &str, resp: Response, ok: &[StatusCode]) -> Result<Response> {
        let answer = self.http.accept(resp, ok, what).await;
        answer.map_err(|refusal| self.failure(what, shown, refusal))
    }

    fn failure(&self, what: &str, shown: &str, refusal: Refusal) -> anyhow::Error {
        let Refusal { status, location, body } = refusal;
        let (code, message) = error_fields(&body);
        let mut msg = format!("target '{}': {what} '{shown}': {status}", self.name);
        if let Some(c) = &code {
            msg.push_str(&format!(" {c}"));
        }
        let detail = match &message {
            Some(m) => self.http.scrub(m.clone()),
            None if code.is_none() => self.http.scrub(super::http::excerpt(&body)),
            None => String::new(),
        };
        if !detail.is_empty() {
            msg.push_str(&format!(": {detail}"));
        }
        if let Some(loc) = location {
            msg.push_str(&format!(" (Location: {})", self.http.scrub(loc)));
        }
        msg.push_str(code_hint(code.as_deref(), status));
        anyhow!(msg)
    }

    /// `send`, then `expect`.
    async fn call(
        &self,
        what: &str,
        shown: &str,
        ok: &[StatusCode],
        make: impl Fn(Arc<AtomicU64>) -> Result<RequestBuilder>,
    ) -> Result<Response> {
        let (resp, _) = self.send(what, shown, make).await?;
        self.expect(what, shown, resp, ok).await
    }

    /// Every page of `listing` for `query` under `prefix`, each handed to `page` (with the
    /// words that name the request, for its errors) to take its records.
    async fn list_paged(
        &self,
        listing: &Listing,
        prefix: &str,
        query: &[(&str, &str)],
        mut page: impl FnMut(&Xml, &str) -> Result<()>,
    ) -> Result<Listed> {
        let shown = self.shown(prefix);
        let what = format!("target '{}': {} '{shown}'", self.name, listing.op);
        let root = listing.root;
        let mut markers: Vec<(&str, String)> = Vec::new();
        loop {
            let mut query = query.to_vec();
            query.extend(markers.iter().map(|(k, v)| (*k, v.as_str())));
            let url = self.url("", &query);
            let ok: &[StatusCode] = if listing.optional {
                &[StatusCode::OK, StatusCode::NOT_IMPLEMENTED]
            } else {
                &[StatusCode::OK]
            };
            let resp = self
                .call(listing.op, &shown, ok, |_| self.signed(Method::GET, &url, &[]))
                .await?;
            if resp.status() == StatusCode::NOT_IMPLEMENTED {
                return Ok(Listed::NotImplemented);
            }
            let body = self.http.read_capped(resp, LIST_CAP, &what).await?;
            let xml = Xml::parse(&body).with_context(|| what.clone())?;
            if xml.root() != root {
                bail!("{what}: not {} (root element {:?})", listing.kind, xml.root());
            }
            page(&xml, &what)?;
            if xml.field(&format!("{root}/IsTruncated")) != Some("true") {
                return Ok(Listed::Complete);
            }
            let next: Option<Vec<(&str, String)>> = listing
                .next
                .iter()
                .map(|(field, param)| Some((*param, xml.field(&format!("{root}/{field}"))?.to_string())))
                .collect();
            // The same markers again would ask for the same page for ever.
            match next {
                Some(next) if next != markers => markers = next,
                _ => bail!("{what}: a truncated listing without {}", listing.no_next),
            }
        }
    }

    /// Every object under `prefix` (paged); with `delimited`, only the next level, and
    /// the common prefixes below it.
    async fn list_objects(&self, prefix: &str, delimited: bool) -> Result<(Vec<Object>, Vec<String>)> {
        let mut objects = Vec::new();
        let mut prefixes = Vec::new();
        let mut query = vec![("list-type", "2"), ("prefix", prefix)];
        if delimited {
            query.push(("delimiter", "/"));
        }
        self.list_paged(&LIST_OBJECTS, prefix, &query, |xml, what| {
            for r in xml.records("ListBucketResult/Contents") {
                let key = r.get("Key").cloned().unwrap_or_default();
                if !key.starts_with(prefix) {
                    bail!("{what}: the listing holds {key:?}, outside the prefix");
                }
                objects.push(Object {
                    size: r.get("Size").and_then(|s| s.parse().ok()),
                    modified: parse_time(r.get("LastModified")),
                    key,
                });
            }
            for r in xml.records("ListBucketResult/CommonPrefixes") {
                prefixes.extend(r.get("Prefix").cloned());
            }
            Ok(())
        })
        .await?;
        Ok((objects, prefixes))
    }

    /// The multipart uploads in progress under `prefix` (paged); none on a server that does
    /// not implement the listing (said once per target: uploads a crash cut short then stay
    /// until the bucket's own lifecycle rule aborts them).
    async fn list_uploads(&self, prefix: &str) -> Result<Vec<Upload>> {
        let mut uploads = Vec::new();
        if !self.lists_uploads.load(Ordering::Relaxed) {
            return Ok(uploads);
        }
        let query = [("uploads", ""), ("prefix", prefix)];
        let listed = self
            .list_paged(&LIST_UPLOADS, prefix, &query, |xml, _| {
                for r in xml.records("ListMultipartUploadsResult/Upload") {
                    let (Some(key), Some(id)) = (r.get("Key"), r.get("UploadId")) else {
                        continue;
                    };
                    if key.starts_with(prefix) {
                        uploads.push(Upload {
                            key: key.clone(),
                            id: id.clone(),
                            initiated: parse_time(r.get("Initiated")),
                        });
                    }
                }
                Ok(())
            })
            .await?;
        if listed == Listed::NotImplemented && self.lists_uploads.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                target_name = %self.name,
                "target '{}': the server does not implement ListMultipartUploads (501 Not Implemented); uploads a crash cut short are not aborted by etcd-backupd here: give the bucket a lifecycle rule that aborts incomplete multipart uploads",
                self.name
            );
        }
        Ok(uploads)
    }

    /// What the bucket holds under `<cluster>/`, by set id. Objects and uploads deeper or
    /// shallower than `<cluster>/<id>/<name>`, or with unusable names, are not ours.
    async fn sets_in(&self, cluster: &str) -> Result<BTreeMap<String, SetObjects>> {
        let cluster_prefix = format!("{}/", self.key(&[cluster])?);
        let (objects, _) = self.list_objects(&cluster_prefix, false).await?;
        let uploads = self.list_uploads(&cluster_prefix).await?;
        let mut sets: BTreeMap<String, SetObjects> = BTreeMap::new();
        let split = |key: &str| -> Option<(String, String)> {
            let rest = key.strip_prefix(&cluster_prefix)?;
            let (id, name) = rest.split_once('/')?;
            (safe_component(id) && safe_component(name)).then(|| (id.to_string(), name.to_string()))
        };
        for o in objects {
            let Some((id, name)) = split(&o.key) else { continue };
            let set = sets.entry(id).or_default();
            match name.strip_prefix(PARTIAL_MARK) {
                Some(node) => set.markers.push((node.to_string(), o)),
                None => set.files.push(o),
            }
        }
        for u in uploads {
            let Some((id, _)) = split(&u.key) else { continue };
            sets.entry(id).or_default().uploads.push(u);
        }
        Ok(sets)
    }

    async fn delete_object(&self, key: &str) -> Result<()> {
        let url = self.url(key, &[]);
        let ok = [StatusCode::NO_CONTENT, StatusCode::OK, StatusCode::NOT_FOUND];
        self.call("DeleteObject", &self.shown(key), &ok, |_| {
            self.signed(Method::DELETE, &url, &[])
        })
        .await
        .map(|_| ())
    }

    async fn abort_upload(&self, key: &str, id: &str) -> Result<()> {
        let url = self.url(key, &[("uploadId", id)]);
        let ok = [StatusCode::NO_CONTENT, StatusCode::OK, StatusCode::NOT_FOUND];
        self.call("AbortMultipartUpload", &self.shown(key), &ok, |_| {
            self.signed(Method::DELETE, &url, &[])
        })
        .await
        .map(|_| ())
    }

    /// Removes an incomplete set: its uploads aborted, its objects deleted, its markers
    /// last (so that a removal cut short still says whose set it was).
    async fn remove_objects(&self, set: &SetObjects) -> Result<()> {
        for u in &set.uploads {
            self.abort_upload(&u.key, &u.id).await?;
        }
        for o in &set.files {
            self.delete_object(&o.key).await?;
        }
        for (_, o) in &set.markers {
            self.delete_object(&o.key).await?;
        }
        Ok(())
    }

    /// Removes the debris among `sets`: incomplete sets of this node, and others' once a
    /// day old; in complete sets, markers and uploads left over the same way.
    async fn remove_debris_among(&self, sets: &BTreeMap<String, SetObjects>, node: &str) -> usize {
        let now = Utc::now();
        let mut count = 0;
        for (id, set) in sets {
            let outcome = if set.is_debris(node, now) {
                let r = self.remove_objects(set).await;
                if r.is_ok() {
                    count += 1;
                    tracing::info!(target_name = %self.name, name = %id, "removed an incomplete set left by an earlier run");
                }
                r
            } else if set.has_manifest() {
                let own = set.markers.iter().any(|(n, _)| n == node);
                let old = |t: Option<DateTime<Utc>>| t.is_some_and(|t| now - t >= FOREIGN_DEBRIS_AGE);
                let leftover = SetObjects {
                    files: Vec::new(),
                    markers: set
                        .markers
                        .iter()
                        .filter(|(n, o)| n == node || old(o.modified))
                        .cloned()
                        .collect(),
                    uploads: set
                        .uploads
                        .iter()
                        .filter(|u| own || old(u.initiated))
                        .cloned()
                        .collect(),
                };
                self.remove_objects(&leftover).await
            } else {
                Ok(())
            };
            if let Err(e) = outcome {
                tracing::warn!(target_name = %self.name, name = %id, error = %crate::error::one_line(&e), "cannot remove an incomplete set");
            }
        }
        count
    }

    /// Removes what this node wrote of set `id` in `cluster` that is not complete: every
    /// object under it when it has no manifest, else only the marker.
    async fn clear(&self, cluster: &str, id: &str, marker: &str) -> Result<()> {
        let sets = self.sets_in(cluster).await?;
        match sets.get(id) {
            Some(set) if !set.has_manifest() => self.remove_objects(set).await,
            _ => self.delete_object(&self.key(&[cluster, id, marker])?).await,
        }
    }

    /// Does `key` hold exactly `size` bytes with this SHA-256 (read back to tell)?
    async fn holds(&self, key: &str, size: u64, sha256: &str) -> Result<bool> {
        let (n, sha) = self.read_back(key).await?;
        Ok(n == size && sha == sha256)
    }

    /// Streams an object back and returns its size and SHA-256.
    async fn read_back(&self, key: &str) -> Result<(u64, String)> {
        let shown = self.shown(key);
        let url = self.url(key, &[]);
        let resp = self
            .call("GetObject", &shown, &[StatusCode::OK], |_| {
                self.signed(Method::GET, &url, &[])
            })
            .await?;
        let what = format!("target '{}': GetObject '{shown}'", self.name);
        size_and_sha256(resp, self.http.idle, &what).await
    }

    /// The headers of a guarded write: `If-None-Match: *` unless the server refused it.
    fn guard(&self) -> Vec<(&'static str, String)> {
        if self.conditional.load(Ordering::Relaxed) {
            vec![("if-none-match", "*".to_string())]
        } else {
            Vec::new()
        }
    }

    /// A server that does not implement `If-None-Match` says 501; then it cannot guard.
    fn unguarded(&self, status: StatusCode) -> bool {
        if status == StatusCode::NOT_IMPLEMENTED && self.conditional.swap(false, Ordering::Relaxed) {
            tracing::warn!(target_name = %self.name, "the server does not implement If-None-Match; writes are not guarded against replacing an object");
            return true;
        }
        false
    }

    /// One PUT of `len` bytes of `source` at offset 0 ([`S3Target::put_guarded`]).
    #[allow(clippy::too_many_arguments)]
    async fn put_object(
        &self,
        key: &str,
        source: &Source,
        len: u64,
        md5: [u8; 16],
        sha256: &str,
        pacer: &Option<Pacer>,
        phase: &crate::progress::Phase,
    ) -> Result<Put> {
        self.put_guarded(key, len, md5, sha256, |url, headers, progress| {
            Ok(self
                .signed_stream(Method::PUT, url, headers)?
                .header(header::CONTENT_LENGTH, len)
                .body(paced_body(source.range(0, len), progress, pacer.clone(), phase.clone())))
        })
        .await
    }

    /// A small object from memory ([`S3Target::put_guarded`]).
    async fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<Put> {
        let md5: [u8; 16] = Md5::digest(bytes).into();
        let sha = hex::encode(Sha256::digest(bytes));
        self.put_guarded(key, bytes.len() as u64, md5, &sha, |url, headers, _| {
            self.signed_with(Method::PUT, url, headers, bytes)
        })
        .await
    }

    /// A `PutObject` of `len` bytes with this MD5 and SHA-256, guarded: a key already taken
    /// is [`Put::Taken`] unless it holds exactly these bytes (an answer lost before a
    /// retry). `make` builds each attempt's signed request from its URL, headers and
    /// progress counter.
    async fn put_guarded(
        &self,
        key: &str,
        len: u64,
        md5: [u8; 16],
        sha256: &str,
        make: impl Fn(&Url, &[(&str, String)], Arc<AtomicU64>) -> Result<RequestBuilder>,
    ) -> Result<Put> {
        let url = self.url(key, &[]);
        let shown = self.shown(key);
        loop {
            let mut headers = vec![
                ("content-md5", b64(&md5)),
                ("content-type", "application/octet-stream".to_string()),
            ];
            headers.extend(self.guard());
            let (resp, _) = self
                .send("PutObject", &shown, |progress| make(&url, &headers, progress))
                .await?;
            let status = resp.status();
            if self.unguarded(status) {
                continue;
            }
            if status == StatusCode::PRECONDITION_FAILED {
                return Ok(if self.holds(key, len, sha256).await? {
                    Put::Stored
                } else {
                    Put::Taken
                });
            }
            self.expect("PutObject", &shown, resp, &[StatusCode::OK]).await?;
            return Ok(Put::Stored);
        }
    }

    /// Uploads `source` to `key`: one PUT when it fits in a part, else a multipart upload
    /// ([`PARTS_IN_FLIGHT`] parts at once, each retried on its own, aborted on failure).
    /// Returns the size and SHA-256 of what was stored.
    async fn put_source(
        &self,
        key: &str,
        source: &Source,
        phase: &crate::progress::Phase,
    ) -> Result<(u64, String, Put)> {
        let pacer = self.http.pacer();
        let mut whole = Sha256::new();
        let (n, md5) = source.digest(0, self.part_size, &mut whole).await?;
        if n < self.part_size {
            let sha = hex::encode(whole.finalize());
            let put = self.put_object(key, source, n, md5, &sha, &pacer, phase).await?;
            return Ok((n, sha, put));
        }
        let id = self.create_upload(key).await?;
        let sent = self
            .put_parts(key, &id, source, (n, md5), &mut whole, &pacer, phase)
            .await;
        let sha = hex::encode(whole.finalize());
        let done = match sent {
            Ok((parts, size)) => self.complete_upload(key, &id, &parts, size, &sha).await,
            Err(e) => Err(e),
        };
        match done {
            Ok((size, Put::Stored)) => Ok((size, sha, Put::Stored)),
            other => {
                if let Err(a) = self.abort_upload(key, &id).await {
                    tracing::warn!(target_name = %self.name, key = %key, error = %crate::error::one_line(&a), "cannot abort a failed multipart upload; the next run removes it");
                }
                other.map(|(size, put)| (size, sha, put))
            }
        }
    }

    async fn create_upload(&self, key: &str) -> Result<String> {
        let url = self.url(key, &[("uploads", "")]);
        let shown = self.shown(key);
        let headers = [("content-type", "application/octet-stream".to_string())];
        let resp = self
            .call("CreateMultipartUpload", &shown, &[StatusCode::OK], |_| {
                self.signed(Method::POST, &url, &headers)
            })
            .await?;
        let what = format!("target '{}': CreateMultipartUpload '{shown}'", self.name);
        let body = self.http.read_capped(resp, ERROR_CAP, &what).await?;
        let xml = Xml::parse(&body).with_context(|| what.clone())?;
        xml.field("InitiateMultipartUploadResult/UploadId")
            .filter(|id| !id.is_empty())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{what}: the answer names no UploadId"))
    }

    /// Sends the parts of `source`, the first (`first`: its length and MD5) already read;
    /// each next part is read (for its MD5) while the ones before it are sent. Returns the
    /// part numbers and ETags, in order, and the bytes sent.
    #[allow(clippy::too_many_arguments)]
    async fn put_parts(
        &self,
        key: &str,
        id: &str,
        source: &Source,
        first: (u64, [u8; 16]),
        whole: &mut Sha256,
        pacer: &Option<Pacer>,
        phase: &crate::progress::Phase,
    ) -> Result<(Vec<(u32, String)>, u64)> {
        let mut parts = Parts {
            inflight: FuturesUnordered::new(),
            done: Vec::new(),
            stored: 0,
            phase,
        };
        let (mut number, mut offset, mut part) = (1u32, 0u64, first);
        loop {
            while parts.inflight.len() >= PARTS_IN_FLIGHT {
                parts.wait_one().await?;
            }
            let (len, md5) = part;
            parts.inflight.push(
                self.put_part(key, id, number, source, offset, len, md5, pacer.clone())
                    .boxed(),
            );
            if len < self.part_size {
                break;
            }
            offset += len;
            if number >= MAX_PARTS {
                bail!(
                    "target '{}': '{}' is larger than {MAX_PARTS} parts of {} bytes",
                    self.name,
                    self.shown(key),
                    self.part_size
                );
            }
            part = parts.drive(source.digest(offset, self.part_size, whole)).await?;
            if part.0 == 0 {
                break;
            }
            number += 1;
        }
        while !parts.inflight.is_empty() {
            parts.wait_one().await?;
        }
        parts.done.sort();
        Ok((parts.done, parts.stored))
    }

    #[allow(clippy::too_many_arguments)]
    async fn put_part(
        &self,
        key: &str,
        id: &str,
        number: u32,
        source: &Source,
        offset: u64,
        len: u64,
        md5: [u8; 16],
        pacer: Option<Pacer>,
    ) -> Result<(u32, String, u64)> {
        let n = number.to_string();
        let url = self.url(key, &[("partNumber", &n), ("uploadId", id)]);
        let shown = format!("{} part {number}", self.shown(key));
        let headers = [("content-md5", b64(&md5))];
        let resp = self
            .call("UploadPart", &shown, &[StatusCode::OK], |progress| {
                Ok(self
                    .signed_stream(Method::PUT, &url, &headers)?
                    .header(header::CONTENT_LENGTH, len)
                    .body(paced_body(
                        source.range(offset, len),
                        progress,
                        pacer.clone(),
                        crate::progress::Phase::default(),
                    )))
            })
            .await?;
        let etag = resp
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("target '{}': UploadPart '{shown}': the answer has no ETag", self.name))?;
        tracing::debug!(target_name = %self.name, key = %key, part = number, bytes = len, "part stored");
        Ok((number, etag, len))
    }

    /// Completes an upload of `size` bytes, guarded like a PUT. When the answer to an
    /// earlier attempt was lost, the upload is gone (404): then the object must hold
    /// exactly what was sent.
    async fn complete_upload(
        &self,
        key: &str,
        id: &str,
        parts: &[(u32, String)],
        size: u64,
        sha256: &str,
    ) -> Result<(u64, Put)> {
        let url = self.url(key, &[("uploadId", id)]);
        let shown = self.shown(key);
        let body = complete_body(parts);
        let md5: [u8; 16] = Md5::digest(body.as_bytes()).into();
        loop {
            let mut headers = vec![
                ("content-md5", b64(&md5)),
                ("content-type", "application/xml".to_string()),
            ];
            headers.extend(self.guard());
            let (resp, retried) = self
                .send("CompleteMultipartUpload", &shown, |_| {
                    self.signed_with(Method::POST, &url, &headers, body.as_bytes())
                })
                .await?;
            let status = resp.status();
            if self.unguarded(status) {
                continue;
            }
            if status == StatusCode::PRECONDITION_FAILED || (retried && status == StatusCode::NOT_FOUND) {
                let put = if self.holds(key, size, sha256).await? {
                    Put::Stored
                } else {
                    Put::Taken
                };
                return Ok((size, put));
            }
            let resp = self
                .expect("CompleteMultipartUpload", &shown, resp, &[StatusCode::OK])
                .await?;
            // The answer is sent early and may still turn into an error.
            let what = format!("target '{}': CompleteMultipartUpload '{shown}'", self.name);
            let answer = self.http.read_capped(resp, ERROR_CAP, &what).await?;
            if let (Some(code), message) = error_fields(&answer) {
                bail!("{what}: {code}: {}", self.http.scrub(message.unwrap_or_default()));
            }
            return Ok((size, Put::Stored));
        }
    }

    fn taken(&self, cluster: &str, id: &str) -> anyhow::Error {
        super::SetExists {
            target: self.name.clone(),
            id: id.to_string(),
            at: self.describe(cluster, id),
        }
        .into()
    }

    /// Checks that every file of `manifest` and each of `extra` (name, size) is under
    /// `<cluster>/<id>/` at its size (and, with `read_back`, the SHA-256 of every file).
    async fn check_landed(
        &self,
        cluster: &str,
        manifest: &Manifest,
        extra: &[(&str, usize)],
        read_back: bool,
    ) -> Result<()> {
        let set_prefix = format!("{}/", self.key(&[cluster, &manifest.id])?);
        let (landed, _) = self.list_objects(&set_prefix, false).await?;
        super::check_sizes(
            &self.name,
            manifest,
            extra,
            |name| {
                let key = format!("{set_prefix}{name}");
                landed.iter().find(|o| o.key == key).and_then(|o| o.size)
            },
            |name| format!("'{}'", self.shown(&format!("{set_prefix}{name}"))),
        )?;
        if read_back {
            for f in &manifest.files {
                let key = format!("{set_prefix}{}", f.stored_name);
                super::check_read_back(&self.name, f, self.read_back(&key).await?)?;
            }
        }
        Ok(())
    }

    /// Uploads what the draft lacks, the closing files, checks, then the manifest.
    async fn upload(&self, draft: &Draft, set: &StagedSet, abort: &CancellationToken) -> Result<()> {
        let (cluster, id) = (&draft.cluster, &set.manifest.id);
        for f in &set.manifest.files {
            if draft.has(f) {
                continue;
            }
            let started = Instant::now();
            let key = self.key(&[cluster, id, &f.stored_name])?;
            let phase = crate::progress::Phase::start(
                format!("upload to '{}': {}", self.name, f.stored_name),
                Some(f.stored_size),
            );
            let (size, sha, put) = self
                .put_source(&key, &Source::File(set.dir.join(&f.stored_name)), &phase)
                .await?;
            if let Put::Taken = put {
                return Err(self.taken(cluster, id));
            }
            if size != f.stored_size || sha != f.stored_sha256 {
                bail!(
                    "target '{}': '{}' was sent as {size} bytes with SHA-256 {sha}, but the manifest records {} bytes with {}",
                    self.name,
                    f.stored_name,
                    f.stored_size,
                    f.stored_sha256
                );
            }
            super::log_upload(&self.name, &f.stored_name, f.stored_size, started, "uploaded");
        }
        let closing = set.closing_files()?;
        for (name, bytes) in &closing {
            if let Put::Taken = self.put_bytes(&self.key(&[cluster, id, name])?, bytes).await? {
                return Err(self.taken(cluster, id));
            }
        }
        // Checked before the manifest goes up: the manifest is the last thing written.
        let extra: Vec<(&str, usize)> = closing.iter().map(|(n, b)| (*n, b.len())).collect();
        self.check_landed(cluster, &set.manifest, &extra, self.verify == VerifyUpload::ReadBack)
            .await?;
        if abort.is_cancelled() {
            bail!("the run was stopped before the set's manifest was written");
        }
        match self
            .put_bytes(&self.key(&[cluster, id, MANIFEST])?, &set.manifest_json())
            .await?
        {
            Put::Stored => Ok(()),
            Put::Taken => Err(self.taken(cluster, id)),
        }
    }
}

#[async_trait]
impl Target for S3Target {
    fn name(&self) -> &str {
        &self.name
    }

    fn describe(&self, cluster: &str, id: &str) -> String {
        format!("s3://{}/{}{cluster}/{id}/", self.bucket, self.prefix)
    }

    fn route(&self) -> String {
        format!(
            "s3://{}/{} at {}, {}",
            self.bucket,
            self.prefix,
            self.base,
            self.http.proxy.describe()
        )
    }

    async fn preflight(&self) -> Result<()> {
        if self.base.scheme() == "http" && !is_loopback(self.base.host_str().unwrap_or_default()) {
            tracing::warn!(
                target_name = %self.name,
                "the S3 endpoint is plain http://: requests are signed and the secret key never crosses the network, but what is stored does, in clear; use https://"
            );
        }
        // One request checks the key, the clock, the region and the bucket.
        let url = self.url("", &[("list-type", "2"), ("max-keys", "1"), ("prefix", &self.prefix)]);
        self.call("ListObjectsV2", &self.shown(&self.prefix), &[StatusCode::OK], |_| {
            self.signed(Method::GET, &url, &[])
        })
        .await
        .map(|_| ())
    }

    async fn begin_set(&self, cluster: &str, node: &str, id: &str) -> Result<Draft> {
        let sets = self.sets_in(cluster).await?;
        self.remove_debris_among(&sets, node).await;
        if let Some(set) = sets.get(id)
            && !set.is_debris(node, Utc::now())
        {
            // A complete set, or another node's upload of this id still in progress.
            return Err(self.taken(cluster, id));
        }
        let folder = format!("{PARTIAL_MARK}{node}");
        let marker = self.key(&[cluster, id, &folder])?;
        let note = format!(
            "etcd-backupd: set {id} is being stored by {node} since {}\n",
            Utc::now().to_rfc3339()
        );
        // Not guarded: this node's own marker is the only one that may be there.
        let md5: [u8; 16] = Md5::digest(note.as_bytes()).into();
        let url = self.url(&marker, &[]);
        let headers = [("content-md5", b64(&md5))];
        self.call("PutObject", &self.shown(&marker), &[StatusCode::OK], |_| {
            self.signed_with(Method::PUT, &url, &headers, note.as_bytes())
        })
        .await?;
        // Another node that began the same id at the same moment: neither goes on.
        let others = self.sets_in(cluster).await?;
        if let Some(set) = others.get(id)
            && (set.has_manifest() || set.markers.iter().any(|(n, _)| n != node))
        {
            if let Err(e) = self.delete_object(&marker).await {
                tracing::warn!(target_name = %self.name, error = %crate::error::one_line(&e), "cannot remove the upload marker");
            }
            return Err(self.taken(cluster, id));
        }
        Ok(Draft::new(cluster, id, folder))
    }

    async fn put_growing(&self, draft: &Draft, name: &str, file: Follower) -> Result<Sent> {
        let key = self.key(&[&draft.cluster, &draft.id, name])?;
        let started = Instant::now();
        let phase = file.progress();
        let (size, sha, put) = self.put_source(&key, &Source::Growing(file.clone()), &phase).await?;
        if let Put::Taken = put {
            return Err(self.taken(&draft.cluster, &draft.id));
        }
        // The parts end only once the writer has verified the file; make sure it did.
        if file.finished().await != Some(size) {
            bail!(
                "target '{}': '{}': {}",
                self.name,
                self.shown(&key),
                crate::growing::ABANDONED
            );
        }
        super::log_upload(&self.name, name, size, started, "uploaded while it was written");
        Ok(Sent {
            name: name.to_string(),
            size,
            sha256: Some(sha),
        })
    }

    async fn finish_set(&self, draft: Draft, set: &StagedSet, abort: &CancellationToken) -> Result<()> {
        let (cluster, id) = (&draft.cluster, &set.manifest.id);
        let marker = self.key(&[cluster, id, &draft.folder])?;
        if let Err(e) = self.upload(&draft, set, abort).await {
            // Another set is there: only the marker is ours to take away.
            let cleared = if e.downcast_ref::<super::SetExists>().is_some() {
                self.delete_object(&marker).await
            } else {
                self.clear(cluster, id, &draft.folder).await
            };
            if let Err(d) = cleared {
                tracing::warn!(target_name = %self.name, error = %crate::error::one_line(&d), "cannot remove the incomplete upload");
            }
            return Err(e);
        }
        // The set is complete with its manifest; a marker left behind is removed later.
        if let Err(e) = self.delete_object(&marker).await {
            tracing::warn!(target_name = %self.name, error = %crate::error::one_line(&e), "cannot remove the upload marker of a stored set");
        }
        Ok(())
    }

    async fn discard(&self, draft: Draft) -> Result<()> {
        self.clear(&draft.cluster, &draft.id, &draft.folder).await
    }

    async fn list_all_sets(&self, cluster: Option<&str>) -> Result<Vec<ListedSet>> {
        let clusters: Vec<String> = match cluster {
            Some(c) => vec![c.to_string()],
            None => {
                let (_, prefixes) = self.list_objects(&self.prefix, true).await?;
                prefixes
                    .iter()
                    .filter_map(|p| p.strip_prefix(&self.prefix)?.strip_suffix('/'))
                    .filter(|c| is_set_name(c))
                    .map(str::to_string)
                    .collect()
            }
        };
        let mut sets = Vec::new();
        for c in clusters {
            let cluster_prefix = format!("{}/", self.key(&[&c])?);
            let (objects, _) = self.list_objects(&cluster_prefix, false).await?;
            let mut by_id: BTreeMap<&str, Vec<&Object>> = BTreeMap::new();
            for o in &objects {
                if let Some((id, name)) = o.key[cluster_prefix.len()..].split_once('/')
                    && safe_component(name)
                {
                    by_id.entry(id).or_default().push(o);
                }
            }
            for (id, files) in by_id {
                if !is_set_name(id) || !files.iter().any(|o| o.key.ends_with(&format!("/{MANIFEST}"))) {
                    continue; // not a complete set
                }
                let key = self.key(&[&c, id, MANIFEST])?;
                let shown = self.shown(&key);
                let url = self.url(&key, &[]);
                let (resp, _) = self
                    .send("GetObject", &shown, |_| self.signed(Method::GET, &url, &[]))
                    .await?;
                if resp.status() == StatusCode::NOT_FOUND {
                    continue; // removed since the listing
                }
                let resp = self.expect("GetObject", &shown, resp, &[StatusCode::OK]).await?;
                let what = format!("target '{}': GetObject '{shown}'", self.name);
                let body = self.http.read_capped(resp, MANIFEST_CAP, &what).await?;
                let Some(m) = super::listed_manifest(&self.name, &shown, id, &body) else {
                    continue;
                };
                let set_prefix = format!("{cluster_prefix}{id}/");
                sets.push(super::listed_set(&self.name, &c, &self.describe(&c, id), m, |name| {
                    files
                        .iter()
                        .find(|o| o.key.strip_prefix(&set_prefix) == Some(name))
                        .map(|o| o.size)
                }));
            }
        }
        super::sort_newest_first(&mut sets);
        Ok(sets)
    }

    async fn open_file(&self, cluster: &str, id: &str, name: &str) -> Result<FileReader> {
        let key = self.key(&[cluster, id, name])?;
        let url = self.url(&key, &[]);
        let resp = self
            .call("GetObject", &self.shown(&key), &[StatusCode::OK], |_| {
                self.signed(Method::GET, &url, &[])
            })
            .await?;
        Ok(super::http::reader(resp, self.name.clone(), self.http.idle))
    }

    async fn delete_set(&self, cluster: &str, id: &str) -> Result<()> {
        if !is_set_name(id) {
            bail!("target '{}': {id:?} is not a set name", self.name);
        }
        let set_prefix = format!("{}/", self.key(&[cluster, id])?);
        let (mut objects, _) = self.list_objects(&set_prefix, false).await?;
        // The manifest first, so that a removal cut short never leaves a set that looks
        // complete; a refused delete (a bucket policy, Object Lock) stops here.
        objects.sort_by_key(|o| !o.key.ends_with(&format!("/{MANIFEST}")));
        for o in &objects {
            self.delete_object(&o.key).await?;
        }
        Ok(())
    }

    async fn remove_debris(&self, cluster: &str, node: &str) -> Result<usize> {
        let sets = self.sets_in(cluster).await?;
        Ok(self.remove_debris_among(&sets, node).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_and_errors_are_read_from_real_xml() {
        let body = br#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><Prefix>p/</Prefix>
<Contents><Key>p/c/2026-11-25_023012/manifest.json</Key><LastModified>2026-11-25T02:30:12.000Z</LastModified><Size>812</Size></Contents>
<Contents><Key>p/c/x/a&amp;b</Key><Size>0</Size></Contents>
<CommonPrefixes><Prefix>p/c/</Prefix></CommonPrefixes>
<IsTruncated>true</IsTruncated><NextContinuationToken>1/a+b=</NextContinuationToken></ListBucketResult>"#;
        let x = Xml::parse(body).unwrap();
        assert_eq!(x.root(), "ListBucketResult");
        let c = x.records("ListBucketResult/Contents");
        assert_eq!(c.len(), 2);
        assert_eq!(c[0]["Key"], "p/c/2026-11-25_023012/manifest.json");
        assert_eq!(c[0]["Size"], "812");
        assert_eq!(
            parse_time(c[0].get("LastModified")).unwrap().to_rfc3339(),
            "2026-11-25T02:30:12+00:00"
        );
        assert_eq!(c[1]["Key"], "p/c/x/a&b");
        assert_eq!(x.records("ListBucketResult/CommonPrefixes")[0]["Prefix"], "p/c/");
        assert_eq!(x.field("ListBucketResult/NextContinuationToken"), Some("1/a+b="));

        let e = b"<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match</Message></Error>";
        assert_eq!(
            error_fields(e),
            (
                Some("SignatureDoesNotMatch".into()),
                Some("The request signature we calculated does not match".into())
            )
        );
        assert_eq!(error_fields(b"<html>503</html>"), (None, None));
        assert!(code_hint(Some("InvalidAccessKeyId"), StatusCode::FORBIDDEN).contains("secret_key_file"));

        // Entities of a DTD are never expanded; a cut document is not a short listing.
        assert!(Xml::parse(b"<!DOCTYPE x [<!ENTITY a \"aaaa\">]><x>&a;</x>").is_err());
        assert!(Xml::parse(b"<ListBucketResult><Contents><Key>a</Key>").is_err());
    }

    #[test]
    fn debris_is_this_nodes_at_once_and_others_after_a_day() {
        let now = Utc::now();
        let obj = |key: &str, age_h: i64| Object {
            key: key.into(),
            size: Some(1),
            modified: Some(now - chrono::TimeDelta::hours(age_h)),
        };
        let set = |files: Vec<Object>, node: &str, age_h: i64| SetObjects {
            files,
            markers: vec![(node.into(), obj(&format!("c/1/.partial-{node}"), age_h))],
            uploads: Vec::new(),
        };
        let fresh = set(vec![obj("c/1/snapshot.db", 0)], "ip-10-0-1-2", 0);
        assert!(fresh.is_debris("ip-10-0-1-2", now));
        assert!(!fresh.is_debris("ip-10-0-1", now), "another node's fresh upload stays");
        let stale = set(vec![obj("c/1/snapshot.db", 30)], "m1", 30);
        assert!(stale.is_debris("m0", now));
        // Anything new under it (a part just stored, an upload begun) keeps it.
        let mut busy = set(vec![obj("c/1/snapshot.db", 30)], "m1", 30);
        busy.uploads.push(Upload {
            key: "c/1/snapshot.db".into(),
            id: "u".into(),
            initiated: Some(now),
        });
        assert!(!busy.is_debris("m0", now));
        // A complete set is never debris, marker or not.
        let complete = set(vec![obj("c/1/manifest.json", 30)], "m0", 30);
        assert!(!complete.is_debris("m0", now));
    }

    #[test]
    fn complete_bodies_list_every_part_in_order() {
        let body = complete_body(&[(1, "\"a\"".into()), (2, "\"b\"".into())]);
        assert_eq!(
            body,
            "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>&quot;a&quot;</ETag></Part><Part><PartNumber>2</PartNumber><ETag>&quot;b&quot;</ETag></Part></CompleteMultipartUpload>"
        );
    }
}
