//! Following the change list with long polls: one polling loop, `Poller`,
//! under two streams. [`Client::follow`] parses the changes and, on
//! `410 Gone`, loads the checkpoint the server names as a reset;
//! [`Client::follow_raw`] yields the server's pages with each change's bytes
//! as received and ends on `410` with [`Error::Truncated`].

use std::collections::VecDeque;
use std::time::Instant;

use backon::ExponentialBackoff;
use bytes::Bytes;
use changeagent_proto::checkpoint::record_id;
use changeagent_proto::types::{internal_type, TenantRecord};
use changeagent_proto::{Manifest, Scope};
use futures::Stream;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::checkpoint::VerifiedCheckpoint;
use crate::client::{
    changes_call, next_since, AnswerBody, Client, DEFAULT_FOLLOW_LIMIT, FOLLOW_MAX_DELAY,
};
use crate::error::{Error, Result};
use crate::query::Query;
use crate::types::Change;

/// Shortest time between two polls that returned nothing. A server honours
/// `block` and only answers empty after the wait, so this only bites when
/// one answers empty at once (shutting down, or `block=0`), and then keeps
/// the consumer from spinning.
const EMPTY_POLL_MIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Records a checkpoint's reader thread may read ahead of the consumer:
/// enough to keep both busy, few enough that memory stays constant.
const RECORDS_READ_AHEAD: usize = 256;

/// What [`Client::follow`] yields. A consumer that applies these events
/// ends with exactly the state of one that read every change:
///
/// - [`FollowEvent::Change`]: apply the change.
/// - [`FollowEvent::Reset`]: the changes after the position were truncated.
///   Drop all state built so far; the checkpoint's records follow.
/// - [`FollowEvent::Record`]: apply the record like a change (catalog
///   records, type -4 and -5, create tenants and collections; then the
///   latest change of every live key; unkeyed changes).
/// - [`FollowEvent::ResetEnd`]: the last record was applied and the
///   checkpoint checked to its end; changes after its index follow.
#[derive(Debug, Clone, PartialEq)]
pub enum FollowEvent {
    /// The changes between the position and `first_index` were truncated:
    /// the state is rebuilt from `checkpoint`, whose bytes were downloaded
    /// and checked against its size and sha256 before this event.
    Reset {
        /// The checkpoint whose records follow.
        checkpoint: Manifest,
        /// Oldest `_id` the answering server retains.
        first_index: u64,
    },
    /// One record of the checkpoint of the last [`FollowEvent::Reset`], in
    /// `_id` order, filtered like the follow (see [`Client::follow`]).
    Record(Change),
    /// Every record of the checkpoint was yielded; the stream goes on with
    /// the changes after `index`.
    ResetEnd {
        /// The checkpoint's index.
        index: u64,
    },
    /// A change from the list.
    Change(Change),
}

impl FollowEvent {
    /// The change of a [`FollowEvent::Change`] or [`FollowEvent::Record`].
    pub fn change(&self) -> Option<&Change> {
        match self {
            FollowEvent::Change(change) | FollowEvent::Record(change) => Some(change),
            FollowEvent::Reset { .. } | FollowEvent::ResetEnd { .. } => None,
        }
    }

    /// [`FollowEvent::change`], by value.
    pub fn into_change(self) -> Option<Change> {
        match self {
            FollowEvent::Change(change) | FollowEvent::Record(change) => Some(change),
            FollowEvent::Reset { .. } | FollowEvent::ResetEnd { .. } => None,
        }
    }
}

/// One answer of `GET /changes` as [`Client::follow_raw`] yields it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawPage {
    /// The page's changes after the follow's position, in `_id` order.
    pub changes: Vec<RawChange>,
    /// Nothing retained comes before the first returned change.
    pub at_start: bool,
    /// Nothing matching comes after the last change right now.
    pub at_end: bool,
    /// Oldest retained `_id` on the answering server.
    pub first_index: u64,
    /// Newest applied `_id` on the answering server.
    pub last_index: u64,
    /// The follow's position after this page: the last change's `_id`, or
    /// further when the server's `Link` skipped a stretch without matches.
    pub since: u64,
    /// Which endpoint answered: an index into [`Client::endpoints`].
    pub endpoint: usize,
}

/// One change of a [`RawPage`]: its `_id` and its JSON exactly as the
/// server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawChange {
    /// The change's `_id`.
    pub id: u64,
    /// The change's wire JSON, a slice of the answer's body (not copied,
    /// not re-serialized: `data` keeps its key order and number spelling).
    pub json: Bytes,
}

impl RawChange {
    /// The change parsed (`data` then loses its key order).
    pub fn parse(&self) -> Result<Change> {
        serde_json::from_slice(&self.json).map_err(|source| Error::Decode {
            what: "get changes",
            status: 200,
            source,
        })
    }
}

