//! Loading a node with many changes: atomic batch posts (one JSON array of
//! changes each) from a few concurrent posters, each batch with its own
//! `Idempotency-Key` so that a retry never appends twice. `read` tops a node
//! up with it; `checkpoint` fills a fresh one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use tokio::task::JoinSet;

use crate::report::{self, Progress};
use crate::server::{self, Server};

/// Tries per load batch before giving up (503s while a leader is elected,
/// dropped connections); retries carry the same `Idempotency-Key`.
const LOAD_ATTEMPTS: u32 = 5;

/// Back-off after a failed load batch, multiplied by the attempt number.
const LOAD_BACKOFF: Duration = Duration::from_millis(200);

/// How to load: how many changes, how they are posted, and what each is.
pub struct Load<F> {
    /// Changes to post.
    pub changes: u64,
    /// Changes per batch post (one JSON array).
    pub batch: usize,
    /// Concurrent posters.
    pub posters: usize,
    /// Appends the JSON of change number `n` (0-based within this load) to
    /// the body being built.
    pub change: F,
}

/// Posts `load.changes` changes in batches from concurrent posters, printing
/// a progress line while it runs and the load rate when done; returns how
/// long it took.
pub async fn run<F>(server: &Server, load: Load<F>) -> Result<Duration>
where
    F: Fn(u64, &mut String) + Send + Sync + 'static,
{
    let total = load.changes;
    let posted = Arc::new(AtomicU64::new(0));
    let _progress = {
        let posted = Arc::clone(&posted);
        Progress::start(move |elapsed| {
            let done = posted.load(Ordering::Relaxed);
            format!(
                "loading: {} / {} changes, {} changes/s",
                report::count(done),
                report::count(total),
                report::rate(done, elapsed)
            )
        })
    };
    // Keys of this run's batches, so that a retry cannot append twice.
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let batch = load.batch as u64;
    let batches = total.div_ceil(batch);
    let next_batch = Arc::new(AtomicU64::new(0));
    let change = Arc::new(load.change);
    let started = Instant::now();
    let mut posters = JoinSet::<Result<()>>::new();
    for _ in 0..load.posters {
        let (server, posted, next_batch, change) = (
            server.clone(),
            Arc::clone(&posted),
            Arc::clone(&next_batch),
            Arc::clone(&change),
        );
        posters.spawn(async move {
            loop {
                let b = next_batch.fetch_add(1, Ordering::Relaxed);
                if b >= batches {
                    return Ok(());
                }
                let first_n = b * batch;
                let size = batch.min(total - first_n);
                let mut body = String::with_capacity(size as usize * 200 + 2);
                body.push('[');
                for n in first_n..first_n + size {
                    if n > first_n {
                        body.push(',');
                    }
                    change(n, &mut body);
                }
                body.push(']');
                let key = format!("changeagent-bench-load-{run_id}-{b}");
                post_batch(&server, &key, body, size).await?;
                posted.fetch_add(size, Ordering::Relaxed);
            }
        });
    }
    // Dropping the set on the first error aborts the other posters.
    while let Some(joined) = posters.join_next().await {
        joined.context("a load poster panicked")??;
    }
    let elapsed = started.elapsed();
    println!(
        "loaded {} changes in {:.1} s = {} changes/s",
        report::count(total),
        elapsed.as_secs_f64(),
        report::rate(total, elapsed)
    );
    Ok(elapsed)
}

/// Posts one batch `body` of `size` changes, retrying a 503 or a failed
/// connection with the same `key`.
async fn post_batch(server: &Server, key: &str, body: String, size: u64) -> Result<()> {
    let url = server.url("/changes");
    let mut attempt = 1;
    loop {
        let sent = server
            .client()
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", key)
            .body(body.clone())
            .timeout(server::REQUEST_TIMEOUT)
            .send()
            .await;
        let err = match sent {
            Ok(resp) => {
                let status = resp.status();
                match server::ok_body(resp).await {
                    Ok(_) => return Ok(()),
                    // Only "no leader / busy" is worth retrying; anything else
                    // (413 too large, 400) fails the same way every time.
                    Err(err) if status == reqwest::StatusCode::SERVICE_UNAVAILABLE => err,
                    Err(err) if status == reqwest::StatusCode::PAYLOAD_TOO_LARGE => {
                        return Err(err).context(format!(
                            "POST {url}: a batch of {size} changes is too large; lower --load-batch"
                        ));
                    }
                    Err(err) => return Err(err).context(format!("POST {url}")),
                }
            }
            Err(err) => anyhow::anyhow!(server::describe(&err)),
        };
        if attempt >= LOAD_ATTEMPTS {
            return Err(err).context(format!("POST {url}: gave up after {attempt} attempts"));
        }
        eprintln!("  … load batch failed (attempt {attempt}/{LOAD_ATTEMPTS}), retrying: {err:#}");
        tokio::time::sleep(LOAD_BACKOFF * attempt).await;
        attempt += 1;
    }
}
