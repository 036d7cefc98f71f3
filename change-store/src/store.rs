//! The change store: opening the RocksDB database, the single-writer transaction that applies
//! a batch atomically, and the reads (pages of changes, keys, catalog) that serve the API.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DBRawIteratorWithThreadMode, Options, WriteBatch,
    WriteOptions, DB,
};
use tokio::sync::watch;

use crate::error::{Error, Rejection, Result};
use crate::layout::{self, cf, meta};
use crate::record::{validate_name, ChangeInput, Resolved, StoredChange};

pub use changeagent_proto::types::{Collection, Tenant};

/// How long an idempotency key is remembered, in nanoseconds of change time (24 hours, the
/// usual retry horizon of HTTP clients and of Stripe-style idempotency keys).
pub const IDEMPOTENCY_TTL_NANOS: i64 = 24 * 3600 * 1_000_000_000;

/// Filters of a change query. Several tags match a change having any of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub tags: Vec<String>,
    pub change_type: Option<i32>,
    pub tenant: Option<u64>,
}

impl Filter {
    /// True when the query lists every change, internal records included.
    pub fn is_unfiltered(&self) -> bool {
        self.tags.is_empty() && self.change_type.is_none() && self.tenant.is_none()
    }

    fn matches(&self, c: &StoredChange<'_>) -> bool {
        match self.change_type {
            Some(t) if c.change_type != t => return false,
            None if c.change_type < 0 && !self.is_unfiltered() => return false,
            _ => {}
        }
        if let Some(t) = self.tenant {
            if c.tenant_id != t {
                return false;
            }
        }
        self.tags.is_empty()
            || c.tags()
                .any(|have| self.tags.iter().any(|want| want.as_bytes() == have))
    }
}

/// What a page of changes held, written beside its JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageInfo {
    /// Changes written to the output.
    pub count: usize,
    /// `_id` of the last change written.
    pub last_returned: Option<u64>,
    /// More matching changes exist after the last one written.
    pub more: bool,
    /// Oldest retained `_id`.
    pub first_index: u64,
    /// Newest applied `_id`.
    pub last_index: u64,
}

/// Scalars kept in `meta` and mirrored in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub last_id: u64,
    /// Oldest retained `_id` (changes before it were truncated).
    pub first_index: u64,
    pub last_ts: i64,
    pub next_tenant_id: u64,
    pub next_collection_id: u64,
    pub cluster_id: Option<String>,
}

#[derive(Debug, Clone)]
struct CollectionRec {
    tenant_id: u64,
    name: String,
}

/// Tenants and collections, all in memory (they are few), mirrored from `catalog`.
#[derive(Debug, Clone, Default)]
struct Catalog {
    tenants: BTreeMap<u64, String>,
    tenant_ids: HashMap<String, u64>,
    collections: BTreeMap<u64, CollectionRec>,
    collection_ids: HashMap<String, Vec<u64>>,
}

impl Catalog {
    fn add_tenant(&mut self, id: u64, name: String) {
        self.tenant_ids.insert(name.clone(), id);
        self.tenants.insert(id, name);
    }

    fn add_collection(&mut self, id: u64, rec: CollectionRec) {
        self.collection_ids
            .entry(rec.name.clone())
            .or_default()
            .push(id);
        self.collections.insert(id, rec);
    }

    fn tenant(&self, reference: &str) -> Option<(u64, &str)> {
        if let Some(&id) = self.tenant_ids.get(reference) {
            return Some((id, self.tenants.get(&id)?.as_str()));
        }
        let id: u64 = reference.parse().ok()?;
        self.tenants.get(&id).map(|n| (id, n.as_str()))
    }

    fn collection(&self, reference: &str, tenant: Option<u64>) -> Result<Option<u64>> {
        if let Ok(id) = reference.parse::<u64>() {
            return Ok(self.collections.contains_key(&id).then_some(id));
        }
        let ids = match self.collection_ids.get(reference) {
            Some(ids) => ids,
            None => return Ok(None),
        };
        let mut found = ids
            .iter()
            .copied()
            .filter(|id| tenant.is_none_or(|t| self.collections[id].tenant_id == t));
        match (found.next(), found.next()) {
            (None, _) => Ok(None),
            (Some(id), None) => Ok(Some(id)),
            (Some(_), Some(_)) => Err(Rejection::AmbiguousCollection(reference.to_owned()).into()),
        }
    }

