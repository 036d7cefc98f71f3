//! Raft RPC bodies as a peer sends them (on a peer stream or over HTTP), and the frames of
//! a peer stream. The first byte picks what the rest is: a request frame's tag (AppendEntries,
//! Vote, TransferLeader), or a snapshot's metadata or vote header; otherwise the whole input
//! is read as a stream of frames. Properties: whatever decodes encodes into a frame that
//! reads back as the same frame and decodes to the same value (a node's own answers and
//! requests are readable by its peers); frames read back byte for byte.
#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use changeagent_raft_wire::frame::{decode_body, encode_frame, raw_frame, read_frame, Rpc};
use changeagent_raft_wire::types::{SnapshotMeta, TypeConfig, Vote};
use libfuzzer_sys::fuzz_target;
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The largest frame the fuzzer reads (a node allows far more; inputs are small).
const MAX_FRAME: usize = 1 << 20;

fuzz_target!(|input: &[u8]| {
    let Some((&selector, body)) = input.split_first() else {
        return;
    };
    match selector {
        1 => round_trip::<AppendEntriesRequest<TypeConfig>>(Rpc::Append, body),
        2 => round_trip::<VoteRequest<TypeConfig>>(Rpc::Vote, body),
        3 => round_trip::<TransferLeaderRequest<TypeConfig>>(Rpc::TransferLeader, body),
        4 => round_trip::<SnapshotMeta>(Rpc::Append, body),
        5 => round_trip::<Vote>(Rpc::Vote, body),
        _ => frames(input),
    }
});

/// Decodes `body` as an `rpc` request; if it decodes, its frame reads back and decodes to
/// the same value.
fn round_trip<T: DeserializeOwned + Serialize>(rpc: Rpc, body: &[u8]) {
    let Ok(value) = decode_body::<T>(rpc, body) else {
        return;
    };
    let frame = encode_frame(rpc as u8, &value).expect("a decoded request encodes");
    let mut reader = &frame[..];
    let (tag, read) = now(read_frame(&mut reader, MAX_FRAME))
        .expect("an encoded frame reads")
        .expect("an encoded frame is not the end of the stream");
    assert_eq!(tag, rpc as u8);
    assert!(reader.is_empty(), "a frame left bytes behind");
    let again: T = decode_body(rpc, &read).expect("an encoded request decodes");
    assert_eq!(
        serde_json::to_vec(&again).unwrap(),
        read,
        "a request changed in its encode/decode round trip"
    );
}

/// Reads `input` as frames until its end or an error; each frame read re-encodes to the
/// bytes it was read from.
fn frames(input: &[u8]) {
    let mut rest = input;
    loop {
        let before = rest;
        match now(read_frame(&mut rest, MAX_FRAME)) {
            Ok(Some((tag, body))) => {
                assert!(body.len() <= MAX_FRAME);
                let consumed = &before[..before.len() - rest.len()];
                assert_eq!(raw_frame(tag, &body), consumed);
            }
            Ok(None) => {
                assert!(rest.is_empty());
                return;
            }
            Err(_) => return,
        }
    }
}

/// Runs a future that never waits (reading from a slice) to completion.
fn now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("reading from a slice waited"),
    }
}
