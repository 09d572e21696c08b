//! `[sources.openbao]` (alias `[sources.vault]`): secrets read from an OpenBao or Vault KV v2
//! mount over HTTPS, kept fresh by a background task.
//!
//! What it trusts: only the CA certificates of `ca_file`; the server's certificate must chain to
//! one of them and name the host of `address` (rustls with the ring provider; no OpenSSL, no
//! system trust store, verification cannot be turned off).
//!
//! What it guarantees:
//! - Start-up ([`initial_fetch`]) reads every mapped secret or fails with the cause (when the
//!   source is `required`, the default): never a silent blank.
//! - Afterwards the [`Worker`] re-reads every `refresh`, renews its token at two thirds of its
//!   TTL (logging in again when renewal is refused or the token is not renewable), and on
//!   errors backs off exponentially (1 s doubling, at most `min(refresh, 5 min)`) while the
//!   store keeps serving the last good values. Each cycle's outcome is recorded for Status
//!   (`Broker::note_source("openbao", …)`).
//! - Memory: every refresh cycle opens one TLS connection and drops it (and waits for its
//!   driver task to end) before the cycle returns, so no TLS record buffer, HTTP read buffer or
//!   JSON tree outlives the cycle; the clearing allocator ([`crate::alloc`]) wipes each of them
//!   on free. The only long-lived copies are the store's `SecretBox`es and the token
//!   (`SecretString`); the credential files are read when a login needs them and wiped after.
//! - Values, tokens and secret ids appear in no log line or error text. Error texts carry the
//!   server's `errors` strings (e.g. "permission denied"), which never contain values.

use std::{
    collections::BTreeMap,
    io,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode, header};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use serde::Deserialize;
use tokio::{
    net::TcpStream,
    sync::{mpsc, oneshot},
};
use tokio_rustls::TlsConnector;

use crate::{
    config::{OpenBaoAuth, OpenBaoMapping, OpenBaoSource},
    name::SecretName,
    state::Broker,
    store::{Origin, secret},
};

/// Bound on each HTTP exchange (connect, handshake, one request): a hung server must not stall
/// refreshes forever.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body accepted.
const MAX_BODY: usize = 4 * 1024 * 1024;
/// Longest back-off between failed attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A renewed token with less TTL than this is replaced by a fresh login.
const MIN_USEFUL_TTL: Duration = Duration::from_secs(2);
/// Connections used at most to read many paths in one cycle.
const MAX_PARALLEL: usize = 4;
/// One more connection per this many paths (up to `MAX_PARALLEL`): a handful of paths is read
/// on a single connection, where a second handshake would cost more than it saves.
const PATHS_PER_LANE: usize = 16;
/// Name under which Status shows this source.
pub const SOURCE: &str = "openbao";

#[derive(Debug, thiserror::Error)]
pub enum OpenBaoError {
    #[error("failed to load the CA file {path}: {reason}")]
    Ca { path: String, reason: String },
    #[error("{address}: `{host}` is not a valid TLS server name")]
    ServerName { address: String, host: String },
    // `error`, not `source`: the cause is part of the one-line message (anyhow's `{:#}` would
    // print a `source` twice).
    #[error("failed to connect to {address}: {error}")]
    Connect { address: String, error: io::Error },
    #[error("TLS handshake with {address} failed: {error}")]
    Tls { address: String, error: io::Error },
    #[error("HTTP exchange with {address} failed: {reason}")]
    Http { address: String, reason: String },
    #[error("{what} at {address} timed out after {}s", REQUEST_TIMEOUT.as_secs())]
    Timeout { address: String, what: String },
    #[error("{what}: HTTP {status}{errors}")]
    Status {
        what: String,
        status: u16,
        /// `: ` + the server's `errors` strings, or empty.
        errors: String,
    },
    #[error("{what}: unexpected response: {reason}")]
    Decode { what: String, reason: String },
    #[error("failed to read credential file {path}: {reason}")]
    Credential { path: String, reason: String },
    #[error("secret {name}: {mount}/{path} does not exist (or its latest version is deleted)")]
    NotFound {
        name: SecretName,
        mount: String,
        path: String,
    },
    #[error("secret {name}: {mount}/{path} has no key {key:?}")]
    MissingKey {
        name: SecretName,
        mount: String,
        path: String,
        key: String,
    },
}