    fn collection_view(&self, id: u64) -> Option<Collection> {
        let rec = self.collections.get(&id)?;
        Some(Collection {
            id,
            name: rec.name.clone(),
            tenant: self.tenants.get(&rec.tenant_id)?.clone(),
        })
    }
}

/// The RocksDB change list with its indexes, keyed state and catalog.
///
/// One writer (the Raft state machine, or an edge's tailer) applies [`Txn`]s; any number of
/// readers query concurrently. Readers never see past `State::last_id`, which moves only after
/// a batch is fully written.
pub struct Store {
    db: DB,
    path: PathBuf,
    catalog: RwLock<Catalog>,
    state: RwLock<State>,
    /// Newest applied `_id`; long-polls subscribe. The store owns the sender; receivers close
    /// when the store is dropped.
    applied: watch::Sender<u64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn read_u64(db: &DB, cf: &ColumnFamily, key: &[u8]) -> Result<Option<u64>> {
    match db.get_pinned_cf(cf, key)? {
        None => Ok(None),
        Some(v) => layout::decode_u64(&v)
            .map(Some)
            .ok_or_else(|| Error::corrupt("meta", String::from_utf8_lossy(key))),
    }
}

impl Store {
    /// Opens (creating if needed) the store in `path`. Fails on an unknown format version.
    pub fn open(path: impl AsRef<Path>) -> Result<Arc<Store>> {
        let path = path.as_ref().to_path_buf();
        std::fs::create_dir_all(&path)?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let cfs = cf::ALL
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
        let db = DB::open_cf_descriptors(&opts, &path, cfs)?;

        let meta_cf = db
            .cf_handle(cf::META)
            .ok_or_else(|| Error::corrupt("meta", "missing column family"))?;
        let version = match db.get_pinned_cf(&meta_cf, meta::FORMAT_VERSION)? {
            Some(v) => u32::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| Error::corrupt("meta", "format version"))?,
            ),
            None => {
                let changes = db
                    .cf_handle(cf::CHANGES)
                    .ok_or_else(|| Error::corrupt("changes", "missing column family"))?;
                if db
                    .iterator_cf(&changes, rocksdb::IteratorMode::Start)
                    .next()
                    .is_some()
                {
                    return Err(Error::UnsupportedFormat {
                        path,
                        found: 0,
                        supported: layout::FORMAT_VERSION,
                    });
                }
                db.put_cf(
                    &meta_cf,
                    meta::FORMAT_VERSION,
                    layout::FORMAT_VERSION.to_be_bytes(),
                )?;
                layout::FORMAT_VERSION
            }
        };
        if version != layout::FORMAT_VERSION {
            return Err(Error::UnsupportedFormat {
                path,
                found: version,
                supported: layout::FORMAT_VERSION,
            });
        }
        let state = State {
            last_id: read_u64(&db, meta_cf, meta::LAST_ID)?.unwrap_or(0),
            first_index: read_u64(&db, meta_cf, meta::FIRST_INDEX)?.unwrap_or(1),
            last_ts: read_u64(&db, meta_cf, meta::LAST_TS)?
                .map(|v| v as i64)
                .unwrap_or(0),
            next_tenant_id: read_u64(&db, meta_cf, meta::NEXT_TENANT_ID)?.unwrap_or(1),
            next_collection_id: read_u64(&db, meta_cf, meta::NEXT_COLLECTION_ID)?.unwrap_or(1),
            cluster_id: db
                .get_cf(&meta_cf, meta::CLUSTER_ID)?
                .map(|v| String::from_utf8_lossy(&v).into_owned()),
        };
        let catalog = load_catalog(&db)?;
        let (applied, _) = watch::channel(state.last_id);
        Ok(Arc::new(Store {
            db,
            path,
            catalog: RwLock::new(catalog),
            state: RwLock::new(state),
            applied,
        }))
    }

    /// Directory of the database.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn db(&self) -> &DB {
        &self.db
    }

    pub(crate) fn cf(&self, name: &'static str) -> Result<&ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| Error::corrupt("column family", name))
    }

    fn state_guard(&self) -> RwLockReadGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the state itself is always whole.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn catalog_guard(&self) -> RwLockReadGuard<'_, Catalog> {
        self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The scalars as of the last committed batch.
    pub fn state(&self) -> State {
        self.state_guard().clone()
    }

    /// Newest applied `_id`.
    pub fn last_id(&self) -> u64 {
        self.state_guard().last_id
    }

    /// Oldest retained `_id`.
    pub fn first_index(&self) -> u64 {
        self.state_guard().first_index
    }

    /// The cluster id, once one was set.
    pub fn cluster_id(&self) -> Option<String> {
        self.state_guard().cluster_id.clone()
    }

    /// A receiver that sees the newest applied `_id` change once per applied batch.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// A value the owner stored with [`Txn::put_owner_meta`].
    pub fn owner_meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let cf = self.cf(cf::META)?;
        Ok(self.db.get_cf(&cf, owner_key(name))?)
    }

    /// Makes everything written so far durable (syncs the WAL).
    pub fn sync(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// Starts a write transaction. Only one writer may exist at a time; the caller (the state
    /// machine) guarantees that.
    pub fn begin(&self) -> Txn<'_> {
        Txn {
            store: self,
            batch: WriteBatch::default(),
            state: self.state(),
            tenants: Vec::new(),
            collections: Vec::new(),
            keys: HashMap::new(),
            idempotency: HashMap::new(),
        }
    }

    /// Writes a transaction atomically, then publishes it to readers and wakes long-polls.
    pub fn commit(&self, txn: Txn<'_>) -> Result<()> {
        let Txn {
            batch,
            state,
            tenants,
            collections,
            ..
        } = txn;
        self.db.write_opt(batch, &WriteOptions::default())?;
        if !tenants.is_empty() || !collections.is_empty() {
            let mut catalog = self.catalog.write().unwrap_or_else(|p| p.into_inner());
            for (id, name) in tenants {
                catalog.add_tenant(id, name);
            }
            for (id, rec) in collections {
                catalog.add_collection(id, rec);
            }
        }
        let last_id = state.last_id;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = state;
        self.applied.send_if_modified(|v| {
            let changed = *v != last_id;
            *v = last_id;
            changed
        });
        Ok(())
    }

    /// Reloads the in-memory mirrors after the database was replaced wholesale.
    pub(crate) fn reload(&self) -> Result<()> {
        let meta_cf = self.cf(cf::META)?;
        let state = State {
            last_id: read_u64(&self.db, meta_cf, meta::LAST_ID)?.unwrap_or(0),
            first_index: read_u64(&self.db, meta_cf, meta::FIRST_INDEX)?.unwrap_or(1),
            last_ts: read_u64(&self.db, meta_cf, meta::LAST_TS)?
                .map(|v| v as i64)
                .unwrap_or(0),
            next_tenant_id: read_u64(&self.db, meta_cf, meta::NEXT_TENANT_ID)?.unwrap_or(1),
            next_collection_id: read_u64(&self.db, meta_cf, meta::NEXT_COLLECTION_ID)?.unwrap_or(1),
            cluster_id: self
                .db
                .get_cf(&meta_cf, meta::CLUSTER_ID)?
                .map(|v| String::from_utf8_lossy(&v).into_owned()),
        };
        let catalog = load_catalog(&self.db)?;
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = catalog;
        let last_id = state.last_id;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = state;
        self.applied.send_replace(last_id);
        Ok(())
    }

    // ---- reads -------------------------------------------------------------------------

    /// Writes the JSON of up to `limit` changes with `_id > since` matching `filter` into
    /// `out`, comma-separated, and says what it wrote.
    pub fn read_page(
        &self,
        since: u64,
        limit: usize,
        filter: &Filter,
        out: &mut Vec<u8>,
    ) -> Result<PageInfo> {
        let (first_index, last_index) = {
            let s = self.state_guard();
            (s.first_index, s.last_id)
        };
        if since.saturating_add(1) < first_index {
            return Err(Rejection::Truncated { first_index }.into());
        }
        let mut info = PageInfo {
            count: 0,
            last_returned: None,
            more: false,
            first_index,
            last_index,
        };
        let start = since.saturating_add(1);
        if start > last_index || limit == 0 {
            return Ok(info);
        }
        let changes = self.cf(cf::CHANGES)?;
        // Returns false to stop the scan.
        let mut emit = |id: u64, value: &[u8]| -> Result<bool> {
            let c = StoredChange::decode(value)?;
            if !filter.matches(&c) {
                return Ok(true);
            }
            if info.count == limit {
                info.more = true;
                return Ok(false);
            }
            if info.count > 0 {
                out.push(b',');
            }
            out.extend_from_slice(c.json);
            info.count += 1;
            info.last_returned = Some(id);
            Ok(true)
        };
        if filter.tags.is_empty() && filter.tenant.is_none() && filter.change_type.is_none() {
            let mut it = self.db.raw_iterator_cf(&changes);
            it.seek(layout::id_key(start));
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                let id = layout::decode_u64(k).ok_or_else(|| Error::corrupt("changes", "key"))?;
                if id > last_index || !emit(id, v)? {
                    break;
                }
                it.next();
            }
            it.status()?;
            return Ok(info);
        }
        let mut source = self.index_source(filter, start)?;
        while let Some(id) = source.next_id()? {
            if id > last_index {
                break;
            }
            // A missing row was truncated after the index was read; skip it.
            if let Some(v) = self.db.get_pinned_cf(&changes, layout::id_key(id))? {
                if !emit(id, &v)? {
                    break;
                }
            }
        }
        Ok(info)
    }

    /// Picks the narrowest index for a filter: tags, else tenant, else type.
    fn index_source(&self, filter: &Filter, start: u64) -> Result<IndexSource<'_>> {
        let mut heads = Vec::new();
        if !filter.tags.is_empty() {
            let cf = self.cf(cf::BY_TAG)?;
            let mut seen = std::collections::HashSet::new();
            for tag in &filter.tags {
                if seen.insert(tag) {
                    let prefix = layout::tag_prefix(tag.as_bytes());
                    heads.push(Head::new(&self.db, cf, prefix, start)?);
                }
            }
        } else if let Some(t) = filter.tenant {
            let cf = self.cf(cf::BY_TENANT)?;
            heads.push(Head::new(&self.db, cf, t.to_be_bytes().to_vec(), start)?);
        } else if let Some(t) = filter.change_type {
            let cf = self.cf(cf::BY_TYPE)?;
            heads.push(Head::new(
                &self.db,
                cf,
                layout::ordered_i32(t).to_vec(),
                start,
            )?);
        }
        Ok(IndexSource { heads, last: 0 })
    }

    /// The `since` that starts a query at the first change with `_ts >= ts`.
    pub fn since_for_time(&self, ts: i64) -> Result<u64> {
        let last = self.last_id();
        let cf = self.cf(cf::BY_TS)?;
        let mut it = self.db.raw_iterator_cf(&cf);
        it.seek(layout::ts_key(ts, 0));
        let found = it.key().and_then(layout::trailing_id);
        it.status()?;
        Ok(match found {
            Some(id) if id <= last => id - 1,
            _ => last,
        })
    }

    /// The wire JSON of one change.
    pub fn get_change(&self, id: u64) -> Result<Option<Vec<u8>>> {
        if id == 0 || id > self.last_id() {
            return Ok(None);
        }
        let cf = self.cf(cf::CHANGES)?;
        match self.db.get_pinned_cf(&cf, layout::id_key(id))? {
            None => Ok(None),
            Some(v) => Ok(Some(StoredChange::decode(&v)?.json.to_vec())),
        }
    }

    /// Every tenant, by id.
    pub fn tenants(&self) -> Vec<Tenant> {
        self.catalog_guard()
            .tenants
            .iter()
            .map(|(&id, name)| Tenant {
                id,
                name: name.clone(),
            })
            .collect()
    }

    /// A tenant by name or id.
    pub fn tenant(&self, reference: &str) -> Option<Tenant> {
        self.catalog_guard()
            .tenant(reference)
            .map(|(id, name)| Tenant {
                id,
                name: name.to_owned(),
            })
    }

    /// A tenant's collections, by id.
    pub fn collections(&self, tenant_id: u64) -> Vec<Collection> {
        let cat = self.catalog_guard();
        cat.collections
            .iter()
            .filter(|(_, r)| r.tenant_id == tenant_id)
            .filter_map(|(&id, _)| cat.collection_view(id))
            .collect()
    }

    /// A collection by id, or by name when the name is unique across tenants.
    pub fn collection(&self, reference: &str) -> Result<Collection> {
        let cat = self.catalog_guard();
        cat.collection(reference, None)?
            .and_then(|id| cat.collection_view(id))
            .ok_or_else(|| Rejection::UnknownCollection(reference.to_owned()).into())
    }

    /// The wire JSON of a key's latest change, if the key is live.
    pub fn get_key(&self, collection: u64, key: &str) -> Result<Option<Vec<u8>>> {
        let cf = self.cf(cf::KEYS)?;
        Ok(self
            .db
            .get_pinned_cf(&cf, layout::coll_key(collection, key))?
            .map(|v| v.get(8..).unwrap_or_default().to_vec()))
    }

    /// Writes up to `limit` live keys of a collection after `after`, in key order, as a
    /// comma-separated list of their latest changes; returns how many.
    pub fn list_keys(
        &self,
        collection: u64,
        after: Option<&str>,
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Result<usize> {
        let cf = self.cf(cf::KEYS)?;
        let prefix = collection.to_be_bytes();
        let mut it = self.db.raw_iterator_cf(&cf);
        match after {
            Some(a) => {
                let mut k = layout::coll_key(collection, a);
                k.push(0);
                it.seek(&k);
            }
            None => it.seek(prefix),
        }
        let mut n = 0;
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if n == limit || !k.starts_with(&prefix) {
                break;
            }
            if n > 0 {
                out.push(b',');
            }
            out.extend_from_slice(v.get(8..).unwrap_or_default());
            n += 1;
            it.next();
        }
        it.status()?;
        Ok(n)
    }
}

