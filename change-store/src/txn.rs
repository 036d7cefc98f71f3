//! Writes: the single-writer transaction. It resolves names, checks preconditions and stages
//! every row of a batch in one RocksDB `WriteBatch`, so a batch lands whole or not at all.
//! [`Txn::write_rows`] is the one place the rows of a change are written, whether the change
//! is appended here (ids assigned), comes from upstream or from a checkpoint (ids given).
//!
//! Commit order:
//! 1. stage the scalars (last id, first index, last ts, next ids) with the rows;
//! 2. write the batch;
//! 3. after a truncation, sync the WAL, then let the compaction filter drop index entries
//!    below the new first index (a filter that ran ahead of a lost write would lose index
//!    entries the replayed log still needs), and compact the freed ranges in the background;
//! 4. add the new list rows to the tail cache, publish the catalog and scalars to readers,
//!    then wake long-polls.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use changeagent_proto::checkpoint::{OpenStart, RecordFields};
use changeagent_proto::types::{
    internal_type, AdminAnswer, CollectionCreated, CollectionRecord, EndRequest, StartRecord,
    TenantCreated, TenantRecord, TruncateRecord,
};
use changeagent_proto::{Manifest, Scope};
use rocksdb::{WriteBatch, WriteOptions};

use crate::db::{self, Db};
use crate::error::{Error, Rejection, Result};
use crate::layout::{self, cf, meta};
use crate::record::{validate_name, ChangeInput, Resolved};
use crate::store::{owner_key, CollectionRec, State, Store};

/// A write transaction; see the module docs.
///
/// Each operation validates everything before it stages anything, so a failed operation leaves
/// the transaction as it was and later operations in the same batch still apply.
pub struct Txn<'s> {
    store: &'s Store,
    db: Arc<Db>,
    batch: WriteBatch,
    state: State,
    /// `first_index` when the transaction began: a truncation moved it when they differ.
    first_index_before: u64,
    tenants: Vec<(u64, String)>,
    collections: Vec<(u64, CollectionRec)>,
    /// Keys written in this transaction: collection key → `_id` of the live change, or
    /// `None` once deleted.
    keys: HashMap<Vec<u8>, Option<u64>>,
    /// Idempotency keys remembered in this transaction.
    idempotency: HashMap<String, Vec<u8>>,
    /// Rows of the checkpoints family staged here (`None`: deleted), read back by later
    /// operations of the same transaction.
    checkpoints: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// New list rows (`_id`, stored value) for the tail cache, in `_id` order.
    cached: Vec<(u64, Bytes)>,
}

/// Which rows of a change [`Txn::write_rows`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rows {
    /// The list row with its index entries, and the key's state.
    All,
    /// Only the key's state (a checkpoint's record that is not in the list).
    State,
    /// Only the list row and its index entries (an older change backfilled into a replica's
    /// list; the state it left is already there).
    List,
}

/// How [`Txn::apply_next`] applies an upstream's change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// Into a copy that keeps everything (a checkpointer's): records are only recorded.
    Copy,
    /// Into a replica that moves with its upstream (an edge's): see [`Txn::apply_upstream`].
    Replica,
}

/// What a change applied from upstream did besides joining the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// A change, or a record that needs nothing more.
    Change,
    /// A checkpoint-end record: the manifest is now kept here too.
    CheckpointEnd(Manifest),
    /// A truncate record: the list now starts at `before`.
    Truncate { before: u64 },
}

/// Names a change refers to, resolved to ids.
struct ResolvedRefs {
    tenant: Option<(u64, String)>,
    collection: Option<(u64, String)>,
}

