//! Query-string parsing for `GET /changes` and key listings. Bad values are 400s with a
//! message naming the parameter; unknown parameters are ignored.

use std::time::Duration;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::error::ApiError;
use crate::record::MAX_TAG_BYTES;

/// Default page size, as in the original ChangeAgent.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest page: bounds the memory and time one request may take.
pub const MAX_LIMIT: usize = 10_000;

/// Limits the read API enforces.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Longest `block` a client may ask for.
    pub max_block: Duration,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_block: Duration::from_secs(300),
        }
    }
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

fn bad(name: &str, value: &str, want: &str) -> ApiError {
    ApiError::BadRequest(format!("invalid {name} {value:?}: expected {want}"))
}

pub fn parse_bool(name: &str, v: &str) -> Result<bool, ApiError> {
    match v {
        "" | "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(bad(name, v, "true or false")),
    }
}

/// Parses an RFC 3339 time or integer nanoseconds since the epoch.
pub fn parse_time(v: &str) -> Result<i64, ApiError> {
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
pub fn parse_limit(v: &str) -> Result<usize, ApiError> {
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
    /// Parses a raw query string.
    pub fn parse(raw: Option<&str>, limits: &ReadLimits) -> Result<Self, ApiError> {
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
                    let max = limits.max_block.as_secs();
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
    fn parses_everything() {
        let q = ChangesQuery::parse(
            Some("since=5&limit=7&block=3&tag=a&tag=b%20c&type=-2&tenant=acme&since_time=2024-01-01T00:00:00Z"),
            &ReadLimits::default(),
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
        let l = ReadLimits::default();
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
            assert!(ChangesQuery::parse(Some(raw), &l).is_err(), "{raw}");
        }
        assert_eq!(ChangesQuery::parse(None, &l).unwrap().limit, DEFAULT_LIMIT);
    }
}