fn owner_key(name: &str) -> Vec<u8> {
    let mut k = meta::OWNER_PREFIX.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

fn load_catalog(db: &DB) -> Result<Catalog> {
    let cf = db
        .cf_handle(cf::CATALOG)
        .ok_or_else(|| Error::corrupt("catalog", "missing column family"))?;
    let mut cat = Catalog::default();
    let mut collections = Vec::new();
    for item in db.iterator_cf(&cf, rocksdb::IteratorMode::Start) {
        let (k, v) = item?;
        let id = layout::decode_u64(&k[1..]).ok_or_else(|| Error::corrupt("catalog", "key"))?;
        match k.first() {
            Some(b'T') => cat.add_tenant(id, String::from_utf8_lossy(&v).into_owned()),
            Some(b'C') => {
                let tenant_id =
                    layout::decode_u64(&v).ok_or_else(|| Error::corrupt("catalog", "value"))?;
                let name = String::from_utf8_lossy(&v[8..]).into_owned();
                collections.push((id, CollectionRec { tenant_id, name }));
            }
            _ => return Err(Error::corrupt("catalog", "unknown record kind")),
        }
    }
    for (id, rec) in collections {
        cat.add_collection(id, rec);
    }
    Ok(cat)
}

/// One index prefix being walked in `_id` order.
struct Head<'a> {
    it: DBRawIteratorWithThreadMode<'a, DB>,
    prefix: Vec<u8>,
    current: Option<u64>,
}

