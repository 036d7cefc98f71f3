//! What a change is inside the store: client input ([`ChangeInput`]), its parsing and
//! validation, the wire JSON written once at apply time, and the small binary header kept in
//! front of it so filters never parse JSON.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{Error, Rejection, Result};
pub use changeagent_proto::limits::{
    MAX_BATCH, MAX_KEY_BYTES, MAX_NAME_BYTES, MAX_TAGS, MAX_TAG_BYTES,
};

/// One change as a client asked for it, validated, with `data` already compacted.
/// This is also what travels in Raft entries.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChangeInput {
    #[serde(rename = "type", default)]
    pub change_type: i32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
}

/// A parsed `POST /changes` body.
#[derive(Debug, Clone)]
pub enum PostBody {
    One(ChangeInput),
    Batch(Vec<ChangeInput>),
}

impl PostBody {
    /// The changes, in order.
    pub fn into_changes(self) -> Vec<ChangeInput> {
        match self {
            PostBody::One(c) => vec![c],
            PostBody::Batch(v) => v,
        }
    }
}

/// Keys of the structured `{"data": …}` form.
const KNOWN_FIELDS: [&str; 7] = [
    "data",
    "tags",
    "type",
    "tenant",
    "collection",
    "key",
    "deleted",
];

/// Parses and validates a `POST /changes` body: an object in the `{"data": …}` form, any other
/// JSON value (taken whole as data), or an array of those (a batch).
pub fn parse_post_body(body: &[u8]) -> Result<PostBody> {
    let raw: &RawValue = serde_json::from_slice(body)
        .map_err(|e| Error::invalid(format!("request body is not valid JSON: {e}")))?;
    let text = raw.get();
    if text.starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(text)
            .map_err(|e| Error::invalid(format!("request body is not valid JSON: {e}")))?;
        if items.is_empty() {
            return Err(Error::invalid("a batch must hold at least one change"));
        }
        if items.len() > MAX_BATCH {
            return Err(Error::invalid(format!(
                "a batch holds at most {MAX_BATCH} changes, this one has {}",
                items.len()
            )));
        }
        let changes = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                parse_one(item).map_err(|e| match e {
                    Error::Rejected(Rejection::Invalid(m)) => {
                        Error::invalid(format!("batch item {i}: {m}"))
                    }
                    other => other,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PostBody::Batch(changes))
    } else {
        Ok(PostBody::One(parse_one(raw)?))
    }
}

fn parse_one(raw: &RawValue) -> Result<ChangeInput> {
    let text = raw.get();
    if text.starts_with('{') {
        let fields: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
            .map_err(|e| Error::invalid(format!("invalid JSON object: {e}")))?;
        let structured = !fields.is_empty()
            && (fields.contains_key("data")
                || fields.keys().all(|k| KNOWN_FIELDS.contains(&k.as_str())));
        if structured {
            #[derive(Deserialize)]
            struct Structured<'a> {
                #[serde(borrow, default)]
                data: Option<&'a RawValue>,
                #[serde(default)]
                tags: Option<Vec<String>>,
                #[serde(rename = "type", default)]
                change_type: Option<i64>,
                #[serde(default)]
                tenant: Option<String>,
                #[serde(default)]
                collection: Option<serde_json::Value>,
                #[serde(default)]
                key: Option<String>,
                #[serde(default)]
                deleted: Option<bool>,
            }
            let s: Structured = serde_json::from_str(text)
                .map_err(|e| Error::invalid(format!("invalid change: {e}")))?;
            let change_type = match s.change_type {
                None => 0,
                Some(t) if (0..=i64::from(i32::MAX)).contains(&t) => t as i32,
                Some(t) if t < 0 => {
                    return Err(Error::invalid(format!(
                        "type {t} is reserved: negative types are internal records"
                    )))
                }
                Some(t) => return Err(Error::invalid(format!("type {t} is out of range"))),
            };
            let collection = match s.collection {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(c)) => Some(c),
                Some(serde_json::Value::Number(n)) if n.is_u64() => Some(n.to_string()),
                Some(_) => return Err(Error::invalid("collection must be a name or a numeric id")),
            };
            let input = ChangeInput {
                change_type,
                tags: s.tags.unwrap_or_default(),
                tenant: s.tenant,
                collection,
                key: s.key,
                deleted: s.deleted.unwrap_or(false),
                data: s.data.map(compact_raw).transpose()?,
            };
            input.validate()?;
            return Ok(input);
        }
    }
    Ok(ChangeInput {
        data: Some(compact_raw(raw)?),
        ..ChangeInput::default()
    })
}

