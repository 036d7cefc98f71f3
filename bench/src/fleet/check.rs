//! What every consumer checks as it reads: its view of the list is dense
//! (each change is the one after its position: no gap, no duplicate, no
//! reordering), and a checkpoint it reloads moves it forward and comes
//! whole. A violation is recorded in [`Violations`], never a panic, and
//! fails the run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Violation messages kept for the summary; the rest are only counted
/// (the first ones say what went wrong, thousands more would not).
pub const MAX_VIOLATIONS_KEPT: usize = 50;

/// Longest violation message kept, in bytes: a message quotes ids and an
/// error, never a body.
pub const MAX_VIOLATION_BYTES: usize = 400;

/// Every violation of the run (or another kind of event worth a message):
/// the first [`MAX_VIOLATIONS_KEPT`] messages and the count of all.
#[derive(Debug, Default)]
pub struct Violations {
    /// Held only to push a message; never across an await.
    kept: Mutex<Vec<String>>,
    total: AtomicU64,
}

impl Violations {
    pub fn add(&self, message: impl Into<String>) {
        let mut message = message.into();
        if message.len() > MAX_VIOLATION_BYTES {
            let mut end = MAX_VIOLATION_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push('…');
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut kept) = self.kept.lock() {
            if kept.len() < MAX_VIOLATIONS_KEPT {
                kept.push(message);
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The kept messages, oldest first.
    pub fn kept(&self) -> Vec<String> {
        self.kept.lock().map(|k| k.clone()).unwrap_or_default()
    }
}

/// A consumer's position and, during a reload, the checkpoint it is
/// loading, checked against each event of its follow.
#[derive(Debug, Clone)]
pub struct ViewCheck {
    position: u64,
    reload: Option<Reload>,
}

/// A checkpoint being loaded.
#[derive(Debug, Clone, Copy)]
struct Reload {
    /// The checkpoint's index.
    index: u64,
    /// `_id` of the last record so far (0 before the first).
    last_record: u64,
}

impl ViewCheck {
    /// A consumer at `position` (0: before the first change).
    pub fn new(position: u64) -> Self {
        Self {
            position,
            reload: None,
        }
    }

    /// `_id` of the last change applied (or the index of the last
    /// checkpoint loaded).
    pub fn position(&self) -> u64 {
        self.position
    }

    /// A checkpoint is being loaded: its records are coming.
    pub fn reloading(&self) -> bool {
        self.reload.is_some()
    }

    /// A change arrived: it must be the one after the position, and no
    /// reload may be under way. The position moves to it even when it is
    /// not (past a gap), so one fault is reported once.
    pub fn change(&mut self, id: u64) -> Result<(), String> {
        let at = self.position;
        let during = self.reload.take();
        self.position = at.max(id);
        if let Some(reload) = during {
            return Err(format!(
                "change {id} arrived while checkpoint {} was loading",
                reload.index
            ));
        }
        match id.cmp(&(at + 1)) {
            std::cmp::Ordering::Equal => Ok(()),
            std::cmp::Ordering::Greater => Err(format!(
                "at {at} got change {id} next: changes {}..={} are missing",
                at + 1,
                id - 1
            )),
            std::cmp::Ordering::Less => Err(format!(
                "at {at} got change {id} next: a duplicate or out of order"
            )),
        }
    }

    /// The follow got a `410` at the position and loads checkpoint
    /// `index`, the server retaining from `first_index` on: the changes
    /// after the position must really be gone, and the checkpoint must lie
    /// ahead.
    pub fn reset(&mut self, index: u64, first_index: u64) -> Result<(), String> {
        let at = self.position;
        let during = self.reload.replace(Reload {
            index,
            last_record: 0,
        });
        if let Some(reload) = during {
            return Err(format!(
                "checkpoint {index} began loading before checkpoint {} had ended",
                reload.index
            ));
        }
        if first_index <= at + 1 {
            return Err(format!(
                "at {at} reloaded checkpoint {index} although the server retains from \
                 {first_index} on"
            ));
        }
        if index <= at {
            return Err(format!(
                "at {at} reloaded checkpoint {index}, which lies behind the position"
            ));
        }
        Ok(())
    }

    /// A record of the checkpoint being loaded: records come in `_id`
    /// order, none past the checkpoint's index.
    pub fn record(&mut self, id: u64) -> Result<(), String> {
        let Some(reload) = self.reload.as_mut() else {
            return Err(format!(
                "at {} got checkpoint record {id} outside a reload",
                self.position
            ));
        };
        let last = reload.last_record;
        reload.last_record = last.max(id);
        if id <= last {
            return Err(format!(
                "checkpoint {}: record {id} came after record {last}",
                reload.index
            ));
        }
        if id > reload.index {
            return Err(format!(
                "checkpoint {}: record {id} lies past its index",
                reload.index
            ));
        }
        Ok(())
    }

    /// The checkpoint ended: the position moves to its index.
    pub fn reset_end(&mut self, index: u64) -> Result<(), String> {
        let during = self.reload.take();
        let at = self.position;
        self.position = at.max(index);
        match during {
            Some(reload) if reload.index == index => Ok(()),
            Some(reload) => Err(format!(
                "checkpoint {} ended as checkpoint {index}",
                reload.index
            )),
            None => Err(format!(
                "at {at} got the end of checkpoint {index} outside a reload"
            )),
        }
    }

    /// The follow failed, or the consumer went offline, in the middle of a
    /// reload: the reload is given up, the position stays where it was
    /// before it (the next follow from there reloads again).
    pub fn abandon_reload(&mut self) {
        self.reload = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dense_view_passes() {
        let mut v = ViewCheck::new(0);
        for id in 1..=5 {
            assert_eq!(v.change(id), Ok(()));
        }
        assert_eq!(v.position(), 5);
        // A reload after a 410 at 5: the server retains from 9 on.
        assert_eq!(v.reset(8, 9), Ok(()));
        assert!(v.reloading());
        for id in [1, 4, 7, 8] {
            assert_eq!(v.record(id), Ok(()));
        }
        assert_eq!(v.reset_end(8), Ok(()));
        assert_eq!(v.position(), 8);
        assert_eq!(v.change(9), Ok(()));
        // A checkpoint with no records at all (an empty state).
        let mut empty = ViewCheck::new(0);
        assert_eq!(empty.reset(3, 4), Ok(()));
        assert_eq!(empty.reset_end(3), Ok(()));
        assert_eq!(empty.change(4), Ok(()));
    }

    #[test]
    fn a_gap_is_caught_once() {
        let mut v = ViewCheck::new(10);
        let err = v.change(13).unwrap_err();
        assert!(err.contains("11..=12 are missing"), "{err}");
        assert_eq!(v.position(), 13);
        assert_eq!(v.change(14), Ok(()), "one fault, one report");
    }

    #[test]
    fn a_duplicate_and_a_reordering_are_caught() {
        let mut v = ViewCheck::new(0);
        v.change(1).unwrap();
        v.change(2).unwrap();
        let err = v.change(2).unwrap_err();
        assert!(err.contains("duplicate or out of order"), "{err}");
        let err = v.change(1).unwrap_err();
        assert!(err.contains("at 2 got change 1"), "{err}");
        assert_eq!(v.position(), 2);
        assert!(v.change(4).is_err(), "3 skipped");
        assert!(v.change(3).is_err(), "3 after 4");
    }

    #[test]
    fn reloads_must_move_forward_and_come_whole() {
        // Nothing was truncated past the position: no reason to reload.
        let mut v = ViewCheck::new(10);
        assert!(v.reset(20, 11).unwrap_err().contains("retains from 11"));
        // A checkpoint behind the position.
        let mut v = ViewCheck::new(10);
        assert!(v.reset(9, 30).unwrap_err().contains("behind the position"));
        // Records out of order, past the index, or outside a reload.
        let mut v = ViewCheck::new(0);
        assert!(v.record(1).unwrap_err().contains("outside a reload"));
        v.reset(10, 11).unwrap();
        v.record(5).unwrap();
        assert!(v.record(5).unwrap_err().contains("came after record 5"));
        assert!(v.record(11).unwrap_err().contains("past its index"));
        // A change in the middle of the records.
        assert!(v.change(11).unwrap_err().contains("while checkpoint 10"));
        // An end without a reset, and one naming another checkpoint.
        let mut v = ViewCheck::new(0);
        assert!(v.reset_end(5).unwrap_err().contains("outside a reload"));
        let mut v = ViewCheck::new(0);
        v.reset(5, 6).unwrap();
        assert!(v
            .reset_end(6)
            .unwrap_err()
            .contains("ended as checkpoint 6"));
        // A reload given up leaves the position where it was.
        let mut v = ViewCheck::new(3);
        v.reset(10, 11).unwrap();
        v.abandon_reload();
        assert_eq!((v.position(), v.reloading()), (3, false));
    }

    #[test]
    fn violations_are_counted_and_the_first_kept_short() {
        let v = Violations::default();
        for i in 0..(MAX_VIOLATIONS_KEPT + 10) {
            v.add(format!("violation {i}"));
        }
        assert_eq!(v.total(), (MAX_VIOLATIONS_KEPT + 10) as u64);
        let kept = v.kept();
        assert_eq!(kept.len(), MAX_VIOLATIONS_KEPT);
        assert_eq!(kept[0], "violation 0");
        let long = Violations::default();
        long.add("é".repeat(MAX_VIOLATION_BYTES));
        let kept = long.kept();
        assert!(kept[0].len() <= MAX_VIOLATION_BYTES + '…'.len_utf8());
        assert!(kept[0].ends_with('…'));
    }
}
