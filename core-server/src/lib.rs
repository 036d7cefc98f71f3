//! ChangeAgent's core node: an openraft node whose log lives in RocksDB and whose state
//! machine is the change store, serving the write, read and ops API over HTTP.
//!
//! # Layout
//! - [`config`]: flags and environment variables.
//! - [`node`]: storage, node id, Raft start-up, cluster formation (peers file or join).
//! - [`identity`]: node id, cluster id and secret; checks on peer requests.
//! - [`raft`]: Raft types, log store, state machine, HTTP transport.
//! - [`proposer`]: groups concurrent writes into one Raft entry.
//! - [`http`]: routes and handlers.
//! - [`restore`]: a new cluster from a checkpoint (`--restore-from`).
//! - [`stages`]: where a write's time goes (histograms in `/metrics`).

pub mod config;
pub mod http;
pub mod identity;
pub mod node;
pub mod proposer;
pub mod raft;
pub mod restore;
pub mod stages;

use openraft::async_runtime::WatchReceiver;
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use changeagent_api::serve::{RuntimeFor, Serving};
use changeagent_api::tls::{self, CertFiles, ServerTls};
use changeagent_api::{HttpMetrics, ReadApi, ReadLimits};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

/// How long start-up waits for a leader and a cluster id before serving anyway.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping node waits for its peer streams to end after Raft stopped.
const PEER_STREAMS_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs a core node on `listener` until `shutdown` is cancelled, then drains and stops.
///
/// Shutdown order: 1. a leader hands leadership over while it still serves (long-polls
/// answer at once); 2. stop accepting and let requests finish, up to the drain timeout;
/// 3. shut Raft down; 4. sync the change store.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener
        .local_addr()
        .context("listener has no local address")?;
    let advertise = config.advertise.clone().unwrap_or_else(|| addr.to_string());
    let tls = Tls::load(&config)?;
    let client = peer_client(addr, tls.peer_client.as_deref())?;
    let raft_runtime = RaftRuntime::start()?;
    // Raft RPCs get a client of their own: its connections are driven on Raft's runtime.
    let raft_client = peer_client(addr, tls.peer_client.as_deref())?;
    // Peer streams, like the clients, connect from the address this node listens on.
    let local_ip = Some(addr.ip()).filter(|ip| !ip.is_unspecified());
    let node = node::start(
        &config,
        &advertise,
        raft_client,
        local_ip,
        tls.peer_client
            .clone()
            .map(tokio_rustls::TlsConnector::from),
        raft_runtime.handle(),
    )
    .await?;
    if let Some(cert) = &tls.cert {
        cert.clone().watch(shutdown.clone());
    }
    let proposer = proposer::Proposer::start(node.raft.clone(), raft_runtime.handle());
    let metrics = Arc::new(HttpMetrics::default());
    let config = Arc::new(config);
    let barrier = http::consistent::LeaderBarrier {
        raft: node.raft.clone(),
        identity: node.identity.clone(),
        client: client.clone(),
        timeout: config.write_timeout(),
    };
    let read = Arc::new(ReadApi {
        store: node.store.clone(),
        limits: ReadLimits {
            max_block_secs: config.max_block_secs,
            max_long_polls: config.max_long_polls,
        },
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        barrier: Some(Arc::new(barrier)),
        objects: Some(node.objects.clone()),
    });
    // Connections from members (Raft RPCs, forwarded writes) are served on Raft's runtime,
    // and never refused over `--max-connections`: a full listener must not cut the cluster.
    let member_ips = Arc::new(MemberIps::default());
    let configured = configured_members(&config)?;
    let first = member_addrs(
        &node
            .raft
            .server_metrics()
            .borrow_watched()
            .membership_config,
        &configured,
    );
    member_ips.set(resolve_ips(&first).await);
    tokio::spawn(watch_member_ips(
        node.raft.clone(),
        member_ips.clone(),
        configured,
        shutdown.clone(),
    ));
    // Serving stops after a stopping leader has handed over (see `hand_over`).
    let serving = CancellationToken::new();
    let peer_streams = TaskTracker::new();
    let app = Arc::new(http::AppState {
        node_id: node.id,
        identity: node.identity.clone(),
        raft: node.raft.clone(),
        proposer: proposer.clone(),
        store: node.store.clone(),
        config: config.clone(),
        metrics: metrics.clone(),
        client: client.clone(),
        snapshot_dir: node.snapshot_dir.clone(),
        shutdown: shutdown.clone(),
        serving: serving.clone(),
        peer_streams: peer_streams.clone(),
        applied: node.applied.clone(),
        is_member: {
            let ips = member_ips.clone();
            Arc::new(move |ip| ips.contains(ip))
        },
    });
    let auth = {
        let identity = node.identity.clone();
        let auth =
            config
                .auth
                .load()?
                .with_secret(Arc::new(move |headers: &axum::http::HeaderMap| {
                    identity.has_secret(headers)
                }));
        if auth.enabled() && !node.identity.has_secret_set() {
            tracing::warn!(
                "--auth-file without a cluster secret: Raft RPCs and joins between nodes are                  still open to anyone who can reach this port; set --cluster-secret-file"
            );
        }
        Arc::new(auth)
    };
    auth.clone().watch(shutdown.clone());
    let router = http::routes::router(app, read, auth);
    let server = Serving::start_on(
        listener,
        router,
        serving.clone(),
        tls.server,
        config.listener.limits(),
        metrics,
        member_ips.runtime_for(raft_runtime.handle().clone()),
    );
    let stopping = tokio::spawn({
        let raft = node.raft.clone();
        let proposer = proposer.clone();
        let shutdown = shutdown.clone();
        let probe = Duration::from_millis(config.election_timeout_max_ms());
        async move {
            shutdown.cancelled().await;
            if raft.metrics().borrow_watched().running_state.is_ok() {
                hand_over(&raft, &proposer, probe, HAND_OVER_TIMEOUT).await;
            }
            serving.cancel();
        }
    });

    let forming = node::form(
        config.clone(),
        node.raft.clone(),
        node.identity.clone(),
        advertise.clone(),
        client,
    );
    let mut forming = tokio::spawn(forming);
    let ready = node::ensure_cluster_id(
        node.identity.clone(),
        node.raft.clone(),
        node.store.clone(),
        proposer,
    );
    let ready_by = tokio::time::sleep(READY_TIMEOUT);
    tokio::pin!(ready, ready_by);
    // Formation failing (refused join, peer of another cluster) stops the node.
    let mut formed = false;
    loop {
        tokio::select! {
            _ = &mut ready => break,
            _ = &mut ready_by => {
                tracing::warn!("no leader or cluster id after {READY_TIMEOUT:?}; serving anyway");
                break;
            }
            result = &mut forming, if !formed => {
                formed = true;
                let failure = match result {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("{e:#}")),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(why) = failure {
                    tracing::error!("{why}");
                    stopping.abort();
                    shutdown.cancel();
                    server.abort();
                    node.raft.shutdown().await.ok();
                    return Err(anyhow::anyhow!("{why}"));
                }
            }
        }
    }
    tracing::info!(node_id = node.id, %advertise, "listening on {addr}");
    // A formation still running (a join waiting to be promoted) can still be refused.
    let formation = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            if formed {
                return None;
            }
            let why = match forming.await {
                Ok(Ok(())) => return None,
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) => e.to_string(),
            };
            tracing::error!("{why}");
            shutdown.cancel();
            Some(why)
        }
    });

    // A Raft node that stopped on a storage error cannot serve writes again: stop the whole
    // process (exit non-zero) so a supervisor restarts it, rather than answer 503 forever.
    let fatal = tokio::spawn(watch_fatal(node.raft.clone(), shutdown.clone()));

    server
        .until_shutdown(Duration::from_millis(config.drain_timeout_ms))
        .await?;
    fatal.abort();
    formation.abort();
    let failure = match (fatal.await.ok().flatten(), formation.await.ok().flatten()) {
        (Some(why), _) => Some(format!("Raft stopped: {why}; restart the node")),
        (None, Some(why)) => Some(why),
        (None, None) => None,
    };
    stopping.abort();
    node.raft.shutdown().await.ok();
    // Peer streams end with serving, or when Raft's shutdown fails their last RPC; their
    // tasks hold the Raft handle (and so the log's database), which must be closed before
    // the process exits.
    peer_streams.close();
    if tokio::time::timeout(PEER_STREAMS_TIMEOUT, peer_streams.wait())
        .await
        .is_err()
    {
        tracing::warn!("peer streams still open after {PEER_STREAMS_TIMEOUT:?}; stopping anyway");
    }
    node.store.sync().context("cannot sync the change store")?;
    match failure {
        Some(why) => Err(anyhow::anyhow!("{why}")),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

/// The HTTP client for peers: keep-alive, no Nagle, and connections from the address this
/// node listens on (multi-homed hosts, firewalls keyed on source address); mutual TLS with
/// `tls` (`--peer-ca`).
fn peer_client(
    addr: std::net::SocketAddr,
    tls: Option<&rustls::ClientConfig>,
) -> anyhow::Result<reqwest::Client> {
    let mut client = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true);
    if !addr.ip().is_unspecified() {
        client = client.local_address(addr.ip());
    }
    if let Some(tls) = tls {
        client = client.use_preconfigured_tls(tls.clone());
    }
    client.build().context("cannot build the HTTP client")
}

