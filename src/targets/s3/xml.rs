//! S3's XML: answers read into a flat list of element paths and texts (no DOM, no
//! DOCTYPE), the error fields an answer carries, and the body of CompleteMultipartUpload.

use std::collections::BTreeMap;

use anyhow::{Result, anyhow, bail};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use reqwest::StatusCode;

/// An S3 XML answer, flattened: the text of every element by its path of local names
/// (`ListBucketResult/Contents/Key`), in document order; a container appears after its
/// children, with empty text. Only the predefined entities and character references are
/// resolved; a DOCTYPE is refused.
pub(super) struct Xml(Vec<(String, String)>);

impl Xml {
    pub(super) fn parse(body: &[u8]) -> Result<Xml> {
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
    pub(super) fn root(&self) -> &str {
        self.0.last().map(|(p, _)| p.as_str()).unwrap_or_default()
    }

    pub(super) fn field(&self, path: &str) -> Option<&str> {
        self.0.iter().find(|(p, _)| p == path).map(|(_, t)| t.as_str())
    }

    /// Each element at `path`, as its children's texts by name.
    pub(super) fn records(&self, path: &str) -> Vec<BTreeMap<String, String>> {
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
pub(super) fn error_fields(body: &[u8]) -> (Option<String>, Option<String>) {
    match Xml::parse(body) {
        Ok(x) if x.root() == "Error" => (
            x.field("Error/Code").map(str::to_string),
            x.field("Error/Message").map(str::to_string),
        ),
        _ => (None, None),
    }
}

/// What an S3 error code most likely means, for the message.
pub(super) fn code_hint(code: Option<&str>, status: StatusCode) -> &'static str {
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

pub(super) fn parse_time(s: Option<&String>) -> Option<DateTime<Utc>> {
    s.and_then(|t| DateTime::parse_from_rfc3339(t).ok()).map(|t| t.to_utc())
}

pub(super) fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The request body of `CompleteMultipartUpload`.
pub(super) fn complete_body(parts: &[(u32, String)]) -> String {
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
