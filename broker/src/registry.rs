//! Worker registrations: which live process runs which function.
//!
//! A registration binds (pid, start time) to a function name and holds a pidfd on the process;
//! a task waits on that pidfd and removes the registration the moment the process exits, so a
//! recycled pid never inherits it. A caller counts as a function's worker when it is the
//! registered process itself, or when its parent chain (read at accept time, checked by pid
//! *and* start time) reaches a registered process running under the caller's uid.
//!
//! Registrations are written to a root-only (0600) state file beside the socket, so a broker
//! restarted by its supervisor keeps serving running functions. On load, each entry is
//! revalidated: a pidfd is opened, the start time read through `/proc` must match the recorded
//! one, and the pidfd must still be alive after that read; anything else is dropped.

use std::{
    collections::HashMap,
    io::{self, Write},
    os::{fd::OwnedFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::{Deserialize, Serialize};

use crate::{
    peer::{Peer, pidfd_alive, pidfd_open},
    procfs::ProcFs,
};

/// Function names: what `secretd-shim --function` and policies use.
pub fn valid_function_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub pid: u32,
    pub starttime: u64,
    pub function: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    workers: Vec<Registration>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("process {pid} does not exist or cannot be opened: {source}")]
    NoProcess { pid: u32, source: io::Error },
    #[error("process {pid} exited while it was being registered")]
    Exited { pid: u32 },
    #[error("failed to read /proc for process {pid}: {reason}")]
    Proc { pid: u32, reason: String },
    #[error("failed to watch process {pid}: {source}")]
    Watch { pid: u32, source: io::Error },
}

#[derive(Debug)]
pub struct Registry {
    workers: Mutex<HashMap<u32, Registration>>,
    generation: AtomicU64,
    state_path: PathBuf,
    proc: ProcFs,
}

impl Registry {
    pub fn new(state_path: PathBuf, proc: ProcFs) -> Arc<Registry> {
        Arc::new(Registry {
            workers: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            state_path,
            proc,
        })
    }

    pub fn state_path(&self) -> &Path {
        &self.state_path
    }

    /// Bumped on every change; callers cache per generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Registration>> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register the peer process itself (`RegisterWorker` with pid 0): bound to the pidfd taken
    /// at accept, so there is no window in which the pid could be recycled.
    pub fn register_peer(
        self: &Arc<Self>,
        peer: &Peer,
        function: &str,
    ) -> Result<Registration, RegistryError> {
        let pidfd = peer.pidfd().map_err(|source| RegistryError::NoProcess {
            pid: peer.pid,
            source,
        })?;
        let reg = Registration {
            pid: peer.pid,
            starttime: peer.starttime,
            function: function.to_owned(),
        };
        self.insert(reg, pidfd)
    }

    /// Register another process by pid (admin use): pidfd first, then the start time, then a
    /// liveness check so the start time is the pidfd's process's.
    pub fn register_pid(
        self: &Arc<Self>,
        pid: u32,
        function: &str,
    ) -> Result<Registration, RegistryError> {
        let (pidfd, starttime) = self.open_verified(pid)?;
        let reg = Registration {
            pid,
            starttime,
            function: function.to_owned(),
        };
        self.insert(reg, pidfd)
    }

    fn open_verified(&self, pid: u32) -> Result<(OwnedFd, u64), RegistryError> {
        let pidfd = pidfd_open(pid).map_err(|source| RegistryError::NoProcess { pid, source })?;
        let stat = self.proc.stat(pid).map_err(|e| RegistryError::Proc {
            pid,
            reason: e.to_string(),
        })?;
        if !pidfd_alive(&pidfd) {
            return Err(RegistryError::Exited { pid });
        }
        Ok((pidfd, stat.starttime))
    }

