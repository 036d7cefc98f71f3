//! Serving a router on a listener until shutdown, then draining: the listener stops
//! accepting, waiting long-polls answer at once (they watch the same shutdown token), and
//! requests still running after the drain timeout are cut. Either with hyper (HTTP/1 and
//! HTTP/2; [`Serving::start_on`] serves each connection on the runtime picked for its peer's
//! address) or with the [`lean`](crate::lean) HTTP/1.1 server for fleets; either one over
//! TLS when given a [`ServerTls`].

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::tls::{PeerCertificate, ServerTls};

/// Picks the runtime that serves a connection from a peer address; `None` is the runtime
/// the server runs on.
pub type RuntimeFor = Arc<dyn Fn(SocketAddr) -> Option<tokio::runtime::Handle> + Send + Sync>;

/// Pause after a failed accept (out of file descriptors, say) before the next one.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// A server task started by [`Serving::start`].
pub struct Serving {
    /// The axum server; ends after `shutdown` is cancelled and every connection closed.
    task: JoinHandle<std::io::Result<()>>,
    shutdown: CancellationToken,
}

impl Serving {
    /// Serves `router` on `listener` (TCP_NODELAY on every accepted connection: answers are
    /// small and latency-bound; through `tls`'s handshake when given) until `shutdown` is
    /// cancelled.
    pub fn start(
        listener: TcpListener,
        router: Router,
        shutdown: CancellationToken,
        tls: Option<ServerTls>,
    ) -> Serving {
        Serving::start_on(listener, router, shutdown, tls, Arc::new(|_| None))
    }

    /// [`Serving::start`], but each connection is served on the runtime `runtime_for` picks
    /// for its peer's address: a core serves its peers' Raft RPCs on Raft's own runtime, so
    /// a flood of client requests never delays reading a heartbeat.
    pub fn start_on(
        listener: TcpListener,
        router: Router,
        shutdown: CancellationToken,
        tls: Option<ServerTls>,
        runtime_for: RuntimeFor,
    ) -> Serving {
        Serving {
            task: tokio::spawn(accept_loop(
                listener,
                router,
                shutdown.clone(),
                tls,
                runtime_for,
            )),
            shutdown,
        }
    }

    /// Serves `router` with the [`lean`](crate::lean) HTTP/1.1 server until `shutdown` is
    /// cancelled.
    pub fn start_lean(
        listener: TcpListener,
        router: Router,
        shutdown: CancellationToken,
        tls: Option<ServerTls>,
        options: crate::lean::LeanOptions,
    ) -> Serving {
        let server = crate::lean::serve(listener, router, shutdown.clone(), tls, options);
        Serving {
            task: tokio::spawn(server),
            shutdown,
        }
    }

    /// Runs until the server fails (an error) or `shutdown` is cancelled; then waits up to
    /// `drain` for running requests to finish and cuts the rest.
    pub async fn until_shutdown(mut self, drain: Duration) -> Result<(), ServeError> {
        tokio::select! {
            result = &mut self.task => {
                return match result {
                    Ok(r) => r.map_err(ServeError::Serve),
                    Err(e) => Err(ServeError::Task(e.to_string())),
                };
            }
            _ = self.shutdown.cancelled() => {}
        }
        tracing::info!("shutting down: draining requests");
        if tokio::time::timeout(drain, &mut self.task).await.is_err() {
            tracing::warn!("requests still running after {drain:?}; closing them");
            self.task.abort();
        }
        Ok(())
    }

    /// Stops serving at once, cutting every connection.
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// Why serving stopped before shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("the HTTP server task failed: {0}")]
    Task(String),
}

/// Accepts connections until `shutdown`, each served on its picked runtime; then asks every
/// connection to finish (hyper's graceful shutdown) and waits until all have.
async fn accept_loop(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    tls: Option<ServerTls>,
    runtime_for: RuntimeFor,
) -> std::io::Result<()> {
    // Dropping `signal_rx` tells the connections to finish; each holds a `close_rx` until
    // it has, so `close_tx.closed()` waits for the last one.
    let (signal_tx, signal_rx) = watch::channel(());
    let (close_tx, close_rx) = watch::channel(());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept a connection; retrying");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let (router, signal_tx, close_rx) = (router.clone(), signal_tx.clone(), close_rx.clone());
        let tls = tls.clone();
        match runtime_for(peer) {
            None => drop(tokio::spawn(serve_connection(
                tcp, tls, router, signal_tx, close_rx,
            ))),
            // The socket moves to the other runtime's I/O driver too, so its readiness is
            // delivered there, not by this (possibly busy) runtime.
            Some(runtime) => match tcp.into_std() {
                Ok(std) => drop(runtime.spawn(async move {
                    match TcpStream::from_std(std) {
                        Ok(tcp) => serve_connection(tcp, tls, router, signal_tx, close_rx).await,
                        Err(e) => tracing::warn!(error = %e, "cannot move a connection"),
                    }
                })),
                Err(e) => tracing::warn!(error = %e, "cannot move a connection"),
            },
        }
    }
    drop((signal_rx, close_rx));
    close_tx.closed().await;
    Ok(())
}

/// Serves one connection (HTTP/1 or HTTP/2, after the TLS handshake when the listener has
/// TLS) until it ends; when told to finish, lets its running requests answer and closes it.
async fn serve_connection(
    tcp: TcpStream,
    tls: Option<ServerTls>,
    router: Router,
    signal_tx: watch::Sender<()>,
    close_rx: watch::Receiver<()>,
) {
    let handshake = tokio::select! {
        accepted = crate::tls::accept(tls.as_ref(), tcp) => accepted,
        _ = signal_tx.closed() => return,
    };
    let (stream, peer) = match handshake {
        Ok(accepted) => accepted,
        Err(e) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            return;
        }
    };
    let service =
        TowerToHyperService::new(router.map_request(move |req: hyper::Request<Incoming>| {
            let mut req = req.map(Body::new);
            if peer {
                req.extensions_mut().insert(PeerCertificate);
            }
            req
        }));
    let builder = Builder::new(TokioExecutor::new());
    let mut conn = pin!(builder.serve_connection_with_upgrades(TokioIo::new(stream), service));
    let finishing = tokio::select! {
        result = conn.as_mut() => Some(result),
        _ = signal_tx.closed() => None,
    };
    let result = match finishing {
        Some(result) => result,
        None => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::trace!(error = %e, "connection ended with an error");
    }
    drop(close_rx);
}
