//! `[sources.openbao]` (alias `[sources.vault]`): secrets read from an OpenBao or Vault KV v2
//! mount over HTTPS, kept fresh by a background task, from one node of a cluster at a time.
//!
//! One job per file, dependencies pointing down:
//! - [`scheduler`]: the [`Refresher`] loop — timing, back-off, publishing into the broker's
//!   [`crate::upstream::SecretSink`]; the only part that talks to the broker, and only through
//!   [`crate::upstream`].
//! - [`session`]: the authenticated [`Client`] — token upkeep, reading the mapped secrets, and
//!   failing over between nodes.
//! - [`nodes`]: the failover policy (which node, which failures move on); pure.
//! - [`leases`]: dynamic credentials (`[sources.openbao.dynamic.NAME]`) — renewal, rotation,
//!   revocation of leases, through the session's three lease calls.
//! - [`api`]: the Vault HTTP API calls (KV v2, AppRole, token, leases); stateless.
//! - [`transport`]: rustls + hyper connections to one node, one per cycle.
//!
//! What it guarantees:
//! - Start-up ([`initial_fetch`]) reads every mapped secret or fails with the cause (when the
//!   source is `required`, the default): never a silent blank. It succeeds when the first
//!   listed node is down and another can serve.
//! - Afterwards the [`Refresher`] re-reads every `refresh`, renews its token at two thirds of
//!   its TTL (logging in again when renewal is refused or the token is not renewable), and on
//!   errors backs off exponentially while the store keeps serving the last good values. Each
//!   cycle's outcome and the node in use are recorded for Status.
//! - Memory: no TLS record buffer, HTTP read buffer or JSON tree outlives the cycle that used
//!   it; the only long-lived copies are the store's `SecretBox`es and the token (`SecretString`).
//! - Values, tokens, secret ids and lease ids appear in no log line or error text.

pub mod api;
pub mod leases;
pub mod nodes;
pub mod scheduler;
pub mod session;
pub mod transport;

use std::io;

pub use scheduler::Refresher;
pub use session::{Client, Fetched};
pub use transport::REQUEST_TIMEOUT;

use crate::{config::OpenBaoSource, name::SecretName};

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
    /// A dynamic secret could not be read or built (its own message names the secret and path).
    #[error("{0}")]
    Dynamic(String),
    #[error("secret {name}: {mount}/{path} has no key {key:?}")]
    MissingKey {
        name: SecretName,
        mount: String,
        path: String,
        key: String,
    },
}

/// Everything mapped, and a first lease for every dynamic secret, before READY. With
/// `required`, any failure (no node reachable, certificate, login, a missing path or key, a
/// lease that cannot be read or whose data lacks a template key) is returned; without it, what
/// could be read is returned and the errors are logged (the refresher keeps retrying).
pub async fn initial_fetch(
    cfg: &OpenBaoSource,
) -> Result<(Client, Fetched, leases::Leases), OpenBaoError> {
    let mut client = Client::new(cfg.clone())?;
    let mut fetched = if cfg.secrets.is_empty() {
        Fetched::default()
    } else {
        match client.fetch(None).await {
            Ok(f) => f,
            Err(e) if !cfg.required => {
                tracing::error!(error = %e, "[sources.{}] first fetch failed (required = false: starting without its secrets)", cfg.section);
                Fetched {
                    values: Vec::new(),
                    failures: vec![e],
                }
            }
            Err(e) => return Err(e),
        }
    };
    if cfg.required && !fetched.failures.is_empty() {
        let mut failures = fetched.failures;
        return Err(failures.swap_remove(0));
    }
    let mut leases = leases::Leases::new(cfg.dynamic.clone());
    let got = leases.acquire_all(&mut client).await;
    if cfg.required
        && let Some(first) = got.errors.into_iter().next()
    {
        // Nothing will use the leases read so far: give them back.
        leases.revoke_all(&mut client).await;
        return Err(OpenBaoError::Dynamic(first));
    }
    fetched.values.extend(got.values);
    for e in &fetched.failures {
        tracing::error!(error = %e, "[sources.{}] secret not read at start-up", cfg.section);
    }
    Ok((client, fetched, leases))
}

#[cfg(test)]
mod testserver;
