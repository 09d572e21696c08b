//! gRPC handlers: thin. Each one attests the caller (`state::Broker::attest`), asks `policy`,
//! reads `store`, writes one audit record, and maps the outcome to a status.
//!
//! Statuses say little (a fixed message per outcome, identical whether or not an out-of-scope
//! secret exists); the audit record and the `tracing` event carry the rest — never a value.

use std::{pin::Pin, sync::Arc, time::SystemTime};

use secretd_proto::v1::{self as pb, admin_server::Admin, secrets_server::Secrets};
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use crate::{
    audit::{self, AuditRecord, Outcome, Refusal, Reservation},
    name::SecretName,
    peer::{Peer, PeerInfo},
    policy::{Caller, Decision, evaluate},
    registry::valid_function_name,
    scan,
    state::{Attested, Broker, Unverified},
    store::{Event, Origin},
};

/// The one message a caller gets for an out-of-scope name, whether or not it exists.
pub const DENIED: &str = "permission denied: no scope of this caller covers the requested secret";
pub const NOT_FOUND: &str = "secret not found";
pub const ADMIN_DENIED: &str =
    "permission denied: admin calls need a uid listed in server.admin_uids";

/// A call in progress: who, which rpc, and the audit record being filled in.
struct Call<'a> {
    broker: &'a Broker,
    record: AuditRecord,
    /// The record's place in the audit queue, for calls that change something.
    slot: Option<Reservation<'a>>,
    /// Answered whatever the audit log does (see [`Call::exempt`]).
    exempt: bool,
}

impl<'a> Call<'a> {
    /// Attest the peer of `req`. An unverifiable peer is denied (and audited) here.
    fn start<T>(
        broker: &'a Broker,
        rpc: &'static str,
        req: &Request<T>,
    ) -> Result<(Call<'a>, Attested), Status> {
        let peer = peer_of(req)?;
        match broker.attest(&peer) {
            Ok(att) => {
                let mut record = AuditRecord::new(rpc, &att.caller);
                record.scopes = att.grant.shared_names();
                Ok((
                    Call {
                        broker,
                        record,
                        slot: None,
                        exempt: false,
                    },
                    att,
                ))
            }
            Err(why) => {
                let mut record = AuditRecord::new(rpc, &bare_caller(&peer));
                record.decision = Outcome::Deny;
                record.reason = Some(why.to_string());
                if broker.audit.denials.note(peer.uid, Refusal::Unverified) {
                    tracing::warn!(conn = peer.conn, pid = peer.pid, uid = peer.uid, rpc, reason = %why, "call refused: caller not verified (further refusals of this uid are summarised every {})", humantime::format_duration(audit::SUMMARY_EVERY));
                } else {
                    tracing::debug!(conn = peer.conn, pid = peer.pid, uid = peer.uid, rpc, reason = %why, "call refused: caller not verified");
                }
                let status = Status::permission_denied(match why {
                    Unverified::Exited => why.to_string(),
                    Unverified::Failed(_) => {
                        "permission denied: caller identity could not be verified".to_owned()
                    }
                });
                Err(Call {
                    broker,
                    record,
                    slot: None,
                    exempt: false,
                }
                .refuse(status))
            }
        }
    }

    fn names(&mut self, names: &[SecretName]) -> &mut Self {
        self.record.names = names.iter().map(|n| n.to_string()).collect();
        self
    }

    /// For a call that changes something: hold its record's place in the audit queue before
    /// the change, so that a change is never made whose record cannot be kept. `Err`: the
    /// call is refused `UNAVAILABLE` (and recorded as such) without doing anything.
    fn reserve(mut self) -> Result<Self, Status> {
        match self.broker.audit.reserve() {
            Ok(slot) => {
                self.slot = Some(slot);
                Ok(self)
            }
            Err(audit::Unavailable) => {
                count(self.broker, false);
                self.broker.audit.refuse(self.record);
                Err(Status::unavailable(audit::UNAVAILABLE))
            }
        }
    }

