//! The broker's shared state: configuration in force, secrets, registrations, audit sink and
//! counters — and the two operations that change more than one of them (reload, attest).
//!
//! Consistency (contract §7): the config and its policy generation are one immutable
//! [`Snapshot`], replaced as a whole by `reload` (one pointer swap under a lock held for no
//! more than that). `attest` reads the snapshot once; the grant it computes, and any grant it
//! reuses from the connection's cache, is paired with the snapshot it was computed from, and
//! scope indices are only ever resolved against that snapshot's policy. A call is therefore
//! decided wholly by the old policy or wholly by the new one, never by a mix.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock, RwLock, atomic::AtomicU64},
    time::{Instant, SystemTime},
};

use secrecy::SecretBox;

use crate::{
    audit::{AuditLog, ReopenError},
    config::{Config, ConfigError},
    name::SecretName,
    peer::{Cached, Peer},
    policy::{Caller, Grant},
    procfs::ProcFs,
    registry::Registry,
    sources::{self, Secrets, SourceError},
    store::{Change, Event, Origin, Store},
    upstream::{self, NodeInUse, SecretSink, Update},
};

/// Counters for Status.
#[derive(Debug, Default)]
pub struct Stats {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    pub open_connections: AtomicU64,
    pub refused_connections: AtomicU64,
}

/// Health of one secret source, for Status.
#[derive(Debug, Clone, Default)]
pub struct SourceHealth {
    pub last_success: Option<SystemTime>,
    pub last_error: Option<(SystemTime, String)>,
    pub errors: u64,
    /// For a cluster source: the node in use and the failovers so far.
    pub node: Option<NodeInUse>,
}

/// Where the config came from and how to read it again.
#[derive(Debug, Clone)]
pub struct ConfigOrigin {
    pub path: PathBuf,
    /// `--config` was given: a missing file is an error, not "use defaults".
    pub explicit: bool,
    /// Directory holding passwd/group for `user`/`group` keys (normally `/etc`).
    pub etc: PathBuf,
}

/// One policy in force: the config and its generation, read and replaced together.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    /// Bumped by every reload (for logs and caches; identity is the `Arc` itself).
    pub generation: u64,
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct Broker {
    current: RwLock<Arc<Snapshot>>,
    origin: ConfigOrigin,
    /// The socket actually served (from `--socket` or the config at start-up).
    pub socket: PathBuf,
    pub store: Store,
    pub registry: Arc<Registry>,
    pub audit: AuditLog,
    pub proc: ProcFs,
    pub stats: Stats,
    pub started: Instant,
    sources: Mutex<BTreeMap<&'static str, SourceHealth>>,
    /// The dynamic secrets' paths and lease ends, for Status (never a lease id or value).
    dynamic: Mutex<Vec<upstream::LeaseStatus>>,
    reload_lock: tokio::sync::Mutex<()>,
    /// The background source (`[sources.openbao]`), once started (see
    /// [`Broker::set_upstream`]): `refresh` and `reload` reach it through this link.
    upstream: OnceLock<upstream::Control>,
    /// Fires in `attest` right after the snapshot is read: where a reload used to slip in.
    #[cfg(test)]
    after_policy_read: TestHook,
}

#[cfg(test)]
#[derive(Default)]
struct TestHook(Mutex<Option<Box<dyn FnOnce() + Send>>>);

#[cfg(test)]
impl std::fmt::Debug for TestHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestHook")
    }
}

#[cfg(test)]
impl TestHook {
    fn fire(&self) {
        let hook = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(hook) = hook {
            hook();
        }
    }
}

/// A verified caller, with the config snapshot its grant was computed against.
#[derive(Debug, Clone)]
pub struct Attested {
    pub config: Arc<Config>,
    pub caller: Caller,
    pub grant: Grant,
}

/// Why a peer gets nothing at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unverified {
    /// Attestation failed at accept (a /proc fact could not be read, …).
    Failed(String),
    /// The process that connected has exited (the socket may be held by a descendant).
    Exited,
}

