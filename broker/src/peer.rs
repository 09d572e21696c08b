//! Who is calling: the only place that turns a connection into an identity.
//!
//! Trusts only the kernel. At accept time we take `SO_PEERCRED` (pid, uid, gid of the process
//! that called `connect`) and `SO_PEERPIDFD` (a handle on exactly that process, immune to pid
//! reuse), then read `/proc/<pid>` (start time, supplementary groups, exe, the parent chain).
//! After reading, the pidfd must still say "alive": if it does, the `/proc` facts belong to the
//! process that connected, not to a recycled pid. Any fact that cannot be read makes the whole
//! identity fail closed: every call on that connection is denied.
//!
//! Per call, [`Peer::alive`] polls the pidfd. A connection whose connecting process has exited
//! is denied and closed — even if a descendant inherited the socket (SPIRE's regression case):
//! the descendant never gets the identity of the process that connected.
//!
//! What the caller must handle: a process that `exec`s another program keeps its pid, pidfd and
//! connection; `exe` is the one seen at accept. Function identity comes from registrations
//! (see `registry`), never from anything the client sends.

use std::{
    future::Future,
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use nix::sys::socket::{getsockopt, sockopt};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::UnixStream,
};
use tonic::transport::server::Connected;

use crate::{
    admission::{Activity, Handshake},
    policy::{Caller, Grant},
    procfs::ProcFs,
    state::Snapshot,
};

/// How far up the parent chain we look for a registered worker.
pub const MAX_ANCESTORS: usize = 64;

/// One process on the caller's parent chain, as seen at accept time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ancestor {
    pub pid: u32,
    pub starttime: u64,
    pub uid: u32,
}

/// Kernel facts about the process at the other end of a connection.
#[derive(Debug)]
pub struct Peer {
    /// Sequence number of the connection, for logs.
    pub conn: u64,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Clock ticks since boot at which the process started (`/proc/<pid>/stat` field 22).
    pub starttime: u64,
    pub groups: Vec<u32>,
    pub exe: Option<PathBuf>,
    /// Parent, grandparent, … up to (not including) pid 1.
    pub ancestors: Vec<Ancestor>,
    /// `Some(reason)` when attestation failed: every call is denied.
    pub failure: Option<String>,
    pidfd: Option<OwnedFd>,
    closed: AtomicBool,
    /// Caller + grant computed for a (policy snapshot, registry generation) pair.
    cache: Mutex<Option<Cached>>,
    /// Open streams on this connection (for `limits.idle_timeout`).
    activity: Arc<Activity>,
}

/// A caller and its grant, with the policy snapshot the grant was computed from: the grant's
/// scope indices mean something only in that snapshot's policy.
#[derive(Debug, Clone)]
pub struct Cached {
    pub snapshot: Arc<Snapshot>,
    pub registry_gen: u64,
    pub caller: Caller,
    pub grant: Grant,
}

impl Peer {
    /// Read everything we will ever believe about the peer of `stream`.
    pub fn identify(stream: &impl AsFd, proc: &ProcFs, conn: u64) -> Peer {
        let cred = match getsockopt(stream, sockopt::PeerCredentials) {
            Ok(c) => c,
            Err(e) => return Peer::failed(conn, format!("SO_PEERCRED failed: {e}")),
        };
        let (pid, uid, gid) = (
            u32::try_from(cred.pid()).unwrap_or(0),
            cred.uid(),
            cred.gid(),
        );
        let mut peer = Peer {
            conn,
            pid,
            uid,
            gid,
            starttime: 0,
            groups: Vec::new(),
            exe: None,
            ancestors: Vec::new(),
            failure: None,
            pidfd: None,
            closed: AtomicBool::new(false),
            cache: Mutex::new(None),
            activity: Arc::default(),
        };
        if pid == 0 {
            peer.failure = Some("peer pid unknown (connection from another pid namespace?)".into());
            return peer;
        }
        match getsockopt(stream, sockopt::PeerPidfd) {
            Ok(fd) => peer.pidfd = Some(fd),
            Err(e) => {
                peer.failure = Some(format!("SO_PEERPIDFD failed: {e}"));
                return peer;
            }
        }
        if let Err(reason) = peer.read_proc(proc) {
            peer.failure = Some(reason);
            return peer;
        }
        // The facts above were read by pid; they are the peer's only if it is still alive now.
        if !peer.alive() {
            peer.failure = Some("peer exited during attestation".into());
        }
        peer
    }

