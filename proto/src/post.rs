//! What a client posts to `POST /changes` (and what travels in Raft entries): the parsed
//! and validated [`ChangeInput`], the body forms ([`PostBody`]), and the compaction that
//! keeps the client's JSON bytes. Servers parse with [`parse_post_body`]; a refusal is a
//! [`Rejection::Invalid`] saying why.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::limits::{check_key, check_tags, MAX_BATCH, MAX_DATA_DEPTH};
use crate::rejection::Rejection;

/// Result of parsing a posted change.
pub type Result<T> = std::result::Result<T, Rejection>;

fn invalid(message: impl Into<String>) -> Rejection {
    Rejection::Invalid(message.into())
}

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
    /// `None`: the change has no data. `Some` may hold JSON `null` (a posted `null`), which
    /// must come back out of a Raft entry as it went in: followers apply the decoded entry,
    /// the leader the one it built.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_raw"
    )]
    pub data: Option<Box<RawValue>>,
}

/// Reads a field that is present as `Some`, `null` included (serde reads a present `null`
/// into an `Option` as `None`); an absent one is `None` through `default`.
fn present_raw<'de, D>(deserializer: D) -> std::result::Result<Option<Box<RawValue>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Box::<RawValue>::deserialize(deserializer).map(Some)
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
        .map_err(|e| invalid(format!("request body is not valid JSON: {e}")))?;
    let text = raw.get();
    if text.starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(text)
            .map_err(|e| invalid(format!("request body is not valid JSON: {e}")))?;
        if items.is_empty() {
            return Err(invalid("a batch must hold at least one change"));
        }
        if items.len() > MAX_BATCH {
            return Err(invalid(format!(
                "a batch holds at most {MAX_BATCH} changes, this one has {}",
                items.len()
            )));
        }
        let changes = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                parse_one(item).map_err(|e| match e {
                    Rejection::Invalid(m) => invalid(format!("batch item {i}: {m}")),
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
        let fields: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| invalid(format!("invalid JSON object: {e}")))?;
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
            let s: Structured =
                serde_json::from_str(text).map_err(|e| invalid(format!("invalid change: {e}")))?;
            let change_type = match s.change_type {
                None => 0,
                Some(t) if (0..=i64::from(i32::MAX)).contains(&t) => t as i32,
                Some(t) if t < 0 => {
                    return Err(invalid(format!(
                        "type {t} is reserved: negative types are internal records"
                    )))
                }
                Some(t) => return Err(invalid(format!("type {t} is out of range"))),
            };
            let collection = match s.collection {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(c)) => Some(c),
                Some(serde_json::Value::Number(n)) if n.is_u64() => Some(n.to_string()),
                Some(_) => return Err(invalid("collection must be a name or a numeric id")),
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
        check_tags(&self.tags).map_err(invalid)?;
        match (&self.collection, &self.key) {
            (Some(_), None) => return Err(invalid("a change with a collection needs a key")),
            (None, Some(_)) => return Err(invalid("a change with a key needs a collection")),
            _ => {}
        }
        if let Some(key) = &self.key {
            check_key(key).map_err(invalid)?;
        }
        if self.deleted && self.key.is_none() {
            return Err(invalid("\"deleted\" applies to keyed changes only"));
        }
        if self.deleted && self.data.is_some() {
            return Err(invalid("a delete carries no data"));
        }
        Ok(())
    }
}

/// The client's JSON with insignificant whitespace removed; key order, number spelling and
/// string escapes are kept exactly as sent. Refuses data that clients could not decode
/// (see [`check_decodable`]).
pub fn compact_raw(raw: &RawValue) -> Result<Box<RawValue>> {
    let text = raw.get();
    check_decodable(text)?;
    let compacted = compact_json(text);
    RawValue::from_string(compacted).map_err(|e| invalid(format!("invalid JSON value: {e}")))
}

/// Checks that JSON text (already known to be well formed) decodes into values, as every
/// client reading it back does. Reading raw JSON only checks its grammar, which lets
/// through a lone surrogate escape (`"\ud800"`, no string holds it), a number out of the
/// range of a double (`1e400`) and nesting deeper than a client's decoder goes once the
/// value sits in a page; stored, any of these would make every page holding the change
/// unreadable.
pub fn check_decodable(text: &str) -> Result<()> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_str(text);
    Decodable { depth: 0 }
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| invalid(format!("data cannot be decoded by JSON clients: {e}")))
}