impl Client {
    /// Follows the change list from `since` on: yields every change with
    /// `_id > since` matching `filter`, in order, each once, then waits for
    /// new ones with long polls, forever. See [`FollowEvent`] for what to do
    /// with each event.
    ///
    /// - `filter.since` is ignored (the argument wins). `filter.block`
    ///   defaults to [`ClientBuilder::follow_block_secs`](crate::ClientBuilder::follow_block_secs),
    ///   `filter.limit` to [`DEFAULT_FOLLOW_LIMIT`]; `filter.since_time`
    ///   applies until the first change arrives.
    /// - Transient failures (no server reachable, `503`, `5xx`, a stalled
    ///   download) are not yielded: the stream retries across the endpoints
    ///   with backoff up to [`FOLLOW_MAX_DELAY`] between tries, logging each
    ///   at `warn`, so it survives restarts of any server. A change is never
    ///   yielded twice or out of order, also when the answering server
    ///   changes.
    /// - `410 Gone` (the changes after the position were truncated): the
    ///   stream downloads the checkpoint the answer names from the endpoint
    ///   that gave it (`GET /checkpoints/{index}/data?scope=`) into a temp
    ///   file (see [`ClientBuilder::checkpoint_dir`](crate::ClientBuilder::checkpoint_dir)),
    ///   checks its size and sha256, then yields [`FollowEvent::Reset`], the
    ///   checkpoint's records read one by one from the file, and
    ///   [`FollowEvent::ResetEnd`], and goes on after the checkpoint's index.
    ///   Memory stays constant whatever the checkpoint's size.
    /// - A filtered follow filters the checkpoint's records on the client as
    ///   the server filters changes: a `type` matches equal types; without a
    ///   `type`, internal records (types below 0, catalog records included)
    ///   are left out; `tags` match records having any of them; `tenant`
    ///   matches the record's tenant name (a numeric tenant id is resolved
    ///   from the checkpoint's tenant records).
    /// - Permanent failures are yielded as the last item: `4xx`, an
    ///   undecodable answer, a `410` without a checkpoint or with one that
    ///   does not reach the server's `firstIndex` ([`Error::Truncated`]), a
    ///   tenant's checkpoint for a follow that reads more than that tenant
    ///   ([`Error::WrongScope`]), a checkpoint whose bytes do not match its
    ///   manifest (no record of it is yielded), a temp file that cannot be
    ///   written, or a checkpoint that turns out malformed while its records
    ///   are read (the state rebuilt since the reset is then incomplete).
    ///
    /// Callers that bootstrap from checkpoints themselves use
    /// [`Client::follow_raw`], which ends on `410` instead.
    pub fn follow(
        &self,
        since: u64,
        filter: Query,
    ) -> impl Stream<Item = Result<FollowEvent>> + Send + 'static {
        let follow = Follow {
            poller: Poller::new(self.clone(), since, filter),
            pending: VecDeque::new(),
            records: None,
            finished: false,
        };
        futures::stream::unfold(follow, Follow::next)
    }

    /// Follows the change list like [`Client::follow`], but yields each
    /// answer as a [`RawPage`] holding every change's bytes as the server
    /// sent them, and ends on `410 Gone` with [`Error::Truncated`] (whose
    /// manifest [`Error::truncated_manifest`] decodes) instead of loading
    /// the checkpoint.
    ///
    /// Every answer is yielded, also one without changes (its `at_end`
    /// tells that the follower has caught up). Transient failures are
    /// retried as [`Client::follow`] does, and each is also yielded as an
    /// error that does not end the stream ([`Error::is_transient`]), so the
    /// caller can tell that no server answers; permanent ones end the stream.
    pub fn follow_raw(
        &self,
        since: u64,
        filter: Query,
    ) -> impl Stream<Item = Result<RawPage>> + Send + 'static {
        let poller = Poller::new(self.clone(), since, filter);
        futures::stream::unfold(Some(poller), |poller| async move {
            let mut poller = poller?;
            match poller.next_page(true).await {
                Ok(page) => Some((Ok(page), Some(poller))),
                Err(error) if error.is_transient() => Some((Err(error), Some(poller))),
                Err(error) => Some((Err(error), None)),
            }
        })
    }
}

/// The polling loop under both follow streams: the position, the filter,
/// and the backoff while no server answers.
struct Poller {
    client: Client,
    /// `_id` of the last change returned (or skipped by the server's
    /// `Link`).
    since: u64,
    filter: Query,
    /// Delays while requests keep failing; reset by an answer.
    failures: Option<ExponentialBackoff>,
    /// No poll starts before this: set by an empty answer that came at once.
    not_before: Option<Instant>,
    /// Index of the endpoint that gave the last answer.
    endpoint: usize,
    /// A transient failure was reported to the caller; the next poll backs
    /// off first.
    backing_off: Option<String>,
}

/// The body of a `GET /changes` answer, each change left as its bytes.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PageBody<'a> {
    #[serde(borrow)]
    changes: Vec<&'a RawValue>,
    at_start: bool,
    at_end: bool,
    #[serde(default)]
    first_index: u64,
    #[serde(default)]
    last_index: u64,
}

/// A change's `_id`, when it does not come first.
#[derive(Deserialize)]
struct IdOnly {
    #[serde(rename = "_id")]
    id: u64,
}

