//! Node selection and failover: which node of the cluster to talk to, and which failures mean
//! "try another node".
//!
//! Policy (contract §8 "HA cluster"): one node at a time, starting with the first listed. A
//! request that fails because *the node* cannot serve it — no connection, a TLS failure, a
//! broken or timed-out exchange, a 5xx (sealed, no active node during an election, an internal
//! error), or a standby's redirect (307/308) or health code (429/472/473) — moves the source to
//! the next node in list order, wrapping around, and counts a failover. Failures that another
//! node would answer the same way (403, 404, a missing key, a bad credential file) do not. The
//! caller tries each node at most once per attempt ([`Nodes::len`]) and otherwise backs off as
//! for any failure; the node that worked last stays in use (no return to the first node).
//!
//! Pure: no I/O, no clock; unit-tested below without a server.

use super::OpenBaoError;

/// The nodes of one source and the one in use.
#[derive(Debug)]
pub struct Nodes<T> {
    nodes: Vec<T>,
    current: usize,
    failovers: u64,
}

impl<T> Nodes<T> {
    /// `nodes` in the configured order; must not be empty (config validation ensures it).
    pub fn new(nodes: Vec<T>) -> Nodes<T> {
        assert!(!nodes.is_empty(), "a source has at least one node");
        Nodes {
            nodes,
            current: 0,
            failovers: 0,
        }
    }

    pub fn current(&self) -> &T {
        &self.nodes[self.current]
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// How many times the source moved to another node.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    /// The node in use could not serve: move to the next one. With a single node this changes
    /// nothing and counts nothing.
    pub fn fail_over(&mut self) {
        if self.nodes.len() > 1 {
            self.current = (self.current + 1) % self.nodes.len();
            self.failovers += 1;
        }
    }
}

/// Whether `e` says the node in use cannot serve the request now (another node may).
pub fn node_cannot_serve(e: &OpenBaoError) -> bool {
    match e {
        OpenBaoError::Connect { .. }
        | OpenBaoError::Tls { .. }
        | OpenBaoError::Http { .. }
        | OpenBaoError::Timeout { .. } => true,
        OpenBaoError::Status { status, .. } => {
            *status >= 500 || matches!(*status, 307 | 308 | 429 | 472 | 473)
        }
        OpenBaoError::Ca { .. }
        | OpenBaoError::ServerName { .. }
        | OpenBaoError::Decode { .. }
        | OpenBaoError::Credential { .. }
        | OpenBaoError::NotFound { .. }
        | OpenBaoError::MissingKey { .. }
        | OpenBaoError::Dynamic(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> OpenBaoError {
        OpenBaoError::Status {
            what: "reading secret/x".into(),
            status: code,
            errors: String::new(),
        }
    }

    #[test]
    fn moves_round_robin_and_counts_failovers() {
        let mut n = Nodes::new(vec!["a", "b", "c"]);
        assert_eq!((*n.current(), n.failovers()), ("a", 0));
        let mut seen = Vec::new();
        for _ in 0..4 {
            n.fail_over();
            seen.push(*n.current());
        }
        assert_eq!(seen, ["b", "c", "a", "b"]);
        assert_eq!(n.failovers(), 4);
    }

    #[test]
    fn a_single_node_never_counts_a_failover() {
        let mut n = Nodes::new(vec!["only"]);
        n.fail_over();
        assert_eq!((*n.current(), n.failovers()), ("only", 0));
    }

    #[test]
    fn which_failures_move_to_another_node() {
        let io = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let cases: Vec<(OpenBaoError, bool)> = vec![
            (
                OpenBaoError::Connect {
                    address: "a".into(),
                    error: io(),
                },
                true,
            ),
            (
                OpenBaoError::Tls {
                    address: "a".into(),
                    error: io(),
                },
                true,
            ),
            (
                OpenBaoError::Http {
                    address: "a".into(),
                    reason: "reset".into(),
                },
                true,
            ),
            (
                OpenBaoError::Timeout {
                    address: "a".into(),
                    what: "x".into(),
                },
                true,
            ),
            // sealed / no active node / internal error / bad gateway
            (status(503), true),
            (status(500), true),
            (status(502), true),
            // a standby that redirects instead of forwarding; health codes of standbys
            (status(307), true),
            (status(308), true),
            (status(429), true),
            (status(472), true),
            (status(473), true),
            // answers every node would give
            (status(403), false),
            (status(404), false),
            (status(400), false),
            (
                OpenBaoError::Decode {
                    what: "x".into(),
                    reason: "y".into(),
                },
                false,
            ),
            (
                OpenBaoError::Credential {
                    path: "/f".into(),
                    reason: "mode".into(),
                },
                false,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(node_cannot_serve(&e), want, "{e}");
        }
    }
}
