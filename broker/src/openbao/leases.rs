//! Dynamic credentials (`[sources.openbao.dynamic.NAME]`): secrets whose value is built from a
//! lease (OpenBao's database engine creates one PostgreSQL user per lease), renewed, rotated
//! before the lease's max TTL, and revoked.
//!
//! This file holds the lease bookkeeping and its timing only. It reaches OpenBao through the
//! three calls of [`LeaseApi`] (read, renew, revoke) and hands values back to its caller, which
//! publishes them: it knows neither the transport nor the broker.
//!
//! The life of one secret:
//! - **Acquire**: read `path`; the value is `template` with each `{{KEY}}` replaced by the
//!   lease's `data.KEY` (an unknown KEY is an error naming the secret, the path and the keys the
//!   lease has — names only).
//! - **Renew** at two thirds of the lease's TTL while it is renewable, asking each time for the
//!   TTL it was issued with plus `rotate_before`. When the server grants less than asked, the
//!   lease has reached its max TTL: its end is now known.
//! - **Rotate** (new credentials, published as a new version) `rotate_before` ahead of that
//!   known end — never earlier than a third of the way through the lease's life, so a
//!   `rotate_before` longer than the lease cannot fetch credentials in a loop — or at once when
//!   a renewal fails, or on `secretd refresh`. A failed rotation is retried with back-off
//!   (1 s doubling, at most 30 s) while the current value keeps being served.
//! - **Revoke** the previous lease `revoke_grace` after its rotation (a failed revocation is
//!   retried until the lease would have expired anyway), and every lease on shutdown when
//!   `revoke_on_shutdown`.
//!
//! What it guarantees: lease ids are [`SecretString`]s and values [`SecretBox`]es (zeroized on
//! drop), and neither appears in any log line, error text or [`Debug`] output; only secret
//! names, paths, TTLs and the server's error strings do. Leases live in memory only: a broker
//! that starts never reuses a lease (it cannot prove an old one is its own) and always reads
//! fresh credentials; a broker killed with SIGKILL leaves its leases to expire by their TTL.

use std::{
    collections::BTreeMap,
    future::Future,
    time::{Duration, Instant},
};

use secrecy::{SecretBox, SecretString};

use super::{
    OpenBaoError,
    api::{Lease, Renewed},
    session::{Client, LeaseAnswer, LeaseCall},
};
use crate::{
    config::{DynamicSecret, Part},
    name::SecretName,
    upstream::LeaseStatus,
};

