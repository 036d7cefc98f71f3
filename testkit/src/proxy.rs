//! A TCP proxy in front of one cluster node (its `--advertise` address)
//! that cuts traffic by the connecting side's source IP. Nodes connect out
//! from their own listen IP, so blocking `127.x.y.11` on node B's proxy cuts
//! every connection node A opens to B.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

use crate::error::{self, Error, OrPanic};

/// A running proxy: accepts on [`addr`](Self::addr), forwards each accepted
/// connection to its target, and drops the connections of blocked source IPs.
/// Dropping it stops accepting and closes every forwarded connection.
pub struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
    /// The accept loop; owned here, aborted on drop (which closes the
    /// listener).
    accept: JoinHandle<()>,
}

/// State shared by the accept loop, the forwarding tasks and the test.
#[derive(Default)]
struct Shared {
    /// One lock for the block list and the open connections, so a connection
    /// is either refused or registered before a concurrent `block_source`
    /// looks at the open ones: none slips through.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    blocked: HashSet<IpAddr>,
    /// Open forwarded connections by number: their source IP and the abort
    /// handle of the task that owns both sockets (aborting it closes them).
    /// A task removes its own entry when it ends; `block_source` removes the
    /// ones it aborts.
    open: HashMap<u64, (IpAddr, AbortHandle)>,
    next_id: u64,
    accepted: u64,
    refused: u64,
    torn_down: u64,
}

/// Counters of what the proxy did, for diagnostics and assertions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections forwarded.
    pub accepted: u64,
    /// Connections from a blocked source, closed at once.
    pub refused: u64,
    /// Forwarded connections closed by a later `block_source`.
    pub torn_down: u64,
    /// Forwarded connections still open.
    pub open: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock only happens in a failing test; the
        // state is still consistent enough to keep tearing down.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Proxy {
    /// Binds `listen` (port 0 picks a free port) and forwards every accepted
    /// connection to `target`. Must run inside a tokio runtime, which also
    /// runs the forwarding tasks: use a multi-threaded test runtime so the
    /// proxy keeps forwarding while the test blocks briefly (e.g. reaping a
    /// killed process).
    pub async fn try_start(listen: SocketAddr, target: SocketAddr) -> error::Result<Proxy> {
        let bound = |action| Error::io(action, listen.to_string());
        let listener = TcpListener::bind(listen)
            .await
            .map_err(bound("proxy: binding"))?;
        let addr = listener
            .local_addr()
            .map_err(bound("proxy: reading the bound address of"))?;
        let shared = Arc::new(Shared::default());
        let accept = tokio::spawn(accept_loop(listener, target, Arc::clone(&shared)));
        Ok(Proxy {
            addr,
            target,
            shared,
            accept,
        })
    }

    /// [`try_start`](Self::try_start); panics if it cannot bind.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> Proxy {
        Self::try_start(listen, target).await.or_panic()
    }

    /// The address the proxy accepts on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where accepted connections are forwarded.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// From now on, connections from `ip` are accepted and closed at once,
    /// and the open ones from `ip` are torn down before this returns.
    pub fn block_source(&self, ip: IpAddr) {
        let mut state = self.shared.lock();
        state.blocked.insert(ip);
        let doomed: Vec<u64> = state
            .open
            .iter()
            .filter(|(_, (src, _))| *src == ip)
            .map(|(id, _)| *id)
            .collect();
        for id in doomed {
            if let Some((_, handle)) = state.open.remove(&id) {
                handle.abort();
                state.torn_down += 1;
            }
        }
    }

    /// Forwards connections from `ip` again (new ones; torn-down ones stay
    /// closed).
    pub fn unblock_source(&self, ip: IpAddr) {
        self.shared.lock().blocked.remove(&ip);
    }

    /// Unblocks every source.
    pub fn heal(&self) {
        self.shared.lock().blocked.clear();
    }

    /// The blocked source IPs.
    pub fn blocked(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.shared.lock().blocked.iter().copied().collect();
        v.sort();
        v
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> ProxyStats {
        let state = self.shared.lock();
        ProxyStats {
            accepted: state.accepted,
            refused: state.refused,
            torn_down: state.torn_down,
            open: state.open.len(),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        let mut state = self.shared.lock();
        for (_, (_, handle)) in state.open.drain() {
            handle.abort();
        }
    }
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field("target", &self.target)
            .field("blocked", &self.blocked())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Accepts until aborted. Each connection is refused (dropped) or handed to a
/// forwarding task registered under the same lock the block list is under.
async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    loop {
        let (inbound, peer) = match listener.accept().await {
            Ok(conn) => conn,
            // Per-connection failures (e.g. the peer reset before accept)
            // say nothing about the next connection.
            Err(_) => continue,
        };
        let mut state = shared.lock();
        if state.blocked.contains(&peer.ip()) {
            state.refused += 1;
            drop(state);
            drop(inbound);
            continue;
        }
        let id = state.next_id;
        state.next_id += 1;
        state.accepted += 1;
        let task_shared = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            forward(inbound, target).await;
            task_shared.lock().open.remove(&id);
        });
        state.open.insert(id, (peer.ip(), task.abort_handle()));
    }
}

