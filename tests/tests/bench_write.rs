//! `changeagent-bench write` against a real node, with each of its HTTP clients for the
//! posters (the minimal HTTP/1.1 one, the default, and reqwest): every post it counts is
//! in the log, and nothing else, so its figures are of acknowledged writes.

mod common;

use std::time::Duration;

use changeagent_testkit::{ServerOptions, ServerProcess};
use common::run_bench;
use serde_json::Value;

/// Two short client runs and a batch run, with room for a slow machine.
const BENCH_DEADLINE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_bench_posts_exactly_what_it_counts() {
    let server = ServerProcess::start_leader(ServerOptions::default()).await;
    let api = server.api();
    let last_index = |v: Value| v["lastIndex"].as_u64().expect("lastIndex");
    let before = last_index(api.get("/changes?limit=1").await.ok_json());
    let url = server.url();
    let mut counted = 0;
    for client in ["raw", "reqwest"] {
        let args: Vec<std::ffi::OsString> = [
            "--server",
            url.as_str(),
            "write",
            "--clients",
            "1,4",
            "--duration",
            "1",
            "--batch-posters",
            "2",
            "--batch-size",
            "10",
            "--write-client",
            client,
        ]
        .into_iter()
        .map(Into::into)
        .collect();
        let run = run_bench(&args, BENCH_DEADLINE).await;
        assert!(
            run.status.success(),
            "{client}: {}\n{}\n{}",
            run.status,
            run.stdout,
            run.stderr_tail
        );
        assert!(
            run.stdout.contains(&format!("({client} client)")),
            "the runs do not name the {client} client:\n{}",
            run.stdout
        );
        let summary = run.summary();
        let n = |v: &Value, field: &str| {
            v[field]
                .as_u64()
                .unwrap_or_else(|| panic!("{client}: no {field} in {v}"))
        };
        let runs = summary["runs"].as_array().expect("runs");
        assert_eq!(runs.len(), 2, "{summary}");
        for r in runs.iter().chain([&summary["batch"]]) {
            assert_eq!(n(r, "errors"), 0, "{client}: {r}");
            assert!(n(r, "changes") > 0, "{client}: nothing posted: {r}");
            counted += n(r, "changes");
        }
    }
    let after = last_index(api.get("/changes?limit=1").await.ok_json());
    assert_eq!(
        after - before,
        counted,
        "the log grew by {} changes, the bench counted {counted}",
        after - before
    );
}