impl Store {
    /// Starts a write transaction. Only one writer may exist at a time; the caller (the state
    /// machine, a tailer, an import) guarantees that.
    pub fn begin(&self) -> Txn<'_> {
        let (db, state) = {
            let c = self.current.read().unwrap_or_else(|p| p.into_inner());
            (c.db.clone(), c.state.clone())
        };
        Txn {
            store: self,
            db,
            first_index_before: state.first_index,
            state,
            batch: WriteBatch::default(),
            tenants: Vec::new(),
            collections: Vec::new(),
            keys: HashMap::new(),
            idempotency: HashMap::new(),
            checkpoints: BTreeMap::new(),
            cached: Vec::new(),
        }
    }

    /// Writes a transaction atomically, then publishes it to readers and wakes long-polls
    /// (see the module docs for the order).
    pub fn commit(&self, mut txn: Txn<'_>) -> Result<()> {
        txn.stage_scalars()?;
        let Txn {
            db,
            batch,
            state,
            first_index_before,
            tenants,
            collections,
            cached,
            ..
        } = txn;
        db.db.write_opt(batch, &WriteOptions::default())?;
        if state.first_index != first_index_before {
            db.db.flush_wal(true)?;
            db.floor.store(state.first_index, Ordering::Release);
            let mut ranges = vec![(
                cf::CHANGES,
                layout::id_key(0).to_vec(),
                layout::id_key(state.first_index).to_vec(),
            )];
            for name in cf::LIST_INDEXES {
                ranges.push((name, Vec::new(), vec![0xff; 32]));
            }
            if let Some(handle) = db::compact_in_background(db.clone(), ranges) {
                self.compactions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(handle);
            }
        }
        if !tenants.is_empty() || !collections.is_empty() {
            let mut catalog = self.catalog.write().unwrap_or_else(|p| p.into_inner());
            for (id, name) in tenants {
                catalog.add_tenant(id, name);
            }
            for (id, rec) in collections {
                catalog.add_collection(id, rec);
            }
        }
        self.feed.extend(cached);
        let last_id = state.last_id;
        self.current
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .state = state;
        self.publish(last_id, false);
        Ok(())
    }
}