/// The token in use and when it stops working.
struct Token {
    value: SecretString,
    renewable: bool,
    /// `None`: never expires (e.g. a root token).
    ttl: Option<Duration>,
    obtained: Instant,
}

impl Token {
    /// When to renew or replace it: at two thirds of its TTL.
    fn due(&self) -> Option<Instant> {
        self.ttl.map(|ttl| self.obtained + ttl * 2 / 3)
    }
}

/// One HTTP/1.1 connection over TLS, used for one cycle and then closed.
struct Conn {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Conn {
    /// Close the connection and wait until its buffers are freed (and so wiped).
    async fn close(self) {
        drop(self.send);
        let mut driver = self.driver;
        if tokio::time::timeout(Duration::from_secs(1), &mut driver)
            .await
            .is_err()
        {
            driver.abort();
            let _ = driver.await;
        }
    }
}

/// What one cycle read: values, and the secrets that could not be read (kept at their last
/// good value by the caller).
#[derive(Debug, Default)]
pub struct Fetched {
    pub values: Vec<(SecretName, SecretBox<[u8]>)>,
    pub failures: Vec<OpenBaoError>,
}

/// An authenticated client for one `[sources.openbao]` configuration.
pub struct Client {
    cfg: OpenBaoSource,
    ep: Endpoint,
    token: Option<Token>,
}

/// Where and how to connect: cheap to clone into the tasks of a parallel read.
#[derive(Clone)]
struct Endpoint {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    address: crate::config::OpenBaoAddress,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("address", &self.cfg.address.url)
            .field("logged_in", &self.token.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<String>,
}

#[derive(Deserialize)]
struct AuthBody {
    auth: AuthInfo,
}

#[derive(Deserialize)]
struct AuthInfo {
    client_token: String,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
}

#[derive(Deserialize)]
struct LookupBody {
    data: LookupData,
}

#[derive(Deserialize)]
struct LookupData {
    #[serde(default)]
    ttl: u64,
    #[serde(default)]
    renewable: bool,
}

#[derive(Deserialize)]
struct KvBody {
    data: KvData,
}

#[derive(Deserialize)]
struct KvData {
    data: Option<BTreeMap<String, serde_json::Value>>,
}

impl Client {
    /// Build the TLS configuration from `ca_file` (read now).
    pub fn new(cfg: OpenBaoSource) -> Result<Client, OpenBaoError> {
        let ca_err = |reason: String| OpenBaoError::Ca {
            path: cfg.ca_file.display().to_string(),
            reason,
        };
        let mut roots = rustls::RootCertStore::empty();
        let pem = crate::config::read_ca_file(&cfg.ca_file).map_err(ca_err)?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ca_err(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_err("no PEM certificate in it".to_owned()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ca_err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let server_name = ServerName::try_from(cfg.address.host.clone()).map_err(|_| {
            OpenBaoError::ServerName {
                address: cfg.address.url.clone(),
                host: cfg.address.host.clone(),
            }
        })?;
        Ok(Client {
            ep: Endpoint {
                connector: TlsConnector::from(Arc::new(tls)),
                server_name,
                address: cfg.address.clone(),
            },
            token: None,
            cfg,
        })
    }

    pub fn config(&self) -> &OpenBaoSource {
        &self.cfg
    }

    /// When the token must be renewed or replaced (`None`: no token yet, or it never expires).
    pub fn token_due(&self) -> Option<Instant> {
        self.token.as_ref().and_then(Token::due)
    }

    async fn connect(&self) -> Result<Conn, OpenBaoError> {
        self.ep.connect().await
    }

    /// One request, with the token when `with_token`.
    async fn call(
        &self,
        conn: &mut Conn,
        method: Method,
        path: &str,
        with_token: bool,
        body: Option<Vec<u8>>,
        what: &str,
    ) -> Result<(StatusCode, Bytes), OpenBaoError> {
        let token = if with_token {
            self.token.as_ref().map(|t| &t.value)
        } else {
            None
        };
        self.ep.call(conn, method, path, token, body, what).await
    }

    fn status_error(what: &str, status: StatusCode, body: &[u8]) -> OpenBaoError {
        let errors = serde_json::from_slice::<ErrorBody>(body)
            .map(|b| b.errors)
            .unwrap_or_default();
        let mut errors = errors.join("; ");
        errors.truncate(
            (0..=300.min(errors.len()))
                .rev()
                .find(|i| errors.is_char_boundary(*i))
                .unwrap_or(0),
        );
        OpenBaoError::Status {
            what: what.to_owned(),
            status: status.as_u16(),
            errors: if errors.is_empty() {
                String::new()
            } else {
                format!(": {errors}")
            },
        }
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
            match self.renew(conn).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "token renewal failed; logging in again"),
            }
        }
        self.token = None;
        self.login(conn).await
    }

