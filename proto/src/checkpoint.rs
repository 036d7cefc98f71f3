//! Checkpoints on the wire: scopes, manifests, object paths, and the lines of a checkpoint
//! file (zstd JSON Lines).
//!
//! A file is: one [`Header`] line; one record line per change in `_id` order (the change's
//! wire JSON, catalog records included); for Raft snapshots only, [`Internal`] lines; then one
//! [`Trailer`] line. A file without its trailer is incomplete. [`LineReader`] reads the
//! decompressed lines and checks that they add up.

use std::collections::BTreeMap;
use std::fmt;
use std::io::BufRead;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::limits::{check_key, check_tags};

/// The `format` field of every header line.
pub const FORMAT: &str = "changeagent-checkpoint";
/// The version of the line format this build writes and reads.
pub const VERSION: u32 = 1;
/// `Content-Type` of checkpoint data served over HTTP.
pub const CONTENT_TYPE: &str = "application/zstd";
/// Longest line a reader accepts: a change is bounded by the server's body limit (4 MiB by
/// default), so 64 MiB leaves room for any configured limit while a corrupt file without
/// newlines cannot take all memory.
pub const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

/// What a checkpoint covers: everything, or one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Scope {
    /// The whole state; only these let the core truncate.
    #[default]
    All,
    /// One tenant's catalog, keys and changes.
    Tenant(String),
}

impl Scope {
    /// Parses `all` or `tenant=NAME`.
    pub fn parse(s: &str) -> Result<Scope, String> {
        if s == "all" {
            return Ok(Scope::All);
        }
        match s.strip_prefix("tenant=") {
            Some(name) => {
                crate::limits::check_name(name)?;
                Ok(Scope::Tenant(name.to_owned()))
            }
            None => Err(format!(
                "invalid scope {s:?}: expected \"all\" or \"tenant=NAME\""
            )),
        }
    }

    /// The path segment of this scope's objects: `all` or `tenant-NAME`.
    pub fn path_segment(&self) -> String {
        match self {
            Scope::All => "all".to_owned(),
            Scope::Tenant(name) => format!("tenant-{name}"),
        }
    }

    /// The tenant, for a tenant scope.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Scope::All => None,
            Scope::Tenant(name) => Some(name),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::All => f.write_str("all"),
            Scope::Tenant(name) => write!(f, "tenant={name}"),
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::parse(s)
    }
}

impl Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        Scope::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Describes one checkpoint object: the data of an end record, `latest.json`, a 410 body's
/// `checkpoint`, and the entries of `GET /checkpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// The state is as of this `_id`: a consumer continues with `since = index`.
    pub index: u64,
    pub scope: Scope,
    /// Path of the object in the object store.
    pub object: String,
    /// Bytes of the compressed object as stored.
    pub size: u64,
    /// Lower-case hex sha256 of the compressed object as stored.
    pub sha256: String,
    /// Record lines in the file (changes, catalog records included).
    pub records: u64,
    /// When the export was taken, ns since the epoch.
    pub created_ts: i64,
    pub cluster_id: String,
}

/// Path of a checkpoint object: `{prefix}/{clusterId}/checkpoints/{scope}/{index:020}.jsonl.zst`.
/// `prefix` may be empty.
pub fn object_path(prefix: &str, cluster_id: &str, scope: &Scope, index: u64) -> String {
    format!(
        "{}{index:020}.jsonl.zst",
        scope_dir(prefix, cluster_id, scope)
    )
}

/// Path of a scope's `latest.json`.
pub fn latest_path(prefix: &str, cluster_id: &str, scope: &Scope) -> String {
    format!("{}latest.json", scope_dir(prefix, cluster_id, scope))
}

/// The directory (with a trailing `/`) holding a scope's objects.
pub fn scope_dir(prefix: &str, cluster_id: &str, scope: &Scope) -> String {
    let prefix = prefix.trim_matches('/');
    let sep = if prefix.is_empty() { "" } else { "/" };
    format!(
        "{prefix}{sep}{cluster_id}/checkpoints/{}/",
        scope.path_segment()
    )
}