    /// Record the call as allowed. Must come before the answer is released: `Err` (the
    /// record cannot be kept and `on_failure = "deny"`) is the status to answer instead.
    fn allow(mut self) -> Result<(), Status> {
        self.record.decision = Outcome::Allow;
        self.finish()
    }

    /// Answer this call whatever the audit log does: its record is kept if there is room,
    /// else counted as dropped. Only for `Status` and `Reload`, which hand out no secret and
    /// are how an operator sees and repairs a failing audit log (reload reopens it).
    fn exempt(mut self) -> Self {
        self.exempt = true;
        self
    }

    fn deny(mut self, reason: impl Into<String>, message: &str) -> Status {
        let reason = reason.into();
        let r = &self.record;
        // The audit log has every denial; the operator log the first per uid, then summaries.
        let function = r.function.as_deref().unwrap_or("-");
        let (names, scopes) = (r.names.join(","), r.scopes.join(","));
        if self.broker.audit.denials.note(r.uid, Refusal::Denied) {
            tracing::info!(
                pid = r.pid, uid = r.uid, function = %function, rpc = %r.rpc, names = %names,
                scopes = %scopes, reason = %reason,
                "denied (further denials of this uid are summarised every {})",
                humantime::format_duration(audit::SUMMARY_EVERY)
            );
        } else {
            tracing::debug!(
                pid = r.pid, uid = r.uid, function = %function, rpc = %r.rpc, names = %names,
                scopes = %scopes, reason = %reason, "denied"
            );
        }
        self.record.decision = Outcome::Deny;
        self.record.reason = Some(reason);
        self.refuse(Status::permission_denied(message))
    }

    fn not_found(mut self) -> Status {
        self.record.decision = Outcome::NotFound;
        self.refuse(Status::not_found(NOT_FOUND))
    }

    /// Malformed input: the message says what is wrong, never echoes what was sent.
    fn invalid(mut self, message: String) -> Status {
        self.record.decision = Outcome::Invalid;
        self.record.reason = Some(message.clone());
        self.record.names.clear();
        self.refuse(Status::invalid_argument(message))
    }

    fn failed(mut self, code: tonic::Code, message: String) -> Status {
        self.record.decision = Outcome::Invalid;
        self.record.reason = Some(message.clone());
        self.refuse(Status::new(code, message))
    }

    /// Finish a call answered with an error: `status`, or `UNAVAILABLE` if even the record of
    /// the refusal cannot be kept.
    fn refuse(self, status: Status) -> Status {
        self.finish().err().unwrap_or(status)
    }

    /// Offer the record to the audit log and count the call. `Err`: `UNAVAILABLE` "audit log
    /// unavailable" — the record cannot be kept and `[audit] on_failure = "deny"`.
    fn finish(self) -> Result<(), Status> {
        let Call {
            broker,
            record,
            slot,
            exempt,
        } = self;
        let allowed = matches!(record.decision, Outcome::Allow | Outcome::NotFound);
        if let Some(slot) = slot {
            slot.fill(record);
            count(broker, allowed);
            return Ok(());
        }
        if exempt {
            broker.audit.record_best_effort(record);
            count(broker, allowed);
            return Ok(());
        }
        match broker.audit.record(record) {
            Ok(()) => {
                count(broker, allowed);
                Ok(())
            }
            Err(audit::Unavailable) => {
                count(broker, false);
                Err(Status::unavailable(audit::UNAVAILABLE))
            }
        }
    }
}