/// Copies bytes both ways until either side closes; a failed connect to the
/// target closes the inbound connection.
async fn forward(mut inbound: TcpStream, target: SocketAddr) {
    let Ok(mut outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpSocket;

    /// An echo server on `ip`: answers every byte it reads.
    async fn echo_server(ip: Ipv4Addr) -> SocketAddr {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind echo");
        let addr = listener.local_addr().expect("echo addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    /// Connects to `to` from source address `from` (port chosen by the OS).
    async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind((from, 0).into()).expect("bind source");
        socket.connect(to).await.expect("connect")
    }

    /// Sends `msg` and reads it back; `Err` when the connection was closed.
    async fn echo(s: &mut TcpStream, msg: &[u8]) -> Result<Vec<u8>, String> {
        s.write_all(msg).await.map_err(|e| format!("write: {e}"))?;
        let mut got = vec![0u8; msg.len()];
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
            .await
            .map_err(|_| "no answer within 10 s".to_string())?;
        read.map_err(|e| format!("read: {e}"))?;
        Ok(got)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwards_blocks_and_heals_by_source_ip() {
        let a = Ipv4Addr::new(127, 0, 0, 1);
        let b = Ipv4Addr::new(127, 0, 0, 2);
        let target = echo_server(a).await;
        let proxy = Proxy::start((a, 0).into(), target).await;

        let mut from_a = connect_from(a, proxy.addr()).await;
        let mut from_b = connect_from(b, proxy.addr()).await;
        assert_eq!(echo(&mut from_a, b"one").await.as_deref(), Ok(&b"one"[..]));
        assert_eq!(echo(&mut from_b, b"two").await.as_deref(), Ok(&b"two"[..]));

        // Blocking b tears down b's open connection, keeps a's.
        proxy.block_source(IpAddr::V4(b));
        assert!(echo(&mut from_b, b"x").await.is_err(), "{proxy:?}");
        assert_eq!(
            echo(&mut from_a, b"three").await.as_deref(),
            Ok(&b"three"[..])
        );
        // New connections from b are accepted by the kernel, then closed.
        let mut again = connect_from(b, proxy.addr()).await;
        assert!(echo(&mut again, b"y").await.is_err(), "{proxy:?}");
        let stats = proxy.stats();
        assert_eq!(stats.torn_down, 1, "{stats:?}");
        assert_eq!(stats.refused, 1, "{stats:?}");

        // Healing lets b in again.
        proxy.heal();
        assert!(proxy.blocked().is_empty());
        let mut healed = connect_from(b, proxy.addr()).await;
        assert_eq!(
            echo(&mut healed, b"four").await.as_deref(),
            Ok(&b"four"[..])
        );

        proxy.block_source(IpAddr::V4(a));
        proxy.unblock_source(IpAddr::V4(a));
        let mut a2 = connect_from(a, proxy.addr()).await;
        assert_eq!(echo(&mut a2, b"five").await.as_deref(), Ok(&b"five"[..]));
    }
}