    /// `auth/token/renew-self`. `Ok(false)`: renewed, but with too little TTL left to be
    /// worth keeping (the token's max TTL is near).
    async fn renew(&mut self, conn: &mut Conn) -> Result<bool, OpenBaoError> {
        let what = "renewing the token";
        let (status, body) = self
            .call(
                conn,
                Method::POST,
                "/v1/auth/token/renew-self",
                true,
                Some(b"{}".to_vec()),
                what,
            )
            .await?;
        if !status.is_success() {
            return Err(Self::status_error(what, status, &body));
        }
        let auth: AuthBody = decode(what, &body)?;
        let ttl = Duration::from_secs(auth.auth.lease_duration);
        if auth.auth.lease_duration > 0 && ttl < MIN_USEFUL_TTL {
            tracing::info!(
                ttl_secs = ttl.as_secs(),
                "token is near its max TTL; logging in again"
            );
            return Ok(false);
        }
        self.token = Some(Token {
            value: SecretString::from(auth.auth.client_token),
            renewable: auth.auth.renewable,
            ttl: (auth.auth.lease_duration > 0).then_some(ttl),
            obtained: Instant::now(),
        });
        tracing::info!(ttl_secs = ttl.as_secs(), "OpenBao token renewed");
        Ok(true)
    }

    async fn login(&mut self, conn: &mut Conn) -> Result<(), OpenBaoError> {
        match self.cfg.auth.clone() {
            OpenBaoAuth::AppRole {
                mount,
                role_id,
                secret_id_file,
            } => {
                let what = format!("AppRole login at auth/{mount}");
                let secret_id = read_credential(&secret_id_file)?;
                let body = serde_json::to_vec(&serde_json::json!({
                    "role_id": role_id,
                    "secret_id": secret_id.expose_secret(),
                }))
                .map_err(|e| OpenBaoError::Decode {
                    what: what.clone(),
                    reason: e.to_string(),
                })?;
                drop(secret_id);
                let path = format!("/v1/auth/{}/login", encode_path(&mount));
                let (status, body) = self
                    .call(conn, Method::POST, &path, false, Some(body), &what)
                    .await?;
                if !status.is_success() {
                    return Err(Self::status_error(&what, status, &body));
                }
                let auth: AuthBody = decode(&what, &body)?;
                let ttl = Duration::from_secs(auth.auth.lease_duration);
                self.token = Some(Token {
                    value: SecretString::from(auth.auth.client_token),
                    renewable: auth.auth.renewable,
                    ttl: (auth.auth.lease_duration > 0).then_some(ttl),
                    obtained: Instant::now(),
                });
                tracing::info!(
                    ttl_secs = ttl.as_secs(),
                    renewable = auth.auth.renewable,
                    "logged in to OpenBao with AppRole"
                );
            }
            OpenBaoAuth::Token { token_file } => {
                let what = format!("looking up the token of {}", token_file.display());
                self.token = Some(Token {
                    value: read_credential(&token_file)?,
                    renewable: false,
                    ttl: None,
                    obtained: Instant::now(),
                });
                let (status, body) = self
                    .call(
                        conn,
                        Method::GET,
                        "/v1/auth/token/lookup-self",
                        true,
                        None,
                        &what,
                    )
                    .await?;
                if !status.is_success() {
                    self.token = None;
                    return Err(Self::status_error(&what, status, &body));
                }
                let info: LookupBody = decode(&what, &body)?;
                if let Some(t) = &mut self.token {
                    t.renewable = info.data.renewable;
                    t.ttl = (info.data.ttl > 0).then(|| Duration::from_secs(info.data.ttl));
                }
                tracing::info!(
                    ttl_secs = info.data.ttl,
                    renewable = info.data.renewable,
                    "using the OpenBao token from {}",
                    token_file.display()
                );
            }
        }
        Ok(())
    }

