//! An S3-compatible object store (`s3://BUCKET/PREFIX/`): AWS S3, OpenShift Data Foundation,
//! MinIO, Ceph RGW. Requests are signed with AWS Signature Version 4 in the `Authorization`
//! header (aws-sigv4) and sent on the same HTTP transport as WebDAV ([`super::http`]), so
//! proxy rules, retries, idle timeouts and the rate limit are one implementation.
//!
//! S3 has no rename, so its atomic step is the manifest written last
//! ([`super::objects::Commit::ManifestLast`], the protocol in [`super::sets`]). Every write
//! carries `Content-MD5` (which buckets with Object Lock require) and, guarded,
//! `If-None-Match: *` (where the server honours it, nothing is ever replaced); a file of more
//! than `part_size` ([`crate::config::DEFAULT_PART_SIZE`] unless set) goes as a multipart
//! upload, [`PARTS_IN_FLIGHT`] parts at once, each part read from its file twice (once for its
//! MD5, once to send it: memory stays a few chunks whatever the part size) and retried on its
//! own; an upload that fails is aborted. Listing multipart uploads is optional: a server that
//! answers it with `501 Not Implemented` is warned about once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use aws_credential_types::Credentials;
use chrono::{DateTime, Utc};
use md5::Md5;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use sha2::Digest;
use url::Url;

