//! The frames of a peer stream (the connection a node keeps open to each peer for Raft
//! RPCs), strictly one request then its answer:
//!
//! ```text
//! frame = length: u32 big-endian (of the body) | tag: u8 | body: `length` bytes
//! ```
//!
//! A request's tag names the RPC ([`Rpc`]), its body is the openraft request as JSON. An
//! answer's tag is [`ANSWER`] (body: openraft's `Result` as JSON) or [`REFUSED`] (body: why,
//! as text).

use std::io;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Length and tag.
pub const HEADER_LEN: usize = 5;
/// Tag of an answer frame: openraft's `Result` as JSON.
pub const ANSWER: u8 = 0;
/// Tag of a refusal: the request could not be read; the body says why.
pub const REFUSED: u8 = 1;

/// The RPC a request frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Rpc {
    Append = 1,
    Vote = 2,
    TransferLeader = 3,
    /// Would the target grant a vote (openraft's Pre-Vote)? Same body as [`Rpc::Vote`]; the
    /// target changes nothing. Versions before it answer [`REFUSED`] with
    /// [`UNKNOWN_TAG`] on a stream, 404 over HTTP.
    PreVote = 4,
}

/// How a refusal names a request tag the target does not know (a newer RPC sent to an
/// older version); the tag follows it.
pub const UNKNOWN_TAG: &str = "unknown Raft request tag";

impl Rpc {
    /// The RPC a request frame's tag names, if any.
    pub fn from_tag(tag: u8) -> Option<Rpc> {
        match tag {
            1 => Some(Rpc::Append),
            2 => Some(Rpc::Vote),
            3 => Some(Rpc::TransferLeader),
            4 => Some(Rpc::PreVote),
            _ => None,
        }
    }

    /// The RPC's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Rpc::Append => "AppendEntries",
            Rpc::Vote => "Vote",
            Rpc::TransferLeader => "TransferLeader",
            Rpc::PreVote => "PreVote",
        }
    }

    /// The HTTP endpoint serving the same RPC (for peers without streams).
    pub fn path(self) -> &'static str {
        match self {
            Rpc::Append => "/raft/append",
            Rpc::Vote => "/raft/vote",
            Rpc::TransferLeader => "/raft/transfer-leader",
            Rpc::PreVote => "/raft/pre-vote",
        }
    }
}

/// A frame holding `value` as JSON, ready to write in one call.
pub fn encode_frame(tag: u8, value: &impl Serialize) -> serde_json::Result<Vec<u8>> {
    let mut frame = vec![0u8; HEADER_LEN];
    serde_json::to_writer(&mut frame, value)?;
    set_header(&mut frame, tag);
    Ok(frame)
}

/// A frame holding `body` as it is.
pub fn raw_frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&[0u8; HEADER_LEN]);
    frame.extend_from_slice(body);
    set_header(&mut frame, tag);
    frame
}

fn set_header(frame: &mut [u8], tag: u8) {
    // Frames are bounded by the Raft request limit, far below 4 GiB.
    let len = u32::try_from(frame.len() - HEADER_LEN).unwrap_or(u32::MAX);
    frame[..4].copy_from_slice(&len.to_be_bytes());
    frame[4] = tag;
}

/// The body of a frame made by [`encode_frame`] or [`raw_frame`].
pub fn frame_body(frame: &[u8]) -> &[u8] {
    &frame[HEADER_LEN..]
}

/// Reads one frame of at most `max` body bytes: `None` at a clean end of the stream
/// (between frames).
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        let n = r.read(&mut header[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        filled += n;
    }
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes is over the limit of {max} bytes"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some((header[4], body)))
}

/// Decodes the body of an `rpc` request (the same JSON on a stream and over HTTP).
pub fn decode_body<T: DeserializeOwned>(rpc: Rpc, body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid {} request: {e}", rpc.name()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_respect_the_limit() {
        let frame = encode_frame(7, &serde_json::json!({"a": [1, 2, 3]})).unwrap();
        assert_eq!(frame_body(&frame), br#"{"a":[1,2,3]}"#);
        let mut stream = Vec::new();
        stream.extend_from_slice(&frame);
        stream.extend_from_slice(&raw_frame(REFUSED, b"no"));
        let mut r = &stream[..];
        let (tag, body) = read_frame(&mut r, 1024).await.unwrap().unwrap();
        assert_eq!((tag, &body[..]), (7, frame_body(&frame)));
        let (tag, body) = read_frame(&mut r, 1024).await.unwrap().unwrap();
        assert_eq!((tag, &body[..]), (REFUSED, &b"no"[..]));
        assert!(read_frame(&mut r, 1024).await.unwrap().is_none());

        let mut r = &frame[..];
        let err = read_frame(&mut r, 4).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut cut = &frame[..frame.len() - 1];
        let err = read_frame(&mut cut, 1024).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let mut cut = &frame[..3];
        let err = read_frame(&mut cut, 1024).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn tags_name_their_rpcs() {
        for rpc in [Rpc::Append, Rpc::Vote, Rpc::TransferLeader, Rpc::PreVote] {
            assert_eq!(Rpc::from_tag(rpc as u8), Some(rpc));
        }
        assert_eq!(Rpc::from_tag(ANSWER), None);
        assert_eq!(Rpc::from_tag(5), None);
    }
}
