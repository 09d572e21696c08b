//! The Vault HTTP API, as OpenBao serves it: one function per call, over a [`Conn`].
//!
//! KV v2 read, AppRole login, token renew-self and lookup-self, and the generic logical read
//! plus lease renew and revoke that dynamic credentials use. Each returns typed data or an
//! [`OpenBaoError`]; none of them retries, fails over or keeps state (that is [`super::session`]).
//!
//! What it guarantees: values, tokens, secret ids and lease ids appear in no error text — error
//! texts carry only the server's `errors` strings (e.g. "permission denied") and, for malformed
//! JSON, the error's kind and position (serde_json's own message may quote the input). Tokens
//! and lease ids come back as `SecretString`s; KV values stay in the JSON tree the caller turns
//! into `SecretBox`es.

use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use hyper::{Method, StatusCode};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{OpenBaoError, transport::Conn};

/// Kept as they are in a request path: RFC 3986 unreserved characters and the `/` between
/// segments (mounts and KV paths are validated to have no empty, `.` or `..` segment).
const PATH: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// Percent-encode a `/`-separated path.
pub fn encode_path(path: &str) -> String {
    utf8_percent_encode(path, PATH).to_string()
}

/// `/v1/<mount>/data/<path>`: where KV v2 keeps the latest version of a secret.
pub fn kv_url(mount: &str, path: &str) -> String {
    format!("/v1/{}/data/{}", encode_path(mount), encode_path(path))
}

/// A token as the server issued or described it.
#[derive(Debug)]
pub struct Auth {
    pub token: SecretString,
    pub renewable: bool,
    /// `None`: never expires (e.g. a root token).
    pub ttl: Option<Duration>,
}

/// What `lookup-self` says about a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenInfo {
    pub renewable: bool,
    pub ttl: Option<Duration>,
}

/// The answer to a KV v2 read.
#[derive(Debug)]
pub enum KvRead {
    /// The latest version's key/value map.
    Found(BTreeMap<String, serde_json::Value>),
    /// No such secret, or its latest version is deleted.
    NotFound,
}

