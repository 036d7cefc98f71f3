//! The end of a run (steps 1–7 of the `fleet` module docs): the writers
//! stop and the outboxes flush, every consumer comes online, freezes and
//! goes on to one final index, all within one deadline; then every
//! viewer's digest is compared with the reference's and every write is
//! checked against the reference's notes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::fleet::check::Violations;
use crate::fleet::consumer::{Ending, Phase, Seat};
use crate::fleet::launch::{self, pending, Fleet};
use crate::fleet::stats::Stats;
use crate::fleet::verify::Verified;
use crate::fleet::writer::{Outcome, WriterLog};
use crate::report::{Progress, PROGRESS_INTERVAL};

/// How often the end's waits look at the consumers: a polling period of
/// the driver, not a synchronisation delay.
const SETTLE_POLL: Duration = Duration::from_millis(100);

/// Where the run ended (steps 1–6).
pub struct Ended {
    /// Every writer's log.
    pub logs: Vec<WriterLog>,
    /// The index every consumer was told to end at; 0 when the end did not
    /// get that far.
    pub final_index: u64,
    /// Each viewer's ending, by index (`None`: it had not ended).
    pub viewers: Vec<Option<Ending>>,
    /// Where each viewer was last, by index.
    pub positions: Vec<u64>,
    pub reference: Option<Ending>,
    pub reference_position: u64,
}

/// What step 7 found.
pub struct Judged {
    /// Viewers whose digest was compared with the reference's, and found
    /// equal.
    pub compared: u64,
    pub equal: u64,
    pub verified: Verified,
    /// The checkpoint the reference last reloaded.
    pub reference_checkpoint: u64,
}

/// Steps 1–6: stops the writers, flushes the outboxes, brings every
/// consumer online and then to one final index, all within `settle_secs`
/// (or until `hurry`); whatever does not happen in time is a violation.
pub async fn settle(
    fleet: Fleet,
    stats: &Stats,
    settle_secs: u64,
    hurry: &CancellationToken,
) -> Result<Ended> {
    let Fleet {
        phase,
        seats,
        viewers,
        reference_seat,
        reference,
        writers,
        writer_tasks,
        writer_runtime,
        outboxes,
        health,
        index_watch,
        occasional: _,
    } = fleet;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(settle_secs);
    let give_up = writers.give_up.clone();
    let settle_timer = {
        let (hurry, give_up) = (hurry.clone(), give_up.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                () = hurry.cancelled() => {}
            }
            give_up.cancel();
        })
    };
    let settle = Settle {
        stats,
        give_up: &give_up,
        settle_secs,
        started: Instant::now(),
    };

    // 1 and 2: writers stop; outboxes flush.
    writers.stop.cancel();
    let logs = settle
        .writers(writer_tasks, &outboxes)
        .await
        .context("a writer task failed")?;
    drop(writer_runtime);
    let all_seats: Vec<&Arc<Seat>> = seats.iter().chain([&reference_seat]).collect();
    let total = all_seats.len();
    let count = |flag: fn(&Seat) -> bool| all_seats.iter().filter(|s| flag(s)).count();
    // 3: everyone online and caught up.
    let _ = phase.send(Phase::AllOnline);
    let mut on_track = settle
        .until("every consumer online and caught up", || {
            let live = count(|s| s.live.load(Ordering::Relaxed));
            (live == total, format!("{live} of {total} caught up"))
        })
        .await;
    // 4: frozen.
    if on_track {
        let _ = phase.send(Phase::Freeze);
        on_track = settle
            .until("every consumer frozen", || {
                let frozen = count(|s| s.frozen.load(Ordering::Relaxed));
                (frozen == total, format!("{frozen} of {total} frozen"))
            })
            .await;
    }
    // 5 and 6: the final index, and everyone at it.
    let mut final_index = 0;
    if on_track {
        launch::poll_index(&health, stats).await;
        let acked = logs
            .iter()
            .flat_map(|l| l.writes.iter())
            .filter(|w| w.outcome == Outcome::Acked)
            .map(|w| w.id)
            .max()
            .unwrap_or(0);
        let frozen = all_seats
            .iter()
            .map(|s| s.position.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        final_index = Stats::get(&stats.core_last).max(acked).max(frozen);
        let _ = phase.send(Phase::StopAt(final_index));
        settle
            .until(&format!("every consumer at {final_index}"), || {
                let done = viewers.iter().filter(|h| h.is_finished()).count()
                    + usize::from(reference.is_finished());
                (done == total, format!("{done} of {total} there"))
            })
            .await;
    }
    index_watch.abort();
    settle_timer.abort();

    let violations = &stats.violations;
    let mut endings = Vec::with_capacity(viewers.len());
    for handle in viewers {
        endings.push(finish(handle, violations).await);
    }
    Ok(Ended {
        logs,
        final_index,
        viewers: endings,
        positions: seats
            .iter()
            .map(|s| s.position.load(Ordering::Relaxed))
            .collect(),
        reference: finish(reference, violations).await,
        reference_position: reference_seat.position.load(Ordering::Relaxed),
    })
}

