//! The Raft log and vote in their own RocksDB database.
//!
//! Ordering rules:
//! 1. `append` writes the entries in one batch with the WAL synced; only after that write
//!    returns does it call the flush callback, so openraft never counts an entry as persisted
//!    before it is on disk.
//! 2. `save_vote` writes with the WAL synced before it returns.
//! 3. `truncate` and `purge` are synced too: a truncated suffix must never reappear.
//!
//! RocksDB calls run on threads of the log's own ([`IoThread`]), never on the async workers
//! or in the blocking pool client reads use: writes and state reads on `raft-log`, entry
//! reads that miss the cache on `raft-log-read`.
//!
//! The newest entries are also kept in memory ([`EntryCache`], bounded in entries and
//! bytes), so replication reads what was just appended without a disk read or a thread hop.
//! Replication reads are bounded in bytes ([`MAX_APPEND_BYTES`]): openraft sends what a read
//! returns as one AppendEntries request, and that must arrive within its timeout.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, RaftLogReader, StorageIOError};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

use super::io::IoThread;
use super::types::{Entry, LogId, NodeId, StorageError, TypeConfig, Vote};
use crate::stages::{Stage, STAGES};

/// Most bytes of entries one replication read returns (at least one entry): what one
/// AppendEntries request carries.
pub const MAX_APPEND_BYTES: usize = 1 << 20;
/// Newest entries kept in memory, in entries and in bytes (as stored).
const CACHE_ENTRIES: usize = 16_384;
const CACHE_BYTES: usize = 64 << 20;

const CF_LOGS: &str = "logs";
const CF_STATE: &str = "state";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";

/// The Raft log store. Cheap to clone; clones share the database, threads and cache.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    writer: Arc<IoThread>,
    reader: Arc<IoThread>,
    cache: Arc<Mutex<EntryCache>>,
}

/// The newest contiguous entries with their stored sizes, oldest first.
#[derive(Default)]
struct EntryCache {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl EntryCache {
    fn index_of(e: &(Entry, usize)) -> u64 {
        e.0.log_id.index
    }

    /// Adds entries just written; a gap before them (a restart, a snapshot) starts afresh.
    fn push(&mut self, written: Vec<(Entry, usize)>) {
        let Some(first) = written.first().map(Self::index_of) else {
            return;
        };
        if self.entries.back().map(Self::index_of) != first.checked_sub(1) {
            self.entries.clear();
            self.bytes = 0;
        }
        for e in written {
            self.bytes += e.1;
            self.entries.push_back(e);
        }
        while self.entries.len() > CACHE_ENTRIES || self.bytes > CACHE_BYTES {
            let Some((_, n)) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= n;
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
        let first = self.entries.front().map(Self::index_of)?;
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
            out.push(entry.clone());
        }
        Some(out)
    }
}

fn io_err(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
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
        let cfs = [CF_LOGS, CF_STATE].map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        let thread = |name| {
            IoThread::spawn(name)
                .map(Arc::new)
                .map_err(|e| anyhow::anyhow!("cannot start thread {name}: {e}"))
        };
        Ok(LogStore {
            db: Arc::new(db),
            writer: thread("raft-log")?,
            reader: thread("raft-log-read")?,
            cache: Arc::default(),
        })
    }

    /// Runs `f` on the log's writer thread.
    async fn run<T, F>(&self, f: F) -> Result<T, AnyError>
    where
        T: Send + 'static,
        F: FnOnce(&DB) -> Result<T, AnyError> + Send + 'static,
    {
        let db = self.db.clone();
        self.writer.run(move || f(&db)).await.map_err(io_err)?
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, EntryCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries from `start` within `end`: from the cache when it holds them, else from
    /// RocksDB on the reader thread; at most `budget` bytes (at least one entry) unless
    /// `whole`, which returns the whole range.
    async fn read_entries(
        &self,
        start: u64,
        end: Bound<u64>,
        budget: usize,
        whole: bool,
    ) -> Result<Vec<Entry>, StorageError> {
        if let Some(hit) = self.cache().get(start, end, budget, whole) {
            return Ok(hit);
        }
        let db = self.db.clone();
        self.reader
            .run(move || read_range(&db, start, end, budget, whole))
            .await
            .map_err(io_err)
            .and_then(|r| r)
            .map_err(|e| StorageIOError::read_logs(e).into())
    }

    fn get_json<T: serde::de::DeserializeOwned>(
        db: &DB,
        key: &[u8],
    ) -> Result<Option<T>, AnyError> {
        let cf = db
            .cf_handle(CF_STATE)
            .ok_or_else(|| io_err("missing state cf"))?;
        match db.get_cf(&cf, key).map_err(io_err)? {
            None => Ok(None),
            // A value that does not decode is corruption, never "absent".
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| io_err(format!("corrupt {}: {e}", String::from_utf8_lossy(key)))),
        }
    }

