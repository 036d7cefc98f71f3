//! The applied feed's tail cache: the newest changes of the list as their stored bytes, shared
//! by every long-poll, so one applied batch wakes thousands of waiters without a RocksDB read
//! each (a wake-up reads memory on the async worker it runs on).
//!
//! Rules:
//! 1. The cache holds one contiguous run of `_id`s, newest last; a change that does not follow
//!    the newest one starts a new run (an import, a backfill).
//! 2. A commit adds its changes before it publishes the new last `_id`, so a reader that sees
//!    `last_index` finds every change up to it here when the run reaches back far enough.
//! 3. A reader answers from the cache only when the run covers everything after its
//!    position up to `last_index`; otherwise it reads RocksDB as before.

use std::collections::VecDeque;
use std::sync::RwLock;

use bytes::Bytes;

use crate::Result;

/// Changes kept at most: a few seconds of a busy core's writes, enough for every long-poll
/// that keeps up (they ask for what came after the last batch).
pub const TAIL_CACHE_ENTRIES: usize = 65_536;
/// Bytes of stored values kept at most, so large changes cannot grow the cache without bound.
pub const TAIL_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// See the module docs.
#[derive(Default)]
pub(crate) struct TailCache {
    inner: RwLock<Run>,
}

#[derive(Default)]
struct Run {
    /// `(id, stored value)`, ids contiguous and increasing.
    entries: VecDeque<(u64, Bytes)>,
    bytes: usize,
}

impl Run {
    fn first(&self) -> Option<u64> {
        self.entries.front().map(|(id, _)| *id)
    }

    fn last(&self) -> Option<u64> {
        self.entries.back().map(|(id, _)| *id)
    }
}

impl TailCache {
    /// Rule 1: adds changes in `_id` order.
    pub(crate) fn extend(&self, changes: Vec<(u64, Bytes)>) {
        if changes.is_empty() {
            return;
        }
        let mut run = self.inner.write().unwrap_or_else(|p| p.into_inner());
        for (id, value) in changes {
            if run.last().is_some_and(|last| id != last + 1) {
                run.entries.clear();
                run.bytes = 0;
            }
            run.bytes += value.len();
            run.entries.push_back((id, value));
        }
        while run.entries.len() > TAIL_CACHE_ENTRIES
            || (run.bytes > TAIL_CACHE_BYTES && run.entries.len() > 1)
        {
            if let Some((_, v)) = run.entries.pop_front() {
                run.bytes -= v.len();
            }
        }
    }

    /// Forgets everything (the store's generation was replaced).
    pub(crate) fn clear(&self) {
        let mut run = self.inner.write().unwrap_or_else(|p| p.into_inner());
        run.entries.clear();
        run.bytes = 0;
    }

    /// Rule 3: offers the changes `start..=last` to `each` in `_id` order until it returns
    /// false; `None` (offering nothing) when the run does not hold all of them.
    pub(crate) fn scan(
        &self,
        start: u64,
        last: u64,
        mut each: impl FnMut(u64, &[u8]) -> Result<bool>,
    ) -> Option<Result<()>> {
        let run = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let (first, newest) = (run.first()?, run.last()?);
        if first > start || newest < last {
            return None;
        }
        let skip = (start - first) as usize;
        for (id, value) in run.entries.iter().skip(skip) {
            if *id > last {
                break;
            }
            match each(*id, value) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64) -> (u64, Bytes) {
        (id, Bytes::from(id.to_string()))
    }

    fn ids(cache: &TailCache, start: u64, last: u64, stop_after: usize) -> Option<Vec<u64>> {
        let mut seen = Vec::new();
        cache
            .scan(start, last, |id, value| {
                assert_eq!(value, id.to_string().as_bytes());
                seen.push(id);
                Ok(seen.len() < stop_after)
            })?
            .unwrap();
        Some(seen)
    }

    #[test]
    fn offers_only_what_it_holds_whole() {
        let cache = TailCache::default();
        cache.extend((5..=9).map(entry).collect());
        assert_eq!(ids(&cache, 4, 9, 100), None, "before the run");
        assert_eq!(ids(&cache, 5, 10, 100), None, "past the run");
        assert_eq!(ids(&cache, 6, 9, 100), Some(vec![6, 7, 8, 9]));
        assert_eq!(ids(&cache, 6, 8, 100), Some(vec![6, 7, 8]));
        assert_eq!(ids(&cache, 5, 9, 2), Some(vec![5, 6]));
    }

    #[test]
    fn a_gap_starts_a_new_run() {
        let cache = TailCache::default();
        cache.extend(vec![entry(1), entry(2)]);
        cache.extend(vec![entry(10), entry(11)]);
        assert_eq!(ids(&cache, 2, 11, 100), None);
        assert_eq!(ids(&cache, 10, 11, 100), Some(vec![10, 11]));
        cache.clear();
        assert_eq!(ids(&cache, 10, 11, 100), None);
    }

    #[test]
    fn bounded_in_entries_and_bytes() {
        let cache = TailCache::default();
        cache.extend((1..=(TAIL_CACHE_ENTRIES as u64 + 10)).map(entry).collect());
        {
            let run = cache.inner.read().unwrap();
            assert_eq!(run.entries.len(), TAIL_CACHE_ENTRIES);
            assert_eq!(run.first(), Some(11));
        }
        let big = Bytes::from(vec![0u8; TAIL_CACHE_BYTES / 2 + 1]);
        cache.extend(vec![(TAIL_CACHE_ENTRIES as u64 + 11, big.clone())]);
        cache.extend(vec![(TAIL_CACHE_ENTRIES as u64 + 12, big)]);
        let run = cache.inner.read().unwrap();
        assert!(run.bytes <= TAIL_CACHE_BYTES);
        assert_eq!(run.entries.len(), 1);
    }
}
