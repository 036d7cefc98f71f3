//! The tail worker: follows the core's unfiltered list into the checkpointer's own store,
//! applying every change with its `_id` and its bytes as the core sent them. A 410 (the copy
//! fell behind a truncation) bootstraps the copy again from the newest full checkpoint.
//!
//! Rules:
//! 1. Changes are applied in order without gaps: a page is applied whole in one transaction,
//!    each change exactly the one after the last applied.
//! 2. A bootstrap imports the checkpoint into a new store generation and swaps it in; the
//!    copy never holds half of a checkpoint.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use changeagent_client::{Error as ClientError, Query, RawPage};
use changeagent_proto::{Manifest, Scope};
use changeagent_store::{Follow, ImportMode};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::Context;

/// Longest pause before the tail starts over after an error.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(10);

/// Tails the core until `shutdown`.
pub struct TailWorker {
    pub ctx: Arc<Context>,
}

impl TailWorker {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut delay = Duration::from_millis(100);
        loop {
            let since = self.ctx.store.last_id();
            let mut pages = Box::pin(self.ctx.client.follow_raw(since, Query::new()));
            let failure = loop {
                let next = tokio::select! {
                    next = pages.next() => next,
                    _ = shutdown.cancelled() => return,
                };
                match next {
                    None => break None,
                    Some(Ok(page)) => {
                        self.ctx.status.connected.store(true, Ordering::Relaxed);
                        self.ctx
                            .status
                            .upstream_index
                            .store(page.last_index, Ordering::Relaxed);
                        if let Err(e) = self.apply(page).await {
                            break Some(format!("{e:#}"));
                        }
                        delay = Duration::from_millis(100);
                    }
                    Some(Err(e)) if e.is_truncated() => {
                        let manifest = e.truncated_manifest().and_then(Result::ok);
                        tracing::warn!(
                            since = self.ctx.store.last_id(),
                            "the core truncated past this checkpointer's copy; bootstrapping \
                             from the newest checkpoint"
                        );
                        match bootstrap(&self.ctx, manifest).await {
                            Ok(()) => break None,
                            Err(e) => break Some(format!("bootstrapping after a 410: {e:#}")),
                        }
                    }
                    Some(Err(e)) if e.is_transient() => {
                        // The follow retries with backoff by itself.
                        self.ctx.status.connected.store(false, Ordering::Relaxed);
                    }
                    Some(Err(e)) => {
                        self.ctx.status.connected.store(false, Ordering::Relaxed);
                        break Some(describe(&e));
                    }
                }
            };
            if let Some(why) = failure {
                tracing::error!(error = %why, ?delay, "tailing the core failed; starting over");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
        }
    }

    /// Rule 1: applies one page in one transaction.
    async fn apply(&self, page: RawPage) -> anyhow::Result<()> {
        if page.changes.is_empty() {
            return Ok(());
        }
        let store = self.ctx.store.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut txn = store.begin();
            for change in &page.changes {
                txn.apply_next(change.id, &change.json, Follow::Copy)?;
            }
            store.commit(txn)?;
            Ok(())
        })
        .await?
    }
}

fn describe(e: &ClientError) -> String {
    format!("{e}; check --core and that the core is up")
}

/// Rule 2: replaces the copy with a full checkpoint: `manifest` when a 410 named one, else
/// the newest the core keeps; when one fails (say its object is damaged), the next older
/// kept one. A scoped checkpointer bootstraps from full checkpoints too: they hold
/// everything it exports.
pub async fn bootstrap(ctx: &Context, manifest: Option<Manifest>) -> anyhow::Result<()> {
    let mut candidates: Vec<Manifest> = manifest
        .into_iter()
        .filter(|m| m.scope == Scope::All)
        .collect();
    for m in ctx.client.checkpoints(Some(&Scope::All)).await? {
        if !candidates.contains(&m) {
            candidates.push(m);
        }
    }
    if candidates.is_empty() {
        anyhow::bail!("the core keeps no full checkpoint to bootstrap from");
    }
    let mut failures = Vec::new();
    for m in candidates {
        match load(ctx, &m).await {
            Ok(()) => {
                crate::status::Status::count(&ctx.status.bootstraps_total);
                tracing::info!(index = m.index, "bootstrapped; tailing from there");
                return Ok(());
            }
            Err(e) => {
                tracing::error!(
                    index = m.index,
                    error = format!("{e:#}"),
                    "cannot bootstrap from this checkpoint; trying an older one"
                );
                failures.push(format!("{}: {e:#}", m.index));
            }
        }
    }
    anyhow::bail!(
        "no kept checkpoint could be loaded: {}",
        failures.join("; ")
    )
}

/// Downloads one checkpoint (from the object store, else through the core), checks it, and
/// imports it.
async fn load(ctx: &Context, manifest: &Manifest) -> anyhow::Result<()> {
    tracing::info!(index = manifest.index, object = %manifest.object, "bootstrapping from a checkpoint");
    let file = ctx.temp_file()?;
    if let Err(e) = ctx
        .objects
        .download(
            &manifest.object,
            file.path(),
            manifest.size,
            &manifest.sha256,
        )
        .await
    {
        tracing::warn!(error = %e, "cannot read the checkpoint from the object store; asking the core for it");
        ctx.client
            .download_checkpoint_to(manifest, file.path())
            .await?;
    }
    let store = ctx.store.clone();
    let cluster_id = ctx.cluster_id.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let input = std::io::BufReader::new(file.reopen()?);
        store.import(input, ImportMode::Everything, &[])?;
        // A restored cluster's checkpoints may come from the cluster it was restored from.
        let mut txn = store.begin();
        txn.set_cluster_id(&cluster_id)?;
        store.commit(txn)?;
        Ok(())
    })
    .await??;
    Ok(())
}