/// The index of a checkpoint object from its file name, `None` for other names.
pub fn index_of_object(path: &str) -> Option<u64> {
    let name = path.rsplit('/').next()?;
    let digits = name.strip_suffix(".jsonl.zst")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Line 1 of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub cluster_id: Option<String>,
    /// The state is as of this `_id`.
    pub index: u64,
    pub scope: Scope,
    pub created_ts: i64,
}

impl Header {
    /// A header of this build's format.
    pub fn new(cluster_id: Option<String>, index: u64, scope: Scope, created_ts: i64) -> Header {
        Header {
            format: FORMAT.to_owned(),
            version: VERSION,
            cluster_id,
            index,
            scope,
            created_ts,
        }
    }
}

/// The last line of a checkpoint. A file without it is incomplete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trailer {
    /// Always true.
    pub end: bool,
    /// Record lines before it.
    pub records: u64,
    /// Internal lines before it (Raft snapshots only).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub internal: u64,
    /// What the store's owner recorded with the state (a Raft snapshot: the log id and
    /// membership it covers).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub owner: BTreeMap<String, serde_json::Value>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Lines only Raft snapshots carry: replicated state that no consumer reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "_internal", rename_all = "snake_case")]
pub enum Internal {
    /// The store's scalars. Comes before any record line.
    #[serde(rename_all = "camelCase")]
    State {
        /// Oldest retained `_id`: record lines below it are keyed state only.
        first_index: u64,
        last_ts: i64,
        next_tenant_id: u64,
        next_collection_id: u64,
    },
    /// A remembered `Idempotency-Key` and the answer given.
    Idempotency {
        key: String,
        ts: i64,
        answer: String,
    },
    /// A committed checkpoint whose object is kept.
    Manifest { manifest: Manifest },
    /// A checkpoint start without its end record yet.
    OpenStart { start: OpenStart },
}

/// A checkpoint start record still waiting for its end record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenStart {
    pub scope: Scope,
    /// The checkpointer that started it.
    pub by: String,
    /// The index it exports.
    pub index: u64,
    /// `_id` and `_ts` of the start record.
    #[serde(rename = "_id")]
    pub id: u64,
    #[serde(rename = "_ts")]
    pub ts: i64,
}

/// One decompressed line of a checkpoint.
#[derive(Debug)]
pub enum Line<'a> {
    Header(Header),
    /// A change's wire JSON (a catalog record is a change of type -4 or -5).
    Record(&'a [u8]),
    Internal(Internal),
    Trailer(Trailer),
}

/// Why a checkpoint cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading the checkpoint: {0}")]
    Io(#[from] std::io::Error),
    #[error("checkpoint line {line}: {detail}")]
    Bad { line: u64, detail: String },
    #[error("the checkpoint is incomplete: it ends after {lines} lines without a trailer")]
    Incomplete { lines: u64 },
    #[error("unsupported checkpoint format {format:?} version {version}; this build reads {FORMAT:?} version {VERSION}")]
    Unsupported { format: String, version: u32 },
}

/// Reads the lines of a decompressed checkpoint in order and checks them: the header first,
/// records in increasing `_id` order up to the header's index, the trailer last with the
/// right counts, nothing after it.
pub struct LineReader<R> {
    input: R,
    buf: Vec<u8>,
    lines: u64,
    records: u64,
    internal: u64,
    last_id: u64,
    header: Option<Header>,
    done: bool,
}

