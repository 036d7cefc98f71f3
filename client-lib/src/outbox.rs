//! A durable outbox for writers that are only sometimes connected: changes
//! queued while no server answers are kept on disk in order, each with the
//! `Idempotency-Key` it was given when it was queued, and posted when a
//! server answers again, each applied once.
//!
//! ```no_run
//! # async fn example() -> changeagent_client::Result<()> {
//! use changeagent_client::{Client, NewChange, Outbox};
//!
//! let client = Client::new(["http://edge1:9000", "http://core1:9000"])?;
//! let outbox = Outbox::open(std::path::Path::new("/var/lib/app/outbox"), client).await?;
//! let seq = outbox.queue(&NewChange::data(serde_json::json!({"door": "open"}))).await?;
//! let report = outbox.flush().await?; // posts what it can, in order
//! println!("queued {seq}; {} sent, {} pending", report.sent.len(), report.pending);
//! # Ok(())
//! # }
//! ```
//!
//! # Exactly once
//!
//! An entry's key is chosen when it is queued, before any send, and written
//! to disk with it. Every send of the entry, by any flush in any process
//! that opens the outbox later, carries that same key. A server that has
//! already applied a post with the key answers with the first result (the
//! same `_id`) and appends nothing. So a crash, a timeout or a lost answer
//! between the send and the recording of its acknowledgement only leads to a
//! resend that the server recognises: the change is applied once.
//!
//! The server remembers an idempotency key for 24 hours of change time
//! ([`IDEMPOTENCY_WINDOW`]). An entry whose first send reached the server but
//! whose acknowledgement was not recorded, and which is sent again more than
//! 24 hours later, may be applied twice. [`Outbox::flush`] logs a warning for
//! every entry queued longer ago than that before sending it.
//!
//! # Order
//!
//! [`Outbox::flush`] sends one entry at a time, oldest first, and sends the
//! next only once the previous one's acknowledgement is on disk, so the
//! server applies the entries in queue order. An entry the server refuses
//! for good (a `4xx` other than `408` and `429`) is moved out of the queue
//! into `rejected.jsonl` and reported, so that one bad entry cannot hold up
//! the rest; the others keep their order.
//!
//! # On disk
//!
//! The directory holds:
//!
//! - `outbox.jsonl`: JSON lines, appended to. The first line is a header
//!   `{"op":"header","version":1,"nextSeq":N}`; then queued entries
//!   `{"op":"queue","seq","key","queuedAtMs","change"}`, their
//!   acknowledgements `{"op":"ack","seq","id"}` and rejections
//!   `{"op":"reject","seq","status"}`. The pending entries are those queued
//!   and neither acknowledged nor rejected.
//! - `rejected.jsonl`: one line per refused entry (the entry, the status
//!   and the server's error), appended to and never read by the outbox
//!   itself: it is the operator's to inspect, requeue and delete.
//! - `outbox.lock`: locked while an [`Outbox`] has the directory open.
//!
//! The ordering rules each operation keeps:
//!
//! 1. Queue: encode the entry, check the limits, append its line, fsync
//!    the file; only then count the entry as pending and return its
//!    sequence number.
//! 2. Flush: post the oldest pending entry with its stored key; append its
//!    `ack` line and fsync; only then take the next entry.
//! 3. Reject: append the entry to `rejected.jsonl` and fsync; then append
//!    its `reject` line to the log and fsync. (A crash between the two
//!    leaves the entry pending: it is refused again and listed twice.)
//! 4. Compact (when nothing is pending, or when the file is past
//!    [`COMPACT_MIN_BYTES`] and more than half of it is done with): write
//!    a header and the pending entries to a temp file, fsync it, rename it
//!    over `outbox.jsonl`, fsync the directory. A crash leaves either file
//!    whole.
//! 5. Open: a last line without its newline was torn by a crash during an
//!    append (rule 1, 2 or 3 had not finished, so nobody was told it was
//!    done): it is ignored and cut off. Any other line that is not a valid
//!    record is an error ([`Error::OutboxCorrupt`]), never skipped.
//! 6. A failed fsync, or an append that failed and could not be cut off
//!    again, leaves the file's state unknown: the [`Outbox`] then refuses
//!    all work ([`Error::OutboxBroken`]) until it is opened again, which
//!    reads what is on disk.
//!
//! One process at a time: [`Outbox::open`] locks the directory. Within the
//! process an [`Outbox`] is cheap to clone and safe to use from many tasks;
//! its file I/O runs on tokio's blocking threads.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify};

use crate::client::{blocking, new_idempotency_key, sync_parent_dir, Client};
use crate::error::{Error, Result};
use crate::types::NewChange;

/// The outbox's log, in its directory.
pub const LOG_FILE: &str = "outbox.jsonl";

/// Entries the server refused for good, in the outbox's directory.
pub const REJECTED_FILE: &str = "rejected.jsonl";

/// The next log while it is written by a compaction.
const TEMP_FILE: &str = "outbox.jsonl.tmp";

/// Locked (`flock`) while an [`Outbox`] has the directory open.
const LOCK_FILE: &str = "outbox.lock";

/// Version in the log's header; a log of another version is not read.
const FORMAT_VERSION: u32 = 1;

/// Largest change an entry may hold, as JSON: the server's default
/// `--max-body-bytes` (4 MiB), so an entry the outbox accepts is one a
/// server with default settings accepts too.
pub const MAX_ENTRY_BYTES: usize = 4 * 1024 * 1024;

/// Longest line the log may hold: an entry of [`MAX_ENTRY_BYTES`] plus its
/// key, numbers and field names. A longer line is corrupt, and reading
/// stops there instead of filling memory.
const MAX_LINE_BYTES: usize = MAX_ENTRY_BYTES + 4096;

/// Most entries pending at once: a writer offline for a day at one change a
/// second stays well below it, and the entries' metadata stays a few MiB
/// of memory.
pub const MAX_PENDING_ENTRIES: usize = 100_000;

/// Most bytes of pending entries (their lines in the log): the outbox keeps
/// them in memory and a compaction rewrites them, so this bounds both.
pub const MAX_PENDING_BYTES: u64 = 64 * 1024 * 1024;

/// The log is compacted once it is past this size and more than half of it
/// is acknowledged entries (and whenever nothing is pending): small enough
/// that the log stays a few times the pending bytes, large enough that a
/// busy outbox does not rewrite its pending entries after every ack.
pub const COMPACT_MIN_BYTES: u64 = 1024 * 1024;

/// How long the server remembers an `Idempotency-Key` (24 hours of change
/// time): an entry resent later than that after its first send reached the
/// server may be applied again.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

