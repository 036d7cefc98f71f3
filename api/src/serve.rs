//! Serving a router on a listener until shutdown, then draining: the listener stops
//! accepting, waiting long-polls answer at once (they watch the same shutdown token), and
//! requests still running after the drain timeout are cut. Either with hyper (HTTP/1 and
//! HTTP/2; [`Serving::start_on`] serves each connection on the runtime picked for its peer's
//! address) or with the [`lean`](crate::lean) HTTP/1.1 server for fleets. Both enforce the
//! listener's [`ListenerLimits`]: a connection over `max_connections` is closed at accept,
//! one without a whole first request head within `header_read_timeout` (TLS handshake
//! included) is closed. Either one speaks TLS when given a [`ServerTls`].

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::limits::{ListenerLimits, KEEP_ALIVE_IDLE};
use crate::metrics::{ConnectionGuard, HttpMetrics};
use crate::tls::{PeerCertificate, ServerTls};

/// Picks the runtime that serves a connection from a peer address; `None` is the runtime
/// the server runs on.
pub type RuntimeFor = Arc<dyn Fn(SocketAddr) -> Option<tokio::runtime::Handle> + Send + Sync>;

/// Pause after a failed accept (out of file descriptors, say) before the next one.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// A server task started by [`Serving::start`].
pub struct Serving {
    /// The accept loop (or the lean server); ends after `shutdown` is cancelled and every
    /// connection closed.
    task: JoinHandle<std::io::Result<()>>,
    shutdown: CancellationToken,
}

impl Serving {
    /// Serves `router` on `listener` (TCP_NODELAY on every accepted connection: answers are
    /// small and latency-bound; through `tls`'s handshake when given) until `shutdown` is
    /// cancelled, within `limits`; connections are counted in `metrics`.
    pub fn start(
        listener: TcpListener,
        router: Router,
        shutdown: CancellationToken,
        tls: Option<ServerTls>,
        limits: ListenerLimits,
        metrics: Arc<HttpMetrics>,
    ) -> Serving {
        let everyone_here: RuntimeFor = Arc::new(|_| None);
        Serving::start_on(
            listener,
            router,
            shutdown,
            tls,
            limits,
            metrics,
            everyone_here,
        )
    }

    /// [`Serving::start`], but each connection is served on the runtime `runtime_for` picks
    /// for its peer's address: a core serves its peers' Raft RPCs on Raft's own runtime, so
    /// a flood of client requests never delays reading a heartbeat. A connection given a
    /// runtime is a member's: it is never refused over `max_connections` (it still counts).
    pub fn start_on(
        listener: TcpListener,
        router: Router,
        shutdown: CancellationToken,
        tls: Option<ServerTls>,
        limits: ListenerLimits,
        metrics: Arc<HttpMetrics>,
        runtime_for: RuntimeFor,
    ) -> Serving {
        let listen = Listen {
            tls,
            limits,
            metrics,
            runtime_for,
        };
        Serving {
            task: tokio::spawn(accept_loop(listener, router, shutdown.clone(), listen)),
            shutdown,
        }
    }

