//! A minimal HTTP/1.1 client over one keep-alive TCP connection: `GET` or a
//! JSON `POST`, the status, and a `Content-Length` or chunked body. Pollers
//! and the write bench's posters use it so that the client's work per request
//! (no pool, no URL parsing, no header map, no hand-off to a connection task,
//! no timer per request) stays small next to the server's on a machine whose
//! cores both share, as with `wrk`.

use std::io::{self, ErrorKind};
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bytes read from the socket at a time; an answer of one change and its
/// headers fits.
const READ_CHUNK: usize = 2048;

/// Largest response head accepted: the server's are a few hundred bytes.
const MAX_HEAD: usize = 64 * 1024;

/// Largest body accepted: far above any page of `limit=10000` small changes,
/// small enough that a broken length cannot exhaust memory.
const MAX_BODY: usize = 256 * 1024 * 1024;

/// Where a connection goes: the socket address and the `Host` header.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub host: String,
}

/// A complete answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One connection, opened on the first request and again after the server
/// closed it. Not for concurrent requests: one request at a time.
pub struct Conn {
    endpoint: std::sync::Arc<Endpoint>,
    /// `None` before the first request, after the server asked to close or
    /// after an error left the connection in an unknown state.
    stream: Option<TcpStream>,
    /// Bytes read past the end of the previous answer (none in practice: the
    /// server never answers before it is asked).
    buf: Vec<u8>,
    /// The request being written, kept to reuse its allocation.
    request: Vec<u8>,
}

/// A request to send: the method, the path with its query, and a JSON body for `POST`.
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    Get(&'a str),
    PostJson(&'a str, &'a [u8]),
}

/// How the body of an answer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyLength {
    Fixed(usize),
    Chunked,
    /// Until the server closes the connection.
    UntilClose,
}

/// The parts of a response head the client needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    status: u16,
    length: BodyLength,
    /// The server closes the connection after this answer.
    close: bool,
}

impl Conn {
    /// A connection to `endpoint`; nothing is sent yet.
    pub fn new(endpoint: std::sync::Arc<Endpoint>) -> Self {
        Self {
            endpoint,
            stream: None,
            buf: Vec::new(),
            request: Vec::new(),
        }
    }

    /// Drops the socket, so the next request opens a new one (after a
    /// timeout, whose answer may still arrive on the old one).
    pub fn reset(&mut self) {
        self.stream = None;
        self.buf.clear();
    }

    /// Sends `request` and reads the whole answer. A `GET` on a kept-alive
    /// connection that the server closed before answering is sent once more
    /// on a new one (a `GET` changes nothing); a `POST` never is, since the
    /// server may have applied it: that is an error.
    pub async fn send(&mut self, request: Request<'_>) -> io::Result<Reply> {
        let reused = self.stream.is_some();
        match self.exchange(request).await {
            Err(Exchange::ClosedBeforeReply(_)) if reused && matches!(request, Request::Get(_)) => {
                self.reset();
                self.exchange(request).await.map_err(Exchange::into_io)
            }
            result => result.map_err(Exchange::into_io),
        }
    }

