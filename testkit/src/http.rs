//! Raw HTTP to a node: [`Api`] sends requests and keeps each answer's exact
//! bytes, status and headers in a [`Reply`]; [`raw_changes`] and friends read
//! a `GET /changes` body without re-serialising the changes, so field order
//! and spacing stay visible to the tests.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// Upper bound on any single HTTP request from a test. Long-polls in the tests
/// block for at most 30 s, so anything longer is a hang worth failing on.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// One HTTP answer with its raw body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as (lossy) UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the body if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): status {} body {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// A header's value as a string.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// Panics unless the status is `want`, showing the body.
    #[track_caller]
    pub fn expect_status(&self, want: u16) -> &Self {
        assert_eq!(
            self.status,
            want,
            "unexpected status; body: {}",
            self.text()
        );
        self
    }

    /// Asserts status 200 and returns the JSON body.
    #[track_caller]
    pub fn ok_json(&self) -> Value {
        self.expect_status(200);
        self.json()
    }

    /// The URL in a `Link: <URL>; rel="next"` header, if any.
    pub fn link_next(&self) -> Option<String> {
        let link = self.header("link")?;
        for part in link.split(',') {
            let part = part.trim();
            if !part.contains("rel=\"next\"") && !part.contains("rel=next") {
                continue;
            }
            let start = part.find('<')?;
            let end = part[start..].find('>')? + start;
            return Some(part[start + 1..end].to_string());
        }
        None
    }
}

/// A small HTTP client bound to one server URL. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Api {
    client: reqwest::Client,
    base: String,
    timeout: Duration,
    /// Sent as `Authorization: Bearer …` on every request, when set.
    token: Option<String>,
}

impl Api {
    /// A client for `base` (`http://host:port`), ignoring any proxy settings.
    pub fn new(base: impl Into<String>) -> Api {
        Self::with_timeout(base, REQUEST_TIMEOUT)
    }

    /// [`new`](Self::new) with a shorter per-request timeout, for clients that
    /// must notice a hung node and try another (fault tests).
    pub fn with_timeout(base: impl Into<String>, timeout: Duration) -> Api {
        // Building fails only when a TLS backend cannot start, and the
        // workspace builds reqwest without one.
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(timeout)
            .build()
            .expect("build reqwest client");
        Api {
            client,
            base: base.into(),
            timeout,
            token: None,
        }
    }

    /// This client, trusting only the CA certificate in `ca` (PEM) for `https://` and
    /// presenting `identity` (a PEM certificate and key) when given.
    pub fn with_tls(&self, ca: &Path, identity: Option<(&Path, &Path)>) -> Api {
        let pem = std::fs::read(ca).unwrap_or_else(|e| panic!("reading {}: {e}", ca.display()));
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .timeout(self.timeout)
            .tls_built_in_root_certs(false);
        for cert in reqwest::Certificate::from_pem_bundle(&pem).expect("a PEM CA file") {
            builder = builder.add_root_certificate(cert);
        }
        if let Some((cert, key)) = identity {
            let mut both = std::fs::read(cert).expect("reading a certificate");
            both.extend(std::fs::read(key).expect("reading a key"));
            builder = builder.identity(reqwest::Identity::from_pem(&both).expect("a PEM pair"));
        }
        Api {
            client: builder.build().expect("build reqwest client"),
            ..self.clone()
        }
    }

    /// This client, sending `Authorization: Bearer <token>` on every request.
    pub fn with_token(&self, token: &str) -> Api {
        Api {
            token: Some(token.to_owned()),
            ..self.clone()
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Resolves `path_or_url`: absolute URLs are kept, paths are appended to
    /// the base URL.
    pub fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_string()
        } else {
            format!("{}{}", self.base, path_or_url)
        }
    }

