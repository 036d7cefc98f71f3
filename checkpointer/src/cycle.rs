//! The checkpoint worker: every `--every-changes` changes or `--every-seconds` seconds
//! (whichever first) it writes one checkpoint of its scope.
//!
//! One round, in order (a crash at any step leaves no manifest or `latest.json` naming a
//! missing or partial object):
//! 1. take a RocksDB snapshot of the copy at index N; nothing new since the last checkpoint
//!    ends the round;
//! 2. `POST /admin/checkpoints/start {N}`: a 409 (another checkpointer's fresh start) ends
//!    the round; a restarted checkpointer takes its own open start back;
//! 3. export the snapshot to a local file, hashing it (sha256, size) as it is written;
//! 4. upload it; read it back and check size and sha256;
//! 5. `POST /admin/checkpoints/end` with the manifest (the core keeps the newest `--keep`);
//! 6. write the scope's `latest.json`;
//! 7. scope `all` only: `POST /admin/truncate {before: N + 1 - retain}`;
//! 8. delete objects of the scope that no kept manifest names and that are older than the
//!    newest kept one (newer ones may be another checkpointer's upload in progress).

use std::collections::HashSet;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use changeagent_proto::types::{EndRequest, StartRecord};
use changeagent_proto::{Manifest, Scope};
use changeagent_store::objects::hex;
use changeagent_store::{ExportOptions, Exported};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::status::Status;
use crate::Context;

/// Pause before the next round after one that failed or was skipped.
const RETRY_DELAY: Duration = Duration::from_secs(2);
/// How long a round in progress may go on after SIGTERM: most rounds end in seconds; a huge
/// upload is abandoned rather than holding up a shutdown for long.
const ROUND_DRAIN: Duration = Duration::from_secs(30);
/// Rounds `--once` tries before it gives up on errors (conflicts are waited out).
const ONCE_ATTEMPTS: u32 = 5;
/// How often a checkpointer waiting to catch up says so.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// How a round ended.
enum Round {
    Done(Manifest),
    /// Nothing new since the last checkpoint.
    NothingNew,
    /// Another checkpointer holds a fresh start of the scope.
    Conflict(String),
}

/// Writes checkpoints until `shutdown` (or after one with `--once`).
pub struct CheckpointWorker {
    pub ctx: Arc<Context>,
}