    fn read_proc(&mut self, proc: &ProcFs) -> Result<(), String> {
        let stat = proc.stat(self.pid).map_err(|e| e.to_string())?;
        let status = proc.status(self.pid).map_err(|e| e.to_string())?;
        if status.uids[0] != self.uid && status.uids[1] != self.uid {
            return Err(format!(
                "/proc/{}/status uids {:?} do not match SO_PEERCRED uid {}",
                self.pid, status.uids, self.uid
            ));
        }
        self.starttime = stat.starttime;
        self.groups = status.groups;
        // `exe` needs ptrace-level access (CAP_SYS_PTRACE for other uids). Unreadable means
        // unknown: `exe =` scopes then never match (fail closed), other matchers still apply.
        self.exe = proc.exe(self.pid).ok();
        let mut ppid = stat.ppid;
        while ppid > 1 && self.ancestors.len() < MAX_ANCESTORS {
            // An ancestor that vanished ends the chain: it can no longer vouch for anyone.
            let (Ok(st), Ok(status)) = (proc.stat(ppid), proc.status(ppid)) else {
                break;
            };
            self.ancestors.push(Ancestor {
                pid: ppid,
                starttime: st.starttime,
                uid: status.uids[0],
            });
            ppid = st.ppid;
        }
        Ok(())
    }

    fn failed(conn: u64, reason: String) -> Peer {
        Peer {
            conn,
            pid: 0,
            uid: u32::MAX,
            gid: u32::MAX,
            starttime: 0,
            groups: Vec::new(),
            exe: None,
            ancestors: Vec::new(),
            failure: Some(reason),
            pidfd: None,
            closed: AtomicBool::new(false),
            cache: Mutex::new(None),
            activity: Arc::default(),
        }
    }

    /// Open streams on this connection.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// Whether the process that connected still exists (its pidfd has not signalled exit).
    pub fn alive(&self) -> bool {
        let Some(fd) = &self.pidfd else { return false };
        pidfd_alive(fd)
    }

    /// Resolves once the process that connected has exited (at once if it has no pidfd): the
    /// pidfd becomes readable then, and the runtime's epoll reports it, so a stream can end
    /// the moment its opener is gone instead of at its next message.
    pub async fn exited(&self) {
        let Some(fd) = self.pidfd.as_ref().and_then(|fd| fd.try_clone().ok()) else {
            return;
        };
        match crate::sys::watch_readable(fd) {
            Ok(fd) => {
                let _ = fd.readable().await;
            }
            // Cannot register with epoll (should not happen for a pidfd): poll instead.
            Err(e) => {
                tracing::warn!(conn = self.conn, error = %e, "cannot watch a pidfd with epoll; polling it");
                while self.alive() {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// A duplicate of the peer's pidfd (for binding a registration to it).
    pub fn pidfd(&self) -> io::Result<OwnedFd> {
        match &self.pidfd {
            Some(fd) => fd.try_clone(),
            None => Err(io::Error::new(io::ErrorKind::NotFound, "peer has no pidfd")),
        }
    }

    /// Make the connection fail on its next read, so hyper drops it.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The cached grant, if it was computed from `snapshot` (the same `Arc`, not merely an
    /// equal generation) under the registrations of `registry_gen`.
    pub fn cached(&self, snapshot: &Arc<Snapshot>, registry_gen: u64) -> Option<Cached> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .as_ref()
            .filter(|c| Arc::ptr_eq(&c.snapshot, snapshot) && c.registry_gen == registry_gen)
            .cloned()
    }

    pub fn store_cache(&self, cached: Cached) {
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(cached);
    }
}

/// `poll(pidfd, POLLIN, 0)`: readable means the process has exited.
pub fn pidfd_alive(fd: &OwnedFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) => true,
        Ok(_) => false,
        // EINTR: be conservative and ask again once.
        Err(nix::errno::Errno::EINTR) => matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0)),
        Err(_) => false,
    }
}

pub use crate::sys::pidfd_open;

/// What handlers find in `request.extensions()`.
pub type PeerInfo = Arc<Peer>;