impl std::fmt::Display for Unverified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unverified::Failed(r) => write!(f, "caller identity could not be verified: {r}"),
            Unverified::Exited => f.write_str("the process that opened this connection has exited"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Source(#[from] SourceError),
}

impl Broker {
    pub fn new(
        config: Config,
        origin: ConfigOrigin,
        socket: PathBuf,
        store: Store,
        registry: Arc<Registry>,
        audit: AuditLog,
        proc: ProcFs,
    ) -> Broker {
        Broker {
            current: RwLock::new(Arc::new(Snapshot {
                config: Arc::new(config),
                generation: 1,
            })),
            origin,
            socket,
            store,
            registry,
            audit,
            proc,
            stats: Stats::default(),
            started: Instant::now(),
            sources: Mutex::new(BTreeMap::new()),
            dynamic: Mutex::new(Vec::new()),
            reload_lock: tokio::sync::Mutex::new(()),
            upstream: OnceLock::new(),
            #[cfg(test)]
            after_policy_read: TestHook::default(),
        }
    }

    /// Attach the link to the running background source.
    pub fn set_upstream(&self, control: upstream::Control) {
        let _ = self.upstream.set(control);
    }

    /// The sources Status lists: env, files and admin always; openbao when configured or when
    /// it still holds secrets.
    pub fn status_origins(&self) -> Vec<Origin> {
        let mut v = vec![Origin::Env, Origin::File, Origin::Admin];
        if self.config().openbao.is_some() || !self.store.names_of(Origin::OpenBao).is_empty() {
            v.push(Origin::OpenBao);
        }
        v
    }

    /// The policy in force: config and generation, one consistent pair.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.snapshot().config)
    }

    /// Put `config` in force as the next generation, in one swap.
    fn install(&self, config: Arc<Config>) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let generation = current.generation + 1;
        *current = Arc::new(Snapshot { config, generation });
    }

    /// Who is calling, re-verified for this call: the connecting process must still be alive.
    /// The caller and its grant are computed once per connection and reused until the policy
    /// or the registrations change.
    pub fn attest(&self, peer: &Peer) -> Result<Attested, Unverified> {
        if let Some(reason) = &peer.failure {
            peer.close();
            return Err(Unverified::Failed(reason.clone()));
        }
        if !peer.alive() {
            peer.close();
            return Err(Unverified::Exited);
        }
        let snapshot = self.snapshot();
        #[cfg(test)]
        self.after_policy_read.fire();
        // Read before the registrations it describes: a registration that changes meanwhile
        // leaves a stale generation in the cache, which only forces a recomputation.
        let registry_gen = self.registry.generation();
        if let Some(c) = peer.cached(&snapshot, registry_gen) {
            return Ok(Attested {
                config: Arc::clone(&c.snapshot.config),
                caller: c.caller,
                grant: c.grant,
            });
        }
        let caller = Caller {
            pid: peer.pid,
            uid: peer.uid,
            gid: peer.gid,
            groups: peer.groups.clone(),
            function: self.registry.function_for(peer),
            exe: peer.exe.clone(),
        };
        let grant = snapshot.config.policy.grant(&caller);
        peer.store_cache(Cached {
            snapshot: Arc::clone(&snapshot),
            registry_gen,
            caller: caller.clone(),
            grant: grant.clone(),
        });
        Ok(Attested {
            config: Arc::clone(&snapshot.config),
            caller,
            grant,
        })
    }

    /// Re-read the config file and the file sources. All or nothing: on any error the config,
    /// policy and secrets in force are untouched.
    pub async fn reload(&self) -> Result<Arc<Config>, ReloadError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let origin = self.origin.clone();
        let loaded = tokio::task::spawn_blocking(move || -> Result<_, ReloadError> {
            let config = Config::load_or_default(&origin.path, origin.explicit, &origin.etc)?;
            let files = sources::read_files(&config.files.dirs)?;
            Ok((config, files))
        })
        .await
        .map_err(|e| ReloadError::Source(SourceError::Task(e.to_string())))?;
        let (config, files) = match loaded {
            Ok(v) => v,
            Err(e) => {
                self.note_source("files", Err(e.to_string()));
                return Err(e);
            }
        };
        let old = self.config();
        if old.env.include != config.env.include || old.env.exclude != config.env.exclude {
            tracing::warn!(
                "[sources.env] changed: environment secrets are read once at start-up; restart to apply"
            );
        }
        if old.server.socket != config.server.socket
            || old.server.socket_mode != config.server.socket_mode
        {
            tracing::warn!("[server] socket/socket_mode changed: takes effect at restart");
        }
        let files = sources::without_openbao(&config, files, "[sources.files]");
        self.store.replace_origin(Origin::File, files);
        self.note_source("files", Ok(()));
        let config = Arc::new(config);
        self.install(Arc::clone(&config));
        self.store.announce(Event::PolicyReloaded);
        if let Some(u) = self.upstream.get() {
            u.reconfigure(Arc::clone(&config));
        }
        tracing::info!(
            scopes = config.policy.scopes().len(),
            secrets = self.store.len(),
            "configuration reloaded"
        );
        Ok(config)
    }

    /// Re-read every file source now and replace the file secrets (the inotify watcher and
    /// `refresh` use this). On error the secrets in force are kept. Returns how many were read.
    pub async fn reread_files(&self) -> Result<u64, SourceError> {
        let files = self.read_files().await?;
        let n = files.len() as u64;
        self.store.replace_origin(Origin::File, files);
        Ok(n)
    }

    async fn read_files(&self) -> Result<sources::Secrets, SourceError> {
        let config = self.config();
        let dirs = config.files.dirs.clone();
        let files = tokio::task::spawn_blocking(move || sources::read_files(&dirs))
            .await
            .map_err(|e| SourceError::Task(e.to_string()))?;
        match files {
            Ok(f) => {
                self.note_source("files", Ok(()));
                Ok(sources::without_openbao(&config, f, "[sources.files]"))
            }
            Err(e) => {
                self.note_source("files", Err(e.to_string()));
                Err(e)
            }
        }
    }

    /// Re-read sources now (Admin.Refresh): the file directories and the OpenBao source, or
    /// only the source that provides `name`. Returns how many secrets were read.
    pub async fn refresh(&self, name: Option<&SecretName>) -> Result<u64, SourceError> {
        let openbao = self.upstream.get();
        let config = self.config();
        if let Some(name) = name {
            if let (Some(h), Some(o)) = (openbao, &config.openbao)
                && o.maps(name)
            {
                return h
                    .refresh(Some(name.clone()))
                    .await
                    .map_err(SourceError::OpenBao);
            }
            let mut n = 0;
            for (k, v) in self.read_files().await? {
                if &k == name {
                    self.store.put(k, v, Origin::File);
                    n += 1;
                }
            }
            return Ok(n);
        }
        let mut n = self.reread_files().await?;
        if let (Some(h), Some(_)) = (openbao, &config.openbao) {
            n += h.refresh(None).await.map_err(SourceError::OpenBao)?;
        }
        Ok(n)
    }

    /// Apply the `[audit]` settings in force and reopen the audit log at `[server].audit_log`
    /// (on `SIGHUP` and `Admin.Reload`, after the config reload, whether or not it succeeded:
    /// logrotate has renamed the file away). Resolves once the writer has switched files.
    pub async fn reopen_audit(&self) -> Result<(), ReopenError> {
        let config = self.config();
        self.audit.configure(config.audit);
        self.audit.reopen(&config.server.audit_log).await
    }

    pub fn note_source(&self, source: &'static str, result: Result<(), String>) {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let h = sources.entry(source).or_default();
        match result {
            Ok(()) => h.last_success = Some(SystemTime::now()),
            Err(e) => {
                h.errors += 1;
                h.last_error = Some((SystemTime::now(), e));
            }
        }
    }

    fn note_node_in_use(&self, source: &'static str, node: NodeInUse) {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        sources.entry(source).or_default().node = Some(node);
    }

    pub fn dynamic_status(&self) -> Vec<upstream::LeaseStatus> {
        self.dynamic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn source_health(&self) -> BTreeMap<&'static str, SourceHealth> {
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Shutdown: tell watchers, flush nothing secret, zeroize every value.
    pub fn zeroize(&self) {
        self.store.announce(Event::ShuttingDown);
        self.store.clear();
    }
}

