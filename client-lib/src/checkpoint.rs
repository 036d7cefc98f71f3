//! Reading checkpoints: [`CheckpointReader`] streams the records out of a
//! checkpoint's compressed bytes in constant memory and checks them against
//! their [`Manifest`]; [`spool`] first copies the bytes into a temp file and
//! verifies them, so no record of a corrupt file is ever handed out.
//!
//! # Checks
//!
//! A checkpoint is zstd-compressed JSON Lines (see
//! [`changeagent_proto::checkpoint`]). Reading one checks, in this order:
//! 1. the header's format and version, and (with a manifest) that its
//!    `index`, `scope` and `clusterId` are the manifest's;
//! 2. each line as it is read: records in increasing `_id` order up to the
//!    header's index, nothing but records and internal lines before the
//!    trailer;
//! 3. at the end: the trailer is there, its counts match the lines read,
//!    nothing follows it, and (with a manifest) the record count, the size
//!    and the sha256 of the compressed bytes are the manifest's.
//!
//! A streaming reader hands out records before step 3 could fail; a caller
//! that must not act on records of a corrupt file reads a
//! [`VerifiedCheckpoint`] from [`spool`] (or `Client::fetch_checkpoint`).

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use changeagent_proto::checkpoint::{record_id, Header, Line, LineReader, ReadError, Trailer};
use changeagent_proto::Manifest;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::types::Change;

/// Bytes read from the compressed input at a time (and the size of the
/// buffer of decompressed lines): large enough that hashing and
/// decompressing run in big steps, small enough to keep memory constant.
const READ_BUFFER_BYTES: usize = 128 * 1024;

/// Size and sha256 of bytes as they pass, to check them against a
/// [`Manifest`].
#[derive(Debug, Clone, Default)]
pub struct Digest {
    hasher: Sha256,
    size: u64,
}

impl Digest {
    /// Nothing seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
    }

    /// Bytes seen so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The sha256 of the bytes seen, as lowercase hex (the form of
    /// [`Manifest::sha256`]).
    pub fn sha256_hex(&self) -> String {
        format!("{:x}", self.hasher.clone().finalize())
    }

    /// Checks the bytes seen against the manifest's `size`, then its
    /// `sha256`.
    pub fn verify(&self, manifest: &Manifest) -> Result<()> {
        if self.size != manifest.size {
            return Err(Error::SizeMismatch {
                index: manifest.index,
                expected: manifest.size,
                actual: self.size,
            });
        }
        let actual = self.sha256_hex();
        if !actual.eq_ignore_ascii_case(&manifest.sha256) {
            return Err(Error::ChecksumMismatch {
                index: manifest.index,
                expected: manifest.sha256.clone(),
                actual,
            });
        }
        Ok(())
    }
}

/// What the hashing input and the reader share: the decompressor owns the
/// input, the reader looks at the digest when the trailer has been read.
#[derive(Debug, Default)]
struct Hashed {
    digest: Digest,
    /// The input returned end of file.
    eof: bool,
}

/// The compressed input, hashing every byte the decompressor reads.
struct HashingInput<R> {
    inner: R,
    /// Shared with the [`CheckpointReader`] that built this input; lives as
    /// long as either.
    hashed: Arc<Mutex<Hashed>>,
}

impl<R: Read> Read for HashingInput<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        // Nothing panics while the lock is held, so the lock is never
        // poisoned; take the data either way.
        let mut hashed = self.hashed.lock().unwrap_or_else(PoisonError::into_inner);
        hashed.digest.update(&buf[..n]);
        if n == 0 && !buf.is_empty() {
            hashed.eof = true;
        }
        Ok(n)
    }
}

type Decompressed<R> = BufReader<zstd::stream::read::Decoder<'static, BufReader<HashingInput<R>>>>;

