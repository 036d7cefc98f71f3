//! The fleet's names and marks: tenants `fleet-t{T}`, each with
//! [`COLLECTIONS_PER_TENANT`] collections `fleet-t{T}-c{C}` of `--keys` keys
//! `k{K}`, numbered as one key space; and the marker every write's data
//! carries, `{"fleet":{"run":RUN,"w":WRITER,"n":SEQ}}`, which tells this
//! run's writes apart from any other's in the list.

use serde_json::{json, Value};

/// Collections each tenant gets.
pub const COLLECTIONS_PER_TENANT: u32 = 2;

/// The key index of an unkeyed write.
pub const NO_KEY: u32 = u32::MAX;

/// Most keys in all: key indexes are `u32`s (one value kept for
/// [`NO_KEY`]), and every consumer's digest holds an entry per live key.
pub const MAX_KEYS: u64 = 10_000_000;

/// The tenants, collections and keys the fleet writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySpace {
    pub tenants: u32,
    /// Keys per collection.
    pub keys: u32,
}

impl KeySpace {
    /// Keys in all collections of all tenants.
    pub fn len(&self) -> u32 {
        self.tenants * COLLECTIONS_PER_TENANT * self.keys
    }

    pub fn tenant(t: u32) -> String {
        format!("fleet-t{t}")
    }

    pub fn collection(t: u32, c: u32) -> String {
        format!("fleet-t{t}-c{c}")
    }

    /// Tenant, collection and key of a key index.
    pub fn names(&self, index: u32) -> (String, String, String) {
        let k = index % self.keys;
        let c = (index / self.keys) % COLLECTIONS_PER_TENANT;
        let t = index / self.keys / COLLECTIONS_PER_TENANT;
        (Self::tenant(t), Self::collection(t, c), format!("k{k}"))
    }

    /// The key index of a tenant, collection and key, when they are the
    /// fleet's.
    pub fn index_of(&self, tenant: &str, collection: &str, key: &str) -> Option<u32> {
        let t: u32 = tenant.strip_prefix("fleet-t")?.parse().ok()?;
        let rest = collection.strip_prefix(&format!("fleet-t{t}-c"))?;
        let c: u32 = rest.parse().ok()?;
        let k: u32 = key.strip_prefix('k')?.parse().ok()?;
        // `parse` accepts "+1" and "01"; only the fleet's own spelling is its key.
        if Self::collection(t, c) != collection || format!("k{k}") != key {
            return None;
        }
        (t < self.tenants && c < COLLECTIONS_PER_TENANT && k < self.keys)
            .then(|| (t * COLLECTIONS_PER_TENANT + c) * self.keys + k)
    }
}

/// Which write a change is: writer `writer`'s write number `n` (from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Marker {
    pub writer: u32,
    pub n: u64,
}

impl Marker {
    /// The marker as it goes into a write's data.
    pub fn json(&self, run: &str) -> Value {
        json!({"run": run, "w": self.writer, "n": self.n})
    }

    /// The marker of run `run` in a change's data, if it has one.
    pub fn of(data: Option<&Value>, run: &str) -> Option<Marker> {
        let fleet = data?.get("fleet")?;
        if fleet.get("run")?.as_str()? != run {
            return None;
        }
        Some(Marker {
            writer: u32::try_from(fleet.get("w")?.as_u64()?).ok()?,
            n: fleet.get("n")?.as_u64()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_indexes_and_names_go_both_ways() {
        let space = KeySpace {
            tenants: 3,
            keys: 200,
        };
        assert_eq!(space.len(), 1200);
        for index in [0, 1, 199, 200, 399, 400, 1199] {
            let (t, c, k) = space.names(index);
            assert_eq!(space.index_of(&t, &c, &k), Some(index), "{t} {c} {k}");
        }
        assert_eq!(
            space.names(401),
            ("fleet-t1".into(), "fleet-t1-c0".into(), "k1".into())
        );
        for (t, c, k) in [
            ("fleet-t3", "fleet-t3-c0", "k0"),
            ("fleet-t0", "fleet-t0-c2", "k0"),
            ("fleet-t0", "fleet-t0-c0", "k200"),
            ("fleet-t0", "fleet-t1-c0", "k0"),
            ("fleet-t0", "fleet-t0-c0", "k01"),
            ("fleet-t0", "fleet-t0-c+1", "k1"),
            ("acme", "flags", "k1"),
        ] {
            assert_eq!(space.index_of(t, c, k), None, "{t} {c} {k}");
        }
    }

    #[test]
    fn markers_are_read_back_for_their_run_only() {
        let m = Marker { writer: 5, n: 17 };
        let data = json!({"fleet": m.json("r1"), "v": 3});
        assert_eq!(Marker::of(Some(&data), "r1"), Some(m));
        assert_eq!(Marker::of(Some(&data), "r2"), None);
        assert_eq!(Marker::of(None, "r1"), None);
        assert_eq!(Marker::of(Some(&json!({"v": 3})), "r1"), None);
        assert_eq!(Marker::of(Some(&json!("text")), "r1"), None);
    }
}
