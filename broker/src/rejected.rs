//! Calls refused before any handler runs still get an audit record.
//!
//! A request message larger than `limits.max_request_bytes`, or one that is not a valid
//! protobuf encoding, is refused while tonic decodes it, before our handler (which writes the
//! audit record) is reached. This layer sits in front of every service and records such calls
//! as `invalid`, with the caller's kernel identity. It looks only at the response — an
//! `OUT_OF_RANGE` status, which our handlers never return, or a status whose source is the
//! codec's [`Malformed`](secretd_proto::codec::Malformed) marker (tonic leaves the `Status` in
//! the response's extensions), which only the codec sets — so nothing is recorded twice.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use secretd_proto::codec::is_malformed;
use tonic::codegen::{Service, http};

use crate::{
    audit::{AuditRecord, Outcome},
    peer::PeerInfo,
    policy::Caller,
    state::Broker,
};

/// The RPC names we serve, as `'static` strings for the audit record.
const RPCS: &[&str] = &[
    "GetSecret",
    "GetSecrets",
    "ListSecrets",
    "WhoAmI",
    "WatchSecret",
    "RegisterWorker",
    "Reload",
    "Status",
    "Scan",
    "Refresh",
    "SetSecret",
    "DeleteSecret",
];

/// `tower::Layer` adding [`AuditRejected`].
#[derive(Debug, Clone)]
pub struct AuditRejectedLayer {
    broker: Arc<Broker>,
}

impl AuditRejectedLayer {
    pub fn new(broker: Arc<Broker>) -> AuditRejectedLayer {
        AuditRejectedLayer { broker }
    }
}

impl<S> tower::Layer<S> for AuditRejectedLayer {
    type Service = AuditRejected<S>;

    fn layer(&self, inner: S) -> AuditRejected<S> {
        AuditRejected {
            inner,
            broker: Arc::clone(&self.broker),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditRejected<S> {
    inner: S,
    broker: Arc<Broker>,
}

impl<S, B, R> Service<http::Request<B>> for AuditRejected<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let peer = req.extensions().get::<PeerInfo>().cloned();
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let ours = req.uri().path().starts_with("/secretd.v1.");
        let broker = Arc::clone(&self.broker);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let header = |name: &str| resp.headers().get(name).map(|v| v.as_bytes());
            let malformed = resp
                .extensions()
                .get::<tonic::Status>()
                .is_some_and(is_malformed);
            let reason = match header("grpc-status") {
                Some(b"11") => "request message larger than limits.max_request_bytes",
                _ if malformed => "request message is not a valid protobuf encoding",
                _ => return Ok(resp),
            };
            if let Some(peer) = peer.filter(|_| ours) {
                let rpc = RPCS
                    .iter()
                    .find(|r| **r == method)
                    .copied()
                    .unwrap_or("unknown");
                let caller = Caller {
                    pid: peer.pid,
                    uid: peer.uid,
                    gid: peer.gid,
                    ..Caller::default()
                };
                let mut record = AuditRecord::new(rpc, &caller);
                record.decision = Outcome::Invalid;
                record.reason = Some(reason.to_owned());
                broker
                    .stats
                    .denied
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Already answered with an error: nothing to withhold, so never refused.
                broker.audit.record_best_effort(record);
            }
            Ok(resp)
        })
    }
}
