//! Operational endpoints: `/health` on a single node, `/metrics` in the
//! Prometheus text format, and the `X-Cluster-Id` header.

use changeagent_testkit::{ServerOptions, ServerProcess};

#[tokio::test]
async fn health_reports_a_single_leader() {
    let server = ServerProcess::start_leader(ServerOptions::default()).await;
    let api = server.api();
    for i in 0..3 {
        api.post_change(&format!(r#"{{"data":{i}}}"#)).await;
    }
    let r = api.get("/health").await;
    let v = r.ok_json();
    assert!(
        r.header("content-type")
            .unwrap_or_default()
            .starts_with("application/json"),
        "{:?}",
        r.headers
    );
    assert_eq!(v["role"], "leader", "{v}");
    let node = v["nodeId"]
        .as_u64()
        .unwrap_or_else(|| panic!("no nodeId: {v}"));
    assert_eq!(v["leader"].as_u64(), Some(node), "{v}");
    assert!(v["term"].as_u64().is_some_and(|t| t >= 1), "{v}");
    assert_eq!(v["firstIndex"], 1, "{v}");
    assert_eq!(v["lastIndex"], 3, "{v}");
    assert_eq!(v["lag"], 0, "{v}");
    assert!(v["appliedLogIndex"].as_u64().is_some(), "{v}");
    let cluster = v["clusterId"].as_str().unwrap_or_default().to_string();
    assert!(!cluster.is_empty(), "{v}");

    // The same cluster id is sent on reads.
    for path in ["/changes", "/changes?since=3&block=0", "/changes?tag=none"] {
        let r = api.get(path).await;
        r.expect_status(200);
        assert_eq!(
            r.header("x-cluster-id").as_deref(),
            Some(cluster.as_str()),
            "GET {path}"
        );
    }
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let server = ServerProcess::start_leader(ServerOptions::default()).await;
    let api = server.api();
    api.post_change(r#"{"data":1}"#).await;
    api.get("/changes").await.expect_status(200);
    api.get("/changes/999").await;

    let r = api.get("/metrics").await;
    r.expect_status(200);
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/plain"), "content-type {ct:?}");
    let text = r.text();
    for name in [
        "changeagent_http_requests_total",
        "changeagent_http_request_duration_seconds",
        "changeagent_applied_index",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }
    // Every sample line is `name{labels} value`.
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let value = line.rsplit(' ').next().unwrap_or_default();
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "not a Prometheus sample line: {line:?}"
        );
    }
    // Requests are counted with their route, method and status.
    let counted = |status: &str| {
        text.lines().any(|l| {
            l.starts_with("changeagent_http_requests_total{")
                && l.contains(&format!("status=\"{status}\""))
                && l.contains("method=\"GET\"")
                && l.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|v| v >= 1.0)
        })
    };
    assert!(counted("200"), "no counted GET 200 in:\n{text}");
    assert!(counted("404"), "no counted GET 404 in:\n{text}");
    let applied = text
        .lines()
        .find(|l| l.starts_with("changeagent_applied_index"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert!(
        applied.is_some_and(|v| v >= 1.0),
        "changeagent_applied_index = {applied:?}"
    );
}