/// Streams the records of a checkpoint out of its compressed bytes, in
/// constant memory whatever the size, checking them as the
/// [module docs](self) describe.
///
/// ```no_run
/// # fn example(manifest: changeagent_proto::Manifest) -> changeagent_client::Result<()> {
/// use changeagent_client::checkpoint::CheckpointReader;
/// let file = std::fs::File::open("00000000000000000120.jsonl.zst").expect("file");
/// let mut reader = CheckpointReader::with_manifest(file, &manifest)?;
/// while let Some(line) = reader.next_raw()? {
///     // `line` holds one record's JSON exactly as the file stores it.
///     let _ = line;
/// }
/// // Only now are the size and the sha256 known to match the manifest.
/// # Ok(())
/// # }
/// ```
pub struct CheckpointReader<R: Read> {
    lines: LineReader<Decompressed<R>>,
    hashed: Arc<Mutex<Hashed>>,
    manifest: Option<Manifest>,
    /// The last record line read, without its newline.
    record: Vec<u8>,
    /// Lines read after the header.
    lines_read: u64,
    /// Set once the trailer was read and every end check passed.
    trailer: Option<Trailer>,
    /// An error was returned: the reader returns nothing more.
    failed: bool,
}

impl<R: Read> CheckpointReader<R> {
    /// Reads the header of a checkpoint from its compressed bytes. The
    /// trailer's counts are checked at the end; nothing is compared with a
    /// manifest (see [`CheckpointReader::digest`] for the size and sha256).
    pub fn new(compressed: R) -> Result<Self> {
        Self::open(compressed, None)
    }

    /// Reads the header of a checkpoint from its compressed bytes and checks
    /// it against `manifest`; at the end, checks the record count, size and
    /// sha256 against it too.
    pub fn with_manifest(compressed: R, manifest: &Manifest) -> Result<Self> {
        Self::open(compressed, Some(manifest.clone()))
    }

