//! Limits an operator sets on a listener, with each tier's defaults: how long a new
//! connection may take to send its first request head (slowloris), and how many connections
//! may be open at once; the open-file limit those connections need; and the duration syntax
//! of every flag.

use std::marker::PhantomData;
use std::time::Duration;

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Default `--header-read-timeout`: a real client sends its request head in one packet
/// right after connecting; ten seconds leaves room for a slow mobile link and still closes
/// a connection that trickles its head in (slowloris) long before it matters.
pub const DEFAULT_HEADER_READ_TIMEOUT: &str = "10s";

/// A kept-alive connection with no request for this long is closed; also the most a later
/// request on such a connection may take for its head. Longer than the 90 s our own HTTP
/// clients (reqwest's default pool idle timeout: peers, forwarding, edges, the client
/// library) keep an idle connection, so they never send on one the server is closing.
pub const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(300);

/// `Retry-After` of a long-poll refused over `--max-long-polls`: long enough that refused
/// pollers do not come straight back, short enough that they soon find a free slot.
pub const LONG_POLL_RETRY_AFTER_SECS: u64 = 5;

/// Open files kept for everything but client connections (the store's files, connections to
/// peers and upstream, logs) when checking `--max-connections` against the open-file limit.
pub const FD_RESERVE: u64 = 1024;

/// A tier's defaults of [`ListenerFlags`].
pub trait ListenerDefaults: Clone + std::fmt::Debug + Send + Sync + 'static {
    /// Default `--max-connections`, as it is written on the command line.
    const MAX_CONNECTIONS: &'static str;
}

/// The flags of a listener, with the defaults of tier `D`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListenerFlags<D: ListenerDefaults> {
    /// How long a new connection may take to send its first whole request head (request
    /// line and headers; with HTTP/2 the preface and the first request) before it is closed
    /// (`10s`, `500ms`): a client that opens connections and trickles bytes in (slowloris)
    /// holds each for at most this. An idle kept-alive connection is closed after 5 minutes.
    #[arg(
        long,
        env = "CHANGEAGENT_HEADER_READ_TIMEOUT",
        default_value = DEFAULT_HEADER_READ_TIMEOUT,
        value_parser = parse_duration
    )]
    pub header_read_timeout: Duration,

    /// Connections the listener keeps open at most; a new one over it is closed as soon as
    /// it is accepted (counted in `changeagent_connections_refused_total`). A core never
    /// refuses its cluster's members.
    #[arg(long, env = "CHANGEAGENT_MAX_CONNECTIONS", default_value = D::MAX_CONNECTIONS)]
    pub max_connections: usize,

    #[arg(skip)]
    _tier: PhantomData<D>,
}

impl<D: ListenerDefaults> ListenerFlags<D> {
    /// Checks values that clap cannot; call once at startup.
    pub fn validate(&self) -> Result<(), String> {
        if self.header_read_timeout.is_zero() {
            return Err("--header-read-timeout must be more than 0".into());
        }
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        Ok(())
    }

    /// The limits a server enforces.
    pub fn limits(&self) -> ListenerLimits {
        ListenerLimits {
            header_read_timeout: self.header_read_timeout,
            max_connections: self.max_connections,
        }
    }
}

/// What a listener enforces (see [`ListenerFlags`]).
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// From accept to the first whole request head.
    pub header_read_timeout: Duration,
    /// Open connections at most; members of a core's cluster are never refused.
    pub max_connections: usize,
}

impl Default for ListenerLimits {
    /// No connection limit and the default head timeout (tests and embedded servers).
    fn default() -> Self {
        ListenerLimits {
            header_read_timeout: parse_duration(DEFAULT_HEADER_READ_TIMEOUT)
                .unwrap_or(Duration::from_secs(10)),
            max_connections: usize::MAX,
        }
    }
}

/// Raises this process's soft open-file limit to its hard limit (every connection is a file)
/// and warns when `max_connections` plus [`FD_RESERVE`] is more than that allows. Returns the
/// limit now in force, `None` when it cannot be read.
pub fn raise_open_files(max_connections: usize) -> Option<u64> {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit");
            return None;
        }
    };
    let limit = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
                soft
            }
        }
    } else {
        soft
    };
    let needed = (max_connections as u64).saturating_add(FD_RESERVE);
    if needed > limit {
        tracing::warn!(
            max_connections,
            open_file_limit = limit,
            "--max-connections plus {FD_RESERVE} files for storage and peers is more than the \
             open-file limit allows: accepts fail before the limit is reached; raise the hard \
             limit (ulimit -Hn, LimitNOFILE=) or lower --max-connections"
        );
    }
    Some(limit)
}

/// Parses a duration: seconds (`600`) or a number with `ms`, `s`, `m` or `h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 600, 90s, 10m or 1h"))?;
    let ms = match unit {
        "ms" => n,
        "" | "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        _ => {
            return Err(format!(
                "invalid duration {s:?}: the unit must be ms, s, m or h"
            ))
        }
    };
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("600").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        for bad in ["", "m", "10d", "-5s", "1.5m"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[derive(Debug, Clone)]
    struct Small;

    impl ListenerDefaults for Small {
        const MAX_CONNECTIONS: &'static str = "123";
    }

    #[derive(clap::Parser)]
    struct Tier {
        #[command(flatten)]
        listener: ListenerFlags<Small>,
    }

    #[test]
    fn each_tier_has_its_own_default_and_zero_is_refused() {
        let t = Tier::try_parse_from(["tier"]).unwrap();
        assert_eq!(t.listener.max_connections, 123);
        assert_eq!(t.listener.header_read_timeout, Duration::from_secs(10));
        let t = Tier::try_parse_from([
            "tier",
            "--max-connections",
            "7",
            "--header-read-timeout",
            "1500ms",
        ])
        .unwrap();
        assert_eq!(t.listener.limits().max_connections, 7);
        assert_eq!(
            t.listener.limits().header_read_timeout,
            Duration::from_millis(1500)
        );
        let t = Tier::try_parse_from(["tier", "--header-read-timeout", "0"]).unwrap();
        assert!(t.listener.validate().is_err());
        let t = Tier::try_parse_from(["tier", "--max-connections", "0"]).unwrap();
        assert!(t.listener.validate().is_err());
    }
}
