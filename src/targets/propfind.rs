//! Parsing WebDAV `PROPFIND` (207 Multi-Status) answers with a real XML parser. Nothing the
//! server says is trusted: only the five predefined entities and character references are
//! resolved (a DTD's entities, billion laughs included, are an error, never expanded), the
//! caller caps the body size, and every name is checked before it is used.

use anyhow::{Result, anyhow, bail};
use quick_xml::Reader;
use quick_xml::events::Event;

use super::safe_component;

/// One `<response>` of a PROPFIND answer.
#[derive(Debug, Clone, PartialEq)]
pub struct DavEntry {
    /// The `href` path, percent-decoded, without a trailing slash.
    pub path: String,
    /// The last path segment, validated with [`safe_component`]; empty for the root.
    pub name: String,
    pub is_collection: bool,
    pub size: Option<u64>,
    pub modified: Option<chrono::DateTime<chrono::Utc>>,
}

/// The request body asking for just what we use.
pub const PROPFIND_BODY: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<D:propfind xmlns:D="DAV:"><D:prop><D:resourcetype/><D:getcontentlength/><D:getlastmodified/></D:prop></D:propfind>
"#;

#[derive(Default)]
struct Partial {
    href: Option<String>,
    is_collection: bool,
    size: Option<u64>,
    modified: Option<String>,
    /// Only properties of a `propstat` whose status is 2xx count.
    ok_props: bool,
}

/// Parses a multistatus body into entries. Entries with unusable names are an error: a
/// server that sends `..` or a `/` in a name is not one to keep talking to.
pub fn parse(body: &[u8]) -> Result<Vec<DavEntry>> {
    let mut reader = Reader::from_reader(body);
    reader.config_mut().trim_text(false);
    let mut buf = Vec::new();
    let mut stack: Vec<String> = Vec::new();
    let mut text = String::new();
    let mut current: Option<Partial> = None;
    // Properties of the propstat being read; applied once its status is known.
    let mut pending: Partial = Partial::default();
    let mut entries = Vec::new();
    let mut saw_root = false;
    loop {
        let event = reader
            .read_event_into(&mut buf)
            .map_err(|e| anyhow!("invalid PROPFIND XML: {e}"))?;
        match event {
            Event::Start(e) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).to_ascii_lowercase();
                match name.as_str() {
                    "multistatus" if stack.is_empty() => saw_root = true,
                    "response" => current = Some(Partial::default()),
                    "propstat" => pending = Partial::default(),
                    "collection" if stack.last().is_some_and(|p| p == "resourcetype") => pending.is_collection = true,
                    _ => {}
                }
                stack.push(name);
                text.clear();
            }
            Event::Empty(e) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).to_ascii_lowercase();
                if name == "multistatus" && stack.is_empty() {
                    saw_root = true;
                }
                if name == "collection" && stack.last().is_some_and(|p| p == "resourcetype") {
                    pending.is_collection = true;
                }
            }
            Event::Text(t) => {
                text.push_str(&t.decode().map_err(|e| anyhow!("invalid PROPFIND XML: {e}"))?);
            }
            Event::CData(t) => {
                text.push_str(&t.decode().map_err(|e| anyhow!("invalid PROPFIND XML: {e}"))?);
            }
            Event::GeneralRef(r) => {
                if let Some(c) = r.resolve_char_ref().map_err(|e| anyhow!("invalid PROPFIND XML: {e}"))? {
                    text.push(c);
                } else {
                    let name = r.decode().map_err(|e| anyhow!("invalid PROPFIND XML: {e}"))?;
                    text.push(match name.as_ref() {
                        "amp" => '&',
                        "lt" => '<',
                        "gt" => '>',
                        "quot" => '"',
                        "apos" => '\'',
                        other => bail!("invalid PROPFIND XML: entity '&{other};' is not allowed"),
                    });
                }
            }
            Event::DocType(_) => bail!("invalid PROPFIND XML: a DOCTYPE is not allowed"),
            Event::End(_) => {
                let name = stack.pop().unwrap_or_default();
                let value = text.trim().to_string();
                match name.as_str() {
                    "href" if stack.last().is_some_and(|p| p == "response") => {
                        if let Some(c) = current.as_mut() {
                            c.href = Some(value);
                        }
                    }
                    "getcontentlength" => pending.size = value.parse().ok(),
                    "getlastmodified" => pending.modified = Some(value),
                    "status" if stack.last().is_some_and(|p| p == "propstat") => {
                        pending.ok_props = value
                            .split_whitespace()
                            .nth(1)
                            .is_some_and(|code| code.starts_with('2'));
                    }
                    "propstat" => {
                        if let Some(c) = current.as_mut()
                            && pending.ok_props
                        {
                            c.is_collection |= pending.is_collection;
                            c.size = c.size.or(pending.size);
                            c.modified = c.modified.take().or(pending.modified.take());
                        }
                    }
                    "response" => {
                        if let Some(c) = current.take() {
                            entries.push(finish(c)?);
                        }
                    }
                    _ => {}
                }
                text.clear();
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    // A cut answer must not pass for a short listing.
    if !stack.is_empty() || !saw_root {
        bail!("invalid PROPFIND answer: not a complete <multistatus> document");
    }
    Ok(entries)
}