/// The node's TLS: its listener's, and the client side of its peer links.
struct Tls {
    /// `--tls-cert`/`--tls-key`, watched for changes once the node runs.
    cert: Option<Arc<CertFiles>>,
    server: Option<ServerTls>,
    /// Trusts `--peer-ca` only and presents the node's certificate.
    peer_client: Option<Arc<rustls::ClientConfig>>,
}

impl Tls {
    fn load(config: &Config) -> anyhow::Result<Tls> {
        let cert = config
            .tls
            .load()
            .context("cannot use --tls-cert/--tls-key")?;
        let peer_ca = config
            .peer_ca
            .as_deref()
            .map(tls::load_roots)
            .transpose()
            .context("cannot use --peer-ca")?;
        let Some(cert) = cert else {
            return Ok(Tls {
                cert: None,
                server: None,
                peer_client: None,
            });
        };
        let peer_client = peer_ca
            .clone()
            .map(|ca| tls::peer_client_config(cert.clone(), ca).map(Arc::new))
            .transpose()?;
        let server = ServerTls::new(cert.clone(), peer_ca, &[b"h2", b"http/1.1"])?;
        tracing::info!(
            mutual = peer_client.is_some(),
            "serving HTTPS with {}",
            config
                .tls
                .tls_cert
                .as_deref()
                .unwrap_or(Path::new(""))
                .display()
        );
        Ok(Tls {
            cert: Some(cert),
            server: Some(server),
            peer_client,
        })
    }
}

