//! The state a consumer of the change list builds, to compare consumers that got there by
//! different paths (one read every change, another loaded a checkpoint after a 410): the
//! catalog, the latest change of every live key, and every change without a key; and
//! [`StateDigest`], the same state in a few kilobytes, for fleets of consumers.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

use serde_json::Value;

/// What a consumer holds after applying changes (and checkpoint records) in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConsumerState {
    /// Tenant id → name, from tenant-created records (type -4).
    pub tenants: BTreeMap<u64, String>,
    /// Collection id → (tenant, name), from collection-created records (type -5).
    pub collections: BTreeMap<u64, (String, String)>,
    /// (tenant, collection, key) → the key's latest change, live keys only.
    pub keys: BTreeMap<(String, String, String), Value>,
    /// `_id` → every other change (internal records included).
    pub unkeyed: BTreeMap<u64, Value>,
}

fn text(v: &Value, field: &str) -> String {
    v[field].as_str().unwrap_or_default().to_owned()
}

impl ConsumerState {
    /// Applies one change, given as its wire JSON.
    pub fn apply(&mut self, change: &Value) {
        let id = change["_id"].as_u64().unwrap_or(0);
        let data = &change["data"];
        match change["type"].as_i64().unwrap_or(0) {
            -4 => {
                let tid = data["_id"].as_u64().unwrap_or(0);
                self.tenants.insert(tid, text(data, "name"));
                return;
            }
            -5 => {
                let cid = data["_id"].as_u64().unwrap_or(0);
                self.collections
                    .insert(cid, (text(data, "tenant"), text(data, "name")));
                return;
            }
            _ => {}
        }
        if change.get("key").is_some() {
            let key = (
                text(change, "tenant"),
                text(change, "collection"),
                text(change, "key"),
            );
            if change["deleted"].as_bool().unwrap_or(false) {
                self.keys.remove(&key);
            } else {
                self.keys.insert(key, change.clone());
            }
        } else {
            self.unkeyed.insert(id, change.clone());
        }
    }

    /// Forgets everything (a reset before a checkpoint's records).
    pub fn reset(&mut self) {
        *self = ConsumerState::default();
    }

    /// A one-line summary for messages.
    pub fn summary(&self) -> String {
        format!(
            "{} tenants, {} collections, {} live keys, {} unkeyed changes",
            self.tenants.len(),
            self.collections.len(),
            self.keys.len(),
            self.unkeyed.len()
        )
    }
}

/// A [`ConsumerState`] in compact form: equal states give equal digests, and different
/// states differ but with a chance of about 2^-64 per compared part. It applies changes with
/// the same rules ([`StateDigest::apply`], [`StateDigest::reset`]) but keeps no change:
///
/// - the catalog as maps of tenant and collection ids to a hash of their names (small);
/// - per live key, a 64-bit hash of the key (tenant, collection, key) mapped to a 64-bit hash
///   of its latest change; bounded by the number of keys;
/// - the unkeyed changes as a count and the wrapping sum of their hashes, which is the same
///   whatever the order they were applied in (a checkpoint's records come in another order
///   than the changes did). Each hash covers the whole change, `_id` included, so the
///   unkeyed part stays 24 bytes however many changes the list holds.
///
/// Hashes are SipHash-1-3 with fixed keys ([`DefaultHasher::new`]), the same in every
/// digest of one process; compare digests built by the same program only. A JSON object's
/// members are hashed in the order of their names, so an object hashes the same whatever
/// the order it keeps them in, as [`serde_json::Value`]'s equality ignores it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateDigest {
    /// Tenant id → hash of its name.
    tenants: BTreeMap<u64, u64>,
    /// Collection id → hash of (tenant, name).
    collections: BTreeMap<u64, u64>,
    /// Hash of (tenant, collection, key) → hash of the key's latest change, live keys only.
    keys: HashMap<u64, u64>,
    /// Number of unkeyed changes (internal records included).
    unkeyed: u64,
    /// Wrapping sum of the unkeyed changes' hashes.
    unkeyed_sum: u64,
}