use super::http::{Http, Refusal, is_loopback, read_secret, size_and_sha256};
use super::objects::{Body, Commit, Entry, Guard, Kind, Moved, ObjectStore, Put, Want};
use super::{FileReader, safe_component};
use crate::config::{TargetSettings, VerifyUpload};

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
pub struct S3Store {
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

/// One of S3's paged listings, for [`S3Store::list_paged`].
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
enum Guarded {
    Stored,
    /// Another object is at the key (`If-None-Match` refused it).
    Taken,
}

impl S3Store {
    pub fn new(settings: &TargetSettings, rate: Option<u64>) -> Result<S3Store> {
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
        Ok(S3Store {
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

    /// The prefix of `folder`: `PREFIX/` for the root, `PREFIX/a/b/` below.
    fn folder_prefix(&self, folder: &[&str]) -> Result<String> {
        Ok(if folder.is_empty() {
            self.prefix.clone()
        } else {
            format!("{}/", self.key(folder)?)
        })
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

    /// An unguarded write of a small object (the protocol's marker: only this node's own
    /// can be at its key).
    async fn put_plain(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let md5: [u8; 16] = Md5::digest(bytes).into();
        let url = self.url(key, &[]);
        let headers = [("content-md5", b64(&md5))];
        self.call("PutObject", &self.shown(key), &[StatusCode::OK], |_| {
            self.signed_with(Method::PUT, &url, &headers, bytes)
        })
        .await
        .map(|_| ())
    }

    /// Uploads `source` to `key` (guarded) and says what the protocol needs.
    async fn put_from(&self, key: &str, source: Source, phase: &crate::progress::Phase) -> Result<Put> {
        let (size, sha, put) = self.put_source(key, &source, phase).await?;
        if let Guarded::Taken = put {
            return Ok(Put::Taken);
        }
        if let Source::Growing(file) = &source
            && file.finished().await != Some(size)
        {
            // The parts end only once the writer has verified the file; it did not.
            bail!(
                "target '{}': '{}': {}",
                self.name,
                self.shown(key),
                crate::growing::ABANDONED
            );
        }
        Ok(Put::Stored {
            size,
            sha256: Some(sha),
        })
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn name(&self) -> &str {
        &self.name
    }

    fn describe(&self, path: &[&str]) -> String {
        // Folders are the root, clusters and sets; files are in sets.
        let slash = if path.len() < 3 && !path.is_empty() { "/" } else { "" };
        format!("s3://{}/{}{}{slash}", self.bucket, self.prefix, path.join("/"))
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

    fn commit(&self) -> Commit {
        Commit::ManifestLast
    }

    fn reads_back(&self) -> bool {
        self.verify == VerifyUpload::ReadBack
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

    async fn list(&self, folder: &[&str]) -> Result<Option<Vec<Entry>>> {
        let prefix = self.folder_prefix(folder)?;
        let (objects, prefixes) = self.list_objects(&prefix, true).await?;
        let mut entries: Vec<Entry> = prefixes
            .iter()
            .filter_map(|p| p.strip_prefix(&prefix)?.strip_suffix('/'))
            .filter(|name| safe_component(name))
            .map(|name| Entry::folder(name, None))
            .collect();
        entries.extend(objects.iter().filter_map(|o| {
            let name = o.key.strip_prefix(&prefix)?;
            safe_component(name).then(|| Entry::file(name, o.size, o.modified))
        }));
        Ok(Some(entries))
    }

    /// One listing of the whole tree: `<folder>/<sub>/<name>`.
    async fn list_subfolders(&self, folder: &[&str], want: &Want) -> Result<Vec<(String, Vec<Entry>)>> {
        let prefix = self.folder_prefix(folder)?;
        let (objects, _) = self.list_objects(&prefix, false).await?;
        let mut subs: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
        for o in &objects {
            // Deeper or shallower keys, or unusable names, are not ours.
            let Some((sub, name)) = o.key[prefix.len()..].split_once('/') else {
                continue;
            };
            if safe_component(sub) && safe_component(name) && want(sub) {
                subs.entry(sub.to_string())
                    .or_default()
                    .push(Entry::file(name, o.size, o.modified));
            }
        }
        Ok(subs.into_iter().collect())
    }

    async fn make_folder(&self, _folder: &[&str]) -> Result<()> {
        Ok(())
    }

    async fn put(&self, path: &[&str], body: Body<'_>, guard: Guard) -> Result<Put> {
        let key = self.key(path)?;
        let name = path.last().copied().unwrap_or_default();
        match (body, guard) {
            (Body::Bytes(bytes), Guard::Replace) => {
                self.put_plain(&key, bytes).await?;
                Ok(Put::Stored {
                    size: bytes.len() as u64,
                    sha256: Some(hex::encode(sha2::Sha256::digest(bytes))),
                })
            }
            (Body::Bytes(bytes), Guard::NoReplace) => Ok(match self.put_bytes(&key, bytes).await? {
                Guarded::Stored => Put::Stored {
                    size: bytes.len() as u64,
                    sha256: Some(hex::encode(sha2::Sha256::digest(bytes))),
                },
                Guarded::Taken => Put::Taken,
            }),
            (Body::File { path, size }, _) => {
                let phase = crate::progress::Phase::start(format!("upload to '{}': {name}", self.name), Some(size));
                self.put_from(&key, Source::File(path.to_path_buf()), &phase).await
            }
            (Body::Growing(file), _) => {
                let phase = file.progress();
                self.put_from(&key, Source::Growing(file), &phase).await
            }
        }
    }

    async fn get(&self, path: &[&str]) -> Result<Option<FileReader>> {
        let key = self.key(path)?;
        let shown = self.shown(&key);
        let url = self.url(&key, &[]);
        let (resp, _) = self
            .send("GetObject", &shown, |_| self.signed(Method::GET, &url, &[]))
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = self.expect("GetObject", &shown, resp, &[StatusCode::OK]).await?;
        Ok(Some(super::http::reader(resp, self.name.clone(), self.http.idle)))
    }

    async fn delete(&self, path: &[&str]) -> Result<()> {
        self.delete_object(&self.key(path)?).await
    }

    async fn delete_folder(&self, folder: &[&str]) -> Result<()> {
        let prefix = self.folder_prefix(folder)?;
        let (objects, _) = self.list_objects(&prefix, false).await?;
        // A refused delete (a bucket policy, Object Lock) stops here.
        for o in &objects {
            self.delete_object(&o.key).await?;
        }
        // Uploads last, and at best: the objects are gone whatever they do.
        if let Err(e) = self.abort_uploads(folder, None).await {
            tracing::warn!(target_name = %self.name, error = %crate::error::one_line(&e), "cannot abort the uploads left in a removed folder");
        }
        Ok(())
    }

    async fn rename_folder(&self, _from: &[&str], _to: &[&str]) -> Result<Moved> {
        bail!("target '{}': S3 cannot rename; its sets are stored in place", self.name)
    }

    async fn uploads(&self, folder: &[&str]) -> Result<Vec<(String, Entry)>> {
        let prefix = self.folder_prefix(folder)?;
        let uploads = self.list_uploads(&prefix).await?;
        Ok(uploads
            .into_iter()
            .filter_map(|u| {
                let (sub, name) = u.key[prefix.len()..].split_once('/')?;
                (safe_component(sub) && safe_component(name)).then(|| {
                    let entry = Entry {
                        name: name.to_string(),
                        kind: Kind::Upload,
                        size: None,
                        modified: u.initiated,
                    };
                    (sub.to_string(), entry)
                })
            })
            .collect())
    }

    async fn abort_uploads(&self, folder: &[&str], before: Option<DateTime<Utc>>) -> Result<()> {
        let prefix = self.folder_prefix(folder)?;
        for u in self.list_uploads(&prefix).await? {
            // Only the folder's own files: deeper keys are not ours.
            let own = u.key[prefix.len()..].split('/').count() == 1 && safe_component(&u.key[prefix.len()..]);
            if own && before.is_none_or(|b| u.initiated.is_some_and(|t| t < b)) {
                self.abort_upload(&u.key, &u.id).await?;
            }
        }
        Ok(())
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
    fn complete_bodies_list_every_part_in_order() {
        let body = complete_body(&[(1, "\"a\"".into()), (2, "\"b\"".into())]);
        assert_eq!(
            body,
            "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>&quot;a&quot;</ETag></Part><Part><PartNumber>2</PartNumber><ETag>&quot;b&quot;</ETag></Part></CompleteMultipartUpload>"
        );
    }
}
