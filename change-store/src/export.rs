//! Exporting the state as a checkpoint: zstd JSON Lines in one pass and constant memory (see
//! `changeagent_proto::checkpoint` for the lines).
//!
//! Records come in `_id` order from three sources merged as they are read: the catalog
//! records, the list (changes without a key, or every retained change for a Raft snapshot),
//! and the keyed state walked by `_id`. No set of keys is ever held in memory.
//!
//! Ordering rules:
//! 1. Take the RocksDB snapshot first.
//! 2. Then sync the WAL: everything the snapshot holds is durable before a Raft snapshot of
//!    it lets openraft purge the log behind it.
//! 3. Then ask the caller whether to go on with the snapshot's index (a checkpointer
//!    registers its start at that index first).
//! 4. Then stream the lines.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::time::{Duration, Instant};

use changeagent_proto::checkpoint::{record_id, Header, Internal, OpenStart, Trailer};
use changeagent_proto::types::{internal_type, CollectionRecord, TenantRecord};
use changeagent_proto::{Manifest, Scope};
use rocksdb::{DBRawIteratorWithThreadMode, SnapshotWithThreadMode, DB};

use crate::error::{Error, Result};
use crate::layout::{self, cf, meta};
use crate::record::StoredChange;
use crate::store::{catalog_record_data, Store};

/// zstd level: level 3 is zstd's default, a good ratio at well over 100 MB/s.
const ZSTD_LEVEL: i32 = 3;
/// How often a long export reports progress in the log.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What to export.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Everything, or one tenant's catalog, keys and changes.
    pub scope: Scope,
    /// A Raft snapshot: every retained change (keyed ones too), the internal lines and the
    /// owner's values, so an install restores exactly this state.
    pub raft: bool,
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub header: Header,
    pub trailer: Trailer,
    /// Bytes of the lines before compression.
    pub raw_bytes: u64,
}

type Snap<'a> = SnapshotWithThreadMode<'a, DB>;

fn snap_u64(snap: &Snap<'_>, family: &rocksdb::ColumnFamily, key: &[u8]) -> Result<Option<u64>> {
    match snap.get_cf(family, key)? {
        None => Ok(None),
        Some(v) => layout::decode_u64(&v)
            .map(Some)
            .ok_or_else(|| Error::corrupt("meta", String::from_utf8_lossy(key))),
    }
}

