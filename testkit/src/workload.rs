//! Clients that write and read through a cluster and record every attempt
//! and read in a [`History`]: one write, a write retried over the nodes,
//! background [`Writers`], plain and consistent reads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::task::JoinHandle;

use crate::cluster::{read_all, Cluster};
use crate::history::{marker_of, write_body, AttemptResult, History, ReadRecord};
use crate::http::{change_id, raw_changes, Api, Reply};

/// Pause between two attempts of a retrying client after an answer that
/// says "not now" (503, connection refused): client pacing, so a writer does
/// not spin during an election. Not a synchronisation point.
pub const RETRY_BACKOFF: Duration = Duration::from_millis(50);

/// Writes through the nodes of a [`Cluster`], recorded in a [`History`].
impl Cluster {
    /// Name and fault-test client
    /// ([`Node::fault_api`](crate::cluster::Node::fault_api)) of every node,
    /// for [`Writers`] and [`write_retrying`].
    pub fn client_nodes(&self) -> Vec<(String, Api)> {
        self.nodes
            .iter()
            .map(|n| (n.name.clone(), n.fault_api()))
            .collect()
    }

    /// Writes `marker` once through node `i` (key = marker), records it as
    /// `client`, and asserts it was acknowledged. Returns the `_id`.
    pub async fn write_acked(
        &self,
        history: &History,
        client: usize,
        i: usize,
        marker: &str,
    ) -> u64 {
        let node = &self.nodes[i];
        let (result, reply) = write_once(
            history,
            client,
            &node.name,
            &node.fault_api(),
            marker,
            marker,
        )
        .await;
        match result {
            AttemptResult::Acked(id) => id,
            other => panic!(
                "write {marker} through {} ({}) was not acknowledged: {other:?} {:?}",
                node.name,
                node.listen,
                reply.map(|r| (r.status, r.headers))
            ),
        }
    }

    /// One acknowledged write through each node (marker `{prefix}-{i}`), then waits
    /// until all nodes hold the same log and checks it against the writes: the cluster
    /// still works.
    pub async fn assert_writes_through_every_node(&self, prefix: &str) {
        let history = History::new();
        for i in 0..self.nodes.len() {
            self.write_acked(&history, i, i, &format!("{prefix}-{i}"))
                .await;
        }
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        let finals = self.wait_converged(&all).await;
        history.assert_consistent(&finals);
    }

    /// `rounds` rounds of one write through each node in `nodes` (node `i`
    /// writes as client `i`, marker `{prefix}-{i}-{round}`), each asserted
    /// acknowledged.
    pub async fn write_rounds(
        &self,
        history: &History,
        nodes: &[usize],
        rounds: usize,
        prefix: &str,
    ) {
        for k in 0..rounds {
            for &i in nodes {
                self.write_acked(history, i, i, &format!("{prefix}-{i}-{k}"))
                    .await;
            }
        }
    }
}

/// Posts the write marked `marker` once to `api` with `Idempotency-Key: key`
/// and records the attempt. Panics on a 200 without an `_id` (a broken
/// answer, not an uncertain one).
pub async fn write_once(
    history: &History,
    client: usize,
    node: &str,
    api: &Api,
    key: &str,
    marker: &str,
) -> (AttemptResult, Option<Reply>) {
    let body = write_body(marker);
    let answer = api
        .try_request(
            "POST",
            "/changes",
            Some("application/json"),
            Some(body.into_bytes()),
            &[("Idempotency-Key", key)],
        )
        .await;
    let result = match &answer {
        Ok(r) if r.status == 200 => {
            let v: Value = serde_json::from_slice(&r.body)
                .unwrap_or_else(|e| panic!("{node}: 200 body is not JSON ({e}): {}", r.text()));
            AttemptResult::Acked(
                v["_id"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{node}: 200 without _id: {v}")),
            )
        }
        Ok(r) if (400..500).contains(&r.status) => AttemptResult::Rejected(r.status),
        Ok(r) => AttemptResult::Unknown(format!("{} {}", r.status, r.text())),
        Err(e) => AttemptResult::Unknown(format!("transport: {e}")),
    };
    history.record_attempt(client, node, key, marker, result.clone());
    (result, answer.ok())
}

/// Writes `marker` with `Idempotency-Key: key`, trying the nodes in turn
/// from `first` after every uncertain answer (503, other 5xx, connection
/// error, timeout) until one acknowledges or rejects it or `give_up` has
/// passed. Every attempt is recorded. Returns the last attempt's result.
pub async fn write_retrying(
    history: &History,
    client: usize,
    nodes: &[(String, Api)],
    first: usize,
    key: &str,
    marker: &str,
    give_up: Duration,
) -> AttemptResult {
    let deadline = Instant::now() + give_up;
    let mut attempt = 0usize;
    loop {
        let (name, api) = &nodes[(first + attempt) % nodes.len()];
        let (result, _) = write_once(history, client, name, api, key, marker).await;
        if !matches!(result, AttemptResult::Unknown(_)) || Instant::now() >= deadline {
            return result;
        }
        attempt += 1;
        tokio::time::sleep(RETRY_BACKOFF).await;
    }
}

/// What one background writer did.
#[derive(Debug, Clone, Default)]
pub struct WriterReport {
    pub client: usize,
    pub acked: usize,
    pub rejected: usize,
    /// Writes given up on with an uncertain outcome.
    pub unknown: usize,
    pub reads: usize,
    pub last_problem: Option<String>,
}

/// Background writers, each writing `w{client}-{n}` (marker and key) for
/// n = 0, 1, … through [`write_retrying`], starting each write on another
/// node, and doing a consistent read every `read_every` writes, until
/// [`stop`](Self::stop).
pub struct Writers {
    /// Set by `stop`; each writer checks it before every write.
    stop: Arc<AtomicBool>,
    /// One task per writer, owned here: `stop` joins them for their reports;
    /// dropping `Writers` without `stop` detaches them (they end with the
    /// test's runtime).
    tasks: Vec<JoinHandle<WriterReport>>,
}

impl Writers {
    /// Starts `count` writers over `nodes` (name and client of each node),
    /// numbered `first_client..`. Each write gives up after `give_up`.
    pub fn start(
        history: Arc<History>,
        nodes: Vec<(String, Api)>,
        count: usize,
        first_client: usize,
        give_up: Duration,
        read_every: Option<u64>,
    ) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (first_client..first_client + count)
            .map(|client| {
                let history = Arc::clone(&history);
                let nodes = nodes.clone();
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    writer_loop(history, nodes, client, stop, give_up, read_every).await
                })
            })
            .collect();
        Writers { stop, tasks }
    }

    /// Tells every writer to stop after its current write and waits (up to
    /// `timeout`) for all of them.
    pub async fn stop(self, timeout: Duration) -> Vec<WriterReport> {
        self.stop.store(true, Ordering::SeqCst);
        let mut reports = Vec::new();
        for t in self.tasks {
            let report = tokio::time::timeout(timeout, t)
                .await
                .unwrap_or_else(|_| panic!("a writer did not stop within {timeout:?}"))
                .expect("writer task panicked");
            reports.push(report);
        }
        reports
    }
}