impl<R: BufRead> LineReader<R> {
    /// Reads the header line.
    pub fn new(input: R) -> Result<Self, ReadError> {
        let mut r = LineReader {
            input,
            buf: Vec::with_capacity(4096),
            lines: 0,
            records: 0,
            internal: 0,
            last_id: 0,
            header: None,
            done: false,
        };
        if !r.read_line()? {
            return Err(ReadError::Incomplete { lines: 0 });
        }
        let header: Header = serde_json::from_slice(&r.buf).map_err(|e| r.bad(e))?;
        if header.format != FORMAT || header.version != VERSION {
            return Err(ReadError::Unsupported {
                format: header.format,
                version: header.version,
            });
        }
        r.header = Some(header);
        Ok(r)
    }

    /// The header line.
    pub fn header(&self) -> &Header {
        // Set by `new` before the reader is handed out.
        self.header.as_ref().expect("header read in new()")
    }

    fn bad(&self, detail: impl fmt::Display) -> ReadError {
        ReadError::Bad {
            line: self.lines,
            detail: detail.to_string(),
        }
    }

    /// Reads one line into `buf` without its newline; false at end of input.
    fn read_line(&mut self) -> Result<bool, ReadError> {
        self.buf.clear();
        let mut limited = std::io::Read::take(&mut self.input, MAX_LINE_BYTES as u64 + 1);
        let n = limited.read_until(b'\n', &mut self.buf)?;
        if n == 0 {
            return Ok(false);
        }
        self.lines += 1;
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
        } else if self.buf.len() > MAX_LINE_BYTES {
            return Err(self.bad(format!("longer than {MAX_LINE_BYTES} bytes")));
        }
        Ok(true)
    }

    /// The next line after the header: a record, an internal line, or the trailer (after which
    /// it returns `None`). Errors on anything out of order or malformed.
    pub fn next_line(&mut self) -> Result<Option<Line<'_>>, ReadError> {
        if self.done {
            if self.read_line()? {
                return Err(self.bad("data after the trailer"));
            }
            return Ok(None);
        }
        if !self.read_line()? {
            return Err(ReadError::Incomplete { lines: self.lines });
        }
        let text = &self.buf[..];
        if text.starts_with(b"{\"_id\":") {
            let id = record_id(text).ok_or_else(|| self.bad("a record without a numeric _id"))?;
            let index = self.header().index;
            if id <= self.last_id || id > index {
                return Err(self.bad(format!(
                    "record {id} is out of order (after {}) or past the checkpoint's index {index}",
                    self.last_id
                )));
            }
            self.last_id = id;
            self.records += 1;
            return Ok(Some(Line::Record(&self.buf)));
        }
        if text.starts_with(b"{\"_internal\":") {
            let line: Internal = serde_json::from_slice(text).map_err(|e| self.bad(e))?;
            self.internal += 1;
            return Ok(Some(Line::Internal(line)));
        }
        if text.starts_with(b"{\"end\":") {
            let t: Trailer = serde_json::from_slice(text).map_err(|e| self.bad(e))?;
            if !t.end || t.records != self.records || t.internal != self.internal {
                return Err(self.bad(format!(
                    "the trailer promises {} records and {} internal lines, the file holds {} and {}",
                    t.records, t.internal, self.records, self.internal
                )));
            }
            self.done = true;
            return Ok(Some(Line::Trailer(t)));
        }
        Err(self.bad("neither a record, an internal line nor a trailer"))
    }
}

/// The `_id` of a record line (which starts with `{"_id":`).
pub fn record_id(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"_id\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// A record line parsed into its fields, borrowing strings and data from the line.
#[derive(Debug, Deserialize)]
pub struct RecordFields<'a> {
    #[serde(rename = "_id")]
    pub id: u64,
    #[serde(rename = "_ts", default)]
    pub ts: i64,
    #[serde(rename = "type", default)]
    pub change_type: i32,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub collection: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub deleted: bool,
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
}

