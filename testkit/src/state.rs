//! The state a consumer of the change list builds, to compare consumers that got there by
//! different paths (one read every change, another loaded a checkpoint after a 410): the
//! catalog, the latest change of every live key, and every change without a key.

use std::collections::BTreeMap;

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
}
