//! TLS for every listener (rustls, no OpenSSL), and mutual TLS between the nodes of a
//! cluster.
//!
//! - [`TlsFlags`]: `--tls-cert`/`--tls-key` (PEM). The pair is read again when either file
//!   changes (checked every second), so certificates rotate without a restart; a pair that
//!   does not load (half-written, key of another certificate) is logged and the previous one
//!   stays in use.
//! - [`ServerTls`]: the listener's handshake. With a peer CA (the core's `--peer-ca`) the
//!   server asks every client for a certificate: clients without one (users) are served as
//!   usual, a certificate that CA did not sign fails the handshake, and the requests of a
//!   client whose certificate it signed carry [`PeerCertificate`], which the core requires
//!   on peer routes.
//! - [`peer_client_config`]: the client side of peer links: trusts only the peer CA and
//!   presents the node's own (reloaded) certificate.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

/// A served connection: plain TCP, or TLS over it.
pub type Stream = Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>;

/// A client connection to a peer: plain TCP, or TLS over it.
pub type ClientStream = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// How often the certificate files are checked for changes.
const RELOAD_CHECK: Duration = Duration::from_secs(1);
/// A client must finish its TLS handshake within this after connecting.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The listener's certificate flags, shared by core, edge and checkpointer.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsFlags {
    /// PEM certificate chain (leaf first) this server presents: with it the listener speaks
    /// HTTPS only. Read again when the file changes.
    #[arg(long, env = "CHANGEAGENT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert` (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "CHANGEAGENT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl TlsFlags {
    /// The certificate pair, loaded once now (an error names the file and what to fix);
    /// `None` without `--tls-cert`.
    pub fn load(&self) -> Result<Option<Arc<CertFiles>>, TlsError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(Arc::new(CertFiles::load(cert, key)?))),
            _ => Ok(None),
        }
    }
}

/// Why TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("cannot set up TLS: {0}")]
    Config(String),
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid {
        path: path.to_owned(),
        what: what.to_string(),
    }
}

/// The one crypto provider: ring (no C toolchain beyond what RocksDB needs).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "holds no CERTIFICATE block"));
    }
    Ok(certs)
}

/// The CA certificates of a PEM file as a trust store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certificates(path)? {
        roots
            .add(cert)
            .map_err(|e| invalid(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// A certificate and key pair read from two files, read again when either changes.
#[derive(Debug)]
pub struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// Modification time and length of both files when they were read.
    stamp: Option<(Stamp, Stamp)>,
}

type Stamp = (SystemTime, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl CertFiles {
    /// Reads the pair; the key must belong to the certificate.
    pub fn load(cert: &Path, key: &Path) -> Result<CertFiles, TlsError> {
        let stamps = stamp(cert).zip(stamp(key));
        let loaded = certified_key(cert, key)?;
        Ok(CertFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Loaded {
                key: loaded,
                stamp: stamps,
            }),
        })
    }

    /// The pair in use.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .key
            .clone()
    }

    /// Reads the pair again if either file changed since it was last read; `Ok(true)` when
    /// a new pair is in use. A pair that does not load leaves the previous one in use.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let stamps = stamp(&self.cert).zip(stamp(&self.key));
        let unchanged = {
            let current = self.current.read().unwrap_or_else(|p| p.into_inner());
            stamps.is_none() || current.stamp == stamps
        };
        if unchanged {
            return Ok(false);
        }
        let loaded = certified_key(&self.cert, &self.key);
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        // A failed read is not retried until a file changes again.
        current.stamp = stamps;
        current.key = loaded?;
        Ok(true)
    }

    /// Checks the files every second until `shutdown` (on the blocking pool: they are
    /// files), logging each new pair and each pair that does not load.
    pub fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(RELOAD_CHECK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                let files = self.clone();
                match tokio::task::spawn_blocking(move || files.reload_if_changed()).await {
                    Ok(Ok(true)) => tracing::info!(
                        cert = %self.cert.display(),
                        "TLS certificate changed: new connections get the new one"
                    ),
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => tracing::warn!(
                        "TLS certificate not reloaded, the previous one stays in use: {e}; \
                         write the new pair to temporary files and rename them into place"
                    ),
                    Err(e) => tracing::warn!(error = %e, "TLS certificate check failed"),
                }
            }
        });
    }
}

fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = load_certificates(cert)?;
    let der = std::fs::read(key).map_err(|source| TlsError::Read {
        path: key.to_owned(),
        source,
    })?;
    let private = PrivateKeyDer::from_pem_slice(&der)
        .map_err(|e| invalid(key, format!("not a PEM private key: {e}")))?;
    let signer = provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| invalid(key, format!("unusable private key: {e}")))?;
    let pair = CertifiedKey::new(certs, signer);
    pair.keys_match()
        .map_err(|e| invalid(key, format!("is not the key of {}: {e}", cert.display())))?;
    Ok(Arc::new(pair))
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for CertFiles {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Marks a request whose connection presented a certificate signed by the peer CA: it
/// comes from a member of the cluster (or a node about to join it).
#[derive(Debug, Clone, Copy)]
pub struct PeerCertificate;

/// The TLS side of a listener.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    verifies_peers: bool,
}

impl ServerTls {
    /// Serves `cert`; `alpn` lists the protocols offered (`h2`, `http/1.1`). With
    /// `peer_ca`, clients are asked for a certificate as described in the module docs.
    pub fn new(
        cert: Arc<CertFiles>,
        peer_ca: Option<RootCertStore>,
        alpn: &[&[u8]],
    ) -> Result<ServerTls, TlsError> {
        let config = |e: rustls::Error| TlsError::Config(e.to_string());
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config)?;
        let verifies_peers = peer_ca.is_some();
        let builder = match peer_ca {
            Some(roots) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| TlsError::Config(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut server = builder.with_cert_resolver(cert);
        server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            verifies_peers,
        })
    }

    /// Completes the handshake of an accepted connection (within 10 s); `true` when the
    /// client presented a certificate the peer CA signed.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<(Stream, bool)> {
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let peer = self.verifies_peers && tls.get_ref().1.peer_certificates().is_some();
        Ok((Either::Right(tls), peer))
    }
}

/// `tcp` as served: through `tls`'s handshake when the listener has one.
pub async fn accept(tls: Option<&ServerTls>, tcp: TcpStream) -> io::Result<(Stream, bool)> {
    match tls {
        Some(tls) => tls.accept(tcp).await,
        None => Ok((Either::Left(tcp), false)),
    }
}

/// The client side of peer links: trusts only `peer_ca`, presents `cert`.
pub fn peer_client_config(
    cert: Arc<CertFiles>,
    peer_ca: RootCertStore,
) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(peer_ca)
        .with_client_cert_resolver(cert))
}

/// Opens TLS on `tcp` to `addr` (`host:port`, the name checked against the certificate).
pub async fn connect(
    connector: Option<&TlsConnector>,
    addr: &str,
    tcp: TcpStream,
) -> io::Result<ClientStream> {
    let Some(connector) = connector else {
        return Ok(Either::Left(tcp));
    };
    let host = host_of(addr);
    let name = ServerName::try_from(host.to_owned()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr}: not a host name for TLS: {e}"),
        )
    })?;
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    Ok(Either::Right(tls))
}

/// The host of `host:port` (`[v6]:port` without brackets).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("127.0.0.1:9000"), "127.0.0.1");
        assert_eq!(host_of("core-1:9000"), "core-1");
        assert_eq!(host_of("[::1]:9000"), "::1");
        assert_eq!(host_of("plain"), "plain");
    }

    #[test]
    fn bad_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let e = CertFiles::load(&cert, &key).unwrap_err().to_string();
        assert!(e.contains("cert.pem"), "{e}");
        std::fs::write(&cert, "not pem").unwrap();
        std::fs::write(&key, "not pem").unwrap();
        let e = CertFiles::load(&cert, &key).unwrap_err().to_string();
        assert!(e.contains("no CERTIFICATE"), "{e}");
        let e = load_roots(&cert).unwrap_err().to_string();
        assert!(e.contains("cert.pem"), "{e}");
    }
}
