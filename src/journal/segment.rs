//! One stored piece of the journal: the revisions `first..=last`, each whole, in order, with
//! the time the writer received it.
//!
//! A segment is one object, `<cluster>/journal/<first>-<last>-<from>-<until>.seg` (16-digit
//! revisions, so names sort by revision; the time it covers, `(from, until]`, in Unix
//! milliseconds, so coverage in time is known from a listing), that checks itself: a magic line, a header line (JSON: the range,
//! the times it covers, the payload's size and SHA-256, how it is sealed, and an SSH signature
//! over the header without its signature), then the payload: the records as JSON lines,
//! compressed and encrypted as the snapshot is. A torn write (a writer killed mid-upload on a
//! target without atomic writes) is found by its size and hash, and skipped.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::envelope::{Seal, Sealer};
use crate::manifest::{Compression, Encryption};
use crate::trust::signing::{AllowedSigners, Signer, Verdict};

const MAGIC: &str = "etcd-backupd journal segment 1\n";
/// The file name's suffix.
pub const SUFFIX: &str = ".seg";

/// One change of a revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// A put, with what etcd recorded for the key after it (checked after a replay).
    Put {
        #[serde(with = "b64")]
        key: Vec<u8>,
        #[serde(with = "b64")]
        value: Vec<u8>,
        /// The lease the key is attached to; 0: none.
        #[serde(default, skip_serializing_if = "is_zero")]
        lease: i64,
        create: i64,
        version: i64,
    },
    Delete {
        #[serde(with = "b64")]
        key: Vec<u8>,
    },
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// One revision of the store: every change etcd made in it, and when the writer got it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub rev: i64,
    /// When the writer received the revision (etcd keeps no commit time).
    pub at: DateTime<Utc>,
    pub ops: Vec<Op>,
    /// The granted TTL (seconds) of each lease a put of this revision names, as etcd answered
    /// when the writer first saw the lease; absent when it had already expired (see
    /// [`crate::journal::replay`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub leases: BTreeMap<i64, i64>,
}

/// Roughly what a record weighs before its ops, for cutting segments by size.
pub const RECORD_WEIGHT: usize = 64;

impl Op {
    /// Roughly what the op weighs in a segment, for cutting segments by size.
    pub fn weight(&self) -> usize {
        match self {
            Op::Put { key, value, .. } => 64 + key.len() + value.len(),
            Op::Delete { key } => 32 + key.len(),
        }
    }
}

/// What a segment covers and how its payload is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The etcd cluster ID (hex).
    pub cluster_id: String,
    /// The node whose writer stored it.
    pub node: String,
    /// The first revision; `last` = `first - 1` for a segment with no revisions (an idle
    /// cluster's coverage moving on in time).
    pub first: i64,
    pub last: i64,
    /// The times it covers: from the end of the segment before (or the chain's start) to the
    /// moment the writer knew etcd had no later revision.
    pub from: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub payload_size: u64,
    pub payload_sha256: String,
    pub compression: Compression,
    pub encryption: Encryption,
    /// Why the chain ends after this segment (a completed upgrade or a change of the static
    /// pod revisions: the static resources of sets taken before it do not match the cluster
    /// after it); its name ends `-end`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ends_chain: Option<String>,
    /// An SSH signature (the sets' namespace) over this header without this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl Header {
    /// The object's name.
    pub fn name(&self) -> String {
        let name = name_of(self.first, self.last, self.from, self.until);
        match self.ends_chain {
            Some(_) => name.replace(SUFFIX, &format!("{END}{SUFFIX}")),
            None => name,
        }
    }

    /// The bytes the signature covers.
    fn signed_bytes(&self) -> Vec<u8> {
        let unsigned = Header {
            signature: None,
            ..self.clone()
        };
        serde_json::to_vec(&unsigned).expect("a header serializes")
    }
}

/// The name of the segment holding `first..=last` and covering the time `(from, until]`.
pub fn name_of(first: i64, last: i64, from: DateTime<Utc>, until: DateTime<Utc>) -> String {
    format!(
        "{first:016}-{last:016}-{:013}-{:013}{SUFFIX}",
        from.timestamp_millis(),
        until.timestamp_millis()
    )
}

/// The name's mark of a segment that ends its chain.
const END: &str = "-end";

/// What a segment's name claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub name: String,
    pub first: i64,
    pub last: i64,
    /// The time it covers, `(from, until]`: empty (`from == until`) for a segment stored
    /// while the writer was catching up, whose revisions' times are not known.
    pub from: DateTime<Utc>,
    pub until: DateTime<Utc>,
    /// The chain ends after it ([`Header::ends_chain`]).
    pub ends: bool,
}

