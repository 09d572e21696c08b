//! Fair share under floods (contract §7): who may hold a connection, for how long.
//!
//! Trusts only `SO_PEERCRED`, taken at accept with one `getsockopt` (no `/proc` read), so the
//! accept loop decides in constant time whether a connection may stay:
//! - [`Admission`] counts open connections per peer uid. A uid at `max_connections_per_uid` has
//!   its next connection closed at once; so does anyone once `max_connections` are open.
//!   Admin uids are exempt from the per-uid share and have a reserve of
//!   `max_connections_per_uid` connections above `max_connections`: no flood, from one uid or
//!   many, keeps an operator from connecting.
//! - [`Handshake`] follows the first bytes a client sends: the HTTP/2 preface and a complete
//!   SETTINGS frame must arrive within `handshake_timeout` (enforced by `peer::PeerStream`).
//! - [`ActivityLayer`] counts each connection's open streams, so a connection that has had
//!   none for `idle_timeout` can be closed (also enforced by `peer::PeerStream`).
//!
//! What the caller must handle: identifying the peer (`peer::Peer::identify`, the `/proc`
//! reads) happens after admission, off the accept loop.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use http_body_util::BodyExt;
use tonic::{
    body::Body,
    codegen::{BoxFuture, Service, http},
};

use crate::{config::Limits, peer::PeerInfo};

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` are open (admins: also their reserve).
    Total,
    /// This uid holds `max_connections_per_uid`.
    PerUid,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Total => "limits.max_connections reached",
            Refusal::PerUid => "limits.max_connections_per_uid reached for this uid",
        })
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_uid: HashMap<u32, usize>,
}

/// Open connections, in total and per uid.
#[derive(Debug, Default)]
pub struct Admission {
    counts: Mutex<Counts>,
}

/// One admitted connection's place in the counts; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    uid: u32,
}

impl Admission {
    pub fn new() -> Arc<Admission> {
        Arc::new(Admission::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admit a connection from `uid` under `limits`, or say why not.
    pub fn admit(
        self: &Arc<Self>,
        uid: u32,
        admin: bool,
        limits: &Limits,
    ) -> Result<Slot, Refusal> {
        let mut counts = self.lock();
        let held = counts.per_uid.get(&uid).copied().unwrap_or(0);
        if admin {
            let ceiling = limits
                .max_connections
                .saturating_add(limits.max_connections_per_uid);
            if counts.total >= ceiling {
                return Err(Refusal::Total);
            }
        } else {
            if held >= limits.max_connections_per_uid {
                return Err(Refusal::PerUid);
            }
            if counts.total >= limits.max_connections {
                return Err(Refusal::Total);
            }
        }
        counts.total += 1;
        counts.per_uid.insert(uid, held + 1);
        Ok(Slot {
            admission: Arc::clone(self),
            uid,
        })
    }

    /// Open connections of `uid`.
    pub fn held_by(&self, uid: u32) -> usize {
        self.lock().per_uid.get(&uid).copied().unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.lock().total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.admission.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                counts.per_uid.remove(&self.uid);
            }
        }
    }
}

/// The client's side of the HTTP/2 handshake (RFC 9113 §3.4): the 24-byte preface, then a
/// SETTINGS frame. Fed every byte the connection reads until [`Handshake::is_complete`].
#[derive(Debug, Default, Clone)]
pub struct Handshake {
    seen: usize,
    /// The frame header following the preface.
    head: [u8; FRAME_HEADER],
}

const PREFACE: usize = 24;
const FRAME_HEADER: usize = 9;

impl Handshake {
    /// Account for `bytes`, the next bytes read from the client.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.is_complete() {
            return;
        }
        for (i, &b) in bytes.iter().enumerate() {
            let at = self.seen + i;
            if (PREFACE..PREFACE + FRAME_HEADER).contains(&at) {
                self.head[at - PREFACE] = b;
            }
            if at >= PREFACE + FRAME_HEADER {
                break;
            }
        }
        self.seen = self.seen.saturating_add(bytes.len());
    }

    /// The preface and the whole first frame have arrived. (h2 itself refuses a first frame
    /// that is not SETTINGS; here only its length matters.)
    pub fn is_complete(&self) -> bool {
        if self.seen < PREFACE + FRAME_HEADER {
            return false;
        }
        let len = u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]) as usize;
        self.seen >= PREFACE + FRAME_HEADER + len
    }
}

/// Open streams of one connection, and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    open: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            open: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        }
    }
}

impl Activity {
    /// `None` while a stream is open; else when the last one ended (or the connection opened).
    pub fn idle_since(&self) -> Option<Instant> {
        if self.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(*self.idle_since.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn begin(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        StreamGuard(Arc::clone(self))
    }
}

/// Held by a request's future and then by its response body: one open stream.
struct StreamGuard(Arc<Activity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut since = self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        *since = Instant::now();
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `tower::Layer` adding [`Active`].
#[derive(Debug, Clone, Default)]
pub struct ActivityLayer;

impl<S> tower::Layer<S> for ActivityLayer {
    type Service = Active<S>;

    fn layer(&self, inner: S) -> Active<S> {
        Active { inner }
    }
}

/// Counts a stream as open from its request until its response body is dropped.
#[derive(Debug, Clone)]
pub struct Active<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for Active<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<http::Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<PeerInfo>()
            .map(|peer| peer.activity().begin());
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _open = &guard;
                    frame
                }))
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_uid: usize) -> Limits {
        Limits {
            max_connections: total,
            max_connections_per_uid: per_uid,
            ..Limits::default()
        }
    }

    #[test]
    fn one_uid_gets_its_share_and_no_more() {
        let a = Admission::new();
        let l = limits(10, 3);
        let held: Vec<Slot> = (0..3).map(|_| a.admit(1000, false, &l).unwrap()).collect();
        assert_eq!(a.admit(1000, false, &l).unwrap_err(), Refusal::PerUid);
        // Another uid is still admitted.
        let other = a.admit(1001, false, &l).unwrap();
        assert_eq!((a.held_by(1000), a.held_by(1001), a.total()), (3, 1, 4));
        drop(held);
        drop(other);
        assert_eq!(a.total(), 0);
        assert_eq!(a.held_by(1000), 0);
        assert!(a.admit(1000, false, &l).is_ok());
    }

    #[test]
    fn many_uids_fill_the_total_but_admins_keep_a_reserve() {
        let a = Admission::new();
        let l = limits(4, 2);
        let _held: Vec<Slot> = (0..4)
            .map(|i| a.admit(2000 + i / 2, false, &l).unwrap())
            .collect();
        assert_eq!(a.admit(3000, false, &l).unwrap_err(), Refusal::Total);
        // The admin is not held to the per-uid share, and gets in above the total.
        let admin: Vec<Slot> = (0..2).map(|_| a.admit(0, true, &l).unwrap()).collect();
        assert_eq!(a.admit(0, true, &l).unwrap_err(), Refusal::Total);
        assert_eq!(admin.len(), 2);
    }

    #[test]
    fn the_handshake_is_the_preface_and_one_whole_frame() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        // SETTINGS with one 6-byte setting.
        let settings_head = [0u8, 0, 6, 4, 0, 0, 0, 0, 0];
        let mut h = Handshake::default();
        h.feed(&preface[..10]);
        assert!(!h.is_complete());
        h.feed(&preface[10..]);
        h.feed(&settings_head[..5]);
        assert!(!h.is_complete(), "half a frame header");
        h.feed(&settings_head[5..]);
        assert!(!h.is_complete(), "header without its payload");
        h.feed(&[0, 3, 0, 0, 0]);
        assert!(!h.is_complete());
        h.feed(&[100, 0xff, 0xff]); // the payload's last byte and more
        assert!(h.is_complete());

        // An empty SETTINGS frame, all in one read.
        let mut all = preface.to_vec();
        all.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        let mut h = Handshake::default();
        h.feed(&all);
        assert!(h.is_complete());
    }
}