    fn put_json<T: serde::Serialize>(
        db: &DB,
        key: &[u8],
        v: &T,
        sync: bool,
    ) -> Result<(), AnyError> {
        let cf = db
            .cf_handle(CF_STATE)
            .ok_or_else(|| io_err("missing state cf"))?;
        let bytes = serde_json::to_vec(v).map_err(io_err)?;
        let opts = if sync {
            synced()
        } else {
            WriteOptions::default()
        };
        db.put_cf_opt(&cf, key, bytes, &opts).map_err(io_err)
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
) -> Result<Vec<Entry>, AnyError> {
    let cf = db
        .cf_handle(CF_LOGS)
        .ok_or_else(|| io_err("missing logs cf"))?;
    let mut out = Vec::new();
    let mut bytes = 0;
    let key = start.to_be_bytes();
    for item in db.iterator_cf(&cf, IteratorMode::From(&key, Direction::Forward)) {
        let (k, v) = item.map_err(io_err)?;
        let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(io_err)?);
        if !in_end(end, idx) || (!whole && !out.is_empty() && bytes + v.len() > budget) {
            break;
        }
        bytes += v.len();
        out.push(serde_json::from_slice::<Entry>(&v).map_err(io_err)?);
    }
    Ok(out)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = bound_start(range.start_bound());
        let end = range.end_bound().cloned();
        self.read_entries(start, end, usize::MAX, true).await
    }

    /// What replication sends in one AppendEntries: at most [`MAX_APPEND_BYTES`].
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        self.read_entries(start, Bound::Excluded(end), MAX_APPEND_BYTES, false)
            .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.run(|db| {
            let purged: Option<LogId> = Self::get_json(db, KEY_PURGED)?;
            let cf = db
                .cf_handle(CF_LOGS)
                .ok_or_else(|| io_err("missing logs cf"))?;
            let last = match db.iterator_cf(&cf, IteratorMode::End).next() {
                None => purged,
                Some(item) => {
                    let (_, v) = item.map_err(io_err)?;
                    Some(serde_json::from_slice::<Entry>(&v).map_err(io_err)?.log_id)
                }
            };
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id: last,
            })
        })
        .await
        .map_err(|e| StorageIOError::read_logs(e).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.run(move |db| Self::put_json(db, KEY_VOTE, &vote, true))
            .await
            .map_err(|e| StorageIOError::write_vote(e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.run(|db| Self::get_json(db, KEY_VOTE))
            .await
            .map_err(|e| StorageIOError::read_vote(e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: a lost committed index is recomputed by the leader.
        self.run(move |db| Self::put_json(db, KEY_COMMITTED, &committed, false))
            .await
            .map_err(|e| StorageIOError::write(e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.run(|db| Ok(Self::get_json::<Option<LogId>>(db, KEY_COMMITTED)?.flatten()))
            .await
            .map_err(|e| StorageIOError::read(e).into())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let db = self.db.clone();
        let cache = self.cache.clone();
        // Encoding, the synced write, the cache and the callback all run on the log thread.
        let write = move || -> Result<(), AnyError> {
            let started = Instant::now();
            let cf = db
                .cf_handle(CF_LOGS)
                .ok_or_else(|| io_err("missing logs cf"))?;
            let mut batch = WriteBatch::default();
            let mut written = Vec::with_capacity(entries.len());
            for e in entries {
                let v = serde_json::to_vec(&e).map_err(io_err)?;
                batch.put_cf(&cf, e.log_id.index.to_be_bytes(), &v);
                written.push((e, v.len()));
            }
            // 1. Write with the WAL synced; 2. only then report the entries flushed.
            db.write_opt(batch, &synced()).map_err(io_err)?;
            STAGES.since(Stage::LogAppend, started);
            cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(written);
            Ok(())
        };
        let result = self.writer.run(write).await.map_err(io_err).and_then(|r| r);
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let cache = self.cache.clone();
        self.run(move |db| {
            cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .truncate(log_id.index);
            let cf = db
                .cf_handle(CF_LOGS)
                .ok_or_else(|| io_err("missing logs cf"))?;
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(&cf, log_id.index.to_be_bytes(), u64::MAX.to_be_bytes());
            batch.delete_cf(&cf, u64::MAX.to_be_bytes());
            db.write_opt(batch, &synced()).map_err(io_err)
        })
        .await
        .map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.cache().purge(log_id.index);
        self.run(move |db| {
            // 1. Record the purge point; 2. then delete, so a crash in between only leaves
            //    entries that are already covered by the snapshot.
            Self::put_json(db, KEY_PURGED, &log_id, true)?;
            let cf = db
                .cf_handle(CF_LOGS)
                .ok_or_else(|| io_err("missing logs cf"))?;
            db.delete_range_cf(&cf, 0u64.to_be_bytes(), (log_id.index + 1).to_be_bytes())
                .map_err(io_err)
        })
        .await
        .map_err(|e| StorageIOError::write_logs(e).into())
    }
}

/// The node id stored in the log database, if this node has one.
pub fn read_node_id(store: &LogStore) -> Result<Option<NodeId>, AnyError> {
    LogStore::get_json(&store.db, b"node_id")
}

/// Persists this node's id (synced).
pub fn write_node_id(store: &LogStore, id: NodeId) -> Result<(), AnyError> {
    LogStore::put_json(&store.db, b"node_id", &id, true)
}

/// The cluster id this node belongs to, if it knows one yet.
pub fn read_cluster_id(store: &LogStore) -> Result<Option<String>, AnyError> {
    LogStore::get_json(&store.db, b"cluster_id")
}

/// Persists the cluster id this node belongs to (synced).
pub fn write_cluster_id(store: &LogStore, id: &str) -> Result<(), AnyError> {
    LogStore::put_json(&store.db, b"cluster_id", &id, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64) -> (Entry, usize) {
        let e = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        };
        (e, 100)
    }

    fn indexes(got: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        got.map(|v| v.iter().map(|e| e.log_id.index).collect())
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
}