impl StateDigest {
    /// Applies one change, given as its wire JSON, as [`ConsumerState::apply`] does, with
    /// one difference: an unkeyed change applied twice counts twice, where the state keeps
    /// one entry per `_id`. A dense list never repeats an `_id`; a consumer that got one
    /// twice has seen a violation, and its digest differs too.
    pub fn apply(&mut self, change: &Value) {
        if self.apply_catalog(change["type"].as_i64().unwrap_or(0), &change["data"]) {
            return;
        }
        if change.get("key").is_some() {
            let key = key_hash(
                str_of(change, "tenant"),
                str_of(change, "collection"),
                str_of(change, "key"),
            );
            if change["deleted"].as_bool().unwrap_or(false) {
                self.keys.remove(&key);
            } else {
                self.keys.insert(key, value_hash(change));
            }
        } else {
            self.unkeyed += 1;
            self.unkeyed_sum = self.unkeyed_sum.wrapping_add(value_hash(change));
        }
    }

    /// [`StateDigest::apply`] for a change held as its fields rather than its JSON: the
    /// same digest, without building a JSON value of the change.
    pub fn apply_fields(&mut self, change: &ChangeFields<'_>) {
        let data = change.data.unwrap_or(&Value::Null);
        if self.apply_catalog(i64::from(change.change_type), data) {
            return;
        }
        if let Some(key) = change.key {
            let key = key_hash(
                change.tenant.unwrap_or_default(),
                change.collection.unwrap_or_default(),
                key,
            );
            if change.deleted {
                self.keys.remove(&key);
            } else {
                self.keys.insert(key, change.hash());
            }
        } else {
            self.unkeyed += 1;
            self.unkeyed_sum = self.unkeyed_sum.wrapping_add(change.hash());
        }
    }

    /// Applies a tenant-created (-4) or collection-created (-5) record; false for any other
    /// type, which the caller applies.
    fn apply_catalog(&mut self, change_type: i64, data: &Value) -> bool {
        match change_type {
            -4 => {
                let tid = data["_id"].as_u64().unwrap_or(0);
                self.tenants.insert(tid, hash_str(str_of(data, "name")));
                true
            }
            -5 => {
                let cid = data["_id"].as_u64().unwrap_or(0);
                let named = hash_pair(str_of(data, "tenant"), str_of(data, "name"));
                self.collections.insert(cid, named);
                true
            }
            _ => false,
        }
    }

    /// Forgets everything (a reset before a checkpoint's records).
    pub fn reset(&mut self) {
        *self = StateDigest::default();
    }

    /// The digest of a whole state: equal to the digest that applied the same changes.
    pub fn of(state: &ConsumerState) -> StateDigest {
        let mut digest = StateDigest {
            tenants: state
                .tenants
                .iter()
                .map(|(id, name)| (*id, hash_str(name)))
                .collect(),
            collections: state
                .collections
                .iter()
                .map(|(id, (tenant, name))| (*id, hash_pair(tenant, name)))
                .collect(),
            ..StateDigest::default()
        };
        for ((tenant, collection, key), change) in &state.keys {
            digest
                .keys
                .insert(key_hash(tenant, collection, key), value_hash(change));
        }
        for change in state.unkeyed.values() {
            digest.unkeyed += 1;
            digest.unkeyed_sum = digest.unkeyed_sum.wrapping_add(value_hash(change));
        }
        digest
    }

    /// Number of live keys.
    pub fn live_keys(&self) -> usize {
        self.keys.len()
    }

    /// Number of unkeyed changes.
    pub fn unkeyed_changes(&self) -> u64 {
        self.unkeyed
    }

    /// A one-line summary for messages, in the words of [`ConsumerState::summary`], with
    /// the hashes of the parts that a count cannot tell apart.
    pub fn summary(&self) -> String {
        let mut keys = 0u64;
        for (key, value) in &self.keys {
            keys = keys.wrapping_add(hash_pair_u64(*key, *value));
        }
        format!(
            "{} tenants, {} collections, {} live keys (sum {keys:016x}), {} unkeyed changes \
             (sum {:016x})",
            self.tenants.len(),
            self.collections.len(),
            self.keys.len(),
            self.unkeyed,
            self.unkeyed_sum
        )
    }
}

