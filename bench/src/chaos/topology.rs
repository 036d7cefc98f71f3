//! The topology under test: each compose service's container and, for the servers, its
//! published URL; what the servers say in `/health` and what Docker says of the containers;
//! whether the whole is healthy and writes flow; and putting every container back after a
//! fault (started, unpaused, on its network under its service name).

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use changeagent_testkit::docker::{self, ContainerState};
use changeagent_testkit::health::{
    agreed_leader, describe, node_health, NodeHealth, PROBE_TIMEOUT,
};
use changeagent_testkit::Api;
use futures::future::join_all;
use serde_json::Value;

use super::{watch, ChaosArgs};

/// Compose services of the topology (`deploy/docker-compose.yml`): `core1`…, `edge1`…, and
/// these.
pub const CHECKPOINTER: &str = "checkpointer";
pub const S3: &str = "s3";
pub const FLEET: &str = "fleet";

/// Changes the log must grow by for writes to count as flowing: a second of the run's own
/// writer at its default rate, a fraction of one with the fleet writing too.
pub const ADVANCE: u64 = 25;

/// A container of the project.
#[derive(Debug, Clone)]
pub struct Container {
    pub service: String,
    pub id: String,
}

/// A server: its container and its published URL on this host.
#[derive(Debug, Clone)]
pub struct Node {
    pub container: Container,
    pub url: String,
    /// For `/health`, `/metrics` and single pages ([`PROBE_TIMEOUT`]).
    pub api: Api,
    /// For long reads (many pages, blocking long-polls): the client's default timeout.
    pub reads: Api,
}

impl Node {
    pub fn service(&self) -> &str {
        &self.container.service
    }
}

/// Every container of the project the run looks at.
#[derive(Debug)]
pub struct Topology {
    pub project: String,
    /// The project's network, on which containers reach each other by service name.
    pub network: String,
    pub cores: Vec<Node>,
    pub edges: Vec<Node>,
    pub checkpointer: Node,
    pub s3: Container,
    /// `None` when the project has no fleet container (not even an exited one).
    pub fleet: Option<Container>,
    /// The CA trusted for `https://` URLs (`--ca`); the system's roots without it.
    pub roots: Option<Vec<reqwest::Certificate>>,
}

impl Topology {
    /// Finds the containers of `args.project`: `core1`… for the `--cores` URLs in order,
    /// `edge1`… for `--edges`, the checkpointer, `s3` and (if there is one) the fleet.
    pub async fn discover(args: &ChaosArgs) -> Result<Topology> {
        let project = &args.project;
        let roots = args.ca.certificates()?;
        // Checked above: a --ca that reads fine also builds the test kit's clients.
        let trusted = |api: Api| match &args.ca.ca {
            Some(ca) => api.with_tls(ca, None),
            None => api,
        };
        let container = |service: String| async move {
            let id = docker::try_compose_container(project, &service)
                .await?
                .ok_or_else(|| {
                    anyhow!(
                        "project {project} has no container for service {service}: is it up \
                         (deploy/compose up, with CHANGEAGENT_COMPOSE_PROJECT={project})?"
                    )
                })?;
            anyhow::Ok(Container { service, id })
        };
        let node = |service: String, url: &str| {
            let url = url.trim_end_matches('/').to_string();
            async move {
                anyhow::Ok(Node {
                    container: container(service).await?,
                    api: trusted(Api::with_timeout(url.clone(), PROBE_TIMEOUT)),
                    reads: trusted(Api::new(url.clone())),
                    url,
                })
            }
        };
        let mut cores = Vec::new();
        for (i, url) in args.cores.iter().enumerate() {
            cores.push(node(format!("core{}", i + 1), url).await?);
        }
        let mut edges = Vec::new();
        for (i, url) in args.edges.iter().enumerate() {
            edges.push(node(format!("edge{}", i + 1), url).await?);
        }
        let checkpointer = node(CHECKPOINTER.to_string(), &args.checkpointer).await?;
        let s3 = container(S3.to_string()).await?;
        let fleet = docker::try_compose_container(project, FLEET)
            .await?
            .map(|id| Container {
                service: FLEET.to_string(),
                id,
            });
        let networks = docker::try_networks(&cores[0].container.id).await?;
        let network = pick_network(project, &networks)
            .with_context(|| format!("{} is on no network", cores[0].service()))?;
        Ok(Topology {
            project: project.clone(),
            network,
            cores,
            edges,
            checkpointer,
            s3,
            fleet,
            roots,
        })
    }

