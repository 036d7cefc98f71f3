//! A history checker for cluster tests: clients record every write attempt
//! (with its result) and every read, then [`History::check`] holds the final
//! change lists of every node against them: the same bytes everywhere, dense
//! ids, every acknowledged write exactly once at its acknowledged `_id`, no
//! write applied twice, and no client read that the final state contradicts.
//!
//! A write is identified by a unique marker in its data (`{"m": marker}`, see
//! [`write_body`]), so the checker can find it in a list without trusting ids.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::Value;

/// The field of a change's `data` that holds the marker.
pub const MARKER_FIELD: &str = "m";

/// The `POST /changes` body of the write marked `marker`.
pub fn write_body(marker: &str) -> String {
    serde_json::json!({ "data": { MARKER_FIELD: marker } }).to_string()
}

/// The marker of a change given as raw JSON text, if its data has one.
pub fn marker_of(raw: &str) -> Option<String> {
    let v: Value = serde_json::from_str(raw).ok()?;
    v.get("data")?
        .get(MARKER_FIELD)?
        .as_str()
        .map(str::to_string)
}

/// What one attempt to write answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptResult {
    /// 200 with this `_id`: the write is committed.
    Acked(u64),
    /// A 4xx answer: the request was rejected and changed nothing.
    Rejected(u16),
    /// Timeout, 503, connection error, other 5xx: it may or may not have been
    /// committed.
    Unknown(String),
}

/// One attempt of one write. Retries of a write share its key and marker.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub client: usize,
    /// The node the attempt was sent to (for reports).
    pub node: String,
    pub key: String,
    pub marker: String,
    pub result: AttemptResult,
    /// When the answer (or failure) arrived.
    pub at: Instant,
}

/// One successful read by a client.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub client: usize,
    pub node: String,
    /// Read with `consistent=true`.
    pub consistent: bool,
    /// The `since` the read asked for.
    pub since: u64,
    /// The `_id` and marker of each change it got, in the order served.
    pub entries: Vec<(u64, Option<String>)>,
    /// The answer's `lastIndex`.
    pub last_index: u64,
    /// The highest `_id` this client had been acknowledged before it sent
    /// the read (a consistent read must include it).
    pub acked_before: Option<u64>,
}

