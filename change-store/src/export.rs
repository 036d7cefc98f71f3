//! The checkpoint file: the full state as of one `_id`, as zstd-compressed JSON Lines.
//! Line 1 is a header; then one change per line in `_id` order (every retained change and the
//! latest change of every live key); then, for Raft snapshots only, one line per remembered
//! idempotency key. `zstd -dc file | jq` reads it.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};

use rocksdb::{IteratorMode, WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{Error, Result};
use crate::layout::{self, cf, meta};
use crate::record::{Resolved, StoredChange};
use crate::store::{Collection, Store, Tenant};

/// The `format` field of the header line.
pub const CHECKPOINT_FORMAT: &str = "changeagent-checkpoint";
/// The checkpoint format version this build writes and reads.
pub const CHECKPOINT_VERSION: u32 = 1;
/// zstd level: level 3 is zstd's default, a good ratio at well over 100 MB/s.
const ZSTD_LEVEL: i32 = 3;

/// Line 1 of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub cluster_id: Option<String>,
    /// The state is as of this `_id`.
    pub index: u64,
    /// Change lines that follow.
    pub records: u64,
    pub created_ts: i64,
    /// Oldest retained `_id` in the state.
    pub first_index: u64,
    pub last_ts: i64,
    pub next_tenant_id: u64,
    pub next_collection_id: u64,
    pub tenants: Vec<Tenant>,
    pub collections: Vec<Collection>,
    /// Idempotency lines that follow the changes.
    #[serde(default)]
    pub idempotency_keys: u64,
    /// The store owner's values (Raft applied log id and membership), for Raft snapshots.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub owner: BTreeMap<String, String>,
}

/// What to include in an export.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExportOptions {
    /// Include remembered idempotency keys (Raft snapshots need them; checkpoints for
    /// consumers do not).
    pub idempotency: bool,
    /// Include the owner's values (see [`Header::owner`]).
    pub owner: bool,
}

#[derive(Serialize, Deserialize)]
struct IdempotencyLine<'a> {
    #[serde(rename = "_idempotency", borrow)]
    key: std::borrow::Cow<'a, str>,
    ts: i64,
    #[serde(borrow)]
    answer: &'a RawValue,
}

#[derive(Deserialize)]
struct ChangeLine<'a> {
    #[serde(rename = "_id")]
    id: u64,
    #[serde(rename = "_ts", default)]
    ts: i64,
    #[serde(rename = "type", default)]
    change_type: i32,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    collection: Option<String>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    deleted: bool,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

fn snapshot_u64(
    snap: &rocksdb::Snapshot<'_>,
    cf: &impl rocksdb::AsColumnFamilyRef,
    key: &[u8],
) -> Result<Option<u64>> {
    match snap.get_cf(cf, key)? {
        None => Ok(None),
        Some(v) => layout::decode_u64(&v)
            .map(Some)
            .ok_or_else(|| Error::corrupt("meta", String::from_utf8_lossy(key))),
    }
}

