//! The Raft log and vote in their own RocksDB database.
//!
//! Ordering rules:
//! 1. `append` makes the entries readable at once (the in-memory [`EntryCache`]) and returns,
//!    so replication starts while they are written. The `raft-log` thread writes them in one
//!    batch to RocksDB with the WAL synced, and only after that reports them flushed.
//!    openraft counts an entry as this node's (toward a quorum, in its answer to the leader)
//!    only once reported, so nothing counts before it is on disk. When another append is
//!    already queued behind, a batch is written without the sync and reported with the next
//!    synced one, which covers every write before it (group commit).
//! 2. `save_vote` writes with the WAL synced before it returns; the vote is then also kept in
//!    memory, where `read_vote` answers from.
//! 3. `truncate_after` and `purge` are synced too: a truncated suffix must never reappear.
//! 4. Writes keep their order: all of them run on `raft-log`, in the order openraft asks.
//! 5. Synced writes go over blocks already written, so `fdatasync` has data to flush but no
//!    file size or block map to journal (here that took a quarter off a small synced write:
//!    112 µs p50 instead of 148). RocksDB reuses old WAL files in place
//!    ([`WAL_RECYCLE_FILES`]), and each open first fills one WAL and rolls over to it
//!    ([`prewrite_wal`]), so the log starts in such a file rather than in a new one. Power
//!    loss: every record carries the number of the WAL it belongs to and a CRC, so recovery
//!    reads up to the first record left from the file's earlier use or torn by the crash and
//!    stops there; what it drops was never reported flushed, since a report follows the sync
//!    of every record before it.
//!
//! RocksDB calls run on threads of the log's own ([`IoThread`]), never on the async workers
//! or in the blocking pool client reads use: writes and state reads on `raft-log`, entry
//! reads that miss the cache on `raft-log-read`.
//!
//! The newest entries are kept in memory ([`EntryCache`], bounded in entries and bytes; an
//! entry leaves it only once written to RocksDB), so replication and the state machine read
//! what was just appended without a disk read or a thread hop. Replication reads are bounded
//! in bytes ([`MAX_APPEND_BYTES`]): openraft sends what a read returns as one AppendEntries
//! request, and that must arrive within its timeout.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::RaftLogReader;
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

use super::io::IoThread;
use super::types::{entry_len, Entry, LogId, NodeId, TypeConfig, Vote};
use crate::stages::{Stage, STAGES};

/// Most bytes of entries one replication read returns (at least one entry): what one
/// AppendEntries request carries.
pub const MAX_APPEND_BYTES: usize = 1 << 20;
/// Newest entries kept in memory, in entries and in bytes (see [`entry_len`]).
const CACHE_ENTRIES: usize = 16_384;
const CACHE_BYTES: usize = 64 << 20;

/// Memtable size of each column family; the WAL rolls over to a reused file about this often.
const WRITE_BUFFER_BYTES: usize = 16 << 20;
/// Old WAL files kept to be written over (rule 5).
const WAL_RECYCLE_FILES: usize = 4;
/// What [`prewrite_wal`] writes: below [`WRITE_BUFFER_BYTES`], so it fills one WAL.
const WAL_PREWRITE_BYTES: usize = 12 << 20;
const KEY_PREWRITE: &str = "wal_prewrite";

const CF_LOGS: &str = "logs";
const CF_STATE: &str = "state";
const KEY_VOTE: &[u8] = b"vote";
const KEY_PURGED: &[u8] = b"last_purged";

/// The Raft log store. Cheap to clone; clones share the database, threads and cache.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    writer: Arc<IoThread>,
    reader: Arc<IoThread>,
    /// Appends sent to the writer thread and not started there yet.
    appends_queued: Arc<AtomicUsize>,
    /// Appends written without a sync, reported with the next synced one (writer thread).
    unsynced: Arc<Mutex<Vec<Flush>>>,
    cache: Arc<Mutex<EntryCache>>,
    /// The vote as last synced (rule 2).
    vote: Arc<Mutex<Option<Vote>>>,
}