/// Counts the bytes written through it.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Store {
    /// Exports the state as a checkpoint into `out` (see the module docs for the order).
    /// `go_on` gets the index the snapshot is at; when it answers false nothing is written
    /// and the result is `None`.
    pub fn export(
        &self,
        out: impl Write,
        opts: &ExportOptions,
        go_on: impl FnOnce(u64) -> bool,
    ) -> Result<Option<Exported>> {
        let db = self.db();
        // 1. and 2.
        let snap = db.db.snapshot();
        db.db.flush_wal(true)?;
        let meta_cf = db.cf(cf::META)?;
        let index = snap_u64(&snap, meta_cf, meta::LAST_ID)?.unwrap_or(0);
        let first_index = snap_u64(&snap, meta_cf, meta::FIRST_INDEX)?.unwrap_or(1);
        // 3.
        if !go_on(index) {
            return Ok(None);
        }
        let cluster_id = snap
            .get_cf(meta_cf, meta::CLUSTER_ID)?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        let header = Header::new(cluster_id, index, opts.scope.clone(), crate::now_nanos());

        // The catalog: few records, read whole and ordered by `_id`.
        let mut catalog: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut collection_tenant: HashMap<u64, String> = HashMap::new();
        let mut scope_tenant_id = None;
        let wanted = |tenant: &str| opts.scope.tenant().is_none_or(|t| t == tenant);
        for item in snap.iterator_cf(db.cf(cf::CATALOG)?, rocksdb::IteratorMode::Start) {
            let (k, v) = item?;
            let keep = match k.first() {
                Some(b'T') => {
                    let t: TenantRecord = catalog_record_data(&v)?;
                    if opts.scope.tenant() == Some(t.name.as_str()) {
                        scope_tenant_id = Some(t.id);
                    }
                    wanted(&t.name)
                }
                Some(b'C') => {
                    let c: CollectionRecord = catalog_record_data(&v)?;
                    let keep = wanted(&c.tenant);
                    collection_tenant.insert(c.id, c.tenant);
                    keep
                }
                _ => return Err(Error::corrupt("catalog", "unknown record kind")),
            };
            if keep {
                let id = record_id(&v).ok_or_else(|| Error::corrupt("catalog", "record id"))?;
                catalog.push((id, v.to_vec()));
            }
        }
        catalog.sort_by_key(|(id, _)| *id);
        if let (Some(t), None) = (opts.scope.tenant(), scope_tenant_id) {
            return Err(crate::Rejection::UnknownTenant(t.to_owned()).into());
        }

        let mut list = ListSource {
            it: snap.raw_iterator_cf(db.cf(cf::CHANGES)?),
            last: index,
            raft: opts.raft,
            tenant: scope_tenant_id,
            current: None,
        };
        list.it.seek_to_first();
        list.settle()?;
        let mut keys = KeySource {
            it: snap.raw_iterator_cf(db.cf(cf::KEYS_BY_ID)?),
            snap: &snap,
            keys_cf: db.cf(cf::KEYS)?,
            below: if opts.raft { first_index } else { u64::MAX },
            last: index,
            wanted_tenant: opts.scope.tenant(),
            collection_tenant: &collection_tenant,
            current: None,
        };
        keys.it.seek_to_first();
        keys.settle()?;

        // 4.
        let mut encoder = zstd::Encoder::new(
            Counting {
                inner: out,
                bytes: 0,
            },
            ZSTD_LEVEL,
        )?;
        // zstd's own checksum of the content: a damaged file fails to decompress even where
        // no sha256 from a manifest is at hand (a Raft snapshot).
        encoder.include_checksum(true)?;
        // Counts the lines before compression.
        let mut z = Counting {
            inner: encoder,
            bytes: 0,
        };
        write_line(&mut z, &header)?;
        let mut internal = 0u64;
        if opts.raft {
            let state = Internal::State {
                first_index,
                last_ts: snap_u64(&snap, meta_cf, meta::LAST_TS)?.map_or(0, |v| v as i64),
                next_tenant_id: snap_u64(&snap, meta_cf, meta::NEXT_TENANT_ID)?.unwrap_or(1),
                next_collection_id: snap_u64(&snap, meta_cf, meta::NEXT_COLLECTION_ID)?
                    .unwrap_or(1),
            };
            write_line(&mut z, &state)?;
            internal += 1;
        }
        let started = Instant::now();
        let mut last_report = started;
        let mut records = 0u64;
        let mut next_catalog = catalog.into_iter().peekable();
        loop {
            let c = next_catalog.peek().map(|(id, _)| *id);
            let l = list.current;
            let k = keys.current.as_ref().map(|(id, _)| *id);
            let Some(min) = [c, l, k].into_iter().flatten().min() else {
                break;
            };
            if c == Some(min) {
                if let Some((_, json)) = next_catalog.next() {
                    z.write_all(&json)?;
                }
            } else if l == Some(min) {
                z.write_all(list.json()?)?;
                list.advance()?;
            } else {
                if let Some((_, json)) = &keys.current {
                    z.write_all(json)?;
                }
                keys.advance()?;
            }
            z.write_all(b"\n")?;
            records += 1;
            if records.is_multiple_of(4096) && last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                let secs = started.elapsed().as_secs_f64();
                tracing::info!(
                    index,
                    records,
                    compressed_bytes = z.inner.get_ref().bytes,
                    records_per_sec = (records as f64 / secs) as u64,
                    "exporting a checkpoint"
                );
            }
        }
        let mut owner = BTreeMap::new();
        if opts.raft {
            internal += write_internal_lines(&mut z, &db, &snap)?;
            let mut it = snap.raw_iterator_cf(meta_cf);
            it.seek(meta::OWNER_PREFIX);
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                let Some(name) = k.strip_prefix(meta::OWNER_PREFIX) else {
                    break;
                };
                let value =
                    serde_json::from_slice(v).map_err(|e| Error::corrupt("owner value", e))?;
                owner.insert(String::from_utf8_lossy(name).into_owned(), value);
                it.next();
            }
            it.status()?;
        }
        let trailer = Trailer {
            end: true,
            records,
            internal,
            owner,
        };
        write_line(&mut z, &trailer)?;
        let raw_bytes = z.bytes;
        let mut counted = z.inner.finish()?;
        counted.flush()?;
        tracing::debug!(
            index,
            records,
            bytes = counted.bytes,
            "exported a checkpoint"
        );
        Ok(Some(Exported {
            header,
            trailer,
            raw_bytes,
        }))
    }
}

