//! The writers. Always-online writers post through the cores, each paced to
//! its share of `--rate`: keyed upserts, keyed deletes and unkeyed changes
//! (some a tenant's, some tagged), each with an `Idempotency-Key` of its
//! own that every retry repeats, so a retry across a failover never
//! appends twice. Occasionally connected writers queue into an [`Outbox`]
//! on disk, flush it while online, and only queue while offline. Every
//! write's data carries its [`Marker`]; each writer keeps a compact log of
//! its writes and their outcomes ([`WriterLog`]), which the final check
//! holds against the list.
//!
//! Only the writer that owns a key (key index modulo the always-online
//! writers) deletes it, and only after an upsert of its own was
//! acknowledged: nobody else deletes the key, so it is live, and a `404`
//! for that delete means an acknowledged upsert was lost. Outbox writers
//! never delete, so each of their posts must be applied.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use changeagent_client::{Client, Error, NewChange, Outbox};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fleet::names::{KeySpace, Marker, NO_KEY};
use crate::fleet::schedule::{Pacer, Rng, SecsRange};
use crate::fleet::stats::Stats;

/// First pause before a failed write is sent again; doubled up to
/// [`RETRY_MAX`]. The client has already tried every core by then.
const RETRY_MIN: Duration = Duration::from_millis(100);

/// Longest pause between two tries of a write: a cluster that comes back
/// gets the write within this long.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Longest pause between two flushes of an outbox that stopped on a
/// failure, at the end of the run.
const FLUSH_RETRY_MAX: Duration = Duration::from_secs(2);

/// Longest padding of a write's data, in bytes: changes of a few hundred
/// bytes, varied, like small configuration records.
const MAX_PAD: u64 = 120;

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Unkeyed,
    Upsert,
    Delete,
}

/// How a write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sent or queued, not answered yet.
    InFlight,
    /// Acknowledged with an `_id`.
    Acked,
    /// Refused for good (a `4xx`): not applied.
    Refused,
    /// Given up at the end of the run without an answer: applied once or
    /// not at all.
    Unknown,
}

/// One write, 16 bytes: a run of a day at 50 writes a second logs 70 MB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Write {
    /// The acknowledged `_id` (0 until acknowledged).
    pub id: u64,
    /// Its key index, [`NO_KEY`] for an unkeyed write.
    pub key: u32,
    pub kind: Kind,
    pub outcome: Outcome,
}

/// A writer's writes, indexed by the `n` of their markers.
#[derive(Debug, Clone)]
pub struct WriterLog {
    pub writer: u32,
    /// An outbox writer (else always online).
    pub outbox: bool,
    pub writes: Vec<Write>,
}

/// What all writers share.
pub struct Writers {
    /// Posts through the cores, each request sent once (so that every
    /// failure is counted here); also the outboxes' client.
    pub client: Client,
    /// How many cores the client has.
    pub cores: usize,
    pub stats: Arc<Stats>,
    pub keys: KeySpace,
    pub run: String,
    /// Writes a second of each writer.
    pub per_writer_rate: f64,
    /// Always-online writers (the owners of keys, for deletes).
    pub online_writers: u32,
    /// Cancelled when the run ends: writers send no new write.
    pub stop: CancellationToken,
    /// Cancelled when the final check stops waiting: a write still
    /// unanswered is given up (outcome unknown), an outbox still holding
    /// posts stops flushing.
    pub give_up: CancellationToken,
}

impl Writers {
    /// The change of write `n` of writer `w`, what it is, and its key.
    fn change(&self, w: u32, n: u64, rng: &mut Rng, kind: Kind, key: u32) -> NewChange {
        let marker = Marker { writer: w, n };
        let pad = "x".repeat(rng.below(MAX_PAD) as usize);
        let mut change = NewChange::data(json!({
            "fleet": marker.json(&self.run),
            "v": rng.below(1_000_000),
            "pad": pad,
        }));
        match kind {
            Kind::Upsert | Kind::Delete => {
                let (tenant, collection, name) = self.keys.names(key);
                change.tenant = Some(tenant);
                change.collection = Some(collection);
                change.key = Some(name);
                if kind == Kind::Delete {
                    change.deleted = true;
                    change.data = None;
                }
            }
            Kind::Unkeyed => match rng.below(3) {
                0 => {
                    let t = rng.below(u64::from(self.keys.tenants)) as u32;
                    change.tenant = Some(KeySpace::tenant(t));
                    change.tags = vec![format!("t{}", rng.below(3))];
                }
                1 => change.tags = vec![format!("t{}", rng.below(3))],
                _ => {}
            },
        }
        change
    }

