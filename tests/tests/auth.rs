//! Tokens with scopes and tenants, end to end with real processes: a core node, a 3-node
//! cluster, an edge and a checkpointer, all started with the same `--auth-file`.
//!
//! - Every auth case on the core: no token, an unknown one, an expired one (401); a token
//!   without the route's scope (403, nothing appended); a token limited to tenant `acme`
//!   reads and writes only acme (403 elsewhere, also inside a batch, by id and through
//!   collections); admin routes take the cluster secret instead of a token; a token over
//!   its rate gets 429 with `Retry-After`; a scope removed from the file while the node
//!   runs is refused from then on, a token added is accepted.
//! - An edge enforces the same file for its clients, tails the core with its own
//!   `--token-file`, and forwards a client's write with the client's own token, which the
//!   core checks again.
//! - A checkpointer with a token writes a checkpoint; a token limited to a tenant sees no
//!   full checkpoint.
//! - In a cluster, a follower checks a write's scope before forwarding it, forwards the
//!   client's token to the leader, and a node joins with the cluster secret.

mod common;

use std::path::{Path, PathBuf};

use changeagent_testkit::cluster::{Cluster, ClusterOptions};
use changeagent_testkit::{wait_until, Api, Reply, ServerOptions, ServerProcess};
use common::*;
use serde_json::{json, Value};

const SECRET: &str = "cluster-secret-for-tests";

/// One token of the auth file: its name, the token, and its entry's other fields.
struct Token {
    name: &'static str,
    token: &'static str,
    fields: Value,
}

fn tokens() -> Vec<Token> {
    let t = |name, token, fields| Token {
        name,
        token,
        fields,
    };
    vec![
        t(
            "admin",
            "admin-token",
            json!({"scopes": ["read", "write", "admin"]}),
        ),
        t("reader", "reader-token", json!({"scopes": ["read"]})),
        t(
            "acme",
            "acme-token",
            json!({"scopes": ["read", "write"], "tenants": ["acme"]}),
        ),
        t(
            "old",
            "old-token",
            json!({"scopes": ["read"], "expires": "2001-01-01T00:00:00Z"}),
        ),
        t("slow", "slow-token", json!({"scopes": ["read"], "rate": 2})),
        t("edge", "edge-token", json!({"scopes": ["read"]})),
        t(
            "checkpointer",
            "checkpointer-token",
            json!({"scopes": ["read", "admin"]}),
        ),
    ]
}

fn sha256_hex(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The auth file's JSON for `tokens`; only hashes are written.
fn auth_json(tokens: &[Token]) -> String {
    let entries: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = t.fields.clone();
            e["name"] = json!(t.name);
            e["sha256"] = json!(sha256_hex(t.token));
            e
        })
        .collect();
    json!({ "tokens": entries }).to_string()
}

/// Writes the auth file and a token file per token into `dir`.
fn write_files(dir: &Path) -> PathBuf {
    let path = dir.join("auth.json");
    std::fs::write(&path, auth_json(&tokens())).unwrap();
    for t in tokens() {
        std::fs::write(
            dir.join(format!("{}.token", t.name)),
            format!("{}\n", t.token),
        )
        .unwrap();
    }
    path
}

fn auth_flags(auth: &Path) -> Vec<String> {
    vec![
        "--auth-file".into(),
        auth.display().to_string(),
        "--cluster-secret".into(),
        SECRET.into(),
    ]
}

async fn start_auth_core(auth: &Path, objects: &Path) -> ServerProcess {
    let mut opts = ServerOptions::default()
        .arg("--object-store")
        .arg(format!("file://{}", objects.display()));
    for a in auth_flags(auth) {
        opts = opts.arg(a);
    }
    ServerProcess::start_leader(opts).await
}

/// Asserts `r` is `status` with a JSON `{"error": …}` body; returns the message.
#[track_caller]
fn assert_error(r: &Reply, status: u16, what: &str) -> String {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {}", r.text()));
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: {v}"))
        .to_owned()
}

async fn post(api: &Api, path: &str, body: Value) -> Reply {
    api.post_json(path, &body.to_string()).await
}

async fn put(api: &Api, path: &str, body: Value) -> Reply {
    api.put_json(path, &body.to_string()).await
}

