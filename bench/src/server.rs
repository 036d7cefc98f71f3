//! The node under test: one shared keep-alive HTTP client, the base URL, and
//! the few reads every phase needs (index range, a metric, reachability).
//! Responses are parsed into minimal structs so that the benchmark's own JSON
//! work stays small next to the server's.

use std::error::Error as StdError;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

/// What to tell a user whose server cannot be reached.
pub const START_HINT: &str = "start one with `cargo run --release -p changeagent-server -- \
     --listen 127.0.0.1:9000 --data-dir ./data` (or `changeagent-server --listen 127.0.0.1:9000 \
     --data-dir ./data`), or point --server / CHANGEAGENT_SERVER at a running node";

/// Timeout of ordinary requests (writes, pages, metrics): far above any
/// healthy answer, short enough that a hung server fails the run.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Timeout of the first request that checks the server is there.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Timeout of establishing one TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `EMFILE`: this process hit its open-file limit.
const EMFILE: i32 = 24;
/// `ENFILE`: the system hit its open-file limit.
const ENFILE: i32 = 23;

/// A ChangeAgent node reached over HTTP/1.1 with one shared client.
#[derive(Debug, Clone)]
pub struct Server {
    client: reqwest::Client,
    base: String,
    /// The server's process, when the bench started it (its CPU and context switches are
    /// read from `/proc`).
    pid: Option<u32>,
}

/// The head of a `GET /changes` answer: ids only, every other field skipped.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    pub changes: Vec<IdOnly>,
    #[serde(default)]
    pub at_end: bool,
    pub first_index: u64,
    pub last_index: u64,
}

/// A change of which only `_id` is read.
#[derive(Debug, Deserialize)]
pub struct IdOnly {
    #[serde(rename = "_id")]
    pub id: u64,
}

/// The retained range of the log on the server.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    /// Oldest retained `_id` (1 on an empty or untruncated store).
    pub first: u64,
    /// Newest applied `_id` (0 on an empty store).
    pub last: u64,
}

impl Range {
    /// How many changes the server holds.
    pub fn held(&self) -> u64 {
        if self.last >= self.first {
            self.last - self.first + 1
        } else {
            0
        }
    }
}

impl Server {
    /// A server at `base` (`http://host:port`); nothing is sent yet.
    pub fn new(base: &str) -> Result<Self> {
        let url = reqwest::Url::parse(base).with_context(|| {
            format!("--server {base:?} is not a URL like http://127.0.0.1:9000")
        })?;
        if url.scheme() != "http" && url.scheme() != "https" {
            bail!("--server {base:?} must start with http:// or https://");
        }
        let client = reqwest::Client::builder()
            // HTTP/1.1 so that every concurrent request holds its own
            // connection (long-polls must not share one HTTP/2 connection).
            .http1_only()
            // Keep every connection a phase opened for the next request.
            .pool_max_idle_per_host(usize::MAX)
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            client,
            base: base.trim_end_matches('/').to_string(),
            pid: None,
        })
    }

    /// The same server, known to run as process `pid`.
    pub fn with_pid(self, pid: u32) -> Self {
        Self {
            pid: Some(pid),
            ..self
        }
    }

    /// The server's process, when known.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The shared client.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The base URL, without a trailing slash.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `base` + `path_and_query` (which starts with `/`).
    pub fn url(&self, path_and_query: &str) -> String {
        format!("{}{}", self.base, path_and_query)
    }

    /// Checks the server answers `GET /changes`, with a hint how to start one.
    pub async fn check(&self) -> Result<Range> {
        match self.range_within(CHECK_TIMEOUT).await {
            Ok(range) => Ok(range),
            Err(err) => Err(anyhow!(
                "cannot reach a ChangeAgent server at {}: {err:#}\n{START_HINT}",
                self.base
            )),
        }
    }

    /// The retained range, from `GET /changes?limit=1`.
    pub async fn range(&self) -> Result<Range> {
        self.range_within(REQUEST_TIMEOUT).await
    }

    /// `GET path_and_query` within `timeout`: the body of a 2xx answer, else an error naming
    /// the URL and what went wrong.
    pub async fn get_ok(&self, path_and_query: &str, timeout: Duration) -> Result<bytes::Bytes> {
        let url = self.url(path_and_query);
        let resp = self
            .client
            .get(&url)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| anyhow!(describe(&e)))
            .with_context(|| format!("GET {url}"))?;
        ok_body(resp).await.with_context(|| format!("GET {url}"))
    }

    async fn range_within(&self, timeout: Duration) -> Result<Range> {
        let body = self.get_ok("/changes?limit=1", timeout).await?;
        let page: Page = serde_json::from_slice(&body)
            .context("GET /changes?limit=1: answer is not a change list")?;
        Ok(Range {
            first: page.first_index,
            last: page.last_index,
        })
    }

    /// The `"role"` in `GET /health` (`leader`, `follower`, `edge`, …);
    /// `None` when the answer has none.
    pub async fn role(&self) -> Result<Option<String>> {
        #[derive(Deserialize)]
        struct Health {
            role: Option<String>,
        }
        let body = self.get_ok("/health", REQUEST_TIMEOUT).await?;
        let health: Health =
            serde_json::from_slice(&body).context("GET /health: answer is not JSON")?;
        Ok(health.role)
    }

    /// The sum of all series of metric `name` in `GET /metrics`, or `None`
    /// when the server does not export it.
    pub async fn metric(&self, name: &str) -> Result<Option<f64>> {
        let body = self.get_ok("/metrics", REQUEST_TIMEOUT).await?;
        Ok(parse_metric(&String::from_utf8_lossy(&body), name))
    }
}