/// Something the final state or a read contradicts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A node's list differs from the first node's.
    ListsDiffer {
        node: String,
        reference: String,
        detail: String,
    },
    /// The list's ids are not exactly 1, 2, 3, …
    NotDense {
        node: String,
        position: usize,
        id: u64,
    },
    /// A change no recorded write could have produced.
    Unrecorded { id: u64, marker: Option<String> },
    /// An acknowledged write is not in the list.
    AckedMissing { marker: String, acked: u64 },
    /// A write is in the list more than once.
    Duplicated { marker: String, ids: Vec<u64> },
    /// An acknowledged write sits at another `_id` than the one acknowledged.
    AckedWrongId {
        marker: String,
        acked: u64,
        found: u64,
    },
    /// Attempts of one write were acknowledged with different `_id`s.
    AcksDisagree { marker: String, ids: Vec<u64> },
    /// A write every attempt of which was rejected (4xx) is in the list.
    RejectedPresent { marker: String, id: u64 },
    /// One read's ids are not increasing, or not after its `since`.
    ReadOutOfOrder {
        client: usize,
        node: String,
        ids: Vec<u64>,
    },
    /// A read saw a change the final list does not have at that id.
    ReadMismatch {
        client: usize,
        node: String,
        id: u64,
        seen: Option<String>,
        in_final: Option<String>,
    },
    /// A read's `lastIndex` is lower than an earlier comparable read's (same
    /// node, or both consistent) by the same client.
    ReadWentBackwards {
        client: usize,
        node: String,
        earlier: u64,
        later: u64,
    },
    /// A consistent read missed a write the client had been acknowledged.
    ReadMissedOwnWrite {
        client: usize,
        node: String,
        acked: u64,
        last_index: u64,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// What a passing check saw.
#[derive(Debug, Clone, Default)]
pub struct CheckSummary {
    /// Changes in the final list.
    pub changes: usize,
    /// Writes acknowledged (each found once at its `_id`).
    pub acked: usize,
    /// Writes with only unknown outcomes that were applied (once).
    pub unknown_applied: usize,
    /// Writes with only unknown outcomes that were not applied.
    pub unknown_absent: usize,
    /// Writes rejected with 4xx (absent).
    pub rejected: usize,
    /// Reads checked.
    pub reads: usize,
    /// Where each write's marker is in the final list.
    pub positions: HashMap<String, u64>,
}

impl CheckSummary {
    /// The `_id` the write marked `marker` has in the final list.
    pub fn id_of(&self, marker: &str) -> Option<u64> {
        self.positions.get(marker).copied()
    }
}

#[derive(Default)]
struct Inner {
    attempts: Vec<Attempt>,
    reads: Vec<ReadRecord>,
}

/// Every write attempt and read of a test's clients. Shared by the client
/// tasks (`Arc<History>`); recording takes a short lock, never across an
/// await.
#[derive(Default)]
pub struct History {
    inner: Mutex<Inner>,
}

/// How one write ended, from all its attempts.
enum Fate {
    /// Some attempt was acknowledged with this `_id`.
    Acked(u64),
    /// Every attempt was rejected with a 4xx.
    Rejected,
    /// Otherwise: applied at most once.
    Unknown,
}

impl History {
    pub fn new() -> History {
        History::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one attempt of a write.
    pub fn record_attempt(
        &self,
        client: usize,
        node: &str,
        key: &str,
        marker: &str,
        result: AttemptResult,
    ) {
        self.lock().attempts.push(Attempt {
            client,
            node: node.to_string(),
            key: key.to_string(),
            marker: marker.to_string(),
            result,
            at: Instant::now(),
        });
    }

    /// Records one read.
    pub fn record_read(&self, read: ReadRecord) {
        self.lock().reads.push(read);
    }

    /// Every attempt so far, in recording order.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.lock().attempts.clone()
    }

    /// Every read so far, in recording order.
    pub fn reads(&self) -> Vec<ReadRecord> {
        self.lock().reads.clone()
    }

    /// Attempts acknowledged so far.
    pub fn acked_count(&self) -> usize {
        self.acked_since(None)
    }

    /// Attempts acknowledged after `t` (all when `None`).
    pub fn acked_since(&self, t: Option<Instant>) -> usize {
        self.lock()
            .attempts
            .iter()
            .filter(|a| matches!(a.result, AttemptResult::Acked(_)))
            .filter(|a| t.is_none_or(|t| a.at > t))
            .count()
    }

    /// The highest `_id` acknowledged to `client` so far.
    pub fn highest_acked(&self, client: usize) -> Option<u64> {
        self.lock()
            .attempts
            .iter()
            .filter(|a| a.client == client)
            .filter_map(|a| match a.result {
                AttemptResult::Acked(id) => Some(id),
                _ => None,
            })
            .max()
    }

    /// Checks the final list of every node (name, raw changes in served
    /// order) against the history. `Err` lists every violation found.
    pub fn check(&self, finals: &[(String, Vec<String>)]) -> Result<CheckSummary, Vec<Violation>> {
        let inner = self.lock();
        let mut violations = Vec::new();
        let Some((ref_name, reference)) = finals.first() else {
            return Err(vec![Violation::ListsDiffer {
                node: "-".into(),
                reference: "-".into(),
                detail: "no final lists given".into(),
            }]);
        };

        // 1. Byte-identical lists on every node.
        for (name, list) in &finals[1..] {
            if let Some(detail) = list_difference(reference, list) {
                violations.push(Violation::ListsDiffer {
                    node: name.clone(),
                    reference: ref_name.clone(),
                    detail,
                });
            }
        }

        // 2. Dense ids, and where each marker is.
        let mut ids_of: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut marker_at: HashMap<u64, Option<String>> = HashMap::new();
        for (pos, raw) in reference.iter().enumerate() {
            let id = serde_json::from_str::<Value>(raw)
                .ok()
                .and_then(|v| v.get("_id").and_then(Value::as_u64));
            let want = pos as u64 + 1;
            if id != Some(want) {
                violations.push(Violation::NotDense {
                    node: ref_name.clone(),
                    position: pos,
                    id: id.unwrap_or(0),
                });
            }
            let id = id.unwrap_or(want);
            let marker = marker_of(raw);
            marker_at.insert(id, marker.clone());
            if let Some(m) = marker {
                ids_of.entry(m).or_default().push(id);
            }
        }

        // 3. Every write's fate against the list.
        let mut attempts_of: BTreeMap<&str, Vec<&Attempt>> = BTreeMap::new();
        for a in &inner.attempts {
            attempts_of.entry(a.marker.as_str()).or_default().push(a);
        }
        let mut summary = CheckSummary {
            changes: reference.len(),
            reads: inner.reads.len(),
            ..CheckSummary::default()
        };
        for (marker, attempts) in &attempts_of {
            let mut acks: Vec<u64> = attempts
                .iter()
                .filter_map(|a| match a.result {
                    AttemptResult::Acked(id) => Some(id),
                    _ => None,
                })
                .collect();
            acks.sort_unstable();
            acks.dedup();
            if acks.len() > 1 {
                violations.push(Violation::AcksDisagree {
                    marker: marker.to_string(),
                    ids: acks.clone(),
                });
            }
            let all_rejected = attempts
                .iter()
                .all(|a| matches!(a.result, AttemptResult::Rejected(_)));
            let fate = match acks.first() {
                Some(&id) => Fate::Acked(id),
                None if all_rejected => Fate::Rejected,
                None => Fate::Unknown,
            };
            let found = ids_of.get(*marker).cloned().unwrap_or_default();
            if found.len() > 1 {
                violations.push(Violation::Duplicated {
                    marker: marker.to_string(),
                    ids: found.clone(),
                });
            }
            if let Some(&id) = found.first() {
                summary.positions.insert(marker.to_string(), id);
            }
            match fate {
                Fate::Acked(acked) => match found.first() {
                    None => violations.push(Violation::AckedMissing {
                        marker: marker.to_string(),
                        acked,
                    }),
                    Some(&id) if id != acked && found.len() == 1 => {
                        violations.push(Violation::AckedWrongId {
                            marker: marker.to_string(),
                            acked,
                            found: id,
                        })
                    }
                    Some(_) => summary.acked += 1,
                },
                Fate::Rejected => {
                    if let Some(&id) = found.first() {
                        violations.push(Violation::RejectedPresent {
                            marker: marker.to_string(),
                            id,
                        });
                    } else {
                        summary.rejected += 1;
                    }
                }
                Fate::Unknown => {
                    if found.is_empty() {
                        summary.unknown_absent += 1;
                    } else {
                        summary.unknown_applied += 1;
                    }
                }
            }
        }
        for (marker, ids) in &ids_of {
            if !attempts_of.contains_key(marker.as_str()) {
                for &id in ids {
                    violations.push(Violation::Unrecorded {
                        id,
                        marker: Some(marker.clone()),
                    });
                }
            }
        }
        for (&id, marker) in &marker_at {
            if marker.is_none() {
                violations.push(Violation::Unrecorded { id, marker: None });
            }
        }

        // 4. Reads: ordered, not contradicted by the final list, monotonic
        //    per client, and consistent reads include the client's own acks.
        let final_len = reference.len() as u64;
        // Highest lastIndex seen per (client, node) and per client among
        // consistent reads.
        let mut per_node: HashMap<(usize, &str), u64> = HashMap::new();
        let mut per_client_consistent: HashMap<usize, (u64, &str)> = HashMap::new();
        for r in &inner.reads {
            let ids: Vec<u64> = r.entries.iter().map(|(id, _)| *id).collect();
            let ordered =
                ids.windows(2).all(|w| w[0] < w[1]) && ids.first().is_none_or(|&f| f > r.since);
            if !ordered {
                violations.push(Violation::ReadOutOfOrder {
                    client: r.client,
                    node: r.node.clone(),
                    ids: ids.clone(),
                });
            }
            for (id, seen) in &r.entries {
                let in_final = marker_at.get(id);
                if in_final != Some(seen) {
                    violations.push(Violation::ReadMismatch {
                        client: r.client,
                        node: r.node.clone(),
                        id: *id,
                        seen: seen.clone(),
                        in_final: in_final.cloned().flatten(),
                    });
                }
            }
            if r.last_index > final_len {
                violations.push(Violation::ReadMismatch {
                    client: r.client,
                    node: r.node.clone(),
                    id: r.last_index,
                    seen: None,
                    in_final: None,
                });
            }
            let key = (r.client, r.node.as_str());
            if let Some(&earlier) = per_node.get(&key) {
                if r.last_index < earlier {
                    violations.push(Violation::ReadWentBackwards {
                        client: r.client,
                        node: r.node.clone(),
                        earlier,
                        later: r.last_index,
                    });
                }
            }
            let e = per_node.entry(key).or_insert(0);
            *e = (*e).max(r.last_index);
            if r.consistent {
                if let Some(&(earlier, _)) = per_client_consistent.get(&r.client) {
                    if r.last_index < earlier {
                        violations.push(Violation::ReadWentBackwards {
                            client: r.client,
                            node: r.node.clone(),
                            earlier,
                            later: r.last_index,
                        });
                    }
                }
                let e = per_client_consistent
                    .entry(r.client)
                    .or_insert((0, r.node.as_str()));
                if r.last_index >= e.0 {
                    *e = (r.last_index, r.node.as_str());
                }
                if let Some(acked) = r.acked_before {
                    // lastIndex is what the node had applied when it
                    // answered; the entries themselves were checked above.
                    if r.last_index < acked {
                        violations.push(Violation::ReadMissedOwnWrite {
                            client: r.client,
                            node: r.node.clone(),
                            acked,
                            last_index: r.last_index,
                        });
                    }
                }
            }
        }

        if violations.is_empty() {
            Ok(summary)
        } else {
            Err(violations)
        }
    }

    /// [`check`](Self::check), panicking with every violation (up to 50)
    /// and a digest of the history when there is any.
    #[track_caller]
    pub fn assert_consistent(&self, finals: &[(String, Vec<String>)]) -> CheckSummary {
        match self.check(finals) {
            Ok(summary) => summary,
            Err(violations) => {
                let shown: Vec<String> = violations
                    .iter()
                    .take(50)
                    .map(|v| format!("  - {v}"))
                    .collect();
                let attempts = self.attempts();
                let sizes: Vec<String> = finals
                    .iter()
                    .map(|(n, l)| format!("{n}: {} changes", l.len()))
                    .collect();
                panic!(
                    "history check failed: {} violation(s) (first {}):\n{}\nfinal lists: {}\nhistory: {} attempts ({} acked), {} reads",
                    violations.len(),
                    shown.len(),
                    shown.join("\n"),
                    sizes.join(", "),
                    attempts.len(),
                    attempts
                        .iter()
                        .filter(|a| matches!(a.result, AttemptResult::Acked(_)))
                        .count(),
                    self.reads().len(),
                );
            }
        }
    }
}

/// Where two lists first differ, or `None` when they are identical.
fn list_difference(reference: &[String], other: &[String]) -> Option<String> {
    if let Some(pos) = reference.iter().zip(other).position(|(a, b)| a != b) {
        return Some(format!(
            "position {pos}: {} vs {}",
            reference[pos], other[pos]
        ));
    }
    if reference.len() != other.len() {
        return Some(format!("length {} vs {}", reference.len(), other.len()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(id: u64, marker: &str) -> String {
        format!(
            r#"{{"_id":{id},"_ts":{},"data":{{"m":"{marker}"}}}}"#,
            1000 + id
        )
    }

    fn list(markers: &[&str]) -> Vec<String> {
        markers
            .iter()
            .enumerate()
            .map(|(i, m)| change(i as u64 + 1, m))
            .collect()
    }

    fn finals(l: &[String]) -> Vec<(String, Vec<String>)> {
        vec![
            ("n0".to_string(), l.to_vec()),
            ("n1".to_string(), l.to_vec()),
        ]
    }

    /// A history of three acked writes a, b, c (ids 1-3) by client 0.
    fn abc() -> History {
        let h = History::new();
        for (i, m) in ["a", "b", "c"].iter().enumerate() {
            h.record_attempt(0, "n0", m, m, AttemptResult::Acked(i as u64 + 1));
        }
        h
    }

    fn violations(h: &History, f: &[(String, Vec<String>)]) -> Vec<Violation> {
        h.check(f).expect_err("the checker missed a violation")
    }

    #[test]
    fn clean_history_passes() {
        let h = abc();
        h.record_attempt(1, "n1", "u1", "u1", AttemptResult::Unknown("503".into()));
        h.record_attempt(1, "n2", "u1", "u1", AttemptResult::Acked(4));
        h.record_attempt(
            1,
            "n1",
            "u2",
            "u2",
            AttemptResult::Unknown("timeout".into()),
        );
        h.record_attempt(1, "n1", "u3", "u3", AttemptResult::Unknown("reset".into()));
        h.record_attempt(1, "n1", "r", "r", AttemptResult::Rejected(400));
        h.record_read(ReadRecord {
            client: 1,
            node: "n1".into(),
            consistent: true,
            since: 1,
            entries: vec![(2, Some("b".into())), (3, Some("c".into()))],
            last_index: 3,
            acked_before: Some(2),
        });
        h.record_read(ReadRecord {
            client: 1,
            node: "n2".into(),
            consistent: true,
            since: 3,
            entries: vec![(4, Some("u1".into())), (5, Some("u2".into()))],
            last_index: 5,
            acked_before: Some(4),
        });
        let l = list(&["a", "b", "c", "u1", "u2"]);
        let s = h.check(&finals(&l)).expect("clean history");
        assert_eq!(s.changes, 5);
        assert_eq!(s.acked, 4);
        assert_eq!(s.unknown_applied, 1);
        assert_eq!(s.unknown_absent, 1);
        assert_eq!(s.rejected, 1);
        assert_eq!(s.reads, 2);
        assert_eq!(s.id_of("u2"), Some(5));
        assert_eq!(h.acked_count(), 4);
        assert_eq!(h.highest_acked(1), Some(4));
    }

    #[test]
    fn lists_that_differ_between_nodes() {
        let h = abc();
        let a = list(&["a", "b", "c"]);
        // Other order.
        let b = vec![a[0].clone(), a[2].clone(), a[1].clone()];
        let v = violations(&h, &[("n0".into(), a.clone()), ("n1".into(), b)]);
        assert!(
            matches!(&v[0], Violation::ListsDiffer { node, .. } if node == "n1"),
            "{v:?}"
        );
        // A missing tail.
        let v = violations(
            &h,
            &[("n0".into(), a.clone()), ("n1".into(), a[..2].to_vec())],
        );
        assert!(
            matches!(&v[0], Violation::ListsDiffer { detail, .. } if detail.contains("length")),
            "{v:?}"
        );
        // Same content, other bytes (field order).
        let mut c = a.clone();
        c[1] = r#"{"_ts":1002,"_id":2,"data":{"m":"b"}}"#.to_string();
        let v = violations(&h, &[("n0".into(), a), ("n1".into(), c)]);
        assert!(matches!(&v[0], Violation::ListsDiffer { .. }), "{v:?}");
    }

    #[test]
    fn ids_that_are_not_dense() {
        let h = abc();
        let l = vec![change(1, "a"), change(2, "b"), change(4, "c")];
        let v = violations(&h, &finals(&l));
        assert!(
            v.contains(&Violation::NotDense {
                node: "n0".into(),
                position: 2,
                id: 4
            }),
            "{v:?}"
        );
    }

    #[test]
    fn acked_write_missing() {
        let h = abc();
        h.record_attempt(0, "n0", "d", "d", AttemptResult::Acked(4));
        let v = violations(&h, &finals(&list(&["a", "b", "c"])));
        assert_eq!(
            v,
            vec![Violation::AckedMissing {
                marker: "d".into(),
                acked: 4
            }]
        );
    }

    #[test]
    fn acked_write_twice() {
        let h = abc();
        let v = violations(&h, &finals(&list(&["a", "b", "c", "b"])));
        assert_eq!(
            v,
            vec![Violation::Duplicated {
                marker: "b".into(),
                ids: vec![2, 4]
            }]
        );
    }

    #[test]
    fn acked_write_at_another_id() {
        let h = abc();
        let v = violations(&h, &finals(&list(&["a", "c", "b"])));
        assert!(
            v.contains(&Violation::AckedWrongId {
                marker: "b".into(),
                acked: 2,
                found: 3
            }),
            "{v:?}"
        );
        assert!(
            v.contains(&Violation::AckedWrongId {
                marker: "c".into(),
                acked: 3,
                found: 2
            }),
            "{v:?}"
        );
    }

    #[test]
    fn retries_acked_with_different_ids() {
        let h = abc();
        h.record_attempt(0, "n0", "d", "d", AttemptResult::Acked(4));
        h.record_attempt(0, "n1", "d", "d", AttemptResult::Acked(5));
        let v = violations(&h, &finals(&list(&["a", "b", "c", "d"])));
        assert!(
            v.contains(&Violation::AcksDisagree {
                marker: "d".into(),
                ids: vec![4, 5]
            }),
            "{v:?}"
        );
    }

    #[test]
    fn unknown_write_twice() {
        let h = abc();
        h.record_attempt(0, "n0", "u", "u", AttemptResult::Unknown("503".into()));
        h.record_attempt(0, "n1", "u", "u", AttemptResult::Unknown("timeout".into()));
        let v = violations(&h, &finals(&list(&["a", "b", "c", "u", "u"])));
        assert_eq!(
            v,
            vec![Violation::Duplicated {
                marker: "u".into(),
                ids: vec![4, 5]
            }]
        );
    }

    #[test]
    fn rejected_write_present() {
        let h = abc();
        h.record_attempt(0, "n0", "r", "r", AttemptResult::Rejected(409));
        let v = violations(&h, &finals(&list(&["a", "b", "c", "r"])));
        assert_eq!(
            v,
            vec![Violation::RejectedPresent {
                marker: "r".into(),
                id: 4
            }]
        );
    }

    #[test]
    fn change_nobody_wrote() {
        let h = abc();
        let mut l = list(&["a", "b", "c", "zz"]);
        let v = violations(&h, &finals(&l));
        assert_eq!(
            v,
            vec![Violation::Unrecorded {
                id: 4,
                marker: Some("zz".into())
            }]
        );
        l[3] = r#"{"_id":4,"_ts":5,"data":{"other":1}}"#.to_string();
        let v = violations(&h, &finals(&l));
        assert_eq!(
            v,
            vec![Violation::Unrecorded {
                id: 4,
                marker: None
            }]
        );
    }

    fn read(
        client: usize,
        node: &str,
        consistent: bool,
        since: u64,
        entries: &[(u64, &str)],
        last_index: u64,
    ) -> ReadRecord {
        ReadRecord {
            client,
            node: node.into(),
            consistent,
            since,
            entries: entries
                .iter()
                .map(|(id, m)| (*id, Some(m.to_string())))
                .collect(),
            last_index,
            acked_before: None,
        }
    }

    #[test]
    fn read_going_backwards() {
        let l = list(&["a", "b", "c"]);
        // On one node.
        let h = abc();
        h.record_read(read(5, "n1", false, 0, &[(1, "a"), (2, "b"), (3, "c")], 3));
        h.record_read(read(5, "n1", false, 0, &[(1, "a"), (2, "b")], 2));
        let v = violations(&h, &finals(&l));
        assert_eq!(
            v,
            vec![Violation::ReadWentBackwards {
                client: 5,
                node: "n1".into(),
                earlier: 3,
                later: 2
            }]
        );
        // Consistent reads across nodes.
        let h = abc();
        h.record_read(read(5, "n1", true, 0, &[(1, "a"), (2, "b"), (3, "c")], 3));
        h.record_read(read(5, "n2", true, 1, &[(2, "b")], 2));
        let v = violations(&h, &finals(&l));
        assert_eq!(
            v,
            vec![Violation::ReadWentBackwards {
                client: 5,
                node: "n2".into(),
                earlier: 3,
                later: 2
            }]
        );
        // Plain reads on different nodes may lag each other: no violation.
        let h = abc();
        h.record_read(read(5, "n1", false, 0, &[(1, "a"), (2, "b"), (3, "c")], 3));
        h.record_read(read(5, "n2", false, 0, &[(1, "a")], 1));
        h.check(&finals(&l))
            .expect("a lagging follower is allowed for plain reads");
    }

    #[test]
    fn read_out_of_order() {
        let h = abc();
        h.record_read(read(1, "n0", false, 0, &[(2, "b"), (1, "a")], 3));
        let v = violations(&h, &finals(&list(&["a", "b", "c"])));
        assert_eq!(
            v,
            vec![Violation::ReadOutOfOrder {
                client: 1,
                node: "n0".into(),
                ids: vec![2, 1]
            }]
        );
        let h = abc();
        h.record_read(read(1, "n0", false, 2, &[(2, "b")], 3));
        let v = violations(&h, &finals(&list(&["a", "b", "c"])));
        assert!(matches!(v[0], Violation::ReadOutOfOrder { .. }), "{v:?}");
    }

    #[test]
    fn read_the_final_list_contradicts() {
        let h = abc();
        // Saw "x" at 3, which ended up holding "c" (a dirty read).
        h.record_read(read(1, "n2", false, 2, &[(3, "x")], 3));
        // Saw an id beyond the final list.
        h.record_read(read(2, "n2", false, 3, &[], 7));
        let v = violations(&h, &finals(&list(&["a", "b", "c"])));
        assert!(
            v.contains(&Violation::ReadMismatch {
                client: 1,
                node: "n2".into(),
                id: 3,
                seen: Some("x".into()),
                in_final: Some("c".into())
            }),
            "{v:?}"
        );
        assert!(
            v.iter().any(|x| matches!(
                x,
                Violation::ReadMismatch {
                    client: 2,
                    id: 7,
                    ..
                }
            )),
            "{v:?}"
        );
    }

    #[test]
    fn consistent_read_missing_own_write() {
        let h = abc();
        let mut r = read(0, "n1", true, 0, &[(1, "a"), (2, "b")], 2);
        r.acked_before = Some(3);
        h.record_read(r);
        let v = violations(&h, &finals(&list(&["a", "b", "c"])));
        assert_eq!(
            v,
            vec![Violation::ReadMissedOwnWrite {
                client: 0,
                node: "n1".into(),
                acked: 3,
                last_index: 2
            }]
        );
        // A plain read may miss it.
        let h = abc();
        let mut r = read(0, "n1", false, 0, &[(1, "a"), (2, "b")], 2);
        r.acked_before = Some(3);
        h.record_read(r);
        h.check(&finals(&list(&["a", "b", "c"])))
            .expect("plain reads may lag");
    }

    #[test]
    fn body_and_marker_round_trip() {
        let body = write_body("w3-17");
        assert_eq!(body, r#"{"data":{"m":"w3-17"}}"#);
        assert_eq!(
            marker_of(r#"{"_id":9,"_ts":1,"data":{"m":"w3-17"}}"#).as_deref(),
            Some("w3-17")
        );
        assert_eq!(marker_of(r#"{"_id":9,"_ts":1,"data":5}"#), None);
    }
}
