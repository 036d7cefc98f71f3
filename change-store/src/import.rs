//! Importing a checkpoint: the whole state is rebuilt in a new generation, in bounded write
//! batches, then swapped in.
//!
//! Ordering rules:
//! 1. Read and apply every line into a new generation beside the live one; readers keep
//!    reading the live one meanwhile.
//! 2. The file must end with its trailer and every count must match; otherwise the new
//!    generation is removed and the live state stays as it was.
//! 3. Sync the new generation's WAL, then name it in `ACTIVE` (see `db`'s swap rules).
//! 4. Then point readers at it, reload the in-memory mirrors and wake long-polls; the old
//!    generation is removed once its last reader is done.

use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use changeagent_proto::checkpoint::{record_id, Header, Internal, Line, LineReader, Trailer};
use changeagent_proto::Manifest;

use crate::db;
use crate::error::{Error, Result};
use crate::store::{Current, Store};

/// Records per write batch of an import: large enough to amortize a write, small enough that
/// a batch of big changes stays within [`IMPORT_BATCH_BYTES`].
const IMPORT_BATCH_RECORDS: usize = 10_000;
/// Bytes of record lines per write batch, so memory stays bounded whatever the changes' size.
const IMPORT_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// How often a long import reports progress in the log.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Which parts of a checkpoint become what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportMode {
    /// A Raft snapshot: the state line, internal lines and owner values are restored, and
    /// records from the first index on form the list.
    Raft,
    /// Every record joins the list (a checkpointer's copy, which keeps everything a
    /// checkpoint holds).
    Everything,
    /// Only catalog and keyed state; the list starts empty after the checkpoint's index (a
    /// cluster restored from a checkpoint).
    StateOnly,
}

/// What a replica (an edge) imports besides a checkpoint, so that its list starts where its
/// upstream's does: see [`Store::import_replica`].
pub struct Replica<'a> {
    /// The upstream's retained changes up to the checkpoint's index, one wire JSON per line,
    /// in `_id` order, without gaps; empty when the upstream retains nothing before it.
    pub retained: &'a mut dyn BufRead,
    /// The checkpoints the upstream keeps.
    pub manifests: &'a [Manifest],
    /// The upstream's cluster id.
    pub cluster_id: &'a str,
}

/// What an import read.
#[derive(Debug, Clone)]
pub struct Imported {
    pub header: Header,
    pub trailer: Trailer,
}

impl Store {
    /// Replaces the whole state with the checkpoint read from `input` (compressed bytes),
    /// together with the owner's values `owner` (name → bytes, e.g. a Raft snapshot's log
    /// id). See the module docs for the order; on any error the state stays as it was.
    pub fn import(
        &self,
        input: impl Read,
        mode: ImportMode,
        owner: &[(&str, &[u8])],
    ) -> Result<Imported> {
        self.import_into_new_generation(input, mode, owner, None)
    }

    /// Replaces the whole state with a replica of an upstream: the catalog and keyed state of
    /// the checkpoint read from `input`, and a list holding `replica.retained` (the upstream's
    /// changes from its first index up to the checkpoint's index, written to the list only)
    /// followed by what the replica applies next. The list's first index is the first
    /// retained change's `_id` (the checkpoint's index + 1 when none). Like
    /// [`Store::import`], all or nothing.
    pub fn import_replica(&self, input: impl Read, replica: Replica<'_>) -> Result<Imported> {
        self.import_into_new_generation(input, ImportMode::StateOnly, &[], Some(replica))
    }

    fn import_into_new_generation(
        &self,
        input: impl Read,
        mode: ImportMode,
        owner: &[(&str, &[u8])],
        replica: Option<Replica<'_>>,
    ) -> Result<Imported> {
        let fresh = Store::over(
            self.path().to_path_buf(),
            db::create_generation(self.path())?,
        )?;
        match build(&fresh, input, mode, owner, replica) {
            Ok(imported) => {
                self.swap_in(fresh)?;
                Ok(imported)
            }
            Err(e) => {
                fresh.db().retire();
                Err(e)
            }
        }
    }

    /// Makes `fresh`'s generation the live one (rules 3 and 4).
    fn swap_in(&self, fresh: Store) -> Result<()> {
        let (db, state) = {
            let c = fresh.current.read().unwrap_or_else(|p| p.into_inner());
            (c.db.clone(), c.state.clone())
        };
        let catalog = fresh.catalog_guard().clone();
        // Waits for the fresh store's own background work, which holds the generation.
        drop(fresh);
        db.db.flush_wal(true)?;
        db::write_active(self.path(), &db.name())?;
        let last_id = state.last_id;
        // The cache holds the old generation's changes: empty it first, so readers of the new
        // state never answer from it (they read RocksDB until new changes arrive).
        self.feed.clear();
        let old = {
            let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
            *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = catalog;
            std::mem::replace(&mut *current, Current { db, state })
        };
        old.db.retire();
        self.publish(last_id, true);
        Ok(())
    }
}

