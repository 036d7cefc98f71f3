//! The consumers: one task each, following the list from 0 with the client
//! library's long polls through a `Client` shared with the other consumers
//! of its edge. The occasionally connected ones drop their follow for
//! offline periods, keeping position and state, and resume from there (a
//! `410` meanwhile makes the follow reload a checkpoint). Each checks its
//! view as it goes ([`ViewCheck`]) and keeps its state as a
//! [`StateDigest`]. The reference consumer, following a core, runs the same
//! loop and also notes where each write appears ([`Sightings`]).
//!
//! The run's end is told to every consumer through [`Phase`]: all online,
//! then frozen (no event applied; each reports its position), then stop at
//! the final index `P`, which is at or past every frozen position, so each
//! consumer ends exactly at `P` and its digest can be compared.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use changeagent_client::{Change, Client, FollowEvent, Query};
use changeagent_testkit::state::{ChangeFields, StateDigest};
use futures::StreamExt;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::fleet::check::ViewCheck;
use crate::fleet::schedule::{Rng, SecsRange};
use crate::fleet::stats::Stats;
use crate::fleet::verify::Sightings;

/// Pause before a follow that ended on an error is started again, from the
/// same position: the error is already a violation; this keeps a
/// persistent one from spinning.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// Where the run is, as the driver tells the consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Occasionally connected consumers come and go.
    Run,
    /// Everyone comes online and stays.
    AllOnline,
    /// Apply nothing more; report the position in [`Seat::frozen`].
    Freeze,
    /// Go on up to this index exactly, then end.
    StopAt(u64),
}

/// A consumer's state as the driver sees it.
#[derive(Debug, Default)]
pub struct Seat {
    /// `_id` of the last change applied.
    pub position: AtomicU64,
    /// Caught up since it last came online.
    pub live: AtomicBool,
    /// Frozen at `position` (in [`Phase::Freeze`]).
    pub frozen: AtomicBool,
}

/// What every consumer shares.
pub struct Consumers {
    pub stats: Arc<Stats>,
    /// Consumers that may catch up at once (after starting or coming back
    /// online, until they reach the core's index of that moment), which
    /// bounds the checkpoint downloads and catch-up pages in flight; a
    /// consumer holds a permit only while it catches up.
    pub catch_up: Arc<Semaphore>,
    /// The driver holds the sender; a closed channel ends every consumer.
    pub phase: watch::Receiver<Phase>,
    pub online_secs: SecsRange,
    pub offline_secs: SecsRange,
}

/// What a consumer is.
pub enum Role {
    /// A viewer following an edge (or a core when there are no edges).
    Viewer { occasional: bool },
    /// The reference: always online, follows a core, notes where each
    /// write appears; counted in no figure of the viewers.
    Reference(Box<Sightings>),
}

/// How a consumer ended.
pub struct Ending {
    pub position: u64,
    /// Its digest, when it ended exactly at the final index.
    pub digest: Option<StateDigest>,
    /// The reference's notes.
    pub sightings: Option<Box<Sightings>>,
}

/// Why an online period ended.
enum End {
    /// Going offline for a while.
    Offline,
    /// At the final index.
    AtFinal,
    /// Cannot reach the final index, or the driver is gone.
    Stopped,
}

/// What a consumer holds: its check, its digest, and (the reference) its
/// notes.
struct View {
    check: ViewCheck,
    digest: StateDigest,
    sightings: Option<Box<Sightings>>,
    /// During a reload: the digest and notes as they were before it, put
    /// back when the reload is given up (the follow failed or the consumer
    /// went offline), since the next follow from the position before it
    /// may be served without a reload (another edge that truncated less).
    before_reload: Option<(StateDigest, Option<Box<Sightings>>)>,
}

