//! Bootstrapping: the newest full checkpoint the upstream keeps, checked against its sha256,
//! plus the upstream's retained changes up to the checkpoint's index, imported into a fresh
//! store generation that replaces the live one whole. Readers keep reading the old generation
//! until the swap.
//!
//! Steps:
//! 1. Ask the upstream for its first index F and its kept full checkpoints; take the newest
//!    one N with N + 1 >= F (it reaches the upstream's list).
//! 2. Download it (from the object store, else through the upstream), checking size and
//!    sha256.
//! 3. Spool the upstream's changes F..=N to a temp file; a 410 meanwhile (the upstream
//!    truncated further) starts over at step 1.
//! 4. Import both into a new generation with the upstream's kept manifests and cluster id,
//!    then swap it in (the store's import does that atomically).
//! 5. Without an object store, keep the checked checkpoint in the local mirror, so consumers
//!    loading it after a 410 get it from this edge.

use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use changeagent_client::Query;
use changeagent_proto::limits::MAX_LIMIT;
use changeagent_proto::{Manifest, Scope};
use changeagent_store::Replica;
use futures::StreamExt;

use crate::Context;

/// How often step 1 starts over because the upstream truncated during a bootstrap before
/// giving up (and retrying later with backoff).
const MAX_ROUNDS: usize = 3;

/// What a bootstrap did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The store now holds checkpoint `index` and the upstream's list from `first_index`.
    Loaded { index: u64, first_index: u64 },
    /// The upstream keeps every change from the first and no checkpoint: tail from 0.
    NothingToLoad,
}

/// Bootstraps the store (see the module docs). `named` is the checkpoint a 410 named, tried
/// first.
pub async fn bootstrap(ctx: &Context, named: Option<Manifest>) -> anyhow::Result<Outcome> {
    let mut named = named.filter(|m| m.scope == Scope::All);
    for _ in 0..MAX_ROUNDS {
        let health = ctx
            .client
            .health()
            .await
            .context("asking the upstream for /health")?;
        let cluster_id = health
            .cluster_id
            .context("the upstream has no cluster id yet; is the core initialized?")?;
        let first_index = health.first_index.max(1);
        let mut candidates: Vec<Manifest> = named.take().into_iter().collect();
        for m in ctx
            .client
            .checkpoints(Some(&Scope::All))
            .await
            .context("asking the upstream for its checkpoints")?
        {
            if !candidates.contains(&m) {
                candidates.push(m);
            }
        }
        candidates.retain(|m| m.index + 1 >= first_index);
        candidates.sort_by_key(|m| std::cmp::Reverse(m.index));
        if candidates.is_empty() {
            if first_index <= 1 {
                adopt_cluster_id(ctx, &cluster_id).await?;
                return Ok(Outcome::NothingToLoad);
            }
            anyhow::bail!(
                "the upstream's list starts at {first_index} but it keeps no full checkpoint \
                 reaching it; is a checkpointer running?"
            );
        }
        let mut failures = Vec::new();
        for m in candidates {
            match load(ctx, &m, first_index, &cluster_id).await {
                Ok(Some(outcome)) => {
                    ctx.status.count_bootstrap();
                    return Ok(outcome);
                }
                Ok(None) => {
                    failures.clear();
                    break;
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
        if !failures.is_empty() {
            anyhow::bail!(
                "no kept checkpoint could be loaded: {}",
                failures.join("; ")
            );
        }
        tracing::info!("the upstream truncated during the bootstrap; starting over");
    }
    anyhow::bail!("the upstream kept truncating past each checkpoint during {MAX_ROUNDS} tries")
}

/// Without a checkpoint to load, the store still takes the upstream's cluster id (served
/// as `X-Cluster-Id`).
async fn adopt_cluster_id(ctx: &Context, cluster_id: &str) -> anyhow::Result<()> {
    if ctx.store.cluster_id().as_deref() == Some(cluster_id) {
        return Ok(());
    }
    let (store, id) = (ctx.store.clone(), cluster_id.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut txn = store.begin();
        txn.set_cluster_id(&id)?;
        store.commit(txn)
    })
    .await??;
    Ok(())
}

/// Refuses an upstream of another cluster than the one this store replicates.
pub async fn check_cluster(ctx: &Context) -> anyhow::Result<()> {
    let health = ctx
        .client
        .health()
        .await
        .context("asking the upstream for /health")?;
    match (ctx.store.cluster_id(), health.cluster_id) {
        (Some(mine), Some(theirs)) if mine != theirs => anyhow::bail!(
            "the data dir holds a replica of cluster {mine}, but the upstream belongs to \
             cluster {theirs}; give this edge a new --data-dir or the right --upstream"
        ),
        _ => Ok(()),
    }
}

/// Steps 2 to 5 for one checkpoint; `None` when the upstream truncated past it meanwhile.
async fn load(
    ctx: &Context,
    manifest: &Manifest,
    first_index: u64,
    cluster_id: &str,
) -> anyhow::Result<Option<Outcome>> {
    let started = Instant::now();
    tracing::info!(
        index = manifest.index,
        bytes = manifest.size,
        first_index,
        "bootstrapping from a checkpoint"
    );
    let file = ctx.temp_file()?;
    download(ctx, manifest, file.path()).await?;
    let spool = ctx.temp_file()?;
    let Some(spooled) = spool_retained(ctx, first_index, manifest.index, spool.path()).await?
    else {
        return Ok(None);
    };
    let manifests = ctx
        .client
        .checkpoints(None)
        .await
        .context("asking the upstream for its checkpoints")?;
    let store = ctx.store.clone();
    let cluster_id = cluster_id.to_owned();
    // By path: a download replaces the temp file with the checked one.
    let checkpoint =
        std::fs::File::open(file.path()).context("opening the downloaded checkpoint")?;
    let retained = spool.reopen().context("reopening the spooled changes")?;
    let kept = manifests.clone();
    let imported = tokio::task::spawn_blocking(move || {
        let mut retained = BufReader::with_capacity(1 << 16, retained);
        store.import_replica(
            BufReader::new(checkpoint),
            Replica {
                retained: &mut retained,
                manifests: &kept,
                cluster_id: &cluster_id,
            },
        )
    })
    .await??;
    if let Some(mirror) = &ctx.mirror {
        let target = mirror.join(&manifest.object);
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        file.persist(&target)
            .with_context(|| format!("cannot keep the checkpoint at {}", target.display()))?;
        prune_mirror(mirror, &manifests);
    }
    let first = ctx.store.first_index();
    tracing::info!(
        index = imported.header.index,
        first_index = first,
        retained = spooled,
        seconds = started.elapsed().as_secs_f64(),
        "bootstrapped; tailing from there"
    );
    Ok(Some(Outcome::Loaded {
        index: manifest.index,
        first_index: first,
    }))
}

/// Step 2: the checkpoint's bytes into `path`, checked.
async fn download(ctx: &Context, manifest: &Manifest, path: &Path) -> anyhow::Result<()> {
    if ctx.mirror.is_none() {
        match ctx
            .objects
            .download(&manifest.object, path, manifest.size, &manifest.sha256)
            .await
        {
            Ok(()) => return Ok(()),
            Err(e) => tracing::warn!(
                error = %e,
                "cannot read the checkpoint from the object store; asking the upstream for it"
            ),
        }
    }
    ctx.client
        .download_checkpoint_to(manifest, path)
        .await
        .with_context(|| {
            format!(
                "downloading checkpoint {} from the upstream",
                manifest.index
            )
        })
}

/// Step 3: writes the upstream's changes `first_index..=index` to `path`, one per line; the
/// number written, or `None` when the upstream truncated past `first_index` meanwhile.
async fn spool_retained(
    ctx: &Context,
    first_index: u64,
    index: u64,
    path: &Path,
) -> anyhow::Result<Option<u64>> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = BufWriter::new(file);
    let mut written = 0u64;
    if first_index > index {
        return Ok(Some(0));
    }
    let query = Query::new().limit(MAX_LIMIT as u32).block(0);
    let mut pages = Box::pin(ctx.client.follow_raw(first_index - 1, query));
    let mut last_report = Instant::now();
    'pages: while let Some(page) = pages.next().await {
        let page = match page {
            Ok(page) => page,
            Err(e) if e.is_truncated() => return Ok(None),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "reading the upstream's retained changes; retrying");
                continue;
            }
            Err(e) => return Err(e).context("reading the upstream's retained changes"),
        };
        for change in &page.changes {
            if change.id > index {
                break 'pages;
            }
            out.write_all(&change.json)?;
            out.write_all(b"\n")?;
            written += 1;
            if change.id == index {
                break 'pages;
            }
        }
        if page.at_end && page.since >= page.last_index && page.last_index < index {
            anyhow::bail!(
                "the upstream's list ends at {} before the checkpoint's index {index}",
                page.last_index
            );
        }
        if last_report.elapsed() >= std::time::Duration::from_secs(5) {
            last_report = Instant::now();
            tracing::info!(
                written,
                of = index + 1 - first_index,
                "copying retained changes"
            );
        }
    }
    out.flush()?;
    Ok(Some(written))
}

