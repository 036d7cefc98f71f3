//! Who this node is and which cluster it belongs to: its node id, the cluster id (generated
//! once when a cluster is initialized, persisted on every node) and the optional shared
//! secret. Peer requests (`/raft/*`, membership routes) are checked here.
//!
//! Rules:
//! 1. A node that knows its cluster id refuses peer requests carrying another id (403) and
//!    peer requests carrying none (403): every member sends the id once it has one.
//! 2. A node that does not know its cluster id yet (a new node waiting to be initialized or
//!    added) adopts the id of the first Raft RPC or join answer it sees, and persists it.
//! 3. With a secret configured, every peer request must carry it (401 otherwise).

use std::sync::{Arc, Mutex, RwLock};

use axum::http::{Extensions, HeaderMap};
use changeagent_api::tls::PeerCertificate;
use changeagent_api::ApiError;

use crate::raft::log_store::{write_cluster_id, LogStore};
use crate::raft::types::NodeId;

pub use changeagent_proto::headers::{
    CLUSTER_ID as CLUSTER_ID_HEADER, CLUSTER_SECRET as SECRET_HEADER,
};

/// A peer request the node refuses.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("missing or wrong X-Cluster-Secret; every node of a cluster needs the same --cluster-secret")]
    Secret,
    #[error("{0}")]
    Cluster(String),
    #[error("this cluster's peer links are mutual TLS: connect with a certificate signed by its --peer-ca")]
    Certificate,
}

impl From<PeerError> for ApiError {
    fn from(e: PeerError) -> Self {
        match e {
            PeerError::Secret => ApiError::Unauthorized(e.to_string()),
            PeerError::Cluster(m) => ApiError::Forbidden(m),
            PeerError::Certificate => ApiError::Forbidden(e.to_string()),
        }
    }
}

/// This node's identity; shared by the network, the handlers and start-up.
pub struct Identity {
    pub node_id: NodeId,
    cluster_id: RwLock<Option<Arc<str>>>,
    /// Held while adopting an id, so the synced write happens once and no lock that peer
    /// requests read is held across it.
    adopting: Mutex<()>,
    secret: Option<String>,
    /// Peer links are TLS (`--peer-ca`): member addresses get `https://`, and peer requests
    /// need a certificate the peer CA signed.
    peer_tls: bool,
    /// Peer requests need a certificate the peer CA signed (`--peer-ca`).
    peer_certificates: bool,
    log: LogStore,
}

impl Identity {
    pub fn new(
        node_id: NodeId,
        cluster_id: Option<String>,
        secret: Option<String>,
        log: LogStore,
    ) -> Self {
        Identity {
            node_id,
            cluster_id: RwLock::new(cluster_id.map(Arc::from)),
            adopting: Mutex::new(()),
            secret,
            peer_tls: false,
            peer_certificates: false,
            log,
        }
    }

    /// Makes every peer link TLS (`https://` member addresses), and with `certificates`
    /// requires a peer certificate on peer requests (see [`Identity::check_certificate`]).
    pub fn with_peer_tls(mut self, on: bool, certificates: bool) -> Self {
        self.peer_tls = on;
        self.peer_certificates = certificates;
        self
    }

    /// With `--peer-ca`, a peer request must come on a connection whose client certificate
    /// that CA signed (the listener marked it with [`PeerCertificate`]).
    pub fn check_certificate(&self, extensions: &Extensions) -> Result<(), PeerError> {
        if self.peer_certificates && extensions.get::<PeerCertificate>().is_none() {
            return Err(PeerError::Certificate);
        }
        Ok(())
    }

    /// Whether peer links are TLS.
    pub fn peer_tls(&self) -> bool {
        self.peer_tls
    }

