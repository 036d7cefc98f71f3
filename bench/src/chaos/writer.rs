//! The chaos run's own writer: posts numbered changes through the cores at a steady rate,
//! each with its own `Idempotency-Key` and retried on the next core until acknowledged, and
//! remembers which `_id` each acknowledged one got. Its writes keep the log moving when no
//! fleet runs, and afterwards each must be found exactly once (in the newest checkpoint or
//! the retained log).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use changeagent_testkit::Api;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::MissedTickBehavior;

/// The tag on every change the writer posts, so a reader can pick them out.
pub const TAG: &str = "changeagent-chaos";

/// Pause before trying the next core after a failed attempt: short next to an election, long
/// enough that a cluster without a leader is not hammered.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// How long the writer may take to finish the writes in flight once told to stop.
const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// Writes in flight at once at most: enough to keep the rate when one takes a few hundred
/// milliseconds (fsync and replication on a busy host), few enough not to pile up while the
/// cluster has no leader.
const IN_FLIGHT: usize = 8;

/// State shared by the writer task and the run.
#[derive(Default)]
struct Shared {
    /// Set by [`Writer::stop`]; no new write starts, those in flight end after their
    /// current attempt.
    stop: AtomicBool,
    /// `(n, _id)` of every acknowledged write, in the order of the acknowledgements.
    acked: Mutex<Vec<(u64, u64)>>,
    /// Numbers of writes sent at least once.
    sent: AtomicU64,
    /// Attempts that failed and were retried.
    failed_attempts: AtomicU64,
    /// The latest failed attempt, for reports.
    last_failure: Mutex<Option<String>>,
}

/// A running writer; dropping it stops the task at once.
pub struct Writer {
    shared: Arc<Shared>,
    /// The write loop; ends when `shared.stop` is set and the writes in flight have ended,
    /// or is aborted (with them) when this struct is dropped.
    task: Option<JoinHandle<()>>,
    run_id: String,
}

/// What the writer did, for the checks and the summary.
#[derive(Debug, Clone)]
pub struct WriterLog {
    /// Marks this run's changes: `data.chaos`.
    pub run_id: String,
    /// `(n, _id)` of every acknowledged write.
    pub acked: Vec<(u64, u64)>,
    /// Writes numbered 1..=sent were sent; those not acknowledged may or may not be in.
    pub sent: u64,
    pub failed_attempts: u64,
    pub last_failure: Option<String>,
}

impl Writer {
    /// Starts posting `rate` changes per second through `cores` (each a client with a
    /// probe's short timeout).
    pub fn start(cores: Vec<Api>, rate: u32) -> Writer {
        let run_id = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
            .to_string();
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(write_loop(
            cores,
            Arc::clone(&shared),
            run_id.clone(),
            rate.max(1),
        ));
        Writer {
            shared,
            task: Some(task),
            run_id,
        }
    }

    /// Acknowledged writes so far.
    pub fn acked(&self) -> u64 {
        lock(&self.shared.acked).len() as u64
    }

    /// The latest failed attempt, if any.
    pub fn last_failure(&self) -> Option<String> {
        lock(&self.shared.last_failure).clone()
    }

    /// Stops after the writes in flight (abandoning them after [`STOP_DEADLINE`]).
    pub async fn stop(mut self) -> WriterLog {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(STOP_DEADLINE, &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        WriterLog {
            run_id: self.run_id.clone(),
            acked: lock(&self.shared.acked).clone(),
            sent: self.shared.sent.load(Ordering::Relaxed),
            failed_attempts: self.shared.failed_attempts.load(Ordering::Relaxed),
            last_failure: self.last_failure(),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The data is plain values; a panic elsewhere cannot leave it half-written.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The body of write `n`.
pub fn body(run_id: &str, n: u64) -> String {
    format!(r#"{{"data":{{"chaos":"{run_id}","n":{n}}},"tags":["{TAG}"]}}"#)
}

/// `(run id, n)` of a change this writer posted, from its `data`.
pub fn marker(data: &Value) -> Option<(&str, u64)> {
    Some((data.get("chaos")?.as_str()?, data.get("n")?.as_u64()?))
}

/// Starts write 1, 2, … at `rate` per second, each in its own task (at most [`IN_FLIGHT`]
/// at once), until told to stop; then waits for those in flight.
async fn write_loop(cores: Vec<Api>, shared: Arc<Shared>, run_id: String, rate: u32) {
    let cores = Arc::new(cores);
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    // The writes in flight; dropped (and so aborted) with this task when the run gives up
    // waiting for them.
    let mut writes = JoinSet::new();
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate);
    // After an outage, carry on at the rate rather than bursting to make up.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        ticks.tick().await;
        // The semaphore is never closed.
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
        n += 1;
        shared.sent.store(n, Ordering::Relaxed);
        writes.spawn(write_one(
            Arc::clone(&cores),
            Arc::clone(&shared),
            body(&run_id, n),
            format!("chaos-{run_id}-{n}"),
            n,
            permit,
        ));
        while writes.try_join_next().is_some() {}
    }
    while writes.join_next().await.is_some() {}
}

/// Posts write `n` until a core acknowledges it, trying the next core after a failure; an
/// unacknowledged write is given up only when the run stops.
async fn write_one(
    cores: Arc<Vec<Api>>,
    shared: Arc<Shared>,
    body: String,
    key: String,
    n: u64,
    _permit: OwnedSemaphorePermit,
) {
    let mut node = (n as usize) % cores.len();
    loop {
        match attempt(&cores[node], &key, &body).await {
            Ok(id) => {
                lock(&shared.acked).push((n, id));
                return;
            }
            Err(why) => {
                shared.failed_attempts.fetch_add(1, Ordering::Relaxed);
                *lock(&shared.last_failure) = Some(format!("{}: {why}", cores[node].base()));
                if shared.stop.load(Ordering::Relaxed) {
                    return;
                }
                node = (node + 1) % cores.len();
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

/// One post; the new `_id`, or why it is to be retried.
async fn attempt(core: &Api, key: &str, body: &str) -> Result<u64, String> {
    let reply = core
        .try_request(
            "POST",
            "/changes",
            Some("application/json"),
            Some(body.as_bytes().to_vec()),
            &[("Idempotency-Key", key)],
        )
        .await
        .map_err(|e| e.to_string())?;
    if reply.status != 200 {
        let text: String = reply.text().chars().take(200).collect();
        return Err(format!("status {} {text}", reply.status));
    }
    let v: Value = serde_json::from_slice(&reply.body).map_err(|e| format!("not JSON: {e}"))?;
    v["_id"]
        .as_u64()
        .ok_or_else(|| format!("no numeric _id in {v}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_a_marker_that_reads_back() {
        let b = body("17", 4);
        let v: Value = serde_json::from_str(&b).unwrap();
        assert_eq!(marker(&v["data"]), Some(("17", 4)));
        assert_eq!(v["tags"][0], TAG);
        assert_eq!(marker(&serde_json::json!({"chaos": "17"})), None);
        assert_eq!(marker(&serde_json::json!({"n": 4})), None);
    }
}
