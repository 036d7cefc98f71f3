//! The parameters of `GET /changes` (and `GET /tenants/{t}/changes`): [`Query`], what a
//! client sets, as a builder with its query-string encoding; and [`ChangesQuery`], the same
//! parameters as a server parses and validates them. Bad values are errors naming the
//! parameter; unknown parameters are ignored.

use std::time::Duration;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::limits::{DEFAULT_LIMIT, MAX_LIMIT, MAX_TAG_BYTES};

/// Parameters of `GET /changes`. Unset fields are left to the server's
/// defaults (`since=0`, `limit=100`, no blocking, no filter).
///
/// ```
/// use changeagent_proto::Query;
/// let q = Query::new().since(41).limit(10).tag("a").tag("b");
/// assert_eq!(q.to_query_string(), "since=41&limit=10&tag=a&tag=b");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Return changes with `_id > since`.
    pub since: Option<u64>,
    /// At most this many changes (server: default 100, 1..=10 000).
    pub limit: Option<u32>,
    /// Seconds to wait for the first matching change when none is there yet.
    pub block: Option<u32>,
    /// Match changes carrying any of these tags (one `tag=` each).
    pub tags: Vec<String>,
    /// Match changes of this type.
    pub change_type: Option<i32>,
    /// Match changes of this tenant (name or id).
    pub tenant: Option<String>,
    /// Start at the first change whose `_ts` is at or after this time: an
    /// RFC 3339 timestamp or nanoseconds since the epoch.
    pub since_time: Option<String>,
}

impl Query {
    /// No parameters: the server's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Changes with `_id > since`.
    pub fn since(mut self, since: u64) -> Self {
        self.since = Some(since);
        self
    }

    /// At most `limit` changes.
    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Long-poll: wait up to `secs` seconds for the first matching change.
    pub fn block(mut self, secs: u32) -> Self {
        self.block = Some(secs);
        self
    }

    /// Adds one tag to match (tags are OR-ed).
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Adds several tags to match (tags are OR-ed).
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }

    /// Only changes of this type.
    pub fn change_type(mut self, change_type: i32) -> Self {
        self.change_type = Some(change_type);
        self
    }

    /// Only changes of this tenant (name or id).
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Start at the first change at or after this time (RFC 3339 or
    /// nanoseconds since the epoch, as the server accepts both).
    pub fn since_time(mut self, time: impl Into<String>) -> Self {
        self.since_time = Some(time.into());
        self
    }

    /// Start at the first change at or after `nanos` since the epoch.
    pub fn since_time_nanos(self, nanos: i64) -> Self {
        self.since_time(nanos.to_string())
    }

    /// The set parameters as `(name, value)` pairs, in a fixed order:
    /// `since, limit, block, tag…, type, tenant, since_time`.
    pub fn to_pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = Vec::new();
        if let Some(since) = self.since {
            pairs.push(("since", since.to_string()));
        }
        if let Some(limit) = self.limit {
            pairs.push(("limit", limit.to_string()));
        }
        if let Some(block) = self.block {
            pairs.push(("block", block.to_string()));
        }
        for tag in &self.tags {
            pairs.push(("tag", tag.clone()));
        }
        if let Some(change_type) = self.change_type {
            pairs.push(("type", change_type.to_string()));
        }
        if let Some(tenant) = &self.tenant {
            pairs.push(("tenant", tenant.clone()));
        }
        if let Some(since_time) = &self.since_time {
            pairs.push(("since_time", since_time.clone()));
        }
        pairs
    }

    /// The parameters form-encoded, without a leading `?`; empty when none
    /// is set.
    pub fn to_query_string(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(self.to_pairs())
            .finish()
    }
}

/// A query parameter with a bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {name} {value:?}: expected {want}")]
pub struct QueryError {
    /// The parameter.
    pub name: String,
    /// The value sent.
    pub value: String,
    /// What the parameter takes.
    pub want: String,
}

/// A parsed `GET /changes` query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangesQuery {
    pub since: u64,
    pub limit: usize,
    pub block: Duration,
    pub tags: Vec<String>,
    pub change_type: Option<i32>,
    pub tenant: Option<String>,
    /// Nanoseconds since the epoch.
    pub since_time: Option<i64>,
    /// Read through the leader first (clusters; a single node is always consistent).
    pub consistent: bool,
}

fn bad(name: &str, value: &str, want: &str) -> QueryError {
    QueryError {
        name: name.to_owned(),
        value: value.to_owned(),
        want: want.to_owned(),
    }
}

pub fn parse_bool(name: &str, v: &str) -> Result<bool, QueryError> {
    match v {
        "" | "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(bad(name, v, "true or false")),
    }
}

/// Parses an RFC 3339 time or integer nanoseconds since the epoch.
pub fn parse_time(v: &str) -> Result<i64, QueryError> {
    if let Ok(n) = v.parse::<i64>() {
        return Ok(n);
    }
    OffsetDateTime::parse(v, &Rfc3339)
        .map_err(|_| {
            bad(
                "since_time",
                v,
                "an RFC 3339 time (2024-05-01T12:00:00Z) or nanoseconds since the epoch",
            )
        })
        .and_then(|t| {
            i64::try_from(t.unix_timestamp_nanos())
                .map_err(|_| bad("since_time", v, "a time between 1677 and 2262"))
        })
}

/// Parses a page size: 1 to [`MAX_LIMIT`].
pub fn parse_limit(v: &str) -> Result<usize, QueryError> {
    match v.parse::<usize>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(bad(
            "limit",
            v,
            &format!("an integer from 1 to {MAX_LIMIT}"),
        )),
    }
}