impl Poller {
    fn new(client: Client, since: u64, filter: Query) -> Self {
        Self {
            client,
            since,
            filter,
            failures: None,
            not_before: None,
            endpoint: 0,
            backing_off: None,
        }
    }

    /// The next answer. Transient failures are retried with backoff (and
    /// returned first when `report`); a permanent one (a `410` included) is
    /// returned.
    async fn next_page(&mut self, report: bool) -> Result<RawPage> {
        if let Some(error) = self.backing_off.take() {
            self.back_off(&error).await;
        }
        loop {
            if let Some(at) = self.not_before.take() {
                tokio::time::sleep_until(at.into()).await;
            }
            let started = Instant::now();
            match self.fetch().await {
                Ok((page, skipped_ahead)) => {
                    self.failures = None;
                    if page.changes.is_empty() && !skipped_ahead {
                        self.not_before = Some(started + EMPTY_POLL_MIN_INTERVAL);
                    }
                    return Ok(page);
                }
                Err(error) if error.is_transient() && report => {
                    self.backing_off = Some(error.to_string());
                    return Err(error);
                }
                Err(error) if error.is_transient() => self.back_off(&error).await,
                Err(error) => return Err(error),
            }
        }
    }

    /// Sleeps for the next delay of the follow backoff.
    async fn back_off(&mut self, error: &(dyn std::fmt::Display + Sync)) {
        let policy = self.client.retry_policy().for_follow();
        let delay = self
            .failures
            .get_or_insert_with(|| policy.delays())
            .next()
            .unwrap_or(FOLLOW_MAX_DELAY);
        tracing::warn!(%error, since = self.since, ?delay, "follow: no answer, retrying");
        tokio::time::sleep(delay).await;
    }

    /// One `GET /changes` from the position; the page and whether the
    /// server's `Link` moved the position past its last change.
    async fn fetch(&mut self) -> Result<(RawPage, bool)> {
        let call = changes_call(&["changes"], &self.page_query());
        let answer = self.client.send(&call).await?;
        self.endpoint = answer.endpoint;
        let body = match answer.body {
            AnswerBody::Read(body) => body,
            AnswerBody::Unread(response) => response.bytes().await?,
        };
        if !answer.status.is_success() {
            return Err(Error::from_response(answer.status, &answer.headers, &body));
        }
        self.accept(&body, next_since(&answer.headers))
    }

    fn page_query(&self) -> Query {
        let mut query = self.filter.clone();
        query.since = Some(self.since);
        query.block = Some(query.block.unwrap_or(self.client.follow_block_secs()));
        query.limit = Some(query.limit.unwrap_or(DEFAULT_FOLLOW_LIMIT));
        query
    }

    /// Decodes a page, keeps its changes past the position and advances
    /// the position; also returns true when the server's `Link` moved it
    /// past the last change (a filtered scan that found nothing yet).
    fn accept(&mut self, body: &Bytes, next: Option<u64>) -> Result<(RawPage, bool)> {
        let decode_error = |source| Error::Decode {
            what: "get changes",
            status: 200,
            source,
        };
        let decoded: PageBody<'_> = serde_json::from_slice(body).map_err(decode_error)?;
        let before = self.since;
        let mut changes = Vec::with_capacity(decoded.changes.len());
        for raw in decoded.changes {
            let bytes = raw.get().as_bytes();
            let id = match record_id(bytes) {
                Some(id) => id,
                None => {
                    serde_json::from_str::<IdOnly>(raw.get())
                        .map_err(decode_error)?
                        .id
                }
            };
            if id > self.since {
                self.since = id;
                changes.push(RawChange {
                    id,
                    json: slice_of(body, bytes),
                });
            } else {
                tracing::warn!(
                    id,
                    since = self.since,
                    "follow: skipped a change at or before the position"
                );
            }
        }
        let mut skipped_ahead = false;
        if !decoded.at_end {
            if let Some(next) = next.filter(|next| *next > self.since) {
                self.since = next;
                skipped_ahead = true;
            }
        }
        if self.since > before {
            self.filter.since_time = None;
        }
        let page = RawPage {
            changes,
            at_start: decoded.at_start,
            at_end: decoded.at_end,
            first_index: decoded.first_index,
            last_index: decoded.last_index,
            since: self.since,
            endpoint: self.endpoint,
        };
        Ok((page, skipped_ahead))
    }

    /// Moves the position to a checkpoint's index after a reset.
    fn reset_to(&mut self, index: u64) {
        self.since = index;
        self.filter.since_time = None;
    }
}

/// `part`, which lies inside `body`, as a slice of `body` sharing its
/// memory (a copy if it somehow does not lie inside).
fn slice_of(body: &Bytes, part: &[u8]) -> Bytes {
    let start = (part.as_ptr() as usize).wrapping_sub(body.as_ptr() as usize);
    if start <= body.len() && part.len() <= body.len() - start {
        body.slice(start..start + part.len())
    } else {
        Bytes::copy_from_slice(part)
    }
}