/// The tenants of a page of changes (`None` for a change without one).
fn page_tenants(r: &Reply) -> Vec<Option<String>> {
    r.ok_json()["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["tenant"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_core_checks_tokens_scopes_tenants_and_rates() {
    let dir = tempfile::tempdir().unwrap();
    let auth = write_files(dir.path());
    let core = start_auth_core(&auth, &dir.path().join("objects")).await;
    let open = core.api();
    let admin = open.with_token("admin-token");
    let reader = open.with_token("reader-token");
    let acme = open.with_token("acme-token");

    // The state: tenants acme and other with a collection each, one change in each tenant
    // and one in none.
    for name in ["acme", "other"] {
        post(&admin, "/tenants", json!({ "name": name }))
            .await
            .expect_status(200);
        post(
            &admin,
            &format!("/tenants/{name}/collections"),
            json!({"name": "flags"}),
        )
        .await
        .expect_status(200);
    }
    let collection = |tenant: &str| {
        let admin = admin.clone();
        let tenant = tenant.to_owned();
        async move {
            let list = admin
                .get(&format!("/tenants/{tenant}/collections"))
                .await
                .ok_json();
            list[0]["_id"].as_u64().unwrap()
        }
    };
    let (acme_flags, other_flags) = (collection("acme").await, collection("other").await);
    let id_of = |r: Reply| r.ok_json()["_id"].as_u64().unwrap();
    let acme_change = id_of(post(&admin, "/changes", json!({"tenant": "acme", "data": 1})).await);
    let other_change = id_of(post(&admin, "/changes", json!({"tenant": "other", "data": 2})).await);
    let plain_change = id_of(post(&admin, "/changes", json!({"data": 3})).await);

    // Open: /health only; 401 with a JSON error and a Bearer challenge elsewhere.
    open.get("/health").await.expect_status(200);
    for path in ["/changes", "/metrics", "/tenants", "/no/such/route"] {
        let r = open.get(path).await;
        assert_error(&r, 401, path);
        assert_eq!(
            r.header("www-authenticate").as_deref(),
            Some("Bearer realm=\"changeagent\""),
            "{path}"
        );
    }
    assert_error(
        &open.with_token("guess").get("/changes").await,
        401,
        "unknown token",
    );
    let expired = assert_error(
        &open.with_token("old-token").get("/changes").await,
        401,
        "expired token",
    );
    assert!(expired.contains("expired"), "{expired}");
    assert_error(
        &post(&open, "/changes", json!({"data": 0})).await,
        401,
        "write without a token",
    );

    // A read token reads everything and writes nothing.
    let before = admin.last_index().await;
    reader.get("/changes").await.expect_status(200);
    reader.get("/metrics").await.expect_status(200);
    let scope = assert_error(
        &post(&reader, "/changes", json!({"data": 0})).await,
        403,
        "write with a read token",
    );
    assert!(scope.contains("write scope"), "{scope}");
    assert_error(
        &post(&reader, "/tenants", json!({"name": "x"})).await,
        403,
        "create a tenant with a read token",
    );

    // A token limited to acme: acme's list, nothing else.
    assert_error(
        &acme.get("/changes").await,
        403,
        "acme reads the whole list",
    );
    let tenants = page_tenants(&acme.get("/changes?tenant=acme").await);
    assert!(!tenants.is_empty());
    assert!(
        tenants.iter().all(|t| t.as_deref() == Some("acme")),
        "{tenants:?}"
    );
    acme.get("/tenants/acme/changes").await.expect_status(200);
    for path in [
        "/changes?tenant=other".to_owned(),
        "/tenants/other/changes".to_owned(),
        "/tenants/nosuch/changes".to_owned(),
        "/tenants/other".to_owned(),
        format!("/changes/{other_change}"),
        format!("/changes/{plain_change}"),
        format!("/collections/{other_flags}"),
        format!("/collections/{other_flags}/keys"),
        "/metrics".to_owned(),
        "/cluster".to_owned(),
        "/checkpoints/latest".to_owned(),
    ] {
        assert_error(&acme.get(&path).await, 403, &format!("acme reads {path}"));
    }
    acme.get(&format!("/changes/{acme_change}"))
        .await
        .expect_status(200);
    acme.get(&format!("/collections/{acme_flags}/keys"))
        .await
        .expect_status(200);
    let listed = acme.get("/tenants").await.ok_json();
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "acme lists only acme: {listed}"
    );
    assert_eq!(listed[0]["name"], "acme");
    assert_eq!(acme.get("/checkpoints").await.ok_json(), json!([]));

    // Its writes: acme only, a batch all or nothing.
    for (what, r) in [
        (
            "no tenant",
            post(&acme, "/changes", json!({"data": 0})).await,
        ),
        (
            "tenant other",
            post(&acme, "/changes", json!({"tenant": "other", "data": 0})).await,
        ),
        (
            "other by id in a batch",
            post(
                &acme,
                "/changes",
                json!([{"tenant": "acme", "data": 0}, {"collection": other_flags.to_string(), "key": "k", "data": 0}]),
            )
            .await,
        ),
        (
            "other's list",
            post(&acme, "/tenants/other/changes", json!({"data": 0})).await,
        ),
        (
            "other's key",
            put(&acme, &format!("/collections/{other_flags}/keys/k"), json!(1)).await,
        ),
        (
            "a new tenant",
            post(&acme, "/tenants", json!({"name": "acme2"})).await,
        ),
        (
            "other's collection",
            post(&acme, "/tenants/other/collections", json!({"name": "c"})).await,
        ),
    ] {
        assert_error(&r, 403, &format!("acme writes to {what}"));
    }
    assert_eq!(
        admin.last_index().await,
        before,
        "refused writes appended nothing"
    );
    post(&acme, "/changes", json!({"tenant": "acme", "data": 4}))
        .await
        .expect_status(200);
    post(&acme, "/tenants/acme/changes", json!({"data": 5}))
        .await
        .expect_status(200);
    put(
        &acme,
        &format!("/collections/{acme_flags}/keys/k"),
        json!(6),
    )
    .await
    .expect_status(200);
    assert_eq!(admin.last_index().await, before + 3);

    // Admin routes: the admin scope or the cluster secret.
    let truncate = json!({"before": 2}).to_string();
    let r = reader.post_json("/admin/truncate", &truncate).await;
    assert_error(&r, 403, "truncate with a read token");
    let r = acme.post_json("/admin/truncate", &truncate).await;
    assert_error(&r, 403, "truncate with a tenant token");
    let with_secret = |api: &Api| {
        let api = api.clone();
        let body = truncate.clone();
        async move {
            api.request(
                "POST",
                "/admin/truncate",
                Some("application/json"),
                Some(body.into_bytes()),
                &[("X-Cluster-Secret", SECRET)],
            )
            .await
        }
    };
    // No checkpoint yet: the request was allowed and refused for what it asks (409).
    assert_error(&with_secret(&open).await, 409, "truncate with the secret");
    assert_error(
        &admin.post_json("/admin/truncate", &truncate).await,
        409,
        "truncate with an admin token",
    );
    let wrong = open
        .request(
            "POST",
            "/admin/truncate",
            Some("application/json"),
            Some(truncate.clone().into_bytes()),
            &[("X-Cluster-Secret", "wrong")],
        )
        .await;
    assert_error(&wrong, 401, "truncate with a wrong secret");

    // Over its rate (2 a second): 429 with Retry-After, as JSON.
    let slow = open.with_token("slow-token");
    let mut limited = None;
    for _ in 0..50 {
        let r = slow.get("/changes?limit=1").await;
        if r.status == 429 {
            limited = Some(r);
            break;
        }
        r.expect_status(200);
    }
    let r = limited.expect("a token over its rate is refused");
    assert_error(&r, 429, "over the rate");
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");

    // The file changes while the node runs: reader loses read, a new token appears.
    let mut changed = tokens();
    changed[1].fields = json!({"scopes": ["write"]});
    changed.push(Token {
        name: "late",
        token: "late-token",
        fields: json!({"scopes": ["read"]}),
    });
    std::fs::write(&auth, auth_json(&changed)).unwrap();
    wait_until(DEADLINE, "the changed auth file to be in force", || {
        let (reader, late) = (reader.clone(), open.with_token("late-token"));
        async move {
            let (r, l) = (reader.get("/changes").await, late.get("/changes").await);
            if r.status == 403 && l.status == 200 {
                Ok(())
            } else {
                Err(format!("reader {} late {}", r.status, l.status))
            }
        }
    })
    .await
    .unwrap();
    post(&reader, "/changes", json!({"data": 7}))
        .await
        .expect_status(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edge_and_a_checkpointer_use_tokens_and_an_edge_forwards_the_clients_own() {
    let dir = tempfile::tempdir().unwrap();
    let auth = write_files(dir.path());
    let objects = dir.path().join("objects");
    let core = start_auth_core(&auth, &objects).await;
    let admin = core.api().with_token("admin-token");
    post(&admin, "/tenants", json!({"name": "acme"}))
        .await
        .expect_status(200);
    for i in 0..20 {
        let tenant = if i % 2 == 0 {
            json!("acme")
        } else {
            json!(null)
        };
        post(&admin, "/changes", json!({"tenant": tenant, "data": i}))
            .await
            .expect_status(200);
    }

    // A checkpointer with its token writes a checkpoint (reads the whole list, admin
    // records).
    let token_file = |name: &str| {
        dir.path()
            .join(format!("{name}.token"))
            .display()
            .to_string()
    };
    let store_url = format!("file://{}", objects.display());
    let ckpt_token = token_file("checkpointer");
    let mut once = ServerProcess::start(checkpointer(
        &core.url(),
        &store_url,
        &[
            "--once",
            "--token-file",
            &ckpt_token,
            "--auth-file",
            &auth.display().to_string(),
        ],
    ))
    .await;
    assert!(
        once.wait_exit(DEADLINE).await.success(),
        "{}",
        once.log_tail(20)
    );
    let kept = admin.get("/checkpoints").await.ok_json();
    assert_eq!(kept.as_array().map(Vec::len), Some(1), "{kept}");
    let acme_core = core.api().with_token("acme-token");
    assert_eq!(acme_core.get("/checkpoints").await.ok_json(), json!([]));
    assert_error(
        &acme_core.get("/checkpoints/latest").await,
        403,
        "a tenant token reads a full checkpoint",
    );

    // The edge tails with its own token and serves only token holders.
    let edge_token = token_file("edge");
    let auth_arg = auth.display().to_string();
    let edge = ServerProcess::start(edge(
        &core.url(),
        &["--token-file", &edge_token, "--auth-file", &auth_arg],
    ))
    .await;
    let open = edge.api();
    let last = admin.last_index().await;
    wait_until(DEADLINE, "the edge to catch up", || {
        let open = open.clone();
        async move {
            let h = open.get("/health").await.ok_json();
            if h["lastIndex"].as_u64() == Some(last) {
                Ok(())
            } else {
                Err(h)
            }
        }
    })
    .await
    .unwrap();
    assert_error(
        &open.get("/changes").await,
        401,
        "edge read without a token",
    );
    assert_error(
        &open.with_token("old-token").get("/changes").await,
        401,
        "edge read with an expired token",
    );
    let acme = open.with_token("acme-token");
    assert_error(
        &acme.get("/changes").await,
        403,
        "acme reads the edge's whole list",
    );
    let (e, c) = (
        acme.get("/changes?tenant=acme").await,
        acme_core.get("/changes?tenant=acme").await,
    );
    e.expect_status(200);
    assert_eq!(
        e.body, c.body,
        "the edge answers acme with the core's bytes"
    );
    assert_eq!(page_tenants(&e).len(), 10);
    open.with_token("reader-token")
        .get("/changes")
        .await
        .expect_status(200);

    // Writes: checked for scope here, forwarded with the client's token, checked again
    // upstream for the tenant.
    let reader = open.with_token("reader-token");
    assert_error(
        &post(&reader, "/changes", json!({"data": 0})).await,
        403,
        "write with a read token at the edge",
    );
    assert_error(
        &post(&acme, "/changes", json!({"data": 0})).await,
        403,
        "acme writes no tenant through the edge",
    );
    assert_eq!(
        admin.last_index().await,
        last,
        "refused writes appended nothing"
    );
    let id = post(
        &acme,
        "/changes",
        json!({"tenant": "acme", "data": "via edge"}),
    )
    .await
    .ok_json()["_id"]
        .as_u64()
        .unwrap();
    assert_eq!(id, last + 1);
    let stored = admin.get(&format!("/changes/{id}")).await.ok_json();
    assert_eq!(stored["data"], "via edge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_checks_and_forwards_tokens_and_a_node_joins_with_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let auth = write_files(dir.path());
    // The harness's own probes (`/cluster` while a node joins) use the admin token.
    let mut opts = ClusterOptions::new(3).token("admin-token");
    for a in auth_flags(&auth) {
        opts = opts.arg(a);
    }
    let mut cluster = Cluster::start_with_peers(opts).await;
    let leader = cluster.wait_leader().await;
    let follower = (leader + 1) % 3;
    let admin = cluster.api(leader);
    post(&admin, "/tenants", json!({"name": "acme"}))
        .await
        .expect_status(200);
    let before = admin.last_index().await;

    let via = Api::new(cluster.node(follower).url());
    assert_error(
        &post(&via, "/changes", json!({"data": 0})).await,
        401,
        "write through a follower without a token",
    );
    assert_error(
        &post(
            &via.with_token("reader-token"),
            "/changes",
            json!({"data": 0}),
        )
        .await,
        403,
        "write through a follower with a read token",
    );
    let acme = via.with_token("acme-token");
    assert_error(
        &post(&acme, "/changes", json!({"data": 0})).await,
        403,
        "acme writes no tenant through a follower",
    );
    assert_eq!(admin.last_index().await, before);
    post(&acme, "/changes", json!({"tenant": "acme", "data": 1}))
        .await
        .expect_status(200);
    assert_eq!(admin.last_index().await, before + 1);

    // A new node joins with the cluster secret alone (no token), as members do.
    let added = cluster.try_add_node_with(follower, &[]).await.unwrap();
    let h = cluster.api(added).get("/health").await.ok_json();
    assert_eq!(h["role"], "follower", "{h}");
    let members = admin.get("/cluster").await.ok_json();
    assert_eq!(
        members["members"].as_array().map(Vec::len),
        Some(4),
        "{members}"
    );
}
