//! `changeagent-server`: parse flags, set up logs, bind, run until SIGTERM or Ctrl-C.

use std::io::IsTerminal;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Threads for blocking store calls. Reads are short, so a few dozen keep both cores busy;
/// an unbounded pool would start hundreds when thousands of long-polls wake at once.
const MAX_BLOCKING_THREADS: usize = 64;

fn main() -> anyhow::Result<()> {
    let config = changeagent_server::Config::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
        .context("cannot start the async runtime")?
        .block_on(serve(config))
}

async fn serve(config: changeagent_server::Config) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            // openraft warns at every missed heartbeat (20 a second while a member is
            // down); its replication errors, which back off, still show.
            EnvFilter::new(
                "warn,changeagent_server=info,changeagent_store=info,\
                 openraft::core::heartbeat=error",
            )
        }))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    config.validate().map_err(anyhow::Error::msg)?;
    changeagent_api::limits::raise_open_files(config.listener.max_connections);
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; pick another --listen address",
                config.listen
            )
        })?;
    let shutdown = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let token = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        token.cancel();
    });
    changeagent_server::run(config, listener, shutdown).await
}