    /// Renew or replace the token if it is due, on a connection of its own.
    pub async fn maintain_token(&mut self) -> Result<(), OpenBaoError> {
        let mut conn = self.connect().await?;
        let r = self.ensure_token(&mut conn).await;
        conn.close().await;
        r
    }

    /// Read every mapped secret (or only `only`, if it is mapped). Connection and login errors
    /// fail the whole call; a secret that cannot be read is listed in `failures`.
    pub async fn fetch(&mut self, only: Option<&SecretName>) -> Result<Fetched, OpenBaoError> {
        let mut conn = self.connect().await?;
        let result = self.fetch_on(&mut conn, only).await;
        conn.close().await;
        result
    }

    async fn fetch_on(
        &mut self,
        conn: &mut Conn,
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
        let mut answers = self.read_paths(conn, &paths).await?;
        // A revoked or expired token: log in again once, then retry what was refused.
        let refused: Vec<usize> = (0..paths.len())
            .filter(|&i| answers[i].0 == StatusCode::FORBIDDEN)
            .collect();
        if !refused.is_empty() {
            self.token = None;
            self.login(conn).await?;
            for i in refused {
                answers[i] = self.read_path(conn, &paths[i]).await?;
            }
        }
        let mut out = Fetched::default();
        for ((path, mappings), (status, body)) in by_path.into_iter().zip(answers) {
            let what = format!("reading {}/{path}", self.cfg.mount);
            if status == StatusCode::NOT_FOUND {
                for m in mappings {
                    out.failures.push(OpenBaoError::NotFound {
                        name: m.name,
                        mount: self.cfg.mount.clone(),
                        path: m.path,
                    });
                }
                continue;
            }
            if !status.is_success() {
                out.failures.push(Self::status_error(&what, status, &body));
                continue;
            }
            let kv: KvBody = match decode(&what, &body) {
                Ok(kv) => kv,
                Err(e) => {
                    out.failures.push(e);
                    continue;
                }
            };
            drop(body);
            let mut data = kv.data.data.unwrap_or_default();
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
                        mount: self.cfg.mount.clone(),
                        path: m.path,
                        key: m.key,
                    }),
                }
            }
        }
        Ok(out)
    }

    fn kv_url(&self, path: &str) -> String {
        format!(
            "/v1/{}/data/{}",
            encode_path(&self.cfg.mount),
            encode_path(path)
        )
    }

    async fn read_path(
        &self,
        conn: &mut Conn,
        path: &str,
    ) -> Result<(StatusCode, Bytes), OpenBaoError> {
        let what = format!("reading {}/{path}", self.cfg.mount);
        self.call(conn, Method::GET, &self.kv_url(path), true, None, &what)
            .await
    }

    /// GET every path; the answers in the order of `paths`. Many paths are read over up to
    /// [`MAX_PARALLEL`] connections at once (`conn` plus extra ones, each closed before this
    /// returns); a connection-level error fails the whole read.
    async fn read_paths(
        &self,
        conn: &mut Conn,
        paths: &[String],
    ) -> Result<Vec<(StatusCode, Bytes)>, OpenBaoError> {
        let lanes = paths.len().div_ceil(PATHS_PER_LANE).clamp(1, MAX_PARALLEL);
        let mut answers: Vec<Option<(StatusCode, Bytes)>> = vec![None; paths.len()];
        let mut extra = tokio::task::JoinSet::new();
        for lane in 1..lanes {
            let ep = self.ep.clone();
            let token = self.token.as_ref().map(|t| t.value.clone());
            let work: Vec<(usize, String, String)> = (lane..paths.len())
                .step_by(lanes)
                .map(|i| (i, self.kv_url(&paths[i]), paths[i].clone()))
                .collect();
            let mount = self.cfg.mount.clone();
            extra.spawn(async move {
                let mut conn = ep.connect().await?;
                let mut got = Vec::with_capacity(work.len());
                let mut result = Ok(());
                for (i, url, path) in work {
                    let what = format!("reading {mount}/{path}");
                    match ep
                        .call(&mut conn, Method::GET, &url, token.as_ref(), None, &what)
                        .await
                    {
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
            match self.read_path(conn, &paths[i]).await {
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
                        address: self.cfg.address.url.clone(),
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
}

impl Endpoint {
    fn address(&self) -> String {
        self.address.url.clone()
    }

    async fn connect(&self) -> Result<Conn, OpenBaoError> {
        let address = self.address();
        let timeout = |what: &str| OpenBaoError::Timeout {
            address: address.clone(),
            what: what.to_owned(),
        };
        let host = self.address.host.as_str();
        let tcp = tokio::time::timeout(
            REQUEST_TIMEOUT,
            TcpStream::connect((host, self.address.port)),
        )
        .await
        .map_err(|_| timeout("connecting"))?
        .map_err(|error| OpenBaoError::Connect {
            address: address.clone(),
            error,
        })?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.connector.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| timeout("the TLS handshake"))?
        .map_err(|error| OpenBaoError::Tls {
            address: address.clone(),
            error,
        })?;
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| OpenBaoError::Http {
                address: address.clone(),
                reason: e.to_string(),
            })?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { send, driver })
    }

    /// One request; returns the status and the whole body. `what` names it in errors.
    async fn call(
        &self,
        conn: &mut Conn,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<Vec<u8>>,
        what: &str,
    ) -> Result<(StatusCode, Bytes), OpenBaoError> {
        let address = self.address();
        let http_err = |reason: String| OpenBaoError::Http {
            address: address.clone(),
            reason,
        };
        let authority = if self.address.host.contains(':') {
            format!("[{}]:{}", self.address.host, self.address.port)
        } else {
            format!("{}:{}", self.address.host, self.address.port)
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, authority)
            .header(
                header::USER_AGENT,
                concat!("secretd/", env!("CARGO_PKG_VERSION")),
            );
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(t) = token {
            let mut v = header::HeaderValue::from_str(t.expose_secret())
                .map_err(|_| http_err("the token is not a valid header value".to_owned()))?;
            v.set_sensitive(true);
            req = req.header("X-Vault-Token", v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| http_err(e.to_string()))?;
        let exchange = async {
            conn.send
                .ready()
                .await
                .map_err(|e| http_err(e.to_string()))?;
            let resp = conn
                .send
                .send_request(req)
                .await
                .map_err(|e| http_err(e.to_string()))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| http_err(format!("reading the response body: {e}")))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| OpenBaoError::Timeout {
                address: address.clone(),
                what: what.to_owned(),
            })?
    }
}

/// Parse a JSON response. serde_json's messages quote the offending input ("invalid type:
/// string \"…\""), which may be a value or a token, so only the error's kind and position are
/// kept.
fn decode<'a, T: Deserialize<'a>>(what: &str, body: &'a [u8]) -> Result<T, OpenBaoError> {
    serde_json::from_slice(body).map_err(|e| OpenBaoError::Decode {
        what: what.to_owned(),
        reason: format!(
            "malformed JSON ({:?} error at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        ),
    })
}

/// A credential file's content, surrounding whitespace removed. The file is checked again
/// (owner and mode) each time it is read.
fn read_credential(path: &std::path::Path) -> Result<SecretString, OpenBaoError> {
    let err = |reason: String| OpenBaoError::Credential {
        path: path.display().to_string(),
        reason,
    };
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

/// Percent-encode each segment of a `/`-separated path (RFC 3986 unreserved characters kept).
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Everything mapped, before READY. With `required`, any failure (unreachable, certificate,
/// login, a missing path or key) is returned; without it, what could be read is returned and
/// the errors are logged (the worker keeps retrying).
pub async fn initial_fetch(cfg: &OpenBaoSource) -> Result<(Client, Fetched), OpenBaoError> {
    let mut client = Client::new(cfg.clone())?;
    let fetched = match client.fetch(None).await {
        Ok(f) => f,
        Err(e) if !cfg.required => {
            tracing::error!(error = %e, "[sources.{}] first fetch failed (required = false: starting without its secrets)", cfg.section);
            Fetched {
                values: Vec::new(),
                failures: vec![e],
            }
        }
        Err(e) => return Err(e),
    };
    if cfg.required && !fetched.failures.is_empty() {
        let mut failures = fetched.failures;
        return Err(failures.swap_remove(0));
    }
    for e in &fetched.failures {
        tracing::error!(error = %e, "[sources.{}] secret not read at start-up", cfg.section);
    }
    Ok((client, fetched))
}

// ---------------------------------------------------------------------------------------------
// The background worker.

enum Command {
    Refresh {
        only: Option<SecretName>,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    Reconfigure,
}

/// How the rest of the broker talks to the worker: names only, never values.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
}

impl Handle {
    /// Re-read now (all, or one secret); returns how many secrets were read.
    pub async fn refresh(&self, only: Option<SecretName>) -> Result<u64, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Refresh { only, reply })
            .await
            .map_err(|_| "the OpenBao worker has stopped".to_owned())?;
        rx.await
            .map_err(|_| "the OpenBao worker has stopped".to_owned())?
    }

    /// The configuration was reloaded: pick up a changed `[sources.openbao]`.
    pub fn reconfigure(&self) {
        let _ = self.tx.try_send(Command::Reconfigure);
    }
}

/// The refresh loop. Created before the runtime serves (with the client of the start-up
/// fetch) and run by [`Worker::spawn`].
#[derive(Debug)]
pub struct Worker {
    client: Option<Client>,
    /// When the next full refresh is due.
    next: Instant,
    /// No token maintenance before this (set to the back-off after a failure, so a token that
    /// is due while the server is down does not make the loop spin).
    token_hold: Instant,
    failures: u32,
}

impl Worker {
    /// `client` is the one [`initial_fetch`] returned (if the source is configured); `ok` says
    /// whether that fetch fully succeeded (if not, the first retry comes after 1 s).
    pub fn new(client: Option<Client>, ok: bool) -> Worker {
        let mut w = Worker {
            next: Instant::now(),
            token_hold: Instant::now(),
            client,
            failures: 0,
        };
        if ok {
            w.succeeded();
        } else {
            w.failed();
        }
        w
    }

    fn refresh_interval(&self) -> Duration {
        self.client
            .as_ref()
            .map_or(Duration::from_secs(3600), |c| c.cfg.refresh)
    }

    fn succeeded(&mut self) {
        self.failures = 0;
        self.next = Instant::now() + self.refresh_interval();
    }

    fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        let cap = self.refresh_interval().min(MAX_BACKOFF);
        let backoff = Duration::from_secs(1)
            .saturating_mul(1u32 << (self.failures - 1).min(16))
            .min(cap);
        self.next = Instant::now() + backoff;
        self.token_hold = self.next;
    }

    /// Start the loop; the returned handle serves `Admin.Refresh` and reloads.
    pub fn spawn(self, broker: Arc<Broker>) -> Handle {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(self.run(broker, rx));
        Handle { tx }
    }

    async fn run(mut self, broker: Arc<Broker>, mut rx: mpsc::Receiver<Command>) {
        loop {
            let far = Instant::now() + Duration::from_secs(24 * 3600);
            let (refresh_at, token_at) = match &self.client {
                Some(c) => (
                    self.next,
                    c.token_due().map_or(far, |due| due.max(self.token_hold)),
                ),
                None => (far, far),
            };
            let wake = refresh_at.min(token_at);
            tokio::select! {
                () = tokio::time::sleep_until(wake.into()) => {
                    if Instant::now() >= refresh_at {
                        let _ = self.cycle(&broker, None).await;
                    } else if let Some(c) = &mut self.client
                        && let Err(e) = c.maintain_token().await
                    {
                        tracing::warn!(error = %e, "token renewal failed; serving the last good values");
                        broker.note_source(SOURCE, Err(e.to_string()));
                        // Retry with the refresh back-off (`failed` also holds the token timer
                        // until then) rather than spinning on the token.
                        self.failed();
                    }
                }
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(Command::Refresh { only, reply }) => {
                        let r = self.cycle(&broker, only.as_ref()).await;
                        let _ = reply.send(r);
                    }
                    Some(Command::Reconfigure) => self.reconfigure(&broker).await,
                },
            }
        }
    }

    async fn reconfigure(&mut self, broker: &Broker) {
        let new = broker.config().openbao.clone();
        if new.as_ref() == self.client.as_ref().map(Client::config) {
            return;
        }
        match new {
            None => {
                tracing::info!("[sources.openbao] removed by reload: dropping its secrets");
                self.client = None;
                for name in broker.store.names_of(Origin::OpenBao) {
                    broker.store.delete(&name);
                }
            }
            Some(cfg) => match Client::new(cfg) {
                Ok(c) => {
                    tracing::info!("[sources.openbao] changed by reload: fetching again");
                    self.client = Some(c);
                    let _ = self.cycle(broker, None).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "[sources.openbao] changed by reload but cannot be used; keeping the previous one");
                    broker.note_source(SOURCE, Err(e.to_string()));
                }
            },
        }
    }

    /// One refresh: read, store what was read (a changed value replaces and zeroizes the old
    /// one), drop secrets no longer mapped, record the outcome for Status.
    async fn cycle(&mut self, broker: &Broker, only: Option<&SecretName>) -> Result<u64, String> {
        let Some(client) = &mut self.client else {
            return Ok(0);
        };
        if let Some(n) = only
            && !client.cfg.maps(n)
        {
            return Ok(0);
        }
        match client.fetch(only).await {
            Ok(fetched) => {
                let n = fetched.values.len() as u64;
                for (name, value) in fetched.values {
                    broker.store.put(name, value, Origin::OpenBao);
                }
                if only.is_none() {
                    for name in broker.store.names_of(Origin::OpenBao) {
                        if !client.cfg.maps(&name) {
                            broker.store.delete(&name);
                        }
                    }
                }
                if fetched.failures.is_empty() {
                    broker.note_source(SOURCE, Ok(()));
                    if only.is_none() {
                        self.succeeded();
                    }
                    Ok(n)
                } else {
                    for e in &fetched.failures {
                        tracing::warn!(error = %e, "secret not refreshed; serving its last good value");
                    }
                    let msg = summarize(&fetched.failures);
                    broker.note_source(SOURCE, Err(msg.clone()));
                    if only.is_none() {
                        self.failed();
                    }
                    Err(msg)
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "OpenBao refresh failed; serving the last good values");
                broker.note_source(SOURCE, Err(e.to_string()));
                self.failed();
                Err(e.to_string())
            }
        }
    }
}

fn summarize(failures: &[OpenBaoError]) -> String {
    let mut msg = failures
        .iter()
        .take(3)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if failures.len() > 3 {
        msg.push_str(&format!(" (and {} more)", failures.len() - 3));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_errors_never_quote_the_response() {
        let body = br#"{"data":{"data":"s3cr3t-connection-string"}}"#;
        let e = decode::<KvBody>("read secret/apps/orders", body)
            .err()
            .expect("must fail")
            .to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
        assert!(
            e.starts_with(
                "read secret/apps/orders: unexpected response: malformed JSON (Data error"
            ),
            "{e}"
        );
        let body = br#"{"auth":{"client_token":12345678901234}}"#;
        let e = decode::<AuthBody>("login", body)
            .err()
            .expect("must fail")
            .to_string();
        assert!(!e.contains("12345678901234"), "{e}");
    }

    #[test]
    fn paths_are_percent_encoded_per_segment() {
        assert_eq!(encode_path("apps/orders"), "apps/orders");
        assert_eq!(encode_path("a b/ü?x"), "a%20b/%C3%BC%3Fx");
    }

    #[test]
    fn backoff_doubles_up_to_the_refresh_interval() {
        let mut w = Worker::new(None, true);
        let mut seen = Vec::new();
        for _ in 0..14 {
            w.failed();
            seen.push((w.next - Instant::now()).as_secs_f64().round() as u64);
        }
        // No client: the interval is an hour, so the cap is MAX_BACKOFF.
        assert_eq!(
            seen,
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300, 300, 300]
        );
        assert_eq!(
            w.token_hold, w.next,
            "a failure also holds token maintenance"
        );
        w.succeeded();
        assert_eq!(w.failures, 0);
    }
}