    /// A random key of the whole key space.
    fn any_key(&self, rng: &mut Rng) -> u32 {
        rng.below(u64::from(self.keys.len())) as u32
    }
}

/// Whether a failed request may succeed later: the server was unreachable
/// or unavailable, timed out, or asked to slow down.
pub fn retry_later(error: &Error) -> bool {
    error.is_transient() || matches!(error.status(), Some(429))
}

/// An always-online writer, until `stop`; returns its log.
pub async fn online_writer(ctx: Arc<Writers>, w: u32, mut rng: Rng) -> WriterLog {
    let mut pacer = Pacer::new(ctx.per_writer_rate, Instant::now().into_std());
    let mut writes: Vec<Write> = Vec::new();
    // Keys this writer owns whose last acknowledged write of its own was an
    // upsert: live, as nobody else deletes them.
    let mut owned_live: Vec<u32> = Vec::new();
    loop {
        let due = pacer.next_due(Instant::now().into_std());
        tokio::select! {
            () = ctx.stop.cancelled() => break,
            () = tokio::time::sleep_until(due.into()) => {}
        }
        let n = writes.len() as u64;
        let roll = rng.below(100);
        let (kind, key) = if roll < 12 && !owned_live.is_empty() {
            let at = rng.below(owned_live.len() as u64) as usize;
            (Kind::Delete, owned_live.swap_remove(at))
        } else if roll < 55 {
            (Kind::Upsert, ctx.any_key(&mut rng))
        } else {
            (Kind::Unkeyed, NO_KEY)
        };
        let change = ctx.change(w, n, &mut rng, kind, key);
        writes.push(Write {
            id: 0,
            key,
            kind,
            outcome: Outcome::InFlight,
        });
        let idempotency_key = format!("fleet-{}-{w}-{n}", ctx.run);
        let (outcome, id) = match post(&ctx, &idempotency_key, &change).await {
            Ok(id) => {
                Stats::add(&ctx.stats.acked, 1);
                let owner = ctx.online_writers > 0 && key % ctx.online_writers == w;
                if kind == Kind::Upsert && owner && !owned_live.contains(&key) {
                    owned_live.push(key);
                }
                (Outcome::Acked, id)
            }
            Err(Some(error)) => {
                let why = if kind == Kind::Delete && error.is_not_found() {
                    " (the key had an acknowledged upsert of this writer and nobody else \
                     deletes it: that upsert was lost)"
                } else {
                    ""
                };
                let (t, c, k) = if key == NO_KEY {
                    Default::default()
                } else {
                    ctx.keys.names(key)
                };
                ctx.stats.violations.add(format!(
                    "writer {w}: write {n} ({kind:?} {t}/{c}/{k}) was refused: {error}{why}"
                ));
                (Outcome::Refused, 0)
            }
            Err(None) => (Outcome::Unknown, 0),
        };
        if let Some(write) = writes.last_mut() {
            write.outcome = outcome;
            write.id = id;
        }
    }
    WriterLog {
        writer: w,
        outbox: false,
        writes,
    }
}

/// Posts a change with its key until it is acknowledged (its `_id`),
/// refused (the error), or given up (`None`), counting each failure that
/// may pass. The client sends each request once and moves on to the next
/// core after a failure; this tries each core in turn at once, then pauses
/// (at least the server's `Retry-After`) before the next round.
async fn post(ctx: &Writers, key: &str, change: &NewChange) -> Result<u64, Option<Error>> {
    let mut delay = RETRY_MIN;
    let mut failed = 0usize;
    loop {
        match ctx.client.post_change_idempotent(key, change).await {
            Ok(posted) => return Ok(posted.id),
            Err(error) if retry_later(&error) => {
                Stats::add(&ctx.stats.transient, 1);
                failed += 1;
                if !failed.is_multiple_of(ctx.cores.max(1)) {
                    continue;
                }
                let pause = delay.max(error.retry_after().unwrap_or_default());
                tokio::select! {
                    () = ctx.give_up.cancelled() => return Err(None),
                    () = tokio::time::sleep(pause) => {}
                }
                delay = (delay * 2).min(RETRY_MAX);
            }
            Err(error) => return Err(Some(error)),
        }
    }
}

