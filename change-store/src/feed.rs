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

use crate::record::StoredChange;
use crate::store::{Filter, PageInfo};
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

    /// Rule 3: writes the page after `since` into `out` like `Store::read_page` would, or
    /// `None` when the cache does not reach back to `since`. `info` carries the retained range
    /// the caller read from the store's state, with nothing counted yet.
    pub(crate) fn read_page(
        &self,
        since: u64,
        limit: usize,
        filter: &Filter,
        mut info: PageInfo,
        out: &mut Vec<u8>,
    ) -> Option<Result<PageInfo>> {
        let start = since.saturating_add(1);
        if start > info.last_index || limit == 0 {
            return Some(Ok(info));
        }
        let run = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let (first, last) = (run.first()?, run.last()?);
        if first > start || last < info.last_index {
            return None;
        }
        let skip = (start - first) as usize;
        for (id, value) in run.entries.iter().skip(skip) {
            if *id > info.last_index {
                break;
            }
            let c = match StoredChange::decode(value) {
                Ok(c) => c,
                Err(e) => return Some(Err(e)),
            };
            if !filter.matches(&c) {
                continue;
            }
            if info.count == limit {
                info.more = true;
                break;
            }
            if info.count > 0 {
                out.push(b',');
            }
            out.extend_from_slice(c.json);
            info.count += 1;
            info.last_returned = Some(*id);
        }
        Some(Ok(info))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Resolved;

    fn stored(id: u64, tags: &[String]) -> (u64, Bytes) {
        let r = Resolved {
            id,
            ts: 1,
            change_type: 0,
            tags,
            tenant: None,
            collection: None,
            key: None,
            deleted: false,
            data: Some("1"),
        };
        (id, Bytes::from(r.stored_value(&r.wire_json())))
    }

    fn info(first: u64, last: u64) -> PageInfo {
        PageInfo {
            count: 0,
            last_returned: None,
            more: false,
            first_index: first,
            last_index: last,
        }
    }

    #[test]
    fn answers_only_what_it_covers() {
        let cache = TailCache::default();
        cache.extend((5..=9).map(|id| stored(id, &[])).collect());
        let all = Filter::default();
        let mut out = Vec::new();
        // Before the run: the store must answer.
        assert!(cache.read_page(3, 10, &all, info(1, 9), &mut out).is_none());
        let page = cache
            .read_page(4, 2, &all, info(1, 9), &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(
            (page.count, page.last_returned, page.more),
            (2, Some(6), true)
        );
        assert!(out.starts_with(b"{\"_id\":5,"));
        // Not past what readers may see yet.
        out.clear();
        let page = cache
            .read_page(7, 10, &all, info(1, 8), &mut out)
            .unwrap()
            .unwrap();
        assert_eq!((page.count, page.more), (1, false));
    }

    #[test]
    fn a_gap_starts_a_new_run_and_filters_apply() {
        let cache = TailCache::default();
        cache.extend(vec![stored(1, &[]), stored(2, &[])]);
        let tag = vec!["t".to_owned()];
        cache.extend(vec![stored(10, &tag), stored(11, &[]), stored(12, &tag)]);
        let mut out = Vec::new();
        assert!(cache
            .read_page(1, 10, &Filter::default(), info(1, 12), &mut out)
            .is_none());
        let f = Filter {
            tags: tag,
            ..Filter::default()
        };
        let page = cache
            .read_page(9, 1, &f, info(1, 12), &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(
            (page.count, page.last_returned, page.more),
            (1, Some(10), true)
        );
    }

    #[test]
    fn bounded_in_entries_and_bytes() {
        let cache = TailCache::default();
        cache.extend(
            (1..=(TAIL_CACHE_ENTRIES as u64 + 10))
                .map(|id| stored(id, &[]))
                .collect(),
        );
        let run = cache.inner.read().unwrap();
        assert_eq!(run.entries.len(), TAIL_CACHE_ENTRIES);
        assert_eq!(run.first(), Some(11));
        drop(run);
        let big = Bytes::from(vec![0u8; TAIL_CACHE_BYTES / 2 + 1]);
        cache.extend(vec![(TAIL_CACHE_ENTRIES as u64 + 11, big.clone())]);
        cache.extend(vec![(TAIL_CACHE_ENTRIES as u64 + 12, big)]);
        let run = cache.inner.read().unwrap();
        assert!(run.bytes <= TAIL_CACHE_BYTES);
        assert_eq!(run.entries.len(), 1);
    }
}