impl CheckpointWorker {
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ctx = &self.ctx;
        let config = &ctx.config;
        let mut last = match retry_until(&shutdown, "the core's newest checkpoint", || {
            ctx.client.latest_checkpoint(&config.scope)
        })
        .await
        {
            Some(latest) => latest.map_or(0, |m| m.index),
            None => return Ok(()),
        };
        if config.once && !self.catch_up(&shutdown).await {
            return Ok(());
        }
        let every = Duration::from_secs(config.every_seconds);
        let mut last_at = Instant::now();
        let mut applied = ctx.store.subscribe();
        let mut failures = 0u32;
        loop {
            if !config.once {
                loop {
                    applied.borrow_and_update();
                    let now = ctx.store.last_id();
                    let due = now > last
                        && (now - last >= config.every_changes || last_at.elapsed() >= every)
                        && self.moved_since(last).await?;
                    if due {
                        break;
                    }
                    tokio::select! {
                        _ = applied.changed() => {}
                        _ = tokio::time::sleep_until((last_at + every).into()) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                }
            }
            let round = self.round(last);
            tokio::pin!(round);
            let round = tokio::select! {
                round = &mut round => round,
                _ = shutdown.cancelled() => {
                    // An abandoned start blocks other checkpointers of the scope until it is
                    // stale, so a round in progress gets a while to finish.
                    tracing::info!("stopping: finishing the checkpoint in progress first (up to {ROUND_DRAIN:?})");
                    match tokio::time::timeout(ROUND_DRAIN, &mut round).await {
                        Ok(round) => round,
                        Err(_) => {
                            tracing::warn!(
                                "the checkpoint in progress is abandoned; restarted with the same \
                                 data dir this checkpointer takes its start back at once, others \
                                 after the core's --checkpoint-stale-after"
                            );
                            return Ok(());
                        }
                    }
                }
            };
            match round {
                Ok(Round::Done(m)) => {
                    last = m.index;
                    last_at = Instant::now();
                    failures = 0;
                    if config.once {
                        return Ok(());
                    }
                    continue;
                }
                Ok(Round::NothingNew) => {
                    Status::count(&ctx.status.skipped_total);
                    if config.once {
                        tracing::info!(index = last, "nothing new since checkpoint {last}; done");
                        return Ok(());
                    }
                    last_at = Instant::now();
                    continue;
                }
                Ok(Round::Conflict(why)) => {
                    Status::count(&ctx.status.skipped_total);
                    tracing::info!("skipping this round: {why}");
                    last_at = Instant::now();
                }
                Err(e) => {
                    Status::count(&ctx.status.failures_total);
                    failures += 1;
                    tracing::error!(
                        error = format!("{e:#}"),
                        "the checkpoint failed; nothing names its object, the next round \
                         tries again"
                    );
                    if config.once && failures >= ONCE_ATTEMPTS {
                        return Err(e.context(format!("no checkpoint after {failures} attempts")));
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY_DELAY) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Whether the state moved since checkpoint `last`: checkpoint, end and truncate records
    /// alone (this checkpointer's own, from its last round) call for no new checkpoint.
    async fn moved_since(&self, last: u64) -> anyhow::Result<bool> {
        let store = self.ctx.store.clone();
        Ok(tokio::task::spawn_blocking(move || store.has_data_after(last)).await??)
    }

    /// `--once`: waits until the copy holds everything the core held at start. False on
    /// shutdown.
    async fn catch_up(&self, shutdown: &CancellationToken) -> bool {
        let ctx = &self.ctx;
        let Some(health) = retry_until(shutdown, "the core's health", || ctx.client.health()).await
        else {
            return false;
        };
        let target = health.last_index;
        let mut applied = ctx.store.subscribe();
        let mut last_report = Instant::now();
        loop {
            let now = *applied.borrow_and_update();
            if now >= target {
                return true;
            }
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                tracing::info!(applied = now, target, "catching up with the core");
            }
            tokio::select! {
                _ = applied.changed() => {}
                _ = tokio::time::sleep(PROGRESS_EVERY) => {}
                _ = shutdown.cancelled() => return false,
            }
        }
    }

    /// One round; see the module docs.
    async fn round(&self, last: u64) -> anyhow::Result<Round> {
        let ctx = &self.ctx;
        let config = &ctx.config;
        let started = Instant::now();
        let file = ctx.temp_file()?;
        let out = file.reopen()?;
        let (index_tx, index_rx) = tokio::sync::oneshot::channel::<u64>();
        let (go_tx, go_rx) = std::sync::mpsc::sync_channel::<bool>(1);
        let store = ctx.store.clone();
        let opts = ExportOptions {
            scope: config.scope.clone(),
            raft: false,
        };
        // 1. and 3.: the export thread takes the snapshot, reports its index, and waits for
        // the start record before it writes.
        let export = tokio::task::spawn_blocking(
            move || -> anyhow::Result<Option<(Exported, u64, String)>> {
                let mut out = Hashing::new(std::io::BufWriter::with_capacity(1 << 20, out));
                let exported = store.export(&mut out, &opts, |index| {
                    let _ = index_tx.send(index);
                    go_rx.recv().unwrap_or(false)
                })?;
                let Some(exported) = exported else {
                    return Ok(None);
                };
                let (size, sha256, file) = out.finish()?;
                file.sync_all()?;
                Ok(Some((exported, size, sha256)))
            },
        );
        let Ok(index) = index_rx.await else {
            // The export failed before its snapshot.
            export.await??;
            anyhow::bail!("the export ended before its snapshot");
        };
        let decline = |round: Round| {
            let _ = go_tx.send(false);
            round
        };
        if index <= last || !self.moved_since(last).await? {
            let round = decline(Round::NothingNew);
            export.await??;
            return Ok(round);
        }
        // 2.
        let start = StartRecord {
            index,
            by: ctx.id.clone(),
            scope: config.scope.clone(),
        };
        match ctx.client.checkpoint_start(&start).await {
            Ok(_) => {}
            Err(e) if e.is_conflict() => {
                let round = decline(Round::Conflict(e.to_string()));
                export.await??;
                return Ok(round);
            }
            Err(e) => {
                let _ = go_tx.send(false);
                export.await??;
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot record the start of checkpoint {index} at the core"
                )));
            }
        }
        tracing::info!(index, scope = %config.scope, "checkpoint started");
        ctx.stop_at("started");
        let _ = go_tx.send(true);
        let Some((exported, size, sha256)) = export.await?? else {
            anyhow::bail!("the export stopped after its start was recorded");
        };
        let exported_at = Instant::now();
        // 4.
        let object = ctx
            .objects
            .object_path(&ctx.cluster_id, &config.scope, index);
        let stop = |sent: u64| {
            if sent > 0 {
                ctx.stop_at("uploading");
            }
        };
        ctx.objects
            .upload(&object, file.path(), size, config.part_bytes, stop)
            .await?;
        ctx.stop_at("written");
        let uploaded_at = Instant::now();
        ctx.objects.verify(&object, size, &sha256).await?;
        let verified_at = Instant::now();
        tracing::info!(%object, "read the checkpoint back: size and sha256 match");
        ctx.stop_at("verified");
        // 5.
        let manifest = Manifest {
            index,
            scope: config.scope.clone(),
            object,
            size,
            sha256,
            records: exported.trailer.records,
            created_ts: exported.header.created_ts,
            cluster_id: ctx.cluster_id.clone(),
        };
        let end = EndRequest {
            manifest: manifest.clone(),
            by: ctx.id.clone(),
            keep: config.keep,
        };
        let key = format!("end-{}-{}-{index}", ctx.id, config.scope.path_segment());
        ctx.client.checkpoint_end(&end, &key).await.map_err(|e| {
            anyhow::Error::new(e).context(format!("cannot record checkpoint {index} at the core"))
        })?;
        ctx.stop_at("ended");
        // 6.
        ctx.objects.put_latest(&manifest).await?;
        let took = started.elapsed();
        ctx.status
            .last_duration_ms
            .store(took.as_millis() as u64, Ordering::Relaxed);
        *ctx.status
            .last_checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(manifest.clone());
        Status::count(&ctx.status.checkpoints_total);
        tracing::info!(
            index,
            records = manifest.records,
            bytes = manifest.size,
            raw_bytes = exported.raw_bytes,
            export_secs = (exported_at - started).as_secs_f64(),
            upload_secs = (uploaded_at - exported_at).as_secs_f64(),
            verify_secs = (verified_at - uploaded_at).as_secs_f64(),
            seconds = took.as_secs_f64(),
            object = %manifest.object,
            "checkpoint written"
        );
        // 7.
        if config.scope == Scope::All {
            let before = (index + 1).saturating_sub(config.retain);
            if before > 1 {
                let key = format!("truncate-{}-{index}", ctx.id);
                match ctx.client.truncate(before, &key).await {
                    Ok(a) => {
                        Status::count(&ctx.status.truncations_total);
                        tracing::info!(first_index = a.first_index, "the core truncated");
                    }
                    Err(e) => tracing::warn!(error = %e, before, "the core did not truncate"),
                }
            }
        }
        // 8.
        if let Err(e) = self.collect_garbage().await {
            tracing::warn!(
                error = format!("{e:#}"),
                "cannot delete old checkpoint objects; the next round tries again"
            );
        }
        Ok(Round::Done(manifest))
    }

