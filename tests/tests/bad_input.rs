//! Bad input is rejected with the right 4xx status and a JSON
//! `{"error": "…"}` body, and changes nothing. Every case of the table runs
//! against one server; all mismatches are reported together.

use std::time::{Duration, Instant};

use changeagent_testkit::{Api, Reply, ServerOptions, ServerProcess};
use serde_json::{json, Value};

const JSON: Option<&str> = Some("application/json");

struct Case {
    method: &'static str,
    path: String,
    content_type: Option<&'static str>,
    body: Option<Vec<u8>>,
    status: u16,
    why: &'static str,
}

fn case(
    method: &'static str,
    path: impl Into<String>,
    ct: Option<&'static str>,
    body: Option<Vec<u8>>,
    status: u16,
    why: &'static str,
) -> Case {
    Case {
        method,
        path: path.into(),
        content_type: ct,
        body,
        status,
        why,
    }
}

fn post(path: &str, body: impl AsRef<[u8]>, status: u16, why: &'static str) -> Case {
    case(
        "POST",
        path,
        JSON,
        Some(body.as_ref().to_vec()),
        status,
        why,
    )
}

fn get(path: impl Into<String>, status: u16, why: &'static str) -> Case {
    case("GET", path, None, None, status, why)
}

/// Everything a rejected request must leave untouched.
#[derive(Debug, PartialEq)]
struct Snapshot {
    last_index: u64,
    changes: String,
    tenants: String,
    collections: String,
    keys: String,
}

async fn snapshot(api: &Api) -> Snapshot {
    let changes = api.get("/changes?limit=10000").await;
    let v = changes.ok_json();
    Snapshot {
        last_index: v["lastIndex"].as_u64().expect("lastIndex"),
        changes: v["changes"].to_string(),
        tenants: api.get("/tenants").await.text(),
        collections: api.get("/tenants/acme/collections").await.text(),
        keys: api.get("/collections/flags/keys").await.text(),
    }
}

/// Checks status, JSON error body and content type; returns a description of
/// what is wrong, if anything.
fn check_error(r: &Reply, status: u16) -> Option<String> {
    let mut problems = Vec::new();
    if r.status != status {
        problems.push(format!("status {} (want {status})", r.status));
    }
    if r.status >= 500 {
        problems.push("5xx".to_string());
    }
    match serde_json::from_slice::<Value>(&r.body) {
        Ok(v) if v["error"].as_str().is_some_and(|s| !s.is_empty()) => {}
        Ok(v) => problems.push(format!("no non-empty string `error` in {v}")),
        Err(_) => problems.push(format!("body not JSON: {:?}", r.text())),
    }
    let ct = r.header("content-type").unwrap_or_default();
    if !ct.starts_with("application/json") {
        problems.push(format!("content-type {ct:?}"));
    }
    if problems.is_empty() {
        None
    } else {
        Some(problems.join("; "))
    }
}