    /// Every container but the fleet's, servers first.
    pub fn containers(&self) -> Vec<&Container> {
        let mut all: Vec<&Container> = self.cores.iter().map(|n| &n.container).collect();
        all.extend(self.edges.iter().map(|n| &n.container));
        all.push(&self.checkpointer.container);
        all.push(&self.s3);
        all
    }

    /// `/health` of every core at once; `None` for those in `skip` (stopped or cut off).
    pub async fn core_healths(&self, skip: &[usize]) -> Vec<Option<Result<NodeHealth, String>>> {
        join_all(self.cores.iter().enumerate().map(|(i, n)| async move {
            if skip.contains(&i) {
                None
            } else {
                Some(node_health(&n.api).await)
            }
        }))
        .await
    }

    /// The core every answering core names as leader (see [`agreed_leader`]), when every
    /// core not in `skip` answered; else a table of what each said.
    pub async fn leader(&self, skip: &[usize]) -> Result<(usize, Vec<Option<NodeHealth>>), String> {
        let answers = self.core_healths(skip).await;
        let healths: Vec<Option<NodeHealth>> = answers
            .iter()
            .map(|a| a.as_ref().and_then(|a| a.as_ref().ok()).cloned())
            .collect();
        let all_answered = answers.iter().flatten().all(Result::is_ok);
        match agreed_leader(&healths) {
            Some(leader) if all_answered => Ok((leader, healths)),
            _ => Err(self.table(&answers)),
        }
    }

    /// `core1: leader id 1, …; core2: no answer: …`.
    pub fn table(&self, answers: &[Option<Result<NodeHealth, String>>]) -> String {
        let parts: Vec<String> = self
            .cores
            .iter()
            .zip(answers)
            .map(|(n, a)| match a {
                Some(Ok(h)) => format!(
                    "{}: {}, firstIndex {}",
                    n.service(),
                    describe(h),
                    h.first_index
                ),
                Some(Err(e)) => format!("{}: no answer: {e}", n.service()),
                None => format!("{}: left out", n.service()),
            })
            .collect();
        parts.join("; ")
    }

    /// Waits until the cores not in `skip` agree on a leader: its index and `lastIndex`.
    pub async fn wait_leader(&self, skip: &[usize], within: Duration) -> Result<(usize, u64)> {
        watch("the cores agree on a leader", within, || async {
            let (leader, healths) = self.leader(skip).await?;
            Ok((leader, healths[leader].as_ref().map_or(0, |h| h.last_index)))
        })
        .await
    }

    /// Waits until the cores not in `skip` agree on a leader whose `lastIndex` is at least
    /// `index`: writes flow.
    pub async fn wait_writes(&self, skip: &[usize], index: u64, within: Duration) -> Result<u64> {
        let what = format!("the leader's lastIndex reaches {index}");
        watch(&what, within, || async {
            let (leader, healths) = self.leader(skip).await?;
            let last = healths[leader].as_ref().map_or(0, |h| h.last_index);
            if last >= index {
                Ok(last)
            } else {
                Err(format!(
                    "leader {} at lastIndex {last}",
                    self.cores[leader].service()
                ))
            }
        })
        .await
    }

