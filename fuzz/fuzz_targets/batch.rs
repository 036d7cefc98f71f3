//! Batch bodies of `POST /changes` (a JSON array of changes). The input's lines that are
//! JSON values become the items of one batch. Properties: a batch is accepted exactly when
//! each of its items is accepted as a batch of its own, as the same changes in the same
//! order; a refused batch names its first bad item with that item's own reason.
#![no_main]

use changeagent_proto::limits::MAX_BATCH;
use changeagent_proto::post::{parse_post_body, ChangeInput, PostBody};
use changeagent_proto::Rejection;
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

fuzz_target!(|input: &[u8]| {
    let items: Vec<&[u8]> = input
        .split(|b| *b == b'\n')
        .filter(|item| serde_json::from_slice::<&RawValue>(item).is_ok())
        .collect();
    let batch = [b"[".to_vec(), items.join(&b","[..]), b"]".to_vec()].concat();
    let result = parse_post_body(&batch);
    if items.is_empty() || items.len() > MAX_BATCH {
        assert!(result.is_err(), "an empty or oversized batch was accepted");
        return;
    }
    // Each item alone, as a batch of one: item 0 of it.
    let alone: Vec<Result<ChangeInput, String>> = items
        .iter()
        .map(|item| {
            let one = [&b"["[..], item, b"]"].concat();
            match parse_post_body(&one) {
                Ok(PostBody::Batch(mut v)) if v.len() == 1 => Ok(v.remove(0)),
                Ok(other) => panic!("a batch of one parsed as {other:?}"),
                Err(Rejection::Invalid(m)) => Err(m
                    .strip_prefix("batch item 0: ")
                    .unwrap_or_else(|| panic!("a refused item is not named: {m}"))
                    .to_owned()),
                Err(other) => panic!("refused as {other:?}, not as invalid input"),
            }
        })
        .collect();
    match result {
        Ok(PostBody::Batch(changes)) => {
            assert_eq!(changes.len(), items.len());
            for (i, (c, one)) in changes.iter().zip(&alone).enumerate() {
                let one = one.as_ref().unwrap_or_else(|m| {
                    panic!("item {i} was refused alone ({m}), not in the batch")
                });
                assert_eq!(
                    serde_json::to_string(c).unwrap(),
                    serde_json::to_string(one).unwrap(),
                    "item {i}"
                );
            }
        }
        Ok(PostBody::One(c)) => panic!("an array parsed as one change: {c:?}"),
        Err(Rejection::Invalid(m)) => {
            let (i, reason) = alone
                .iter()
                .enumerate()
                .find_map(|(i, r)| r.as_ref().err().map(|m| (i, m)))
                .unwrap_or_else(|| panic!("every item is accepted alone, the batch is not: {m}"));
            assert_eq!(m, format!("batch item {i}: {reason}"));
        }
        Err(other) => panic!("refused as {other:?}, not as invalid input"),
    }
});
