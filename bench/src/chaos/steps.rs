//! The faults, one function per step. Each injects its fault through Docker, waits on what
//! the servers report until the fault has had its effect, puts the container back (also
//! when a wait failed) and waits until the part it hit has recovered; it returns what it
//! saw and how long each part took. The run waits for the whole system to settle after.

use std::cell::Cell;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use changeagent_testkit::docker;
use changeagent_testkit::health::node_health;
use changeagent_testkit::Api;
use serde_json::{json, Value};

use super::topology::{get_json, metric, newest_index, Topology, ADVANCE};
use super::{secs, watch, Step};

/// Changes the leader must append while a follower is cut off: enough that the follower has
/// real catching up to do (a second or two of writes), few enough to wait for quickly.
const PARTITION_ADVANCE: u64 = 100;

/// How far past the paused edge's index the cores' `firstIndex` must move. The edge may
/// still read the answer to the long-poll it had open when it was frozen (a few changes
/// after its index); its next request must then fall before `firstIndex - 1`, which
/// answers 410.
const PAUSE_MARGIN: u64 = 100;

/// Changes the log must grow by after a checkpoint round's end record before the
/// `restart-checkpointer` step freezes the object store: time for the round's last steps
/// (`latest.json`, truncation, deleting old objects; milliseconds) to finish, far less
/// than the pause before the next round (`CHANGEAGENT_CHECKPOINT_SECS`, 15 s by default).
const IDLE_MARGIN: u64 = 2 * ADVANCE;

/// How long a long-poll for internal records blocks: well under the request timeout.
const BLOCK_SECS: u64 = 10;

/// Grace period of `docker restart` of the S3 store before SIGKILL.
const S3_GRACE: Duration = Duration::from_secs(10);

/// Internal record types (DESIGN.md, "Internal records").
const CHECKPOINT_START: i32 = -1;
const CHECKPOINT_END: i32 = -2;

/// Runs one step.
pub async fn run(step: Step, t: &Topology, within: Duration) -> Result<Value> {
    match step {
        Step::KillLeader => kill_leader(t, within).await,
        Step::Partition => partition(t, within).await,
        Step::PauseEdge => pause_edge(t, within).await,
        Step::RestartCheckpointer => restart_checkpointer(t, within).await,
        Step::RestartS3 => restart_s3(t, within).await,
    }
}

/// `kill-leader`: SIGKILL the leader's container; a new leader among the others and writes
/// through it; start the container again; it catches up with the leader.
async fn kill_leader(t: &Topology, within: Duration) -> Result<Value> {
    let (leader, before) = t.wait_leader(&[], within).await?;
    let node = &t.cores[leader];
    eprintln!(
        "  … docker kill {} (the leader, lastIndex {before})",
        node.service()
    );
    let killed = Instant::now();
    docker::try_kill(&node.container.id).await?;
    let survived = async {
        // The killed node is left out, so only another can be the one agreed on.
        let (new, _) = t.wait_leader(&[leader], within).await?;
        let elected = killed.elapsed();
        t.wait_writes(&[leader], before + ADVANCE, within).await?;
        anyhow::Ok((new, elected, killed.elapsed()))
    }
    .await;
    // Started again whether or not the others coped.
    let restarted = Instant::now();
    docker::try_start(&node.container.id).await?;
    let (new, elected, writes) = survived?;
    let target = t.leader_last_index(&[leader], within).await?;
    t.wait_core_caught_up(leader, target, within).await?;
    Ok(json!({
        "killed": node.service(),
        "newLeader": t.cores[new].service(),
        "electedSecs": secs(elected),
        "writesFlowingSecs": secs(writes),
        "restartToCaughtUpSecs": secs(restarted.elapsed()),
        "caughtUpTo": target,
    }))
}

