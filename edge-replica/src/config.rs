//! Command-line flags of `changeagent-edge`; every flag can also be set through its
//! `CHANGEAGENT_…` environment variable.

use std::path::PathBuf;

use changeagent_api::limits::{ListenerDefaults, ListenerFlags};
use changeagent_proto::limits;

/// The edge's listener defaults.
#[derive(Debug, Clone)]
pub struct EdgeListener;

impl ListenerDefaults for EdgeListener {
    /// Edges serve the fleets, and the lean server holds a few KB per idle connection, so
    /// 100,000 connections cost a few hundred MB.
    const MAX_CONNECTIONS: &'static str = "100000";
}

/// Default `--max-long-polls` of an edge: nine tenths of its default `--max-connections`, so
/// a fleet of long-polls still leaves 10,000 connections for reads and forwarded writes.
pub const MAX_LONG_POLLS: usize = 90_000;

/// Configuration of one edge.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "changeagent-edge",
    version,
    about = "ChangeAgent edge replica: tails the core and serves its read API to fleets"
)]
pub struct Config {
    /// Where to tail from and forward writes to: core nodes or another edge
    /// (`http://host:port`, comma-separated); the first that answers is used, the others are
    /// failover.
    #[arg(
        long,
        env = "CHANGEAGENT_UPSTREAM",
        value_delimiter = ',',
        required = true
    )]
    pub upstream: Vec<String>,

    /// Directory for the edge's copy of the list, its checkpoint mirror and temp files.
    #[arg(long, env = "CHANGEAGENT_DATA_DIR", default_value = "./edge-data")]
    pub data_dir: PathBuf,

    /// Address to serve the read API on (port 0 picks a free port).
    #[arg(long, env = "CHANGEAGENT_LISTEN", default_value = "127.0.0.1:9100")]
    pub listen: String,

    /// Object store the checkpointers write to (`file:///path`, `s3://bucket/prefix` with
    /// `AWS_*` variables). Optional: without it, checkpoints are downloaded through the
    /// upstream's `GET /checkpoints/{index}/data` and mirrored in the data dir, so consumers
    /// of this edge still load them from here.
    #[arg(long, env = "CHANGEAGENT_OBJECT_STORE")]
    pub object_store: Option<String>,

    /// Longest `block` a long-poll may ask for, in seconds.
    #[arg(long, env = "CHANGEAGENT_MAX_BLOCK_SECS", default_value_t = limits::DEFAULT_MAX_BLOCK_SECS)]
    pub max_block_secs: u64,

    /// Long-polls waiting at once at most; one more is answered 503 with `Retry-After: 5`.
    #[arg(long, env = "CHANGEAGENT_MAX_LONG_POLLS", default_value_t = MAX_LONG_POLLS)]
    pub max_long_polls: usize,

    /// Largest request body forwarded upstream, in bytes.
    #[arg(long, env = "CHANGEAGENT_MAX_BODY_BYTES", default_value_t = limits::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,

    /// Seconds given to running requests to finish at shutdown.
    #[arg(long, env = "CHANGEAGENT_DRAIN_SECS", default_value_t = 5)]
    pub drain_secs: u64,

    /// The token this edge sends upstream for its own tailing and bootstrapping (clients'
    /// writes are forwarded with their own `Authorization`).
    #[command(flatten)]
    pub upstream_token: changeagent_client::TokenFlags,

    /// The CA trusted for `https://` upstreams.
    #[command(flatten)]
    pub upstream_ca: changeagent_client::CaFlags,

    /// The tokens this edge accepts from its clients.
    #[command(flatten)]
    pub auth: changeagent_api::auth::AuthFlags,

    /// The certificate this edge serves its clients with (HTTPS).
    #[command(flatten)]
    pub tls: changeagent_api::tls::TlsFlags,

    #[command(flatten)]
    pub listener: ListenerFlags<EdgeListener>,
}

impl Config {
    /// Checks values that clap cannot; call once at startup.
    pub fn validate(&self) -> Result<(), String> {
        for u in &self.upstream {
            let url = url_of(u)?;
            if url.scheme() != "http" && url.scheme() != "https" {
                return Err(format!(
                    "--upstream {u}: expected an http:// or https:// URL"
                ));
            }
        }
        if self.max_block_secs == 0 {
            return Err("--max-block-secs must be at least 1".into());
        }
        if self.max_body_bytes == 0 {
            return Err("--max-body-bytes must be at least 1".into());
        }
        if self.max_long_polls == 0 {
            return Err("--max-long-polls must be at least 1".into());
        }
        self.listener.validate()
    }
}

fn url_of(raw: &str) -> Result<reqwest::Url, String> {
    reqwest::Url::parse(raw).map_err(|e| format!("--upstream {raw}: not a URL ({e})"))
}
