//! The change store: opening it, its in-memory mirrors (scalars and catalog), and the reads
//! (pages of changes, keys, catalog, checkpoints) that serve the API. Writes go through
//! [`Txn`](crate::txn::Txn).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use changeagent_proto::checkpoint::OpenStart;
use changeagent_proto::types::{CollectionRecord, TenantRecord};
use changeagent_proto::{Manifest, Scope};
use rocksdb::{DBRawIteratorWithThreadMode, DB};
use tokio::sync::watch;

use crate::db::{self, Db};
use crate::error::{Error, Rejection, Result};
use crate::feed::TailCache;
use crate::layout::{self, cf, meta};
use crate::record::StoredChange;

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

impl PageInfo {
    fn empty(first_index: u64, last_index: u64) -> PageInfo {
        PageInfo {
            count: 0,
            last_returned: None,
            more: false,
            first_index,
            last_index,
        }
    }
}

/// Writes one page: the changes it is offered, in `_id` order, that match its filter, until
/// its limit (and one more seen, which sets `more`). The store and the tail cache offer
/// changes to it alike.
struct PageWriter<'a> {
    filter: &'a Filter,
    limit: usize,
    info: PageInfo,
    out: &'a mut Vec<u8>,
}

impl<'a> PageWriter<'a> {
    /// A writer for the changes after `since`; `None` when there can be none (nothing after
    /// `since`, or `limit` 0); [`Rejection::Truncated`] when `since` is before what is kept.
    fn start(
        since: u64,
        limit: usize,
        filter: &'a Filter,
        first_index: u64,
        last_index: u64,
        out: &'a mut Vec<u8>,
    ) -> Result<Option<PageWriter<'a>>> {
        if since.saturating_add(1) < first_index {
            return Err(Rejection::Truncated { first_index }.into());
        }
        if since.saturating_add(1) > last_index || limit == 0 {
            return Ok(None);
        }
        Ok(Some(PageWriter {
            filter,
            limit,
            info: PageInfo::empty(first_index, last_index),
            out,
        }))
    }

    /// Offers one stored change; false once the page is full.
    fn emit(&mut self, id: u64, value: &[u8]) -> Result<bool> {
        let c = StoredChange::decode(value)?;
        if !self.filter.matches(&c) {
            return Ok(true);
        }
        if self.info.count == self.limit {
            self.info.more = true;
            return Ok(false);
        }
        if self.info.count > 0 {
            self.out.push(b',');
        }
        self.out.extend_from_slice(c.json);
        self.info.count += 1;
        self.info.last_returned = Some(id);
        Ok(true)
    }
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

impl State {
    pub(crate) fn load(db: &Db) -> Result<State> {
        Ok(State {
            last_id: db.meta_u64(meta::LAST_ID)?.unwrap_or(0),
            first_index: db.meta_u64(meta::FIRST_INDEX)?.unwrap_or(1),
            last_ts: db.meta_u64(meta::LAST_TS)?.map_or(0, |v| v as i64),
            next_tenant_id: db.meta_u64(meta::NEXT_TENANT_ID)?.unwrap_or(1),
            next_collection_id: db.meta_u64(meta::NEXT_COLLECTION_ID)?.unwrap_or(1),
            cluster_id: db
                .db
                .get_cf(db.cf(cf::META)?, meta::CLUSTER_ID)?
                .map(|v| String::from_utf8_lossy(&v).into_owned()),
        })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct CollectionRec {
    pub tenant_id: u64,
    pub name: String,
}

/// Tenants and collections, all in memory (they are few), mirrored from `catalog`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Catalog {
    pub tenants: BTreeMap<u64, String>,
    tenant_ids: HashMap<String, u64>,
    pub collections: BTreeMap<u64, CollectionRec>,
    collection_ids: HashMap<String, Vec<u64>>,
}

impl Catalog {
    pub fn add_tenant(&mut self, id: u64, name: String) {
        self.tenant_ids.insert(name.clone(), id);
        self.tenants.insert(id, name);
    }

