//! Writing objects: a guarded single PUT, or a multipart upload of parts read from their
//! file twice (once for the MD5, once to send), several in flight, completed or aborted.

use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{BoxStream, FuturesUnordered};
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use md5::Md5;
use reqwest::{Method, RequestBuilder, StatusCode, header};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use url::Url;

use crate::growing::Follower;
use crate::targets::http::{ERROR_CAP, Pacer, paced_body};

use super::xml::{Xml, b64, complete_body, error_fields};
use super::{CHUNK, Guarded, MAX_PARTS, PARTS_IN_FLIGHT, S3Store};

/// Where the bytes of an upload come from.
#[derive(Clone)]
pub(super) enum Source {
    /// A complete file in staging.
    File(PathBuf),
    /// The snapshot file while it is written (the pipelined path).
    Growing(Follower),
}

impl Source {
    /// Bytes `from..from + len` (fewer if the file ends sooner).
    pub(super) fn range(&self, from: u64, len: u64) -> BoxStream<'static, std::io::Result<Bytes>> {
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
    pub(super) async fn digest(&self, from: u64, len: u64, whole: &mut Sha256) -> Result<(u64, [u8; 16])> {
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

/// The parts of one multipart upload being sent.
pub(super) struct Parts<'a> {
    inflight: FuturesUnordered<BoxFuture<'a, Result<(u32, String, u64)>>>,
    /// Part numbers and ETags of the parts stored.
    done: Vec<(u32, String)>,
    /// Bytes stored.
    stored: u64,
    phase: &'a crate::progress::Phase,
}

impl Parts<'_> {
    pub(super) fn record(&mut self, (number, etag, len): (u32, String, u64)) {
        self.done.push((number, etag));
        self.stored += len;
        self.phase.set(self.stored);
    }

    /// Waits for the next part in flight to be stored; a failed part ends it all.
    pub(super) async fn wait_one(&mut self) -> Result<()> {
        if let Some(r) = self.inflight.next().await {
            self.record(r?);
        }
        Ok(())
    }

    /// Runs `fut` while the parts in flight go on.
    pub(super) async fn drive<T>(&mut self, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return out,
                Some(r) = self.inflight.next(), if !self.inflight.is_empty() => self.record(r?),
            }
        }
    }
}

impl S3Store {
    /// The headers of a guarded write: `If-None-Match: *` unless the server refused it.
    pub(super) fn guard(&self) -> Vec<(&'static str, String)> {
        if self.conditional.load(Ordering::Relaxed) {
            vec![("if-none-match", "*".to_string())]
        } else {
            Vec::new()
        }
    }

    /// The headers of a guarded write of a body with this MD5 and content type (asked anew
    /// on each attempt: a 501 to the guard drops it for the retry).
    fn guarded_headers(&self, md5: &[u8; 16], content_type: &str) -> Vec<(&'static str, String)> {
        let mut headers = vec![("content-md5", b64(md5)), ("content-type", content_type.to_string())];
        headers.extend(self.guard());
        headers
    }

    /// A server that does not implement `If-None-Match` says 501; then it cannot guard.
    pub(super) fn unguarded(&self, status: StatusCode) -> bool {
        if status == StatusCode::NOT_IMPLEMENTED && self.conditional.swap(false, Ordering::Relaxed) {
            tracing::warn!(target_name = %self.name, "the server does not implement If-None-Match; writes are not guarded against replacing an object");
            return true;
        }
        false
    }

    /// One PUT of the first `len` bytes of `source`, with their MD5 and SHA-256
    /// ([`S3Store::put_guarded`]).
    pub(super) async fn put_object(
        &self,
        key: &str,
        source: &Source,
        (len, md5, sha256): (u64, [u8; 16], &str),
        phase: &crate::progress::Phase,
    ) -> Result<Guarded> {
        let pacer = self.http.pacer();
        self.put_guarded(key, len, md5, sha256, |url, headers, progress| {
            Ok(self
                .signed_stream(Method::PUT, url, headers)?
                .header(header::CONTENT_LENGTH, len)
                .body(paced_body(source.range(0, len), progress, pacer.clone(), phase.clone())))
        })
        .await
    }

    /// A small object from memory ([`S3Store::put_guarded`]).
    pub(super) async fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<Guarded> {
        let md5: [u8; 16] = Md5::digest(bytes).into();
        let sha = hex::encode(Sha256::digest(bytes));
        self.put_guarded(key, bytes.len() as u64, md5, &sha, |url, headers, _| {
            self.signed_with(Method::PUT, url, headers, bytes)
        })
        .await
    }

    /// A `PutObject` of `len` bytes with this MD5 and SHA-256, guarded: a key already taken
    /// is [`Guarded::Taken`] unless it holds exactly these bytes (an answer lost before a
    /// retry). `make` builds each attempt's signed request from its URL, headers and
    /// progress counter.
    pub(super) async fn put_guarded(
        &self,
        key: &str,
        len: u64,
        md5: [u8; 16],
        sha256: &str,
        make: impl Fn(&Url, &[(&str, String)], Arc<AtomicU64>) -> Result<RequestBuilder>,
    ) -> Result<Guarded> {
        let url = self.url(key, &[]);
        let shown = self.shown(key);
        loop {
            let headers = self.guarded_headers(&md5, "application/octet-stream");
            let (resp, _) = self
                .send("PutObject", &shown, |progress| make(&url, &headers, progress))
                .await?;
            let status = resp.status();
            if self.unguarded(status) {
                continue;
            }
            if status == StatusCode::PRECONDITION_FAILED {
                return Ok(if self.holds(key, len, sha256).await? {
                    Guarded::Stored
                } else {
                    Guarded::Taken
                });
            }
            self.expect("PutObject", &shown, resp, &[StatusCode::OK]).await?;
            return Ok(Guarded::Stored);
        }
    }