impl Store {
    /// Writes the full state, read from one consistent RocksDB snapshot, as a checkpoint.
    pub fn export(&self, out: impl Write, opts: ExportOptions) -> Result<Header> {
        let db = self.db();
        let snap = db.snapshot();
        let meta_cf = self.cf(cf::META)?;
        let last_id = snapshot_u64(&snap, &meta_cf, meta::LAST_ID)?.unwrap_or(0);
        let first_index = snapshot_u64(&snap, &meta_cf, meta::FIRST_INDEX)?.unwrap_or(1);

        // Catalog as of the snapshot.
        let cat_cf = self.cf(cf::CATALOG)?;
        let mut tenants = Vec::new();
        let mut raw_collections = Vec::new();
        for item in snap.iterator_cf(&cat_cf, IteratorMode::Start) {
            let (k, v) = item?;
            let id = layout::decode_u64(&k[1..]).ok_or_else(|| Error::corrupt("catalog", "key"))?;
            match k.first() {
                Some(b'T') => tenants.push(Tenant {
                    id,
                    name: String::from_utf8_lossy(&v).into_owned(),
                }),
                Some(b'C') => {
                    let tid =
                        layout::decode_u64(&v).ok_or_else(|| Error::corrupt("catalog", "value"))?;
                    raw_collections.push((id, tid, String::from_utf8_lossy(&v[8..]).into_owned()));
                }
                _ => return Err(Error::corrupt("catalog", "unknown record kind")),
            }
        }
        let tenant_names: HashMap<u64, String> =
            tenants.iter().map(|t| (t.id, t.name.clone())).collect();
        let collections = raw_collections
            .into_iter()
            .map(|(id, tid, name)| Collection {
                id,
                name,
                tenant: tenant_names.get(&tid).cloned().unwrap_or_default(),
            })
            .collect();

        // Live keys whose latest change was truncated from the list.
        let keys_cf = self.cf(cf::KEYS)?;
        let mut orphan_keys = Vec::new();
        for item in snap.iterator_cf(&keys_cf, IteratorMode::Start) {
            let (_, v) = item?;
            let id = layout::decode_u64(&v).ok_or_else(|| Error::corrupt("keys", "value"))?;
            if id < first_index {
                orphan_keys.push((id, v.get(8..).unwrap_or_default().to_vec()));
            }
        }
        orphan_keys.sort_by_key(|(id, _)| *id);
        let changes_cf = self.cf(cf::CHANGES)?;
        let retained = snap
            .iterator_cf(&changes_cf, IteratorMode::Start)
            .take_while(|item| match item {
                Ok((k, _)) => layout::decode_u64(k).is_some_and(|id| id <= last_id),
                Err(_) => true,
            })
            .count() as u64;
        let idem_cf = self.cf(cf::IDEMPOTENCY)?;
        let idempotency_keys = if opts.idempotency {
            snap.iterator_cf(&idem_cf, IteratorMode::Start).count() as u64
        } else {
            0
        };

        let mut owner = BTreeMap::new();
        if opts.owner {
            let prefix = meta::OWNER_PREFIX;
            for item in snap.iterator_cf(
                &meta_cf,
                IteratorMode::From(prefix, rocksdb::Direction::Forward),
            ) {
                let (k, v) = item?;
                let Some(name) = k.strip_prefix(prefix) else {
                    break;
                };
                owner.insert(
                    String::from_utf8_lossy(name).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                );
            }
        }
        let header = Header {
            owner,
            format: CHECKPOINT_FORMAT.to_owned(),
            version: CHECKPOINT_VERSION,
            cluster_id: snap
                .get_cf(&meta_cf, meta::CLUSTER_ID)?
                .map(|v| String::from_utf8_lossy(&v).into_owned()),
            index: last_id,
            records: retained + orphan_keys.len() as u64,
            created_ts: now_nanos(),
            first_index,
            last_ts: snapshot_u64(&snap, &meta_cf, meta::LAST_TS)?.map_or(0, |v| v as i64),
            next_tenant_id: snapshot_u64(&snap, &meta_cf, meta::NEXT_TENANT_ID)?.unwrap_or(1),
            next_collection_id: snapshot_u64(&snap, &meta_cf, meta::NEXT_COLLECTION_ID)?
                .unwrap_or(1),
            tenants,
            collections,
            idempotency_keys,
        };

        let mut z = zstd::Encoder::new(out, ZSTD_LEVEL)?;
        serde_json::to_writer(&mut z, &header).map_err(|e| Error::Checkpoint(e.to_string()))?;
        z.write_all(b"\n")?;
        for (_, json) in &orphan_keys {
            z.write_all(json)?;
            z.write_all(b"\n")?;
        }
        for item in snap.iterator_cf(&changes_cf, IteratorMode::Start) {
            let (k, v) = item?;
            if layout::decode_u64(&k).is_none_or(|id| id > last_id) {
                break;
            }
            z.write_all(StoredChange::decode(&v)?.json)?;
            z.write_all(b"\n")?;
        }
        if opts.idempotency {
            for item in snap.iterator_cf(&idem_cf, IteratorMode::Start) {
                let (k, v) = item?;
                let ts =
                    layout::decode_i64(&v).ok_or_else(|| Error::corrupt("idempotency", "ts"))?;
                let answer_text = std::str::from_utf8(v.get(8..).unwrap_or_default())
                    .map_err(|e| Error::corrupt("idempotency", e))?;
                let answer: &RawValue = serde_json::from_str(answer_text)
                    .map_err(|e| Error::corrupt("idempotency", e))?;
                let line = IdempotencyLine {
                    key: String::from_utf8_lossy(&k),
                    ts,
                    answer,
                };
                serde_json::to_writer(&mut z, &line)
                    .map_err(|e| Error::Checkpoint(e.to_string()))?;
                z.write_all(b"\n")?;
            }
        }
        z.finish()?.flush()?;
        Ok(header)
    }