/// A change as its fields, borrowed, for [`StateDigest::apply_fields`]. Its JSON is the
/// wire form: `_id` and `_ts` always, `type` unless 0, `tags` unless empty, `tenant`,
/// `collection` and `key` when given, `deleted` when true, `data` when given.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChangeFields<'a> {
    pub id: u64,
    pub ts: i64,
    pub change_type: i32,
    pub tags: &'a [String],
    pub tenant: Option<&'a str>,
    pub collection: Option<&'a str>,
    pub key: Option<&'a str>,
    pub deleted: bool,
    pub data: Option<&'a Value>,
}

impl ChangeFields<'_> {
    /// The hash of the change's wire JSON, as [`StateDigest::apply`] computes it from the
    /// JSON value.
    fn hash(&self) -> u64 {
        let texts = [self.tenant, self.collection, self.key];
        let members = 2
            + usize::from(self.change_type != 0)
            + usize::from(!self.tags.is_empty())
            + texts.iter().filter(|t| t.is_some()).count()
            + usize::from(self.deleted)
            + usize::from(self.data.is_some());
        let mut h = DefaultHasher::new();
        5u8.hash(&mut h);
        members.hash(&mut h);
        // In the order of the members' names, as an object's are hashed.
        let h = &mut h;
        "_id".hash(h);
        hash_u64(self.id, h);
        "_ts".hash(h);
        hash_i64(self.ts, h);
        if let Some(collection) = self.collection {
            "collection".hash(h);
            hash_string(collection, h);
        }
        if let Some(data) = self.data {
            "data".hash(h);
            hash_value(data, h);
        }
        if self.deleted {
            "deleted".hash(h);
            1u8.hash(h);
            true.hash(h);
        }
        if let Some(key) = self.key {
            "key".hash(h);
            hash_string(key, h);
        }
        if !self.tags.is_empty() {
            "tags".hash(h);
            4u8.hash(h);
            self.tags.len().hash(h);
            for tag in self.tags {
                hash_string(tag, h);
            }
        }
        if let Some(tenant) = self.tenant {
            "tenant".hash(h);
            hash_string(tenant, h);
        }
        if self.change_type != 0 {
            "type".hash(h);
            hash_i64(i64::from(self.change_type), h);
        }
        h.finish()
    }
}

/// A text field of a JSON object, "" when absent.
fn str_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or_default()
}

fn hash_str(s: &str) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

fn hash_pair(a: &str, b: &str) -> u64 {
    let mut h = DefaultHasher::new();
    a.hash(&mut h);
    b.hash(&mut h);
    h.finish()
}

fn hash_pair_u64(a: u64, b: u64) -> u64 {
    let mut h = DefaultHasher::new();
    a.hash(&mut h);
    b.hash(&mut h);
    h.finish()
}