impl View {
    /// Applies one event of the follow. `counted`: a viewer's (the
    /// reference is counted in no figure); `live`: it had caught up and
    /// the run is not ending, so a change's latency counts.
    fn apply(&mut self, event: &FollowEvent, stats: &Stats, who: &str, counted: bool, live: bool) {
        let verdict = match event {
            FollowEvent::Change(change) => {
                if counted {
                    Stats::add(&stats.delivered, 1);
                    if live {
                        stats.record_latency(since_commit(change.ts));
                    }
                }
                self.check.change(change.id)
            }
            FollowEvent::Reset {
                checkpoint,
                first_index,
            } => {
                if counted {
                    Stats::add(&stats.reloads, 1);
                }
                let digest = std::mem::take(&mut self.digest);
                if !self.check.reloading() {
                    self.before_reload = Some((digest, self.sightings.clone()));
                }
                self.check.reset(checkpoint.index, *first_index)
            }
            FollowEvent::Record(record) => self.check.record(record.id),
            FollowEvent::ResetEnd { index } => {
                self.before_reload = None;
                self.check.reset_end(*index)
            }
        };
        if let Err(violation) = verdict {
            stats.violations.add(format!("{who}: {violation}"));
        }
        if let Some(change) = event.change() {
            self.digest.apply_fields(&fields(change));
        }
        if let Some(sightings) = &mut self.sightings {
            sightings.see(event, &stats.violations);
        }
    }

    /// Gives up a reload under way: back to the position, digest and
    /// notes from before it.
    fn abandon_reload(&mut self) {
        self.check.abandon_reload();
        if let Some((digest, sightings)) = self.before_reload.take() {
            self.digest = digest;
            self.sightings = sightings;
        }
    }
}

/// A change's fields for its digest: the same digest as of its wire JSON,
/// without building that JSON (a thousand viewers apply every change).
fn fields(change: &Change) -> ChangeFields<'_> {
    ChangeFields {
        id: change.id,
        ts: change.ts,
        change_type: change.change_type,
        tags: &change.tags,
        tenant: change.tenant.as_deref(),
        collection: change.collection.as_deref(),
        key: change.key.as_deref(),
        deleted: change.deleted,
        data: change.data.as_ref(),
    }
}

/// Time from a change's `_ts` (nanoseconds since the epoch, set by the
/// leader when it proposed the change) to now; 0 when the clocks disagree.
fn since_commit(ts: i64) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let ts = u128::try_from(ts).unwrap_or(0);
    Duration::from_nanos(u64::try_from(now.saturating_sub(ts)).unwrap_or(u64::MAX))
}