/// The IP addresses of the cluster's members.
#[derive(Default)]
struct MemberIps(std::sync::RwLock<HashSet<IpAddr>>);

impl MemberIps {
    /// Picks `raft` for connections from a member, the main runtime for everyone else.
    fn runtime_for(self: &Arc<Self>, raft: tokio::runtime::Handle) -> RuntimeFor {
        let ips = self.clone();
        Arc::new(move |peer: SocketAddr| ips.contains(peer.ip()).then(|| raft.clone()))
    }
}

/// How often member addresses are resolved again when the membership stays the same (a
/// name in it may point elsewhere after a restart).
const MEMBER_ADDRESS_REFRESH: Duration = Duration::from_secs(30);

/// The addresses of members this node is configured with (the peers file, the node it
/// joins through): who its members are until Raft's membership names them.
fn configured_members(config: &Config) -> anyhow::Result<Vec<String>> {
    let mut addrs = config.peer_list()?.unwrap_or_default();
    addrs.extend(config.join.clone());
    Ok(addrs)
}

/// The members' addresses: the membership's, or the configured ones while it has none.
fn member_addrs(membership: &raft::types::StoredMembership, configured: &[String]) -> Vec<String> {
    let named: Vec<String> = membership
        .membership()
        .nodes()
        .map(|(_, n)| n.addr.clone())
        .collect();
    if named.is_empty() {
        configured.to_vec()
    } else {
        named
    }
}

