//! [`Query`]: the parameters of `GET /changes` (and `GET /tenants/{t}/changes`)
//! as a builder, and their encoding as a query string.

/// Parameters of `GET /changes`. Unset fields are left to the server's
/// defaults (`since=0`, `limit=100`, no blocking, no filter).
///
/// ```
/// use changeagent_client::Query;
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
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(self.to_pairs())
            .finish()
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
        let decoded: Vec<(String, String)> =
            url::form_urlencoded::parse(q.to_query_string().as_bytes())
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
}