/// An append to report flushed once a synced write covers it.
struct Flush {
    callback: IOFlushed<TypeConfig>,
    started: Instant,
}

/// The newest contiguous entries with their sizes, oldest first.
#[derive(Default)]
struct EntryCache {
    entries: VecDeque<(Arc<Entry>, usize)>,
    bytes: usize,
    /// The last index written to RocksDB: entries after it stay here, whatever the budget.
    written: Option<u64>,
}

impl EntryCache {
    fn index_of(e: &(Arc<Entry>, usize)) -> u64 {
        e.0.log_id.index
    }

    fn first(&self) -> Option<u64> {
        self.entries.front().map(Self::index_of)
    }

    /// Adds appended entries; a gap before them (a restart, a snapshot) starts afresh.
    fn push(&mut self, appended: Vec<(Arc<Entry>, usize)>) {
        let Some(first) = appended.first().map(Self::index_of) else {
            return;
        };
        if self.entries.back().map(Self::index_of) != first.checked_sub(1) {
            self.entries.clear();
            self.bytes = 0;
        }
        for e in appended {
            self.bytes += e.1;
            self.entries.push_back(e);
        }
        self.evict();
    }

    /// Entries up to `index` are in RocksDB now and may leave.
    fn written(&mut self, index: u64) {
        self.written = Some(self.written.map_or(index, |w| w.max(index)));
        self.evict();
    }

    fn evict(&mut self) {
        while self.entries.len() > CACHE_ENTRIES || self.bytes > CACHE_BYTES {
            let Some(first) = self.first() else {
                break;
            };
            if self.written.is_none_or(|w| first > w) {
                break;
            }
            if let Some((_, n)) = self.entries.pop_front() {
                self.bytes -= n;
            }
        }
    }

    /// Drops entries from `index` on (a truncated suffix).
    fn truncate(&mut self, index: u64) {
        while self
            .entries
            .back()
            .is_some_and(|e| Self::index_of(e) >= index)
        {
            if let Some((_, n)) = self.entries.pop_back() {
                self.bytes -= n;
            }
        }
        if self.written.is_some_and(|w| w >= index) {
            self.written = index.checked_sub(1);
        }
    }

    /// Drops entries up to and including `index` (purged).
    fn purge(&mut self, index: u64) {
        while self
            .entries
            .front()
            .is_some_and(|e| Self::index_of(e) <= index)
        {
            if let Some((_, n)) = self.entries.pop_front() {
                self.bytes -= n;
            }
        }
    }