    async fn exchange(&mut self, request: Request<'_>) -> Result<Reply, Exchange> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.endpoint.addr)
                .await
                .map_err(Exchange::Io)?;
            stream.set_nodelay(true).map_err(Exchange::Io)?;
            self.stream = Some(stream);
            self.buf.clear();
        }
        self.encode(request);
        let result = self.read_reply().await;
        if !matches!(&result, Ok((_, true))) {
            self.reset();
        }
        result.map(|(reply, _)| reply)
    }

    /// Puts `request` into `self.request`, head and body.
    fn encode(&mut self, request: Request<'_>) {
        let (method, path, body) = match request {
            Request::Get(path) => ("GET ", path, None),
            Request::PostJson(path, body) => ("POST ", path, Some(body)),
        };
        let out = &mut self.request;
        out.clear();
        out.extend_from_slice(method.as_bytes());
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        out.extend_from_slice(self.endpoint.host.as_bytes());
        if let Some(body) = body {
            out.extend_from_slice(b"\r\nContent-Type: application/json\r\nContent-Length: ");
            out.extend_from_slice(body.len().to_string().as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(body);
        } else {
            out.extend_from_slice(b"\r\n\r\n");
        }
    }

    /// Writes the request and reads the answer; also says whether the
    /// connection may be kept.
    async fn read_reply(&mut self) -> Result<(Reply, bool), Exchange> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(Exchange::Io(io::Error::other("no connection")));
        };
        if let Err(e) = stream.write_all(&self.request).await {
            // A kept-alive socket the server has closed fails here or on
            // the first read.
            return Err(Exchange::ClosedBeforeReply(e));
        }
        // 1. The head.
        let head_end = loop {
            if let Some(end) = find_head_end(&self.buf) {
                break end;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(invalid("response head too large"));
            }
            let read = read_more(stream, &mut self.buf).await;
            match read {
                Ok(0) if self.buf.is_empty() => {
                    return Err(Exchange::ClosedBeforeReply(eof("before answering")))
                }
                Ok(0) => return Err(Exchange::Io(eof("in the response head"))),
                Ok(_) => {}
                Err(e) if self.buf.is_empty() => return Err(Exchange::ClosedBeforeReply(e)),
                Err(e) => return Err(Exchange::Io(e)),
            }
        };
        let head = parse_head(&self.buf[..head_end]).map_err(Exchange::Io)?;
        self.buf.drain(..head_end);
        // 2. The body.
        let body = match head.length {
            BodyLength::Fixed(len) => {
                if len > MAX_BODY {
                    return Err(invalid("body too large"));
                }
                while self.buf.len() < len {
                    if read_more(stream, &mut self.buf)
                        .await
                        .map_err(Exchange::Io)?
                        == 0
                    {
                        return Err(Exchange::Io(eof("in the body")));
                    }
                }
                let rest = self.buf.split_off(len);
                std::mem::replace(&mut self.buf, rest)
            }
            BodyLength::Chunked => loop {
                if let Some((body, used)) = decode_chunked(&self.buf).map_err(Exchange::Io)? {
                    self.buf.drain(..used);
                    break body;
                }
                if self.buf.len() > MAX_BODY {
                    return Err(invalid("body too large"));
                }
                if read_more(stream, &mut self.buf)
                    .await
                    .map_err(Exchange::Io)?
                    == 0
                {
                    return Err(Exchange::Io(eof("in a chunked body")));
                }
            },
            BodyLength::UntilClose => {
                while read_more(stream, &mut self.buf)
                    .await
                    .map_err(Exchange::Io)?
                    > 0
                {
                    if self.buf.len() > MAX_BODY {
                        return Err(invalid("body too large"));
                    }
                }
                std::mem::take(&mut self.buf)
            }
        };
        let keep = !head.close && head.length != BodyLength::UntilClose;
        Ok((
            Reply {
                status: head.status,
                body,
            },
            keep,
        ))
    }
}

/// How one exchange failed.
enum Exchange {
    /// Nothing came back: the server may have closed a kept-alive
    /// connection before it saw the request.
    ClosedBeforeReply(io::Error),
    Io(io::Error),
}

impl Exchange {
    fn into_io(self) -> io::Error {
        match self {
            Exchange::ClosedBeforeReply(e) | Exchange::Io(e) => e,
        }
    }
}

fn invalid(what: &str) -> Exchange {
    Exchange::Io(io::Error::new(ErrorKind::InvalidData, what.to_string()))
}

fn eof(where_: &str) -> io::Error {
    io::Error::new(
        ErrorKind::UnexpectedEof,
        format!("the server closed the connection {where_}"),
    )
}

/// Reads what is there (at least one byte unless at end of stream).
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.reserve(READ_CHUNK);
    stream.read_buf(buf).await
}

