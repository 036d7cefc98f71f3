//! Serving a router on a listener until shutdown, then draining: the listener stops
//! accepting, waiting long-polls answer at once (they watch the same shutdown token), and
//! requests still running after the drain timeout are cut. Either with hyper (`axum::serve`,
//! HTTP/1 and HTTP/2) or with the [`lean`](crate::lean) HTTP/1.1 server for fleets.

use std::time::Duration;

use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A server task started by [`Serving::start`].
pub struct Serving {
    /// The axum server; ends after `shutdown` is cancelled and every connection closed.
    task: JoinHandle<std::io::Result<()>>,
    shutdown: CancellationToken,
}

impl Serving {
    /// Serves `router` on `listener` (TCP_NODELAY on every accepted connection: answers are
    /// small and latency-bound) until `shutdown` is cancelled.
    pub fn start(listener: TcpListener, router: Router, shutdown: CancellationToken) -> Serving {
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        let server = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned());
        Serving {
            task: tokio::spawn(async move { server.await }),
            shutdown,
        }
    }

    /// Serves `router` with the [`lean`](crate::lean) HTTP/1.1 server until `shutdown` is
    /// cancelled.
    pub fn start_lean(
        listener: TcpListener,
        router: Router,
        shutdown: CancellationToken,
        options: crate::lean::LeanOptions,
    ) -> Serving {
        let server = crate::lean::serve(listener, router, shutdown.clone(), options);
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