    /// Entries `start..end` from memory, stopping after `budget` bytes (at least one entry);
    /// `None` unless the cache holds `start` and, when `whole`, everything up to `end`.
    fn get(&self, start: u64, end: Bound<u64>, budget: usize, whole: bool) -> Option<Vec<Entry>> {
        let first = self.first()?;
        let last = self.entries.back().map(Self::index_of)?;
        if start < first || start > last {
            return None;
        }
        let wanted_last = match end {
            Bound::Included(e) => e,
            Bound::Excluded(e) => e.checked_sub(1)?,
            Bound::Unbounded => last,
        };
        if whole && wanted_last > last {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for (entry, n) in self.entries.range((start - first) as usize..) {
            if entry.log_id.index > wanted_last || (!out.is_empty() && bytes + n > budget) {
                break;
            }
            bytes += n;
            out.push(Entry::clone(entry));
        }
        Some(out)
    }
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn synced() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

impl LogStore {
    /// Opens (creating if needed) the log database in `path`.
    pub fn open(path: &Path) -> anyhow::Result<LogStore> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        // Rule 5: old WAL files are kept and written over.
        opts.set_recycle_log_file_num(WAL_RECYCLE_FILES);
        let cf_opts = || {
            let mut o = Options::default();
            o.set_write_buffer_size(WRITE_BUFFER_BYTES);
            o
        };
        let cfs = [CF_LOGS, CF_STATE].map(|n| ColumnFamilyDescriptor::new(n, cf_opts()));
        let db = Arc::new(DB::open_cf_descriptors(&opts, path, cfs)?);
        prewrite_wal(&db)?;
        let thread = |name| {
            IoThread::spawn(name)
                .map(Arc::new)
                .map_err(|e| anyhow::anyhow!("cannot start thread {name}: {e}"))
        };
        let vote = Self::get_json(&db, KEY_VOTE)?;
        Ok(LogStore {
            db,
            writer: thread("raft-log")?,
            reader: thread("raft-log-read")?,
            appends_queued: Arc::default(),
            unsynced: Arc::default(),
            cache: Arc::default(),
            vote: Arc::new(Mutex::new(vote)),
        })
    }

    /// Runs `f` on the log's writer thread.
    async fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&DB) -> io::Result<T> + Send + 'static,
    {
        let db = self.db.clone();
        self.writer.run(move || f(&db)).await.map_err(other)?
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, EntryCache> {
        lock(&self.cache)
    }

    /// Entries from `start` within `end`: from the cache when it holds them, else from
    /// RocksDB on the reader thread (for a whole range: up to where the cache starts, then
    /// from the cache); at most `budget` bytes (at least one entry) unless `whole`, which
    /// returns the whole range.
    async fn read_entries(
        &self,
        start: u64,
        end: Bound<u64>,
        budget: usize,
        whole: bool,
    ) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut from = start;
        // Each round moves `from` up to where the cache started, so this ends.
        loop {
            let first_cached = {
                let cache = self.cache();
                if let Some(hit) = cache.get(from, end, budget, whole) {
                    out.extend(hit);
                    return Ok(out);
                }
                cache.first()
            };
            // Below the cache everything is in RocksDB (an entry leaves the cache once
            // written); the rest of a whole range is read from the cache in the next round.
            let (disk_end, rest) = match first_cached {
                Some(f) if whole && from < f && in_end(end, f) => (Bound::Excluded(f), Some(f)),
                _ => (end, None),
            };
            let db = self.db.clone();
            let disk = self
                .reader
                .run(move || read_range(&db, from, disk_end, budget, whole))
                .await
                .map_err(other)??;
            out.extend(disk);
            match rest {
                Some(first) => from = first,
                None => return Ok(out),
            }
        }
    }

    fn get_json<T: serde::de::DeserializeOwned>(db: &DB, key: &[u8]) -> io::Result<Option<T>> {
        let cf = db
            .cf_handle(CF_STATE)
            .ok_or_else(|| other("missing state cf"))?;
        match db.get_cf(&cf, key).map_err(other)? {
            None => Ok(None),
            // A value that does not decode is corruption, never "absent".
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("corrupt {}: {e}", String::from_utf8_lossy(key)),
                )
            }),
        }
    }

    fn put_json<T: serde::Serialize>(db: &DB, key: &[u8], v: &T, sync: bool) -> io::Result<()> {
        let cf = db
            .cf_handle(CF_STATE)
            .ok_or_else(|| other("missing state cf"))?;
        let bytes = serde_json::to_vec(v).map_err(other)?;
        let opts = if sync {
            synced()
        } else {
            WriteOptions::default()
        };
        db.put_cf_opt(&cf, key, bytes, &opts).map_err(other)
    }
}