/// `partition`: a follower disconnected from the project's network; the others go on
/// without it; reconnected under its service name, it catches up.
async fn partition(t: &Topology, within: Duration) -> Result<Value> {
    let (leader, before) = t.wait_leader(&[], within).await?;
    let cut = (0..t.cores.len())
        .find(|&i| i != leader)
        .context("no follower to cut off")?;
    let node = &t.cores[cut];
    eprintln!(
        "  … docker network disconnect {} {} (a follower, lastIndex {before})",
        t.network,
        node.service()
    );
    let started = Instant::now();
    docker::try_network_disconnect(&t.network, &node.container.id).await?;
    let without = async {
        let networks = docker::try_networks(&node.container.id).await?;
        if networks.contains(&t.network) {
            bail!(
                "{} is still on {} after the disconnect",
                node.service(),
                t.network
            );
        }
        t.wait_writes(&[cut], before + PARTITION_ADVANCE, within)
            .await
    }
    .await;
    let cut_secs = secs(started.elapsed());
    let reconnected = Instant::now();
    docker::try_network_connect(&t.network, &node.container.id, node.service()).await?;
    let reached = without?;
    let target = t.leader_last_index(&[], within).await?;
    t.wait_core_caught_up(cut, target, within).await?;
    Ok(json!({
        "cutOff": node.service(),
        "network": t.network,
        "leaderWithoutIt": reached,
        "cutSecs": cut_secs,
        "reconnectToCaughtUpSecs": secs(reconnected.elapsed()),
        "caughtUpTo": target,
    }))
}

/// `pause-edge`: edge1 frozen until the checkpointer has truncated the cores past its
/// index; unpaused, it gets 410, bootstraps again from a checkpoint and catches up.
async fn pause_edge(t: &Topology, within: Duration) -> Result<Value> {
    let edge = t.edges.first().context("no edge to pause")?;
    let at = node_health(&edge.api)
        .await
        .map_err(|e| anyhow!("{}: {e}", edge.service()))?
        .last_index;
    let before = bootstraps(edge).await?;
    let past = at + 1 + PAUSE_MARGIN;
    eprintln!("  … docker pause {} (lastIndex {at})", edge.service());
    let paused = Instant::now();
    docker::try_pause(&edge.container.id).await?;
    let truncated = watch(
        &format!("the cores' firstIndex passes {past} (truncated past the paused edge)"),
        within,
        || async {
            let (_, healths) = t.leader(&[]).await?;
            let first = healths
                .iter()
                .flatten()
                .map(|h| h.first_index)
                .min()
                .unwrap_or(0);
            if first > past {
                Ok(first)
            } else {
                Err(format!("firstIndex {first}"))
            }
        },
    )
    .await;
    let paused_secs = secs(paused.elapsed());
    let unpaused = Instant::now();
    docker::try_unpause(&edge.container.id).await?;
    let first = truncated?;
    let target = t.leader_last_index(&[], within).await?;
    let after = watch(
        &format!("{} bootstraps again and reaches {target}", edge.service()),
        within,
        || async {
            let h = node_health(&edge.api).await?;
            let now = bootstraps(edge).await.map_err(|e| e.to_string())?;
            if now > before && h.last_index >= target {
                Ok(now)
            } else {
                Err(format!(
                    "lastIndex {}, firstIndex {}, bootstraps {now} (before the pause {before})",
                    h.last_index, h.first_index
                ))
            }
        },
    )
    .await?;
    Ok(json!({
        "paused": edge.service(),
        "pausedAt": at,
        "coresFirstIndex": first,
        "pausedSecs": paused_secs,
        "unpauseToCaughtUpSecs": secs(unpaused.elapsed()),
        "bootstraps": {"before": before, "after": after},
        "caughtUpTo": target,
    }))
}

/// The edge's bootstrap count (`changeagent_edge_bootstraps_total`).
async fn bootstraps(edge: &super::topology::Node) -> Result<u64> {
    let n = metric(&edge.api, "changeagent_edge_bootstraps_total")
        .await
        .map_err(|e| anyhow!(e))?
        .with_context(|| {
            format!(
                "{} exports no changeagent_edge_bootstraps_total",
                edge.service()
            )
        })?;
    // A counter: a whole number.
    Ok(n as u64)
}

/// An internal record of the core's log.
#[derive(Debug, Clone)]
struct Record {
    id: u64,
    data: Value,
}

impl Record {
    /// The checkpoint index a start record announces or an end record's manifest names.
    fn index(&self) -> Option<u64> {
        self.data["index"].as_u64()
    }

    /// Of the full scope (`all`), not a tenant's.
    fn full_scope(&self) -> bool {
        matches!(self.data.get("scope"), None | Some(Value::Null)) || self.data["scope"] == "all"
    }
}

