//! `--restore-from URL`: disaster recovery, a new cluster from the newest full checkpoint in
//! an object store.
//!
//! Order:
//! 1. On an empty change store only: find the newest full `latest.json` under the URL (of
//!    whichever cluster wrote it), download its object checking size and sha256, and import
//!    it state-only: catalog and keyed state, `_id`s continuing after its index, the list
//!    starting empty (`firstIndex = index + 1`). The checkpoint is recorded as committed (a
//!    410 points consumers at it) together with where it came from.
//! 2. Raft then initializes a one-voter cluster with a new cluster id.
//! 3. Then the node builds a snapshot and purges its log, so a node that joins installs the
//!    snapshot instead of replaying a log that lacks the restored state.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use changeagent_proto::Scope;
use changeagent_store::{ImportMode, Objects, Store};
use openraft::ServerState;

use crate::raft::Raft;

/// Owner value naming the checkpoint a restored cluster started from.
pub const RESTORED_FROM: &str = "restored_from";
/// How long sealing a restore may wait for leadership, the snapshot and the purge.
const SEAL_TIMEOUT: Duration = Duration::from_secs(600);

/// Step 1, for a node whose Raft log is empty; returns true when the store holds restored
/// state to seal (step 3).
pub async fn import_if_empty(
    store: &Arc<Store>,
    url: &str,
    data_dir: &Path,
) -> anyhow::Result<bool> {
    if store.last_id() > 0 {
        // Only a restore fills the store of a node without a log: an earlier start imported
        // the checkpoint and stopped before it was sealed.
        tracing::info!("the checkpoint was imported by an earlier start; sealing it");
        return Ok(true);
    }
    let objects = Objects::from_url(url)?;
    let manifest = objects
        .newest_latest(&Scope::All)
        .await
        .with_context(|| format!("cannot read checkpoints at {url}"))?
        .with_context(|| {
            format!(
                "no full checkpoint at {url} (no */checkpoints/all/latest.json under it); check \
                 the URL and the AWS_* variables"
            )
        })?;
    tracing::info!(
        index = manifest.index,
        object = %manifest.object,
        from_cluster = %manifest.cluster_id,
        "restoring from a checkpoint"
    );
    let file = tempfile::NamedTempFile::new_in(data_dir)
        .context("cannot create a temp file in the data dir")?;
    objects
        .download(
            &manifest.object,
            file.path(),
            manifest.size,
            &manifest.sha256,
        )
        .await
        .with_context(|| format!("cannot download checkpoint {}", manifest.object))?;
    let store = store.clone();
    let source = serde_json::json!({ "url": url, "checkpoint": manifest });
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let input = std::io::BufReader::new(file.reopen()?);
        store.import(input, ImportMode::StateOnly, &[])?;
        let mut txn = store.begin();
        txn.put_manifest(&manifest)?;
        txn.put_owner_meta(RESTORED_FROM, source.to_string().as_bytes())?;
        store.commit(txn)?;
        store.sync()?;
        Ok(())
    })
    .await
    .context("the restore task failed")??;
    Ok(true)
}

/// Step 3: once this one-voter cluster leads, snapshot and purge the log.
pub async fn seal(raft: &Raft) -> anyhow::Result<()> {
    let wait = raft.wait(Some(SEAL_TIMEOUT));
    wait.state(ServerState::Leader, "the restored node to lead")
        .await
        .context("the restored node did not become leader")?;
    let m = wait
        .metrics(
            |m| m.last_applied.is_some() && m.last_applied.map(|l| l.index) >= m.last_log_index,
            "the restored node to apply its log",
        )
        .await
        .context("the restored node did not apply its log")?;
    let applied = m.last_applied;
    raft.trigger().snapshot().await?;
    let m = wait
        .metrics(
            |m| m.snapshot.is_some() && m.snapshot >= applied,
            "a snapshot of the restored state",
        )
        .await
        .context("no snapshot of the restored state")?;
    let upto = m.snapshot.map_or(0, |l| l.index);
    raft.trigger().purge_log(upto).await?;
    wait.metrics(
        |m| m.purged.is_some_and(|p| p.index >= upto),
        "the log purged up to the snapshot",
    )
    .await
    .context("the log was not purged after the restore")?;
    tracing::info!(
        snapshot_index = upto,
        "restored state sealed in a snapshot; nodes may join"
    );
    Ok(())
}