/// Background sources publish here: the store gets the values, Status the health.
impl SecretSink for Broker {
    /// One read of a source (one OpenBao refresh cycle) is one change of the store (contract
    /// §7): readers see all of it or none of it.
    fn publish(&self, origin: Origin, update: Update) {
        let mut batch: Vec<Change> = Vec::with_capacity(update.values.len());
        if let Some(provides) = &update.provides {
            batch.extend(
                self.store
                    .names_of(origin)
                    .into_iter()
                    .filter(|name| !provides.contains(name))
                    .map(Change::Delete),
            );
        }
        batch.extend(
            update
                .values
                .into_iter()
                .map(|(name, value)| Change::Put(name, value)),
        );
        self.store.apply(origin, batch);
    }

    fn note(&self, source: &'static str, result: Result<(), String>) {
        self.note_source(source, result);
    }

    fn note_node(&self, source: &'static str, node: NodeInUse) {
        self.note_node_in_use(source, node);
    }

    fn note_leases(&self, leases: Vec<upstream::LeaseStatus>) {
        *self.dynamic.lock().unwrap_or_else(|e| e.into_inner()) = leases;
    }
}

/// The initial secrets: selected environment variables (already captured and wiped) plus file
/// sources. Environment values not selected are dropped (and zeroized) here.
pub fn initial_secrets(
    config: &Config,
    env: Vec<(String, SecretBox<[u8]>)>,
) -> Result<(Secrets, Secrets), SourceError> {
    let env = sources::select_env(&config.env, env);
    let env = sources::without_openbao(config, env, "[sources.env]");
    let files = sources::read_files(&config.files.dirs)?;
    let files = sources::without_openbao(config, files, "[sources.files]");
    Ok((env, files))
}