/// The body of a 2xx answer; any other status becomes an error carrying the
/// status and the start of the body (the server's `{"error": …}`).
pub async fn ok_body(resp: reqwest::Response) -> Result<bytes::Bytes> {
    let status = resp.status();
    let body = resp.bytes().await.context("reading the answer")?;
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body);
        let snippet: String = text.chars().take(300).collect();
        bail!("server answered {status}: {snippet}");
    }
    Ok(body)
}

/// The sum of the values of every series of `name` in Prometheus text.
pub fn parse_metric(text: &str, name: &str) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // `name{labels} value` or `name value`, not `name_suffix …`.
        let rest = if let Some(labels) = rest.strip_prefix('{') {
            match labels.find('}') {
                Some(end) => &labels[end + 1..],
                None => continue,
            }
        } else if rest.starts_with([' ', '\t']) {
            rest
        } else {
            continue;
        };
        let Some(Ok(value)) = rest.split_whitespace().next().map(str::parse::<f64>) else {
            continue;
        };
        total = Some(total.unwrap_or(0.0) + value);
    }
    total
}

/// True when `err` or one of its causes is "too many open files".
pub fn is_out_of_files(err: &(dyn StdError + 'static)) -> bool {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(EMFILE) | Some(ENFILE)) {
                return true;
            }
        }
        cause = e.source();
    }
    false
}

/// `err` with all its causes on one line.
pub fn describe(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_series_and_skips_lookalikes() {
        let text = "# HELP changeagent_long_polls_open open long-polls\n\
                    # TYPE changeagent_long_polls_open gauge\n\
                    changeagent_long_polls_open 12\n\
                    changeagent_long_polls_open_total 99\n\
                    changeagent_long_polls_open{route=\"tenant\"} 3\n";
        assert_eq!(
            parse_metric(text, "changeagent_long_polls_open"),
            Some(15.0)
        );
        assert_eq!(parse_metric(text, "changeagent_missing"), None);
    }

    #[test]
    fn range_counts_held_changes() {
        assert_eq!(Range { first: 1, last: 0 }.held(), 0);
        assert_eq!(Range { first: 1, last: 10 }.held(), 10);
        assert_eq!(Range { first: 5, last: 10 }.held(), 6);
    }

    #[test]
    fn out_of_files_is_found_in_the_cause_chain() {
        let emfile = std::io::Error::from_raw_os_error(EMFILE);
        assert!(is_out_of_files(&emfile));
        let other = std::io::Error::from_raw_os_error(111);
        assert!(!is_out_of_files(&other));
    }

    #[test]
    fn page_parses_ids_only() {
        let body = br#"{"changes":[{"_id":7,"_ts":1,"tags":["a"],"data":{"x":[1,2]}},{"_id":8,"data":null}],
                       "atStart":true,"atEnd":false,"firstIndex":1,"lastIndex":9}"#;
        let page: Page = serde_json::from_slice(body).unwrap();
        let ids: Vec<u64> = page.changes.iter().map(|c| c.id).collect();
        assert_eq!(ids, [7, 8]);
        assert!(!page.at_end);
        assert_eq!((page.first_index, page.last_index), (1, 9));
    }

    #[test]
    fn bad_server_urls_are_rejected() {
        assert!(Server::new("127.0.0.1:9000").is_err());
        assert!(Server::new("ftp://x").is_err());
        let s = Server::new("http://127.0.0.1:9000/").unwrap();
        assert_eq!(s.url("/changes"), "http://127.0.0.1:9000/changes");
    }
}