/// An accepted connection that carries its peer's identity into every request.
pub struct PeerStream {
    io: UnixStream,
    peer: PeerInfo,
    /// Held for the life of the connection: the connection-limit slot and counters.
    _guard: Box<dyn Send + Sync>,
    /// Set once the identity is revoked: the connection reads as closed when it fires, which
    /// leaves time for the denial to reach the client.
    revoked_close: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Until the client's preface and SETTINGS have arrived: what has, and the deadline.
    handshake: Option<(Handshake, Pin<Box<tokio::time::Sleep>>)>,
    /// `limits.idle_timeout` (zero = never) and the timer armed while no stream is open.
    idle_timeout: std::time::Duration,
    idle_timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// How long a revoked connection stays open so the denial that revoked it is delivered.
const REVOKED_LINGER: std::time::Duration = std::time::Duration::from_millis(500);

/// When a connection must have completed its handshake, and how long it may sit idle.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub handshake_by: tokio::time::Instant,
    /// Zero = never.
    pub idle_timeout: std::time::Duration,
}

impl std::fmt::Debug for PeerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerStream")
            .field("io", &self.io)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl PeerStream {
    /// `guard` lives as long as the connection (a limit slot, a counter decrement on drop).
    pub fn new(
        io: UnixStream,
        peer: Peer,
        guard: Box<dyn Send + Sync>,
        deadlines: Deadlines,
    ) -> PeerStream {
        PeerStream {
            io,
            peer: Arc::new(peer),
            _guard: guard,
            revoked_close: None,
            handshake: Some((
                Handshake::default(),
                Box::pin(tokio::time::sleep_until(deadlines.handshake_by)),
            )),
            idle_timeout: deadlines.idle_timeout,
            idle_timer: None,
        }
    }

    /// Whether the connection should now read as closed because it has had no open stream
    /// for `idle_timeout`. Arms a timer (so the task is woken) while that time has not come.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.idle_timeout.is_zero() {
            return false;
        }
        let Some(since) = self.peer.activity().idle_since() else {
            self.idle_timer = None;
            return false;
        };
        let due = tokio::time::Instant::from_std(since + self.idle_timeout);
        let timer = self
            .idle_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() != due {
            timer.as_mut().reset(due);
        }
        timer.as_mut().poll(cx).is_ready()
    }
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        Arc::clone(&self.peer)
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // A revoked connection reads as closed by the peer shortly after the revocation, so
        // hyper drops it once the denial has gone out. Calls in between are denied too.
        if self.peer.is_closed() {
            let close = self
                .revoked_close
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(REVOKED_LINGER)));
            if close.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
        }
        if self.idle_expired(cx) {
            tracing::debug!(
                conn = self.peer.conn,
                uid = self.peer.uid,
                "closing a connection idle for limits.idle_timeout"
            );
            return Poll::Ready(Ok(()));
        }
        let this = self.get_mut();
        let Some((handshake, deadline)) = &mut this.handshake else {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        };
        // Still in the handshake: bytes already sent count even if we come late to read them;
        // only a client that has sent nothing more by the deadline is cut off.
        let late = deadline.as_mut().poll(cx).is_ready();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                handshake.feed(&buf.filled()[before..]);
            }
            _ if late => {
                tracing::debug!(
                    conn = this.peer.conn,
                    uid = this.peer.uid,
                    "closing a connection that did not complete its HTTP/2 handshake within limits.handshake_timeout"
                );
                buf.set_filled(before);
                return Poll::Ready(Ok(()));
            }
            other => return other,
        }
        if handshake.is_complete() {
            this.handshake = None;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    // Vectored writes let h2 send a DATA frame's payload straight from the message instead
    // of copying it into its connection buffer (see `secretd_proto::codec`).
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl AsRawFd for PeerStream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.io.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifies_a_socketpair_peer_as_ourselves() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = Peer::identify(&a, &ProcFs::system(), 1);
        assert_eq!(peer.failure, None);
        assert_eq!(peer.pid, std::process::id());
        assert_eq!(peer.uid, nix::unistd::getuid().as_raw());
        assert!(peer.alive());
        assert!(peer.starttime > 0);
        assert_eq!(peer.exe.as_deref(), std::env::current_exe().ok().as_deref());
        assert!(!peer.ancestors.is_empty(), "the test runner is our parent");
    }

    #[test]
    fn fails_closed_when_proc_is_unreadable() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let empty = tempfile::tempdir().unwrap();
        let peer = Peer::identify(&a, &ProcFs::new(empty.path()), 1);
        assert!(peer.failure.is_some());
    }

    #[test]
    fn pidfd_of_an_exited_child_says_dead() {
        let mut child = std::process::Command::new("/bin/true").spawn().unwrap();
        let fd = pidfd_open(child.id()).unwrap();
        child.wait().unwrap();
        assert!(!pidfd_alive(&fd));
        let me = pidfd_open(std::process::id()).unwrap();
        assert!(pidfd_alive(&me));
    }
}
