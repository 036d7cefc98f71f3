//! What a change is inside the store: the wire JSON written once at apply time, and the
//! small binary header kept in front of it so filters never parse JSON. Client input
//! ([`ChangeInput`]) and its parsing live in the proto crate and are re-exported here.

use crate::error::{Error, Result};
pub use changeagent_proto::limits::{
    MAX_BATCH, MAX_KEY_BYTES, MAX_NAME_BYTES, MAX_TAGS, MAX_TAG_BYTES,
};
pub use changeagent_proto::post::{
    compact_json, compact_raw, parse_post_body, ChangeInput, PostBody,
};

/// Checks a tenant or collection name: 1 to 128 characters of `[A-Za-z0-9._-]`, not all
/// digits (all-digit path segments are ids).
pub fn validate_name(name: &str) -> Result<()> {
    changeagent_proto::limits::check_name(name).map_err(Error::invalid)
}

/// A change ready to be stored: everything the wire JSON and the indexes need.
#[derive(Debug, Clone)]
pub struct Resolved<'a> {
    pub id: u64,
    pub ts: i64,
    pub change_type: i32,
    pub tags: &'a [String],
    pub tenant: Option<(u64, &'a str)>,
    pub collection: Option<(u64, &'a str)>,
    pub key: Option<&'a str>,
    pub deleted: bool,
    pub data: Option<&'a str>,
}

/// Version byte of the stored change header. Version 2 added the flags byte.
const HEADER_VERSION: u8 = 2;
/// Header flag: the change is a keyed write (it has a collection and a key).
const FLAG_KEYED: u8 = 1;
/// Bytes of the fixed part of the header: version, type, tenant id, flags, tag count.
const HEADER_FIXED: usize = 1 + 4 + 8 + 1 + 2;

impl Resolved<'_> {
    /// The wire JSON, fields in the documented order, empty ones omitted.
    pub fn wire_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.data.map_or(0, str::len));
        out.extend_from_slice(b"{\"_id\":");
        out.extend_from_slice(self.id.to_string().as_bytes());
        out.extend_from_slice(b",\"_ts\":");
        out.extend_from_slice(self.ts.to_string().as_bytes());
        if self.change_type != 0 {
            out.extend_from_slice(b",\"type\":");
            out.extend_from_slice(self.change_type.to_string().as_bytes());
        }
        if !self.tags.is_empty() {
            out.extend_from_slice(b",\"tags\":[");
            for (i, t) in self.tags.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                push_json_string(&mut out, t);
            }
            out.push(b']');
        }
        if let Some((_, name)) = self.tenant {
            out.extend_from_slice(b",\"tenant\":");
            push_json_string(&mut out, name);
        }
        if let Some((_, name)) = self.collection {
            out.extend_from_slice(b",\"collection\":");
            push_json_string(&mut out, name);
        }
        if let Some(key) = self.key {
            out.extend_from_slice(b",\"key\":");
            push_json_string(&mut out, key);
        }
        if self.deleted {
            out.extend_from_slice(b",\"deleted\":true");
        }
        if let Some(data) = self.data {
            out.extend_from_slice(b",\"data\":");
            out.extend_from_slice(data.as_bytes());
        }
        out.push(b'}');
        out
    }

    /// The value stored in the change list: header, then wire JSON.
    pub fn stored_value(&self, json: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_FIXED + json.len() + self.tags.len() * 8);
        out.push(HEADER_VERSION);
        out.extend_from_slice(&self.change_type.to_be_bytes());
        out.extend_from_slice(&self.tenant.map_or(0, |t| t.0).to_be_bytes());
        out.push(if self.key.is_some() { FLAG_KEYED } else { 0 });
        out.extend_from_slice(&(self.tags.len() as u16).to_be_bytes());
        for t in self.tags {
            out.extend_from_slice(&(t.len() as u16).to_be_bytes());
            out.extend_from_slice(t.as_bytes());
        }
        out.extend_from_slice(json);
        out
    }
}

fn push_json_string(out: &mut Vec<u8>, s: &str) {
    // Serializing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// A view of a stored change value.
#[derive(Debug, Clone, Copy)]
pub struct StoredChange<'a> {
    pub change_type: i32,
    pub tenant_id: u64,
    /// A keyed write (collection and key).
    pub keyed: bool,
    tags: &'a [u8],
    tag_count: u16,
    pub json: &'a [u8],
}

impl<'a> StoredChange<'a> {
    /// Splits a stored value into header and JSON.
    pub fn decode(value: &'a [u8]) -> Result<Self> {
        let bad = || Error::corrupt("change", "truncated header");
        if value.len() < HEADER_FIXED || value[0] != HEADER_VERSION {
            return Err(Error::corrupt("change", "unknown header version"));
        }
        let change_type = i32::from_be_bytes(value[1..5].try_into().map_err(|_| bad())?);
        let tenant_id = u64::from_be_bytes(value[5..13].try_into().map_err(|_| bad())?);
        let keyed = value[13] & FLAG_KEYED != 0;
        let tag_count = u16::from_be_bytes(value[14..16].try_into().map_err(|_| bad())?);
        let mut pos = HEADER_FIXED;
        for _ in 0..tag_count {
            let len_bytes = value.get(pos..pos + 2).ok_or_else(bad)?;
            let len = u16::from_be_bytes([len_bytes[0], len_bytes[1]]) as usize;
            pos += 2 + len;
            if pos > value.len() {
                return Err(bad());
            }
        }
        Ok(StoredChange {
            change_type,
            tenant_id,
            keyed,
            tags: &value[HEADER_FIXED..pos],
            tag_count,
            json: &value[pos..],
        })
    }

    /// The change's tags.
    pub fn tags(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut rest = self.tags;
        (0..self.tag_count).map_while(move |_| {
            let len = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
            let tag = rest.get(2..2 + len)?;
            rest = &rest[2 + len..];
            Some(tag)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("acme-1.x_y").is_ok());
        for bad in ["", "123", "a b", "a/b", &"x".repeat(MAX_NAME_BYTES + 1)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wire_json_order_and_header_roundtrip() {
        let tags = vec!["a".to_string(), "b\"c".to_string()];
        let r = Resolved {
            id: 7,
            ts: 99,
            change_type: 3,
            tags: &tags,
            tenant: Some((4, "acme")),
            collection: Some((5, "flags")),
            key: Some("k"),
            deleted: false,
            data: Some("{\"on\":true}"),
        };
        let json = r.wire_json();
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"_id":7,"_ts":99,"type":3,"tags":["a","b\"c"],"tenant":"acme","collection":"flags","key":"k","data":{"on":true}}"#
        );
        let stored = r.stored_value(&json);
        let view = StoredChange::decode(&stored).unwrap();
        assert_eq!(view.change_type, 3);
        assert_eq!(view.tenant_id, 4);
        assert!(view.keyed);
        assert_eq!(view.json, &json[..]);
        let t: Vec<&[u8]> = view.tags().collect();
        assert_eq!(t, vec![&b"a"[..], &b"b\"c"[..]]);
    }
}