    pub fn add_collection(&mut self, id: u64, rec: CollectionRec) {
        self.collection_ids
            .entry(rec.name.clone())
            .or_default()
            .push(id);
        self.collections.insert(id, rec);
    }

    pub fn tenant(&self, reference: &str) -> Option<(u64, &str)> {
        if let Some(&id) = self.tenant_ids.get(reference) {
            return Some((id, self.tenants.get(&id)?.as_str()));
        }
        let id: u64 = reference.parse().ok()?;
        self.tenants.get(&id).map(|n| (id, n.as_str()))
    }

    pub fn collection(&self, reference: &str, tenant: Option<u64>) -> Result<Option<u64>> {
        if let Ok(id) = reference.parse::<u64>() {
            // An id names one collection whatever the tenant; the caller checks ownership.
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

/// Reads a catalog record (the wire JSON of a tenant- or collection-created change).
pub(crate) fn catalog_record_data<T: serde::de::DeserializeOwned>(json: &[u8]) -> Result<T> {
    #[derive(serde::Deserialize)]
    struct Data<T> {
        data: T,
    }
    serde_json::from_slice::<Data<T>>(json)
        .map(|d| d.data)
        .map_err(|e| Error::corrupt("catalog", e))
}

fn load_catalog(db: &Db) -> Result<Catalog> {
    let mut cat = Catalog::default();
    let mut collections = Vec::new();
    for item in db
        .db
        .iterator_cf(db.cf(cf::CATALOG)?, rocksdb::IteratorMode::Start)
    {
        let (k, v) = item?;
        match k.first() {
            Some(b'T') => {
                let t: TenantRecord = catalog_record_data(&v)?;
                cat.add_tenant(t.id, t.name);
            }
            Some(b'C') => collections.push(catalog_record_data::<CollectionRecord>(&v)?),
            _ => return Err(Error::corrupt("catalog", "unknown record kind")),
        }
    }
    for c in collections {
        let tenant_id = cat.tenant(&c.tenant).map(|(id, _)| id).ok_or_else(|| {
            Error::corrupt(
                "catalog",
                format!("collection {} names unknown tenant {}", c.id, c.tenant),
            )
        })?;
        cat.add_collection(
            c.id,
            CollectionRec {
                tenant_id,
                name: c.name,
            },
        );
    }
    Ok(cat)
}

/// The live generation and the scalars as of its last committed batch, swapped together.
pub(crate) struct Current {
    pub db: Arc<Db>,
    pub state: State,
}

/// The RocksDB change list with its indexes, keyed state, catalog and checkpoint records.
///
/// One writer (the Raft state machine, or a tailer) applies [`Txn`](crate::Txn)s; any number
/// of readers query concurrently. Readers never see past `State::last_id`, which moves only
/// after a batch is fully written. An import builds a new generation and swaps it in whole
/// ([`Store::import`]).
pub struct Store {
    root: PathBuf,
    pub(crate) current: RwLock<Current>,
    pub(crate) catalog: RwLock<Catalog>,
    /// Newest applied `_id`; long-polls subscribe. The store owns the sender; receivers close
    /// when the store is dropped.
    applied: watch::Sender<u64>,
    /// The newest changes, which wake-ups read instead of RocksDB (see `feed`).
    pub(crate) feed: TailCache,
    /// Compactions running after truncations; each holds its generation open, so the store
    /// joins them when dropped.
    pub(crate) compactions: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        let handles =
            std::mem::take(&mut *self.compactions.lock().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.root).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the store in `path`. Fails on data of another format
    /// version, saying what to do.
    pub fn open(path: impl AsRef<Path>) -> Result<Arc<Store>> {
        let root = path.as_ref().to_path_buf();
        let db = db::open_live(&root)?;
        Store::over(root, db).map(Arc::new)
    }

    /// A store over an open generation.
    pub(crate) fn over(root: PathBuf, db: Db) -> Result<Store> {
        let state = State::load(&db)?;
        let catalog = load_catalog(&db)?;
        let (applied, _) = watch::channel(state.last_id);
        Ok(Store {
            root,
            current: RwLock::new(Current {
                db: Arc::new(db),
                state,
            }),
            catalog: RwLock::new(catalog),
            applied,
            feed: TailCache::default(),
            compactions: Default::default(),
        })
    }

    /// Directory of the store.
    pub fn path(&self) -> &Path {
        &self.root
    }

    fn current_guard(&self) -> RwLockReadGuard<'_, Current> {
        // A poisoned lock only means a panic elsewhere; the value itself is always whole.
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn catalog_guard(&self) -> RwLockReadGuard<'_, Catalog> {
        self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The live generation.
    pub(crate) fn db(&self) -> Arc<Db> {
        self.current_guard().db.clone()
    }

    /// The scalars as of the last committed batch.
    pub fn state(&self) -> State {
        self.current_guard().state.clone()
    }

    /// Newest applied `_id`.
    pub fn last_id(&self) -> u64 {
        self.current_guard().state.last_id
    }

    /// Oldest retained `_id`.
    pub fn first_index(&self) -> u64 {
        self.current_guard().state.first_index
    }

    /// The cluster id, once one was set.
    pub fn cluster_id(&self) -> Option<String> {
        self.with_cluster_id(|id| id.map(str::to_owned))
    }

    /// Calls `f` with the cluster id, without copying it (read on every answer).
    pub fn with_cluster_id<R>(&self, f: impl FnOnce(Option<&str>) -> R) -> R {
        f(self.current_guard().state.cluster_id.as_deref())
    }

    /// A receiver that sees the newest applied `_id` change once per applied batch.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Publishes a new newest `_id` to long-polls; `replaced`: the whole state was (an
    /// import), so every waiter looks again even if the newest `_id` is the same.
    pub(crate) fn publish(&self, last_id: u64, replaced: bool) {
        if replaced {
            self.applied.send_replace(last_id);
        } else {
            self.applied.send_if_modified(|v| {
                let changed = *v != last_id;
                *v = last_id;
                changed
            });
        }
    }

    /// A value the owner stored with [`Txn::put_owner_meta`](crate::Txn::put_owner_meta).
    pub fn owner_meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let db = self.db();
        Ok(db.db.get_cf(db.cf(cf::META)?, owner_key(name))?)
    }

    /// Makes everything written so far durable (syncs the WAL).
    pub fn sync(&self) -> Result<()> {
        self.db().db.flush_wal(true)?;
        Ok(())
    }

    // ---- reads -------------------------------------------------------------------------

    /// [`Store::read_page`] from the tail cache alone: `None` when the cache does not reach
    /// back to `since`, and the caller must read the store (off the async workers). Never
    /// blocks on I/O, so long-poll wake-ups call it on the async workers.
    pub fn read_page_cached(
        &self,
        since: u64,
        limit: usize,
        filter: &Filter,
        out: &mut Vec<u8>,
    ) -> Option<Result<PageInfo>> {
        let (first_index, last_index) = {
            let c = self.current_guard();
            (c.state.first_index, c.state.last_id)
        };
        let mut page = match PageWriter::start(since, limit, filter, first_index, last_index, out) {
            Ok(Some(page)) => page,
            Ok(None) => return Some(Ok(PageInfo::empty(first_index, last_index))),
            Err(e) => return Some(Err(e)),
        };
        let scanned = self
            .feed
            .scan(since + 1, last_index, |id, value| page.emit(id, value))?;
        Some(scanned.map(|()| page.info))
    }

    /// Writes the JSON of up to `limit` changes with `_id > since` matching `filter` into
    /// `out`, comma-separated, and says what it wrote.
    pub fn read_page(
        &self,
        since: u64,
        limit: usize,
        filter: &Filter,
        out: &mut Vec<u8>,
    ) -> Result<PageInfo> {
        let (db, first_index, last_index) = {
            let c = self.current_guard();
            (c.db.clone(), c.state.first_index, c.state.last_id)
        };
        let Some(mut page) = PageWriter::start(since, limit, filter, first_index, last_index, out)?
        else {
            return Ok(PageInfo::empty(first_index, last_index));
        };
        let start = since + 1;
        let changes = db.cf(cf::CHANGES)?;
        if filter.is_unfiltered() {
            let mut it = db.db.raw_iterator_cf(changes);
            it.seek(layout::id_key(start));
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                let id = layout::decode_u64(k).ok_or_else(|| Error::corrupt("changes", "key"))?;
                if id > last_index || !page.emit(id, v)? {
                    break;
                }
                it.next();
            }
            it.status()?;
            return Ok(page.info);
        }
        let mut source = index_source(&db, filter, start)?;
        while let Some(id) = source.next_id()? {
            if id > last_index {
                break;
            }
            // A missing row was truncated after the index was read; skip it.
            if let Some(v) = db.db.get_pinned_cf(changes, layout::id_key(id))? {
                if !page.emit(id, &v)? {
                    break;
                }
            }
        }
        Ok(page.info)
    }

    /// The `since` that starts a query at the first retained change with `_ts >= ts`.
    pub fn since_for_time(&self, ts: i64) -> Result<u64> {
        let (db, first, last) = {
            let c = self.current_guard();
            (c.db.clone(), c.state.first_index, c.state.last_id)
        };
        let mut it = db.db.raw_iterator_cf(db.cf(cf::BY_TS)?);
        it.seek(layout::ts_key(ts, 0));
        // Entries below the first index may linger until compaction; skip over them.
        let found = loop {
            match it.key().and_then(layout::trailing_id) {
                Some(id) if id < first => it.next(),
                other => break other,
            }
        };
        it.status()?;
        Ok(match found {
            Some(id) if id <= last => id - 1,
            _ => last,
        })
    }

    /// Whether any change after `since` is a client's change or a catalog record, i.e.
    /// anything but checkpoint and truncate records: whether the state a checkpoint holds
    /// moved. Stops at the first such change.
    pub fn has_data_after(&self, since: u64) -> Result<bool> {
        let db = self.db();
        let mut it = db.db.raw_iterator_cf(db.cf(cf::CHANGES)?);
        it.seek(layout::id_key(since.saturating_add(1)));
        while let Some(v) = it.value() {
            let t = StoredChange::decode(v)?.change_type;
            let housekeeping = t == changeagent_proto::types::internal_type::CHECKPOINT_START
                || t == changeagent_proto::types::internal_type::CHECKPOINT_END
                || t == changeagent_proto::types::internal_type::TRUNCATE;
            if !housekeeping {
                return Ok(true);
            }
            it.next();
        }
        it.status()?;
        Ok(false)
    }

    /// The wire JSON of one change; a truncated one is a [`Rejection::Truncated`].
    pub fn get_change(&self, id: u64) -> Result<Option<Vec<u8>>> {
        let (db, first, last) = {
            let c = self.current_guard();
            (c.db.clone(), c.state.first_index, c.state.last_id)
        };
        if id == 0 || id > last {
            return Ok(None);
        }
        if id < first {
            return Err(Rejection::Truncated { first_index: first }.into());
        }
        let row = db
            .db
            .get_pinned_cf(db.cf(cf::CHANGES)?, layout::id_key(id))?;
        match row {
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
        let db = self.db();
        let row = db
            .db
            .get_pinned_cf(db.cf(cf::KEYS)?, layout::coll_key(collection, key))?;
        Ok(row.map(|v| v.get(8..).unwrap_or_default().to_vec()))
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
        let db = self.db();
        let prefix = collection.to_be_bytes();
        let mut it = db.db.raw_iterator_cf(db.cf(cf::KEYS)?);
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

    /// Committed checkpoints the store keeps, newest first: of one scope, or of every scope
    /// (then by index, newest first).
    pub fn manifests(&self, scope: Option<&Scope>) -> Result<Vec<Manifest>> {
        let db = self.db();
        let prefix = match scope {
            Some(s) => layout::manifest_prefix(s),
            None => layout::all_manifests_prefix().to_vec(),
        };
        let mut out: Vec<Manifest> = scan_json(&db, cf::CHECKPOINTS, &prefix)?;
        out.sort_by(|a, b| b.index.cmp(&a.index).then_with(|| a.scope.cmp(&b.scope)));
        Ok(out)
    }

    /// The newest committed checkpoint of a scope.
    pub fn latest_manifest(&self, scope: &Scope) -> Result<Option<Manifest>> {
        Ok(self.manifests(Some(scope))?.into_iter().next())
    }

    /// The checkpoint to point a consumer at after a 410: for a tenant's list, that tenant's
    /// newest scoped checkpoint when there is one, else the newest full checkpoint.
    pub fn manifest_for_reset(&self, tenant: Option<&str>) -> Result<Option<Manifest>> {
        if let Some(t) = tenant {
            if let Some(m) = self.latest_manifest(&Scope::Tenant(t.to_owned()))? {
                return Ok(Some(m));
            }
        }
        self.latest_manifest(&Scope::All)
    }

    /// Checkpoint starts without their end record yet.
    pub fn open_starts(&self) -> Result<Vec<OpenStart>> {
        scan_json(
            &self.db(),
            cf::CHECKPOINTS,
            &layout::all_open_starts_prefix(),
        )
    }
}

/// Every JSON value under a key prefix.
pub(crate) fn scan_json<T: serde::de::DeserializeOwned>(
    db: &Db,
    name: &'static str,
    prefix: &[u8],
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    let mut it = db.db.raw_iterator_cf(db.cf(name)?);
    it.seek(prefix);
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if !k.starts_with(prefix) {
            break;
        }
        out.push(serde_json::from_slice(v).map_err(|e| Error::corrupt("checkpoints", e))?);
        it.next();
    }
    it.status()?;
    Ok(out)
}

pub(crate) fn owner_key(name: &str) -> Vec<u8> {
    let mut k = meta::OWNER_PREFIX.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

/// Picks the narrowest index for a filter: tags, else tenant, else type.
fn index_source<'a>(db: &'a Db, filter: &Filter, start: u64) -> Result<IndexSource<'a>> {
    let mut heads = Vec::new();
    if !filter.tags.is_empty() {
        let cf = db.cf(cf::BY_TAG)?;
        let mut seen = std::collections::HashSet::new();
        for tag in &filter.tags {
            if seen.insert(tag) {
                let prefix = layout::tag_prefix(tag.as_bytes());
                heads.push(Head::new(&db.db, cf, prefix, start)?);
            }
        }
    } else if let Some(t) = filter.tenant {
        let cf = db.cf(cf::BY_TENANT)?;
        heads.push(Head::new(&db.db, cf, t.to_be_bytes().to_vec(), start)?);
    } else if let Some(t) = filter.change_type {
        let cf = db.cf(cf::BY_TYPE)?;
        heads.push(Head::new(
            &db.db,
            cf,
            layout::ordered_i32(t).to_vec(),
            start,
        )?);
    }
    Ok(IndexSource { heads, last: 0 })
}

/// One index prefix being walked in `_id` order.
struct Head<'a> {
    it: DBRawIteratorWithThreadMode<'a, DB>,
    prefix: Vec<u8>,
    current: Option<u64>,
}

impl<'a> Head<'a> {
    fn new(db: &'a DB, cf: &rocksdb::ColumnFamily, prefix: Vec<u8>, start: u64) -> Result<Self> {
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
