//! `changeagent-edge`: parse flags, set up logs, bind, run until SIGTERM or Ctrl-C.

use std::io::IsTerminal;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = changeagent_edge::Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            EnvFilter::new("warn,changeagent_edge=info,changeagent_store=info,changeagent_api=info")
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
    changeagent_edge::run(config, listener, shutdown).await
}