async fn run_cases(api: &Api, cases: Vec<Case>) {
    let mut failures = Vec::new();
    let mut before = snapshot(api).await;
    for c in &cases {
        let r = api
            .try_request(c.method, &c.path, c.content_type, c.body.clone(), &[])
            .await;
        let shown_body = c
            .body
            .as_ref()
            .map(|b| {
                let s = String::from_utf8_lossy(b);
                if s.len() > 80 {
                    format!(
                        "{}… ({} bytes)",
                        &s[..s.char_indices().nth(60).map_or(s.len(), |(i, _)| i)],
                        b.len()
                    )
                } else {
                    s.into_owned()
                }
            })
            .unwrap_or_default();
        let what = format!(
            "{} {} [{:?}] {shown_body} ({})",
            c.method, c.path, c.content_type, c.why
        );
        match r {
            Err(e) => failures.push(format!("{what}: transport error {e}")),
            Ok(r) => {
                if let Some(p) = check_error(&r, c.status) {
                    failures.push(format!("{what}: {p}; body {}", r.text()));
                }
            }
        }
        let after = snapshot(api).await;
        if after != before {
            failures.push(format!(
                "{what}: CHANGED STATE\n  before {before:?}\n  after  {after:?}"
            ));
            before = after;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad-input cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

async fn seeded_server(opts: ServerOptions) -> (ServerProcess, Api) {
    let server = ServerProcess::start_leader(opts).await;
    let api = server.api();
    api.post_json("/tenants", r#"{"name":"acme"}"#)
        .await
        .expect_status(200);
    api.post_json("/tenants/acme/collections", r#"{"name":"flags"}"#)
        .await
        .expect_status(200);
    api.put_json("/collections/flags/keys/k1", "1")
        .await
        .expect_status(200);
    api.post_change(r#"{"data":"x","tags":["t"]}"#).await;
    (server, api)
}

#[tokio::test]
async fn bad_requests_are_rejected_without_side_effects() {
    let (_server, api) = seeded_server(ServerOptions::default()).await;

    let tags_101 =
        json!({"data": 1, "tags": (0..101).map(|i| format!("t{i}")).collect::<Vec<_>>()})
            .to_string();
    let tag_257 = json!({"data": 1, "tags": ["x".repeat(257)]}).to_string();
    let key_1025 =
        json!({"data": 1, "tenant": "acme", "collection": "flags", "key": "k".repeat(1025)})
            .to_string();
    let name_129 = json!({ "name": "n".repeat(129) }).to_string();

    let cases = vec![
        // POST /changes: body and content type.
        post("/changes", r#"{"data":"#, 400, "malformed JSON"),
        post("/changes", r#"{"data":1} x"#, 400, "trailing garbage"),
        post("/changes", "", 400, "empty body"),
        post("/changes", b"{\"data\":\"\xff\xfe\"}", 400, "invalid UTF-8"),
        post("/changes", "[1,2", 400, "malformed batch"),
        case(
            "POST",
            "/changes",
            None,
            Some(br#"{"data":1}"#.to_vec()),
            415,
            "no content type",
        ),
        case(
            "POST",
            "/changes",
            Some("text/plain"),
            Some(br#"{"data":1}"#.to_vec()),
            415,
            "text/plain",
        ),
        case(
            "POST",
            "/changes",
            Some("application/x-www-form-urlencoded"),
            Some(b"data=1".to_vec()),
            415,
            "form content type",
        ),
        // POST /changes: fields.
        post("/changes", r#"{"data":1,"type":-1}"#, 400, "negative type"),
        post("/changes", r#"{"data":1,"type":"x"}"#, 400, "string type"),
        post(
            "/changes",
            r#"{"data":1,"type":1.5}"#,
            400,
            "fractional type",
        ),
        post(
            "/changes",
            r#"{"data":1,"type":4294967296}"#,
            400,
            "type beyond i32",
        ),
        post("/changes", &tags_101, 400, "101 tags"),
        post("/changes", &tag_257, 400, "257-byte tag"),
        post("/changes", r#"{"data":1,"tags":[""]}"#, 400, "empty tag"),
        post(
            "/changes",
            r#"{"data":1,"tags":"x"}"#,
            400,
            "tags not a list",
        ),
        post(
            "/changes",
            r#"{"data":1,"tags":[1]}"#,
            400,
            "tag not a string",
        ),
        post(
            "/changes",
            r#"{"data":1,"key":"k"}"#,
            400,
            "key without collection",
        ),
        post(
            "/changes",
            r#"{"data":1,"tenant":"acme","collection":"flags"}"#,
            400,
            "collection without key",
        ),
        post(
            "/changes",
            r#"{"data":1,"tenant":"acme","collection":"flags","key":""}"#,
            400,
            "empty key",
        ),
        post("/changes", &key_1025, 400, "1025-byte key"),
        post(
            "/changes",
            r#"{"tenant":"acme","collection":"flags","key":"k1","deleted":"yes"}"#,
            400,
            "deleted not a bool",
        ),
        post(
            "/changes",
            r#"{"data":1,"tenant":"nope"}"#,
            404,
            "unknown tenant",
        ),
        post(
            "/changes",
            r#"{"data":1,"tenant":"acme","collection":"nope","key":"k"}"#,
            404,
            "unknown collection",
        ),
        post("/changes", "[]", 400, "empty batch"),
        post(
            "/changes",
            r#"[{"data":1},{"data":2,"type":-5}]"#,
            400,
            "batch with one bad item",
        ),
        post(
            "/changes",
            r#"[{"data":1},{"data":2,"tenant":"nope"}]"#,
            404,
            "batch with unknown tenant",
        ),
        // GET /changes parameters.
        get("/changes?since=abc", 400, "non-numeric since"),
        get("/changes?since=-1", 400, "negative since"),
        get("/changes?since=1.5", 400, "fractional since"),
        get(
            "/changes?since=18446744073709551616",
            400,
            "since beyond u64",
        ),
        get("/changes?limit=0", 400, "limit 0"),
        get("/changes?limit=10001", 400, "limit over max"),
        get("/changes?limit=abc", 400, "non-numeric limit"),
        get("/changes?limit=-5", 400, "negative limit"),
        get("/changes?block=301", 400, "block over max"),
        get("/changes?block=abc", 400, "non-numeric block"),
        get("/changes?block=-1", 400, "negative block"),
        get("/changes?type=abc", 400, "non-numeric type filter"),
        get("/changes?since_time=yesterday", 400, "bad since_time"),
        get(
            "/changes?since_time=2024-13-45T00%3A00%3A00Z",
            400,
            "impossible since_time",
        ),
        get("/tenants/acme/changes?limit=0", 400, "tenant feed limit 0"),
        // GET /changes/{id}.
        get("/changes/abc", 400, "non-numeric id"),
        get("/changes/99999", 404, "unknown id"),
        // Tenants.
        post("/tenants", r#"{"name":"acme"}"#, 409, "duplicate tenant"),
        post("/tenants", r#"{"name":""}"#, 400, "empty tenant name"),
        post(
            "/tenants",
            r#"{"name":"123"}"#,
            400,
            "all-digit tenant name",
        ),
        post("/tenants", r#"{"name":"a b"}"#, 400, "space in tenant name"),
        post("/tenants", r#"{"name":"a/b"}"#, 400, "slash in tenant name"),
        post(
            "/tenants",
            r#"{"name":"ünï"}"#,
            400,
            "non-ASCII tenant name",
        ),
        post("/tenants", &name_129, 400, "129-char tenant name"),
        post("/tenants", "{}", 400, "missing tenant name"),
        post("/tenants", r#"{"name":5}"#, 400, "numeric tenant name"),
        post("/tenants", r#"["zed"]"#, 400, "tenant body not an object"),
        post("/tenants", r#"{"name":"#, 400, "malformed tenant body"),
        case(
            "POST",
            "/tenants",
            None,
            Some(br#"{"name":"zed"}"#.to_vec()),
            415,
            "tenant without content type",
        ),
        get("/tenants/nope", 404, "unknown tenant"),
        get("/tenants/424242", 404, "unknown tenant id"),
        // Collections.
        post(
            "/tenants/acme/collections",
            r#"{"name":"flags"}"#,
            409,
            "duplicate collection",
        ),
        post(
            "/tenants/acme/collections",
            r#"{"name":""}"#,
            400,
            "empty collection name",
        ),
        post(
            "/tenants/acme/collections",
            r#"{"name":"42"}"#,
            400,
            "all-digit collection name",
        ),
        post(
            "/tenants/acme/collections",
            r#"{"name":"x y"}"#,
            400,
            "space in collection name",
        ),
        post(
            "/tenants/acme/collections",
            "{}",
            400,
            "missing collection name",
        ),
        post(
            "/tenants/acme/collections",
            r#"["zz"]"#,
            400,
            "collection body not an object",
        ),
        post(
            "/tenants/nope/collections",
            r#"{"name":"x"}"#,
            404,
            "collection in unknown tenant",
        ),
        case(
            "POST",
            "/tenants/acme/collections",
            Some("text/plain"),
            Some(br#"{"name":"zed"}"#.to_vec()),
            415,
            "collection with text/plain",
        ),
        get("/collections/nope", 404, "unknown collection"),
        get(
            "/tenants/nope/collections",
            404,
            "collections of unknown tenant",
        ),
        // Keys.
        get("/collections/flags/keys/nokey", 404, "absent key"),
        case(
            "DELETE",
            "/collections/flags/keys/nokey",
            None,
            None,
            404,
            "delete absent key",
        ),
        case(
            "PUT",
            "/collections/nope/keys/k",
            JSON,
            Some(b"1".to_vec()),
            404,
            "put into unknown collection",
        ),
        case(
            "PUT",
            "/collections/flags/keys/k",
            JSON,
            Some(b"{".to_vec()),
            400,
            "malformed key value",
        ),
        case(
            "PUT",
            "/collections/flags/keys/k",
            None,
            Some(b"1".to_vec()),
            415,
            "key value without content type",
        ),
        case(
            "PUT",
            format!("/collections/flags/keys/{}", "k".repeat(1025)),
            JSON,
            Some(b"1".to_vec()),
            400,
            "1025-byte key in path",
        ),
        post(
            "/collections/flags/keys",
            r#"{"data":1}"#,
            400,
            "key write without key",
        ),
        post(
            "/collections/flags/keys",
            r#"{"key":"k"}"#,
            400,
            "key write without data (deleting is DELETE)",
        ),
        post(
            "/collections/flags/keys",
            r#"{"key":"","data":1}"#,
            400,
            "key write with empty key",
        ),
        post(
            "/collections/flags/keys",
            r#"{"key":5,"data":1}"#,
            400,
            "key write with numeric key",
        ),
        post(
            "/collections/flags/keys",
            r#"{"key":"k","data":1,"tags":[""]}"#,
            400,
            "key write with empty tag",
        ),
        post(
            "/collections/flags/keys",
            r#"["k2",1]"#,
            400,
            "key write body not an object",
        ),
        post(
            "/collections/nope/keys",
            r#"{"key":"k","data":1}"#,
            404,
            "key write to unknown collection",
        ),
        get(
            "/collections/flags/keys?limit=0",
            400,
            "key listing limit 0",
        ),
        get(
            "/collections/flags/keys?limit=10001",
            400,
            "key listing limit over max",
        ),
        get(
            "/collections/flags/keys?limit=abc",
            400,
            "key listing non-numeric limit",
        ),
        get(
            "/collections/nope/keys",
            404,
            "key listing of unknown collection",
        ),
        // Tenant feed.
        get("/tenants/nope/changes", 404, "feed of unknown tenant"),
        post(
            "/tenants/nope/changes",
            r#"{"data":1}"#,
            404,
            "post to unknown tenant",
        ),
        // Routes and methods.
        get("/nope", 404, "unknown route"),
        post("/nope", "{}", 404, "unknown route (POST)"),
        get("/changes/1/extra", 404, "unknown sub-route"),
        case(
            "DELETE",
            "/changes",
            None,
            None,
            405,
            "wrong method on /changes",
        ),
        case(
            "PUT",
            "/tenants",
            JSON,
            Some(br#"{"name":"x"}"#.to_vec()),
            405,
            "wrong method on /tenants",
        ),
    ];
    run_cases(&api, cases).await;
}

#[tokio::test]
async fn limits_accept_their_boundaries() {
    let (_server, api) = seeded_server(ServerOptions::default()).await;
    let tags_100: Vec<String> = (0..100).map(|i| format!("{i:0>256}")).collect();
    assert_eq!(tags_100[0].len(), 256);
    let id = api
        .post_change(&json!({"data": 1, "tags": tags_100}).to_string())
        .await;
    let v = api.get(&format!("/changes/{id}")).await.ok_json();
    assert_eq!(v["tags"].as_array().map(Vec::len), Some(100));

    let key_1024 = "k".repeat(1024);
    let id = api
        .post_change(
            &json!({"data": 1, "tenant": "acme", "collection": "flags", "key": key_1024})
                .to_string(),
        )
        .await;
    assert_eq!(
        api.get(&format!("/changes/{id}")).await.ok_json()["key"],
        key_1024
    );

    let id = api
        .post_change(&json!({"data": 1, "type": i32::MAX}).to_string())
        .await;
    assert_eq!(
        api.get(&format!("/changes/{id}")).await.ok_json()["type"],
        i32::MAX
    );

    let name = "n".repeat(128);
    api.post_json("/tenants", &json!({ "name": name }).to_string())
        .await
        .expect_status(200);
    api.post_json("/tenants", r#"{"name":"a1"}"#)
        .await
        .expect_status(200);

    api.get("/changes?limit=10000").await.expect_status(200);
    api.get("/changes?limit=1").await.expect_status(200);
    api.get("/collections/flags/keys?limit=10000")
        .await
        .expect_status(200);
    let t0 = Instant::now();
    api.get("/changes?since=0&block=300")
        .await
        .expect_status(200);
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "block=300 with data available did not answer at once"
    );
    let r = api
        .request(
            "POST",
            "/changes",
            Some("application/json; charset=utf-8"),
            Some(br#"{"data":"charset"}"#.to_vec()),
            &[],
        )
        .await;
    r.expect_status(200);
}

#[tokio::test]
async fn oversize_bodies_get_413() {
    let opts = ServerOptions::default().arg("--max-body-bytes").arg("1024");
    let (_server, api) = seeded_server(opts).await;

    // Just under the limit is fine, so the limit is not rejecting everything.
    let fits = json!({ "data": "x".repeat(900) }).to_string();
    assert!(fits.len() < 1024);
    let before = api.post_change(&fits).await;

    let big = json!({ "data": "x".repeat(2000) }).to_string();
    let big_batch = Value::Array(
        (0..40)
            .map(|i| json!({ "data": i, "tags": ["padding-padding"] }))
            .collect(),
    )
    .to_string();
    assert!(big_batch.len() > 1024);
    let cases = vec![
        post("/changes", &big, 413, "over-size change"),
        post("/changes", &big_batch, 413, "over-size batch"),
        case(
            "PUT",
            "/collections/flags/keys/big",
            JSON,
            Some(big.clone().into_bytes()),
            413,
            "over-size key value",
        ),
        post(
            "/collections/flags/keys",
            json!({"key": "big", "data": "x".repeat(2000)}).to_string(),
            413,
            "over-size key write",
        ),
        post("/tenants/acme/changes", &big, 413, "over-size tenant post"),
        post(
            "/tenants",
            json!({ "name": "n".repeat(2000) }).to_string(),
            413,
            "over-size tenant body",
        ),
    ];
    run_cases(&api, cases).await;

    // A body streamed without Content-Length must be limited as well.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        std::iter::once(Ok(br#"{"data":""#.to_vec()))
            .chain((0..20).map(|_| Ok(vec![b'y'; 100])))
            .chain(std::iter::once(Ok(br#""}"#.to_vec())))
            .collect();
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let r = client
        .post(api.url("/changes"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .expect("chunked post");
    let status = r.status().as_u16();
    let body = r.text().await.unwrap_or_default();
    assert_eq!(status, 413, "chunked over-size body: {body}");
    assert_eq!(
        api.last_index().await,
        before,
        "chunked over-size body appended"
    );
}

/// Data that is valid JSON grammar but that no JSON client can decode (a lone surrogate
/// escape, a number beyond a double, nesting deeper than a decoder goes once the change sits
/// in a page) is refused with 400 and the reason, wherever data enters; stored, it would
/// make every page holding it unreadable. Data just inside those bounds is stored and pages
/// holding it decode.
#[tokio::test]
async fn data_no_client_can_decode_is_refused() {
    let (_server, api) = seeded_server(ServerOptions::default()).await;
    let deep = |levels: usize| format!("{}1{}", "[".repeat(levels), "]".repeat(levels));
    let too_deep = deep(changeagent_proto::limits::MAX_DATA_DEPTH + 1);
    let cases = vec![
        post("/changes", r#""\ud800""#, 400, "lone leading surrogate"),
        post("/changes", r#""a\udc00""#, 400, "lone trailing surrogate"),
        post("/changes", "1e400", 400, "number beyond a double"),
        post("/changes", "-1e400", 400, "negative number beyond a double"),
        post(
            "/changes",
            r#"[{"data":1},"\ud800"]"#,
            400,
            "batch item with a lone surrogate",
        ),
        post(
            "/changes",
            r#"[1,1e999]"#,
            400,
            "batch item beyond a double",
        ),
        post(
            "/changes",
            format!(r#"{{"data":{too_deep}}}"#),
            400,
            "data nested too deep",
        ),
        post(
            "/tenants/acme/changes",
            r#""\ud800""#,
            400,
            "tenant post with a lone surrogate",
        ),
        case(
            "PUT",
            "/collections/flags/keys/k2",
            JSON,
            Some(br#"{"v":"\ud800"}"#.to_vec()),
            400,
            "key value with a lone surrogate",
        ),
        post(
            "/collections/flags/keys",
            r#"{"key":"k2","data":1e400}"#,
            400,
            "key write beyond a double",
        ),
    ];
    for c in &cases {
        let r = api
            .request(c.method, &c.path, c.content_type, c.body.clone(), &[])
            .await;
        let error = serde_json::from_slice::<Value>(&r.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_default();
        assert!(
            error.contains("cannot be decoded by JSON clients"),
            "{} {} ({}): status {}, error {error:?}",
            c.method,
            c.path,
            c.why,
            r.status
        );
    }
    run_cases(&api, cases).await;

    // Inside the bounds: stored, and every page holding it decodes.
    let since = api.last_index().await;
    api.post_change(r#""\ud83d\ude00""#).await;
    api.post_change("1.7976931348623157e308").await;
    api.post_change(&format!(
        r#"{{"data":{}}}"#,
        deep(changeagent_proto::limits::MAX_DATA_DEPTH)
    ))
    .await;
    let page = api.get(&format!("/changes?since={since}")).await.ok_json();
    let changes = page["changes"].as_array().expect("changes");
    assert_eq!(changes.len(), 3, "{page}");
    assert_eq!(changes[0]["data"], "\u{1f600}");
    let list: changeagent_proto::ChangeList =
        serde_json::from_value(page).expect("a client decodes the page");
    assert_eq!(list.changes.len(), 3);
}