impl Txn<'_> {
    /// The scalars as this transaction will leave them.
    pub fn state(&self) -> &State {
        &self.state
    }

    fn stage_scalars(&mut self) -> Result<()> {
        let m = self.db.cf(cf::META)?;
        let s = &self.state;
        self.batch.put_cf(m, meta::LAST_ID, s.last_id.to_be_bytes());
        self.batch
            .put_cf(m, meta::FIRST_INDEX, s.first_index.to_be_bytes());
        self.batch
            .put_cf(m, meta::LAST_TS, (s.last_ts as u64).to_be_bytes());
        self.batch
            .put_cf(m, meta::NEXT_TENANT_ID, s.next_tenant_id.to_be_bytes());
        self.batch.put_cf(
            m,
            meta::NEXT_COLLECTION_ID,
            s.next_collection_id.to_be_bytes(),
        );
        Ok(())
    }

    // ---- catalog lookups ---------------------------------------------------------------

    fn find_tenant(&self, reference: &str) -> Option<(u64, String)> {
        if let Some((id, name)) = self.store.catalog_guard().tenant(reference) {
            return Some((id, name.to_owned()));
        }
        self.tenants
            .iter()
            .find(|(id, name)| name == reference || id.to_string() == reference)
            .cloned()
    }

    fn find_collection(&self, reference: &str, tenant: Option<u64>) -> Result<Option<u64>> {
        let committed = self.store.catalog_guard().collection(reference, tenant)?;
        let staged = self.collections.iter().find(|(id, rec)| {
            (rec.name == reference || id.to_string() == reference)
                && tenant.is_none_or(|t| rec.tenant_id == t)
        });
        match (committed, staged) {
            (Some(_), Some(_)) => Err(Rejection::AmbiguousCollection(reference.to_owned()).into()),
            (Some(id), None) => Ok(Some(id)),
            (None, Some((id, _))) => Ok(Some(*id)),
            (None, None) => Ok(None),
        }
    }

    fn collection_rec(&self, id: u64) -> Option<CollectionRec> {
        if let Some(rec) = self.store.catalog_guard().collections.get(&id) {
            return Some(rec.clone());
        }
        self.collections
            .iter()
            .find(|(cid, _)| *cid == id)
            .map(|(_, r)| r.clone())
    }

    fn tenant_name(&self, id: u64) -> Option<String> {
        self.find_tenant(&id.to_string()).map(|(_, n)| n)
    }

    fn resolve(&self, c: &ChangeInput) -> Result<ResolvedRefs> {
        let mut tenant = match &c.tenant {
            Some(t) => Some(
                self.find_tenant(t)
                    .ok_or_else(|| Rejection::UnknownTenant(t.clone()))?,
            ),
            None => None,
        };
        let collection = match &c.collection {
            None => None,
            Some(reference) => {
                let id = self
                    .find_collection(reference, tenant.as_ref().map(|t| t.0))?
                    .ok_or_else(|| Rejection::UnknownCollection(reference.clone()))?;
                let rec = self
                    .collection_rec(id)
                    .ok_or_else(|| Rejection::UnknownCollection(reference.clone()))?;
                match &tenant {
                    Some((tid, tname)) if *tid != rec.tenant_id => {
                        return Err(Rejection::CollectionTenantMismatch {
                            collection: rec.name,
                            owner: self.tenant_name(rec.tenant_id).unwrap_or_default(),
                            requested: tname.clone(),
                        }
                        .into())
                    }
                    Some(_) => {}
                    None => {
                        let name = self
                            .tenant_name(rec.tenant_id)
                            .ok_or_else(|| Error::corrupt("catalog", "collection's tenant"))?;
                        tenant = Some((rec.tenant_id, name));
                    }
                }
                Some((id, rec.name))
            }
        };
        Ok(ResolvedRefs { tenant, collection })
    }

    // ---- the row writer ----------------------------------------------------------------

    /// The `_id` of a key's live change, `None` when the key is not live.
    fn key_state(&self, coll_key: &[u8]) -> Result<Option<u64>> {
        if let Some(&state) = self.keys.get(coll_key) {
            return Ok(state);
        }
        match self.db.db.get_pinned_cf(self.db.cf(cf::KEYS)?, coll_key)? {
            None => Ok(None),
            Some(v) => layout::decode_u64(&v)
                .map(Some)
                .ok_or_else(|| Error::corrupt("keys", "value")),
        }
    }

    /// Stages the rows of one change with its `_id`: the list row and its index entries, and
    /// the state of its key (keyed changes), as `rows` says. Moves `last_id` and `last_ts`
    /// forward. `json` is the change's wire JSON.
    fn write_rows(&mut self, r: &Resolved<'_>, json: &[u8], rows: Rows) -> Result<()> {
        let id = r.id;
        if rows != Rows::State {
            let value = Bytes::from(r.stored_value(json));
            self.batch
                .put_cf(self.db.cf(cf::CHANGES)?, layout::id_key(id), &value);
            self.cached.push((id, value));
            let by_tag = self.db.cf(cf::BY_TAG)?;
            for tag in r.tags {
                self.batch
                    .put_cf(by_tag, layout::tag_key(tag.as_bytes(), id), []);
            }
            self.batch.put_cf(
                self.db.cf(cf::BY_TYPE)?,
                layout::type_key(r.change_type, id),
                [],
            );
            if let Some((tid, _)) = r.tenant {
                self.batch
                    .put_cf(self.db.cf(cf::BY_TENANT)?, layout::pair_key(tid, id), []);
            }
            self.batch
                .put_cf(self.db.cf(cf::BY_TS)?, layout::ts_key(r.ts, id), []);
        }
        if let (Some((cid, _)), Some(key), false) = (r.collection, r.key, rows == Rows::List) {
            let ck = layout::coll_key(cid, key);
            let keys = self.db.cf(cf::KEYS)?;
            let by_id = self.db.cf(cf::KEYS_BY_ID)?;
            if let Some(previous) = self.key_state(&ck)? {
                self.batch.delete_cf(by_id, layout::id_key(previous));
            }
            if r.deleted {
                self.batch.delete_cf(keys, &ck);
                self.keys.insert(ck, None);
            } else {
                let mut v = id.to_be_bytes().to_vec();
                v.extend_from_slice(json);
                self.batch.put_cf(keys, &ck, v);
                self.batch.put_cf(by_id, layout::id_key(id), &ck);
                self.keys.insert(ck, Some(id));
            }
        }
        self.state.last_id = self.state.last_id.max(id);
        self.state.last_ts = self.state.last_ts.max(r.ts);
        Ok(())
    }

    /// Appends an internal record (type < 0) with `data`; returns its `_id` and `_ts`.
    fn append_internal(&mut self, ts: i64, change_type: i32, data: &str) -> Result<(u64, i64)> {
        let r = Resolved {
            id: self.state.last_id + 1,
            ts: ts.max(self.state.last_ts),
            change_type,
            tags: &[],
            tenant: None,
            collection: None,
            key: None,
            deleted: false,
            data: Some(data),
        };
        let json = r.wire_json();
        self.write_rows(&r, &json, Rows::All)?;
        if change_type == internal_type::TENANT_CREATED
            || change_type == internal_type::COLLECTION_CREATED
        {
            self.put_catalog_record(change_type, data, &json)?;
        }
        Ok((r.id, r.ts))
    }

    /// Stages a catalog record (the wire JSON of a tenant- or collection-created change) in
    /// the catalog and the in-memory view of this transaction.
    fn put_catalog_record(&mut self, change_type: i32, data: &str, json: &[u8]) -> Result<()> {
        let bad = |e: serde_json::Error| Error::corrupt("catalog record", e);
        let cat = self.db.cf(cf::CATALOG)?;
        if change_type == internal_type::TENANT_CREATED {
            let t: TenantRecord = serde_json::from_str(data).map_err(bad)?;
            if self.find_tenant(&t.name).is_some() || self.find_tenant(&t.id.to_string()).is_some()
            {
                return Err(Error::BadRecord {
                    id: self.state.last_id,
                    detail: format!("tenant {} ({}) exists already", t.name, t.id),
                });
            }
            self.batch
                .put_cf(cat, layout::tenant_catalog_key(t.id), json);
            self.state.next_tenant_id = self.state.next_tenant_id.max(t.id + 1);
            self.tenants.push((t.id, t.name));
        } else {
            let c: CollectionRecord = serde_json::from_str(data).map_err(bad)?;
            let (tenant_id, _) = self
                .find_tenant(&c.tenant)
                .ok_or_else(|| Error::BadRecord {
                    id: self.state.last_id,
                    detail: format!("collection {} names unknown tenant {}", c.name, c.tenant),
                })?;
            if self.collection_rec(c.id).is_some() {
                return Err(Error::BadRecord {
                    id: self.state.last_id,
                    detail: format!("collection {} exists already", c.id),
                });
            }
            self.batch
                .put_cf(cat, layout::collection_catalog_key(c.id), json);
            self.state.next_collection_id = self.state.next_collection_id.max(c.id + 1);
            self.collections.push((
                c.id,
                CollectionRec {
                    tenant_id,
                    name: c.name,
                },
            ));
        }
        Ok(())
    }

    // ---- operations ----------------------------------------------------------------------

    /// Creates a tenant: appends its tenant-created record (type -4) at `ts`.
    pub fn create_tenant(&mut self, ts: i64, name: &str) -> Result<TenantCreated> {
        validate_name(name)?;
        if self.find_tenant(name).is_some() {
            return Err(Rejection::TenantExists(name.to_owned()).into());
        }
        let record = TenantRecord {
            id: self.state.next_tenant_id,
            name: name.to_owned(),
        };
        let data = to_json(&record)?;
        self.append_internal(ts, internal_type::TENANT_CREATED, &data)?;
        Ok(TenantCreated {
            id: record.id,
            name: record.name,
            tenant: record.id,
        })
    }

    /// Creates a collection in a tenant (name or id): appends its collection-created record
    /// (type -5) at `ts`.
    pub fn create_collection(
        &mut self,
        ts: i64,
        tenant: &str,
        name: &str,
    ) -> Result<CollectionCreated> {
        validate_name(name)?;
        let (tenant_id, tenant_name) = self
            .find_tenant(tenant)
            .ok_or_else(|| Rejection::UnknownTenant(tenant.to_owned()))?;
        if self.find_collection(name, Some(tenant_id))?.is_some() {
            return Err(Rejection::CollectionExists {
                tenant: tenant_name,
                collection: name.to_owned(),
            }
            .into());
        }
        let record = CollectionRecord {
            id: self.state.next_collection_id,
            name: name.to_owned(),
            tenant: tenant_name,
        };
        let data = to_json(&record)?;
        self.append_internal(ts, internal_type::COLLECTION_CREATED, &data)?;
        Ok(CollectionCreated {
            id: record.id,
            name: record.name,
            tenant: record.tenant,
            collection: record.id,
        })
    }

    /// Appends changes with consecutive `_id`s, all or none. `ts` is the proposer's clock;
    /// stored `_ts` never decreases along `_id`s (a slower clock after a leader change is
    /// raised to the previous `_ts`), which keeps time lookups a single seek.
    pub fn append(&mut self, ts: i64, changes: &[ChangeInput]) -> Result<Vec<u64>> {
        // 1. Resolve and check every change before staging anything.
        let mut refs = Vec::with_capacity(changes.len());
        let mut pending_keys: HashMap<Vec<u8>, bool> = HashMap::new();
        for c in changes {
            let r = self.resolve(c)?;
            if let (Some((cid, cname)), Some(key)) = (&r.collection, &c.key) {
                let ck = layout::coll_key(*cid, key);
                if c.deleted {
                    let live = match pending_keys.get(&ck) {
                        Some(&l) => l,
                        None => self.key_state(&ck)?.is_some(),
                    };
                    if !live {
                        return Err(Rejection::UnknownKey {
                            collection: cname.clone(),
                            key: key.clone(),
                        }
                        .into());
                    }
                }
                pending_keys.insert(ck, !c.deleted);
            }
            refs.push(r);
        }
        // 2. Stage rows.
        let ts = ts.max(self.state.last_ts);
        let mut ids = Vec::with_capacity(changes.len());
        for (c, r) in changes.iter().zip(&refs) {
            let resolved = Resolved {
                id: self.state.last_id + 1,
                ts,
                change_type: c.change_type,
                tags: &c.tags,
                tenant: r.tenant.as_ref().map(|(i, n)| (*i, n.as_str())),
                collection: r.collection.as_ref().map(|(i, n)| (*i, n.as_str())),
                key: c.key.as_deref(),
                deleted: c.deleted,
                data: c.data.as_deref().map(|d| d.get()),
            };
            let json = resolved.wire_json();
            self.write_rows(&resolved, &json, Rows::All)?;
            ids.push(resolved.id);
        }
        Ok(ids)
    }

    /// Applies a change with the `_id` it was given elsewhere (an upstream's feed, a
    /// checkpoint), keeping its wire JSON byte for byte. Catalog records update the catalog;
    /// keyed changes the key's state; the change joins the list when `list`. Returns its
    /// `_id`. The `_id` must be past the last one applied, and the change must meet the
    /// limits of a posted one (tags, key).
    pub fn apply_record(&mut self, line: &[u8], list: bool) -> Result<u64> {
        let f = parse_record(line)?;
        self.apply_fields(&f, line, if list { Rows::All } else { Rows::State })?;
        Ok(f.id)
    }

    /// Applies a change of an upstream's list to a replica of it (an edge): like
    /// [`Txn::apply_record`] into the list, and the replica follows the upstream's
    /// housekeeping: a checkpoint-end record keeps its manifest, a truncate record drops the
    /// list before its `before`.
    pub fn apply_upstream(&mut self, line: &[u8]) -> Result<Applied> {
        let f = parse_record(line)?;
        self.apply_fields(&f, line, Rows::All)?;
        let data = f.data.map_or("null", |d| d.get());
        let bad = |e: serde_json::Error| Error::BadRecord {
            id: f.id,
            detail: e.to_string(),
        };
        match f.change_type {
            internal_type::TRUNCATE => {
                let t: TruncateRecord = serde_json::from_str(data).map_err(bad)?;
                self.drop_list_before(t.before)?;
                Ok(Applied::Truncate { before: t.before })
            }
            internal_type::CHECKPOINT_END => {
                let m: Manifest = serde_json::from_str(data).map_err(bad)?;
                self.put_manifest(&m)?;
                Ok(Applied::CheckpointEnd(m))
            }
            _ => Ok(Applied::Change),
        }
    }

    /// Applies the change `id` of an upstream's unfiltered list (`line` is its wire JSON) as
    /// the next one: `None` when it was applied already (a page overlapping the last one), an
    /// error when it is not the one after the last applied (a gap, which an unfiltered list
    /// never has). A [`Follow::Replica`] follows the upstream's housekeeping too.
    pub fn apply_next(&mut self, id: u64, line: &[u8], follow: Follow) -> Result<Option<Applied>> {
        let expected = self.state.last_id + 1;
        if id < expected {
            return Ok(None);
        }
        if id != expected {
            return Err(Error::BadRecord {
                id,
                detail: format!(
                    "the upstream's list jumps from {} to {id}: a gap in an unfiltered list",
                    expected - 1
                ),
            });
        }
        match follow {
            Follow::Copy => self.apply_record(line, true).map(|_| Some(Applied::Change)),
            Follow::Replica => self.apply_upstream(line).map(Some),
        }
    }

    /// Writes an older change into the list only (its state is already here): a replica's
    /// list reaching back as far as its upstream's. `_id`s must come in increasing order
    /// (the import checks); catalog records are not applied again.
    pub(crate) fn backfill_record(&mut self, line: &[u8]) -> Result<u64> {
        let f = parse_record(line)?;
        self.apply_fields(&f, line, Rows::List)?;
        Ok(f.id)
    }

    fn apply_fields(&mut self, f: &RecordFields<'_>, line: &[u8], rows: Rows) -> Result<()> {
        let bad = |detail: String| Error::BadRecord { id: f.id, detail };
        f.check_limits().map_err(bad)?;
        if rows != Rows::List && f.id <= self.state.last_id {
            return Err(bad(format!(
                "it is not past the last applied _id {}",
                self.state.last_id
            )));
        }
        let tenant = match &f.tenant {
            Some(name) => Some(
                self.find_tenant(name)
                    .ok_or_else(|| bad(format!("unknown tenant {name}")))?,
            ),
            None => None,
        };
        let collection = match (&f.collection, &tenant) {
            (Some(name), Some((tid, _))) => {
                let id = self
                    .find_collection(name, Some(*tid))?
                    .ok_or_else(|| bad(format!("unknown collection {name}")))?;
                Some((id, name.clone()))
            }
            (Some(name), None) => return Err(bad(format!("collection {name} without a tenant"))),
            (None, _) => None,
        };
        if collection.is_some() != f.key.is_some() {
            return Err(bad("a collection and a key go together".into()));
        }
        let r = Resolved {
            id: f.id,
            ts: f.ts,
            change_type: f.change_type,
            tags: &f.tags,
            tenant: tenant.as_ref().map(|(i, n)| (*i, n.as_str())),
            collection: collection.as_ref().map(|(i, n)| (*i, n.as_str())),
            key: f.key.as_deref(),
            deleted: f.deleted,
            data: f.data.map(|d| d.get()),
        };
        if rows != Rows::List
            && (f.change_type == internal_type::TENANT_CREATED
                || f.change_type == internal_type::COLLECTION_CREATED)
        {
            let data = f.data.map_or("null", |d| d.get());
            self.put_catalog_record(f.change_type, data, line)?;
        }
        self.write_rows(&r, line, rows)
    }

    // ---- checkpoints and truncation ------------------------------------------------------

    fn checkpoint_row(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.checkpoints.get(key) {
            return Ok(v.clone());
        }
        Ok(self.db.db.get_cf(self.db.cf(cf::CHECKPOINTS)?, key)?)
    }

    fn stage_checkpoint_row(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) -> Result<()> {
        let family = self.db.cf(cf::CHECKPOINTS)?;
        match &value {
            Some(v) => self.batch.put_cf(family, &key, v),
            None => self.batch.delete_cf(family, &key),
        }
        self.checkpoints.insert(key, value);
        Ok(())
    }

    /// The open start of a scope, as this transaction sees it.
    fn open_start(&self, scope: &Scope) -> Result<Option<OpenStart>> {
        self.checkpoint_row(&layout::open_start_key(scope))?
            .map(|v| serde_json::from_slice(&v).map_err(|e| Error::corrupt("checkpoints", e)))
            .transpose()
    }

    /// A scope's committed manifests as this transaction sees them, newest first.
    fn manifests(&self, scope: &Scope) -> Result<Vec<Manifest>> {
        let prefix = layout::manifest_prefix(scope);
        let mut rows: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let mut it = self.db.db.raw_iterator_cf(self.db.cf(cf::CHECKPOINTS)?);
        it.seek(&prefix);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !k.starts_with(&prefix) {
                break;
            }
            rows.insert(k.to_vec(), v.to_vec());
            it.next();
        }
        it.status()?;
        for (k, v) in self.checkpoints.range(prefix.clone()..) {
            if !k.starts_with(&prefix) {
                break;
            }
            match v {
                Some(v) => rows.insert(k.clone(), v.clone()),
                None => rows.remove(k),
            };
        }
        rows.values()
            .rev()
            .map(|v| serde_json::from_slice(v).map_err(|e| Error::corrupt("checkpoints", e)))
            .collect()
    }

    /// Records a committed checkpoint without an end record: a Raft snapshot's manifests, or
    /// the checkpoint a restored cluster started from.
    pub fn put_manifest(&mut self, m: &Manifest) -> Result<()> {
        self.stage_checkpoint_row(
            layout::manifest_key(&m.scope, m.index),
            Some(to_json(m)?.into_bytes()),
        )
    }

    /// Stages an open start (checkpoint import of a Raft snapshot).
    pub(crate) fn put_open_start(&mut self, s: &OpenStart) -> Result<()> {
        self.stage_checkpoint_row(
            layout::open_start_key(&s.scope),
            Some(to_json(s)?.into_bytes()),
        )
    }

    /// `POST /admin/checkpoints/start`: appends a checkpoint-start record (type -1) unless
    /// another checkpointer's start of the same scope is open and younger than
    /// `stale_after_nanos` (measured on `_ts`). The same checkpointer takes its own open start
    /// back at once.
    pub fn checkpoint_start(
        &mut self,
        ts: i64,
        start: &StartRecord,
        stale_after_nanos: i64,
    ) -> Result<AdminAnswer> {
        if start.by.is_empty() {
            return Err(Error::invalid(
                "a checkpoint start needs the checkpointer's id in \"by\"",
            ));
        }
        if let Some(t) = start.scope.tenant() {
            self.find_tenant(t)
                .ok_or_else(|| Rejection::UnknownTenant(t.to_owned()))?;
        }
        if start.index > self.state.last_id {
            return Err(Error::invalid(format!(
                "checkpoint index {} is past the last applied _id {}",
                start.index, self.state.last_id
            )));
        }
        let now = ts.max(self.state.last_ts);
        if let Some(open) = self.open_start(&start.scope)? {
            let age = now.saturating_sub(open.ts);
            if open.by != start.by && age < stale_after_nanos {
                return Err(Rejection::CheckpointInProgress {
                    scope: start.scope.clone(),
                    by: open.by,
                    index: open.index,
                    age_secs: (age / 1_000_000_000) as u64,
                }
                .into());
            }
        }
        let (id, ts) =
            self.append_internal(now, internal_type::CHECKPOINT_START, &to_json(start)?)?;
        let open = OpenStart {
            scope: start.scope.clone(),
            by: start.by.clone(),
            index: start.index,
            id,
            ts,
        };
        self.put_open_start(&open)?;
        Ok(AdminAnswer {
            id: Some(id),
            first_index: self.state.first_index,
        })
    }

    /// `POST /admin/checkpoints/end`: appends a checkpoint-end record (type -2) holding the
    /// manifest, closes the start, and keeps only the newest `keep` manifests of the scope.
    pub fn checkpoint_end(&mut self, ts: i64, end: &EndRequest) -> Result<AdminAnswer> {
        let m = &end.manifest;
        let matches = self
            .open_start(&m.scope)?
            .is_some_and(|open| open.by == end.by && open.index == m.index);
        if !matches {
            return Err(Rejection::NoOpenStart {
                scope: m.scope.clone(),
                by: end.by.clone(),
                index: m.index,
            }
            .into());
        }
        if end.keep == 0 {
            return Err(Error::invalid("keep must be at least 1"));
        }
        if let Some(cid) = &self.state.cluster_id {
            if *cid != m.cluster_id {
                return Err(Error::invalid(format!(
                    "the manifest names cluster {}, this is cluster {cid}",
                    m.cluster_id
                )));
            }
        }
        let (id, _) = self.append_internal(ts, internal_type::CHECKPOINT_END, &to_json(m)?)?;
        self.put_manifest(m)?;
        self.stage_checkpoint_row(layout::open_start_key(&m.scope), None)?;
        for old in self
            .manifests(&m.scope)?
            .into_iter()
            .skip(end.keep as usize)
        {
            self.stage_checkpoint_row(layout::manifest_key(&old.scope, old.index), None)?;
        }
        Ok(AdminAnswer {
            id: Some(id),
            first_index: self.state.first_index,
        })
    }

    /// `POST /admin/truncate`: removes changes with `_id < before` from the list (keyed state
    /// and the catalog stay) and appends a truncate record (type -3). Refused when
    /// `before - 1` is past the newest committed full checkpoint; nothing happens when
    /// `before` is not past the first index.
    pub fn truncate(&mut self, ts: i64, before: u64) -> Result<AdminAnswer> {
        let first = self.state.first_index;
        if before <= first {
            return Ok(AdminAnswer {
                id: None,
                first_index: first,
            });
        }
        let newest = self.manifests(&Scope::All)?.first().map(|m| m.index);
        let checkpoint = match newest {
            Some(n) if before - 1 <= n => n,
            _ => {
                return Err(Rejection::NotCheckpointed {
                    before,
                    checkpoint: newest,
                }
                .into())
            }
        };
        let data = to_json(&TruncateRecord { before, checkpoint })?;
        let (id, _) = self.append_internal(ts, internal_type::TRUNCATE, &data)?;
        self.drop_list_before(before)?;
        Ok(AdminAnswer {
            id: Some(id),
            first_index: before,
        })
    }

    /// Drops the list before `before` (nothing when it is not past the first index). The list
    /// rows go now; index entries below the new first index are dropped by the compaction
    /// filter once the truncation is durable (see the module docs).
    fn drop_list_before(&mut self, before: u64) -> Result<()> {
        let first = self.state.first_index;
        if before <= first {
            return Ok(());
        }
        self.batch.delete_range_cf(
            self.db.cf(cf::CHANGES)?,
            layout::id_key(first),
            layout::id_key(before),
        );
        self.state.first_index = before;
        Ok(())
    }

    /// Replaces every kept manifest with `manifests` (a replica keeping what its upstream
    /// keeps).
    pub fn set_manifests(&mut self, manifests: &[Manifest]) -> Result<()> {
        let prefix = layout::all_manifests_prefix();
        let mut stale = Vec::new();
        let mut it = self.db.db.raw_iterator_cf(self.db.cf(cf::CHECKPOINTS)?);
        it.seek(prefix);
        while let Some(k) = it.key() {
            if !k.starts_with(&prefix) {
                break;
            }
            stale.push(k.to_vec());
            it.next();
        }
        it.status()?;
        drop(it);
        let staged: Vec<Vec<u8>> = self
            .checkpoints
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect();
        for key in stale.into_iter().chain(staged) {
            self.stage_checkpoint_row(key, None)?;
        }
        for m in manifests {
            self.put_manifest(m)?;
        }
        Ok(())
    }

    /// Sets the scalars an import read from a snapshot's state line.
    pub(crate) fn set_scalars(
        &mut self,
        first_index: u64,
        last_ts: i64,
        next_tenant_id: u64,
        next_collection_id: u64,
    ) {
        self.state.first_index = first_index;
        self.state.last_ts = self.state.last_ts.max(last_ts);
        self.state.next_tenant_id = self.state.next_tenant_id.max(next_tenant_id);
        self.state.next_collection_id = self.state.next_collection_id.max(next_collection_id);
    }

    /// Sets the newest `_id` and first index after an import.
    pub(crate) fn set_range(&mut self, first_index: u64, last_id: u64) {
        self.state.first_index = first_index;
        self.state.last_id = last_id;
    }

    // ---- idempotency, owner values -------------------------------------------------------

    /// The answer stored for an idempotency key, if the key was seen and not yet expired.
    pub fn idempotent_answer(&self, key: &str) -> Result<Option<Vec<u8>>> {
        if let Some(a) = self.idempotency.get(key) {
            return Ok(Some(a.clone()));
        }
        Ok(self
            .db
            .db
            .get_pinned_cf(self.db.cf(cf::IDEMPOTENCY)?, key.as_bytes())?
            .map(|v| v.get(8..).unwrap_or_default().to_vec()))
    }

    /// Remembers the answer given for an idempotency key.
    pub fn remember_idempotent(&mut self, key: &str, ts: i64, answer: Vec<u8>) -> Result<()> {
        let mut v = layout::ordered_i64(ts).to_vec();
        v.extend_from_slice(&answer);
        self.batch
            .put_cf(self.db.cf(cf::IDEMPOTENCY)?, key.as_bytes(), v);
        let mut k = layout::ordered_i64(ts).to_vec();
        k.extend_from_slice(key.as_bytes());
        self.batch.put_cf(self.db.cf(cf::IDEMPOTENCY_BY_TS)?, k, []);
        self.idempotency.insert(key.to_owned(), answer);
        Ok(())
    }

    /// Forgets idempotency keys remembered before `now - IDEMPOTENCY_TTL_NANOS`. Bounded work:
    /// at most `max` keys per call, so one batch never stalls on a backlog.
    pub fn expire_idempotency(&mut self, now: i64, max: usize) -> Result<usize> {
        let cutoff = layout::ordered_i64(now.saturating_sub(crate::store::IDEMPOTENCY_TTL_NANOS));
        let idem = self.db.cf(cf::IDEMPOTENCY)?;
        let by_ts = self.db.cf(cf::IDEMPOTENCY_BY_TS)?;
        let mut it = self.db.db.raw_iterator_cf(by_ts);
        it.seek_to_first();
        let mut n = 0;
        while let Some(k) = it.key() {
            if n == max || k.len() < 8 || k[..8] >= cutoff[..] {
                break;
            }
            let key = &k[8..];
            // Only forget the key if it was not re-remembered later.
            let current = self.db.db.get_pinned_cf(idem, key)?;
            if current
                .as_deref()
                .is_some_and(|v| v.get(..8) == Some(&k[..8]))
            {
                self.batch.delete_cf(idem, key);
            }
            self.batch.delete_cf(by_ts, k);
            n += 1;
            it.next();
        }
        it.status()?;
        Ok(n)
    }

    /// Stores a value of the owner's with this batch (e.g. the Raft applied log id).
    pub fn put_owner_meta(&mut self, name: &str, value: &[u8]) -> Result<()> {
        self.batch
            .put_cf(self.db.cf(cf::META)?, owner_key(name), value);
        Ok(())
    }

    /// Sets the cluster id.
    pub fn set_cluster_id(&mut self, id: &str) -> Result<()> {
        self.batch
            .put_cf(self.db.cf(cf::META)?, meta::CLUSTER_ID, id.as_bytes());
        self.state.cluster_id = Some(id.to_owned());
        Ok(())
    }
}

/// Reads the fields of a change's wire JSON.
fn parse_record(line: &[u8]) -> Result<RecordFields<'_>> {
    serde_json::from_slice(line).map_err(|e| Error::BadRecord {
        id: changeagent_proto::checkpoint::record_id(line).unwrap_or(0),
        detail: e.to_string(),
    })
}

/// Serializes a value of ours; our types always serialize.
fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::corrupt("serialize", e))
}
