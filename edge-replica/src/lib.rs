//! ChangeAgent's edge replica: bootstraps its own change store from a checkpoint, tails its
//! upstream (core nodes or another edge) with long-polls, applying every change with the
//! upstream's `_id` and bytes, and serves the read API to large fleets of consumers with the
//! core's bytes. Writes are forwarded upstream unchanged.
//!
//! # Layout
//! - [`config`]: flags and environment variables.
//! - [`bootstrap`]: loading a checkpoint and the upstream's retained changes into a fresh
//!   store generation, swapped in whole.
//! - [`tail`]: the [`TailWorker`](tail::TailWorker) that keeps the store current and
//!   re-bootstraps on a 410.
//! - [`forward`]: writes sent upstream with the client's own headers.
//! - [`status`]: `/health`, `/metrics` and the read barrier of `consistent=true`.

pub mod bootstrap;
pub mod config;
pub mod forward;
pub mod status;
pub mod tail;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::routing::get;
use axum::Router;
use changeagent_api::lean::LeanOptions;
use changeagent_api::serve::Serving;
use changeagent_api::tls::ServerTls;
use changeagent_api::{HttpMetrics, ReadApi, ReadLimits};
use changeagent_client::Client;
use changeagent_store::{Objects, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Temp files (downloads, spooled changes), cleared at start.
const TMP_DIR: &str = "tmp";
/// The store's directory in the data dir.
const STORE_DIR: &str = "store";
/// Where checkpoints downloaded through the upstream are mirrored when there is no
/// `--object-store`, in the data dir.
const MIRROR_DIR: &str = "checkpoints";

/// What the workers and handlers share.
pub struct Context {
    pub config: Config,
    pub store: Arc<Store>,
    /// The checkpointers' object store (`--object-store`), or the local mirror.
    pub objects: Arc<Objects>,
    /// The local mirror's directory when `objects` is that mirror (no `--object-store`): the
    /// edge fills it with the checkpoints its upstream records.
    pub mirror: Option<PathBuf>,
    /// The upstream, for tailing and bootstrapping (this edge's own requests).
    pub client: Client,
    pub status: Arc<status::Status>,
    /// Sends writes upstream.
    pub forwarder: forward::Forwarder,
}

impl Context {
    /// A temp file in the data dir (checkpoints can be large; the data dir is where the
    /// operator planned for room).
    pub fn temp_file(&self) -> anyhow::Result<tempfile::NamedTempFile> {
        tempfile::NamedTempFile::new_in(self.config.data_dir.join(TMP_DIR))
            .context("cannot create a temp file in the data dir")
    }
}

/// Runs an edge serving on `listener` until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let data_dir = config.data_dir.clone();
    let tmp = data_dir.join(TMP_DIR);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp)
        .with_context(|| format!("cannot create the data dir {}", data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&data_dir)
        .with_context(|| format!("cannot resolve the data dir {}", data_dir.display()))?;
    let store = Store::open(data_dir.join(STORE_DIR)).with_context(|| {
        format!(
            "cannot open the edge's store in {} (is another edge using it?)",
            data_dir.display()
        )
    })?;
    let (objects, mirror) = match &config.object_store {
        Some(url) => (Objects::from_url(url)?, None),
        None => {
            let dir = data_dir.join(MIRROR_DIR);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            (
                Objects::from_url(&format!("file://{}", dir.display()))?,
                Some(dir),
            )
        }
    };
    let auth = Arc::new(config.auth.load()?);
    auth.clone().watch(shutdown.clone());
    let roots = config.upstream_ca.certificates()?;
    let server_tls = match config.tls.load()? {
        Some(cert) => {
            cert.clone().watch(shutdown.clone());
            Some(ServerTls::new(cert, None, &[b"http/1.1"])?)
        }
        None => None,
    };
    let client = Client::builder(&config.upstream)
        .checkpoint_dir(&tmp)
        .token(config.upstream_token.token()?)
        .root_certificates(roots.clone())
        .build()
        .context("bad --upstream")?;
    let status = Arc::new(status::Status::new(config.upstream.clone()));
    let metrics = Arc::new(HttpMetrics::default());
    let ctx = Arc::new(Context {
        config,
        store: store.clone(),
        objects: Arc::new(objects),
        mirror,
        client,
        status,
        forwarder: forward::Forwarder::new(roots).context("cannot build the forwarding client")?,
    });

    let api = Arc::new(ReadApi {
        store: store.clone(),
        limits: ReadLimits {
            max_block_secs: ctx.config.max_block_secs,
            max_long_polls: ctx.config.max_long_polls,
        },
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        barrier: Some(Arc::new(status::UpstreamBarrier { ctx: ctx.clone() })),
        objects: Some(ctx.objects.clone()),
    });
    let ops = Router::new()
        .route("/health", get(status::health))
        .route("/metrics", get(status::metrics))
        .with_state(status::Shared {
            ctx: ctx.clone(),
            metrics: metrics.clone(),
        });
    let router =
        changeagent_api::with_fallbacks(changeagent_api::read_router(api).merge(ops)).layer(
            axum::middleware::from_fn_with_state(ctx.clone(), forward::writes_upstream),
        );
    let router = changeagent_api::outer_layers(router, auth, store.clone(), metrics.clone());

    // An empty store serves nothing until it holds the upstream's state: answering an empty
    // list would tell consumers that nothing exists.
    if store.last_id() == 0 && !first_bootstrap(&ctx, &shutdown).await {
        return Ok(());
    }
    let workers = shutdown.child_token();
    let tail = tokio::spawn(tail::TailWorker { ctx: ctx.clone() }.run(workers.clone()));
    let serving = Serving::start_lean(
        listener,
        router,
        shutdown.clone(),
        server_tls,
        LeanOptions {
            max_body_bytes: ctx.config.max_body_bytes,
            ..LeanOptions::default()
        },
        ctx.config.listener.limits(),
        metrics,
    );
    tracing::info!(upstream = ?ctx.config.upstream, "listening on {addr}");
    let result = serving
        .until_shutdown(Duration::from_secs(ctx.config.drain_secs))
        .await;
    workers.cancel();
    let _ = tail.await;
    store.sync()?;
    result?;
    tracing::info!("stopped");
    Ok(())
}

/// Bootstraps an empty store before the edge serves, retrying with backoff until it works;
/// false when `shutdown` came first.
async fn first_bootstrap(ctx: &Context, shutdown: &CancellationToken) -> bool {
    let mut delays = tail::backoff();
    loop {
        let attempt = tokio::select! {
            r = bootstrap::bootstrap(ctx, None) => r,
            _ = shutdown.cancelled() => return false,
        };
        match attempt {
            Ok(outcome) => {
                tracing::info!(?outcome, "ready to serve");
                return true;
            }
            Err(e) => {
                let delay = delays.next().unwrap_or(tail::MAX_RETRY_DELAY);
                tracing::error!(
                    error = format!("{e:#}"),
                    ?delay,
                    "cannot bootstrap from the upstream yet; check --upstream, and --ca for https (retrying)"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return false,
                }
            }
        }
    }
}
