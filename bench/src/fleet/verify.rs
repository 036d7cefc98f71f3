//! Were the acknowledged writes applied, each exactly once? The reference
//! consumer follows a core from 0 (reloading a checkpoint on a `410`, like
//! any consumer) and notes, in [`Sightings`], at which `_id` each of this
//! run's markers appears. At the end, [`Sightings::verify`] holds every
//! writer's log against those notes.
//!
//! Let `B` be the index of the checkpoint the reference last reloaded (0
//! when it read the whole list). Past `B` the reference read every change
//! of the list; up to `B` it has the checkpoint, which holds every unkeyed
//! change but only the latest change of each live key. So, for a write
//! acknowledged with `_id` `a`:
//!
//! 1. `a > B`: the change at `a` must carry the write's marker (a delete,
//!    which carries no data, must be a delete of the write's key).
//! 2. `a ≤ B`, unkeyed: the checkpoint's record at `a` must carry the
//!    marker.
//! 3. `a ≤ B`, keyed: the checkpoint must hold, for the key, the write
//!    itself, or a change after `a` (a later write overwrote it), or
//!    nothing when the write was a delete or a later delete of the key is
//!    known (acknowledged at an `_id` in `(a, B]`, or given up without an
//!    answer). A key holding a change older than `a`, or missing with no
//!    later delete, lost the write.
//! 4. No marker may appear at two `_id`s: a retry that appended twice. The
//!    notes cover the whole list past `B` and every record of the
//!    checkpoint, so a keyed write applied twice is caught unless both
//!    copies were overwritten before `B`, when no reader can see either.
//! 5. A write refused, or never sent, must not appear at all. A write given
//!    up at the end without an answer may appear once or not at all.
//!
//! Outbox posts are writes like any other, and each must also have been
//! acknowledged by the end.

use std::collections::{HashMap, HashSet};

use changeagent_client::{Change, FollowEvent};

use crate::fleet::check::Violations;
use crate::fleet::names::{KeySpace, Marker, NO_KEY};
use crate::fleet::writer::{Kind, Outcome, Write, WriterLog};

/// Highest write number a marker may carry: far beyond any run (a writer
/// at 1,000 writes a second for a year), so a marker past it is garbage,
/// not a reason to grow the notes without bound.
const MAX_WRITE_NUMBER: u64 = 1 << 35;

/// Where the reference saw this run's writes.
#[derive(Debug, Clone)]
pub struct Sightings {
    run: String,
    keys: KeySpace,
    /// Index of the checkpoint last reloaded; 0 when none was.
    base: u64,
    /// Writer → write number → `_id` of the change carrying its marker
    /// (0: not seen). 8 bytes a write. One list per writer of the run: a
    /// marker of another writer is a violation.
    seen: Vec<Vec<u64>>,
    /// Keyed deletes seen past `base`: `_id` → key index.
    deletes: HashMap<u64, u32>,
    /// Key index → `_id` of its record in the checkpoint at `base`.
    checkpoint_keys: HashMap<u32, u64>,
}

/// What [`Sightings::verify`] checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verified {
    /// Acknowledged writes checked.
    pub acked: u64,
    /// Of them, found at their `_id` in the list or the checkpoint.
    pub found: u64,
    /// Of them, keyed writes no longer in any state, overwritten or
    /// deleted by the checkpoint, and consistent with it (rule 3).
    pub unseen: u64,
    /// Writes given up without an answer (rule 5).
    pub unknown: u64,
}

impl Sightings {
    pub fn new(run: &str, keys: KeySpace, writers: u32) -> Self {
        Self {
            run: run.to_owned(),
            keys,
            base: 0,
            seen: vec![Vec::new(); writers as usize],
            deletes: HashMap::new(),
            checkpoint_keys: HashMap::new(),
        }
    }

