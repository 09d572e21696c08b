//! The socket and the server loop: socket-path safety, accept with fair-share admission
//! (`admission`), per-connection attestation off the accept loop, the gRPC services (plus
//! health and reflection), graceful stop.

use std::{
    future::Future,
    io,
    os::unix::{
        fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
        net::UnixListener as StdUnixListener,
    },
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use secretd_proto::v1::{
    FILE_DESCRIPTOR_SET, admin_server::AdminServer, secrets_server::SecretsServer,
};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    admission::{Admission, Refusal, Slot},
    peer::{Deadlines, Peer, PeerStream},
    service::{AdminService, SecretsService},
    state::Broker,
    store::Event,
};

/// Lives as long as one connection: frees its slot under the limits and keeps the count.
struct ConnectionGuard {
    broker: Arc<Broker>,
    _slot: Slot,
}

impl ConnectionGuard {
    fn new(broker: Arc<Broker>, slot: Slot) -> ConnectionGuard {
        broker
            .stats
            .open_connections
            .fetch_add(1, Ordering::Relaxed);
        ConnectionGuard {
            broker,
            _slot: slot,
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.broker
            .stats
            .open_connections
            .fetch_sub(1, Ordering::Relaxed);
        CLOSED_SINCE_TRIM.fetch_add(1, Ordering::Relaxed);
    }
}

/// Connections closed since the heap was last trimmed (see [`trim_after_floods`]).
static CLOSED_SINCE_TRIM: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many closed connections make a trim worth its cost.
const TRIM_AFTER_CLOSED: usize = 32;

/// Once a second: if many connections have closed since the last look, give the free heap
/// pages back to the kernel, so RSS falls back after a flood (see `alloc::release_free_memory`).
async fn trim_after_floods() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if CLOSED_SINCE_TRIM.load(Ordering::Relaxed) >= TRIM_AFTER_CLOSED {
            CLOSED_SINCE_TRIM.store(0, Ordering::Relaxed);
            let _ = tokio::task::spawn_blocking(crate::alloc::release_free_memory).await;
        }
    }
}

/// How many peers are identified (`/proc` reads, on blocking threads) at the same time. Few:
/// each takes well under a millisecond unless its process tree is deep or its `/proc` slow,
/// and the accept loop never waits for them.
const IDENTIFY_AT_ONCE: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("failed to create socket directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("failed to inspect socket directory {path}: {source}")]
    InspectDir { path: PathBuf, source: io::Error },
    #[error("refusing socket directory {path}: {why}")]
    UnsafeDir { path: PathBuf, why: String },
    #[error("another broker is already serving {path}")]
    AlreadyServing { path: PathBuf },
    #[error("refusing to replace {path}: it exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("failed to remove stale socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("failed to bind socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("failed to set mode {mode:04o} on socket {path}: {source}")]
    Chmod {
        path: PathBuf,
        mode: u32,
        source: io::Error,
    },
    #[error("socket path {path} must be absolute")]
    Relative { path: PathBuf },
    #[error("failed to start the server: {0}")]
    Serve(String),
}

/// Bind the broker socket safely:
/// - the parent directory is created `0755` if absent, and refused if anyone but root (or the
///   broker's own uid, for an unprivileged broker) owns it or can write to it;
/// - an existing socket that accepts connections belongs to a live broker: refuse; one that
///   refuses connections is stale (a dead broker's): replace it; anything else: refuse;
/// - the socket gets `mode` (who may connect; what they may read is decided per call).
pub fn bind_socket(path: &Path, mode: u32) -> Result<StdUnixListener, BrokerError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    if path.is_absolute() && !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| BrokerError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
    }
    match check_socket_path(path)? {
        SocketPath::Free => {}
        SocketPath::Live => {
            return Err(BrokerError::AlreadyServing {
                path: path.to_owned(),
            });
        }
        SocketPath::Stale => {
            std::fs::remove_file(path).map_err(|source| BrokerError::RemoveStale {
                path: path.to_owned(),
                source,
            })?;
            tracing::info!(path = %path.display(), "replaced a stale socket left by a previous broker");
        }
    }
    let listener = StdUnixListener::bind(path).map_err(|source| BrokerError::Bind {
        path: path.to_owned(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        BrokerError::Chmod {
            path: path.to_owned(),
            mode,
            source,
        }
    })?;
    Ok(listener)
}

