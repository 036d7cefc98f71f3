//! The Raft log and vote in their own RocksDB database.
//!
//! Ordering rules:
//! 1. `append` writes the entries in one batch with the WAL synced; only after that write
//!    returns does it call the flush callback, so openraft never counts an entry as persisted
//!    before it is on disk.
//! 2. `save_vote` writes with the WAL synced before it returns.
//! 3. `truncate` and `purge` are synced too: a truncated suffix must never reappear.
//!
//! All RocksDB calls run on the blocking pool, never on the async workers.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, RaftLogReader, StorageIOError};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

use super::types::{Entry, LogId, NodeId, StorageError, TypeConfig, Vote};

const CF_LOGS: &str = "logs";
const CF_STATE: &str = "state";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";

/// The Raft log store. Cheap to clone; clones share the database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
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
    pub fn open(path: &Path) -> Result<LogStore, rocksdb::Error> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        let cfs = [CF_LOGS, CF_STATE].map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        Ok(LogStore { db: Arc::new(db) })
    }

    async fn run<T, F>(&self, f: F) -> Result<T, AnyError>
    where
        T: Send + 'static,
        F: FnOnce(&DB) -> Result<T, AnyError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(io_err)?
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

fn in_end(b: Bound<&u64>, i: u64) -> bool {
    match b {
        Bound::Included(&e) => i <= e,
        Bound::Excluded(&e) => i < e,
        Bound::Unbounded => true,
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = bound_start(range.start_bound());
        let end = range.end_bound().cloned();
        self.run(move |db| {
            let cf = db
                .cf_handle(CF_LOGS)
                .ok_or_else(|| io_err("missing logs cf"))?;
            let mut out = Vec::new();
            let key = start.to_be_bytes();
            for item in db.iterator_cf(&cf, IteratorMode::From(&key, Direction::Forward)) {
                let (k, v) = item.map_err(io_err)?;
                let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(io_err)?);
                if !in_end(end.as_ref(), idx) {
                    break;
                }
                out.push(serde_json::from_slice::<Entry>(&v).map_err(io_err)?);
            }
            Ok(out)
        })
        .await
        .map_err(|e| StorageIOError::read_logs(e).into())
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
        let mut batch = WriteBatch::default();
        let cf = self
            .db
            .cf_handle(CF_LOGS)
            .ok_or_else(|| StorageIOError::write_logs(io_err("missing logs cf")))?;
        for e in entries {
            let v =
                serde_json::to_vec(&e).map_err(|err| StorageIOError::write_logs(io_err(err)))?;
            batch.put_cf(&cf, e.log_id.index.to_be_bytes(), v);
        }
        // 1. Write with the WAL synced; 2. only then report the entries flushed.
        let db = self.db.clone();
        let result = tokio::task::spawn_blocking(move || db.write_opt(batch, &synced()))
            .await
            .map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(io_err(e)).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.run(move |db| {
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