/// Rule 1 and 2: reads the checkpoint into the new generation's store.
fn build(
    fresh: &Store,
    input: impl Read,
    mode: ImportMode,
    owner: &[(&str, &[u8])],
    replica: Option<Replica<'_>>,
) -> Result<Imported> {
    let decoder = zstd::Decoder::new(input)?;
    let mut lines = LineReader::new(BufReader::with_capacity(1 << 16, decoder))
        .map_err(|e| Error::Checkpoint(e.to_string()))?;
    let header = lines.header().clone();
    let mut first_index = match mode {
        ImportMode::Raft | ImportMode::Everything => 1,
        ImportMode::StateOnly => header.index + 1,
    };
    let started = Instant::now();
    let mut last_report = started;
    let mut records = 0u64;
    let mut txn = fresh.begin();
    if let (Some(id), false) = (&header.cluster_id, mode == ImportMode::StateOnly) {
        txn.set_cluster_id(id)?;
    }
    let (mut batch_records, mut batch_bytes) = (0usize, 0usize);
    let trailer = loop {
        let line = lines
            .next_line()
            .map_err(|e| Error::Checkpoint(e.to_string()))?;
        match line {
            None => return Err(Error::Checkpoint("the checkpoint has no trailer".into())),
            Some(Line::Header(_)) => {}
            Some(Line::Trailer(t)) => break t,
            Some(Line::Record(json)) => {
                let id = changeagent_proto::checkpoint::record_id(json).unwrap_or(0);
                let list = match mode {
                    ImportMode::Raft => id >= first_index,
                    ImportMode::Everything => true,
                    ImportMode::StateOnly => false,
                };
                txn.apply_record(json, list)?;
                records += 1;
                batch_records += 1;
                batch_bytes += json.len();
            }
            Some(Line::Internal(line)) if mode == ImportMode::Raft => match line {
                Internal::State {
                    first_index: f,
                    last_ts,
                    next_tenant_id,
                    next_collection_id,
                } => {
                    first_index = f;
                    txn.set_scalars(f, last_ts, next_tenant_id, next_collection_id);
                }
                Internal::Idempotency { key, ts, answer } => {
                    txn.remember_idempotent(&key, ts, answer.into_bytes())?
                }
                Internal::Manifest { manifest } => txn.put_manifest(&manifest)?,
                Internal::OpenStart { start } => txn.put_open_start(&start)?,
            },
            Some(Line::Internal(_)) => {}
        }
        if batch_records >= IMPORT_BATCH_RECORDS || batch_bytes >= IMPORT_BATCH_BYTES {
            fresh.commit(txn)?;
            txn = fresh.begin();
            (batch_records, batch_bytes) = (0, 0);
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                tracing::info!(
                    index = header.index,
                    records,
                    records_per_sec = (records as f64 / started.elapsed().as_secs_f64()) as u64,
                    "importing a checkpoint"
                );
            }
        }
    };
    if mode == ImportMode::Raft {
        for (name, value) in &trailer.owner {
            txn.put_owner_meta(name, value.to_string().as_bytes())?;
        }
    }
    for (name, value) in owner {
        txn.put_owner_meta(name, value)?;
    }
    if let Some(replica) = replica {
        fresh.commit(txn)?;
        first_index = backfill(fresh, &header, replica.retained)?;
        txn = fresh.begin();
        txn.set_manifests(replica.manifests)?;
        txn.set_cluster_id(replica.cluster_id)?;
    }
    txn.set_range(first_index, header.index);
    fresh.commit(txn)?;
    fresh.db().floor.store(first_index, Ordering::Release);
    tracing::info!(
        index = header.index,
        records,
        seconds = started.elapsed().as_secs_f64(),
        "imported a checkpoint"
    );
    Ok(Imported { header, trailer })
}

/// Writes a replica's retained changes (see [`Replica::retained`]) into the list only, in
/// bounded batches; returns the list's first index.
fn backfill(fresh: &Store, header: &Header, retained: &mut dyn BufRead) -> Result<u64> {
    let mut first = None;
    let mut previous = 0;
    let mut line = Vec::new();
    let mut txn = fresh.begin();
    let (mut batch_records, mut batch_bytes) = (0usize, 0usize);
    loop {
        line.clear();
        if retained.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let json = line.strip_suffix(b"\n").unwrap_or(&line);
        if json.is_empty() {
            continue;
        }
        let id = record_id(json).unwrap_or(0);
        let expected = previous + 1;
        if first.is_some() && id != expected || id == 0 || id > header.index {
            return Err(Error::Checkpoint(format!(
                "the retained changes before checkpoint {} are not a run of _ids ending at it: \
                 {id} after {previous}",
                header.index
            )));
        }
        first.get_or_insert(id);
        txn.backfill_record(json)?;
        previous = id;
        batch_records += 1;
        batch_bytes += json.len();
        if batch_records >= IMPORT_BATCH_RECORDS || batch_bytes >= IMPORT_BATCH_BYTES {
            fresh.commit(txn)?;
            txn = fresh.begin();
            (batch_records, batch_bytes) = (0, 0);
        }
    }
    fresh.commit(txn)?;
    match first {
        None => Ok(header.index + 1),
        Some(f) if previous == header.index => Ok(f),
        Some(_) => Err(Error::Checkpoint(format!(
            "the retained changes end at {previous}, not at checkpoint {}",
            header.index
        ))),
    }
}