/// First pause of [`Outbox::run_flusher`] after a flush that no server
/// answered: each flush already retried across the client's endpoints.
pub const FLUSHER_MIN_DELAY: Duration = Duration::from_millis(200);

/// Longest pause of [`Outbox::run_flusher`] between flushes while no
/// server answers: the queue drains within this long of a server coming
/// back.
pub const FLUSHER_MAX_DELAY: Duration = Duration::from_secs(30);

/// One queued change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// Its place in the queue: increasing, never reused by this outbox.
    pub seq: u64,
    /// The `Idempotency-Key` every send of it carries.
    pub key: String,
    /// When it was queued, in milliseconds since the Unix epoch.
    pub queued_at_ms: u64,
    /// The change to post.
    pub change: NewChange,
}

/// An entry the server acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    /// The entry's sequence number.
    pub seq: u64,
    /// The `_id` the server gave the change.
    #[serde(rename = "_id")]
    pub id: u64,
}

/// An entry the server refused for good, as it is kept in `rejected.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rejected {
    /// The entry as it was queued.
    #[serde(flatten)]
    pub entry: Entry,
    /// The HTTP status of the refusal.
    pub status: u16,
    /// The server's error, as the client reports it.
    pub error: String,
    /// When it was refused, in milliseconds since the Unix epoch.
    pub rejected_at_ms: u64,
}

/// What one [`Outbox::flush`] did.
#[derive(Debug, Default)]
pub struct FlushReport {
    /// Entries acknowledged by this flush, in order.
    pub sent: Vec<Sent>,
    /// Entries refused for good by this flush and moved to
    /// `rejected.jsonl`, in order.
    pub rejected: Vec<Rejected>,
    /// Entries still pending when the flush ended (including any queued
    /// while it ran).
    pub pending: usize,
    /// The failure that ended the flush with entries pending: no server
    /// answered, or none could take the write (`503`), after the client's
    /// own retries. `None` when the flush emptied the queue.
    pub stopped: Option<Error>,
}

/// A durable queue of changes to post (see the [module docs](self)).
/// Cheap to clone; clones share the queue.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

struct Shared {
    client: Client,
    dir: PathBuf,
    /// The log file and the pending entries. Held briefly by `queue`, by
    /// `flush` between its sends, and by readers; an owned guard is moved
    /// into the blocking thread that does the file I/O and dropped there.
    log: Arc<Mutex<Log>>,
    /// Held by the one flush that runs at a time, across its sends, so two
    /// flushes never send entries side by side.
    flushing: Mutex<()>,
    /// The number of pending entries, readable without the log's lock;
    /// written by the [`Log`] under that lock.
    pending: Arc<AtomicUsize>,
    /// Notified by `queue`; waited on by `run_flusher`.
    queued: Notify,
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("dir", &self.shared.dir)
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// Opens the outbox in `dir` (created if missing) for posting through
    /// `client`: locks the directory, reads the log (dropping a torn last
    /// line) and keeps its pending entries in queue order. Fails with
    /// [`Error::OutboxLocked`] when another process has it open, with
    /// [`Error::OutboxCorrupt`] when the log holds a damaged line.
    pub async fn open(dir: &Path, client: Client) -> Result<Outbox> {
        let pending = Arc::new(AtomicUsize::new(0));
        let log = {
            let dir = dir.to_owned();
            let pending = Arc::clone(&pending);
            blocking("open the outbox", move || Log::open(dir, pending)).await?
        };
        Ok(Outbox {
            shared: Arc::new(Shared {
                client,
                dir: dir.to_owned(),
                log: Arc::new(Mutex::new(log)),
                flushing: Mutex::new(()),
                pending,
                queued: Notify::new(),
            }),
        })
    }

    /// The outbox's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The client the outbox posts through.
    pub fn client(&self) -> &Client {
        &self.shared.client
    }

    /// Queues a change with a fresh `Idempotency-Key` and returns its
    /// sequence number once it is on disk (written and fsynced). Refused
    /// with [`Error::EntryTooLarge`] past [`MAX_ENTRY_BYTES`] and with
    /// [`Error::OutboxFull`] past [`MAX_PENDING_ENTRIES`] or
    /// [`MAX_PENDING_BYTES`]. A call cancelled before it returns may or may
    /// not have queued the change.
    pub async fn queue(&self, change: &NewChange) -> Result<u64> {
        let bytes = serde_json::to_vec(change)
            .map_err(|source| Error::Encode {
                what: "outbox entry",
                source,
            })?
            .len();
        if bytes > MAX_ENTRY_BYTES {
            return Err(Error::EntryTooLarge {
                bytes,
                max: MAX_ENTRY_BYTES,
            });
        }
        let change = change.clone();
        let seq = self
            .with_log("queue a change in the outbox", move |log| log.queue(change))
            .await?;
        self.shared.queued.notify_one();
        Ok(seq)
    }

    /// The number of entries pending.
    pub fn pending(&self) -> usize {
        self.shared.pending.load(Ordering::Relaxed)
    }

    /// The pending entries, in queue order.
    pub async fn entries(&self) -> Vec<Entry> {
        let log = self.shared.log.lock().await;
        log.pending.iter().map(|p| p.entry.clone()).collect()
    }

    /// Every entry refused so far, as kept in `rejected.jsonl`, oldest
    /// first.
    pub async fn rejected(&self) -> Result<Vec<Rejected>> {
        let path = self.shared.dir.join(REJECTED_FILE);
        blocking("read the outbox's rejected entries", move || {
            read_rejected(&path)
        })
        .await
    }

    /// Posts the pending entries, oldest first, one at a time, each with
    /// its stored key, recording each acknowledgement on disk before
    /// sending the next (see the [module docs](self)). Stops at the first
    /// failure that may pass (no server reachable, `503`, a `5xx`, an
    /// answer it cannot read), leaving that entry and the rest pending:
    /// [`FlushReport::stopped`]. An entry refused with a `4xx` other than
    /// `408`/`429` is moved to `rejected.jsonl` and the flush goes on.
    /// Entries queued while it runs are sent too.
    ///
    /// Errors are the outbox's own (its files); a flush that could not
    /// reach a server is an `Ok` report. Only one flush runs at a time; a
    /// second waits for the first.
    pub async fn flush(&self) -> Result<FlushReport> {
        let _flushing = self.shared.flushing.lock().await;
        let mut report = FlushReport::default();
        loop {
            let next = {
                let log = self.shared.log.lock().await;
                log.usable()?;
                log.pending.front().map(|p| p.entry.clone())
            };
            let Some(entry) = next else {
                break;
            };
            warn_if_stale(&entry, now_ms());
            let seq = entry.seq;
            match self
                .shared
                .client
                .post_change_idempotent(&entry.key, &entry.change)
                .await
            {
                Ok(posted) => {
                    let id = posted.id;
                    self.with_log("record an outbox entry as sent", move |log| {
                        log.ack(seq, id)
                    })
                    .await?;
                    tracing::debug!(seq, id, "outbox: entry sent");
                    report.sent.push(Sent { seq, id });
                }
                Err(error) => match refusal(&error) {
                    Some(status) => {
                        tracing::warn!(
                            seq,
                            status,
                            %error,
                            "outbox: the server refused an entry; moved to {REJECTED_FILE}"
                        );
                        let rejected = Rejected {
                            entry,
                            status,
                            error: error.to_string(),
                            rejected_at_ms: now_ms(),
                        };
                        let kept = rejected.clone();
                        self.with_log("record an outbox entry as rejected", move |log| {
                            log.reject(&kept)
                        })
                        .await?;
                        report.rejected.push(rejected);
                    }
                    None => {
                        report.stopped = Some(error);
                        break;
                    }
                },
            }
        }
        report.pending = self.pending();
        Ok(report)
    }

