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

use std::io::{BufReader, Read};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use changeagent_proto::checkpoint::{Header, Internal, Line, LineReader, Trailer};

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
        let fresh = Store::over(
            self.path().to_path_buf(),
            db::create_generation(self.path())?,
        )?;
        match build(&fresh, input, mode, owner) {
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
