//! Decompressed checkpoint files (what an edge bootstraps from, a node restores from, a
//! Raft snapshot holds). Properties: the reader never accepts records out of order or past
//! the header's index, nor a file whose trailer does not count its lines; a record it hands
//! out names its `_id` the way the store reads it; a record the store would accept (its
//! fields parse and meet the limits) has tags and a key that fit the stored header.
#![no_main]

use changeagent_proto::checkpoint::{record_id, Line, LineReader, RecordFields};
use changeagent_proto::limits::{MAX_KEY_BYTES, MAX_TAGS, MAX_TAG_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|file: &[u8]| {
    let Ok(mut reader) = LineReader::new(file) else {
        return;
    };
    let index = reader.header().index;
    let (mut last_id, mut records, mut internal) = (0u64, 0u64, 0u64);
    loop {
        match reader.next_line() {
            Ok(Some(Line::Record(line))) => {
                let id = record_id(line).expect("a record handed out has an _id");
                assert!(
                    id > last_id && id <= index,
                    "record {id} after {last_id}, index {index}"
                );
                last_id = id;
                records += 1;
                check_record(id, line);
            }
            Ok(Some(Line::Internal(_))) => internal += 1,
            Ok(Some(Line::Trailer(t))) => {
                assert!(t.end);
                assert_eq!((t.records, t.internal), (records, internal));
            }
            Ok(Some(Line::Header(_))) => panic!("a second header was handed out"),
            Ok(None) => return,
            Err(_) => return,
        }
    }
});

fn check_record(id: u64, line: &[u8]) {
    let Ok(fields) = serde_json::from_slice::<RecordFields>(line) else {
        return;
    };
    assert_eq!(
        fields.id, id,
        "the prefix and the parsed record disagree on the _id"
    );
    if fields.check_limits().is_err() {
        return;
    }
    assert!(fields.tags.len() <= MAX_TAGS && MAX_TAGS <= usize::from(u16::MAX));
    for tag in &fields.tags {
        assert!(
            !tag.is_empty() && tag.len() <= MAX_TAG_BYTES && MAX_TAG_BYTES <= usize::from(u16::MAX)
        );
    }
    if let Some(key) = &fields.key {
        assert!(!key.is_empty() && key.len() <= MAX_KEY_BYTES);
    }
}
