//! The RocksDB layout: column families and how their keys are encoded. Integers are
//! big-endian (signed ones with the sign bit flipped) so byte order is numeric order.

use changeagent_proto::Scope;

/// Column families, each with its key → value shape.
pub mod cf {
    /// `_id` → stored change (header + wire JSON).
    pub const CHANGES: &str = "changes";
    /// tag length (u16) + tag + `_id` → empty.
    pub const BY_TAG: &str = "by_tag";
    /// type + `_id` → empty.
    pub const BY_TYPE: &str = "by_type";
    /// tenant id + `_id` → empty.
    pub const BY_TENANT: &str = "by_tenant";
    /// `_ts` + `_id` → empty. `_ts` never decreases along `_id`s, so a seek finds the first
    /// change at or after a time.
    pub const BY_TS: &str = "by_ts";
    /// collection id + key → `_id` + wire JSON of the key's latest change (live keys only).
    pub const KEYS: &str = "keys";
    /// `_id` → collection id + key, for every live key: walks keyed state in `_id` order, so
    /// an export merges it with the list in one pass without holding keys in memory.
    pub const KEYS_BY_ID: &str = "keys_by_id";
    /// `T` + tenant id → wire JSON of its tenant-created record; `C` + collection id → wire
    /// JSON of its collection-created record. Kept whole so exports emit them even after the
    /// list rows were truncated.
    pub const CATALOG: &str = "catalog";
    /// `M` + scope + 0 + index → manifest of a committed checkpoint the core keeps;
    /// `S` + scope → the open checkpoint start of that scope.
    pub const CHECKPOINTS: &str = "checkpoints";
    /// idempotency key → ts (8 bytes) + stored answer.
    pub const IDEMPOTENCY: &str = "idempotency";
    /// ts + idempotency key → empty; lets expiry find old keys without a scan.
    pub const IDEMPOTENCY_BY_TS: &str = "idempotency_by_ts";
    /// Named scalars: format version, counters, owner state (see `meta`).
    pub const META: &str = "meta";

    /// Every column family, in creation order.
    pub const ALL: [&str; 12] = [
        CHANGES,
        BY_TAG,
        BY_TYPE,
        BY_TENANT,
        BY_TS,
        KEYS,
        KEYS_BY_ID,
        CATALOG,
        CHECKPOINTS,
        IDEMPOTENCY,
        IDEMPOTENCY_BY_TS,
        META,
    ];

    /// Index column families whose keys end in an `_id`: entries below the first retained
    /// `_id` are garbage after a truncation, dropped by a compaction filter.
    pub const LIST_INDEXES: [&str; 4] = [BY_TAG, BY_TYPE, BY_TENANT, BY_TS];
}

/// Keys of the `meta` column family.
pub mod meta {
    pub const FORMAT_VERSION: &[u8] = b"format_version";
    pub const LAST_ID: &[u8] = b"last_id";
    pub const FIRST_INDEX: &[u8] = b"first_index";
    pub const LAST_TS: &[u8] = b"last_ts";
    pub const NEXT_TENANT_ID: &[u8] = b"next_tenant_id";
    pub const NEXT_COLLECTION_ID: &[u8] = b"next_collection_id";
    pub const CLUSTER_ID: &[u8] = b"cluster_id";
    /// Prefix of keys the store's owner (the Raft state machine) keeps with each batch.
    pub const OWNER_PREFIX: &[u8] = b"owner/";
}

/// The on-disk format version this build reads and writes. Version 2 added the generation
/// directories, catalog records, keyed state by `_id`, checkpoints and truncation.
pub const FORMAT_VERSION: u32 = 2;

/// Kind byte of a committed manifest in the checkpoints family.
const MANIFEST: u8 = b'M';
/// Kind byte of an open start in the checkpoints family.
const OPEN_START: u8 = b'S';

/// Key prefix of a scope's committed manifests.
pub fn manifest_prefix(scope: &Scope) -> Vec<u8> {
    let mut k = vec![MANIFEST];
    k.extend_from_slice(scope.to_string().as_bytes());
    k.push(0);
    k
}

/// Key of a committed manifest.
pub fn manifest_key(scope: &Scope, index: u64) -> Vec<u8> {
    let mut k = manifest_prefix(scope);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// Key prefix of every committed manifest, all scopes.
pub fn all_manifests_prefix() -> [u8; 1] {
    [MANIFEST]
}

/// Key of a scope's open checkpoint start.
pub fn open_start_key(scope: &Scope) -> Vec<u8> {
    let mut k = vec![OPEN_START];
    k.extend_from_slice(scope.to_string().as_bytes());
    k
}

/// Key prefix of every open start.
pub fn all_open_starts_prefix() -> [u8; 1] {
    [OPEN_START]
}

pub fn id_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

pub fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

pub fn decode_i64(bytes: &[u8]) -> Option<i64> {
    decode_u64(bytes).map(|v| (v ^ (1 << 63)) as i64)
}

pub fn ordered_i64(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

pub fn ordered_i32(v: i32) -> [u8; 4] {
    ((v as u32) ^ (1 << 31)).to_be_bytes()
}

/// The id in the last 8 bytes of an index key.
pub fn trailing_id(key: &[u8]) -> Option<u64> {
    key.len()
        .checked_sub(8)
        .and_then(|start| decode_u64(&key[start..]))
}

pub fn tag_prefix(tag: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + tag.len() + 8);
    k.extend_from_slice(&(tag.len() as u16).to_be_bytes());
    k.extend_from_slice(tag);
    k
}

pub fn tag_key(tag: &[u8], id: u64) -> Vec<u8> {
    let mut k = tag_prefix(tag);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub fn type_key(t: i32, id: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&ordered_i32(t));
    k[4..].copy_from_slice(&id.to_be_bytes());
    k
}

pub fn pair_key(a: u64, id: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a.to_be_bytes());
    k[8..].copy_from_slice(&id.to_be_bytes());
    k
}

pub fn ts_key(ts: i64, id: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&ordered_i64(ts));
    k[8..].copy_from_slice(&id.to_be_bytes());
    k
}

/// The collection id at the front of a keyed-state key.
pub fn coll_key_collection(k: &[u8]) -> Option<u64> {
    decode_u64(k)
}

pub fn coll_key(collection: u64, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&collection.to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

pub fn tenant_catalog_key(id: u64) -> [u8; 9] {
    let mut k = [b'T'; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

pub fn collection_catalog_key(id: u64) -> [u8; 9] {
    let mut k = [b'C'; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_keys_sort_numerically() {
        let mut v = [-5i64, 3, i64::MIN, 0, i64::MAX, -1];
        let mut keys: Vec<_> = v.iter().map(|&x| ordered_i64(x)).collect();
        v.sort();
        keys.sort();
        let back: Vec<i64> = keys.iter().map(|k| decode_i64(k).unwrap()).collect();
        assert_eq!(back, v);
        assert!(ordered_i32(-3) < ordered_i32(0));
        assert!(ordered_i32(0) < ordered_i32(7));
    }
}