    fn open(compressed: R, manifest: Option<Manifest>) -> Result<Self> {
        let index = manifest.as_ref().map(|m| m.index);
        let bad = |source| Error::BadCheckpoint { index, source };
        let hashed = Arc::new(Mutex::new(Hashed::default()));
        let input = HashingInput {
            inner: compressed,
            hashed: Arc::clone(&hashed),
        };
        let decoder = zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(
            READ_BUFFER_BYTES,
            input,
        ))
        .map_err(|e| bad(ReadError::Io(e)))?;
        let lines =
            LineReader::new(BufReader::with_capacity(READ_BUFFER_BYTES, decoder)).map_err(bad)?;
        if let Some(manifest) = &manifest {
            check_header(lines.header(), manifest)?;
        }
        Ok(Self {
            lines,
            hashed,
            manifest,
            record: Vec::new(),
            lines_read: 0,
            trailer: None,
            failed: false,
        })
    }

    /// The header line.
    pub fn header(&self) -> &Header {
        self.lines.header()
    }

    /// The trailer, once the last record was read and the end checked.
    pub fn trailer(&self) -> Option<&Trailer> {
        self.trailer.as_ref()
    }

    /// Size and sha256 of the compressed bytes read so far; of the whole
    /// input once the reader returned `None`.
    pub fn digest(&self) -> Digest {
        self.lock().digest.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Hashed> {
        // See `HashingInput::read`: never poisoned.
        self.hashed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next record line, exactly as the file holds it (a change's wire
    /// JSON, without the newline); `None` after the last one, once every
    /// end check passed. Internal lines (Raft snapshots only) are skipped.
    /// After an error it returns `None`.
    pub fn next_raw(&mut self) -> Result<Option<&[u8]>> {
        if self.failed || self.trailer.is_some() {
            return Ok(None);
        }
        loop {
            match self.step() {
                Ok(Step::Record) => return Ok(Some(&self.record)),
                Ok(Step::Skipped) => {}
                Ok(Step::End) => return Ok(None),
                Err(e) => {
                    self.failed = true;
                    return Err(e);
                }
            }
        }
    }

    /// The next record parsed as a [`Change`]. Its `data` is then a
    /// [`serde_json::Value`], whose objects do not keep the key order of
    /// the file; [`CheckpointReader::next_raw`] gives the bytes.
    pub fn next_change(&mut self) -> Result<Option<Change>> {
        let index = self.index();
        let Some(line) = self.next_raw()? else {
            return Ok(None);
        };
        match serde_json::from_slice(line) {
            Ok(change) => Ok(Some(change)),
            Err(e) => {
                let id = record_id(line).unwrap_or_default();
                self.failed = true;
                Err(Error::BadCheckpoint {
                    index,
                    source: ReadError::Bad {
                        line: self.lines_read + 1,
                        detail: format!("record {id} is not a change: {e}"),
                    },
                })
            }
        }
    }

    /// The manifest's index, else the header's.
    fn index(&self) -> Option<u64> {
        Some(
            self.manifest
                .as_ref()
                .map_or(self.lines.header().index, |m| m.index),
        )
    }

    /// Reads one line: a record is copied into `record` (a line borrowed
    /// from the line reader cannot be returned from a loop that reads on);
    /// the trailer runs the end checks.
    fn step(&mut self) -> Result<Step> {
        let index = self.index();
        let bad = |source| Error::BadCheckpoint { index, source };
        let trailer = match self.lines.next_line().map_err(bad)? {
            Some(Line::Record(bytes)) => {
                self.record.clear();
                self.record.extend_from_slice(bytes);
                self.lines_read += 1;
                return Ok(Step::Record);
            }
            Some(Line::Header(_) | Line::Internal(_)) => {
                self.lines_read += 1;
                return Ok(Step::Skipped);
            }
            Some(Line::Trailer(trailer)) => trailer,
            // The line reader reports the missing trailer as an error and
            // returns `None` only after the trailer, which ends this reader.
            None => {
                return Err(bad(ReadError::Incomplete {
                    lines: self.lines_read,
                }))
            }
        };
        // Nothing may follow the trailer: this reads on to the end of the
        // decompressed stream, which the decompressor reports only once the
        // compressed input is at its end, so the digest covers every byte.
        if self.lines.next_line().map_err(bad)?.is_some() {
            return Err(bad(ReadError::Bad {
                line: self.lines_read + 2,
                detail: "a line after the trailer".to_owned(),
            }));
        }
        let (digest, eof) = {
            let hashed = self.lock();
            (hashed.digest.clone(), hashed.eof)
        };
        if !eof {
            return Err(bad(ReadError::Bad {
                line: self.lines_read + 2,
                detail: "bytes after the end of the compressed stream".to_owned(),
            }));
        }
        if let Some(manifest) = &self.manifest {
            digest.verify(manifest)?;
            if trailer.records != manifest.records {
                return Err(Error::ManifestMismatch {
                    index: manifest.index,
                    field: "records",
                    expected: manifest.records.to_string(),
                    found: trailer.records.to_string(),
                });
            }
        }
        self.trailer = Some(trailer);
        Ok(Step::End)
    }
}

/// What [`CheckpointReader::step`] read.
enum Step {
    /// A record, now in `record`.
    Record,
    /// An internal line.
    Skipped,
    /// The trailer; every end check passed.
    End,
}

/// Yields the records as [`Change`]s; see [`CheckpointReader::next_change`].
impl<R: Read> Iterator for CheckpointReader<R> {
    type Item = Result<Change>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_change().transpose()
    }
}

/// Checks a header against the manifest that describes its file.
fn check_header(header: &Header, manifest: &Manifest) -> Result<()> {
    let mismatch = |field, expected: String, found: String| Error::ManifestMismatch {
        index: manifest.index,
        field,
        expected,
        found,
    };
    if header.index != manifest.index {
        return Err(mismatch(
            "index",
            manifest.index.to_string(),
            header.index.to_string(),
        ));
    }
    if header.scope != manifest.scope {
        return Err(mismatch(
            "scope",
            manifest.scope.to_string(),
            header.scope.to_string(),
        ));
    }
    if let Some(cluster_id) = &header.cluster_id {
        if *cluster_id != manifest.cluster_id {
            return Err(mismatch(
                "clusterId",
                manifest.cluster_id.clone(),
                cluster_id.clone(),
            ));
        }
    }
    Ok(())
}

/// A checkpoint's compressed bytes in a temp file, already checked against
/// its manifest's size and sha256. The file is deleted when this is dropped.
#[derive(Debug)]
pub struct VerifiedCheckpoint {
    file: File,
    manifest: Manifest,
}

impl VerifiedCheckpoint {
    /// The manifest the bytes were checked against.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Reads the records from the start of the file. The reader checks the
    /// file again as it goes (the lines, and at the end size and sha256).
    pub fn reader(mut self) -> Result<CheckpointReader<File>> {
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(|source| Error::Io {
                what: "rewind the checkpoint's temp file",
                source,
            })?;
        CheckpointReader::with_manifest(self.file, &self.manifest)
    }

    /// The temp file, positioned at its end; deleted when closed.
    pub fn into_file(self) -> File {
        self.file
    }

    /// Wraps a file whose bytes were verified against `manifest`.
    pub(crate) fn new(file: File, manifest: Manifest) -> Self {
        Self { file, manifest }
    }
}

/// Copies a checkpoint's compressed bytes into a temp file in `dir` (the
/// system's temp dir when `None`) while hashing them, and checks their size
/// and sha256 against `manifest` before anything else reads them. Stops at
/// the first byte past the manifest's size. Blocking I/O.
pub fn spool(
    mut compressed: impl Read,
    manifest: &Manifest,
    dir: Option<&Path>,
) -> Result<VerifiedCheckpoint> {
    let mut file = temp_file(dir)?;
    let mut digest = Digest::new();
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    loop {
        let n = match compressed.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(Error::Io {
                    what: "read the checkpoint's bytes",
                    source,
                })
            }
        };
        digest.update(&buf[..n]);
        check_not_longer(&digest, manifest)?;
        file.write_all(&buf[..n]).map_err(|source| Error::Io {
            what: "write the checkpoint's temp file",
            source,
        })?;
    }
    digest.verify(manifest)?;
    Ok(VerifiedCheckpoint::new(file, manifest.clone()))
}