impl<'a> Head<'a> {
    fn new(db: &'a DB, cf: &ColumnFamily, prefix: Vec<u8>, start: u64) -> Result<Self> {
        let mut it = db.raw_iterator_cf(cf);
        let mut seek = prefix.clone();
        seek.extend_from_slice(&start.to_be_bytes());
        it.seek(&seek);
        let mut head = Head {
            it,
            prefix,
            current: None,
        };
        head.load()?;
        Ok(head)
    }

    fn load(&mut self) -> Result<()> {
        self.current = match self.it.key() {
            Some(k) if k.len() == self.prefix.len() + 8 && k.starts_with(&self.prefix) => {
                layout::trailing_id(k)
            }
            _ => None,
        };
        self.it.status()?;
        Ok(())
    }

    fn advance(&mut self) -> Result<()> {
        self.it.next();
        self.load()
    }
}

/// Merges index heads into one ascending, duplicate-free `_id` stream.
struct IndexSource<'a> {
    heads: Vec<Head<'a>>,
    last: u64,
}

impl IndexSource<'_> {
    fn next_id(&mut self) -> Result<Option<u64>> {
        loop {
            let Some(min) = self.heads.iter().filter_map(|h| h.current).min() else {
                return Ok(None);
            };
            for h in &mut self.heads {
                if h.current == Some(min) {
                    h.advance()?;
                }
            }
            if min > self.last {
                self.last = min;
                return Ok(Some(min));
            }
        }
    }
}

