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

use changeagent_client::{Client, FollowEvent, Query};
use changeagent_testkit::state::StateDigest;
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
}

impl View {
    /// Applies one event of the follow. `counted`: a viewer's (the
    /// reference is counted in no figure); `live`: it had caught up, so a
    /// change's latency counts.
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
                self.digest.reset();
                self.check.reset(checkpoint.index, *first_index)
            }
            FollowEvent::Record(record) => self.check.record(record.id),
            FollowEvent::ResetEnd { index } => self.check.reset_end(*index),
        };
        if let Err(violation) = verdict {
            stats.violations.add(format!("{who}: {violation}"));
        }
        if let Some(change) = event.change() {
            match serde_json::to_value(change) {
                Ok(value) => self.digest.apply(&value),
                Err(error) => stats.violations.add(format!(
                    "{who}: change {} does not encode: {error}",
                    change.id
                )),
            }
        }
        if let Some(sightings) = &mut self.sightings {
            sightings.see(event, &stats.violations);
        }
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
    };
    let mut phase = ctx.phase.clone();
    let stats = &*ctx.stats;
    let mut online_until = occasional.then(|| Instant::now() + ctx.online_secs.pick(&mut rng));
    loop {
        // Online: catch up (holding a permit) to the core's index of now,
        // then follow live.
        let mut permit: Option<OwnedSemaphorePermit> = if counted {
            Arc::clone(&ctx.catch_up).acquire_owned().await.ok()
        } else {
            None
        };
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
                        view.apply(&event, stats, &who, counted, live);
                        seat.position.store(view.check.position(), Ordering::Relaxed);
                    }
                    ended => {
                        let why = match ended {
                            Some(Err(error)) => error.to_string(),
                            _ => "the stream ended".to_owned(),
                        };
                        stats.violations.add(format!(
                            "{who}: the follow failed at {}: {why}",
                            view.check.position()
                        ));
                        view.check.abandon_reload();
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
            End::Offline => {}
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

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use changeagent_client::{Change, Manifest, Scope};

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
        }
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
        let reset = FollowEvent::Reset {
            checkpoint: Manifest {
                index: 5,
                scope: Scope::All,
                object: String::new(),
                size: 0,
                sha256: String::new(),
                records: 1,
                created_ts: 0,
                cluster_id: String::new(),
            },
            first_index: 6,
        };
        v.apply(&reset, &stats, "v", true, true);
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
