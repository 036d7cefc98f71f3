//! Names of the HTTP headers ChangeAgent defines (lower case, as HTTP/2 sends them).

/// The cluster's id: on every answer of a core node or edge, and on every peer request.
pub const CLUSTER_ID: &str = "x-cluster-id";
/// The shared cluster secret, required on peer and admin requests when one is configured.
pub const CLUSTER_SECRET: &str = "x-cluster-secret";
/// Makes a retried write return the first answer instead of applying twice.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Marks a write a follower forwarded to its leader (value: the forwarder's node id).
pub const FORWARDED: &str = "x-changeagent-forwarded";

/// Hop-by-hop and framing headers, which each hop of a forwarded request sets itself (RFC
/// 9110 section 7.6.1, plus the framing headers a re-sent body gets anew).
pub fn is_hop_by_hop(name: &str) -> bool {
    const NAMES: [&str; 9] = [
        "host",
        "connection",
        "content-length",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "keep-alive",
    ];
    NAMES.iter().any(|n| name.eq_ignore_ascii_case(n))
}