    /// Index of the checkpoint the reference last reloaded (0: none).
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Notes one event of the reference's follow.
    pub fn see(&mut self, event: &FollowEvent, violations: &Violations) {
        match event {
            FollowEvent::Reset { checkpoint, .. } => {
                // Everything seen so far lies before the checkpoint, whose
                // records say it all again.
                self.base = checkpoint.index;
                for list in &mut self.seen {
                    list.clear();
                }
                self.deletes.clear();
                self.checkpoint_keys.clear();
            }
            FollowEvent::Record(record) => {
                if let Some(key) = self.key_of(record) {
                    self.checkpoint_keys.insert(key, record.id);
                }
                self.mark(record, violations);
            }
            FollowEvent::Change(change) => {
                if change.deleted {
                    if let Some(key) = self.key_of(change) {
                        self.deletes.insert(change.id, key);
                    }
                }
                self.mark(change, violations);
            }
            FollowEvent::ResetEnd { .. } => {}
        }
    }

    fn key_of(&self, change: &Change) -> Option<u32> {
        self.keys.index_of(
            change.tenant.as_deref()?,
            change.collection.as_deref()?,
            change.key.as_deref()?,
        )
    }

    /// Rule 4: notes where a marker appears; a second place is a violation.
    fn mark(&mut self, change: &Change, violations: &Violations) {
        let Some(marker) = Marker::of(change.data.as_ref(), &self.run) else {
            return;
        };
        let Some(list) = self.seen.get_mut(marker.writer as usize) else {
            violations.add(format!(
                "change {} carries the marker of writer {}, which does not exist",
                change.id, marker.writer
            ));
            return;
        };
        if marker.n > MAX_WRITE_NUMBER {
            violations.add(format!(
                "change {} carries write number {} of writer {}, beyond any run",
                change.id, marker.n, marker.writer
            ));
            return;
        }
        let n = marker.n as usize;
        if list.len() <= n {
            list.resize(n + 1, 0);
        }
        match list[n] {
            0 => list[n] = change.id,
            first if first == change.id => {}
            first => violations.add(format!(
                "writer {} write {} was applied twice: at {first} and at {}",
                marker.writer, marker.n, change.id
            )),
        }
    }

    /// Holds every writer's log against the notes (rules 1 to 5).
    pub fn verify(&self, logs: &[WriterLog], violations: &Violations) -> Verified {
        let mut verified = Verified::default();
        // Rule 3's later deletes, per key.
        let mut acked_deletes: HashMap<u32, Vec<u64>> = HashMap::new();
        let mut unsure_deletes: HashSet<u32> = HashSet::new();
        for log in logs {
            for write in log.writes.iter().filter(|w| w.kind == Kind::Delete) {
                match write.outcome {
                    Outcome::Acked => acked_deletes.entry(write.key).or_default().push(write.id),
                    Outcome::Unknown | Outcome::InFlight => {
                        unsure_deletes.insert(write.key);
                    }
                    Outcome::Refused => {}
                }
            }
        }
        let base = self.base;
        for log in logs {
            let seen = self.seen.get(log.writer as usize);
            let seen_at = |n: usize| seen.and_then(|s| s.get(n)).copied().unwrap_or(0);
            for (n, write) in log.writes.iter().enumerate() {
                let at = seen_at(n);
                let who = || {
                    let what = if write.key == NO_KEY {
                        "unkeyed".to_owned()
                    } else {
                        let (t, c, k) = self.keys.names(write.key);
                        format!("{:?} {t}/{c}/{k}", write.kind)
                    };
                    let writer = if log.outbox {
                        "outbox writer"
                    } else {
                        "writer"
                    };
                    format!("{writer} {} write {n} ({what})", log.writer)
                };
                let a = write.id;
                match write.outcome {
                    Outcome::Unknown | Outcome::InFlight => verified.unknown += 1,
                    Outcome::Refused if at != 0 => {
                        violations.add(format!("{} was refused, yet appears at {at}", who()));
                    }
                    Outcome::Refused => {}
                    Outcome::Acked => {
                        verified.acked += 1;
                        let judged = if a > base {
                            self.in_list(write, at)
                        } else if write.kind == Kind::Unkeyed {
                            Judged::in_checkpoint(a, at, base)
                        } else {
                            let deleted_later = || {
                                unsure_deletes.contains(&write.key)
                                    || acked_deletes
                                        .get(&write.key)
                                        .is_some_and(|ids| ids.iter().any(|&d| d > a && d <= base))
                            };
                            self.key_in_checkpoint(write, at, deleted_later)
                        };
                        match judged {
                            Judged::Found => verified.found += 1,
                            Judged::Unseen => verified.unseen += 1,
                            Judged::Problem(problem) => {
                                violations.add(format!("{} {problem}", who()));
                            }
                        }
                    }
                }
            }
            // Rule 5: markers of writes this writer never made.
            if let Some(seen) = seen {
                for (n, &at) in seen.iter().enumerate().skip(log.writes.len()) {
                    if at != 0 {
                        violations.add(format!(
                            "writer {} write {n} appears at {at}, but was never sent",
                            log.writer
                        ));
                    }
                }
            }
        }
        verified
    }