    /// The leader's `lastIndex` once the cores not in `skip` agree on one.
    pub async fn leader_last_index(&self, skip: &[usize], within: Duration) -> Result<u64> {
        Ok(self.wait_leader(skip, within).await?.1)
    }

    /// Waits until core `i` has applied `index` and every core agrees on a leader.
    pub async fn wait_core_caught_up(&self, i: usize, index: u64, within: Duration) -> Result<()> {
        let what = format!("{} catches up to {index}", self.cores[i].service());
        watch(&what, within, || async {
            let (_, healths) = self.leader(&[]).await?;
            let last = healths[i].as_ref().map_or(0, |h| h.last_index);
            if last >= index {
                Ok(())
            } else {
                Err(format!("{} at lastIndex {last}", self.cores[i].service()))
            }
        })
        .await
    }

    /// What Docker says of every container but the fleet's.
    pub async fn docker_states(&self) -> Vec<(String, Result<ContainerState, String>)> {
        join_all(self.containers().into_iter().map(|c| async move {
            (
                c.service.clone(),
                docker::try_state(&c.id).await.map_err(|e| e.to_string()),
            )
        }))
        .await
    }

    /// `Ok` when every container but the fleet's runs, unpaused, and passes its health
    /// check; else the ones that do not.
    pub async fn containers_healthy(&self) -> Result<(), String> {
        let bad: Vec<String> = self
            .docker_states()
            .await
            .into_iter()
            .filter_map(|(service, state)| match state {
                Ok(s) if s.is_healthy() => None,
                Ok(s) => Some(format!("{service} {}", s.describe())),
                Err(e) => Some(format!("{service}: {e}")),
            })
            .collect();
        if bad.is_empty() {
            Ok(())
        } else {
            Err(format!("containers not healthy: {}", bad.join(", ")))
        }
    }

    /// Waits until the system is healthy and writes flow: every container (but the fleet)
    /// running and healthy, the cores agreeing on a leader whose `lastIndex` grew by
    /// [`ADVANCE`] from what it was when the wait began, every edge at least at that first
    /// `lastIndex`, the checkpointer connected to the core.
    pub async fn wait_settled(&self, within: Duration) -> Result<u64> {
        let mark = self.leader_last_index(&[], within).await?;
        let target = mark + ADVANCE;
        let what = format!(
            "every container is healthy, the leader's lastIndex reaches {target} and the edges \
             {mark}"
        );
        watch(&what, within, || async move {
            self.containers_healthy().await?;
            let (leader, healths) = self.leader(&[]).await?;
            let last = healths[leader].as_ref().map_or(0, |h| h.last_index);
            if last < target {
                return Err(format!(
                    "leader {} at lastIndex {last}",
                    self.cores[leader].service()
                ));
            }
            for edge in &self.edges {
                let h = node_health(&edge.api)
                    .await
                    .map_err(|e| format!("{}: {e}", edge.service()))?;
                if h.last_index < mark {
                    return Err(format!("{} at lastIndex {}", edge.service(), h.last_index));
                }
            }
            let cp = get_json(&self.checkpointer.api, "/health").await?;
            if cp["connected"] != Value::Bool(true) {
                return Err(format!("the checkpointer is not connected: {cp}"));
            }
            Ok(last)
        })
        .await
    }

    /// Brings every container but the fleet back after a fault, whatever was done to it:
    /// unpaused, started, and on the project's network under its service name. Says what it
    /// did on stderr; returns the actions that failed.
    pub async fn heal(&self) -> Vec<String> {
        let mut failed = Vec::new();
        for c in self.containers() {
            if let Err(e) = self.heal_one(c).await {
                eprintln!("  … could not put {} back: {e:#}", c.service);
                failed.push(format!("{}: {e:#}", c.service));
            }
        }
        failed
    }