/// What a segment's name claims; `None` for a name that is not a segment's.
pub fn parse_name(name: &str) -> Option<Named> {
    let stem = name.strip_suffix(SUFFIX)?;
    let (stem, ends) = match stem.strip_suffix(END) {
        Some(s) => (s, true),
        None => (stem, false),
    };
    let mut parts = stem.split('-');
    let (a, b, c, d) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|c| c.is_ascii_digit());
    if parts.next().is_some() || !digits(a, 16) || !digits(b, 16) || !digits(c, 13) || !digits(d, 13) {
        return None;
    }
    let (first, last): (i64, i64) = (a.parse().ok()?, b.parse().ok()?);
    let from = DateTime::from_timestamp_millis(c.parse().ok()?)?;
    let until = DateTime::from_timestamp_millis(d.parse().ok()?)?;
    (first >= 1 && last >= first - 1 && from <= until).then(|| Named {
        name: name.to_string(),
        first,
        last,
        from,
        until,
        ends,
    })
}

/// What a segment is made of before it is sealed.
pub struct Draft<'a> {
    pub cluster_id: String,
    pub node: String,
    pub first: i64,
    pub from: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub records: &'a [Record],
    pub ends_chain: Option<String>,
}

/// The stored object for `draft`: its name and bytes.
pub fn encode(draft: &Draft, seal: &Seal, signer: Option<&Signer>) -> Result<(String, Vec<u8>)> {
    let mut payload = Vec::new();
    {
        let mut sealer = Sealer::new(&mut payload, seal)?;
        for r in draft.records {
            serde_json::to_writer(&mut sealer, r)?;
            sealer.write_all(b"\n")?;
        }
        sealer.finish()?;
    }
    let last = draft.records.last().map(|r| r.rev).unwrap_or(draft.first - 1);
    let mut header = Header {
        cluster_id: draft.cluster_id.clone(),
        node: draft.node.clone(),
        first: draft.first,
        last,
        from: draft.from,
        until: draft.until,
        payload_size: payload.len() as u64,
        payload_sha256: hex::encode(Sha256::digest(&payload)),
        compression: seal.compression(),
        encryption: seal.encryption(),
        ends_chain: draft.ends_chain.clone(),
        signature: None,
    };
    if let Some(s) = signer {
        header.signature = Some(s.sign(&header.signed_bytes())?);
    }
    let mut out = Vec::with_capacity(payload.len() + 1024);
    out.extend_from_slice(MAGIC.as_bytes());
    serde_json::to_writer(&mut out, &header)?;
    out.push(b'\n');
    out.extend_from_slice(&payload);
    Ok((header.name(), out))
}

/// A segment as read from a target: its header checked against its name and payload.
#[derive(Debug)]
pub struct Stored {
    pub header: Header,
    payload: Vec<u8>,
}

/// Reads the object `name` (its bytes `raw`); fails on anything torn, altered or misnamed.
pub fn decode(name: &str, raw: Vec<u8>) -> Result<Stored> {
    let rest = raw
        .strip_prefix(MAGIC.as_bytes())
        .ok_or_else(|| anyhow!("segment {name}: not a journal segment"))?;
    let nl = rest
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| anyhow!("segment {name}: torn (no header line)"))?;
    let header: Header =
        serde_json::from_slice(&rest[..nl]).with_context(|| format!("segment {name}: unreadable header"))?;
    let payload = rest[nl + 1..].to_vec();
    if header.name() != name {
        bail!("segment {name}: its header says {}", header.name());
    }
    if payload.len() as u64 != header.payload_size {
        bail!(
            "segment {name}: torn ({} of {} payload bytes)",
            payload.len(),
            header.payload_size
        );
    }
    if hex::encode(Sha256::digest(&payload)) != header.payload_sha256 {
        bail!("segment {name}: its payload does not match its SHA-256");
    }
    Ok(Stored { header, payload })
}

impl Stored {
    /// What the segment's signature says, against `allowed` when given.
    pub fn signature(&self, allowed: Option<&AllowedSigners>) -> Verdict {
        let sig = self
            .header
            .signature
            .as_deref()
            .map(str::as_bytes)
            .ok_or_else(|| "the segment is not signed".to_string());
        crate::trust::signing::judge(&self.header.signed_bytes(), sig, allowed)
    }