/// `<socket>.state`: the registration file lives beside the socket.
pub fn state_path_for(socket: &Path) -> PathBuf {
    let mut name = socket
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "secretd.sock".into());
    name.push(".state");
    socket.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Decision, evaluate};

    fn config(text: &str) -> Config {
        Config::parse(text, Path::new("/test/secretd.toml"), Path::new("/etc")).unwrap()
    }

    fn broker(config: Config, dir: &Path) -> Arc<Broker> {
        let origin = ConfigOrigin {
            path: dir.join("secretd.toml"),
            explicit: true,
            etc: PathBuf::from("/etc"),
        };
        let socket = dir.join("secretd.sock");
        let registry = Registry::new(state_path_for(&socket), ProcFs::system());
        let (audit, _) = AuditLog::in_memory();
        Arc::new(Broker::new(
            config,
            origin,
            socket,
            Store::new(),
            registry,
            audit,
            ProcFs::system(),
        ))
    }

    fn allowed(att: &Attested, name: &str) -> bool {
        let name = SecretName::parse(name).unwrap();
        matches!(
            evaluate(&att.config.policy, &att.grant, &name),
            Decision::Allow { .. }
        )
    }

    /// The interleaving of issue 11 #4, forced: a reload lands after `attest` has read the
    /// policy in force and before it caches the grant. In the new policy, the caller's old scope
    /// index names a scope it does not match; the grant must never be read against it.
    #[test]
    fn a_reload_between_reading_the_policy_and_caching_the_grant_mixes_nothing() {
        let me = nix::unistd::getuid().as_raw();
        let other = me.wrapping_add(4242);
        let old = config(&format!(
            "[[scope]]\nname = \"mine\"\nuid = {me}\nsecrets = [\"PUBLIC\"]\n"
        ));
        let new = config(&format!(
            "[[scope]]\nname = \"vault\"\nuid = {other}\nsecrets = [\"TOP_SECRET\"]\n\n\
             [[scope]]\nname = \"mine\"\nuid = {me}\nsecrets = [\"PUBLIC\"]\n"
        ));
        let dir = tempfile::tempdir().unwrap();
        let broker = broker(old, dir.path());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = Peer::identify(&a, &broker.proc, 1);
        assert_eq!(peer.failure, None);

        let reloading = Arc::clone(&broker);
        *broker.after_policy_read.0.lock().unwrap() =
            Some(Box::new(move || reloading.install(Arc::new(new))));
        let during = broker.attest(&peer).unwrap();
        assert!(
            allowed(&during, "PUBLIC") && !allowed(&during, "TOP_SECRET"),
            "the call that raced the reload is decided by one policy"
        );

        let after = broker.attest(&peer).unwrap();
        assert_eq!(
            after.config.policy.scopes().len(),
            2,
            "the new policy is in force"
        );
        assert!(
            !allowed(&after, "TOP_SECRET"),
            "a grant computed on the old policy was resolved against the new one"
        );
        assert!(allowed(&after, "PUBLIC"));
        assert_eq!(after.grant.scope_names(&after.config.policy), ["mine"]);
    }
}