/// The records of `change_type` after `since` (at most 1000), waiting up to `block` seconds
/// for the first.
async fn records(
    core: &Api,
    since: u64,
    change_type: i32,
    block: u64,
) -> Result<Vec<Record>, String> {
    let path = format!("/changes?since={since}&type={change_type}&limit=1000&block={block}");
    let page = get_json(core, &path).await?;
    let changes = page["changes"]
        .as_array()
        .ok_or_else(|| format!("GET {path}: no change list in {page}"))?;
    changes
        .iter()
        .map(|c| {
            Ok(Record {
                id: c["_id"].as_u64().ok_or_else(|| format!("no _id in {c}"))?,
                data: c.get("data").cloned().unwrap_or(Value::Null),
            })
        })
        .collect()
}

/// The first full-scope record of `change_type` after `since` for which `pick` holds.
async fn next_record(
    core: &Api,
    since: u64,
    change_type: i32,
    what: &str,
    within: Duration,
    pick: impl Fn(&Record) -> bool,
) -> Result<Record> {
    // Where the next long-poll starts: past every record already looked at.
    let after = Cell::new(since);
    watch(what, within, || {
        let (pick, after) = (&pick, &after);
        async move {
            let found = records(core, after.get(), change_type, BLOCK_SECS).await?;
            if let Some(last) = found.last() {
                after.set(last.id);
            }
            found
                .into_iter()
                .find(|r| r.full_scope() && pick(r))
                .ok_or_else(|| format!("none after {} yet", after.get()))
        }
    })
    .await
}

/// `restart-checkpointer`: SIGKILLs the checkpointer inside a checkpoint round (after the
/// core appended the round's start record, before its end record) and starts it again; the
/// first round begun after the restart ends and is listed by the core, and the killed round
/// never ended.
///
/// What "mid-upload" means here: a round of this topology takes about 100 ms, `docker kill`
/// several hundred on a busy host, so a kill sent when the start record shows up mostly
/// lands after the round has ended. To land it inside the round every time, the step freezes
/// the object store (`docker pause s3`) between two rounds — once a round has ended and the
/// log has moved on by [`IDLE_MARGIN`] changes, long before the next round is due. The next
/// round then records its start, exports, and cannot finish its upload (nor read it back);
/// the kill lands while it exports or waits on the frozen store, and the store is thawed
/// right after. The checkpointer does not say which of the two it was in, so the step cannot
/// tell them apart. It proves afterwards, from the log, that the killed round never ended:
/// no end record for its index before the restarted checkpointer's first start record.
async fn restart_checkpointer(t: &Topology, within: Duration) -> Result<Value> {
    let before = t.newest_checkpoint().await?;
    let (leader, since) = t.wait_leader(&[], within).await?;
    let core = t.cores[leader].reads.clone();
    let cp = &t.checkpointer;
    // 1. Between two rounds: one has ended, and the log has moved on past it.
    let ended = next_record(
        &core,
        since,
        CHECKPOINT_END,
        "a checkpoint round ends",
        within,
        |_| true,
    )
    .await?;
    t.wait_writes(&[], ended.id + IDLE_MARGIN, within).await?;
    // 2. The store frozen, the next round starts and cannot finish; it is killed.
    eprintln!(
        "  … docker pause {} (between two checkpoint rounds)",
        t.s3.service
    );
    let frozen = Instant::now();
    docker::try_pause(&t.s3.id).await?;
    let killed = async {
        let start = next_record(
            &core,
            ended.id,
            CHECKPOINT_START,
            "the next checkpoint round starts",
            within,
            |_| true,
        )
        .await?;
        let index = start.index().context("a start record without an index")?;
        if end_of(&core, start.id, index, u64::MAX).await?.is_some() {
            bail!("the round for index {index} ended although the object store was frozen");
        }
        let seen = Instant::now();
        docker::try_kill(&cp.container.id).await?;
        eprintln!(
            "  … docker kill {} (round for index {index} in progress; the kill took {} ms)",
            cp.service(),
            seen.elapsed().as_millis()
        );
        anyhow::Ok((start, index))
    }
    .await;
    // Thawed whether or not the kill happened.
    docker::try_unpause(&t.s3.id).await?;
    let frozen_secs = secs(frozen.elapsed());
    let (start, index) = killed?;
    // 3. Started again, it takes its own start back and completes a newer checkpoint.
    let restarted = Instant::now();
    docker::try_start(&cp.container.id).await?;
    let again = next_record(
        &core,
        start.id,
        CHECKPOINT_START,
        "the restarted checkpointer starts a round",
        within,
        |_| true,
    )
    .await?;
    let again_index = again.index().context("a start record without an index")?;
    // Checked now, before the new round ends: the core truncates right after it, and may
    // drop the records between the two starts.
    if let Some(late) = end_of(&core, start.id, index, again.id).await? {
        bail!(
            "the killed round for index {index} ended after all (end record {late}, before the \
             restarted checkpointer's start record {})",
            again.id
        );
    }
    let end = next_record(
        &core,
        again.id,
        CHECKPOINT_END,
        &format!("the round for index {again_index} ends"),
        within,
        |r| r.index() == Some(again_index),
    )
    .await?;
    watch(
        &format!("the core lists checkpoint {again_index}"),
        within,
        || async {
            let newest = newest_index(&get_json(&core, "/checkpoints").await?)?;
            if newest >= again_index {
                Ok(())
            } else {
                Err(format!("newest listed {newest}"))
            }
        },
    )
    .await?;
    if again.data["by"] != start.data["by"] {
        bail!(
            "the restarted checkpointer started its round as {} instead of {}: it did not keep \
             its id in its data dir",
            again.data["by"],
            start.data["by"]
        );
    }
    Ok(json!({
        "checkpointBefore": before,
        "killedRound": index,
        "killedStartRecord": start.id,
        "s3FrozenSecs": frozen_secs,
        "newCheckpoint": again_index,
        "newEndRecord": end.id,
        "restartToCheckpointSecs": secs(restarted.elapsed()),
    }))
}