    /// Rule 1: a write acknowledged at `_id` `write.id`, past the
    /// checkpoint, whose marker was seen at `at`.
    fn in_list(&self, write: &Write, at: u64) -> Judged {
        let a = write.id;
        match write.kind {
            Kind::Delete => match self.deletes.get(&a) {
                Some(&key) if key == write.key => Judged::Found,
                _ => Judged::Problem(format!(
                    "was acknowledged at {a}, but the change there is not a delete of its key"
                )),
            },
            _ if at == a => Judged::Found,
            _ if at == 0 => {
                Judged::Problem(format!("was acknowledged at {a}, but is not in the list"))
            }
            _ => Judged::Problem(format!(
                "was acknowledged at {a}, but is in the list at {at}"
            )),
        }
    }

    /// Rule 3: a keyed write acknowledged at or before the checkpoint.
    fn key_in_checkpoint(
        &self,
        write: &Write,
        at: u64,
        deleted_later: impl Fn() -> bool,
    ) -> Judged {
        let (a, base) = (write.id, self.base);
        match self.checkpoint_keys.get(&write.key) {
            Some(&r) if r > a => Judged::Unseen,
            Some(&r) if r == a && write.kind == Kind::Upsert && at == a => Judged::Found,
            Some(&r) if r == a => Judged::Problem(format!(
                "was acknowledged at {a}, but the key's record {r} in checkpoint {base} is \
                 another change"
            )),
            Some(&r) => Judged::Problem(format!(
                "was acknowledged at {a}, but checkpoint {base} holds the older change {r} for \
                 its key: the write was lost"
            )),
            None if write.kind == Kind::Delete || deleted_later() => Judged::Unseen,
            None => Judged::Problem(format!(
                "was acknowledged at {a}, but its key is not in checkpoint {base} and no later \
                 delete of it is known: the write was lost"
            )),
        }
    }
}

/// The verdict on one acknowledged write.
enum Judged {
    /// Found at its `_id`: in the list, or the checkpoint's record.
    Found,
    /// A keyed write no longer in any state (overwritten or deleted by
    /// the checkpoint), and consistent with what the checkpoint holds.
    Unseen,
    Problem(String),
}