/// State of one [`Client::follow`] stream.
struct Follow {
    poller: Poller,
    /// Changes fetched but not yet yielded, in order.
    pending: VecDeque<Change>,
    /// The index of the checkpoint whose records are being yielded, and
    /// the receiving end of its reader thread, which drops the sender after
    /// its last message, or when it finds this receiver dropped.
    records: Option<(u64, mpsc::Receiver<FromReader>)>,
    /// A permanent error was yielded; the stream ends.
    finished: bool,
}

/// What a checkpoint's reader thread sends.
enum FromReader {
    /// The header was read and matches the manifest: records follow.
    Opened,
    /// A record that matches the follow's filter.
    Record(Change),
    /// The trailer was read and every check passed. Last message.
    End,
    /// Reading failed. Last message.
    Failed(Error),
}

impl Follow {
    async fn next(mut self) -> Option<(Result<FollowEvent>, Self)> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Some((Ok(FollowEvent::Change(change)), self));
            }
            if self.finished {
                return None;
            }
            if let Some((index, records)) = &mut self.records {
                let index = *index;
                let event = match records.recv().await {
                    Some(FromReader::Record(change)) => Ok(FollowEvent::Record(change)),
                    Some(FromReader::End) => {
                        self.records = None;
                        Ok(FollowEvent::ResetEnd { index })
                    }
                    Some(FromReader::Failed(error)) => Err(error),
                    Some(FromReader::Opened) | None => Err(Error::ReaderStopped { index }),
                };
                if event.is_err() {
                    self.finished = true;
                }
                return Some((event, self));
            }
            let error = match self.poller.next_page(false).await {
                Ok(page) => {
                    for raw in &page.changes {
                        match raw.parse() {
                            Ok(change) => self.pending.push_back(change),
                            Err(error) => {
                                self.finished = true;
                                return Some((Err(error), self));
                            }
                        }
                    }
                    continue;
                }
                Err(error) => error,
            };
            if !error.is_truncated() {
                self.finished = true;
                return Some((Err(error), self));
            }
            match self.reset(error).await {
                Ok(event) => return Some((Ok(event), self)),
                Err(error) if error.is_transient() => self.poller.back_off(&error).await,
                Err(error) => {
                    self.finished = true;
                    return Some((Err(error), self));
                }
            }
        }
    }

    /// After a `410`: checks the checkpoint it names, downloads it from the
    /// endpoint that answered and verifies it, starts its reader thread,
    /// and moves the position to its index. Returns the reset event, or
    /// the error (`truncated` itself when it names no usable checkpoint).
    async fn reset(&mut self, truncated: Error) -> Result<FollowEvent> {
        let first_index = match &truncated {
            Error::Truncated { first_index, .. } => *first_index,
            _ => return Err(truncated),
        };
        let checkpoint = match truncated.truncated_manifest() {
            Some(manifest) => manifest?,
            None => return Err(truncated),
        };
        // Continuing after the checkpoint would only meet another 410.
        if checkpoint.index.saturating_add(1) < first_index {
            return Err(truncated);
        }
        if let Scope::Tenant(name) = &checkpoint.scope {
            let covers = match &self.poller.filter.tenant {
                None => false,
                // An id: the server chose the checkpoint for it.
                Some(t) if t.bytes().all(|b| b.is_ascii_digit()) => true,
                Some(t) => t == name,
            };
            if !covers {
                return Err(Error::WrongScope {
                    index: checkpoint.index,
                    scope: checkpoint.scope.clone(),
                });
            }
        }
        tracing::info!(
            since = self.poller.since,
            first_index,
            checkpoint = checkpoint.index,
            scope = %checkpoint.scope,
            "follow: changes truncated, loading the checkpoint"
        );
        let verified = self
            .poller
            .client
            .fetch_checkpoint_at(Some(self.poller.endpoint), &checkpoint)
            .await?;
        let (sender, mut records) = mpsc::channel(RECORDS_READ_AHEAD);
        let filter = RecordFilter::new(&self.poller.filter);
        tokio::task::spawn_blocking(move || read_records(verified, filter, sender));
        match records.recv().await {
            Some(FromReader::Opened) => {}
            Some(FromReader::Failed(error)) => return Err(error),
            Some(FromReader::Record(_) | FromReader::End) | None => {
                return Err(Error::ReaderStopped {
                    index: checkpoint.index,
                })
            }
        }
        self.poller.reset_to(checkpoint.index);
        self.records = Some((checkpoint.index, records));
        Ok(FollowEvent::Reset {
            checkpoint,
            first_index,
        })
    }
}

/// Runs on a blocking thread: reads a verified checkpoint's records and
/// sends those the filter keeps, until the end, an error, or the follow
/// stream is dropped.
fn read_records(
    verified: VerifiedCheckpoint,
    mut filter: RecordFilter,
    sender: mpsc::Sender<FromReader>,
) {
    let mut reader = match verified.reader() {
        Ok(reader) => reader,
        Err(error) => {
            // A failed send means the follow stream is gone: nobody to tell.
            let _ = sender.blocking_send(FromReader::Failed(error));
            return;
        }
    };
    if sender.blocking_send(FromReader::Opened).is_err() {
        return;
    }
    loop {
        let message = match reader.next_change() {
            Ok(Some(change)) => match filter.matches(&change) {
                Ok(true) => FromReader::Record(change),
                Ok(false) => continue,
                Err(error) => FromReader::Failed(error),
            },
            Ok(None) => FromReader::End,
            Err(error) => FromReader::Failed(error),
        };
        let last = !matches!(message, FromReader::Record(_));
        if sender.blocking_send(message).is_err() || last {
            return;
        }
    }
}