/// Step 5's housekeeping: removes mirrored checkpoints the upstream no longer keeps.
pub fn prune_mirror(mirror: &Path, kept: &[Manifest]) {
    let keep: std::collections::HashSet<std::path::PathBuf> =
        kept.iter().map(|m| mirror.join(&m.object)).collect();
    let mut dirs = vec![mirror.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => dirs.push(path),
                // Downloads in progress write temp files (".tmp…") beside their target.
                Ok(_) if entry.file_name().to_string_lossy().starts_with(".tmp") => {}
                Ok(_) if !keep.contains(&path) => {
                    if let Err(e) = std::fs::remove_file(&path) {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove an old mirrored checkpoint");
                    }
                }
                _ => {}
            }
        }
    }
}

/// Mirrors a checkpoint the upstream just recorded, so consumers of this edge load it from
/// here (only without an object store).
pub async fn mirror_checkpoint(ctx: &Context, manifest: &Manifest) {
    let Some(mirror) = &ctx.mirror else {
        return;
    };
    let target = mirror.join(&manifest.object);
    if target.exists() {
        return;
    }
    if let Some(dir) = target.parent() {
        if let Err(e) = std::fs::create_dir_all(dir) {
            tracing::warn!(error = %e, "cannot create the checkpoint mirror's directory");
            return;
        }
    }
    match ctx.client.download_checkpoint_to(manifest, &target).await {
        Ok(()) => {
            tracing::info!(index = manifest.index, scope = %manifest.scope, "mirrored a checkpoint")
        }
        Err(e) => {
            tracing::warn!(index = manifest.index, error = %e, "cannot mirror a checkpoint; consumers will get 404 for its data here")
        }
    }
}