async fn writer_loop(
    history: Arc<History>,
    nodes: Vec<(String, Api)>,
    client: usize,
    stop: Arc<AtomicBool>,
    give_up: Duration,
    read_every: Option<u64>,
) -> WriterReport {
    let mut report = WriterReport {
        client,
        ..WriterReport::default()
    };
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let marker = format!("w{client}-{n}");
        let first = (client + n as usize) % nodes.len();
        match write_retrying(&history, client, &nodes, first, &marker, &marker, give_up).await {
            AttemptResult::Acked(_) => report.acked += 1,
            AttemptResult::Rejected(s) => {
                report.rejected += 1;
                report.last_problem = Some(format!("{marker}: rejected {s}"));
            }
            AttemptResult::Unknown(why) => {
                report.unknown += 1;
                report.last_problem = Some(format!("{marker}: gave up: {why}"));
            }
        }
        n += 1;
        // Integer division instead of `%`: the crate's MSRV (1.85) has no
        // `is_multiple_of`, and clippy asks for it over `n % k == 0`.
        if read_every.is_some_and(|k| k > 0 && n / k * k == n) {
            let (name, api) = &nodes[(client + n as usize / 2) % nodes.len()];
            if consistent_read(&history, client, name, api).await.is_ok() {
                report.reads += 1;
            }
        }
    }
    report
}

/// Reads node `api`'s whole list (plain, not consistent) and records it as
/// a read by `client`. Returns the raw changes.
pub async fn plain_read(
    history: &History,
    client: usize,
    node: &str,
    api: &Api,
) -> Result<Vec<String>, String> {
    let (_, raws) = read_all(api).await?;
    let entries: Vec<(u64, Option<String>)> = raws
        .iter()
        .map(|raw| (change_id(raw), marker_of(raw)))
        .collect();
    history.record_read(ReadRecord {
        client,
        node: node.to_string(),
        consistent: false,
        since: 0,
        last_index: entries.last().map_or(0, |(id, _)| *id),
        entries,
        acked_before: history.highest_acked(client),
    });
    Ok(raws)
}

/// A `GET /changes?consistent=true` from a little before the client's
/// highest acknowledged id, recorded on success.
pub async fn consistent_read(
    history: &History,
    client: usize,
    node: &str,
    api: &Api,
) -> Result<ReadRecord, String> {
    let acked_before = history.highest_acked(client);
    let since = acked_before.unwrap_or(0).saturating_sub(10);
    let r = api
        .try_get(&format!(
            "/changes?since={since}&limit=1000&consistent=true"
        ))
        .await
        .map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(format!("{} {}", r.status, r.text()));
    }
    let v = r.json();
    let entries = raw_changes(&r.body)
        .iter()
        .map(|raw| (change_id(raw), marker_of(raw)))
        .collect();
    let read = ReadRecord {
        client,
        node: node.to_string(),
        consistent: true,
        since,
        entries,
        last_index: v["lastIndex"]
            .as_u64()
            .unwrap_or_else(|| panic!("{node}: no lastIndex in {v}")),
        acked_before,
    };
    history.record_read(read.clone());
    Ok(read)
}
