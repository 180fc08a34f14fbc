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
//!    more than `part_size` ([`crate::config::DEFAULT_PART_SIZE`] unless set) goes as a multipart upload, [`PARTS_IN_FLIGHT`] parts at once,
//!    each part read from its file twice (once for its MD5, once to send it: memory stays a
//!    few chunks whatever the part size) and retried on its own; an upload that fails is
//!    aborted;
//! 3. `SHA256SUMS` (and the signature), the sizes checked with a listing (and with
//!    `verify_upload = "read-back"` every file read back), then `manifest.json`, then the
//!    marker is removed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use aws_credential_types::Credentials;
use chrono::{DateTime, Utc};
use md5::Md5;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use sha2::Digest;
use url::Url;

use super::http::{Http, Refusal, is_loopback, read_secret, size_and_sha256};
use super::{
    Draft, FOREIGN_DEBRIS_AGE, FileReader, ListedSet, MANIFEST_CAP, PARTIAL_MARK, Sent, StagedSet, Target, is_set_name,
    safe_component,
};
use crate::config::{TargetSettings, VerifyUpload};
use crate::growing::Follower;
use crate::manifest::{MANIFEST, Manifest};
use tokio_util::sync::CancellationToken;

mod multipart;
mod sign;
mod xml;

use multipart::Source;
use xml::{Xml, b64, code_hint, error_fields, parse_time};

/// Parts of one upload sent at once.
pub const PARTS_IN_FLIGHT: usize = 3;
/// S3's limit on the parts of one upload.
const MAX_PARTS: u32 = 10_000;
/// The chunks a body is streamed in.
const CHUNK: usize = 256 * 1024;
/// The largest listing page read (S3 sends at most 1000 keys a page).
const LIST_CAP: u64 = 16 << 20;

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
            .s3()
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
        let part_size = s3.part_size.0;
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
            for f in manifest.files_on(&self.name) {
                let key = format!("{set_prefix}{}", f.stored_name);
                super::check_read_back(&self.name, f, self.read_back(&key).await?)?;
            }
        }
        Ok(())
    }

    /// Uploads what the draft lacks, the closing files, checks, then the manifest.
    async fn upload(&self, draft: &Draft, set: &StagedSet, abort: &CancellationToken) -> Result<()> {
        let (cluster, id) = (&draft.cluster, &set.manifest.id);
        for f in set.manifest.files_on(&self.name) {
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
    use super::xml::complete_body;
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