/// The IP addresses `addrs` (`host:port`, or URLs) resolve to; unresolvable ones are skipped.
async fn resolve_ips(addrs: &[String]) -> HashSet<IpAddr> {
    let mut found = HashSet::new();
    for addr in addrs {
        let host_port = addr
            .trim_start_matches("http://")
            .trim_start_matches("https://");
        let host_port = host_port.split('/').next().unwrap_or(host_port);
        match tokio::net::lookup_host(host_port).await {
            Ok(resolved) => found.extend(resolved.map(|a| a.ip())),
            Err(e) => tracing::debug!(%addr, error = %e, "cannot resolve a member's address"),
        }
    }
    found
}

impl MemberIps {
    fn set(&self, ips: HashSet<IpAddr>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = ips;
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&ip)
    }
}

/// Keeps `ips` at the addresses the members' names resolve to: at each membership change
/// and every [`MEMBER_ADDRESS_REFRESH`]. The caller resolves them once before the listener
/// opens: a member's peer stream stays on the runtime it was accepted on for good.
///
/// Long-lived watchers read openraft's server metrics (state, leader, membership), which
/// change at elections and membership changes only: the full metrics change several times
/// per write, and each change would wake every watcher (measured: about 10 context switches
/// per write on an idle follower's runtime for two watchers).
async fn watch_member_ips(
    raft: raft::Raft,
    ips: Arc<MemberIps>,
    configured: Vec<String>,
    shutdown: CancellationToken,
) {
    let mut metrics = raft.server_metrics();
    let mut resolved_for = None;
    let mut refresh = tokio::time::interval(MEMBER_ADDRESS_REFRESH);
    loop {
        let membership = *metrics.borrow_and_update().membership_config.log_id();
        tokio::select! {
            changed = metrics.changed(), if resolved_for == Some(membership) => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            _ = refresh.tick() => {}
            _ = shutdown.cancelled() => return,
            // A new membership is resolved at once.
            _ = std::future::ready(()), if resolved_for != Some(membership) => {}
        }
        let addrs = member_addrs(&metrics.borrow_watched().membership_config, &configured);
        ips.set(resolve_ips(&addrs).await);
        resolved_for = Some(membership);
        // The addresses were read after `membership`: a change in between is seen next.
    }
}

