//! ChangeAgent's checkpointer: tails the core into its own change store (which keeps
//! everything a checkpoint holds and is never truncated), and every so many changes or
//! seconds writes a zstd checkpoint of its scope to object storage, records it at the core
//! with start and end records, and lets the core truncate the changes the checkpoint holds.
//!
//! # Layout
//! - [`config`]: flags and environment variables.
//! - [`tail`]: the [`TailWorker`](tail::TailWorker) that keeps the copy current, and the
//!   bootstrap from a checkpoint.
//! - [`cycle`]: the [`CheckpointWorker`](cycle::CheckpointWorker) and the steps of one
//!   checkpoint.
//! - [`status`]: `/health` and `/metrics`.

pub mod config;
pub mod cycle;
pub mod status;
pub mod tail;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use changeagent_api::serve::Serving;
use changeagent_api::tls::ServerTls;
use changeagent_api::HttpMetrics;
use changeagent_client::Client;
use changeagent_store::{Objects, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// The file holding this checkpointer's id, in its data dir.
const ID_FILE: &str = "checkpointer-id";
/// Temp files (exports, downloads), cleared at start.
const TMP_DIR: &str = "tmp";
/// How long shutdown waits for `/health` requests to finish.
const DRAIN: Duration = Duration::from_secs(2);

/// What the workers share.
pub struct Context {
    pub config: Config,
    pub store: Arc<Store>,
    pub objects: Arc<Objects>,
    pub client: Client,
    pub status: Arc<status::Status>,
    /// Generated once and kept in the data dir: the core knows a restarted checkpointer's
    /// open start as its own.
    pub id: String,
    /// The core's cluster id.
    pub cluster_id: String,
    /// Set once `--stop-at` fired, so it fires once.
    stopped: AtomicBool,
}

impl Context {
    /// A temp file in the data dir (exports and downloads can be large; the data dir is where
    /// the operator planned for room).
    pub fn temp_file(&self) -> anyhow::Result<tempfile::NamedTempFile> {
        tempfile::NamedTempFile::new_in(self.config.data_dir.join(TMP_DIR))
            .context("cannot create a temp file in the data dir")
    }

    /// The `--stop-at` test hook: stops the whole process with SIGSTOP at `step`, once, so
    /// a test can kill it exactly there.
    pub fn stop_at(&self, step: &str) {
        if self.config.stop_at.as_deref() == Some(step)
            && !self.stopped.swap(true, Ordering::SeqCst)
        {
            tracing::warn!(step, "stopping at step {step} (--stop-at)");
            if let Err(e) = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP) {
                tracing::error!(error = %e, "cannot stop");
            }
        }
    }
}

/// Reads this checkpointer's id, creating it on first start.
fn checkpointer_id(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let id = format!("ckpt-{}", uuid::Uuid::new_v4().simple());
    let tmp = data_dir.join(format!("{ID_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(id.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(data_dir)?.sync_all()
    };
    write().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

/// Runs a checkpointer serving `/health` on `listener` until `shutdown` is cancelled (or,
/// with `--once`, until it wrote one checkpoint).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let data_dir: PathBuf = config.data_dir.clone();
    let tmp = data_dir.join(TMP_DIR);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp)
        .with_context(|| format!("cannot create the data dir {}", data_dir.display()))?;
    let id = checkpointer_id(&data_dir)?;
    let store = Store::open(data_dir.join("store")).with_context(|| {
        format!(
            "cannot open the checkpointer's store in {} (is another checkpointer using it?)",
            data_dir.display()
        )
    })?;
    let objects = Arc::new(Objects::from_url(&config.object_store)?);
    let client = Client::builder(&config.core)
        .cluster_secret(config.secret()?)
        .token(config.token.token()?)
        .root_certificates(config.ca.certificates()?)
        .checkpoint_dir(&tmp)
        .build()
        .context("bad --core")?;
    let status = Arc::new(status::Status::new(
        id.clone(),
        config.scope.clone(),
        config.core.clone(),
    ));
    let auth = Arc::new(config.auth.load()?);
    auth.clone().watch(shutdown.clone());
    let http = Arc::new(HttpMetrics::default());
    let router = status::router(status.clone(), store.clone(), http.clone()).layer(
        axum::middleware::from_fn_with_state(auth, changeagent_api::auth::layer),
    );
    let tls = match config.tls.load()? {
        Some(cert) => {
            cert.clone().watch(shutdown.clone());
            Some(ServerTls::new(cert, None, &[b"h2", b"http/1.1"])?)
        }
        None => None,
    };
    let server = Serving::start(
        listener,
        router,
        shutdown.clone(),
        tls,
        config.listener.limits(),
        http,
    );
    tracing::info!(%id, scope = %config.scope, "listening on {addr}");

    let Some(health) = cycle::retry_until(&shutdown, "the cluster id", || async {
        let h = client.health().await?;
        Ok(h)
    })
    .await
    else {
        return Ok(());
    };
    let cluster_id = health
        .cluster_id
        .context("the core has no cluster id yet; is it initialized?")?;
    match store.cluster_id() {
        Some(mine) if mine != cluster_id && store.last_id() > 0 => anyhow::bail!(
            "the data dir {} holds a copy of cluster {mine}, but the core belongs to cluster \
             {cluster_id}; give this checkpointer a new --data-dir",
            data_dir.display()
        ),
        _ => {}
    }
    let ctx = Arc::new(Context {
        config,
        store: store.clone(),
        objects,
        client,
        status,
        id,
        cluster_id,
        stopped: AtomicBool::new(false),
    });
    if store.last_id() == 0 {
        match ctx
            .client
            .latest_checkpoint(&changeagent_proto::Scope::All)
            .await
        {
            Ok(Some(m)) => tail::bootstrap(&ctx, Some(m)).await?,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot ask the core for a checkpoint; tailing from the start")
            }
        }
    }
    {
        let mut txn = store.begin();
        txn.set_cluster_id(&ctx.cluster_id)?;
        store.commit(txn)?;
    }
    let workers = shutdown.child_token();
    let tail = tokio::spawn(tail::TailWorker { ctx: ctx.clone() }.run(workers.clone()));
    let result = cycle::CheckpointWorker { ctx: ctx.clone() }
        .run(workers.clone())
        .await;
    workers.cancel();
    let _ = tail.await;
    shutdown.cancel();
    if let Err(e) = server.until_shutdown(DRAIN).await {
        tracing::warn!(error = %e, "the HTTP server failed");
    }
    store.sync()?;
    result?;
    tracing::info!("stopped");
    Ok(())
}
