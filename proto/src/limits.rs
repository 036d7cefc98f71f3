//! Limits every change and request must meet, whoever checks them (server, client, edge).

/// Most tags one change may carry; keeps index writes per change bounded.
pub const MAX_TAGS: usize = 100;
/// Longest tag in bytes; tags are index keys, so they stay short.
pub const MAX_TAG_BYTES: usize = 256;
/// Longest key in bytes (a RocksDB key together with the collection id).
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest tenant or collection name.
pub const MAX_NAME_BYTES: usize = 128;
/// Most changes in one posted batch.
pub const MAX_BATCH: usize = 10_000;
/// Deepest nesting of arrays and objects in a change's data. A page puts data three levels
/// down (`{"changes":[{"data":…}]}`), and serde_json, which Rust clients decode with,
/// stops at 128 levels; this leaves room for whatever a client wraps pages in.
pub const MAX_DATA_DEPTH: usize = 100;
/// Longest accepted `Idempotency-Key`: room for a UUID or a hash with a prefix, while the
/// remembered keys stay small.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Default page size of `GET /changes`, as in the original ChangeAgent.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest page: bounds the memory and time one request may take.
pub const MAX_LIMIT: usize = 10_000;
/// Longest `block` a server allows by default, in seconds (five minutes, well past the idle
/// timeouts of most proxies; clients use 30 s).
pub const DEFAULT_MAX_BLOCK_SECS: u64 = 300;

/// Default largest request body, in bytes: room for a batch of a few thousand changes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Checks a tenant or collection name: 1 to 128 characters of `[A-Za-z0-9._-]`, not all
/// digits (all-digit path segments are ids).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "names must be 1 to {MAX_NAME_BYTES} characters long"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "name {name:?} may hold only letters, digits, '.', '_' and '-'"
        ));
    }
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "name {name:?} is all digits, which would read as an id"
        ));
    }
    Ok(())
}

/// Checks a change's tags: at most [`MAX_TAGS`], each 1 to [`MAX_TAG_BYTES`] bytes. Stores
/// count tags and their lengths in 16 bits, so these limits also keep them exact.
pub fn check_tags(tags: &[String]) -> Result<(), String> {
    if tags.len() > MAX_TAGS {
        return Err(format!(
            "a change has at most {MAX_TAGS} tags, this one has {}",
            tags.len()
        ));
    }
    if tags
        .iter()
        .any(|tag| tag.is_empty() || tag.len() > MAX_TAG_BYTES)
    {
        return Err(format!("tags must be 1 to {MAX_TAG_BYTES} bytes long"));
    }
    Ok(())
}

/// Checks a change's key: 1 to [`MAX_KEY_BYTES`] bytes.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(format!("keys must be 1 to {MAX_KEY_BYTES} bytes long"));
    }
    Ok(())
}