    /// Serves `router` with the [`lean`](crate::lean) HTTP/1.1 server until `shutdown` is
    /// cancelled, within `limits`; connections are counted in `metrics`.
    pub fn start_lean(
        listener: TcpListener,
        router: Router,
        shutdown: CancellationToken,
        tls: Option<ServerTls>,
        options: crate::lean::LeanOptions,
        limits: ListenerLimits,
        metrics: Arc<HttpMetrics>,
    ) -> Serving {
        let server = crate::lean::serve(
            listener,
            router,
            shutdown.clone(),
            tls,
            options,
            limits,
            metrics,
        );
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

/// How a hyper listener treats its connections.
struct Listen {
    tls: Option<ServerTls>,
    limits: ListenerLimits,
    metrics: Arc<HttpMetrics>,
    runtime_for: RuntimeFor,
}

/// Accepts connections until `shutdown`, each served on its picked runtime; then asks every
/// connection to finish (hyper's graceful shutdown) and waits until all have.
async fn accept_loop(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    listen: Listen,
) -> std::io::Result<()> {
    // Dropping `signal_rx` tells the connections to finish; each holds a `close_rx` until
    // it has, so `close_tx.closed()` waits for the last one.
    let (signal_tx, signal_rx) = watch::channel(());
    let (close_tx, close_rx) = watch::channel(());
    let builder = http_builder();
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
        let runtime = (listen.runtime_for)(peer);
        // Over the limit the socket is dropped (closed) before anything is read from it.
        let Some(open) = listen
            .metrics
            .connection(listen.limits.max_connections, runtime.is_some())
        else {
            tracing::debug!(%peer, "--max-connections reached; closing a new connection");
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let connection = Connection {
            tls: listen.tls.clone(),
            router: router.clone(),
            builder: builder.clone(),
            header_read_timeout: listen.limits.header_read_timeout,
            client: peer,
            metrics: listen.metrics.clone(),
            signal_tx: signal_tx.clone(),
            _close_rx: close_rx.clone(),
            _open: open,
        };
        match runtime {
            None => drop(tokio::spawn(connection.serve(tcp))),
            // The socket moves to the other runtime's I/O driver too, so its readiness is
            // delivered there, not by this (possibly busy) runtime.
            Some(runtime) => match tcp.into_std() {
                Ok(std) => drop(runtime.spawn(async move {
                    match TcpStream::from_std(std) {
                        Ok(tcp) => connection.serve(tcp).await,
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

/// hyper's HTTP/1 and HTTP/2 server. Its own header read timeout runs from the moment a
/// connection waits for a request head, idle keep-alive included, so it is set to
/// [`KEEP_ALIVE_IDLE`] (the idle limit); the first head's tighter limit is
/// [`Connection::serve`]'s own timer.
fn http_builder() -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(KEEP_ALIVE_IDLE);
    builder
}

/// The address a request's connection came from: an extension of requests that ask to
/// upgrade the connection (a peer stream), the only ones that need it.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// One accepted hyper connection.
struct Connection {
    tls: Option<ServerTls>,
    router: Router,
    builder: Builder<TokioExecutor>,
    header_read_timeout: Duration,
    /// The client's address, given to upgrade requests as [`ClientAddr`].
    client: SocketAddr,
    metrics: Arc<HttpMetrics>,
    /// Closed (by the accept loop dropping the receiver) when the server stops: finish.
    signal_tx: watch::Sender<()>,
    /// Dropped when this connection ended; the accept loop waits for all of them.
    _close_rx: watch::Receiver<()>,
    /// Counts this connection as open until hyper is done with it (a member's peer stream
    /// leaves the count once upgraded; members are never refused anyway).
    _open: ConnectionGuard,
}

impl Connection {
    /// Serves one connection (HTTP/1 or HTTP/2, after the TLS handshake when the listener
    /// has TLS) until it ends; closes it when its first request head has not arrived within
    /// the header read timeout (from accept, so a TLS handshake or an HTTP/2 preface that
    /// never comes is covered too); when told to finish, lets its running requests answer
    /// and closes it.
    async fn serve(self, tcp: TcpStream) {
        let mut head_by = pin!(tokio::time::sleep(self.header_read_timeout));
        let handshake = tokio::select! {
            accepted = crate::tls::accept(self.tls.as_ref(), tcp) => accepted,
            _ = self.signal_tx.closed() => return,
            _ = head_by.as_mut() => {
                self.metrics.header_timeout();
                tracing::debug!("no TLS handshake within --header-read-timeout; closing");
                return;
            }
        };
        let (stream, peer) = match handshake {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                return;
            }
        };
        let head = Arc::new(Notify::new());
        let seen = head.clone();
        let client = self.client;
        let service = TowerToHyperService::new(self.router.map_request(
            move |req: hyper::Request<Incoming>| {
                seen.notify_one();
                let mut req = req.map(Body::new);
                if peer {
                    req.extensions_mut().insert(PeerCertificate);
                }
                // Only a request that takes the connection over needs to know whose it is.
                if req.headers().contains_key(hyper::header::UPGRADE) {
                    req.extensions_mut().insert(ClientAddr(client));
                }
                req
            },
        ));
        let mut conn = pin!(self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service));
        let mut waiting_head = true;
        let finishing = loop {
            tokio::select! {
                result = conn.as_mut() => break Some(result),
                _ = self.signal_tx.closed() => break None,
                _ = head.notified(), if waiting_head => waiting_head = false,
                _ = head_by.as_mut(), if waiting_head => {
                    self.metrics.header_timeout();
                    tracing::debug!("no request head within --header-read-timeout; closing");
                    return;
                }
            }
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
    }
}