    /// The URL of a member address (which may already carry a scheme): `https://` when peer
    /// links are TLS.
    pub fn base_url(&self, addr: &str) -> String {
        if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.trim_end_matches('/').to_owned()
        } else if self.peer_tls {
            format!("https://{addr}")
        } else {
            format!("http://{addr}")
        }
    }

    /// The cluster id, once known.
    pub fn cluster_id(&self) -> Option<Arc<str>> {
        self.cluster_id
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `id` against the known cluster id; `None` while none is known.
    fn compare(&self, id: &str) -> Option<Result<(), PeerError>> {
        match self.cluster_id().as_deref() {
            Some(mine) if mine == id => Some(Ok(())),
            Some(mine) => Some(Err(PeerError::Cluster(format!(
                "this node belongs to cluster {mine}, not {id}"
            )))),
            None => None,
        }
    }

    /// Sets the cluster id if none is known yet and persists it (a synced write, the first
    /// time only: async code calls [`Identity::adopt_async`]); refuses a different one.
    pub fn adopt(&self, id: &str) -> Result<(), PeerError> {
        if let Some(known) = self.compare(id) {
            return known;
        }
        let _one = self.adopting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = self.compare(id) {
            return known;
        }
        write_cluster_id(&self.log, id)
            .map_err(|e| PeerError::Cluster(format!("cannot persist the cluster id: {e}")))?;
        tracing::info!(cluster_id = id, "joined cluster");
        *self.cluster_id.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::from(id));
        Ok(())
    }

    /// [`Identity::adopt`] with the first-time write on the blocking pool.
    pub async fn adopt_async(self: &Arc<Self>, id: &str) -> Result<(), PeerError> {
        if let Some(known) = self.compare(id) {
            return known;
        }
        let me = self.clone();
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || me.adopt(&id))
            .await
            .map_err(|e| PeerError::Cluster(format!("cannot adopt the cluster id: {e}")))?
    }

    /// Checks the secret of a peer request.
    pub fn check_secret(&self, headers: &HeaderMap) -> Result<(), PeerError> {
        let Some(secret) = &self.secret else {
            return Ok(());
        };
        let given = headers
            .get(SECRET_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if constant_time_eq(given, secret.as_bytes()) {
            Ok(())
        } else {
            Err(PeerError::Secret)
        }
    }

    /// Checks a Raft RPC: secret, then cluster id (adopting it when this node has none).
    pub fn check_rpc(&self, headers: &HeaderMap) -> Result<(), PeerError> {
        match self.rpc_cluster_id(headers)? {
            Some(id) => self.adopt(id),
            None => Ok(()),
        }
    }

    /// [`Identity::check_rpc`] for async code: adopting an id writes on the blocking pool.
    pub async fn check_rpc_async(self: &Arc<Self>, headers: &HeaderMap) -> Result<(), PeerError> {
        match self.rpc_cluster_id(headers)? {
            Some(id) => self.adopt_async(id).await,
            None => Ok(()),
        }
    }

    /// The secret check of a Raft RPC, then the cluster id it carries (to compare or adopt).
    fn rpc_cluster_id<'h>(&self, headers: &'h HeaderMap) -> Result<Option<&'h str>, PeerError> {
        self.check_secret(headers)?;
        let theirs = headers.get(CLUSTER_ID_HEADER).and_then(|v| v.to_str().ok());
        match (self.cluster_id(), theirs) {
            (_, Some(id)) => Ok(Some(id)),
            (Some(mine), None) => Err(PeerError::Cluster(format!(
                "the request carries no X-Cluster-Id; this node belongs to cluster {mine}"
            ))),
            (None, None) => Ok(None),
        }
    }

    /// Checks a request that must come from this cluster (or a node of none): secret, and
    /// an `X-Cluster-Id`, if sent, equal to this node's.
    pub fn check_member(&self, headers: &HeaderMap) -> Result<(), PeerError> {
        self.check_secret(headers)?;
        self.check_cluster_header(headers)
    }

    /// Whether a cluster secret is set.
    pub fn has_secret_set(&self) -> bool {
        self.secret.is_some()
    }

    /// Whether `headers` carry the cluster secret: false when none is set.
    pub fn has_secret(&self, headers: &HeaderMap) -> bool {
        self.secret.is_some() && self.check_secret(headers).is_ok()
    }

    /// Checks an `X-Cluster-Id`, if sent, equals this node's.
    pub fn check_cluster_header(&self, headers: &HeaderMap) -> Result<(), PeerError> {
        let theirs = headers.get(CLUSTER_ID_HEADER).and_then(|v| v.to_str().ok());
        match (self.cluster_id(), theirs) {
            (Some(mine), Some(id)) if *mine != *id => Err(PeerError::Cluster(format!(
                "the request comes from cluster {id}, but this node belongs to cluster {mine}; \
                 a node of another cluster cannot join (wipe its data dir first)"
            ))),
            _ => Ok(()),
        }
    }

    /// Adds this node's cluster id and secret to an outgoing peer request.
    pub fn sign(&self, mut builder: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        for (name, value) in self.peer_headers() {
            builder = builder.header(name, value);
        }
        builder
    }

    /// The headers that sign a peer request: the cluster id once known, and the secret.
    pub fn peer_headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = Vec::with_capacity(2);
        if let Some(id) = self.cluster_id() {
            headers.push((CLUSTER_ID_HEADER, id.to_string()));
        }
        if let Some(s) = &self.secret {
            headers.push((SECRET_HEADER, s.clone()));
        }
        headers
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(cluster: Option<&str>, secret: Option<&str>) -> (tempfile::TempDir, Identity) {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(dir.path()).unwrap();
        let id = Identity::new(7, cluster.map(Into::into), secret.map(Into::into), log);
        (dir, id)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn rpc_from_another_cluster_is_refused() {
        let (_d, id) = identity(Some("a"), None);
        assert!(id.check_rpc(&headers(&[(CLUSTER_ID_HEADER, "a")])).is_ok());
        assert!(matches!(
            id.check_rpc(&headers(&[(CLUSTER_ID_HEADER, "b")])),
            Err(PeerError::Cluster(_))
        ));
        assert!(matches!(
            id.check_rpc(&headers(&[])),
            Err(PeerError::Cluster(_))
        ));
        assert_eq!(id.cluster_id().as_deref(), Some("a"));
    }

    #[test]
    fn a_new_node_adopts_and_persists_the_first_cluster_id() {
        let (dir, id) = identity(None, None);
        id.check_rpc(&headers(&[(CLUSTER_ID_HEADER, "c1")]))
            .unwrap();
        assert_eq!(id.cluster_id().as_deref(), Some("c1"));
        assert!(id
            .check_rpc(&headers(&[(CLUSTER_ID_HEADER, "c2")]))
            .is_err());
        drop(id);
        let log = LogStore::open(dir.path()).unwrap();
        assert_eq!(
            crate::raft::log_store::read_cluster_id(&log)
                .unwrap()
                .as_deref(),
            Some("c1")
        );
    }

    #[test]
    fn the_secret_is_required_when_set() {
        let (_d, id) = identity(Some("a"), Some("s3cret"));
        let ok = headers(&[(CLUSTER_ID_HEADER, "a"), (SECRET_HEADER, "s3cret")]);
        assert!(id.check_rpc(&ok).is_ok());
        let wrong = headers(&[(CLUSTER_ID_HEADER, "a"), (SECRET_HEADER, "s3cre")]);
        assert!(matches!(id.check_rpc(&wrong), Err(PeerError::Secret)));
        assert!(matches!(
            id.check_member(&headers(&[])),
            Err(PeerError::Secret)
        ));
    }
}