    /// Flushes until `shutdown` completes: at once, then whenever a change
    /// is queued while the queue is empty, and after a flush that no
    /// server answered again after a pause growing from
    /// [`FLUSHER_MIN_DELAY`] to [`FLUSHER_MAX_DELAY`] (with jitter). Logs
    /// what each flush did. Returns `Ok` on shutdown (a flush cut short
    /// there is safe: its entry is resent with the same key next time), and
    /// the outbox's own errors (its files), which no retry would fix.
    pub async fn run_flusher<F>(&self, shutdown: F) -> Result<()>
    where
        F: Future<Output = ()>,
    {
        tokio::pin!(shutdown);
        let schedule = ExponentialBuilder::new()
            .with_min_delay(FLUSHER_MIN_DELAY)
            .with_max_delay(FLUSHER_MAX_DELAY)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        let mut delays = None;
        loop {
            let report = tokio::select! {
                () = &mut shutdown => return Ok(()),
                report = self.flush() => report?,
            };
            if !report.sent.is_empty() || !report.rejected.is_empty() {
                tracing::info!(
                    sent = report.sent.len(),
                    rejected = report.rejected.len(),
                    pending = report.pending,
                    "outbox: flushed"
                );
            }
            match report.stopped {
                Some(error) => {
                    let delay = delays
                        .get_or_insert_with(|| schedule.build())
                        .next()
                        .unwrap_or(FLUSHER_MAX_DELAY);
                    tracing::warn!(
                        %error,
                        pending = report.pending,
                        ?delay,
                        "outbox: no server took the next entry; flushing again later"
                    );
                    tokio::select! {
                        () = &mut shutdown => return Ok(()),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                None => {
                    delays = None;
                    if self.pending() == 0 {
                        tokio::select! {
                            () = &mut shutdown => return Ok(()),
                            () = self.shared.queued.notified() => {}
                        }
                    }
                }
            }
        }
    }

    /// Runs `work` on the log on a blocking thread, under the log's lock.
    async fn with_log<T, F>(&self, what: &'static str, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Log) -> Result<T> + Send + 'static,
    {
        let mut log = Arc::clone(&self.shared.log).lock_owned().await;
        blocking(what, move || work(&mut log)).await
    }
}

/// The status of a refusal that resending cannot change: a `4xx` other
/// than `408 Request Timeout` and `429 Too Many Requests`.
fn refusal(error: &Error) -> Option<u16> {
    match error {
        Error::Api { status, .. }
            if (400..500).contains(status) && !matches!(status, 408 | 429) =>
        {
            Some(*status)
        }
        _ => None,
    }
}

/// Logs a warning when `entry` has been queued longer than the server
/// remembers keys: if an earlier send of it reached the server, this one
/// may apply it again.
fn warn_if_stale(entry: &Entry, now_ms: u64) {
    let age = Duration::from_millis(now_ms.saturating_sub(entry.queued_at_ms));
    if age > IDEMPOTENCY_WINDOW {
        tracing::warn!(
            seq = entry.seq,
            key = %entry.key,
            age_hours = age.as_secs() / 3600,
            "outbox: entry queued longer ago than the server remembers idempotency keys (24 h): \
             if an earlier send of it reached the server, it may now be applied twice"
        );
    }
}

/// Milliseconds since the Unix epoch (0 on a clock set before it).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One line of the log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
enum Line {
    /// The first line: the format and the next sequence number to give.
    #[serde(rename_all = "camelCase")]
    Header { version: u32, next_seq: u64 },
    /// An entry queued.
    Queue(Entry),
    /// The entry `seq` was acknowledged with `_id` `id`.
    Ack { seq: u64, id: u64 },
    /// The entry `seq` was refused with `status` and moved to the rejected
    /// file.
    Reject { seq: u64, status: u16 },
}

/// A pending entry and the bytes of its line in the log.
#[derive(Debug)]
struct Pending {
    entry: Entry,
    bytes: u64,
}

/// The open log: its file and what it says is pending.
struct Log {
    dir: PathBuf,
    /// `dir/outbox.jsonl`.
    path: PathBuf,
    /// The log, opened for appending.
    file: File,
    /// Bytes of complete lines in `file`: where the next line starts.
    len: u64,
    /// Bytes of the header line of `file`.
    header_bytes: u64,
    /// Queued, neither acknowledged nor rejected, in queue order.
    pending: VecDeque<Pending>,
    /// Sum of the `bytes` of `pending`.
    pending_bytes: u64,
    /// Sequence number of the next entry queued.
    next_seq: u64,
    /// The file's state is unknown (see rule 6 of the module docs).
    broken: bool,
    /// [`MAX_PENDING_ENTRIES`] and [`MAX_PENDING_BYTES`] (smaller in tests).
    limits: Limits,
    /// `pending.len()`, for [`Outbox::pending`].
    count: Arc<AtomicUsize>,
    /// The directory's lock, released when the log is dropped.
    _lock: DirLock,
}

/// How much may be pending.
#[derive(Debug, Clone, Copy)]
struct Limits {
    entries: usize,
    bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            entries: MAX_PENDING_ENTRIES,
            bytes: MAX_PENDING_BYTES,
        }
    }
}

/// What [`parse_log`] found in a log.
#[derive(Debug)]
struct Loaded {
    pending: VecDeque<Pending>,
    next_seq: u64,
    /// Bytes of the header line; 0 when the log has none (empty, or only a
    /// torn header).
    header_bytes: u64,
    /// Bytes of the complete lines: the log's length once a torn last line
    /// is cut off.
    good_len: u64,
    /// The log ended in a torn line.
    torn: bool,
}

impl Log {
    /// Opens (creating as needed) the outbox in `dir`: rule 5.
    fn open(dir: PathBuf, count: Arc<AtomicUsize>) -> Result<Log> {
        std::fs::create_dir_all(&dir).map_err(io_error("create the outbox directory", &dir))?;
        let lock = DirLock::acquire(&dir)?;
        let path = dir.join(LOG_FILE);
        let temp = dir.join(TEMP_FILE);
        remove_if_present(&temp).map_err(io_error("remove the stale temp file", &temp))?;
        let loaded = match File::open(&path) {
            Ok(file) => parse_log(&path, BufReader::new(file))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Loaded {
                pending: VecDeque::new(),
                next_seq: 1,
                header_bytes: 0,
                good_len: 0,
                torn: false,
            },
            Err(e) => return Err(io_error("open", &path)(e)),
        };
        let fresh = loaded.header_bytes == 0;
        let file = if fresh {
            // Nothing to keep: no file, or one with at most a torn header.
            // A compaction below writes a header in its place.
            None
        } else {
            let file = OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(io_error("open", &path))?;
            if loaded.torn {
                tracing::warn!(
                    path = %path.display(),
                    "outbox: dropping a torn last line left by a crash during an append"
                );
                file.set_len(loaded.good_len)
                    .and_then(|()| file.sync_data())
                    .map_err(io_error("cut the torn last line off", &path))?;
            }
            Some(file)
        };
        let pending_bytes = loaded.pending.iter().map(|p| p.bytes).sum();
        count.store(loaded.pending.len(), Ordering::Relaxed);
        let mut log = match file {
            Some(file) => Log {
                dir,
                path,
                file,
                len: loaded.good_len,
                header_bytes: loaded.header_bytes,
                pending: loaded.pending,
                pending_bytes,
                next_seq: loaded.next_seq,
                broken: false,
                limits: Limits::default(),
                count,
                _lock: lock,
            },
            None => {
                let rewritten = rewrite(&dir, &path, loaded.next_seq, &VecDeque::new())?;
                sync_parent_dir(&path).map_err(io_error("sync the outbox directory", &dir))?;
                Log {
                    dir,
                    path,
                    file: rewritten.file,
                    len: rewritten.len,
                    header_bytes: rewritten.header_bytes,
                    pending: VecDeque::new(),
                    pending_bytes: 0,
                    next_seq: loaded.next_seq,
                    broken: false,
                    limits: Limits::default(),
                    count,
                    _lock: lock,
                }
            }
        };
        log.compact_if_due();
        Ok(log)
    }

