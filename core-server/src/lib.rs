//! ChangeAgent's core node: an openraft node whose log lives in RocksDB and whose state
//! machine is the change store, serving the write, read and ops API over HTTP.
//!
//! # Layout
//! - [`config`]: flags and environment variables.
//! - [`node`]: storage, node id, Raft start-up and cluster initialization.
//! - [`raft`]: Raft types, log store, state machine, HTTP transport.
//! - [`proposer`]: groups concurrent writes into one Raft entry.
//! - [`http`]: routes and handlers.

pub mod config;
pub mod http;
pub mod node;
pub mod proposer;
pub mod raft;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use changeagent_store::http::{HttpMetrics, ReadApi, ReadLimits};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// How long start-up waits for a leader and a cluster id before serving anyway.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a core node on `listener` until `shutdown` is cancelled, then drains and stops.
///
/// Shutdown order: 1. stop accepting and let requests finish (long-polls answer at once),
/// up to the drain timeout; 2. shut Raft down; 3. sync the change store.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener
        .local_addr()
        .context("listener has no local address")?;
    let advertise = config.advertise.clone().unwrap_or_else(|| addr.to_string());
    let client = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()
        .context("cannot build the HTTP client")?;
    let node = node::start(&config, &advertise, client).await?;
    let proposer = proposer::Proposer::start(node.raft.clone());
    let metrics = Arc::new(HttpMetrics::default());
    let config = Arc::new(config);
    let read = Arc::new(ReadApi {
        store: node.store.clone(),
        limits: ReadLimits {
            max_block: Duration::from_secs(config.max_block_secs),
        },
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    });
    let app = Arc::new(http::AppState {
        node_id: node.id,
        raft: node.raft.clone(),
        proposer: proposer.clone(),
        store: node.store.clone(),
        config: config.clone(),
        metrics,
    });
    let router = http::routes::router(app, read);
    let server =
        axum::serve(listener, router).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let mut server = tokio::spawn(async move { server.await });

    let ready = node::ensure_cluster_id(node.id, node.raft.clone(), node.store.clone(), proposer);
    if tokio::time::timeout(READY_TIMEOUT, ready).await.is_err() {
        tracing::warn!("no leader or cluster id after {READY_TIMEOUT:?}; serving anyway");
    }
    tracing::info!(node_id = node.id, "listening on {addr}");

    // A Raft node that stopped on a storage error cannot serve writes again: stop the whole
    // process (exit non-zero) so a supervisor restarts it, rather than answer 503 forever.
    let fatal = tokio::spawn(watch_fatal(node.raft.clone(), shutdown.clone()));

    tokio::select! {
        result = &mut server => {
            result.context("HTTP server task failed")?.context("HTTP server failed")?;
        }
        _ = shutdown.cancelled() => {
            tracing::info!("shutting down: draining requests");
            let drain = Duration::from_millis(config.drain_timeout_ms);
            if tokio::time::timeout(drain, &mut server).await.is_err() {
                tracing::warn!("requests still running after {drain:?}; closing them");
                server.abort();
            }
        }
    }
    fatal.abort();
    let failure = fatal.await.ok().flatten();
    node.raft.shutdown().await.ok();
    node.store.sync().context("cannot sync the change store")?;
    match failure {
        Some(why) => Err(anyhow::anyhow!("Raft stopped: {why}; restart the node")),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

/// Waits until Raft reports a fatal error, then cancels `shutdown` and returns the error.
async fn watch_fatal(raft: raft::types::Raft, shutdown: CancellationToken) -> Option<String> {
    let mut metrics = raft.metrics();
    loop {
        if let Err(e) = &metrics.borrow_and_update().running_state {
            let why = e.to_string();
            if !shutdown.is_cancelled() {
                tracing::error!(error = %why, "Raft stopped; shutting the node down");
                shutdown.cancel();
                return Some(why);
            }
            return None;
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return None },
            _ = shutdown.cancelled() => return None,
        }
    }
}