/// A consumer (called `who` in messages), following through `client`,
/// until the driver's [`Phase::StopAt`] (or the driver is gone).
pub async fn consumer(
    ctx: Arc<Consumers>,
    who: String,
    client: Client,
    role: Role,
    seat: Arc<Seat>,
    mut rng: Rng,
) -> Ending {
    let (counted, occasional, sightings) = match role {
        Role::Viewer { occasional } => (true, occasional, None),
        Role::Reference(sightings) => (false, false, Some(sightings)),
    };
    let mut view = View {
        check: ViewCheck::new(0),
        digest: StateDigest::default(),
        sightings,
        before_reload: None,
    };
    let mut phase = ctx.phase.clone();
    let stats = &*ctx.stats;
    let mut online_until = occasional.then(|| Instant::now() + ctx.online_secs.pick(&mut rng));
    loop {
        // Online: catch up (holding a permit) to the core's index of now,
        // then follow live.
        let mut permit: Option<OwnedSemaphorePermit> = None;
        if counted {
            Stats::add(&stats.waiting, 1);
            permit = Arc::clone(&ctx.catch_up).acquire_owned().await.ok();
            Stats::sub(&stats.waiting, 1);
        }
        let target = Stats::get(&stats.core_last);
        if counted {
            Stats::add(&stats.online, 1);
        }
        let mut live = false;
        let mut stream = Box::pin(client.follow(view.check.position(), Query::new()));
        let end = loop {
            if !live && view.check.position() >= target && !view.check.reloading() {
                live = true;
                permit = None;
                seat.live.store(true, Ordering::Relaxed);
                if counted {
                    Stats::add(&stats.live, 1);
                }
            }
            let now_phase = *phase.borrow_and_update();
            match now_phase {
                Phase::Run => {}
                Phase::AllOnline => online_until = None,
                Phase::Freeze => {
                    online_until = None;
                    seat.frozen.store(true, Ordering::Relaxed);
                    let changed = phase.changed().await;
                    seat.frozen.store(false, Ordering::Relaxed);
                    if changed.is_err() {
                        break End::Stopped;
                    }
                    continue;
                }
                Phase::StopAt(last) => {
                    let at = view.check.position();
                    if at == last && !view.check.reloading() {
                        break End::AtFinal;
                    }
                    if at > last {
                        stats.violations.add(format!(
                            "{who}: went from a position at or before the final index {last} \
                             to {at} without passing it (a reload past it): its state cannot \
                             be compared"
                        ));
                        break End::Stopped;
                    }
                }
            }
            let offline_at = online_until;
            tokio::select! {
                biased;
                changed = phase.changed() => {
                    if changed.is_err() {
                        break End::Stopped;
                    }
                }
                () = sleep_until(offline_at) => break End::Offline,
                event = stream.next() => match event {
                    Some(Ok(event)) => {
                        // Latency counts while the run runs: the end's
                        // freeze holds changes back on purpose.
                        let timed = live && now_phase == Phase::Run;
                        view.apply(&event, stats, &who, counted, timed);
                        seat.position.store(view.check.position(), Ordering::Relaxed);
                    }
                    ended => {
                        let (why, recoverable) = match ended {
                            Some(Err(error)) => (error.to_string(), restart_heals(&error)),
                            _ => ("the stream ended".to_owned(), false),
                        };
                        let what = format!(
                            "{who}: the follow failed at {}: {why}",
                            view.check.position()
                        );
                        if recoverable {
                            stats.follow_failures.add(what);
                        } else {
                            stats.violations.add(what);
                        }
                        view.abandon_reload();
                        tokio::time::sleep(RESTART_PAUSE).await;
                        stream = Box::pin(client.follow(view.check.position(), Query::new()));
                    }
                },
            }
        };
        drop(stream);
        drop(permit);
        seat.live.store(false, Ordering::Relaxed);
        if counted {
            Stats::sub(&stats.online, 1);
            if live {
                Stats::sub(&stats.live, 1);
            }
        }
        match end {
            // Gone in the middle of a reload: the next follow, from the
            // position before it, meets the 410 again and starts over.
            End::Offline => view.abandon_reload(),
            End::AtFinal => {
                return Ending {
                    position: view.check.position(),
                    digest: Some(view.digest),
                    sightings: view.sightings,
                }
            }
            End::Stopped => {
                return Ending {
                    position: view.check.position(),
                    digest: None,
                    sightings: view.sightings,
                }
            }
        }
        // Offline: no request at all, until the period ends or the run does.
        let back = tokio::time::sleep(ctx.offline_secs.pick(&mut rng));
        tokio::select! {
            () = back => {}
            _ = phase.wait_for(|p| *p != Phase::Run) => {}
        }
        online_until = Some(Instant::now() + ctx.online_secs.pick(&mut rng));
    }
}