/// A new anonymous temp file in `dir` (the system's temp dir when `None`).
pub(crate) fn temp_file(dir: Option<&Path>) -> Result<File> {
    match dir {
        Some(dir) => tempfile::tempfile_in(dir),
        None => tempfile::tempfile(),
    }
    .map_err(|source| Error::Io {
        what: "create a temp file for the checkpoint",
        source,
    })
}

/// Fails as soon as more bytes than the manifest's size arrived, so a wrong
/// or endless object cannot fill the disk.
pub(crate) fn check_not_longer(digest: &Digest, manifest: &Manifest) -> Result<()> {
    if digest.size() > manifest.size {
        return Err(Error::SizeMismatch {
            index: manifest.index,
            expected: manifest.size,
            actual: digest.size(),
        });
    }
    Ok(())
}

/// Builds checkpoint files for tests.
#[cfg(test)]
pub(crate) mod testing {
    use changeagent_proto::{Manifest, Scope};

    use super::Digest;

    /// The lines of a checkpoint at `index` of `scope` holding `records`
    /// (wire JSON, in `_id` order), with its trailer.
    pub(crate) fn lines(index: u64, scope: &Scope, records: &[&str]) -> Vec<String> {
        let mut lines = vec![format!(
            r#"{{"format":"changeagent-checkpoint","version":1,"clusterId":"c","index":{index},"scope":"{scope}","createdTs":1}}"#
        )];
        lines.extend(records.iter().map(|r| (*r).to_owned()));
        lines.push(format!(r#"{{"end":true,"records":{}}}"#, records.len()));
        lines
    }

    /// `lines`, one per line, compressed with zstd.
    pub(crate) fn compress(lines: &[String]) -> Vec<u8> {
        let mut text = String::new();
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        zstd::encode_all(text.as_bytes(), 3).expect("compress in memory")
    }

    /// The manifest describing `bytes` as checkpoint `index` of `scope`.
    pub(crate) fn manifest_of(bytes: &[u8], index: u64, scope: &Scope, records: u64) -> Manifest {
        let mut digest = Digest::new();
        digest.update(bytes);
        Manifest {
            index,
            scope: scope.clone(),
            object: format!(
                "c/checkpoints/{}/{index:020}.jsonl.zst",
                scope.path_segment()
            ),
            size: bytes.len() as u64,
            sha256: digest.sha256_hex(),
            records,
            created_ts: 1,
            cluster_id: "c".to_owned(),
        }
    }

    /// A checkpoint file and its manifest.
    pub(crate) fn checkpoint(index: u64, scope: &Scope, records: &[&str]) -> (Vec<u8>, Manifest) {
        let bytes = compress(&lines(index, scope, records));
        let manifest = manifest_of(&bytes, index, scope, records.len() as u64);
        (bytes, manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{checkpoint, compress, lines, manifest_of};
    use super::*;
    use changeagent_proto::Scope;

    /// Records with a catalog record, a keyed change and an unkeyed change
    /// whose `data` keys are not in sorted order.
    const RECORDS: [&str; 3] = [
        r#"{"_id":1,"_ts":10,"type":-4,"data":{"_id":1,"name":"acme"}}"#,
        r#"{"_id":3,"_ts":30,"tags":["a"],"tenant":"acme","collection":"flags","key":"k","data":{"on":true}}"#,
        r#"{"_id":5,"_ts":50,"data":{"z":1,"a":[1.50,2]}}"#,
    ];

    /// Reads every record line; the lines read before the first error too.
    fn read_raw<R: Read>(reader: &mut CheckpointReader<R>) -> (Vec<String>, Result<()>) {
        let mut out = Vec::new();
        loop {
            match reader.next_raw() {
                Ok(Some(line)) => out.push(String::from_utf8_lossy(line).into_owned()),
                Ok(None) => return (out, Ok(())),
                Err(e) => return (out, Err(e)),
            }
        }
    }

    #[test]
    fn a_good_file_yields_its_records_byte_for_byte_and_checks_out() {
        let (bytes, manifest) = checkpoint(5, &Scope::All, &RECORDS);
        let mut reader = CheckpointReader::with_manifest(&bytes[..], &manifest).expect("open");
        assert_eq!(reader.header().index, 5);
        assert_eq!(reader.header().scope, Scope::All);
        let (records, end) = read_raw(&mut reader);
        end.expect("checks pass");
        assert_eq!(records, RECORDS);
        assert_eq!(reader.trailer().map(|t| t.records), Some(3));
        let digest = reader.digest();
        assert_eq!(digest.size(), manifest.size);
        assert_eq!(digest.sha256_hex(), manifest.sha256);
        // After the end: nothing more, no error.
        assert!(reader.next_raw().expect("still fine").is_none());

        let changes: Vec<Change> = CheckpointReader::with_manifest(&bytes[..], &manifest)
            .expect("open")
            .collect::<Result<_>>()
            .expect("parse");
        let ids: Vec<u64> = changes.iter().map(|c| c.id).collect();
        assert_eq!(ids, [1, 3, 5]);
        assert_eq!(changes[0].change_type, -4);
        assert_eq!(changes[1].key.as_deref(), Some("k"));
    }

    #[test]
    fn a_sha256_mismatch_fails_at_the_end_and_spool_yields_nothing() {
        let (bytes, mut manifest) = checkpoint(5, &Scope::All, &RECORDS);
        manifest.sha256 = "0".repeat(64);
        let mut reader = CheckpointReader::with_manifest(&bytes[..], &manifest).expect("open");
        let (records, end) = read_raw(&mut reader);
        assert_eq!(
            records.len(),
            3,
            "a streaming reader hands out records first"
        );
        assert!(
            matches!(end, Err(Error::ChecksumMismatch { index: 5, .. })),
            "{end:?}"
        );
        assert!(reader.trailer().is_none());
        assert!(reader.next_raw().expect("ended").is_none());

        let spooled = spool(&bytes[..], &manifest, None);
        assert!(
            matches!(spooled, Err(Error::ChecksumMismatch { index: 5, .. })),
            "{spooled:?}"
        );
    }

    #[test]
    fn a_size_mismatch_fails_both_ways() {
        let (bytes, mut manifest) = checkpoint(5, &Scope::All, &RECORDS);
        manifest.size += 1;
        let mut reader = CheckpointReader::with_manifest(&bytes[..], &manifest).expect("open");
        let (_, end) = read_raw(&mut reader);
        assert!(
            matches!(end, Err(Error::SizeMismatch { index: 5, .. })),
            "{end:?}"
        );
        assert!(matches!(
            spool(&bytes[..], &manifest, None),
            Err(Error::SizeMismatch { .. })
        ));

        // A longer object is cut off at the first byte too many.
        manifest.size -= 2;
        match spool(&bytes[..], &manifest, None) {
            Err(Error::SizeMismatch {
                expected, actual, ..
            }) => {
                assert_eq!(expected, bytes.len() as u64 - 1);
                assert!(actual > expected, "{actual}");
            }
            other => panic!("expected a size mismatch, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_trailer_or_cut_file_is_refused() {
        let mut no_trailer = lines(5, &Scope::All, &RECORDS);
        no_trailer.pop();
        let bytes = compress(&no_trailer);
        let manifest = manifest_of(&bytes, 5, &Scope::All, 3);
        let mut reader = CheckpointReader::with_manifest(&bytes[..], &manifest).expect("open");
        let (_, end) = read_raw(&mut reader);
        assert!(
            matches!(
                end,
                Err(Error::BadCheckpoint {
                    source: ReadError::Incomplete { .. },
                    ..
                })
            ),
            "{end:?}"
        );

        // The compressed bytes cut short: the decompressor or the line reader
        // stops, before any end check could pass.
        let (bytes, _) = checkpoint(5, &Scope::All, &RECORDS);
        let cut = &bytes[..bytes.len() - 8];
        let (_, end) = match CheckpointReader::new(cut) {
            Ok(mut reader) => read_raw(&mut reader),
            Err(e) => (Vec::new(), Err(e)),
        };
        assert!(matches!(end, Err(Error::BadCheckpoint { .. })), "{end:?}");
    }

    #[test]
    fn a_corrupted_byte_is_caught() {
        let (mut bytes, manifest) = checkpoint(5, &Scope::All, &RECORDS);
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x55;
        // Streaming: an error somewhere (a line, the decompressor, or the
        // sha256 at the end), never a clean end.
        let end = match CheckpointReader::with_manifest(&bytes[..], &manifest) {
            Ok(mut reader) => read_raw(&mut reader).1,
            Err(e) => Err(e),
        };
        assert!(end.is_err(), "a corrupt file read cleanly");
        // Spooled: refused before any record is read.
        assert!(matches!(
            spool(&bytes[..], &manifest, None),
            Err(Error::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn a_header_that_contradicts_the_manifest_is_refused_at_once() {
        let (bytes, mut manifest) = checkpoint(5, &Scope::All, &RECORDS);
        manifest.index = 6;
        assert!(matches!(
            CheckpointReader::with_manifest(&bytes[..], &manifest),
            Err(Error::ManifestMismatch { field: "index", .. })
        ));
        let (bytes, mut manifest) = checkpoint(5, &Scope::All, &RECORDS);
        manifest.scope = Scope::Tenant("acme".into());
        assert!(matches!(
            CheckpointReader::with_manifest(&bytes[..], &manifest),
            Err(Error::ManifestMismatch { field: "scope", .. })
        ));
        let (bytes, mut manifest) = checkpoint(5, &Scope::All, &RECORDS);
        manifest.records = 4;
        let mut reader = CheckpointReader::with_manifest(&bytes[..], &manifest).expect("open");
        assert!(matches!(
            read_raw(&mut reader).1,
            Err(Error::ManifestMismatch {
                field: "records",
                ..
            })
        ));
    }

    #[test]
    fn a_spooled_checkpoint_reads_back_from_its_temp_file() {
        let (bytes, manifest) = checkpoint(5, &Scope::All, &RECORDS);
        let verified = spool(&bytes[..], &manifest, None).expect("spool");
        assert_eq!(verified.manifest(), &manifest);
        let mut reader = verified.reader().expect("reader");
        let (records, end) = read_raw(&mut reader);
        end.expect("checks pass");
        assert_eq!(records, RECORDS);
    }

    #[test]
    fn a_record_that_is_not_a_change_is_an_error() {
        let (bytes, manifest) = checkpoint(5, &Scope::All, &[r#"{"_id":1,"tags":"x"}"#]);
        let mut reader = CheckpointReader::with_manifest(&bytes[..], &manifest).expect("open");
        assert!(matches!(
            reader.next_change(),
            Err(Error::BadCheckpoint { index: Some(5), .. })
        ));
        assert!(reader.next().is_none(), "the reader stops after an error");
    }
}