/// A follow's filter applied to a checkpoint's records as the server
/// applies it to changes.
#[derive(Debug)]
struct RecordFilter {
    tags: Vec<String>,
    change_type: Option<i32>,
    tenant: Option<TenantFilter>,
}

/// The tenant a filter asks for.
#[derive(Debug)]
enum TenantFilter {
    Name(String),
    /// An id; its name once the checkpoint's tenant record named it.
    Id {
        id: u64,
        name: Option<String>,
    },
}

impl RecordFilter {
    fn new(query: &Query) -> Self {
        let tenant = query.tenant.as_ref().map(|t| match t.parse::<u64>() {
            // Tenant names are never all digits: this is an id.
            Ok(id) if t.bytes().all(|b| b.is_ascii_digit()) => TenantFilter::Id { id, name: None },
            _ => TenantFilter::Name(t.clone()),
        });
        Self {
            tags: query.tags.clone(),
            change_type: query.change_type,
            tenant,
        }
    }

    fn is_unfiltered(&self) -> bool {
        self.tags.is_empty() && self.change_type.is_none() && self.tenant.is_none()
    }

    /// Whether the follow keeps this record. Records must come in `_id`
    /// order: a tenant's record names it before any of its changes.
    fn matches(&mut self, record: &Change) -> Result<bool> {
        self.learn(record)?;
        match self.change_type {
            Some(t) if record.change_type != t => return Ok(false),
            None if record.change_type < 0 && !self.is_unfiltered() => return Ok(false),
            _ => {}
        }
        if let Some(tenant) = &self.tenant {
            let want = match tenant {
                TenantFilter::Name(name) => Some(name),
                TenantFilter::Id { name, .. } => name.as_ref(),
            };
            match (want, &record.tenant) {
                (Some(want), Some(have)) if want == have => {}
                _ => return Ok(false),
            }
        }
        Ok(self.tags.is_empty() || record.tags.iter().any(|have| self.tags.contains(have)))
    }

