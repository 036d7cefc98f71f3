//! The tail worker: long-polls the upstream's unfiltered list and applies every change with
//! its `_id` and bytes, following the upstream's checkpoints and truncations. A 410 (the
//! edge fell behind a truncation) bootstraps a fresh generation, swapped in whole while the
//! old one keeps serving.
//!
//! Rules:
//! 1. A page is applied whole in one transaction, each change exactly the one after the last
//!    applied; a gap in an unfiltered list is an error, never skipped.
//! 2. After a checkpoint-end record, the kept manifests are refreshed from the upstream (its
//!    `keep` decides which stay), and without an object store the new checkpoint is mirrored.
//! 3. While no upstream answers, the worker retries with backoff (backon) across the
//!    upstream URLs, and the edge keeps serving what it has.

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use changeagent_client::{Query, RawChange, RawPage};
use changeagent_proto::limits::MAX_LIMIT;
use changeagent_proto::Manifest;
use changeagent_store::{Applied, Follow};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::bootstrap::{self, Outcome};
use crate::Context;

/// `block` of each long-poll to the upstream: long enough that an idle edge costs the core
/// little, short enough that a silently dropped connection is noticed.
pub const UPSTREAM_BLOCK_SECS: u32 = 30;

/// Backoff between failed rounds (bootstraps, gaps): from `MIN_RETRY_DELAY` doubling up to
/// `MAX_RETRY_DELAY`.
const MIN_RETRY_DELAY: Duration = Duration::from_millis(100);
pub(crate) const MAX_RETRY_DELAY: Duration = Duration::from_secs(10);

/// Keeps the store current until `shutdown`.
pub struct TailWorker {
    pub ctx: Arc<Context>,
}

pub(crate) fn backoff() -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(MIN_RETRY_DELAY)
        .with_max_delay(MAX_RETRY_DELAY)
        .with_jitter()
        .without_max_times()
        .build()
}