fn finish(p: Partial) -> Result<DavEntry> {
    let href = p
        .href
        .ok_or_else(|| anyhow!("invalid PROPFIND answer: a response without href"))?;
    // An href is an absolute URL or an absolute path; only the path matters.
    let raw_path = match url::Url::parse(&href) {
        Ok(u) => u.path().to_string(),
        Err(_) => href.clone(),
    };
    // Each segment is decoded on its own, so an encoded '/' (`%2F`) is refused, not split.
    let mut segments = Vec::new();
    for raw in raw_path.trim_end_matches('/').split('/').skip(1) {
        let seg = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| anyhow!("invalid PROPFIND answer: href is not UTF-8"))?;
        if seg == "." || seg == ".." {
            bail!("the server sent a path with '..' or '.' in a PROPFIND answer");
        }
        if !seg.is_empty() && !safe_component(&seg) {
            bail!(
                "the server sent an unsafe name {:?} in a PROPFIND answer",
                seg.escape_debug().to_string()
            );
        }
        segments.push(seg.into_owned());
    }
    let name = segments.last().cloned().unwrap_or_default();
    let path = if segments.is_empty() {
        String::new()
    } else {
        format!("/{}", segments.join("/"))
    };
    let modified = p
        .modified
        .as_deref()
        .and_then(|m| chrono::DateTime::parse_from_rfc2822(m).ok())
        .map(|t| t.to_utc());
    Ok(DavEntry {
        path,
        name,
        is_collection: p.is_collection,
        size: p.size,
        modified,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const APACHE: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<D:multistatus xmlns:D="DAV:" xmlns:ns0="DAV:">
<D:response xmlns:lp1="DAV:" xmlns:lp2="http://apache.org/dav/props/">
<D:href>/dav/prod/</D:href>
<D:propstat><D:prop><lp1:resourcetype><D:collection/></lp1:resourcetype>
<lp1:getlastmodified>Wed, 25 Nov 2026 02:30:12 GMT</lp1:getlastmodified></D:prop>
<D:status>HTTP/1.1 200 OK</D:status></D:propstat>
</D:response>
<D:response xmlns:lp1="DAV:" xmlns:lp2="http://apache.org/dav/props/">
<D:href>/dav/prod/2026-11-25_023012/</D:href>
<D:propstat><D:prop><lp1:resourcetype><D:collection/></lp1:resourcetype></D:prop>
<D:status>HTTP/1.1 200 OK</D:status></D:propstat>
<D:propstat><D:prop><D:getcontentlength/></D:prop><D:status>HTTP/1.1 404 Not Found</D:status></D:propstat>
</D:response>
<D:response>
<D:href>http://host/dav/prod/snap%20shot&amp;1.db</D:href>
<D:propstat><D:prop><lp1:resourcetype/><lp1:getcontentlength>1234</lp1:getcontentlength></D:prop>
<D:status>HTTP/1.1 200 OK</D:status></D:propstat>
</D:response>
</D:multistatus>"#;

    #[test]
    fn parses_apache_style_answers() {
        let e = parse(APACHE.as_bytes()).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].path, "/dav/prod");
        assert!(e[0].is_collection);
        assert!(e[0].modified.is_some());
        assert_eq!(e[1].name, "2026-11-25_023012");
        assert!(e[1].is_collection);
        assert_eq!(e[1].size, None);
        assert_eq!(e[2].name, "snap shot&1.db");
        assert!(!e[2].is_collection);
        assert_eq!(e[2].size, Some(1234));
    }

    #[test]
    fn hostile_answers_are_refused() {
        let traversal = r#"<multistatus xmlns="DAV:"><response><href>/dav/prod/%2e%2e</href></response></multistatus>"#;
        assert!(parse(traversal.as_bytes()).is_err());
        let slash = r#"<multistatus xmlns="DAV:"><response><href>/dav/a/..%2f..%2fetc</href></response></multistatus>"#;
        assert!(parse(slash.as_bytes()).is_err());
        let control = r#"<multistatus xmlns="DAV:"><response><href>/dav/a&#10;b</href></response></multistatus>"#;
        assert!(parse(control.as_bytes()).is_err());
        let laughs = r#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>
<multistatus xmlns="DAV:"><response><href>/dav/&lol2;</href></response></multistatus>"#;
        let err = parse(laughs.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("DOCTYPE"), "{err}");
        let entity = r#"<multistatus xmlns="DAV:"><response><href>/dav/&foo;</href></response></multistatus>"#;
        assert!(parse(entity.as_bytes()).is_err());
        assert!(parse(b"<multistatus><response></multistatus>").is_err());
        let cut = &APACHE.as_bytes()[..APACHE.len() - 40];
        assert!(parse(cut).is_err(), "a truncated answer is an error");
        assert!(parse(b"").is_err());
        assert!(parse(b"<other xmlns=\"DAV:\"/>").is_err());
        let encoded_slash = r#"<multistatus xmlns="DAV:"><response><href>/test/a%2Fb/</href></response></multistatus>"#;
        assert!(parse(encoded_slash.as_bytes()).is_err());
    }
}
