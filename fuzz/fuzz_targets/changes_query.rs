//! Query strings of `GET /changes`. Properties: a refusal names the parameter it refuses;
//! an accepted query's next-page link parses back to the same query from the new position;
//! the client's builder, given the parsed values, encodes a string that parses back to them.
#![no_main]

use changeagent_proto::limits::DEFAULT_MAX_BLOCK_SECS;
use changeagent_proto::{ChangesQuery, Query};
use libfuzzer_sys::fuzz_target;

const PARAMETERS: [&str; 8] = [
    "since",
    "limit",
    "block",
    "tag",
    "type",
    "tenant",
    "since_time",
    "consistent",
];

fuzz_target!(|raw: &str| {
    let q = match ChangesQuery::parse(Some(raw), DEFAULT_MAX_BLOCK_SECS) {
        Ok(q) => q,
        Err(e) => {
            assert!(PARAMETERS.contains(&e.name.as_str()), "{e}");
            return;
        }
    };
    assert!(q.limit >= 1 && q.block.as_secs() <= DEFAULT_MAX_BLOCK_SECS);

    // The `Link: rel="next"` query (it starts from an `_id`, so it drops `since_time`).
    let next_since = q.since.saturating_add(1);
    let link = q.next_page(next_since);
    let next = ChangesQuery::parse(Some(&link), DEFAULT_MAX_BLOCK_SECS)
        .unwrap_or_else(|e| panic!("the next-page link {link:?} is refused: {e}"));
    let expected = ChangesQuery {
        since: next_since,
        since_time: None,
        ..q.clone()
    };
    assert_eq!(next, expected, "{link}");

    // The client's builder.
    let mut client = Query::new()
        .since(q.since)
        .tags(q.tags.iter().cloned())
        .limit(u32::try_from(q.limit).expect("limits fit a u32"))
        .block(u32::try_from(q.block.as_secs()).expect("blocks fit a u32"));
    if let Some(t) = q.change_type {
        client = client.change_type(t);
    }
    if let Some(t) = &q.tenant {
        client = client.tenant(t.clone());
    }
    if let Some(t) = q.since_time {
        client = client.since_time_nanos(t);
    }
    let encoded = client.to_query_string();
    let back = ChangesQuery::parse(Some(&encoded), DEFAULT_MAX_BLOCK_SECS)
        .unwrap_or_else(|e| panic!("the client's query {encoded:?} is refused: {e}"));
    assert_eq!(
        back,
        ChangesQuery {
            consistent: false,
            ..q
        },
        "{encoded}"
    );
});
