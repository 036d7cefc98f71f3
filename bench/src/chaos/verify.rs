//! The checks after the faults: the fleet's own verdict (stopped with SIGTERM: its exit
//! code and its report), the cores and edges holding the same bytes over their common
//! retained range, every checkpoint the cores list downloading and verifying, and each write
//! of the run's writer found exactly once.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, Result};
use changeagent_client::{Client, Manifest, Scope};
use changeagent_testkit::docker;
use changeagent_testkit::health::node_health;
use serde_json::{json, Value};

use super::topology::{Container, Node, Topology};
use super::writer::{marker, WriterLog};
use super::{watch, Progress};

/// Where the fleet writes its report when its container does not say
/// (`CHANGEAGENT_FLEET_REPORT`).
const FLEET_REPORT: &str = "/data/fleet-report.json";

/// Lines of a container's log quoted when it failed.
const LOG_LINES: usize = 20;

/// Times a server's retained changes are read again when a truncation moved its start
/// while they were read (a 410 on a later page).
const READ_ATTEMPTS: usize = 3;

/// Timeout of one request of the checkpoint downloads.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// How much of a change's text a mismatch report quotes.
const QUOTE_CHARS: usize = 300;

/// One verdict of the summary.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: Value,
    /// Services whose logs explain a failure.
    pub look_at: Vec<String>,
}

impl Check {
    pub fn to_json(&self) -> Value {
        json!({"check": self.name, "ok": self.ok, "detail": self.detail, "lookAt": self.look_at})
    }

