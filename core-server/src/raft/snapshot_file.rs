//! Raft snapshot files: the change store's checkpoint export, followed by a trailer naming
//! the Raft state it covers.
//!
//! Layout: `[checkpoint (zstd JSONL)][meta JSON][meta length: u32 BE][MAGIC]`. The trailer
//! comes last so a snapshot is exported straight into its file in one pass.
//!
//! Publishing rule: a snapshot is written to a temp file in the snapshot dir, synced, then
//! renamed over `current.snap` and the dir synced, so `current.snap` is always whole. A
//! reader holding the previous file keeps reading it (Unix rename semantics).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::types::SnapshotMeta;

const MAGIC: &[u8; 8] = b"CASNAP01";
/// The newest snapshot in a snapshot dir.
pub const CURRENT: &str = "current.snap";
/// Longest accepted meta (membership and ids; far smaller in practice).
const MAX_META: u64 = 1 << 20;

#[derive(Serialize, Deserialize)]
struct SavedMeta {
    meta: SnapshotMeta,
}

/// Where a snapshot file's checkpoint data ends, and what it covers.
pub struct Trailer {
    pub meta: SnapshotMeta,
    pub data_len: u64,
}

/// Appends the trailer for `meta` at the end of `f`.
pub fn write_trailer(f: &mut File, meta: &SnapshotMeta) -> io::Result<()> {
    let bytes = serde_json::to_vec(&SavedMeta { meta: meta.clone() })?;
    f.seek(SeekFrom::End(0))?;
    f.write_all(&bytes)?;
    f.write_all(&(bytes.len() as u32).to_be_bytes())?;
    f.write_all(MAGIC)?;
    Ok(())
}

/// Reads the trailer of `f`; `None` when the file has none (raw checkpoint data).
pub fn read_trailer(f: &mut File) -> io::Result<Option<Trailer>> {
    let len = f.metadata()?.len();
    if len < 12 {
        return Ok(None);
    }
    let mut tail = [0u8; 12];
    f.seek(SeekFrom::Start(len - 12))?;
    f.read_exact(&mut tail)?;
    if &tail[4..] != MAGIC {
        return Ok(None);
    }
    let meta_len = u64::from(u32::from_be_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if meta_len > MAX_META || meta_len + 12 > len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "snapshot trailer has a bad meta length",
        ));
    }
    let data_len = len - 12 - meta_len;
    let mut bytes = vec![0u8; meta_len as usize];
    f.seek(SeekFrom::Start(data_len))?;
    f.read_exact(&mut bytes)?;
    let saved: SavedMeta = serde_json::from_slice(&bytes)?;
    Ok(Some(Trailer {
        meta: saved.meta,
        data_len,
    }))
}

/// A new, unnamed-until-published temp file in `dir`.
pub fn temp_in(dir: &Path) -> io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix("building-")
        .suffix(".snap")
        .tempfile_in(dir)
}

/// Syncs `tmp` and makes it `dir/current.snap`; returns the published file, rewound.
pub fn publish(tmp: tempfile::NamedTempFile, dir: &Path) -> io::Result<File> {
    tmp.as_file().sync_all()?;
    let mut file = tmp.persist(current(dir)).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()?;
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}

/// Path of the current snapshot in `dir`.
pub fn current(dir: &Path) -> PathBuf {
    dir.join(CURRENT)
}

/// Opens the current snapshot, rewound, with its trailer; `None` if there is none yet.
pub fn open_current(dir: &Path) -> io::Result<Option<(Trailer, File)>> {
    let path = current(dir);
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let trailer = read_trailer(&mut file)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} has no snapshot trailer", path.display()),
        )
    })?;
    file.seek(SeekFrom::Start(0))?;
    Ok(Some((trailer, file)))
}

/// Removes temp files left by a crash while building or receiving a snapshot.
pub fn remove_leftovers(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("building-") && name.ends_with(".snap") {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::{LeaderId, LogId};
    use openraft::vote::RaftLeaderId;

    fn meta(index: u64) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(LogId::new(LeaderId::new(1, 1), index)),
            last_membership: Default::default(),
        }
    }

    #[test]
    fn trailer_round_trip_and_publish() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = temp_in(dir.path()).unwrap();
        let mut f = tmp.reopen().unwrap();
        f.write_all(b"checkpoint bytes").unwrap();
        write_trailer(&mut f, &meta(7)).unwrap();
        publish(tmp, dir.path()).unwrap();
        let (t, mut f) = open_current(dir.path()).unwrap().unwrap();
        assert_eq!(t.meta, meta(7));
        assert_eq!(t.data_len, 16);
        let mut data = vec![0; t.data_len as usize];
        f.read_exact(&mut data).unwrap();
        assert_eq!(data, b"checkpoint bytes");
    }

    #[test]
    fn raw_data_has_no_trailer_and_a_broken_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = tempfile::tempfile_in(dir.path()).unwrap();
        f.write_all(b"just some raw checkpoint data").unwrap();
        assert!(read_trailer(&mut f).unwrap().is_none());
        f.write_all(&u32::MAX.to_be_bytes()).unwrap();
        f.write_all(MAGIC).unwrap();
        assert!(read_trailer(&mut f).is_err());
        assert!(open_current(dir.path()).unwrap().is_none());
    }
}