fn write_line<W: Write>(out: &mut W, value: &impl serde::Serialize) -> Result<()> {
    serde_json::to_writer(&mut *out, value).map_err(|e| Error::Checkpoint(e.to_string()))?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Idempotency keys, committed manifests and open starts, for a Raft snapshot.
fn write_internal_lines<W: Write>(out: &mut W, db: &crate::db::Db, snap: &Snap<'_>) -> Result<u64> {
    let mut n = 0;
    for item in snap.iterator_cf(db.cf(cf::IDEMPOTENCY)?, rocksdb::IteratorMode::Start) {
        let (k, v) = item?;
        let ts = layout::decode_i64(&v).ok_or_else(|| Error::corrupt("idempotency", "ts"))?;
        let answer = String::from_utf8(v.get(8..).unwrap_or_default().to_vec())
            .map_err(|e| Error::corrupt("idempotency", e))?;
        let line = Internal::Idempotency {
            key: String::from_utf8_lossy(&k).into_owned(),
            ts,
            answer,
        };
        write_line(out, &line)?;
        n += 1;
    }
    for item in snap.iterator_cf(db.cf(cf::CHECKPOINTS)?, rocksdb::IteratorMode::Start) {
        let (k, v) = item?;
        let bad = |e: serde_json::Error| Error::corrupt("checkpoints", e);
        let line = if k.starts_with(&layout::all_manifests_prefix()) {
            Internal::Manifest {
                manifest: serde_json::from_slice::<Manifest>(&v).map_err(bad)?,
            }
        } else {
            Internal::OpenStart {
                start: serde_json::from_slice::<OpenStart>(&v).map_err(bad)?,
            }
        };
        write_line(out, &line)?;
        n += 1;
    }
    Ok(n)
}

/// The list rows an export includes, in `_id` order. Catalog records are skipped here (they
/// come from the catalog, which outlives truncation); so are keyed changes outside a Raft
/// snapshot (the keyed state holds their latest).
struct ListSource<'a> {
    it: DBRawIteratorWithThreadMode<'a, DB>,
    last: u64,
    raft: bool,
    /// Only this tenant's changes (a tenant scope).
    tenant: Option<u64>,
    /// `_id` of the row the iterator is on, once it is one to export.
    current: Option<u64>,
}

impl ListSource<'_> {
    /// Moves to the next row to export at or after the iterator's position.
    fn settle(&mut self) -> Result<()> {
        self.current = None;
        while let (Some(k), Some(v)) = (self.it.key(), self.it.value()) {
            let id = layout::decode_u64(k).ok_or_else(|| Error::corrupt("changes", "key"))?;
            if id > self.last {
                break;
            }
            let c = StoredChange::decode(v)?;
            let catalog = c.change_type == internal_type::TENANT_CREATED
                || c.change_type == internal_type::COLLECTION_CREATED;
            let in_scope = self.tenant.is_none_or(|t| c.tenant_id == t);
            if !catalog && in_scope && (self.raft || !c.keyed) {
                self.current = Some(id);
                return Ok(());
            }
            self.it.next();
        }
        self.it.status()?;
        Ok(())
    }

    fn json(&self) -> Result<&[u8]> {
        let v = self
            .it
            .value()
            .ok_or_else(|| Error::corrupt("changes", "iterator lost its row"))?;
        Ok(StoredChange::decode(v)?.json)
    }

    fn advance(&mut self) -> Result<()> {
        self.it.next();
        self.settle()
    }
}

/// Live keys in `_id` order, with their latest change's JSON.
struct KeySource<'a, 's> {
    it: DBRawIteratorWithThreadMode<'a, DB>,
    snap: &'a Snap<'s>,
    keys_cf: &'a rocksdb::ColumnFamily,
    /// Only keys whose change is below this `_id` (a Raft snapshot takes the others from the
    /// list).
    below: u64,
    last: u64,
    wanted_tenant: Option<&'a str>,
    collection_tenant: &'a HashMap<u64, String>,
    current: Option<(u64, Vec<u8>)>,
}

impl KeySource<'_, '_> {
    fn settle(&mut self) -> Result<()> {
        self.current = None;
        while let (Some(k), Some(ck)) = (self.it.key(), self.it.value()) {
            let id = layout::decode_u64(k).ok_or_else(|| Error::corrupt("keys_by_id", "key"))?;
            if id >= self.below || id > self.last {
                break;
            }
            let cid = layout::coll_key_collection(ck)
                .ok_or_else(|| Error::corrupt("keys_by_id", "value"))?;
            let in_scope = self
                .wanted_tenant
                .is_none_or(|t| self.collection_tenant.get(&cid).is_some_and(|ct| ct == t));
            if in_scope {
                let v = self
                    .snap
                    .get_pinned_cf(self.keys_cf, ck)?
                    .ok_or_else(|| Error::corrupt("keys_by_id", "names a key that is not live"))?;
                self.current = Some((id, v.get(8..).unwrap_or_default().to_vec()));
                return Ok(());
            }
            self.it.next();
        }
        self.it.status()?;
        Ok(())
    }

    fn advance(&mut self) -> Result<()> {
        self.it.next();
        self.settle()
    }
}