/// Leaves the log writing into a WAL file that was written full before (rule 5): fills the
/// current WAL with [`WAL_PREWRITE_BYTES`] of throwaway values (deleted again), flushes so
/// that WAL is obsolete and kept for reuse, then rolls over once more so the next WAL is that
/// file. RocksDB reuses
/// only files of the current open, so this runs on every open (about 12 MiB written, tens of
/// milliseconds).
fn prewrite_wal(db: &DB) -> anyhow::Result<()> {
    let cf = db
        .cf_handle(CF_STATE)
        .ok_or_else(|| anyhow::anyhow!("missing state cf"))?;
    let chunk = vec![0u8; 1 << 20];
    let keys: Vec<String> = (0..WAL_PREWRITE_BYTES / chunk.len())
        .map(|i| format!("{KEY_PREWRITE}/{i}"))
        .collect();
    for key in &keys {
        db.put_cf(&cf, key, &chunk)?;
    }
    for key in &keys {
        db.delete_cf(&cf, key)?;
    }
    // On disk with its size, so the first synced write later has only its own blocks to flush.
    db.flush_wal(true)?;
    // Rolls over to a new WAL; the filled one is obsolete once flushed, and kept.
    db.flush_cf(&cf)?;
    // Something to flush, so this rolls over too: to the filled file.
    db.put_cf(&cf, KEY_PREWRITE, b"")?;
    db.flush_cf(&cf)?;
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reports appends written before a synced write (or a failed one) (rule 1).
fn report(flushes: &mut Vec<Flush>, result: &Result<(), String>) {
    for f in flushes.drain(..) {
        match result {
            Ok(()) => {
                STAGES.since(Stage::LogAppend, f.started);
                f.callback.io_completed(Ok(()));
            }
            Err(e) => f
                .callback
                .io_completed(Err(other(format!("cannot write the Raft log: {e}")))),
        }
    }
}

fn bound_start(b: Bound<&u64>) -> u64 {
    match b {
        Bound::Included(&i) => i,
        Bound::Excluded(&i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    }
}

fn in_end(b: Bound<u64>, i: u64) -> bool {
    match b {
        Bound::Included(e) => i <= e,
        Bound::Excluded(e) => i < e,
        Bound::Unbounded => true,
    }
}

/// Reads entries from RocksDB: see [`LogStore::read_entries`].
fn read_range(
    db: &DB,
    start: u64,
    end: Bound<u64>,
    budget: usize,
    whole: bool,
) -> io::Result<Vec<Entry>> {
    let cf = db
        .cf_handle(CF_LOGS)
        .ok_or_else(|| other("missing logs cf"))?;
    let mut out = Vec::new();
    let mut bytes = 0;
    let key = start.to_be_bytes();
    for item in db.iterator_cf(&cf, IteratorMode::From(&key, Direction::Forward)) {
        let (k, v) = item.map_err(other)?;
        let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(other)?);
        if !in_end(end, idx) || (!whole && !out.is_empty() && bytes + v.len() > budget) {
            break;
        }
        bytes += v.len();
        out.push(serde_json::from_slice::<Entry>(&v).map_err(other)?);
    }
    Ok(out)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let start = bound_start(range.start_bound());
        let end = range.end_bound().cloned();
        self.read_entries(start, end, usize::MAX, true).await
    }

    /// What replication sends in one AppendEntries: at most [`MAX_APPEND_BYTES`].
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        self.read_entries(start, Bound::Excluded(end), MAX_APPEND_BYTES, false)
            .await
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        Ok(*lock(&self.vote))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        self.run(|db| {
            let purged: Option<LogId> = Self::get_json(db, KEY_PURGED)?;
            let cf = db
                .cf_handle(CF_LOGS)
                .ok_or_else(|| other("missing logs cf"))?;
            let last = match db.iterator_cf(&cf, IteratorMode::End).next() {
                None => purged,
                Some(item) => {
                    let (_, v) = item.map_err(other)?;
                    Some(serde_json::from_slice::<Entry>(&v).map_err(other)?.log_id)
                }
            };
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id: last,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    // The committed index is not saved (openraft's default): the state machine keeps its
    // applied id in the same transaction as the state, so a restart resumes from there and
    // learns the commit index from the leader. Saving it cost a hop to the log thread before
    // every apply, behind any write there.

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let vote = *vote;
        let memory = self.vote.clone();
        self.run(move |db| {
            Self::put_json(db, KEY_VOTE, &vote, true)?;
            *lock(&memory) = Some(vote);
            Ok(())
        })
        .await
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let started = Instant::now();
        let entries: Vec<(Arc<Entry>, usize)> = entries
            .into_iter()
            .map(|e| {
                let n = entry_len(&e);
                (Arc::new(e), n)
            })
            .collect();
        let Some(last) = entries.last().map(|(e, _)| e.log_id.index) else {
            callback.io_completed(Ok(()));
            return Ok(());
        };
        // Readable now (rule 1); written and synced behind the caller's back.
        let written: Vec<Arc<Entry>> = entries.iter().map(|(e, _)| e.clone()).collect();
        self.cache().push(entries);
        let db = self.db.clone();
        let cache = self.cache.clone();
        let queued = self.appends_queued.clone();
        let unsynced = self.unsynced.clone();
        let write = move || {
            queued.fetch_sub(1, Ordering::SeqCst);
            let mut waiting = lock(&unsynced);
            waiting.push(Flush { callback, started });
            // The last append in line syncs, for itself and those written before it.
            let sync = queued.load(Ordering::SeqCst) == 0;
            let result = (|| {
                let cf = db
                    .cf_handle(CF_LOGS)
                    .ok_or_else(|| other("missing logs cf"))?;
                let mut batch = WriteBatch::default();
                for e in &written {
                    let v = serde_json::to_vec(&**e).map_err(other)?;
                    batch.put_cf(&cf, e.log_id.index.to_be_bytes(), &v);
                }
                let opts = if sync {
                    synced()
                } else {
                    WriteOptions::default()
                };
                db.write_opt(batch, &opts).map_err(other)
            })();
            match result {
                Ok(()) => {
                    lock(&cache).written(last);
                    if sync {
                        report(&mut waiting, &Ok(()));
                    }
                }
                // Nothing written after this batch may count: fail it and those waiting.
                Err(e) => report(&mut waiting, &Err(e.to_string())),
            }
        };
        self.appends_queued.fetch_add(1, Ordering::SeqCst);
        self.writer.send(write).map_err(other)
    }

    async fn truncate_after(&mut self, last: Option<LogId>) -> io::Result<()> {
        let from = last.map_or(0, |l| l.index + 1);
        let cache = self.cache.clone();
        // On the writer thread, after the writes before it (rule 4).
        self.run(move |db| {
            lock(&cache).truncate(from);
            let cf = db
                .cf_handle(CF_LOGS)
                .ok_or_else(|| other("missing logs cf"))?;
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(&cf, from.to_be_bytes(), u64::MAX.to_be_bytes());
            batch.delete_cf(&cf, u64::MAX.to_be_bytes());
            db.write_opt(batch, &synced()).map_err(other)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        self.cache().purge(log_id.index);
        self.run(move |db| {
            // 1. Record the purge point; 2. then delete, so a crash in between only leaves
            //    entries that are already covered by the snapshot.
            Self::put_json(db, KEY_PURGED, &log_id, true)?;
            let cf = db
                .cf_handle(CF_LOGS)
                .ok_or_else(|| other("missing logs cf"))?;
            db.delete_range_cf(&cf, 0u64.to_be_bytes(), (log_id.index + 1).to_be_bytes())
                .map_err(other)
        })
        .await
    }
}

/// The node id stored in the log database, if this node has one.
pub fn read_node_id(store: &LogStore) -> io::Result<Option<NodeId>> {
    LogStore::get_json(&store.db, b"node_id")
}

/// Persists this node's id (synced).
pub fn write_node_id(store: &LogStore, id: NodeId) -> io::Result<()> {
    LogStore::put_json(&store.db, b"node_id", &id, true)
}

/// The cluster id this node belongs to, if it knows one yet.
pub fn read_cluster_id(store: &LogStore) -> io::Result<Option<String>> {
    LogStore::get_json(&store.db, b"cluster_id")
}

/// Persists the cluster id this node belongs to (synced).
pub fn write_cluster_id(store: &LogStore, id: &str) -> io::Result<()> {
    LogStore::put_json(&store.db, b"cluster_id", &id, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::LeaderId;
    use openraft::vote::RaftLeaderId;
    use openraft::EntryPayload;

    fn entry(index: u64) -> (Arc<Entry>, usize) {
        let e = Entry {
            log_id: LogId::new(LeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        };
        (Arc::new(e), 100)
    }

    fn indexes(got: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        got.map(|v| v.iter().map(|e| e.log_id.index).collect())
    }

    /// The WAL files in `dir`, oldest first, with their sizes.
    fn wal_files(dir: &Path) -> Vec<(String, u64)> {
        let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                (name, e.metadata().unwrap().len())
            })
            .collect();
        files.sort();
        files
    }

    /// Appends `n` entries from `first`, one synced append at a time, as Raft does.
    async fn append_synced(store: &mut LogStore, first: u64, n: u64) {
        for index in first..first + n {
            let (tx, rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
            let e = Entry::clone(&entry(index).0);
            store.append([e], IOFlushed::signal(tx)).await.unwrap();
            rx.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn synced_appends_write_over_a_wal_file_written_before() {
        let dir = tempfile::tempdir().unwrap();
        // A new log and a reopened one (RocksDB reuses only files of its current open).
        for (round, first) in [(0, 1), (1, 2001)] {
            let mut store = LogStore::open(dir.path()).unwrap();
            let (current, size) = wal_files(dir.path()).pop().unwrap();
            assert!(
                size >= WAL_PREWRITE_BYTES as u64,
                "round {round}: the log writes to {current} of {size} bytes, not to a file \
                 written before"
            );
            append_synced(&mut store, first, 2000).await;
            assert_eq!(
                wal_files(dir.path()).pop(),
                Some((current.clone(), size)),
                "round {round}: the synced appends grew the WAL instead of writing over it"
            );
            let read = store
                .try_get_log_entries(1..first + 2000)
                .await
                .unwrap()
                .len();
            assert_eq!(read as u64, first + 1999, "round {round}");
            // The last append's job (holding the database) is gone once a later one ran.
            store.writer.run(|| ()).await.unwrap();
        }
    }

    #[test]
    fn the_cache_follows_appends_truncations_and_purges_within_its_budget() {
        let mut c = EntryCache::default();
        c.push((1..=5).map(entry).collect());
        let all = |c: &EntryCache, start| indexes(c.get(start, Bound::Unbounded, usize::MAX, true));
        assert_eq!(all(&c, 2), Some(vec![2, 3, 4, 5]));
        // A byte budget stops early but always returns one entry.
        let limited = c.get(2, Bound::Excluded(6), 250, false);
        assert_eq!(indexes(limited), Some(vec![2, 3]));
        assert_eq!(
            indexes(c.get(2, Bound::Excluded(6), 10, false)),
            Some(vec![2])
        );
        // A whole range reaching past the cache is read from disk.
        assert_eq!(
            indexes(c.get(2, Bound::Included(9), usize::MAX, true)),
            None
        );
        c.truncate(4);
        assert_eq!(all(&c, 1), Some(vec![1, 2, 3]));
        c.push(vec![entry(4)]);
        c.purge(2);
        assert_eq!(all(&c, 3), Some(vec![3, 4]));
        assert_eq!(all(&c, 2), None, "purged entries are not served");
        assert_eq!(c.bytes, 200);
        // A gap (a snapshot installed, entries from elsewhere) starts the cache afresh.
        c.push(vec![entry(10)]);
        assert_eq!(all(&c, 3), None);
        assert_eq!(all(&c, 10), Some(vec![10]));
        assert_eq!(c.bytes, 100);
    }

    #[test]
    fn entries_not_yet_written_stay_in_the_cache_whatever_its_budget() {
        let mut c = EntryCache::default();
        let n = CACHE_ENTRIES as u64 + 100;
        c.push((1..=n).map(entry).collect());
        assert_eq!(c.entries.len() as u64, n, "nothing is written yet");
        c.written(50);
        assert_eq!(c.first(), Some(51), "only written entries leave");
        c.written(n);
        assert_eq!(c.entries.len(), CACHE_ENTRIES);
        assert_eq!(c.first(), Some(101));
        // A truncation takes back what was written after it.
        c.truncate(n - 10);
        assert_eq!(c.written, Some(n - 11));
    }
}