    /// Replaces the whole state with a checkpoint, in one atomic write, together with the
    /// owner's values (`owner` = name → bytes, e.g. the Raft snapshot's log id).
    ///
    /// Ordering: 1. read and check the whole file into one batch that first clears every
    /// column family; 2. write the batch; 3. reload the in-memory mirrors and wake readers.
    /// A crash before 2 leaves the old state; after 2, the new one.
    pub fn import(&self, input: impl Read, owner: &[(&str, &[u8])]) -> Result<Header> {
        let mut lines = BufReader::new(zstd::Decoder::new(input)?);
        let mut line = Vec::new();
        lines.read_until(b'\n', &mut line)?;
        let header: Header = serde_json::from_slice(&line)
            .map_err(|e| Error::Checkpoint(format!("bad header line: {e}")))?;
        if header.format != CHECKPOINT_FORMAT || header.version != CHECKPOINT_VERSION {
            return Err(Error::Checkpoint(format!(
                "unsupported checkpoint {} version {}",
                header.format, header.version
            )));
        }
        let mut batch = WriteBatch::default();
        for name in cf::ALL {
            let cf = self.cf(name)?;
            batch.delete_range_cf(cf, &[][..], &[0xffu8; 32][..]);
        }
        let meta_cf = self.cf(cf::META)?;
        batch.put_cf(
            &meta_cf,
            meta::FORMAT_VERSION,
            layout::FORMAT_VERSION.to_be_bytes(),
        );
        batch.put_cf(&meta_cf, meta::LAST_ID, header.index.to_be_bytes());
        batch.put_cf(
            &meta_cf,
            meta::FIRST_INDEX,
            header.first_index.to_be_bytes(),
        );
        batch.put_cf(
            &meta_cf,
            meta::LAST_TS,
            (header.last_ts as u64).to_be_bytes(),
        );
        batch.put_cf(
            &meta_cf,
            meta::NEXT_TENANT_ID,
            header.next_tenant_id.to_be_bytes(),
        );
        batch.put_cf(
            &meta_cf,
            meta::NEXT_COLLECTION_ID,
            header.next_collection_id.to_be_bytes(),
        );
        if let Some(id) = &header.cluster_id {
            batch.put_cf(&meta_cf, meta::CLUSTER_ID, id.as_bytes());
        }
        let from_header = header.owner.iter().map(|(k, v)| (k.as_str(), v.as_bytes()));
        for (name, value) in from_header.chain(owner.iter().copied()) {
            let mut k = meta::OWNER_PREFIX.to_vec();
            k.extend_from_slice(name.as_bytes());
            batch.put_cf(&meta_cf, k, value);
        }
        let cat_cf = self.cf(cf::CATALOG)?;
        let mut tenant_ids = HashMap::new();
        for t in &header.tenants {
            batch.put_cf(&cat_cf, layout::tenant_catalog_key(t.id), t.name.as_bytes());
            tenant_ids.insert(t.name.clone(), t.id);
        }
        let mut collection_ids = HashMap::new();
        for c in &header.collections {
            let tid = *tenant_ids.get(&c.tenant).ok_or_else(|| {
                Error::Checkpoint(format!(
                    "collection {} names unknown tenant {}",
                    c.name, c.tenant
                ))
            })?;
            let mut v = tid.to_be_bytes().to_vec();
            v.extend_from_slice(c.name.as_bytes());
            batch.put_cf(&cat_cf, layout::collection_catalog_key(c.id), v);
            collection_ids.insert((c.tenant.clone(), c.name.clone()), c.id);
        }

        let cfs = [
            self.cf(cf::CHANGES)?,
            self.cf(cf::BY_TAG)?,
            self.cf(cf::BY_TYPE)?,
            self.cf(cf::BY_TENANT)?,
            self.cf(cf::BY_TS)?,
            self.cf(cf::KEYS)?,
        ];
        let idem_cf = self.cf(cf::IDEMPOTENCY)?;
        let idem_ts_cf = self.cf(cf::IDEMPOTENCY_BY_TS)?;
        let mut records = 0u64;
        let mut idempotency = 0u64;
        let mut previous = 0u64;
        loop {
            line.clear();
            if lines.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            if text.is_empty() {
                continue;
            }
            if text.starts_with(b"{\"_idempotency\"") {
                let l: IdempotencyLine = serde_json::from_slice(text)
                    .map_err(|e| Error::Checkpoint(format!("bad idempotency line: {e}")))?;
                let mut v = layout::ordered_i64(l.ts).to_vec();
                v.extend_from_slice(l.answer.get().as_bytes());
                batch.put_cf(&idem_cf, l.key.as_bytes(), v);
                let mut k = layout::ordered_i64(l.ts).to_vec();
                k.extend_from_slice(l.key.as_bytes());
                batch.put_cf(&idem_ts_cf, k, []);
                idempotency += 1;
                continue;
            }
            let c: ChangeLine = serde_json::from_slice(text)
                .map_err(|e| Error::Checkpoint(format!("bad change line {}: {e}", records + 1)))?;
            if c.id <= previous || c.id > header.index {
                return Err(Error::Checkpoint(format!(
                    "change {} out of order or past index {}",
                    c.id, header.index
                )));
            }
            previous = c.id;
            let tenant = match &c.tenant {
                Some(n) => Some((
                    *tenant_ids
                        .get(n)
                        .ok_or_else(|| Error::Checkpoint(format!("unknown tenant {n}")))?,
                    n.as_str(),
                )),
                None => None,
            };
            let collection = match (&c.collection, &c.tenant) {
                (Some(n), Some(t)) => Some((
                    *collection_ids
                        .get(&(t.clone(), n.clone()))
                        .ok_or_else(|| Error::Checkpoint(format!("unknown collection {n}")))?,
                    n.as_str(),
                )),
                (Some(n), None) => {
                    return Err(Error::Checkpoint(format!("collection {n} without tenant")))
                }
                _ => None,
            };
            let r = Resolved {
                id: c.id,
                ts: c.ts,
                change_type: c.change_type,
                tags: &c.tags,
                tenant,
                collection,
                key: c.key.as_deref(),
                deleted: c.deleted,
                data: c.data.map(RawValue::get),
            };
            let [changes, by_tag, by_type, by_tenant, by_ts, keys] = &cfs;
            // Lines of truncated keys come before the first retained change.
            if c.id >= header.first_index {
                batch.put_cf(changes, layout::id_key(c.id), r.stored_value(text));
                for tag in &c.tags {
                    batch.put_cf(by_tag, layout::tag_key(tag.as_bytes(), c.id), []);
                }
                batch.put_cf(by_type, layout::type_key(c.change_type, c.id), []);
                if let Some((tid, _)) = tenant {
                    batch.put_cf(by_tenant, layout::pair_key(tid, c.id), []);
                }
                batch.put_cf(by_ts, layout::ts_key(c.ts, c.id), []);
            }
            if let (Some((cid, _)), Some(key)) = (collection, &c.key) {
                let ck = layout::coll_key(cid, key);
                if c.deleted {
                    batch.delete_cf(keys, ck);
                } else {
                    let mut v = c.id.to_be_bytes().to_vec();
                    v.extend_from_slice(text);
                    batch.put_cf(keys, ck, v);
                }
            }
            records += 1;
        }
        if records != header.records || idempotency != header.idempotency_keys {
            return Err(Error::Checkpoint(format!(
                "checkpoint is incomplete: header promises {} changes and {} idempotency keys, \
                 file holds {records} and {idempotency}",
                header.records, header.idempotency_keys
            )));
        }
        self.db().write_opt(batch, &WriteOptions::default())?;
        self.sync()?;
        self.reload()?;
        Ok(header)
    }
}

/// Nanoseconds since the Unix epoch.
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}