/// The length of the head including its blank line, once it is complete.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parses a response head (status line and headers, the blank line optional).
fn parse_head(head: &[u8]) -> io::Result<Head> {
    let bad = |what: &str| io::Error::new(ErrorKind::InvalidData, what.to_string());
    let text = std::str::from_utf8(head).map_err(|_| bad("response head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(bad("not an HTTP/1.x answer"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    let mut close = version == "HTTP/1.0";
    let mut length = None;
    let mut chunked = false;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad("malformed header line"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse().map_err(|_| bad("bad Content-Length"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        }
    }
    // No body for 1xx, 204 and 304 whatever the headers say.
    let length = if status < 200 || status == 204 || status == 304 {
        BodyLength::Fixed(0)
    } else if chunked {
        BodyLength::Chunked
    } else {
        length.map_or(BodyLength::UntilClose, BodyLength::Fixed)
    };
    Ok(Head {
        status,
        length,
        close,
    })
}

/// Decodes a chunked body at the start of `buf`: the body and the bytes it
/// took (trailers included), or `None` while it is incomplete.
fn decode_chunked(buf: &[u8]) -> io::Result<Option<(Vec<u8>, usize)>> {
    let bad = |what: &str| io::Error::new(ErrorKind::InvalidData, what.to_string());
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(line_len) = find_crlf(&buf[at..]) else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&buf[at..at + line_len])
            .map_err(|_| bad("chunk size is not text"))?;
        // Chunk extensions (`;name=value`) are ignored.
        let hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(hex, 16).map_err(|_| bad("bad chunk size"))?;
        at += line_len + 2;
        if size == 0 {
            // Trailer lines, then an empty line.
            loop {
                let Some(len) = find_crlf(&buf[at..]) else {
                    return Ok(None);
                };
                at += len + 2;
                if len == 0 {
                    return Ok(Some((body, at)));
                }
            }
        }
        if size > MAX_BODY || buf.len() < at + size + 2 {
            return if size > MAX_BODY {
                Err(bad("chunk too large"))
            } else {
                Ok(None)
            };
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += size;
        if &buf[at..at + 2] != b"\r\n" {
            return Err(bad("chunk not followed by CRLF"));
        }
        at += 2;
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::net::TcpListener;

    #[test]
    fn parses_heads() {
        let head =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 42\r\n\r\n";
        assert_eq!(find_head_end(head), Some(head.len()));
        assert_eq!(
            parse_head(head).unwrap(),
            Head {
                status: 200,
                length: BodyLength::Fixed(42),
                close: false
            }
        );
        let head = b"HTTP/1.1 410 Gone\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
        assert_eq!(
            parse_head(head).unwrap(),
            Head {
                status: 410,
                length: BodyLength::Chunked,
                close: true
            }
        );
        let head = b"HTTP/1.0 200 OK\r\n\r\n";
        assert_eq!(
            parse_head(head).unwrap(),
            Head {
                status: 200,
                length: BodyLength::UntilClose,
                close: true
            }
        );
        let head = b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n";
        assert_eq!(parse_head(head).unwrap().length, BodyLength::Fixed(0));
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n").is_err());
        assert_eq!(find_head_end(b"HTTP/1.1 200 OK\r\n"), None);
    }

    #[test]
    fn decodes_chunked_bodies() {
        let wire = b"4\r\nWiki\r\n6;ext=1\r\npedia \r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        let (body, used) = decode_chunked(wire).unwrap().unwrap();
        assert_eq!(body, b"Wikipedia ");
        assert_eq!(&wire[used..], b"NEXT");
        // Every prefix is incomplete, never an error.
        for cut in 0..used {
            assert!(decode_chunked(&wire[..cut]).unwrap().is_none(), "{cut}");
        }
        assert!(decode_chunked(b"zz\r\n").is_err());
        assert!(decode_chunked(b"2\r\nabX\r\n").is_err());
    }

    /// A server that takes one connection after the other and answers the
    /// requests on each with its canned answers, then closes it.
    async fn canned(connections: Vec<Vec<&'static [u8]>>) -> Arc<Endpoint> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for answers in connections {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                for answer in answers {
                    // Read one request head.
                    while find_head_end(&buf).is_none() {
                        buf.reserve(1024);
                        if socket.read_buf(&mut buf).await.unwrap() == 0 {
                            return;
                        }
                    }
                    let end = find_head_end(&buf).unwrap();
                    let request = String::from_utf8(buf.drain(..end).collect()).unwrap();
                    assert!(request.starts_with("GET /changes?since="), "{request}");
                    assert!(request.contains("\r\nHost: 127.0.0.1:"), "{request}");
                    socket.write_all(answer).await.unwrap();
                }
            }
        });
        Arc::new(Endpoint {
            addr,
            host: addr.to_string(),
        })
    }

    #[tokio::test]
    async fn keeps_the_connection_and_reopens_it_when_closed() {
        let endpoint = canned(vec![
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            ],
            vec![b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"],
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"],
        ])
        .await;
        let mut conn = Conn::new(endpoint);
        let reply = conn.send(Request::Get("/changes?since=1")).await.unwrap();
        assert_eq!((reply.status, reply.body.as_slice()), (200, &b"hello"[..]));
        let reply = conn.send(Request::Get("/changes?since=2")).await.unwrap();
        assert_eq!((reply.status, reply.body.as_slice()), (200, &b"abc"[..]));
        // The server closed the first connection without a word: the request
        // goes again on a second one, which it closes after answering.
        let reply = conn.send(Request::Get("/changes?since=3")).await.unwrap();
        assert_eq!((reply.status, reply.body.as_slice()), (404, &b"{}"[..]));
        assert!(conn.stream.is_none(), "Connection: close is honoured");
        let reply = conn.send(Request::Get("/changes?since=4")).await.unwrap();
        assert_eq!((reply.status, reply.body.as_slice()), (200, &b"x"[..]));
    }

    #[tokio::test]
    async fn a_truncated_body_is_an_error() {
        let endpoint = canned(vec![vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort",
        ]])
        .await;
        let mut conn = Conn::new(endpoint);
        let err = conn
            .send(Request::Get("/changes?since=1"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnexpectedEof, "{err}");
    }

    #[tokio::test]
    async fn posts_json_once_and_never_sends_it_again() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            // The first post is answered; the second one is read, then the
            // connection is closed without an answer.
            for answer in [
                Some(&b"HTTP/1.1 201 Created\r\nContent-Length: 9\r\n\r\n{\"_id\":7}"[..]),
                None,
            ] {
                while find_head_end(&buf).is_none() {
                    buf.reserve(1024);
                    assert_ne!(socket.read_buf(&mut buf).await.unwrap(), 0);
                }
                let end = find_head_end(&buf).unwrap();
                let head = String::from_utf8(buf.drain(..end).collect()).unwrap();
                assert!(head.starts_with("POST /changes HTTP/1.1\r\n"), "{head}");
                assert!(
                    head.contains("\r\nContent-Type: application/json\r\n"),
                    "{head}"
                );
                assert!(head.contains("\r\nContent-Length: 7\r\n"), "{head}");
                while buf.len() < 7 {
                    buf.reserve(1024);
                    assert_ne!(socket.read_buf(&mut buf).await.unwrap(), 0);
                }
                assert_eq!(buf.drain(..7).as_slice(), b"{\"a\":1}");
                match answer {
                    Some(answer) => socket.write_all(answer).await.unwrap(),
                    // Nothing listens any more before the connection closes: a post
                    // sent again would be refused, not end "before answering".
                    None => {
                        drop(listener);
                        return;
                    }
                }
            }
        });
        let mut conn = Conn::new(Arc::new(Endpoint {
            addr,
            host: addr.to_string(),
        }));
        let reply = conn
            .send(Request::PostJson("/changes", b"{\"a\":1}"))
            .await
            .unwrap();
        assert_eq!(
            (reply.status, reply.body.as_slice()),
            (201, &b"{\"_id\":7}"[..])
        );
        let err = conn
            .send(Request::PostJson("/changes", b"{\"a\":1}"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnexpectedEof, "{err}");
        assert!(err.to_string().contains("before answering"), "{err}");
        assert!(conn.stream.is_none(), "the connection is dropped");
        server.await.unwrap();
    }
}