impl Judged {
    /// Rule 2: an unkeyed write acknowledged at `a`, at or before the
    /// checkpoint `base`, whose marker was seen at `at`.
    fn in_checkpoint(a: u64, at: u64, base: u64) -> Judged {
        match at {
            _ if at == a => Judged::Found,
            0 => Judged::Problem(format!(
                "was acknowledged at {a}, but checkpoint {base} does not hold it"
            )),
            _ => Judged::Problem(format!(
                "was acknowledged at {a}, but checkpoint {base} holds it at {at}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use changeagent_client::{Manifest, Scope};
    use serde_json::json;

    use super::*;

    const RUN: &str = "r1";

    fn space() -> KeySpace {
        KeySpace {
            tenants: 1,
            keys: 10,
        }
    }

    fn change(id: u64, key: Option<u32>, marker: Option<(u32, u64)>, deleted: bool) -> Change {
        let (tenant, collection, key) = match key {
            Some(k) => {
                let (t, c, k) = space().names(k);
                (Some(t), Some(c), Some(k))
            }
            None => (None, None, None),
        };
        Change {
            id,
            ts: 0,
            change_type: 0,
            tags: Vec::new(),
            tenant,
            collection,
            key,
            deleted,
            data: marker.map(|(w, n)| json!({"fleet": Marker { writer: w, n }.json(RUN)})),
        }
    }

    fn reset(index: u64) -> FollowEvent {
        FollowEvent::Reset {
            checkpoint: Manifest {
                index,
                scope: Scope::All,
                object: String::new(),
                size: 0,
                sha256: String::new(),
                records: 0,
                created_ts: 0,
                cluster_id: String::new(),
            },
            first_index: index + 1,
        }
    }

    fn write(id: u64, key: Option<u32>, kind: Kind) -> Write {
        Write {
            id,
            key: key.unwrap_or(NO_KEY),
            kind,
            outcome: Outcome::Acked,
        }
    }

    fn log(writer: u32, writes: Vec<Write>) -> WriterLog {
        WriterLog {
            writer,
            outbox: false,
            writes,
        }
    }

    fn verify(events: &[FollowEvent], logs: &[WriterLog]) -> (Verified, Vec<String>) {
        let violations = Violations::default();
        let mut s = Sightings::new(RUN, space(), 2);
        for e in events {
            s.see(e, &violations);
        }
        let verified = s.verify(logs, &violations);
        (verified, violations.kept())
    }

    #[test]
    fn writes_read_in_the_list_are_found_at_their_ids() {
        let events = [
            FollowEvent::Change(change(1, None, Some((0, 0)), false)),
            FollowEvent::Change(change(2, Some(3), Some((0, 1)), false)),
            FollowEvent::Change(change(3, Some(3), None, true)),
            FollowEvent::Change(change(4, None, Some((1, 0)), false)),
        ];
        let logs = [
            log(
                0,
                vec![
                    write(1, None, Kind::Unkeyed),
                    write(2, Some(3), Kind::Upsert),
                    write(3, Some(3), Kind::Delete),
                ],
            ),
            log(1, vec![write(4, None, Kind::Unkeyed)]),
        ];
        let (verified, violations) = verify(&events, &logs);
        assert!(violations.is_empty(), "{violations:?}");
        assert_eq!(
            verified,
            Verified {
                acked: 4,
                found: 4,
                unseen: 0,
                unknown: 0
            }
        );
    }

    #[test]
    fn lost_moved_and_doubled_writes_are_caught() {
        let events = [
            FollowEvent::Change(change(1, None, Some((0, 0)), false)),
            FollowEvent::Change(change(2, None, Some((0, 0)), false)),
            FollowEvent::Change(change(3, None, Some((0, 2)), false)),
            FollowEvent::Change(change(4, Some(1), None, true)),
        ];
        let mut refused = write(0, None, Kind::Unkeyed);
        refused.outcome = Outcome::Refused;
        let logs = [log(
            0,
            vec![
                write(1, None, Kind::Unkeyed),   // applied twice (1 and 2)
                write(5, None, Kind::Unkeyed),   // missing
                refused,                         // refused, yet at 3
                write(4, Some(2), Kind::Delete), // 4 deletes another key
                write(6, Some(1), Kind::Upsert), // missing
            ],
        )];
        let (verified, violations) = verify(&events, &logs);
        let all = violations.join("\n");
        assert!(all.contains("applied twice: at 1 and at 2"), "{all}");
        assert!(
            all.contains("write 1 (unkeyed) was acknowledged at 5, but is not"),
            "{all}"
        );
        assert!(
            all.contains("write 2 (unkeyed) was refused, yet appears at 3"),
            "{all}"
        );
        assert!(all.contains("not a delete of its key"), "{all}");
        assert!(
            all.contains("acknowledged at 6, but is not in the list"),
            "{all}"
        );
        assert_eq!(violations.len(), 5, "{all}");
        assert_eq!(verified.acked, 4);
        // A marker of a write never sent.
        let events = [FollowEvent::Change(change(1, None, Some((1, 3)), false))];
        let (_, violations) = verify(&events, &[log(1, vec![write(9, None, Kind::Unkeyed)])]);
        assert!(
            violations
                .iter()
                .any(|v| v.contains("write 3 appears at 1, but was never sent")),
            "{violations:?}"
        );
    }

    #[test]
    fn writes_before_the_checkpoint_are_judged_by_its_records() {
        // The reference read 1..=2, then reloaded checkpoint 10 and read 11.
        let events = [
            FollowEvent::Change(change(1, None, Some((0, 0)), false)),
            FollowEvent::Change(change(2, Some(0), Some((0, 1)), false)),
            reset(10),
            FollowEvent::Record(change(1, None, Some((0, 0)), false)),
            FollowEvent::Record(change(5, Some(1), Some((0, 3)), false)),
            FollowEvent::Record(change(7, Some(4), Some((1, 0)), false)),
            FollowEvent::ResetEnd { index: 10 },
            FollowEvent::Change(change(11, Some(4), Some((0, 6)), false)),
        ];
        let good = [
            log(
                0,
                vec![
                    write(1, None, Kind::Unkeyed),   // a record at 1
                    write(2, Some(0), Kind::Upsert), // key 0 deleted at 3
                    write(3, Some(0), Kind::Delete), // not in the checkpoint: fine
                    write(5, Some(1), Kind::Upsert), // the key's record
                    write(4, Some(4), Kind::Upsert), // overwritten by 7
                    write(6, Some(2), Kind::Delete), // a delete before the checkpoint
                    write(11, Some(4), Kind::Upsert),
                ],
            ),
            log(1, vec![write(7, Some(4), Kind::Upsert)]),
        ];
        let (verified, violations) = verify(&events, &good);
        assert!(violations.is_empty(), "{violations:?}");
        assert_eq!(verified.acked, 8);
        assert_eq!(
            verified.unseen, 4,
            "writes 1 (deleted by 2), 2, 4 (overwritten) and 5"
        );
        assert_eq!(verified.found, 4);

        // Checkpoint 10 holds key 1's record 5 (writer 0's write 1), nothing else.
        let events = [
            reset(10),
            FollowEvent::Record(change(5, Some(1), Some((0, 1)), false)),
            FollowEvent::ResetEnd { index: 10 },
        ];
        let bad = [log(
            0,
            vec![
                write(2, None, Kind::Unkeyed),   // unkeyed, not in the checkpoint
                write(8, Some(1), Kind::Upsert), // key 1 holds the older 5
                write(9, Some(3), Kind::Upsert), // key 3 absent, no delete
                write(5, Some(1), Kind::Delete), // key 1's record 5 is no delete
            ],
        )];
        let (_, violations) = verify(&events, &bad);
        let all = violations.join("\n");
        assert!(all.contains("checkpoint 10 does not hold it"), "{all}");
        assert!(all.contains("holds the older change 5"), "{all}");
        assert!(all.contains("no later delete of it is known"), "{all}");
        assert!(
            all.contains("record 5 in checkpoint 10 is another change"),
            "{all}"
        );
        assert_eq!(violations.len(), 4, "{all}");
    }

    #[test]
    fn writes_without_an_answer_may_appear_once_or_not_at_all() {
        let mut unknown = write(0, None, Kind::Unkeyed);
        unknown.outcome = Outcome::Unknown;
        let mut unknown_delete = write(0, Some(2), Kind::Delete);
        unknown_delete.outcome = Outcome::Unknown;
        let events = [
            FollowEvent::Change(change(1, None, Some((0, 0)), false)),
            reset(5),
            FollowEvent::ResetEnd { index: 5 },
        ];
        // Key 2's upsert at 3 is not in the checkpoint: the unanswered delete explains it.
        let logs = [log(
            0,
            vec![
                unknown,
                unknown,
                write(3, Some(2), Kind::Upsert),
                unknown_delete,
            ],
        )];
        let (verified, violations) = verify(&events, &logs);
        assert!(violations.is_empty(), "{violations:?}");
        assert_eq!((verified.unknown, verified.unseen), (3, 1));
    }
}