impl ChangeInput {
    /// Checks the limits every change must meet, whoever built it.
    pub fn validate(&self) -> Result<()> {
        if self.tags.len() > MAX_TAGS {
            return Err(Error::invalid(format!(
                "a change has at most {MAX_TAGS} tags, this one has {}",
                self.tags.len()
            )));
        }
        for tag in &self.tags {
            if tag.is_empty() || tag.len() > MAX_TAG_BYTES {
                return Err(Error::invalid(format!(
                    "tags must be 1 to {MAX_TAG_BYTES} bytes long"
                )));
            }
        }
        match (&self.collection, &self.key) {
            (Some(_), None) => {
                return Err(Error::invalid("a change with a collection needs a key"))
            }
            (None, Some(_)) => {
                return Err(Error::invalid("a change with a key needs a collection"))
            }
            _ => {}
        }
        if let Some(key) = &self.key {
            if key.is_empty() || key.len() > MAX_KEY_BYTES {
                return Err(Error::invalid(format!(
                    "keys must be 1 to {MAX_KEY_BYTES} bytes long"
                )));
            }
        }
        if self.deleted && self.key.is_none() {
            return Err(Error::invalid("\"deleted\" applies to keyed changes only"));
        }
        if self.deleted && self.data.is_some() {
            return Err(Error::invalid("a delete carries no data"));
        }
        Ok(())
    }
}

/// Checks a tenant or collection name: 1 to 128 characters of `[A-Za-z0-9._-]`, not all
/// digits (all-digit path segments are ids).
pub fn validate_name(name: &str) -> Result<()> {
    changeagent_proto::limits::check_name(name).map_err(Error::invalid)
}

/// The client's JSON with insignificant whitespace removed; key order, number spelling and
/// string escapes are kept exactly as sent.
pub fn compact_raw(raw: &RawValue) -> Result<Box<RawValue>> {
    let text = raw.get();
    let compacted = compact_json(text);
    RawValue::from_string(compacted).map_err(|e| Error::invalid(format!("invalid JSON value: {e}")))
}

/// Removes whitespace outside strings from valid JSON text.
pub fn compact_json(text: &str) -> String {
    let bytes = text.as_bytes();
    if !bytes
        .iter()
        .any(|b| matches!(b, b' ' | b'\n' | b'\r' | b'\t'))
    {
        return text.to_owned();
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
            out.push(b);
        } else if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            out.push(b);
        }
    }
    // Only ASCII whitespace bytes outside strings were removed, so the text stays UTF-8.
    String::from_utf8(out).unwrap_or_else(|_| text.to_owned())
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
    fn compaction_keeps_order_and_strings() {
        assert_eq!(
            compact_json("{ \"b\" : 1,\n \"a\" : [1, 2], \"s\": \"x y\\\" z\" }"),
            "{\"b\":1,\"a\":[1,2],\"s\":\"x y\\\" z\"}"
        );
        assert_eq!(compact_json("12"), "12");
    }

    #[test]
    fn structured_and_raw_forms() {
        let PostBody::One(c) =
            parse_post_body(br#"{"data": {"x": 1}, "tags": ["a"], "type": 3}"#).unwrap()
        else {
            panic!("expected one change")
        };
        assert_eq!(c.data.unwrap().get(), r#"{"x":1}"#);
        assert_eq!(c.tags, vec!["a"]);
        assert_eq!(c.change_type, 3);

        let PostBody::One(c) = parse_post_body(br#"{"hello": "world"}"#).unwrap() else {
            panic!("expected one change")
        };
        assert_eq!(c.data.unwrap().get(), r#"{"hello":"world"}"#);

        let PostBody::One(c) = parse_post_body(b" 42 ").unwrap() else {
            panic!("expected one change")
        };
        assert_eq!(c.data.unwrap().get(), "42");

        let PostBody::Batch(v) =
            parse_post_body(br#"[{"data":1},{"data":2,"tags":["t"]}]"#).unwrap()
        else {
            panic!("expected a batch")
        };
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn rejects_bad_input() {
        for body in [
            &br#"{"data":1,"type":-1}"#[..],
            br#"{"data":1,"tags":[""]}"#,
            br#"{"data":1,"key":"k"}"#,
            br#"{"data":1,"collection":"c"}"#,
            br#"[]"#,
            br#"{"data":1"#,
            br#"{"data":1,"tags":"a"}"#,
        ] {
            assert!(
                matches!(
                    parse_post_body(body),
                    Err(Error::Rejected(Rejection::Invalid(_)))
                ),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let many: Vec<String> = (0..=MAX_TAGS).map(|i| format!("t{i}")).collect();
        let body = serde_json::json!({"data": 1, "tags": many}).to_string();
        assert!(parse_post_body(body.as_bytes()).is_err());
    }

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