/// Whether a follow that ended on `error` is expected to go on when
/// started again from the same position: a `404` of the checkpoint a `410`
/// named (pruned meanwhile, or not yet copied to the edge that named it).
/// The follow is then started again and the failure counted, not a
/// violation; whatever it cost the consumer's state, the final comparison
/// sees. Every other permanent failure (a corrupt checkpoint, a `410`
/// without one, an undecodable answer) is a violation.
fn restart_heals(error: &changeagent_client::Error) -> bool {
    error.is_not_found()
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use changeagent_client::{Manifest, Scope};
    use serde_json::json;

    use super::*;

    fn change(id: u64) -> FollowEvent {
        FollowEvent::Change(Change {
            id,
            ts: 0,
            change_type: 0,
            tags: Vec::new(),
            tenant: None,
            collection: None,
            key: None,
            deleted: false,
            data: Some(serde_json::json!({"n": id})),
        })
    }

    fn view() -> View {
        View {
            check: ViewCheck::new(0),
            digest: StateDigest::default(),
            sightings: None,
            before_reload: None,
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
                records: 1,
                created_ts: 0,
                cluster_id: String::new(),
            },
            first_index: index + 1,
        }
    }

    #[test]
    fn only_a_missing_checkpoint_is_healed_by_a_restart() {
        use changeagent_client::{Error, ErrorBody};
        let body = |error: &str| ErrorBody {
            error: error.into(),
            message: None,
            first_index: None,
            checkpoint: None,
        };
        let missing = Error::Api {
            status: 404,
            body: body("checkpoint 6653 is kept, but its object is missing"),
        };
        assert!(restart_heals(&missing));
        let corrupt = Error::ChecksumMismatch {
            index: 5,
            expected: "a".into(),
            actual: "b".into(),
        };
        assert!(!restart_heals(&corrupt));
        let refused = Error::Api {
            status: 400,
            body: body("bad"),
        };
        assert!(!restart_heals(&refused));
    }

    #[test]
    fn the_digest_of_a_change_is_that_of_its_wire_json() {
        let base = Change {
            id: 9,
            ts: 1_700_000_000_000_000_000,
            change_type: 0,
            tags: Vec::new(),
            tenant: None,
            collection: None,
            key: None,
            deleted: false,
            data: None,
        };
        let changes = [
            Change {
                change_type: -4,
                data: Some(json!({"_id": 1, "name": "fleet-t0"})),
                ..base.clone()
            },
            Change {
                id: 10,
                change_type: -5,
                data: Some(json!({"_id": 2, "name": "fleet-t0-c0", "tenant": "fleet-t0"})),
                ..base.clone()
            },
            Change {
                id: 11,
                tenant: Some("fleet-t0".into()),
                collection: Some("fleet-t0-c0".into()),
                key: Some("k1".into()),
                data: Some(json!({"fleet": {"run": "r", "w": 1, "n": 2}, "pad": "xx"})),
                ..base.clone()
            },
            Change {
                id: 12,
                tenant: Some("fleet-t0".into()),
                collection: Some("fleet-t0-c0".into()),
                key: Some("k1".into()),
                deleted: true,
                ..base.clone()
            },
            Change {
                id: 13,
                change_type: 3,
                tags: vec!["t1".into(), "t2".into()],
                tenant: Some("fleet-t0".into()),
                data: Some(json!([1, -1, 1.5, null, "s", {"a": false}])),
                ..base.clone()
            },
            Change {
                id: 14,
                change_type: -2,
                data: Some(json!({"index": 13, "size": 100})),
                ..base.clone()
            },
        ];
        let mut from_json = StateDigest::default();
        let mut from_fields = StateDigest::default();
        for change in &changes {
            from_json.apply(&serde_json::to_value(change).unwrap());
            from_fields.apply_fields(&fields(change));
            assert_eq!(from_json, from_fields, "after change {}", change.id);
        }
        assert_eq!(from_fields.unkeyed_changes(), 2);
    }

    #[test]
    fn a_viewer_that_misses_a_change_records_a_violation_and_differs() {
        let stats = Stats::new().unwrap();
        let (mut dense, mut gappy) = (view(), view());
        for id in 1..=4 {
            dense.apply(&change(id), &stats, "dense", true, false);
        }
        assert_eq!(stats.violations.total(), 0);
        for id in [1, 2, 4] {
            gappy.apply(&change(id), &stats, "gappy", true, false);
        }
        assert_eq!(stats.violations.total(), 1);
        let kept = stats.violations.kept();
        assert!(kept[0].starts_with("gappy: at 2 got change 4"), "{kept:?}");
        assert_eq!((dense.check.position(), gappy.check.position()), (4, 4));
        assert_ne!(dense.digest, gappy.digest, "the final comparison fails too");
        assert_eq!(Stats::get(&stats.delivered), 7);
    }

    #[test]
    fn a_reload_resets_the_digest_and_counts() {
        let stats = Stats::new().unwrap();
        let mut v = view();
        v.apply(&change(1), &stats, "v", true, true);
        v.apply(&reset(5), &stats, "v", true, true);
        assert_eq!(v.digest, StateDigest::default());
        let FollowEvent::Change(record) = change(3) else {
            unreachable!()
        };
        v.apply(&FollowEvent::Record(record), &stats, "v", true, true);
        v.apply(&FollowEvent::ResetEnd { index: 5 }, &stats, "v", true, true);
        v.apply(&change(6), &stats, "v", true, true);
        assert_eq!(stats.violations.total(), 0, "{:?}", stats.violations.kept());
        assert_eq!(v.check.position(), 6);
        assert_eq!(Stats::get(&stats.reloads), 1);
        assert_eq!(v.digest.unkeyed_changes(), 2);
        // Changes applied while live count their latency; records do not.
        assert_eq!(stats.latency().unwrap().count, 2);
    }

    #[test]
    fn a_reload_given_up_puts_the_state_back_and_may_start_over() {
        let stats = Stats::new().unwrap();
        let mut v = view();
        v.apply(&change(1), &stats, "v", true, false);
        let at_one = v.digest.clone();
        // Went offline in the middle of checkpoint 5's records.
        v.apply(&reset(5), &stats, "v", true, false);
        let FollowEvent::Change(record) = change(3) else {
            unreachable!()
        };
        v.apply(
            &FollowEvent::Record(record.clone()),
            &stats,
            "v",
            true,
            false,
        );
        v.abandon_reload();
        assert_eq!((v.check.position(), v.check.reloading()), (1, false));
        assert_eq!(v.digest, at_one);
        // Back online: another 410 and a newer checkpoint, loaded whole.
        v.apply(&reset(7), &stats, "v", true, false);
        v.apply(&FollowEvent::Record(record), &stats, "v", true, false);
        v.apply(
            &FollowEvent::ResetEnd { index: 7 },
            &stats,
            "v",
            true,
            false,
        );
        v.apply(&change(8), &stats, "v", true, false);
        assert_eq!(stats.violations.total(), 0, "{:?}", stats.violations.kept());
        assert_eq!(Stats::get(&stats.reloads), 2);
        // Or served on by an edge that still retains change 2: also fine.
        let mut w = view();
        w.apply(&change(1), &stats, "w", true, false);
        w.apply(&reset(5), &stats, "w", true, false);
        w.abandon_reload();
        w.apply(&change(2), &stats, "w", true, false);
        let mut plain = view();
        plain.apply(&change(1), &stats, "p", true, false);
        plain.apply(&change(2), &stats, "p", true, false);
        assert_eq!(w.digest, plain.digest);
        assert_eq!(stats.violations.total(), 0, "{:?}", stats.violations.kept());
    }

    #[test]
    fn latency_is_the_time_since_the_changes_timestamp() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        let d = since_commit(now - 50_000_000);
        assert!(
            d >= Duration::from_millis(50) && d < Duration::from_secs(5),
            "{d:?}"
        );
        // A change stamped in the future (clocks apart): 0, not a panic.
        assert_eq!(since_commit(now + 60_000_000_000), Duration::ZERO);
        assert!(since_commit(0) > Duration::from_secs(1_000_000));
    }
}