/// An occasionally connected writer: alternates online periods (queue and
/// flush at once) and offline ones (queue only, no request), until `stop`;
/// then comes online and flushes until its outbox is empty or `give_up`.
/// Returns its log; posts never flushed are violations.
pub async fn outbox_writer(
    ctx: Arc<Writers>,
    w: u32,
    outbox: Outbox,
    mut rng: Rng,
    online_secs: SecsRange,
    offline_secs: SecsRange,
) -> WriterLog {
    let mut pacer = Pacer::new(ctx.per_writer_rate, Instant::now().into_std());
    let mut log = OutboxLog {
        writer: w,
        writes: Vec::new(),
        unanswered: HashMap::new(),
    };
    let mut online = true;
    let mut phase_end = Instant::now() + online_secs.pick(&mut rng);
    let mut due = pacer.next_due(Instant::now().into_std());
    loop {
        tokio::select! {
            () = ctx.stop.cancelled() => break,
            () = tokio::time::sleep_until(phase_end.min(due.into())) => {}
        }
        let now = Instant::now();
        if now >= phase_end {
            online = !online;
            let period = if online { online_secs } else { offline_secs };
            phase_end = now + period.pick(&mut rng);
            if online {
                log.flush(&ctx, &outbox).await;
            }
            continue;
        }
        let n = log.writes.len() as u64;
        let (kind, key) = if rng.below(2) == 0 {
            (Kind::Upsert, ctx.any_key(&mut rng))
        } else {
            (Kind::Unkeyed, NO_KEY)
        };
        let change = ctx.change(w, n, &mut rng, kind, key);
        let mut write = Write {
            id: 0,
            key,
            kind,
            outcome: Outcome::InFlight,
        };
        match outbox.queue(&change).await {
            Ok(seq) => {
                Stats::add(&ctx.stats.outbox_posts, 1);
                log.unanswered.insert(seq, log.writes.len());
            }
            Err(error) => {
                ctx.stats.violations.add(format!(
                    "outbox writer {w}: queueing post {n} failed: {error}"
                ));
                write.outcome = Outcome::Refused;
            }
        }
        log.writes.push(write);
        if online {
            log.flush(&ctx, &outbox).await;
        }
        due = pacer.next_due(Instant::now().into_std());
    }
    // The end: online for good, flushed until empty.
    let mut delay = RETRY_MIN;
    while !log.unanswered.is_empty() {
        if log.flush(&ctx, &outbox).await {
            // Empty: whatever is still unanswered never will be.
            break;
        }
        tokio::select! {
            () = ctx.give_up.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(FLUSH_RETRY_MAX);
    }
    if !log.unanswered.is_empty() {
        ctx.stats.violations.add(format!(
            "outbox writer {w}: {} posts were never flushed ({} entries pending in {})",
            log.unanswered.len(),
            outbox.pending(),
            outbox.dir().display()
        ));
        for &at in log.unanswered.values() {
            log.writes[at].outcome = Outcome::Unknown;
        }
    }
    WriterLog {
        writer: w,
        outbox: true,
        writes: log.writes,
    }
}

/// An outbox writer's writes and which of them wait for an answer.
struct OutboxLog {
    writer: u32,
    writes: Vec<Write>,
    /// Outbox sequence number → index in `writes`, for posts queued and not
    /// yet acknowledged or refused. (Entries a previous run left in the
    /// outbox are flushed too but are not this run's.)
    unanswered: HashMap<u64, usize>,
}

impl OutboxLog {
    /// One flush: records what was acknowledged and refused; true when it
    /// emptied the outbox.
    async fn flush(&mut self, ctx: &Writers, outbox: &Outbox) -> bool {
        let report = match outbox.flush().await {
            Ok(report) => report,
            Err(error) => {
                ctx.stats.violations.add(format!(
                    "outbox writer {}: the outbox failed: {error}",
                    self.writer
                ));
                return false;
            }
        };
        for sent in &report.sent {
            if let Some(at) = self.unanswered.remove(&sent.seq) {
                self.writes[at].id = sent.id;
                self.writes[at].outcome = Outcome::Acked;
                Stats::add(&ctx.stats.outbox_acked, 1);
            }
        }
        for rejected in &report.rejected {
            if let Some(at) = self.unanswered.remove(&rejected.entry.seq) {
                self.writes[at].outcome = Outcome::Refused;
                ctx.stats.violations.add(format!(
                    "outbox writer {}: post {at} was refused ({}): {}",
                    self.writer, rejected.status, rejected.error
                ));
            }
        }
        match report.stopped {
            Some(_) => {
                Stats::add(&ctx.stats.transient, 1);
                false
            }
            None => true,
        }
    }
}