    fn insert(
        self: &Arc<Self>,
        reg: Registration,
        pidfd: OwnedFd,
    ) -> Result<Registration, RegistryError> {
        let pid = reg.pid;
        let watched = crate::sys::watch_readable(pidfd)
            .map_err(|source| RegistryError::Watch { pid, source })?;
        self.lock().insert(pid, reg.clone());
        self.changed();
        let registry = Arc::clone(self);
        let starttime = reg.starttime;
        tokio::spawn(async move {
            // Readable = the process has exited.
            let _ = watched.readable().await;
            registry.remove_if(pid, starttime);
        });
        Ok(reg)
    }

    fn remove_if(&self, pid: u32, starttime: u64) {
        let removed = {
            let mut workers = self.lock();
            match workers.get(&pid) {
                Some(r) if r.starttime == starttime => workers.remove(&pid),
                _ => None,
            }
        };
        if let Some(r) = removed {
            tracing::info!(pid, function = %r.function, "registered worker exited; registration ended");
            self.changed();
        }
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = self.persist() {
            tracing::warn!(path = %self.state_path.display(), error = %e, "failed to write the registration state file");
        }
    }

    /// The function of a caller: its own registration, else the nearest registered ancestor
    /// under the same uid. Pids and start times must both match.
    pub fn function_for(&self, peer: &Peer) -> Option<String> {
        let workers = self.lock();
        if let Some(r) = workers
            .get(&peer.pid)
            .filter(|r| r.starttime == peer.starttime)
        {
            return Some(r.function.clone());
        }
        peer.ancestors
            .iter()
            .filter(|a| a.uid == peer.uid)
            .find_map(|a| workers.get(&a.pid).filter(|r| r.starttime == a.starttime))
            .map(|r| r.function.clone())
    }

    /// Atomically rewrite the state file (0600, temp file + rename). No fsync: the file only has
    /// to survive a broker crash (the page cache does), never a reboot (every registered process
    /// is gone after one), and an fsync per registration cost ~7 ms on a disk-backed /run.
    fn persist(&self) -> io::Result<()> {
        let mut workers: Vec<Registration> = self.lock().values().cloned().collect();
        workers.sort_by_key(|r| r.pid);
        let body = serde_json::to_vec_pretty(&StateFile {
            version: 1,
            workers,
        })?;
        let tmp = self.state_path.with_extension("state.tmp");
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&body)?;
        }
        std::fs::rename(&tmp, &self.state_path)
    }

    /// Load registrations left by a previous broker. Entries whose process is gone, or whose pid
    /// now belongs to a different process (start time differs), are dropped. A state file not
    /// owned by us or writable by others is ignored.
    pub fn load(self: &Arc<Self>) -> Vec<Registration> {
        use std::os::unix::fs::MetadataExt;
        let meta = match std::fs::symlink_metadata(&self.state_path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                tracing::warn!(path = %self.state_path.display(), error = %e, "cannot read the registration state file");
                return Vec::new();
            }
        };
        if !meta.is_file()
            || meta.uid() != nix::unistd::geteuid().as_raw()
            || meta.mode() & 0o077 != 0
        {
            tracing::warn!(path = %self.state_path.display(), "ignoring a registration state file that is not a regular 0600 file of ours");
            return Vec::new();
        }
        let state: StateFile = match std::fs::read(&self.state_path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(path = %self.state_path.display(), error = %e, "ignoring an unreadable registration state file");
                return Vec::new();
            }
        };
        let mut kept = Vec::new();
        for reg in state.workers {
            if !valid_function_name(&reg.function) {
                continue;
            }
            match self.open_verified(reg.pid) {
                Ok((pidfd, starttime)) if starttime == reg.starttime => {
                    if let Ok(r) = self.insert(reg, pidfd) {
                        kept.push(r);
                    }
                }
                _ => {
                    tracing::info!(pid = reg.pid, function = %reg.function, "dropped a stale registration (process gone or pid recycled)")
                }
            }
        }
        // Rewrite the file so dropped entries disappear from disk too.
        self.changed();
        kept
    }
}