impl ChangesQuery {
    /// Parses a raw query string; `block` may be at most `max_block_secs`.
    pub fn parse(raw: Option<&str>, max_block_secs: u64) -> Result<Self, QueryError> {
        let mut q = ChangesQuery {
            limit: DEFAULT_LIMIT,
            ..Default::default()
        };
        for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            match k.as_ref() {
                "since" => {
                    q.since = v
                        .parse()
                        .map_err(|_| bad("since", &v, "a non-negative integer"))?
                }
                "limit" => q.limit = parse_limit(&v)?,
                "block" => {
                    let max = max_block_secs;
                    q.block = match v.parse::<u64>() {
                        Ok(s) if s <= max => Duration::from_secs(s),
                        _ => return Err(bad("block", &v, &format!("seconds from 0 to {max}"))),
                    }
                }
                "tag" => {
                    if v.is_empty() || v.len() > MAX_TAG_BYTES {
                        return Err(bad("tag", &v, &format!("1 to {MAX_TAG_BYTES} bytes")));
                    }
                    q.tags.push(v.into_owned());
                }
                "type" => {
                    q.change_type = Some(v.parse().map_err(|_| bad("type", &v, "an integer"))?)
                }
                "tenant" => {
                    if v.is_empty() {
                        return Err(bad("tenant", &v, "a tenant name or id"));
                    }
                    q.tenant = Some(v.into_owned())
                }
                "since_time" => q.since_time = Some(parse_time(&v)?),
                "consistent" => q.consistent = parse_bool("consistent", &v)?,
                _ => {}
            }
        }
        Ok(q)
    }

    /// The query string of the next page, starting after `since`.
    pub fn next_page(&self, since: u64) -> String {
        let mut s = form_urlencoded::Serializer::new(String::new());
        s.append_pair("since", &since.to_string());
        s.append_pair("limit", &self.limit.to_string());
        if !self.block.is_zero() {
            s.append_pair("block", &self.block.as_secs().to_string());
        }
        for t in &self.tags {
            s.append_pair("tag", t);
        }
        if let Some(t) = self.change_type {
            s.append_pair("type", &t.to_string());
        }
        if let Some(t) = &self.tenant {
            s.append_pair("tenant", t);
        }
        if self.consistent {
            s.append_pair("consistent", "true");
        }
        s.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_query_is_empty_string() {
        assert_eq!(Query::new().to_query_string(), "");
        assert!(Query::new().to_pairs().is_empty());
    }

    #[test]
    fn every_parameter_in_order() {
        let q = Query::new()
            .tenant("acme")
            .since_time_nanos(1_464_805_241_291_100_178)
            .tag("a")
            .change_type(3)
            .block(30)
            .limit(500)
            .since(7);
        assert_eq!(
            q.to_query_string(),
            "since=7&limit=500&block=30&tag=a&type=3&tenant=acme&since_time=1464805241291100178"
        );
    }

    #[test]
    fn repeated_tags_keep_their_order() {
        let q = Query::new().tag("x").tags(["y", "z"]).tag("x");
        assert_eq!(q.to_query_string(), "tag=x&tag=y&tag=z&tag=x");
    }

    #[test]
    fn values_are_percent_encoded() {
        let q = Query::new()
            .tag("a b&c=d")
            .tag("é/?#")
            .since_time("2016-06-01T18:20:41+02:00");
        assert_eq!(
            q.to_query_string(),
            "tag=a+b%26c%3Dd&tag=%C3%A9%2F%3F%23&since_time=2016-06-01T18%3A20%3A41%2B02%3A00"
        );
        // And the server's decoder gets the values back unchanged.
        let decoded: Vec<(String, String)> = form_urlencoded::parse(q.to_query_string().as_bytes())
            .into_owned()
            .collect();
        assert_eq!(decoded[0], ("tag".into(), "a b&c=d".into()));
        assert_eq!(decoded[1], ("tag".into(), "é/?#".into()));
        assert_eq!(
            decoded[2],
            ("since_time".into(), "2016-06-01T18:20:41+02:00".into())
        );
    }

    #[test]
    fn negative_type_is_sent_as_is() {
        assert_eq!(Query::new().change_type(-2).to_query_string(), "type=-2");
    }

    #[test]
    fn parses_everything() {
        let q = ChangesQuery::parse(
            Some("since=5&limit=7&block=3&tag=a&tag=b%20c&type=-2&tenant=acme&since_time=2024-01-01T00:00:00Z"),
            300,
        )
        .unwrap();
        assert_eq!(q.since, 5);
        assert_eq!(q.limit, 7);
        assert_eq!(q.block, Duration::from_secs(3));
        assert_eq!(q.tags, vec!["a", "b c"]);
        assert_eq!(q.change_type, Some(-2));
        assert_eq!(q.tenant.as_deref(), Some("acme"));
        assert_eq!(q.since_time, Some(1_704_067_200_000_000_000));
        assert_eq!(
            q.next_page(9),
            "since=9&limit=7&block=3&tag=a&tag=b+c&type=-2&tenant=acme"
        );
    }

    #[test]
    fn rejects_out_of_range() {
        let l = 300;
        for raw in [
            "since=-1",
            "since=x",
            "limit=0",
            "limit=10001",
            "limit=x",
            "block=301",
            "block=-1",
            "type=x",
            "tag=",
            "since_time=yesterday",
        ] {
            assert!(ChangesQuery::parse(Some(raw), l).is_err(), "{raw}");
        }
        assert_eq!(ChangesQuery::parse(None, l).unwrap().limit, DEFAULT_LIMIT);
    }
}
