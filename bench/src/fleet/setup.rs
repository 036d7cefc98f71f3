//! Setup: the fleet's tenants and collections, each created once (a `409`
//! means it exists already), retried with backoff while the cluster cannot
//! take them yet (no leader, a follower that has not applied the tenant).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use changeagent_client::Client;
use tokio_util::sync::CancellationToken;

use crate::fleet::names::{KeySpace, COLLECTIONS_PER_TENANT};
use crate::fleet::stats::Stats;
use crate::fleet::writer;
use crate::report::Progress;

/// How long setup waits for the cluster to take the tenants and
/// collections: a cluster started with the fleet (docker compose) elects a
/// leader well within it, even on a slow machine.
pub const SETUP_DEADLINE: Duration = Duration::from_secs(300);

/// Longest pause between two tries of a setup request.
const SETUP_RETRY_MAX: Duration = Duration::from_secs(5);

/// Creates the tenants and collections, each once (a `409` means it exists
/// already), retrying while the cluster cannot take them yet.
pub async fn setup(
    client: &Client,
    keys: KeySpace,
    stats: &Arc<Stats>,
    ending: &CancellationToken,
) -> Result<()> {
    let deadline = Instant::now() + SETUP_DEADLINE;
    let last = Arc::new(Mutex::new(String::from("no answer yet")));
    let _progress = {
        let last = Arc::clone(&last);
        Progress::start(move |elapsed| {
            let last = last.lock().map(|l| l.clone()).unwrap_or_default();
            format!(
                "{:>4}s: waiting for the cluster to take the fleet's tenants ({last})",
                elapsed.as_secs()
            )
        })
    };
    for t in 0..keys.tenants {
        let tenant = KeySpace::tenant(t);
        create(
            &format!("tenant {tenant}"),
            deadline,
            stats,
            &last,
            ending,
            || {
                let tenant = tenant.clone();
                async move { client.create_tenant(&tenant).await.map(|_| ()) }
            },
        )
        .await?;
        for c in 0..COLLECTIONS_PER_TENANT {
            let collection = KeySpace::collection(t, c);
            create(
                &format!("collection {collection}"),
                deadline,
                stats,
                &last,
                ending,
                || {
                    let (tenant, collection) = (tenant.clone(), collection.clone());
                    async move {
                        client
                            .create_collection(&tenant, &collection)
                            .await
                            .map(|_| ())
                    }
                },
            )
            .await?;
        }
    }
    Ok(())
}

/// One create of [`setup`], retried with backoff.
async fn create<F, Fut>(
    what: &str,
    deadline: Instant,
    stats: &Stats,
    last: &Mutex<String>,
    ending: &CancellationToken,
    op: F,
) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = changeagent_client::Result<()>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        let error = match op().await {
            Ok(()) => return Ok(()),
            Err(error) if error.is_conflict() => return Ok(()),
            Err(error) => error,
        };
        // A follower that has not applied the tenant yet answers 404 for
        // its collection.
        if !(writer::retry_later(&error) || error.is_not_found()) {
            bail!("creating {what}: {error}");
        }
        if writer::retry_later(&error) {
            Stats::add(&stats.transient, 1);
        }
        if let Ok(mut last) = last.lock() {
            *last = format!("{what}: {error}");
        }
        if Instant::now() >= deadline {
            bail!(
                "the cluster did not take {what} within {} s: {error}",
                SETUP_DEADLINE.as_secs()
            );
        }
        tokio::select! {
            () = ending.cancelled() => bail!("interrupted while waiting for the cluster"),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(SETUP_RETRY_MAX);
    }
}