impl RecordFields<'_> {
    /// Checks the limits every posted change meets (its tags and key). A record from a
    /// checkpoint file or an upstream's feed is stored like a posted change, whose header
    /// holds tag counts and lengths in 16 bits: past these limits they would be cut.
    pub fn check_limits(&self) -> Result<(), String> {
        check_tags(&self.tags)?;
        if let Some(key) = &self.key {
            check_key(key)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(lines: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            out.extend_from_slice(l.as_bytes());
            out.push(b'\n');
        }
        out
    }

    const HEADER: &str = r#"{"format":"changeagent-checkpoint","version":1,"clusterId":"c","index":9,"scope":"all","createdTs":5}"#;

    fn read_all(bytes: &[u8]) -> Result<(u64, u64), ReadError> {
        let mut r = LineReader::new(bytes)?;
        let (mut records, mut internal) = (0, 0);
        while let Some(line) = r.next_line()? {
            match line {
                Line::Record(_) => records += 1,
                Line::Internal(_) => internal += 1,
                Line::Header(_) | Line::Trailer(_) => {}
            }
        }
        Ok((records, internal))
    }

    #[test]
    fn scopes_and_paths() {
        assert_eq!(Scope::parse("all").unwrap(), Scope::All);
        let t = Scope::parse("tenant=acme").unwrap();
        assert_eq!(t.to_string(), "tenant=acme");
        assert_eq!(
            object_path("pre/", "c1", &t, 42),
            "pre/c1/checkpoints/tenant-acme/00000000000000000042.jsonl.zst"
        );
        assert_eq!(
            latest_path("", "c1", &Scope::All),
            "c1/checkpoints/all/latest.json"
        );
        assert_eq!(
            index_of_object("x/c1/checkpoints/all/00000000000000000042.jsonl.zst"),
            Some(42)
        );
        assert_eq!(index_of_object("x/latest.json"), None);
        for bad in ["", "tenant=", "tenant=a b", "everything", "tenant=12"] {
            assert!(Scope::parse(bad).is_err(), "{bad:?}");
        }
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"tenant=acme\"");
        assert_eq!(serde_json::from_str::<Scope>(&json).unwrap(), t);
    }

    #[test]
    fn a_whole_file_reads_and_counts() {
        let bytes = file(&[
            HEADER,
            r#"{"_id":1,"_ts":1,"type":-4,"data":{"_id":1,"name":"acme"}}"#,
            r#"{"_id":7,"_ts":2,"data":7}"#,
            r#"{"_internal":"idempotency","key":"k","ts":3,"answer":"{\"_id\":7}"}"#,
            r#"{"end":true,"records":2,"internal":1}"#,
        ]);
        assert_eq!(read_all(&bytes).unwrap(), (2, 1));
    }

    #[test]
    fn broken_files_are_refused() {
        let cases: Vec<Vec<u8>> = vec![
            // no trailer
            file(&[HEADER, r#"{"_id":1,"data":1}"#]),
            // wrong count
            file(&[
                HEADER,
                r#"{"_id":1,"data":1}"#,
                r#"{"end":true,"records":2}"#,
            ]),
            // out of order
            file(&[
                HEADER,
                r#"{"_id":2,"data":1}"#,
                r#"{"_id":1,"data":1}"#,
                r#"{"end":true,"records":2}"#,
            ]),
            // past the index
            file(&[
                HEADER,
                r#"{"_id":10,"data":1}"#,
                r#"{"end":true,"records":1}"#,
            ]),
            // data after the trailer
            file(&[HEADER, r#"{"end":true,"records":0}"#, r#"{"_id":1}"#]),
            // not a checkpoint
            file(&[r#"{"format":"other","version":1}"#]),
            file(&[]),
            file(&[HEADER, "garbage"]),
        ];
        for (i, bytes) in cases.iter().enumerate() {
            assert!(read_all(bytes).is_err(), "case {i} was accepted");
        }
    }

    #[test]
    fn record_ids_are_read_from_the_prefix() {
        assert_eq!(record_id(br#"{"_id":123,"_ts":1}"#), Some(123));
        assert_eq!(record_id(br#"{"_id":x}"#), None);
        assert_eq!(record_id(br#"{"_ts":1}"#), None);
    }
}