/// A write transaction: resolves names, checks preconditions, and stages every row of a
/// batch in one RocksDB `WriteBatch`, so a batch lands whole or not at all.
///
/// Each operation validates everything before it stages anything, so a failed operation leaves
/// the transaction as it was and later operations in the same batch still apply.
pub struct Txn<'s> {
    store: &'s Store,
    batch: WriteBatch,
    state: State,
    tenants: Vec<(u64, String)>,
    collections: Vec<(u64, CollectionRec)>,
    /// Keys written in this transaction: collection key → live.
    keys: HashMap<Vec<u8>, bool>,
    /// Idempotency keys remembered in this transaction.
    idempotency: HashMap<String, Vec<u8>>,
}

struct ResolvedRefs {
    tenant: Option<(u64, String)>,
    collection: Option<(u64, String)>,
}

impl Txn<'_> {
    /// The scalars as this transaction will leave them.
    pub fn state(&self) -> &State {
        &self.state
    }

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

    /// Creates a tenant.
    pub fn create_tenant(&mut self, name: &str) -> Result<Tenant> {
        validate_name(name)?;
        if self.find_tenant(name).is_some() {
            return Err(Rejection::TenantExists(name.to_owned()).into());
        }
        let id = self.state.next_tenant_id;
        self.state.next_tenant_id += 1;
        let cf = self.store.cf(cf::CATALOG)?;
        self.batch
            .put_cf(&cf, layout::tenant_catalog_key(id), name.as_bytes());
        let meta = self.store.cf(cf::META)?;
        self.batch.put_cf(
            &meta,
            meta::NEXT_TENANT_ID,
            self.state.next_tenant_id.to_be_bytes(),
        );
        self.tenants.push((id, name.to_owned()));
        Ok(Tenant {
            id,
            name: name.to_owned(),
        })
    }

    /// Creates a collection in a tenant (name or id).
    pub fn create_collection(&mut self, tenant: &str, name: &str) -> Result<Collection> {
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
        let id = self.state.next_collection_id;
        self.state.next_collection_id += 1;
        let cf = self.store.cf(cf::CATALOG)?;
        let mut value = tenant_id.to_be_bytes().to_vec();
        value.extend_from_slice(name.as_bytes());
        self.batch
            .put_cf(&cf, layout::collection_catalog_key(id), value);
        let meta = self.store.cf(cf::META)?;
        self.batch.put_cf(
            &meta,
            meta::NEXT_COLLECTION_ID,
            self.state.next_collection_id.to_be_bytes(),
        );
        self.collections.push((
            id,
            CollectionRec {
                tenant_id,
                name: name.to_owned(),
            },
        ));
        Ok(Collection {
            id,
            name: name.to_owned(),
            tenant: tenant_name,
        })
    }

    fn key_is_live(&self, coll_key: &[u8]) -> Result<bool> {
        if let Some(&live) = self.keys.get(coll_key) {
            return Ok(live);
        }
        let cf = self.store.cf(cf::KEYS)?;
        Ok(self.store.db.get_pinned_cf(&cf, coll_key)?.is_some())
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
                        None => self.key_is_live(&ck)?,
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
        // 2. Stage rows: change, indexes, keyed state.
        let cf_changes = self.store.cf(cf::CHANGES)?;
        let cf_tag = self.store.cf(cf::BY_TAG)?;
        let cf_type = self.store.cf(cf::BY_TYPE)?;
        let cf_tenant = self.store.cf(cf::BY_TENANT)?;
        let cf_ts = self.store.cf(cf::BY_TS)?;
        let cf_keys = self.store.cf(cf::KEYS)?;
        let ts = ts.max(self.state.last_ts);
        let mut ids = Vec::with_capacity(changes.len());
        for (c, r) in changes.iter().zip(&refs) {
            let id = self.state.last_id + 1;
            let resolved = Resolved {
                id,
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
            self.batch.put_cf(
                &cf_changes,
                layout::id_key(id),
                resolved.stored_value(&json),
            );
            for tag in &c.tags {
                self.batch
                    .put_cf(&cf_tag, layout::tag_key(tag.as_bytes(), id), []);
            }
            self.batch
                .put_cf(&cf_type, layout::type_key(c.change_type, id), []);
            if let Some((tid, _)) = &r.tenant {
                self.batch
                    .put_cf(&cf_tenant, layout::pair_key(*tid, id), []);
            }
            self.batch.put_cf(&cf_ts, layout::ts_key(ts, id), []);
            if let (Some((cid, _)), Some(key)) = (&r.collection, &c.key) {
                let ck = layout::coll_key(*cid, key);
                if c.deleted {
                    self.batch.delete_cf(&cf_keys, &ck);
                    self.keys.insert(ck, false);
                } else {
                    let mut v = id.to_be_bytes().to_vec();
                    v.extend_from_slice(&json);
                    self.batch.put_cf(&cf_keys, &ck, v);
                    self.keys.insert(ck, true);
                }
            }
            self.state.last_id = id;
            ids.push(id);
        }
        self.state.last_ts = ts;
        let meta_cf = self.store.cf(cf::META)?;
        self.batch
            .put_cf(&meta_cf, meta::LAST_ID, self.state.last_id.to_be_bytes());
        self.batch
            .put_cf(&meta_cf, meta::LAST_TS, (ts as u64).to_be_bytes());
        Ok(ids)
    }

    /// The answer stored for an idempotency key, if the key was seen and not yet expired.
    pub fn idempotent_answer(&self, key: &str) -> Result<Option<Vec<u8>>> {
        if let Some(a) = self.idempotency.get(key) {
            return Ok(Some(a.clone()));
        }
        let cf = self.store.cf(cf::IDEMPOTENCY)?;
        Ok(self
            .store
            .db
            .get_pinned_cf(&cf, key.as_bytes())?
            .map(|v| v.get(8..).unwrap_or_default().to_vec()))
    }

    /// Remembers the answer given for an idempotency key.
    pub fn remember_idempotent(&mut self, key: &str, ts: i64, answer: Vec<u8>) -> Result<()> {
        let cf = self.store.cf(cf::IDEMPOTENCY)?;
        let by_ts = self.store.cf(cf::IDEMPOTENCY_BY_TS)?;
        let mut v = layout::ordered_i64(ts).to_vec();
        v.extend_from_slice(&answer);
        self.batch.put_cf(&cf, key.as_bytes(), v);
        let mut k = layout::ordered_i64(ts).to_vec();
        k.extend_from_slice(key.as_bytes());
        self.batch.put_cf(&by_ts, k, []);
        self.idempotency.insert(key.to_owned(), answer);
        Ok(())
    }

    /// Forgets idempotency keys remembered before `now - IDEMPOTENCY_TTL_NANOS`. Bounded work:
    /// at most `max` keys per call, so one batch never stalls on a backlog.
    pub fn expire_idempotency(&mut self, now: i64, max: usize) -> Result<usize> {
        let cutoff = layout::ordered_i64(now.saturating_sub(IDEMPOTENCY_TTL_NANOS));
        let cf = self.store.cf(cf::IDEMPOTENCY)?;
        let by_ts = self.store.cf(cf::IDEMPOTENCY_BY_TS)?;
        let mut it = self.store.db.raw_iterator_cf(&by_ts);
        it.seek_to_first();
        let mut n = 0;
        while let Some(k) = it.key() {
            if n == max || k.len() < 8 || k[..8] >= cutoff[..] {
                break;
            }
            let key = &k[8..];
            // Only forget the key if it was not re-remembered later.
            let current = self.store.db.get_pinned_cf(&cf, key)?;
            if current
                .as_deref()
                .is_some_and(|v| v.get(..8) == Some(&k[..8]))
            {
                self.batch.delete_cf(&cf, key);
            }
            self.batch.delete_cf(&by_ts, k);
            n += 1;
            it.next();
        }
        it.status()?;
        Ok(n)
    }

    /// Stores a value of the owner's with this batch (e.g. the Raft applied log id).
    pub fn put_owner_meta(&mut self, name: &str, value: &[u8]) -> Result<()> {
        let cf = self.store.cf(cf::META)?;
        self.batch.put_cf(&cf, owner_key(name), value);
        Ok(())
    }

    /// Sets the cluster id (once, at cluster initialization).
    pub fn set_cluster_id(&mut self, id: &str) -> Result<()> {
        let cf = self.store.cf(cf::META)?;
        self.batch.put_cf(&cf, meta::CLUSTER_ID, id.as_bytes());
        self.state.cluster_id = Some(id.to_owned());
        Ok(())
    }
}