    /// Learns the name of a tenant filtered by id from its tenant record.
    fn learn(&mut self, record: &Change) -> Result<()> {
        let Some(TenantFilter::Id { id, name }) = &mut self.tenant else {
            return Ok(());
        };
        if name.is_some() || record.change_type != internal_type::TENANT_CREATED {
            return Ok(());
        }
        let data = record.data.as_ref().unwrap_or(&serde_json::Value::Null);
        let tenant = TenantRecord::deserialize(data).map_err(|source| Error::Decode {
            what: "tenant record of a checkpoint",
            status: 200,
            source,
        })?;
        if tenant.id == *id {
            *name = Some(tenant.name);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::extract::{Path, RawQuery, State};
    use axum::http::header::CONTENT_TYPE;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use axum::{Json, Router};
    use futures::StreamExt;
    use serde_json::{json, Value};

    use super::*;
    use crate::checkpoint::testing::checkpoint;
    use crate::client::DEFAULT_FOLLOW_BLOCK_SECS;
    use crate::types::ChangeList;

    // ---- the position ---------------------------------------------------

    fn poller_at(since: u64, filter: Query) -> Poller {
        Poller::new(Client::new(["127.0.0.1:1"]).expect("client"), since, filter)
    }

    fn page(ids: &[u64], at_end: bool) -> Bytes {
        let list = ChangeList {
            changes: ids
                .iter()
                .map(|&id| {
                    serde_json::from_value(json!({"_id": id, "_ts": 1, "data": id}))
                        .expect("change")
                })
                .collect(),
            at_start: false,
            at_end,
            first_index: 1,
            last_index: 100,
        };
        Bytes::from(serde_json::to_vec(&list).expect("encode"))
    }

    fn ids(page: &RawPage) -> Vec<u64> {
        page.changes.iter().map(|c| c.id).collect()
    }

    #[test]
    fn follow_never_queues_a_change_twice_or_backwards() {
        let mut poller = poller_at(3, Query::new());
        let (first, _) = poller
            .accept(&page(&[2, 3, 4, 5], false), None)
            .expect("page");
        let (second, _) = poller.accept(&page(&[5, 4, 6], true), None).expect("page");
        assert_eq!([ids(&first), ids(&second)].concat(), [4, 5, 6]);
        assert_eq!(poller.since, 6);
        assert_eq!(second.since, 6);
    }

    #[test]
    fn follow_skips_ahead_on_link_only_when_not_at_end() {
        let mut poller = poller_at(10, Query::new().tag("rare"));
        assert!(poller.accept(&page(&[], false), Some(500)).expect("page").1);
        assert_eq!(poller.since, 500);
        assert!(!poller.accept(&page(&[], true), Some(900)).expect("page").1);
        assert_eq!(poller.since, 500);
        // A Link behind the position is ignored.
        assert!(!poller.accept(&page(&[], false), Some(400)).expect("page").1);
        assert_eq!(poller.since, 500);
    }

    #[test]
    fn follow_query_fills_in_defaults_and_drops_since_time_after_progress() {
        let mut poller = poller_at(
            7,
            Query::new().since(999).since_time("2020-01-01T00:00:00Z"),
        );
        let q = poller.page_query();
        assert_eq!(q.since, Some(7));
        assert_eq!(q.block, Some(DEFAULT_FOLLOW_BLOCK_SECS));
        assert_eq!(q.limit, Some(DEFAULT_FOLLOW_LIMIT));
        assert!(q.since_time.is_some());
        poller.accept(&page(&[8], true), None).expect("page");
        let q = poller.page_query();
        assert_eq!(q.since, Some(8));
        assert_eq!(q.since_time, None);
    }

    #[test]
    fn raw_changes_are_the_servers_bytes() {
        let body = Bytes::from_static(
            br#"{"changes":[{"_id":4,"data":{"z":1,"a":1.50}} , {"_ts":1,"_id":5}],"atStart":false,"atEnd":true,"firstIndex":1,"lastIndex":5}"#,
        );
        let (page, _) = poller_at(3, Query::new())
            .accept(&body, None)
            .expect("page");
        assert_eq!(ids(&page), [4, 5]);
        assert_eq!(
            &page.changes[0].json[..],
            br#"{"_id":4,"data":{"z":1,"a":1.50}}"#
        );
        assert_eq!(&page.changes[1].json[..], br#"{"_ts":1,"_id":5}"#);
        assert!(page.at_end);
        assert_eq!((page.first_index, page.last_index), (1, 5));
    }

    #[test]
    fn record_filter_matches_as_the_server_does() {
        let change = |v: Value| -> Change { serde_json::from_value(v).expect("change") };
        let tenant = change(json!({"_id": 1, "type": -4, "data": {"_id": 7, "name": "acme"}}));
        let acme = change(json!({"_id": 2, "tags": ["a"], "tenant": "acme", "data": 1}));
        let other = change(json!({"_id": 3, "tags": ["b"], "type": 2, "data": 1}));
        let check = |query: Query, want: [bool; 3]| {
            let mut filter = RecordFilter::new(&query);
            let got = [&tenant, &acme, &other].map(|c| filter.matches(c).expect("match"));
            assert_eq!(got, want, "{query:?}");
        };
        check(Query::new(), [true, true, true]);
        check(Query::new().tag("a"), [false, true, false]);
        check(Query::new().tag("x").tag("b"), [false, false, true]);
        check(Query::new().change_type(2), [false, false, true]);
        check(Query::new().change_type(-4), [true, false, false]);
        check(Query::new().tenant("acme"), [false, true, false]);
        // An id is resolved from the tenant record before the tenant's changes.
        check(Query::new().tenant("7"), [false, true, false]);
        check(Query::new().tenant("8"), [false, false, false]);
    }

    // ---- resets against a server ------------------------------------------

    /// An in-process server: `GET /changes` answers 410 below `first_index`
    /// and serves `changes` (filtered by `tag`) from there on;
    /// `GET /checkpoints/{index}/data` serves `data`.
    struct Fake {
        first_index: u64,
        /// The 410 body's `checkpoint`.
        checkpoint: Option<Value>,
        /// The bytes served as the checkpoint's data.
        data: Vec<u8>,
        /// Retained changes: `_id`, tags and wire JSON.
        changes: Vec<(u64, Vec<&'static str>, &'static str)>,
        /// Path and query of every data request.
        data_requests: Mutex<Vec<String>>,
        /// Data requests still to answer `500`.
        data_failures: AtomicUsize,
    }

    async fn changes(State(fake): State<Arc<Fake>>, RawQuery(query): RawQuery) -> Response {
        let pairs: Vec<(String, String)> =
            url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                .into_owned()
                .collect();
        let since: u64 = pairs
            .iter()
            .find(|(k, _)| k == "since")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let tags: Vec<&str> = pairs
            .iter()
            .filter(|(k, _)| k == "tag")
            .map(|(_, v)| v.as_str())
            .collect();
        if since + 1 < fake.first_index {
            let body = json!({
                "error": "truncated",
                "message": "changes were truncated",
                "firstIndex": fake.first_index,
                "checkpoint": fake.checkpoint,
            });
            return (StatusCode::GONE, Json(body)).into_response();
        }
        let selected: Vec<&str> = fake
            .changes
            .iter()
            .filter(|(id, have, _)| {
                *id > since && (tags.is_empty() || have.iter().any(|t| tags.contains(t)))
            })
            .map(|(_, _, json)| *json)
            .collect();
        let body = format!(
            r#"{{"changes":[{}],"atStart":false,"atEnd":true,"firstIndex":{},"lastIndex":{}}}"#,
            selected.join(","),
            fake.first_index,
            fake.changes.last().map_or(0, |c| c.0),
        );
        ([(CONTENT_TYPE, "application/json")], body).into_response()
    }

    async fn data(
        State(fake): State<Arc<Fake>>,
        Path(index): Path<u64>,
        RawQuery(query): RawQuery,
    ) -> Response {
        fake.data_requests
            .lock()
            .expect("lock")
            .push(format!("{index}/data?{}", query.unwrap_or_default()));
        let fail = fake
            .data_failures
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            let body = json!({"error": "object store unreachable"});
            return (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response();
        }
        (
            [(CONTENT_TYPE, changeagent_proto::checkpoint::CONTENT_TYPE)],
            fake.data.clone(),
        )
            .into_response()
    }

    /// Serves `fake` on a free port and returns a client for it.
    async fn serve(fake: Arc<Fake>) -> Client {
        let app = Router::new()
            .route("/changes", get(changes))
            .route("/checkpoints/{index}/data", get(data))
            .with_state(fake);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Client::builder([format!("http://{addr}")])
            .follow_block_secs(0)
            .build()
            .expect("client")
    }

    /// The next item, failing the test after a deadline instead of hanging.
    async fn next<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
        tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("the stream yields within the deadline")
    }

    /// The checkpoint's records: a tenant, a tagged keyed change and an
    /// unkeyed change whose data keys are out of order.
    const RECORDS: [&str; 3] = [
        r#"{"_id":1,"_ts":10,"type":-4,"data":{"_id":1,"name":"acme"}}"#,
        r#"{"_id":3,"_ts":30,"tags":["a"],"tenant":"acme","collection":"flags","key":"k","data":{"on":true}}"#,
        r#"{"_id":5,"_ts":50,"data":{"z":1,"a":2}}"#,
    ];

    /// Changes after the checkpoint at 5; the list starts at 6.
    fn retained() -> Vec<(u64, Vec<&'static str>, &'static str)> {
        vec![
            (6, vec!["a"], r#"{"_id":6,"_ts":60,"tags":["a"],"data":6}"#),
            (7, vec![], r#"{"_id":7,"_ts":70,"data":7}"#),
        ]
    }

    fn fake_with(data: Vec<u8>, checkpoint: Option<Value>) -> Arc<Fake> {
        Arc::new(Fake {
            first_index: 6,
            checkpoint,
            data,
            changes: retained(),
            data_requests: Mutex::new(Vec::new()),
            data_failures: AtomicUsize::new(0),
        })
    }

    fn parsed(json: &str) -> Change {
        serde_json::from_str(json).expect("change")
    }

    #[tokio::test]
    async fn a_410_yields_a_reset_then_the_records_then_the_changes_after_it() {
        let (bytes, manifest) = checkpoint(5, &Scope::All, &RECORDS);
        let fake = fake_with(bytes, Some(json!(manifest)));
        let client = serve(Arc::clone(&fake)).await;
        let mut events = Box::pin(client.follow(0, Query::new()));
        let mut got = Vec::new();
        for _ in 0..7 {
            got.push(
                next(&mut events)
                    .await
                    .expect("an event")
                    .expect("no error"),
            );
        }
        let want = vec![
            FollowEvent::Reset {
                checkpoint: manifest,
                first_index: 6,
            },
            FollowEvent::Record(parsed(RECORDS[0])),
            FollowEvent::Record(parsed(RECORDS[1])),
            FollowEvent::Record(parsed(RECORDS[2])),
            FollowEvent::ResetEnd { index: 5 },
            FollowEvent::Change(parsed(retained()[0].2)),
            FollowEvent::Change(parsed(retained()[1].2)),
        ];
        assert_eq!(got, want);
        assert_eq!(
            *fake.data_requests.lock().expect("lock"),
            ["5/data?scope=all"],
            "the checkpoint is downloaded once, with its scope"
        );
    }

    #[tokio::test]
    async fn a_failed_download_is_retried_not_yielded() {
        let (bytes, manifest) = checkpoint(5, &Scope::All, &RECORDS);
        let fake = fake_with(bytes, Some(json!(manifest)));
        fake.data_failures.store(2, Ordering::Relaxed);
        let client = serve(Arc::clone(&fake)).await;
        let mut events = Box::pin(client.follow(0, Query::new()));
        let first = next(&mut events)
            .await
            .expect("an event")
            .expect("no error");
        assert!(matches!(first, FollowEvent::Reset { .. }), "{first:?}");
        assert_eq!(fake.data_requests.lock().expect("lock").len(), 3);
        let mut records = 0;
        loop {
            match next(&mut events)
                .await
                .expect("an event")
                .expect("no error")
            {
                FollowEvent::Record(_) => records += 1,
                FollowEvent::ResetEnd { index: 5 } => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(records, RECORDS.len());
    }

    #[tokio::test]
    async fn a_filtered_follow_filters_the_checkpoints_records_too() {
        let (bytes, manifest) = checkpoint(5, &Scope::All, &RECORDS);
        let fake = fake_with(bytes, Some(json!(manifest)));
        let client = serve(fake).await;
        let mut events = Box::pin(client.follow(0, Query::new().tag("a")));
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(
                next(&mut events)
                    .await
                    .expect("an event")
                    .expect("no error"),
            );
        }
        let want = vec![
            FollowEvent::Reset {
                checkpoint: manifest,
                first_index: 6,
            },
            // Neither the catalog record (internal) nor the untagged change.
            FollowEvent::Record(parsed(RECORDS[1])),
            FollowEvent::ResetEnd { index: 5 },
            FollowEvent::Change(parsed(retained()[0].2)),
        ];
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_corrupted_checkpoint_yields_an_error_and_no_records() {
        let (mut bytes, manifest) = checkpoint(5, &Scope::All, &RECORDS);
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x55;
        let fake = fake_with(bytes, Some(json!(manifest)));
        let client = serve(Arc::clone(&fake)).await;
        let mut events = Box::pin(client.follow(0, Query::new()));
        let first = next(&mut events).await.expect("an item");
        assert!(
            matches!(first, Err(Error::ChecksumMismatch { index: 5, .. })),
            "{first:?}"
        );
        assert!(next(&mut events).await.is_none(), "the stream ends");
        assert_eq!(fake.data_requests.lock().expect("lock").len(), 1);
    }

    #[tokio::test]
    async fn a_checkpoint_of_the_wrong_size_yields_an_error_and_no_records() {
        let (mut bytes, manifest) = checkpoint(5, &Scope::All, &RECORDS);
        bytes.push(0);
        let client = serve(fake_with(bytes, Some(json!(manifest)))).await;
        let mut events = Box::pin(client.follow(0, Query::new()));
        let first = next(&mut events).await.expect("an item");
        assert!(
            matches!(first, Err(Error::SizeMismatch { index: 5, .. })),
            "{first:?}"
        );
        assert!(next(&mut events).await.is_none(), "the stream ends");
    }

    #[tokio::test]
    async fn a_410_without_a_usable_checkpoint_is_the_last_item() {
        // No checkpoint at all.
        let client = serve(fake_with(Vec::new(), None)).await;
        let mut events = Box::pin(client.follow(0, Query::new()));
        let first = next(&mut events).await.expect("an item");
        assert!(
            matches!(
                first,
                Err(Error::Truncated {
                    first_index: 6,
                    checkpoint: None
                })
            ),
            "{first:?}"
        );
        assert!(next(&mut events).await.is_none());

        // A checkpoint that ends before the retained list starts.
        let (bytes, manifest) = checkpoint(4, &Scope::All, &RECORDS[..2]);
        let client = serve(fake_with(bytes, Some(json!(manifest)))).await;
        let mut events = Box::pin(client.follow(0, Query::new()));
        let first = next(&mut events).await.expect("an item");
        assert!(matches!(first, Err(Error::Truncated { .. })), "{first:?}");

        // One tenant's checkpoint for a follow of everything.
        let tenant = Scope::Tenant("acme".into());
        let (bytes, manifest) = checkpoint(5, &tenant, &RECORDS[..2]);
        let client = serve(fake_with(bytes, Some(json!(manifest)))).await;
        let mut events = Box::pin(client.follow(0, Query::new()));
        let first = next(&mut events).await.expect("an item");
        assert!(
            matches!(first, Err(Error::WrongScope { index: 5, .. })),
            "{first:?}"
        );
    }

    #[tokio::test]
    async fn follow_raw_keeps_the_servers_bytes_and_ends_on_410() {
        let (bytes, manifest) = checkpoint(5, &Scope::All, &RECORDS);
        let fake = Arc::new(Fake {
            first_index: 6,
            checkpoint: Some(json!(manifest)),
            data: bytes,
            changes: vec![(6, vec![], r#"{"_id":6,"_ts":60,"data":{"z":1,"a":1.50}}"#)],
            data_requests: Mutex::new(Vec::new()),
            data_failures: AtomicUsize::new(0),
        });
        let client = serve(Arc::clone(&fake)).await;

        let mut pages = Box::pin(client.follow_raw(5, Query::new()));
        let page = next(&mut pages).await.expect("a page").expect("no error");
        assert_eq!(ids(&page), [6]);
        assert_eq!(
            &page.changes[0].json[..],
            br#"{"_id":6,"_ts":60,"data":{"z":1,"a":1.50}}"#
        );
        assert!(page.at_end);
        assert_eq!((page.first_index, page.last_index, page.since), (6, 6, 6));

        let mut pages = Box::pin(client.follow_raw(0, Query::new()));
        let error = next(&mut pages).await.expect("an item").expect_err("410");
        assert_eq!(
            error
                .truncated_manifest()
                .expect("a manifest")
                .expect("decodes"),
            manifest
        );
        assert!(next(&mut pages).await.is_none(), "the stream ends");
        assert!(
            fake.data_requests.lock().expect("lock").is_empty(),
            "follow_raw never loads a checkpoint"
        );
    }
}