    fn failed(name: &'static str, detail: impl Into<Value>, look_at: &[&str]) -> Check {
        Check {
            name,
            ok: false,
            detail: detail.into(),
            look_at: look_at.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Stops the fleet with SIGTERM (it stops writing, lets every consumer converge and checks
/// them, then exits) and reads its verdict: exit code 0 and a report with `"ok": true`.
/// The fleet's report, when one was found, is returned for the summary.
pub async fn fleet(t: &Topology, grace: Duration) -> (Check, Option<Value>) {
    let Some(fleet) = &t.fleet else {
        let why = format!(
            "fleet not running: project {} has no fleet container",
            t.project
        );
        return (Check::failed("fleet", why, &["fleet"]), None);
    };
    match stop_fleet(fleet, grace).await {
        Ok(verdict) => verdict,
        Err(e) => (Check::failed("fleet", format!("{e:#}"), &["fleet"]), None),
    }
}

async fn stop_fleet(fleet: &Container, grace: Duration) -> Result<(Check, Option<Value>)> {
    let state = docker::try_state(&fleet.id).await?;
    let mut detail = json!({});
    if state.running {
        eprintln!(
            "chaos: stopping the fleet (SIGTERM: it stops writing, lets every consumer \
             converge and checks them; up to {} s)",
            grace.as_secs()
        );
        let id = fleet.id.clone();
        let _progress = Progress::start(move |elapsed| {
            format!("the fleet converges and checks ({} s)", elapsed.as_secs())
        });
        let stopping = std::time::Instant::now();
        docker::try_stop(&id, grace).await?;
        detail["stopSecs"] = json!(super::secs(stopping.elapsed()));
    } else {
        detail["notRunning"] = json!(format!(
            "fleet not running: it had already {} before the run stopped it",
            state.describe()
        ));
    }
    let after = docker::try_state(&fleet.id).await?;
    detail["exitCode"] = json!(after.exit_code);
    let path = docker::try_env(&fleet.id, "CHANGEAGENT_FLEET_REPORT")
        .await?
        .unwrap_or_else(|| FLEET_REPORT.to_string());
    let report = fleet_report(&fleet.id, &path).await;
    let ok = state.running
        && after.exit_code == 0
        && report
            .as_ref()
            .is_some_and(|r| r["ok"] == Value::Bool(true));
    if !ok {
        if let Ok((out, err)) = docker::try_logs(&fleet.id, LOG_LINES).await {
            detail["logTail"] = json!(format!("{out}{err}"));
        }
        if report.is_none() {
            detail["report"] = json!(format!(
                "no report: neither {path} in the container nor a JSON last line on its stdout"
            ));
        }
    }
    let check = Check {
        name: "fleet",
        ok,
        detail,
        look_at: if ok {
            Vec::new()
        } else {
            vec!["fleet".to_string()]
        },
    };
    Ok((check, report))
}

/// The fleet's report: the file it wrote, else the last JSON line of its stdout.
async fn fleet_report(id: &str, path: &str) -> Option<Value> {
    if let Ok(bytes) = docker::try_copy_file_out(id, path).await {
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            return Some(v);
        }
    }
    let (out, _) = docker::try_logs(id, LOG_LINES).await.ok()?;
    last_json_line(&out)
}

/// The last line of `text` that is a JSON object.
pub fn last_json_line(text: &str) -> Option<Value> {
    text.lines()
        .rev()
        .filter(|l| l.trim_start().starts_with('{'))
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(Value::is_object)
}

/// Waits until the writes have stopped showing: every core answers with the same
/// `firstIndex` and `lastIndex`, and every edge has reached that `lastIndex`.
pub async fn quiet(t: &Topology, within: Duration) -> Result<(u64, u64)> {
    watch(
        "the cores agree on firstIndex and lastIndex and the edges reach it",
        within,
        || async {
            let mut seen = Vec::new();
            for node in t.cores.iter().chain(&t.edges) {
                let h = node_health(&node.api)
                    .await
                    .map_err(|e| format!("{}: {e}", node.service()))?;
                seen.push((node.service(), h.first_index, h.last_index));
            }
            let cores = &seen[..t.cores.len()];
            let (first, last) = (cores[0].1, cores[0].2);
            let agree = cores.iter().all(|s| s.1 == first && s.2 == last)
                && seen[t.cores.len()..].iter().all(|s| s.2 == last);
            if agree {
                Ok((first, last))
            } else {
                let parts: Vec<String> = seen
                    .iter()
                    .map(|(s, f, l)| format!("{s} {f}..={l}"))
                    .collect();
                Err(parts.join(", "))
            }
        },
    )
    .await
}

/// A server's retained changes, each as the bytes it sent.
#[derive(Debug, Clone)]
pub struct Retained {
    pub service: String,
    /// `(_id, raw JSON)` in order.
    pub changes: Vec<(u64, String)>,
}

impl Retained {
    fn first(&self) -> u64 {
        self.changes.first().map_or(0, |c| c.0)
    }

    fn last(&self) -> u64 {
        self.changes.last().map_or(0, |c| c.0)
    }

    /// The first `_id` that does not follow the one before it.
    fn gap(&self) -> Option<(u64, u64)> {
        self.changes
            .windows(2)
            .find(|w| w[1].0 != w[0].0 + 1)
            .map(|w| (w[0].0, w[1].0))
    }
}

/// Reads every retained change of `node` (from its `firstIndex`), again when a truncation
/// moved the start meanwhile.
async fn retained(node: &Node) -> Result<Retained> {
    // Pages may be large; the probe client's short timeout is for health checks.
    let api = &node.reads;
    let mut last_error = String::new();
    for _ in 0..READ_ATTEMPTS {
        let first = match node_health(&node.api).await {
            Ok(h) => h.first_index,
            Err(e) => {
                last_error = e;
                continue;
            }
        };
        match api.try_raw_changes_after(first.saturating_sub(1), "").await {
            Ok(raws) => {
                let mut changes = Vec::with_capacity(raws.len());
                for raw in raws {
                    let id = changeagent_testkit::try_change_id(&raw).map_err(|e| anyhow!(e))?;
                    changes.push((id, raw));
                }
                return Ok(Retained {
                    service: node.service().to_string(),
                    changes,
                });
            }
            Err(e) => last_error = e,
        }
    }
    Err(anyhow!(
        "{}: could not read its retained changes in {READ_ATTEMPTS} attempts: {last_error}",
        node.service()
    ))
}

/// Every core and edge hold the same bytes over their common retained range: each list is
/// dense, ends at `last` or later, and agrees change for change with `core1`'s. Returns
/// the check and `core1`'s list (for the writer check).
pub async fn replicas(t: &Topology, last: u64) -> (Check, Option<Retained>) {
    let mut lists = Vec::new();
    for node in t.cores.iter().chain(&t.edges) {
        match retained(node).await {
            Ok(list) => lists.push(list),
            Err(e) => {
                let service = node.service().to_string();
                return (
                    Check::failed("replicas", format!("{e:#}"), &[service.as_str()]),
                    None,
                );
            }
        }
    }
    let reference = lists[0].clone();
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    let mut look_at = Vec::new();
    for list in &lists {
        let mut row = json!({
            "server": list.service,
            "first": list.first(),
            "last": list.last(),
            "changes": list.changes.len(),
        });
        let mut bad = |why: String| {
            problems.push(format!("{}: {why}", list.service));
            look_at.push(list.service.clone());
        };
        if list.changes.is_empty() {
            bad("retains no changes".to_string());
        } else if let Some((a, b)) = list.gap() {
            bad(format!("its list jumps from {a} to {b}"));
        } else if list.last() < last {
            bad(format!(
                "ends at {}, before the cores' lastIndex {last}",
                list.last()
            ));
        } else if list.service != reference.service {
            match compare(&reference, list) {
                Ok((from, to)) => {
                    row["identicalTo"] = json!({
                        "server": reference.service, "from": from, "to": to
                    })
                }
                Err(why) => bad(why),
            }
        }
        rows.push(row);
    }
    let ok = problems.is_empty();
    let check = Check {
        name: "replicas",
        ok,
        detail: json!({"lastIndex": last, "servers": rows, "problems": problems}),
        look_at,
    };
    (check, Some(reference))
}

/// `b` against `a` over the range both retain: the range, or the first difference.
fn compare(a: &Retained, b: &Retained) -> Result<(u64, u64), String> {
    let from = a.first().max(b.first());
    let to = a.last().min(b.last());
    if from > to {
        return Err(format!(
            "retains {}..={}, nothing in common with {} ({}..={})",
            b.first(),
            b.last(),
            a.service,
            a.first(),
            a.last()
        ));
    }
    // Both lists are dense, so positions follow from ids.
    let slice = |l: &Retained| {
        let start = (from - l.first()) as usize;
        let end = (to - l.first()) as usize;
        l.changes[start..=end].to_vec()
    };
    for ((id, x), (_, y)) in slice(a).iter().zip(slice(b).iter()) {
        if x != y {
            let quote = |s: &str| s.chars().take(QUOTE_CHARS).collect::<String>();
            return Err(format!(
                "change {id} differs from {}'s: {} vs {}",
                a.service,
                quote(y),
                quote(x)
            ));
        }
    }
    Ok((from, to))
}

/// The writer's changes found in a checkpoint: its index and `(n, _id)` of each.
#[derive(Debug, Clone, Default)]
pub struct Marked {
    pub index: u64,
    pub found: Vec<(u64, u64)>,
}

/// Downloads every checkpoint the cores list (client library: size and sha256 of the bytes,
/// then every line and the trailer as they are read) and collects the writer's changes from
/// the newest full one. A checkpoint dropped from the list meanwhile (the checkpointer
/// keeps only the newest few) is skipped, not failed.
pub async fn checkpoints(t: &Topology, run_id: &str) -> (Check, Option<Marked>) {
    let urls: Vec<&str> = t.cores.iter().map(|n| n.url.as_str()).collect();
    let client = match Client::builder(urls)
        .timeout(DOWNLOAD_TIMEOUT)
        .root_certificates(t.roots.clone())
        .build()
    {
        Ok(c) => c,
        Err(e) => return (Check::failed("checkpoints", e.to_string(), &[]), None),
    };
    let manifests = match client.checkpoints(None).await {
        Ok(m) => m,
        Err(e) => {
            let why = format!("GET /checkpoints: {e}");
            return (Check::failed("checkpoints", why, &["core1"]), None);
        }
    };
    if manifests.is_empty() {
        let why = "the cores list no checkpoint";
        return (Check::failed("checkpoints", why, &["checkpointer"]), None);
    }
    let newest_full = manifests
        .iter()
        .filter(|m| m.scope == Scope::All)
        .map(|m| m.index)
        .max();
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    let mut marked = None;
    for manifest in &manifests {
        let collect = (Some(manifest.index) == newest_full).then(|| run_id.to_string());
        let mut row = json!({
            "index": manifest.index,
            "scope": manifest.scope.to_string(),
            "size": manifest.size,
            "records": manifest.records,
        });
        match verify_one(&client, manifest, collect).await {
            Ok(found) => {
                row["verified"] = json!(true);
                if let Some(found) = found {
                    marked = Some(Marked {
                        index: manifest.index,
                        found,
                    });
                }
            }
            Err(e) => {
                let still_listed = client
                    .checkpoints(None)
                    .await
                    .map(|now| now.iter().any(|m| m == manifest))
                    .unwrap_or(true);
                if still_listed {
                    problems.push(format!("checkpoint {}: {e:#}", manifest.index));
                    row["error"] = json!(format!("{e:#}"));
                } else {
                    row["dropped"] = json!("no longer listed (a newer one replaced it)");
                }
            }
        }
        rows.push(row);
    }
    let ok = problems.is_empty() && marked.is_some();
    if marked.is_none() && problems.is_empty() {
        problems.push("no full-scope checkpoint could be read".to_string());
    }
    let look_at = if ok {
        Vec::new()
    } else {
        vec!["checkpointer".to_string(), "s3".to_string()]
    };
    let check = Check {
        name: "checkpoints",
        ok,
        detail: json!({"checkpoints": rows, "problems": problems}),
        look_at,
    };
    (check, marked)
}

/// Downloads and reads one checkpoint to its end; with `collect`, the `(n, _id)` of the
/// changes of that writer run it holds.
async fn verify_one(
    client: &Client,
    manifest: &Manifest,
    collect: Option<String>,
) -> Result<Option<Vec<(u64, u64)>>> {
    let verified = client.fetch_checkpoint(manifest).await?;
    tokio::task::spawn_blocking(move || {
        let mut found = Vec::new();
        for change in verified.reader()? {
            let change = change?;
            if let (Some(run), Some(data)) = (&collect, &change.data) {
                if let Some((r, n)) = marker(data) {
                    if r == run.as_str() {
                        found.push((n, change.id));
                    }
                }
            }
        }
        anyhow::Ok(collect.map(|_| found))
    })
    .await
    .map_err(|e| anyhow!("reading the checkpoint panicked: {e}"))?
}

/// Each write the writer saw acknowledged is in the log exactly once, with the `_id` it was
/// given: in the newest full checkpoint (ids up to its index) or in `core1`'s retained list
/// (ids after it). Writes sent but never acknowledged may be in at most once.
pub fn writer(log: &WriterLog, marked: &Marked, retained: &Retained) -> Check {
    let mut found: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut in_checkpoint = 0usize;
    for &(n, id) in &marked.found {
        if id <= marked.index {
            found.entry(n).or_default().push(id);
            in_checkpoint += 1;
        }
    }
    let mut in_log = 0usize;
    for (id, raw) in &retained.changes {
        if *id <= marked.index {
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(raw) else {
            continue;
        };
        if let Some((run, n)) = v.get("data").and_then(marker) {
            if run == log.run_id {
                found.entry(n).or_default().push(*id);
                in_log += 1;
            }
        }
    }
    let mut problems = Vec::new();
    if retained.first() > marked.index + 1 {
        problems.push(format!(
            "{}'s list starts at {}, after checkpoint {} + 1: the changes between are in neither",
            retained.service,
            retained.first(),
            marked.index
        ));
    }
    if log.acked.is_empty() {
        problems.push(format!(
            "no write was acknowledged (last failure: {})",
            log.last_failure.as_deref().unwrap_or("none")
        ));
    }
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    let acked: BTreeMap<u64, u64> = log.acked.iter().copied().collect();
    for (&n, &id) in &acked {
        match found.get(&n).map(Vec::as_slice) {
            None | Some([]) => missing.push(json!({"n": n, "_id": id})),
            Some([got]) if *got == id => {}
            Some(got) => wrong.push(json!({"n": n, "acked": id, "found": got})),
        }
    }
    let mut unacked_found = 0usize;
    for (n, ids) in &found {
        if acked.contains_key(n) {
            continue;
        }
        if *n > log.sent || ids.len() > 1 {
            wrong.push(json!({"n": n, "acked": null, "found": ids}));
        } else {
            unacked_found += 1;
        }
    }
    if !missing.is_empty() {
        problems.push(format!("{} acknowledged writes are missing", missing.len()));
    }
    if !wrong.is_empty() {
        problems.push(format!(
            "{} writes are in more than once or under another _id",
            wrong.len()
        ));
    }
    missing.truncate(10);
    wrong.truncate(10);
    let ok = problems.is_empty();
    Check {
        name: "writer",
        ok,
        detail: json!({
            "runId": log.run_id,
            "sent": log.sent,
            "acknowledged": log.acked.len(),
            "failedAttempts": log.failed_attempts,
            "foundInCheckpoint": in_checkpoint,
            "checkpoint": marked.index,
            "foundInLog": in_log,
            "unacknowledgedFound": unacked_found,
            "missing": missing,
            "wrong": wrong,
            "problems": problems,
        }),
        look_at: if ok {
            Vec::new()
        } else {
            vec!["core1".to_string(), "checkpointer".to_string()]
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(service: &str, changes: &[(u64, &str)]) -> Retained {
        Retained {
            service: service.to_string(),
            changes: changes.iter().map(|(i, s)| (*i, s.to_string())).collect(),
        }
    }

    #[test]
    fn lists_are_compared_over_their_common_range() {
        let a = list("core1", &[(5, "a5"), (6, "a6"), (7, "a7")]);
        let b = list("edge1", &[(6, "a6"), (7, "a7"), (8, "a8")]);
        assert_eq!(compare(&a, &b), Ok((6, 7)));
        let c = list("edge2", &[(6, "a6"), (7, "XX")]);
        let err = compare(&a, &c).unwrap_err();
        assert!(err.contains("change 7 differs"), "{err}");
        let d = list("core2", &[(9, "a9")]);
        assert!(compare(&a, &d).unwrap_err().contains("nothing in common"));
        assert_eq!(list("x", &[(1, ""), (2, ""), (4, "")]).gap(), Some((2, 4)));
        assert_eq!(a.gap(), None);
    }

    fn log(acked: &[(u64, u64)], sent: u64) -> WriterLog {
        WriterLog {
            run_id: "r".to_string(),
            acked: acked.to_vec(),
            sent,
            failed_attempts: 0,
            last_failure: None,
        }
    }

    fn change(id: u64, run: &str, n: u64) -> (u64, &'static str) {
        let raw = format!(r#"{{"_id":{id},"data":{{"chaos":"{run}","n":{n}}}}}"#);
        (id, Box::leak(raw.into_boxed_str()))
    }

    #[test]
    fn the_writer_check_catches_lost_duplicated_and_moved_writes() {
        let marked = Marked {
            index: 10,
            found: vec![(1, 3), (2, 7)],
        };
        let retained = list(
            "core1",
            &[
                change(9, "r", 2),
                change(11, "r", 3),
                change(12, "other", 4),
                change(13, "r", 4),
            ],
        );
        // Everything acknowledged is found once (change 9 is in the checkpoint's range).
        let ok = writer(
            &log(&[(1, 3), (2, 7), (3, 11), (4, 13)], 4),
            &marked,
            &retained,
        );
        assert!(ok.ok, "{}", ok.detail);
        assert_eq!(ok.detail["foundInCheckpoint"], 2);
        assert_eq!(ok.detail["foundInLog"], 2);

        // A write acknowledged but not there.
        let lost = writer(
            &log(&[(1, 3), (2, 7), (3, 11), (4, 13), (5, 14)], 5),
            &marked,
            &retained,
        );
        assert!(!lost.ok);
        assert_eq!(lost.detail["missing"][0]["n"], 5);

        // A write found under another id than acknowledged.
        let moved = writer(
            &log(&[(1, 3), (2, 7), (3, 12), (4, 13)], 4),
            &marked,
            &retained,
        );
        assert!(!moved.ok);
        assert_eq!(moved.detail["wrong"][0]["n"], 3);

        // A write in twice.
        let twice = Marked {
            index: 10,
            found: vec![(1, 3), (1, 4), (2, 7)],
        };
        let dup = writer(
            &log(&[(1, 3), (2, 7), (3, 11), (4, 13)], 4),
            &twice,
            &retained,
        );
        assert!(!dup.ok);

        // Unacknowledged but sent: fine once.
        let unacked = writer(&log(&[(1, 3), (2, 7)], 4), &marked, &retained);
        assert!(unacked.ok, "{}", unacked.detail);
        assert_eq!(unacked.detail["unacknowledgedFound"], 2);

        // A retained list that starts after the checkpoint leaves a hole.
        let late = list("core1", &[change(12, "r", 9)]);
        let hole = writer(&log(&[(1, 3), (2, 7)], 9), &marked, &late);
        assert!(!hole.ok);

        // Nothing acknowledged proves nothing.
        let none = writer(&log(&[], 0), &Marked::default(), &list("core1", &[]));
        assert!(!none.ok);
    }

    #[test]
    fn the_last_json_line_is_the_report() {
        let out = "starting\n{\"progress\":1}\nnot json {\n{\"ok\":true,\"consumers\":3}\nbye\n";
        assert_eq!(
            last_json_line(out),
            Some(json!({"ok": true, "consumers": 3}))
        );
        assert_eq!(last_json_line("no json here\n"), None);
    }
}
