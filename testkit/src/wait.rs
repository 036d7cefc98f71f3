//! Waiting on observable state: poll a probe against a deadline and report
//! the last state seen on timeout. The harness never sleeps to synchronise;
//! [`POLL_INTERVAL`] only paces the polls.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use crate::error::{Error, OrPanic, Result};

/// Interval between two looks at observable state while waiting. Short, so
/// waits end promptly (it is also the resolution of the election times the
/// benchmark reports); a polling period, never a synchronisation delay.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Polls `probe` every [`POLL_INTERVAL`] until it returns `Ok(value)` or
/// `timeout` passes. `Err(state)` means "not yet" and carries the state seen,
/// so a timeout ([`Error::Timeout`]) reports what the system looked like
/// last:
///
/// ```ignore
/// let n = wait_until(Duration::from_secs(10), "lastIndex reaches 5", || async {
///     let n = api.last_index().await;
///     if n >= 5 { Ok(n) } else { Err(format!("lastIndex {n}")) }
/// }).await.unwrap();
/// ```
pub async fn wait_until<T, S, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> Result<T>
where
    S: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, S>>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut polls = 0u64;
    loop {
        polls += 1;
        match probe().await {
            Ok(v) => return Ok(v),
            Err(state) => {
                if Instant::now() >= deadline {
                    return Err(Error::Timeout {
                        what: what.to_string(),
                        waited: start.elapsed(),
                        polls,
                        last: format!("{state:?}"),
                    });
                }
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// [`wait_until`] for probes answering `Option<T>`: `None` means "not yet".
/// Panics on timeout (there is no richer state to report than `None`; use
/// [`wait_until`] when there is).
pub async fn wait_until_some<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_until(timeout, what, || {
        let fut = probe();
        async move { fut.await.ok_or("None") }
    })
    .await
    .or_panic()
}