/// A logical read that returned a lease (dynamic credentials). The lease id is held like a
/// secret; `data` holds credentials, so `Debug` shows only its keys.
pub struct Lease {
    pub lease_id: SecretString,
    pub duration: Duration,
    pub renewable: bool,
    pub data: BTreeMap<String, serde_json::Value>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("duration", &self.duration)
            .field("renewable", &self.renewable)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A lease renewal: the TTL granted from now (may be less than asked, near the max TTL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewed {
    pub duration: Duration,
    pub renewable: bool,
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

#[derive(Deserialize)]
struct LeaseBody {
    #[serde(default)]
    lease_id: String,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
    #[serde(default)]
    data: Option<BTreeMap<String, serde_json::Value>>,
}

/// The error for a non-success answer, with the server's `errors` strings (at most 300 bytes).
pub fn status_error(what: &str, status: StatusCode, body: &[u8]) -> OpenBaoError {
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

/// Parse a JSON response. serde_json's messages quote the offending input ("invalid type:
/// string \"…\""), which may be a value or a token, so only the error's kind and position are
/// kept.
pub fn decode<'a, T: Deserialize<'a>>(what: &str, body: &'a [u8]) -> Result<T, OpenBaoError> {
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

fn ttl(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

fn auth_of(what: &str, status: StatusCode, body: &[u8]) -> Result<Auth, OpenBaoError> {
    if !status.is_success() {
        return Err(status_error(what, status, body));
    }
    let a: AuthBody = decode(what, body)?;
    Ok(Auth {
        token: SecretString::from(a.auth.client_token),
        renewable: a.auth.renewable,
        ttl: ttl(a.auth.lease_duration),
    })
}

/// `POST auth/<mount>/login` with a role id and a secret id.
pub async fn approle_login(
    conn: &mut Conn,
    mount: &str,
    role_id: &str,
    secret_id: &SecretString,
) -> Result<Auth, OpenBaoError> {
    let what = format!("AppRole login at auth/{mount}");
    let body = serde_json::to_vec(&serde_json::json!({
        "role_id": role_id,
        "secret_id": secret_id.expose_secret(),
    }))
    .map_err(|e| OpenBaoError::Decode {
        what: what.clone(),
        reason: e.to_string(),
    })?;
    let path = format!("/v1/auth/{}/login", encode_path(mount));
    let (status, body) = conn
        .call(Method::POST, &path, None, Some(body), &what)
        .await?;
    auth_of(&what, status, &body)
}

/// `POST auth/token/renew-self`.
pub async fn renew_self(conn: &mut Conn, token: &SecretString) -> Result<Auth, OpenBaoError> {
    let what = "renewing the token";
    let (status, body) = conn
        .call(
            Method::POST,
            "/v1/auth/token/renew-self",
            Some(token),
            Some(b"{}".to_vec()),
            what,
        )
        .await?;
    auth_of(what, status, &body)
}

/// `GET auth/token/lookup-self`.
pub async fn lookup_self(
    conn: &mut Conn,
    token: &SecretString,
    what: &str,
) -> Result<TokenInfo, OpenBaoError> {
    let (status, body) = conn
        .call(
            Method::GET,
            "/v1/auth/token/lookup-self",
            Some(token),
            None,
            what,
        )
        .await?;
    if !status.is_success() {
        return Err(status_error(what, status, &body));
    }
    let info: LookupBody = decode(what, &body)?;
    Ok(TokenInfo {
        renewable: info.data.renewable,
        ttl: ttl(info.data.ttl),
    })
}

/// `GET <mount>/data/<path>`, the raw answer (the caller decides what a 403 means, and reads
/// many paths at once). Decode it with [`kv_answer`].
pub async fn kv_get(
    conn: &mut Conn,
    token: &SecretString,
    mount: &str,
    path: &str,
) -> Result<(StatusCode, Bytes), OpenBaoError> {
    let what = format!("reading {mount}/{path}");
    conn.call(Method::GET, &kv_url(mount, path), Some(token), None, &what)
        .await
}

/// Decode a KV v2 answer.
pub fn kv_answer(
    mount: &str,
    path: &str,
    status: StatusCode,
    body: &[u8],
) -> Result<KvRead, OpenBaoError> {
    let what = format!("reading {mount}/{path}");
    if status == StatusCode::NOT_FOUND {
        return Ok(KvRead::NotFound);
    }
    if !status.is_success() {
        return Err(status_error(&what, status, body));
    }
    let kv: KvBody = decode(&what, body)?;
    Ok(match kv.data.data {
        Some(map) => KvRead::Found(map),
        None => KvRead::NotFound,
    })
}

/// `GET /v1/<path>`: a logical read that returns a lease (`database/creds/<role>`, …).
pub async fn read_lease(
    conn: &mut Conn,
    token: &SecretString,
    path: &str,
) -> Result<Lease, OpenBaoError> {
    let what = format!("reading {path}");
    let (status, body) = conn
        .call(
            Method::GET,
            &format!("/v1/{}", encode_path(path)),
            Some(token),
            None,
            &what,
        )
        .await?;
    if !status.is_success() {
        return Err(status_error(&what, status, &body));
    }
    let l: LeaseBody = decode(&what, &body)?;
    if l.lease_id.is_empty() {
        return Err(OpenBaoError::Decode {
            what,
            reason: "the answer holds no lease".to_owned(),
        });
    }
    Ok(Lease {
        lease_id: SecretString::from(l.lease_id),
        duration: Duration::from_secs(l.lease_duration),
        renewable: l.renewable,
        data: l.data.unwrap_or_default(),
    })
}

/// `PUT sys/leases/renew` asking for `increment` more (the server may grant less).
pub async fn renew_lease(
    conn: &mut Conn,
    token: &SecretString,
    lease_id: &SecretString,
    increment: Duration,
) -> Result<Renewed, OpenBaoError> {
    let what = "renewing a lease";
    let body = serde_json::to_vec(&serde_json::json!({
        "lease_id": lease_id.expose_secret(),
        "increment": increment.as_secs(),
    }))
    .map_err(|e| OpenBaoError::Decode {
        what: what.to_owned(),
        reason: e.to_string(),
    })?;
    let (status, body) = conn
        .call(
            Method::PUT,
            "/v1/sys/leases/renew",
            Some(token),
            Some(body),
            what,
        )
        .await?;
    if !status.is_success() {
        return Err(status_error(what, status, &body));
    }
    let l: LeaseBody = decode(what, &body)?;
    Ok(Renewed {
        duration: Duration::from_secs(l.lease_duration),
        renewable: l.renewable,
    })
}

/// `PUT sys/leases/revoke`.
pub async fn revoke_lease(
    conn: &mut Conn,
    token: &SecretString,
    lease_id: &SecretString,
) -> Result<(), OpenBaoError> {
    let what = "revoking a lease";
    let body = serde_json::to_vec(&serde_json::json!({ "lease_id": lease_id.expose_secret() }))
        .map_err(|e| OpenBaoError::Decode {
            what: what.to_owned(),
            reason: e.to_string(),
        })?;
    let (status, body) = conn
        .call(
            Method::PUT,
            "/v1/sys/leases/revoke",
            Some(token),
            Some(body),
            what,
        )
        .await?;
    if !status.is_success() {
        return Err(status_error(what, status, &body));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openbao::{
        nodes::node_cannot_serve,
        testserver::{TestServer, address, client_tls},
        transport::Endpoint,
    };

    async fn conn_to(port: u16) -> Conn {
        Endpoint::new(&client_tls(), address(port))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    fn token(s: &str) -> SecretString {
        SecretString::from(s.to_owned())
    }

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
        assert_eq!(encode_path("a-b.c_d~e/%#"), "a-b.c_d~e/%25%23");
        assert_eq!(kv_url("kv v2", "apps/a b"), "/v1/kv%20v2/data/apps/a%20b");
    }

    #[tokio::test]
    async fn kv_read_sends_the_token_and_decodes_the_latest_version() {
        let srv = TestServer::start(|req| match req.path.as_str() {
            "/v1/secret/data/apps/or%20ders" => (
                200,
                r#"{"data":{"data":{"db":"postgres://x","port":5432},"metadata":{"version":3}}}"#
                    .into(),
            ),
            "/v1/secret/data/deleted" => (200, r#"{"data":{"data":null}}"#.into()),
            _ => (404, r#"{"errors":[]}"#.into()),
        })
        .await;
        let mut conn = conn_to(srv.port).await;
        let t = token("s.tok");
        let (status, body) = kv_get(&mut conn, &t, "secret", "apps/or ders")
            .await
            .unwrap();
        let KvRead::Found(map) = kv_answer("secret", "apps/or ders", status, &body).unwrap() else {
            panic!("not found")
        };
        assert_eq!(map["db"], "postgres://x");
        assert_eq!(map["port"], 5432);
        let (status, body) = kv_get(&mut conn, &t, "secret", "deleted").await.unwrap();
        assert!(matches!(
            kv_answer("secret", "deleted", status, &body).unwrap(),
            KvRead::NotFound
        ));
        let (status, body) = kv_get(&mut conn, &t, "secret", "nope").await.unwrap();
        assert!(matches!(
            kv_answer("secret", "nope", status, &body).unwrap(),
            KvRead::NotFound
        ));
        conn.close().await;
        let seen = srv.requests();
        assert_eq!(seen.len(), 3, "one connection, three requests");
        assert_eq!(seen[0].method, "GET");
        assert_eq!(seen[0].header("x-vault-token"), Some("s.tok"));
        assert_eq!(
            seen[0].header("host"),
            Some(format!("127.0.0.1:{}", srv.port).as_str())
        );
    }

    #[tokio::test]
    async fn errors_carry_the_server_errors_but_no_value() {
        let srv = TestServer::start(|req| match req.path.as_str() {
            "/v1/secret/data/denied" => (403, r#"{"errors":["permission denied"]}"#.into()),
            "/v1/secret/data/sealed" => (503, r#"{"errors":["Vault is sealed"]}"#.into()),
            _ => (200, r#"{"data":{"data":"s3cr3t"}}"#.into()),
        })
        .await;
        let mut conn = conn_to(srv.port).await;
        let t = token("s.tok");
        let (s, b) = kv_get(&mut conn, &t, "secret", "denied").await.unwrap();
        let e = kv_answer("secret", "denied", s, &b).unwrap_err();
        assert_eq!(
            e.to_string(),
            "reading secret/denied: HTTP 403: permission denied"
        );
        assert!(!node_cannot_serve(&e));
        let (s, b) = kv_get(&mut conn, &t, "secret", "sealed").await.unwrap();
        let e = kv_answer("secret", "sealed", s, &b).unwrap_err();
        assert_eq!(
            e.to_string(),
            "reading secret/sealed: HTTP 503: Vault is sealed"
        );
        assert!(node_cannot_serve(&e));
        let (s, b) = kv_get(&mut conn, &t, "secret", "odd").await.unwrap();
        let e = kv_answer("secret", "odd", s, &b).unwrap_err().to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
        conn.close().await;
    }

    #[tokio::test]
    async fn approle_login_renew_and_lookup() {
        let srv = TestServer::start(|req| match (req.method.as_str(), req.path.as_str()) {
            ("POST", "/v1/auth/app%20role/login") => (
                200,
                r#"{"auth":{"client_token":"s.new","lease_duration":60,"renewable":true}}"#.into(),
            ),
            ("POST", "/v1/auth/token/renew-self") => (
                200,
                r#"{"auth":{"client_token":"s.new","lease_duration":30,"renewable":true}}"#.into(),
            ),
            ("GET", "/v1/auth/token/lookup-self") => {
                (200, r#"{"data":{"ttl":0,"renewable":false}}"#.into())
            }
            _ => (400, "{}".into()),
        })
        .await;
        let mut conn = conn_to(srv.port).await;
        let a = approle_login(&mut conn, "app role", "role-1", &token("sid-1"))
            .await
            .unwrap();
        assert_eq!(a.token.expose_secret(), "s.new");
        assert_eq!((a.renewable, a.ttl), (true, Some(Duration::from_secs(60))));
        let r = renew_self(&mut conn, &a.token).await.unwrap();
        assert_eq!(r.ttl, Some(Duration::from_secs(30)));
        let info = lookup_self(&mut conn, &token("root"), "lookup")
            .await
            .unwrap();
        assert_eq!(
            info,
            TokenInfo {
                renewable: false,
                ttl: None
            }
        );
        conn.close().await;
        let seen = srv.requests();
        let login: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
        assert_eq!(
            login,
            serde_json::json!({"role_id": "role-1", "secret_id": "sid-1"})
        );
        assert_eq!(
            seen[0].header("x-vault-token"),
            None,
            "login sends no token"
        );
        assert_eq!(seen[1].header("x-vault-token"), Some("s.new"));
        assert_eq!(seen[2].header("x-vault-token"), Some("root"));
    }

    #[tokio::test]
    async fn leases_read_renew_revoke() {
        let srv = TestServer::start(|req| match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/v1/database/creds/orders") => (
                200,
                r#"{"lease_id":"database/creds/orders/AbC","lease_duration":3600,"renewable":true,"data":{"username":"v-1","password":"pw"}}"#.into(),
            ),
            ("GET", "/v1/secret/data/static") => (200, r#"{"data":{"data":{}}}"#.into()),
            ("PUT", "/v1/sys/leases/renew") => (
                200,
                r#"{"lease_id":"database/creds/orders/AbC","lease_duration":1200,"renewable":true}"#.into(),
            ),
            ("PUT", "/v1/sys/leases/revoke") => (204, String::new()),
            _ => (400, r#"{"errors":["lease not found"]}"#.into()),
        })
        .await;
        let mut conn = conn_to(srv.port).await;
        let t = token("s.tok");
        let lease = read_lease(&mut conn, &t, "database/creds/orders")
            .await
            .unwrap();
        assert_eq!(lease.lease_id.expose_secret(), "database/creds/orders/AbC");
        assert_eq!(
            (lease.duration, lease.renewable),
            (Duration::from_secs(3600), true)
        );
        assert_eq!(lease.data["username"], "v-1");
        assert!(
            !format!("{lease:?}").contains("AbC"),
            "Debug hides the lease id"
        );
        let e = read_lease(&mut conn, &t, "secret/data/static")
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "reading secret/data/static: unexpected response: the answer holds no lease"
        );
        let r = renew_lease(&mut conn, &t, &lease.lease_id, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(
            r,
            Renewed {
                duration: Duration::from_secs(1200),
                renewable: true
            }
        );
        revoke_lease(&mut conn, &t, &lease.lease_id).await.unwrap();
        conn.close().await;
        let seen = srv.requests();
        let renew: serde_json::Value = serde_json::from_slice(&seen[2].body).unwrap();
        assert_eq!(
            renew,
            serde_json::json!({"lease_id": "database/creds/orders/AbC", "increment": 3600})
        );
        let revoke: serde_json::Value = serde_json::from_slice(&seen[3].body).unwrap();
        assert_eq!(
            revoke,
            serde_json::json!({"lease_id": "database/creds/orders/AbC"})
        );
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_a_tls_failure() {
        let srv = TestServer::rogue(|_| (200, "{}".into())).await;
        let e = Endpoint::new(&client_tls(), address(srv.port))
            .unwrap()
            .connect()
            .await
            .unwrap_err();
        assert!(matches!(e, OpenBaoError::Tls { .. }), "{e}");
        assert!(e.to_string().contains("invalid peer certificate"), "{e}");
        assert!(node_cannot_serve(&e));
        assert!(srv.requests().is_empty(), "nothing was sent");
    }
}