/// A JSON value decoded and thrown away: strings are unescaped and numbers converted, which
/// is where an undecodable value fails; `depth` counts the arrays and objects around it.
#[derive(Clone, Copy)]
struct Decodable {
    depth: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for Decodable {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Decodable {
    /// The seed for a value inside this array or object.
    fn inner<E: serde::de::Error>(self) -> std::result::Result<Decodable, E> {
        if self.depth >= MAX_DATA_DEPTH {
            return Err(E::custom(format_args!(
                "arrays and objects nest more than {MAX_DATA_DEPTH} levels deep"
            )));
        }
        Ok(Decodable {
            depth: self.depth + 1,
        })
    }
}

impl<'de> serde::de::Visitor<'de> for Decodable {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> std::result::Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> std::result::Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> std::result::Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> std::result::Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> std::result::Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> std::result::Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<(), A::Error> {
        let inner = self.inner()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<(), A::Error> {
        let inner = self.inner()?;
        while map.next_entry_seed(inner, inner)?.is_some() {}
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::MAX_TAGS;

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
                matches!(parse_post_body(body), Err(Rejection::Invalid(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let many: Vec<String> = (0..=MAX_TAGS).map(|i| format!("t{i}")).collect();
        let body = serde_json::json!({"data": 1, "tags": many}).to_string();
        assert!(parse_post_body(body.as_bytes()).is_err());
    }

    /// What the leader applies (the parsed change) and what followers apply (the change
    /// after the entry's JSON round trip) must be the same change, `null` data included.
    #[test]
    fn a_change_survives_the_raft_entry_round_trip() {
        for body in [
            &b"null"[..],
            br#"[null, {"data": null, "tags": ["t"]}, {"data": [null]}]"#,
            br#"{"data": {"a": null}, "key": "k", "collection": "c"}"#,
            br#"{"collection": "c", "key": "k", "deleted": true}"#,
        ] {
            for parsed in parse_post_body(body).unwrap().into_changes() {
                let json = serde_json::to_string(&parsed).unwrap();
                let decoded: ChangeInput = serde_json::from_str(&json).unwrap();
                assert_eq!(
                    decoded.data.as_ref().map(|d| d.get()),
                    parsed.data.as_ref().map(|d| d.get()),
                    "{json}"
                );
                assert_eq!(serde_json::to_string(&decoded).unwrap(), json);
            }
        }
        let PostBody::One(c) = parse_post_body(b"null").unwrap() else {
            panic!("expected one change")
        };
        assert_eq!(c.data.map(|d| d.get().to_owned()).as_deref(), Some("null"));
    }

    /// Data a client's JSON decoder cannot read back is refused when posted, not stored
    /// (it would make every page holding it unreadable).
    #[test]
    fn data_no_client_can_decode_is_refused() {
        for body in [
            &br#""\ud800""#[..],
            br#"{"data": "a\udc00b"}"#,
            br#"{"data": {"\ud800": 1}}"#,
            br#"[{"data": 1}, {"data": [1e400]}]"#,
            br#"-1e400"#,
            br#"{"x": 123e999}"#,
        ] {
            let err = parse_post_body(body).unwrap_err();
            let Rejection::Invalid(message) = &err else {
                panic!("{err:?}")
            };
            assert!(
                ["surrogate", "hex escape", "number out of range"]
                    .iter()
                    .any(|cause| message.contains(cause)),
                "{}: {message}",
                String::from_utf8_lossy(body)
            );
        }
        let deep = |levels: usize| format!("{}1{}", "[".repeat(levels), "]".repeat(levels));
        let err = parse_post_body(format!(r#"{{"data":{}}}"#, deep(MAX_DATA_DEPTH + 1)).as_bytes())
            .unwrap_err();
        assert!(err.to_string().contains("nest"), "{err}");
        // A batch of one change whose data nests one level too deep, then just deep enough.
        assert!(parse_post_body(deep(MAX_DATA_DEPTH + 2).as_bytes()).is_err());
        assert!(parse_post_body(deep(MAX_DATA_DEPTH + 1).as_bytes()).is_ok());
        // Paired surrogates, tiny and huge-but-finite numbers are fine.
        for body in [
            &br#""\ud83d\ude00""#[..],
            br#"1e-400"#,
            br#"{"data": 1.7976931348623157e308}"#,
            br#"12345678901234567890123"#,
        ] {
            assert!(
                parse_post_body(body).is_ok(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
