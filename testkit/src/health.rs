//! What nodes say about the cluster in `GET /health`, and the one rule by
//! which the harness decides that they agree on a leader: used to wait for a
//! single node, a test cluster and a benchmark cluster alike.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::error::Result;
use crate::http::Api;
use crate::wait::wait_until;

/// Timeout of one `/health` or `/cluster` probe: a live node answers in
/// microseconds; one that does not answer this quickly is reported as such
/// and polled again.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /health` of a node, as JSON; `Err` describes what went wrong.
pub async fn health(api: &Api) -> std::result::Result<Value, String> {
    let r = api.try_get("/health").await.map_err(|e| format!("{e}"))?;
    if r.status != 200 {
        return Err(format!("status {} {}", r.status, r.text()));
    }
    serde_json::from_slice(&r.body).map_err(|e| format!("not JSON ({e}): {}", r.text()))
}

/// The fields of `GET /health` the harness decides by.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeHealth {
    /// `leader`, `follower`, `candidate`, `learner`, `removed` or `edge`.
    pub role: String,
    /// Raft node id of the answering node (absent on an edge).
    #[serde(default)]
    pub node_id: Option<u64>,
    /// Node id of the leader this node knows of.
    #[serde(default)]
    pub leader: Option<u64>,
    #[serde(default)]
    pub term: u64,
    /// Oldest retained `_id`.
    #[serde(default)]
    pub first_index: u64,
    /// Newest applied `_id`.
    #[serde(default)]
    pub last_index: u64,
}

/// [`health`], read into a [`NodeHealth`].
pub async fn node_health(api: &Api) -> std::result::Result<NodeHealth, String> {
    let v = health(api).await?;
    serde_json::from_value(v.clone()).map_err(|e| format!("not a health document ({e}): {v}"))
}

/// The index in `healths` of the node that answers as leader (the highest
/// term wins if a stale one still claims it), provided a majority of
/// `healths` answered (`Some`) and every answering node, the leader too,
/// names it in the same term.
pub fn agreed_leader(healths: &[Option<NodeHealth>]) -> Option<usize> {
    let answered = healths.iter().flatten().count();
    if answered * 2 <= healths.len() {
        return None;
    }
    let (index, leader) = healths
        .iter()
        .enumerate()
        .filter_map(|(i, h)| h.as_ref().map(|h| (i, h)))
        .filter(|(_, h)| h.role == "leader")
        .max_by_key(|(_, h)| h.term)?;
    let id = leader.node_id?;
    let agreed = healths
        .iter()
        .flatten()
        .all(|h| h.leader == Some(id) && h.term == leader.term);
    agreed.then_some(index)
}

/// One node a leader wait looks at.
#[derive(Debug, Clone)]
pub struct Probe {
    /// What the report calls it, e.g. `n0 (127.0.0.11:4000)`.
    pub label: String,
    /// A client for its `/health` ([`PROBE_TIMEOUT`] or shorter); `None`
    /// for a node the harness knows to be stopped.
    pub api: Option<Api>,
}

impl Probe {
    pub fn new(label: impl Into<String>, api: Option<Api>) -> Probe {
        Probe {
            label: label.into(),
            api,
        }
    }
}

/// Text shown as is (not quoted) as the last state of a timed-out wait.
struct Table(String);

impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\n{}", self.0)
    }
}

/// Polls the `/health` of every probe, all at once, every poll interval
/// until (1) every running node answers, (2) [`agreed_leader`] finds a
/// leader among them and (3) `accept(leader, healths)` holds, where
/// `leader` and `healths` index like `probes`. Returns the leader's index.
/// On timeout the error lists what each node said last.
pub async fn wait_leader_where(
    probes: &[Probe],
    within: Duration,
    what: &str,
    accept: impl Fn(usize, &[Option<NodeHealth>]) -> bool,
) -> Result<usize> {
    let accept = &accept;
    wait_until(within, what, || async move {
        let polls = probes.iter().map(|p| async move {
            match &p.api {
                Some(api) => Some(node_health(api).await),
                None => None,
            }
        });
        let answers = futures::future::join_all(polls).await;
        let every_running_answered = answers.iter().flatten().all(|a| a.is_ok());
        let healths: Vec<Option<NodeHealth>> = answers
            .iter()
            .map(|a| a.as_ref().and_then(|a| a.as_ref().ok()).cloned())
            .collect();
        match agreed_leader(&healths) {
            Some(leader) if every_running_answered && accept(leader, &healths) => Ok(leader),
            _ => Err(Table(health_table(probes, &answers))),
        }
    })
    .await
}

