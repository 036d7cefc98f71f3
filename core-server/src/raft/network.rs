//! Raft RPCs over HTTP: one shared reqwest client (keep-alive) posts JSON to `/raft/*` on the
//! target's listener. A connect failure is `Unreachable`, so openraft backs off; the request
//! timeout is the one openraft passes (the AppendEntries timeout equals the heartbeat).

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::types::{NodeId, TypeConfig};

/// Header carrying the cluster secret on Raft RPCs.
pub const SECRET_HEADER: &str = "x-changeagent-secret";

/// Creates one [`Connection`] per target; all share the HTTP client.
#[derive(Clone)]
pub struct Network {
    client: reqwest::Client,
    secret: Option<String>,
}

impl Network {
    /// A network using `client`, sending `secret` (if any) with every RPC.
    pub fn new(client: reqwest::Client, secret: Option<String>) -> Self {
        Network { client, secret }
    }
}

/// RPCs to one target node.
pub struct Connection {
    client: reqwest::Client,
    secret: Option<String>,
    target: NodeId,
    base: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Connection {
        let base = if node.addr.starts_with("http://") || node.addr.starts_with("https://") {
            node.addr.trim_end_matches('/').to_owned()
        } else {
            format!("http://{}", node.addr)
        };
        Connection {
            client: self.client.clone(),
            secret: self.secret.clone(),
            target,
            base,
        }
    }
}

impl Connection {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let mut builder = self
            .client
            .post(format!("{}{path}", self.base))
            .timeout(option.hard_ttl())
            .json(req);
        if let Some(s) = &self.secret {
            builder = builder.header(SECRET_HEADER, s);
        }
        let resp = builder.send().await.map_err(|e| {
            if e.is_connect() {
                RPCError::Unreachable(Unreachable::new(&e))
            } else {
                RPCError::Network(NetworkError::new(&e))
            }
        })?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            return Err(RPCError::Network(NetworkError::new(
                &std::io::Error::other(format!("raft RPC {path} answered {status}: {text}")),
            )));
        }
        let result: Result<Resp, RaftError<NodeId, E>> = resp
            .json()
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("/raft/append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("/raft/snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("/raft/vote", &rpc, &option).await
    }
}