/// Shortest wait between failed attempts on one secret.
const MIN_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between failed attempts on one secret.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The three OpenBao calls this module needs. Errors are the server's or the transport's, as
/// one line that never holds a lease id or a value.
pub trait LeaseApi {
    /// Read `path` (e.g. `database/creds/orders`): a new lease.
    fn read(&mut self, path: &str) -> impl Future<Output = Result<Lease, String>> + Send;
    /// Ask for `increment` more from now (the server may grant less).
    fn renew(
        &mut self,
        lease_id: &SecretString,
        increment: Duration,
    ) -> impl Future<Output = Result<Renewed, String>> + Send;
    fn revoke(
        &mut self,
        lease_id: &SecretString,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// The real thing: the session's lease calls, on the node in use.
impl LeaseApi for Client {
    async fn read(&mut self, path: &str) -> Result<Lease, String> {
        match self.lease_call(LeaseCall::Read { path }).await {
            Ok(LeaseAnswer::Read(l)) => Ok(l),
            Ok(_) => Err(unexpected()),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn renew(
        &mut self,
        lease_id: &SecretString,
        increment: Duration,
    ) -> Result<Renewed, String> {
        match self
            .lease_call(LeaseCall::Renew {
                lease_id,
                increment,
            })
            .await
        {
            Ok(LeaseAnswer::Renewed(r)) => Ok(r),
            Ok(_) => Err(unexpected()),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn revoke(&mut self, lease_id: &SecretString) -> Result<(), String> {
        match self.lease_call(LeaseCall::Revoke { lease_id }).await {
            Ok(LeaseAnswer::Revoked) => Ok(()),
            Ok(_) => Err(unexpected()),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn unexpected() -> String {
    "the lease call got an answer of another kind".to_owned()
}

impl From<DynamicError> for OpenBaoError {
    fn from(e: DynamicError) -> OpenBaoError {
        OpenBaoError::Dynamic(e.to_string())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DynamicError {
    #[error("dynamic secret {name}: reading {path} failed: {reason}")]
    Read {
        name: SecretName,
        path: String,
        reason: String,
    },
    #[error(
        "dynamic secret {name}: `template` uses {{{{{key}}}}} but the lease from {path} has no data key {key:?} (it has: {has})"
    )]
    UnknownKey {
        name: SecretName,
        path: String,
        key: String,
        has: String,
    },
    #[error(
        "dynamic secret {name}: data key {key:?} of the lease from {path} is not a string or a number"
    )]
    NotText {
        name: SecretName,
        path: String,
        key: String,
    },
    #[error("dynamic secret {name} is not configured")]
    Unknown { name: SecretName },
}

/// `template` filled from `data`. The value is assembled in a buffer sized up front, so no
/// reallocation leaves a partial copy behind.
pub fn render(
    d: &DynamicSecret,
    data: &BTreeMap<String, serde_json::Value>,
) -> Result<SecretBox<[u8]>, DynamicError> {
    let mut pieces: Vec<&[u8]> = Vec::with_capacity(d.template.parts.len());
    let mut numbers: Vec<String> = Vec::new();
    // Numbers are formatted first so `pieces` can borrow them.
    for part in &d.template.parts {
        if let Part::Key(k) = part
            && let Some(serde_json::Value::Number(n)) = data.get(k)
        {
            numbers.push(n.to_string());
        }
    }
    let mut next_number = numbers.iter();
    for part in &d.template.parts {
        match part {
            Part::Text(t) => pieces.push(t.as_bytes()),
            Part::Key(k) => match data.get(k) {
                Some(serde_json::Value::String(s)) => pieces.push(s.as_bytes()),
                Some(serde_json::Value::Number(_)) => {
                    pieces.push(next_number.next().map_or(&[][..], |s| s.as_bytes()));
                }
                Some(_) => {
                    return Err(DynamicError::NotText {
                        name: d.name.clone(),
                        path: d.path.clone(),
                        key: k.clone(),
                    });
                }
                None => {
                    return Err(DynamicError::UnknownKey {
                        name: d.name.clone(),
                        path: d.path.clone(),
                        key: k.clone(),
                        has: data
                            .keys()
                            .map(String::as_str)
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
            },
        }
    }
    let mut value = Vec::with_capacity(pieces.iter().map(|p| p.len()).sum());
    for p in pieces {
        value.extend_from_slice(p);
    }
    Ok(crate::store::secret(value))
}

/// What to do next with a held lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Renew,
    Rotate,
}

/// The lease currently behind a secret's value.
struct Held {
    lease_id: SecretString,
    /// When it was read (the start of its life).
    issued: Instant,
    /// The TTL it was issued with (each renewal asks for this plus `rotate_before`).
    issued_ttl: Duration,
    renewable: bool,
    expires: Instant,
    /// The lease's last moment is known: it is not renewable, or a renewal was capped.
    at_max: bool,
    next: (Instant, Step),
    /// Consecutive failures (for the back-off).
    failures: u32,
}

/// When to act on a lease, from the facts the server gave (pure; unit-tested).
pub fn plan(
    issued: Instant,
    last: Instant,
    expires: Instant,
    renewable: bool,
    at_max: bool,
    rotate_before: Duration,
) -> (Instant, Step) {
    if renewable && !at_max {
        (
            last + expires.saturating_duration_since(last) * 2 / 3,
            Step::Renew,
        )
    } else {
        let life = expires.saturating_duration_since(issued);
        let floor = issued + life / 3;
        let wanted = expires.checked_sub(rotate_before).unwrap_or(issued);
        (wanted.max(floor), Step::Rotate)
    }
}

/// A lease replaced by a rotation, to be revoked when its grace ends.
struct Retiring {
    name: SecretName,
    lease_id: SecretString,
    revoke_at: Instant,
    expires: Instant,
    revoke_on_shutdown: bool,
    failures: u32,
}

/// What a pass over the leases produced, for the caller to publish and log.
#[derive(Debug, Default)]
pub struct Outcome {
    /// New values (a new version each).
    pub values: Vec<(SecretName, SecretBox<[u8]>)>,
    pub errors: Vec<String>,
}

/// Every dynamic secret of one configuration and the leases behind them.
#[derive(Default)]
pub struct Leases {
    secrets: Vec<DynamicSecret>,
    held: BTreeMap<SecretName, Held>,
    /// Secrets without a lease (the first read failed), with the time of the next attempt.
    missing: BTreeMap<SecretName, (Instant, u32)>,
    retiring: Vec<Retiring>,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases")
            .field(
                "secrets",
                &self.secrets.iter().map(|d| &d.name).collect::<Vec<_>>(),
            )
            .field("held", &self.held.len())
            .field("retiring", &self.retiring.len())
            .finish()
    }
}

fn backoff(failures: u32) -> Duration {
    MIN_RETRY
        .saturating_mul(1u32 << failures.min(16))
        .min(MAX_RETRY)
}

impl Leases {
    pub fn new(secrets: Vec<DynamicSecret>) -> Leases {
        Leases {
            secrets,
            ..Leases::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    pub fn provides(&self, name: &SecretName) -> bool {
        self.secrets.iter().any(|d| &d.name == name)
    }

    fn config(&self, name: &SecretName) -> Option<&DynamicSecret> {
        self.secrets.iter().find(|d| &d.name == name)
    }

    /// Read every secret's first lease (start-up). Errors name the secret and the path; a
    /// secret whose read failed is retried by [`Leases::tick`].
    pub async fn acquire_all(&mut self, api: &mut impl LeaseApi) -> Outcome {
        let mut out = Outcome::default();
        let names: Vec<SecretName> = self.secrets.iter().map(|d| d.name.clone()).collect();
        for name in names {
            self.rotate_one(api, &name, &mut out).await;
        }
        out
    }

    /// New credentials for `name` now (or for every dynamic secret): `secretd refresh`.
    pub async fn rotate_now(
        &mut self,
        api: &mut impl LeaseApi,
        only: Option<&SecretName>,
    ) -> Result<Outcome, DynamicError> {
        let names: Vec<SecretName> = match only {
            Some(n) if !self.provides(n) => {
                return Err(DynamicError::Unknown { name: n.clone() });
            }
            Some(n) => vec![n.clone()],
            None => self.secrets.iter().map(|d| d.name.clone()).collect(),
        };
        let mut out = Outcome::default();
        for name in names {
            self.rotate_one(api, &name, &mut out).await;
        }
        Ok(out)
    }

    /// Read a new lease for `name`, publish its value and retire the previous lease.
    async fn rotate_one(&mut self, api: &mut impl LeaseApi, name: &SecretName, out: &mut Outcome) {
        let Some(d) = self.config(name).cloned() else {
            return;
        };
        let result = match api.read(&d.path).await {
            Ok(lease) => match render(&d, &lease.data) {
                Ok(value) => Ok((lease, value)),
                Err(e) => {
                    // Credentials nobody will use: revoke them now rather than leave a user
                    // behind until its TTL.
                    if let Err(reason) = api.revoke(&lease.lease_id).await {
                        tracing::warn!(secret = %d.name, error = %reason, "dynamic secret: revoking an unusable lease failed; it expires by its TTL");
                    }
                    Err(e)
                }
            },
            Err(reason) => Err(DynamicError::Read {
                name: d.name.clone(),
                path: d.path.clone(),
                reason,
            }),
        };
        let now = Instant::now();
        match result {
            Ok((lease, value)) => {
                let expires = now + lease.duration;
                let at_max = !lease.renewable;
                let held = Held {
                    next: plan(now, now, expires, lease.renewable, at_max, d.rotate_before),
                    lease_id: lease.lease_id,
                    issued: now,
                    issued_ttl: lease.duration,
                    renewable: lease.renewable,
                    expires,
                    at_max,
                    failures: 0,
                };
                self.missing.remove(name);
                if let Some(old) = self.held.insert(name.clone(), held) {
                    self.retiring.push(Retiring {
                        name: name.clone(),
                        lease_id: old.lease_id,
                        revoke_at: now + d.revoke_grace,
                        expires: old.expires,
                        revoke_on_shutdown: d.revoke_on_shutdown,
                        failures: 0,
                    });
                }
                tracing::info!(secret = %name, path = %d.path, ttl = ?lease.duration, renewable = lease.renewable, "dynamic secret: new credentials");
                out.values.push((name.clone(), value));
                // `lease.data` (the credentials as JSON) is dropped here.
            }
            Err(e) => {
                tracing::warn!(error = %e, "dynamic secret: new credentials not read");
                out.errors.push(e.to_string());
                match self.held.get_mut(name) {
                    Some(h) => {
                        h.failures += 1;
                        h.next = (now + backoff(h.failures), Step::Rotate);
                    }
                    None => {
                        let failures = self.missing.get(name).map_or(0, |m| m.1) + 1;
                        self.missing
                            .insert(name.clone(), (now + backoff(failures), failures));
                    }
                }
            }
        }
    }

    /// The next moment [`Leases::tick`] has work.
    pub fn next_due(&self) -> Option<Instant> {
        let held = self.held.values().map(|h| h.next.0);
        let missing = self.missing.values().map(|m| m.0);
        let retiring = self.retiring.iter().map(|r| r.revoke_at);
        held.chain(missing).chain(retiring).min()
    }

    /// Do whatever is due: renewals, rotations, retries, revocations.
    pub async fn tick(&mut self, api: &mut impl LeaseApi) -> Outcome {
        let mut out = Outcome::default();
        let now = Instant::now();
        let due_missing: Vec<SecretName> = self
            .missing
            .iter()
            .filter(|(_, m)| m.0 <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in due_missing {
            self.rotate_one(api, &name, &mut out).await;
        }
        let due: Vec<(SecretName, Step)> = self
            .held
            .iter()
            .filter(|(_, h)| h.next.0 <= now)
            .map(|(n, h)| (n.clone(), h.next.1))
            .collect();
        for (name, step) in due {
            match step {
                Step::Rotate => self.rotate_one(api, &name, &mut out).await,
                Step::Renew => {
                    if !self.renew_one(api, &name).await {
                        // Renewal failed: new credentials now.
                        self.rotate_one(api, &name, &mut out).await;
                    }
                }
            }
        }
        self.revoke_due(api, false).await;
        out
    }

    /// Renew `name`'s lease; false when that failed (the caller rotates).
    async fn renew_one(&mut self, api: &mut impl LeaseApi, name: &SecretName) -> bool {
        let Some(rotate_before) = self.config(name).map(|d| d.rotate_before) else {
            return true;
        };
        let Some(h) = self.held.get_mut(name) else {
            return true;
        };
        let asked = h.issued_ttl + rotate_before;
        let now = Instant::now();
        match api.renew(&h.lease_id, asked).await {
            Ok(r) => {
                h.expires = now + r.duration;
                h.renewable = r.renewable;
                h.at_max = !r.renewable || r.duration < asked;
                h.next = plan(
                    h.issued,
                    now,
                    h.expires,
                    h.renewable,
                    h.at_max,
                    rotate_before,
                );
                h.failures = 0;
                tracing::debug!(secret = %name, ttl = ?r.duration, at_max = h.at_max, "dynamic secret: lease renewed");
                true
            }
            Err(reason) => {
                tracing::warn!(secret = %name, error = %reason, "dynamic secret: lease renewal failed; fetching new credentials");
                false
            }
        }
    }

    /// Revoke retired leases whose grace is over (all of them when `shutdown`, those of
    /// secrets with `revoke_on_shutdown`). Failures are retried until the lease expires.
    async fn revoke_due(&mut self, api: &mut impl LeaseApi, shutdown: bool) -> usize {
        let now = Instant::now();
        let mut revoked = 0;
        let mut keep = Vec::new();
        for mut r in std::mem::take(&mut self.retiring) {
            let due = if shutdown {
                r.revoke_on_shutdown
            } else {
                r.revoke_at <= now
            };
            if !due {
                keep.push(r);
                continue;
            }
            match api.revoke(&r.lease_id).await {
                Ok(()) => {
                    revoked += 1;
                    tracing::info!(secret = %r.name, "dynamic secret: lease revoked");
                }
                Err(reason) if !shutdown && r.expires > now => {
                    r.failures += 1;
                    r.revoke_at = now + backoff(r.failures);
                    tracing::warn!(secret = %r.name, error = %reason, "dynamic secret: revoking the previous lease failed; will retry");
                    keep.push(r);
                }
                Err(reason) => {
                    tracing::warn!(secret = %r.name, error = %reason, "dynamic secret: revoking a lease failed; it expires by its TTL");
                }
            }
        }
        self.retiring = keep;
        revoked
    }

    /// Shutdown: revoke every lease held for a secret with `revoke_on_shutdown` (current and
    /// retired). Returns how many were revoked.
    pub async fn revoke_all(&mut self, api: &mut impl LeaseApi) -> usize {
        for (name, h) in std::mem::take(&mut self.held) {
            let on_shutdown = self.config(&name).is_none_or(|d| d.revoke_on_shutdown);
            self.retiring.push(Retiring {
                name,
                lease_id: h.lease_id,
                revoke_at: Instant::now(),
                expires: h.expires,
                revoke_on_shutdown: on_shutdown,
                failures: 0,
            });
        }
        self.revoke_due(api, true).await
    }

    /// A reload: secrets removed or changed (path, template) lose their lease (retired with
    /// their grace) and changed or new ones get new credentials at the next tick.
    pub fn reconfigure(&mut self, secrets: Vec<DynamicSecret>) {
        let now = Instant::now();
        for old in &self.secrets {
            let same = secrets.iter().find(|d| d.name == old.name);
            let keep = same.is_some_and(|d| d.path == old.path && d.template == old.template);
            if keep {
                continue;
            }
            if let Some(h) = self.held.remove(&old.name) {
                self.retiring.push(Retiring {
                    name: old.name.clone(),
                    lease_id: h.lease_id,
                    revoke_at: now + old.revoke_grace,
                    expires: h.expires,
                    revoke_on_shutdown: old.revoke_on_shutdown,
                    failures: 0,
                });
            }
            self.missing.remove(&old.name);
        }
        for d in &secrets {
            if !self.held.contains_key(&d.name) {
                self.missing.insert(d.name.clone(), (now, 0));
            }
        }
        self.secrets = secrets;
    }

    /// Path and time left for each secret, for Status.
    pub fn status(&self) -> Vec<LeaseStatus> {
        self.secrets
            .iter()
            .map(|d| LeaseStatus {
                name: d.name.clone(),
                path: d.path.clone(),
                expires: self.held.get(&d.name).map(|h| h.expires),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Template;

    fn secret(template: &str) -> DynamicSecret {
        DynamicSecret {
            name: SecretName::parse("ORDERS_DB").unwrap(),
            path: "database/creds/orders".into(),
            template: Template::parse(template).unwrap(),
            rotate_before: Duration::from_secs(300),
            revoke_grace: Duration::from_secs(60),
            revoke_on_shutdown: true,
        }
    }

    fn data(pairs: &[(&str, serde_json::Value)]) -> BTreeMap<String, serde_json::Value> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn the_value_is_the_template_filled_from_the_lease_data() {
        use secrecy::ExposeSecret;
        let d = secret("postgresql://{{username}}:{{password}}@db:{{port}}/orders");
        let v = render(
            &d,
            &data(&[
                ("username", "v-orders-1".into()),
                ("password", "p@ss".into()),
                ("port", 5432.into()),
            ]),
        )
        .unwrap();
        assert_eq!(
            v.expose_secret(),
            b"postgresql://v-orders-1:p@ss@db:5432/orders"
        );
    }

    #[test]
    fn an_unknown_key_names_the_secret_the_path_and_the_keys_but_no_value() {
        let d = secret("postgresql://{{user}}:{{password}}@db/orders");
        let e = render(
            &d,
            &data(&[
                ("username", "v-orders-1".into()),
                ("password", "hunter2".into()),
            ]),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "dynamic secret ORDERS_DB: `template` uses {{user}} but the lease from database/creds/orders has no data key \"user\" (it has: password, username)"
        );
        let e = render(
            &d,
            &data(&[
                ("user", serde_json::json!({"a": 1})),
                ("password", "x".into()),
            ]),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "dynamic secret ORDERS_DB: data key \"user\" of the lease from database/creds/orders is not a string or a number"
        );
    }

    #[test]
    fn a_lease_debugs_without_its_id_or_credentials() {
        let lease = Lease {
            lease_id: SecretString::from("database/creds/orders/LEASEIDLEASEID"),
            duration: Duration::from_secs(60),
            renewable: true,
            data: data(&[
                ("username", "v-user-1".into()),
                ("password", "hunter2".into()),
            ]),
        };
        let text = format!("{lease:?}");
        assert!(text.contains("\"password\""), "{text}");
        for secret in ["LEASEIDLEASEID", "hunter2", "v-user-1"] {
            assert!(!text.contains(secret), "{text}");
        }
        let leases = Leases::new(vec![secret("{{username}}")]);
        assert!(
            !format!("{leases:?}").contains("database/creds"),
            "names and counts only"
        );
    }

    #[test]
    fn renewable_leases_are_renewed_at_two_thirds_of_their_ttl() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(
            plan(t0, t0, t0 + s(3600), true, false, s(300)),
            (t0 + s(2400), Step::Renew)
        );
        // After a renewal at t0+2400 that granted another hour.
        let r = t0 + s(2400);
        assert_eq!(
            plan(t0, r, r + s(3600), true, false, s(300)),
            (r + s(2400), Step::Renew)
        );
    }

    #[test]
    fn at_the_max_ttl_the_rotation_comes_rotate_before_the_end_but_not_before_a_third_of_the_life()
    {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // Capped renewal: the lease ends at t0+3h; rotate 5 min before.
        assert_eq!(
            plan(t0, t0 + s(9000), t0 + s(10800), true, true, s(300)),
            (t0 + s(10500), Step::Rotate)
        );
        // Not renewable, 1 h: same rule.
        assert_eq!(
            plan(t0, t0, t0 + s(3600), false, true, s(300)),
            (t0 + s(3300), Step::Rotate)
        );
        // rotate_before longer than the lease: a third of its life, never a loop at once.
        assert_eq!(
            plan(t0, t0, t0 + s(60), false, true, s(300)),
            (t0 + s(20), Step::Rotate)
        );
    }

    #[test]
    fn back_off_doubles_up_to_thirty_seconds() {
        let got: Vec<u64> = (1..8).map(|f| backoff(f).as_secs()).collect();
        assert_eq!(got, [2, 4, 8, 16, 30, 30, 30]);
    }
}