thread_local! {
    /// Set on the threads of Raft's runtime ([`RaftRuntime`]).
    static ON_RAFT_RUNTIME: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is one of Raft's runtime.
pub(crate) fn on_raft_runtime() -> bool {
    ON_RAFT_RUNTIME.with(std::cell::Cell::get)
}

/// Threads of Raft's runtime: the core, the replication streams and the proposer are
/// mostly waiting; two keep a slow peer from delaying the others. One thread measured faster
/// on 2026-11-30 (a second one mostly wakes up to steal the task the first just woke), but
/// a kill -9 failover then took one more election timeout in 4 of 7 runs of 20 kills against
/// 1 of 4 with two. That was later traced to the order in which two followers campaigned,
/// which Pre-Vote fixed, not to the thread count (see the README); two stay until one is
/// measured again against them.
const RAFT_RUNTIME_THREADS: usize = 2;

/// Raft's own Tokio runtime. Client requests (thousands of long-polls woken at once) run on
/// the main runtime and never queue ahead of Raft's timers, heartbeats and replication.
struct RaftRuntime {
    handle: tokio::runtime::Handle,
    /// Taken when dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

impl RaftRuntime {
    fn start() -> anyhow::Result<RaftRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RAFT_RUNTIME_THREADS)
            .thread_name("raft")
            .on_thread_start(|| ON_RAFT_RUNTIME.with(|on| on.set(true)))
            .enable_all()
            .build()
            .context("cannot start Raft's runtime")?;
        Ok(RaftRuntime {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for RaftRuntime {
    /// A runtime cannot be dropped from async code; its tasks are already stopped (Raft was
    /// shut down), so it is let go in the background.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Longest a stopping leader waits for its followers to catch up.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(3);

/// A stopping leader, while it still serves, holds new entries back and waits until a
/// quorum holds its whole log (so it is committed and the next leader has it: no write
/// waiting on this node is lost), then hands leadership to a follower that holds it all, so
/// the cluster need not wait an election timeout for a new leader. The new leader's vote
/// request reaches it (it still serves) and ends its term; what waited in the proposer is
/// then forwarded to the new leader. When the rest cannot form a quorum it stops at once.
async fn hand_over(
    raft: &raft::Raft,
    proposer: &proposer::Proposer,
    probe: Duration,
    timeout: Duration,
) {
    let (voters, quorum) = {
        let m = raft.metrics().borrow_watched().clone();
        if m.state != openraft::ServerState::Leader {
            return;
        }
        let voters = m.membership_config.membership().voter_ids().count();
        (voters, voters / 2 + 1)
    };
    if voters == 1 {
        return;
    }
    // A leadership check is one heartbeat round that needs a quorum to answer.
    if !matches!(
        tokio::time::timeout(probe, raft.get_read_log_id(openraft::ReadPolicy::ReadIndex)).await,
        Ok(Ok(_))
    ) {
        tracing::info!("no quorum of followers answers; stopping without hand-over");
        return;
    }
    /// Lets held requests go again, however the hand-over ends.
    struct Release<'a>(&'a proposer::Proposer);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.hold(false);
        }
    }
    proposer.hold(true);
    let _release = Release(proposer);
    let mut metrics = raft.metrics();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut transferred_to = None;
    loop {
        let next = {
            let m = metrics.borrow_and_update();
            if m.state != openraft::ServerState::Leader {
                let new = m.current_leader.filter(|l| *l != m.id);
                drop(m);
                match (new, transferred_to) {
                    (Some(new), _) => {
                        tracing::info!(new_leader = new, "handed leadership over; stopping");
                        return;
                    }
                    (None, None) => {
                        tracing::info!("no longer the leader; stopping");
                        return;
                    }
                    // Handed over; waiting to hear from the new leader.
                    (None, Some(_)) => None,
                }
            } else {
                let last = m.last_log_index;
                let caught_up: Vec<raft::types::NodeId> = m
                    .membership_config
                    .membership()
                    .voter_ids()
                    .filter(|v| *v != m.id)
                    .filter(|v| {
                        m.replication
                            .as_ref()
                            .and_then(|r| r.get(v).cloned().flatten())
                            .map(|l| l.index)
                            >= last
                    })
                    .collect();
                // With two voters or more the quorum includes a follower.
                (caught_up.len() + 1 >= quorum)
                    .then(|| caught_up.first().copied())
                    .flatten()
            }
        };
        if let (Some(to), None) = (next, transferred_to) {
            tracing::info!(to, "followers caught up; handing leadership over");
            if raft.trigger().transfer_leader(to).await.is_err() {
                return;
            }
            transferred_to = Some(to);
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep_until(deadline) => {
                if transferred_to.is_some() {
                    tracing::warn!("leadership not taken over within {timeout:?}; stopping anyway");
                } else {
                    tracing::warn!("followers did not catch up within {timeout:?}; stopping anyway");
                }
                return;
            }
        }
    }
}

/// Waits until Raft reports a fatal error, then cancels `shutdown` and returns the error.
/// Raft's core reports a fatal error in its full metrics as it stops, then drops its
/// senders, which ends the wait on the server metrics (see [`watch_member_ips`]).
async fn watch_fatal(raft: raft::Raft, shutdown: CancellationToken) -> Option<String> {
    let mut server = raft.server_metrics();
    let metrics = raft.metrics();
    let mut closed = false;
    loop {
        if let Err(e) = &metrics.borrow_watched().running_state {
            let why = e.to_string();
            if !shutdown.is_cancelled() {
                tracing::error!(error = %why, "Raft stopped; shutting the node down");
                shutdown.cancel();
                return Some(why);
            }
            return None;
        }
        if closed {
            return None;
        }
        tokio::select! {
            // Closed: the core has stopped; its last word is read once more above.
            changed = server.changed() => closed = changed.is_err(),
            _ = shutdown.cancelled() => return None,
        }
    }
}