    /// Uploads `source` to `key`: one PUT when it fits in a part, else a multipart upload
    /// ([`PARTS_IN_FLIGHT`] parts at once, each retried on its own, aborted on failure).
    /// Returns the size and SHA-256 of what was stored.
    pub(super) async fn put_source(
        &self,
        key: &str,
        source: &Source,
        phase: &crate::progress::Phase,
    ) -> Result<(u64, String, Guarded)> {
        let mut whole = Sha256::new();
        let (n, md5) = source.digest(0, self.part_size, &mut whole).await?;
        if n < self.part_size {
            let sha = hex::encode(whole.finalize());
            let put = self.put_object(key, source, (n, md5, &sha), phase).await?;
            return Ok((n, sha, put));
        }
        let id = self.create_upload(key).await?;
        let upload = Multipart {
            target: self,
            key,
            id: &id,
            source,
            pacer: self.http.pacer(),
        };
        let sent = upload.put_parts((n, md5), &mut whole, phase).await;
        let sha = hex::encode(whole.finalize());
        let done = match sent {
            Ok((parts, size)) => self.complete_upload(key, &id, &parts, size, &sha).await,
            Err(e) => Err(e),
        };
        match done {
            Ok((size, Guarded::Stored)) => Ok((size, sha, Guarded::Stored)),
            other => {
                if let Err(a) = self.abort_upload(key, &id).await {
                    tracing::warn!(target_name = %self.name, key = %key, error = %crate::error::one_line(&a), "cannot abort a failed multipart upload; the next run removes it");
                }
                other.map(|(size, put)| (size, sha, put))
            }
        }
    }

    pub(super) async fn create_upload(&self, key: &str) -> Result<String> {
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

    /// Completes an upload of `size` bytes, guarded like a PUT. When the answer to an
    /// earlier attempt was lost, the upload is gone (404): then the object must hold
    /// exactly what was sent.
    pub(super) async fn complete_upload(
        &self,
        key: &str,
        id: &str,
        parts: &[(u32, String)],
        size: u64,
        sha256: &str,
    ) -> Result<(u64, Guarded)> {
        let url = self.url(key, &[("uploadId", id)]);
        let shown = self.shown(key);
        let body = complete_body(parts);
        let md5: [u8; 16] = Md5::digest(body.as_bytes()).into();
        loop {
            let headers = self.guarded_headers(&md5, "application/xml");
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
                    Guarded::Stored
                } else {
                    Guarded::Taken
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
            return Ok((size, Guarded::Stored));
        }
    }
}

/// One multipart upload being sent: where, from what, at which pace.
struct Multipart<'a> {
    target: &'a S3Store,
    key: &'a str,
    /// Its UploadId.
    id: &'a str,
    source: &'a Source,
    pacer: Option<Pacer>,
}

impl Multipart<'_> {
    /// Sends the parts of the source, the first (`first`: its length and MD5) already read;
    /// each next part is read (for its MD5) while the ones before it are sent. Returns the
    /// part numbers and ETags, in order, and the bytes sent.
    async fn put_parts(
        &self,
        first: (u64, [u8; 16]),
        whole: &mut Sha256,
        phase: &crate::progress::Phase,
    ) -> Result<(Vec<(u32, String)>, u64)> {
        let part_size = self.target.part_size;
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
            parts.inflight.push(self.put_part(number, offset, len, md5).boxed());
            if len < part_size {
                break;
            }
            offset += len;
            if number >= MAX_PARTS {
                bail!(
                    "target '{}': '{}' is larger than {MAX_PARTS} parts of {part_size} bytes",
                    self.target.name,
                    self.target.shown(self.key),
                );
            }
            part = parts.drive(self.source.digest(offset, part_size, whole)).await?;
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

    /// Part `number`: `len` bytes from `offset`, with their MD5.
    async fn put_part(&self, number: u32, offset: u64, len: u64, md5: [u8; 16]) -> Result<(u32, String, u64)> {
        let t = self.target;
        let n = number.to_string();
        let url = t.url(self.key, &[("partNumber", &n), ("uploadId", self.id)]);
        let shown = format!("{} part {number}", t.shown(self.key));
        let headers = [("content-md5", b64(&md5))];
        let resp = t
            .call("UploadPart", &shown, &[StatusCode::OK], |progress| {
                Ok(t.signed_stream(Method::PUT, &url, &headers)?
                    .header(header::CONTENT_LENGTH, len)
                    .body(paced_body(
                        self.source.range(offset, len),
                        progress,
                        self.pacer.clone(),
                        crate::progress::Phase::default(),
                    )))
            })
            .await?;
        let etag = resp
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("target '{}': UploadPart '{shown}': the answer has no ETag", t.name))?;
        tracing::debug!(target_name = %t.name, key = %self.key, part = number, bytes = len, "part stored");
        Ok((number, etag, len))
    }
}