impl TailWorker {
    pub async fn run(self, shutdown: CancellationToken) {
        let ctx = &self.ctx;
        let mut delays = backoff();
        loop {
            let failure = tokio::select! {
                failure = self.round() => failure,
                _ = shutdown.cancelled() => return,
            };
            let delay = delays.next().unwrap_or(MAX_RETRY_DELAY);
            tracing::error!(error = %failure, ?delay, "tailing the upstream failed; starting over");
            ctx.status.set_connected(false);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return,
            }
            // A round that made progress before failing starts the backoff over.
            if ctx.status.take_progress() {
                delays = backoff();
            }
        }
    }

    /// Bootstraps when the store is empty, then follows the upstream until something fails
    /// that a new round must fix; returns why.
    async fn round(&self) -> String {
        let ctx = &self.ctx;
        if ctx.store.last_id() == 0 {
            match bootstrap::bootstrap(ctx, None).await {
                Ok(Outcome::Loaded { .. }) => ctx.status.mark_progress(),
                Ok(Outcome::NothingToLoad) => {}
                Err(e) => return format!("bootstrapping: {e:#}"),
            }
        }
        if let Err(e) = bootstrap::check_cluster(ctx).await {
            return format!("{e:#}");
        }
        let since = ctx.store.last_id();
        let query = Query::new()
            .limit(MAX_LIMIT as u32)
            .block(UPSTREAM_BLOCK_SECS);
        let mut pages = Box::pin(ctx.client.follow_raw(since, query));
        loop {
            match pages.next().await {
                None => return "the upstream's list ended".into(),
                Some(Ok(page)) => {
                    ctx.status.saw_page(&page, &ctx.client);
                    match self.apply(page).await {
                        Ok(ended) => {
                            ctx.status.mark_progress();
                            for m in ended {
                                self.checkpoint_ended(m).await;
                            }
                        }
                        Err(e) => return format!("{e:#}"),
                    }
                }
                Some(Err(e)) if e.is_truncated() => {
                    let named = e.truncated_manifest().and_then(Result::ok);
                    tracing::warn!(
                        applied = ctx.store.last_id(),
                        "the upstream truncated past this edge; bootstrapping a fresh copy \
                         (the current one keeps serving until it is swapped in)"
                    );
                    return match bootstrap::bootstrap(ctx, named).await {
                        Ok(_) => {
                            ctx.status.mark_progress();
                            "re-bootstrapped after a 410; following from the new copy".into()
                        }
                        Err(e) => format!("bootstrapping after a 410: {e:#}"),
                    };
                }
                Some(Err(e)) if e.is_transient() => {
                    // The follow retries with backoff across the upstream URLs by itself.
                    ctx.status.set_connected(false);
                    tracing::warn!(error = %e, "no upstream answers; serving what this edge has");
                }
                Some(Err(e)) => return format!("{e}; check --upstream"),
            }
        }
    }

    /// Rule 1: applies one page in one transaction; returns the manifests of the
    /// checkpoint-end records it held.
    async fn apply(&self, page: RawPage) -> anyhow::Result<Vec<Manifest>> {
        if page.changes.is_empty() {
            return Ok(Vec::new());
        }
        // Applying a checkpoint-end record lists its checkpoint here (in `/checkpoints` and in
        // the 410s naming the checkpoint to load), so its bytes must be here first: mirror it
        // before the page is applied, or a consumer could be sent to a 404.
        for manifest in page.changes.iter().filter_map(checkpoint_end) {
            bootstrap::mirror_checkpoint(&self.ctx, &manifest).await;
        }
        let store = self.ctx.store.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Manifest>> {
            let mut ended = Vec::new();
            let mut txn = store.begin();
            for change in &page.changes {
                match txn.apply_next(change.id, &change.json, Follow::Replica)? {
                    Some(Applied::CheckpointEnd(m)) => ended.push(m),
                    Some(Applied::Truncate { before }) => {
                        tracing::info!(before, "following the upstream's truncation")
                    }
                    Some(Applied::Change) | None => {}
                }
            }
            store.commit(txn)?;
            Ok(ended)
        })
        .await?
    }

    /// Rule 2.
    async fn checkpoint_ended(&self, manifest: Manifest) {
        let ctx = &self.ctx;
        bootstrap::mirror_checkpoint(ctx, &manifest).await;
        let mut kept = match ctx.client.checkpoints(None).await {
            Ok(kept) => kept,
            Err(e) => {
                tracing::warn!(error = %e, "cannot refresh the kept checkpoints; keeping the list as it is");
                return;
            }
        };
        // An upstream node that has not applied the end record yet does not list it.
        if !kept
            .iter()
            .any(|k| k.scope == manifest.scope && k.index >= manifest.index)
        {
            kept.push(manifest);
        }
        let store = ctx.store.clone();
        let mirror = ctx.mirror.clone();
        let result = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut txn = store.begin();
            txn.set_manifests(&kept)?;
            store.commit(txn)?;
            if let Some(mirror) = mirror {
                bootstrap::prune_mirror(&mirror, &kept);
            }
            Ok(())
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot store the kept checkpoints"),
            Err(e) => tracing::warn!(error = %e, "storing the kept checkpoints failed"),
        }
    }
}

/// The manifest a checkpoint-end record carries; `None` for every other change. The wire
/// JSON is the core's compact spelling, so a change without `"type":-2` in its bytes is not
/// one and is not parsed.
fn checkpoint_end(change: &RawChange) -> Option<Manifest> {
    const MARK: &[u8] = b"\"type\":-2";
    if !change.json.windows(MARK.len()).any(|w| w == MARK) {
        return None;
    }
    let record: serde_json::Value = serde_json::from_slice(&change.json).ok()?;
    if record["type"] != changeagent_proto::types::internal_type::CHECKPOINT_END {
        return None;
    }
    serde_json::from_value(record["data"].clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> RawChange {
        RawChange {
            id: 0,
            json: bytes::Bytes::copy_from_slice(json.as_bytes()),
        }
    }

    #[test]
    fn checkpoint_end_records_give_their_manifest_and_nothing_else_does() {
        let end = r#"{"_id":9,"_ts":1,"type":-2,"data":{"index":7,"scope":"all","object":"c/all/7.jsonl.zst","size":433,"sha256":"ab","records":7,"createdTs":1,"clusterId":"x"}}"#;
        let manifest = checkpoint_end(&raw(end)).expect("an end record");
        assert_eq!((manifest.index, manifest.size), (7, 433));
        // A start record, a change whose data holds the mark, and a plain change.
        assert!(
            checkpoint_end(&raw(r#"{"_id":2,"_ts":1,"type":-1,"data":{"index":1}}"#)).is_none()
        );
        assert!(checkpoint_end(&raw(r#"{"_id":3,"_ts":1,"data":{"type":-2}}"#)).is_none());
        assert!(checkpoint_end(&raw(r#"{"_id":4,"_ts":1,"data":{"n":1}}"#)).is_none());
    }
}