fn key_hash(tenant: &str, collection: &str, key: &str) -> u64 {
    let mut h = DefaultHasher::new();
    tenant.hash(&mut h);
    collection.hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

/// A hash of a JSON value that, like `Value`'s equality, ignores the order of an object's
/// members.
fn value_hash(value: &Value) -> u64 {
    let mut h = DefaultHasher::new();
    hash_value(value, &mut h);
    h.finish()
}

/// A non-negative integer, as `Value` holds it (`PosInt`).
fn hash_u64(u: u64, h: &mut DefaultHasher) {
    2u8.hash(h);
    0u8.hash(h);
    u.hash(h);
}

/// An integer: as [`hash_u64`] when not negative, as `Value` holds it.
fn hash_i64(i: i64, h: &mut DefaultHasher) {
    match u64::try_from(i) {
        Ok(u) => hash_u64(u, h),
        Err(_) => {
            2u8.hash(h);
            1u8.hash(h);
            i.hash(h);
        }
    }
}

fn hash_string(s: &str, h: &mut DefaultHasher) {
    3u8.hash(h);
    s.hash(h);
}

fn hash_value(value: &Value, h: &mut DefaultHasher) {
    match value {
        Value::Null => 0u8.hash(h),
        Value::Bool(b) => {
            1u8.hash(h);
            b.hash(h);
        }
        Value::Number(n) => {
            // `Number`'s equality compares its representation: 1 ≠ 1.0.
            if let Some(u) = n.as_u64() {
                hash_u64(u, h);
            } else if let Some(i) = n.as_i64() {
                hash_i64(i, h);
            } else {
                2u8.hash(h);
                2u8.hash(h);
                n.as_f64().unwrap_or_default().to_bits().hash(h);
            }
        }
        Value::String(s) => hash_string(s, h),
        Value::Array(items) => {
            4u8.hash(h);
            items.len().hash(h);
            for item in items {
                hash_value(item, h);
            }
        }
        Value::Object(members) => {
            5u8.hash(h);
            members.len().hash(h);
            // In the order of the names, whatever order the map keeps (serde_json's
            // `preserve_order` keeps the input's): one order for equal objects.
            let sorted = members
                .keys()
                .zip(members.keys().skip(1))
                .all(|(a, b)| a < b);
            if sorted {
                for (name, member) in members {
                    name.hash(h);
                    hash_value(member, h);
                }
            } else {
                let mut in_order: Vec<(&String, &Value)> = members.iter().collect();
                in_order.sort_unstable_by(|a, b| a.0.cmp(b.0));
                for (name, member) in in_order {
                    name.hash(h);
                    hash_value(member, h);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_upsert_and_delete_and_the_catalog_is_kept_apart() {
        let mut s = ConsumerState::default();
        s.apply(&json!({"_id": 1, "type": -4, "data": {"_id": 1, "name": "acme"}}));
        s.apply(&json!({"_id": 2, "type": -5, "data": {"_id": 1, "name": "f", "tenant": "acme"}}));
        s.apply(&json!({"_id": 3, "tenant": "acme", "collection": "f", "key": "k", "data": 1}));
        s.apply(&json!({"_id": 4, "data": "x"}));
        s.apply(&json!({"_id": 5, "tenant": "acme", "collection": "f", "key": "k", "data": 2}));
        s.apply(&json!({"_id": 6, "tenant": "acme", "collection": "f", "key": "j", "data": 3}));
        s.apply(
            &json!({"_id": 7, "tenant": "acme", "collection": "f", "key": "j", "deleted": true}),
        );
        assert_eq!(s.tenants.len(), 1);
        assert_eq!(s.collections.len(), 1);
        assert_eq!(s.keys.len(), 1);
        assert_eq!(s.keys.values().next().unwrap()["_id"], 5);
        assert_eq!(s.unkeyed.keys().copied().collect::<Vec<_>>(), vec![4]);
        let mut other = ConsumerState::default();
        assert_ne!(s, other);
        other.apply(&json!({"_id": 4, "data": "x"}));
        s.reset();
        assert_eq!(s, ConsumerState::default());
    }

    /// A deterministic list: a tenant and two collections, then keyed upserts and deletes
    /// over a few keys, unkeyed changes (some a tenant's, some tagged) and internal records.
    fn list(n: u64) -> Vec<Value> {
        let mut out = vec![
            json!({"_id": 1, "_ts": 10, "type": -4, "data": {"_id": 1, "name": "acme"}}),
            json!({"_id": 2, "_ts": 11, "type": -5, "data": {"_id": 1, "name": "f", "tenant": "acme"}}),
            json!({"_id": 3, "_ts": 12, "type": -5, "data": {"_id": 2, "name": "g", "tenant": "acme"}}),
        ];
        let mut live = std::collections::BTreeSet::new();
        let mut seed = 7u64;
        for id in 4..=n {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = (seed >> 33) % 100;
            let coll = if r.is_multiple_of(2) { "f" } else { "g" };
            let key = format!("k{}", (seed >> 40) % 5);
            let ts = 100 + id as i64;
            let change = if r < 45 {
                live.insert((coll, key.clone()));
                json!({"_id": id, "_ts": ts, "tenant": "acme", "collection": coll, "key": key,
                       "data": {"v": r, "nested": {"a": [1, 2.5, null], "b": id}}})
            } else if r < 60 && live.remove(&(coll, key.clone())) {
                json!({"_id": id, "_ts": ts, "tenant": "acme", "collection": coll, "key": key,
                       "deleted": true})
            } else if r < 70 {
                json!({"_id": id, "_ts": ts, "type": -1, "data": {"index": id - 1, "by": "c"}})
            } else if r < 85 {
                json!({"_id": id, "_ts": ts, "tenant": "acme", "tags": ["t"], "data": r})
            } else {
                json!({"_id": id, "_ts": ts, "data": {"x": format!("u{id}")}})
            };
            out.push(change);
        }
        out
    }

    /// The records of a checkpoint of `state`: the catalog, the latest change of every live
    /// key and every unkeyed change, in `_id` order where they have one.
    fn records(state: &ConsumerState) -> Vec<Value> {
        let mut out = Vec::new();
        for (id, name) in &state.tenants {
            out.push(json!({"_id": 0, "type": -4, "data": {"_id": id, "name": name}}));
        }
        for (id, (tenant, name)) in &state.collections {
            out.push(
                json!({"_id": 0, "type": -5, "data": {"_id": id, "name": name, "tenant": tenant}}),
            );
        }
        let mut changes: Vec<&Value> = state.keys.values().chain(state.unkeyed.values()).collect();
        changes.sort_by_key(|c| c["_id"].as_u64());
        out.extend(changes.into_iter().cloned());
        out
    }

    #[test]
    fn states_equal_by_different_paths_have_equal_digests() {
        let all = list(400);
        let mut full = ConsumerState::default();
        let mut full_digest = StateDigest::default();
        for c in &all {
            full.apply(c);
            full_digest.apply(c);
        }
        assert!(
            full.keys.len() > 1 && full.unkeyed.len() > 10,
            "{}",
            full.summary()
        );
        assert_eq!(StateDigest::of(&full), full_digest);

        // Read the first `seen` changes, went away, came back behind a truncation: a reset,
        // the records of a checkpoint at `at`, then the changes after it.
        for (seen, at) in [(0, 3), (50, 120), (10, 399), (200, 400)] {
            let mut checkpoint = ConsumerState::default();
            for c in &all[..at] {
                checkpoint.apply(c);
            }
            let mut state = ConsumerState::default();
            let mut digest = StateDigest::default();
            for c in &all[..seen] {
                state.apply(c);
                digest.apply(c);
            }
            state.reset();
            digest.reset();
            for r in records(&checkpoint) {
                state.apply(&r);
                digest.apply(&r);
            }
            for c in &all[at..] {
                state.apply(c);
                digest.apply(c);
            }
            assert_eq!(state, full, "seen {seen}, checkpoint at {at}");
            assert_eq!(digest, full_digest, "seen {seen}, checkpoint at {at}");
        }

        // Members of an object in another order: equal values, equal digests.
        let mut a = StateDigest::default();
        let mut b = StateDigest::default();
        a.apply(
            &serde_json::from_str(r#"{"_id":1,"data":{"p":1,"q":[2,{"r":3,"s":4}]}}"#).unwrap(),
        );
        b.apply(
            &serde_json::from_str(r#"{"data":{"q":[2,{"s":4,"r":3}],"p":1},"_id":1}"#).unwrap(),
        );
        assert_eq!(a, b);
    }

    fn tags(c: &Value) -> Vec<String> {
        let tags = c["tags"].as_array().cloned().unwrap_or_default();
        tags.iter()
            .map(|t| t.as_str().unwrap().to_owned())
            .collect()
    }

    /// The fields of a wire JSON change, as a caller holding parsed changes has them.
    fn fields<'a>(c: &'a Value, tags: &'a [String]) -> ChangeFields<'a> {
        ChangeFields {
            id: c["_id"].as_u64().unwrap(),
            ts: c["_ts"].as_i64().unwrap_or(0),
            change_type: c["type"].as_i64().unwrap_or(0) as i32,
            tags,
            tenant: c["tenant"].as_str(),
            collection: c["collection"].as_str(),
            key: c["key"].as_str(),
            deleted: c["deleted"].as_bool().unwrap_or(false),
            data: c.get("data"),
        }
    }

    #[test]
    fn a_digest_from_fields_equals_one_from_json() {
        let mut all = list(300);
        for c in &mut all {
            // Every change as the server sends it: with a `_ts`.
            if c.get("_ts").is_none() {
                c["_ts"] = json!(5);
            }
        }
        all.push(json!({"_id": 301, "_ts": -3, "type": 7, "tags": ["a", "b"],
                        "data": [1, -2, 2.5, "x", null, true, {"k": {}}]}));
        let mut from_json = StateDigest::default();
        let mut from_fields = StateDigest::default();
        for c in &all {
            from_json.apply(c);
            from_fields.apply_fields(&fields(c, &tags(c)));
            assert_eq!(from_json, from_fields, "after {c}");
        }
        // And they tell the same differences apart.
        let mut other = from_fields.clone();
        other.apply_fields(&ChangeFields {
            id: 302,
            ts: 1,
            ..ChangeFields::default()
        });
        assert_ne!(other, from_json);
    }

    #[test]
    fn different_states_have_different_digests() {
        let all = list(200);
        let build = |changes: &[Value]| {
            let mut state = ConsumerState::default();
            let mut digest = StateDigest::default();
            for c in changes {
                state.apply(c);
                digest.apply(c);
            }
            (state, digest)
        };
        let (state, digest) = build(&all);
        let live = state.keys.values().next().expect("a live key").clone();
        let unkeyed = state
            .unkeyed
            .values()
            .last()
            .expect("an unkeyed change")
            .clone();
        let next = 201u64;
        let mut variants: Vec<(&str, Vec<Value>)> = Vec::new();
        variants.push(("one change fewer", all[..all.len() - 1].to_vec()));
        let mut extra = all.clone();
        extra.push(json!({"_id": next, "_ts": 1, "data": "extra"}));
        variants.push(("an extra unkeyed change", extra));
        let mut rewritten = all.clone();
        let mut changed = live.clone();
        changed["_id"] = json!(next);
        rewritten.push(changed.clone());
        variants.push(("a key's latest change at another _id", rewritten));
        let mut other_value = all.clone();
        changed["data"] = json!({"v": "other"});
        other_value.push(changed);
        variants.push(("a key with another value", other_value));
        let mut deleted = all.clone();
        let mut delete = live.clone();
        delete["_id"] = json!(next);
        delete["deleted"] = json!(true);
        delete.as_object_mut().unwrap().remove("data");
        deleted.push(delete);
        variants.push(("a key deleted", deleted));
        let mut renamed = all.clone();
        renamed.push(json!({"_id": next, "type": -4, "data": {"_id": 1, "name": "other"}}));
        variants.push(("a tenant renamed", renamed));
        let mut moved = all.clone();
        moved.push(
            json!({"_id": next, "type": -5, "data": {"_id": 2, "name": "g", "tenant": "beta"}}),
        );
        variants.push(("a collection of another tenant", moved));
        let mut retimed = all.clone();
        let pos = retimed.iter().position(|c| *c == unkeyed).unwrap();
        retimed[pos]["_ts"] = json!(1);
        variants.push(("an unkeyed change with another _ts", retimed));
        // Two unkeyed changes that swap their data: same multiset of data, other state.
        let swap = |first: &str, second: &str| {
            vec![
                json!({"_id": 1, "data": first}),
                json!({"_id": 2, "data": second}),
            ]
        };
        let (s1, d1) = build(&swap("a", "b"));
        let (s2, d2) = build(&swap("b", "a"));
        assert_ne!(s1, s2);
        assert_ne!(d1, d2, "swapped data");
        for (what, changes) in variants {
            let (s, d) = build(&changes);
            assert_ne!(s, state, "{what}: the states should differ");
            assert_ne!(d, digest, "{what}: {} vs {}", d.summary(), digest.summary());
        }
    }
}