    /// Sends any request; transport errors are returned, not panicked on.
    pub async fn try_request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, reqwest::Error> {
        // Callers name methods with literals; an invalid one is a bug in the
        // caller, not a state of the system under test.
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("valid method");
        let mut req = self.client.request(method, self.url(path));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(ct) = content_type {
            req = req.header(reqwest::header::CONTENT_TYPE, ct);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(body) = body {
            req = req.body(body);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await?.to_vec();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// Sends any request; panics on transport errors.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Reply {
        self.try_request(method, path, content_type, body, headers)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// `GET`, returning transport errors.
    pub async fn try_get(&self, path: &str) -> Result<Reply, reqwest::Error> {
        self.try_request("GET", path, None, None, &[]).await
    }

    /// `GET`; panics on transport errors.
    pub async fn get(&self, path: &str) -> Reply {
        self.request("GET", path, None, None, &[]).await
    }

    /// `POST` a JSON body (given as text, sent byte for byte) with
    /// `Content-Type: application/json`, returning transport errors.
    pub async fn try_post_json(&self, path: &str, body: &str) -> Result<Reply, reqwest::Error> {
        self.try_send_json("POST", path, body).await
    }

    /// `POST` a JSON body with `Content-Type: application/json`.
    pub async fn post_json(&self, path: &str, body: &str) -> Reply {
        self.send_json("POST", path, body).await
    }

    /// `PUT` a JSON body with `Content-Type: application/json`.
    pub async fn put_json(&self, path: &str, body: &str) -> Reply {
        self.send_json("PUT", path, body).await
    }

    /// `method` with a JSON body (sent byte for byte) and
    /// `Content-Type: application/json`, returning transport errors.
    async fn try_send_json(
        &self,
        method: &str,
        path: &str,
        body: &str,
    ) -> Result<Reply, reqwest::Error> {
        self.try_request(
            method,
            path,
            Some("application/json"),
            Some(body.as_bytes().to_vec()),
            &[],
        )
        .await
    }

    /// [`try_send_json`](Self::try_send_json); panics on transport errors.
    async fn send_json(&self, method: &str, path: &str, body: &str) -> Reply {
        self.try_send_json(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// `DELETE`.
    pub async fn delete(&self, path: &str) -> Reply {
        self.request("DELETE", path, None, None, &[]).await
    }

    /// `POST /changes` with `body`; asserts 200 and returns the new `_id`.
    pub async fn post_change(&self, body: &str) -> u64 {
        let r = self.post_json("/changes", body).await;
        assert_eq!(r.status, 200, "POST /changes {body}: {}", r.text());
        posted_id(&r.json())
    }

    /// Waits up to `timeout` until `GET /changes/{id}` answers 200 here (the change
    /// replicated, tailed or forwarded to this server) and returns that answer; panics with
    /// the last answer otherwise.
    pub async fn wait_for_change(&self, id: u64, timeout: Duration) -> Reply {
        let what = format!("change {id} at {}", self.base);
        crate::wait::wait_until(timeout, &what, || async {
            let r = self.get(&format!("/changes/{id}")).await;
            if r.status == 200 {
                Ok(r)
            } else {
                Err(r.text())
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The value of the metric line `name` (labels included, as in
    /// `name{label="v"}`) in `GET /metrics`; `Err` says why there is none.
    pub async fn metric(&self, name: &str) -> std::result::Result<u64, String> {
        let r = self
            .try_get("/metrics")
            .await
            .map_err(|e| format!("GET /metrics at {}: {e}", self.base))?;
        let text = r.text();
        if r.status != 200 {
            return Err(format!("GET /metrics answered {}: {text}", r.status));
        }
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .ok_or_else(|| format!("/metrics has no {name}:\n{text}"))?;
        value
            .trim()
            .parse()
            .map_err(|e| format!("{name} is not a count ({value}): {e}"))
    }

    /// `lastIndex` as reported by `GET /changes`.
    pub async fn last_index(&self) -> u64 {
        let r = self.get("/changes?limit=1").await;
        let v = r.ok_json();
        v["lastIndex"]
            .as_u64()
            .unwrap_or_else(|| panic!("no numeric lastIndex in {v}"))
    }

    /// Every change matching `query` (e.g. `"tag=x"`, may be empty), read in
    /// pages of 1000 by following `since`. Returns the raw JSON text of each.
    pub async fn all_raw_changes(&self, query: &str) -> Vec<String> {
        self.raw_changes_after(0, query).await
    }

    /// [`all_raw_changes`](Self::all_raw_changes) of what the server retains: from its
    /// `firstIndex` (from `/health`, which core nodes and edges serve) on, so a truncated list
    /// reads without a 410.
    pub async fn retained_raw_changes(&self, query: &str) -> Vec<String> {
        let first = self.get("/health").await.ok_json()["firstIndex"]
            .as_u64()
            .expect("a numeric firstIndex");
        self.raw_changes_after(first.saturating_sub(1), query).await
    }

    /// Every change after `since` matching `query`, in pages of 1000.
    pub async fn raw_changes_after(&self, since: u64, query: &str) -> Vec<String> {
        self.try_raw_changes_after(since, query)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`raw_changes_after`](Self::raw_changes_after), saying what went wrong instead of
    /// panicking: a failed request, a status other than 200 (a 410 when `since` was
    /// truncated meanwhile) or a body that is not a change list.
    pub async fn try_raw_changes_after(
        &self,
        since: u64,
        query: &str,
    ) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        let mut since = since;
        loop {
            let sep = if query.is_empty() { "" } else { "&" };
            let path = format!("/changes?since={since}&limit=1000{sep}{query}");
            let r = self
                .try_get(&path)
                .await
                .map_err(|e| format!("GET {}: {e}", self.url(&path)))?;
            if r.status != 200 {
                return Err(format!(
                    "GET {}: status {} {}",
                    self.url(&path),
                    r.status,
                    r.text()
                ));
            }
            let page =
                try_raw_changes(&r.body).map_err(|e| format!("GET {}: {e}", self.url(&path)))?;
            let at_end = page.at_end.ok_or_else(|| {
                format!("GET {}: no boolean atEnd in {}", self.url(&path), r.text())
            })?;
            let empty = page.changes.is_empty();
            for raw in page.changes {
                since = try_change_id(&raw).map_err(|e| format!("GET {}: {e}", self.url(&path)))?;
                out.push(raw);
            }
            if at_end || empty {
                return Ok(out);
            }
        }
    }
}

/// The `_id` in a `{"_id": N}` answer.
#[track_caller]
pub fn posted_id(v: &Value) -> u64 {
    v["_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no numeric _id in {v}"))
}

#[derive(Deserialize)]
struct RawChangeList<'a> {
    #[serde(borrow)]
    changes: Vec<&'a RawValue>,
    #[serde(default, rename = "atEnd")]
    at_end: Option<bool>,
}

/// The changes of a `GET /changes` body, each as the exact JSON text the
/// server sent (no re-serialisation, so field order and spacing are kept).
#[track_caller]
pub fn raw_changes(body: &[u8]) -> Vec<String> {
    try_raw_changes(body)
        .unwrap_or_else(|e| panic!("{e}"))
        .changes
}

/// One `GET /changes` body read by [`try_raw_changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawPage {
    /// Each change as the exact JSON text the server sent.
    pub changes: Vec<String>,
    /// The body's `atEnd` (`None` when it has none).
    pub at_end: Option<bool>,
}

/// [`raw_changes`] with `atEnd`; an error (quoting the start of the body) when the body
/// is not a change list.
pub fn try_raw_changes(body: &[u8]) -> Result<RawPage, String> {
    let list: RawChangeList<'_> = serde_json::from_slice(body).map_err(|e| {
        let text: String = String::from_utf8_lossy(body).chars().take(300).collect();
        format!("not a change list ({e}): {text}")
    })?;
    Ok(RawPage {
        changes: list.changes.iter().map(|c| c.get().to_string()).collect(),
        at_end: list.at_end,
    })
}

/// The `_id` of one change given as JSON text; an error when it has none.
pub fn try_change_id(raw: &str) -> Result<u64, String> {
    let v: Value =
        serde_json::from_str(raw).map_err(|e| format!("bad change JSON ({e}): {raw}"))?;
    v["_id"]
        .as_u64()
        .ok_or_else(|| format!("change without numeric _id: {raw}"))
}

/// The `_id` of one change given as JSON text.
#[track_caller]
pub fn change_id(raw: &str) -> u64 {
    change_field(raw, "_id", Value::as_u64)
}

/// The `_ts` of one change given as JSON text.
#[track_caller]
pub fn change_ts(raw: &str) -> i64 {
    change_field(raw, "_ts", Value::as_i64)
}

/// Field `name` of one change given as JSON text, read by `as_number`;
/// panics when the text is not JSON or the field is not such a number.
#[track_caller]
fn change_field<T>(raw: &str, name: &str, as_number: impl Fn(&Value) -> Option<T>) -> T {
    let v: Value =
        serde_json::from_str(raw).unwrap_or_else(|e| panic!("bad change JSON ({e}): {raw}"));
    as_number(&v[name]).unwrap_or_else(|| panic!("change without numeric {name}: {raw}"))
}

/// The `_id`s of the changes in a `GET /changes` body.
#[track_caller]
pub fn change_ids(body: &[u8]) -> Vec<u64> {
    raw_changes(body).iter().map(|c| change_id(c)).collect()
}

/// The `data` of each change (parsed) keyed by `_id`.
pub fn data_by_id(raws: &[String]) -> BTreeMap<u64, Value> {
    raws.iter()
        .map(|raw| {
            let v: Value = serde_json::from_str(raw).expect("change JSON");
            (
                change_id(raw),
                v.get("data").cloned().unwrap_or(Value::Null),
            )
        })
        .collect()
}

/// Formats nanoseconds since the epoch as RFC 3339 in UTC with full
/// sub-second precision, e.g. `2024-06-01T12:00:41.291100178Z`.
pub fn rfc3339_from_nanos(nanos: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
        .expect("timestamp in range");
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("format RFC 3339")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_header() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            "link",
            "</changes?since=10&limit=10&tag=x>; rel=\"next\""
                .parse()
                .unwrap(),
        );
        let r = Reply {
            status: 200,
            headers,
            body: Vec::new(),
        };
        assert_eq!(
            r.link_next().as_deref(),
            Some("/changes?since=10&limit=10&tag=x")
        );
    }

    #[test]
    fn rfc3339() {
        assert_eq!(
            rfc3339_from_nanos(1_464_805_241_291_100_178),
            "2016-06-01T18:20:41.291100178Z"
        );
    }

    #[test]
    fn pages_read_without_panicking() {
        let page = try_raw_changes(br#"{"changes":[{"_id":3,"data":1}],"atEnd":true}"#).unwrap();
        assert_eq!(page.changes, [r#"{"_id":3,"data":1}"#]);
        assert_eq!(page.at_end, Some(true));
        assert_eq!(try_change_id(&page.changes[0]), Ok(3));
        let err = try_raw_changes(br#"{"error":"truncated"}"#).unwrap_err();
        assert!(err.contains("not a change list"), "{err}");
        assert!(err.contains("truncated"), "{err}");
        assert!(try_change_id(r#"{"data":1}"#).is_err());
    }

    #[test]
    fn raw_changes_keep_bytes() {
        let body = br#"{"changes":[{"_id":1,"_ts":5,"data":{"b":1,"a":[1,2]}}],"atStart":true}"#;
        assert_eq!(
            raw_changes(body),
            vec![r#"{"_id":1,"_ts":5,"data":{"b":1,"a":[1,2]}}"#.to_string()]
        );
    }
}
