//! `POST /changes` bodies (one change, or any JSON taken whole as data). Properties:
//! a refusal is always "invalid input"; an accepted change meets the limits, comes out of
//! its Raft entry's JSON round trip unchanged (followers apply the decoded entry, the
//! leader the one it built), posts again as the same change, and once stored it decodes
//! in a page as clients read it, with the data the client sent.
#![no_main]

use changeagent_proto::post::{compact_json, parse_post_body, ChangeInput, PostBody};
use changeagent_proto::{ChangeList, Rejection};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|body: &[u8]| {
    let changes = match parse_post_body(body) {
        Ok(PostBody::One(c)) => vec![c],
        Ok(PostBody::Batch(v)) => v,
        Err(Rejection::Invalid(_)) => return,
        Err(other) => panic!("refused as {other:?}, not as invalid input"),
    };
    for c in &changes {
        check_change(c);
    }
});

fn check_change(c: &ChangeInput) {
    c.validate().expect("an accepted change meets the limits");
    if let Some(data) = &c.data {
        assert_eq!(
            compact_json(data.get()),
            data.get(),
            "data is stored compacted"
        );
    }

    // The Raft entry round trip.
    let entry = serde_json::to_string(c).expect("a change serializes");
    let decoded: ChangeInput = serde_json::from_str(&entry).expect("an entry decodes");
    assert_eq!(
        serde_json::to_string(&decoded).unwrap(),
        entry,
        "entry round trip"
    );

    // Posting the structured form again gives the same change; data `null` there means
    // "no data".
    let again = match parse_post_body(entry.as_bytes()) {
        Ok(PostBody::One(again)) => again,
        other => panic!("the structured form {entry} does not post as one change: {other:?}"),
    };
    let mut expected = decoded;
    if expected.data.as_ref().is_some_and(|d| d.get() == "null") {
        expected.data = None;
    }
    assert_eq!(
        serde_json::to_string(&again).unwrap(),
        serde_json::to_string(&expected).unwrap(),
        "re-posting {entry}"
    );

    // Stored, the change is served in a page; clients decode it.
    let page = format!(
        r#"{{"changes":[{}],"atStart":true,"atEnd":true,"firstIndex":1,"lastIndex":1}}"#,
        wire_json(c)
    );
    let list: ChangeList = serde_json::from_str(&page)
        .unwrap_or_else(|e| panic!("a client cannot decode the page {page}: {e}"));
    let served = &list.changes[0];
    assert_eq!(served.tags, c.tags);
    assert_eq!(served.key, c.key);
    assert_eq!(served.change_type, c.change_type);
    let sent: Option<Value> = c
        .data
        .as_ref()
        .map(|d| serde_json::from_str(d.get()).expect("accepted data decodes"))
        .filter(|v: &Value| !v.is_null());
    assert_eq!(served.data, sent);
}

/// The wire JSON a server writes for the change at apply time (see the change store's
/// `Resolved::wire_json`), fields in the documented order.
fn wire_json(c: &ChangeInput) -> String {
    let mut out = String::from(r#"{"_id":1,"_ts":2"#);
    let string = |s: &str| serde_json::to_string(s).unwrap();
    if c.change_type != 0 {
        out += &format!(r#","type":{}"#, c.change_type);
    }
    if !c.tags.is_empty() {
        out += &format!(r#","tags":{}"#, serde_json::to_string(&c.tags).unwrap());
    }
    if let Some(t) = &c.tenant {
        out += &format!(r#","tenant":{}"#, string(t));
    }
    if let Some(coll) = &c.collection {
        out += &format!(r#","collection":{}"#, string(coll));
    }
    if let Some(k) = &c.key {
        out += &format!(r#","key":{}"#, string(k));
    }
    if c.deleted {
        out += r#","deleted":true"#;
    }
    if let Some(d) = &c.data {
        out += &format!(r#","data":{}"#, d.get());
    }
    out.push('}');
    out
}
