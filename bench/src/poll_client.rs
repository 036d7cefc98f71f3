//! The HTTP client of the long-polls and of the write bench's posters: the
//! minimal HTTP/1.1 client of [`http1`](crate::http1), one TCP connection per
//! poller or poster (the default, and the cheapest), or the shared `reqwest`
//! client (one pooled connection per concurrent request), chosen with
//! `--client` (`--write-client` for posters) so that the two can be compared.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};

use crate::http1::{self, Endpoint, Request};
use crate::server::{self, Server};

/// Which client the long-polls use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClientKind {
    /// A minimal HTTP/1.1 client, one keep-alive TCP connection per poller.
    Raw,
    /// The shared reqwest client (hyper), one pooled keep-alive connection
    /// per concurrent request.
    Reqwest,
}

impl ClientKind {
    pub fn name(self) -> &'static str {
        match self {
            ClientKind::Raw => "raw",
            ClientKind::Reqwest => "reqwest",
        }
    }
}

/// `--client` of the subcommands that open many long-polls.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// HTTP client of the long-polls: raw (a minimal HTTP/1.1 client over
    /// one keep-alive connection per poller; cheapest) or reqwest.
    #[arg(long, env = "CHANGEAGENT_BENCH_CLIENT", value_enum, default_value_t = ClientKind::Raw)]
    pub client: ClientKind,
}

/// Opens long-poll connections to one node.
#[derive(Debug, Clone)]
pub enum PollClient {
    /// The address is resolved once, for every connection.
    Raw(Arc<Endpoint>),
    Reqwest(Server),
}

/// A complete answer: the status and the body.
pub struct Answer {
    pub status: u16,
    pub body: bytes::Bytes,
}

impl PollClient {
    /// A client of `kind` for `server`; resolves its address for `raw`.
    pub async fn new(kind: ClientKind, server: &Server) -> Result<Self> {
        match kind {
            ClientKind::Reqwest => Ok(PollClient::Reqwest(server.clone())),
            ClientKind::Raw => {
                let url = reqwest::Url::parse(server.base())
                    .with_context(|| format!("{} is not a URL", server.base()))?;
                if url.scheme() != "http" {
                    bail!(
                        "the raw client speaks plain http only; choose reqwest for {}",
                        server.base()
                    );
                }
                let host = url
                    .host_str()
                    .with_context(|| format!("{} has no host", server.base()))?;
                let port = url.port_or_known_default().unwrap_or(80);
                let addr = tokio::net::lookup_host((host, port))
                    .await
                    .with_context(|| format!("resolving {host}"))?
                    .next()
                    .with_context(|| format!("{host} has no address"))?;
                let host = match url.port() {
                    Some(port) => format!("{host}:{port}"),
                    None => host.to_string(),
                };
                Ok(PollClient::Raw(Arc::new(Endpoint { addr, host })))
            }
        }
    }

    /// A connection, opened on its first request.
    pub fn connection(&self) -> PollConn {
        match self {
            PollClient::Raw(endpoint) => PollConn::Raw(http1::Conn::new(Arc::clone(endpoint))),
            PollClient::Reqwest(server) => PollConn::Reqwest(server.clone()),
        }
    }
}

/// One poller's connection.
pub enum PollConn {
    Raw(http1::Conn),
    Reqwest(Server),
}

impl PollConn {
    /// `GET path_and_query` within `timeout`: the status and body of the
    /// answer, whatever the status. The error of a connection that could
    /// not be opened keeps its `io::Error` cause, for
    /// [`is_out_of_files`](server::is_out_of_files).
    pub async fn get(&mut self, path_and_query: &str, timeout: Duration) -> Result<Answer> {
        match self {
            PollConn::Raw(conn) => raw_within(conn, timeout, Request::Get(path_and_query)).await,
            PollConn::Reqwest(server) => {
                let url = server.url(path_and_query);
                answer(server.client().get(&url).timeout(timeout).send().await?).await
            }
        }
    }

    /// `POST path` of a JSON `body` within `timeout`: the status and body of
    /// the answer, whatever the status. Sent once, never again.
    pub async fn post_json(
        &mut self,
        path: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Answer> {
        match self {
            PollConn::Raw(conn) => raw_within(conn, timeout, Request::PostJson(path, body)).await,
            PollConn::Reqwest(server) => {
                let request = server
                    .client()
                    .post(server.url(path))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.to_vec())
                    .timeout(timeout);
                answer(request.send().await?).await
            }
        }
    }
}

/// One exchange on a raw connection within `timeout`.
async fn raw_within(
    conn: &mut http1::Conn,
    timeout: Duration,
    request: http1::Request<'_>,
) -> Result<Answer> {
    match tokio::time::timeout(timeout, conn.send(request)).await {
        Ok(Ok(reply)) => Ok(Answer {
            status: reply.status,
            body: reply.body.into(),
        }),
        Ok(Err(e)) => Err(anyhow::Error::new(e)),
        Err(_) => {
            // The answer may still come; a fresh connection must not take it
            // for the next one's.
            conn.reset();
            Err(anyhow!("no answer within {timeout:?}"))
        }
    }
}

async fn answer(resp: reqwest::Response) -> Result<Answer> {
    let status = resp.status().as_u16();
    let body = resp.bytes().await.context("reading the answer")?;
    Ok(Answer { status, body })
}

/// True when `err` comes from hitting the open-file limit.
pub fn is_out_of_files(err: &anyhow::Error) -> bool {
    err.chain().any(server::is_out_of_files)
}

/// The answer's body as text for an error message: its start only.
pub fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(body).chars().take(300).collect()
}
