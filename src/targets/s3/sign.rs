//! AWS Signature Version 4 on every request (aws-sigv4), in the `Authorization` header.

use std::time::SystemTime;

use anyhow::{Result, anyhow};
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings, UriPathNormalizationMode,
    sign,
};
use reqwest::{Method, RequestBuilder};
use url::Url;

use super::S3Store;

impl S3Store {
    /// A request to `url` without a body, signed with SigV4 (in the `Authorization`
    /// header); `headers` are sent and signed.
    pub(super) fn signed(&self, method: Method, url: &Url, headers: &[(&str, String)]) -> Result<RequestBuilder> {
        self.sign(method, url, headers, SignableBody::Bytes(&[]))
    }

    /// [`S3Store::signed`] for a body streamed from a file: its hash is not signed
    /// (`UNSIGNED-PAYLOAD`), its `Content-MD5` (in `headers`) is, and the server checks that.
    pub(super) fn signed_stream(
        &self,
        method: Method,
        url: &Url,
        headers: &[(&str, String)],
    ) -> Result<RequestBuilder> {
        self.sign(method, url, headers, SignableBody::UnsignedPayload)
    }

    /// [`S3Store::signed`] with `body`, whose SHA-256 is signed too.
    pub(super) fn signed_with(
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

    pub(super) fn sign(
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
}