/// One line per node with what it last said, for reports.
fn health_table(
    probes: &[Probe],
    answers: &[Option<std::result::Result<NodeHealth, String>>],
) -> String {
    let lines: Vec<String> = probes
        .iter()
        .zip(answers)
        .map(|(p, a)| match a {
            Some(Ok(h)) => format!("    {}: {}", p.label, describe(h)),
            Some(Err(e)) => format!("    {}: no answer: {e}", p.label),
            None => format!("    {}: stopped", p.label),
        })
        .collect();
    lines.join("\n")
}

/// `follower id 2, leader 1, term 3, lastIndex 40`.
pub fn describe(h: &NodeHealth) -> String {
    let id = |v: Option<u64>| v.map_or_else(|| "none".to_string(), |v| v.to_string());
    format!(
        "{} id {}, leader {}, term {}, lastIndex {}",
        h.role,
        id(h.node_id),
        id(h.leader),
        h.term,
        h.last_index
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(role: &str, id: u64, leader: Option<u64>, term: u64) -> Option<NodeHealth> {
        Some(NodeHealth {
            role: role.to_string(),
            node_id: Some(id),
            leader,
            term,
            first_index: 1,
            last_index: 0,
        })
    }

    #[test]
    fn leader_needs_a_majority_that_agrees() {
        let all = [
            health("follower", 1, Some(2), 3),
            health("leader", 2, Some(2), 3),
            health("follower", 3, Some(2), 3),
        ];
        assert_eq!(agreed_leader(&all), Some(1));
        // One node down: two of three still agree.
        let one_down = [
            None,
            health("leader", 2, Some(2), 3),
            health("follower", 3, Some(2), 3),
        ];
        assert_eq!(agreed_leader(&one_down), Some(1));
        // A follower still naming the old leader: not yet.
        let stale = [
            health("follower", 1, Some(9), 2),
            health("leader", 2, Some(2), 3),
            health("follower", 3, Some(2), 3),
        ];
        assert_eq!(agreed_leader(&stale), None);
        // Only one of three answering: no majority.
        let alone = [None, health("leader", 2, Some(2), 3), None];
        assert_eq!(agreed_leader(&alone), None);
        // An old leader that has not noticed yet loses to the higher term.
        let two_leaders = [
            health("leader", 1, Some(1), 2),
            health("leader", 2, Some(2), 3),
            health("follower", 3, Some(2), 3),
        ];
        assert_eq!(agreed_leader(&two_leaders), None);
        let candidates = [
            health("candidate", 1, None, 4),
            health("follower", 2, None, 4),
            health("candidate", 3, None, 4),
        ];
        assert_eq!(agreed_leader(&candidates), None);
        // A single node is its own majority once it names itself.
        assert_eq!(agreed_leader(&[health("leader", 4, Some(4), 1)]), Some(0));
        assert_eq!(agreed_leader(&[health("leader", 4, None, 1)]), None);
    }

    #[test]
    fn health_parses_the_documented_fields() {
        let body = br#"{"role":"follower","nodeId":12,"leader":7,"term":3,"clusterId":"c",
                        "firstIndex":1,"lastIndex":40,"appliedLogIndex":41,"lag":0}"#;
        let h: NodeHealth = serde_json::from_slice(body).unwrap();
        assert_eq!(
            (h.role.as_str(), h.node_id, h.leader, h.term, h.last_index),
            ("follower", Some(12), Some(7), 3, 40)
        );
        assert_eq!(
            describe(&h),
            "follower id 12, leader 7, term 3, lastIndex 40"
        );
    }

    #[tokio::test]
    async fn a_timed_out_wait_lists_every_node() {
        // Port 1 on localhost: nothing listens there.
        let probes = [
            Probe::new(
                "n0",
                Some(Api::with_timeout("http://127.0.0.1:1", PROBE_TIMEOUT)),
            ),
            Probe::new("n1", None),
        ];
        let err = wait_leader_where(&probes, Duration::ZERO, "a leader", |_, _| true)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("waiting until a leader"), "{err}");
        assert!(err.contains("\n    n0: no answer: "), "{err}");
        assert!(err.contains("\n    n1: stopped"), "{err}");
    }
}