    /// Its records, opened with `identities` when encrypted; checked to be the header's
    /// range, in order, one record per revision.
    pub fn records(&self, identities: &[String]) -> Result<Vec<Record>> {
        let name = self.header.name();
        let mut text = String::new();
        crate::envelope::open_reader(
            Box::new(std::io::Cursor::new(&self.payload)),
            &self.header.compression,
            &self.header.encryption,
            identities,
        )
        .with_context(|| format!("segment {name}"))?
        .read_to_string(&mut text)
        .with_context(|| format!("segment {name}: cannot open its payload"))?;
        let records = text
            .lines()
            .map(serde_json::from_str::<Record>)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("segment {name}: unreadable record"))?;
        let expected = self.header.first..=self.header.last;
        if records.len() as i64 != self.header.last - self.header.first + 1
            || records.iter().zip(expected).any(|(r, want)| r.rev != want)
        {
            bail!(
                "segment {name}: its records are not revisions {}..={} in order",
                self.header.first,
                self.header.last
            );
        }
        Ok(records)
    }
}

/// Bytes as standard base64 in JSON.
mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(rev: i64) -> Record {
        Record {
            rev,
            at: DateTime::from_timestamp_millis(1_700_000_000_000 + rev).unwrap(),
            ops: vec![
                Op::Put {
                    key: format!("/k/{rev}").into_bytes(),
                    value: vec![0, 255, 10],
                    lease: 7,
                    create: rev,
                    version: 1,
                },
                Op::Delete { key: b"/gone".to_vec() },
            ],
            leases: BTreeMap::from([(7, 30)]),
        }
    }

    fn draft(records: &[Record]) -> Draft<'_> {
        Draft {
            cluster_id: "abc".into(),
            node: "node-a".into(),
            first: 10,
            from: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            until: DateTime::from_timestamp(1_700_000_010, 0).unwrap(),
            records,
            ends_chain: None,
        }
    }

    #[test]
    fn a_segment_reads_back_whole_and_sealed() {
        let records: Vec<Record> = (10..13).map(record).collect();
        for seal in [
            Seal::default(),
            Seal {
                zstd_level: Some(3),
                recipients: Vec::new(),
            },
        ] {
            let (name, bytes) = encode(&draft(&records), &seal, None).unwrap();
            assert_eq!(
                name,
                "0000000000000010-0000000000000012-1700000000000-1700000010000.seg"
            );
            let named = parse_name(&name).unwrap();
            assert_eq!(
                (named.first, named.last, named.until.timestamp()),
                (10, 12, 1_700_000_010)
            );
            let stored = decode(&name, bytes).unwrap();
            assert_eq!(stored.records(&[]).unwrap(), records);
            assert!(matches!(stored.signature(None), Verdict::Unsigned(_)));
        }
    }

    #[test]
    fn a_segment_that_ends_its_chain_says_so_in_its_name() {
        let records: Vec<Record> = (10..11).map(record).collect();
        let d = Draft {
            ends_chain: Some("upgrade to 4.16.2 completed".into()),
            ..draft(&records)
        };
        let (name, bytes) = encode(&d, &Seal::default(), None).unwrap();
        assert!(name.ends_with("-end.seg"), "{name}");
        assert!(parse_name(&name).unwrap().ends);
        assert_eq!(
            decode(&name, bytes).unwrap().header.ends_chain.as_deref(),
            Some("upgrade to 4.16.2 completed")
        );
    }

    #[test]
    fn an_empty_segment_moves_coverage_on_in_time() {
        let (name, bytes) = encode(&draft(&[]), &Seal::default(), None).unwrap();
        assert_eq!(parse_name(&name).map(|n| (n.first, n.last)), Some((10, 9)));
        let stored = decode(&name, bytes).unwrap();
        assert!(stored.records(&[]).unwrap().is_empty());
    }

    #[test]
    fn torn_altered_or_misnamed_segments_are_refused() {
        let records: Vec<Record> = (10..12).map(record).collect();
        let (name, bytes) = encode(&draft(&records), &Seal::default(), None).unwrap();
        let torn = bytes[..bytes.len() - 3].to_vec();
        assert!(decode(&name, torn).unwrap_err().to_string().contains("torn"));
        let mut altered = bytes.clone();
        let n = altered.len();
        altered[n - 2] ^= 1;
        assert!(decode(&name, altered).unwrap_err().to_string().contains("SHA-256"));
        let other = name_of(
            10,
            12,
            DateTime::from_timestamp(1_700_000_001, 0).unwrap(),
            DateTime::from_timestamp(1_700_000_010, 0).unwrap(),
        );
        assert!(decode(&other, bytes).unwrap_err().to_string().contains("header says"));
        assert_eq!(
            parse_name("0000000000000010-0000000000000008-1700000000000-1700000010000.seg"),
            None
        );
        assert_eq!(
            parse_name("0000000000000010-0000000000000012-1700000010000-1700000000000.seg"),
            None
        );
        assert_eq!(parse_name("0000000000000010-0000000000000012-1700000010000.seg"), None);
        assert_eq!(parse_name("10-12-1700000000000-1700000010000.seg"), None);
    }
}
