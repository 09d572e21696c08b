//! The authenticated client of one `[sources.openbao]`: holds the token, keeps it alive, and
//! reads the mapped secrets — on the node [`super::nodes`] picks, failing over to the next one
//! when a node cannot serve.
//!
//! Token upkeep: log in when there is no token; at two thirds of its TTL renew it (or log in
//! again when renewal is refused, gives too little TTL, or the token is not renewable); a 403
//! on a read logs in again once and retries what was refused. Tokens live in the cluster's
//! replicated storage, so the same token keeps working on the node a failover moves to.
//!
//! Memory: each operation opens its connection(s) and closes them before it returns (see
//! [`super::transport`]); credential files are read when a login needs them and wiped after.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::StatusCode;
use secrecy::{SecretBox, SecretString};

use super::{
    OpenBaoError, api,
    nodes::{Nodes, node_cannot_serve},
    transport::{Conn, Endpoint, Tls},
};
use crate::{
    config::{OpenBaoAuth, OpenBaoMapping, OpenBaoSource},
    name::SecretName,
    store::secret,
    upstream::NodeInUse,
};

/// A renewed token with less TTL than this is replaced by a fresh login.
const MIN_USEFUL_TTL: Duration = Duration::from_secs(2);
/// Connections used at most to read many paths in one cycle.
const MAX_PARALLEL: usize = 4;
/// One more connection per this many paths (up to `MAX_PARALLEL`): a handful of paths is read
/// on a single connection, where a second handshake would cost more than it saves.
const PATHS_PER_LANE: usize = 16;

/// The token in use and when it stops working.
struct Token {
    value: SecretString,
    renewable: bool,
    /// `None`: never expires (e.g. a root token).
    ttl: Option<Duration>,
    obtained: Instant,
}

impl Token {
    fn from_auth(a: api::Auth) -> Token {
        Token {
            value: a.token,
            renewable: a.renewable,
            ttl: a.ttl,
            obtained: Instant::now(),
        }
    }

    /// When to renew or replace it: at two thirds of its TTL.
    fn due(&self) -> Option<Instant> {
        self.ttl.map(|ttl| self.obtained + ttl * 2 / 3)
    }
}

/// What one read produced: values, and the secrets that could not be read (kept at their last
/// good value by the caller).
#[derive(Debug, Default)]
pub struct Fetched {
    pub values: Vec<(SecretName, SecretBox<[u8]>)>,
    pub failures: Vec<OpenBaoError>,
}

/// A call of the lease API ([`Client::lease_call`]).
#[derive(Debug)]
pub enum LeaseCall<'a> {
    Read {
        path: &'a str,
    },
    Renew {
        lease_id: &'a SecretString,
        increment: Duration,
    },
    Revoke {
        lease_id: &'a SecretString,
    },
}

/// Its answer.
#[derive(Debug)]
pub enum LeaseAnswer {
    Read(api::Lease),
    Renewed(api::Renewed),
    Revoked,
}

impl LeaseCall<'_> {
    async fn send(
        &self,
        conn: &mut Conn,
        token: &SecretString,
    ) -> Result<LeaseAnswer, OpenBaoError> {
        Ok(match *self {
            LeaseCall::Read { path } => {
                LeaseAnswer::Read(api::read_lease(conn, token, path).await?)
            }
            LeaseCall::Renew {
                lease_id,
                increment,
            } => LeaseAnswer::Renewed(api::renew_lease(conn, token, lease_id, increment).await?),
            LeaseCall::Revoke { lease_id } => {
                api::revoke_lease(conn, token, lease_id).await?;
                LeaseAnswer::Revoked
            }
        })
    }
}