fn count(broker: &Broker, allowed: bool) {
    let counter = if allowed {
        &broker.stats.allowed
    } else {
        &broker.stats.denied
    };
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

fn peer_of<T>(req: &Request<T>) -> Result<PeerInfo, Status> {
    req.extensions()
        .get::<PeerInfo>()
        .cloned()
        // Only reachable if the server were wired without PeerStream: refuse rather than guess.
        .ok_or_else(|| Status::permission_denied("permission denied: no peer credentials"))
}

/// The kernel facts of a peer that failed attestation, for the audit record.
fn bare_caller(peer: &Peer) -> Caller {
    Caller {
        pid: peer.pid,
        uid: peer.uid,
        gid: peer.gid,
        ..Caller::default()
    }
}

fn parse_name(name: &str) -> Result<SecretName, String> {
    SecretName::parse(name).map_err(|e| e.to_string())
}

fn secret_of(broker: &Broker, name: &SecretName) -> Option<pb::Secret> {
    broker.store.read(name, |value, version| pb::Secret {
        name: name.to_string(),
        // The only copy made for a response; freed (and cleared by the allocator) once encoded.
        value: value.to_vec(),
        version,
    })
}

/// Whether the opener of a watch may still see `name`: alive, attested and in scope under the
/// policy in force. What every value on a stream is checked against before it is read.
fn still_allowed(broker: &Broker, peer: &Peer, name: &SecretName) -> Result<(), Status> {
    match broker.attest(peer) {
        Err(why @ Unverified::Exited) => {
            tracing::info!(conn = peer.conn, pid = peer.pid, uid = peer.uid, name = %name, "watch ended: the process that opened it has exited");
            Err(Status::permission_denied(why.to_string()))
        }
        Err(Unverified::Failed(_)) => Err(Status::permission_denied(
            "permission denied: caller identity could not be verified",
        )),
        Ok(att) => match evaluate(&att.config.policy, &att.grant, name) {
            Decision::Allow { .. } => Ok(()),
            Decision::Deny(_) => {
                tracing::info!(pid = peer.pid, uid = peer.uid, name = %name, "watch ended: scope revoked by reload");
                Err(Status::permission_denied(DENIED))
            }
        },
    }
}

/// `secretd.v1.Secrets`.
#[derive(Debug, Clone)]
pub struct SecretsService {
    broker: Arc<Broker>,
}

impl SecretsService {
    pub fn new(broker: Arc<Broker>) -> SecretsService {
        SecretsService { broker }
    }
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Secret, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Secrets for SecretsService {
    async fn get_secret(
        &self,
        req: Request<pb::GetSecretRequest>,
    ) -> Result<Response<pb::Secret>, Status> {
        let (mut call, att) = Call::start(&self.broker, "GetSecret", &req)?;
        let name = match parse_name(&req.get_ref().name) {
            Ok(n) => n,
            Err(e) => return Err(call.invalid(e)),
        };
        call.names(std::slice::from_ref(&name));
        match evaluate(&att.config.policy, &att.grant, &name) {
            Decision::Deny(reason) => Err(call.deny(reason.to_string(), DENIED)),
            Decision::Allow { .. } => match secret_of(&self.broker, &name) {
                Some(secret) => {
                    call.allow()?;
                    Ok(Response::new(secret))
                }
                None => Err(call.not_found()),
            },
        }
    }

    async fn get_secrets(
        &self,
        req: Request<pb::GetSecretsRequest>,
    ) -> Result<Response<pb::GetSecretsResponse>, Status> {
        let (mut call, att) = Call::start(&self.broker, "GetSecrets", &req)?;
        let raw = &req.get_ref().names;
        let max = att.config.limits.max_names_per_request;
        if raw.len() > max {
            return Err(call.invalid(format!(
                "too many names: {} requested, at most {max} per call",
                raw.len()
            )));
        }
        let mut names = Vec::with_capacity(raw.len());
        for (i, n) in raw.iter().enumerate() {
            match parse_name(n) {
                Ok(n) => names.push(n),
                Err(e) => return Err(call.invalid(format!("name #{}: {e}", i + 1))),
            }
        }
        call.names(&names);
        // All or nothing: any denial fails the whole call before anything is read.
        for name in &names {
            if let Decision::Deny(reason) = evaluate(&att.config.policy, &att.grant, name) {
                return Err(call.deny(format!("{name}: {reason}"), DENIED));
            }
        }
        // One snapshot: a certificate and its key rotated together come from the same batch.
        let Some(secrets) = self.broker.store.read_many(&names, |name, value, version| {
            pb::Secret {
                name: name.to_string(),
                // Copies made for the response; freed (and cleared) once encoded.
                value: value.to_vec(),
                version,
            }
        }) else {
            return Err(call.not_found());
        };
        call.allow()?;
        Ok(Response::new(pb::GetSecretsResponse { secrets }))
    }

    async fn list_secrets(
        &self,
        req: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        let (call, att) = Call::start(&self.broker, "ListSecrets", &req)?;
        let names = if att.grant.is_empty() {
            Vec::new()
        } else {
            self.broker
                .store
                .names()
                .into_iter()
                .filter(|n| att.grant.allows(&att.config.policy, n))
                .map(SecretName::into_string)
                .collect()
        };
        call.allow()?;
        Ok(Response::new(pb::ListSecretsResponse { names }))
    }

    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let (call, att) = Call::start(&self.broker, "WhoAmI", &req)?;
        let scopes = call.record.scopes.to_vec();
        call.allow()?;
        let c = att.caller;
        Ok(Response::new(pb::WhoAmIResponse {
            pid: c.pid,
            uid: c.uid,
            gid: c.gid,
            function: c.function.unwrap_or_default(),
            scopes,
            exe: c.exe.map(|p| p.display().to_string()).unwrap_or_default(),
        }))
    }

    type WatchSecretStream = WatchStream;

    async fn watch_secret(
        &self,
        req: Request<pb::WatchSecretRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let (mut call, att) = Call::start(&self.broker, "WatchSecret", &req)?;
        let peer = peer_of(&req)?;
        let name = match parse_name(&req.get_ref().name) {
            Ok(n) => n,
            Err(e) => return Err(call.invalid(e)),
        };
        call.names(std::slice::from_ref(&name));
        if let Decision::Deny(reason) = evaluate(&att.config.policy, &att.grant, &name) {
            return Err(call.deny(reason.to_string(), DENIED));
        }
        // Subscribe before reading the current value, so no change can fall between the two.
        let mut events = self.broker.store.subscribe();
        let Some(first) = secret_of(&self.broker, &name) else {
            return Err(call.not_found());
        };
        call.allow()?;
        // The task below turns store events into notifications; the value is read when the
        // stream is polled, i.e. when HTTP/2 can take the next message. Nothing queues values:
        // a watcher that falls behind gets the newest one, and a rotated-away value is never
        // held for it. The stream belongs to the process that opened the connection: when its
        // pidfd says it has exited, the stream ends at once, and every value is re-checked
        // against the scope in force right before it is read (contract §7).
        let (tx, rx) = mpsc::channel::<Result<(), Status>>(1);
        let broker = Arc::clone(&self.broker);
        let watched = name.clone();
        let opener = Arc::clone(&peer);
        tokio::spawn(async move {
            let exited = opener.exited();
            tokio::pin!(exited);
            loop {
                let event = tokio::select! {
                    () = tx.closed() => return,
                    () = &mut exited => {
                        tracing::info!(conn = opener.conn, pid = opener.pid, uid = opener.uid, name = %watched, "watch ended: the process that opened it has exited");
                        opener.close();
                        let _ = tx.send(Err(Status::permission_denied(Unverified::Exited.to_string()))).await;
                        return;
                    }
                    e = events.recv() => e,
                };
                let end = match event {
                    Ok(Event::Changed(n)) if n == watched => None,
                    Ok(Event::Deleted(n)) if n == watched => Some(Status::not_found(NOT_FOUND)),
                    Ok(Event::Changed(_) | Event::Deleted(_)) => continue,
                    // A reload, or missed events (one of which may have been a reload): the
                    // scope is re-checked before anything else happens on this stream.
                    Ok(Event::PolicyReloaded) | Err(RecvError::Lagged(_)) => {
                        still_allowed(&broker, &opener, &watched).err()
                    }
                    Ok(Event::ShuttingDown) | Err(RecvError::Closed) => {
                        Some(Status::unavailable("broker is shutting down"))
                    }
                };
                match end {
                    // A notification already waiting reads the newest value too.
                    None => {
                        if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Ok(())) {
                            return;
                        }
                    }
                    Some(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        let broker = Arc::clone(&self.broker);
        let mut last = first.version;
        let changes = ReceiverStream::new(rx).filter_map(move |note| match note {
            Err(status) => Some(Err(status)),
            Ok(()) => {
                if let Err(status) = still_allowed(&broker, &peer, &name) {
                    return Some(Err(status));
                }
                match secret_of(&broker, &name) {
                    Some(s) if s.version != last => {
                        last = s.version;
                        Some(Ok(s))
                    }
                    Some(_) => None,
                    None => Some(Err(Status::not_found(NOT_FOUND))),
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::once(Ok(first)).chain(changes),
        )))
    }
}

/// `secretd.v1.Admin`.
#[derive(Debug, Clone)]
pub struct AdminService {
    broker: Arc<Broker>,
}

impl AdminService {
    pub fn new(broker: Arc<Broker>) -> AdminService {
        AdminService { broker }
    }

    /// Attest, then require `uid ∈ server.admin_uids`.
    fn admin<'a, T>(
        &'a self,
        rpc: &'static str,
        req: &Request<T>,
    ) -> Result<(Call<'a>, Attested), Status> {
        let (call, att) = Call::start(&self.broker, rpc, req)?;
        if !att.config.server.admin_uids.contains(&att.caller.uid) {
            return Err(call.deny("uid not in server.admin_uids", ADMIN_DENIED));
        }
        Ok((call, att))
    }
}

/// A registration under a function name that no `[[scope]]` matches on is kept (the name still
/// labels the worker's audit records, and a reload may add its scope), but it is almost always
/// a typo: say so to the shim, in the log and in the audit record.
fn unknown_function_warning(policy: &crate::policy::Policy, function: &str) -> Option<String> {
    let known = policy.functions();
    if known.contains(&function) {
        return None;
    }
    let known = if known.is_empty() {
        "no scope matches on a function".to_owned()
    } else {
        format!(
            "known: {}",
            known
                .iter()
                .map(|f| format!("{f:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Some(format!(
        "no [[scope]] has function = {function:?} ({known}): this worker gets only what scopes \
         without a function matcher grant it"
    ))
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn audit_status(a: audit::AuditStats) -> pb::AuditStatus {
    pb::AuditStatus {
        target: a.target,
        on_failure: a.on_failure.as_str().to_owned(),
        max_queue: a.max_queue,
        queue_depth: a.queue_depth,
        queue_peak: a.queue_peak,
        records_written: a.written,
        records_dropped: a.dropped,
        calls_refused: a.refused,
        write_failures: a.write_failures,
        queue_full: a.queue_full,
        state: a.state.to_owned(),
        last_error_time: a
            .last_error
            .as_ref()
            .map(|(t, _)| rfc3339(*t))
            .unwrap_or_default(),
        last_error: a.last_error.map(|(_, e)| e).unwrap_or_default(),
        reopens: a.reopens,
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn register_worker(
        &self,
        req: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        let (mut call, _att) = self.admin("RegisterWorker", &req)?;
        let r = req.get_ref();
        if !valid_function_name(&r.function) {
            return Err(call.invalid(
                "invalid function name: 1-128 bytes of A-Z a-z 0-9 _ . - expected".to_owned(),
            ));
        }
        call.record.function = Some(r.function.clone());
        let peer = peer_of(&req)?;
        let mut call = call.reserve()?;
        let result = if r.pid == 0 {
            self.broker.registry.register_peer(&peer, &r.function)
        } else {
            self.broker.registry.register_pid(r.pid, &r.function)
        };
        match result {
            Ok(reg) => {
                let warning = unknown_function_warning(&self.broker.config().policy, &reg.function);
                call.record.reason = Some(format!(
                    "registered pid {} as {}{}",
                    reg.pid,
                    reg.function,
                    warning
                        .as_deref()
                        .map_or(String::new(), |w| format!("; warning: {w}"))
                ));
                match &warning {
                    Some(w) => {
                        tracing::warn!(pid = reg.pid, function = %reg.function, by_pid = peer.pid, "worker registered, but {w}")
                    }
                    None => {
                        tracing::info!(pid = reg.pid, function = %reg.function, by_pid = peer.pid, "worker registered")
                    }
                }
                call.allow()?;
                Ok(Response::new(pb::RegisterWorkerResponse {
                    pid: reg.pid,
                    function: reg.function,
                    warning: warning.unwrap_or_default(),
                }))
            }
            Err(e) => Err(call.failed(tonic::Code::FailedPrecondition, e.to_string())),
        }
    }

    async fn reload(
        &self,
        req: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        let (call, _att) = self.admin("Reload", &req)?;
        let call = call.exempt();
        let reloaded = self.broker.reload().await;
        // Whether or not the config was good: logrotate has renamed the file away.
        let reopened = self.broker.reopen_audit().await;
        match (reloaded, reopened) {
            (Ok(config), Ok(())) => {
                call.allow()?;
                Ok(Response::new(pb::ReloadResponse {
                    secrets: self.broker.store.len() as u64,
                    scopes: config.policy.scopes().len() as u64,
                }))
            }
            (Err(e), _) => {
                tracing::error!(error = %e, "reload rejected; the configuration in force is unchanged");
                Err(call.failed(
                    tonic::Code::FailedPrecondition,
                    format!("reload rejected, configuration unchanged: {e}"),
                ))
            }
            (Ok(_), Err(e)) => Err(call.failed(
                tonic::Code::FailedPrecondition,
                format!("configuration reloaded, but {e}"),
            )),
        }
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let (call, att) = self.admin("Status", &req)?;
        // Answered even when the audit log is failing: it is how an operator sees that.
        call.exempt().allow()?;
        let b = &self.broker;
        let counts = b.store.count_by_origin();
        let health = b.source_health();
        let mut sources = Vec::new();
        for origin in b.status_origins() {
            let h = health.get(origin.as_str()).cloned().unwrap_or_default();
            sources.push(pb::SourceStatus {
                name: origin.as_str().to_owned(),
                secrets: counts.get(&origin).copied().unwrap_or(0) as u64,
                last_success: h.last_success.map(rfc3339).unwrap_or_default(),
                last_error: h
                    .last_error
                    .as_ref()
                    .map(|(_, e)| e.clone())
                    .unwrap_or_default(),
                last_error_time: h
                    .last_error
                    .as_ref()
                    .map(|(t, _)| rfc3339(*t))
                    .unwrap_or_default(),
                errors: h.errors,
                node: h
                    .node
                    .as_ref()
                    .map(|n| n.address.clone())
                    .unwrap_or_default(),
                failovers: h.node.as_ref().map_or(0, |n| n.failovers),
            });
        }
        let now = std::time::Instant::now();
        let dynamic = b
            .dynamic_status()
            .into_iter()
            .map(|d| pb::DynamicSecretStatus {
                name: d.name.to_string(),
                path: d.path,
                held: d.expires.is_some(),
                ttl_seconds: d
                    .expires
                    .map_or(0, |e| e.saturating_duration_since(now).as_secs()),
            })
            .collect();
        use std::sync::atomic::Ordering::Relaxed;
        Ok(Response::new(pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: b.started.elapsed().as_secs(),
            secrets: b.store.len() as u64,
            scopes: att.config.policy.scopes().len() as u64,
            registered_workers: b.registry.len() as u64,
            open_connections: b.stats.open_connections.load(Relaxed),
            calls_allowed: b.stats.allowed.load(Relaxed),
            calls_denied: b.stats.denied.load(Relaxed),
            socket: b.socket.display().to_string(),
            config: att
                .config
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            sources,
            pid: u64::from(std::process::id()),
            audit: Some(audit_status(b.audit.stats())),
            dynamic,
        }))
    }

    async fn scan(
        &self,
        req: Request<pb::ScanRequest>,
    ) -> Result<Response<pb::ScanResponse>, Status> {
        let (call, _att) = self.admin("Scan", &req)?;
        // Build the automaton under the store's read lock, walk /proc without it.
        let broker = Arc::clone(&self.broker);
        let report = tokio::task::spawn_blocking(move || {
            let scanner = broker
                .store
                .with_all(|all| scan::Scanner::new(all.iter().copied()));
            scanner.run(&broker.proc)
        })
        .await
        .map_err(|e| Status::internal(format!("scan failed: {e}")))?;
        call.allow()?;
        Ok(Response::new(pb::ScanResponse {
            hits: report
                .hits
                .into_iter()
                .map(|h| pb::ScanHit {
                    pid: h.pid,
                    uid: h.uid,
                    exe: h.exe,
                    environ: h.environ,
                    cmdline: h.cmdline,
                })
                .collect(),
            processes_scanned: report.scanned,
            processes_skipped: report.skipped,
            not_searched: report.not_searched,
        }))
    }

    async fn refresh(
        &self,
        req: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::RefreshResponse>, Status> {
        let (mut call, _att) = self.admin("Refresh", &req)?;
        let name = match req.get_ref().name.as_str() {
            "" => None,
            n => match parse_name(n) {
                Ok(n) => Some(n),
                Err(e) => return Err(call.invalid(e)),
            },
        };
        if let Some(n) = &name {
            call.names(std::slice::from_ref(n));
        }
        let call = call.reserve()?;
        match self.broker.refresh(name.as_ref()).await {
            Ok(refreshed) => {
                call.allow()?;
                Ok(Response::new(pb::RefreshResponse { refreshed }))
            }
            Err(e) => Err(call.failed(tonic::Code::Unavailable, format!("refresh failed: {e}"))),
        }
    }

    async fn set_secret(
        &self,
        req: Request<pb::SetSecretRequest>,
    ) -> Result<Response<pb::SetSecretResponse>, Status> {
        let (mut call, _att) = self.admin("SetSecret", &req)?;
        let name = match parse_name(&req.get_ref().name) {
            Ok(n) => n,
            Err(e) => return Err(call.invalid(e)),
        };
        call.names(std::slice::from_ref(&name));
        let call = call.reserve()?;
        let value = req.into_inner().value;
        let version = self
            .broker
            .store
            .put(name, crate::store::secret(value), Origin::Admin);
        call.allow()?;
        Ok(Response::new(pb::SetSecretResponse { version }))
    }

    async fn delete_secret(
        &self,
        req: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::DeleteSecretResponse>, Status> {
        let (mut call, _att) = self.admin("DeleteSecret", &req)?;
        let name = match parse_name(&req.get_ref().name) {
            Ok(n) => n,
            Err(e) => return Err(call.invalid(e)),
        };
        call.names(std::slice::from_ref(&name));
        let call = call.reserve()?;
        if self.broker.store.delete(&name) {
            call.allow()?;
            Ok(Response::new(pb::DeleteSecretResponse {}))
        } else {
            Err(call.not_found())
        }
    }
}