    async fn heal_one(&self, c: &Container) -> Result<()> {
        let state = docker::try_state(&c.id).await?;
        if state.paused {
            eprintln!("  … unpausing {}", c.service);
            docker::try_unpause(&c.id).await?;
        } else if !state.running {
            eprintln!("  … starting {}", c.service);
            docker::try_start(&c.id).await?;
        }
        if !docker::try_networks(&c.id).await?.contains(&self.network) {
            eprintln!("  … reconnecting {} to {}", c.service, self.network);
            docker::try_network_connect(&self.network, &c.id, &c.service).await?;
        }
        Ok(())
    }

    /// The newest checkpoint the cores list (`GET /checkpoints` of the leader, else of any
    /// core): its index, 0 when there is none.
    pub async fn newest_checkpoint(&self) -> Result<u64> {
        let mut last_error = None;
        for core in &self.cores {
            match get_json(&core.api, "/checkpoints").await {
                Ok(list) => return newest_index(&list).map_err(|e| anyhow!(e)),
                Err(e) => last_error = Some(e),
            }
        }
        bail!(
            "no core answered GET /checkpoints: {}",
            last_error.unwrap_or_default()
        )
    }
}

/// The project's network among a container's: the only one, else compose's `<project>_default`.
fn pick_network(project: &str, networks: &[String]) -> Option<String> {
    if networks.len() == 1 {
        return networks.first().cloned();
    }
    let default = format!("{project}_default");
    networks
        .iter()
        .find(|n| **n == default)
        .or_else(|| networks.iter().find(|n| n.ends_with("_default")))
        .or_else(|| networks.first())
        .cloned()
}

/// `GET path` as JSON; a status other than 200 or a body that is not JSON is an error.
pub async fn get_json(api: &Api, path: &str) -> Result<Value, String> {
    let r = api
        .try_get(path)
        .await
        .map_err(|e| format!("GET {}: {e}", api.url(path)))?;
    if r.status != 200 {
        return Err(format!(
            "GET {}: status {} {}",
            api.url(path),
            r.status,
            r.text()
        ));
    }
    serde_json::from_slice(&r.body).map_err(|e| format!("GET {}: not JSON ({e})", api.url(path)))
}

/// The index of the first (newest) manifest of a `GET /checkpoints` answer; 0 when empty.
pub fn newest_index(list: &Value) -> Result<u64, String> {
    let list = list
        .as_array()
        .ok_or_else(|| format!("GET /checkpoints is not a list: {list}"))?;
    Ok(list
        .iter()
        .filter_map(|m| m["index"].as_u64())
        .max()
        .unwrap_or(0))
}

/// The sum of metric `name` in `GET /metrics`, `None` when it is not exported.
pub async fn metric(api: &Api, name: &str) -> Result<Option<f64>, String> {
    let r = api
        .try_get("/metrics")
        .await
        .map_err(|e| format!("GET {}: {e}", api.url("/metrics")))?;
    if r.status != 200 {
        return Err(format!("GET {}: status {}", api.url("/metrics"), r.status));
    }
    Ok(crate::server::parse_metric(&r.text(), name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_project_network_is_found() {
        let one = ["x_default".to_string()];
        assert_eq!(pick_network("p", &one).as_deref(), Some("x_default"));
        let two = ["bridge".to_string(), "p_default".to_string()];
        assert_eq!(pick_network("p", &two).as_deref(), Some("p_default"));
        let other = ["bridge".to_string(), "q_default".to_string()];
        assert_eq!(pick_network("p", &other).as_deref(), Some("q_default"));
        assert_eq!(pick_network("p", &[]), None);
    }

    #[test]
    fn the_newest_checkpoint_is_the_highest_index() {
        let list = serde_json::json!([{"index": 40}, {"index": 90}, {"index": 10}]);
        assert_eq!(newest_index(&list), Ok(90));
        assert_eq!(newest_index(&serde_json::json!([])), Ok(0));
        assert!(newest_index(&serde_json::json!({"error": "x"})).is_err());
    }
}