/// Step 7: every viewer's digest against the reference's, every write
/// against the reference's notes. Problems go to `violations`.
pub fn judge(ended: &Ended, violations: &Violations) -> Judged {
    let mut judged = Judged {
        compared: 0,
        equal: 0,
        verified: Verified::default(),
        reference_checkpoint: 0,
    };
    let last = ended.final_index;
    let Some(Ending {
        digest: Some(reference),
        sightings: Some(sightings),
        ..
    }) = &ended.reference
    else {
        let at = ended
            .reference
            .as_ref()
            .map_or(ended.reference_position, |e| e.position);
        violations.add(format!(
            "the reference consumer did not reach the final index {last} (it ended at {at}): \
             no consumer could be compared and no write checked"
        ));
        return judged;
    };
    for (i, ending) in ended.viewers.iter().enumerate() {
        match ending {
            Some(Ending {
                digest: Some(digest),
                ..
            }) => {
                judged.compared += 1;
                if digest == reference {
                    judged.equal += 1;
                } else {
                    violations.add(format!(
                        "consumer {i}: its state at {last} differs from the reference's: {} \
                         against {}",
                        digest.summary(),
                        reference.summary()
                    ));
                }
            }
            Some(ending) => violations.add(format!(
                "consumer {i}: ended at {} without reaching the final index {last}",
                ending.position
            )),
            None => violations.add(format!(
                "consumer {i}: did not end within --settle-secs (at {})",
                ended.positions[i]
            )),
        }
    }
    judged.verified = sightings.verify(&ended.logs, violations);
    judged.reference_checkpoint = sightings.base();
    judged
}

/// A consumer's ending, or `None` when it had not ended (it is aborted) or
/// failed (a violation).
async fn finish(handle: JoinHandle<Ending>, violations: &Violations) -> Option<Ending> {
    if !handle.is_finished() {
        handle.abort();
        return None;
    }
    match handle.await {
        Ok(ending) => Some(ending),
        Err(error) => {
            violations.add(format!("a consumer task failed: {error}"));
            None
        }
    }
}

/// The waits of the end, which share one deadline (`give_up`, cancelled
/// then, or at a second signal).
struct Settle<'a> {
    stats: &'a Stats,
    give_up: &'a CancellationToken,
    settle_secs: u64,
    started: Instant,
}

impl Settle<'_> {
    /// Waits for the writers; the outboxes report what they hold meanwhile.
    async fn writers(
        &self,
        tasks: Vec<JoinHandle<WriterLog>>,
        outboxes: &[changeagent_client::Outbox],
    ) -> Result<Vec<WriterLog>> {
        let mut logs = Vec::with_capacity(tasks.len());
        let _progress = {
            let outboxes = outboxes.to_vec();
            Progress::start(move |elapsed| {
                format!(
                    "{:>4}s settling: writers finishing, {} outbox entries pending",
                    elapsed.as_secs(),
                    pending(&outboxes)
                )
            })
        };
        for task in tasks {
            logs.push(task.await?);
        }
        Ok(logs)
    }

    /// Polls `probe` (done?, state) until done or the deadline; a deadline
    /// passed is a violation naming `what` and the last state.
    async fn until<F>(&self, what: &str, mut probe: F) -> bool
    where
        F: FnMut() -> (bool, String),
    {
        let mut next_line = tokio::time::Instant::now() + PROGRESS_INTERVAL;
        loop {
            let (done, state) = probe();
            if done {
                return true;
            }
            if self.give_up.is_cancelled() {
                self.stats.violations.add(format!(
                    "settling: not {what} within --settle-secs {} ({state})",
                    self.settle_secs
                ));
                return false;
            }
            if tokio::time::Instant::now() >= next_line {
                eprintln!(
                    "  … {:>4}s settling: waiting for {what}: {state}",
                    self.started.elapsed().as_secs()
                );
                next_line += PROGRESS_INTERVAL;
            }
            tokio::select! {
                () = self.give_up.cancelled() => {}
                () = tokio::time::sleep(SETTLE_POLL) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use changeagent_testkit::state::StateDigest;
    use serde_json::json;

    use super::*;
    use crate::fleet::names::KeySpace;
    use crate::fleet::verify::Sightings;

    fn ending(digest: Option<StateDigest>, position: u64) -> Ending {
        Ending {
            position,
            digest,
            sightings: None,
        }
    }

    #[test]
    fn every_viewer_is_judged_against_the_reference() {
        let mut state = StateDigest::default();
        state.apply(&json!({"_id": 1, "_ts": 1, "data": 1}));
        let mut other = state.clone();
        other.apply(&json!({"_id": 2, "_ts": 1, "data": 2}));
        let keys = KeySpace {
            tenants: 1,
            keys: 1,
        };
        let reference = Ending {
            position: 2,
            digest: Some(state.clone()),
            sightings: Some(Box::new(Sightings::new("r", keys, 0))),
        };
        let ended = Ended {
            logs: Vec::new(),
            final_index: 2,
            viewers: vec![
                Some(ending(Some(state.clone()), 2)),
                Some(ending(Some(other), 2)),
                Some(ending(None, 1)),
                None,
            ],
            positions: vec![2, 2, 1, 0],
            reference: Some(reference),
            reference_position: 2,
        };
        let violations = Violations::default();
        let judged = judge(&ended, &violations);
        assert_eq!((judged.compared, judged.equal), (2, 1));
        let kept = violations.kept();
        assert_eq!(kept.len(), 3, "{kept:?}");
        assert!(
            kept[0].starts_with("consumer 1: its state at 2 differs"),
            "{kept:?}"
        );
        assert!(kept[1].contains("ended at 1 without reaching"), "{kept:?}");
        assert!(
            kept[2].contains("did not end within --settle-secs"),
            "{kept:?}"
        );

        // Without the reference nothing can be compared: one violation says so.
        let lost = Ended {
            reference: None,
            ..ended
        };
        let violations = Violations::default();
        let judged = judge(&lost, &violations);
        assert_eq!(judged.compared, 0);
        assert_eq!(violations.total(), 1);
        assert!(violations.kept()[0].contains("the reference consumer did not reach"));
    }
}
