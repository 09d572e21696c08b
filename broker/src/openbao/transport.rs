//! HTTPS transport to one OpenBao node: rustls (ring provider) trusting only `ca_file`, HTTP/1.1
//! by hyper, one connection per use.
//!
//! What it trusts: only the CA certificates of `ca_file`; the server's certificate must chain to
//! one of them and name the host of the node's address (no system trust store; verification
//! cannot be turned off).
//!
//! What it guarantees: a [`Conn`] is opened for one refresh cycle (or one token upkeep) and
//! closed by [`Conn::close`], which waits for hyper's connection task to end, so no TLS record
//! buffer or HTTP read buffer outlives the cycle (the clearing allocator wipes each on free).
//! Every step (connect, handshake, one exchange) is bounded by [`REQUEST_TIMEOUT`]. A token is
//! sent as a sensitive header value; nothing here logs.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode, header};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::OpenBaoError;
use crate::config::OpenBaoAddress;

/// Bound on each HTTP exchange (connect, handshake, one request): a hung server must not stall
/// refreshes forever.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body accepted.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// The client TLS configuration built from `ca_file`, shared by every node.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl Tls {
    /// Read `ca_file` now and trust exactly its certificates.
    pub fn from_ca_file(path: &std::path::Path) -> Result<Tls, OpenBaoError> {
        let ca_err = |reason: String| OpenBaoError::Ca {
            path: path.display().to_string(),
            reason,
        };
        // Opened and judged on the descriptor (contract §7), then parsed from memory.
        let pem = crate::config::read_ca_file(path).map_err(ca_err)?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ca_err(e.to_string()))?;
        Tls::from_certificates(certs).map_err(ca_err)
    }

    pub fn from_certificates(certs: Vec<CertificateDer<'static>>) -> Result<Tls, String> {
        if certs.is_empty() {
            return Err("no PEM certificate in it".to_owned());
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs {
            roots.add(cert).map_err(|e| e.to_string())?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Tls {
            connector: TlsConnector::from(Arc::new(tls)),
        })
    }
}

/// One node: where to connect and the name its certificate must carry. Cheap to clone into the
/// tasks of a parallel read.
#[derive(Clone)]
pub struct Endpoint {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    address: OpenBaoAddress,
    /// `Host:` header value.
    authority: String,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("address", &self.address.url)
            .finish_non_exhaustive()
    }
}

/// One HTTP/1.1 connection over TLS, used for one cycle and then closed.
pub struct Conn {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
    address: String,
    authority: String,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    pub fn new(tls: &Tls, address: OpenBaoAddress) -> Result<Endpoint, OpenBaoError> {
        let server_name =
            ServerName::try_from(address.host.clone()).map_err(|_| OpenBaoError::ServerName {
                address: address.url.clone(),
                host: address.host.clone(),
            })?;
        let authority = if address.host.contains(':') {
            format!("[{}]:{}", address.host, address.port)
        } else {
            format!("{}:{}", address.host, address.port)
        };
        Ok(Endpoint {
            connector: tls.connector.clone(),
            server_name,
            address,
            authority,
        })
    }

    /// The node's address as configured.
    pub fn url(&self) -> &str {
        &self.address.url
    }

    /// TCP connect, TLS handshake, HTTP/1.1 handshake: each bounded by [`REQUEST_TIMEOUT`].
    pub async fn connect(&self) -> Result<Conn, OpenBaoError> {
        let address = self.address.url.clone();
        let timeout = |what: &str| OpenBaoError::Timeout {
            address: address.clone(),
            what: what.to_owned(),
        };
        let tcp = tokio::time::timeout(
            REQUEST_TIMEOUT,
            TcpStream::connect((self.address.host.as_str(), self.address.port)),
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
        Ok(Conn {
            send,
            driver,
            address,
            authority: self.authority.clone(),
        })
    }
}

impl Conn {
    /// The address of the node this connection goes to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// One request; returns the status and the whole body (at most 4 MiB). `path` is the
    /// request target (`/v1/...`, already percent-encoded); `what` names the exchange in errors.
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<Vec<u8>>,
        what: &str,
    ) -> Result<(StatusCode, Bytes), OpenBaoError> {
        let address = self.address.clone();
        let http_err = |reason: String| OpenBaoError::Http {
            address: address.clone(),
            reason,
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.authority.as_str())
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
        let send = &mut self.send;
        let exchange = async {
            send.ready().await.map_err(|e| http_err(e.to_string()))?;
            let resp = send
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

    /// Close the connection and wait until its buffers are freed (and so wiped).
    pub async fn close(self) {
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