/// What is at the socket path now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketPath {
    /// Nothing (or the directory does not exist yet: `serve` creates it `0755`).
    Free,
    /// A socket that accepts connections: another broker is serving it.
    Live,
    /// A socket nobody accepts on: a dead broker's, replaced by `serve`.
    Stale,
}

/// Every rule `serve` applies to the socket path before binding, without changing anything:
/// absolute, the directory (when it exists) safe, and nothing but a socket at the path.
/// `secretd check` runs exactly this.
pub fn check_socket_path(path: &Path) -> Result<SocketPath, BrokerError> {
    if !path.is_absolute() {
        return Err(BrokerError::Relative {
            path: path.to_owned(),
        });
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    if !dir.exists() {
        return Ok(SocketPath::Free);
    }
    check_dir(dir)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => Ok(SocketPath::Live),
                Err(_) => Ok(SocketPath::Stale),
            }
        }
        Ok(_) => Err(BrokerError::NotASocket {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(SocketPath::Free),
        Err(source) => Err(BrokerError::InspectDir {
            path: path.to_owned(),
            source,
        }),
    }
}

fn check_dir(dir: &Path) -> Result<(), BrokerError> {
    let meta = std::fs::metadata(dir).map_err(|source| BrokerError::InspectDir {
        path: dir.to_owned(),
        source,
    })?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(BrokerError::UnsafeDir {
            path: dir.to_owned(),
            why: format!("owned by uid {}, not root", meta.uid()),
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(BrokerError::UnsafeDir {
            path: dir.to_owned(),
            why: format!(
                "mode {:04o} lets others create or replace the socket; put the socket in a \
                 directory only root can write, such as /run/secretd",
                meta.mode() & 0o7777
            ),
        });
    }
    Ok(())
}

/// Serve until `shutdown` resolves, then stop accepting, give in-flight calls
/// `limits.shutdown_grace` to end, remove the socket and zeroize the store.
/// `ready` (the `--ready-fd`) receives `READY\n` once connections are being accepted.
pub async fn serve(
    broker: Arc<Broker>,
    listener: StdUnixListener,
    shutdown: impl Future<Output = ()>,
    ready: Option<std::fs::File>,
) -> Result<(), BrokerError> {
    let config = broker.config();
    let limits = config.limits.clone();
    listener
        .set_nonblocking(true)
        .map_err(|e| BrokerError::Serve(e.to_string()))?;
    let listener = tokio::net::UnixListener::from_std(listener)
        .map_err(|e| BrokerError::Serve(e.to_string()))?;

    let (conns_tx, conns_rx) = mpsc::channel::<io::Result<PeerStream>>(64);
    let accept = tokio::spawn(accept_loop(Arc::clone(&broker), listener, conns_tx));
    let trim = tokio::spawn(trim_after_floods());

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<SecretsServer<SecretsService>>()
        .await;
    health_reporter
        .set_serving::<AdminServer<AdminService>>()
        .await;
    // Reflection as both `grpc.reflection.v1` and `v1alpha`: grpcurl speaks v1, while grpcio's
    // reflection client, grpc_cli and several GUI tools speak only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| BrokerError::Serve(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| BrokerError::Serve(e.to_string()))?;
    let secrets_service = SecretsService::new(Arc::clone(&broker));
    // How values leave: WatchSecret is answered by this layer rather than the generated
    // server, and value responses longer than one frame get the padding trailer (egress.rs).
    let egress = crate::egress::EgressLayer::new(secrets_service.clone(), limits.max_request_bytes);
    let secrets =
        SecretsServer::new(secrets_service).max_decoding_message_size(limits.max_request_bytes);
    let admin = AdminServer::new(AdminService::new(Arc::clone(&broker)))
        .max_decoding_message_size(limits.max_request_bytes);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .layer(crate::admission::ActivityLayer)
        .layer(crate::rejected::AuditRejectedLayer::new(Arc::clone(
            &broker,
        )))
        .layer(egress)
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_max_header_list_size(u32::try_from(limits.max_request_bytes).unwrap_or(u32::MAX))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(secrets)
        .add_service(admin)
        .serve_with_incoming_shutdown(ReceiverStream::new(conns_rx), async {
            let _ = stop_rx.await;
        });
    tokio::pin!(server);

    if let Some(mut ready) = ready {
        use std::io::Write;
        if let Err(e) = ready.write_all(b"READY\n") {
            tracing::warn!(error = %e, "failed to write READY to --ready-fd");
        }
    }
    tracing::info!(socket = %broker.socket.display(), "accepting connections");

    let result = tokio::select! {
        r = &mut server => r.map_err(|e| BrokerError::Serve(e.to_string())),
        () = shutdown => {
            tracing::info!("shutting down: no new connections; waiting for in-flight calls");
            accept.abort();
            broker.store.announce(Event::ShuttingDown);
            let _ = stop_tx.send(());
            match tokio::time::timeout(limits.shutdown_grace, &mut server).await {
                Ok(r) => r.map_err(|e| BrokerError::Serve(e.to_string())),
                Err(_) => {
                    tracing::warn!(grace = %humantime::format_duration(limits.shutdown_grace), "in-flight calls did not end within the grace period; closing them");
                    Ok(())
                }
            }
        }
    };
    accept.abort();
    trim.abort();
    if let Err(e) = std::fs::remove_file(&broker.socket) {
        tracing::warn!(path = %broker.socket.display(), error = %e, "failed to remove the socket");
    }
    broker.zeroize();
    result
}

/// Accept, admit by uid (closing at once what is over a share), then identify each peer on
/// its own task and hand it to the server. Nothing here waits on a peer.
async fn accept_loop(
    broker: Arc<Broker>,
    listener: tokio::net::UnixListener,
    conns: mpsc::Sender<io::Result<PeerStream>>,
) {
    let admission = Admission::new();
    let identifying = Arc::new(Semaphore::new(IDENTIFY_AT_ONCE));
    let mut next_conn: u64 = 0;
    let mut refusing: Option<Refusal> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let accepted = tokio::time::Instant::now();
        let config = broker.config();
        let limits = &config.limits;
        // One getsockopt: the uid is all admission needs. An unknown uid is nobody's admin.
        let uid = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
            .map(|c| c.uid())
            .ok();
        let admin = uid.is_some_and(|u| config.server.admin_uids.contains(&u));
        let slot = match admission.admit(uid.unwrap_or(u32::MAX), admin, limits) {
            Ok(slot) => slot,
            Err(refusal) => {
                broker
                    .stats
                    .refused_connections
                    .fetch_add(1, Ordering::Relaxed);
                if refusing != Some(refusal) {
                    tracing::warn!(uid = ?uid, max_connections = limits.max_connections, max_connections_per_uid = limits.max_connections_per_uid, "{refusal}; closing new connections over it");
                    refusing = Some(refusal);
                }
                drop(stream);
                continue;
            }
        };
        refusing = None;
        next_conn += 1;
        let deadlines = Deadlines {
            handshake_by: accepted + limits.handshake_timeout,
            idle_timeout: limits.idle_timeout,
        };
        let guard = ConnectionGuard::new(Arc::clone(&broker), slot);
        tokio::spawn(identify(
            Arc::clone(&broker),
            stream,
            next_conn,
            Box::new(guard),
            deadlines,
            Arc::clone(&identifying),
            conns.clone(),
        ));
    }
}

/// Attest one peer (its `/proc` reads run on a blocking thread, a few at a time) and hand the
/// connection to the server.
async fn identify(
    broker: Arc<Broker>,
    stream: tokio::net::UnixStream,
    conn: u64,
    guard: Box<dyn Send + Sync>,
    deadlines: Deadlines,
    identifying: Arc<Semaphore>,
    conns: mpsc::Sender<io::Result<PeerStream>>,
) {
    let Ok(turn) = identifying.acquire_owned().await else {
        return;
    };
    let proc = broker.proc.clone();
    let identified = tokio::task::spawn_blocking(move || {
        let peer = Peer::identify(&stream, &proc, conn);
        (stream, peer)
    })
    .await;
    drop(turn);
    let Ok((stream, peer)) = identified else {
        return;
    };
    match &peer.failure {
        None => tracing::debug!(
            conn,
            pid = peer.pid,
            uid = peer.uid,
            gid = peer.gid,
            "connection accepted"
        ),
        Some(reason) => {
            tracing::warn!(conn, pid = peer.pid, uid = peer.uid, %reason, "connection accepted but not attested; its calls will be denied")
        }
    }
    let _ = conns
        .send(Ok(PeerStream::new(stream, peer, guard, deadlines)))
        .await;
}