    /// Step 8.
    async fn collect_garbage(&self) -> anyhow::Result<()> {
        let ctx = &self.ctx;
        let scope = &ctx.config.scope;
        let kept = ctx.client.checkpoints(Some(scope)).await?;
        let Some(newest) = kept.iter().map(|m| m.index).max() else {
            return Ok(());
        };
        let named: HashSet<&str> = kept.iter().map(|m| m.object.as_str()).collect();
        for (index, path) in ctx.objects.list(&ctx.cluster_id, scope).await? {
            if index < newest && !named.contains(path.as_str()) {
                ctx.objects.delete(&path).await?;
                Status::count(&ctx.status.deleted_objects_total);
                tracing::info!(%path, "deleted an old checkpoint object");
            }
        }
        Ok(())
    }
}

/// Calls `f` until it answers (the client already retries and fails over; this outlasts a
/// core that is down for longer). `None` on shutdown.
pub async fn retry_until<T, F, Fut>(shutdown: &CancellationToken, what: &str, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = changeagent_client::Result<T>>,
{
    loop {
        let result = tokio::select! {
            r = f() => r,
            _ = shutdown.cancelled() => return None,
        };
        match result {
            Ok(v) => return Some(v),
            Err(e) => {
                tracing::warn!(error = %e, "cannot get {what} from the core; retrying (check --core)");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_DELAY) => {}
                    _ = shutdown.cancelled() => return None,
                }
            }
        }
    }
}

/// Counts and hashes what is written through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }
}

impl Hashing<std::io::BufWriter<std::fs::File>> {
    /// Flushes; returns the size, the hex sha256 and the file.
    fn finish(self) -> std::io::Result<(u64, String, std::fs::File)> {
        let file = self.inner.into_inner().map_err(|e| e.into_error())?;
        Ok((self.size, hex(&self.hasher.finalize()), file))
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