/// An authenticated client for one `[sources.openbao]` configuration.
pub struct Client {
    cfg: OpenBaoSource,
    nodes: Nodes<Endpoint>,
    token: Option<Token>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("node", &self.nodes.current().url())
            .field("logged_in", &self.token.is_some())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Build the TLS configuration from `ca_file` (read now) and one endpoint per node.
    pub fn new(cfg: OpenBaoSource) -> Result<Client, OpenBaoError> {
        let tls = Tls::from_ca_file(&cfg.ca_file)?;
        let endpoints = cfg
            .addresses
            .iter()
            .map(|a| Endpoint::new(&tls, a.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Client {
            nodes: Nodes::new(endpoints),
            token: None,
            cfg,
        })
    }

    pub fn config(&self) -> &OpenBaoSource {
        &self.cfg
    }

    /// The node in use and the failovers so far.
    pub fn node(&self) -> NodeInUse {
        NodeInUse {
            address: self.nodes.current().url().to_owned(),
            failovers: self.nodes.failovers(),
        }
    }

    /// When the token must be renewed or replaced (`None`: no token yet, or it never expires).
    pub fn token_due(&self) -> Option<Instant> {
        self.token.as_ref().and_then(Token::due)
    }

    /// Read every mapped secret (or only `only`, if it is mapped). Node, connection and login
    /// errors fail the whole call (after trying every node once); a secret that cannot be read
    /// is listed in `failures`.
    pub async fn fetch(&mut self, only: Option<&SecretName>) -> Result<Fetched, OpenBaoError> {
        let mut left = self.nodes.len();
        loop {
            let ep = self.nodes.current().clone();
            let result = match ep.connect().await {
                Ok(mut conn) => {
                    let r = self.fetch_on(&mut conn, &ep, only).await;
                    conn.close().await;
                    r
                }
                Err(e) => Err(e),
            };
            match result {
                Err(e) if left > 1 && node_cannot_serve(&e) => self.next_node(&e),
                r => return r,
            }
            left -= 1;
        }
    }

    /// Renew or replace the token if it is due, on a connection of its own (failing over like
    /// [`Client::fetch`]).
    pub async fn maintain_token(&mut self) -> Result<(), OpenBaoError> {
        let mut left = self.nodes.len();
        loop {
            let ep = self.nodes.current().clone();
            let result = match ep.connect().await {
                Ok(mut conn) => {
                    let r = self.ensure_token(&mut conn).await;
                    conn.close().await;
                    r
                }
                Err(e) => Err(e),
            };
            match result {
                Err(e) if left > 1 && node_cannot_serve(&e) => self.next_node(&e),
                r => return r,
            }
            left -= 1;
        }
    }

    /// One lease call (dynamic credentials) on the node in use, failing over like
    /// [`Client::fetch`]; a 403 logs in again once and retries (a revoked or expired token).
    pub async fn lease_call(&mut self, call: LeaseCall<'_>) -> Result<LeaseAnswer, OpenBaoError> {
        let mut left = self.nodes.len();
        loop {
            let ep = self.nodes.current().clone();
            let result = match ep.connect().await {
                Ok(mut conn) => {
                    let r = self.lease_call_on(&mut conn, &call).await;
                    conn.close().await;
                    r
                }
                Err(e) => Err(e),
            };
            match result {
                Err(e) if left > 1 && node_cannot_serve(&e) => self.next_node(&e),
                r => return r,
            }
            left -= 1;
        }
    }

    async fn lease_call_on(
        &mut self,
        conn: &mut Conn,
        call: &LeaseCall<'_>,
    ) -> Result<LeaseAnswer, OpenBaoError> {
        self.ensure_token(conn).await?;
        match call.send(conn, self.token()?).await {
            Err(OpenBaoError::Status { status: 403, .. }) => {
                self.token = None;
                self.login(conn).await?;
                call.send(conn, self.token()?).await
            }
            r => r,
        }
    }

    fn next_node(&mut self, e: &OpenBaoError) {
        let from = self.nodes.current().url().to_owned();
        self.nodes.fail_over();
        tracing::warn!(
            error = %e,
            from = %from,
            to = %self.nodes.current().url(),
            failovers = self.nodes.failovers(),
            "[sources.{}] node cannot serve; trying the next one",
            self.cfg.section
        );
    }

    /// Make sure a usable token is held: log in when there is none, renew (or log in again)
    /// once two thirds of its TTL have passed.
    async fn ensure_token(&mut self, conn: &mut Conn) -> Result<(), OpenBaoError> {
        let Some(token) = &self.token else {
            return self.login(conn).await;
        };
        if token.due().is_none_or(|due| Instant::now() < due) {
            return Ok(());
        }
        if token.renewable {
            match api::renew_self(conn, &token.value).await {
                Ok(auth) if auth.ttl.is_some_and(|t| t < MIN_USEFUL_TTL) => {
                    tracing::info!("token is near its max TTL; logging in again");
                }
                Ok(auth) => {
                    tracing::info!(
                        ttl_secs = auth.ttl.map_or(0, |t| t.as_secs()),
                        "OpenBao token renewed"
                    );
                    self.token = Some(Token::from_auth(auth));
                    return Ok(());
                }
                // The node, not the token, failed: keep the token for the next node.
                Err(e) if node_cannot_serve(&e) => return Err(e),
                Err(e) => tracing::warn!(error = %e, "token renewal failed; logging in again"),
            }
        }
        self.token = None;
        self.login(conn).await
    }

    async fn login(&mut self, conn: &mut Conn) -> Result<(), OpenBaoError> {
        match &self.cfg.auth {
            OpenBaoAuth::AppRole {
                mount,
                role_id,
                secret_id_file,
            } => {
                let secret_id = read_credential(secret_id_file)?;
                let auth = api::approle_login(conn, mount, role_id, &secret_id).await?;
                drop(secret_id);
                tracing::info!(
                    ttl_secs = auth.ttl.map_or(0, |t| t.as_secs()),
                    renewable = auth.renewable,
                    "logged in to OpenBao with AppRole"
                );
                self.token = Some(Token::from_auth(auth));
            }
            OpenBaoAuth::Token { token_file } => {
                let what = format!("looking up the token of {}", token_file.display());
                let value = read_credential(token_file)?;
                let info = api::lookup_self(conn, &value, &what).await?;
                tracing::info!(
                    ttl_secs = info.ttl.map_or(0, |t| t.as_secs()),
                    renewable = info.renewable,
                    "using the OpenBao token from {}",
                    token_file.display()
                );
                self.token = Some(Token {
                    value,
                    renewable: info.renewable,
                    ttl: info.ttl,
                    obtained: Instant::now(),
                });
            }
        }
        Ok(())
    }

    fn token(&self) -> Result<&SecretString, OpenBaoError> {
        self.token
            .as_ref()
            .map(|t| &t.value)
            .ok_or_else(|| OpenBaoError::Http {
                address: self.nodes.current().url().to_owned(),
                reason: "no token after login".to_owned(),
            })
    }

    async fn fetch_on(
        &mut self,
        conn: &mut Conn,
        ep: &Endpoint,
        only: Option<&SecretName>,
    ) -> Result<Fetched, OpenBaoError> {
        self.ensure_token(conn).await?;
        let mut by_path: BTreeMap<String, Vec<OpenBaoMapping>> = BTreeMap::new();
        for m in &self.cfg.secrets {
            if only.is_none_or(|n| n == &m.name) {
                by_path.entry(m.path.clone()).or_default().push(m.clone());
            }
        }
        let paths: Vec<String> = by_path.keys().cloned().collect();
        let mount = self.cfg.mount.clone();
        let mut answers = read_paths(conn, ep, self.token()?, &mount, &paths).await?;
        // A revoked or expired token: log in again once, then retry what was refused.
        let refused: Vec<usize> = (0..paths.len())
            .filter(|&i| answers[i].0 == StatusCode::FORBIDDEN)
            .collect();
        if !refused.is_empty() {
            self.token = None;
            self.login(conn).await?;
            for i in refused {
                answers[i] = api::kv_get(conn, self.token()?, &mount, &paths[i]).await?;
            }
        }
        // An answer the node could not serve (sealed, standby, no leader) fails the node, not
        // the secret: the caller moves to the next node and reads everything there.
        for (path, (status, body)) in paths.iter().zip(&answers) {
            if !status.is_success() && *status != StatusCode::NOT_FOUND {
                let e = api::status_error(&format!("reading {mount}/{path}"), *status, body);
                if node_cannot_serve(&e) {
                    return Err(e);
                }
            }
        }
        let mut out = Fetched::default();
        for ((path, mappings), (status, body)) in by_path.into_iter().zip(answers) {
            let map = match api::kv_answer(&mount, &path, status, &body) {
                Ok(api::KvRead::Found(map)) => map,
                Ok(api::KvRead::NotFound) => {
                    for m in mappings {
                        out.failures.push(OpenBaoError::NotFound {
                            name: m.name,
                            mount: mount.clone(),
                            path: m.path,
                        });
                    }
                    continue;
                }
                Err(e) => {
                    out.failures.push(e);
                    continue;
                }
            };
            drop(body);
            let mut data = map;
            for m in mappings {
                match data.remove(&m.key) {
                    Some(serde_json::Value::String(s)) => {
                        out.values.push((m.name, secret(s.into_bytes())));
                    }
                    // Not a string: the value's compact JSON text.
                    Some(other) => {
                        let text = serde_json::to_vec(&other).unwrap_or_default();
                        out.values.push((m.name, secret(text)));
                    }
                    None => out.failures.push(OpenBaoError::MissingKey {
                        name: m.name,
                        mount: mount.clone(),
                        path: m.path,
                        key: m.key,
                    }),
                }
            }
        }
        Ok(out)
    }
}

/// GET every path on one node; the answers in the order of `paths`. Many paths are read over up
/// to [`MAX_PARALLEL`] connections at once (`conn` plus extra ones to the same node, each closed
/// before this returns); a connection-level error fails the whole read.
async fn read_paths(
    conn: &mut Conn,
    ep: &Endpoint,
    token: &SecretString,
    mount: &str,
    paths: &[String],
) -> Result<Vec<(StatusCode, Bytes)>, OpenBaoError> {
    let lanes = paths.len().div_ceil(PATHS_PER_LANE).clamp(1, MAX_PARALLEL);
    let mut answers: Vec<Option<(StatusCode, Bytes)>> = vec![None; paths.len()];
    let mut extra = tokio::task::JoinSet::new();
    for lane in 1..lanes {
        let ep = ep.clone();
        let token = token.clone();
        let mount = mount.to_owned();
        let work: Vec<(usize, String)> = (lane..paths.len())
            .step_by(lanes)
            .map(|i| (i, paths[i].clone()))
            .collect();
        extra.spawn(async move {
            let mut conn = ep.connect().await?;
            let mut got = Vec::with_capacity(work.len());
            let mut result = Ok(());
            for (i, path) in work {
                match api::kv_get(&mut conn, &token, &mount, &path).await {
                    Ok(a) => got.push((i, a)),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            conn.close().await;
            result.map(|()| got)
        });
    }
    let mut first_error = None;
    for i in (0..paths.len()).step_by(lanes) {
        match api::kv_get(conn, token, mount, &paths[i]).await {
            Ok(a) => answers[i] = Some(a),
            Err(e) => {
                first_error = Some(e);
                break;
            }
        }
    }
    // Wait for every lane (so every extra connection is closed) before returning.
    while let Some(joined) = extra.join_next().await {
        match joined {
            Ok(Ok(got)) => {
                for (i, a) in got {
                    answers[i] = Some(a);
                }
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(OpenBaoError::Http {
                    address: ep.url().to_owned(),
                    reason: format!("read task failed: {e}"),
                });
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(answers
        .into_iter()
        .map(|a| a.expect("every path was read"))
        .collect())
}

/// A credential file's content, surrounding whitespace removed. The file is checked again
/// (owner and mode) each time it is read.
fn read_credential(path: &std::path::Path) -> Result<SecretString, OpenBaoError> {
    let err = |reason: String| OpenBaoError::Credential {
        path: path.display().to_string(),
        reason,
    };
    // Opened first, then judged on the descriptor (owner, mode): no check-then-open race.
    let mut file = crate::config::open_credential_file(path).map_err(err)?;
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(4096));
    std::io::Read::read_to_end(&mut file, &mut bytes).map_err(|e| err(e.to_string()))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| err("not UTF-8 text".to_owned()))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(err("the file is empty".to_owned()));
    }
    Ok(SecretString::from(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt, time::Duration};

    use secrecy::ExposeSecret;

    use super::*;
    use crate::openbao::testserver::{CA, Seen, TestServer, address};

    /// A closed loopback port (bound, then released).
    fn dead_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    fn source(dir: &std::path::Path, ports: &[u16]) -> OpenBaoSource {
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, CA).unwrap();
        let sid = dir.join("secret-id");
        std::fs::write(&sid, "sid-1\n").unwrap();
        std::fs::set_permissions(&sid, std::fs::Permissions::from_mode(0o600)).unwrap();
        OpenBaoSource {
            section: "openbao",
            addresses: ports.iter().map(|p| address(*p)).collect(),
            ca_file: ca,
            mount: "secret".into(),
            refresh: Duration::from_secs(30),
            required: true,
            auth: OpenBaoAuth::AppRole {
                mount: "approle".into(),
                role_id: "role-1".into(),
                secret_id_file: sid,
            },
            secrets: vec![OpenBaoMapping {
                name: SecretName::parse("ORDERS_DB").unwrap(),
                path: "apps/orders".into(),
                key: "db".into(),
            }],
            dynamic: Vec::new(),
        }
    }

    /// An active node: logs in and serves `apps/orders`.
    fn active(req: &Seen) -> (u16, String) {
        match req.path.as_str() {
            "/v1/auth/approle/login" => (
                200,
                r#"{"auth":{"client_token":"s.tok","lease_duration":600,"renewable":true}}"#.into(),
            ),
            "/v1/secret/data/apps/orders" => (200, r#"{"data":{"data":{"db":"v1"}}}"#.into()),
            _ => (404, "{}".into()),
        }
    }

    fn value(f: &Fetched) -> Vec<(String, String)> {
        f.values
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8(v.expose_secret().to_vec()).unwrap(),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn fails_over_past_a_dead_node_a_sealed_node_and_a_redirecting_standby() {
        let dir = tempfile::tempdir().unwrap();
        let sealed = TestServer::start(|_| (503, r#"{"errors":["Vault is sealed"]}"#.into())).await;
        // A standby without request forwarding: logs in fine (forwarded writes are not
        // modelled), then redirects the read to the active node.
        let standby = TestServer::start(|req| match req.path.as_str() {
            "/v1/auth/approle/login" => active(req),
            _ => (307, String::new()),
        })
        .await;
        let good = TestServer::start(active).await;
        let cfg = source(
            dir.path(),
            &[dead_port(), sealed.port, standby.port, good.port],
        );
        let mut c = Client::new(cfg).unwrap();
        let f = c.fetch(None).await.unwrap();
        assert_eq!(value(&f), [("ORDERS_DB".to_owned(), "v1".to_owned())]);
        assert_eq!(
            c.node(),
            NodeInUse {
                address: format!("https://127.0.0.1:{}", good.port),
                failovers: 3
            }
        );
        // The node that worked stays in use.
        c.fetch(None).await.unwrap();
        assert_eq!(c.node().failovers, 3);
        assert_eq!(
            good.requests()
                .iter()
                .filter(|r| r.path == "/v1/auth/approle/login")
                .count(),
            0,
            "the token from the standby's login is kept (tokens are cluster-wide)"
        );
    }

    #[tokio::test]
    async fn every_node_down_is_one_error_after_one_try_each() {
        let dir = tempfile::tempdir().unwrap();
        let sealed = TestServer::start(|_| (503, r#"{"errors":["Vault is sealed"]}"#.into())).await;
        let cfg = source(dir.path(), &[dead_port(), sealed.port]);
        let mut c = Client::new(cfg).unwrap();
        let e = c.fetch(None).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "AppRole login at auth/approle: HTTP 503: Vault is sealed"
        );
        assert_eq!(sealed.requests().len(), 1, "each node once per attempt");
        assert_eq!(c.node().failovers, 1);
    }

    #[tokio::test]
    async fn a_refusal_every_node_would_give_does_not_fail_over() {
        let dir = tempfile::tempdir().unwrap();
        let denied =
            TestServer::start(|_| (400, r#"{"errors":["invalid role or secret ID"]}"#.into()))
                .await;
        let good = TestServer::start(active).await;
        let cfg = source(dir.path(), &[denied.port, good.port]);
        let mut c = Client::new(cfg).unwrap();
        let e = c.fetch(None).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "AppRole login at auth/approle: HTTP 400: invalid role or secret ID"
        );
        assert_eq!(c.node().failovers, 0);
        assert!(good.requests().is_empty());
    }
}