    /// Fails when an earlier write left the file's state unknown.
    fn usable(&self) -> Result<()> {
        if self.broken {
            return Err(Error::OutboxBroken {
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// Rule 1.
    fn queue(&mut self, change: NewChange) -> Result<u64> {
        self.usable()?;
        let entry = Entry {
            seq: self.next_seq,
            key: new_idempotency_key(),
            queued_at_ms: now_ms(),
            change,
        };
        let line = encode_line(&Line::Queue(entry.clone()))?;
        let bytes = line.len() as u64;
        if self.pending.len() >= self.limits.entries
            || self.pending_bytes.saturating_add(bytes) > self.limits.bytes
        {
            return Err(Error::OutboxFull {
                entries: self.pending.len(),
                bytes: self.pending_bytes,
                max_entries: self.limits.entries,
                max_bytes: self.limits.bytes,
            });
        }
        self.append(&line)?;
        let seq = entry.seq;
        self.next_seq = seq + 1;
        self.pending.push_back(Pending { entry, bytes });
        self.pending_bytes += bytes;
        self.count.store(self.pending.len(), Ordering::Relaxed);
        Ok(seq)
    }

    /// Rule 2, after the post was acknowledged.
    fn ack(&mut self, seq: u64, id: u64) -> Result<()> {
        self.usable()?;
        self.append(&encode_line(&Line::Ack { seq, id })?)?;
        self.remove(seq);
        self.compact_if_due();
        Ok(())
    }

    /// Rule 3, after the post was refused.
    fn reject(&mut self, rejected: &Rejected) -> Result<()> {
        self.usable()?;
        let path = self.dir.join(REJECTED_FILE);
        let mut line = serde_json::to_vec(rejected).map_err(|source| Error::Encode {
            what: "rejected outbox entry",
            source,
        })?;
        line.push(b'\n');
        append_rejected(&path, &line).map_err(io_error("append to", &path))?;
        let seq = rejected.entry.seq;
        self.append(&encode_line(&Line::Reject {
            seq,
            status: rejected.status,
        })?)?;
        self.remove(seq);
        self.compact_if_due();
        Ok(())
    }

    /// Appends whole lines and fsyncs them. On a failed write the file is
    /// cut back to its last complete line; when that fails too, or the
    /// fsync fails, the log is broken (rule 6).
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        if let Err(source) = self.file.write_all(bytes) {
            if self.file.set_len(self.len).is_err() {
                self.broken = true;
            }
            return Err(io_error("append to", &self.path)(source));
        }
        if let Err(source) = self.file.sync_data() {
            self.broken = true;
            return Err(io_error("sync", &self.path)(source));
        }
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Drops entry `seq` from the pending ones (the oldest, as flushes go).
    fn remove(&mut self, seq: u64) {
        let at = if self.pending.front().is_some_and(|p| p.entry.seq == seq) {
            Some(0)
        } else {
            self.pending.iter().position(|p| p.entry.seq == seq)
        };
        if let Some(removed) = at.and_then(|at| self.pending.remove(at)) {
            self.pending_bytes -= removed.bytes;
        }
        self.count.store(self.pending.len(), Ordering::Relaxed);
    }

    /// Whether rule 4 calls for a compaction now.
    fn compaction_due(&self) -> bool {
        let live = self.header_bytes + self.pending_bytes;
        if self.pending.is_empty() {
            return self.len > self.header_bytes;
        }
        self.len > COMPACT_MIN_BYTES && self.len > live.saturating_mul(2)
    }

    /// Compacts when due. A failure leaves the old log in place (or marks
    /// the log broken when it cannot tell); the operation that triggered it
    /// is on disk already, so it is logged rather than returned.
    fn compact_if_due(&mut self) {
        if self.broken || !self.compaction_due() {
            return;
        }
        if let Err(error) = self.compact() {
            tracing::warn!(%error, "outbox: compaction failed; the log keeps growing until one succeeds");
        }
    }

    /// Rule 4.
    fn compact(&mut self) -> Result<()> {
        let rewritten = rewrite(&self.dir, &self.path, self.next_seq, &self.pending)?;
        // The old handle now names an unlinked file: switch at once.
        self.file = rewritten.file;
        self.len = rewritten.len;
        self.header_bytes = rewritten.header_bytes;
        for (pending, bytes) in self.pending.iter_mut().zip(rewritten.entry_bytes) {
            pending.bytes = bytes;
        }
        self.pending_bytes = self.pending.iter().map(|p| p.bytes).sum();
        if let Err(source) = sync_parent_dir(&self.path) {
            // The rename may not survive a crash, and lines appended to
            // the new file would go with it.
            self.broken = true;
            return Err(io_error("sync the outbox directory", &self.dir)(source));
        }
        Ok(())
    }
}

/// A log written by [`rewrite`].
struct Rewritten {
    /// The new log, open for appending, renamed into place.
    file: File,
    len: u64,
    header_bytes: u64,
    /// The bytes of each entry's line, in order.
    entry_bytes: Vec<u64>,
}

/// Steps 1–3 of rule 4: a header and `pending` written to the temp file,
/// fsynced, renamed over `path`. The caller syncs the directory.
fn rewrite(
    dir: &Path,
    path: &Path,
    next_seq: u64,
    pending: &VecDeque<Pending>,
) -> Result<Rewritten> {
    let temp = dir.join(TEMP_FILE);
    let written = write_temp(&temp, next_seq, pending);
    let (file, len, header_bytes, entry_bytes) = match written {
        Ok(written) => written,
        Err(error) => {
            // Best effort: the next open removes it too.
            let _ = std::fs::remove_file(&temp);
            return Err(error);
        }
    };
    if let Err(source) = std::fs::rename(&temp, path) {
        let _ = std::fs::remove_file(&temp);
        return Err(io_error("move the compacted log into place as", path)(
            source,
        ));
    }
    Ok(Rewritten {
        file,
        len,
        header_bytes,
        entry_bytes,
    })
}

/// Writes and fsyncs the temp file of a compaction.
fn write_temp(
    temp: &Path,
    next_seq: u64,
    pending: &VecDeque<Pending>,
) -> Result<(File, u64, u64, Vec<u64>)> {
    remove_if_present(temp).map_err(io_error("remove the stale temp file", temp))?;
    let file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(temp)
        .map_err(io_error("create", temp))?;
    let header = encode_line(&Line::Header {
        version: FORMAT_VERSION,
        next_seq,
    })?;
    let mut out = BufWriter::new(&file);
    let write = |out: &mut BufWriter<&File>, line: &[u8]| {
        out.write_all(line).map_err(io_error("write", temp))
    };
    write(&mut out, &header)?;
    let mut len = header.len() as u64;
    let mut entry_bytes = Vec::with_capacity(pending.len());
    for p in pending {
        let line = encode_line(&Line::Queue(p.entry.clone()))?;
        write(&mut out, &line)?;
        len += line.len() as u64;
        entry_bytes.push(line.len() as u64);
    }
    out.flush().map_err(io_error("write", temp))?;
    drop(out);
    file.sync_all().map_err(io_error("sync", temp))?;
    Ok((file, len, header.len() as u64, entry_bytes))
}

/// Reads a log: its header, then queue, ack and reject lines (rule 5).
fn parse_log(path: &Path, reader: impl BufRead) -> Result<Loaded> {
    let mut loaded = Loaded {
        pending: VecDeque::new(),
        next_seq: 1,
        header_bytes: 0,
        good_len: 0,
        torn: false,
    };
    let mut last_seq = 0u64;
    let (good_len, torn) = read_lines(path, reader, |line_no, bytes| {
        let corrupt = |problem, source| Error::OutboxCorrupt {
            path: path.to_owned(),
            line: line_no,
            problem,
            source,
        };
        let line: Line =
            serde_json::from_slice(bytes).map_err(|e| corrupt("not an outbox record", Some(e)))?;
        match line {
            Line::Header { version, next_seq } => {
                if line_no != 1 {
                    return Err(corrupt("a header after the first line", None));
                }
                if version != FORMAT_VERSION {
                    return Err(corrupt(
                        "written in another version of the outbox format",
                        None,
                    ));
                }
                loaded.header_bytes = bytes.len() as u64 + 1;
                loaded.next_seq = next_seq.max(1);
            }
            _ if loaded.header_bytes == 0 => {
                return Err(corrupt("the first line is not the outbox header", None))
            }
            Line::Queue(entry) => {
                if entry.seq <= last_seq {
                    return Err(corrupt("sequence numbers do not increase", None));
                }
                last_seq = entry.seq;
                loaded.next_seq = loaded.next_seq.max(entry.seq.saturating_add(1));
                loaded.pending.push_back(Pending {
                    entry,
                    bytes: bytes.len() as u64 + 1,
                });
            }
            Line::Ack { seq, .. } | Line::Reject { seq, .. } => {
                let Some(at) = loaded.pending.iter().position(|p| p.entry.seq == seq) else {
                    return Err(corrupt("settles an entry that is not pending", None));
                };
                loaded.pending.remove(at);
            }
        }
        Ok(())
    })?;
    loaded.good_len = good_len;
    loaded.torn = torn;
    Ok(loaded)
}

/// Hands each complete line of `reader` (without its newline) and its
/// 1-based number to `each`. Returns the bytes of the complete lines and
/// whether an unterminated (torn) last line followed them.
fn read_lines<R, F>(path: &Path, mut reader: R, mut each: F) -> Result<(u64, bool)>
where
    R: BufRead,
    F: FnMut(u64, &[u8]) -> Result<()>,
{
    let mut line = Vec::new();
    let mut len = 0u64;
    let mut line_no = 0u64;
    loop {
        line.clear();
        let read = reader
            .by_ref()
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(io_error("read", path))?;
        if read == 0 {
            return Ok((len, false));
        }
        line_no += 1;
        let Some((b'\n', content)) = line.split_last() else {
            if line.len() > MAX_LINE_BYTES {
                return Err(Error::OutboxCorrupt {
                    path: path.to_owned(),
                    line: line_no,
                    problem: "longer than any record may be",
                    source: None,
                });
            }
            // Only a line cut short by the end of the file ends without a
            // newline: the torn tail of an append.
            return Ok((len, true));
        };
        each(line_no, content)?;
        len += read as u64;
    }
}

/// The entries in the rejected file, a torn last line skipped.
fn read_rejected(path: &Path) -> Result<Vec<Rejected>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("open", path)(e)),
    };
    let mut rejected = Vec::new();
    read_lines(path, BufReader::new(file), |line_no, bytes| {
        let entry = serde_json::from_slice(bytes).map_err(|e| Error::OutboxCorrupt {
            path: path.to_owned(),
            line: line_no,
            problem: "not a rejected entry",
            source: Some(e),
        })?;
        rejected.push(entry);
        Ok(())
    })?;
    Ok(rejected)
}

/// Appends one line to the rejected file and fsyncs it, first cutting off a
/// torn last line a crash may have left there.
fn append_rejected(path: &Path, line: &[u8]) -> io::Result<()> {
    let existed = path.exists();
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    let len = file.metadata()?.len();
    if len > 0 {
        let keep = complete_len(&mut file, len)?;
        if keep < len {
            file.set_len(keep)?;
        }
    }
    file.write_all(line)?;
    file.sync_data()?;
    if !existed {
        sync_parent_dir(path)?;
    }
    Ok(())
}

/// The length of `file` (of `len` bytes) up to and with its last newline.
fn complete_len(file: &mut File, len: u64) -> io::Result<u64> {
    let start = len.saturating_sub(MAX_LINE_BYTES as u64 + 1);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    Ok(match tail.iter().rposition(|b| *b == b'\n') {
        Some(at) => start + at as u64 + 1,
        None => start,
    })
}

/// One log line: the record as JSON and a newline. JSON escapes newlines
/// inside strings, so the newline is the line's only one.
fn encode_line(line: &Line) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(line).map_err(|source| Error::Encode {
        what: "outbox record",
        source,
    })?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Removes `path`; a missing file is fine.
fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Maps an I/O error about `path` to [`Error::OutboxIo`].
fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::OutboxIo { what, path, source }
}

/// An exclusive `flock` on the directory's lock file, held while the
/// outbox is open (released by the kernel when the process dies).
struct DirLock {
    #[cfg(unix)]
    _flock: nix::fcntl::Flock<File>,
    #[cfg(not(unix))]
    _file: File,
}

impl DirLock {
    fn acquire(dir: &Path) -> Result<DirLock> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error("open", &path))?;
        #[cfg(unix)]
        {
            use nix::errno::Errno;
            use nix::fcntl::{Flock, FlockArg};
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(flock) => Ok(DirLock { _flock: flock }),
                Err((_, Errno::EWOULDBLOCK)) => Err(Error::OutboxLocked {
                    dir: dir.to_owned(),
                }),
                Err((_, errno)) => Err(io_error("lock", &path)(errno.into())),
            }
        }
        #[cfg(not(unix))]
        {
            Ok(DirLock { _file: file })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::AtomicU16;
    use std::sync::Mutex as StdMutex;

    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use axum::{Json, Router};
    use serde_json::{json, Value};

    use super::*;
    use crate::client::RetryPolicy;

    /// A client for a server that is never there (port 1 refuses).
    fn offline() -> Client {
        Client::builder(["127.0.0.1:1"])
            .retry(RetryPolicy::never())
            .build()
            .expect("client")
    }

    fn change(n: u64) -> NewChange {
        NewChange::data(json!({ "n": n })).with_tags(["t"])
    }

    async fn open(dir: &Path) -> Outbox {
        Outbox::open(dir, offline()).await.expect("open the outbox")
    }

    fn log_text(dir: &Path) -> String {
        std::fs::read_to_string(dir.join(LOG_FILE)).expect("read the log")
    }

    /// Acknowledges entry `seq` as the server would have (`_id` = seq + 100).
    async fn ack(outbox: &Outbox, seq: u64) {
        outbox
            .with_log("ack", move |log| log.ack(seq, seq + 100))
            .await
            .expect("ack");
    }

    async fn set_limits(outbox: &Outbox, entries: usize, bytes: u64) {
        outbox.shared.log.lock().await.limits = Limits { entries, bytes };
    }

    #[tokio::test]
    async fn queued_entries_survive_a_reopen_in_order_with_their_keys() {
        let dir = tempfile::tempdir().expect("temp dir");
        let outbox = open(dir.path()).await;
        for n in 1..=5 {
            assert_eq!(outbox.queue(&change(n)).await.expect("queue"), n);
        }
        let before = outbox.entries().await;
        assert_eq!(outbox.pending(), 5);
        let keys: std::collections::HashSet<_> = before.iter().map(|e| e.key.clone()).collect();
        assert_eq!(keys.len(), 5, "every entry has its own key");
        drop(outbox);

        let outbox = open(dir.path()).await;
        assert_eq!(outbox.entries().await, before);
        assert_eq!(outbox.pending(), 5);
        let changes: Vec<_> = before.iter().map(|e| e.change.clone()).collect();
        assert_eq!(changes, (1..=5).map(change).collect::<Vec<_>>());
        assert_eq!(outbox.queue(&change(6)).await.expect("queue"), 6);
    }

    #[tokio::test]
    async fn a_torn_last_line_is_dropped_and_cut_off() {
        let dir = tempfile::tempdir().expect("temp dir");
        let outbox = open(dir.path()).await;
        outbox.queue(&change(1)).await.expect("queue");
        outbox.queue(&change(2)).await.expect("queue");
        let before = outbox.entries().await;
        drop(outbox);
        // A crash in the middle of appending entry 3.
        let path = dir.path().join(LOG_FILE);
        let good = std::fs::metadata(&path).expect("stat").len();
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(br#"{"op":"queue","seq":3,"key":"abc","queuedA"#)
            .expect("write");
        drop(file);

        let outbox = open(dir.path()).await;
        assert_eq!(
            outbox.entries().await,
            before,
            "the torn entry is not pending"
        );
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            good,
            "the torn line is cut off"
        );
        // The next append starts on a line of its own: a reopen reads it.
        assert_eq!(outbox.queue(&change(3)).await.expect("queue"), 3);
        drop(outbox);
        let outbox = open(dir.path()).await;
        let seqs: Vec<u64> = outbox.entries().await.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
    }

    #[tokio::test]
    async fn a_damaged_complete_line_is_an_error_not_skipped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let outbox = open(dir.path()).await;
        outbox.queue(&change(1)).await.expect("queue");
        drop(outbox);
        let path = dir.path().join(LOG_FILE);
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(b"{\"op\":\"queue\",\"seq\n").expect("write");
        drop(file);
        let error = Outbox::open(dir.path(), offline())
            .await
            .expect_err("a damaged line");
        assert!(
            matches!(error, Error::OutboxCorrupt { line: 3, .. }),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn settled_entries_are_compacted_away_and_pending_ones_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let outbox = open(dir.path()).await;
        // 12 entries of ~100 KiB: past COMPACT_MIN_BYTES.
        let big = "x".repeat(100 * 1024);
        for n in 1..=12 {
            let c = NewChange::data(json!({ "n": n, "pad": big }));
            outbox.queue(&c).await.expect("queue");
        }
        let all = outbox.entries().await;
        let size_before = std::fs::metadata(dir.path().join(LOG_FILE))
            .expect("stat")
            .len();
        assert!(size_before > COMPACT_MIN_BYTES, "{size_before}");
        for seq in 1..=5 {
            ack(&outbox, seq).await;
        }
        // 7 of 12 pending: less than half of the log is done with.
        assert!(
            log_text(dir.path()).contains(r#""op":"ack""#),
            "not compacted yet"
        );
        ack(&outbox, 6).await;
        // 6 of 12: now half is done with, and the log is rewritten.
        let size_after = std::fs::metadata(dir.path().join(LOG_FILE))
            .expect("stat")
            .len();
        assert!(
            size_after < size_before / 2 + 1024,
            "compacted: {size_before} -> {size_after}"
        );
        let text = log_text(dir.path());
        assert!(
            text.starts_with(r#"{"op":"header","version":1,"nextSeq":13}"#),
            "{}",
            &text[..80]
        );
        assert!(!text.contains(r#""op":"ack""#), "acks are compacted away");
        assert_eq!(outbox.entries().await, all[6..]);
        ack(&outbox, 7).await;
        drop(outbox);

        let outbox = open(dir.path()).await;
        assert_eq!(outbox.entries().await, all[7..], "the same after a reopen");
        assert_eq!(
            outbox.queue(&change(13)).await.expect("queue"),
            13,
            "sequence numbers are not reused"
        );
    }

    #[tokio::test]
    async fn an_emptied_queue_is_compacted_to_its_header_and_numbers_go_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let outbox = open(dir.path()).await;
        outbox.queue(&change(1)).await.expect("queue");
        outbox.queue(&change(2)).await.expect("queue");
        ack(&outbox, 1).await;
        assert_eq!(
            log_text(dir.path()).lines().count(),
            4,
            "header, 2 queued, 1 ack"
        );
        ack(&outbox, 2).await;
        assert_eq!(
            log_text(dir.path()),
            "{\"op\":\"header\",\"version\":1,\"nextSeq\":3}\n"
        );
        assert_eq!(outbox.pending(), 0);
        drop(outbox);
        let outbox = open(dir.path()).await;
        assert_eq!(outbox.queue(&change(3)).await.expect("queue"), 3);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .filter(|name| name != LOCK_FILE)
            .collect();
        assert_eq!(names, [LOG_FILE], "no temp file is left behind");
    }

    #[tokio::test]
    async fn a_full_queue_refuses_more_and_takes_them_again_once_drained() {
        let dir = tempfile::tempdir().expect("temp dir");
        let outbox = open(dir.path()).await;
        set_limits(&outbox, 3, MAX_PENDING_BYTES).await;
        for n in 1..=3 {
            outbox.queue(&change(n)).await.expect("queue");
        }
        let text = log_text(dir.path());
        let error = outbox.queue(&change(4)).await.expect_err("full");
        assert!(
            matches!(
                error,
                Error::OutboxFull {
                    entries: 3,
                    max_entries: 3,
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(error.to_string().contains("flush it"), "{error}");
        assert_eq!(log_text(dir.path()), text, "nothing written");
        assert_eq!(outbox.pending(), 3);
        ack(&outbox, 1).await;
        assert_eq!(outbox.queue(&change(4)).await.expect("room again"), 4);

        // The byte limit: room for two of these entries, not three.
        let line = encode_line(&Line::Queue(outbox.entries().await[0].clone()))
            .expect("encode")
            .len() as u64;
        set_limits(&outbox, MAX_PENDING_ENTRIES, 5 * line + line / 2).await;
        outbox.queue(&change(5)).await.expect("queue");
        outbox.queue(&change(6)).await.expect("queue");
        let error = outbox.queue(&change(7)).await.expect_err("full");
        assert!(
            matches!(error, Error::OutboxFull { entries: 5, .. }),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_change_larger_than_an_entry_may_be_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let outbox = open(dir.path()).await;
        let huge = NewChange::data(json!("x".repeat(MAX_ENTRY_BYTES)));
        let error = outbox.queue(&huge).await.expect_err("too large");
        assert!(matches!(error, Error::EntryTooLarge { .. }), "{error:?}");
        assert_eq!(outbox.pending(), 0);
    }

    #[tokio::test]
    async fn one_outbox_per_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        let outbox = open(dir.path()).await;
        let error = Outbox::open(dir.path(), offline())
            .await
            .expect_err("locked");
        assert!(matches!(error, Error::OutboxLocked { .. }), "{error:?}");
        drop(outbox);
        open(dir.path()).await;
    }

    #[test]
    fn only_lasting_client_errors_are_refusals() {
        let refusal_of = |status: u16| {
            let status = reqwest::StatusCode::from_u16(status).expect("status");
            refusal(&Error::from_response(
                status,
                &reqwest::header::HeaderMap::new(),
                br#"{"error":"x"}"#,
            ))
        };
        assert_eq!(refusal_of(400), Some(400));
        assert_eq!(refusal_of(404), Some(404));
        assert_eq!(refusal_of(413), Some(413));
        assert_eq!(refusal_of(408), None);
        assert_eq!(refusal_of(429), None);
        assert_eq!(refusal_of(500), None);
        assert_eq!(refusal_of(503), None);
    }

    // ---- flushing against a server ----------------------------------------

    /// An in-process `POST /changes` that remembers idempotency keys as the
    /// server does, refuses `{"data":"bad"}` with 400, and answers 503 while
    /// `unavailable` is set.
    #[derive(Default)]
    struct Fake {
        /// (key, body) of every change appended, in order.
        applied: StdMutex<Vec<(String, Value)>>,
        /// The `_id` given to each key.
        ids: StdMutex<HashMap<String, u64>>,
        /// Answer this status instead, when not 0.
        status: AtomicU16,
        /// Answers given with `status`.
        refused: AtomicUsize,
    }

    async fn post_change(
        State(fake): State<Arc<Fake>>,
        headers: HeaderMap,
        Json(body): Json<Value>,
    ) -> Response {
        let status = fake.status.load(Ordering::Relaxed);
        if status != 0 {
            fake.refused.fetch_add(1, Ordering::Relaxed);
            let status = StatusCode::from_u16(status).expect("status");
            return (status, Json(json!({"error": "not now"}))).into_response();
        }
        if body["data"] == json!("bad") {
            return (StatusCode::BAD_REQUEST, Json(json!({"error": "bad data"}))).into_response();
        }
        let key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .expect("every outbox post carries a key")
            .to_owned();
        let mut ids = fake.ids.lock().expect("lock");
        let mut applied = fake.applied.lock().expect("lock");
        let id = *ids.entry(key.clone()).or_insert_with(|| {
            applied.push((key, body));
            applied.len() as u64
        });
        Json(json!({ "_id": id })).into_response()
    }

    async fn serve(fake: Arc<Fake>) -> Client {
        let app = Router::new()
            .route("/changes", post(post_change))
            .with_state(fake);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Client::builder([format!("http://{addr}")])
            .retry(RetryPolicy::never())
            .build()
            .expect("client")
    }

    #[tokio::test]
    async fn a_flush_sends_in_order_with_the_stored_keys_and_stops_while_unavailable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let fake = Arc::new(Fake::default());
        let outbox = Outbox::open(dir.path(), serve(Arc::clone(&fake)).await)
            .await
            .expect("open");
        fake.status.store(503, Ordering::Relaxed);
        for n in 1..=3 {
            outbox.queue(&change(n)).await.expect("queue");
        }
        let queued = outbox.entries().await;
        let report = outbox.flush().await.expect("flush");
        assert!(report.sent.is_empty());
        assert_eq!(report.pending, 3);
        assert!(
            matches!(report.stopped, Some(Error::Unavailable { status: 503, .. })),
            "{:?}",
            report.stopped
        );
        assert!(fake.applied.lock().expect("lock").is_empty());

        fake.status.store(0, Ordering::Relaxed);
        let report = outbox.flush().await.expect("flush");
        assert!(report.stopped.is_none(), "{:?}", report.stopped);
        assert_eq!(report.pending, 0);
        assert_eq!(
            report.sent,
            [
                Sent { seq: 1, id: 1 },
                Sent { seq: 2, id: 2 },
                Sent { seq: 3, id: 3 }
            ]
        );
        let applied = fake.applied.lock().expect("lock").clone();
        let want: Vec<(String, Value)> = queued
            .iter()
            .map(|e| {
                (
                    e.key.clone(),
                    serde_json::to_value(&e.change).expect("json"),
                )
            })
            .collect();
        assert_eq!(applied, want, "in queue order, each with its stored key");
        assert_eq!(outbox.pending(), 0);
        drop(outbox);
        let outbox = Outbox::open(dir.path(), offline()).await.expect("open");
        assert_eq!(outbox.pending(), 0, "the acks are on disk");
    }

    #[tokio::test]
    async fn a_refused_entry_is_moved_aside_and_the_rest_go_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let fake = Arc::new(Fake::default());
        let outbox = Outbox::open(dir.path(), serve(Arc::clone(&fake)).await)
            .await
            .expect("open");
        outbox.queue(&change(1)).await.expect("queue");
        outbox
            .queue(&NewChange::data(json!("bad")))
            .await
            .expect("queue");
        outbox.queue(&change(3)).await.expect("queue");
        let bad = outbox.entries().await[1].clone();
        let report = outbox.flush().await.expect("flush");
        assert_eq!(
            report.sent,
            [Sent { seq: 1, id: 1 }, Sent { seq: 3, id: 2 }]
        );
        assert_eq!(report.rejected.len(), 1);
        assert_eq!(report.rejected[0].entry, bad);
        assert_eq!(report.rejected[0].status, 400);
        assert!(
            report.rejected[0].error.contains("bad data"),
            "{:?}",
            report.rejected
        );
        assert_eq!(report.pending, 0);
        assert_eq!(outbox.rejected().await.expect("read"), report.rejected);
        drop(outbox);
        let outbox = Outbox::open(dir.path(), offline()).await.expect("open");
        assert_eq!(outbox.pending(), 0, "the rejection is on disk");
        assert_eq!(outbox.rejected().await.expect("read").len(), 1);
    }

    #[tokio::test]
    async fn an_ack_lost_after_the_post_is_resent_with_the_same_key_and_applied_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let fake = Arc::new(Fake::default());
        let client = serve(Arc::clone(&fake)).await;
        let outbox = Outbox::open(dir.path(), client.clone())
            .await
            .expect("open");
        outbox.queue(&change(1)).await.expect("queue");
        let entry = outbox.entries().await[0].clone();
        // The post reached the server, then the process died before the
        // ack was written.
        let first = client
            .post_change_idempotent(&entry.key, &entry.change)
            .await
            .expect("post");
        drop(outbox);
        let outbox = Outbox::open(dir.path(), client).await.expect("reopen");
        let report = outbox.flush().await.expect("flush");
        assert_eq!(
            report.sent,
            [Sent {
                seq: 1,
                id: first.id
            }]
        );
        assert_eq!(fake.applied.lock().expect("lock").len(), 1, "applied once");
    }

    #[tokio::test]
    async fn the_flusher_sends_what_is_queued_while_it_runs() {
        let dir = tempfile::tempdir().expect("temp dir");
        let fake = Arc::new(Fake::default());
        let outbox = Outbox::open(dir.path(), serve(Arc::clone(&fake)).await)
            .await
            .expect("open");
        let stop = Arc::new(Notify::new());
        let flusher = {
            let outbox = outbox.clone();
            let stop = Arc::clone(&stop);
            tokio::spawn(async move { outbox.run_flusher(stop.notified()).await })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let applied = || fake.applied.lock().expect("lock").len();
        outbox.queue(&change(1)).await.expect("queue");
        // Wait until the flusher sent it and finished that flush: it is
        // then idle, and only the next queue can wake it.
        while applied() < 1 || outbox.shared.flushing.try_lock().is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the flusher sent nothing"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        outbox.queue(&change(2)).await.expect("queue");
        outbox.queue(&change(3)).await.expect("queue");
        while applied() < 3 || outbox.pending() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the flusher sent {} of 3",
                applied()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.notify_one();
        flusher
            .await
            .expect("the flusher ran")
            .expect("it stops cleanly");
    }

    #[tokio::test]
    async fn the_flusher_tries_again_after_no_server_took_an_entry() {
        let dir = tempfile::tempdir().expect("temp dir");
        let fake = Arc::new(Fake::default());
        fake.status.store(503, Ordering::Relaxed);
        let outbox = Outbox::open(dir.path(), serve(Arc::clone(&fake)).await)
            .await
            .expect("open");
        outbox.queue(&change(1)).await.expect("queue");
        let stop = Arc::new(Notify::new());
        let flusher = {
            let outbox = outbox.clone();
            let stop = Arc::clone(&stop);
            tokio::spawn(async move { outbox.run_flusher(stop.notified()).await })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while fake.refused.load(Ordering::Relaxed) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the flusher sent nothing"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The server comes back; nothing new is queued to wake the flusher.
        fake.status.store(0, Ordering::Relaxed);
        while outbox.pending() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the flusher did not try again"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(fake.applied.lock().expect("lock").len(), 1);
        stop.notify_one();
        flusher
            .await
            .expect("the flusher ran")
            .expect("it stops cleanly");
    }
}