/// The `_id` of the first full-scope end record for checkpoint `index` after `since` and
/// before `until`, if there is one.
async fn end_of(core: &Api, since: u64, index: u64, until: u64) -> Result<Option<u64>> {
    let ends = records(core, since, CHECKPOINT_END, 0)
        .await
        .map_err(|e| anyhow!(e))?;
    Ok(ends
        .iter()
        .find(|e| e.id < until && e.full_scope() && e.index() == Some(index))
        .map(|e| e.id))
}

/// `restart-s3`: `docker restart` of the object store; once it is healthy, a checkpoint
/// begun after the restart lands (listed by the core).
async fn restart_s3(t: &Topology, within: Duration) -> Result<Value> {
    let before = t.newest_checkpoint().await?;
    let failures = |v: Option<f64>| v.unwrap_or(0.0) as u64;
    let failures_before = failures(
        metric(
            &t.checkpointer.api,
            "changeagent_checkpointer_failures_total",
        )
        .await
        .map_err(|e| anyhow!(e))?,
    );
    eprintln!("  … docker restart {}", t.s3.service);
    let started = Instant::now();
    docker::try_restart(&t.s3.id, S3_GRACE).await?;
    let restart_secs = secs(started.elapsed());
    let mark = t.leader_last_index(&[], within).await?;
    watch(&format!("{} is healthy", t.s3.service), within, || async {
        let state = docker::try_state(&t.s3.id)
            .await
            .map_err(|e| e.to_string())?;
        if state.is_healthy() {
            Ok(())
        } else {
            Err(state.describe())
        }
    })
    .await?;
    let healthy_secs = secs(started.elapsed());
    // The core lists a checkpoint whose start record is past `mark`: a round begun after
    // the restart landed. (Its records themselves may be truncated by then, so the list is
    // what is read, not the log.)
    let index = watch(
        "a checkpoint begun after the restart is listed",
        within,
        || async {
            let newest = t.newest_checkpoint().await.map_err(|e| e.to_string())?;
            if newest > mark {
                Ok(newest)
            } else {
                Err(format!("newest listed {newest}, restart at index {mark}"))
            }
        },
    )
    .await?;
    let failures_after = failures(
        metric(
            &t.checkpointer.api,
            "changeagent_checkpointer_failures_total",
        )
        .await
        .map_err(|e| anyhow!(e))?,
    );
    Ok(json!({
        "restartSecs": restart_secs,
        "healthySecs": healthy_secs,
        "checkpointBefore": before,
        "checkpointAfter": index,
        "restartToCheckpointSecs": secs(started.elapsed()),
        "checkpointerFailedRounds": failures_after.saturating_sub(failures_before),
    }))
}
